"""
The console on a terminal: keystrokes typed into Twisted's terminal
protocol (L{cim.client.terminal.Keyboard}, L{LineEditor}), what it writes
fed to a terminal emulator (pyte), and the screen checked, as a person
sees it.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pyte
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection

from cim.client.console import Console
from cim.client.errors import LoginError
from cim.client.history import History
from cim.client.listeners import Ack
from cim.client.terminal import EditLine, Keyboard, LineEditor, text_width
from cim.limits import MAX_TEXT
from cim.message import ChatMessage
from tests.test_console import STAMP, FakeClient, message

UP, DOWN, RIGHT, LEFT = b"\x1b[A", b"\x1b[B", b"\x1b[C", b"\x1b[D"
HOME, END, DELETE = b"\x1b[H", b"\x1b[F", b"\x1b[3~"
CTRL_A, CTRL_C, CTRL_D, CTRL_E = b"\x01", b"\x03", b"\x04", b"\x05"
CTRL_U, CTRL_W, BACKSPACE, ENTER = b"\x15", b"\x17", b"\x7f", b"\r"


def paste(text: str) -> bytes:
    """
    C{text} as a terminal in bracketed paste mode sends it.
    """
    return b"\x1b[200~" + text.encode("utf-8") + b"\x1b[201~"


class Terminal:
    """
    A console on a terminal emulator of C{width} x C{height}, with a fake
    client and a clock.
    """

    def __init__(self, width: int = 160, height: int = 14) -> None:
        self.screen = pyte.Screen(width, height)
        self.stream = pyte.ByteStream(self.screen)
        self.client = FakeClient()
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.quits = 0
        self.console = Console(
            self.client,
            self.clock,
            history_factory=lambda _: History(None),
            on_quit=self._quit,
            route_url="http://route",
        )
        self.editor = LineEditor(self.console.line_typed)
        self.console.attach(self.editor)
        self.transport = StringTransportWithDisconnection()
        self.keyboard = Keyboard(lambda: self.editor)
        self.transport.protocol = self.keyboard
        self.keyboard.makeConnection(self.transport)
        self.editor.terminalSize(width, height)
        self.raw = b""
        self.pump()

    def _quit(self) -> None:
        self.quits += 1

    def login(self) -> None:
        Deferred.fromCoroutine(self.console.start("alice"))
        self.pump()

    def pump(self) -> None:
        data = self.transport.value()
        self.transport.clear()
        self.raw += data
        self.stream.feed(data)

    def keys(self, *keys: bytes | str) -> None:
        """
        Type C{keys} (each one read of the terminal).
        """
        for key in keys:
            self.keyboard.dataReceived(
                key.encode("utf-8") if isinstance(key, str) else key
            )
        self.pump()

    def enter(self, line: str) -> None:
        self.keys(line, ENTER)

    def receive(self, message: ChatMessage) -> None:
        self.console.message_received(message)
        self.pump()

    @property
    def rows(self) -> list[str]:
        return [row.rstrip() for row in self.screen.display]

    @property
    def text(self) -> list[str]:
        """
        The rows with something on them.
        """
        return [row for row in self.rows if row]

    @property
    def input_row(self) -> str:
        return self.rows[self.screen.cursor.y]

    @property
    def cursor(self) -> int:
        return int(self.screen.cursor.x)


@pytest.fixture
def term() -> Terminal:
    term = Terminal()
    term.login()
    return term


def test_the_prompt_names_the_target(term: Terminal) -> None:
    assert term.input_row == "(:to whom?)>"
    term.enter(":to @bob")
    assert term.text[-2:] == ["plain lines go to @bob now", "to @bob>"]
    term.enter(":join dev")
    assert term.input_row == "to [dev]>"
    term.enter(":to all")
    assert term.input_row == "to everybody>"


def test_the_line_typed_stays_on_the_screen(term: Terminal) -> None:
    term.enter(":to @bob")
    term.enter("hi bob")
    assert term.text[-4:] == [
        "plain lines go to @bob now",
        "to @bob> hi bob",
        f"[{STAMP}] (private) alice -> bob: hi bob",
        "to @bob>",
    ]
    assert term.client.calls[-1] == ("private", 1, "hi bob")


def test_editing_keys(term: Terminal) -> None:
    term.keys("helo world")
    term.keys(LEFT * 7, "l")
    assert term.input_row == "(:to whom?)> hello world"
    assert term.cursor == len("(:to whom?)> hell")
    term.keys(CTRL_A, DELETE, "H", CTRL_E, "!")
    assert term.input_row == "(:to whom?)> Hello world!"
    term.keys(HOME, RIGHT, RIGHT, BACKSPACE, END)
    assert term.input_row == "(:to whom?)> Hllo world!"
    assert term.cursor == len("(:to whom?)> Hllo world!")
    term.keys(CTRL_W)
    assert term.input_row == "(:to whom?)> Hllo"
    term.keys(" there", LEFT * 6, CTRL_U)
    assert term.input_row == "(:to whom?)>  there"
    assert term.cursor == len("(:to whom?)> ")


def test_input_history(term: Terminal) -> None:
    term.enter(":to all")
    term.enter("first")
    term.enter("second")
    term.keys("draft")
    term.keys(UP)
    assert term.input_row == "to everybody> second"
    term.keys(UP, UP)
    assert term.input_row == "to everybody> :to all"
    term.keys(UP)  # the oldest stays
    assert term.input_row == "to everybody> :to all"
    term.keys(DOWN, DOWN)
    assert term.input_row == "to everybody> second"
    term.keys(DOWN)
    assert term.input_row == "to everybody> draft"
    # A line from the history is sent again, edited.
    term.keys(CTRL_U, UP, UP, " again", ENTER)
    assert term.client.calls[-1] == ("broadcast", "first again")


def test_arrow_keys_never_become_text(term: Terminal) -> None:
    # On a cooked tty, Up then Enter sent "\x1b[A" to everybody.
    term.enter(":to all")
    term.keys(UP, DOWN, ENTER, b"\x1bOA", b"\x1b[1;5D", ENTER)
    assert ("broadcast", "\x1b[A") not in term.client.calls
    assert [c for c in term.client.calls if c[0] == "broadcast"] == []


def test_a_message_arrives_while_typing(term: Terminal) -> None:
    term.keys("half a li")
    term.receive(message("hello alice"))
    assert term.text[-2:] == [
        f"[{STAMP}] (private) bob: hello alice",
        "(:to whom?)> half a li",
    ]
    assert term.cursor == len("(:to whom?)> half a li")
    term.keys("ne")
    assert term.input_row == "(:to whom?)> half a line"


def test_many_messages_scroll_above_the_input(term: Terminal) -> None:
    term.keys("typing")
    for n in range(30):
        term.receive(message(f"message {n}", seq=n + 1))
    assert term.rows[-2] == f"[{STAMP}] (private) bob: message 29"
    assert term.input_row == "(:to whom?)> typing"
    assert term.screen.cursor.y == term.screen.lines - 1


def test_escape_sequences_from_others_arrive_inert() -> None:
    term = Terminal(width=200)
    term.login()
    hostile = (
        "\x1b]0;HACKED\x07\x1b[2K\x1b[31mred\x1b[0m \u202eevil \x1b[1A\x1b[Hx\rover"
    )
    term.keys("my half line")
    term.receive(message(hostile, sender="mal\x1b[1mlory\x1b]2;T\x07"))
    assert term.screen.title == "" and term.screen.icon_name == ""
    line = term.text[-2]
    assert "HACKED" in line and "\\x1b]0;HACKED\\x07" in line
    assert "\\x1b[31mred" in line and "\\u202eevil" in line and "\\x0dover" in line
    assert line.startswith(f"[{STAMP}] (private) mal\\x1b[1mlory\\x1b]2;T\\x07: ")
    # Nothing was coloured, erased or moved: the input line is intact.
    assert all(
        char.fg == "default" and not char.bold
        for char in term.screen.buffer[0].values()
    )
    assert term.input_row == "(:to whom?)> my half line"
    # Group names and reasons too.
    term.receive(message("x", conversation="g:d\x1b[2Kev", group_id="d\x1b[2Kev"))
    assert "[d\\x1b[2Kev]" in term.text[-2]


def test_a_long_paste_is_one_line_and_refused_whole(term: Terminal) -> None:
    term.enter(":to all")
    text = ("0123456789" * 1000)[:9_990] + "\nlast line"
    term.keys(paste(text))
    # One line (the newline pasted is in it, shown as ↵), scrolled around
    # the cursor, with its length against the limit.
    assert term.input_row.startswith("[10,000/4,096: too long] to everybody> …")
    assert term.input_row.endswith("789\u21b5last line")
    term.keys(ENTER)
    assert (
        f"error: not sent: the line has 10,000 characters, over the limit of {MAX_TEXT:,}; nothing was cut: shorten it"
        in " ".join(term.text)
    )
    assert [c for c in term.client.calls if c[0] == "broadcast"] == []
    # It is back on the input line, whole, to be shortened.
    assert term.editor.line.text == text
    # Shortened to the limit, it is sent whole.
    term.keys(CTRL_U, paste("x" * (MAX_TEXT + 3)), ENTER)
    assert "the line has 4,099 characters" in " ".join(term.text)
    term.keys(BACKSPACE * 3, ENTER)
    assert term.client.calls[-1] == ("broadcast", "x" * MAX_TEXT)


def test_a_paste_of_several_lines_is_one_message(term: Terminal) -> None:
    term.enter(":to @bob")
    term.keys(paste("line one\nline two\r\nline three"), ENTER)
    assert term.client.calls[-1] == ("private", 1, "line one\nline two\n\nline three")


def test_cjk_and_combining_text_count_as_they_show(term: Terminal) -> None:
    term.keys("你好 e\u0301!")
    # (pyte keeps the accent in the cell of its e.)
    assert unicodedata.normalize("NFC", term.input_row) == "(:to whom?)> 你好 é!"
    # Two wide characters, a space, e with its accent, "!": 7 cells.
    assert term.cursor == len("(:to whom?)> ") + 7
    term.keys(LEFT, LEFT, LEFT)  # before "!", the accent, "e"
    assert term.cursor == len("(:to whom?)> ") + 5
    term.keys(LEFT)
    assert term.cursor == len("(:to whom?)> ") + 4
    assert text_width("你好 e\u0301!") == 7


def test_cjk_up_to_the_limit_is_sent_whole(term: Terminal) -> None:
    term.enter(":to @bob")
    text = "中" * MAX_TEXT
    term.keys(paste(text))
    assert term.input_row.startswith(f"[{MAX_TEXT:,}/{MAX_TEXT:,}] to @bob> …")
    term.keys(ENTER)
    assert term.client.calls[-1] == ("private", 1, text)
    term.keys(paste(text + "文"), ENTER)
    assert "not sent: the line has 4,097 characters" in " ".join(term.text)


def test_an_empty_line_does_nothing(term: Terminal) -> None:
    before = term.text
    term.keys(ENTER, "   ", ENTER)
    assert "error" not in " ".join(term.text)
    assert len(term.text) == len(before) + 2  # the two lines typed


def test_ctrl_c_clears_the_line_then_quits(term: Terminal) -> None:
    term.keys("oops")
    term.keys(CTRL_C)
    assert term.input_row == "(:to whom?)>"
    assert term.quits == 0
    term.keys(CTRL_C)
    assert term.quits == 1 and term.client.closed
    assert term.text[-1] == "bye"


def test_ctrl_d_quits_on_an_empty_line_only(term: Terminal) -> None:
    term.keys("abc", LEFT, LEFT, CTRL_D)
    assert term.input_row == "(:to whom?)> ac"
    term.keys(CTRL_E, CTRL_U, CTRL_D)
    assert term.quits == 1


def test_quitting_with_messages_pending_warns_first() -> None:
    term = Terminal(width=200)
    term.login()
    term.enter(":to @bob")
    term.enter(":delay see you 30")
    pending: Deferred[Ack] = Deferred()
    term.client.send_private = lambda uid, text: pending  # type: ignore[method-assign]
    term.enter("still sending")
    assert term.input_row == "to @bob (1 sending)>"
    term.keys(CTRL_D)
    assert term.quits == 0
    assert (
        "1 message still sending and 1 delayed message not sent yet: quitting now "
        "loses them; :q! (or Ctrl-D again) quits anyway, :quit again too"
    ) in "".join(term.text)
    term.keys(CTRL_D)
    assert term.quits == 1


def test_quit_command_warns_and_q_bang_does_not() -> None:
    term = Terminal(width=200)
    term.login()
    term.enter(":to all")
    term.enter(":delay later 30")
    term.enter(":quit")
    assert term.quits == 0 and "quitting now loses it" in "".join(term.text)
    term.enter(":q!")
    assert term.quits == 1


def test_a_password_is_typed_hidden() -> None:
    term = Terminal()
    term.client.login_errors = [LoginError("4090", "the user name is taken")]
    results: list[bool] = []
    Deferred.fromCoroutine(term.console.start("alice")).addCallback(results.append)
    term.pump()
    assert term.text[-2] == "password for alice:"
    term.keys("s3cret")
    assert "s3cret" not in "".join(term.rows)
    term.keys(ENTER)
    assert results == [True]
    assert "s3cret" not in "".join(term.rows)
    assert term.editor.line.history == []
    assert term.client.calls[-1] == ("login", "alice", "s3cret", None)


def test_a_narrow_terminal_scrolls_the_line_sideways() -> None:
    term = Terminal(width=30)
    term.login()
    term.keys("a" * 20 + "b" * 20)
    row = term.input_row
    assert row.startswith("(:to whom?)> …") and row.endswith("b")
    assert len(row) <= 30
    term.keys(HOME)
    assert term.input_row.startswith("(:to whom?)> aaa") and term.input_row.endswith(
        "…"
    )
    assert term.cursor == len("(:to whom?)> ")


def test_edit_line_model() -> None:
    line = EditLine()
    line.insert("one two  three")
    line.kill_word()
    assert line.text == "one two  "
    line.kill_word()
    assert line.text == "one "
    line.word_left()
    assert line.cursor == 0
    line.word_right()
    assert line.cursor == 3
    line.kill_after()
    assert line.text == "one"
    assert line.accept() == "one" and line.history == ["one"]
    assert line.accept() == "" and line.history == ["one"]


def test_word_keys_and_a_resize(term: Terminal) -> None:
    term.keys("one two three", b"\x1bb", "X", b"\x1b[1;5D", "Y")
    assert term.input_row == "(:to whom?)> one two YXthree"
    term.keys(b"\x1b[1;5C", b"\x1bf", b"\x1b\x7f")
    assert term.editor.line.text == "one two "
    term.screen.resize(term.screen.lines, 20)
    term.editor.terminalSize(20, term.screen.lines)
    term.pump()
    # Too narrow for the prompt: the line keeps the room.
    assert term.input_row == "> one two"


def test_the_terminal_closing_quits(term: Terminal) -> None:
    term.transport.loseConnection()
    assert term.client.closed and term.quits == 1


def test_tab_completes_commands_and_names(term: Terminal) -> None:
    term.keys(":hi\t")
    assert term.editor.line.text == ":history "
    term.keys(CTRL_U, ":q\t")
    assert term.text[-2] == ":q  :q!  :quit"
    assert term.editor.line.text == ":q"
    # Names: from the online users once listed, by the naming rule.
    term.keys(CTRL_U)
    term.enter(":olu")
    term.keys("@AL\t")
    assert term.editor.line.text == "@alice "
    term.keys(CTRL_U, "@b\t")
    assert term.text[-2] == "@bea  @bob"
    term.keys("o\t", "hi")
    assert term.editor.line.text == "@bob hi"
    term.console.history.names["bob smith"] = 12
    term.keys(CTRL_U, "@bob\t")
    assert term.editor.line.text == "@bob"  # bob, or "bob smith"
    assert term.text[-2] == '@"bob smith"  @bob'
    term.keys(CTRL_U, "hi @bob_\t")  # nothing fits: nothing changes
    assert term.editor.line.text == "hi @bob_"


def test_a_quoted_name_is_completed_quoted(term: Terminal) -> None:
    term.console.history.names['bob "the" smith'] = 12
    term.keys("@bob \t")  # the word before the cursor is empty: nothing
    assert term.editor.line.text == "@bob "
    term.keys(CTRL_U, "@bob\t")
    assert term.editor.line.text == '@"bob \\"the\\" smith" '
    term.client.online = []
    term.keys("hi", ENTER)
    assert term.client.calls[-1] == ("private", 12, "hi")


def test_lines_typed_are_kept_for_the_next_run(tmp_path: Path) -> None:
    def history(_: int) -> History:
        return History(tmp_path / "1-abc-dev.jsonl")

    first = Terminal()
    first.console.history_factory = history
    first.login()
    first.enter(":to all")
    first.enter("hello again")
    first.enter(":q!")
    assert (tmp_path / "1-abc-dev.typed.json").exists()
    second = Terminal()
    second.console.history_factory = history
    second.keys("draft before the login")
    second.login()
    second.keys(CTRL_U, UP)
    assert second.editor.line.text == ":q!"
    second.keys(UP)
    assert second.editor.line.text == "hello again"
