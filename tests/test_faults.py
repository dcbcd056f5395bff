"""
Faults against real processes (C{twistd cim-route} and C{twistd cim-server}
daemons, a private C{redis-server}, ZooKeeper), with library clients
chatting throughout:

  - Redis killed and restarted under load;
  - ZooKeeper restarted, and one server's ZooKeeper session expired;
  - the route restarted while clients are connected;
  - clients that vanish without closing (a silent raw TCP client, a client
    process stopped with SIGSTOP).

At the end of each chat every message must have arrived exactly once, in
order: every text carries a per-sender, per-conversation counter (see
L{Chat}).

The helpers here (L{RedisServer}, L{Processes}, L{Cluster}, L{RawClient},
L{Chat}) are shared with C{test_security}, C{test_slowloris} and
C{test_schemathesis}.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredSemaphore, ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols import portforward
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import implementer

from cim.client.library import Ack, Client, ClientState, IClientListener, LoginError
from cim.codec import decode, encode
from cim.framing import VarintFrameReceiver
from cim.interfaces import ServerAddress
from cim.message import ChatMessage, Command, Frame, group_conversation, inbox
from tests.processes import ROOT, Daemon, free_port
from tests.zkserver import ZooKeeperServer

pytestmark = pytest.mark.integration

SECRET = "faults-cluster-secret"
#: The longest a test waits for one event (generous: 2 cores, many processes).
DEADLINE = 30.0


# Waiting


async def wait_for(
    reactor: Any,
    predicate: Callable[[], object],
    what: str,
    deadline: float = DEADLINE,
    interval: float = 0.05,
) -> None:
    """
    Poll C{predicate} (with the reactor running) until it is true; fail
    naming C{what} after C{deadline} seconds.
    """
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline:g}s waiting for {what}")
        await deferLater(reactor, interval)


async def wait_for_async(
    reactor: Any,
    check: Callable[[], Any],
    what: str,
    deadline: float = DEADLINE,
    interval: float = 0.1,
) -> Any:
    """
    Like L{wait_for} with an asynchronous C{check} (a coroutine function);
    an exception it raises counts as false.  @return: its true result.
    """
    end = time.monotonic() + deadline
    last: object = None
    while True:
        try:
            result = await check()
        except Exception as e:
            result, last = None, e
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError(
                f"timed out after {deadline:g}s waiting for {what} (last: {last!r})"
            )
        await deferLater(reactor, interval)


async def within(reactor: Any, d: Any, deadline: float = DEADLINE) -> Any:
    """
    Wait for C{d} (a Deferred or a coroutine), failing after C{deadline}.
    """
    if not isinstance(d, Deferred):
        d = Deferred.fromCoroutine(d)
    d.addTimeout(deadline, reactor)
    return await d


# HTTP


def http_client(reactor: Any) -> HTTPClient:
    """
    A treq client without persistent connections (daemons come and go).
    """
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, False)))


async def call(
    reactor: Any,
    url: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, Any]]:
    """
    POST C{body} as JSON to C{url} (GET without a body).  @return: the HTTP
    status and the decoded JSON answer.
    """
    http = http_client(reactor)
    raw_headers = {k.encode(): [v.encode()] for k, v in (headers or {}).items()}
    raw_headers[b"X-Cim-Extended"] = [b"1"]  # as cim's own clients
    if body is None:
        response = await http.get(url, headers=raw_headers, timeout=timeout)
    else:
        raw_headers[b"Content-Type"] = [b"application/json"]
        response = await http.post(
            url, data=json.dumps(body).encode(), headers=raw_headers, timeout=timeout
        )
    content = await response.content()
    return response.code, json.loads(content)


# Processes


class RedisServer:
    """
    A private C{redis-server} on a free loopback port, with its append-only
    file fsynced on every write (C{--appendfsync always}) in C{directory};
    it keeps its port and data across restarts.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def ping(self) -> bool:
        """
        Whether it answers PING (blocks at most a second, on loopback).
        """
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def spawn(self) -> None:
        assert self.process is None or self.process.poll() is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
             "--dir", str(self.directory), "--appendonly", "yes",
             "--appendfsync", "always", "--save", "",
             "--logfile", str(self.directory / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    async def start(self, reactor: Any, deadline: float = DEADLINE) -> None:
        """
        Start it and wait until it answers (its data loaded).
        """
        self.spawn()
        assert self.process is not None
        process = self.process
        await wait_for(
            reactor,
            lambda: self.ping() or process.poll() is not None,
            "redis-server to answer",
            deadline,
        )
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited:\n{self.log_tail()}")

    def start_blocking(self, deadline: float = DEADLINE) -> None:
        """
        L{start} for fixtures that run before the reactor does (polling with
        a deadline).
        """
        self.spawn()
        assert self.process is not None
        end = time.monotonic() + deadline
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"redis-server did not start:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self) -> str:
        try:
            return (self.directory / "redis.log").read_text()[-2000:]
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """
        C{kill -9}.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


async def wait_healthy(
    reactor: Any, daemon: Daemon, port: int, deadline: float = DEADLINE
) -> dict[str, Any]:
    """
    Wait (with the reactor running) until C{GET /health} on C{port} answers
    a success envelope.

    @raise RuntimeError: the daemon exited meanwhile.
    """
    url = f"http://127.0.0.1:{port}/health"
    end = time.monotonic() + deadline
    while True:
        if daemon.process is not None and daemon.process.poll() is not None:
            raise RuntimeError(f"{daemon.name} exited:\n{daemon.log_tail()}")
        try:
            _, body = await call(reactor, url, timeout=2)
            if body.get("code") == "9000":
                return body
        except Exception:
            pass  # not up yet
        if time.monotonic() > end:
            raise TimeoutError(f"{daemon.name} not healthy:\n{daemon.log_tail()}")
        await deferLater(reactor, 0.1)


async def stop_daemon(
    reactor: Any, daemon: Daemon, deadline: float = 15.0, signalled: bool = False
) -> None:
    """
    SIGTERM (unless C{signalled} already), and wait (with the reactor
    running) until it exited; SIGKILL after C{deadline}.
    """
    process = daemon.process
    if process is None or process.poll() is not None:
        return
    if not signalled:
        process.send_signal(signal.SIGTERM)
    try:
        await wait_for(
            reactor, lambda: process.poll() is not None, f"{daemon.name} to exit"
        )
    except AssertionError:
        daemon.kill()


class Server:
    """
    One C{twistd cim-server} of a L{Cluster}.
    """

    def __init__(self, daemon: Daemon, port: int, http_port: int) -> None:
        self.daemon = daemon
        self.port = port
        self.http_port = http_port

    @property
    def address(self) -> str:
        return str(ServerAddress("127.0.0.1", self.port, self.http_port))


class Cluster:
    """
    One route and some IM servers as C{twistd} processes, on a store and a
    registry given as URLs.  The route spreads logins round robin, so that
    consecutive logins alternate between the servers.
    """

    def __init__(
        self,
        reactor: Any,
        directory: Path,
        store: str,
        registry: str,
        server_args: Sequence[str] = (),
        route_args: Sequence[str] = (),
    ) -> None:
        self.reactor = reactor
        self.directory = directory
        self.store = store
        self.registry = registry
        self.server_args = list(server_args)
        self.route_args = list(route_args)
        self.route_port = free_port()
        self.route = Daemon(
            "route",
            "cim-route",
            ["--port", str(self.route_port), "--bind", "127.0.0.1",
             "--store", store, "--registry", registry, "--secret", SECRET,
             "--balancer", "round-robin", *self.route_args],
            directory,
        )  # fmt: skip
        self.servers: dict[str, Server] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.route_port}"

    def add_server(self, name: str, registry: str | None = None) -> Server:
        port, http = free_port(), free_port()
        daemon = Daemon(
            name,
            "cim-server",
            ["--port", str(port), "--http-port", str(http), "--bind", "127.0.0.1",
             "--store", self.store, "--registry", registry or self.registry,
             "--secret", SECRET, *self.server_args],
            self.directory,
        )  # fmt: skip
        self.servers[name] = server = Server(daemon, port, http)
        return server

    def daemons(self) -> list[Daemon]:
        return [self.route] + [s.daemon for s in self.servers.values()]

    async def start(self, servers: int = 2) -> Cluster:
        """
        Start C{servers} servers (unless added already) and the route, all
        at once, and wait until the route lists every server.
        """
        if not self.servers:
            for i in range(servers):
                self.add_server(f"server{i + 1}")
        for daemon in self.daemons():
            daemon.start()
        for server in self.servers.values():
            await wait_healthy(self.reactor, server.daemon, server.http_port)
        await wait_healthy(self.reactor, self.route, self.route_port)
        await self.wait_listed(set(self.servers))
        return self

    def start_blocking(self, servers: int = 2) -> Cluster:
        """
        L{start} for fixtures that run before the reactor does (polling with
        a deadline).
        """
        if not self.servers:
            for i in range(servers):
                self.add_server(f"server{i + 1}")
        for daemon in self.daemons():
            daemon.start()
        for server in self.servers.values():
            server.daemon.wait_http(server.http_port, deadline=DEADLINE)
        body = self.route.wait_http(self.route_port, deadline=DEADLINE)
        end = time.monotonic() + DEADLINE
        wanted = sorted(s.address for s in self.servers.values())
        while sorted(body["dataBody"]["servers"]) != wanted:
            if time.monotonic() > end:
                raise TimeoutError(f"the route lists {body['dataBody']['servers']}")
            time.sleep(0.1)
            body = self.route.wait_http(self.route_port, deadline=DEADLINE)
        return self

    def stop_blocking(self) -> None:
        for daemon in self.daemons():
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.process.send_signal(signal.SIGCONT)
            daemon.stop()

    async def health(self) -> dict[str, Any]:
        _, body = await call(self.reactor, f"{self.url}/health", timeout=5)
        return body

    async def wait_listed(self, names: set[str], deadline: float = DEADLINE) -> None:
        """
        Wait until the route's registry lists exactly the servers C{names}.
        """
        wanted = sorted(self.servers[n].address for n in names)

        async def check() -> bool:
            body = await self.health()
            return sorted(body["dataBody"]["servers"]) == wanted

        await wait_for_async(
            self.reactor, check, f"the route to list {sorted(names)}", deadline
        )

    def server_of(self, client: Client) -> str:
        assert client.server is not None
        for name, server in self.servers.items():
            if server.port == client.server[1]:
                return name
        raise AssertionError(f"no server on {client.server}")

    async def online(self) -> set[int]:
        _, body = await call(self.reactor, f"{self.url}/onlineUser", timeout=5)
        return {int(u["userId"]) for u in body["dataBody"]}

    async def stop(self) -> None:
        """
        Stop every daemon (with the reactor running, for daemons that
        reach a service through it, see L{Link}).
        """
        for daemon in self.daemons():
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.process.send_signal(signal.SIGCONT)
                daemon.process.send_signal(signal.SIGTERM)
        for daemon in self.daemons():
            await stop_daemon(self.reactor, daemon, signalled=True)

    def assert_running(self) -> None:
        for daemon in self.daemons():
            assert daemon.process is not None
            assert daemon.process.poll() is None, (
                f"{daemon.name} exited:\n{daemon.log_tail()}"
            )

    def logs(self) -> dict[str, str]:
        out = {}
        for daemon in self.daemons():
            try:
                out[daemon.name] = daemon.logfile.read_text(errors="replace")
            except OSError:
                out[daemon.name] = ""
        return out


class Processes:
    """
    Everything a test starts: every one is stopped by L{stop_all} (the
    C{procs} fixture's teardown), even when the test fails.
    """

    def __init__(self, reactor: Any, directory: Path) -> None:
        self.reactor = reactor
        self.directory = directory
        self.redis_servers: list[RedisServer] = []
        self.clusters: list[Cluster] = []
        self.popens: list[subprocess.Popen[bytes]] = []
        self.clients: list[Client] = []

    def redis(self, name: str = "redis") -> RedisServer:
        server = RedisServer(self.directory / name)
        self.redis_servers.append(server)
        return server

    def cluster(self, store: str, registry: str, **kwargs: Any) -> Cluster:
        cluster = Cluster(
            self.reactor,
            self.directory / f"cluster{len(self.clusters)}",
            store,
            registry,
            **kwargs,
        )
        self.clusters.append(cluster)
        return cluster

    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(args, **kwargs)
        self.popens.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.popens:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        for cluster in self.clusters:
            cluster.stop_blocking()
        for server in self.redis_servers:
            server.stop()


@pytest.fixture
def procs(reactor: Any, tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(reactor, tmp_path)
    try:
        yield processes
    finally:
        processes.stop_all()


@pytest_twisted.async_yield_fixture
async def clients(reactor: Any, procs: Processes) -> Any:
    """
    The library clients a test makes (C{procs.clients}); closed at the end.
    """
    yield procs.clients
    for client in procs.clients:
        try:
            await within(reactor, client.close(), 10)
        except Exception:
            pass


def unique_root(zk_url: str, prefix: str = "cimfaults") -> str:
    """
    A registry URL on the shared ZooKeeper with a root of this test's own.
    """
    return f"zk://{urlsplit(zk_url).netloc}/{prefix}-{uuid.uuid4().hex[:10]}"


# Clients


@implementer(IClientListener)
class Recorder:
    """
    A client listener that keeps everything, in order.
    """

    def __init__(self) -> None:
        self.messages: list[ChatMessage] = []
        self.errors: list[tuple[int, str, str]] = []
        self.states: list[tuple[ClientState, str]] = []

    def message_received(self, message: ChatMessage) -> None:
        self.messages.append(message)

    def ack_received(self, ack: Ack) -> None:
        pass

    def error_received(self, code: int, reason: str, client_msg_id: str) -> None:
        self.errors.append((code, reason, client_msg_id))

    def state_changed(self, state: ClientState, reason: str) -> None:
        self.states.append((state, reason))


class Member:
    """
    A library client and what it received.
    """

    def __init__(self, name: str, client: Client, recorder: Recorder) -> None:
        self.name = name
        self.client = client
        self.recorder = recorder

    @property
    def user_id(self) -> int:
        assert self.client.user_id is not None
        return self.client.user_id


def new_client(
    reactor: Any, procs: Processes, url: str, name: str, **kwargs: Any
) -> tuple[Client, Recorder]:
    """
    A library client for C{url} (state under the test's directory), with
    short heartbeats and reconnect delays, remembered for closing.
    """
    recorder = Recorder()
    kwargs.setdefault("heartbeat_interval", 1.0)
    kwargs.setdefault("pong_timeout", 5.0)
    kwargs.setdefault("idle_timeout", 10.0)
    kwargs.setdefault("backoff_base", 0.1)
    kwargs.setdefault("backoff_max", 1.0)
    client = Client(
        reactor,
        url,
        listener=recorder,
        state_dir=procs.directory / "clients" / name,
        **kwargs,
    )
    procs.clients.append(client)
    return client, recorder


async def login_member(
    reactor: Any, procs: Processes, cluster: Cluster, name: str, **kwargs: Any
) -> Member:
    client, recorder = new_client(reactor, procs, cluster.url, name, **kwargs)
    await within(reactor, client.login(name))
    return Member(name, client, recorder)


async def members_in_group(
    reactor: Any, procs: Processes, cluster: Cluster, count: int, group: str
) -> list[Member]:
    """
    C{count} logged-in clients (alternating between the servers), all
    members of C{group}.
    """
    tag = uuid.uuid4().hex[:6]
    members = []
    for i in range(count):
        members.append(await login_member(reactor, procs, cluster, f"m{i}-{tag}"))
    await within(reactor, members[0].client.create_group(group))
    for member in members[1:]:
        await within(reactor, member.client.join_group(group))
    return members


class RawClient(VarintFrameReceiver):
    """
    A client speaking the wire protocol itself: keeps the frames it gets,
    and fires L{closed} when the connection ends.
    """

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.frames: list[Frame] = []
        self.closed: Deferred[None] = Deferred()
        self.closed_at: float | None = None
        self.undecodable = 0

    def frameReceived(self, data: bytes) -> None:
        try:
            self.frames.append(decode(data))
        except Exception:
            self.undecodable += 1

    def connectionLost(self, reason: object = None) -> None:
        self.closed_at = time.monotonic()
        if not self.closed.called:
            self.closed.callback(None)

    def send(self, frame: Frame) -> None:
        self.sendFrame(encode(frame))

    def find(self, cmd: Command) -> Frame | None:
        return next((f for f in self.frames if f.cmd == cmd), None)

    async def wait_frame(self, cmd: Command, deadline: float = DEADLINE) -> Frame:
        await wait_for(
            self.reactor,
            lambda: self.find(cmd) is not None or self.closed.called,
            f"a {cmd.name} frame",
            deadline,
        )
        frame = self.find(cmd)
        assert frame is not None, f"closed without a {cmd.name}: {self.frames}"
        return frame

    def abort(self) -> None:
        if self.transport is not None and not self.closed.called:
            self.transport.abortConnection()


async def raw_connect(reactor: Any, port: int) -> RawClient:
    client = RawClient(reactor)
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
    await endpoints.connectProtocol(endpoint, client)
    return client


async def route_login(
    reactor: Any, cluster: Cluster, name: str, password: str | None = None
) -> dict[str, Any]:
    """
    Register C{name} and log it in at the route.  @return: the login's
    C{dataBody} (C{ip}, C{cimServerPort}, C{token}, C{userId}...).
    """
    body: dict[str, Any] = {"userName": name}
    if password is not None:
        body["password"] = password
    _, reply = await call(reactor, f"{cluster.url}/registerAccount", body)
    assert reply["code"] == "9000", reply
    body["userId"] = reply["dataBody"]["userId"]
    if "accountKey" in reply["dataBody"]:
        body["accountKey"] = reply["dataBody"]["accountKey"]
    _, reply = await call(reactor, f"{cluster.url}/login", body)
    assert reply["code"] == "9000", reply
    data: dict[str, Any] = reply["dataBody"]
    return data


async def raw_login(reactor: Any, cluster: Cluster, name: str) -> tuple[RawClient, int]:
    """
    A raw TCP client logged in as a new user C{name}, with its token.
    """
    info = await route_login(reactor, cluster, name)
    raw = await raw_connect(reactor, int(info["cimServerPort"]))
    raw.send(
        Frame(
            cmd=Command.LOGIN_REQUEST,
            request_id=int(info["userId"]),
            req_msg=name,
            token=info["token"],
        )
    )
    await raw.wait_frame(Command.LOGIN_RESPONSE)
    return raw, int(info["userId"])


# The chat


class Chat:
    """
    Members sending private messages to each other and messages to their
    group, from the moment L{start} is called until L{stop}, each with at
    most C{window} sends unacknowledged (the library resends them after a
    reconnect).

    Every text is C{"<tag>|<sender id>|<conversation>|<counter>"}: the
    counter counts the sender's messages to that conversation from 1.
    L{finish} sends a last numbered message to every conversation, waits
    until every recipient has them, and checks that each recipient got,
    from each sender in each conversation, exactly the counters that were
    acknowledged, once each and in increasing order.
    """

    def __init__(
        self,
        reactor: Any,
        members: list[Member],
        group: str,
        window: int = 3,
        interval: float = 0.05,
        seed: int = 0,
    ) -> None:
        self.reactor = reactor
        self.members = members
        self.group = group
        self.window = window
        self.interval = interval
        self.rng = random.Random(seed)
        self.tag = f"chat{uuid.uuid4().hex[:6]}"
        #: (sender id, conversation) -> the last counter used
        self.counters: dict[tuple[int, str], int] = {}
        #: (sender id, conversation) -> the counters acknowledged
        self.acked: dict[tuple[int, str], set[int]] = {}
        self.failures: list[str] = []
        self.attempts = 0
        self.acks = 0
        self.running = False
        self._loops: list[Deferred[None]] = []

    def conversations(self, member: Member) -> list[str]:
        return [group_conversation(self.group)] + [
            inbox(m.user_id) for m in self.members if m is not member
        ]

    def recipients(self, conversation: str) -> list[Member]:
        if conversation.startswith("g:"):
            return list(self.members)
        return [m for m in self.members if inbox(m.user_id) == conversation]

    def send(self, member: Member, conversation: str) -> Deferred[Ack]:
        key = (member.user_id, conversation)
        counter = self.counters[key] = self.counters.get(key, 0) + 1
        text = f"{self.tag}|{member.user_id}|{conversation}|{counter}"
        if conversation.startswith("g:"):
            d = member.client.send_group(self.group, text)
        else:
            d = member.client.send_private(int(conversation[2:]), text)
        self.attempts += 1

        def acked(ack: Ack) -> Ack:
            self.acked.setdefault(key, set()).add(counter)
            self.acks += 1
            return ack

        def failed(failure: Any) -> None:
            self.failures.append(
                f"{member.name} -> {conversation} #{counter}: "
                f"{failure.getErrorMessage()}"
            )

        return d.addCallbacks(acked, failed)

    def start(self) -> None:
        self.running = True
        for member in self.members:
            self._loops.append(ensureDeferred(self._loop(member)))

    async def _loop(self, member: Member) -> None:
        window = DeferredSemaphore(self.window)
        conversations = self.conversations(member)
        outstanding: set[Deferred[Any]] = set()
        while self.running:
            # A burst of sends written back to back (so that the server has
            # several of one sender in flight), then a pause.
            for _ in range(self.rng.randint(1, self.window)):
                await window.acquire()
                if not self.running:
                    window.release()
                    break
                d = self.send(member, self.rng.choice(conversations))
                outstanding.add(d)

                def done(_: object, d: Deferred[Any] = d) -> None:
                    outstanding.discard(d)
                    window.release()

                d.addBoth(done)
            await deferLater(self.reactor, self.interval)
        for d in list(outstanding):
            await d

    def outstanding(self) -> int:
        """
        The sends neither acknowledged nor failed.
        """
        return self.attempts - self.acks - len(self.failures)

    async def wait_acks(self, count: int, deadline: float = DEADLINE) -> None:
        """
        Wait until C{count} sends were acknowledged in all.
        """
        await wait_for(
            self.reactor,
            lambda: self.acks >= count or self.failures,
            f"{count} acknowledged sends (have {self.acks})",
            deadline,
        )
        assert not self.failures, self.failures[:10]

    async def stop(self, deadline: float = 60.0) -> None:
        """
        Stop sending and wait for the acknowledgements of what was sent.
        """
        self.running = False
        for loop in self._loops:
            await within(self.reactor, loop, deadline)
        assert not self.failures, self.failures[:10]

    def received(self, member: Member) -> dict[tuple[int, str], list[int]]:
        """
        The counters C{member} received, per (sender, conversation), in
        order of arrival.
        """
        out: dict[tuple[int, str], list[int]] = {}
        for m in member.recorder.messages:
            parts = m.text.split("|")
            if len(parts) != 4 or parts[0] != self.tag:
                continue
            sender, conversation, counter = int(parts[1]), parts[2], int(parts[3])
            assert sender == m.sender_id, f"{m} names another sender"
            assert conversation == m.conversation, f"{m} in the wrong conversation"
            out.setdefault((sender, conversation), []).append(counter)
        return out

    async def finish(self, deadline: float = 60.0) -> dict[str, int]:
        """
        Send the last message of every conversation, wait until they all
        arrived, and check what arrived.  @return: counts.
        """
        last: dict[tuple[int, str], int] = {}
        for member in self.members:
            for conversation in self.conversations(member):
                ack = self.send(member, conversation)
                last[(member.user_id, conversation)] = self.counters[
                    (member.user_id, conversation)
                ]
                await within(self.reactor, ack, deadline)
        assert not self.failures, self.failures[:10]

        def complete() -> bool:
            for member in self.members:
                got = self.received(member)
                for (sender, conversation), counter in last.items():
                    if member in self.recipients(conversation):
                        if counter not in got.get((sender, conversation), ()):
                            return False
            return True

        try:
            await wait_for(self.reactor, complete, "every last message", deadline)
        finally:
            report = self.check()
        return report

    def check(self) -> dict[str, int]:
        """
        Compare what each member received with what was acknowledged.
        """
        problems: list[str] = []
        delivered = lost = duplicated = disordered = unexpected = 0
        for member in self.members:
            got = self.received(member)
            for key, acked in self.acked.items():
                sender, conversation = key
                if member not in self.recipients(conversation):
                    continue
                counters = got.get(key, [])
                seen = set(counters)
                delivered += len(seen & acked)
                missing = sorted(acked - seen)
                extra = sorted(seen - acked)
                dups = len(counters) - len(seen)
                out_of_order = sum(1 for a, b in zip(counters, counters[1:]) if b < a)
                lost += len(missing)
                duplicated += dups
                disordered += out_of_order
                unexpected += len(extra)
                if missing or extra or dups or out_of_order:
                    problems.append(
                        f"{member.name} from {sender} in {conversation}: "
                        f"missing {missing[:10]} extra {extra[:10]} "
                        f"duplicates {dups} out of order {out_of_order}; "
                        f"arrival order {counters[:40]}"
                    )
        report = {
            "sent": sum(len(a) for a in self.acked.values()),
            "delivered": delivered,
            "lost": lost,
            "duplicated": duplicated,
            "out_of_order": disordered,
            "unexpected": unexpected,
        }
        assert not problems, f"{report}\n" + "\n".join(problems[:20])
        return report


async def assert_chats(reactor: Any, member: Member, other: Member) -> None:
    """
    C{member} can send to C{other} now, and C{other} gets it.
    """
    text = f"ping-{uuid.uuid4().hex[:8]}"
    await within(reactor, member.client.send_private(other.user_id, text))
    await wait_for(
        reactor,
        lambda: any(m.text == text for m in other.recorder.messages),
        f"{other.name} to get {text!r}",
    )


def assert_no_unhandled_errors(cluster: Cluster) -> None:
    """
    No daemon logged an unhandled error (a failure nobody handled).
    """
    for name, log in cluster.logs().items():
        assert "unhandled error" not in log.lower(), f"{name}:\n{log[-3000:]}"


# Redis


@pytest_twisted.ensureDeferred
async def test_redis_restart_under_load(
    reactor: Any, procs: Processes, clients: Any, zk_url: str
) -> None:
    """
    Redis is killed (C{kill -9}) while clients chat, and started again on
    its append-only file: the daemons reconnect, the library resends what
    was not acknowledged, and nothing is lost, duplicated or reordered.
    """
    redis = procs.redis()
    await redis.start(reactor)
    cluster = await procs.cluster(redis.url(), unique_root(zk_url)).start()
    members = await members_in_group(reactor, procs, cluster, 6, "redisfault")
    chat = Chat(reactor, members, "redisfault", seed=1)
    chat.start()
    await chat.wait_acks(60)
    redis.kill()
    # Some sends are made while Redis is down (they wait, or fail and are
    # sent again).
    attempts = chat.attempts
    await wait_for(
        reactor,
        lambda: chat.attempts >= attempts + 5 or chat.outstanding() >= 12,
        "sends while Redis is down",
    )
    await redis.start(reactor)
    acks = chat.acks
    await chat.wait_acks(acks + 100, 60)
    await chat.stop()
    report = await chat.finish()
    assert report["lost"] == report["duplicated"] == report["out_of_order"] == 0
    cluster.assert_running()
    assert_no_unhandled_errors(cluster)
    # New logins work.
    late = await login_member(reactor, procs, cluster, f"late-{uuid.uuid4().hex[:6]}")
    await assert_chats(reactor, late, members[0])


# The route


@pytest_twisted.ensureDeferred
async def test_route_restart(
    reactor: Any, procs: Processes, clients: Any, zk_url: str
) -> None:
    """
    The route stops while clients chat: they keep chatting over TCP (the
    servers push to each other without it), a new login fails; once the
    route is back, new logins work.
    """
    redis = procs.redis()
    await redis.start(reactor)
    cluster = await procs.cluster(redis.url(), unique_root(zk_url)).start()
    members = await members_in_group(reactor, procs, cluster, 4, "routefault")
    # Both servers hold some of them, so that chat crosses servers.
    assert {cluster.server_of(m.client) for m in members} == set(cluster.servers)
    chat = Chat(reactor, members, "routefault", seed=2)
    chat.start()
    await chat.wait_acks(40)
    await stop_daemon(reactor, cluster.route)
    acks = chat.acks
    await chat.wait_acks(acks + 80)
    name = f"new-{uuid.uuid4().hex[:6]}"
    newcomer, _ = new_client(reactor, procs, cluster.url, name)
    with pytest.raises(LoginError):
        await within(reactor, newcomer.login(name))
    assert all(m.client.ready for m in members)
    cluster.route.start()
    await wait_healthy(reactor, cluster.route, cluster.route_port)
    await cluster.wait_listed(set(cluster.servers))
    late = await login_member(reactor, procs, cluster, f"late-{uuid.uuid4().hex[:6]}")
    await assert_chats(reactor, late, members[0])
    await assert_chats(reactor, members[1], late)
    acks = chat.acks
    await chat.wait_acks(acks + 40)
    await chat.stop()
    report = await chat.finish()
    assert report["lost"] == report["duplicated"] == report["out_of_order"] == 0
    cluster.assert_running()
    assert_no_unhandled_errors(cluster)


# Clients that vanish


SILENT_CLIENT = """
import sys
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from cim.client.library import Client

async def main():
    client = Client(reactor, sys.argv[1], heartbeat_interval=1.0, pong_timeout=3.0,
                    idle_timeout=5.0, backoff_base=0.1, backoff_max=1.0)
    await client.login(sys.argv[2])
    print("ready", client.user_id, flush=True)

ensureDeferred(main()).addErrback(lambda f: (print(f, flush=True), reactor.stop()))
reactor.run()
"""


@pytest_twisted.ensureDeferred
async def test_vanished_clients_are_dropped(
    reactor: Any, procs: Processes, clients: Any, zk_url: str
) -> None:
    """
    A raw TCP client that logs in and goes silent, and a client process
    stopped with SIGSTOP, are dropped after the heartbeat timeout (3 s here)
    and their sessions freed; a client that heartbeats stays.  The stopped
    process, continued, logs in again by itself.
    """
    redis = procs.redis()
    await redis.start(reactor)
    cluster = await procs.cluster(
        redis.url(), unique_root(zk_url), server_args=["--heartbeat-timeout", "3"]
    ).start()
    healthy = await login_member(reactor, procs, cluster, f"ok-{uuid.uuid4().hex[:6]}")
    other = await login_member(reactor, procs, cluster, f"ok2-{uuid.uuid4().hex[:6]}")
    silent, silent_id = await raw_login(reactor, cluster, f"mute-{uuid.uuid4().hex}")
    silent_since = time.monotonic()
    name = f"frozen-{uuid.uuid4().hex[:6]}"
    process = procs.popen(
        [sys.executable, "-c", SILENT_CLIENT, cluster.url, name],
        cwd=str(ROOT),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    line = await within(reactor, deferToThread(process.stdout.readline), DEADLINE)
    assert line.startswith(b"ready "), line
    frozen_id = int(line.split()[1])
    online = await cluster.online()
    assert {silent_id, frozen_id, healthy.user_id, other.user_id} <= online
    process.send_signal(signal.SIGSTOP)
    try:
        await within(reactor, silent.closed, 20)
        assert silent.closed_at is not None
        # Not before the timeout.
        assert silent.closed_at - silent_since >= 2.5
        error = silent.find(Command.ERROR)
        assert error is not None and "heartbeat" in error.error_reason, silent.frames

        async def freed() -> bool:
            now = await cluster.online()
            return silent_id not in now and frozen_id not in now

        await wait_for_async(reactor, freed, "both sessions to be freed", 20)
    finally:
        process.send_signal(signal.SIGCONT)
    # The healthy clients were never dropped, and still chat.
    assert all(
        state != ClientState.RECONNECTING for state, _ in healthy.recorder.states
    )
    await assert_chats(reactor, healthy, other)
    # The continued process notices, and logs in again.

    async def back() -> bool:
        return frozen_id in await cluster.online()

    await wait_for_async(reactor, back, "the continued client to log in again", 20)
    cluster.assert_running()
    assert_no_unhandled_errors(cluster)


# ZooKeeper


class FastExpiryZooKeeper(ZooKeeperServer):
    """
    The private ZooKeeper of L{tests.zkserver}, with sessions that expire
    after at most C{max_session_ms} of silence (the registries ask for 10 s;
    the server grants at most this).
    """

    def __init__(self, reactor: Any, directory: Path, max_session_ms: int) -> None:
        super().__init__(reactor, directory)
        config = directory / "zoo.cfg"
        text = config.read_text()
        assert "maxSessionTimeout=60000" in text
        config.write_text(
            text.replace(
                "maxSessionTimeout=60000", f"maxSessionTimeout={max_session_ms}"
            )
        )


@pytest_twisted.async_yield_fixture
async def private_zk(reactor: Any, tmp_path: Path) -> Any:
    """
    A private ZooKeeper (sessions of at most 4 s), stopped at the end.
    """
    server = FastExpiryZooKeeper(reactor, tmp_path / "zookeeper", 4000)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class _Forwarded(portforward.ProxyServer):
    def connectionMade(self) -> None:
        self.factory.open.add(self)
        super().connectionMade()

    def connectionLost(self, reason: object = None) -> None:
        self.factory.open.discard(self)
        super().connectionLost(reason)


class _ForwardFactory(portforward.ProxyFactory):
    protocol = _Forwarded
    noisy = False

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.open: set[_Forwarded] = set()


class Link:
    """
    A TCP forwarder from a free port to C{target_port}, which the test can
    cut (connections dropped, new ones refused) and restore: a network
    partition between one daemon and a service.
    """

    def __init__(self, reactor: Any, target_port: int) -> None:
        self.reactor = reactor
        self.port = free_port()
        self.factory = _ForwardFactory("127.0.0.1", target_port)
        self._listening: Any = None

    async def restore(self) -> None:
        endpoint = endpoints.TCP4ServerEndpoint(
            self.reactor, self.port, interface="127.0.0.1"
        )
        self._listening = await endpoint.listen(self.factory)

    async def cut(self) -> None:
        if self._listening is not None:
            await self._listening.stopListening()
            self._listening = None
        for proxy in list(self.factory.open):
            for side in (proxy, proxy.peer):
                if side is not None and side.transport is not None:
                    side.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_zookeeper_restart(
    reactor: Any, private_zk: ZooKeeperServer, procs: Processes, clients: Any
) -> None:
    """
    ZooKeeper stops while clients chat: chat and logins go on with the
    cached server list; once it is back, every daemon reconnects and the
    route lists both servers.
    """
    redis = procs.redis()
    await redis.start(reactor)
    registry = f"zk://{private_zk.hosts}/cim"
    cluster = await procs.cluster(redis.url(), registry).start()
    members = await members_in_group(reactor, procs, cluster, 4, "zkrestart")
    chat = Chat(reactor, members, "zkrestart", seed=3)
    chat.start()
    await chat.wait_acks(40)
    await private_zk.stop()
    acks = chat.acks
    await chat.wait_acks(acks + 40)
    during = await login_member(reactor, procs, cluster, f"dz-{uuid.uuid4().hex[:6]}")
    await private_zk.start()

    async def reconnected() -> bool:
        body = await cluster.health()
        return bool(body["dataBody"]["registry"] == "connected")

    await wait_for_async(reactor, reconnected, "the route to reconnect")
    await cluster.wait_listed(set(cluster.servers))
    late = [
        await login_member(reactor, procs, cluster, f"lz{i}-{uuid.uuid4().hex[:6]}")
        for i in range(2)
    ]
    assert {cluster.server_of(m.client) for m in late} == set(cluster.servers)
    await assert_chats(reactor, late[0], during)
    await assert_chats(reactor, during, late[1])
    acks = chat.acks
    await chat.wait_acks(acks + 40)
    await chat.stop()
    report = await chat.finish()
    assert report["lost"] == report["duplicated"] == report["out_of_order"] == 0
    cluster.assert_running()
    assert_no_unhandled_errors(cluster)


@pytest_twisted.ensureDeferred
async def test_zookeeper_session_expiry(
    reactor: Any, private_zk: ZooKeeperServer, procs: Processes, clients: Any
) -> None:
    """
    One server is cut off from ZooKeeper (not from anything else) until its
    session expired and the other daemons' janitors had time to give it up:
    they find it still answers and keep its sessions, so its clients chat
    on.  Let through again, it gets a new session and registers again, the
    route lists it, and new logins land on it.
    """
    redis = procs.redis()
    await redis.start(reactor)
    link = Link(reactor, private_zk.port)
    await link.restore()
    cluster = procs.cluster(redis.url(), f"zk://{private_zk.hosts}/cim")
    cut_off = cluster.add_server("server1", registry=f"zk://127.0.0.1:{link.port}/cim")
    cluster.add_server("server2")
    try:
        await cluster.start()
        members = await members_in_group(reactor, procs, cluster, 4, "zkexpiry")
        chat = Chat(reactor, members, "zkexpiry", seed=4)
        chat.start()
        await chat.wait_acks(40)
        await link.cut()
        await cluster.wait_listed({"server2"}, 20)
        # Each janitor waits its grace, probes server1, and keeps its
        # sessions.
        for daemon in (cluster.route, cluster.servers["server2"].daemon):
            await wait_for(
                reactor,
                lambda daemon=daemon: cut_off.address in kept_by(daemon),
                f"{daemon.name} to find server1 alive",
                20,
                0.2,
            )
        assert {m.user_id for m in members} <= await cluster.online()
        acks = chat.acks
        await chat.wait_acks(acks + 40)
        await link.restore()
        await cluster.wait_listed({"server1", "server2"}, 20)
        log = cut_off.daemon.logfile.read_text()
        assert "connected to ZooKeeper with a new session" in log, log[-3000:]
        late = [
            await login_member(reactor, procs, cluster, f"le{i}-{uuid.uuid4().hex[:6]}")
            for i in range(2)
        ]
        assert {cluster.server_of(m.client) for m in late} == set(cluster.servers)
        await assert_chats(reactor, late[0], late[1])
        await assert_chats(reactor, late[1], members[0])
        acks = chat.acks
        await chat.wait_acks(acks + 40)
        await chat.stop()
        report = await chat.finish()
        assert report["lost"] == report["duplicated"] == report["out_of_order"] == 0
        assert {m.user_id for m in members + late} <= await cluster.online()
        cluster.assert_running()
        assert_no_unhandled_errors(cluster)
    finally:
        await cluster.stop()
        await link.cut()


def kept_by(daemon: Daemon) -> str:
    """
    The lines of C{daemon}'s log where its janitor kept the sessions of a
    server that left the registry but still answers.
    """
    try:
        lines = daemon.logfile.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(line for line in lines if "still answers" in line)
