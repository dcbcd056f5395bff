"""
End-to-end tests of the client: library clients on a real cluster (Redis,
ZooKeeper, one route and two IM servers in the test reactor), and the real
console process (C{twistd -n cim-client}) against an in-process route and
server.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool

from cim.client.library import Client, ClientState, QueueListener
from cim.message import pair_conversation
from cim.registry import open_registry
from cim.route.service import RouteConfig, RouteService
from cim.server.service import IMServerService, ServerConfig
from tests.clientkit import SECRET, Harness, take_messages
from tests.kit.cluster import ROOT, TWISTD
from tests.kit.wait import wait_until, within

pytestmark = pytest.mark.integration


@pytest.fixture
def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


# A real cluster


class RealCluster:
    """
    One route and two IM servers on Redis (a db of their own, flushed
    first) and a ZooKeeper root of their own (deleted at the end).
    """

    def __init__(self, reactor: Any, redis_url: str, zk_url: str, tmp: Path) -> None:
        self.reactor = reactor
        parts = urlsplit(redis_url)
        self.redis_url = urlunsplit(parts._replace(path="/3"))
        self.zk_hosts = urlsplit(zk_url).netloc
        self.zk_root = f"/cimtest-{uuid.uuid4().hex}"
        self.prefix = f"cimtest:{uuid.uuid4().hex}:"
        self.tmp = tmp
        self.route: RouteService | None = None
        self.servers: list[IMServerService] = []
        self.clients: list[Client] = []

    def _store(self) -> Deferred[Any]:
        from cim.store.redis import connect_redis

        d: Deferred[Any] = connect_redis(
            self.redis_url, clock=self.reactor, prefix=self.prefix
        )
        return d

    def _registry(self) -> Any:
        return open_registry(f"zk://{self.zk_hosts}{self.zk_root}", self.reactor)

    async def start(self) -> None:
        store = await self._store()
        await store._redis.execute_command("FLUSHDB")
        await store.close()
        for _ in range(2):
            service = IMServerService(
                self.reactor,
                ServerConfig(port=0, http_port=0, secret=SECRET),
                self._store,
                self._registry(),
            )
            self.servers.append(service)
            service.startService()
            await within(self.reactor, service.ready, 30)
        self.route = RouteService(
            self.reactor,
            RouteConfig(
                port=0, bind="127.0.0.1", secret=SECRET, balancer="round-robin"
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

    async def logged_in(self, name: str, **kw: Any) -> tuple[Client, QueueListener]:
        assert self.route is not None
        listener = QueueListener()
        kw.setdefault("backoff_base", 0.2)
        client = Client(
            self.reactor,
            f"http://127.0.0.1:{self.route.port}",
            listener=listener,
            state_dir=self.tmp / name,
            **kw,
        )
        self.clients.append(client)
        await within(self.reactor, client.login(name))
        return client, listener

    def server_of(self, client: Client) -> IMServerService:
        for service in self.servers:
            assert service.address is not None
            if client.server == (service.address.host, service.address.port):
                return service
        raise AssertionError(f"no server at {client.server}")

    async def stop(self) -> None:
        for client in self.clients:
            await within(self.reactor, client.close())
        if self.route is not None and self.route.running:
            await self.route.stopService()
        for service in self.servers:
            if service.running:
                await service.stopService()
        await deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), self._clean_zookeeper
        )

    def _clean_zookeeper(self) -> None:
        from kazoo.client import KazooClient
        from kazoo.exceptions import NoNodeError

        zk = KazooClient(hosts=self.zk_hosts, timeout=10.0)
        zk.start(10.0)
        try:
            zk.delete(self.zk_root, recursive=True)
        except NoNodeError:
            pass
        finally:
            zk.stop()
            zk.close()


@pytest_twisted.async_yield_fixture
async def cluster(
    reactor: Any, redis_url: str, zk_url: str, tmp_path: Path
) -> AsyncIterator[RealCluster]:
    cluster = RealCluster(reactor, redis_url, zk_url, tmp_path)
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()


@pytest_twisted.ensureDeferred
async def test_failover_to_another_server(reactor: Any, cluster: RealCluster) -> None:
    alice, alice_events = await cluster.logged_in("alice")
    bob, bob_events = await cluster.logged_in("bob")
    assert alice.user_id is not None and bob.user_id is not None
    assert alice.server != bob.server

    # Private and group chat, both ways, across the two servers.
    # (Each gets its own messages back too.)
    await within(reactor, alice.send_private(bob.user_id, "hello bob"))
    [got] = await take_messages(reactor, bob_events, 1)
    assert got.text == "hello bob"
    [echo] = await take_messages(reactor, alice_events, 1)
    assert echo.text == "hello bob" and alice.sent_here(echo.client_msg_id)
    await within(reactor, bob.send_private(alice.user_id, "hello alice"))
    [got] = await take_messages(reactor, alice_events, 1)
    assert got.text == "hello alice"
    [echo] = await take_messages(reactor, bob_events, 1)
    assert echo.sender_id == bob.user_id
    await alice.create_group("ops", policy="open")
    await bob.join_group("ops")
    # (One at a time: the servers start a group joined after login at the
    # first message they see of it, so a later one overtaking an earlier
    # one across servers would hide the earlier one.)
    for sender, text in ((alice, "from alice"), (bob, "from bob")):
        await within(reactor, sender.send_group("ops", text))
        for events in (alice_events, bob_events):
            [got] = await take_messages(reactor, events, 1)
            assert got.text == text

    # Bob's server stops while Alice keeps sending.
    old = cluster.server_of(bob)
    stopping: Deferred[Any] | None = None
    count = 30
    for i in range(count):
        if i == count // 3:
            stopping = old.stopService()
        await within(reactor, alice.send_private(bob.user_id, f"p{i}"))
        await within(reactor, alice.send_group("ops", f"g{i}"))
    assert stopping is not None
    await within(reactor, stopping, 30)

    got = await take_messages(reactor, bob_events, 2 * count, deadline=30)
    assert bob.ready and bob.server == alice.server
    pair = pair_conversation(alice.user_id, bob.user_id)
    private = [m for m in got if m.conversation == pair]
    group = [m for m in got if m.conversation == "g:ops"]
    assert [m.text for m in private] == [f"p{i}" for i in range(count)]
    assert [m.text for m in group] == [f"g{i}" for i in range(count)]
    assert [m.seq for m in private] == list(range(3, count + 3))
    assert [m.seq for m in group] == list(range(3, count + 3))
    states = [s for s, _ in bob_events.log]
    assert ClientState.RECONNECTING in states and states[-1] == ClientState.READY

    # Exactly once: the next message of each conversation is the next one.
    await within(reactor, alice.send_private(bob.user_id, "last private"))
    await within(reactor, alice.send_group("ops", "last group"))
    last = await take_messages(reactor, bob_events, 2)
    assert [m.text for m in last] == ["last private", "last group"]
    assert bob_events.pending_messages() == []


# The console process


class ConsoleProcess(ProcessProtocol):
    """
    C{twistd -n cim-client} with pipes on its standard input and output.
    """

    def __init__(self) -> None:
        self.output = ""
        self.errors = ""
        self.ended: Deferred[int | None] = Deferred()
        self._mark = 0

    def outReceived(self, data: bytes) -> None:
        self.output += data.decode("utf-8", "replace")

    def errReceived(self, data: bytes) -> None:
        self.errors += data.decode("utf-8", "replace")

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None))

    def type(self, line: str) -> None:
        assert self.transport is not None
        self.transport.write(line.encode("utf-8") + b"\n")

    async def expect(
        self, reactor: Any, pattern: str, deadline: float = 20.0
    ) -> re.Match[str]:
        """
        Wait for output matching C{pattern} after the previous match.
        """
        regex = re.compile(pattern, re.MULTILINE)
        end = time.monotonic() + deadline
        while True:
            match = regex.search(self.output, self._mark)
            if match:
                self._mark = match.end()
                return match
            if self.ended.called or time.monotonic() > end:
                raise AssertionError(
                    f"no {pattern!r} in the console output:\n{self.output}\n{self.errors}"
                )
            await deferLater(reactor, 0.02)


@pytest_twisted.async_yield_fixture
async def harness(reactor: Any, tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(reactor, tmp_path / "state")
    try:
        await h.start()
        yield h
    finally:
        await h.stop()


@pytest_twisted.ensureDeferred
async def test_console_process(reactor: Any, harness: Harness, tmp_path: Path) -> None:
    bob, bob_events = await harness.logged_in("bob")
    assert bob.user_id is not None
    logfile = tmp_path / "client.log"
    console = ConsoleProcess()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), env.get("PYTHONPATH")])
    )
    process = reactor.spawnProcess(
        console,
        TWISTD,
        [
            TWISTD,
            "-n",
            "--pidfile=",
            "cim-client",
            "--route",
            harness.route_url,
            "--user",
            "alice",
            "--history-dir",
            str(tmp_path / "history"),
            "--state-dir",
            str(tmp_path / "cursors"),
            "--logfile",
            str(logfile),
        ],
        env=env,
        path=str(tmp_path),
    )
    try:
        match = await console.expect(reactor, r"logged in as alice \(id (\d+)\)")
        alice_id = int(match.group(1))
        await console.expect(reactor, r"^no unread messages$")

        console.type(f"{bob.user_id};;hello bob :smile:")
        [got] = await take_messages(reactor, bob_events, 1)
        assert (got.text, got.sender_id) == ("hello bob :smile:", alice_id)
        # Printed once, when stored (not again when it comes back).
        await console.expect(
            reactor, rf"^\[\d\d:\d\d:\d\d\] \(private\) alice -> {bob.user_id}: hello"
        )

        await within(reactor, bob.send_private(alice_id, "hi alice :wave:"))
        await console.expect(
            reactor, r"^\[\d\d:\d\d:\d\d\] \(private\) bob: hi alice 👋$"
        )
        # The console marked it read: Bob gets the receipt.  (Alice's own
        # message told Bob she had read up to it, first.)
        reads = [await within(reactor, bob_events.reads.get())]
        while reads[-1][:2] != (alice_id, got.conversation) or reads[-1][2] <= got.seq:
            reads.append(await within(reactor, bob_events.reads.get()))
        assert reads[-1][2] == got.seq + 1
        assert (alice_id, got.conversation, got.seq) in reads

        console.type(":history @bob")
        await console.expect(reactor, r"alice -> bob: hello bob 😄 ✓$")
        await console.expect(reactor, r"bob: hi alice 👋$")

        console.type(":olu")
        await console.expect(reactor, rf"^  {bob.user_id}  bob$")

        console.type("abc;;x")
        await console.expect(reactor, r"^error: 'abc' is not a user id")

        console.type(":q hello")
        await console.expect(reactor, r"alice: hello bob 😄$")
        # Sent, bob's reply as a receipt, history, search.
        assert console.output.count("hello bob") == 4

        console.type(":q!")
        await console.expect(reactor, r"^bye$")
        assert await within(reactor, console.ended) == 0
    finally:
        if not console.ended.called:
            process.signalProcess("KILL")
            await within(reactor, console.ended)
    # The logs went to the log file, not into the console.
    assert "twistd" not in console.output
    log = logfile.read_text("utf-8")
    assert "twistd" in log and "ready" in log
    assert (tmp_path / "history").is_dir()
