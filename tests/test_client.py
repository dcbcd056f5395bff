"""
The client library in memory with a L{Clock}: the heartbeat, the cursor
file, a whole client on a L{StringTransport} behind a fake route (cursors
and epochs, acknowledgements, devices, read state, kicks, backoff), and the
route's calls on a L{StubTreq}.  C{tests/test_client_live.py} runs whole
clients against a real route and IM servers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface.verify import verifyObject

from cim.client.connection import ClientProtocol, Heartbeat
from cim.client.cursors import CursorFile, Received, state_path
from cim.client.devicekeys import DeviceKeys, HeldDeviceKey
from cim.client.devices import DeviceIds, account_tag
from cim.client.keys import AccountKeys, HeldKey
from cim.client.library import (
    Ack,
    Client,
    ClientClosed,
    ClientState,
    IClientListener,
    QueueListener,
    SendError,
)
from cim.client.reads import ConversationInfo
from cim.client.route import LoginInfo, RouteClient, RouteError
from cim.client.session import reconnect_delays
from cim.codec import decode, encode_framed
from cim.message import (
    KICK_DEVICE_LIMIT,
    KICK_REPLACED,
    ChatMessage,
    Command,
    Cursor,
    ErrorCode,
    Frame,
    Position,
)
from cim.names import name_key

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

PAIR = "p:1:7"


def test_cursors_drop_duplicates() -> None:
    cursors = CursorFile(Clock())
    assert cursors.received(PAIR, "e1", 1) == Received(moved=True, new=True)
    assert cursors.received(PAIR, "e1", 3).new
    assert cursors.received(PAIR, "e1", 3) == Received(moved=False, new=False)
    assert not cursors.received(PAIR, "e1", 2).new
    assert cursors.received("g:a", "", 1).new
    assert cursors.as_list() == [Cursor("g:a", 1, ""), Cursor(PAIR, 3, "e1")]


def test_cursors_across_an_epoch_reset() -> None:
    cursors = CursorFile(Clock())
    for seq in (1, 2, 3):
        cursors.received(PAIR, "e1", seq)
    # The store lost everything after 1: the server starts epoch e2 at 1
    # and resends what it holds: 2 and 3 of e1 were seen, the new 2 and 3
    # (of e2) were not.
    assert cursors.start(PAIR, "e2", 1)
    assert cursors.position(PAIR) == Position("e2", 1)
    assert cursors.received(PAIR, "e1", 2) == Received(moved=True, new=False)
    assert cursors.received(PAIR, "e2", 3) == Received(moved=True, new=True)
    assert not cursors.received(PAIR, "e1", 3).new
    assert cursors.cursor(PAIR) == Cursor(PAIR, 3, "e2")
    assert cursors.seen[PAIR] == {"e1": 3, "e2": 3}
    assert not cursors.start(PAIR, "e2", 3)


def test_cursor_file_saved_at_most_once_a_second(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(1000)
    path = state_path(tmp_path / "state", 7)
    cursors = CursorFile(clock, path)
    cursors.received(PAIR, "e1", 1)
    clock.advance(0)
    assert json.loads(path.read_text())["conversations"] == {
        PAIR: {"epoch": "e1", "seq": 1, "seen": {"e1": 1}}
    }
    writes = []
    for seq in range(2, 12):
        cursors.received(PAIR, "e1", seq)
        clock.advance(0.1)
        writes.append(json.loads(path.read_text())["conversations"][PAIR]["seq"])
    # Ten changes over a second, written about once.
    assert len(set(writes)) <= 2
    assert writes[-1] >= 10
    cursors.received(PAIR, "e1", 12)
    cursors.close()
    assert json.loads(path.read_text())["conversations"][PAIR]["seq"] == 12
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files
    assert clock.getDelayedCalls() == []
    assert path.stat().st_mode & 0o077 == 0


def test_cursor_file_resumes(tmp_path: Path) -> None:
    clock = Clock()
    path = state_path(tmp_path, 7)
    first = CursorFile(clock, path)
    first.received(PAIR, "e1", 5)
    first.start(PAIR, "e2", 2)
    first.received(PAIR, "e2", 3)
    first.set_token("tok")
    first.close()
    second = CursorFile(clock, path)
    assert second.position(PAIR) == Position("e2", 3)
    assert second.seen[PAIR] == {"e1": 5, "e2": 3}
    assert second.token == "tok"
    assert not second.received(PAIR, "e1", 5).new
    assert not second.received(PAIR, "e2", 3).new


def test_a_cursor_file_of_the_previous_release_loads(tmp_path: Path) -> None:
    path = state_path(tmp_path, 7)
    path.write_text('{"version": 1, "cursors": {"u:7": 4, "g:a": 2}, "token": "t"}')
    cursors = CursorFile(Clock(), path)
    # The one-sided inboxes of that release are gone (moved into pairs).
    assert cursors.cursors == {"g:a": Position("", 2)}
    assert cursors.token == "t"
    assert not cursors.received("g:a", "", 2).new
    assert cursors.received("g:a", "", 3).new
    assert cursors.as_list() == [Cursor("g:a", 3, "")]
    # The server names the epoch at the next login; what was seen stays.
    cursors.start("g:a", "e1", 3)
    assert not cursors.received("g:a", "", 3).new
    cursors.close()


def test_corrupt_cursor_file_is_ignored(tmp_path: Path) -> None:
    path = state_path(tmp_path, 7)
    path.write_text("{not json")
    assert CursorFile(Clock(), path).cursors == {}
    path.write_text('{"cursors": {"g:b": "x", "g:a": 3}}')
    assert CursorFile(Clock(), path).cursors == {"g:a": Position("", 3)}
    path.write_text(
        '{"version": 2, "conversations": {"g:a": {"epoch": 1, "seq": 3}, '
        '"g:b": {"epoch": "e", "seq": true, "seen": {"e": 2, "f": "x"}}, '
        '"g:c": [1]}}'
    )
    cursors = CursorFile(Clock(), path)
    assert cursors.cursors == {}
    assert cursors.seen == {"g:b": {"e": 2}}


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
        self.devices: list[str] = []

    async def login(
        self,
        user_id: int,
        user_name: str,
        password: str | None = None,
        token: str = "",
        account_key: str = "",
        device: str = "",
    ) -> LoginInfo:
        self.logins.append(self.clock.seconds())
        self.devices.append(device)
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

    def __init__(self, cursors: tuple[Cursor, ...] = (), **kwargs: Any) -> None:
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
        self.connect(cursors)
        assert login.called and login.result is None

    def connect(self, cursors: tuple[Cursor, ...] = ()) -> Frame:
        """
        Accept the connection a login asked for, and answer the login
        (starting the conversations at C{cursors}).

        @return: the C{LOGIN_REQUEST}.
        """
        self.transport = accept(self.clock)
        assert self.client._protocol is not None
        self.protocol = self.client._protocol
        [login] = self.sent()
        assert login.cmd == Command.LOGIN_REQUEST
        self.receive(Frame(cmd=Command.LOGIN_RESPONSE, cursors=cursors))
        assert self.client.state == ClientState.READY
        return login

    def receive(self, *frames: Frame) -> None:
        self.protocol.dataReceived(b"".join(encode_framed(f) for f in frames))

    def sent(self) -> list[Frame]:
        return [f for f in frames_in(self.transport) if f.cmd != Command.PING]

    def messages(self) -> list[ChatMessage]:
        return self.listener.pending_messages()


def chat(
    seq: int,
    conversation: str = PAIR,
    text: str = "",
    epoch: str = "e1",
    sender_id: int = 1,
    client_msg_id: str = "",
) -> ChatMessage:
    return ChatMessage(
        msg_id=100 + seq,
        conversation=conversation,
        seq=seq,
        sender_id=sender_id,
        sender_name="bob" if sender_id == 1 else "alice",
        text=text or f"m{seq}",
        timestamp=1,
        client_msg_id=client_msg_id,
        epoch=epoch,
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
        Frame(
            cmd=Command.ACK, cursors=(Cursor("g:dev", 1, "e1"), Cursor(PAIR, 5, "e1"))
        )
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
    assert wired.sent() == [Frame(cmd=Command.ACK, cursors=(Cursor(PAIR, 3, "e1"),))]
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
            conversation="p:2:7",
            timestamp=5,
        )
    )
    ack = Ack(frame.client_msg_id, 9, 4, "p:2:7", 5)
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
    wired.receive(Frame(cmd=Command.KICK, error_reason=KICK_REPLACED))
    assert wired.transport.disconnecting
    wired.protocol.connectionLost(None)
    assert wired.client.state == ClientState.FAILED
    reason = wired.listener.log[-1][1]
    assert "replaced by a newer login of this device" in reason
    assert "not reconnecting" in reason
    assert failures[0].check(ClientClosed)
    assert wired.clock.getDelayedCalls() == []  # no reconnect
    assert len(wired.route.logins) == 1


def test_the_device_limit_gives_up() -> None:
    wired = Wired()
    wired.receive(Frame(cmd=Command.KICK, error_reason=KICK_DEVICE_LIMIT))
    wired.protocol.connectionLost(None)
    assert wired.client.state == ClientState.FAILED
    assert "more devices than allowed" in wired.listener.log[-1][1]
    wired.clock.pump([1.0] * 60)
    assert len(wired.route.logins) == 1


def test_other_kicks_reconnect() -> None:
    wired = Wired()
    wired.receive(Frame(cmd=Command.KICK, error_reason="the server shuts down"))
    wired.protocol.connectionLost(None)
    assert wired.client.state == ClientState.RECONNECTING
    wired.clock.advance(1)
    wired.connect()


def test_a_final_kick_during_a_login_gives_up() -> None:
    wired = Wired()
    drop(wired)
    wired.clock.advance(1)
    wired.transport = accept(wired.clock)
    assert wired.client._protocol is not None
    wired.protocol = wired.client._protocol
    wired.receive(Frame(cmd=Command.KICK, error_reason=KICK_REPLACED))
    wired.protocol.connectionLost(None)
    assert wired.client.state == ClientState.FAILED
    wired.clock.pump([1.0] * 60)
    assert len(wired.route.logins) == 2


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


# Devices


def test_the_device_id_is_kept_in_the_state_folder(tmp_path: Path) -> None:
    first = Wired(state_dir=tmp_path)
    device = first.client.device
    assert device and first.route.devices == [device]
    # Another client on the same folder, route and account: the same device.
    again = Wired(state_dir=tmp_path)
    assert again.client.device == device
    assert again.route.devices == [device]
    keep = DeviceIds(tmp_path)
    alice = account_tag(name_key("alice"))  # (no account key in this test)
    assert keep.get("http://route.invalid/", 7, alice) == device
    # Another account, or another route: another device.
    assert keep.device_for("http://route.invalid", 8, alice) != device
    assert keep.device_for("http://other.invalid", 7, alice) != device
    # So is an account of a new store that got the same id.
    assert keep.device_for("http://route.invalid", 7, account_tag("key")) != device
    assert (tmp_path / "devices.json").stat().st_mode & 0o077 == 0
    # Named devices in the same folder keep cursors (and tokens) apart.
    named = Wired(state_dir=tmp_path, device="phone")
    for wired in (first, again, named):
        wired.receive(Frame(cmd=Command.MESSAGE, messages=[chat(1)]))
        closed = Deferred.fromCoroutine(wired.client.close())
        wired.clock.advance(5)  # the server never closes the connection
        assert closed.called
    # Per route and account, too.
    folder = tmp_path / "cursors" / "route.invalid"
    assert sorted(p.name for p in folder.glob("*.json")) == [
        f"7-{alice}-phone.json",
        f"7-{alice}.json",
    ]
    route = "http://route.invalid"
    phone = state_path(tmp_path, 7, "phone", route, alice)
    assert CursorFile(Clock(), phone).get(PAIR) == 1


def test_cursors_kept_before_routes_are_carried_over(tmp_path: Path) -> None:
    legacy = state_path(tmp_path, 7)
    old = CursorFile(Clock(), legacy)
    old.received(PAIR, "e1", 4)
    old.close()
    assert legacy.exists()
    Wired(state_dir=tmp_path)
    assert not legacy.exists()
    alice = account_tag(name_key("alice"))
    moved = state_path(tmp_path, 7, route_url="http://route.invalid", account=alice)
    assert CursorFile(Clock(), moved).get(PAIR) == 4


def test_a_device_id_kept_by_user_id_alone_is_taken_over_once(
    tmp_path: Path,
) -> None:
    # An id saved before accounts were told apart (by user id alone) is
    # the account's from now on, and no longer kept under the user id.
    (tmp_path / "devices.json").write_text(
        json.dumps({"version": 1, "routes": {"http://route": {"7": "old-one"}}})
    )
    tag = account_tag("key")
    assert DeviceIds(tmp_path).device_for("http://route/", 7, tag) == "old-one"
    saved = json.loads((tmp_path / "devices.json").read_text())
    assert saved["routes"] == {"http://route": {f"7-{tag}": "old-one"}}
    # Another account of that id is another device.
    assert DeviceIds(tmp_path).device_for("http://route", 7, "other") != "old-one"


def test_a_device_id_given_or_random() -> None:
    given = Wired(device="phone-1")
    assert given.client.device == given.route.devices[0] == "phone-1"
    # Without a state folder, each client is a device of its own.
    one, two = Wired(), Wired()
    assert one.client.device and one.client.device != two.client.device
    # A reconnect keeps it.
    drop(one)
    one.clock.advance(1)
    one.connect()
    assert one.route.devices == [one.client.device] * 2
    with pytest.raises(ValueError, match="bad device id"):
        Client(MemoryReactorClock(), http=object(), device="no spaces")


# Cursors and epochs


def test_the_login_response_starts_the_streams() -> None:
    wired = Wired(cursors=(Cursor(PAIR, 4, "e1"), Cursor("g:dev", 0, "e9")))
    assert wired.client.cursors.position(PAIR) == Position("e1", 4)
    assert wired.client.cursors.position("g:dev") == Position("e9", 0)
    # Acknowledged at once (what the server stores for this device).
    assert wired.sent() == [Frame(cmd=Command.ACK, cursors=(Cursor(PAIR, 4, "e1"),))]
    wired.receive(Frame(cmd=Command.MESSAGE, messages=[chat(1, "g:dev", epoch="e9")]))
    wired.clock.advance(1)
    assert wired.sent() == [Frame(cmd=Command.ACK, cursors=(Cursor("g:dev", 1, "e9"),))]
    # The next login sends the positions with their epochs.
    drop(wired)
    wired.clock.advance(1)
    login = wired.connect()
    assert list(login.cursors) == [Cursor("g:dev", 1, "e9"), Cursor(PAIR, 4, "e1")]
    assert wired.listener.resets.pending == []


def test_an_epoch_frame_starts_a_conversation() -> None:
    wired = Wired()
    wired.receive(
        Frame(cmd=Command.EPOCH, cursors=[Cursor("p:7:9", 0, "e5")]),
        Frame(cmd=Command.MESSAGE, messages=[chat(1, "p:7:9", epoch="e5")]),
    )
    assert [m.conversation for m in wired.messages()] == ["p:7:9"]
    wired.clock.advance(1)
    assert wired.sent() == [Frame(cmd=Command.ACK, cursors=(Cursor("p:7:9", 1, "e5"),))]


def test_an_unannounced_conversation_takes_its_first_messages_epoch() -> None:
    # A conversation begun since login, sent from its start: the server
    # sends no EPOCH frame; the stream follows the first message's epoch,
    # acknowledged and sent at the next login in it.
    wired = Wired()
    wired.receive(
        Frame(cmd=Command.MESSAGE, messages=[chat(1, "p:7:9", epoch="e5")]),
        Frame(cmd=Command.MESSAGE, messages=[chat(2, "p:7:9", epoch="e5")]),
    )
    assert [m.seq for m in wired.messages()] == [1, 2]
    wired.clock.advance(1)
    assert wired.sent() == [Frame(cmd=Command.ACK, cursors=(Cursor("p:7:9", 2, "e5"),))]
    drop(wired)
    wired.clock.advance(1)
    assert list(wired.connect().cursors) == [Cursor("p:7:9", 2, "e5")]


def test_acks_carry_the_stream_epoch() -> None:
    # A stream of epoch e2 that trusts its previous epoch up to 3: the
    # messages it resends keep their tag e1, the acknowledgement is of e2.
    wired = Wired(cursors=(Cursor(PAIR, 0, "e2"),))
    wired.receive(
        Frame(cmd=Command.OFFLINE, messages=[chat(s, epoch="e1") for s in (1, 2, 3)]),
        Frame(cmd=Command.MESSAGE, messages=[chat(4, epoch="e2")]),
    )
    assert len(wired.messages()) == 4
    wired.clock.advance(1)
    assert wired.sent() == [Frame(cmd=Command.ACK, cursors=(Cursor(PAIR, 4, "e2"),))]


def test_nothing_twice_across_an_epoch_reset() -> None:
    wired = Wired(cursors=(Cursor(PAIR, 0, "e1"),))
    wired.receive(
        Frame(cmd=Command.MESSAGE, messages=[chat(s, epoch="e1") for s in (1, 2, 3)])
    )
    assert [m.seq for m in wired.messages()] == [1, 2, 3]
    wired.clock.advance(1)
    wired.sent()
    # The store lost everything: the server starts a new epoch from 0 and
    # resends what it holds: the three old messages (kept with their tag,
    # restored from a copy), then the new ones, numbered again from 4... and
    # new ones of the new epoch numbered 1 and 2 are new.
    wired.receive(
        Frame(cmd=Command.EPOCH, cursors=[Cursor(PAIR, 0, "e2", reset=True)]),
        Frame(
            cmd=Command.MESSAGE,
            messages=[chat(1, epoch="e1"), chat(2, epoch="e1")]
            + [chat(3, text="new 3", epoch="e2"), chat(4, text="new 4", epoch="e2")],
        ),
    )
    assert wired.listener.resets.pending == [(PAIR, 0)]
    assert [(m.epoch, m.seq, m.text) for m in wired.messages()] == [
        ("e2", 3, "new 3"),
        ("e2", 4, "new 4"),
    ]
    wired.clock.advance(1)
    assert wired.sent() == [Frame(cmd=Command.ACK, cursors=(Cursor(PAIR, 4, "e2"),))]
    # The same happening at login (the client's position was of e1).
    drop(wired)
    wired.clock.advance(1)
    login = wired.connect((Cursor(PAIR, 2, "e3", reset=True),))
    assert list(login.cursors) == [Cursor(PAIR, 4, "e2")]
    assert wired.listener.resets.pending[-1] == (PAIR, 2)
    wired.receive(
        Frame(cmd=Command.MESSAGE, messages=[chat(3, epoch="e2"), chat(3, epoch="e3")])
    )
    assert [(m.epoch, m.seq) for m in wired.messages()] == [("e3", 3)]


# Own messages and read state


def test_own_messages_come_back_and_are_known() -> None:
    wired = Wired()
    d = wired.client.send_private(1, "hello")
    [frame] = wired.sent()
    assert wired.client.sent_here(frame.client_msg_id)
    echo = chat(1, sender_id=7, client_msg_id=frame.client_msg_id)
    wired.receive(
        Frame(cmd=Command.MESSAGE, messages=[echo]),
        Frame(cmd=Command.ACK, client_msg_id=frame.client_msg_id, msg_id=101, seq=1),
    )
    assert wired.messages() == [echo]
    assert d.called and wired.client.sent_here(frame.client_msg_id)
    assert not wired.client.sent_here("from-another-device")
    assert not wired.client.sent_here("")
    # One's own message is no unread one, and reads what came before.
    assert wired.client.unread(PAIR) == 0
    assert wired.client.read_position(PAIR) == 1


def test_read_frames_update_read_positions_and_unread_counts() -> None:
    wired = Wired()
    wired.client._inbox.reads.load(
        [ConversationInfo(PAIR, "e1", last_seq=5, read=3, unread=2, peer_id=1)]
    )
    wired.receive(
        Frame(cmd=Command.MESSAGE, messages=[chat(4), chat(5), chat(6), chat(7)])
    )
    # 4 and 5 were counted in the snapshot already.
    assert wired.client.unread(PAIR) == 4
    assert wired.client.unread() == 4
    # Writing reads: the peer (user 1) read up to each of its new messages.
    assert wired.listener.reads.pending == [(1, PAIR, 6), (1, PAIR, 7)]
    wired.listener.reads.pending.clear()
    # This user read up to 5 on another device.
    wired.receive(Frame(cmd=Command.READ, request_id=7, cursors=[Cursor(PAIR, 5)]))
    assert wired.client.unread(PAIR) == 2
    assert wired.client.read_position(PAIR) == 5
    # The peer read this user's messages (a read receipt), and a member of
    # a group read it.
    wired.receive(
        Frame(cmd=Command.READ, request_id=1, cursors=[Cursor(PAIR, 9)]),
        Frame(cmd=Command.READ, request_id=3, cursors=[Cursor("g:dev", 2)]),
    )
    assert wired.client.read_position(PAIR, 1) == 9
    assert wired.client.read_position("g:dev", 3) == 2
    # Positions never fall: a stale READ says nothing.
    wired.receive(Frame(cmd=Command.READ, request_id=7, cursors=[Cursor(PAIR, 4)]))
    assert wired.listener.reads.pending == [
        (7, PAIR, 5),
        (1, PAIR, 9),
        (3, "g:dev", 2),
    ]
    assert wired.client.unread(PAIR) == 2
    [state] = [c for c in wired.client.conversation_states() if c.conversation == PAIR]
    assert (state.last_seq, state.read, state.unread, state.peer_read) == (7, 5, 2, 9)


def test_a_message_is_a_read_receipt_from_its_sender() -> None:
    # The store raises a sender's read position when it appends: the
    # library tells it, so a reply shows as a receipt with no READ frame.
    wired = Wired()
    wired.receive(Frame(cmd=Command.MESSAGE, messages=[chat(1, sender_id=7)]))
    wired.receive(Frame(cmd=Command.MESSAGE, messages=[chat(2), chat(2)]))
    wired.receive(Frame(cmd=Command.MESSAGE, messages=[chat(3, "g:dev", sender_id=3)]))
    assert wired.listener.reads.pending == [
        (7, PAIR, 1),
        (1, PAIR, 2),  # once: the duplicate is not shown, nor told
        (3, "g:dev", 3),
    ]
    assert wired.client.read_position(PAIR, 1) == 2
    assert wired.client.read_position(PAIR) == 1


def test_mark_read_sends_read() -> None:
    wired = Wired()
    wired.receive(Frame(cmd=Command.MESSAGE, messages=[chat(1), chat(2), chat(3)]))
    assert wired.client.unread(PAIR) == 3
    wired.listener.reads.pending.clear()  # the peer's (its messages)
    wired.client.mark_read(PAIR, 2)
    assert wired.client.unread(PAIR) == 1
    assert Frame(cmd=Command.READ, cursors=(Cursor(PAIR, 2),)) in wired.sent()
    assert wired.listener.reads.pending == [(7, PAIR, 2)]
    wired.client.mark_read(PAIR, 1)  # lower: nothing
    assert wired.sent() == []
    # While disconnected, it waits for the next connection.
    drop(wired)
    wired.client.mark_read(PAIR, 3)
    assert wired.client.unread(PAIR) == 0
    wired.clock.advance(1)
    wired.connect()
    assert Frame(cmd=Command.READ, cursors=(Cursor(PAIR, 3),)) in wired.sent()
    # Broadcasts have no read position.
    wired.client.mark_read("all", 5)
    assert wired.sent() == []


# The route's calls


class FakeRouteResource(Resource):
    """
    The route's HTTP API, answering each path with C{answers[path]} and
    keeping the bodies asked.
    """

    isLeaf = True

    def __init__(self, answers: dict[str, Any]) -> None:
        super().__init__()
        self.answers = answers
        self.bodies: list[tuple[str, dict[str, Any]]] = []

    def render_POST(self, request: Request) -> bytes:
        path = request.path.decode()
        assert request.content is not None
        self.bodies.append((path, json.loads(request.content.read())))
        answer = {"code": "9000", "message": "ok", "dataBody": self.answers[path]}
        return json.dumps(answer).encode()


def route_client(answers: dict[str, Any]) -> tuple[RouteClient, FakeRouteResource]:
    resource = FakeRouteResource(answers)
    return RouteClient(Clock(), StubTreq(resource), "http://route"), resource


def test_the_client_asks_the_route() -> None:
    wired = Wired()
    resource = FakeRouteResource(
        {
            "/conversations": [
                {"conversation": PAIR, "lastSeq": 4, "read": 1, "unread": 3},
                {"conversation": "g:dev", "lastSeq": 2, "read": 2, "groupId": "dev"},
            ],
            "/readPositions": [{"userId": 3, "read": 2}],
            "/history": [],
        }
    )
    wired.client.route = RouteClient(wired.clock, StubTreq(resource), "http://r")
    d = Deferred.fromCoroutine(wired.client.conversations())
    assert [(c.conversation, c.unread) for c in d.result] == [("g:dev", 0), (PAIR, 3)]
    assert wired.client.unread() == 3
    # Live from then on: 4 was counted, 5 is new.
    wired.receive(Frame(cmd=Command.MESSAGE, messages=[chat(4), chat(5)]))
    assert wired.client.unread(PAIR) == 4
    d = Deferred.fromCoroutine(wired.client.read_positions("g:dev"))
    assert d.result == {3: 2} and wired.client.read_position("g:dev", 3) == 2
    Deferred.fromCoroutine(wired.client.history(peer=1, before_seq=5))
    assert resource.bodies[-1] == (
        "/history",
        {"userId": 7, "limit": 20, "peerId": 1, "beforeSeq": 5},
    )
    assert wired.client.private_conversation(1) == PAIR
    failures: list[Any] = []
    Deferred.fromCoroutine(wired.client.history()).addErrback(failures.append)
    assert failures[0].check(ValueError)


def test_the_route_login_names_the_device() -> None:
    route, resource = route_client(
        {
            "/login": {
                "ip": "10.0.0.1",
                "cimServerPort": 11211,
                "httpPort": 8081,
                "token": "t",
                "userId": 7,
                "userName": "alice",
                "device": "phone",
            }
        }
    )
    d = Deferred.fromCoroutine(route.login(7, "alice", device="phone"))
    assert d.result.device == "phone"
    assert resource.bodies == [
        ("/login", {"userId": 7, "userName": "alice", "device": "phone"})
    ]
    Deferred.fromCoroutine(route.login(7, "alice"))
    assert "device" not in resource.bodies[-1][1]


def test_the_route_conversations() -> None:
    route, resource = route_client(
        {
            "/conversations": [
                {
                    "conversation": PAIR,
                    "epoch": "e1",
                    "lastSeq": 9,
                    "read": 5,
                    "unread": 3,
                    "peerId": 1,
                    "peerName": "bob",
                    "peerRead": 9,
                },
                {"conversation": "g:dev", "lastSeq": 2, "groupId": "dev"},
            ]
        }
    )
    d = Deferred.fromCoroutine(route.conversations(7, "tok"))
    assert d.result == [
        ConversationInfo(PAIR, "e1", 9, 5, 3, 1, "bob", 9),
        ConversationInfo("g:dev", "", 2, group_id="dev"),
    ]
    assert resource.bodies == [("/conversations", {"userId": 7})]


def test_the_route_read_positions() -> None:
    route, resource = route_client(
        {"/readPositions": [{"userId": 1, "read": 4}, {"userId": 7, "read": 9}]}
    )
    d = Deferred.fromCoroutine(route.read_positions(7, "t", "g:dev"))
    assert d.result == {1: 4, 7: 9}
    assert resource.bodies == [
        ("/readPositions", {"userId": 7, "conversation": "g:dev"})
    ]


def test_the_route_history() -> None:
    message = {
        "msgId": 1,
        "conversation": PAIR,
        "seq": 1,
        "sendUserId": 1,
        "sendUserName": "bob",
        "msg": "hi",
        "timestamp": 5,
        "epoch": "e1",
    }
    route, resource = route_client({"/history": [message]})
    d = Deferred.fromCoroutine(route.history(7, "t", peer_id=1, limit=5))
    assert [m.epoch for m in d.result] == ["e1"]
    Deferred.fromCoroutine(route.history(7, "t", "g:dev", 10, before_seq=40))
    Deferred.fromCoroutine(route.history(7, "t", "g:dev", 10, after_seq=3))
    assert [body for _, body in resource.bodies] == [
        {"userId": 7, "limit": 5, "peerId": 1, "beforeSeq": 0},
        {"userId": 7, "limit": 10, "conversation": "g:dev", "beforeSeq": 40},
        {"userId": 7, "limit": 10, "conversation": "g:dev", "afterSeq": 3},
    ]


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


def test_device_keys_file(tmp_path: Path) -> None:
    # Two clients on one folder: neither key is lost, and each read sees
    # the latest (another client may have used and replaced a key).
    first, second = DeviceKeys(tmp_path), DeviceKeys(tmp_path)
    first.put("http://route:8083", "alice", 1, "web-a", "key-a")
    second.put("http://route:8083/", "bob", 2, "web-b", "key-b")
    assert first.get("http://route:8083", "BOB") == HeldDeviceKey(2, "web-b", "key-b")
    second.put("http://route:8083", "alice", 1, "web-a", "key-a2")
    assert first.get("http://route:8083", "alice") == HeldDeviceKey(
        1, "web-a", "key-a2"
    )
    assert "key-a2" not in repr(first.get("http://route:8083", "alice"))
    path = tmp_path / "device-keys.json"
    assert path.stat().st_mode & 0o077 == 0
    # Forgetting one keeps the other; in memory without a folder.
    first.drop("http://route:8083", "alice")
    assert DeviceKeys(tmp_path).get("http://route:8083", "alice") is None
    assert DeviceKeys(tmp_path).get("http://route:8083", "bob") is not None
    memory = DeviceKeys(None)
    memory.put("http://route:8083", "carol", 3, "d", "k")
    assert memory.get("http://route:8083", "carol") == HeldDeviceKey(3, "d", "k")
    memory.drop("http://route:8083", "carol")
    assert memory.get("http://route:8083", "carol") is None
    # A damaged file is as good as none.
    path.write_text("{not json")
    assert DeviceKeys(tmp_path).get("http://route:8083", "bob") is None
    path.write_text('{"routes": {"http://route:8083": {"bob": {"userId": "2"}}}}')
    assert DeviceKeys(tmp_path).get("http://route:8083", "bob") is None
