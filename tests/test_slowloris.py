"""
Slow-loris and flood against a real IM server process (heartbeat timeout
3 s, 500 frames a second per connection), while well-behaved clients on the
same server keep chatting:

  - a connection that never logs in, and one that sends a byte a second
    without ever completing a frame, are cut at the login deadline (10 s);
  - a logged-in connection that sends a byte a second without completing a
    frame is cut at the heartbeat timeout;
  - a connection that floods frames gets a rate-limit ERROR and is closed;
  - one that announces an oversized frame gets an ERROR and is closed.

And against the HTTP ports of a real C{cim-standalone} (route and push API,
C{--request-timeout 3}): a request whose headers, or whose body, come a
byte a second, and a connection that sends nothing, are answered 408 and
cut at the deadline, though each byte comes well within the idle time-out;
requests on other connections are answered meanwhile.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import LoopingCall

from cim.client.library import ClientState
from cim.codec import encode_framed, encode_varint
from cim.message import Command, ErrorCode, Frame
from tests.kit.wait import within
from tests.kit.wire import WireClient, connect
from tests.test_faults import (
    Chat,
    Lab,
    assert_no_unhandled_errors,
    clients,  # noqa: F401 (a fixture)
    members_in_group,
    procs,  # noqa: F401 (a fixture)
    raw_login,
)
from tests.test_net_limits import Held, assert_chat, get_from, hold, standalone

pytestmark = pytest.mark.integration

#: The server's login deadline (IMServer's default; no option sets it).
LOGIN_DEADLINE = 10.0
HEARTBEAT_TIMEOUT = 3.0


class Dribble:
    """
    Write C{data} to C{client} one byte a second until it is closed.
    """

    def __init__(self, client: WireClient, data: bytes) -> None:
        self.client = client
        self.data = data
        self.sent = 0
        self.loop = LoopingCall(self._one)

    def start(self) -> None:
        self.loop.start(1.0, now=True)
        self.client.closed.addBoth(lambda _: self.stop())

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()

    def _one(self) -> None:
        transport = self.client.transport
        if self.sent < len(self.data) and transport is not None:
            transport.write(self.data[self.sent : self.sent + 1])
            self.sent += 1


def error_of(client: WireClient) -> Frame:
    error = client.find(Command.ERROR)
    assert error is not None, client.frames
    return error


@pytest_twisted.ensureDeferred
async def test_slow_loris_and_flood(
    reactor: Any,
    procs: Lab,  # noqa: F811
    clients: Any,  # noqa: F811
    zk_url: str,
) -> None:
    _, cluster = await procs.redis_cluster(
        reactor,
        zk_url,
        servers=1,
        server_args=["--heartbeat-timeout", str(int(HEARTBEAT_TIMEOUT)),
                     "--rate", "500"],
    )  # fmt: skip
    port = cluster.servers["server1"].port
    members = await members_in_group(reactor, procs, cluster, 3, "loris")
    chat = Chat(reactor, members, "loris", seed=6)
    chat.start()
    await chat.wait_acks(20)

    # A frame that is never completed: its length prefix, then a byte a
    # second of a body far longer than the test.
    endless = encode_varint(10_000) + b"\x0a" * 10_000
    start = time.monotonic()
    mute = await connect(reactor, port)
    loris = await connect(reactor, port)
    Dribble(loris, endless).start()
    logged_in_loris, _ = await raw_login(reactor, cluster, f"loris-{uuid.uuid4().hex}")
    loris_since = time.monotonic()
    Dribble(logged_in_loris, endless).start()
    flooder, _ = await raw_login(reactor, cluster, f"flood-{uuid.uuid4().hex}")
    ping = encode_framed(Frame(cmd=Command.PING, req_msg="ping"))
    assert flooder.transport is not None
    flooder.transport.write(ping * 5000)
    oversized = await connect(reactor, port)
    assert oversized.transport is not None
    oversized.transport.write(encode_varint(64 * 1024 * 1024) + b"x" * 100)

    # The flooder and the oversized frame at once.
    await within(reactor, flooder.closed, 10)
    assert error_of(flooder).error_code == ErrorCode.RATE_LIMITED
    await within(reactor, oversized.closed, 10)
    assert error_of(oversized).error_code == ErrorCode.FRAME_TOO_LONG
    # The logged-in slow loris at the heartbeat timeout.
    await within(reactor, logged_in_loris.closed, 15)
    assert logged_in_loris.closed_at is not None
    assert logged_in_loris.closed_at - loris_since >= HEARTBEAT_TIMEOUT - 0.5
    assert "heartbeat" in error_of(logged_in_loris).error_reason
    # The others at the login deadline.
    for client in (mute, loris):
        await within(reactor, client.closed, 20)
        assert client.closed_at is not None
        assert client.closed_at - start >= LOGIN_DEADLINE - 0.5
        error = error_of(client)
        assert error.error_code == ErrorCode.LOGIN_TIMEOUT, error
    assert loris.find(Command.LOGIN_RESPONSE) is None

    # Meanwhile the well-behaved clients chatted on, never dropped.
    acks = chat.acks
    await chat.wait_acks(acks + 20)
    await chat.stop()
    report = await chat.finish()
    assert report["lost"] == report["duplicated"] == report["out_of_order"] == 0
    for member in members:
        assert [s for s, _ in member.recorder.states if s != ClientState.READY] == [
            ClientState.CONNECTING
        ], member.recorder.states
    cluster.assert_running()
    assert_no_unhandled_errors(cluster)


REQUEST_TIMEOUT = 3.0


class DribbleHTTP:
    """
    Write C{data} to a L{Held} connection one byte a second until it is
    closed.
    """

    def __init__(self, conn: Held, data: bytes) -> None:
        self.conn = conn
        self.data = data
        self.sent = 0
        self.loop = LoopingCall(self._one)

    def start(self) -> None:
        self.loop.start(1.0, now=True)
        self.conn.closed.addBoth(lambda _: self.loop.running and self.loop.stop())

    def _one(self) -> None:
        transport = self.conn.transport
        if self.sent < len(self.data) and transport is not None:
            transport.write(self.data[self.sent : self.sent + 1])
            self.sent += 1


@pytest_twisted.ensureDeferred
async def test_slow_http_requests(
    reactor: Any,
    procs: Lab,  # noqa: F811
    clients: Any,  # noqa: F811
) -> None:
    node = await standalone(reactor, procs, "--request-timeout", str(REQUEST_TIMEOUT))
    headers = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 100
    body = (
        b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"{" * 100
    )
    start = time.monotonic()
    lorises = []
    for port in (node.ports["route"], node.ports["http"]):
        mute, slow_headers, slow_body = await hold(reactor, port, 3, "127.0.0.1")
        DribbleHTTP(slow_headers, headers).start()
        slow_body.transport.write(body[:-50])  # type: ignore[union-attr]
        DribbleHTTP(slow_body, body[-50:]).start()
        lorises += [mute, slow_headers, slow_body]
    # Meanwhile a request on another connection is answered.
    answer = await get_from(reactor, f"{node.url()}/health", "127.0.0.1")
    assert answer["code"] == "9000"

    for conn in lorises:
        await within(reactor, conn.closed, REQUEST_TIMEOUT + 10)
        took = time.monotonic() - start
        assert REQUEST_TIMEOUT - 0.5 <= took <= REQUEST_TIMEOUT + 3, took
        assert conn.data.startswith(b"HTTP/1.1 408 Request Timeout"), conn.data
        assert b'"code":"3000"' in conn.data
    await assert_chat(reactor, procs, node)
    assert node.running
