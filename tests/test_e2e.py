"""
End to end on real processes: Redis, ZooKeeper, one C{twistd cim-route} and
two C{twistd cim-server}s, driven with the client library and over HTTP as
users and back-ends would.  Each scenario uses its own users.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_twisted
import treq
from kazoo.client import KazooClient

from cim.client.library import Client, ClientState, QueueListener
from cim.message import pair_conversation
from tests.clientkit import take_messages, wait_state
from tests.kit.cluster import Cluster, Processes
from tests.kit.wait import take_until, wait_until, within

pytestmark = pytest.mark.integration

SECRET = "e2e-cluster-secret"
#: The Redis database the end-to-end cluster uses.
E2E_DB = 7


class E2ECluster(Cluster):
    """
    The daemons of one test module (servers with a 10 s heartbeat
    timeout), under a ZooKeeper root of their own.
    """

    def __init__(
        self, processes: Processes, directory: Path, redis: str, zk_hosts: str
    ) -> None:
        self.zk_hosts = zk_hosts
        self.root = f"/cime2e-{uuid.uuid4().hex[:8]}"
        super().__init__(
            processes,
            directory,
            redis,
            f"zk://{zk_hosts}{self.root}",
            SECRET,
            server_args=["--heartbeat-timeout", "10"],
        )

    def registered(self) -> list[str]:
        zk = KazooClient(hosts=self.zk_hosts)
        zk.start(10)
        try:
            return sorted(zk.get_children(self.root))
        finally:
            zk.stop()
            zk.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2ECluster]:
    import os

    from twisted.internet import reactor

    redis = os.environ.get("CIM_TEST_REDIS")
    zk = os.environ.get("CIM_TEST_ZK")
    if not redis or not zk:
        if os.environ.get("CI"):
            pytest.fail("CIM_TEST_REDIS / CIM_TEST_ZK not set; run `make test`")
        pytest.skip("needs Redis and ZooKeeper (make test)")
    directory = tmp_path_factory.mktemp("e2e")
    processes = Processes(directory, reactor)
    # A database of its own, emptied first.
    cluster = E2ECluster(processes, directory, redis_url_db(redis), urlsplit(zk).netloc)
    redis_cli(cluster.store, "FLUSHDB")
    try:
        cluster.start_blocking()
        yield cluster
    finally:
        processes.stop_all()


async def client(
    reactor: Any, cluster: E2ECluster, name: str, state: Path
) -> tuple[Client, QueueListener]:
    events = QueueListener()
    c = Client(reactor, cluster.url, listener=events, state_dir=state / name)
    await within(reactor, c.login(name))
    return c, events


async def post(
    cluster: E2ECluster,
    path: str,
    body: dict,
    token: str | None = None,
    secret: bool = False,
) -> dict:
    headers = {b"Content-Type": [b"application/json"], b"X-Cim-Extended": [b"1"]}
    if token:
        headers[b"Authorization"] = [f"Bearer {token}".encode()]
    if secret:
        headers[b"X-Cim-Secret"] = [SECRET.encode()]
    response = await treq.post(
        cluster.url + path, data=json.dumps(body).encode(), headers=headers
    )
    return json.loads(await response.content())  # type: ignore[no-any-return]


def redis_url_db(url: str) -> str:
    return f"redis://{urlsplit(url).netloc}/{E2E_DB}"


def redis_cli(url: str, *command: str) -> str:
    """
    Run one Redis command on the e2e database (test set-up and checks).
    """
    parts = urlsplit(url)
    result = subprocess.run(
        ["redis-cli", "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379),
         "-n", str(E2E_DB), *command],
        capture_output=True, text=True, check=True, timeout=10,
    )  # fmt: skip
    return result.stdout.strip()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest_twisted.ensureDeferred
async def test_group_chat(reactor: Any, cluster: E2ECluster, tmp_path: Path) -> None:
    a, _ = await client(reactor, cluster, unique("ga"), tmp_path)
    b, b_events = await client(reactor, cluster, unique("gb"), tmp_path)
    c, c_events = await client(reactor, cluster, unique("gc"), tmp_path)
    try:
        text = unique("hello everybody")
        await within(reactor, a.broadcast(text))
        for events in (b_events, c_events):
            # Other tests' broadcasts may arrive too; find ours.
            async def ours(events: QueueListener = events) -> Any:
                while True:
                    m = await events.messages.get()
                    if m.text == text:
                        return m

            got = await within(reactor, ours())
            assert (got.sender_id, got.sender_name) == (a.user_id, a.user_name)
    finally:
        for x in (a, b, c):
            await x.close()


@pytest_twisted.ensureDeferred
async def test_private_chat_and_batches(
    reactor: Any, cluster: E2ECluster, tmp_path: Path
) -> None:
    a, a_events = await client(reactor, cluster, unique("pa"), tmp_path)
    b, b_events = await client(reactor, cluster, unique("pb"), tmp_path)
    c, c_events = await client(reactor, cluster, unique("pc"), tmp_path)
    try:
        assert c.user_id is not None and a.user_id is not None
        await within(reactor, a.send_private(c.user_id, "for c only"))
        [got] = await take_messages(reactor, c_events, 1)
        assert (got.text, got.sender_id, got.conversation) == (
            "for c only",
            a.user_id,
            pair_conversation(a.user_id, c.user_id),
        )
        reply = await post(
            cluster,
            "/p2pRoute",
            {
                "userId": b.user_id,
                "receiveUserId": a.user_id,
                "batchMsg": ["one", "two", "three"],
            },
            token=b.token,
        )
        assert reply["code"] == "9000", reply
        # (a's own message to c is in a's view too.)
        [own] = await take_messages(reactor, a_events, 1)
        assert (own.text, own.sender_id) == ("for c only", a.user_id)
        got3 = await take_messages(reactor, a_events, 3)
        assert [m.text for m in got3] == ["one", "two", "three"]
        assert [m.seq for m in got3] == sorted(m.seq for m in got3)
        assert {m.sender_name for m in got3} == {b.user_name}
        # The sender's device gets them too (its side of the conversation);
        # nobody else does.
        mine = await take_messages(reactor, b_events, 3)
        assert [m.text for m in mine] == ["one", "two", "three"]
        assert {m.conversation for m in mine} == {
            pair_conversation(a.user_id, b.user_id)
        }
        assert [
            m for m in c_events.pending_messages() if m.sender_id == b.user_id
        ] == []
    finally:
        for x in (a, b, c):
            await x.close()


@pytest_twisted.ensureDeferred
async def test_online_users(reactor: Any, cluster: E2ECluster, tmp_path: Path) -> None:
    a, _ = await client(reactor, cluster, unique("oa"), tmp_path)
    b, _ = await client(reactor, cluster, unique("ob"), tmp_path)
    try:
        names = {u.user_name for u in await within(reactor, a.online_users())}
        assert {a.user_name, b.user_name} <= names
        await b.close()
        names = {u.user_name for u in await within(reactor, a.online_users())}
        assert a.user_name in names and b.user_name not in names
    finally:
        await a.close()
        await b.close()


@pytest_twisted.ensureDeferred
async def test_duplicate_login(
    reactor: Any, cluster: E2ECluster, tmp_path: Path
) -> None:
    # Without proof: refused (9100: no credential), the first session intact.
    plain, _ = await client(reactor, cluster, unique("dupp"), tmp_path)
    reply = await post(
        cluster, "/login", {"userId": plain.user_id, "userName": plain.user_name}
    )
    assert reply["code"] == "9100", reply
    assert plain.ready
    await plain.close()
    # With proof (the password): another device logs in beside the first;
    # both get the user's messages.  The same device again replaces it.
    name = unique("dup")
    first_events = QueueListener()
    first = Client(
        reactor, cluster.url, listener=first_events, state_dir=tmp_path / "first"
    )
    await within(reactor, first.login(name, password="pw-of-dup"))
    second_events = QueueListener()
    second = Client(
        reactor, cluster.url, listener=second_events, state_dir=tmp_path / "second"
    )
    third_events = QueueListener()
    third = Client(
        reactor,
        cluster.url,
        listener=third_events,
        state_dir=tmp_path / "third",
        device=first.device,
    )
    sender, _ = await client(reactor, cluster, unique("dups"), tmp_path)
    try:
        await within(reactor, second.login(name, password="pw-of-dup"))
        assert second.ready and first.ready
        assert first.device != second.device
        assert second.user_id is not None
        await within(reactor, sender.send_private(second.user_id, "to both devices"))
        for events in (first_events, second_events):
            [got] = await take_messages(reactor, events, 1)
            assert got.text == "to both devices"
        await within(reactor, third.login(name, password="pw-of-dup"))
        await wait_until(
            reactor, lambda: not first.ready, "the first client to be replaced"
        )
        await within(reactor, sender.send_private(second.user_id, "after"))
        for events in (second_events, third_events):
            got = await take_until(
                reactor, events.messages, lambda m: m.text == "after", "after"
            )
            assert got.sender_id == sender.user_id
        assert first_events.pending_messages() == []
    finally:
        for c in (first, second, third, sender):
            await c.close()


@pytest_twisted.ensureDeferred
async def test_offline_messages(
    reactor: Any, cluster: E2ECluster, tmp_path: Path
) -> None:
    a, _ = await client(reactor, cluster, unique("fa"), tmp_path)
    b_name = unique("fb")
    b, _ = await client(reactor, cluster, b_name, tmp_path)
    b_id = b.user_id
    assert b_id is not None
    await b.close()
    try:
        for i in range(3):
            await within(reactor, a.send_private(b_id, f"while away {i}"))
        again, events = await client(reactor, cluster, b_name, tmp_path)
        got = await take_messages(reactor, events, 3)
        assert [m.text for m in got] == [f"while away {i}" for i in range(3)]
        # Once: nothing more comes (a ping round trip flushes the pipe).
        assert events.pending_messages() == []
        await again.close()
    finally:
        await a.close()


@pytest_twisted.ensureDeferred
async def test_server_failure(
    reactor: Any, cluster: E2ECluster, tmp_path: Path
) -> None:
    a, _ = await client(reactor, cluster, unique("ka"), tmp_path)
    b, b_events = await client(reactor, cluster, unique("kb"), tmp_path)
    assert b.user_id is not None
    victim = cluster.server_of(b)
    victim_address = cluster.servers[victim].address
    daemon = cluster.servers[victim].daemon
    sent = []
    try:
        for i in range(5):
            sent.append(f"before {i}")
            await within(reactor, a.send_private(b.user_id, sent[-1]))
        b_events.states.pending.clear()
        daemon.kill()
        # A keeps sending (its own server may be the dead one: its library
        # resends once it reconnected).
        pending = []
        for i in range(10):
            sent.append(f"during {i}")
            pending.append(a.send_private(b.user_id, sent[-1]))
        start = reactor.seconds()
        await wait_state(reactor, b_events, ClientState.READY)
        assert reactor.seconds() - start < 10
        assert cluster.server_of(b) != victim
        for d in pending:
            await within(reactor, d, 20)
        got = await take_messages(reactor, b_events, len(sent), 20)
        assert [m.text for m in got] == sent
        assert b_events.pending_messages() == []
        # The dead server's node and sessions go away.
        await wait_until(
            reactor,
            lambda: victim_address not in cluster.registered(),
            "the dead server's node to vanish",
            interval=0.5,
        )
        await wait_until(
            reactor,
            lambda: (
                redis_cli(cluster.store, "SCARD", f"cim:server:{victim_address}") == "0"
            ),
            "the dead server's sessions to be dropped",
            interval=0.5,
        )
    finally:
        await a.close()
        await b.close()
        # Later tests get their two servers back.
        daemon.start()
        await daemon.wait_ready(reactor)


@pytest_twisted.ensureDeferred
async def test_new_server_receives_logins(
    reactor: Any, cluster: E2ECluster, tmp_path: Path
) -> None:
    third = (await cluster.start_server("server3")).address
    await wait_until(
        reactor,
        lambda: third in cluster.registered(),
        "server3 to register",
        interval=0.5,
    )
    clients = []
    try:
        # With consistent hashing, some of a few dozen fresh users land there.
        for i in range(40):
            c, _ = await client(reactor, cluster, unique(f"n{i}"), tmp_path)
            clients.append(c)
            if cluster.server_of(c) == "server3":
                break
        assert any(cluster.server_of(c) == "server3" for c in clients)
    finally:
        for c in clients:
            await c.close()
        await cluster.servers.pop("server3").daemon.stop(reactor)
