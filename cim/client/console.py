"""
The console client: one line typed, one command or message.

L{cim.client.commands.parse_line} turns a line into an intent;
L{Console} runs the intents against a L{cim.client.library.Client}, one
handler per kind of intent, and prints what arrives as
L{cim.client.render} shows it (inert: nothing from others acts on the
terminal).  Nothing typed can stop the console: bad input prints a
one-line error, and a failed send says whether the message was queued or
not sent.

Plain lines go to the L{Target} that C{:to} sets, nobody at first, so that
a typo never reaches everybody; the prompt names it.  On a terminal the
console runs behind a L{cim.client.terminal.LineEditor} (L{Console.attach}):
what it says is printed above the line being typed.  Quitting with sends
or delayed messages pending warns first.

The console is one device of its user: a message it sent is printed once
(when stored, or when it comes back, whichever is first), the user's
messages from its other devices are printed marked as such, and its own
private messages get a read mark once the peer has read them.  What it
prints, it marks read (one C{READ} per conversation every
L{MARK_DELAY} seconds at most).
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredLock,
    ensureDeferred,
)
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from cim import envelope as codes
from cim.client import emoji, render
from cim.client.commands import (
    BY_NAME,
    AboutGroup,
    Approve,
    Create,
    Delay,
    EmojiList,
    Groups,
    Help,
    Info,
    Intent,
    Invite,
    Join,
    Leave,
    LooksLikeACommand,
    Members,
    Message,
    OnlineUsers,
    ParseError,
    PrivateByName,
    Quit,
    Reject,
    Remove,
    Requests,
    Say,
    Search,
    ShowHistory,
    To,
    Transfer,
    Unread,
    conversation_of,
    help_rows,
    parse_line,
    parse_message,
)
from cim.client.errors import ClientClosed, LoginError, NotLoggedIn, SendError
from cim.client.history import History
from cim.client.listeners import Ack, ClientState, IClientListener
from cim.client.render import describe, format_message
from cim.client.route import RouteError
from cim.client.statefile import read_json, write_json
from cim.limits import MAX_TEXT
from cim.message import (
    BROADCAST,
    GROUP_PREFIX,
    INBOX_PREFIX,
    ChatMessage,
    pair_members,
    peer_of,
)
from cim.names import name_key

if TYPE_CHECKING:
    from cim.client.terminal import LineEditor

#: How many times the console asks for a password.
MAX_PROMPTS = 3
#: Seconds between two read marks of a conversation (what is printed
#: meanwhile is marked read at once).
MARK_DELAY = 0.5
#: Client message ids of the messages sent here and printed, remembered so
#: that their echoes are not printed again.
PRINTED_MEMORY = 1000
#: One's own private messages remembered per conversation for read marks.
OWN_MEMORY = 50
#: How many lines typed are kept between runs (Up goes back through them).
INPUT_HISTORY = 200


@dataclass(frozen=True, slots=True)
class Target:
    """
    Where plain lines go: C{kind} is C{"nobody"} (the start: a plain line
    is refused until C{:to} says where), C{"all"} (everybody online),
    C{"user"} (C{name}, C{user_id}) or C{"group"} (C{name}).
    """

    kind: str = "nobody"
    name: str = ""
    user_id: int = 0

    def prompt(self) -> str:
        """
        The prompt's words: whom a plain line goes to.
        """
        return {
            "nobody": "(:to whom?)",
            "all": "to everybody",
            "user": f"to @{self.name}",
            "group": f"to [{self.name}]",
        }[self.kind]

    def said(self) -> str:
        """
        Whom plain lines go to, in a sentence.
        """
        return {
            "nobody": "nobody yet (:to @<user>, :to <group> or :to all)",
            "all": "everybody online",
            "user": f"@{self.name}",
            "group": f"group {self.name}",
        }[self.kind]


class SendFailed(Exception):
    """
    A message was not sent; the text says so and why.
    """


NOBODY = Target()
EVERYBODY = Target("all")


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _needs_password(error: BaseException) -> bool:
    """
    Whether a login failed for want of the right password.
    """
    if isinstance(error, RouteError):
        return error.code == codes.CONFLICT
    if isinstance(error, LoginError):
        if error.code == codes.CONFLICT:
            return True
        return error.code == codes.ACCOUNT_MISMATCH and "password" in error.reason
    return False


@implementer(IClientListener, IHalfCloseableProtocol)
class Console(LineReceiver):
    """
    The console on a line transport (L{twisted.internet.stdio.StandardIO}
    when C{twistd -n cim-client} reads a pipe, a L{StringTransport} in
    tests) or on a terminal (L{attach}), and the client's listener.

    @param client: a L{cim.client.library.Client} (or an object with the
        same methods).
    @param clock: an L{IReactorTime} for C{:delay}.
    @param history_factory: makes the L{History} of a user id once logged
        in.
    @param on_quit: called once the console quit (after the client closed).
    @ivar target: where plain lines go (L{Target}).
    """

    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024
    log = Logger()

    def __init__(
        self,
        client: Any,
        clock: IReactorTime,
        history_factory: Callable[[int], History] = lambda _: History(None),
        on_quit: Callable[[], object] = lambda: None,
        route_url: str = "",
        secret_input: Callable[[bool], object] | None = None,
    ) -> None:
        """
        @param secret_input: called with C{True} before a password is read
            from the next line, and C{False} after (to turn the terminal's
            echo off and on).
        """
        self.client = client
        self.clock = clock
        self.history_factory = history_factory
        self.history = History(None)
        self.on_quit = on_quit
        self.route_url = route_url
        self.secret_input = secret_input
        self.target = NOBODY
        self.terminal: LineEditor | None = None
        self._sending = 0
        self._online_names: list[str] = []
        self._quit_warned = False
        self._said_again = ""
        self._password_wanted: Deferred[str] | None = None
        # Commands run one after the other, in the order typed; lines typed
        # before the login completes wait for it.
        self._lock = DeferredLock()
        self._lock.acquire()
        self._delayed: set[IDelayedCall] = set()
        self._quitting: Deferred[None] | None = None
        self._announced_loss = False
        self._logged_in = False
        self._io_open = False
        self._quit_called = False
        self._printed: OrderedDict[str, None] = OrderedDict()
        self._own_shown: dict[str, list[ChatMessage]] = {}
        self._to_mark: dict[str, int] = {}
        self._mark_call: IDelayedCall | None = None
        self._last_private = ""

    # Output

    def say(self, text: str) -> None:
        """
        Print one line (or several), inert (see L{render.inert}): above the
        input line on a terminal.
        """
        if self.terminal is not None:
            self.terminal.show(render.inert(text))
        elif self.transport is not None:
            line = render.inert(text) + "\n"
            self.transport.write(line.encode("utf-8", "replace"))

    @property
    def group(self) -> str:
        """
        The group plain lines go to, or C{""}.
        """
        return self.target.name if self.target.kind == "group" else ""

    def set_target(self, target: Target) -> None:
        """
        Send plain lines to C{target} from now on.
        """
        self.target = target
        self.update_prompt()

    def prompt_text(self) -> str:
        """
        The prompt: whom a plain line goes to, and what is still sending.
        """
        sending = ""
        if self._sending:
            ready = self.client.state == ClientState.READY
            sending = f" ({self._sending} {'sending' if ready else 'queued'})"
        return f"{self.target.prompt()}{sending}> "

    def update_prompt(self) -> None:
        if self.terminal is not None:
            self.terminal.prompt = render.inert(self.prompt_text())

    def attach(self, terminal: LineEditor) -> None:
        """
        Run on a terminal (a L{LineEditor}): lines typed come from it, what
        is said is printed above its input line, a password is typed
        hidden, Ctrl-C or Ctrl-D on an empty line quit.
        """
        self.terminal = terminal
        terminal.on_line = self.line_typed
        terminal.on_interrupt = terminal.on_eof = self.quit_asked
        terminal.on_lost = self.terminal_lost
        terminal.limit = MAX_TEXT
        terminal.completer = self.complete
        self.secret_input = terminal.set_secret
        self.update_prompt()

    def error(self, text: str) -> None:
        """
        Print a one-line error.
        """
        self.say(render.error_line(text))

    # Logging in

    async def start(
        self, user_name: str, password: str | None = None, user_id: int | None = None
    ) -> bool:
        """
        Log in (asking for a password if the account needs one), then load
        the history.  @return: whether the login succeeded; when it did
        not, the error was printed and the console quit.
        """
        self.say(f"logging in as {user_name} via {self.route_url or 'the route'}...")
        prompts = 0
        while True:
            try:
                await self.client.login(user_name, password, user_id)
                break
            except Exception as e:
                if self._quitting is not None:
                    return False  # :q! while logging in
                if not _needs_password(e) or prompts == MAX_PROMPTS:
                    self.error(f"cannot log in: {self._login_failure(e)}")
                    await self.quit()
                    return False
                if password is not None:
                    self.error(describe(e))
            prompts += 1
            try:
                password = await self.ask_password(user_name)
            except ClientClosed:
                return False
        self.history = self.history_factory(self.client.user_id)
        try:
            await self.history.load()
        except Exception as e:
            self.error(f"cannot read the history: {describe(e)}")
        self._load_input_history()
        self._logged_in = True
        host, port = self.client.server or ("?", 0)
        self.say(
            f"logged in as {self.client.user_name} (id {self.client.user_id}) on "
            f"{host}:{port}; :all lists the commands"
        )
        await self._login_unread()
        # Run what was typed meanwhile.
        self._lock.release()
        return True

    def _login_failure(self, error: BaseException) -> str:
        """
        Why the login failed, in words: a route that cannot be reached is
        said so (not with the network library's message).
        """
        cause = error.__cause__
        if isinstance(error, LoginError) and not error.code and cause is not None:
            text = describe(cause)
            if text.startswith("the route "):
                route = self.route_url or "the route"
                return f"the route at {route}{text[len('the route') :]}"
        return describe(error)

    def _input_history_path(self) -> Path | None:
        """
        Where the lines typed on the terminal are kept between runs: beside
        the chat history (so per route, account and device), or nowhere.
        """
        if self.terminal is None or self.history.path is None:
            return None
        path = self.history.path
        return path.with_name(path.name.removesuffix(".jsonl") + ".typed.json")

    def _load_input_history(self) -> None:
        path = self._input_history_path()
        if path is None or self.terminal is None:
            return
        lines = read_json(path, "input history")
        if isinstance(lines, list):
            typed = [line for line in lines if isinstance(line, str)]
            self.terminal.line.load_history(typed + self.terminal.line.history)

    def _save_input_history(self) -> None:
        path = self._input_history_path()
        if path is None or self.terminal is None:
            return
        try:
            write_json(path, self.terminal.line.history[-INPUT_HISTORY:])
        except OSError as e:
            self.log.warn("Cannot save {path}: {e}", path=str(path), e=e)

    async def _login_unread(self) -> None:
        """
        Load the conversations' read state, and print the unread counts.
        """
        try:
            infos = await self.client.conversations()
        except Exception as e:
            self.log.info("Cannot read the unread counts: {e}", e=e)
            return
        for info in infos:
            if info.peer_id is not None and info.peer_name:
                self.history.names.setdefault(info.peer_name, info.peer_id)
        self.say(self._unread_line(infos))

    def _unread_line(self, infos: list[Any]) -> str:
        return render.unread_summary(
            [(self._where(info.conversation), info.unread) for info in infos]
        )

    def ask_password(self, user_name: str) -> Deferred[str]:
        """
        Take the next line as the password of C{user_name}.
        """
        self.say(f"password for {user_name}:")
        if self.secret_input is not None:
            self.secret_input(True)
        self._password_wanted = Deferred()
        return self._password_wanted

    # Input

    def lineReceived(self, line: bytes) -> None:
        self.line_typed(line.decode("utf-8", "replace").rstrip("\r"))

    def line_typed(self, text: str) -> None:
        """
        One line typed: a password asked for, a command or a message.  An
        empty line does nothing; a line over the limit is refused whole
        (on a terminal it goes back to the input line, to be shortened).
        """
        if self._password_wanted is not None:
            wanted, self._password_wanted = self._password_wanted, None
            if self.secret_input is not None:
                self.secret_input(False)
            wanted.callback(text)
            return
        if not text.strip():
            return
        if len(text) > MAX_TEXT:
            self.error(
                f"not sent: the line has {len(text):,} characters, over the limit "
                f"of {MAX_TEXT:,}; nothing was cut"
                + (": shorten it" if self.terminal is not None else "")
            )
            if self.terminal is not None:
                self.terminal.line.set(text)
                self.terminal.draw()
            return
        again, self._said_again = self._said_again, ""
        try:
            command = parse_line(text)
        except LooksLikeACommand as e:
            if text.strip() != again:
                self._said_again = text.strip()
                self.error(str(e))
                return
            command = parse_message(text.strip())
        except ParseError as e:
            self.error(str(e))
            return
        if not isinstance(command, Quit):
            self._quit_warned = False
        self.run(command)

    def complete(self, word: str) -> list[str]:
        """
        What C{word} (before the cursor, Tab pressed) may become: a
        command's name (C{:hi} is C{:history}), or C{@} and a user's name
        known from the history, the conversations and the last list of
        online users (C{@Bo} is C{@bob}).  Names that need quotes are
        completed quoted.
        """
        if word.startswith(":"):
            return [name for name in BY_NAME if name.startswith(word)]
        if not word.startswith("@"):
            return []
        typed = name_key(word[1:]) if word[1:].strip() else ""
        names = set(self.history.names) | set(self._online_names)
        for info in self.client.conversation_states():
            if info.peer_name:
                names.add(str(info.peer_name))
        found = []
        for name in names:
            if name and name_key(name).startswith(typed):
                if any(c.isspace() or c == '"' for c in name):
                    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
                    found.append(f'@"{escaped}"')
                else:
                    found.append("@" + name)
        return found

    def terminal_lost(self) -> None:
        """
        The terminal closed: after L{quit}, or standard input ended.
        """
        if self._quitting is not None and self._quitting.called:
            self._quit_done()
        else:
            ensureDeferred(self.quit()).addErrback(self._crashed)

    def quit_asked(self) -> None:
        """
        Ctrl-D (or Ctrl-C) on an empty line: quit, unless messages are
        still sending or delayed (then warn; asking again quits).
        """
        if self._password_wanted is not None or not self._warn_before_quit():
            ensureDeferred(self.quit()).addErrback(self._crashed)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.error(
            f"not sent: the line is over {self.MAX_LENGTH:,} bytes, over the limit "
            f"of {MAX_TEXT:,} characters; nothing was cut"
        )

    def connectionMade(self) -> None:
        self._io_open = True

    def readConnectionLost(self) -> None:
        """
        The input ended (a script piped in): quit once the commands typed
        so far have run.
        """
        if self._password_wanted is not None:
            wanted, self._password_wanted = self._password_wanted, None
            wanted.errback(ClientClosed("standard input closed"))
        self._lock.run(self.quit).addErrback(self._crashed)

    def writeConnectionLost(self) -> None:
        """
        The output is gone: nothing can be shown any more, quit.
        """
        ensureDeferred(self.quit()).addErrback(self._crashed)

    def connectionLost(self, reason: Any = None) -> None:
        # Standard input closed (or quit closed it, once "bye" was written).
        self._io_open = False
        if self._password_wanted is not None:
            wanted, self._password_wanted = self._password_wanted, None
            wanted.errback(ClientClosed("standard input closed"))
        if self._quitting is not None and self._quitting.called:
            self._quit_done()
        else:
            ensureDeferred(self.quit()).addErrback(self._crashed)

    def _quit_done(self) -> None:
        if not self._quit_called:
            self._quit_called = True
            self.on_quit()

    def run(self, command: Intent) -> Deferred[None]:
        """
        Run C{command} after the commands typed before it (C{:q!} at once);
        a failure prints a one-line error.
        """
        if isinstance(command, Quit):
            return self._run_now(command)
        d: Deferred[None] = self._lock.run(self._run_now, command)
        return d

    def _run_now(self, command: Intent) -> Deferred[None]:
        """
        Run C{command} now, printing its failure.
        """
        d = ensureDeferred(self.execute(command))
        d.addErrback(self._failed)
        return d

    def _failed(self, failure: Failure) -> None:
        """
        Print a command's failure (and log unexpected ones).
        """
        if failure.check(CancelledError):
            return
        expected = (
            ParseError,
            SendFailed,
            RouteError,
            LoginError,
            SendError,
            NotLoggedIn,
            ClientClosed,
        )
        if not failure.check(*expected):
            self.log.failure("A console command failed", failure)
        self.error(describe(failure.value or Exception("error")))

    def _crashed(self, failure: Failure) -> None:
        self.log.failure("The console failed", failure)

    # What each intent does

    @functools.singledispatchmethod
    async def execute(self, command: Intent) -> None:
        """
        Do what C{command} says: the handler registered for its type.
        """
        raise TypeError(f"no handler for {command!r}")

    @execute.register
    async def send(self, command: Message) -> None:
        """
        Send a message: a plain line to the current target, the others to
        their user.  Returns once the message is handed to the client
        (which resends it after reconnects until the server has it), so
        that the next command need not wait for the acknowledgement; the
        message is printed once stored.
        """
        if isinstance(command, Say):
            await self._say_to(self.target, command.text)
            return
        if isinstance(command, PrivateByName):
            user_id = await self.resolve(command.name, sending=True)
        else:
            user_id = command.user_id
        await self._send_private(user_id, command.text)

    async def _say_to(self, target: Target, text: str) -> None:
        """
        Send a plain line to C{target}.
        """
        if target.kind == "user":
            await self._send_private(target.user_id, text)
        elif target.kind == "group":
            group = target.name

            def stored_in_group(ack: Ack) -> None:
                sent = self._sent(text, ack=ack, client_msg_id=ack.client_msg_id)
                self._show_sent(replace(sent, group_id=group))

            self._sending_now(self.client.send_group(group, text), stored_in_group)
        elif target.kind == "all":
            try:
                await self.client.broadcast(text)
            except Exception as e:
                raise SendFailed(
                    f"not sent (to everybody online): {describe(e)}"
                ) from e
            sent = replace(self._sent(text), conversation=BROADCAST)
            self.history.add(sent, "out", to_name="(everybody)")
            self.say(format_message(sent, self.client.user_id or 0, now_ms=self._now()))
        else:
            raise ParseError(
                "not sent: say to whom first: :to @<user>, :to <group>, or :to all "
                "(everybody online); or @<user> <text> for one message"
            )

    async def _send_private(self, user_id: int, text: str) -> None:
        """
        Send C{text} to C{user_id}; once stored it is printed, marked when
        the user was offline (it waits for them, stored).
        """
        online = await self._online_ids()

        def stored(ack: Ack) -> None:
            sent = self._sent(
                text, ack=ack, receive_user_id=user_id, client_msg_id=ack.client_msg_id
            )
            note = ""
            if online is not None and user_id not in online:
                name = self._name_of(user_id) or str(user_id)
                note = f"(stored; {name} is offline: delivered when back)"
            self._show_sent(sent, note)

        self._sending_now(self.client.send_private(user_id, text), stored)

    def _sending_now(
        self, sending: Deferred[Ack], stored: Callable[[Ack], None]
    ) -> None:
        """
        A send handed to the client: counted in the prompt until stored or
        refused; said to be queued when the client is not connected.
        """
        if self.client.state != ClientState.READY:
            self.say(
                "queued: not connected right now; it is sent once the connection "
                "is back (:quit warns while it waits)"
            )
        self._sending += 1
        self.update_prompt()

        def done(result: object) -> object:
            self._sending -= 1
            self.update_prompt()
            return result

        sending.addBoth(done)
        sending.addCallback(stored).addErrback(self._send_failed)

    def _send_failed(self, failure: Failure) -> None:
        """
        A send the server refused, or that the client gave up.
        """
        if failure.check(CancelledError):
            return
        if not failure.check(SendError, ClientClosed, NotLoggedIn):
            self.log.failure("A send failed", failure)
        self.error(f"not sent: {describe(failure.value or Exception('error'))}")

    async def _online_ids(self) -> set[int] | None:
        """
        The ids of the users online now, or C{None} when it cannot be told
        (not connected, the route does not answer).
        """
        if self.client.state != ClientState.READY:
            return None
        try:
            return {int(u.user_id) for u in await self.client.online_users()}
        except Exception:
            return None

    def _now(self) -> int:
        return int(self.clock.seconds() * 1000)

    def _pending(self) -> str:
        """
        What quitting now would lose, in words, or C{""}.
        """
        parts = []
        if self._sending:
            parts.append(_plural(self._sending, "message") + " still sending")
        delayed = sum(1 for call in self._delayed if call.active())
        if delayed:
            parts.append(_plural(delayed, "delayed message") + " not sent yet")
        return " and ".join(parts)

    def _warn_before_quit(self) -> bool:
        """
        Whether to warn instead of quitting: something is pending and the
        user was not warned already.
        """
        pending = self._pending()
        if not pending or self._quit_warned:
            return False
        self._quit_warned = True
        several = self._sending + sum(1 for c in self._delayed if c.active()) > 1
        self.say(
            f"{pending}: quitting now loses {'them' if several else 'it'}; :q! "
            "(or Ctrl-D again) quits anyway, :quit again too"
        )
        return True

    @execute.register
    async def to(self, command: To) -> None:
        """
        C{:to}: where plain lines go from now on (alone: where they go).
        """
        target = command.target
        if not target:
            self.say(f"plain lines go to {self.target.said()}")
            return
        if target == "nobody":
            self.set_target(NOBODY)
        elif target == BROADCAST:
            self.set_target(EVERYBODY)
        elif target.startswith("@"):
            name = target[1:]
            user_id = await self.resolve(name)
            self.set_target(Target("user", self._name_of(user_id) or name, user_id))
        else:
            group = target[len(GROUP_PREFIX) :]
            if group not in await self.client.my_groups():
                raise ParseError(
                    f"you are not in group {group} (:join {group} first; "
                    f"for a user: :to @{group})"
                )
            self.set_target(Target("group", group))
        self.say(f"plain lines go to {self.target.said()} now")

    @execute.register
    async def _quit(self, command: Quit) -> None:
        if command.force or not self._warn_before_quit():
            await self.quit()

    @execute.register
    async def show_help(self, command: Help) -> None:
        """
        C{:all}: every command and message form.
        """
        self.say(render.help_listing(help_rows()))

    @execute.register
    async def show_online(self, command: OnlineUsers) -> None:
        """
        C{:olu} and C{:pu}: the online users whose name starts with the
        prefix.
        """
        online = await self.client.online_users()
        self._online_names = [u.user_name for u in online]
        users = [u for u in online if u.user_name.startswith(command.prefix)]
        self.say("\n".join(render.online_users(users, command.prefix)))

    @execute.register
    async def search(self, command: Search) -> None:
        """
        C{:q}: the history records that mention the keyword.
        """
        records = await self.history.search(command.keyword)
        if not records:
            self.say(f"nothing in the history matches {command.keyword!r}")
        for record in records:
            self.say(render.search_result(record))

    @execute.register
    async def show_info(self, command: Info) -> None:
        """
        C{:info}: who, where, and to whom plain lines go.
        """
        client = self.client
        server = f"{client.server[0]}:{client.server[1]}" if client.server else "none"
        target = self.target.said()
        self.say(
            f"user {client.user_name or '?'} (id {client.user_id or '?'}), "
            f"device {client.device or '?'}, "
            f"server {server}, route {self.route_url or '?'}, "
            f"state {client.state.value}, "
            f"talking to {target}"
        )

    @execute.register
    async def show_emoji(self, command: EmojiList) -> None:
        """
        C{:emoji}: one page of aliases.
        """
        try:
            items = emoji.page(command.page)
        except ValueError as e:
            raise ParseError(str(e)) from None
        self.say("\n".join(render.emoji_page(command.page, items)))

    @execute.register
    async def delay(self, command: Delay) -> None:
        """
        C{:delay}: run the message command after its delay.
        """

        message = command.message
        target = self.target
        if isinstance(message, Say) and target.kind == "nobody":
            await self._say_to(target, message.text)  # says to whom first

        def fire() -> None:
            self._delayed.discard(call)
            if isinstance(message, Say):
                d: Deferred[None] = self._lock.run(self._say_to, target, message.text)
                d.addErrback(self._failed)
            else:
                self.run(message)

        call = self.clock.callLater(command.seconds, fire)
        self._delayed.add(call)
        self.say(f"will send in {command.seconds:g}s")

    @execute.register
    async def show_groups(self, command: Groups) -> None:
        """
        C{:groups}: this user's groups, the current one starred.
        """
        groups = await self.client.my_groups()
        if not groups:
            self.say("you are in no group (:create <group> or :join <group>)")
        for line in render.group_list(groups, self.group):
            self.say(line)

    @execute.register
    async def create_group(self, command: Create) -> None:
        """
        C{:create}: create a group (with its policy), and talk there.
        """
        await self.client.create_group(
            command.group, command.policy or None, command.history or None
        )
        self.set_target(Target("group", command.group))
        policy = command.policy or "invite"
        how = {
            "open": "anyone may join",
            "invite": f"members join by invitation (:invite {command.group} <user>)",
            "approval": f"members join by your approval (:requests {command.group})",
        }[policy]
        self.say(f"created group {command.group} ({how}); plain lines go there now")

    @execute.register
    async def join_group(self, command: Join) -> None:
        """
        C{:join}: join a group, and talk there (or ask to join).
        """
        result = await self.client.join_group(command.group)
        if result.pending:
            self.say(f"asked to join {command.group}; waiting for its owner")
            return
        self.set_target(Target("group", command.group))
        if result.joined:
            self.say(f"joined {command.group}; plain lines go there now")
        else:
            self.say(f"you are in {command.group}; plain lines go there now")

    @execute.register
    async def leave_group(self, command: Leave) -> None:
        """
        C{:leave}: leave a group (plain lines go to everybody if it was the
        current one).
        """
        left = await self.client.leave_group(command.group)
        if self.group == command.group:
            self.set_target(NOBODY)
        if left:
            self.say(f"left {command.group}; plain lines go to {self.target.said()}")
        else:
            self.say(f"you were not in {command.group}")

    def _group_or_current(self, group: str, usage: str) -> str:
        """
        C{group}, or the current group when it is empty.

        @raise ParseError: neither.
        """
        group = group or self.group
        if not group:
            raise ParseError(f"usage: {usage} (or :join one first)")
        return group

    @execute.register
    async def show_members(self, command: Members) -> None:
        """
        C{:members}: the members of a group (the current one by default).
        """
        group = self._group_or_current(command.group, ":members <group>")
        self.say(render.members_line(group, await self.client.group_members(group)))

    @execute.register
    async def show_group(self, command: AboutGroup) -> None:
        """
        C{:ginfo}: a group's owner, policy, history mode and size.
        """
        group = self._group_or_current(command.group, ":ginfo <group>")
        self.say(render.group_info(await self.client.group_info(group)))

    async def _user_id(self, user: str) -> int:
        """
        The id of a user typed as an id or a name.
        """
        return int(user) if user.isdigit() else await self.resolve(user)

    @execute.register
    async def invite(self, command: Invite) -> None:
        """
        C{:invite}: let a user join the group (the owner).
        """
        user_id = await self._user_id(command.user)
        if await self.client.invite_to_group(command.group, user_id):
            self.say(f"invited {command.user} to {command.group}")
        else:
            self.say(f"{command.user} was invited to {command.group} already")

    @execute.register
    async def show_requests(self, command: Requests) -> None:
        """
        C{:requests}: who waits to join the group (the owner).
        """
        group = self._group_or_current(command.group, ":requests <group>")
        waiting = await self.client.join_requests(group)
        self.say("\n".join(render.join_requests(group, waiting)))

    @execute.register
    async def approve(self, command: Approve) -> None:
        """
        C{:approve}: let a waiting user in (the owner).
        """
        user_id = await self._user_id(command.user)
        await self.client.approve_request(command.group, user_id)
        self.say(f"{command.user} joined {command.group}")

    @execute.register
    async def reject(self, command: Reject) -> None:
        """
        C{:reject}: turn a waiting user down (the owner).
        """
        user_id = await self._user_id(command.user)
        await self.client.reject_request(command.group, user_id)
        self.say(f"turned down {command.user}'s request to join {command.group}")

    @execute.register
    async def remove(self, command: Remove) -> None:
        """
        C{:remove}: remove a member (the owner).
        """
        user_id = await self._user_id(command.user)
        if await self.client.remove_member(command.group, user_id):
            self.say(f"removed {command.user} from {command.group}")
        else:
            self.say(f"{command.user} is not in {command.group}")

    @execute.register
    async def transfer(self, command: Transfer) -> None:
        """
        C{:transfer}: hand the group over to a member (the owner).
        """
        user_id = await self._user_id(command.user)
        await self.client.transfer_group(command.group, user_id)
        self.say(f"{command.user} owns {command.group} now")

    @execute.register
    async def show_history(self, command: ShowHistory) -> None:
        """
        C{:history}: stored messages from the server, of a private
        conversation (both sides, one's own with their read marks) or of a
        group: the one named, else the current group, else the private
        conversation last shown.
        """
        target = command.conversation
        peer = None
        if target.startswith("@"):
            peer = await self.resolve(target[1:])
        elif target.startswith(INBOX_PREFIX) and target[2:].isdigit():
            peer = int(target[2:])
        elif pair_members(target) is not None:
            peer = peer_of(target, self.client.user_id or 0)
            if peer is None:
                raise ParseError("that conversation is not yours")
        elif not target and self.target.kind == "user":
            peer = self.target.user_id
        if peer is not None:
            conversation = self.client.private_conversation(peer)
            await self._learn_name(peer)
            try:
                messages = await self.client.history(peer=peer, limit=command.count)
            except RouteError as e:
                raise ParseError(
                    f"cannot read your messages with {self._where(conversation)}: "
                    f"{e.message}"
                ) from None
        else:
            if target:
                conversation = conversation_of(target)
            elif self.group:
                conversation = GROUP_PREFIX + self.group
            elif self._last_private:
                conversation = self._last_private
            else:
                raise ParseError("usage: :history @<user> | <group> [n]")
            try:
                messages = await self.client.history(conversation, command.count)
            except RouteError as e:
                if not conversation.startswith(GROUP_PREFIX):
                    raise
                group = conversation[len(GROUP_PREFIX) :]
                raise ParseError(
                    f"no group {group!r} whose history you can read"
                    + (
                        f"; your messages with the user {group}: :history @{group}"
                        if not target.startswith(GROUP_PREFIX)
                        else ""
                    )
                ) from e
        if not messages:
            self.say(f"no stored messages with {self._where(conversation)}")
        me = self.client.user_id or 0
        for message in messages:
            if me and message.sender_id == me:
                self.say(self._own_line(message))
            else:
                self.say(format_message(message, me, now_ms=self._now()))
            self._displayed(message)

    @execute.register
    async def show_unread(self, command: Unread) -> None:
        """
        C{:unread}: the unread counts, kept live since the login.
        """
        infos = self.client.conversation_states()
        if not infos:
            infos = await self.client.conversations()
        self.say(self._unread_line(infos))

    # Helpers of the handlers

    def _sent(
        self,
        text: str,
        ack: Ack | None = None,
        receive_user_id: int = 0,
        client_msg_id: str = "",
    ) -> ChatMessage:
        """
        The L{ChatMessage} the history records for a message this user sent.
        """
        return ChatMessage(
            msg_id=ack.msg_id if ack else 0,
            conversation=ack.conversation if ack else "",
            seq=ack.seq if ack else 0,
            sender_id=self.client.user_id or 0,
            sender_name=self.client.user_name,
            text=text,
            timestamp=ack.timestamp if ack else int(self.clock.seconds() * 1000),
            client_msg_id=client_msg_id,
            receive_user_id=receive_user_id,
        )

    def _show_sent(self, message: ChatMessage, note: str = "") -> None:
        """
        A message sent here was stored: print it, unless its echo was.
        """
        if message.client_msg_id not in self._printed:
            self._show_own(message, other_device=False, note=note)

    def _show_own(
        self, message: ChatMessage, other_device: bool, note: str = ""
    ) -> None:
        """
        Print (and record) one of the user's own messages.
        """
        if message.client_msg_id:
            self._printed[message.client_msg_id] = None
            while len(self._printed) > PRINTED_MEMORY:
                self._printed.popitem(last=False)
        me = self.client.user_id or 0
        peer = peer_of(message.conversation, me) if me else None
        if peer is None:
            peer = message.receive_user_id or None
        if peer is not None and not message.receive_user_id:
            message = replace(message, receive_user_id=peer)
        to_name = self._name_of(peer) if peer is not None else ""
        self.history.add(message, "out", to_name=to_name)
        self.say(self._own_line(message, other_device, note))
        if peer is not None and peer != me and message.conversation:
            shown = self._own_shown.setdefault(message.conversation, [])
            shown.append(message)
            del shown[:-OWN_MEMORY]
        self._displayed(message)

    def _own_line(
        self, message: ChatMessage, other_device: bool = False, note: str = ""
    ) -> str:
        """
        How one of the user's own messages is shown: to whom, and read or
        not by its peer.
        """
        me = self.client.user_id or 0
        peer = peer_of(message.conversation, me) if me else None
        if peer is None:
            peer = message.receive_user_id or None
        read = (
            peer is not None
            and peer != me
            and message.seq > 0
            and self.client.read_position(message.conversation, peer) >= message.seq
        )
        name = (self._name_of(peer) or str(peer)) if peer is not None else ""
        return format_message(
            message, me, name, other_device, read, now_ms=self._now(), note=note
        )

    def _where(self, conversation: str) -> str:
        """
        How a conversation is named: C{@<peer>}, C{[<group>]}, or its id.
        """
        if conversation.startswith(GROUP_PREFIX):
            return f"[{conversation[len(GROUP_PREFIX) :]}]"
        me = self.client.user_id or 0
        peer = peer_of(conversation, me) if me else None
        if peer is None:
            return conversation
        return f"@{self._name_of(peer) or peer}"

    def _displayed(self, message: ChatMessage) -> None:
        """
        C{message} was printed: mark it read soon (with whatever else is
        printed meanwhile).
        """
        conversation = message.conversation
        if not conversation or conversation == BROADCAST or message.seq <= 0:
            return
        if pair_members(conversation) is not None:
            self._last_private = conversation
        if message.seq > self._to_mark.get(conversation, 0):
            self._to_mark[conversation] = message.seq
        if self._mark_call is None:
            self._mark_call = self.clock.callLater(MARK_DELAY, self._mark_read)

    def _mark_read(self) -> None:
        """
        Mark read the latest message printed of each conversation.
        """
        self._mark_call = None
        marks, self._to_mark = self._to_mark, {}
        for conversation, seq in sorted(marks.items()):
            try:
                if seq > self.client.read_position(conversation):
                    self.client.mark_read(conversation, seq)
            except Exception:
                self.log.failure(
                    "Marking {conversation} read failed", conversation=conversation
                )

    async def _learn_name(self, user_id: int) -> None:
        """
        Find the name of C{user_id} among the online users when neither the
        history nor the conversations know it (so that it is shown by name).
        """
        if self._name_of(user_id):
            return
        try:
            online = await self.client.online_users()
        except Exception:
            return
        for user in online:
            if user.user_id == user_id:
                self.history.names[user.user_name] = user.user_id

    def _name_of(self, user_id: int) -> str:
        """
        The name of C{user_id} if the history or the conversations know
        it, else C{""}.
        """
        for name, known in self.history.names.items():
            if known == user_id:
                return name
        for info in self.client.conversation_states():
            if info.peer_id == user_id and info.peer_name:
                return str(info.peer_name)
        return ""

    async def resolve(self, name: str, sending: bool = False) -> int:
        """
        The id of user C{name} (by the route's naming rule: C{@Alice} is
        alice): from the online users, else from the history and the
        conversations.  When the route cannot be asked, what is known
        decides.

        @param sending: the name is a message's receiver (the error then
            says the message was not sent).
        @raise ParseError: nobody of that name is known.
        """
        # Names are the same account by their key (case, look-alikes...).
        key = name_key(name)
        known = None
        for seen, user_id in self.history.names.items():
            if name_key(seen) == key:
                known = user_id
        for info in self.client.conversation_states():
            if info.peer_id is not None and info.peer_name:
                if name_key(str(info.peer_name)) == key:
                    known = int(info.peer_id)
        not_sent = "not sent: " if sending else ""
        try:
            online = await self.client.online_users()
            self._online_names = [u.user_name for u in online]
        except Exception as e:
            if known is not None:
                return known
            raise ParseError(
                f"{not_sent}cannot look up the user {name!r}: {describe(e)}"
            ) from None
        for user in online:
            if name_key(user.user_name) == key:
                self.history.names[user.user_name] = user.user_id
                return int(user.user_id)
        if known is not None:
            return known
        raise ParseError(
            f"{not_sent}unknown user {name!r} (not online, not in your history)"
        )

    async def quit(self) -> None:
        """
        Close the client, print "bye", close the output (flushing it), then
        call C{on_quit} (once).
        """
        if self._quitting is not None:
            await self._quitting
            return
        self._quitting = Deferred()
        if self._password_wanted is not None and self.secret_input is not None:
            self.secret_input(False)
        for call in list(self._delayed):
            if call.active():
                call.cancel()
        self._delayed.clear()
        if self._mark_call is not None:
            if self._mark_call.active():
                self._mark_call.cancel()
            self._mark_read()
        try:
            await self.client.close()
        except Exception:
            self.log.failure("Closing the client failed")
        self._save_input_history()
        self.history.close()
        self.say("bye")
        self._quitting.callback(None)
        if self.terminal is not None and self.terminal.is_open:
            # on_quit once the output is flushed (see terminal_lost).
            self.terminal.close()
        elif self._io_open and self.transport is not None:
            # on_quit once the output is flushed (see connectionLost).
            self.transport.loseConnection()
        else:
            self._quit_done()

    # IClientListener

    def message_received(self, message: ChatMessage) -> None:
        me = self.client.user_id or 0
        if me and message.sender_id == me and message.conversation:
            here = self.client.sent_here(message.client_msg_id)
            if here and message.client_msg_id in self._printed:
                return  # printed when it was stored
            self._show_own(message, other_device=not here)
            return
        self.history.add(message, "in")
        self.say(format_message(message, me, now_ms=self._now()))
        self._displayed(message)

    def conversation_reset(self, conversation: str, seq: int) -> None:
        # What is numbered after seq now is other messages.
        shown = self._own_shown.get(conversation, [])
        self._own_shown[conversation] = [m for m in shown if m.seq <= seq]
        if self._to_mark.get(conversation, 0) > seq:
            self._to_mark[conversation] = seq
        self.say(render.conversation_reset(self._where(conversation), seq))

    def read_changed(self, user_id: int, conversation: str, seq: int) -> None:
        me = self.client.user_id or 0
        if user_id == me or peer_of(conversation, me) != user_id:
            return  # this user's other devices; group members
        shown = self._own_shown.get(conversation, [])
        read = [m for m in shown if m.seq <= seq]
        if not read:
            return
        self._own_shown[conversation] = [m for m in shown if m.seq > seq]
        name = self._name_of(user_id) or str(user_id)
        self.say(render.read_receipt(name, read[-1]))

    def ack_received(self, ack: Ack) -> None:
        pass

    def error_received(self, code: int, reason: str, client_msg_id: str) -> None:
        if not client_msg_id:  # refused sends are reported by send()
            self.say(render.server_error(reason))

    def state_changed(self, state: ClientState, reason: str) -> None:
        self.update_prompt()  # "sending" or "queued"
        if state == ClientState.RECONNECTING:
            shown = not self._announced_loss
            self._announced_loss = True
        elif state == ClientState.READY:
            shown = self._announced_loss
            self._announced_loss = False
        elif state == ClientState.FAILED:
            shown = self._logged_in and self._quitting is None
        else:
            shown = False
        if shown:
            self.say(render.STATE_LINES[state](reason))


def echo_switch(fd: int = 0) -> Callable[[bool], object] | None:
    """
    A C{secret_input} for L{Console} that turns the terminal's echo off
    while a password is typed; C{None} when C{fd} is not a terminal.
    """
    try:
        import termios
    except ImportError:  # not POSIX
        return None
    if not os.isatty(fd):
        return None
    saved = termios.tcgetattr(fd)

    def switch(secret: bool) -> None:
        attrs = termios.tcgetattr(fd)
        if secret:
            attrs[3] &= ~termios.ECHO
        else:
            attrs[3] = saved[3]
        termios.tcsetattr(fd, termios.TCSANOW, attrs)

    return switch
