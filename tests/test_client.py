"""
The client library: its parts in memory with a L{Clock} (heartbeat, cursors,
acknowledgements, backoff), then whole clients against a real route and IM
servers running in the test reactor on the memory store.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from zope.interface.verify import verifyObject

from cim.client.connection import ClientProtocol, Heartbeat
from cim.client.cursors import CursorFile, state_path
from cim.client.keys import AccountKeys, HeldKey
from cim.client.library import (
    Ack,
    Client,
    ClientClosed,
    ClientState,
    IClientListener,
    LoginError,
    QueueListener,
    SendError,
)
from cim.client.route import LoginInfo, RouteError, User
from cim.client.session import reconnect_delays
from cim.codec import decode, encode_framed
from cim.message import ChatMessage, Command, Cursor, ErrorCode, Frame, inbox
from tests.clientkit import Harness, take_messages, wait_state
from tests.kit.wait import wait_until, within

# In memory: the heartbeat


class Recorder:
    """
    A FrameHandler that records what its protocol reports.
    """

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.lost: list[str] = []

    def frame_received(self, protocol: ClientProtocol, frame: Frame) -> None:
        self.frames.append(frame)

    def connection_lost(self, protocol: ClientProtocol, reason: str) -> None:
        self.lost.append(reason)


def frames_in(transport: StringTransport) -> list[Frame]:
    """
    The frames written to C{transport} since the last call.
    """
    data = transport.value()
    transport.clear()
    frames = []
    offset = 0
    while offset < len(data):
        length = shift = 0
        while True:
            byte = data[offset]
            offset += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        frames.append(decode(data[offset : offset + length]))
        offset += length
    return frames


def connected(
    clock: Clock, **kw: Any
) -> tuple[ClientProtocol, StringTransport, Recorder]:
    recorder = Recorder()
    protocol = ClientProtocol(clock, recorder, **kw)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, recorder


PONG = encode_framed(Frame(cmd=Command.PING, req_msg="pong"))


def test_ping_after_ten_quiet_seconds() -> None:
    clock = Clock()
    protocol, transport, _ = connected(clock)
    clock.advance(9.9)
    assert frames_in(transport) == []
    clock.advance(0.1)
    assert frames_in(transport) == [Frame(cmd=Command.PING, req_msg="ping")]


def test_writing_postpones_the_ping() -> None:
    clock = Clock()
    protocol, transport, _ = connected(clock)
    clock.advance(8)
    protocol.send(Frame(cmd=Command.ACK, cursors=[Cursor("u:1", 1)]))
    frames_in(transport)
    clock.advance(9)
    assert frames_in(transport) == []
    clock.advance(1)
    assert [f.cmd for f in frames_in(transport)] == [Command.PING]


def test_pong_keeps_the_connection() -> None:
    clock = Clock()
    protocol, transport, recorder = connected(clock)
    for _ in range(10):
        clock.advance(10)
        assert [f.cmd for f in frames_in(transport)] == [Command.PING]
        clock.advance(1)
        protocol.dataReceived(PONG)
    assert not transport.disconnecting
    # Pongs feed the heartbeat only.
    assert recorder.frames == []


def test_missing_pong_is_a_dead_connection() -> None:
    clock = Clock()
    protocol, transport, recorder = connected(clock)
    clock.advance(10)
    assert [f.cmd for f in frames_in(transport)] == [Command.PING]
    # Other frames keep arriving, but no pong.
    clock.advance(5)
    protocol.dataReceived(encode_framed(Frame(cmd=Command.MESSAGE)))
    clock.advance(4.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting and transport.disconnected  # aborted
    protocol.connectionLost(None)
    assert recorder.lost == ["dead connection: no pong within 10s"]


def test_silence_is_a_dead_connection() -> None:
    clock = Clock()
    protocol, transport, recorder = connected(clock, pong_timeout=1000.0)
    for _ in range(2):
        clock.advance(14)
        protocol.dataReceived(encode_framed(Frame(cmd=Command.MESSAGE)))
    clock.advance(29.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnected
    protocol.connectionLost(None)
    assert recorder.lost == ["dead connection: nothing received for 30s"]


def test_no_timers_after_the_connection_is_lost() -> None:
    clock = Clock()
    protocol, transport, _ = connected(clock)
    protocol.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_heartbeat_reports_death_once() -> None:
    clock = Clock()
    deaths: list[str] = []
    heartbeat = Heartbeat(clock, lambda: None, deaths.append)
    heartbeat.start()
    clock.pump([1.0] * 100)
    assert deaths == ["no pong within 10s"]
    assert clock.getDelayedCalls() == []


def test_undecodable_frames_are_skipped() -> None:
    clock = Clock()
    protocol, transport, recorder = connected(clock)
    protocol.dataReceived(b"\x03\xff\xff\xff" + encode_framed(Frame(cmd=Command.KICK)))
    assert [f.cmd for f in recorder.frames] == [Command.KICK]
    assert not transport.disconnecting


# In memory: the cursor file


def test_cursors_drop_duplicates() -> None:
    cursors = CursorFile(Clock())
    assert cursors.advance("u:1", 1)
    assert cursors.advance("u:1", 3)
    assert not cursors.advance("u:1", 3)
    assert not cursors.advance("u:1", 2)
    assert cursors.advance("g:a", 1)
    assert cursors.as_list() == [Cursor("g:a", 1), Cursor("u:1", 3)]


def test_cursor_file_saved_at_most_once_a_second(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(1000)
    path = state_path(tmp_path / "state", 7)
    cursors = CursorFile(clock, path)
    cursors.advance("u:7", 1)
    clock.advance(0)
    assert json.loads(path.read_text())["cursors"] == {"u:7": 1}
    writes = []
    for seq in range(2, 12):
        cursors.advance("u:7", seq)
        clock.advance(0.1)
        writes.append(json.loads(path.read_text())["cursors"]["u:7"])
    # Ten changes over a second, written about once.
    assert len(set(writes)) <= 2
    assert writes[-1] >= 10
    cursors.advance("u:7", 12)
    cursors.close()
    assert json.loads(path.read_text())["cursors"] == {"u:7": 12}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files
    assert clock.getDelayedCalls() == []
    assert path.stat().st_mode & 0o077 == 0


def test_cursor_file_resumes(tmp_path: Path) -> None:
    clock = Clock()
    path = state_path(tmp_path, 7)
    first = CursorFile(clock, path)
    first.advance("u:7", 5)
    first.set_token("tok")
    first.close()
    second = CursorFile(clock, path)
    assert second.get("u:7") == 5
    assert second.token == "tok"
    assert not second.advance("u:7", 5)


def test_corrupt_cursor_file_is_ignored(tmp_path: Path) -> None:
    path = state_path(tmp_path, 7)
    path.write_text("{not json")
    assert CursorFile(Clock(), path).cursors == {}
    path.write_text('{"cursors": {"u:7": "x", "g:a": 3}}')
    assert CursorFile(Clock(), path).cursors == {"g:a": 3}


# In memory: a client on a StringTransport


class FakeRoute:
    """
    The route's login for a session: it names the server 127.0.0.1:11211,
    or fails with the next of C{errors}.  C{logins} keeps the time of each.
    """

    def __init__(self, clock: MemoryReactorClock) -> None:
        self.clock = clock
        self.errors: list[Exception] = []
        self.logins: list[float] = []

    async def login(
        self,
        user_id: int,
        user_name: str,
        password: str | None = None,
        token: str = "",
        account_key: str = "",
    ) -> LoginInfo:
        self.logins.append(self.clock.seconds())
        if self.errors:
            raise self.errors.pop(0)
        return LoginInfo("127.0.0.1", 11211, 0, "token", user_id, user_name)


def accept(reactor: MemoryReactorClock) -> StringTransport:
    """
    Complete the TCP connection the client asked C{reactor} for, on a
    L{StringTransport}.
    """
    _, _, factory, _, _ = reactor.tcpClients.pop(0)
    transport = StringTransport()
    factory.buildProtocol(None).makeConnection(transport)
    return transport


class Wired:
    """
    A L{Client} logged in as user 7 through a fake route, its connection a
    L{StringTransport}, on a L{MemoryReactorClock}.
    """

    def __init__(self, **kwargs: Any) -> None:
        self.clock = MemoryReactorClock()
        self.listener = QueueListener()
        self.client = Client(
            self.clock,
            "http://route.invalid",
            http=object(),
            listener=self.listener,
            **kwargs,
        )
        self.route = FakeRoute(self.clock)
        self.client._session.route = self.route
        login = Deferred.fromCoroutine(self.client.login("alice", user_id=7))
        self.connect()
        assert login.called and login.result is None

    def connect(self) -> None:
        """
        Accept the connection a login asked for, and answer the login.
        """
        self.transport = accept(self.clock)
        assert self.client._protocol is not None
        self.protocol = self.client._protocol
        assert [f.cmd for f in self.sent()] == [Command.LOGIN_REQUEST]
        self.receive(Frame(cmd=Command.LOGIN_RESPONSE))
        assert self.client.state == ClientState.READY

    def receive(self, *frames: Frame) -> None:
        self.protocol.dataReceived(b"".join(encode_framed(f) for f in frames))

    def sent(self) -> list[Frame]:
        return [f for f in frames_in(self.transport) if f.cmd != Command.PING]

    def messages(self) -> list[ChatMessage]:
        return self.listener.pending_messages()


def chat(seq: int, conversation: str = "u:7", text: str = "") -> ChatMessage:
    return ChatMessage(
        msg_id=100 + seq,
        conversation=conversation,
        seq=seq,
        sender_id=1,
        sender_name="bob",
        text=text or f"m{seq}",
        timestamp=1,
    )


def test_listener_interface() -> None:
    assert verifyObject(IClientListener, QueueListener())


def test_acks_are_coalesced() -> None:
    wired = Wired()
    wired.receive(
        Frame(cmd=Command.OFFLINE, messages=[chat(1), chat(2), chat(3)]),
        Frame(cmd=Command.MESSAGE, messages=[chat(4)]),
        Frame(cmd=Command.MESSAGE, messages=[chat(1, "g:dev")]),
    )
    wired.receive(Frame(cmd=Command.MESSAGE, messages=[chat(5)]))
    assert [m.seq for m in wired.messages()] == [1, 2, 3, 4, 1, 5]
    assert wired.sent() == []
    wired.clock.advance(0.005)
    assert wired.sent() == [
        Frame(cmd=Command.ACK, cursors=(Cursor("g:dev", 1), Cursor("u:7", 5)))
    ]
    wired.clock.advance(1)
    assert wired.sent() == []


def test_duplicates_are_dropped_and_not_acknowledged() -> None:
    wired = Wired()
    wired.receive(Frame(cmd=Command.MESSAGE, messages=[chat(1), chat(2)]))
    wired.clock.advance(1)
    wired.sent()
    wired.messages()
    wired.receive(Frame(cmd=Command.OFFLINE, messages=[chat(1), chat(2), chat(3)]))
    assert [m.seq for m in wired.messages()] == [3]
    wired.clock.advance(1)
    assert wired.sent() == [Frame(cmd=Command.ACK, cursors=(Cursor("u:7", 3),))]
    wired.receive(Frame(cmd=Command.MESSAGE, messages=[chat(3)]))
    wired.clock.advance(1)
    assert wired.messages() == [] and wired.sent() == []


def test_broadcasts_are_shown_once_in_any_order() -> None:
    wired = Wired()
    wired.receive(Frame(cmd=Command.MESSAGE, messages=[chat(5, "all"), chat(4, "all")]))
    wired.receive(Frame(cmd=Command.MESSAGE, messages=[chat(5, "all")]))
    assert [m.seq for m in wired.messages()] == [5, 4]
    wired.clock.advance(1)
    assert wired.sent() == []


def test_cim_style_frames_are_shown() -> None:
    wired = Wired()
    wired.receive(
        Frame(
            cmd=Command.MESSAGE,
            req_msg="raw",
            properties={"sendUserId": "3", "sendUserName": "carol"},
        )
    )
    [message] = wired.messages()
    assert (message.text, message.sender_id, message.sender_name) == ("raw", 3, "carol")


def test_send_is_acknowledged() -> None:
    wired = Wired()
    d = wired.client.send_private(2, "hi")
    [frame] = wired.sent()
    assert (frame.cmd, frame.receive_user_id, frame.req_msg) == (
        Command.MESSAGE,
        2,
        "hi",
    )
    assert len(frame.client_msg_id) == 32
    assert not d.called
    wired.receive(
        Frame(
            cmd=Command.ACK,
            client_msg_id=frame.client_msg_id,
            msg_id=9,
            seq=4,
            conversation="u:2",
            timestamp=5,
        )
    )
    ack = Ack(frame.client_msg_id, 9, 4, "u:2", 5)
    assert d.result == ack
    assert wired.listener.acks.pending == [ack]


def test_refused_send_fails() -> None:
    wired = Wired()
    d = wired.client.send_group("dev", "hi")
    [frame] = wired.sent()
    wired.receive(
        Frame(
            cmd=Command.ERROR,
            error_code=ErrorCode.NOT_A_MEMBER,
            error_reason="not a member of dev",
            client_msg_id=frame.client_msg_id,
        )
    )
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures[0].check(SendError)
    assert failures[0].value.code == ErrorCode.NOT_A_MEMBER
    assert wired.listener.errors.pending == [
        (ErrorCode.NOT_A_MEMBER, "not a member of dev", frame.client_msg_id)
    ]


def test_empty_send_fails_at_once() -> None:
    wired = Wired()
    failures: list[Any] = []
    wired.client.send_private(2, "").addErrback(failures.append)
    assert failures[0].check(SendError)
    assert wired.sent() == []


def test_replaced_session_gives_up() -> None:
    wired = Wired()
    d = wired.client.send_private(2, "pending")
    failures: list[Any] = []
    d.addErrback(failures.append)
    wired.receive(Frame(cmd=Command.KICK, error_reason="logged in again elsewhere"))
    assert wired.transport.disconnecting
    wired.protocol.connectionLost(None)
    assert wired.client.state == ClientState.FAILED
    assert failures[0].check(ClientClosed)
    assert wired.clock.getDelayedCalls() == []  # no reconnect


def test_backoff_doubles_up_to_thirty_seconds_with_jitter() -> None:
    delays = reconnect_delays(0.5, 30.0, 0.2, random.Random(1))
    for attempt, base in enumerate([0.5, 1, 2, 4, 8, 16, 30, 30, 30]):
        varied = [delays(attempt) for _ in range(50)]
        assert all(0.8 * base <= d <= min(1.2 * base, 30) for d in varied)
        assert len(set(varied)) > 1
    exact = reconnect_delays(0.5, 30.0, 0.0, random.Random(1))
    assert [exact(a) for a in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


def drop(wired: Wired) -> None:
    """
    Lose the connection as the network would.
    """
    wired.protocol.connectionLost(None)


def test_reconnects_with_backoff_on_the_clock() -> None:
    wired = Wired(jitter=0.0)
    route = wired.route
    route.errors = [RouteError("7100", "no IM server available") for _ in range(5)]
    wired.clock.advance(100)
    drop(wired)
    assert wired.client.state == ClientState.RECONNECTING
    wired.clock.pump([0.25] * 200)
    # Each failure doubles the wait: 0.5, 1, 2, 4, 8, then 16 to success.
    assert [t - 100 for t in route.logins[1:]] == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert wired.client.state == ClientState.CONNECTING
    wired.connect()
    # A later loss starts from the first delay again.
    route.errors = [RouteError("7100", "no IM server available")]
    start = wired.clock.seconds()
    drop(wired)
    wired.clock.pump([0.25] * 8)
    assert [t - start for t in route.logins[-2:]] == [0.5, 1.5]
    wired.connect()


def test_reconnect_delays_have_jitter() -> None:
    wired = Wired(rng=random.Random(3))
    route = wired.route
    route.errors = [OSError("connection refused") for _ in range(3)]
    drop(wired)
    wired.clock.pump([0.01] * 1000)
    waits = [b - a for a, b in zip(route.logins[1:], route.logins[2:])]
    assert 0.4 <= route.logins[1] <= 0.61 and len(waits) == 3
    for wait, base in zip(waits, [1, 2, 4]):
        assert 0.8 * base - 0.01 <= wait <= 1.2 * base + 0.01
    assert len({round(w / b, 2) for w, b in zip(waits, [1, 2, 4])}) > 1


def test_sends_are_resent_in_order_after_a_reconnect() -> None:
    wired = Wired()
    first = wired.client.send_private(2, "one")
    second = wired.client.send_private(2, "two")
    [one, two] = wired.sent()
    wired.receive(
        Frame(cmd=Command.ACK, client_msg_id=two.client_msg_id, msg_id=9, seq=2)
    )
    assert second.called and not first.called
    drop(wired)
    third = wired.client.send_private(2, "three")  # while reconnecting
    assert wired.sent() == []
    wired.clock.advance(1)
    wired.connect()
    again = wired.sent()
    assert [(f.req_msg, f.client_msg_id) for f in again] == [
        ("one", one.client_msg_id),
        ("three", again[1].client_msg_id),
    ]
    assert not third.called


def test_a_store_failure_resends_through_a_new_connection() -> None:
    wired = Wired()
    d = wired.client.send_private(2, "keep me")
    [frame] = wired.sent()
    wired.receive(
        Frame(
            cmd=Command.ERROR,
            error_code=ErrorCode.STORE_ERROR,
            error_reason="temporary store failure",
            client_msg_id=frame.client_msg_id,
        )
    )
    assert wired.transport.disconnecting and not d.called
    drop(wired)
    wired.clock.advance(1)
    wired.connect()
    assert [f.client_msg_id for f in wired.sent()] == [frame.client_msg_id]


def test_a_permanent_refusal_gives_up() -> None:
    wired = Wired()
    pending = wired.client.send_private(2, "pending")
    failures: list[Any] = []
    pending.addErrback(failures.append)
    wired.route.errors = [RouteError("9100", "the password is wrong")]
    drop(wired)
    wired.clock.advance(1)
    assert wired.client.state == ClientState.FAILED
    assert "the password is wrong" in wired.listener.log[-1][1]
    assert failures[0].check(ClientClosed)
    assert wired.clock.getDelayedCalls() == []


def test_close_stops_reconnecting() -> None:
    wired = Wired()
    wired.route.errors = [OSError("refused") for _ in range(3)]
    drop(wired)
    wired.clock.advance(1)
    closed = Deferred.fromCoroutine(wired.client.close())
    assert closed.called
    assert wired.client.state == ClientState.CLOSED
    logins = len(wired.route.logins)
    wired.clock.pump([1.0] * 60)
    assert len(wired.route.logins) == logins
    assert wired.clock.getDelayedCalls() == []


# Against a real route and IM server (memory store)


@pytest.fixture
def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest_twisted.async_yield_fixture
async def harness(reactor: Any, tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(reactor, tmp_path)
    try:
        await h.start()
        yield h
    finally:
        await h.stop()


@pytest_twisted.async_yield_fixture
async def two_servers(reactor: Any, tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(reactor, tmp_path)
    try:
        await h.start(servers=2)
        yield h
    finally:
        await h.stop()


@pytest_twisted.ensureDeferred
async def test_private_chat_both_ways(reactor: Any, harness: Harness) -> None:
    alice, alice_events = await harness.logged_in("alice")
    bob, bob_events = await harness.logged_in("bob")
    assert alice.state == bob.state == ClientState.READY
    assert [s for s, _ in alice_events.log] == [
        ClientState.CONNECTING,
        ClientState.READY,
    ]
    assert bob.user_id is not None and alice.user_id is not None
    ack = await within(reactor, alice.send_private(bob.user_id, "hi bob :smile:"))
    assert (ack.conversation, ack.seq) == (inbox(bob.user_id), 1)
    [got] = await take_messages(reactor, bob_events, 1)
    assert (got.text, got.sender_name, got.msg_id) == (
        "hi bob :smile:",
        "alice",
        ack.msg_id,
    )
    assert got.client_msg_id == ack.client_msg_id
    await within(reactor, bob.send_private(alice.user_id, "hi alice"))
    [back] = await take_messages(reactor, alice_events, 1)
    assert (back.text, back.sender_id, back.conversation) == (
        "hi alice",
        bob.user_id,
        inbox(alice.user_id),
    )
    assert await alice.online_users() == [
        User(alice.user_id, "alice"),
        User(bob.user_id, "bob"),
    ]
    # Bob acknowledged: the server saved his cursor.
    await wait_until(
        reactor,
        lambda: (
            harness.servers[0].server.sweep() or harness.store._cursors.get(bob.user_id)
        ),  # type: ignore[union-attr]
        "bob's cursor to be saved",
    )


@pytest_twisted.ensureDeferred
async def test_group_chat_both_ways(reactor: Any, harness: Harness) -> None:
    alice, alice_events = await harness.logged_in("alice")
    bob, bob_events = await harness.logged_in("bob")
    await alice.create_group("dev")
    assert await bob.join_group("dev")
    assert not await bob.join_group("dev")
    assert await bob.my_groups() == ["dev"]
    assert [m.user_name for m in await alice.group_members("dev")] == ["alice", "bob"]
    await within(reactor, alice.send_group("dev", "hello dev"))
    await within(reactor, bob.send_group("dev", "hello alice"))
    for events in (alice_events, bob_events):
        got = await take_messages(reactor, events, 2)
        assert [(m.sender_name, m.text, m.group_id, m.seq) for m in got] == [
            ("alice", "hello dev", "dev", 1),
            ("bob", "hello alice", "dev", 2),
        ]
    history = await alice.history("g:dev")
    assert [m.text for m in history] == ["hello dev", "hello alice"]
    assert await bob.leave_group("dev")
    with pytest.raises(SendError) as e:
        await within(reactor, bob.send_group("dev", "still there?"))
    assert e.value.code == ErrorCode.NOT_A_MEMBER
    with pytest.raises(RouteError):
        await alice.create_group("dev")


@pytest_twisted.ensureDeferred
async def test_broadcast(reactor: Any, harness: Harness) -> None:
    alice, _ = await harness.logged_in("alice")
    bob, bob_events = await harness.logged_in("bob")
    await alice.broadcast("hello everybody")
    [got] = await take_messages(reactor, bob_events, 1)
    assert (got.text, got.conversation, got.sender_name) == (
        "hello everybody",
        "all",
        "alice",
    )


@pytest_twisted.ensureDeferred
async def test_send_to_nobody_fails(reactor: Any, harness: Harness) -> None:
    alice, alice_events = await harness.logged_in("alice")
    with pytest.raises(SendError) as e:
        await within(reactor, alice.send_private(9999, "anyone?"))
    assert e.value.code == ErrorCode.INVALID_ARGUMENT
    assert alice.state == ClientState.READY


@pytest_twisted.ensureDeferred
async def test_passwords(reactor: Any, harness: Harness) -> None:
    client, _ = harness.client("carol")
    carol = await client.register("carol", "s3cret-pw")
    with pytest.raises(RouteError) as taken:
        await client.register("carol")
    assert taken.value.code == "4090"
    with pytest.raises(LoginError) as wrong:
        await within(reactor, client.login("carol", "wrong-pw"))
    assert wrong.value.code == "4090"
    with pytest.raises(LoginError) as wrong:
        await within(reactor, client.login("carol", "wrong-pw", user_id=carol.user_id))
    assert wrong.value.code == "9100"
    assert client.state == ClientState.FAILED
    with pytest.raises(LoginError) as missing:
        await within(reactor, client.login("carol", user_id=carol.user_id))
    assert missing.value.code == "9100" and "password" in missing.value.reason
    await within(reactor, client.login("carol", "s3cret-pw"))
    assert client.ready


@pytest_twisted.ensureDeferred
async def test_cim_style_login_with_user_id(reactor: Any, harness: Harness) -> None:
    first, _ = harness.client("dave")
    account = await first.register("dave")
    assert account.account_key and "account_key" not in repr(account)
    client, _ = harness.client("dave2")
    with pytest.raises(LoginError) as e:
        await within(reactor, client.login("not-dave", user_id=account.user_id))
    assert e.value.code == "9100"
    # The id and name are not enough: the key is needed (given here).
    with pytest.raises(LoginError) as e:
        await within(reactor, client.login("dave", user_id=account.user_id))
    assert e.value.code == "9100" and "account key" in e.value.reason
    await within(
        reactor,
        client.login("dave", user_id=account.user_id, account_key=account.account_key),
    )
    assert client.user_id == account.user_id


@pytest_twisted.ensureDeferred
async def test_the_account_key_is_kept_in_the_state_folder(
    reactor: Any, harness: Harness, tmp_path: Path
) -> None:
    erin, _ = await harness.logged_in("erin")
    key = erin.account_key
    assert key
    await erin.close()
    # The same state folder (a restarted client): logged in again, no
    # password asked, the same account; the name by its key.
    again, _ = harness.client("erin")
    await within(reactor, again.login("Erin"))
    assert (again.user_id, again.account_key) == (erin.user_id, key)
    await again.close()
    kept = (harness.state_root / "erin" / "account-keys.json").stat()
    assert kept.st_mode & 0o077 == 0
    # Another state folder has no key: the name is taken, the id unknown.
    other, _ = harness.client("not-erin")
    with pytest.raises(LoginError) as e:
        await within(reactor, other.login("erin"))
    assert e.value.code == "4090"
    assert other.user_id is None
    # The same folder for another route keeps that route's keys apart.
    keys = AccountKeys(harness.state_root / "erin")
    assert keys.get("http://127.0.0.1:1", "erin") is None
    assert keys.get(harness.route_url + "/", "ERIN") == HeldKey(erin.user_id, key)


@pytest_twisted.ensureDeferred
async def test_cursors_across_a_reconnect(reactor: Any, harness: Harness) -> None:
    alice, _ = await harness.logged_in("alice")
    bob, bob_events = await harness.logged_in("bob", backoff_base=0.3)
    assert bob.user_id is not None
    for i in range(3):
        await within(reactor, alice.send_private(bob.user_id, f"before {i}"))
    await take_messages(reactor, bob_events, 3)
    harness.drop(bob)
    await wait_state(reactor, bob_events, ClientState.RECONNECTING)
    # Sent while Bob is away.
    for i in range(3):
        await within(reactor, alice.send_private(bob.user_id, f"during {i}"))
    await wait_state(reactor, bob_events, ClientState.READY)
    for i in range(3):
        await within(reactor, alice.send_private(bob.user_id, f"after {i}"))
    got = await take_messages(reactor, bob_events, 6)
    assert [m.text for m in got] == [f"during {i}" for i in range(3)] + [
        f"after {i}" for i in range(3)
    ]
    assert [m.seq for m in got] == list(range(4, 10))
    # Nothing more (no duplicate) is queued: the next message is the next one.
    await within(reactor, alice.send_private(bob.user_id, "last"))
    [last] = await take_messages(reactor, bob_events, 1)
    assert (last.text, last.seq) == ("last", 10)
    assert bob.cursors.get(inbox(bob.user_id)) == 10


@pytest_twisted.ensureDeferred
async def test_sends_resent_after_a_reconnect(reactor: Any, harness: Harness) -> None:
    alice, alice_events = await harness.logged_in("alice")
    bob, bob_events = await harness.logged_in("bob")
    assert bob.user_id is not None
    # Alice's send reaches the server, but she never reads its ack.
    assert alice._protocol is not None
    alice._protocol.transport.pauseProducing()  # type: ignore[union-attr]
    first = alice.send_private(bob.user_id, "stored once")
    [got] = await take_messages(reactor, bob_events, 1)
    alice._protocol.abort("test: the connection died")
    await wait_state(reactor, alice_events, ClientState.RECONNECTING)
    # A send while reconnecting waits for the new connection.
    second = alice.send_private(bob.user_id, "sent while away")
    ack1 = await within(reactor, first)
    ack2 = await within(reactor, second)
    assert ack1.msg_id == got.msg_id and ack1.seq == 1
    assert ack2.seq == 2
    stored = await harness.store.read(inbox(bob.user_id), 0, 10)
    assert [m.text for m in stored] == ["stored once", "sent while away"]
    # Bob sees each once.
    [next_one] = await take_messages(reactor, bob_events, 1)
    assert next_one.text == "sent while away"
    await within(reactor, alice.send_private(bob.user_id, "third"))
    [third] = await take_messages(reactor, bob_events, 1)
    assert third.text == "third"


@pytest_twisted.ensureDeferred
async def test_cursor_file_resumes_after_a_restart(
    reactor: Any, harness: Harness, tmp_path: Path
) -> None:
    alice, _ = await harness.logged_in("alice")
    bob, bob_events = await harness.logged_in("bob")
    bob_id = bob.user_id
    assert bob_id is not None
    for i in range(2):
        await within(reactor, alice.send_private(bob_id, f"first {i}"))
    await take_messages(reactor, bob_events, 2)
    await within(reactor, bob.close())
    path = state_path(tmp_path / "bob", bob_id)
    assert json.loads(path.read_text())["cursors"] == {inbox(bob_id): 2}
    for i in range(2):
        await within(reactor, alice.send_private(bob_id, f"second {i}"))
    # Only the client's file knows what Bob saw: forget the server's copy.
    harness.store._cursors.pop(bob_id, None)
    again, again_events = await harness.logged_in("bob")
    got = await take_messages(reactor, again_events, 2)
    assert [m.text for m in got] == ["second 0", "second 1"]
    await within(reactor, alice.send_private(bob_id, "third"))
    [third] = await take_messages(reactor, again_events, 1)
    assert third.text == "third"


@pytest_twisted.ensureDeferred
async def test_dead_server_is_detected(reactor: Any, harness: Harness) -> None:
    alice, _ = await harness.logged_in("alice")
    bob, bob_events = await harness.logged_in(
        "bob", heartbeat_interval=0.1, pong_timeout=0.3, idle_timeout=2.0
    )
    assert bob.user_id is not None
    # The server stops reading Bob's connection: no more pongs.
    conn = harness.server_of(bob).server.users[bob.user_id]  # type: ignore[union-attr]
    conn.link.transport.pauseProducing()  # type: ignore[attr-defined]
    reason = await wait_state(reactor, bob_events, ClientState.RECONNECTING)
    assert "no pong" in reason
    await wait_state(reactor, bob_events, ClientState.READY)
    await within(reactor, alice.send_private(bob.user_id, "still there?"))
    [got] = await take_messages(reactor, bob_events, 1)
    assert got.text == "still there?"


@pytest_twisted.ensureDeferred
async def test_server_shutdown_moves_clients(
    reactor: Any, two_servers: Harness
) -> None:
    alice, _ = await two_servers.logged_in("alice")
    bob, bob_events = await two_servers.logged_in("bob")
    assert bob.user_id is not None
    assert alice.server != bob.server
    await within(reactor, alice.send_private(bob.user_id, "one"))
    await take_messages(reactor, bob_events, 1)
    old = two_servers.server_of(bob)
    await old.stopService()
    await wait_state(reactor, bob_events, ClientState.RECONNECTING)
    await within(reactor, alice.send_private(bob.user_id, "two"))
    await wait_state(reactor, bob_events, ClientState.READY)
    assert bob.server == alice.server
    await within(reactor, alice.send_private(bob.user_id, "three"))
    got = await take_messages(reactor, bob_events, 2)
    assert [m.text for m in got] == ["two", "three"]


@pytest_twisted.ensureDeferred
async def test_newer_login_replaces_the_session(reactor: Any, harness: Harness) -> None:
    first, first_events = harness.client("erin")
    await within(reactor, first.login("erin", "pw-of-erin"))
    second, _ = harness.client("erin-2")
    await within(reactor, second.login("erin", "pw-of-erin"))
    reason = await wait_state(reactor, first_events, ClientState.FAILED)
    assert "replaced" in reason
    assert second.ready


@pytest_twisted.ensureDeferred
async def test_close(reactor: Any, harness: Harness) -> None:
    alice, alice_events = await harness.logged_in("alice", close_timeout=0.2)
    bob, _ = await harness.logged_in("bob")
    assert alice._protocol is not None
    alice._protocol.transport.pauseProducing()  # type: ignore[union-attr]
    alice._protocol.heartbeat.stop()
    # Unacknowledged when the client closes.
    pending = alice.send_private(9999, "lost")
    await within(reactor, alice.close())
    with pytest.raises(ClientClosed):
        await pending
    assert alice.state == ClientState.CLOSED
    assert alice_events.log[-1] == (ClientState.CLOSED, "closed")
    assert [u.user_name for u in await bob.online_users()] == ["bob"]
    with pytest.raises(ClientClosed):
        await alice.send_private(2, "after close")
    await within(reactor, alice.close())  # twice is fine


@pytest_twisted.ensureDeferred
async def test_close_waits_for_acks(reactor: Any, harness: Harness) -> None:
    alice, _ = await harness.logged_in("alice")
    bob, bob_events = await harness.logged_in("bob")
    assert bob.user_id is not None
    sends = [alice.send_private(bob.user_id, f"bye {i}") for i in range(5)]
    await within(reactor, alice.close())
    acks = [await send for send in sends]
    assert [a.seq for a in acks] == [1, 2, 3, 4, 5]
    got = await take_messages(reactor, bob_events, 5)
    assert [m.text for m in got] == [f"bye {i}" for i in range(5)]


@pytest_twisted.ensureDeferred
async def test_unreachable_route(reactor: Any, tmp_path: Path) -> None:
    from tests.kit.net import refusing_port

    with refusing_port() as port:
        client = Client(reactor, f"http://127.0.0.1:{port}", state_dir=tmp_path)
        try:
            with pytest.raises(LoginError) as e:
                await within(reactor, client.login("nobody"))
            assert "cannot reach the route" in e.value.reason
        finally:
            await within(reactor, client.close())


def test_account_keys_shared_by_two_clients(tmp_path: Path) -> None:
    # Two clients on one state folder (the quick start's two terminals),
    # both started before either saved a key: neither key is lost.
    first, second = AccountKeys(tmp_path), AccountKeys(tmp_path)
    first.put("http://route:8083", "alice", 1, "key-a")
    second.put("http://route:8083/", "bob", 2, "key-b")
    again = AccountKeys(tmp_path)
    assert again.get("http://route:8083", "Alice") == HeldKey(1, "key-a")
    assert again.get("http://route:8083", "bob") == HeldKey(2, "key-b")
    assert "key-a" not in repr(again.get("http://route:8083", "alice"))
    (tmp_path / "account-keys.json").write_text("{not json")
    assert AccountKeys(tmp_path).get("http://route:8083", "alice") is None
