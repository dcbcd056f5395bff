"""
Connections and request bodies against a real C{twistd cim-standalone}
(an IM server and a route in one process: the client port, the push API
and the route's HTTP port), issue 13 item 5:

  - connections from one address over C{--max-connections-per-address}
    (client port) or C{--max-http-connections-per-address} (push API,
    route) are closed at once, while other addresses are served;
  - connections over C{--max-connections} in all are closed at once;
  - a C{Content-Length} over the body limit is answered 413, with the
    envelope, before a byte of the body is sent; a chunked body is cut
    once it passes the limit;

and each time a normal client logs in and chats afterwards.  (The
whole-request deadline is in C{test_slowloris}.)
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool

from cim.message import Command
from tests.kit.cluster import Daemon
from tests.kit.http import call
from tests.kit.wait import wait_until, within
from tests.kit.wire import WireClient
from tests.test_faults import (
    Lab,
    clients,  # noqa: F401 (a fixture)
    new_client,
    procs,  # noqa: F401 (a fixture)
)

pytestmark = pytest.mark.integration

SECRET = "net-limits-secret"


class Held(Protocol):
    """
    A raw TCP connection that keeps what it receives.
    """

    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(None)


def endpoint(reactor: Any, port: int, source: str) -> Any:
    return endpoints.TCP4ClientEndpoint(
        reactor, "127.0.0.1", port, timeout=5, bindAddress=(source, 0)
    )


async def hold(reactor: Any, port: int, count: int, source: str) -> list[Held]:
    """
    C{count} connections to C{port} from the address C{source}.
    """
    held = []
    for _ in range(count):
        conn = Held()
        await endpoints.connectProtocol(endpoint(reactor, port, source), conn)
        held.append(conn)
    return held


def closed(conns: list[Held]) -> int:
    return sum(1 for c in conns if c.closed.called)


async def wait_refused(reactor: Any, conns: list[Held], count: int, what: str) -> None:
    """
    Wait until C{count} of C{conns} were closed by the daemon.
    """
    await wait_until(
        reactor, lambda: closed(conns) >= count, f"{count} {what} refused", 10
    )
    assert closed(conns) == count


async def get_on(reactor: Any, conn: Held, path: str) -> bytes:
    """
    C{GET path} on a held HTTP connection; @return: the answer so far,
    once it has an envelope's code.
    """
    assert conn.transport is not None
    conn.data = b""
    conn.transport.write(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
    await wait_until(
        reactor, lambda: b'"code"' in conn.data, f"an answer to {path}", 10
    )
    return conn.data


async def get_from(reactor: Any, url: str, source: str) -> dict[str, Any]:
    """
    C{GET url} on a new connection from the address C{source}.
    """
    http = HTTPClient(
        Agent(reactor, pool=HTTPConnectionPool(reactor, False), bindAddress=(source, 0))
    )
    response = await within(reactor, http.get(url), 10)
    answer: dict[str, Any] = await within(reactor, response.json(), 10)
    return answer


async def hang_up(reactor: Any, conns: list[Held]) -> None:
    for conn in conns:
        if conn.transport is not None and not conn.closed.called:
            conn.transport.loseConnection()
    for conn in conns:
        await within(reactor, conn.closed, 10)


async def tcp_login(reactor: Any, node: Daemon, source: str) -> WireClient:
    """
    A new user logged in at the route and over TCP from C{source}.
    """
    name = f"u{uuid.uuid4().hex[:10]}"
    _, reply = await call(reactor, f"{node.url()}/registerAccount", {"userName": name})
    assert reply["code"] == "9000", reply
    user_id = reply["dataBody"]["userId"]
    login = {"userId": user_id, "userName": name}
    if "accountKey" in reply["dataBody"]:
        login["accountKey"] = reply["dataBody"]["accountKey"]
    _, reply = await call(reactor, f"{node.url()}/login", login)
    assert reply["code"] == "9000", reply
    info = reply["dataBody"]
    client = WireClient(reactor)
    port = int(info["cimServerPort"])
    await endpoints.connectProtocol(endpoint(reactor, port, source), client)
    client.send_login(user_id, name, info["token"])
    await client.wait_frame(Command.LOGIN_RESPONSE)
    return client


async def assert_chat(reactor: Any, lab: Lab, node: Daemon) -> None:
    """
    Two library clients log in and one gets the other's message.
    """
    tag = uuid.uuid4().hex[:6]
    alice, _ = new_client(reactor, lab, node.url(), f"alice-{tag}")
    bob, bob_seen = new_client(reactor, lab, node.url(), f"bob-{tag}")
    await within(reactor, alice.login(f"alice-{tag}"))
    await within(reactor, bob.login(f"bob-{tag}"))
    assert bob.user_id is not None
    await within(reactor, alice.send_private(bob.user_id, "still here"))
    await wait_until(
        reactor,
        lambda: any(m.text == "still here" for m in bob_seen.messages),
        "bob to get alice's message",
    )


async def standalone(reactor: Any, lab: Lab, *args: str) -> Daemon:
    """
    A C{cim-standalone} with C{args}, started.
    """
    node = Daemon(
        f"node-{uuid.uuid4().hex[:6]}",
        "cim-standalone",
        ["--secret", SECRET, *args],
        lab.directory,
        lab,
    )
    node.start()
    await node.wait_ready(reactor)
    return node


@pytest_twisted.ensureDeferred
async def test_connections_per_address(
    reactor: Any,
    procs: Lab,  # noqa: F811
    clients: Any,  # noqa: F811
) -> None:
    node = await standalone(
        reactor,
        procs,
        "--max-connections-per-address", "20",
        "--max-http-connections-per-address", "10",
    )  # fmt: skip
    ports = node.ports

    # The client port: 20 of 25 from one address are held, 5 closed at once.
    flood = await hold(reactor, ports["client"], 25, "127.0.0.1")
    await wait_refused(reactor, flood, 5, "client connections")
    health = await get_from(reactor, f"{node.url('http')}/health", "127.0.0.2")
    assert health["dataBody"]["connections"] == 20
    # Another address logs in meanwhile.
    other = await tcp_login(reactor, node, "127.0.0.2")

    # The route: 10 of 12; a held one is served, a new one from the same
    # address is not, one from another address is.
    route = await hold(reactor, ports["route"], 12, "127.0.0.1")
    await wait_refused(reactor, route, 2, "route connections")
    held = next(c for c in route if not c.closed.called)
    assert b'"code":"9000"' in await get_on(reactor, held, "/health")
    one_more = await hold(reactor, ports["route"], 1, "127.0.0.1")
    await wait_refused(reactor, one_more, 1, "a route connection")
    assert one_more[0].data == b""  # closed before reading anything
    answer = await get_from(reactor, f"{node.url()}/health", "127.0.0.3")
    assert answer["code"] == "9000"

    # The push API: 10 of 12.
    push = await hold(reactor, ports["http"], 12, "127.0.0.1")
    await wait_refused(reactor, push, 2, "push API connections")
    held = next(c for c in push if not c.closed.called)
    assert b'"code":"9000"' in await get_on(reactor, held, "/health")

    # Refusals are logged, once per address and port for a while.
    log = node.log_text()
    assert "cim-server clients: refused a connection from 127.0.0.1" in log
    assert "cim-route HTTP: refused a connection from 127.0.0.1" in log
    assert log.count("refused a connection") == 3, log

    # Gone, the flood's address is served again.
    await hang_up(reactor, flood + route + push)
    await other.hang_up()
    await assert_chat(reactor, procs, node)
    assert node.running


@pytest_twisted.ensureDeferred
async def test_connections_in_all(
    reactor: Any,
    procs: Lab,  # noqa: F811
    clients: Any,  # noqa: F811
) -> None:
    node = await standalone(
        reactor, procs, "--max-connections-per-address", "20", "--max-connections", "30"
    )
    port = node.ports["client"]
    first = await hold(reactor, port, 20, "127.0.0.1")
    second = await hold(reactor, port, 20, "127.0.0.2")
    await wait_refused(reactor, second, 10, "connections over the total")
    assert closed(first) == 0
    # Full: a third address is refused too, on every port.
    third = await hold(reactor, node.ports["route"], 1, "127.0.0.3")
    await wait_refused(reactor, third, 1, "a route connection")
    assert "(30 connections in all already)" in node.log_text()

    await hang_up(reactor, first + second)
    await assert_chat(reactor, procs, node)


async def post_raw(reactor: Any, port: int, head: bytes) -> tuple[Held, float]:
    """
    Send C{head} (a request's headers, perhaps some body) and wait for the
    daemon to close; @return: the connection and how long that took.
    """
    conn = Held()
    await endpoints.connectProtocol(endpoint(reactor, port, "127.0.0.1"), conn)
    start = time.monotonic()
    assert conn.transport is not None
    conn.transport.write(head)
    await within(reactor, conn.closed, 10)
    return conn, time.monotonic() - start


def status_and_body(conn: Held) -> tuple[bytes, dict[str, Any]]:
    head, _, body = conn.data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], json.loads(body)


@pytest_twisted.ensureDeferred
async def test_bodies_over_the_limit(
    reactor: Any,
    procs: Lab,  # noqa: F811
    clients: Any,  # noqa: F811
) -> None:
    node = await standalone(reactor, procs)
    ports = node.ports
    for port, path, size, limit in [
        (ports["route"], b"/login", 200 * 1024 * 1024, 1024 * 1024),
        (ports["http"], b"/push", 100 * 1024 * 1024, 4 * 1024 * 1024),
    ]:
        # Answered on the headers alone: no body is ever sent.
        conn, took = await post_raw(
            reactor,
            port,
            b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (path, size),
        )
        status, answer = status_and_body(conn)
        assert status == b"HTTP/1.1 413 Content Too Large", conn.data
        assert answer["code"] == "3000"
        assert f"over the limit of {limit} bytes" in answer["message"]
        assert took < 2
        # With Expect: 100-continue, no "100 Continue" after the refusal.
        conn, _ = await post_raw(
            reactor,
            port,
            b"POST %s HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % (path, size),
        )
        assert conn.data.startswith(b"HTTP/1.1 413 "), conn.data
        assert b"100 Continue" not in conn.data
        # A chunked body is cut once it passes the limit.
        chunk = b"%x\r\n%s\r\n" % (256 * 1024, b"x" * 256 * 1024)
        conn, _ = await post_raw(
            reactor,
            port,
            b"POST %s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n%s"
            % (path, chunk * (limit // (256 * 1024) + 1)),
        )
        status, answer = status_and_body(conn)
        assert status == b"HTTP/1.1 413 Content Too Large", conn.data
        assert answer["code"] == "3000"

    # Within the limit, the route still answers as before.
    _, reply = await call(reactor, f"{node.url()}/registerAccount", {"userName": ""})
    assert reply["code"] == "3000"
    await assert_chat(reactor, procs, node)
    assert "Traceback" not in node.log_text()
