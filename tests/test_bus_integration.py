"""
The message bus over the real Redis (L{cim.store.redis.bus}): publishing
and subscribing, a subscription that Redis drops (C{CLIENT KILL TYPE
pubsub}), and a cluster of one route and two IM servers pushing to each
other over it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredQueue
from zope.interface.verify import verifyObject

from cim.bus import BusPusher, decode_feed
from cim.client.library import Client
from cim.interfaces import BusError, IBus, NewMessage
from cim.message import pair_conversation
from cim.pusher import HttpPusher
from cim.route.service import RouteConfig, RouteService
from cim.server.service import IMServerService, ServerConfig
from cim.store import RedisAddress, parse_redis_url
from cim.store.redis.bus import RedisBus, bus_channel
from tests.clientkit import SECRET, take_messages
from tests.kit.wait import wait_until, within
from tests.test_client_integration import RealCluster

pytestmark = pytest.mark.integration


async def redis_command(reactor: Any, redis_url: str, *args: Any) -> Any:
    """
    Run one command on the test Redis, on a connection of its own.
    """
    from cim.store.redis import connect_redis

    store = await connect_redis(redis_url, clock=reactor)
    try:
        return await store._redis.execute_command(*args)
    finally:
        await store.close()


async def kill_subscribers(reactor: Any, redis_url: str) -> None:
    """
    Redis drops every subscribed connection (as it does one whose output
    buffer overflowed).
    """
    killed = await redis_command(reactor, redis_url, "CLIENT", "KILL", "TYPE", "pubsub")
    assert int(killed) >= 1


def hold_reconnection(bus: RedisBus, seconds: float) -> None:
    """
    Make C{bus}'s next attempt to connect again wait C{seconds}: what is
    published meanwhile is surely lost.
    """
    bus.retry = lambda attempt: seconds


# The bus alone


@pytest_twisted.ensureDeferred
async def test_publish_and_subscribe_in_order(reactor: Any, redis_url: str) -> None:
    address = parse_redis_url(redis_url)
    prefix = f"cimtest:{uuid.uuid4().hex}:"
    subscriber = RedisBus(reactor, address, prefix)
    publisher = RedisBus(reactor, address, prefix)
    others = [
        RedisBus(reactor, address, "other:"),
        RedisBus(
            reactor, RedisAddress(address.host, address.port, address.db + 1), prefix
        ),
    ]
    try:
        assert verifyObject(IBus, subscriber)
        # Nobody holds the channel yet (and the first publish waits for the
        # first connection).
        assert await within(reactor, publisher.publish("s1", b"x")) == 0
        got: DeferredQueue[bytes] = DeferredQueue()
        made: list[int] = []
        await within(
            reactor, subscriber.subscribe("s1", got.put, lambda: made.append(1))
        )
        assert made == [1]
        payloads = [b"\x00\xff binary", b"second", b"third" * 1000]
        counts = await within(
            reactor,
            Deferred.fromCoroutine(_publish_all(publisher, "s1", payloads)),
        )
        assert counts == [1, 1, 1]
        assert [await within(reactor, got.get()) for _ in payloads] == payloads
        # Another deployment (prefix, or database) on the same Redis hears
        # nothing of it.
        for other in others:
            assert await within(reactor, other.publish("s1", b"no")) == 0
        assert bus_channel(prefix, address.db, "s1") == subscriber.channel("s1")
    finally:
        for bus in (subscriber, publisher, *others):
            await bus.close()
    failures: list[Any] = []
    publisher.publish("s1", b"closed").addErrback(failures.append)
    assert failures and failures[0].check(BusError)


async def _publish_all(bus: RedisBus, server: str, payloads: list[bytes]) -> list[int]:
    # All at once: one connection keeps them in order.
    publishes = [bus.publish(server, p) for p in payloads]
    return [await d for d in publishes]


@pytest_twisted.ensureDeferred
async def test_a_dropped_subscription_is_made_again_and_told(
    reactor: Any, redis_url: str
) -> None:
    address = parse_redis_url(redis_url)
    prefix = f"cimtest:{uuid.uuid4().hex}:"
    subscriber = RedisBus(reactor, address, prefix)
    publisher = RedisBus(reactor, address, prefix)
    try:
        got: DeferredQueue[bytes] = DeferredQueue()
        made: list[int] = []
        await within(
            reactor, subscriber.subscribe("s1", got.put, lambda: made.append(1))
        )
        hold_reconnection(subscriber, 1.0)
        await kill_subscribers(reactor, redis_url)
        # Lost: nobody holds the channel until the subscription is back.
        assert await within(reactor, publisher.publish("s1", b"lost")) == 0
        await wait_until(reactor, lambda: len(made) == 2, "subscribed again")
        assert await within(reactor, publisher.publish("s1", b"back")) == 1
        assert await within(reactor, got.get()) == b"back"
    finally:
        await subscriber.close()
        await publisher.close()


@pytest_twisted.ensureDeferred
async def test_a_publish_fails_at_once_while_redis_is_away(
    reactor: Any, redis_url: str
) -> None:
    address = parse_redis_url(redis_url)
    bus = RedisBus(reactor, address, f"cimtest:{uuid.uuid4().hex}:", timeout=2.0)
    try:
        assert await within(reactor, bus.publish("s1", b"x")) == 0
        hold_reconnection(bus, 60.0)
        await redis_command(
            reactor, redis_url, "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"
        )
        await wait_until(reactor, lambda: bus._live is None, "the loss noticed")
        failures: list[Any] = []
        bus.publish("s1", b"y").addErrback(failures.append)
        assert failures and failures[0].check(BusError)
    finally:
        await bus.close()


@pytest_twisted.ensureDeferred
async def test_a_publish_redis_does_not_answer_in_time_fails(
    reactor: Any, redis_url: str
) -> None:
    """
    The time-out (C{--push-timeout}): Redis holds writes (C{CLIENT PAUSE
    WRITE} holds PUBLISH too); the publish fails, and the connection is
    made again.
    """
    address = parse_redis_url(redis_url)
    bus = RedisBus(reactor, address, f"cimtest:{uuid.uuid4().hex}:", timeout=0.3)
    try:
        assert await within(reactor, bus.publish("s1", b"x")) == 0
        first = bus._live
        await redis_command(reactor, redis_url, "CLIENT", "PAUSE", "1000", "WRITE")
        failures: list[Any] = []
        started = reactor.seconds()
        await within(reactor, bus.publish("s1", b"held").addErrback(failures.append))
        assert failures and failures[0].check(BusError)
        assert "did not answer" in failures[0].getErrorMessage()
        assert 0.25 <= reactor.seconds() - started < 1.0
        await wait_until(
            reactor, lambda: bus._live not in (None, first), "connected again"
        )
        await redis_command(reactor, redis_url, "CLIENT", "UNPAUSE")
        assert await within(reactor, bus.publish("s1", b"again")) == 0
    finally:
        await redis_command(reactor, redis_url, "CLIENT", "UNPAUSE")
        await bus.close()


@pytest_twisted.ensureDeferred
async def test_closing_while_subscribing_leaves_no_connection(
    reactor: Any, redis_url: str
) -> None:
    """
    Closed while Redis holds its SUBSCRIBE (C{CLIENT PAUSE}), the bus waits
    for the answer, then closes the connection (stopped in between, the
    reconnecting service would leave it open, subscribed).
    """
    address = parse_redis_url(redis_url)
    bus = RedisBus(reactor, address, f"cimtest:{uuid.uuid4().hex}:")
    channel = bus.channel("s1")
    await redis_command(reactor, redis_url, "CLIENT", "PAUSE", "500", "ALL")
    subscribed = bus.subscribe("s1", lambda _: None, lambda: None)
    subscribed.addErrback(lambda _: None)
    await wait_until(reactor, lambda: bus._subscribing is not None, "subscribing")
    await within(reactor, bus.close())
    numsub = await redis_command(reactor, redis_url, "PUBSUB", "NUMSUB", channel)
    assert int(numsub[1]) == 0


# A cluster


class BusCluster(RealCluster):
    """
    L{RealCluster} with the servers' and the route's C{push} option.
    """

    def __init__(
        self, *args: Any, push: str = "bus", broadcast_from: int | None = 32
    ) -> None:
        super().__init__(*args)
        self.push = push
        self.broadcast_from = broadcast_from

    async def start(self) -> None:
        store = await self._store()
        await store._redis.execute_command("FLUSHDB")
        await store.close()
        for _ in range(2):
            service = IMServerService(
                self.reactor,
                ServerConfig(
                    port=0,
                    http_port=0,
                    secret=SECRET,
                    push=self.push,
                    broadcast_from=self.broadcast_from,
                ),
                self._store,
                self._registry(),
            )
            self.servers.append(service)
            service.startService()
            await within(self.reactor, service.ready, 30)
        self.route = RouteService(
            self.reactor,
            RouteConfig(
                port=0,
                bind="127.0.0.1",
                secret=SECRET,
                balancer="round-robin",
                push=self.push,
            ),
            self._store,
            self._registry(),
        )
        self.route.startService()
        await within(self.reactor, self.route.ready, 30)
        route = self.route
        await wait_until(
            self.reactor,
            lambda: len(route.registry.servers()) == 2,
            "the route to see both servers",
        )


@pytest_twisted.async_yield_fixture
async def bus_cluster(
    reactor: Any, redis_url: str, zk_url: str, tmp_path: Path
) -> AsyncIterator[BusCluster]:
    cluster = BusCluster(reactor, redis_url, zk_url, tmp_path)
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()


def pusher_of(service: IMServerService) -> Any:
    assert service.server is not None
    return service.server.delivery.pusher


async def two_users(cluster: BusCluster) -> tuple[Client, Any, Client, Any]:
    alice, alice_events = await cluster.logged_in("alice")
    bob, bob_events = await cluster.logged_in("bob")
    assert alice.server != bob.server
    return alice, alice_events, bob, bob_events


@pytest_twisted.ensureDeferred
async def test_servers_push_to_each_other_over_the_bus(
    reactor: Any, bus_cluster: BusCluster
) -> None:
    alice, alice_events, bob, bob_events = await two_users(bus_cluster)
    assert bob.user_id is not None and alice.user_id is not None
    pusher = pusher_of(bus_cluster.server_of(alice))
    assert isinstance(pusher, BusPusher)
    for i in range(5):
        await within(reactor, alice.send_private(bob.user_id, f"m{i}"))
    got = await take_messages(reactor, bob_events, 5)
    assert [m.text for m in got] == [f"m{i}" for i in range(5)]
    assert pusher.publishes >= 1
    # From the route too (an application back-end's send over HTTP).
    route = bus_cluster.route
    assert route is not None and isinstance(route.bus, RedisBus)
    await within(
        reactor,
        bob.route.call(
            "/p2pRoute",
            {"userId": bob.user_id, "receiveUserId": alice.user_id, "msg": "via route"},
            bob.token or "",
        ),
    )
    [reply] = await take_messages(reactor, alice_events, 1, deadline=10)
    while reply.text != "via route":
        [reply] = await take_messages(reactor, alice_events, 1, deadline=10)


@pytest_twisted.ensureDeferred
async def test_what_is_pushed_while_the_subscription_is_lost_arrives(
    reactor: Any, redis_url: str, bus_cluster: BusCluster
) -> None:
    """
    Redis drops the servers' subscriptions; a message of a conversation
    begun meanwhile is published to nobody (lost), and still reaches the
    receiver once its server subscribed again and resynced its devices.
    """
    alice, _, bob, bob_events = await two_users(bus_cluster)
    assert bob.user_id is not None and alice.user_id is not None
    server = bus_cluster.server_of(bob)
    assert server.bus is not None and server.receiver is not None
    assert isinstance(server.bus, RedisBus)
    channel = server.bus.channel(str(server.address))
    for service in bus_cluster.servers:
        assert isinstance(service.bus, RedisBus)
        hold_reconnection(service.bus, 1.5)
    await kill_subscribers(reactor, redis_url)
    await within(reactor, alice.send_private(bob.user_id, "while away"))
    # The push went to nobody: the subscription was not back yet.
    numsub = await redis_command(reactor, redis_url, "PUBSUB", "NUMSUB", channel)
    assert int(numsub[1]) == 0
    assert server.receiver.m_resyncs.value == 0
    [got] = await take_messages(reactor, bob_events, 1, deadline=15)
    assert got.text == "while away"
    assert got.conversation == pair_conversation(alice.user_id, bob.user_id)
    assert server.receiver.m_resyncs.value == 1
    # And live again.
    await within(reactor, alice.send_private(bob.user_id, "live"))
    [got] = await take_messages(reactor, bob_events, 1)
    assert got.text == "live"


@pytest_twisted.ensureDeferred
async def test_a_groups_messages_reach_every_server_in_the_stores_order(
    reactor: Any, redis_url: str, zk_url: str, tmp_path: Path
) -> None:
    """
    With C{broadcast_from} reached, a group's messages are published by
    the append itself to every server (the group feed), in the order they
    are stored: the members on both servers get every message of both
    senders once, in seq order, and the senders their echo; the servers
    push nothing of them themselves.
    """
    cluster = BusCluster(reactor, redis_url, zk_url, tmp_path, broadcast_from=2)
    try:
        await cluster.start()
        alice, alice_events, bob, bob_events = await two_users(cluster)
        for service in cluster.servers:
            assert service.server is not None and service.server.delivery.feed
        await within(reactor, alice.create_group("feed", policy="open"))
        assert await within(reactor, bob.join_group("feed"))
        sends = []
        for i in range(10):
            sends.append(alice.send_group("feed", f"a{i}"))
            sends.append(bob.send_group("feed", f"b{i}"))
        for d in sends:
            await within(reactor, d)
        for events in (alice_events, bob_events):
            got = await take_messages(reactor, events, 20)
            assert [m.seq for m in got] == list(range(1, 21))
            texts = [m.text for m in got]
            assert sorted(texts) == sorted(f"{w}{i}" for w in "ab" for i in range(10))
            assert [t for t in texts if t[0] == "a"] == [f"a{i}" for i in range(10)]
        for service in cluster.servers:
            assert pusher_of(service).publishes == 0
    finally:
        await cluster.stop()


@pytest.mark.parametrize("push", ["http"])
@pytest_twisted.ensureDeferred
async def test_push_http_keeps_the_push_api(
    reactor: Any, redis_url: str, zk_url: str, tmp_path: Path, push: str
) -> None:
    cluster = BusCluster(reactor, redis_url, zk_url, tmp_path, push=push)
    try:
        await cluster.start()
        assert all(s.bus is None for s in cluster.servers)
        assert cluster.route is not None and cluster.route.bus is None
        alice, _, bob, bob_events = await two_users(cluster)
        assert bob.user_id is not None
        assert isinstance(pusher_of(cluster.server_of(alice)), HttpPusher)
        await within(reactor, alice.send_private(bob.user_id, "over http"))
        [got] = await take_messages(reactor, bob_events, 1)
        assert got.text == "over http"
    finally:
        await cluster.stop()


@pytest_twisted.ensureDeferred
async def test_the_append_script_publishes_what_it_fed_in_order(
    reactor: Any, redis_url: str
) -> None:
    """
    The Redis store's group feed: one payload per append to every server
    of the C{servers} set, with the messages appended for a list of users
    in the order stored; a message not fed, or a retry (published when
    it was appended), is not in it.
    """
    from cim.store.redis import connect_redis

    prefix = f"cimtest:{uuid.uuid4().hex}:"
    address = parse_redis_url(redis_url)
    store = await connect_redis(redis_url, clock=reactor, prefix=prefix, poolsize=1)
    bus = RedisBus(reactor, address, prefix)
    try:
        await store._command("SADD", prefix + "servers", "s1", "s2")
        got: DeferredQueue[bytes] = DeferredQueue()
        await within(reactor, bus.subscribe("s1", got.put, lambda: None))
        members = [1, 2, 3]
        group = [NewMessage("g:g1", 1, "a", f"m{i}", group_id="g1") for i in range(3)]
        group[0] = NewMessage("g:g1", 1, "a", "m0", client_msg_id="c0", group_id="g1")
        private = NewMessage("p:1:2", 1, "a", "p", receive_user_id=2)
        stored = await store.append(
            [group[0], private, group[1]], feed=[members, None, members]
        )
        runs = decode_feed(await within(reactor, got.get()))
        assert [([m.text for m in ms], users) for ms, users in runs] == [
            (["m0", "m1"], members)
        ]
        assert runs[0][0] == [stored[0], stored[2]]
        # A retry of m0 (published already) with m2.
        again = await store.append([group[0], group[2]], feed=[[1, 2], [1, 2]])
        assert again[0] == stored[0]
        runs = decode_feed(await within(reactor, got.get()))
        assert [([m.seq for m in ms], users) for ms, users in runs] == [([3], [1, 2])]
        # Nothing fed, nothing published.
        await store.append([private], feed=[None])
        await store.append([group[2]])
        last = NewMessage("g:g1", 1, "a", "last", group_id="g1")
        await store.append([last], feed=[members])
        runs = decode_feed(await within(reactor, got.get()))
        assert [[m.text for m in ms] for ms, _ in runs] == [["last"]]
    finally:
        await bus.close()
        await store.close()
