"""
Security against real processes: one route (and a second one issuing
one-second tokens), two IM servers, a private Redis.

  - Nobody logs in over TCP as another user: a token of another user, for
    another server, an expired one, one replayed after logging out, a made
    up one or none at all are refused with an ERROR frame, and the
    connection is closed.
  - Nobody acts for a user over HTTP without that user's token or the
    cluster secret: every route endpoint that acts for a user, and every
    endpoint of the servers' push API, refuse (4010) and change nothing.
  - Passwords, tokens and the cluster secret never appear in a daemon's log.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from cim.message import Command, ErrorCode, Frame, inbox, pair_conversation
from tests.kit.cluster import Cluster, Daemon, Processes
from tests.kit.http import call
from tests.kit.services import RedisServer
from tests.kit.wait import wait_until, within
from tests.kit.wire import WireClient, connect
from tests.test_faults import (
    SECRET,
    Lab,
    Member,
    clients,  # noqa: F401 (a fixture)
    login_member,
    new_client,
    procs,  # noqa: F401 (a fixture)
    route_login,
    unique_root,
)

pytestmark = pytest.mark.integration


class Secured:
    """
    The module's cluster, and every password and token its tests used (none
    may appear in a log).
    """

    def __init__(self, cluster: Cluster, short: Daemon) -> None:
        self.cluster = cluster
        self.short = short
        self.short_url = short.url()
        self.secrets: set[str] = {SECRET}

    def daemons(self) -> list[Daemon]:
        return [*self.cluster.daemons(), self.short]

    def server_port(self, info: dict[str, Any], other: bool = False) -> int:
        """
        The client port of the server C{info} (a login's C{dataBody}) names,
        or of the other one.
        """
        ports = [s.port for s in self.cluster.servers.values()]
        port = int(info["cimServerPort"])
        assert port in ports
        return next(p for p in ports if p != port) if other else port


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    from twisted.internet import reactor

    zk = os.environ.get("CIM_TEST_ZK")
    if not zk:
        if os.environ.get("CI"):
            pytest.fail("CIM_TEST_ZK is not set; run `make test`")
        pytest.skip("needs ZooKeeper (make test)")
    directory = tmp_path_factory.mktemp("security")
    processes = Processes(directory, reactor)
    try:
        redis = RedisServer(directory / "redis", processes)
        redis.start_blocking()
        registry = unique_root(zk, "cimsecurity")
        cluster = Cluster(
            processes,
            directory,
            redis.url(),
            registry,
            SECRET,
            route_args=["--balancer", "round-robin"],
        )
        short = Daemon(
            "route-short-tokens",
            "cim-route",
            ["--bind", "127.0.0.1", "--store", redis.url(), "--registry", registry,
             "--secret", SECRET, "--token-ttl", "1"],
            directory,
            processes,
        )  # fmt: skip
        short.start()
        cluster.start_blocking()
        short.wait_ready_blocking()
        yield Secured(cluster, short)
    finally:
        processes.stop_all()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def tcp_login(
    reactor: Any, port: int, user_id: int, name: str, token: str
) -> WireClient:
    """
    Connect to C{port} and log in; return once answered (or closed).
    """
    raw = await connect(reactor, port)
    raw.send_login(user_id, name, token)
    await raw.wait(
        lambda: raw.find(Command.LOGIN_RESPONSE) or raw.find(Command.ERROR),
        "an answer to the login",
    )
    return raw


async def assert_refused(reactor: Any, raw: WireClient, why: str = "") -> Frame:
    """
    The login got an ERROR frame (bad token), never a LOGIN_RESPONSE, and
    the server closed the connection.
    """
    error = raw.find(Command.ERROR)
    assert error is not None, raw.frames
    assert error.error_code == ErrorCode.BAD_TOKEN, error
    assert why in error.error_reason, error
    assert raw.find(Command.LOGIN_RESPONSE) is None
    await within(reactor, raw.closed)
    return error


async def login_info(secured: Secured, reactor: Any, url: str | None = None) -> Any:
    """
    A new user logged in at the route (not yet over TCP).
    """
    cluster = secured.cluster
    if url is not None:
        cluster = _Route(url, secured.cluster.store)  # type: ignore[assignment]
    info = await route_login(reactor, cluster, unique("sec"))
    secured.secrets.add(info["token"])
    return info


class _Route:
    """
    Just enough of a L{Cluster} for L{route_login}: another route's URL, on
    the same store.
    """

    def __init__(self, url: str, store: str) -> None:
        self.url = url
        self.store = store


# TCP logins


@pytest_twisted.ensureDeferred
async def test_token_of_another_user(reactor: Any, secured: Secured) -> None:
    alice = await login_info(secured, reactor)
    bob = await login_info(secured, reactor)
    # Bob's token, presented as Alice, where Bob's token is valid.
    raw = await tcp_login(
        reactor,
        secured.server_port(bob),
        alice["userId"],
        alice["userName"],
        bob["token"],
    )
    await assert_refused(reactor, raw, "another user")
    # And where Alice's session is.
    raw = await tcp_login(
        reactor,
        secured.server_port(alice),
        alice["userId"],
        alice["userName"],
        bob["token"],
    )
    await assert_refused(reactor, raw)
    assert alice["userId"] not in await secured.cluster.online()


@pytest_twisted.ensureDeferred
async def test_token_for_another_server(reactor: Any, secured: Secured) -> None:
    alice = await login_info(secured, reactor)
    raw = await tcp_login(
        reactor,
        secured.server_port(alice, other=True),
        alice["userId"],
        alice["userName"],
        alice["token"],
    )
    await assert_refused(reactor, raw, "another server")
    # Where it belongs, it works.
    raw = await tcp_login(
        reactor,
        secured.server_port(alice),
        alice["userId"],
        alice["userName"],
        alice["token"],
    )
    assert raw.find(Command.LOGIN_RESPONSE) is not None, raw.frames
    raw.abort()


@pytest_twisted.ensureDeferred
async def test_expired_token(reactor: Any, secured: Secured) -> None:
    alice = await login_info(secured, reactor, secured.short_url)
    headers = {"Authorization": f"Bearer {alice['token']}"}

    async def expired() -> bool:
        _, body = await call(
            reactor,
            f"{secured.cluster.url}/user/groups",
            {"userId": alice["userId"]},
            headers,
        )
        return bool(body["code"] == "4010")

    await wait_until(
        reactor, expired, "the one-second token to expire", 15, 0.1, (Exception,)
    )
    raw = await tcp_login(
        reactor,
        secured.server_port(alice),
        alice["userId"],
        alice["userName"],
        alice["token"],
    )
    await assert_refused(reactor, raw, "expired")


@pytest_twisted.ensureDeferred
async def test_token_replayed_after_logout(reactor: Any, secured: Secured) -> None:
    alice = await login_info(secured, reactor)
    port = secured.server_port(alice)
    first = await tcp_login(
        reactor, port, alice["userId"], alice["userName"], alice["token"]
    )
    assert first.find(Command.LOGIN_RESPONSE) is not None, first.frames
    _, body = await call(
        reactor,
        f"{secured.cluster.url}/offLine",
        {"userId": alice["userId"]},
        {"Authorization": f"Bearer {alice['token']}"},
    )
    assert body["code"] == "9000", body
    await within(reactor, first.closed)  # the logout closed it
    again = await tcp_login(
        reactor, port, alice["userId"], alice["userName"], alice["token"]
    )
    await assert_refused(reactor, again)
    assert alice["userId"] not in await secured.cluster.online()


@pytest_twisted.ensureDeferred
async def test_made_up_or_missing_token(reactor: Any, secured: Secured) -> None:
    alice = await login_info(secured, reactor)
    port = secured.server_port(alice)
    real = alice["token"]
    # The real token with its last character changed (to one it is not).
    changed = real[:-1] + ("B" if real.endswith("A") else "A")
    for token in ["", "x" * 43, changed, real + "A"]:
        raw = await tcp_login(reactor, port, alice["userId"], alice["userName"], token)
        await assert_refused(reactor, raw)
    # None of that spoilt the real token.
    raw = await tcp_login(
        reactor, port, alice["userId"], alice["userName"], alice["token"]
    )
    assert raw.find(Command.LOGIN_RESPONSE) is not None, raw.frames
    raw.abort()


# HTTP


def credentials_of_others(bob_token: str) -> list[dict[str, str]]:
    """
    Headers that must not let anybody act for Alice.
    """
    return [
        {},
        {"Authorization": f"Bearer {bob_token}"},
        {"Authorization": "Bearer " + "x" * 43},
        {"Authorization": bob_token},
        {"Authorization": "Basic YWxpY2U6cHc="},
        {"X-Cim-Secret": "not-the-secret"},
        {"X-Cim-Secret": ""},
        {"X-Cim-Secret": SECRET[:-1]},
    ]


@pytest_twisted.ensureDeferred
async def test_route_refuses_acting_for_others(
    reactor: Any,
    secured: Secured,
    procs: Lab,  # noqa: F811
    clients: Any,  # noqa: F811
) -> None:
    cluster = secured.cluster
    alice = await login_member(reactor, procs, cluster, unique("alice"))
    bob = await login_member(reactor, procs, cluster, unique("bob"))
    secured.secrets.update({alice.client.token, bob.client.token})
    a, b = alice.user_id, bob.user_id
    alices_group, bobs_group, new_group = unique("ga"), unique("gb"), unique("gn")
    await within(reactor, alice.client.create_group(alices_group))
    await within(reactor, bob.client.create_group(bobs_group))
    calls = [
        ("/p2pRoute", {"userId": a, "receiveUserId": b, "msg": "forged p2p"}),
        ("/groupRoute", {"userId": a, "msg": "forged broadcast"}),
        ("/offLine", {"userId": a}),
        ("/fetchOfflineMsgs", {"receiveUserId": a}),
        ("/group/create", {"userId": a, "groupId": new_group}),
        ("/group/join", {"userId": a, "groupId": bobs_group}),
        ("/group/leave", {"userId": a, "groupId": alices_group}),
        ("/group/members", {"userId": a, "groupId": alices_group}),
        ("/group/send", {"userId": a, "groupId": alices_group, "msg": "forged"}),
        ("/user/groups", {"userId": a}),
        ("/history", {"userId": a, "peerId": b}),
        ("/history", {"userId": a, "conversation": pair_conversation(a, b)}),
        ("/conversations", {"userId": a}),
        ("/read", {"userId": a, "conversation": pair_conversation(a, b), "seq": 1}),
        ("/readPositions", {"userId": a, "conversation": pair_conversation(a, b)}),
        ("/devices", {"userId": a}),
    ]
    for headers in credentials_of_others(bob.client.token):
        for path, body in calls:
            status, answer = await call(reactor, cluster.url + path, body, headers)
            assert (status, answer["code"]) == (200, "4010"), (path, headers, answer)
    # Logging in as Alice needs a proof (her key, password or token): Bob's
    # token or none is not one.
    for headers in ({}, {"Authorization": f"Bearer {bob.client.token}"}):
        _, answer = await call(
            reactor,
            cluster.url + "/login",
            {"userId": a, "userName": alice.name, "token": bob.client.token},
            headers,
        )
        assert answer["code"] == "9100", answer
    # Nothing happened: Alice is still connected, in her group only, Bob
    # got nothing from her, the new group does not exist.
    assert alice.client.ready and a in await cluster.online()
    assert await within(reactor, alice.client.my_groups()) == [alices_group]
    await within(reactor, bob.client.create_group(new_group))
    await within(reactor, alice.client.send_private(b, "the real one"))
    await wait_until(
        reactor,
        lambda: any(m.text == "the real one" for m in bob.recorder.messages),
        "Bob to get Alice's real message",
    )
    assert [m.text for m in bob.recorder.messages if m.sender_id == a] == [
        "the real one"
    ]
    assert [m.text for m in alice.recorder.messages if "forged" in m.text] == []
    # With her token or the secret, the same calls work.
    _, answer = await call(
        reactor,
        cluster.url + "/user/groups",
        {"userId": a},
        {"Authorization": f"Bearer {alice.client.token}"},
    )
    assert answer["code"] == "9000", answer
    _, answer = await call(
        reactor, cluster.url + "/user/groups", {"userId": a}, {"X-Cim-Secret": SECRET}
    )
    assert answer["code"] == "9000", answer


@pytest_twisted.ensureDeferred
async def test_push_api_needs_the_secret(
    reactor: Any,
    secured: Secured,
    procs: Lab,  # noqa: F811
    clients: Any,  # noqa: F811
) -> None:
    cluster = secured.cluster
    alice = await login_member(reactor, procs, cluster, unique("alice"))
    bob = await login_member(reactor, procs, cluster, unique("bob"))
    secured.secrets.update({alice.client.token, bob.client.token})
    a = alice.user_id
    server = cluster.servers[cluster.server_of(alice.client)]
    forged = {
        "msgId": 1,
        "conversation": inbox(a),
        "seq": 1_000_000,
        "sendUserId": bob.user_id,
        "sendUserName": bob.name,
        "msg": "forged push",
        "timestamp": 0,
    }
    calls = [
        ("/push", {"items": [{"messages": [forged], "users": [a]}]}),
        ("/sendMsg", {"userId": a, "msg": "forged sendMsg"}),
        ("/kick", {"userId": a, "sessionId": "", "reason": "forged kick"}),
        ("/resync", {"userId": a}),
    ]
    for headers in credentials_of_others(alice.client.token):
        for path, body in calls:
            url = f"http://127.0.0.1:{server.http_port}{path}"
            _, answer = await call(reactor, url, body, headers)
            assert answer["code"] == "4010", (path, headers, answer)
    # Alice is still connected and got none of it: a message sent now is
    # the next thing she gets.
    await within(reactor, bob.client.send_private(a, "after the forgeries"))
    await wait_until(
        reactor,
        lambda: any(m.text == "after the forgeries" for m in alice.recorder.messages),
        "Alice to get Bob's message",
    )
    assert [m.text for m in alice.recorder.messages] == ["after the forgeries"]
    assert alice.client.ready
    # With the secret, /sendMsg reaches her.
    _, answer = await call(
        reactor,
        f"http://127.0.0.1:{server.http_port}/sendMsg",
        {"userId": a, "msg": "from the back-end"},
        {"X-Cim-Secret": SECRET},
    )
    assert answer["code"] == "9000", answer
    await wait_until(
        reactor,
        lambda: any(m.text == "from the back-end" for m in alice.recorder.messages),
        "Alice to get the back-end's message",
    )


# Logs


@pytest_twisted.ensureDeferred
async def test_no_secrets_in_logs(
    reactor: Any,
    secured: Secured,
    procs: Lab,  # noqa: F811
    clients: Any,  # noqa: F811
) -> None:
    """
    A run that registers with a password, logs in (right and wrong), chats,
    is refused and logs off: no daemon logged a password, a token or the
    cluster secret.
    """
    cluster = secured.cluster
    password = f"pw-{uuid.uuid4().hex}"
    wrong = f"wrong-{uuid.uuid4().hex}"
    secured.secrets.update({password, wrong})
    name = unique("carol")
    carol = await login_member(reactor, procs, cluster, name)
    other_name = unique("dave")
    dave_client, dave_recorder = new_client(reactor, procs, cluster.url, other_name)
    await within(reactor, dave_client.login(other_name, password=password))
    dave = Member(other_name, dave_client, dave_recorder)
    secured.secrets.update({carol.client.token, dave.client.token})
    await within(reactor, carol.client.send_private(dave.user_id, "hello"))
    await within(reactor, dave.client.send_private(carol.user_id, "hi"))
    # Refused attempts: a wrong password, made-up tokens, over HTTP and TCP.
    _, answer = await call(
        reactor,
        cluster.url + "/login",
        {"userId": dave.user_id, "userName": other_name, "password": wrong},
    )
    assert answer["code"] == "9100", answer
    _, answer = await call(
        reactor,
        cluster.url + "/registerAccount",
        {"userName": other_name, "password": wrong},
    )
    assert answer["code"] == "4090", answer
    made_up = f"tok-{uuid.uuid4().hex}"
    secured.secrets.add(made_up)
    _, answer = await call(
        reactor,
        cluster.url + "/user/groups",
        {"userId": dave.user_id},
        {"Authorization": f"Bearer {made_up}"},
    )
    assert answer["code"] == "4010", answer
    port = cluster.servers[cluster.server_of(dave.client)].port
    raw = await tcp_login(reactor, port, dave.user_id, other_name, made_up)
    await assert_refused(reactor, raw)
    await within(reactor, dave.client.close())
    await within(reactor, carol.client.close())
    for daemon in secured.daemons():
        log = daemon.logfile.read_text(errors="replace")
        assert "logs in" in log or "logged in" in log or daemon is secured.short
        for secret in secured.secrets:
            assert secret not in log, f"{daemon.name} logged a secret"
