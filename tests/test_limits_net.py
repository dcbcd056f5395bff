"""
The daemons' limits on Twisted's fakes: the options and their defaults,
the per-address and total connection counts (L{cim.limits_net}), the
request deadline and body limit of the sites (L{cim.web}), the stop
deadline (L{cim.daemon.StopDeadline}) and the Redis pool's "down" state.
The same limits against real processes: C{test_net_limits},
C{test_slowloris}, C{test_slow_failure}.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from cim import standalone
from cim.daemon import StopDeadline
from cim.limits_net import (
    CLIENT_PER_ADDRESS,
    HTTP_PER_ADDRESS,
    MAX_CONNECTIONS,
    RESERVED_FILES,
    ConnectionLimits,
    LimitedFactory,
    default_max_connections,
)
from cim.route import tap as route_tap
from cim.server import tap as server_tap
from cim.store.redis.connection import is_down
from cim.web import QuietSite

SECRET = ["--secret", "x" * 16]


# Options


def test_defaults() -> None:
    server = server_tap.config_from(_parse(server_tap.Options(), []))
    assert server.limits.per_address == CLIENT_PER_ADDRESS == 200
    assert server.limits.http_per_address == HTTP_PER_ADDRESS == 256
    assert server.limits.request_timeout == 30.0
    assert server.limits.max_connections == default_max_connections() <= 19_500
    assert server.shutdown_timeout == 5.0
    route = route_tap.config_from(_parse(route_tap.Options(), []))
    assert route.limits.per_address == HTTP_PER_ADDRESS
    assert route.shutdown_timeout == 5.0
    options = _parse(route_tap.Options(), [])
    assert options["store-timeout"] == 3.0


@pytest.mark.parametrize(
    "soft, expected",
    [
        # 20,000 open files: 19,000 clients, and the push API's callers.
        (20_000, 19_500),
        (1_024, 524),
        (100, 1),
        (1_000_000, 19_500),
        (-1, 19_500),  # RLIM_INFINITY
    ],
)
def test_default_max_connections(
    monkeypatch: pytest.MonkeyPatch, soft: int, expected: int
) -> None:
    """
    A daemon holds at most L{MAX_CONNECTIONS} connections, and keeps
    L{RESERVED_FILES} of its open-file limit for everything else.
    """
    import resource

    if soft == -1:
        soft = resource.RLIM_INFINITY
    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, soft))
    assert default_max_connections() == expected
    assert MAX_CONNECTIONS == 19_500 and RESERVED_FILES == 500


def test_options() -> None:
    args = [
        "--max-connections", "50", "--max-connections-per-address", "0",
        "--max-http-connections-per-address", "7", "--request-timeout", "2.5",
        "--store-timeout", "1", "--shutdown-timeout", "9",
    ]  # fmt: skip
    server = server_tap.config_from(_parse(server_tap.Options(), args))
    assert server.limits.max_connections == 50
    assert server.limits.per_address == 0
    assert server.limits.http_per_address == 7
    assert server.limits.request_timeout == 2.5
    assert server.shutdown_timeout == 9
    _parse(standalone.Options(), args)


@pytest.mark.parametrize(
    "args",
    [
        ["--max-connections", "0"],
        ["--max-connections-per-address", "-1"],
        ["--max-connections-per-address", "many"],
        ["--request-timeout", "0"],
        ["--store-timeout", "-3"],
        ["--shutdown-timeout", "soon"],
    ],
)
def test_bad_options(args: list[str]) -> None:
    with pytest.raises(usage.UsageError):
        _parse(server_tap.Options(), args)


def _parse(options: usage.Options, args: list[str]) -> usage.Options:
    options.parseOptions([*SECRET, *args])
    return options


# Connections


def _connect(factory: LimitedFactory, host: str) -> Any:
    protocol = factory.buildProtocol(IPv4Address("TCP", host, 1234))
    if protocol is not None:
        protocol.makeConnection(StringTransport())
    return protocol


def test_per_address_and_total() -> None:
    limits = ConnectionLimits(5)
    clock = Clock()
    inner = Factory.forProtocol(Protocol)
    one = LimitedFactory(inner, limits, 2, clock, "one")
    other = LimitedFactory(inner, limits, 0, clock, "other")
    a = [_connect(one, "10.0.0.1") for _ in range(3)]
    assert a[2] is None and one.peers == {"10.0.0.1": 2}
    assert _connect(one, "10.0.0.2") is not None
    # No per-address limit on the other port, but the total is shared.
    b = [_connect(other, "10.0.0.1") for _ in range(3)]
    assert b[0] is not None and b[1] is not None and b[2] is None
    assert limits.open == 5 and limits.full()
    assert _connect(one, "10.0.0.3") is None
    assert one.refused == 2 and other.refused == 1
    a[0].connectionLost(None)
    assert one.peers == {"10.0.0.1": 1, "10.0.0.2": 1} and limits.open == 4
    assert _connect(one, "10.0.0.3") is not None


def test_addresses_asked_once() -> None:
    """
    A wrapped connection asks its transport for its addresses once (the
    site asks for both at every request) and answers the same after.
    """

    class Counting(StringTransport):
        asked = 0

        def getHost(self) -> Any:
            self.asked += 1
            return super().getHost()

        def getPeer(self) -> Any:
            self.asked += 1
            return super().getPeer()

    factory = LimitedFactory(
        Factory.forProtocol(Protocol), ConnectionLimits(5), 0, Clock(), "port"
    )
    protocol = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1234))
    transport = Counting(
        hostAddress=IPv4Address("TCP", "10.0.0.9", 8083),
        peerAddress=IPv4Address("TCP", "10.0.0.1", 1234),
    )
    protocol.makeConnection(transport)
    for _ in range(3):
        assert protocol.getHost() == IPv4Address("TCP", "10.0.0.9", 8083)
        assert protocol.getPeer() == IPv4Address("TCP", "10.0.0.1", 1234)
    assert transport.asked == 2


def test_refusals_logged_once_a_minute() -> None:
    from twisted.logger import globalLogPublisher

    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        clock = Clock()
        factory = LimitedFactory(
            Factory.forProtocol(Protocol), ConnectionLimits(0), 1, clock, "port"
        )
        for _ in range(5):
            _connect(factory, "10.0.0.9")
        clock.advance(61)
        _connect(factory, "10.0.0.9")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    lines = [e for e in seen if e.get("log_format", "").startswith("{port}: refused")]
    assert [e["since"] for e in lines] == [0, 3]


# Requests


class _Hello(Resource):
    isLeaf = True

    def render_POST(self, request: Any) -> bytes:
        return b"got %d" % len(request.content.read())

    render_GET = render_POST


def _channel(clock: Clock, **kwargs: Any) -> tuple[Any, StringTransport]:
    site = QuietSite(_Hello(), reactor=clock, **kwargs)
    channel = site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1))
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def test_content_length_over_the_limit() -> None:
    channel, transport = _channel(Clock(), max_body=10)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 Content Too Large\r\n")
    assert b'"code":"3000"' in transport.value()
    assert transport.disconnecting
    channel.dataReceived(b"x" * 11)  # read no further
    assert b"got" not in transport.value()


def test_chunked_over_the_limit() -> None:
    channel, transport = _channel(Clock(), max_body=10)
    channel.dataReceived(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"6\r\nxxxxxx\r\n6\r\nxxxxxx\r\n0\r\n\r\n"
    )
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert b"got" not in transport.value()


def test_within_the_limit() -> None:
    channel, transport = _channel(Clock(), max_body=10)
    channel.dataReceived(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789"
    )
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert transport.value().endswith(b"\r\n\r\ngot 10")


def test_form_bodies_are_not_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A POST's body is left to the resource: twisted.web does not parse its
    C{Content-Type} (slowly, with the email package) to read a form.
    """
    from twisted.web import http

    def parsed(line: bytes) -> bytes:
        raise AssertionError(f"Content-Type parsed: {line!r}")

    monkeypatch.setattr(http, "_parseContentType", parsed)
    for ctype in (b"application/json", b"application/x-www-form-urlencoded"):
        channel, transport = _channel(Clock())
        channel.dataReceived(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: " + ctype
            + b"\r\nContent-Length: 3\r\n\r\na=b"
        )  # fmt: skip
        assert transport.value().startswith(b"HTTP/1.1 200 "), ctype
        assert transport.value().endswith(b"\r\n\r\ngot 3")


