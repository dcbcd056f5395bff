"""
Tests for the route's HTTP API (L{cim.route.api}, L{cim.route.logic}),
driven in memory: L{StubTreq} over a L{MemoryStore} with a fake clock, a
L{LocalRegistry} with fake servers, a fake probe and a fake pusher.  Every
Deferred fires at once, so the tests are synchronous.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any, cast

import pytest
import pytest_twisted
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import implementer

from cim.delivery import DeliveryReport, IPusher
from cim.envelope import ApiError
from cim.interfaces import NewMessage, ServerAddress, StoreError
from cim.message import (
    BROADCAST,
    ChatMessage,
    group_conversation,
    pair_conversation,
)
from cim.registry.local import LocalBoard, LocalRegistry
from cim.route import tap
from cim.route.api import RouteAPI
from cim.route.balancer import Balancer, RoundRobin
from cim.route.logic import Credentials
from cim.route.service import PROBE_CACHE, RouteConfig, RouteService, tcp_probe
from cim.store.memory import MemoryStore
from cim.web import QuietSite

SECRET = "the-cluster-secret"
A = ServerAddress("10.0.0.1", 11211, 8081)
B = ServerAddress("10.0.0.2", 11211, 8081)
C = ServerAddress("10.0.0.3", 11211, 8081)


def result(d: Deferred[Any]) -> Any:
    """
    The result of a Deferred that has fired (a failure is raised).
    """
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


@implementer(IPusher)
class FakePusher:
    """
    Records what the route asks of IM servers.

    @ivar down: servers that cannot be reached.
    @ivar absent: users that are not connected where their session says.
    @ivar resync_code: what servers answer to a resync.
    """

    def __init__(self) -> None:
        self.pushes: list[tuple[str, list[ChatMessage], list[int]]] = []
        self.kicks: list[tuple[str, int, str, str]] = []
        self.logged_off: list[int] = []
        self.resyncs: list[tuple[str, int]] = []
        self.down: set[str] = set()
        self.absent: set[int] = set()
        self.resync_code = "9000"

    def push(
        self, server: str, messages: Sequence[ChatMessage], user_ids: Sequence[int]
    ) -> Deferred[list[int]]:
        self.pushes.append((server, list(messages), list(user_ids)))
        if server in self.down:
            return fail(ConnectionRefusedError(server))
        return succeed([u for u in user_ids if u in self.absent])

    def kick(
        self,
        server: str,
        user_id: int,
        session_id: str,
        reason: str,
        logged_off: bool = False,
    ) -> Deferred[Any]:
        self.kicks.append((server, user_id, session_id, reason))
        if logged_off:
            self.logged_off.append(user_id)
        if server in self.down:
            return fail(ConnectionRefusedError(server))
        return succeed({"code": "9000", "dataBody": {"kicked": True}})

    def resync(self, server: str, user_id: int) -> Deferred[Any]:
        self.resyncs.append((server, user_id))
        if server in self.down:
            return fail(ConnectionRefusedError(server))
        return succeed({"code": self.resync_code})


class FakeDelivery:
    """
    The delivery core as the route uses it (L{cim.route.logic.
    RouteDelivery}, implemented by L{cim.delivery.Delivery}): appends to
    the store, and delivers with one push per server holding a connected
    session (device) of a recipient; a user counts as delivered when one
    of its servers took the messages.  Read notices are recorded.

    @ivar reads: the L{deliver_read} calls: (reader, conversation, seq,
        user ids).
    """

    def __init__(self, store: MemoryStore, pusher: FakePusher) -> None:
        self.store = store
        self.pusher = pusher
        self.reads: list[tuple[int, str, int, list[int]]] = []

    def append(self, messages: list[NewMessage]) -> Deferred[list[ChatMessage]]:
        return self.store.append(messages)

    def deliver(
        self, messages: Sequence[ChatMessage], user_ids: Sequence[int]
    ) -> Deferred[DeliveryReport]:
        report = DeliveryReport()
        sessions = result(self.store.get_sessions(list(user_ids)))
        servers: dict[str, list[int]] = {}
        for user_id in user_ids:
            for server in sorted({s.server for s in sessions.get(user_id, [])}):
                servers.setdefault(server, []).append(user_id)
        reached: set[int] = set()
        failed: set[int] = set()
        for server, users in servers.items():
            outcome = self.pusher.push(server, messages, users)
            try:
                missing = result(outcome)
            except Exception:
                failed.update(users)
                continue
            reached.update(u for u in users if u not in missing)
        for user_id in user_ids:
            if user_id in reached:
                report.delivered.append(user_id)
            elif user_id in failed:
                report.failed.append(user_id)
            else:
                report.offline.append(user_id)
        return succeed(report)

    def deliver_read(
        self, reader_id: int, conversation: str, seq: int, user_ids: Sequence[int]
    ) -> Deferred[DeliveryReport]:
        self.reads.append((reader_id, conversation, seq, list(user_ids)))
        return succeed(DeliveryReport(delivered=list(user_ids)))


class Route:
    """
    A route app over in-memory backends, with helpers to call it.

    @ivar reachable: the servers the fake probe finds accepting connections.
    @ivar probed: the servers probed, in order.
    """

    def __init__(
        self,
        servers: Sequence[ServerAddress] = (A, B),
        balancer: Balancer | None = None,
        **options: Any,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = MemoryStore(self.clock)
        self.board = LocalBoard()
        self.registry = LocalRegistry(self.board)
        self.servers: dict[ServerAddress, LocalRegistry] = {}
        for server in servers:
            self.add_server(server)
        self.reachable = set(servers)
        self.probed: list[ServerAddress] = []
        self.pusher = FakePusher()
        self.delivery = FakeDelivery(self.store, self.pusher)
        self.api = RouteAPI(
            self.store,
            self.registry,
            self.delivery,
            self.pusher,
            balancer or RoundRobin(),
            self.clock,
            SECRET,
            self.probe,
            **options,
        )
        self.http: Any = StubTreq(self.api.resource())
        self.status = 0
        #: The account keys of the accounts L{register} created, by id.
        self.keys: dict[int, str] = {}

    def add_server(self, server: ServerAddress) -> None:
        registry = self.servers[server] = LocalRegistry(self.board)
        result(registry.register(server))

    def remove_server(self, server: ServerAddress) -> None:
        result(self.servers.pop(server).unregister())

    def probe(self, server: ServerAddress) -> Deferred[bool]:
        self.probed.append(server)
        return succeed(server in self.reachable)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        secret: str | None = None,
        raw: bytes | None = None,
        headers: dict[bytes, list[bytes]] | None = None,
        extended: bool = True,
    ) -> tuple[int, bytes]:
        """
        @param extended: ask for cim's extended replies, as cim's clients
            do (CIM's never do).
        """
        headers = dict(headers or {})
        headers[b"Content-Type"] = [b"application/json"]
        if extended:
            headers[b"X-Cim-Extended"] = [b"1"]
        if token is not None:
            headers[b"Authorization"] = [f"Bearer {token}".encode()]
        if secret is not None:
            headers[b"X-Cim-Secret"] = [secret.encode()]
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        d = self.http.request(
            method, f"http://route.test{path}", data=data, headers=headers
        )
        self.http.flush()
        response = result(d)
        content = response.content()
        self.http.flush()
        return response.code, result(content)

    def call(
        self, path: str, body: Any = None, method: str = "POST", **kw: Any
    ) -> dict:
        """
        Call the API; @return: the envelope (the HTTP status in C{status}).
        """
        self.status, content = self.request(method, path, body, **kw)
        answer: dict = json.loads(content)
        assert set(answer) == {"code", "message", "reqNo", "dataBody"}, answer
        return answer

    def ok(self, path: str, body: Any = None, **kw: Any) -> Any:
        answer = self.call(path, body, **kw)
        assert answer["code"] == "9000", answer
        assert self.status == 200
        return answer["dataBody"]

    def code(self, path: str, body: Any = None, **kw: Any) -> str:
        code: str = self.call(path, body, **kw)["code"]
        return code

    # Users

    def register(self, name: str, password: str | None = None) -> int:
        """
        Register C{name}; @return: its id.  The account key of a new
        account without a password is kept in L{keys}, by id.
        """
        body = {"userName": name}
        if password is not None:
            body["password"] = password
        data = self.ok("/registerAccount", body)
        user_id: int = data["userId"]
        if "accountKey" in data:
            self.keys[user_id] = data["accountKey"]
        return user_id

    def login(self, user_id: int, name: str, **extra: Any) -> dict:
        """
        Log in, with the account key of L{register} unless C{extra} gives
        a credential (C{accountKey=None}: none).
        """
        token = extra.pop("bearer", None)
        if not {"password", "token", "accountKey"} & set(extra) and token is None:
            extra["accountKey"] = self.keys.get(int(user_id))
        if extra.get("accountKey") is None:
            extra.pop("accountKey", None)
        data: dict = self.ok(
            "/login", {"userId": user_id, "userName": name, **extra}, token=token
        )
        return data

    def body(self, user_id: int, name: str) -> dict[str, Any]:
        """
        A C{/login} body with the account key of L{register}.
        """
        return {"userId": user_id, "userName": name, "accountKey": self.keys[user_id]}

    def connect(self, user_id: int) -> None:
        """
        What the user's IM server does when its TCP login arrives (its
        sweep then renews the session: here it lives a day).
        """
        session = result(self.store.get_session(user_id))
        assert result(self.store.activate_session(user_id, session.session_id, 86400.0))

    def online(self, name: str, password: str | None = None) -> tuple[int, str]:
        """
        Register, log in and connect C{name}; @return: its id and token.
        """
        user_id = self.register(name, password)
        extra = {"password": password} if password else {}
        token: str = self.login(user_id, name, **extra)["token"]
        self.connect(user_id)
        return user_id, token

    def session(self, user_id: int) -> Any:
        return result(self.store.get_session(user_id))

    def session_of(self, user_id: int, device: str) -> Any:
        return result(self.store.get_session(user_id, device))


@pytest.fixture
def route() -> Route:
    return Route()


@pytest.fixture
def logged() -> Iterator[list[dict]]:
    """
    The log events emitted during the test.
    """
    events: list[dict] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


# Registration


def test_register(route: Route) -> None:
    answer = route.call(
        "/registerAccount", {"userName": "alice", "reqNo": 42, "timeStamp": 1}
    )
    assert answer["code"] == "9000"
    assert answer["reqNo"] == 42
    key = answer["dataBody"].pop("accountKey")
    assert len(key) >= 40
    assert answer["dataBody"] == {"userId": 1, "userName": "alice"}
    assert route.register("bob") == 2
    # An existing name: its id only to whoever proves it owns the account.
    assert route.code("/registerAccount", {"userName": "alice"}) == "4090"
    again = route.ok("/registerAccount", {"userName": "alice", "accountKey": key})
    assert again == {"userId": 1, "userName": "alice"}
    # CIM's clients get exactly CIM's fields (and no key they cannot use).
    answer = route.call("/registerAccount", {"userName": "carol"}, extended=False)
    assert answer["dataBody"] == {"userId": 3, "userName": "carol"}


def test_register_with_a_password(route: Route) -> None:
    alice = route.register("alice", "s3cret")
    assert route.register("alice", "s3cret") == alice
    assert (
        route.code("/registerAccount", {"userName": "alice", "password": "nope"})
        == "4090"
    )
    assert route.code("/registerAccount", {"userName": "alice"}) == "4090"


def test_register_requires_a_password_when_asked() -> None:
    route = Route(require_password=True)
    answer = route.call("/registerAccount", {"userName": "alice"})
    assert answer["code"] == "3000"
    assert "password" in answer["message"]
    assert result(route.store.get_account_by_name("alice")) is None
    assert route.register("alice", "s3cret") == 1


@pytest.mark.parametrize(
    "body, complaint",
    [
        ({}, "userName is missing"),
        ({"userName": None}, "userName is missing"),
        ({"userName": ""}, "userName must not be empty"),
        ({"userName": "   "}, "userName must not be empty"),
        ({"userName": 12}, "userName must be a string"),
        ({"userName": "x" * 65}, "userName is longer than 64"),
        ({"userName": "x", "password": 5}, "password must be a string"),
    ],
)
def test_register_bad_input(route: Route, body: dict, complaint: str) -> None:
    answer = route.call("/registerAccount", body)
    assert answer["code"] == "3000"
    assert complaint in answer["message"]


# Login


def test_login(route: Route) -> None:
    alice = route.register("alice")
    data = route.login(alice, "alice")
    assert (data["ip"], data["cimServerPort"], data["httpPort"]) == (
        A.host,
        A.port,
        A.http_port,
    )
    assert data["userId"] == alice and data["userName"] == "alice"
    session = route.session(alice)
    assert session.server == str(A) and not session.connected
    info = result(route.store.verify_token(data["token"]))
    assert (info.user_id, info.server, info.session_id) == (
        alice,
        str(A),
        session.session_id,
    )
    assert route.probed == [A]
    assert "cim_route_logins_total 1" in route.request("GET", "/metrics")[1].decode()


def test_login_user_id_as_a_string(route: Route) -> None:
    alice = route.register("alice")
    assert route.login(str(alice), "alice")["userId"] == alice  # type: ignore[arg-type]


def test_login_token_ttl() -> None:
    route = Route(token_ttl=100)
    alice = route.register("alice")
    token = route.login(alice, "alice")["token"]
    route.connect(alice)
    route.clock.advance(99)
    assert result(route.store.verify_token(token)) is not None
    route.clock.advance(2)
    assert result(route.store.verify_token(token)) is None


@pytest.mark.parametrize(
    "body",
    [
        {"userId": 1, "userName": "bob"},
        {"userId": 99, "userName": "alice"},
    ],
)
def test_login_account_mismatch(route: Route, body: dict) -> None:
    route.register("alice")
    route.register("bob")
    assert route.code("/login", body) == "9100"
    assert route.session(1) is None and route.session(2) is None


def test_login_with_a_password(route: Route) -> None:
    alice = route.register("alice", "s3cret")
    assert route.code("/login", {"userId": alice, "userName": "alice"}) == "9100"
    answer = route.call(
        "/login", {"userId": alice, "userName": "alice", "password": "x"}
    )
    assert answer["code"] == "9100" and "password" in answer["message"]
    assert route.session(alice) is None
    route.login(alice, "alice", password="s3cret")
    assert route.session(alice) is not None


def test_login_without_servers() -> None:
    route = Route(servers=[])
    alice = route.register("alice")
    assert route.code("/login", route.body(alice, "alice")) == "7100"
    assert route.session(alice) is None


def test_login_falls_back_to_a_reachable_server(route: Route) -> None:
    alice = route.register("alice")
    route.reachable = {B}
    data = route.login(alice, "alice")
    assert (data["ip"], route.probed) == (B.host, [A, B])
    assert route.session(alice).server == str(B)


def test_login_when_no_server_is_reachable(route: Route) -> None:
    alice = route.register("alice")
    route.reachable = set()
    answer = route.call("/login", route.body(alice, "alice"))
    assert answer["code"] == "7100"
    assert "reachable" in answer["message"]
    assert route.session(alice) is None
    # Nothing was left behind: as soon as a server is back, the login works
    # (CIM answered 5000 from then on).
    route.reachable = {A}
    assert route.login(alice, "alice")["ip"] == A.host


def test_a_failing_probe_counts_as_unreachable(
    route: Route, logged: list[dict]
) -> None:
    alice = route.register("alice")
    route.api.router.probe = lambda server: fail(RuntimeError("boom"))
    assert route.code("/login", route.body(alice, "alice")) == "7100"
    assert any(e.get("log_failure") for e in logged)


def test_failed_login_leaves_no_session(route: Route, logged: list[dict]) -> None:
    alice = route.register("alice")
    route.store.open_session = lambda *a, **k: fail(StoreError("redis is down"))  # type: ignore[method-assign]
    answer = route.call("/login", route.body(alice, "alice"))
    assert answer == {
        "code": "4000",
        "message": "the store is unavailable",
        "reqNo": None,
        "dataBody": None,
    }
    assert route.session(alice) is None


def test_login_needs_a_credential(route: Route) -> None:
    # Knowing the id and name is not enough: the account key is needed.
    alice = route.register("alice")
    answer = route.call("/login", {"userId": alice, "userName": "alice"})
    assert answer["code"] == "9100"
    assert "account key" in answer["message"]
    assert route.session(alice) is None
    wrong = {"userId": alice, "userName": "alice", "accountKey": "guess"}
    answer = route.call("/login", wrong)
    assert (answer["code"], answer["message"]) == ("9100", "the account key is wrong")
    # Nor while the owner is online: no 5000 telling that she is.
    _, token = route.online("bob")
    answer = route.call("/login", {"userId": 2, "userName": "bob"})
    assert answer["code"] == "9100"
    assert result(route.store.verify_token(token)) is not None
    # The name is compared by its key (case, look-alikes).
    assert route.login(alice, "ALICE")["userName"] == "alice"


def test_an_account_without_any_credential() -> None:
    # Made before account keys (or by another tool): only a token or the
    # secret logs it in.
    route = Route()
    alice = result(route.store.register("alice")).user_id
    answer = route.call("/login", {"userId": alice, "userName": "alice"})
    assert answer["code"] == "9100"
    assert "without any credential" in answer["message"]
    assert "password" not in answer["message"]  # the console would ask for one
    assert route.ok("/login", {"userId": alice, "userName": "alice"}, secret=SECRET)


def test_repeat_login_is_refused_with_legacy_auth() -> None:
    route = Route(legacy_auth=True)
    alice, token = route.online("alice")
    session = route.session(alice)
    answer = route.call("/login", {"userId": alice, "userName": "alice"})
    assert answer["code"] == "5000"
    assert route.session(alice) == session
    assert result(route.store.verify_token(token)) is not None
    assert route.pusher.kicks == []


def test_repeat_login_of_a_claimed_session_is_refused_with_legacy_auth() -> None:
    route = Route(legacy_auth=True)
    alice = route.register("alice")
    route.login(alice, "alice", accountKey=None)
    assert route.code("/login", {"userId": alice, "userName": "alice"}) == "5000"
    # The claim expires when the client never connects.
    route.clock.advance(61)
    route.login(alice, "alice", accountKey=None)


def test_a_login_that_never_connects_does_not_lock_the_owner_out(
    route: Route,
) -> None:
    # A login whose client never connects leaves a claim for 60 s; the
    # owner's next login, with the key, replaces it at once.
    alice = route.register("alice")
    route.login(alice, "alice")
    claim = route.session(alice)
    assert not claim.connected
    data = route.login(alice, "alice")
    new = route.session(alice)
    assert new.session_id != claim.session_id
    assert route.pusher.kicks == [
        (claim.server, alice, claim.session_id, "logged in again elsewhere")
    ]
    route.connect(alice)
    assert result(route.store.verify_token(data["token"])) is not None


@pytest.mark.parametrize("proof", ["password", "body token", "bearer token", "secret"])
def test_repeat_login_with_proof_replaces_the_session(route: Route, proof: str) -> None:
    alice, token = route.online("alice", "s3cret")
    old = route.session(alice)
    body: dict[str, Any] = {"userId": alice, "userName": "alice"}
    kw: dict[str, Any] = {}
    if proof == "password":
        body["password"] = "s3cret"
    elif proof == "body token":
        body["token"] = token
    elif proof == "bearer token":
        kw["token"] = token
    else:
        kw["secret"] = SECRET
    data = route.ok("/login", body, **kw)
    new = route.session(alice)
    assert new.session_id != old.session_id and not new.connected
    assert new.server == f"{data['ip']}:{data['cimServerPort']}:{data['httpPort']}"
    # The old session's server was asked to close the old connection.
    assert route.pusher.kicks == [
        (old.server, alice, old.session_id, "logged in again elsewhere")
    ]
    # The old token is dead, the new one lives.
    assert result(route.store.verify_token(token)) is None
    assert result(route.store.verify_token(data["token"])).session_id == new.session_id


def test_stale_token_is_no_proof(route: Route) -> None:
    alice, stale = route.online("alice")
    fresh = route.login(alice, "alice", token=stale)["token"]
    route.connect(alice)
    assert (
        route.code("/login", {"userId": alice, "userName": "alice", "token": stale})
        == "9100"
    )
    assert route.login(alice, "alice", token=fresh)


def test_another_users_token_is_no_proof(route: Route) -> None:
    alice, _ = route.online("alice")
    _, bobs = route.online("bob")
    assert (
        route.code("/login", {"userId": alice, "userName": "alice", "token": bobs})
        == "9100"
    )


def test_kick_failure_does_not_fail_the_login(route: Route, logged: list[dict]) -> None:
    alice, token = route.online("alice")
    route.pusher.down.add(route.session(alice).server)
    route.login(alice, "alice", token=token)
    assert len(route.pusher.kicks) == 1
    assert any("old connection" in e.get("log_format", "") for e in logged)


def test_wrong_secret_on_login(route: Route) -> None:
    alice, _ = route.online("alice")
    body = {"userId": alice, "userName": "alice"}
    assert route.code("/login", body, secret="wrong-secret") == "4010"


def test_login_round_robin_over_servers() -> None:
    route = Route(servers=[A, B, C])
    hosts = [route.login(route.register(f"u{i}"), f"u{i}")["ip"] for i in range(6)]
    assert hosts == [A.host, B.host, C.host] * 2


def test_login_sees_registry_changes(route: Route) -> None:
    route.remove_server(A)
    route.remove_server(B)
    alice = route.register("alice")
    assert route.code("/login", route.body(alice, "alice")) == "7100"
    route.add_server(C)
    route.reachable.add(C)
    assert route.login(alice, "alice")["ip"] == C.host


@pytest.mark.parametrize(
    "user_id, complaint",
    [
        (None, "userId is missing"),
        ("abc", "userId must be an integer"),
        ("12a", "userId must be an integer"),
        ("-3", "userId must be an integer"),
        (1.5, "userId must be an integer, not a number"),
        (True, "userId must be an integer, not a boolean"),
        ([1], "userId must be an integer, not a list"),
        (0, "userId must be a positive"),
        (-1, "userId must be a positive"),
        (2**63, "userId must be a positive"),
    ],
)
def test_login_bad_user_id(route: Route, user_id: Any, complaint: str) -> None:
    answer = route.call("/login", {"userId": user_id, "userName": "alice"})
    assert answer["code"] == "3000"
    assert complaint in answer["message"]


# Authorization


def test_calls_need_a_token(route: Route) -> None:
    alice, _ = route.online("alice")
    bob, _ = route.online("bob")
    answer = route.call(
        "/p2pRoute", {"userId": alice, "receiveUserId": bob, "msg": "hi"}
    )
    assert answer["code"] == "4010"
    assert "Bearer" in answer["message"]
    assert result(route.store.read(pair_conversation(alice, bob), 0, 10)) == []


def test_another_users_token_is_refused(route: Route) -> None:
    alice, _ = route.online("alice")
    bob, bobs = route.online("bob")
    body = {"userId": alice, "receiveUserId": bob, "msg": "hi"}
    assert route.code("/p2pRoute", body, token=bobs) == "4010"
    assert route.code("/offLine", {"userId": alice}, token=bobs) == "4010"
    assert route.session(alice) is not None


def test_stale_token_after_relogin_is_refused(route: Route) -> None:
    alice, stale = route.online("alice")
    fresh = route.login(alice, "alice", token=stale)["token"]
    answer = route.call("/user/groups", {"userId": alice}, token=stale)
    assert answer["code"] == "4010"
    assert "log in again" in answer["message"]
    assert route.ok("/user/groups", {"userId": alice}, token=fresh) == []


def test_expired_token_is_refused() -> None:
    route = Route(token_ttl=10)
    alice, token = route.online("alice")
    route.clock.advance(11)
    assert route.code("/user/groups", {"userId": alice}, token=token) == "4010"


def test_secret_acts_for_anybody(route: Route) -> None:
    alice, _ = route.online("alice")
    bob, _ = route.online("bob")
    body = {"userId": alice, "receiveUserId": bob, "msg": "hi"}
    assert route.code("/p2pRoute", body, secret=SECRET) == "9000"
    assert route.code("/p2pRoute", body, secret="not-the-secret") == "4010"


@pytest.mark.parametrize("header", [b"Basic abc", b"Bearer", b"Bearer   ", b"token"])
def test_malformed_authorization_header(route: Route, header: bytes) -> None:
    alice, _ = route.online("alice")
    answer = route.call(
        "/user/groups", {"userId": alice}, headers={b"Authorization": [header]}
    )
    assert answer["code"] == "4010"


def test_legacy_auth_relaxes_the_cim_endpoints_only() -> None:
    route = Route(legacy_auth=True)
    alice, _ = route.online("alice")
    bob, bobs = route.online("bob")
    assert (
        route.code("/p2pRoute", {"userId": alice, "receiveUserId": bob, "msg": "hi"})
        == "9000"
    )
    assert route.code("/groupRoute", {"userId": alice, "msg": "hi all"}) == "9000"
    assert route.code("/fetchOfflineMsgs", {"receiveUserId": alice}) == "9000"
    assert route.code("/user/groups", {"userId": alice}) == "4010"
    assert route.code("/group/create", {"userId": alice, "groupId": "g"}) == "4010"
    # Wrong credentials are still refused.
    assert route.code("/offLine", {"userId": alice}, token=bobs) == "4010"
    assert route.code("/offLine", {"userId": alice}) == "9000"


# Private messages


def test_p2p_to_an_online_user(route: Route) -> None:
    alice, token = route.online("alice")
    bob, _ = route.online("bob")
    answer = route.call(
        "/p2pRoute",
        {"userId": alice, "receiveUserId": str(bob), "msg": "hi", "reqNo": "r1"},
        token=token,
    )
    assert answer["code"] == "9000" and answer["reqNo"] == "r1"
    [message] = result(route.store.read(pair_conversation(alice, bob), 0, 10))
    assert answer["dataBody"] == {"msgId": message.msg_id, "seq": 1}
    assert (message.sender_id, message.sender_name, message.text) == (
        alice,
        "alice",
        "hi",
    )
    assert message.receive_user_id == bob
    # Delivered to both users (every device): the sender's other devices
    # see what it sent.
    assert route.pusher.pushes == [
        (route.session(alice).server, [message], [alice]),
        (route.session(bob).server, [message], [bob]),
    ]


def test_p2p_to_an_offline_user_is_stored(route: Route) -> None:
    alice, token = route.online("alice")
    bob = route.register("bob")
    answer = route.call(
        "/p2pRoute", {"userId": alice, "receiveUserId": bob, "msg": "hi"}, token=token
    )
    assert answer["code"] == "7000"
    assert answer["dataBody"] == {"msgId": 1, "seq": 1}
    stored = result(route.store.read(pair_conversation(alice, bob), 0, 10))
    assert [m.text for m in stored] == ["hi"]
    # Only the sender's own device was pushed to.
    assert route.pusher.pushes == [(route.session(alice).server, stored, [alice])]


def test_p2p_to_a_user_not_on_its_server(route: Route) -> None:
    alice, token = route.online("alice")
    bob, _ = route.online("bob")
    route.pusher.absent.add(bob)
    body = {"userId": alice, "receiveUserId": bob, "msg": "hi"}
    assert route.code("/p2pRoute", body, token=token) == "7000"
    assert len(result(route.store.read(pair_conversation(alice, bob), 0, 10))) == 1


def test_p2p_to_an_unreachable_server(route: Route, logged: list[dict]) -> None:
    alice, token = route.online("alice")
    bob, _ = route.online("bob")
    route.pusher.down.add(route.session(bob).server)
    body = {"userId": alice, "receiveUserId": bob, "msg": "hi"}
    assert route.code("/p2pRoute", body, token=token) == "7000"
    assert len(result(route.store.read(pair_conversation(alice, bob), 0, 10))) == 1


def test_p2p_batch(route: Route) -> None:
    alice, token = route.online("alice")
    bob, _ = route.online("bob")
    body = {
        "userId": alice,
        "receiveUserId": bob,
        "msg": None,
        "batchMsg": ["a", "b", "c"],
    }
    assert route.ok("/p2pRoute", body, token=token) == {"msgId": 3, "seq": 3}
    stored = result(route.store.read(pair_conversation(alice, bob), 0, 10))
    assert [(m.seq, m.text) for m in stored] == [(1, "a"), (2, "b"), (3, "c")]
    assert [pushed for _, pushed, _ in route.pusher.pushes] == [stored, stored]


def test_p2p_client_msg_id_stores_once(route: Route) -> None:
    alice, token = route.online("alice")
    bob, _ = route.online("bob")
    body = {"userId": alice, "receiveUserId": bob, "msg": "hi", "clientMsgId": "c-1"}
    first = route.ok("/p2pRoute", body, token=token)
    assert route.ok("/p2pRoute", body, token=token) == first
    assert len(result(route.store.read(pair_conversation(alice, bob), 0, 10))) == 1


def test_p2p_unknown_users(route: Route) -> None:
    alice, token = route.online("alice")
    answer = route.call(
        "/p2pRoute", {"userId": alice, "receiveUserId": 99, "msg": "hi"}, token=token
    )
    assert answer["code"] == "3000"
    assert "no user 99" in answer["message"]
    body = {"userId": 98, "receiveUserId": alice, "msg": "hi"}
    assert route.code("/p2pRoute", body, secret=SECRET) == "3000"


@pytest.mark.parametrize(
    "body, complaint",
    [
        ({"receiveUserId": 2, "msg": "x"}, "userId is missing"),
        ({"userId": 1, "msg": "x"}, "receiveUserId is missing"),
        ({"userId": 1, "receiveUserId": 2}, "msg is missing"),
        ({"userId": 1, "receiveUserId": 2, "msg": ""}, "msg must not be empty"),
        ({"userId": 1, "receiveUserId": 2, "msg": 5}, "msg must be strings"),
        ({"userId": 1, "receiveUserId": 2, "msg": "x" * 11}, "at most 10 characters"),
        ({"userId": 1, "receiveUserId": 2, "batchMsg": "x"}, "batchMsg must be a list"),
        (
            {"userId": 1, "receiveUserId": 2, "batchMsg": ["a", 1]},
            "batchMsg items must be",
        ),
        ({"userId": 1, "receiveUserId": 2, "batchMsg": ["a", "x" * 11]}, "at most 10"),
        (
            {"userId": 1, "receiveUserId": 2, "msg": "x", "clientMsgId": 3},
            "clientMsgId must be",
        ),
        (
            {"userId": 1, "receiveUserId": 2, "msg": "x", "clientMsgId": "c" * 65},
            "clientMsgId is",
        ),
    ],
)
def test_p2p_bad_input(body: dict, complaint: str) -> None:
    route = Route(max_message=10)
    route.online("alice")
    route.online("bob")
    answer = route.call("/p2pRoute", body, secret=SECRET)
    assert answer["code"] == "3000"
    assert complaint in answer["message"]
    assert route.pusher.pushes == []


def _raw(route: Route, resource: Any, request: bytes) -> bytes:
    """
    The whole HTTP reply of C{resource} (served as the route serves it) to
    C{request}, its Date header blanked.
    """
    site = QuietSite(resource, reactor=route.clock)
    channel = site.buildProtocol(IPv4Address("TCP", "10.9.8.7", 40000))
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "10.0.0.9", 8083),
        peerAddress=IPv4Address("TCP", "10.9.8.7", 40000),
    )
    channel.makeConnection(transport)
    channel.dataReceived(request)
    return re.sub(rb"Date: [^\r]*", b"Date: -", transport.value())


def _post(path: bytes, body: bytes, *headers: bytes) -> bytes:
    return b"\r\n".join(
        [
            b"POST %s HTTP/1.1" % path,
            b"Host: route.test",
            b"Content-Type: application/json",
            b"Content-Length: %d" % len(body),
            *headers,
            b"",
            body,
        ]
    )


def _p2p_cases(alice: int, bob: int, carol: int, token: str) -> list[bytes]:
    secret = b"X-Cim-Secret: " + SECRET.encode()
    bearer = b"Authorization: Bearer " + token.encode()
    extended = b"X-Cim-Extended: 1"

    def body(**fields: Any) -> bytes:
        return json.dumps(fields).encode()

    sent = body(userId=alice, receiveUserId=bob, msg="hi", reqNo="r-1")
    return [
        _post(b"/p2pRoute", sent, secret),
        _post(b"/p2pRoute", sent, bearer, extended),
        _post(
            b"/p2pRoute?x=1",
            body(userId=alice, receiveUserId=bob, batchMsg=["a", "b"]),
            secret,
        ),
        # Klein routes a request by its percent-decoded path.
        _post(b"/p2p%52oute", sent, secret),
        # carol is offline: 7000, with the stored message's place if asked.
        _post(b"/p2pRoute", body(userId=alice, receiveUserId=carol, msg="hi"), secret),
        _post(
            b"/p2pRoute",
            body(userId=alice, receiveUserId=carol, msg="x"),
            secret,
            extended,
        ),
        _post(b"/p2pRoute", body(userId=alice, receiveUserId=99, msg="hi"), secret),
        _post(b"/p2pRoute", body(userId=98, receiveUserId=bob, msg="hi"), secret),
        _post(b"/p2pRoute", body(userId=alice, msg="hi", reqNo=7), secret),
        _post(b"/p2pRoute", b"{nope", secret),
        _post(b"/p2pRoute", b"", secret),
        _post(b"/p2pRoute", b"[1]", secret),
        _post(b"/p2pRoute", sent, b"X-Cim-Secret: wrong"),
        _post(b"/p2pRoute", sent),
        _post(b"/p2pRoute", sent, b"Authorization: Basic abc"),
        _post(b"/p2pRoute", sent, b"Authorization: Bearer not-a-token"),
        _post(b"/p2pRoute", body(userId=bob, receiveUserId=alice, msg="hi"), bearer),
        _post(b"/p2pRoute", b"x" * 2000, secret),
        _post(b"/p2pRoute/", sent, secret),
        b"GET /p2pRoute HTTP/1.1\r\nHost: route.test\r\n\r\n",
        b"PUT /p2pRoute HTTP/1.1\r\nHost: route.test\r\nContent-Length: 2\r\n\r\n{}",
    ]


def test_p2p_served_as_klein_serves_it() -> None:
    """
    L{RouteAPI.resource} serves C{POST /p2pRoute} without Klein: its
    replies are Klein's, byte for byte (headers, chunks, envelope), in
    success, in every refusal and in failure.
    """
    twins = [Route(max_body=1000), Route(max_body=1000)]
    cases = []
    for twin in twins:
        alice, token = twin.online("alice")
        bob, _ = twin.online("bob")
        cases.append(_p2p_cases(alice, bob, twin.register("carol"), token))
    fast, klein = twins[0].api.resource(), twins[1].api.app.resource()
    replies = []
    for mine, klein_s in zip(*cases, strict=True):
        reply = _raw(twins[0], fast, mine)
        assert reply == _raw(twins[1], klein, klein_s)
        replies.append(reply)
    codes = [re.findall(rb'"code":"(\d+)"', reply) for reply in replies]
    assert [c[0] if c else b"" for c in codes] == [
        b"9000",
        b"9000",
        b"9000",
        b"9000",
        b"7000",
        b"7000",
        b"3000",
        b"3000",
        b"3000",
        b"3000",
        b"3000",
        b"3000",
        b"4010",
        b"4010",
        b"4010",
        b"4010",
        b"4010",
        b"3000",
        b"3000",
        b"3000",
        b"3000",
    ]
    assert b'"dataBody":{"msgId":2,"seq":2}' in replies[1]
    assert b'"reqNo":"r-1"' in replies[0]
    assert replies[-2].startswith(b"HTTP/1.1 405 ")


def test_login_and_registration_served_as_klein_serves_them() -> None:
    """
    C{/login} and C{/registerAccount}, which L{RouteAPI.resource} serves
    without Klein too, answer as Klein does, byte for byte.
    """
    secret = b"X-Cim-Secret: " + SECRET.encode()

    def body(**fields: Any) -> bytes:
        return json.dumps(fields).encode()

    twins = [Route(max_body=1000), Route(max_body=1000)]
    for twin in twins:
        twin.register("alice")
    alice = 1
    cases = [
        _post(b"/registerAccount", body(userName="bob", reqNo=3)),
        _post(b"/registerAccount", body(userName="bob")),
        _post(b"/registerAccount", body(userName="")),
        _post(b"/registerAccount", b"{nope"),
        _post(b"/registerAccount", b""),
        _post(b"/registerAccount", b"x" * 2000),
        _post(b"/login", body(userId=alice, userName="alice", reqNo="r"), secret),
        _post(b"/login", body(userId=alice, userName="alice"), b"X-Cim-Secret: no"),
        _post(b"/login", body(userId=alice, userName="alice")),
        _post(b"/login", body(userId=99, userName="nobody"), secret),
        _post(b"/login", body(userId=alice), secret),
        _post(b"/login", b"[1]", secret),
        _post(b"/login/", body(userId=alice, userName="alice"), secret),
        b"GET /login HTTP/1.1\r\nHost: route.test\r\n\r\n",
    ]
    fast, klein = twins[0].api.resource(), twins[1].api.app.resource()
    replies = []
    for case in cases:
        reply = _raw(twins[0], fast, case)
        assert reply == _raw(twins[1], klein, case)
        replies.append(reply)
    assert b'"code":"9000"' in replies[0]
    assert b'"reqNo":3' in replies[0]
    assert b'"code":"9000"' in replies[6]
    assert b'"cimServerPort"' in replies[6]
    assert all(b'"code":"9000"' not in r for r in replies[1:6] + replies[7:12])
    assert replies[-1].startswith(b"HTTP/1.1 405 ")


def test_a_percent_encoded_path_names_its_endpoint(route: Route) -> None:
    """
    A path is percent-decoded before it is routed, as Klein does: the
    endpoint it decodes to serves it (and counts it), on every endpoint;
    a path that decodes to no endpoint is answered 404.
    """
    alice, _ = route.online("alice")
    bob, _ = route.online("bob")
    secret = b"X-Cim-Secret: " + SECRET.encode()
    resource = route.api.resource()
    p2p = json.dumps({"userId": alice, "receiveUserId": bob, "msg": "hi"}).encode()
    login = json.dumps({"userId": alice, "userName": "alice"}).encode()
    served = [
        _raw(route, resource, _post(b"/p2p%52oute", p2p, secret)),
        _raw(route, resource, _post(b"/%70%32pRoute", p2p, secret)),
        _raw(route, resource, _post(b"/log%69n", login, secret)),
    ]
    for reply in served:
        assert reply.startswith(b"HTTP/1.1 200 ")
        assert b'"code":"9000"' in reply
    assert b"/p2p%52oute" not in route.api.metrics.render()
    assert b'endpoint="/p2pRoute"' in route.api.metrics.render()
    unknown = _raw(route, resource, _post(b"/p2p%72oute", p2p, secret))
    assert unknown.startswith(b"HTTP/1.1 404 ")
    assert b"no such endpoint: /p2p%72oute" in unknown


@pytest.mark.parametrize("fault", [StoreError("down"), ValueError("bug")])
def test_p2p_failure_served_as_klein_serves_it(
    fault: Exception, logged: list[dict]
) -> None:
    """
    A store failure is answered 4000 and logged, on both paths alike.
    """
    twins = [Route(), Route()]
    for twin in twins:
        alice, _ = twin.online("alice")
        bob, _ = twin.online("bob")
        twin.delivery.append = lambda messages: fail(fault)  # type: ignore[method-assign]
    body = json.dumps({"userId": alice, "receiveUserId": bob, "msg": "hi"}).encode()
    request = _post(b"/p2pRoute", body, b"X-Cim-Secret: " + SECRET.encode())
    mine = _raw(twins[0], twins[0].api.resource(), request)
    assert mine == _raw(twins[1], twins[1].api.app.resource(), request)
    assert b'"code":"4000"' in mine
    serious = (LogLevel.error, LogLevel.critical)
    assert len([e for e in logged if e.get("log_level") in serious]) == 2


def _p2p_then_leave(route: Route) -> StringTransport:
    """
    Alice sends Bob a message through C{POST /p2pRoute} (as the route
    serves it) and her connection goes before the reply: its transport.
    """
    alice, _ = route.online("alice")
    bob, _ = route.online("bob")
    site = QuietSite(route.api.resource(), reactor=route.clock)
    channel = site.buildProtocol(IPv4Address("TCP", "10.9.8.7", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    body = json.dumps({"userId": alice, "receiveUserId": bob, "msg": "hi"}).encode()
    channel.dataReceived(_post(b"/p2pRoute", body, b"X-Cim-Secret: " + SECRET.encode()))
    channel.connectionLost(Failure(error.ConnectionDone()))
    return transport


def test_p2p_client_gone() -> None:
    """
    When the client goes away before its reply, the call is cancelled (as
    Klein cancels it) and nothing is written.
    """
    route = Route()
    waiting: Deferred[list[ChatMessage]] = Deferred()
    route.delivery.append = lambda messages: waiting  # type: ignore[method-assign]
    transport = _p2p_then_leave(route)
    assert waiting.called  # cancelled
    assert transport.value() == b""
    assert route.pusher.pushes == []


def test_p2p_client_gone_while_delivering() -> None:
    """
    A client that leaves while its message is being delivered (stored
    already) cancels the delivery under way, and nothing is written.
    """
    route = Route()
    delivering: Deferred[DeliveryReport] = Deferred()
    route.delivery.deliver = lambda messages, users: delivering  # type: ignore[method-assign]
    transport = _p2p_then_leave(route)
    assert delivering.called  # cancelled
    assert transport.value() == b""


def test_passes_now_without_the_store() -> None:
    """
    L{Router.passes_now}: the secret and C{--legacy-auth} pass at once, a
    token is left to the store, and a wrong secret or no credential at all
    is refused with L{authorize}'s code and message.
    """
    router = Route(legacy_auth=True).api.router
    assert router.passes_now(Credentials(secret=SECRET))
    assert not router.passes_now(Credentials(token="t"))
    assert router.passes_now(Credentials(), legacy=True)
    with pytest.raises(ApiError) as wrong:
        router.passes_now(Credentials(secret="wrong"))
    assert wrong.value.code == "4010"
    assert wrong.value.message == "the cluster secret is wrong"
    with pytest.raises(ApiError) as none:
        router.passes_now(Credentials())
    assert none.value.code == "4010"
    assert "Authorization: Bearer" in none.value.message


def test_max_message_counts_characters() -> None:
    route = Route(max_message=3)
    alice, token = route.online("alice")
    bob, _ = route.online("bob")
    body = {"userId": alice, "receiveUserId": bob, "msg": "héé"}
    assert route.code("/p2pRoute", body, token=token) == "9000"


# CIM's group chat


def test_group_route_pushes_once_per_server() -> None:
    route = Route(servers=[A, B])
    alice, token = route.online("alice")  # on A
    bob, _ = route.online("bob")  # on B
    carol, _ = route.online("carol")  # on A
    route.register("dave")  # offline
    assert (
        route.ok("/groupRoute", {"userId": alice, "msg": "hello all"}, token=token)
        is None
    )
    [message] = result(route.store.read(BROADCAST, 0, 10))
    assert message.text == "hello all" and message.sender_id == alice
    pushes = sorted((server, users) for server, _, users in route.pusher.pushes)
    assert pushes == [(str(A), [carol]), (str(B), [bob])]


def test_group_route_survives_a_dead_server(logged: list[dict]) -> None:
    route = Route(servers=[A, B, C])
    alice, token = route.online("alice")  # on A
    bob, _ = route.online("bob")  # on B
    carol, _ = route.online("carol")  # on C
    route.pusher.down.add(str(B))
    assert (
        route.code("/groupRoute", {"userId": alice, "msg": "hi"}, token=token) == "9000"
    )
    assert sorted(server for server, _, _ in route.pusher.pushes) == [str(B), str(C)]
    assert any("could not be reached" in e.get("log_format", "") for e in logged)


def test_group_route_alone(route: Route) -> None:
    alice, token = route.online("alice")
    assert (
        route.code("/groupRoute", {"userId": alice, "msg": "anyone?"}, token=token)
        == "9000"
    )
    assert route.pusher.pushes == []


def test_group_route_bad_input(route: Route) -> None:
    alice, token = route.online("alice")
    assert route.code("/groupRoute", {"userId": alice}, token=token) == "3000"
    body = {"userId": alice, "msg": ["x"]}
    assert route.code("/groupRoute", body, token=token) == "3000"


# Sessions


def test_offline(route: Route) -> None:
    alice, token = route.online("alice")
    session = route.session(alice)
    assert route.ok("/offLine", {"userId": alice, "msg": "bye"}, token=token) is None
    assert route.session(alice) is None
    assert route.pusher.kicks == [
        (session.server, alice, session.session_id, "logged off")
    ]
    assert route.ok("/onlineUser", method="GET") == []
    # The token died with the session; logging in again needs no proof.
    assert result(route.store.verify_token(token)) is None
    route.login(alice, "alice")


def test_offline_without_a_session(route: Route) -> None:
    alice = route.register("alice")
    assert route.code("/offLine", {"userId": alice}, secret=SECRET) == "9000"
    assert route.pusher.kicks == []


def test_online_users(route: Route) -> None:
    alice, _ = route.online("alice")
    bob, _ = route.online("bob")
    carol = route.register("carol")
    route.login(carol, "carol")  # not connected yet
    expected = [
        {"userId": alice, "userName": "alice"},
        {"userId": bob, "userName": "bob"},
    ]
    assert route.ok("/onlineUser", method="GET") == expected
    assert route.ok("/onlineUser", {}) == expected


def test_online_user_calls_share_the_read_under_way(route: Route) -> None:
    alice, _ = route.online("alice")
    asked: list[Deferred[list[tuple[int, str]]]] = []

    def pending() -> Deferred[list[tuple[int, str]]]:
        asked.append(Deferred())
        return asked[-1]

    route.store.online_users = pending  # type: ignore[method-assign]
    router = route.api.router
    calls = [router.online_users() for _ in range(50)]
    # A flood of calls: one read of the store, which all of them wait for.
    assert len(asked) == 1 and not any(d.called for d in calls)
    # A call whose request went away leaves the answer to the others.
    gone = calls.pop(7)
    gone.cancel()
    with pytest.raises(CancelledError):
        result(gone)
    asked[0].callback([(alice, "alice")])
    assert all(result(d) == [(alice, "alice")] for d in calls)
    # The answer is not kept: the next call reads again, and sees bob.
    bob, _ = route.online("bob")
    later = router.online_users()
    assert len(asked) == 2
    asked[1].callback([(alice, "alice"), (bob, "bob")])
    assert result(later) == [(alice, "alice"), (bob, "bob")]
    # A failure reaches every call waiting for it, and is not kept either.
    failing = [router.online_users() for _ in range(2)]
    asked[2].errback(StoreError("Redis is away"))
    for d in failing:
        with pytest.raises(StoreError):
            result(d)
    again = router.online_users()
    assert len(asked) == 4
    asked[3].callback([])
    assert result(again) == []


def test_fetch_offline_messages(route: Route) -> None:
    alice, token = route.online("alice")
    assert route.ok("/fetchOfflineMsgs", {"receiveUserId": alice}, token=token) is None
    assert route.pusher.resyncs == [(route.session(alice).server, alice)]


def test_fetch_offline_messages_not_connected(route: Route) -> None:
    alice = route.register("alice")
    token = route.login(alice, "alice")["token"]
    assert (
        route.code("/fetchOfflineMsgs", {"receiveUserId": alice}, token=token) == "7000"
    )
    assert route.pusher.resyncs == []
    route.connect(alice)
    route.pusher.resync_code = "7000"
    assert (
        route.code("/fetchOfflineMsgs", {"receiveUserId": alice}, token=token) == "7000"
    )


def test_fetch_offline_messages_server_down(route: Route) -> None:
    alice, token = route.online("alice")
    route.pusher.down.add(route.session(alice).server)
    assert (
        route.code("/fetchOfflineMsgs", {"receiveUserId": alice}, token=token) == "9201"
    )


# Groups


def test_groups(route: Route) -> None:
    alice, alices = route.online("alice")
    bob, bobs = route.online("bob")
    carol, carols = route.online("carol")
    assert route.ok(
        "/group/create",
        {"userId": alice, "groupId": "team", "policy": "open"},
        token=alices,
    ) == {"groupId": "team", "policy": "open", "history": "join"}
    assert (
        route.code("/group/create", {"userId": bob, "groupId": "team"}, token=bobs)
        == "4090"
    )
    joined = route.ok("/group/join", {"userId": bob, "groupId": "team"}, token=bobs)
    assert joined == {"groupId": "team", "joined": True, "pending": False}
    again = route.ok("/group/join", {"userId": bob, "groupId": "team"}, token=bobs)
    assert again == {"groupId": "team", "joined": False, "pending": False}
    members = route.ok("/group/members", {"userId": bob, "groupId": "team"}, token=bobs)
    assert members == [
        {"userId": alice, "userName": "alice"},
        {"userId": bob, "userName": "bob"},
    ]
    assert route.code(
        "/group/members", {"userId": carol, "groupId": "team"}, token=carols
    ) == ("4010")
    assert route.ok("/user/groups", {"userId": bob}, token=bobs) == ["team"]

    sent = route.ok(
        "/group/send", {"userId": bob, "groupId": "team", "msg": "hi team"}, token=bobs
    )
    [message] = result(route.store.read(group_conversation("team"), 0, 10))
    assert sent == {"msgId": message.msg_id, "seq": 1}
    assert (message.group_id, message.sender_id, message.text) == (
        "team",
        bob,
        "hi team",
    )
    pushed = sorted(u for _, _, users in route.pusher.pushes for u in users)
    assert pushed == [alice, bob]
    body = {"userId": carol, "groupId": "team", "msg": "let me in"}
    assert route.code("/group/send", body, token=carols) == "4010"

    left = route.ok("/group/leave", {"userId": bob, "groupId": "team"}, token=bobs)
    assert left == {"groupId": "team", "left": True}
    assert (
        route.ok("/group/leave", {"userId": bob, "groupId": "team"}, token=bobs)["left"]
        is False
    )
    assert route.ok("/user/groups", {"userId": bob}, token=bobs) == []


def test_group_send_batch(route: Route) -> None:
    alice, token = route.online("alice")
    route.ok("/group/create", {"userId": alice, "groupId": "g"}, token=token)
    body = {"userId": alice, "groupId": "g", "batchMsg": ["a", "b"], "clientMsgId": "x"}
    assert route.ok("/group/send", body, token=token) == {"msgId": 2, "seq": 2}
    assert route.ok("/group/send", body, token=token) == {"msgId": 2, "seq": 2}


@pytest.mark.parametrize(
    "path", ["/group/join", "/group/leave", "/group/members", "/group/send"]
)
def test_unknown_group(route: Route, path: str) -> None:
    alice, token = route.online("alice")
    answer = route.call(
        path, {"userId": alice, "groupId": "nope", "msg": "x"}, token=token
    )
    assert answer["code"] == "3000"
    assert "no group nope" in answer["message"]


@pytest.mark.parametrize("group_id", ["", "a b", "x" * 65, "é", 5, None])
def test_bad_group_id(route: Route, group_id: Any) -> None:
    alice, token = route.online("alice")
    answer = route.call(
        "/group/create", {"userId": alice, "groupId": group_id}, token=token
    )
    assert answer["code"] == "3000"
    assert "groupId" in answer["message"]


# History


def test_history_pages_by_seq(route: Route) -> None:
    alice, alices = route.online("alice")
    bob, bobs = route.online("bob")
    for i in range(5):
        body = {"userId": alice, "receiveUserId": bob, "msg": f"m{i}"}
        route.ok("/p2pRoute", body, token=alices)
    conversation = pair_conversation(alice, bob)
    page = route.ok(
        "/history",
        {"userId": bob, "conversation": conversation, "afterSeq": 1, "limit": 2},
        token=bobs,
    )
    assert [(m["seq"], m["msg"], m["sendUserId"]) for m in page] == [
        (2, "m1", alice),
        (3, "m2", alice),
    ]
    rest = route.ok(
        "/history",
        {"userId": bob, "conversation": conversation, "afterSeq": "3"},
        token=bobs,
    )
    assert [m["seq"] for m in rest] == [4, 5]
    # Both users read it; another user may not.
    body = {"userId": alice, "conversation": conversation}
    assert len(route.ok("/history", body, token=alices)) == 5
    carol, carols = route.online("carol")
    body = {"userId": carol, "conversation": conversation}
    assert route.code("/history", body, token=carols) == "4010"
    assert (
        route.code("/history", {"userId": bob, "conversation": BROADCAST}, token=bobs)
        == "4010"
    )


def test_group_history_for_members(route: Route) -> None:
    alice, alices = route.online("alice")
    bob, bobs = route.online("bob")
    route.ok("/group/create", {"userId": alice, "groupId": "g"}, token=alices)
    route.ok("/group/send", {"userId": alice, "groupId": "g", "msg": "x"}, token=alices)
    body = {"userId": alice, "conversation": "g:g"}
    assert [m["msg"] for m in route.ok("/history", body, token=alices)] == ["x"]
    assert (
        route.code("/history", {"userId": bob, "conversation": "g:g"}, token=bobs)
        == "4010"
    )
    assert (
        route.code("/history", {"userId": bob, "conversation": "g:zz"}, token=bobs)
        == "3000"
    )


@pytest.mark.parametrize(
    "extra, complaint",
    [
        ({"limit": 0}, "limit must be between 1 and 200"),
        ({"limit": 201}, "limit must be between"),
        ({"limit": "x"}, "limit must be an integer"),
        ({"afterSeq": -1}, "afterSeq must be between"),
        ({"afterSeq": 1.5}, "afterSeq must be an integer"),
        ({"beforeSeq": -1}, "beforeSeq must be between"),
        ({"beforeSeq": "x"}, "beforeSeq must be an integer"),
        ({"conversation": None}, "give either conversation"),
        ({"peerId": 1}, "give either conversation"),
        ({"conversation": None, "peerId": 0}, "peerId must be a positive"),
        ({"conversation": None, "peerId": 99}, "peerId: no user 99"),
        ({"conversation": "p:1"}, "is not p:<lower id>:<higher id>"),
        ({"conversation": "p:2:1"}, "is not p:<lower id>:<higher id>"),
        ({"conversation": "g:a b"}, "no group a b"),
    ],
)
def test_history_bad_input(route: Route, extra: dict, complaint: str) -> None:
    alice, token = route.online("alice")
    body = {"userId": alice, "conversation": pair_conversation(alice, alice), **extra}
    answer = route.call("/history", body, token=token)
    assert answer["code"] == "3000"
    assert complaint in answer["message"]


# Bad requests


@pytest.mark.parametrize(
    "raw, complaint",
    [
        (b"{", "malformed JSON"),
        (b"\xff\xfe", "malformed JSON"),
        (b"", "the request body is empty"),
        (b"[1, 2]", "must be a JSON object, not a list"),
        (b'"x"', "must be a JSON object, not a string"),
        (b"null", "must be a JSON object, not null"),
    ],
)
def test_malformed_bodies(route: Route, raw: bytes, complaint: str) -> None:
    answer = route.call("/login", raw=raw)
    assert answer["code"] == "3000"
    assert complaint in answer["message"]
    assert route.status == 200


def test_oversized_body() -> None:
    route = Route(max_body=1000)
    answer = route.call("/registerAccount", raw=b'{"userName": "' + b"x" * 1000 + b'"}')
    assert answer["code"] == "3000"
    assert "over the limit of 1000 bytes" in answer["message"]


def test_unknown_path(route: Route) -> None:
    answer = route.call("/nope", {})
    assert (route.status, answer["code"]) == (404, "3000")
    assert "/nope" in answer["message"]
    assert route.call("/login/", {})["code"] == "3000"


def test_wrong_method(route: Route) -> None:
    answer = route.call("/login", method="GET")
    assert (route.status, answer["code"]) == (405, "3000")
    assert "use POST" in answer["message"]
    assert route.call("/health", {}, method="POST")["code"] == "3000"
    assert route.status == 405


def test_unexpected_error_is_logged_and_answered_4000(
    route: Route, logged: list[dict]
) -> None:
    def broken() -> Deferred[Any]:
        return fail(RuntimeError("kaboom"))

    route.store.online_users = broken  # type: ignore[method-assign]
    answer = route.call("/onlineUser", {"reqNo": 9})
    assert answer == {
        "code": "4000",
        "message": "internal error",
        "reqNo": 9,
        "dataBody": None,
    }
    assert route.status == 200
    [failure] = [e["log_failure"] for e in logged if "log_failure" in e]
    assert failure.check(RuntimeError)


def test_req_no_is_echoed_on_errors(route: Route) -> None:
    answer = route.call(
        "/login", {"userId": "x", "userName": "a", "reqNo": 1234567890123}
    )
    assert answer["reqNo"] == 1234567890123


def test_responses_are_json(route: Route) -> None:
    d = route.http.get("http://route.test/onlineUser")
    route.http.flush()
    response = result(d)
    assert response.headers.getRawHeaders(b"Content-Type") == [
        b"application/json; charset=utf-8"
    ]


# Operations


def test_health(route: Route) -> None:
    assert route.ok("/health", method="GET") == {
        "servers": [str(A), str(B)],
        "registry": "connected",
        "store": "ok",
    }


def test_health_with_a_broken_store(route: Route) -> None:
    route.store.ping = lambda: fail(StoreError("down"))  # type: ignore[attr-defined]
    answer = route.call("/health", method="GET")
    assert (route.status, answer["code"]) == (503, "4000")
    assert answer["dataBody"]["store"].startswith("unreachable")


def test_metrics(route: Route) -> None:
    alice, _ = route.online("alice")
    route.call("/p2pRoute", {"userId": alice, "receiveUserId": alice, "msg": "x"})
    route.call("/nope")
    status, raw = route.request("GET", "/metrics")
    text = raw.decode()
    assert status == 200
    assert 'cim_route_requests_total{endpoint="/login"} 1' in text
    assert 'cim_route_requests_total{endpoint="/registerAccount"} 1' in text
    assert 'cim_route_requests_total{endpoint="unknown"} 1' in text
    assert 'cim_route_errors_total{code="4010"} 1' in text
    assert 'cim_route_errors_total{code="3000"} 1' in text
    assert "cim_route_logins_total 1" in text
    assert "cim_route_request_latency_seconds_count 3" in text
    assert "cim_route_servers 2" in text


# The service and the tap


def real_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest_twisted.ensureDeferred
async def test_service_serves_and_stops() -> None:
    reactor = real_reactor()
    registry = LocalRegistry()
    service = RouteService(
        reactor,
        RouteConfig(port=0, bind="127.0.0.1", secret=SECRET),
        lambda: succeed(MemoryStore(reactor)),
        registry,
    )
    service.startService()
    assert await service.ready is service
    assert service.port
    http = HTTPClient(
        Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    )
    url = f"http://127.0.0.1:{service.port}"
    response = await http.post(f"{url}/registerAccount", data=b'{"userName": "alice"}')
    assert json.loads(await response.content())["dataBody"]["userId"] == 1
    response = await http.get(f"{url}/onlineUser")
    assert json.loads(await response.content())["code"] == "9000"
    await service.stopService()
    with pytest.raises(error.ConnectionRefusedError):
        await http.get(f"{url}/onlineUser")


@pytest_twisted.ensureDeferred
async def test_service_start_failure_is_reported(logged: list[dict]) -> None:
    failures: list[str] = []
    service = RouteService(
        real_reactor(),
        RouteConfig(port=0, bind="127.0.0.1", secret=SECRET),
        lambda: fail(StoreError("no Redis here")),
        LocalRegistry(),
        on_failure=lambda: failures.append("stop"),
    )
    outcome: list[Any] = []
    service.ready.addBoth(outcome.append)
    service.startService()
    [failure] = outcome
    assert isinstance(failure, Failure) and failure.check(StoreError)
    assert failures == ["stop"]
    assert any("could not start" in e.get("log_format", "") for e in logged)
    await service.stopService()


@pytest_twisted.ensureDeferred
async def test_tcp_probe() -> None:
    reactor = real_reactor()
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    number = port.getHost().port
    probe = tcp_probe(reactor, timeout=2.0)
    try:
        assert await probe(ServerAddress("127.0.0.1", number, 1)) is True
        # Its answer stands for a moment (no connection per login).
        assert await probe(ServerAddress("127.0.0.1", number, 1)) is True
    finally:
        await port.stopListening()
    fresh = tcp_probe(reactor, timeout=2.0)
    assert await fresh(ServerAddress("127.0.0.1", number, 1)) is False


def test_tcp_probe_shared_and_remembered() -> None:
    """
    Logins that find no answer while their server is being probed wait for
    that probe (one connection for a burst); the answer then stands for
    L{PROBE_CACHE} seconds of the reactor's clock.
    """
    reactor = MemoryReactorClock()
    probe = tcp_probe(reactor, timeout=2.0)
    server = ServerAddress("127.0.0.1", 4000, 1)
    first, second = probe(server), probe(ServerAddress("127.0.0.1", 4000, 2))
    assert len(reactor.tcpClients) == 1
    assert not first.called and not second.called
    factory = reactor.tcpClients[0][2]
    factory.buildProtocol(None).makeConnection(StringTransport())
    assert [first.result, second.result] == [True, True]
    reactor.advance(PROBE_CACHE - 0.1)
    assert probe(server).result is True
    assert len(reactor.tcpClients) == 1
    reactor.advance(0.2)
    again = probe(server)
    assert len(reactor.tcpClients) == 2
    reactor.tcpClients[1][2].clientConnectionFailed(
        None, Failure(error.ConnectionRefusedError())
    )
    assert again.result is False


def test_a_cancelled_login_leaves_the_probe_to_the_others() -> None:
    """
    The login that started a probe goes away (its request is cancelled):
    the probe goes on for the logins waiting on it, and its answer counts.
    """
    reactor = MemoryReactorClock()
    probe = tcp_probe(reactor, timeout=2.0)
    server = ServerAddress("127.0.0.1", 4000, 1)
    gone, waiting = probe(server), probe(server)
    gone.cancel()
    assert gone.called and not waiting.called
    reactor.tcpClients[0][2].buildProtocol(None).makeConnection(StringTransport())
    assert waiting.result is True
    assert probe(server).result is True
    assert len(reactor.tcpClients) == 1
    gone.addErrback(lambda f: f.trap(CancelledError))


def parse(*args: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(args))
    return options


def test_tap_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIM_SECRET", raising=False)
    config = tap.config_from(parse("--secret", SECRET))
    assert config == RouteConfig(
        port=8083,
        bind="0.0.0.0",
        secret=SECRET,
        balancer="consistent-hash",
        require_password=False,
        token_ttl=86400.0,
        legacy_auth=False,
        max_message=4096,
        max_body=1024 * 1024,
    )
    options = parse("--store", "redis://127.0.0.1:6379/0", "--secret", SECRET)
    assert options["registry"] == "zk://127.0.0.1:2181/cim"


def test_tap_options(monkeypatch: pytest.MonkeyPatch, gc_restored: None) -> None:
    monkeypatch.setenv("CIM_SECRET", SECRET)
    options = parse(
        "--port=0",
        "--bind=127.0.0.1",
        "--store=memory:",
        "--registry=local:",
        "--balancer=random",
        "--require-password",
        "--legacy-auth",
        "--token-ttl=60",
        "--max-message=100",
    )
    config = tap.config_from(options)
    assert (config.port, config.bind, config.secret, config.balancer) == (
        0,
        "127.0.0.1",
        SECRET,
        "random",
    )
    assert config.require_password and config.legacy_auth
    assert (config.token_ttl, config.max_message) == (60.0, 100)
    service = tap.makeService(options)
    assert isinstance(service, RouteService)
    assert service.config == config


@pytest.mark.parametrize(
    "args, complaint",
    [
        (["--balancer=loop"], "--balancer must be one of round-robin, random"),
        (["--store=mysql://x"], "--store must be"),
        (["--store=redis://host:notaport/0"], "bad port"),
        (["--store=redis://host/zero"], "--store"),
        (["--registry=etcd://x"], "--registry must be"),
        (["--registry=zk://nohost/cim"], "bad ZooKeeper address"),
        (["--registry=zk://h:99999/cim"], "bad ZooKeeper address"),
        (["--port=70000"], "--port must be between"),
        (["--port=x"], "--port must be a port number"),
        (["--token-ttl=0"], "--token-ttl must be positive"),
        (["--token-ttl=day"], "--token-ttl must be a number"),
        (["--max-message=0"], "--max-message must be between"),
        (["--max-message=1.5"], "--max-message must be an integer"),
        (["--secret=short"], "at least 8 characters"),
    ],
)
def test_tap_bad_options(
    monkeypatch: pytest.MonkeyPatch, args: list[str], complaint: str
) -> None:
    monkeypatch.setenv("CIM_SECRET", SECRET)
    with pytest.raises(usage.UsageError, match=re.escape(complaint)):
        parse(*args)


def test_tap_needs_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIM_SECRET", raising=False)
    with pytest.raises(usage.UsageError, match="cluster secret is required"):
        parse()


def test_json_replies_carry_their_length_and_are_not_chunked() -> None:
    """
    Every JSON reply says its length (one write, no chunk framing), on the
    paths served without Klein and on Klein's, in success and in refusal.
    """
    route = Route()
    alice, _ = route.online("alice")
    requests = [
        _post(b"/registerAccount", json.dumps({"userName": "bob"}).encode()),
        _post(b"/p2pRoute", b"{nope", b"X-Cim-Secret: " + SECRET.encode()),
        _post(b"/onlineUser", b"{}"),
        _post(b"/offLine", json.dumps({"userId": alice}).encode()),
    ]
    for request in requests:
        reply = _raw(route, route.api.resource(), request)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert b"Transfer-Encoding" not in head
        assert b"\r\nContent-Length: %d\r\n" % len(body) in head + b"\r\n"
        assert json.loads(body)["code"]
