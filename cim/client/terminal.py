"""
The console on a terminal: a line editor with input history on
L{twisted.conch.insults} (Twisted's terminal support, as
L{twisted.conch.recvline.HistoricRecvLine}, but on text rather than bytes,
so that CJK and combining characters edit and count as they show).

L{EditLine} is the editing model, pure and tested on its own: the text
being typed, the cursor, the input history, and what each key does to
them.  L{LineEditor} is the terminal protocol: it decodes keystrokes
(UTF-8, escape sequences, a bracketed paste), applies them to an
L{EditLine}, and draws the prompt and the line on the last row, one row
only (a line wider than the terminal scrolls sideways around the cursor).
L{LineEditor.show} prints lines above the input without breaking it: the
input row is erased, the lines are written, the input drawn again.

Who uses it (L{cim.client.console.Console}) gives it callables: what a line
typed is (C{on_line}), what Ctrl-C and Ctrl-D on an empty line mean
(C{on_interrupt}, C{on_eof}), and the prompt; nothing here knows about
chat.  The terminal must be in raw mode (L{raw_mode}); the caller restores
it.
"""

from __future__ import annotations

import codecs
import os
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from twisted.conch.insults import insults
from twisted.logger import Logger

#: The longest line kept in the input history, and how many are kept.
HISTORY_SIZE = 500

#: The modifier insults gives a key typed with Alt (ESC then the key).
ALT: object = insults.ServerProtocol.ALT  # type: ignore[attr-defined]

#: The bracketed paste mode (the terminal wraps a paste in these).
PASTE_MODE = 2004
PASTE_START = b"\x1b[200~"
PASTE_END = b"\x1b[201~"


def char_width(char: str) -> int:
    """
    How many terminal cells C{char} takes: 2 for wide (CJK) and fullwidth
    characters, 0 for combining marks and zero-width format characters, 1
    for the rest.
    """
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    if unicodedata.east_asian_width(char) in ("W", "F"):
        return 2
    return 1


def text_width(text: str) -> int:
    """
    How many terminal cells C{text} takes (see L{char_width}).
    """
    if text.isascii():
        return len(text)
    return sum(char_width(char) for char in text)


def shown(char: str) -> str:
    """
    How one character of the line being typed is drawn: control characters
    (a pasted tab or newline, an escape) as a visible stand-in, so that
    nothing typed or pasted acts on the terminal.
    """
    if char == "\n":
        return "\u21b5"
    if char == "\t":
        return " "
    category = unicodedata.category(char)
    if category in ("Cc", "Zl", "Zp", "Cs", "Co"):
        return "\ufffd"
    return char