def test_request_deadline() -> None:
    clock = Clock()
    channel, transport = _channel(clock, request_timeout=5)
    # Each byte well within the idle time-out; the request as a whole late.
    for byte in b"GET / HTTP/1.1\r\n":
        channel.dataReceived(bytes([byte]))
        clock.advance(0.3)
    assert not transport.disconnecting
    clock.advance(5)
    assert transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert transport.disconnecting


def test_deadline_is_per_request() -> None:
    clock = Clock()
    channel, transport = _channel(clock, request_timeout=5)
    for _ in range(3):
        clock.advance(4)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert transport.value().startswith(b"HTTP/1.1 200 "), transport.value()
        transport.clear()
    # Kept alive and idle: the idle time-out's business, not the deadline's.
    clock.advance(10)
    assert not transport.disconnecting
    channel.dataReceived(b"GET / HT")
    clock.advance(5)
    assert transport.value().startswith(b"HTTP/1.1 408 ")


def test_deadline_timer_per_connection() -> None:
    """
    Back-to-back requests on a kept-alive connection share one timer: it
    is not scheduled and cancelled for each request, and still cuts a
    request that takes too long.
    """
    clock = Clock()
    channel, transport = _channel(clock, request_timeout=5)

    def timers() -> int:
        return sum(
            1 for call in clock.getDelayedCalls() if call.func == channel._expired
        )

    for _ in range(20):
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        clock.advance(0.1)
        assert timers() == 1
    transport.clear()
    # The timer of the first request fires during this one, which began
    # later: it waits for the rest of this request's time.
    channel.dataReceived(b"GET / HT")
    clock.advance(3)
    assert timers() == 1 and transport.value() == b""
    clock.advance(2)
    assert transport.value().startswith(b"HTTP/1.1 408 ")


