"""
Tests for L{cim.registry}: one behavioural suite run against the in-process
registry and the ZooKeeper one, then what only ZooKeeper can do (garbage
nodes, stale nodes, session expiry, connection loss, server restart).

The ZooKeeper tests use the shared test server (C{CIM_TEST_ZK}), each under
its own root, except the restart test, which runs a private server
(L{tests.kit.services}).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from kazoo.client import KazooClient
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.threadable import isInIOThread
from zope.interface.verify import verifyObject

from cim.interfaces import IRegistry, ServerAddress
from cim.registry import open_registry
from cim.registry.local import LocalBoard, LocalRegistry
from cim.registry.zk import ZooKeeperRegistry
from tests.kit.net import Link, refusing_port
from tests.kit.services import ZooKeeperServer
from tests.kit.wait import wait_until

A = ServerAddress("10.0.0.1", 11211, 8081)
B = ServerAddress("10.0.0.2", 11211, 8081)
C = ServerAddress("10.0.0.3", 11211, 8081)


@pytest.fixture
def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def in_thread(reactor: Any, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """
    Run the blocking C{f(*args)} in a new thread (for test-only kazoo
    clients), and fire the result on the reactor thread.
    """
    d: Deferred[Any] = Deferred()

    def run() -> None:
        try:
            result = f(*args)
        except BaseException:
            reactor.callFromThread(d.errback, Failure())
        else:
            reactor.callFromThread(d.callback, result)

    threading.Thread(target=run, name="test-kazoo-call").start()
    return d


class RawZooKeeper:
    """
    A plain kazoo client for a test to poke ZooKeeper behind the registry's
    back; its blocking calls run in threads.
    """

    def __init__(
        self, reactor: Any, hosts: str, client_id: tuple[int, bytes] | None = None
    ) -> None:
        self._reactor = reactor
        self.client = KazooClient(hosts=hosts, client_id=client_id, timeout=10.0)

    def call(self, method: str, *args: Any) -> Deferred[Any]:
        return in_thread(self._reactor, getattr(self.client, method), *args)

    async def start(self, seconds: float = 10.0) -> None:
        await self.call("start", seconds)

    async def close(self) -> None:
        await self.call("stop")
        await self.call("close")


class Cluster:
    """
    Registries of one backend sharing one namespace (a L{LocalBoard}, or a
    ZooKeeper root), all stopped at teardown.
    """

    def __init__(self, kind: str, make: Callable[[], Any]) -> None:
        self.kind = kind
        self._make = make
        self._registries: list[Any] = []

    async def registry(self, start: bool = True) -> Any:
        registry = self._make()
        self._registries.append(registry)
        if start:
            await registry.start()
        return registry

    async def close(self) -> None:
        for registry in reversed(self._registries):
            await registry.stop()


def _extra_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t not in before and not t.name.startswith("PoolThread-twisted")
    ]


@pytest_twisted.async_yield_fixture(autouse=True)
async def no_leftover_threads(reactor: Any) -> AsyncIterator[None]:
    """
    Fail a test that leaves a thread running (kazoo's, or a thread pool's)
    once all its other fixtures are torn down.
    """
    before = set(threading.enumerate())
    yield
    await wait_until(
        reactor, lambda: not _extra_threads(before), "threads to end", deadline=5.0
    )


@pytest.fixture
def zk_hosts(zk_url: str) -> str:
    return urlsplit(zk_url).netloc


@pytest_twisted.async_yield_fixture
async def raw_zk(reactor: Any, zk_hosts: str) -> AsyncIterator[RawZooKeeper]:
    raw = RawZooKeeper(reactor, zk_hosts)
    await raw.start()
    yield raw
    await raw.close()


@pytest.fixture
def root() -> str:
    return f"/cimtest-{uuid.uuid4().hex}"


@pytest_twisted.async_yield_fixture
async def zk_cluster(
    reactor: Any, zk_hosts: str, root: str, raw_zk: RawZooKeeper
) -> AsyncIterator[Cluster]:
    cluster = Cluster("zk", lambda: open_registry(f"zk://{zk_hosts}{root}", reactor))
    try:
        yield cluster
    finally:
        await cluster.close()
        await raw_zk.call("delete", root, -1, True)


@pytest_twisted.async_yield_fixture
async def local_cluster() -> AsyncIterator[Cluster]:
    board = LocalBoard()
    cluster = Cluster("local", lambda: LocalRegistry(board))
    try:
        yield cluster
    finally:
        await cluster.close()


@pytest.fixture(params=["local", pytest.param("zk", marks=pytest.mark.integration)])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    """
    The same tests on both backends.
    """
    found: Cluster = request.getfixturevalue(f"{request.param}_cluster")
    return found


# Both backends


@pytest_twisted.ensureDeferred
async def test_interface(cluster: Cluster) -> None:
    registry = await cluster.registry()
    assert verifyObject(IRegistry, registry)
    assert registry.connected


@pytest_twisted.ensureDeferred
async def test_register_seen_by_another(reactor: Any, cluster: Cluster) -> None:
    server = await cluster.registry()
    route = await cluster.registry()
    assert route.servers() == []
    await server.register(A)
    await wait_until(reactor, lambda: route.servers() == [A], "A to appear")
    await wait_until(reactor, lambda: server.servers() == [A], "A seen by itself")


@pytest_twisted.ensureDeferred
async def test_servers_sorted(reactor: Any, cluster: Cluster) -> None:
    route = await cluster.registry()
    for address in [C, A, B, ServerAddress("10.0.0.1", 9, 8081)]:
        server = await cluster.registry()
        await server.register(address)
    expected = [ServerAddress("10.0.0.1", 9, 8081), A, B, C]
    await wait_until(reactor, lambda: route.servers() == expected, "all four")


@pytest_twisted.ensureDeferred
async def test_watch_add_and_remove(reactor: Any, cluster: Cluster) -> None:
    server1 = await cluster.registry()
    server2 = await cluster.registry()
    route = await cluster.registry()
    seen: list[list[ServerAddress]] = []
    route.watch(seen.append)
    await server1.register(A)
    await wait_until(reactor, lambda: seen[-1:] == [[A]], "A added")
    await server2.register(B)
    await wait_until(reactor, lambda: seen[-1:] == [[A, B]], "B added")
    await server1.unregister()
    await wait_until(reactor, lambda: seen[-1:] == [[B]], "A removed")
    assert route.servers() == [B]
    # Only changes are reported.
    assert all(a != b for a, b in zip(seen, seen[1:], strict=False))


@pytest_twisted.ensureDeferred
async def test_unregister(reactor: Any, cluster: Cluster) -> None:
    server = await cluster.registry()
    route = await cluster.registry()
    await server.register(A)
    await wait_until(reactor, lambda: route.servers() == [A], "A to appear")
    await server.unregister()
    await wait_until(reactor, lambda: route.servers() == [], "A to go")
    await server.unregister()  # a second time does nothing


@pytest_twisted.ensureDeferred
async def test_register_other_address(reactor: Any, cluster: Cluster) -> None:
    """
    Registering another address replaces the first.
    """
    server = await cluster.registry()
    route = await cluster.registry()
    await server.register(A)
    await server.register(B)
    await wait_until(reactor, lambda: route.servers() == [B], "only B")


@pytest_twisted.ensureDeferred
async def test_stop_removes_node(reactor: Any, cluster: Cluster) -> None:
    server = await cluster.registry()
    route = await cluster.registry()
    await server.register(A)
    await wait_until(reactor, lambda: route.servers() == [A], "A to appear")
    await server.stop()
    await wait_until(reactor, lambda: route.servers() == [], "A to go")


@pytest_twisted.ensureDeferred
async def test_unsubscribe(reactor: Any, cluster: Cluster) -> None:
    server = await cluster.registry()
    route = await cluster.registry()
    kept: list[list[ServerAddress]] = []
    dropped: list[list[ServerAddress]] = []
    route.watch(kept.append)
    unsubscribe = route.watch(dropped.append)
    unsubscribe()
    unsubscribe()  # a second time does nothing
    await server.register(A)
    await wait_until(reactor, lambda: kept == [[A]], "A reported")
    assert dropped == []


@pytest_twisted.ensureDeferred
async def test_failing_watcher(reactor: Any, cluster: Cluster) -> None:
    """
    A watcher that raises is logged and does not stop the others.
    """
    server = await cluster.registry()
    route = await cluster.registry()
    seen: list[list[ServerAddress]] = []

    def broken(servers: list[ServerAddress]) -> None:
        raise RuntimeError("broken watcher")

    route.watch(broken)
    route.watch(seen.append)
    await server.register(A)
    await wait_until(reactor, lambda: seen == [[A]], "A reported")


@pytest_twisted.ensureDeferred
async def test_callbacks_on_reactor_thread(reactor: Any, cluster: Cluster) -> None:
    threads: list[tuple[str, bool, threading.Thread]] = []

    def record(what: str) -> Callable[[Any], Any]:
        def callback(result: Any) -> Any:
            threads.append((what, isInIOThread(), threading.current_thread()))
            return result

        return callback

    server = await cluster.registry(start=False)
    route = await cluster.registry()
    route.watch(record("watch"))
    await server.start().addCallback(record("start"))
    await server.register(A).addCallback(record("register"))
    await wait_until(reactor, lambda: route.servers() == [A], "A to appear")
    await server.unregister().addCallback(record("unregister"))
    await wait_until(reactor, lambda: len(threads) == 5, "five callbacks")
    await server.stop().addCallback(record("stop"))
    assert sorted(what for what, _, _ in threads) == [
        "register",
        "start",
        "stop",
        "unregister",
        "watch",
        "watch",
    ]
    main = threading.main_thread()
    for what, io_thread, thread in threads:
        assert io_thread, what
        assert thread is main, what


@pytest_twisted.ensureDeferred
async def test_local_registries_share_nothing_by_default(reactor: Any) -> None:
    one = LocalRegistry()
    other = LocalRegistry()
    await one.register(A)
    assert one.servers() == [A]
    assert other.servers() == []
    await one.stop()


# open_registry


def test_open_local(reactor: Any) -> None:
    registry = open_registry("local:", reactor)
    assert isinstance(registry, LocalRegistry)
    assert open_registry("local:", reactor) is registry


def test_open_zk(reactor: Any) -> None:
    registry = open_registry("zk://127.0.0.1:2181,[::1]:2182/cim/test", reactor)
    assert isinstance(registry, ZooKeeperRegistry)
    assert registry.root == "/cim/test"
    assert verifyObject(IRegistry, registry)
    for url in ["zk://zk1:2181", "zk://zk1:2181/"]:
        registry = open_registry(url, reactor)
        assert isinstance(registry, ZooKeeperRegistry)
        assert registry.root == "/cim"


@pytest.mark.parametrize(
    "url",
    [
        "",
        "local",
        "redis://127.0.0.1:6379/0",
        "zk://",
        "zk:///cim",
        "zk://zk1/cim",
        "zk://zk1:port/cim",
        "zk://zk1:2181,/cim",
        "zk://zk1:99999/cim",
        "zk://zk1:2181/cim?x=1",
    ],
)
def test_open_bad_url(reactor: Any, url: str) -> None:
    with pytest.raises(ValueError, match="registry URL|ZooKeeper address"):
        open_registry(url, reactor)


# ZooKeeper only


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_zk_garbage_ignored(
    reactor: Any, zk_cluster: Cluster, raw_zk: RawZooKeeper, root: str
) -> None:
    route = await zk_cluster.registry()
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        for name in ["garbage", "a:b:c", ":1:2", "host:1", str(C)]:
            await raw_zk.call("create", f"{root}/{name}")
        await wait_until(reactor, lambda: route.servers() == [C], "only C")
        ignored = {e.get("name") for e in events if "ignoring" in e["log_format"]}
    finally:
        globalLogPublisher.removeObserver(observer)
    assert ignored == {"garbage", "a:b:c", ":1:2", "host:1"}


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_zk_replaces_stale_node(
    reactor: Any, zk_cluster: Cluster, zk_hosts: str, root: str
) -> None:
    """
    A node of the same name held by another (earlier) session is replaced.
    """
    server = await zk_cluster.registry()
    stale = RawZooKeeper(reactor, zk_hosts)
    await stale.start()
    try:
        await stale.call("create", f"{root}/{A}", b"", None, True)
        await server.register(A)
        _, stat = await stale.call("get", f"{root}/{A}")
        assert stat.ephemeralOwner == server._client.client_id[0]
    finally:
        await stale.close()
    # The old session's end does not take the new node with it.
    route = await zk_cluster.registry()
    assert route.servers() == [A]


def zk_link(reactor: Any, hosts: str) -> Link:
    """
    A link to ZooKeeper that a test can cut (drop every connection and
    refuse new ones) and restore, to make a client lose its connection but
    not its session.
    """
    host, _, port = hosts.split(",")[0].rpartition(":")
    link = Link(reactor, int(port), host)
    link.listen()
    return link


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_zk_connection_loss(
    reactor: Any, zk_hosts: str, raw_zk: RawZooKeeper, root: str, zk_cluster: Cluster
) -> None:
    """
    After a connection loss (same session), the registry re-reads the
    children it missed and watches them again, without a restart.
    """
    proxy = zk_link(reactor, zk_hosts)
    route = ZooKeeperRegistry(reactor, f"127.0.0.1:{proxy.port}", root=root)
    zk_cluster._registries.append(route)
    server_a = await zk_cluster.registry()
    server_b = await zk_cluster.registry()
    try:
        await route.start()
        seen: list[list[ServerAddress]] = []
        route.watch(seen.append)
        await server_a.register(A)
        await wait_until(reactor, lambda: route.servers() == [A], "A to appear")
        session = route._client.client_id[0]

        await proxy.cut()
        await wait_until(reactor, lambda: not route.connected, "disconnection")
        await server_a.unregister()
        await server_b.register(B)
        assert route.servers() == [A]
        proxy.listen()

        await wait_until(reactor, lambda: route.servers() == [B], "catching up")
        assert route.connected
        assert route._client.client_id[0] == session
        assert seen[-1] == [B]
        # The watch is set again.
        await raw_zk.call("create", f"{root}/{C}")
        await wait_until(reactor, lambda: route.servers() == [B, C], "C to appear")
    finally:
        await route.stop()
        await proxy.cut()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_zk_session_expiry(
    reactor: Any, zk_cluster: Cluster, zk_hosts: str, raw_zk: RawZooKeeper, root: str
) -> None:
    """
    After its session expires, a registry gets a new one and re-creates its
    node by itself; a watcher sees it again.
    """
    proxy = zk_link(reactor, zk_hosts)
    server = ZooKeeperRegistry(reactor, f"127.0.0.1:{proxy.port}", root=root)
    zk_cluster._registries.append(server)
    route = await zk_cluster.registry()
    try:
        await server.start()
        seen: list[list[ServerAddress]] = []
        route.watch(seen.append)
        await server.register(A)
        await wait_until(reactor, lambda: route.servers() == [A], "A to appear")
        old_session, password = server._client.client_id

        # The standard trick: another client takes the session over and
        # closes it, which expires it for the first.  The first is cut off
        # meanwhile, or it could take its session back before it is closed.
        await proxy.cut()
        await wait_until(reactor, lambda: not server.connected, "disconnection")
        thief = RawZooKeeper(reactor, zk_hosts, client_id=(old_session, password))
        await thief.start()
        await thief.close()
        await wait_until(reactor, lambda: route.servers() == [], "A to expire")
        proxy.listen()

        async def owned_by_new_session() -> bool:
            client_id = server._client.client_id
            if client_id is None or client_id[0] == old_session:
                return False
            stat = await raw_zk.call("exists", f"{root}/{A}")
            return stat is not None and stat.ephemeralOwner == client_id[0]

        await wait_until(reactor, owned_by_new_session, "A re-registered")
        await wait_until(reactor, lambda: route.servers() == [A], "route to see A")
        assert seen == [[A], [], [A]]
        assert server.connected
    finally:
        await server.stop()
        await proxy.cut()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_zk_server_restart(
    reactor: Any, tmp_path: Path, root: str, zk_url: str
) -> None:
    """
    A ZooKeeper restart is a connection loss for every client, and the
    watcher's list catches up with what changed during and after the
    restart, without restarting any registry.  (It runs a private server,
    but only where the shared one is configured: both need the ZooKeeper
    package.)

    The server restores the sessions, so the clients normally keep theirs.
    But a kazoo connection attempt that reaches the port while the server is
    still starting waits a whole session timeout for the handshake, so on a
    loaded machine a session can expire meanwhile; the registry survives that
    too (it re-registers), and the test allows both outcomes.
    """
    zookeeper = ZooKeeperServer(tmp_path)
    await zookeeper.start(reactor)
    route, server_a, server_b = (
        ZooKeeperRegistry(reactor, zookeeper.hosts, root=root) for _ in range(3)
    )
    raw = RawZooKeeper(reactor, zookeeper.hosts)
    started: list[ZooKeeperRegistry] = []
    try:
        for registry in [route, server_a, server_b]:
            await registry.start()
            started.append(registry)
        await server_a.register(A)
        await server_b.register(B)
        await wait_until(reactor, lambda: route.servers() == [A, B], "A and B")

        await zookeeper.stop(reactor)
        await wait_until(reactor, lambda: not route.connected, "disconnection", 30)
        await zookeeper.start(reactor)
        # Another client changes the list as soon as the server is back,
        # likely before the route has reconnected.  (The server answers
        # ruok a little before it serves clients: a slow machine needs the
        # longer timeout.)
        await raw.start(30.0)
        await raw.call("create", f"{root}/{C}")
        await server_b.unregister()

        await wait_until(
            reactor, lambda: route.servers() == [A, C], "catching up", deadline=30
        )
        assert route.connected
        await wait_until(reactor, lambda: server_a.connected, "A to reconnect", 30)
        await raw.call("delete", f"{root}/{C}")
        await wait_until(reactor, lambda: route.servers() == [A], "C to go", 30)
    finally:
        for registry in reversed(started):
            await registry.stop()
        await raw.close()
        await zookeeper.stop(reactor)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_zk_start_fails_when_unreachable(reactor: Any) -> None:
    with refusing_port() as port:
        registry = ZooKeeperRegistry(reactor, f"127.0.0.1:{port}", root="/x")
        registry.connect_timeout = 1.0
        with pytest.raises(Exception, match="time-out"):
            await registry.start()
        assert not registry.connected
        await registry.stop()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_zk_stop_during_start(zk_cluster: Cluster) -> None:
    """
    A stop while the start is under way waits for it, then stops.
    """
    registry = await zk_cluster.registry(start=False)
    with pytest.raises(RuntimeError):
        registry.register(A)
    started = registry.start()
    await registry.stop()
    await started
    assert not registry.connected
    with pytest.raises(RuntimeError):
        registry.register(A)
