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

The processes are L{tests.kit}'s; the helpers here (L{Lab}, the C{procs}
and C{clients} fixtures, L{Chat}, the logins) are shared with
C{test_security} and C{test_slowloris}.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredSemaphore, ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from cim.client.library import Ack, Client, ClientState, IClientListener, LoginError
from cim.message import (
    ChatMessage,
    Command,
    group_conversation,
    pair_conversation,
    pair_members,
    peer_of,
)
from tests.kit.cluster import Cluster, Daemon, Processes
from tests.kit.http import call
from tests.kit.net import Link
from tests.kit.services import RedisServer, ZooKeeperServer
from tests.kit.wait import DEADLINE, wait_until, within
from tests.kit.wire import WireClient, connect

pytestmark = pytest.mark.integration

SECRET = "faults-cluster-secret"


class Lab(Processes):
    """
    Everything a test starts: processes (every one stopped by
    L{Processes.stop_all}, the C{procs} fixture's teardown, even when the
    test fails) and library clients (closed by the C{clients} fixture).
    """

    def __init__(self, reactor: Any, directory: Path) -> None:
        super().__init__(directory, reactor)
        self.clients: list[Client] = []
        self._clusters = 0

    def redis(self, name: str = "redis") -> RedisServer:
        """
        A private Redis (not started).
        """
        return RedisServer(self.directory / name, self)

    async def redis_cluster(
        self, reactor: Any, zk_url: str, servers: int = 2, **kwargs: Any
    ) -> tuple[RedisServer, Cluster]:
        """
        A private Redis, and a cluster on it (L{cluster}) under a ZooKeeper
        root of its own: both started.
        """
        redis = self.redis()
        await redis.start(reactor)
        cluster = self.cluster(redis.url(), unique_root(zk_url), **kwargs)
        return redis, await cluster.start(servers)

    def cluster(self, store: str, registry: str, **kwargs: Any) -> Cluster:
        """
        A route and servers (not started) spreading logins round robin, so
        that consecutive logins alternate between the servers.
        """
        kwargs["route_args"] = [
            "--balancer",
            "round-robin",
            *kwargs.get("route_args", ()),
        ]
        self._clusters += 1
        return Cluster(
            self,
            self.directory / f"cluster{self._clusters - 1}",
            store,
            registry,
            SECRET,
            **kwargs,
        )


@pytest.fixture
def procs(reactor: Any, tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(reactor, tmp_path)
    try:
        yield lab
    finally:
        lab.stop_all()


@pytest_twisted.async_yield_fixture
async def clients(reactor: Any, procs: Lab) -> Any:
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
    reactor: Any, procs: Lab, url: str, name: str, **kwargs: Any
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
    reactor: Any, procs: Lab, cluster: Cluster, name: str, **kwargs: Any
) -> Member:
    client, recorder = new_client(reactor, procs, cluster.url, name, **kwargs)
    await within(reactor, client.login(name))
    return Member(name, client, recorder)


async def members_in_group(
    reactor: Any, procs: Lab, cluster: Cluster, count: int, group: str
) -> list[Member]:
    """
    C{count} logged-in clients (alternating between the servers), all
    members of C{group}.
    """
    tag = uuid.uuid4().hex[:6]
    members = []
    for i in range(count):
        members.append(await login_member(reactor, procs, cluster, f"m{i}-{tag}"))
    await within(reactor, members[0].client.create_group(group, policy="open"))
    for member in members[1:]:
        await within(reactor, member.client.join_group(group))
    return members


#: The accounts L{route_login} registered: (store URL, name) -> the
#: registration's credentials (id, and account key or password).
_REGISTERED: dict[tuple[str, str], dict[str, Any]] = {}


async def route_login(
    reactor: Any, cluster: Cluster, name: str, password: str | None = None
) -> dict[str, Any]:
    """
    Register C{name} (the first time) and log it in at the route, with the
    account's credential.  @return: the login's C{dataBody} (C{ip},
    C{cimServerPort}, C{token}, C{userId}...).
    """
    known = _REGISTERED.get((cluster.store, name))
    if known is None:
        body: dict[str, Any] = {"userName": name}
        if password is not None:
            body["password"] = password
        _, reply = await call(reactor, f"{cluster.url}/registerAccount", body)
        assert reply["code"] == "9000", reply
        body["userId"] = reply["dataBody"]["userId"]
        if "accountKey" in reply["dataBody"]:
            body["accountKey"] = reply["dataBody"]["accountKey"]
        known = _REGISTERED[(cluster.store, name)] = body
    _, reply = await call(reactor, f"{cluster.url}/login", known)
    assert reply["code"] == "9000", reply
    data: dict[str, Any] = reply["dataBody"]
    return data


