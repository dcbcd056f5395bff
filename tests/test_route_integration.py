"""
The route with two real IM servers, on the real Redis and ZooKeeper
(C{CIM_TEST_REDIS}, C{CIM_TEST_ZK}): every service listens on a free port
of the test's reactor, under a Redis key prefix and a ZooKeeper root of the
test's own.  Test clients speak the TCP protocol (L{tests.kit.wire}).

Every wait is on an event, with a deadline.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed

from cim.interfaces import ServerAddress
from cim.message import Command, Cursor, Frame, pair_conversation
from cim.registry.zk import ZooKeeperRegistry
from cim.route.service import RouteConfig, RouteService
from cim.server.service import IMServerService, ServerConfig
from cim.store.redis import connect_redis
from tests.kit.http import http_client
from tests.kit.wire import WireClient, connect
from tests.test_registry import RawZooKeeper

pytestmark = pytest.mark.integration

SECRET = "integration-secret"
#: Seconds to wait for any one event.
DEADLINE = 10


@pytest.fixture
def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class User:
    def __init__(
        self, user_id: int, name: str, token: str, server: ServerAddress
    ) -> None:
        self.user_id = user_id
        self.name = name
        self.token = token
        self.server = server
        self.client: WireClient | None = None

    @property
    def tcp(self) -> WireClient:
        assert self.client is not None
        return self.client


class Cluster:
    """
    A route and two IM servers, and helpers to act as users.
    """

    def __init__(self, reactor: Any, redis_url: str, zk_hosts: str) -> None:
        self.reactor = reactor
        self.redis_url = redis_url
        self.zk_hosts = zk_hosts
        self.prefix = f"cimtest:{uuid.uuid4().hex}:"
        self.root = f"/cimtest-{uuid.uuid4().hex}"
        self.servers: list[IMServerService] = []
        self.route: RouteService | None = None
        self.clients: list[WireClient] = []
        #: The account keys of the accounts L{login} registered, by id.
        self.keys: dict[int, str] = {}
        self.http = http_client(reactor)

    def store_factory(self) -> Deferred[Any]:
        return connect_redis(self.redis_url, clock=self.reactor, prefix=self.prefix)

    def registry(self) -> ZooKeeperRegistry:
        return ZooKeeperRegistry(self.reactor, self.zk_hosts, root=self.root)

    async def start(self) -> None:
        for _ in range(2):
            server = IMServerService(
                self.reactor,
                ServerConfig(port=0, http_port=0, bind="127.0.0.1", secret=SECRET),
                self.store_factory,
                self.registry(),
            )
            self.servers.append(server)
            server.startService()
            await server.ready.addTimeout(DEADLINE, self.reactor)
        self.route = RouteService(
            self.reactor,
            RouteConfig(
                port=0, bind="127.0.0.1", secret=SECRET, balancer="round-robin"
            ),
            self.store_factory,
            self.registry(),
        )
        self.route.startService()
        await self.route.ready.addTimeout(DEADLINE, self.reactor)
        await self.route_sees(lambda servers: len(servers) == 2)

    async def stop(self) -> None:
        for client in self.clients:
            await client.hang_up()
        if self.route is not None and self.route.running:
            await self.route.stopService()
        for server in self.servers:
            if server.running:
                await server.stopService()
        store = await self.store_factory()
        redis = store._redis
        keys = await redis.execute_command("KEYS", self.prefix + "*")
        if keys:
            await redis.execute_command("DEL", *keys)
        await store.close()
        raw = RawZooKeeper(self.reactor, self.zk_hosts)
        await raw.start()
        try:
            await raw.call("delete", self.root, -1, True)
        finally:
            await raw.close()

    def addresses(self) -> list[ServerAddress]:
        return sorted(
            (s.address for s in self.servers if s.address is not None),
            key=lambda a: (a.host, a.port, a.http_port),
        )

    def route_sees(
        self, wanted: Callable[[list[ServerAddress]], bool]
    ) -> Deferred[None]:
        """
        Fire once the route's registry lists servers that satisfy C{wanted}.
        """
        assert self.route is not None
        registry = self.route.registry
        if wanted(registry.servers()):
            return succeed(None)
        d: Deferred[None] = Deferred()

        def changed(servers: list[ServerAddress]) -> None:
            if wanted(servers) and not d.called:
                d.callback(None)

        unwatch = registry.watch(changed)
        d.addBoth(lambda result: (unwatch(), result)[1])
        return d.addTimeout(DEADLINE, self.reactor)

    # HTTP

    async def call(self, path: str, body: Any = None, token: str | None = None) -> dict:
        assert self.route is not None
        headers: dict[bytes | str, list[bytes | str]] = {
            b"Content-Type": [b"application/json"],
            b"X-Cim-Extended": [b"1"],
        }
        if token is not None:
            headers[b"Authorization"] = [f"Bearer {token}".encode()]
        url = f"http://127.0.0.1:{self.route.port}{path}"
        if body is None:
            response = await self.http.get(url, headers=headers, timeout=DEADLINE)
        else:
            response = await self.http.post(
                url, data=json.dumps(body).encode(), headers=headers, timeout=DEADLINE
            )
        answer: dict = json.loads(await response.content())
        return answer

    async def ok(self, path: str, body: Any = None, token: str | None = None) -> Any:
        answer = await self.call(path, body, token)
        assert answer["code"] == "9000", (path, answer)
        return answer["dataBody"]

    # Users

    async def login(
        self,
        name: str,
        user_id: int | None = None,
        token: str = "",
        cursors: Sequence[Cursor] = (),
    ) -> User:
        """
        Register C{name} (unless C{user_id} is given), log in through the
        route (with C{token} as proof if given) and connect (resuming from
        C{cursors}).
        """
        if user_id is None:
            account = await self.ok("/registerAccount", {"userName": name})
            user_id = account["userId"]
            self.keys[user_id] = account["accountKey"]
        body = {"userId": user_id, "userName": name}
        if token:
            body["token"] = token
        elif user_id in self.keys:
            body["accountKey"] = self.keys[user_id]
        data = await self.ok("/login", body)
        user = User(
            user_id,
            name,
            data["token"],
            ServerAddress(data["ip"], data["cimServerPort"], data["httpPort"]),
        )
        await self.connect(user, cursors)
        return user

    async def connect(self, user: User, cursors: Sequence[Cursor] = ()) -> WireClient:
        client = await connect(
            self.reactor, user.server.port, user.server.host, timeout=DEADLINE
        )
        self.clients.append(client)
        user.client = client
        client.send_login(user.user_id, user.name, user.token, cursors)
        await client.wait_frame(Command.LOGIN_RESPONSE, DEADLINE)
        return client


@pytest_twisted.async_yield_fixture
async def cluster(
    reactor: Any, redis_url: str, zk_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Cluster]:
    cluster = Cluster(reactor, redis_url, urlsplit(zk_url).netloc)
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()


@pytest_twisted.ensureDeferred
async def test_users_land_where_the_balancer_says(cluster: Cluster) -> None:
    first, second = cluster.addresses()
    alice = await cluster.login("alice")
    bob = await cluster.login("bob")
    carol = await cluster.login("carol")
    # Round robin over the registry's sorted list.
    assert [alice.server, bob.server, carol.server] == [first, second, first]
    online = await cluster.ok("/onlineUser")
    assert online == [
        {"userId": u.user_id, "userName": u.name} for u in (alice, bob, carol)
    ]
    health = await cluster.ok("/health")
    assert health["servers"] == [str(first), str(second)]
    assert health["store"] == "ok"


@pytest_twisted.ensureDeferred
async def test_chat_over_http_between_servers(cluster: Cluster) -> None:
    alice = await cluster.login("alice")
    bob = await cluster.login("bob")
    assert alice.server != bob.server

    sent = await cluster.ok(
        "/p2pRoute",
        {"userId": alice.user_id, "receiveUserId": bob.user_id, "msg": "hi bob"},
        alice.token,
    )
    [message] = await bob.tcp.wait_texts(["hi bob"])
    assert (message.msg_id, message.seq) == (sent["msgId"], sent["seq"])
    assert (message.sender_id, message.conversation) == (
        alice.user_id,
        pair_conversation(alice.user_id, bob.user_id),
    )
    # Alice's connection gets what it sent too (one stream for both sides).
    await alice.tcp.wait_texts(["hi bob"])

    await cluster.ok(
        "/groupRoute", {"userId": bob.user_id, "msg": "hello all"}, bob.token
    )
    await alice.tcp.wait_texts(["hello all"])

    await cluster.ok(
        "/group/create",
        {"userId": alice.user_id, "groupId": "team", "policy": "open"},
        alice.token,
    )
    await cluster.ok(
        "/group/join", {"userId": bob.user_id, "groupId": "team"}, bob.token
    )
    body = {"userId": alice.user_id, "groupId": "team", "batchMsg": ["one", "two"]}
    await cluster.ok("/group/send", body, alice.token)
    got = await bob.tcp.wait_texts(["one", "two"])
    assert [m.group_id for m in got] == ["team", "team"]
    await alice.tcp.wait_texts(["one", "two"])  # the sender gets its own too
    history = await cluster.ok(
        "/history", {"userId": bob.user_id, "conversation": "g:team"}, bob.token
    )
    assert [m["msg"] for m in history] == ["one", "two"]


@pytest_twisted.ensureDeferred
async def test_chat_over_tcp_between_servers(cluster: Cluster) -> None:
    alice = await cluster.login("alice")
    bob = await cluster.login("bob")
    assert alice.server != bob.server

    alice.tcp.send(
        Frame(
            cmd=Command.MESSAGE,
            req_msg="psst",
            receive_user_id=bob.user_id,
            client_msg_id="a-1",
        )
    )
    ack = await alice.tcp.wait_frame(Command.ACK)
    assert ack.client_msg_id == "a-1"
    [message] = await bob.tcp.wait_texts(["psst"])
    assert (message.msg_id, message.sender_id) == (ack.msg_id, alice.user_id)

    await cluster.ok(
        "/group/create",
        {"userId": bob.user_id, "groupId": "g1", "policy": "open"},
        bob.token,
    )
    await cluster.ok(
        "/group/join", {"userId": alice.user_id, "groupId": "g1"}, alice.token
    )
    bob.tcp.send(
        Frame(cmd=Command.MESSAGE, req_msg="to g1", group_id="g1", client_msg_id="b-1")
    )
    [message] = await alice.tcp.wait_texts(["to g1"])
    assert message.group_id == "g1" and message.sender_id == bob.user_id


@pytest_twisted.ensureDeferred
async def test_offline_messages_arrive_at_login_in_order(cluster: Cluster) -> None:
    alice = await cluster.login("alice")
    bob = await cluster.login("bob")
    await cluster.ok(
        "/p2pRoute",
        {"userId": alice.user_id, "receiveUserId": bob.user_id, "msg": "before"},
        alice.token,
    )
    await bob.tcp.wait_texts(["before"])
    cursors = bob.tcp.cursors()

    await cluster.ok("/offLine", {"userId": bob.user_id}, bob.token)
    await bob.tcp.closed.addTimeout(DEADLINE, cluster.reactor)  # kicked by its server
    online = await cluster.ok("/onlineUser")
    assert [u["userId"] for u in online] == [alice.user_id]

    body = {
        "userId": alice.user_id,
        "receiveUserId": bob.user_id,
        "batchMsg": ["m1", "m2"],
    }
    answer = await cluster.call("/p2pRoute", body, alice.token)
    assert answer["code"] == "7000"
    answer = await cluster.call(
        "/p2pRoute",
        {"userId": alice.user_id, "receiveUserId": bob.user_id, "msg": "m3"},
        alice.token,
    )
    assert answer["code"] == "7000"

    # Bob comes back, resuming from what he had.
    pair = pair_conversation(alice.user_id, bob.user_id)
    assert [(c.conversation, c.seq) for c in cursors] == [(pair, 1)]
    again = await cluster.login("bob", user_id=bob.user_id, cursors=cursors)
    got = await again.tcp.wait_texts(["m1", "m2", "m3"])
    assert [m.seq for m in got] == [2, 3, 4]
    assert [m.text for m in again.tcp.messages()] == ["m1", "m2", "m3"]
    assert {f.cmd for f in again.tcp.frames if f.messages} == {Command.OFFLINE}
    assert [m.text for m in bob.tcp.messages()] == ["before"]


@pytest_twisted.ensureDeferred
async def test_login_after_a_server_died(cluster: Cluster) -> None:
    alice = await cluster.login("alice")
    bob = await cluster.login("bob")
    dead = next(s for s in cluster.servers if s.address == bob.server)
    living = next(s for s in cluster.servers if s is not dead)
    await dead.stopService()
    # Its clients were told to go, and their sessions released.
    await bob.tcp.closed.addTimeout(DEADLINE, cluster.reactor)
    # Whether or not the route has seen the server go yet, logins land on
    # the living one (a dead server fails the probe).
    for name in ("carol", "dave"):
        user = await cluster.login(name)
        assert user.server == living.address
    again = await cluster.login("bob", user_id=bob.user_id)
    assert again.server == living.address
    await cluster.route_sees(lambda servers: servers == [living.address])
    await cluster.ok(
        "/p2pRoute",
        {"userId": alice.user_id, "receiveUserId": bob.user_id, "msg": "still here?"},
        alice.token,
    )
    await again.tcp.wait_texts(["still here?"])
