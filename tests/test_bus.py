"""
The message bus between cim processes (L{cim.bus}) in memory: the memory
bus, the pusher's batching, order and encoding, and an IM server's handling
of payloads and of a lost subscription.  (The Redis bus:
C{tests/test_bus_integration.py}.)
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from cim import codec
from cim.bus import BusPusher, BusReceiver, MemoryBus, MemoryHub, decode_feed
from cim.interfaces import BusError, IBus, IPusher
from cim.message import ChatMessage, Command, Frame, pair_conversation
from cim.pushapi import ReadEvent, push_request
from cim.server.core import IMServer
from cim.sim.net import HeapClock, Network
from tests.serverkit import HERE, THERE, Peer, World


def message(seq: int, text: str = "hi", conversation: str = "p:1:2") -> ChatMessage:
    return ChatMessage(
        msg_id=1000 + seq,
        conversation=conversation,
        seq=seq,
        sender_id=1,
        sender_name="alice",
        text=text,
        timestamp=1_700_000_000_000 + seq,
        client_msg_id=f"c{seq}",
        receive_user_id=2,
        epoch="e1",
    )


# The memory bus


def test_memory_bus_provides_the_interface() -> None:
    assert verifyObject(IBus, MemoryBus(Clock()))


def test_a_publish_nobody_holds_reaches_nobody() -> None:
    bus = MemoryBus(Clock())
    reached: list[int] = []
    bus.publish("s1", b"x").addCallback(reached.append)
    assert reached == [0]


def test_payloads_arrive_later_in_order_never_within_publish() -> None:
    clock = Clock()
    hub = MemoryHub()
    got: list[bytes] = []
    made: list[str] = []
    subscribed = hub.bus(clock).subscribe("s1", got.append, lambda: made.append("s"))
    assert made == [] and not subscribed.called
    clock.advance(0)
    assert made == ["s"] and subscribed.called
    publisher = hub.bus(clock)
    counts: list[int] = []
    for payload in (b"a", b"b", b"c"):
        publisher.publish("s1", payload).addCallback(counts.append)
    assert counts == [1, 1, 1]
    assert got == []
    clock.advance(0)
    assert got == [b"a", b"b", b"c"]
    # Another server's channel hears nothing of it.
    assert publisher.publish("s2", b"d").result == 0


def test_every_subscriber_of_a_channel_gets_a_payload() -> None:
    clock = Clock()
    hub = MemoryHub()
    first: list[bytes] = []
    second: list[bytes] = []
    hub.bus(clock).subscribe("s1", first.append, lambda: None)
    hub.bus(clock).subscribe("s1", second.append, lambda: None)
    assert hub.bus(clock).publish("s1", b"x").result == 2
    clock.advance(0)
    assert first == second == [b"x"]


def test_an_interrupted_subscription_loses_what_is_published_meanwhile() -> None:
    clock = Clock()
    hub = MemoryHub()
    bus = hub.bus(clock)
    got: list[bytes] = []
    made: list[float] = []
    bus.subscribe("s1", got.append, lambda: made.append(clock.seconds()))
    clock.advance(0)
    publisher = hub.bus(clock)
    publisher.publish("s1", b"queued")
    bus.interrupt(5.0)
    assert publisher.publish("s1", b"lost").result == 0
    clock.advance(5.0)
    assert made == [0.0, 5.0]
    assert publisher.publish("s1", b"after").result == 1
    clock.advance(0)
    assert got == [b"after"]


def test_a_closed_bus_refuses_and_drops_its_subscriptions() -> None:
    clock = Clock()
    hub = MemoryHub()
    bus = hub.bus(clock)
    bus.subscribe("s1", lambda _: None, lambda: None)
    clock.advance(0)
    bus.close()
    failures: list[Failure] = []
    bus.publish("s1", b"x").addErrback(failures.append)
    assert failures and failures[0].check(BusError)
    bus.subscribe("s1", lambda _: None, lambda: None).addErrback(failures.append)
    assert len(failures) == 2
    assert hub.bus(clock).publish("s1", b"x").result == 0


def test_a_subscriber_that_raises_does_not_stop_the_next_payloads() -> None:
    clock = Clock()
    hub = MemoryHub()
    got: list[bytes] = []

    def receive(payload: bytes) -> None:
        if payload == b"bad":
            raise RuntimeError("boom")
        got.append(payload)

    hub.bus(clock).subscribe("s1", receive, lambda: None)
    clock.advance(0)
    publisher = hub.bus(clock)
    for payload in (b"bad", b"good"):
        publisher.publish("s1", payload)
    clock.advance(0)
    assert got == [b"good"]


def test_the_subscriber_of_a_crashed_simulated_process_is_gone() -> None:
    clock = HeapClock(0.0)
    net = Network(clock, random.Random(1))
    server = net.node("server", "10.0.0.1")
    hub = MemoryHub()
    hub.bus(server).subscribe("s1", lambda _: None, lambda: None)
    clock.advance(0)
    publisher = hub.bus(net.node("route", "10.0.0.2"))
    assert publisher.publish("s1", b"x").result == 1
    server.kill()
    assert publisher.publish("s1", b"y").result == 0


# The payload


def test_a_push_payload_round_trips() -> None:
    items: list[Any] = [
        ([message(1), message(2, "second")], [2, 3]),
        (ReadEvent(2, "p:1:2", 2), [1]),
        ([], [4]),
    ]
    decoded = codec.decode_push(codec.encode_push(items))
    assert decoded == [
        ([message(1), message(2, "second")], [2, 3]),
        (ReadEvent(2, "p:1:2", 2), [1]),
        ([], [4]),
    ]


def test_a_malformed_push_payload_is_a_codec_error() -> None:
    with pytest.raises(codec.CodecError):
        codec.decode_push(b"\xff\xff\xff")


def test_a_pushed_message_costs_a_fraction_of_its_json_bytes() -> None:
    """
    One private message to one user: the bus's payload against the push
    API's JSON body (measured: 72 against 232 bytes).
    """
    items: list[Any] = [([message(7, "hello there, how are you?")], [2])]
    protobuf = len(codec.encode_push(items))
    as_json = len(json.dumps(push_request(items), separators=(",", ":")))
    assert protobuf * 2 < as_json, (protobuf, as_json)


# The pusher


@implementer(IBus)
class FakeBus:
    """
    Records publishes; each answers with the Deferred the test gives it (by
    default at once, one subscriber).
    """

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.answers: list[Deferred[int]] = []

    def publish(self, server: str, payload: bytes) -> Deferred[int]:
        self.published.append((server, payload))
        if self.answers:
            return self.answers.pop(0)
        return succeed(1)

    def subscribe(self, server: str, receive: Any, subscribed: Any) -> Deferred[None]:
        return succeed(None)

    def close(self) -> Deferred[None]:
        return succeed(None)

    def items(self, index: int) -> list[Any]:
        return codec.decode_push(self.published[index][1])


def outcomes(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_bus_pusher_provides_the_interface() -> None:
    assert verifyObject(IPusher, BusPusher(FakeBus(), Clock()))
    with pytest.raises(ValueError):
        BusPusher(FakeBus(), Clock(), max_items=0)


def test_pushes_of_one_turn_go_in_one_publish_per_server_in_order() -> None:
    clock = Clock()
    bus = FakeBus()
    pusher = BusPusher(bus, clock)
    first = outcomes(pusher.push("s1", [message(1)], [2]))
    read = outcomes(pusher.push_read("s1", 2, "p:1:2", 1, [1]))
    second = outcomes(pusher.push("s1", [message(2)], [2, 3]))
    other = outcomes(pusher.push("s2", [message(3)], [4]))
    assert bus.published == [] and first == []
    clock.advance(0)
    assert [server for server, _ in bus.published] == ["s1", "s2"]
    assert bus.items(0) == [
        ([message(1)], [2]),
        (ReadEvent(2, "p:1:2", 1), [1]),
        ([message(2)], [2, 3]),
    ]
    assert bus.items(1) == [([message(3)], [4])]
    assert first == read == second == other == [[]]
    assert pusher.publishes == 2
    assert pusher.bytes == sum(len(p) for _, p in bus.published)


def test_one_publish_per_server_in_flight_the_rest_goes_next_together() -> None:
    clock = Clock()
    bus = FakeBus()
    answer: Deferred[int] = Deferred()
    bus.answers.append(answer)
    pusher = BusPusher(bus, clock)
    first = outcomes(pusher.push("s1", [message(1)], [2]))
    clock.advance(0)
    later = [outcomes(pusher.push("s1", [message(i)], [2])) for i in (2, 3)]
    clock.advance(0)
    assert len(bus.published) == 1
    answer.callback(1)
    assert first == [[]]
    # What queued meanwhile left at once, in one publish.
    assert len(bus.published) == 2
    assert bus.items(1) == [([message(2)], [2]), ([message(3)], [2])]
    assert later == [[[]], [[]]]


def test_a_publish_nobody_received_reports_every_user_missing() -> None:
    clock = Clock()
    bus = FakeBus()
    bus.answers.append(succeed(0))
    pusher = BusPusher(bus, clock)
    pushed = outcomes(pusher.push("gone", [message(1)], [2, 3]))
    read = outcomes(pusher.push_read("gone", 2, "p:1:2", 1, [1]))
    clock.advance(0)
    assert pushed == [[2, 3]] and read == [[1]]


def test_a_failed_publish_fails_its_pushes_and_the_next_ones_still_go() -> None:
    clock = Clock()
    bus = FakeBus()
    answer: Deferred[int] = Deferred()
    bus.answers.append(answer)
    pusher = BusPusher(bus, clock)
    failed = outcomes(pusher.push("s1", [message(1)], [2]))
    clock.advance(0)
    queued = outcomes(pusher.push("s1", [message(2)], [2]))
    answer.errback(BusError("Redis is unreachable"))
    assert isinstance(failed[0], Failure) and failed[0].check(BusError)
    assert queued == [[]]
    assert bus.items(1) == [([message(2)], [2])]


def test_a_publish_that_raises_fails_its_pushes() -> None:
    class Raising(FakeBus):
        def publish(self, server: str, payload: bytes) -> Deferred[int]:
            raise BusError("closed")

    clock = Clock()
    pushed = outcomes(BusPusher(Raising(), clock).push("s1", [message(1)], [2]))
    clock.advance(0)
    assert isinstance(pushed[0], Failure) and pushed[0].check(BusError)


def test_max_items_splits_a_turn_into_publishes_in_order() -> None:
    clock = Clock()
    bus = FakeBus()
    pusher = BusPusher(bus, clock, max_items=2)
    for i in range(1, 6):
        pusher.push("s1", [message(i)], [2])
    clock.advance(0)
    sizes = [len(bus.items(i)) for i in range(len(bus.published))]
    assert sizes == [2, 2, 1]
    seqs = [m.seq for i in range(3) for what, _ in bus.items(i) for m in what]
    assert seqs == [1, 2, 3, 4, 5]


def test_failed_publishes_fail_over_the_memory_bus_too() -> None:
    clock = Clock()
    bus = MemoryBus(clock)
    bus.close()
    pushed = outcomes(BusPusher(bus, clock).push("s1", [message(1)], [2]))
    clock.advance(0)
    assert isinstance(pushed[0], Failure) and pushed[0].check(BusError)
    assert fail(BusError("x")).addErrback(lambda f: f.check(BusError)).result


# Two servers over the bus


class TwoServers:
    """
    L{World}'s server (here, pushing over a memory bus) and another server
    (there) on the same store and clock, subscribed to the bus as the
    service subscribes it.
    """

    def __init__(self) -> None:
        self.world = world = World()
        self.clock = world.clock
        self.hub = MemoryHub()
        self.here_bus = self.hub.bus(self.clock)
        world.server.delivery.pusher = BusPusher(self.here_bus, self.clock)
        self.there_bus = self.hub.bus(self.clock)
        self.there = IMServer(
            self.clock,
            world.store,
            THERE,
            BusPusher(self.there_bus, self.clock),
        )
        self.there.start()
        self.receiver = BusReceiver(
            self.there_bus,
            self.there.here,
            self.there,
            self.there.resync_all,
            self.there.metrics,
        )
        started = self.receiver.start()
        self.clock.advance(0)
        assert started.called

    def login_there(self, name: str) -> tuple[Peer, int]:
        world = self.world
        user_id = world.user(name)
        peer = Peer(self.there)
        peer.send(
            Frame(
                cmd=Command.LOGIN_REQUEST,
                request_id=user_id,
                req_msg=name,
                token=world.token(user_id, name, server=THERE),
            )
        )
        frames = peer.received()
        assert frames and frames[0].cmd == Command.LOGIN_RESPONSE, frames
        peer.backlog = frames[1:]
        return peer, user_id


def test_a_message_reaches_a_device_on_another_server_over_the_bus() -> None:
    servers = TwoServers()
    alice, _ = servers.world.login("alice")
    bob, bob_id = servers.login_there("bob")
    servers.world.send(alice, "hello", receiver=bob_id)
    assert bob.texts() == []
    servers.clock.advance(0)  # the pusher's turn
    servers.clock.advance(0)  # the bus's delivery
    assert bob.texts() == ["hello"]
    assert servers.receiver.m_received.value == 1


def test_a_malformed_payload_is_logged_and_dropped() -> None:
    servers = TwoServers()
    alice, _ = servers.world.login("alice")
    bob, bob_id = servers.login_there("bob")
    servers.hub.bus(servers.clock).publish(servers.there.here, b"\xff\xff\xff")
    servers.clock.advance(0)
    assert servers.receiver.m_malformed.value == 1
    assert not bob.closed
    servers.world.send(alice, "still here", receiver=bob_id)
    servers.clock.advance(0)
    servers.clock.advance(0)
    assert bob.texts() == ["still here"]


def test_an_item_whose_delivery_raises_does_not_stop_the_others() -> None:
    servers = TwoServers()
    bob, bob_id = servers.login_there("bob")
    calls: list[int] = []
    original = servers.there.deliver_read_local

    def broken(reader: int, conversation: str, seq: int, users: Any) -> list[int]:
        calls.append(reader)
        raise RuntimeError("boom")

    servers.there.deliver_read_local = broken  # type: ignore[method-assign]
    payload = codec.encode_push(
        [(ReadEvent(9, "p:2:9", 1), [bob_id]), ([message(1, "ok", "all")], [bob_id])]
    )
    servers.hub.bus(servers.clock).publish(servers.there.here, payload)
    servers.clock.advance(0)
    servers.there.deliver_read_local = original  # type: ignore[method-assign]
    assert calls == [9]
    assert bob.texts() == ["ok"]


def test_a_lost_subscription_resyncs_devices_and_shows_new_conversations() -> None:
    """
    Pushes lost while the server's subscription was away (a message of a
    conversation the device knew, and the first one of a conversation
    begun meanwhile) reach the device once the subscription is back.
    """
    servers = TwoServers()
    world = servers.world
    alice, alice_id = world.login("alice")
    carol, _ = world.login("carol")
    bob, bob_id = servers.login_there("bob")
    world.send(alice, "before", receiver=bob_id)
    servers.clock.advance(0)
    servers.clock.advance(0)
    assert bob.texts() == ["before"]

    servers.there_bus.interrupt(5.0)
    world.send(alice, "during", receiver=bob_id)
    world.send(carol, "a new conversation", receiver=bob_id)
    servers.clock.advance(1.0)
    assert bob.texts() == []
    servers.clock.advance(4.0)
    frames = bob.received()
    texts = [m.text for f in frames for m in f.messages]
    assert sorted(texts) == ["a new conversation", "during"]
    carol_pair = pair_conversation(world.user("carol"), bob_id)
    epochs = [
        c.conversation for f in frames if f.cmd == Command.EPOCH for c in f.cursors
    ]
    assert carol_pair in epochs
    assert servers.receiver.m_resyncs.value == 1

    # And live again.
    world.send(alice, "after", receiver=bob_id)
    servers.clock.advance(0)
    servers.clock.advance(0)
    assert bob.texts() == ["after"]
    assert pair_conversation(alice_id, bob_id) != carol_pair


def test_resync_all_counts_devices_and_waits_for_logins_in_progress() -> None:
    servers = TwoServers()
    bob, _ = servers.login_there("bob")
    assert servers.there.resync_all() == 1
    conn = next(iter(servers.there.logged_in()))
    conn.held = []  # as while its login reads where it starts
    assert servers.there.resync_all() == 1
    assert conn in servers.there._resync_after_login
    bob.lose()
    assert conn not in servers.there._resync_after_login
    assert HERE != THERE


# Options


@pytest.mark.parametrize("module", ["cim.server.tap", "cim.route.tap"])
def test_push_options_reach_the_config(module: str) -> None:
    import importlib

    from twisted.python import usage

    tap = importlib.import_module(module)
    defaults = tap.Options()
    defaults.parseOptions(["--secret", "a-long-secret"])
    config = tap.config_from(defaults)
    assert (config.push, config.push_timeout) == ("bus", 5.0)
    given = tap.Options()
    given.parseOptions(
        ["--secret", "a-long-secret", "--push", "http", "--push-timeout", "0.5"]
    )
    config = tap.config_from(given)
    assert (config.push, config.push_timeout) == ("http", 0.5)
    for args, complaint in [
        (["--push", "smoke"], "--push must be one of bus, http"),
        (["--push-timeout", "0"], "--push-timeout must be positive"),
        (["--push-timeout", "x"], "--push-timeout must be a number"),
    ]:
        with pytest.raises(usage.UsageError, match=complaint):
            tap.Options().parseOptions(["--secret", "a-long-secret", *args])


def test_open_bus_is_none_for_a_store_that_is_not_redis() -> None:
    from cim.bus import open_bus
    from cim.store.memory import MemoryStore

    assert open_bus(Clock(), MemoryStore(Clock())) is None


# The simulator


@pytest.mark.parametrize("seed", range(1, 13))
def test_the_simulated_cluster_pushes_over_the_memory_bus(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Seeds of the simulator with the servers pushing over the memory bus
    (500 seeds passed so; C{cim.sim.world.SERVER_PUSH}).
    """
    from cim.sim import world
    from cim.sim.run import run

    monkeypatch.setattr(world, "SERVER_PUSH", "bus")
    result = run(seed)
    assert result.ok, result.report()
    assert result.shown > 0


