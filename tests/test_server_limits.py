"""
The IM server's limits against one user harming others (issue 13), in
memory on L{tests.serverkit}: acknowledgements only of what a connection
was sent, a failed login that releases its session, texts per batch, the
rate limit in messages, the senders' quota, sessions that expire unless
the server renews them, and the output a connection may leave unread.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure

from cim import loglines
from cim.interfaces import ConversationState, StoreError
from cim.message import Command, Cursor, ErrorCode, Frame, Position, pair_conversation
from cim.server import core
from cim.server.protocol import ClientConnectionProtocol
from cim.store.memory import MemoryStore
from tests.serverkit import Peer, World

# Acknowledgements


def test_acks_only_of_own_conversations_and_what_was_sent() -> None:
    world = World()
    alice_peer, alice = world.login("alice")
    bob_peer, bob = world.login("bob")
    for text in ("m1", "m2"):
        alice_peer.send(Frame(cmd=Command.MESSAGE, req_msg=text, receive_user_id=bob))
    assert len(bob_peer.messages()) == 2
    ours = pair_conversation(alice, bob)
    epoch = world.result(world.store.epochs([ours]))[ours].id  # type: ignore[index]
    bob_peer.send(
        Frame(
            cmd=Command.ACK,
            cursors=[
                Cursor("p:998:999", 1, epoch),  # someone else's conversation
                Cursor(ours, 2**63 - 1, epoch),  # beyond what bob was sent
                Cursor(ours, 2, "another"),  # not the stream's epoch
                Cursor(ours, 2),  # no epoch
                Cursor("g:made-up", 1),  # not a group of bob's
                *[Cursor(f"g:x{i}", 5) for i in range(1000)],
                Cursor("all", 3),  # the broadcast conversation: no cursor
            ],
        )
    )
    assert world.server.m_acks_ignored.value == 1005
    assert not bob_peer.closed
    world.clock.advance(10)
    assert world.result(world.store.get_cursors(bob)) == {}
    # What bob was sent may be acknowledged, in the stream's epoch.
    bob_peer.send(Frame(cmd=Command.ACK, cursors=[Cursor(ours, 2, epoch)]))
    world.clock.advance(10)
    assert world.result(world.store.get_cursors(bob)) == {ours: Position(epoch, 2)}
    # and bob still logs in, and resumes after it.
    bob_peer.lose()
    alice_peer.send(Frame(cmd=Command.MESSAGE, req_msg="m3", receive_user_id=bob))
    again, _ = world.login("bob", user_id=bob)
    assert [m.text for m in again.messages()] == ["m3"]


class FailingCursors(MemoryStore):
    """
    A memory store whose cursor reads fail while C{failing} (but for the
    next C{reads_to_pass} login reads).
    """

    failing = False
    reads_to_pass = 0

    def get_cursors(
        self, user_id: int, device: str = ""
    ) -> Deferred[dict[str, Position]]:
        if self.failing:
            return fail(StoreError("Redis HGETALL failed"))
        return super().get_cursors(user_id, device)

    def login_reads(
        self, user_id: int, device: str = ""
    ) -> Deferred[tuple[list[ConversationState], dict[str, Position]]]:
        if self.reads_to_pass:
            self.reads_to_pass -= 1
        elif self.failing:
            return fail(StoreError("Redis EVALSHA failed"))
        return super().login_reads(user_id, device)


def test_a_login_failing_after_activation_releases_the_session() -> None:
    """
    A login that replaces its device's connection here reads where it
    resumes once that one's cursors are saved (not with the activation,
    L{IStore.token_login}): when that read fails, the session it activated
    is released.
    """
    world = World(store=FailingCursors(Clock()))
    store = world.store
    assert isinstance(store, FailingCursors)
    bob = world.account("bob")
    first, _ = world.login("bob", user_id=bob)
    # The activation's reads pass, the second read fails.
    store.failing = True
    store.reads_to_pass = 1
    peer = Peer(world.server)
    peer.send(
        Frame(
            cmd=Command.LOGIN_REQUEST,
            request_id=bob,
            req_msg="bob",
            token=world.token(bob, "bob"),
        )
    )
    assert [f.cmd for f in first.received()] == [Command.KICK]
    peer_frames = peer.received()
    assert [f.cmd for f in peer_frames] == [Command.ERROR]
    assert peer_frames[0].error_code == ErrorCode.STORE_ERROR
    assert peer.closed
    # No ghost: nobody online, the session is free for the next login.
    assert world.result(store.online_users()) == []
    assert world.result(store.get_session(bob)) is None
    store.failing = False
    world.login("bob", user_id=bob)
    assert world.result(store.online_users()) == [(bob, "bob")]


class ReleasesFail(MemoryStore):
    """
    A memory store whose session releases fail (the store went away) while
    C{failing}, with C{error}.
    """

    failing = False
    error: Exception = StoreError("Redis script failed: Lost connection")

    def release_session(
        self, user_id: int, session_id: str, device: str = ""
    ) -> Deferred[bool]:
        if self.failing:
            return fail(self.error)
        return super().release_session(user_id, session_id, device)


def test_failed_releases_are_reported_once_a_burst() -> None:
    """
    When the store goes away, every connection closing meanwhile fails to
    release its session: the first failure is one line, without a
    traceback, and how many more failed is another, C{window} seconds
    later; then the next burst starts afresh.  The sessions stay in the
    store (they end with their time to live).
    """
    world = World(store=ReleasesFail(Clock()))
    store: ReleasesFail = world.store  # type: ignore[assignment]
    peers = [world.login(f"u{i}")[0] for i in range(4)]
    # (The logins' lines written: L{cim.loglines}.)
    world.clock.advance(loglines.WINDOW)
    store.failing = True
    with capturedLogs() as events:
        for peer in peers[:3]:
            peer.lose()
        world.clock.advance(core.RELEASE_REPORT_WINDOW)
        peers[3].lose()
    lines = [formatEvent(e) for e in events]
    assert [e["log_level"] for e in events] == [LogLevel.warn] * 3
    assert not any(e.get("log_failure") for e in events)
    assert lines[0] == (
        "Releasing the sessions of closed connections failed (1 first): "
        "Redis script failed: Lost connection; those sessions end in 90 s, "
        "or when this server starts again"
    )
    assert lines[1] == (
        "Releasing the sessions of closed connections failed 2 more times "
        "(the last: Redis script failed: Lost connection)"
    )
    assert lines[2].startswith(
        "Releasing the sessions of closed connections failed (4 first)"
    )
    # Left in the store, connected: they end with their time to live.
    assert len(world.result(store.online_users())) == 4  # type: ignore[arg-type]
    # Nothing more to report.
    with capturedLogs() as events:
        world.server.report_failures()
    assert events == []


def test_a_release_failing_for_another_reason_is_logged_with_its_traceback() -> None:
    world = World(store=ReleasesFail(Clock()))
    store: ReleasesFail = world.store  # type: ignore[assignment]
    peer, user_id = world.login("alice")
    store.failing = True
    store.error = ValueError("a bug")
    with capturedLogs() as events:
        peer.lose()
    [event] = events
    assert event["log_level"] == LogLevel.critical
    assert event["log_failure"].check(ValueError)
    assert formatEvent(event) == f"Releasing {user_id} failed"


def test_a_stopping_daemon_reports_the_failed_releases_counted_so_far() -> None:
    """
    A daemon stops before the report of a burst's count is due: its stop
    reports it (L{IMServer.report_failures}), once.
    """
    world = World(store=ReleasesFail(Clock()))
    store: ReleasesFail = world.store  # type: ignore[assignment]
    peers = [world.login(f"u{i}")[0] for i in range(3)]
    world.clock.advance(loglines.WINDOW)  # (the logins' lines written)
    store.failing = True
    with capturedLogs() as events:
        for peer in peers:
            peer.lose()
        world.server.stop()
        assert len(events) == 1
        world.server.report_failures()
    assert [formatEvent(e) for e in events][1:] == [
        "Releasing the sessions of closed connections failed 2 more times "
        "(the last: Redis script failed: Lost connection)"
    ]
    # Nothing more later.
    with capturedLogs() as events:
        world.clock.advance(core.RELEASE_REPORT_WINDOW)
        world.server.report_failures()
    assert events == []


@pytest_twisted.ensureDeferred
async def test_the_server_service_reports_the_failed_releases_last() -> None:
    from twisted.internet import reactor

    from cim.registry.local import LocalBoard, LocalRegistry
    from cim.server.service import IMServerService, ServerConfig

    store = ReleasesFail(Clock())
    config = ServerConfig(port=0, http_port=0, bind="127.0.0.1", secret="s")
    service = IMServerService(
        reactor, config, lambda: succeed(store), LocalRegistry(LocalBoard()),
        own_store=False,
    )  # fmt: skip
    service.startService()
    await service.ready
    assert service.server is not None
    failure = Failure(StoreError("Redis script failed: Lost connection"))
    with capturedLogs() as events:
        for user_id in (1, 2, 3):
            service.server._release_failed(failure, user_id)
        await service.stopService()
    reports = [formatEvent(e) for e in events if "Releasing" in formatEvent(e)]
    assert reports[1:] == [
        "Releasing the sessions of closed connections failed 2 more times "
        "(the last: Redis script failed: Lost connection)"
    ]


# What one send may store


def send(peer: Peer, receiver: int, texts: list[str], cmid: str = "") -> None:
    peer.send(
        Frame(
            cmd=Command.MESSAGE,
            receive_user_id=receiver,
            batch=tuple(texts),
            client_msg_id=cmid,
        )
    )


def test_batch_over_the_limit_is_refused() -> None:
    world = World(max_batch=5)
    alice_peer, alice = world.login("alice")
    bob_peer, bob = world.login("bob")
    send(alice_peer, bob, [f"t{i}" for i in range(6)], "big")
    [error] = alice_peer.received()
    assert error.cmd == Command.ERROR
    assert error.error_code == ErrorCode.INVALID_ARGUMENT
    assert "at most 5 texts" in error.error_reason
    assert error.client_msg_id == "big"
    assert not alice_peer.closed
    assert bob_peer.messages() == []
    conversation = pair_conversation(alice, bob)
    assert world.result(world.store.read(conversation, 0, 100)) == []
    # A batch within the limit goes through.
    send(alice_peer, bob, [f"t{i}" for i in range(5)], "ok")
    assert [f.cmd for f in alice_peer.received()] == [
        Command.ACK,
        Command.MESSAGE,  # alice's own (the conversation begins at 0)
    ]
    assert len(bob_peer.messages()) == 5


def test_rate_limit_counts_messages() -> None:
    world = World(rate=10.0, max_batch=100)
    alice_peer, _ = world.login("alice")
    bob_peer, bob = world.login("bob")
    # A burst of twice the rate: 20 messages (the login frame was one).
    send(alice_peer, bob, [f"a{i}" for i in range(10)])
    send(alice_peer, bob, [f"b{i}" for i in range(9)])
    assert not alice_peer.closed
    assert len(bob_peer.messages()) == 19
    # One more message is over it, even in one frame.
    send(alice_peer, bob, ["c"])
    frames = alice_peer.received()
    assert frames[-1].cmd == Command.ERROR
    assert frames[-1].error_code == ErrorCode.RATE_LIMITED
    assert alice_peer.closed
    # One big frame is over it at once.
    carol_peer, _ = world.login("carol")
    world.clock.advance(5)
    send(carol_peer, bob, [f"d{i}" for i in range(21)])
    assert carol_peer.received()[-1].error_code == ErrorCode.RATE_LIMITED
    assert carol_peer.closed


def test_sender_quota_refuses_with_6000_and_the_sender_chats_on() -> None:
    world = World()
    world.store.retention = replace(world.store.retention, sender_quota=3)
    alice_peer, _ = world.login("alice")
    bob_peer, bob = world.login("bob")
    carol_peer, carol = world.login("carol")
    send(alice_peer, bob, ["1", "2"], "s1")
    send(alice_peer, bob, ["3", "4"], "s2")  # "4" is over: 4 of 3
    frames = [f for f in alice_peer.received() if f.cmd != Command.EPOCH]
    # (Alice gets her own messages too; the "3" stored before the quota ran
    # out is delivered all the same.)
    assert [f.cmd for f in frames] == [
        Command.ACK,
        Command.MESSAGE,
        Command.ERROR,
        Command.MESSAGE,
    ]
    assert [m.text for f in frames for m in f.messages] == ["1", "2", "3"]
    frames = [f for f in frames if f.cmd != Command.MESSAGE]
    assert frames[1].error_code == ErrorCode.RATE_LIMITED
    assert frames[1].client_msg_id == "s2"
    assert "quota" in frames[1].error_reason
    assert not alice_peer.closed
    assert [m.text for m in bob_peer.messages()] == ["1", "2", "3"]
    # Nothing more to bob; other conversations and senders go on.
    send(alice_peer, bob, ["5"], "s3")
    send(alice_peer, carol, ["hi carol"], "s4")
    assert [f.cmd for f in alice_peer.received() if f.cmd != Command.MESSAGE] == [
        Command.ERROR,
        Command.ACK,  # (the conversation with carol begins at 0: no EPOCH)
    ]
    send(carol_peer, bob, ["from carol"], "c1")
    assert [m.text for m in bob_peer.messages()] == ["from carol"]
    # (Carol gets her own message to bob too.)
    assert [m.text for m in carol_peer.messages()] == ["hi carol", "from carol"]


# Sessions


def test_the_sweep_renews_sessions_in_one_call() -> None:
    world = World(session_ttl=9.0)
    calls: list[int] = []
    renew = world.store.renew_sessions

    def counting(server: str, sessions: Any, ttl: float) -> Any:
        calls.append(len(sessions))
        return renew(server, sessions, ttl)

    world.store.renew_sessions = counting  # type: ignore[method-assign]
    alice_peer, alice = world.login("alice")
    bob_peer, bob = world.login("bob")
    # Kept alive by heartbeats and renewals far past the ttl.
    for _ in range(20):
        world.clock.advance(1)
        alice_peer.send(Frame(cmd=Command.PING))
        bob_peer.send(Frame(cmd=Command.PING))
    assert calls and set(calls) == {2}
    assert len(calls) <= 20 / 3 + 1
    assert world.result(world.store.online_users()) == [(alice, "alice"), (bob, "bob")]
    # A newer login elsewhere replaced bob's session: the renewal closes him
    # here, without releasing the newer session.
    newer, _ = world.result(  # type: ignore[misc]
        world.store.claim_session(bob, "bob", "10.0.0.9:1:2", 60.0, replace=True)
    )
    for _ in range(4):
        world.clock.advance(1)
        alice_peer.send(Frame(cmd=Command.PING))
    assert bob_peer.closed
    assert not alice_peer.closed
    session = world.result(world.store.get_session(bob))
    assert session == newer  # type: ignore[comparison-overlap]


class GatedStore(MemoryStore):
    """
    A memory store whose session renewals and cursor saves wait, each,
    until the test answers or fails it (L{answer}, L{fail_next}).
    """

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.waiting: list[tuple[str, Any, Deferred[Any], Any]] = []

    def renew_sessions(self, server: str, sessions: Any, ttl: float) -> Deferred:  # type: ignore[override]
        d: Deferred[Any] = Deferred()
        real = super().renew_sessions
        self.waiting.append(
            ("renew", list(sessions), d, lambda: real(server, sessions, ttl))
        )
        return d

    def set_many_cursors(self, cursors: Any) -> Deferred:  # type: ignore[override]
        d: Deferred[Any] = Deferred()
        real = super().set_many_cursors
        self.waiting.append(("cursors", dict(cursors), d, lambda: real(cursors)))
        return d

    def answer(self) -> Any:
        """
        Let the first waiting call through; @return: what it was given.
        """
        _, given, d, real = self.waiting.pop(0)
        real().chainDeferred(d)
        return given

    def fail_next(self) -> None:
        self.waiting.pop(0)[2].errback(StoreError("Redis is away"))


def logged_in(world: World, count: int) -> dict[str, Peer]:
    """
    C{count} users logged in, by their sessions' ids.
    """
    peers = {}
    for n in range(count):
        peer, user_id = world.login(f"user{n}")
        conn = world.server.connection(user_id)
        assert conn is not None
        peers[conn.session_id] = peer
    return peers


def test_the_sweep_renews_sessions_in_batches_one_after_another() -> None:
    world = World(session_ttl=9.0, store_batch=2, store_class=GatedStore)
    store = world.store
    assert isinstance(store, GatedStore)
    sessions = logged_in(world, 5)
    world.clock.advance(3)  # a third of the sessions' time to live
    batches = []
    while store.waiting:
        # One call at a time: the next once the one before answered.
        assert [name for name, *_ in store.waiting] == ["renew"]
        batches.append([held.session_id for held in store.answer()])
    assert [len(batch) for batch in batches] == [2, 2, 1]
    assert sorted(sum(batches, [])) == sorted(sessions)


def test_a_failed_renewal_leaves_the_next_batches_to_the_next_renewal() -> None:
    world = World(session_ttl=9.0, store_batch=2, store_class=GatedStore)
    store = world.store
    assert isinstance(store, GatedStore)
    sessions = logged_in(world, 5)
    # A newer login elsewhere replaced the first batch's first session.
    world.clock.advance(3)
    first = store.waiting[0][1][0]
    world.result(
        world.store.claim_session(
            first.user_id, first.user_name, "10.0.0.9:1:2", 60.0, replace=True
        )
    )
    store.answer()
    # The first batch's answer was acted on as it came.
    assert sessions[first.session_id].closed
    with capturedLogs() as events:
        store.fail_next()
    # The third batch waits for the next renewal.
    assert store.waiting == []
    [failure] = [e for e in events if e.get("log_failure")]
    assert "Renewing the sessions of 3 devices failed" in formatEvent(failure)
    world.clock.advance(3)
    renewed = []
    while store.waiting:
        renewed += [held.session_id for held in store.answer()]
    assert sorted(renewed) == sorted(s for s in sessions if s != first.session_id)


def test_the_sweep_saves_cursors_in_batches_one_after_another() -> None:
    world = World(store_batch=2, store_class=GatedStore)
    store = world.store
    assert isinstance(store, GatedStore)
    alice_peer, alice = world.login("alice")
    receivers = [world.login(f"user{n}", device="phone") for n in range(5)]
    acked: dict[int, Cursor] = {}
    for peer, uid in receivers:
        alice_peer.send(Frame(cmd=Command.MESSAGE, req_msg="m", receive_user_id=uid))
        [message] = peer.messages()
        acked[uid] = Cursor(message.conversation, message.seq, message.epoch)
        peer.send(Frame(cmd=Command.ACK, cursors=[acked[uid]]))
    world.clock.advance(4)  # a sweep
    saves = [name for name, *_ in store.waiting]
    assert saves == ["cursors"]
    first = set(store.answer())
    assert len(first) == 2
    # The second batch failed: its devices' cursors are saved again at the
    # next sweep, with the third batch's, which was not asked meanwhile.
    assert len(store.waiting) == 1
    second = set(store.waiting[0][1])
    with capturedLogs() as events:
        store.fail_next()
    assert store.waiting == []
    assert any(
        "Saving the cursors of 2 devices failed" in formatEvent(e) for e in events
    )
    world.clock.advance(4)
    later: set[tuple[int, str]] = set()
    while store.waiting:
        assert len(store.waiting) == 1
        later |= set(store.answer())
    assert second <= later and not first & later
    assert {uid for uid, _ in first | later} == set(acked)
    for uid, cursor in acked.items():
        assert world.result(world.store.get_cursors(uid, "phone")) == {
            cursor.conversation: Position(cursor.epoch, cursor.seq)
        }


def test_a_server_that_stops_renewing_leaves_no_session_online() -> None:
    world = World(session_ttl=9.0)
    world.login("alice")
    # As if killed: its sweep stops, nothing is released.
    world.server._sweeper.stop()
    world.clock.advance(10)
    assert world.result(world.store.online_users()) == []


@pytest_twisted.ensureDeferred
async def test_a_server_starting_drops_the_sessions_of_its_earlier_run() -> None:
    from cim.registry.local import LocalBoard, LocalRegistry
    from cim.server.service import IMServerService, ServerConfig

    clock = Clock()
    store = MemoryStore(clock)
    from twisted.internet import reactor

    config = ServerConfig(port=0, http_port=0, bind="127.0.0.1", secret="s")
    first = IMServerService(
        reactor,
        config,
        lambda: succeed(store),
        LocalRegistry(LocalBoard()),
        own_store=False,
    )
    first.startService()
    await first.ready
    address = str(first.address)
    await first.stopService()
    # The sessions of a server killed without releasing them...
    session, _ = await store.claim_session(7, "ghost", address, 60.0)
    assert await store.activate_session(7, session.session_id, 90.0)
    assert await store.online_users() == [(7, "ghost")]
    # ...are dropped when it starts again on the same address.
    again_config = replace(
        config, port=first.address.port, http_port=first.address.http_port
    )
    again = IMServerService(
        reactor,
        again_config,
        lambda: succeed(store),
        LocalRegistry(LocalBoard()),
        own_store=False,
    )
    again.startService()
    await again.ready
    try:
        assert str(again.address) == address
        assert await store.online_users() == []
        assert await store.get_session(7) is None
    finally:
        await again.stopService()


# What the server buffers for a client that does not read


def flood(world: World, sender: Peer, receiver: int, count: int) -> None:
    for i in range(count):
        send(sender, receiver, ["x" * 1000 + str(i)])
        world.clock.advance(0.01)


def test_a_client_that_does_not_read_is_dropped() -> None:
    world = World()
    alice_peer, _ = world.login("alice")
    bob_peer = Peer(world.server, max_output=64 * 1024)
    bob = world.account("bob")
    # (Their conversation exists before bob logs in.)
    send(alice_peer, bob, ["first"])
    bob_peer.send(
        Frame(
            cmd=Command.LOGIN_REQUEST,
            request_id=bob,
            req_msg="bob",
            token=world.token(bob, "bob"),
        )
    )
    # The transport's buffer is full: it paused its producer (and tells it
    # again at every write, as TCP transports do).
    producer = bob_peer.transport.producer
    producer.pauseProducing()
    write = bob_peer.transport.write

    def full(data: bytes) -> None:
        write(data)
        producer.pauseProducing()

    bob_peer.transport.write = full  # type: ignore[method-assign]
    flood(world, alice_peer, bob, 60)
    assert not bob_peer.transport.disconnected
    flood(world, alice_peer, bob, 10)
    assert bob_peer.transport.disconnected  # aborted, not closed in order
    assert world.server.m_overflows.value == 1
    bob_peer.lose()
    # The sender chats on; bob's messages stay stored, and he gets them all
    # at his next login.
    assert not alice_peer.closed
    assert world.result(world.store.online_users()) == [
        (alice_peer.protocol.conn.user_id, "alice")
    ]
    again, _ = world.login("bob", user_id=bob)
    assert len(again.messages()) == 71


class SmallBuffer(StringTransport):
    """
    A transport that pauses its producer when more than C{size} bytes wait,
    as a TCP transport does; L{read} takes them and resumes it.
    """

    size = 100_000

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.value()) > self.size and self.producer is not None:
            # Again at each write while full, as FileDescriptor does.
            self.paused = True
            self.producer.pauseProducing()

    def read(self) -> None:
        self.clear()
        if getattr(self, "paused", False):
            self.paused = False
            self.producer.resumeProducing()


def slow_peer(world: World, user_id: int, name: str) -> Peer:
    """
    A peer logged in as C{user_id} over a L{SmallBuffer}.
    """
    peer = Peer.__new__(Peer)
    peer.protocol = ClientConnectionProtocol(world.server, 64 * 1024)
    peer.transport = SmallBuffer(peerAddress=IPv4Address("TCP", "10.1.1.2", 5000))
    peer.protocol.makeConnection(peer.transport)
    peer.backlog = []
    peer.send(
        Frame(
            cmd=Command.LOGIN_REQUEST,
            request_id=user_id,
            req_msg=name,
            token=world.token(user_id, name),
        )
    )
    return peer


def test_a_replay_reads_no_more_than_the_client_takes() -> None:
    world = World()
    alice_peer, _ = world.login("alice")
    bob = world.account("bob")
    for i in range(10):
        send(alice_peer, bob, [f"m{i}.{j}" + "x" * 500 for j in range(100)])
        world.clock.advance(1)
    reads = world.store.read
    calls = []

    def counting(*args: Any) -> Any:
        calls.append(args)
        return reads(*args)

    world.store.read = counting  # type: ignore[method-assign]
    peer = slow_peer(world, bob, "bob")
    transport = peer.transport
    assert isinstance(transport, SmallBuffer)
    # One page (over 100 KB) fills the buffer: no more is read meanwhile.
    assert len(calls) == 1
    world.clock.advance(5)
    assert len(calls) == 1
    got = 0
    while got < 1000:
        got += len(peer.messages())
        transport.read()
    assert got == 1000
    assert len(calls) == 6  # five pages, and the empty one after
    # A client that stops reading in a replay is closed after a while.
    peer.lose()
    again = slow_peer(world, bob, "bob")
    world.clock.advance(29)
    assert not again.closed
    world.clock.advance(2)
    assert again.closed


# Options


@pytest.mark.parametrize("module", ["cim.server.tap", "cim.standalone"])
def test_limit_options(module: str) -> None:
    import importlib

    from twisted.python import usage

    options_class = importlib.import_module(module).Options
    defaults = options_class()
    defaults.parseOptions(["--secret", "a-long-secret"])
    assert (
        defaults["max-batch"],
        defaults["sender-quota"],
        defaults["max-output"],
        defaults["session-ttl"],
        defaults["store-batch"],
    ) == (100, 5000, 4 * 1024 * 1024, 90.0, 250)
    given = options_class()
    given.parseOptions(
        ["--secret", "a-long-secret", "--max-batch", "10", "--sender-quota", "0",
         "--max-output", "65536", "--session-ttl", "2.5", "--store-batch", "1"]
    )  # fmt: skip
    assert (
        given["max-batch"],
        given["sender-quota"],
        given["max-output"],
        given["session-ttl"],
        given["store-batch"],
    ) == (10, 0, 65536, 2.5, 1)
    for args, complaint in [
        (["--max-batch", "0"], "--max-batch must be between 1 and 100,000"),
        (["--max-batch", "ten"], "--max-batch must be an integer"),
        (["--sender-quota", "-1"], "--sender-quota must be between 0"),
        (["--max-output", "1000"], "--max-output must be between 65,536"),
        (["--session-ttl", "1"], "--session-ttl must be at least 2 seconds"),
        (["--session-ttl", "x"], "--session-ttl must be a number"),
        (["--store-batch", "0"], "--store-batch must be between 1 and 100,000"),
    ]:
        with pytest.raises(usage.UsageError, match=complaint):
            options_class().parseOptions(["--secret", "a-long-secret", *args])


def test_options_reach_the_server() -> None:
    from cim.server import tap

    options = tap.Options()
    options.parseOptions(
        ["--secret", "a-long-secret", "--max-batch", "7", "--sender-quota", "9",
         "--max-output", "70000", "--session-ttl", "12", "--store-batch", "40"]
    )  # fmt: skip
    config = tap.config_from(options)
    assert (
        config.max_batch,
        config.sender_quota,
        config.max_output,
        config.session_ttl,
        config.store_batch,
    ) == (7, 9, 70000, 12.0, 40)