class EditLine:
    """
    The line being typed and the input history.

    @ivar chars: the line, one string per code point.
    @ivar cursor: where the next character goes (0 to C{len(chars)}).
    @ivar history: the lines entered, oldest first.
    """

    def __init__(self) -> None:
        self.chars: list[str] = []
        self.cursor = 0
        self.history: list[str] = []
        self._position = 0  # in the history; len(history) is the new line
        self._draft = ""  # the new line, while browsing the history

    @property
    def text(self) -> str:
        return "".join(self.chars)

    def set(self, text: str) -> None:
        """
        Replace the line; the cursor goes to its end.
        """
        self.chars = list(text)
        self.cursor = len(self.chars)

    def insert(self, text: str) -> None:
        self.chars[self.cursor : self.cursor] = list(text)
        self.cursor += len(text)

    def backspace(self) -> None:
        if self.cursor:
            self.cursor -= 1
            del self.chars[self.cursor]

    def delete(self) -> None:
        if self.cursor < len(self.chars):
            del self.chars[self.cursor]

    def left(self) -> None:
        self.cursor = max(0, self.cursor - 1)

    def right(self) -> None:
        self.cursor = min(len(self.chars), self.cursor + 1)

    def home(self) -> None:
        self.cursor = 0

    def end(self) -> None:
        self.cursor = len(self.chars)

    def kill_before(self) -> None:
        """
        Ctrl-U: delete from the start of the line to the cursor.
        """
        del self.chars[: self.cursor]
        self.cursor = 0

    def kill_after(self) -> None:
        """
        Ctrl-K: delete from the cursor to the end of the line.
        """
        del self.chars[self.cursor :]

    def _word_start(self) -> int:
        i = self.cursor
        while i and self.chars[i - 1].isspace():
            i -= 1
        while i and not self.chars[i - 1].isspace():
            i -= 1
        return i

    def kill_word(self) -> None:
        """
        Ctrl-W: delete the word before the cursor (and the spaces after it).
        """
        start = self._word_start()
        del self.chars[start : self.cursor]
        self.cursor = start

    def word_left(self) -> None:
        self.cursor = self._word_start()

    def word_right(self) -> None:
        i, n = self.cursor, len(self.chars)
        while i < n and self.chars[i].isspace():
            i += 1
        while i < n and not self.chars[i].isspace():
            i += 1
        self.cursor = i

    def up(self) -> None:
        """
        The line entered before the one shown (the line being typed is kept
        as a draft to come back to).
        """
        if self._position == 0:
            return
        if self._position == len(self.history):
            self._draft = self.text
        self._position -= 1
        self.set(self.history[self._position])

    def down(self) -> None:
        """
        The line entered after the one shown, or back to the draft.
        """
        if self._position >= len(self.history):
            return
        self._position += 1
        if self._position == len(self.history):
            self.set(self._draft)
        else:
            self.set(self.history[self._position])

    def load_history(self, lines: list[str]) -> None:
        """
        Start with C{lines} as the lines entered before (the last ones kept).
        """
        self.history = [line for line in lines if line.strip()][-HISTORY_SIZE:]
        self._position, self._draft = len(self.history), ""

    def accept(self, remember: bool = True) -> str:
        """
        Enter: the line, which is cleared (and added to the history unless
        empty or told not to).
        """
        text = self.text
        if remember and text.strip():
            if not self.history or self.history[-1] != text:
                self.history.append(text)
                del self.history[:-HISTORY_SIZE]
        self.chars, self.cursor = [], 0
        self._position, self._draft = len(self.history), ""
        return text

    def window(self, width: int) -> tuple[str, int]:
        """
        What of the line fits in C{width} cells, drawn: the part around
        the cursor (C{…} where cut), and the cursor's cell in it.  Only the
        characters near the cursor are measured: a long line (a paste of
        10,000 characters) costs what fits on the screen.
        """
        chars = self.chars

        def cells(i: int) -> int:
            char = chars[i]
            if " " <= char < "\x7f":
                return 1
            return text_width(shown(char))

        used = 0
        for i in range(len(chars)):
            used += cells(i)
            if used >= width:
                break
        else:
            before = sum(cells(i) for i in range(self.cursor))
            return "".join(shown(c) for c in chars), before
        # Scroll: keep the cursor inside, with a marker at each cut end.
        room = max(width - 2, 1)
        start, skipped = self.cursor, 0
        while start > 0 and skipped + cells(start - 1) <= room - 1:
            start -= 1
            skipped += cells(start)
        head = "\u2026" if start > 0 else ""
        limit = width - 1 - len(head)
        out, used, end = [], 0, start
        while end < len(chars) and used + cells(end) <= limit:
            out.append(shown(chars[end]))
            used += cells(end)
            end += 1
        tail = "\u2026" if end < len(chars) else ""
        return head + "".join(out) + tail, len(head) + skipped