def test_a_device_logging_in_during_the_loss_is_caught_up_once_logged_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    Bob's login read his conversations before a push to him was lost; the
    subscription comes back while the login still waits: once logged in,
    he is caught up, and gets the message.
    """
    servers = TwoServers()
    world = servers.world
    alice, _ = world.login("alice")
    bob_id = world.user("bob")
    store = world.store
    stale = store.login_reads(bob_id).result
    reading: Deferred[Any] = Deferred()
    monkeypatch.setattr(store, "login_reads", lambda user_id, device="": reading)
    bob = Peer(servers.there)
    bob.send(
        Frame(
            cmd=Command.LOGIN_REQUEST,
            request_id=bob_id,
            req_msg="bob",
            token=world.token(bob_id, "bob", server=THERE),
        )
    )
    assert bob.received() == []  # logging in: its reads wait
    servers.there_bus.interrupt(1.0)
    world.send(alice, "lost while logging in", receiver=bob_id)
    servers.clock.advance(1.0)  # subscribed again: resync_all
    assert servers.receiver.m_resyncs.value == 1
    monkeypatch.undo()
    reading.callback(stale)  # what the login read, from before the message
    servers.clock.advance(0)
    frames = bob.received()
    assert frames[0].cmd == Command.LOGIN_RESPONSE
    assert [m.text for f in frames for m in f.messages] == ["lost while logging in"]


def test_a_device_whose_session_the_store_lost_is_caught_up_at_the_renewal() -> None:
    # While the store has lost Bob's session (an expiry, a restored copy),
    # a delivery finds him offline; his server's next renewal makes the
    # session again, and catches him up with what he missed.
    servers = TwoServers()
    alice, _ = servers.world.login("alice")
    bob, bob_id = servers.login_there("bob")
    servers.world.store._delete_session(bob_id, "")
    servers.world.send(alice, "while you were gone", receiver=bob_id)
    for _ in range(3):
        servers.clock.advance(0)
    assert bob.texts() == []
    # Both keep their heartbeats up until the server renews its sessions.
    for _ in range(12):
        servers.clock.advance(3)
        for peer in (alice, bob):
            peer.send(Frame(cmd=Command.PING))
    assert servers.world.store._session(bob_id, "") is not None
    assert bob.texts() == ["while you were gone"]


# The Redis store's group feed, as it reaches a server


def _feed(*lines: str) -> bytes:
    # A payload as append.lua publishes it.
    return "\n".join(["\0", *lines]).encode("utf-8")


def _member(msg_id: int, seq: int, text: str) -> str:
    return json.dumps(
        {"i": msg_id, "q": seq, "ts": 1000, "s": 7, "n": "x", "t": text, "g": "g1"},
        separators=(",", ":"),
    )


def test_a_group_feed_payload_decodes_in_runs_of_one_list_and_conversation() -> None:
    runs = decode_feed(
        _feed(
            "U1,2,3",
            "U4",
            "1\tg:g1\t" + _member(10, 1, "a\tb\nc"),
            "1\tg:g1\t" + _member(11, 2, "two"),
            "2\tg:g2\t" + _member(12, 1, "other"),
            "1\tg:g1\t" + _member(13, 3, "three"),
        )
    )
    assert [([m.text for m in ms], users) for ms, users in runs] == [
        (["a\tb\nc", "two"], [1, 2, 3]),
        (["other"], [4]),
        (["three"], [1, 2, 3]),
    ]
    assert [m.seq for m in runs[0][0]] == [1, 2]
    assert runs[0][0][0].conversation == "g:g1"
    assert runs[0][0][0].group_id == "g1"


@pytest.mark.parametrize(
    "payload",
    [
        b"\0\nU1\n3\tg:g1\t{}",
        b"\0\nU1\n1\tg:g1\tnot json",
        b"\0\nU1\n1 g:g1",
        b"\0\nU1\n1\tg:g1\t" + b'{"i":1}',
        b"\0\xff",
    ],
)
def test_a_malformed_group_feed_payload_is_a_value_error(payload: bytes) -> None:
    with pytest.raises(ValueError):
        decode_feed(payload)


def test_a_group_feed_reaches_the_members_held_there_and_a_bad_one_is_dropped() -> None:
    servers = TwoServers()
    bob, bob_id = servers.login_there("bob")
    servers.world.store.create_group("g1", bob_id)
    bus = servers.hub.bus(servers.clock)
    bus.publish(servers.there.here, b"\0\nU1\n1\tg:g1\tnope")
    bus.publish(
        servers.there.here,
        _feed(
            f"U{bob_id + 100},{bob_id}",
            "1\tg:g1\t" + _member(10, 1, "one"),
            "1\tg:g1\t" + _member(11, 2, "two"),
        ),
    )
    servers.clock.advance(0)
    assert servers.receiver.m_malformed.value == 1
    assert bob.texts() == ["one", "two"]


def test_the_memory_store_feeds_as_the_redis_store_does() -> None:
    """
    With a C{feed_bus}, the memory store's append publishes what it fed,
    in the order stored, to every server holding sessions (one payload
    per append); a retry's original is not published again, nor a
    message not fed.
    """
    from cim.interfaces import NewMessage
    from cim.store.memory import MemoryStore

    clock = Clock()
    store = MemoryStore(clock)
    hub = MemoryHub()
    assert not store.feeds
    store.feed_bus = hub.bus(clock)
    assert store.feeds
    got: list[bytes] = []
    hub.bus(clock).subscribe("s1", got.append, lambda: None)
    clock.advance(0)
    uid = store.register("alice").result.user_id
    store.claim_session(uid, "alice", "s1", 60)
    members = [uid, 99]
    first = NewMessage("g:g1", uid, "alice", "one", client_msg_id="c1", group_id="g1")
    second = NewMessage("g:g1", uid, "alice", "two", group_id="g1")
    private = NewMessage(pair_conversation(uid, 99), uid, "alice", "p")
    stored = store.append([first, private, second], feed=[members, None, members])
    store.append([first], feed=[members])
    clock.advance(0)
    [payload] = got
    [(messages, users)] = decode_feed(payload)
    assert messages == [stored.result[0], stored.result[2]]
    assert users == members
