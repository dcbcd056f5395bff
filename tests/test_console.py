"""
The console client in memory: command parsing (a pure function) and the
console's output through a L{StringTransport}, with a fake client behind it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, get_args

import pytest
from twisted.internet import defer
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.python import usage
from twisted.web._newclient import ResponseNeverReceived

from cim.client import emoji
from cim.client.commands import (
    BY_NAME,
    COMMANDS,
    MESSAGE_FORMS,
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
    Members,
    OnlineUsers,
    ParseError,
    PrivateById,
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
    help_rows,
    parse_line,
)
from cim.client.console import MARK_DELAY, Console
from cim.client.errors import ClientClosed, LoginError, NotLoggedIn, SendError
from cim.client.history import History, history_path
from cim.client.listeners import Ack, ClientState
from cim.client.reads import ConversationInfo, ReadState
from cim.client.render import STATE_LINES, describe, format_message
from cim.client.route import GroupInfo, JoinResult, RouteError, User
from cim.client.session import FINAL_KICKS
from cim.client.tap import Options
from cim.message import KICK_REPLACED, ChatMessage, pair_conversation

# Parsing


@pytest.mark.parametrize(
    "line, command",
    [
        ("hello world", Say("hello world")),
        ("  hello  ", Say("hello")),
        (":smile: hello", Say(":smile: hello")),
        ("a b;;c", Say("a b;;c")),
        ("12;;hi there", PrivateById(12, "hi there")),
        ("@bob hi there", PrivateByName("bob", "hi there")),
        (":q!", Quit(True)),
        (":quit", Quit()),
        (":all", Help()),
        (":olu", OnlineUsers()),
        (":pu al", OnlineUsers("al")),
        (":q some words", Search("some words")),
        (":info", Info()),
        (":emoji", EmojiList(1)),
        (":emoji 3", EmojiList(3)),
        (":delay hello there 5", Delay(Say("hello there"), 5.0)),
        (":delay 12;;hi 0.5", Delay(PrivateById(12, "hi"), 0.5)),
        (":groups", Groups()),
        (":join dev", Join("dev")),
        (":join g:dev", Join("dev")),
        (":leave dev", Leave("dev")),
        (":create dev.team-1", Create("dev.team-1")),
        (":create dev open", Create("dev", "open")),
        (":create dev full approval", Create("dev", "approval", "full")),
        (":create g:dev invite join", Create("dev", "invite", "join")),
        (":ginfo", AboutGroup()),
        (":ginfo dev", AboutGroup("dev")),
        (":invite dev 12", Invite("dev", "12")),
        (":invite g:dev @bob", Invite("dev", "bob")),
        (':invite dev @"bob smith"', Invite("dev", "bob smith")),
        (':remove dev "a b"', Remove("dev", "a b")),
        (":requests", Requests()),
        (":requests dev", Requests("dev")),
        (":approve dev bob", Approve("dev", "bob")),
        (":reject dev 3", Reject("dev", "3")),
        (":remove dev bob", Remove("dev", "bob")),
        (":transfer dev 4", Transfer("dev", "4")),
        (":members", Members()),
        (":members dev", Members("dev")),
        (":history", ShowHistory()),
        (":history 5", ShowHistory("", 5)),
        (":history dev", ShowHistory("dev")),
        (":history u:3 7", ShowHistory("u:3", 7)),
        ("1 ;; x", PrivateById(1, "x")),
        ('@"bob smith" hi', PrivateByName("bob smith", "hi")),
        ('@"a \\"q\\" b" hi', PrivateByName('a "q" b', "hi")),
        ("@@bob hi", PrivateByName("@bob", "hi")),
        ("@:x hi", PrivateByName(":x", "hi")),
        (":quit", Quit()),
        (":to", To()),
        (":to all", To("all")),
        (":to everybody", To("all")),
        (":to @Bob", To("@Bob")),
        (':to @"bob smith"', To("@bob smith")),
        (":to dev", To("g:dev")),
        (":to g:dev", To("g:dev")),
        (":to nobody", To("nobody")),
    ],
)
def test_parse(line: str, command: object) -> None:
    assert parse_line(line) == command


@pytest.mark.parametrize(
    "line, error",
    [
        ("", "empty message"),
        ("   ", "empty message"),
        ("abc;;x", "'abc' is not a user id"),
        ("0;;x", "'0' is not a user id"),
        ("12;;", "empty message"),
        ("12;;   ", "empty message"),
        ("@bob", "empty message"),
        ("@ hi", "usage: @<name>"),
        (":nope", "unknown command :nope"),
        (":emoji x", "'x' is not a page number"),
        (":emoji 0", "not a page number"),
        (":emoji 1 2", "usage: :emoji"),
        (":q", "usage: :q <keyword>"),
        (":pu", "usage: :pu"),
        (":delay hello", "usage: :delay"),
        (":delay hello soon", "'soon' is not a number of seconds"),
        (":delay hello -1", "between 0 and"),
        (":delay :q! 5", "only messages can be delayed"),
        (":delay abc;;x 5", "not a user id"),
        (":join", "usage: :join"),
        (":join a/b", "bad group name"),
        (":join " + "x" * 65, "bad group name"),
        (":leave a b", "usage: :leave"),
        (":create dev secret", "'secret': the policy is one of open, invite"),
        (":create dev open invite", "'invite': the policy is one of"),
        (":create dev full full", "'full': the policy is one of"),
        (":create a b c d", "usage: :create"),
        (":invite dev", "usage: :invite <group> <user>"),
        (":invite dev 0", "'0' is not a user id"),
        (":invite dev @", "usage: :invite"),
        (":approve a/b bob", "bad group name"),
        (":remove dev bob carol", "usage: :remove"),
        (":ginfo a b", "usage: :ginfo"),
        (":history dev many", "'many' is not a number"),
        (":history dev 0", "between 1 and"),
        (":history a b c", "usage: :history"),
        ('@"bob hi', 'closing "'),
        ('@"" hi', "usage: @<name>"),
        ("clear", "'clear' looks like a command"),
        ("Quit", "looks like a command"),
        ("/quit", "looks like a command"),
        ("/msg bob hi", "looks like a command"),
        (":to a/b", "bad group name"),
        (":to bob carol", "usage: :to"),
        (":to @bob hi", "usage: :to"),
    ],
)
def test_parse_errors(line: str, error: str) -> None:
    with pytest.raises(ParseError) as e:
        parse_line(line)
    assert error in str(e.value)
    assert "\n" not in str(e.value)


# The command table


def test_every_command_has_usage_and_help() -> None:
    names = [name for spec in COMMANDS for name in spec.names]
    assert len(names) == len(set(names)) == len(BY_NAME)
    for spec in COMMANDS:
        assert spec.usage.startswith(spec.names[0]) and spec.help.strip()
        assert all(name.startswith(":") for name in spec.names)


def test_every_command_is_listed_by_all(screen: Screen) -> None:
    listing = screen.type(":all")
    assert len(listing) == len(COMMANDS) + len(MESSAGE_FORMS)
    for line, (form, text) in zip(listing, help_rows()):
        assert line.split() == form.split() + text.split()
    for spec in COMMANDS:
        assert any(spec.usage in line and spec.help in line for line in listing)


def test_every_command_parses_to_an_intent_with_a_handler() -> None:
    handlers = Console.__dict__["execute"].dispatcher.registry
    intents = set(get_args(Intent))
    assert intents <= set(handlers)
    examples = {":pu": ":pu a", ":q": ":q a", ":delay": ":delay hi 1", ":to": ":to"}
    for spec in COMMANDS:
        for name in spec.names:
            line = examples.get(
                name, name + (" dev" if "<group>" in spec.usage else "")
            )
            if "<user>" in spec.usage:
                line += " bob"
            assert type(parse_line(line)) in intents


def test_usage_errors_quote_the_table() -> None:
    misused = {}
    for spec in COMMANDS:
        try:
            parse_line(spec.names[0] + " a b c")
        except ParseError as e:
            if str(e).startswith("usage:"):
                misused[spec.names[0]] = str(e)
                assert str(e) == f"usage: {spec.usage}{spec.note}"
    assert set(misused) == {
        ":pu",
        ":emoji",
        ":join",
        ":leave",
        ":members",
        ":history",
        ":ginfo",
        ":invite",
        ":requests",
        ":approve",
        ":reject",
        ":remove",
        ":transfer",
        ":to",
    }
    with pytest.raises(ParseError, match=r"^usage: :q <keyword> \(:q! quits\)$"):
        parse_line(":q")


def test_emoji_render() -> None:
    assert emoji.render("hi :smile: :nope: :+1:") == "hi 😄 :nope: 👍"
    assert emoji.render("a:b:c") == "a:b:c"


def test_emoji_pages() -> None:
    pages = emoji.page_count()
    assert pages >= 2
    assert emoji.page(1)[0] == (":smile:", "😄")
    seen = [alias for n in range(1, pages + 1) for alias, _ in emoji.page(n)]
    assert len(seen) == len(emoji.EMOJI)
    with pytest.raises(ValueError):
        emoji.page(pages + 1)


# Formatting


def message(
    text: str = "hi",
    conversation: str = "p:1:7",
    sender: str = "bob",
    seq: int = 1,
    **kw: Any,
) -> ChatMessage:
    return ChatMessage(
        msg_id=seq,
        conversation=conversation,
        seq=seq,
        sender_id=1,
        sender_name=sender,
        text=text,
        timestamp=1_700_000_000_000,
        **kw,
    )


def own(
    text: str = "hi", conversation: str = "p:1:7", seq: int = 1, **kw: Any
) -> ChatMessage:
    """
    A message of alice (7), the console's user.
    """
    return ChatMessage(
        msg_id=seq,
        conversation=conversation,
        seq=seq,
        sender_id=7,
        sender_name="alice",
        text=text,
        timestamp=1_700_000_000_000,
        **kw,
    )


STAMP = time.strftime("%H:%M:%S", time.localtime(1_700_000_000))


NOW = 1_700_000_000_000


def test_format_private() -> None:
    line = format_message(message("hello :smile:", receive_user_id=7), now_ms=NOW)
    assert line == f"[{STAMP}] (private) bob: hello 😄"


def test_format_group() -> None:
    line = format_message(
        message("yo", conversation="g:dev", group_id="dev"), now_ms=NOW
    )
    assert line == f"[{STAMP}] [dev] bob: yo"


def test_format_broadcast() -> None:
    line = format_message(message("all", conversation="all"), now_ms=NOW)
    assert line == f"[{STAMP}] bob: all"


def test_a_message_of_another_day_shows_its_date() -> None:
    day = time.strftime("%Y-%m-%d", time.localtime(1_700_000_000))
    tomorrow = NOW + 24 * 3600 * 1000
    line = format_message(message("old"), now_ms=tomorrow)
    assert line == f"[{day} {STAMP}] (private) bob: old"


def test_describe_each_kind_of_error() -> None:
    assert describe(RouteError("4090", "the name is taken")) == "the name is taken"
    assert describe(LoginError("9100", "wrong password")) == "wrong password"
    assert describe(SendError(3000, "no user 9")) == "no user 9"
    assert describe(NotLoggedIn("log in first")) == "not logged in yet"
    assert describe(ClientClosed()) == "the client is closed"
    assert describe(ClientClosed("gave up")) == "gave up"
    assert describe(ParseError("bad\nworse")) == "bad"
    assert describe(KeyError()) == "KeyError"
    # The route's failures, in words (never a Twisted message).
    unreachable = "the route cannot be reached (is it running?)"
    assert describe(ConnectionRefusedError()) == unreachable
    assert describe(defer.TimeoutError()) == "the route did not answer in time"
    assert describe(DNSLookupError("x")) == "the route's host name cannot be found"
    assert describe(ResponseNeverReceived([])) == "the connection to the route broke"


def test_state_lines() -> None:
    assert set(STATE_LINES) == {
        ClientState.RECONNECTING,
        ClientState.READY,
        ClientState.FAILED,
    }
    assert STATE_LINES[ClientState.FAILED]("kicked") == (
        "error: disconnected: kicked (:q! to quit)"
    )


# The console, with a fake client


class FakeClient:
    """
    The parts of L{cim.client.library.Client} the console uses; every call
    answers at once.
    """

    def __init__(self) -> None:
        self.user_id: int | None = None
        self.user_name = ""
        self.server: tuple[str, int] | None = None
        self.state = ClientState.IDLE
        self.ready = False
        self.calls: list[tuple[Any, ...]] = []
        self.online = [User(1, "bob"), User(7, "alice"), User(9, "bea")]
        self.groups: list[str] = []
        self.login_errors: list[Exception] = []
        self.send_error: Exception | None = None
        self.closed = False
        self.device = "dev-1"
        self.reads = ReadState()
        self.infos: list[ConversationInfo] = []
        self.conversations_error: Exception | None = None
        self.sent: list[str] = []
        self.marks: list[tuple[str, int]] = []
        self._cmids = 0

    def _ack(self, conversation: str) -> Ack:
        self._cmids += 1
        cmid = f"c{self._cmids}"
        self.sent.append(cmid)
        return Ack(
            cmid, 4 + self._cmids, 2 + self._cmids, conversation, 1_700_000_000_000
        )

    def sent_here(self, client_msg_id: str) -> bool:
        return client_msg_id in self.sent

    def read_position(self, conversation: str, user_id: int | None = None) -> int:
        return self.reads.read_position(conversation, user_id)

    def mark_read(self, conversation: str, seq: int) -> None:
        self.marks.append((conversation, seq))
        self.reads.read_by(self.user_id or 0, conversation, seq)

    async def conversations(self) -> list[ConversationInfo]:
        if self.conversations_error is not None:
            raise self.conversations_error
        self.reads.load(self.infos)
        return self.reads.all()

    def conversation_states(self) -> list[ConversationInfo]:
        return self.reads.all()

    def unread(self, conversation: str | None = None) -> int:
        return sum(i.unread for i in self.reads.all())

    def private_conversation(self, peer: int) -> str:
        return pair_conversation(self.user_id or 0, peer)

    async def login(
        self, user_name: str, password: str | None = None, user_id: int | None = None
    ) -> None:
        self.calls.append(("login", user_name, password, user_id))
        if self.login_errors:
            raise self.login_errors.pop(0)
        self.user_id = user_id or 7
        self.reads.reset(self.user_id)
        self.user_name = user_name
        self.server = ("127.0.0.1", 4321)
        self.state = ClientState.READY
        self.ready = True

    def send_private(self, user_id: int, text: str) -> Deferred[Ack]:
        self.calls.append(("private", user_id, text))
        if self.send_error is not None:
            return fail(self.send_error)
        return succeed(self._ack(pair_conversation(self.user_id or 0, user_id)))

    def send_group(self, group_id: str, text: str) -> Deferred[Ack]:
        self.calls.append(("group", group_id, text))
        return succeed(self._ack(f"g:{group_id}"))

    async def broadcast(self, text: str) -> None:
        self.calls.append(("broadcast", text))

    async def online_users(self) -> list[User]:
        return list(self.online)

    async def my_groups(self) -> list[str]:
        return list(self.groups)

    async def create_group(
        self, group_id: str, policy: str | None = None, history: str | None = None
    ) -> None:
        self.calls.append(("create", group_id, policy, history))
        if group_id in self.groups:
            raise RouteError("4090", f"the group {group_id} exists")
        self.groups.append(group_id)

    async def join_group(self, group_id: str) -> JoinResult:
        if group_id == "missing":
            raise RouteError("3000", f"groupId: no group {group_id}")
        if group_id == "club":
            return JoinResult(False, pending=True)
        if group_id in self.groups:
            return JoinResult(False)
        self.groups.append(group_id)
        return JoinResult(True)

    async def leave_group(self, group_id: str) -> bool:
        if group_id in self.groups:
            self.groups.remove(group_id)
            return True
        return False

    async def group_info(self, group_id: str) -> GroupInfo:
        self.calls.append(("ginfo", group_id))
        if group_id == "old":
            return GroupInfo(group_id, None, "open", "join", 3, False)
        return GroupInfo(group_id, 7, "invite", "join", 2, True, 12)

    async def invite_to_group(self, group_id: str, user_id: int) -> bool:
        self.calls.append(("invite", group_id, user_id))
        return user_id != 9

    async def join_requests(self, group_id: str) -> list[User]:
        self.calls.append(("requests", group_id))
        return [] if group_id == "quiet" else [User(1, "bob"), User(9, "bea")]

    async def approve_request(self, group_id: str, user_id: int) -> None:
        self.calls.append(("approve", group_id, user_id))

    async def reject_request(self, group_id: str, user_id: int) -> None:
        self.calls.append(("reject", group_id, user_id))
        if user_id == 9:
            raise RouteError("3000", "requesterId: user 9 has no request waiting")

    async def remove_member(self, group_id: str, user_id: int) -> bool:
        self.calls.append(("remove", group_id, user_id))
        return user_id != 9

    async def transfer_group(self, group_id: str, user_id: int) -> None:
        self.calls.append(("transfer", group_id, user_id))

    async def group_members(self, group_id: str) -> list[User]:
        return [User(7, "alice"), User(1, "bob")]

    async def history(
        self,
        conversation: str | None = None,
        limit: int = 20,
        *,
        peer: int | None = None,
        before_seq: int | None = None,
    ) -> list[ChatMessage]:
        if peer is not None:
            self.calls.append(("history", "peer", peer, limit))
            pair = pair_conversation(self.user_id or 0, peer)
            return [
                message("old one", conversation=pair, seq=1),
                own("my answer", conversation=pair, seq=2),
                message("and again", conversation=pair, seq=3),
                own("my last", conversation=pair, seq=4),
            ]
        self.calls.append(("history", conversation, limit))
        return [message("old one", conversation=conversation or "")]

    async def close(self) -> None:
        self.closed = True


class Screen:
    """
    A console on a StringTransport, with a fake client and a clock.
    """

    def __init__(self, history_dir: Path | None = None) -> None:
        self.client = FakeClient()
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.quits = 0
        self.echo: list[bool] = []

        def history(user_id: int) -> History:
            if history_dir is None:
                return History(None)
            return History(history_dir / f"{user_id}.jsonl")

        self.console = Console(
            self.client,
            self.clock,
            history_factory=history,
            on_quit=self._quit,
            route_url="http://route",
            secret_input=self.echo.append,
        )
        self.transport = StringTransportWithDisconnection()
        self.transport.protocol = self.console
        self.console.makeConnection(self.transport)

    def _quit(self) -> None:
        self.quits += 1

    def login(self, password: str | None = None) -> bool:
        results: list[bool] = []
        d = Deferred.fromCoroutine(self.console.start("alice", password))
        d.addCallback(results.append)
        self.output()
        return bool(results and results[0])

    def type(self, line: str) -> list[str]:
        self.console.dataReceived(line.encode("utf-8") + b"\n")
        return self.output()

    def output(self) -> list[str]:
        text = self.transport.value().decode("utf-8")
        self.transport.clear()
        return text.splitlines()

    @property
    def closed(self) -> bool:
        return not self.transport.connected


@pytest.fixture
def screen(tmp_path: Path) -> Screen:
    screen = Screen(tmp_path)
    assert screen.login()
    return screen


def test_login_banner() -> None:
    screen = Screen()
    d = Deferred.fromCoroutine(screen.console.start("alice"))
    assert screen.output() == [
        "logging in as alice via http://route...",
        "logged in as alice (id 7) on 127.0.0.1:4321; :all lists the commands",
        "no unread messages",
    ]
    assert d.called


def test_login_shows_the_unread_counts() -> None:
    screen = Screen()
    screen.client.infos = [
        ConversationInfo("g:dev", "e", 9, 4, 5, group_id="dev"),
        ConversationInfo("p:1:7", "e", 3, 0, 3, peer_id=1, peer_name="bob"),
        ConversationInfo("p:7:9", "e", 3, 3, 0, peer_id=9, peer_name="bea"),
    ]
    Deferred.fromCoroutine(screen.console.start("alice"))
    assert screen.output()[-1] == "unread: 8 ([dev] 5, @bob 3)"
    # The peers' names are known from then on.
    screen.client.online = []
    screen.type("@bea hi")
    assert screen.client.calls[-1] == ("private", 9, "hi")


def test_a_route_without_unread_counts_still_logs_in() -> None:
    screen = Screen()
    screen.client.conversations_error = RouteError("4040", "not found")
    results: list[bool] = []
    Deferred.fromCoroutine(screen.console.start("alice")).addCallback(results.append)
    assert results == [True]
    assert screen.output()[-1].startswith("logged in as alice")


def test_login_failure_quits() -> None:
    screen = Screen()
    screen.client.login_errors = [LoginError("7100", "no IM server available")]
    assert not screen.login()
    assert screen.quits == 1


def test_a_route_that_cannot_be_reached_is_said_so() -> None:
    screen = Screen()
    error = LoginError("", "cannot reach the route: Connection was refused ...")
    error.__cause__ = ConnectionRefusedError()
    screen.client.login_errors = [error]
    Deferred.fromCoroutine(screen.console.start("alice"))
    assert screen.output()[-2:] == [
        "error: cannot log in: the route at http://route cannot be reached (is it "
        "running?)",
        "bye",
    ]


def test_password_prompt() -> None:
    screen = Screen()
    screen.client.login_errors = [LoginError("4090", "the user name is taken")]
    results: list[bool] = []
    Deferred.fromCoroutine(screen.console.start("alice")).addCallback(results.append)
    assert screen.output()[-1] == "password for alice:"
    assert screen.echo == [True]
    assert not results
    screen.type("s3cret")
    assert results == [True]
    assert screen.echo == [True, False]
    assert screen.client.calls[-1] == ("login", "alice", "s3cret", None)


def test_wrong_password_prompts_again() -> None:
    screen = Screen()
    screen.client.login_errors = [
        LoginError("9100", "the password is wrong"),
        LoginError("9100", "the password is wrong"),
    ]
    Deferred.fromCoroutine(screen.console.start("alice", "bad"))
    assert screen.output()[-2:] == [
        "error: the password is wrong",
        "password for alice:",
    ]
    assert screen.type("worse")[-2:] == [
        "error: the password is wrong",
        "password for alice:",
    ]
    assert screen.type("good")[-2].startswith("logged in as alice")


def test_lines_typed_before_the_login_wait_for_it() -> None:
    screen = Screen()
    screen.console.dataReceived(b":to all\nhello early\n1;;hi bob\n:olu\n")
    assert screen.client.calls == []
    results: list[bool] = []
    Deferred.fromCoroutine(screen.console.start("alice")).addCallback(results.append)
    assert results == [True]
    out = screen.output()
    assert out[1].startswith("logged in as alice") and out[2] == "no unread messages"
    assert out[3:6] == [
        "plain lines go to everybody online now",
        f"[{STAMP}] alice -> everybody: hello early",
        f"[{STAMP}] (private) alice -> 1: hi bob",
    ]
    assert out[6] == "online users: 3"
    assert screen.client.calls[-2:] == [
        ("broadcast", "hello early"),
        ("private", 1, "hi bob"),
    ]


def test_quit_before_the_login_is_immediate() -> None:
    screen = Screen()
    screen.type(":q!")
    assert screen.client.closed and screen.quits == 1


def test_commands_run_in_the_order_typed(screen: Screen) -> None:
    gate: Deferred[None] = Deferred()
    create = screen.client.create_group

    async def slow_create(group_id: str, *settings: str | None) -> None:
        await gate
        await create(group_id, *settings)

    screen.client.create_group = slow_create  # type: ignore[method-assign]
    screen.type(":create dev")
    screen.type("hello dev")
    assert screen.client.calls == [("login", "alice", None, None)]
    gate.callback(None)
    assert screen.client.calls[-2:] == [
        ("create", "dev", None, None),
        ("group", "dev", "hello dev"),
    ]


def test_sends_do_not_wait_for_their_acks(screen: Screen) -> None:
    pending: Deferred[Ack] = Deferred()
    screen.client.send_private = lambda uid, text: pending  # type: ignore[method-assign]
    assert screen.type("1;;first") == []
    assert screen.type(":olu")[0] == "online users: 3"
    assert screen.console.prompt_text() == "(:to whom?) (1 sending)> "
    pending.errback(
        SendError(9200, "may not be stored; send it again (it is never stored twice)")
    )
    assert screen.output() == [
        "error: not sent: may not be stored; send it again (it is never stored twice)"
    ]
    assert screen.console.prompt_text() == "(:to whom?)> "


def test_gives_up_after_three_passwords() -> None:
    screen = Screen()
    screen.client.login_errors = [
        LoginError("9100", "the password is wrong") for _ in range(4)
    ]
    Deferred.fromCoroutine(screen.console.start("alice", "bad"))
    for _ in range(3):
        assert screen.output()[-1] == "password for alice:"
        screen.console.dataReceived(b"still wrong\n")
    assert screen.output()[-2:] == [
        "error: cannot log in: the password is wrong",
        "bye",
    ]
    assert screen.quits == 1


def test_end_of_input_runs_the_commands_typed_then_quits() -> None:
    screen = Screen()
    screen.console.dataReceived(b":to all\nhello\n:olu\n")
    screen.console.readConnectionLost()
    assert screen.quits == 0
    assert screen.login()
    assert screen.client.calls[-1] == ("broadcast", "hello")
    assert screen.client.closed and screen.quits == 1


def test_a_plain_line_goes_nowhere_until_to_says_where(screen: Screen) -> None:
    # A typo must not reach everybody: plain lines need a target first.
    assert screen.type("clear") == [
        "error: not sent: 'clear' looks like a command (commands start with ':', "
        ":all lists them); type it again to send it as a message"
    ]
    assert screen.type("hello all") == [
        "error: not sent: say to whom first: :to @<user>, :to <group>, or :to all "
        "(everybody online); or @<user> <text> for one message"
    ]
    assert screen.client.calls == [("login", "alice", None, None)]
    assert screen.console.prompt_text() == "(:to whom?)> "


def test_plain_line_goes_to_everybody(screen: Screen) -> None:
    assert screen.type(":to all") == ["plain lines go to everybody online now"]
    assert screen.console.prompt_text() == "to everybody> "
    assert screen.type("hello all") == [f"[{STAMP}] alice -> everybody: hello all"]
    assert screen.client.calls[-1] == ("broadcast", "hello all")


def test_a_command_like_line_is_sent_when_typed_twice(screen: Screen) -> None:
    screen.type(":to all")
    assert screen.type("quit")[0].startswith("error: not sent: 'quit' looks like")
    assert screen.type("quit") == [f"[{STAMP}] alice -> everybody: quit"]
    assert screen.type("/help")[0].startswith("error: not sent: '/help' looks like")


def test_plain_line_goes_to_a_user(screen: Screen) -> None:
    assert screen.type(":to @Bea") == ["plain lines go to @bea now"]
    assert screen.console.prompt_text() == "to @bea> "
    screen.type("hi there")
    assert screen.client.calls[-1] == ("private", 9, "hi there")
    assert screen.type(":to") == ["plain lines go to @bea"]
    assert screen.type(":to nobody") == [
        "plain lines go to nobody yet (:to @<user>, :to <group> or :to all) now"
    ]


def test_to_a_group_one_is_not_in(screen: Screen) -> None:
    assert screen.type(":to dev") == [
        "error: you are not in group dev (:join dev first; for a user: :to @dev)"
    ]


def test_a_broadcast_the_route_refuses_is_not_sent(screen: Screen) -> None:
    screen.type(":to all")

    async def down(text: str) -> None:
        raise ConnectionRefusedError()

    screen.client.broadcast = down  # type: ignore[method-assign]
    [line] = screen.type("hello")
    assert line.startswith("error: not sent (to everybody online): ")


def test_plain_line_goes_to_the_current_group(screen: Screen) -> None:
    assert screen.type(":join dev") == ["joined dev; plain lines go there now"]
    assert screen.console.prompt_text() == "to [dev]> "
    screen.type("hello devs")
    assert screen.client.calls[-1] == ("group", "dev", "hello devs")
    assert screen.type(":leave dev") == [
        "left dev; plain lines go to nobody yet (:to @<user>, :to <group> or :to all)"
    ]


def test_private_by_id(screen: Screen) -> None:
    assert screen.type("1;;hi bob") == [f"[{STAMP}] (private) alice -> 1: hi bob"]
    assert screen.client.calls[-1] == ("private", 1, "hi bob")


def test_a_message_sent_while_disconnected_is_said_queued(screen: Screen) -> None:
    screen.client.state = ClientState.RECONNECTING
    pending: list[Deferred[Ack]] = []

    def send(uid: int, text: str) -> Deferred[Ack]:
        pending.append(Deferred())
        return pending[-1]

    screen.client.send_private = send  # type: ignore[method-assign]
    assert screen.type("@bob later") == [
        "queued: not connected right now; it is sent once the connection is back "
        "(:quit warns while it waits)"
    ]
    assert screen.console.prompt_text() == "(:to whom?) (1 queued)> "
    # The route is down too: a known name is still reached.
    screen.console.history.names["bob"] = 1

    async def down() -> list[User]:
        raise ConnectionRefusedError()

    screen.client.online_users = down  # type: ignore[method-assign]
    screen.type("@Bob again")
    assert screen.console.prompt_text() == "(:to whom?) (2 queued)> "
    assert screen.type("@carol hi") == [
        "error: not sent: cannot look up the user 'carol': the route cannot be "
        "reached (is it running?)"
    ]
    assert screen.type(":quit")[0].startswith("2 messages still sending: quitting")
    assert screen.quits == 0
    pending[1].callback(Ack("c9", 9, 3, "p:1:7", 1_700_000_000_000))
    assert screen.output() == [f"[{STAMP}] (private) alice -> bob: again"]
    pending[0].errback(ClientClosed("the client is closed"))
    assert screen.output() == ["error: not sent: the client is closed"]
    assert screen.console.prompt_text() == "(:to whom?)> "


def test_a_message_to_an_offline_user_is_marked(screen: Screen) -> None:
    screen.console.history.names["carol"] = 5
    assert screen.type("@carol hi") == [
        f"[{STAMP}] (private) alice -> carol: hi (stored; carol is offline: "
        "delivered when back)"
    ]


def test_private_by_name(screen: Screen) -> None:
    screen.type("@bea hi bea")
    assert screen.client.calls[-1] == ("private", 9, "hi bea")


def test_private_by_name_is_found_as_the_route_finds_it(screen: Screen) -> None:
    # Case, compatibility forms and look-alikes: the same account.
    for typed in ("@Bea hi", "@BEA hi", "@\uff42ea hi", "@b\u0435a hi"):
        screen.type(typed)
        assert screen.client.calls[-1] == ("private", 9, "hi"), typed


def test_private_to_an_unknown_name(screen: Screen) -> None:
    assert screen.type("@carol hi") == [
        "error: not sent: unknown user 'carol' (not online, not in your history)"
    ]


def test_private_to_a_name_from_the_history(screen: Screen) -> None:
    screen.console.message_received(message("hey", sender="carol"))
    screen.client.online = []
    screen.output()
    screen.type("@carol back at you")
    assert screen.client.calls[-1] == ("private", 1, "back at you")


def test_refused_send_prints_an_error(screen: Screen) -> None:
    screen.client.send_error = SendError(3000, "no user 99")
    assert screen.type("99;;hi") == ["error: not sent: no user 99"]
    # Still running.
    assert screen.type(":info")[0].startswith("user alice")


@pytest.mark.parametrize(
    "line", ["abc;;x", ":emoji x", ":emoji 999", ":nope", "@nobody hi", "5;;", "hi"]
)
def test_bad_input_keeps_running(screen: Screen, line: str) -> None:
    out = screen.type(line)
    assert len(out) == 1 and out[0].startswith("error: ")
    assert screen.quits == 0
    assert screen.type(":olu")[0] == "online users: 3"


def test_online_users(screen: Screen) -> None:
    assert screen.type(":olu") == [
        "online users: 3",
        "  1  bob",
        "  7  alice",
        "  9  bea",
    ]


def test_prefix_search(screen: Screen) -> None:
    assert screen.type(":pu b") == [
        "online users starting with 'b': 2",
        "  1  bob",
        "  9  bea",
    ]


def test_help_lists_every_command(screen: Screen) -> None:
    out = "\n".join(screen.type(":all"))
    for command in [":q!", ":olu", ":all", ":q <keyword>", ":pu", ":info", ":emoji"]:
        assert command in out
    for command in [":delay", ":groups", ":join", ":leave", ":create", ":history"]:
        assert command in out
    for command in [
        ":create <group> [open|invite|approval] [join|full]",
        ":ginfo",
        ":invite <group> <user>",
        ":requests",
        ":approve",
        ":reject",
        ":remove",
        ":transfer",
    ]:
        assert command in out


def test_info(screen: Screen) -> None:
    assert screen.type(":info") == [
        "user alice (id 7), device dev-1, server 127.0.0.1:4321, route http://route, "
        "state ready, talking to nobody yet (:to @<user>, :to <group> or :to all)"
    ]


def test_emoji_list(screen: Screen) -> None:
    out = screen.type(":emoji 1")
    assert out[0] == f"emoji page 1/{emoji.page_count()}:"
    assert ":smile: 😄" in out[1]
    assert screen.type(":emoji 999")[0].startswith("error: no emoji page 999")


def test_delay(screen: Screen) -> None:
    assert screen.type(":delay later :smile: 5")[0].startswith("error: not sent")
    screen.type(":to all")
    assert screen.type(":delay later :smile: 5") == ["will send in 5s"]
    # It goes where plain lines went when it was typed.
    screen.type(":to nobody")
    screen.clock.advance(4.9)
    assert ("broadcast", "later :smile:") not in screen.client.calls
    screen.clock.advance(0.2)
    assert screen.client.calls[-1] == ("broadcast", "later :smile:")


def test_groups(screen: Screen) -> None:
    assert screen.type(":groups") == [
        "you are in no group (:create <group> or :join <group>)"
    ]
    assert screen.type(":create dev") == [
        "created group dev (members join by invitation (:invite dev <user>)); "
        "plain lines go there now"
    ]
    assert screen.client.calls[-1] == ("create", "dev", None, None)
    assert screen.type(":create dev") == ["error: the group dev exists"]
    screen.type(":join ops")
    assert screen.type(":groups") == ["  dev", "* ops"]
    assert screen.type(":join missing") == ["error: groupId: no group missing"]
    assert screen.type(":members") == ["ops: alice (7), bob (1)"]


def test_create_with_a_policy(screen: Screen) -> None:
    assert screen.type(":create park open") == [
        "created group park (anyone may join); plain lines go there now"
    ]
    assert screen.client.calls[-1] == ("create", "park", "open", None)
    assert screen.type(":create club approval full") == [
        "created group club (members join by your approval (:requests club)); "
        "plain lines go there now"
    ]
    assert screen.client.calls[-1] == ("create", "club", "approval", "full")


def test_join_outcomes(screen: Screen) -> None:
    assert screen.type(":join club") == ["asked to join club; waiting for its owner"]
    assert ":to all" in screen.type(":info")[0]
    assert screen.type(":join ops") == ["joined ops; plain lines go there now"]
    assert screen.type(":join ops") == ["you are in ops; plain lines go there now"]


def test_group_info(screen: Screen) -> None:
    assert screen.type(":ginfo dev") == [
        "dev: owner 7, by invitation, members read from their join on, "
        "2 members; you joined after message 12"
    ]
    assert screen.type(":ginfo old") == [
        "old: no owner, open to anyone, members read from their join on, "
        "3 members; you are not a member"
    ]
    assert screen.type(":ginfo") == [
        "error: usage: :ginfo <group> (or :join one first)"
    ]
    screen.type(":join ops")
    screen.type(":ginfo")
    assert screen.client.calls[-1] == ("ginfo", "ops")


def test_managing_a_group(screen: Screen) -> None:
    assert screen.type(":invite dev 12") == ["invited 12 to dev"]
    assert screen.client.calls[-1] == ("invite", "dev", 12)
    # A name is looked up among the online users.
    assert screen.type(":invite dev @bea") == ["bea was invited to dev already"]
    assert screen.client.calls[-1] == ("invite", "dev", 9)
    assert screen.type(":invite dev nobody") == [
        "error: unknown user 'nobody' (not online, not in your history)"
    ]
    assert screen.type(":requests dev") == [
        "asking to join dev:",
        "  1  bob",
        "  9  bea",
    ]
    assert screen.type(":requests quiet") == ["nobody asks to join quiet"]
    assert screen.type(":approve dev bob") == ["bob joined dev"]
    assert screen.client.calls[-1] == ("approve", "dev", 1)
    assert screen.type(":reject dev 1") == ["turned down 1's request to join dev"]
    assert screen.type(":reject dev bea") == [
        "error: requesterId: user 9 has no request waiting"
    ]
    assert screen.type(":remove dev bob") == ["removed bob from dev"]
    assert screen.client.calls[-1] == ("remove", "dev", 1)
    assert screen.type(":remove dev 9") == ["9 is not in dev"]
    assert screen.type(":transfer dev bob") == ["bob owns dev now"]
    assert screen.client.calls[-1] == ("transfer", "dev", 1)


def test_members_without_a_group(screen: Screen) -> None:
    assert screen.type(":members") == [
        "error: usage: :members <group> (or :join one first)"
    ]


def test_history(screen: Screen) -> None:
    assert screen.type(":history") == ["error: usage: :history @<user> | <group> [n]"]
    assert screen.type(":history dev 5") == [f"[{STAMP}] [dev] bob: old one"]
    assert screen.client.calls[-1] == ("history", "g:dev", 5)
    # The current group by default.
    screen.type(":join ops")
    screen.type(":history")
    assert screen.client.calls[-1] == ("history", "g:ops", 20)


def test_history_of_a_private_conversation_shows_both_sides(screen: Screen) -> None:
    screen.client.reads.read_by(1, "p:1:7", 2)  # bob read up to 2
    assert screen.type(":history @bob 4") == [
        f"[{STAMP}] (private) bob: old one",
        f"[{STAMP}] (private) alice -> bob: my answer \u2713",
        f"[{STAMP}] (private) bob: and again",
        f"[{STAMP}] (private) alice -> bob: my last",
    ]
    assert screen.client.calls[-1] == ("history", "peer", 1, 4)
    screen.type(":history u:1")
    assert screen.client.calls[-1] == ("history", "peer", 1, 20)
    # What was shown is marked read; the private conversation shown last
    # is the default now.
    screen.clock.advance(MARK_DELAY)
    assert screen.client.marks == [("p:1:7", 4)]
    screen.type(":history")
    assert screen.client.calls[-1] == ("history", "p:1:7", 20)


def test_incoming_messages(screen: Screen) -> None:
    screen.console.message_received(message("hi :smile:", receive_user_id=7))
    screen.console.message_received(message("yo", conversation="g:dev", group_id="dev"))
    assert screen.output() == [
        f"[{STAMP}] (private) bob: hi 😄",
        f"[{STAMP}] [dev] bob: yo",
    ]


def test_a_message_sent_here_is_printed_once(screen: Screen) -> None:
    # Stored first, then its echo arrives.
    assert screen.type("@bob hi bob") == [f"[{STAMP}] (private) alice -> bob: hi bob"]
    [cmid] = screen.client.sent
    screen.console.message_received(own("hi bob", seq=3, client_msg_id=cmid))
    assert screen.output() == []
    # The echo first (the ack is late), then the ack.
    pending: Deferred[Ack] = Deferred()
    screen.client.send_private = lambda uid, text: pending  # type: ignore[method-assign]
    screen.client.sent.append("late")
    assert screen.type("@bob again") == []
    screen.console.message_received(own("again", seq=4, client_msg_id="late"))
    assert screen.output() == [f"[{STAMP}] (private) alice -> bob: again"]
    pending.callback(Ack("late", 9, 4, "p:1:7", 1_700_000_000_000))
    assert screen.output() == []


def test_a_group_message_sent_here_is_printed_once(screen: Screen) -> None:
    screen.type(":join dev")
    assert screen.type("hello devs") == [f"[{STAMP}] [dev] alice: hello devs"]
    [cmid] = screen.client.sent
    screen.console.message_received(
        own("hello devs", "g:dev", 3, group_id="dev", client_msg_id=cmid)
    )
    assert screen.output() == []


def test_own_messages_from_another_device_are_marked(screen: Screen) -> None:
    screen.console.history.names["bob"] = 1
    screen.console.message_received(own("from my phone", seq=5, client_msg_id="x"))
    screen.console.message_received(
        own("to the group", "g:dev", 2, group_id="dev", client_msg_id="y")
    )
    assert screen.output() == [
        f"[{STAMP}] (private) alice (another device) -> bob: from my phone",
        f"[{STAMP}] [dev] alice (another device): to the group",
    ]


def test_read_receipts(screen: Screen) -> None:
    screen.type("@bob one")
    screen.type("@bob two")
    screen.type("@bob three")
    screen.output()
    # Bob read the first two (seqs 3 and 4).
    screen.client.reads.read_by(1, "p:1:7", 4)
    screen.console.read_changed(1, "p:1:7", 4)
    assert screen.output() == ["\u2713 bob read your messages up to: two"]
    screen.console.read_changed(1, "p:1:7", 4)  # nothing new
    screen.console.read_changed(7, "p:1:7", 9)  # this user's other device
    screen.console.read_changed(3, "g:dev", 9)  # a group member
    assert screen.output() == []
    # What the peer has read shows its mark when printed again.
    assert screen.type(":history @bob")[1].endswith("my answer \u2713")


def test_a_reply_is_a_read_receipt(screen: Screen) -> None:
    screen.type("@bob one")
    screen.output()
    # The library tells a reply's read position after the reply.
    screen.console.message_received(message("a quick answer", seq=9))
    screen.console.read_changed(1, "p:1:7", 9)
    assert screen.output() == [
        f"[{STAMP}] (private) bob: a quick answer",
        "\u2713 bob read your messages up to: one",
    ]


def test_a_conversation_reset_is_told(screen: Screen) -> None:
    screen.client.infos = [ConversationInfo("p:1:7", peer_id=1, peer_name="bob")]
    Deferred.fromCoroutine(screen.client.conversations())
    screen.console.conversation_reset("p:1:7", 12)
    screen.console.conversation_reset("g:dev", 0)
    assert screen.output() == [
        "the server's store lost messages of @bob after #12; it resent what it holds",
        "the server's store lost messages of [dev] after #0; it resent what it holds",
    ]


def test_what_is_printed_is_marked_read(screen: Screen) -> None:
    for seq in (1, 2, 3):
        screen.console.message_received(message(f"m{seq}", seq=seq))
    screen.console.message_received(
        message("yo", conversation="g:dev", group_id="dev", seq=7)
    )
    screen.console.message_received(message("all", conversation="all", seq=9))
    assert screen.client.marks == []
    screen.clock.advance(MARK_DELAY)
    # One mark per conversation, of the latest message printed.
    assert screen.client.marks == [("g:dev", 7), ("p:1:7", 3)]
    # What was read already (on another device) is not marked again.
    screen.client.reads.read_by(7, "p:1:7", 5)
    screen.console.message_received(message("m4", seq=4))
    screen.clock.advance(MARK_DELAY)
    assert screen.client.marks == [("g:dev", 7), ("p:1:7", 3)]
    # Quitting marks what is pending at once.
    screen.console.message_received(message("m6", seq=6))
    screen.type(":q!")
    assert screen.client.marks[-1] == ("p:1:7", 6)


def test_unread_counts(screen: Screen) -> None:
    assert screen.type(":unread") == ["no unread messages"]
    screen.client.reads.message(message("one", seq=1))
    screen.client.reads.message(message("two", seq=2))
    screen.client.reads.message(message("yo", conversation="g:dev", seq=1))
    assert screen.type(":unread") == ["unread: 3 ([dev] 1, @1 2)"]


def test_text_from_others_reaches_the_terminal_inert(screen: Screen) -> None:
    # Retitling the terminal, erasing the line, colours, a bidi override, a
    # zero-width space, and a newline that would start a made-up line.
    hostile = "\x1b]0;HACKED\x07\x1b[2K\x1b[31mred\u202eevil\u200b\n[00:00:00] admin: x"
    screen.console.message_received(message(hostile, sender="mal\x1b[1mlory"))
    raw = screen.transport.value()
    assert b"\x1b" not in raw and b"\x07" not in raw
    assert "\u202e".encode() not in raw and "\u200b".encode() not in raw
    [line] = screen.output()
    assert line == (
        f"[{STAMP}] (private) mal\\x1b[1mlory: \\x1b]0;HACKED\\x07\\x1b[2K"
        "\\x1b[31mred\\u202eevil\\u200b \u21b5 [00:00:00] admin: x"
    )


def test_connection_state_messages(screen: Screen) -> None:
    screen.console.state_changed(ClientState.RECONNECTING, "connection lost")
    screen.console.state_changed(ClientState.CONNECTING, "")
    screen.console.state_changed(ClientState.RECONNECTING, "refused")
    screen.console.state_changed(ClientState.READY, "127.0.0.1:5555")
    assert screen.output() == [
        "connection lost (connection lost); reconnecting...",
        "reconnected to 127.0.0.1:5555",
    ]
    screen.console.error_received(8000, "log in first", "")
    screen.console.error_received(3000, "refused send", "abc")
    assert screen.output() == ["error: server: log in first"]


def test_a_final_kick_is_explained(screen: Screen) -> None:
    screen.console.state_changed(ClientState.FAILED, FINAL_KICKS[KICK_REPLACED])
    assert screen.output() == [
        "error: disconnected: replaced by a newer login of this device (logged in "
        "again elsewhere); not reconnecting (:q! to quit)"
    ]


def test_history_file_and_search(screen: Screen, tmp_path: Path) -> None:
    screen.console.message_received(message("the quick fox"))
    screen.type("1;;a lazy dog")
    screen.type(":join dev")
    screen.console.message_received(
        message("group fox", conversation="g:dev", group_id="dev", seq=2)
    )
    screen.output()
    lines = (tmp_path / "7.jsonl").read_text("utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["dir"], r["text"]) for r in records] == [
        ("in", "the quick fox"),
        ("out", "a lazy dog"),
        ("in", "group fox"),
    ]
    assert records[1]["conversation"] == "p:1:7"
    assert records[1]["to"] == "bob" and records[1]["toId"] == 1
    out = screen.type(":q FOX")
    assert len(out) == 2
    assert out[0].endswith("bob: the quick fox")
    assert out[1].endswith("bob -> dev: group fox")
    assert screen.type(":q nothing-like-this") == [
        "nothing in the history matches 'nothing-like-this'"
    ]


def test_history_survives_a_restart(tmp_path: Path) -> None:
    first = Screen(tmp_path)
    first.login()
    first.console.message_received(message("hello", sender="carol"))
    first.type(":q!")
    second = Screen(tmp_path)
    second.login()
    second.client.online = []
    second.type("@carol still there?")
    assert second.client.calls[-1] == ("private", 1, "still there?")
    assert second.type(":q hello")[0].endswith("carol: hello")


def test_quit(screen: Screen) -> None:
    screen.type(":delay never 100")
    assert screen.type(":q!") == ["bye"]
    assert screen.client.closed
    assert screen.closed
    assert screen.quits == 1
    screen.clock.advance(200)
    assert ("broadcast", "never") not in screen.client.calls


def test_end_of_input_quits(screen: Screen) -> None:
    screen.transport.loseConnection()
    assert screen.client.closed
    assert screen.quits == 1


def test_garbage_bytes_do_not_crash(screen: Screen) -> None:
    screen.console.dataReceived(b"\xff\xfe;;x\r\n")
    assert screen.output()[0].startswith("error: ")


# Options


def test_options() -> None:
    options = Options()
    options.parseOptions(
        ["--user", "alice", "--user-id", "12", "--route", "http://r:1"]
    )
    assert options["user"] == "alice"
    assert options["user-id"] == 12
    assert options["history-dir"] == "~/.cim/history"
    assert options["device"] is None
    # One log per state folder, route and user (and device, when named).
    log = Path(options["logfile"])
    assert log.parent == Path("~/.cim/state/logs/r_1").expanduser()
    assert log.name.startswith("alice-") and log.suffix == ".log"
    options = Options()
    options.parseOptions(["--user", "alice", "--device", "laptop-2"])
    assert options["device"] == "laptop-2"
    assert Path(options["logfile"]).name.endswith("-laptop-2.log")
    assert Path(options["logfile"]).parent.name == "127.0.0.1_8083"
    options = Options()
    options.parseOptions(["--user", "bob"])
    assert options["logfile"] != log


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--user", "a", "--user-id", "x"],
        ["--user", "a", "--route", "ftp://x"],
        ["--user", "a", "--device", "my laptop"],
        ["--user", "a", "--device", ""],
    ],
)
def test_bad_options(args: list[str]) -> None:
    with pytest.raises(usage.UsageError):
        Options().parseOptions(args)


def test_history_errors_speak_the_users_language(screen: Screen) -> None:
    async def history(conversation: str | None = None, limit: int = 20, **kw: Any):  # type: ignore[no-untyped-def]
        if conversation is not None:
            raise RouteError("3000", f"groupId: no group {conversation[2:]}")
        raise RouteError("3000", "peerId: no user 5")

    screen.client.history = history  # type: ignore[method-assign]
    assert screen.type(":history alice") == [
        "error: no group 'alice' whose history you can read; your messages with "
        "the user alice: :history @alice"
    ]
    assert screen.type(":history g:alice") == [
        "error: no group 'alice' whose history you can read"
    ]
    # An id is shown as the user's name when it is known.
    assert screen.type(":history u:1") == [
        "error: cannot read your messages with @bob: peerId: no user 5"
    ]


def test_history_files_are_per_route_account_and_device(tmp_path: Path) -> None:
    route = "http://127.0.0.1:8083"
    path = history_path(tmp_path, 1, route, "key-of-alice", "dev1")
    assert path.parent == tmp_path / "127.0.0.1_8083"
    assert path != history_path(tmp_path, 1, route, "key-of-bob", "dev1")
    assert path != history_path(tmp_path, 1, "https://example.org", "key-of-alice")
    assert path != history_path(tmp_path, 1, route, "key-of-alice", "dev2")
    assert path == history_path(tmp_path, 1, route + "/", "key-of-alice", "dev1")
    assert "key-of-alice" not in str(path)


def test_a_line_over_the_limit_is_refused_whole(screen: Screen) -> None:
    screen.type(":to all")
    assert screen.type("x" * 5000) == [
        "error: not sent: the line has 5,000 characters, over the limit of 4,096; "
        "nothing was cut"
    ]
    assert screen.type("x" * 70_000) == [
        "error: not sent: the line is over 65,536 bytes, over the limit of 4,096 "
        "characters; nothing was cut"
    ]
    assert [c for c in screen.client.calls if c[0] == "broadcast"] == []
    screen.type("中" * 4096)
    assert screen.client.calls[-1] == ("broadcast", "中" * 4096)