class LineEditor(insults.TerminalProtocol):
    """
    Line editing on a terminal: the prompt and the line on the last row,
    what is shown printed above it.

    Keys: printable text inserts; Left/Right, Home/End (Ctrl-A/Ctrl-E),
    Alt-B/Alt-F (Ctrl-Left/Right) move; Backspace, Delete, Ctrl-U, Ctrl-K,
    Ctrl-W delete; Up/Down (Ctrl-P/Ctrl-N) browse the input history; Tab
    completes (C{completer}: commands, names); Enter
    hands the line to C{on_line}; Ctrl-C clears the line (calls
    C{on_interrupt} when it is empty), Ctrl-D deletes the character under
    the cursor (calls C{on_eof} when the line is empty); Ctrl-L redraws.
    A bracketed paste inserts its text as it is, newlines included: a
    pasted text of several lines is one line (one message).

    @ivar limit: the longest line, in characters, that the prompt's counter
        measures against (the line is never cut: what to do with a longer
        one is C{on_line}'s business).
    """

    log = Logger()

    def __init__(
        self,
        on_line: Callable[[str], object],
        on_interrupt: Callable[[], object] = lambda: None,
        on_eof: Callable[[], object] = lambda: None,
        prompt: str = "> ",
        limit: int = 0,
    ) -> None:
        self.on_line = on_line
        self.on_interrupt = on_interrupt
        self.on_eof = on_eof
        self._prompt = prompt
        self.limit = limit
        self.line = EditLine()
        self.width = 80
        self.height = 24
        self.secret = False
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pasting = False
        self._batch = 0
        self._dirty = False
        self._open = False
        #: Called when the terminal is gone (standard input closed).
        self.on_lost: Callable[[], object] = lambda: None
        #: Tab: the words that the word before the cursor may become.
        self.completer: Callable[[str], list[str]] = lambda word: []

    # Set-up

    def connectionMade(self) -> None:
        self._open = True
        self.terminal.write(b"\x1b[?%dh" % PASTE_MODE)
        self.draw()

    @property
    def is_open(self) -> bool:
        """
        Whether the terminal is there to be written to.
        """
        return self._open

    def connectionLost(self, reason: object = None) -> None:
        self._open = False
        self.on_lost()

    def close(self) -> None:
        """
        Leave the terminal as it was (the input row erased, the bracketed
        paste mode off), and close it once what was written is out
        (C{on_lost} is called then).
        """
        if self._open:
            self._erase()
            self.terminal.write(b"\x1b[?%dl" % PASTE_MODE)
            self._open = False
            # Not the terminal's loseConnection: it resets the terminal,
            # clearing the screen.
            self.terminal.transport.loseConnection()

    def terminalSize(self, width: int, height: int) -> None:
        self.width, self.height = max(width, 10), max(height, 1)
        self.draw()

    # What the console sets

    @property
    def prompt(self) -> str:
        return self._prompt

    @prompt.setter
    def prompt(self, prompt: str) -> None:
        if prompt != self._prompt:
            self._prompt = prompt
            self.draw()

    def set_secret(self, secret: bool) -> None:
        """
        Hide what is typed (a password), or show it again.
        """
        self.secret = secret
        self.draw()

    def show(self, text: str) -> None:
        """
        Print C{text} (one line or several, made safe by the caller) above
        the line being typed.
        """
        if not self._open:
            return
        self._erase()
        for line in text.split("\n"):
            self.terminal.write(line.encode("utf-8", "replace"))
            self.terminal.write(b"\r\n")
        self._draw_now()

    # Input

    def dataReceived(self, data: bytes) -> None:
        """
        Not called by insults (it sends keystrokes); see L{Keyboard}.
        """

    def begin_batch(self) -> None:
        """
        Keystrokes of one read follow: draw once at the end
        (L{end_batch}), not after each (a paste of 10,000 characters).
        """
        self._batch += 1

    def end_batch(self) -> None:
        self._batch = max(0, self._batch - 1)
        if not self._batch and self._dirty:
            self._draw_now()

    def keystrokeReceived(self, keyID: bytes | object, modifier: object) -> None:
        t = self.terminal
        if isinstance(keyID, bytes) and len(keyID) == 1 and keyID >= b"\x80":
            self._text(self._decoder.decode(keyID))
            return
        if modifier is ALT:
            self._alt(keyID)
            return
        handler = {
            t.LEFT_ARROW: self.line.left,
            t.RIGHT_ARROW: self.line.right,
            t.HOME: self.line.home,
            t.END: self.line.end,
            t.UP_ARROW: self.line.up,
            t.DOWN_ARROW: self.line.down,
            t.DELETE: self.line.delete,
            t.BACKSPACE: self.line.backspace,
            b"\x08": self.line.backspace,  # Ctrl-H
            b"\x01": self.line.home,  # Ctrl-A
            b"\x05": self.line.end,  # Ctrl-E
            b"\x02": self.line.left,  # Ctrl-B
            b"\x06": self.line.right,  # Ctrl-F
            b"\x10": self.line.up,  # Ctrl-P
            b"\x0e": self.line.down,  # Ctrl-N
            b"\x15": self.line.kill_before,  # Ctrl-U
            b"\x0b": self.line.kill_after,  # Ctrl-K
            b"\x17": self.line.kill_word,  # Ctrl-W
        }.get(keyID)
        if handler is not None:
            handler()
            self.draw()
        elif keyID in (b"\r", b"\n"):
            if self._pasting:
                self._text("\n")
            else:
                self._enter()
        elif keyID == b"\t":
            if self._pasting:
                self._text("\t")
            else:
                self._complete()
        elif keyID == b"\x03":  # Ctrl-C
            if self.line.chars:
                self.line.accept(remember=False)
                self.draw()
            else:
                self.on_interrupt()
        elif keyID == b"\x04":  # Ctrl-D
            if self.line.chars:
                self.line.delete()
                self.draw()
            else:
                self.on_eof()
        elif keyID == b"\x0c":  # Ctrl-L
            self.terminal.eraseDisplay()
            self.terminal.cursorHome()
            self.draw()
        elif isinstance(keyID, bytes) and len(keyID) == 1 and keyID >= b" ":
            self._text(keyID.decode("ascii") if keyID < b"\x7f" else "")
        # Other control keys and function keys do nothing.

    def _alt(self, keyID: object) -> None:
        moves = {
            b"b": self.line.word_left,
            b"f": self.line.word_right,
            b"\x7f": self.line.kill_word,
        }
        move = moves.get(keyID)  # type: ignore[call-overload]
        if move is not None:
            move()
            self.draw()

    def unhandledControlSequence(self, seq: bytes) -> None:
        t = self.terminal
        if seq == PASTE_START:
            self._pasting = True
        elif seq == PASTE_END:
            self._pasting = False
        elif seq in (b"\x1b[1;5D", b"\x1b[1;3D"):
            self.line.word_left()
            self.draw()
        elif seq in (b"\x1b[1;5C", b"\x1b[1;3C"):
            self.line.word_right()
            self.draw()
        else:
            # Application-mode keys (ESC O x) that insults leaves to us.
            key = {
                b"\x1b[OH": t.HOME,
                b"\x1b[OF": t.END,
                b"\x1b[OA": t.UP_ARROW,
                b"\x1b[OB": t.DOWN_ARROW,
                b"\x1b[OC": t.RIGHT_ARROW,
                b"\x1b[OD": t.LEFT_ARROW,
            }.get(seq)
            if key is not None:
                self.keystrokeReceived(key, None)

    def _complete(self) -> None:
        """
        Tab: complete the word before the cursor (a command, a name): at
        once when one word fits, else as far as they agree, listing them.
        """
        line = self.line
        start = line.cursor
        while start and not line.chars[start - 1].isspace():
            start -= 1
        word = "".join(line.chars[start : line.cursor])
        if not word:
            return
        choices = sorted(set(self.completer(word)))
        if not choices:
            return
        # The word is replaced: a name may be completed in its own case.
        if len(choices) == 1:
            del line.chars[start : line.cursor]
            line.cursor = start
            line.insert(choices[0] + " ")
        else:
            common = os.path.commonprefix(choices)
            if len(common) > len(word):
                del line.chars[start : line.cursor]
                line.cursor = start
                line.insert(common)
            else:
                self.show("".join(shown(c) for c in "  ".join(choices)))
        self.draw()

    def _text(self, text: str) -> None:
        if text:
            self.line.insert(text)
            self.draw()

    def _enter(self) -> None:
        # The line typed stays on the screen (whole, unless over the
        # limit), above the new input row.
        if self.secret:
            self._erase()
        else:
            prompt = self.counter() + self._prompt
            if self.limit and len(self.line.chars) > self.limit:
                text = self.line.window(max(self.width - text_width(prompt) - 1, 8))[0]
            else:
                text = "".join(shown(c) for c in self.line.chars)
            self._erase()
            self.terminal.write((prompt + text).encode("utf-8", "replace"))
            self.terminal.write(b"\r\n")
        text = self.line.accept(remember=not self.secret)
        self._draw_now()
        self.on_line(text)

    # Drawing

    def counter(self) -> str:
        """
        The length counter shown before the prompt once the line is long:
        C{[4,000/4,096] }, or C{[10,000/4,096: too long] }.
        """
        n = len(self.line.chars)
        if not self.limit or n <= self.limit * 3 // 4:
            return ""
        over = ": too long" if n > self.limit else ""
        return f"[{n:,}/{self.limit:,}{over}] "

    def draw(self) -> None:
        """
        Redraw the input row (at the end of the batch of keystrokes).
        """
        if self._batch:
            self._dirty = True
        else:
            self._draw_now()

    def _erase(self) -> None:
        self.terminal.write(b"\r")
        self.terminal.eraseLine()

    def _draw_now(self, cursor_at_end: bool = False) -> None:
        self._dirty = False
        if not self._open:
            return
        prompt = self.counter() + self._prompt
        room = max(self.width - text_width(prompt) - 1, 8)
        if text_width(prompt) > self.width - 10:
            # A terminal too narrow for the prompt: the line matters more.
            prompt = "> "
            room = max(self.width - 3, 8)
        if self.secret:
            text, cursor = "", 0
        else:
            text, cursor = self.line.window(room)
        self._erase()
        self.terminal.write((prompt + text).encode("utf-8", "replace"))
        back = text_width(text) - cursor
        if back > 0 and not cursor_at_end:
            self.terminal.cursorBackward(back)


class Keyboard(insults.ServerProtocol):
    """
    Twisted's terminal protocol, telling the L{LineEditor} where each read's
    keystrokes start and end, so that it draws once per read.
    """

    terminalProtocol: LineEditor

    def dataReceived(self, data: bytes) -> None:
        editor = self.terminalProtocol
        editor.begin_batch()
        try:
            super().dataReceived(data)
        finally:
            editor.end_batch()


@contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """
    The terminal on C{fd} in raw mode (keys as they are typed, no echo, no
    signals from Ctrl-C), restored on the way out.
    """
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)