class _Slow(Resource):
    """
    Answers a GET of C{/slow} when the test says so (C{pending}).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        if request.path == b"/slow":
            self.pending.append(request)
            return NOT_DONE_YET
        return b"hi"


def test_idle_timeout() -> None:
    """
    The idle time-out cuts a kept-alive connection idle that long after
    its last reply, never one whose request is being served, and keeps
    one timer for all of a connection's requests.
    """
    clock = Clock()
    resource = _Slow()
    site = QuietSite(resource, reactor=clock)
    site.timeOut = 10
    channel = site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1))
    transport = StringTransport()
    channel.makeConnection(transport)

    def idle_timers() -> int:
        return sum(
            1 for c in clock.getDelayedCalls() if c.func == channel._idle_expired
        )

    for _ in range(20):
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        clock.advance(9)
        assert idle_timers() == 1
    assert not transport.disconnecting
    # A request served for longer than the idle time-out is not cut.
    channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(25)
    assert not transport.disconnecting
    [request] = resource.pending
    request.write(b"done")
    request.finish()
    clock.advance(9)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting


def test_mute_connection() -> None:
    clock = Clock()
    _, transport = _channel(clock, request_timeout=5)
    clock.advance(5)
    assert transport.value().startswith(b"HTTP/1.1 408 ")


# The stop deadline


def test_stop_deadline() -> None:
    clock = Clock()
    deadline = StopDeadline(clock, 5, "the test")
    never: Deferred[None] = Deferred()
    first = ensureDeferred(deadline.step("waiting forever", lambda: never))
    clock.advance(5)
    assert first.called  # went on
    # Past the deadline, a step still gets a moment; a quick one is done.
    second = ensureDeferred(deadline.step("quick", lambda: 42))
    assert second.result == 42
    late: Deferred[None] = Deferred()
    third = ensureDeferred(deadline.step("late", lambda: late))
    clock.advance(0.05)
    assert third.called
    late.callback(None)  # finishing afterwards is harmless


def test_stop_step_failure_is_logged_not_raised() -> None:
    deadline = StopDeadline(Clock(), 5, "the test")

    def fail() -> None:
        raise RuntimeError("boom")

    d = ensureDeferred(deadline.step("failing", fail))
    assert d.result is None


# The Redis pool


def test_redis_pool_down() -> None:
    def pool(deferred: object, size: int, stopped: bool = False) -> Any:
        factory = SimpleNamespace(deferred=deferred, size=size, stopped=stopped)
        return SimpleNamespace(_factory=factory)

    assert not is_down(pool(Deferred(), 0))  # never connected yet: wait
    assert not is_down(pool(None, 2))
    assert is_down(pool(None, 0))
    assert not is_down(pool(None, 0, stopped=True))  # closed on purpose
    assert not is_down(object())