async def raw_login(
    reactor: Any, cluster: Cluster, name: str
) -> tuple[WireClient, int]:
    """
    A raw TCP client logged in as a new user C{name}, with its token.
    """
    info = await route_login(reactor, cluster, name)
    raw = await connect(reactor, int(info["cimServerPort"]))
    raw.send_login(int(info["userId"]), name, info["token"])
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
            pair_conversation(member.user_id, m.user_id)
            for m in self.members
            if m is not member
        ]

    def recipients(self, conversation: str) -> list[Member]:
        """
        Who gets the messages of C{conversation}: a group's members, or
        both users of a private conversation (a sender gets its own too).
        """
        if conversation.startswith("g:"):
            return list(self.members)
        pair = pair_members(conversation) or ()
        return [m for m in self.members if m.user_id in pair]

    def send(self, member: Member, conversation: str) -> Deferred[Ack]:
        key = (member.user_id, conversation)
        counter = self.counters[key] = self.counters.get(key, 0) + 1
        text = f"{self.tag}|{member.user_id}|{conversation}|{counter}"
        if conversation.startswith("g:"):
            d = member.client.send_group(self.group, text)
        else:
            peer = peer_of(conversation, member.user_id)
            assert peer is not None, conversation
            d = member.client.send_private(peer, text)
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
        await wait_until(
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
            await wait_until(self.reactor, complete, "every last message", deadline)
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
    await wait_until(
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
    reactor: Any, procs: Lab, clients: Any, zk_url: str
) -> None:
    """
    Redis is killed (C{kill -9}) while clients chat, and started again on
    its append-only file: the daemons reconnect, the library resends what
    was not acknowledged, and nothing is lost, duplicated or reordered.
    """
    redis, cluster = await procs.redis_cluster(reactor, zk_url)
    members = await members_in_group(reactor, procs, cluster, 6, "redisfault")
    chat = Chat(reactor, members, "redisfault", seed=1)
    chat.start()
    await chat.wait_acks(60)
    redis.kill()
    # Some sends are made while Redis is down (they wait, or fail and are
    # sent again).
    attempts = chat.attempts
    await wait_until(
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
    reactor: Any, procs: Lab, clients: Any, zk_url: str
) -> None:
    """
    The route stops while clients chat: they keep chatting over TCP (the
    servers push to each other without it), a new login fails; once the
    route is back, new logins work.
    """
    _, cluster = await procs.redis_cluster(reactor, zk_url)
    members = await members_in_group(reactor, procs, cluster, 4, "routefault")
    # Both servers hold some of them, so that chat crosses servers.
    assert {cluster.server_of(m.client) for m in members} == set(cluster.servers)
    chat = Chat(reactor, members, "routefault", seed=2)
    chat.start()
    await chat.wait_acks(40)
    await cluster.route.stop(reactor)
    acks = chat.acks
    await chat.wait_acks(acks + 80)
    name = f"new-{uuid.uuid4().hex[:6]}"
    newcomer, _ = new_client(reactor, procs, cluster.url, name)
    with pytest.raises(LoginError):
        await within(reactor, newcomer.login(name))
    assert all(m.client.ready for m in members)
    cluster.route.start(keep_ports=True)  # where the clients look for it
    await cluster.route.wait_ready(reactor)
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
    reactor: Any, procs: Lab, clients: Any, zk_url: str
) -> None:
    """
    A raw TCP client that logs in and goes silent, and a client process
    stopped with SIGSTOP, are dropped after the heartbeat timeout (3 s here)
    and their sessions freed; a client that heartbeats stays.  The stopped
    process, continued, logs in again by itself.
    """
    _, cluster = await procs.redis_cluster(
        reactor, zk_url, server_args=["--heartbeat-timeout", "3"]
    )
    healthy = await login_member(reactor, procs, cluster, f"ok-{uuid.uuid4().hex[:6]}")
    other = await login_member(reactor, procs, cluster, f"ok2-{uuid.uuid4().hex[:6]}")
    silent, silent_id = await raw_login(reactor, cluster, f"mute-{uuid.uuid4().hex}")
    silent_since = time.monotonic()
    name = f"frozen-{uuid.uuid4().hex[:6]}"
    process = procs.spawn(
        "frozen-client",
        [sys.executable, "-c", SILENT_CLIENT, cluster.url, name],
        procs.directory / "frozen-client.log",
        stdout=subprocess.PIPE,
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

        await wait_until(
            reactor, freed, "both sessions to be freed", 20, 0.1, (Exception,)
        )
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

    await wait_until(
        reactor, back, "the continued client to log in again", 20, 0.1, (Exception,)
    )
    cluster.assert_running()
    assert_no_unhandled_errors(cluster)


# ZooKeeper


@pytest_twisted.async_yield_fixture
async def private_zk(reactor: Any, tmp_path: Path) -> Any:
    """
    A private ZooKeeper (sessions of at most 4 s), stopped at the end.
    """
    server = ZooKeeperServer(tmp_path / "zookeeper", max_session_ms=4000)
    await server.start(reactor)
    try:
        yield server
    finally:
        await server.stop(reactor)


@pytest_twisted.ensureDeferred
async def test_zookeeper_restart(
    reactor: Any, private_zk: ZooKeeperServer, procs: Lab, clients: Any
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
    await private_zk.stop(reactor)
    acks = chat.acks
    await chat.wait_acks(acks + 40)
    during = await login_member(reactor, procs, cluster, f"dz-{uuid.uuid4().hex[:6]}")
    await private_zk.start(reactor)

    async def reconnected() -> bool:
        body = await cluster.health()
        return bool(body["dataBody"]["registry"] == "connected")

    await wait_until(
        reactor, reconnected, "the route to reconnect", DEADLINE, 0.1, (Exception,)
    )
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
    reactor: Any, private_zk: ZooKeeperServer, procs: Lab, clients: Any
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
    link.listen()
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
            await wait_until(
                reactor,
                lambda daemon=daemon: cut_off.address in kept_by(daemon),
                f"{daemon.name} to find server1 alive",
                20,
                0.2,
            )
        assert {m.user_id for m in members} <= await cluster.online()
        acks = chat.acks
        await chat.wait_acks(acks + 40)
        link.listen()
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
