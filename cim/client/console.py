"""
The console client: one line typed, one command or message.

L{parse_line} turns a line into a command object (a pure function, so every
form of bad input is easy to test); L{Console} runs the commands against a
L{cim.client.library.Client} and prints what arrives.  Nothing typed can
stop the console: bad input prints a one-line error.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredLock,
    ensureDeferred,
)
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from cim import envelope as codes
from cim.client import emoji
from cim.client.history import History
from cim.client.library import (
    Ack,
    ClientClosed,
    ClientState,
    IClientListener,
    LoginError,
    NotLoggedIn,
    SendError,
    conversation_of,
)
from cim.client.route import RouteError
from cim.message import GROUP_PREFIX, INBOX_PREFIX, ChatMessage

# Commands (what parse_line returns)


@dataclass(frozen=True, slots=True)
class Say:
    """
    A plain line: to the current group, or to every online user.
    """

    text: str


@dataclass(frozen=True, slots=True)
class PrivateById:
    """
    C{<userId>;;<text>}.
    """

    user_id: int
    text: str


@dataclass(frozen=True, slots=True)
class PrivateByName:
    """
    C{@<name> <text>}.
    """

    name: str
    text: str


@dataclass(frozen=True, slots=True)
class Quit:
    """C{:q!} or C{:quit}."""


@dataclass(frozen=True, slots=True)
class OnlineUsers:
    """C{:olu}, or C{:pu <prefix>} with a prefix."""

    prefix: str = ""


@dataclass(frozen=True, slots=True)
class Help:
    """C{:all}."""


@dataclass(frozen=True, slots=True)
class Search:
    """C{:q <keyword>}: search the history file."""

    keyword: str


@dataclass(frozen=True, slots=True)
class Info:
    """C{:info}."""


@dataclass(frozen=True, slots=True)
class EmojiList:
    """C{:emoji [page]}."""

    page: int = 1


@dataclass(frozen=True, slots=True)
class Delay:
    """C{:delay <msg> <seconds>}: send C{message} later."""

    message: Say | PrivateById | PrivateByName
    seconds: float


@dataclass(frozen=True, slots=True)
class Groups:
    """C{:groups}."""


@dataclass(frozen=True, slots=True)
class Join:
    """C{:join <group>}: join and talk there."""

    group: str


@dataclass(frozen=True, slots=True)
class Leave:
    """C{:leave <group>}."""

    group: str


@dataclass(frozen=True, slots=True)
class Create:
    """C{:create <group>}: create, join and talk there."""

    group: str


@dataclass(frozen=True, slots=True)
class Members:
    """C{:members [group]}."""

    group: str = ""


@dataclass(frozen=True, slots=True)
class ShowHistory:
    """C{:history [conversation] [n]}: stored messages from the server."""

    conversation: str = ""
    count: int = 20


Command = (
    Say
    | PrivateById
    | PrivateByName
    | Quit
    | OnlineUsers
    | Help
    | Search
    | Info
    | EmojiList
    | Delay
    | Groups
    | Join
    | Leave
    | Create
    | Members
    | ShowHistory
)


class ParseError(ValueError):
    """
    A line that is no command nor message; its text is the one-line error.
    """


#: Command help, in the order C{:all} lists it.
HELP = [
    (":q! | :quit", "quit"),
    (":all", "list the commands"),
    (":olu", "list the online users"),
    (":pu <prefix>", "online users whose name starts with <prefix>"),
    (":q <keyword>", "search the chat history"),
    (":info", "who and where you are"),
    (":emoji [page]", "list the emoji aliases"),
    (":delay <msg> <seconds>", "send <msg> later"),
    (":groups", "your groups"),
    (":create <group>", "create a group and talk there"),
    (":join <group>", "join a group and talk there"),
    (":leave <group>", "leave a group"),
    (":members [group]", "the members of a group"),
    (":history [conversation] [n]", "the last n stored messages (u:<you> or a group)"),
    ("<text>", "to the current group, or to every online user"),
    ("<userId>;;<text>", "private message"),
    ("@<name> <text>", "private message"),
]

_GROUP_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
#: The longest :delay accepted, in seconds.
MAX_DELAY = 24 * 3600.0
#: The most messages :history shows.
MAX_HISTORY = 200
#: How many times the console asks for a password.
MAX_PROMPTS = 3


def _group(args: list[str], usage: str) -> str:
    """
    The one group id argument of a command (C{g:} prefix allowed).
    """
    if len(args) != 1:
        raise ParseError(f"usage: {usage}")
    group = args[0]
    if group.startswith(GROUP_PREFIX):
        group = group[len(GROUP_PREFIX) :]
    if not _GROUP_ID.match(group):
        raise ParseError(
            f"bad group name {group!r}: 1-64 letters, digits, '_', '-' or '.'"
        )
    return group


def _count(text: str) -> int:
    """
    A message count argument.
    """
    try:
        value = int(text)
    except ValueError:
        raise ParseError(f"{text!r} is not a number") from None
    if not 1 <= value <= MAX_HISTORY:
        raise ParseError(f"the count must be between 1 and {MAX_HISTORY}")
    return value


def _parse_message(line: str) -> Say | PrivateById | PrivateByName:
    """
    A line that is no command: plain, C{<id>;;<text>} or C{@<name> <text>}.
    """
    if line.startswith("@"):
        name, _, text = line[1:].partition(" ")
        if not name:
            raise ParseError("usage: @<name> <text>")
        if not text.strip():
            raise ParseError("empty message")
        return PrivateByName(name, text.strip())
    target, sep, text = line.partition(";;")
    if sep and target and not any(c.isspace() for c in target):
        if not target.isdigit() or int(target) <= 0:
            raise ParseError(f"{target!r} is not a user id (usage: <userId>;;<text>)")
        if not text.strip():
            raise ParseError("empty message")
        return PrivateById(int(target), text.strip())
    return Say(line)


def _is_command(word: str) -> bool:
    """
    Whether a line starting with C{word} is a command.
    """
    # ":smile: hello" is a message that starts with an emoji alias.
    return word.startswith(":") and not (len(word) > 2 and word.endswith(":"))


def parse_line(line: str) -> Command:
    """
    Parse one typed line.

    @raise ParseError: the line is an unknown command, a command with bad
        arguments, or a message without text or with a bad recipient.
    """
    line = line.strip()
    if not line:
        raise ParseError("empty message (:all lists the commands)")
    words = line.split()
    if not _is_command(words[0]):
        return _parse_message(line)
    name, args = words[0], words[1:]
    if name in (":q!", ":quit"):
        return Quit()
    if name == ":all":
        return Help()
    if name == ":olu":
        return OnlineUsers()
    if name == ":pu":
        if len(args) != 1:
            raise ParseError("usage: :pu <prefix>")
        return OnlineUsers(args[0])
    if name == ":q":
        if not args:
            raise ParseError("usage: :q <keyword> (:q! quits)")
        return Search(line.split(None, 1)[1])
    if name == ":info":
        return Info()
    if name == ":emoji":
        if len(args) > 1:
            raise ParseError("usage: :emoji [page]")
        if not args:
            return EmojiList()
        if not args[0].isdigit() or int(args[0]) < 1:
            raise ParseError(f"{args[0]!r} is not a page number")
        return EmojiList(int(args[0]))
    if name == ":delay":
        if len(args) < 2:
            raise ParseError("usage: :delay <msg> <seconds>")
        try:
            seconds = float(args[-1])
        except ValueError:
            raise ParseError(f"{args[-1]!r} is not a number of seconds") from None
        if not 0 <= seconds <= MAX_DELAY:
            raise ParseError(f"the delay must be between 0 and {MAX_DELAY:g} seconds")
        text = line.split(None, 1)[1].rsplit(None, 1)[0]
        if _is_command(text.split()[0]):
            raise ParseError("only messages can be delayed")
        return Delay(_parse_message(text), seconds)
    if name == ":groups":
        return Groups()
    if name == ":join":
        return Join(_group(args, ":join <group>"))
    if name == ":leave":
        return Leave(_group(args, ":leave <group>"))
    if name == ":create":
        return Create(_group(args, ":create <group>"))
    if name == ":members":
        return Members(_group(args, ":members [group]") if args else "")
    if name == ":history":
        if len(args) > 2:
            raise ParseError("usage: :history [conversation] [n]")
        if len(args) == 2:
            return ShowHistory(args[0], _count(args[1]))
        if len(args) == 1:
            if args[0].isdigit():
                return ShowHistory("", _count(args[0]))
            return ShowHistory(args[0])
        return ShowHistory()
    raise ParseError(f"unknown command {name} (:all lists the commands)")


# Output


def clock_time(timestamp_ms: int) -> str:
    """
    C{HH:MM:SS} of a timestamp, in local time.
    """
    return time.strftime("%H:%M:%S", time.localtime(timestamp_ms / 1000))


def format_message(message: ChatMessage) -> str:
    """
    How an incoming message is shown: C{[HH:MM:SS] sender: text}, marked
    C{(private)} or with its C{[group]}, emoji aliases rendered.
    """
    sender = message.sender_name or str(message.sender_id)
    text = emoji.render(message.text)
    stamp = clock_time(message.timestamp)
    if message.group_id or message.conversation.startswith(GROUP_PREFIX):
        group = message.group_id or message.conversation[len(GROUP_PREFIX) :]
        return f"[{stamp}] [{group}] {sender}: {text}"
    if message.conversation.startswith(INBOX_PREFIX) or message.receive_user_id:
        return f"[{stamp}] (private) {sender}: {text}"
    return f"[{stamp}] {sender}: {text}"


def describe(error: BaseException) -> str:
    """
    A one-line explanation of C{error} for the user.
    """
    if isinstance(error, RouteError):
        return error.message
    if isinstance(error, (LoginError, SendError)):
        return error.reason
    if isinstance(error, NotLoggedIn):
        return "not logged in yet"
    if isinstance(error, ClientClosed):
        return str(error) or "the client is closed"
    text = str(error).splitlines()[0] if str(error) else ""
    return text or type(error).__name__


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
    in C{twistd -n cim-client}, a L{StringTransport} in tests), and the
    client's listener.

    @param client: a L{cim.client.library.Client} (or an object with the
        same methods).
    @param clock: an L{IReactorTime} for C{:delay}.
    @param history_factory: makes the L{History} of a user id once logged
        in.
    @param on_quit: called once the console quit (after the client closed).
    @ivar group: the group plain lines go to, or C{""}.
    """

    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024
    log = Logger()

    def __init__(
        self,
        client: Any,
        clock: Any,
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
        self.group = ""
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

    # Output

    def say(self, text: str) -> None:
        """
        Print one line (or several).
        """
        if self.transport is not None:
            self.transport.write((text + "\n").encode("utf-8", "replace"))

    def error(self, text: str) -> None:
        """
        Print a one-line error.
        """
        self.say(f"error: {text}")

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
                    self.error(f"cannot log in: {describe(e)}")
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
        self._logged_in = True
        host, port = self.client.server or ("?", 0)
        self.say(
            f"logged in as {self.client.user_name} (id {self.client.user_id}) on "
            f"{host}:{port}; :all lists the commands"
        )
        # Run what was typed meanwhile.
        self._lock.release()
        return True

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
        text = line.decode("utf-8", "replace").rstrip("\r")
        if self._password_wanted is not None:
            wanted, self._password_wanted = self._password_wanted, None
            if self.secret_input is not None:
                self.secret_input(False)
            wanted.callback(text)
            return
        try:
            command = parse_line(text)
        except ParseError as e:
            self.error(str(e))
            return
        self.run(command)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.error(f"line too long (over {self.MAX_LENGTH} bytes)")

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

    def run(self, command: Command) -> Deferred[None]:
        """
        Run C{command} after the commands typed before it (C{:q!} at once);
        a failure prints a one-line error.
        """
        if isinstance(command, Quit):
            return self._run_now(command)
        d: Deferred[None] = self._lock.run(self._run_now, command)
        return d

    def _run_now(self, command: Command) -> Deferred[None]:
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

    async def execute(self, command: Command) -> None:
        """
        Do what C{command} says.
        """
        if isinstance(command, (Say, PrivateById, PrivateByName)):
            await self.send(command)
        elif isinstance(command, Quit):
            await self.quit()
        elif isinstance(command, Help):
            width = max(len(usage) for usage, _ in HELP)
            self.say(
                "\n".join(f"  {usage.ljust(width)}  {text}" for usage, text in HELP)
            )
        elif isinstance(command, OnlineUsers):
            await self.show_online(command.prefix)
        elif isinstance(command, Search):
            await self.search(command.keyword)
        elif isinstance(command, Info):
            self.show_info()
        elif isinstance(command, EmojiList):
            self.show_emoji(command.page)
        elif isinstance(command, Delay):
            self.delay(command)
        elif isinstance(command, Groups):
            groups = await self.client.my_groups()
            if not groups:
                self.say("you are in no group (:create <group> or :join <group>)")
            for group in groups:
                self.say(f"{'*' if group == self.group else ' '} {group}")
        elif isinstance(command, Create):
            await self.client.create_group(command.group)
            self.group = command.group
            self.say(f"created group {command.group}; plain lines go there now")
        elif isinstance(command, Join):
            await self.client.join_group(command.group)
            self.group = command.group
            self.say(f"joined {command.group}; plain lines go there now")
        elif isinstance(command, Leave):
            left = await self.client.leave_group(command.group)
            if self.group == command.group:
                self.group = ""
            if left:
                self.say(f"left {command.group}; plain lines go to everybody online")
            else:
                self.say(f"you were not in {command.group}")
        elif isinstance(command, Members):
            group = command.group or self.group
            if not group:
                raise ParseError("usage: :members <group> (or :join one first)")
            members = await self.client.group_members(group)
            self.say(
                f"{group}: "
                + ", ".join(f"{m.user_name} ({m.user_id})" for m in members)
            )
        elif isinstance(command, ShowHistory):
            await self.show_history(command)

    async def send(self, command: Say | PrivateById | PrivateByName) -> None:
        """
        Send a message; a private one is recorded in the history once
        stored.  Returns once the message is handed to the client (which
        resends it after reconnects until the server has it), so that the
        next command need not wait for the acknowledgement.
        """
        if isinstance(command, Say):
            if self.group:
                # It comes back like every group message, and is recorded then.
                sending = self.client.send_group(self.group, command.text)
                sending.addErrback(self._failed)
                return
            await self.client.broadcast(command.text)
            self.history.add(self._sent(command.text), "out", to_name="(everybody)")
            return
        if isinstance(command, PrivateByName):
            user_id = await self.resolve(command.name)
            to_name = command.name
        else:
            user_id = command.user_id
            to_name = self._name_of(user_id)

        def stored(ack: Ack) -> None:
            sent = self._sent(
                command.text,
                ack=ack,
                receive_user_id=user_id,
                client_msg_id=ack.client_msg_id,
            )
            self.history.add(sent, "out", to_name=to_name)

        sending = self.client.send_private(user_id, command.text)
        sending.addCallback(stored).addErrback(self._failed)

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

    def _name_of(self, user_id: int) -> str:
        """
        The name of C{user_id} if the history knows it, else C{""}.
        """
        for name, known in self.history.names.items():
            if known == user_id:
                return name
        return ""

    async def resolve(self, name: str) -> int:
        """
        The id of user C{name}: from the online users, else from the
        history.

        @raise ParseError: nobody of that name is known.
        """
        for user in await self.client.online_users():
            if user.user_name == name:
                self.history.names[name] = user.user_id
                return int(user.user_id)
        if name in self.history.names:
            return self.history.names[name]
        raise ParseError(f"unknown user {name!r} (not online, not in your history)")

    async def show_online(self, prefix: str) -> None:
        """
        C{:olu} and C{:pu}: the online users whose name starts with C{prefix}.
        """
        users = [
            u
            for u in await self.client.online_users()
            if u.user_name.startswith(prefix)
        ]
        if prefix:
            self.say(f"online users starting with {prefix!r}: {len(users)}")
        else:
            self.say(f"online users: {len(users)}")
        for user in users:
            self.say(f"  {user.user_id}  {user.user_name}")

    async def search(self, keyword: str) -> None:
        """
        C{:q}: the history records that mention C{keyword}.
        """
        records = await self.history.search(keyword)
        if not records:
            self.say(f"nothing in the history matches {keyword!r}")
            return
        for r in records:
            stamp = time.strftime(
                "%Y-%m-%d %H:%M:%S", time.localtime(r.get("ts", 0) / 1000)
            )
            where = r.get("to") or r.get("group") or ""
            arrow = f" -> {where}" if where else ""
            text = emoji.render(str(r.get("text", "")))
            self.say(f"[{stamp}] {r.get('from', '?')}{arrow}: {text}")

    def show_info(self) -> None:
        """
        C{:info}: who, where, and to whom plain lines go.
        """
        client = self.client
        server = f"{client.server[0]}:{client.server[1]}" if client.server else "none"
        target = f"group {self.group}" if self.group else "everybody online"
        self.say(
            f"user {client.user_name or '?'} (id {client.user_id or '?'}), "
            f"server {server}, route {self.route_url or '?'}, "
            f"state {client.state.value}, "
            f"talking to {target}"
        )

    def show_emoji(self, number: int) -> None:
        """
        C{:emoji}: one page of aliases, four per line.
        """
        try:
            items = emoji.page(number)
        except ValueError as e:
            raise ParseError(str(e)) from None
        self.say(f"emoji page {number}/{emoji.page_count()}:")
        for i in range(0, len(items), 4):
            self.say(
                "  " + "   ".join(f"{alias} {char}" for alias, char in items[i : i + 4])
            )

    def delay(self, command: Delay) -> None:
        """
        C{:delay}: run the message command after its delay.
        """

        def fire() -> None:
            self._delayed.discard(call)
            self.run(command.message)

        call = self.clock.callLater(command.seconds, fire)
        self._delayed.add(call)
        self.say(f"will send in {command.seconds:g}s")

    async def show_history(self, command: ShowHistory) -> None:
        """
        C{:history}: stored messages from the server.
        """
        if command.conversation:
            conversation = conversation_of(command.conversation)
        elif self.group:
            conversation = GROUP_PREFIX + self.group
        else:
            conversation = self.client.inbox()
        messages = await self.client.history(conversation, command.count)
        if not messages:
            self.say(f"no stored messages in {conversation}")
        for message in messages:
            self.say(format_message(message))

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
        try:
            await self.client.close()
        except Exception:
            self.log.failure("Closing the client failed")
        self.history.close()
        self.say("bye")
        self._quitting.callback(None)
        if self._io_open and self.transport is not None:
            # on_quit once the output is flushed (see connectionLost).
            self.transport.loseConnection()
        else:
            self._quit_done()

    # IClientListener

    def message_received(self, message: ChatMessage) -> None:
        self.history.add(message, "in")
        self.say(format_message(message))

    def ack_received(self, ack: Ack) -> None:
        pass

    def error_received(self, code: int, reason: str, client_msg_id: str) -> None:
        if not client_msg_id:  # refused sends are reported by send()
            self.error(f"server: {reason}")

    def state_changed(self, state: ClientState, reason: str) -> None:
        if state == ClientState.RECONNECTING and not self._announced_loss:
            self._announced_loss = True
            self.say(f"connection lost ({reason}); reconnecting...")
        elif state == ClientState.READY and self._announced_loss:
            self._announced_loss = False
            self.say(f"reconnected to {reason}")
        elif state == ClientState.FAILED and self._logged_in and self._quitting is None:
            self.error(f"disconnected: {reason} (:q! to quit)")


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
