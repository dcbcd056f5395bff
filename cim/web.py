"""
Web plumbing shared by the route and the IM servers' push API: the site
they serve from, with its limits on each request, and the HTTP client
between daemons.

A request's limits (issue 13):

  - a deadline for the whole request, headers and body
    (L{DeadlineChannel}): a client that sends a byte now and then is
    answered 408 and cut once it passes, whatever the idle time-out;
  - a body limit (L{LimitedRequest}): a C{Content-Length} over it is
    answered 413 as soon as the headers are in, before a byte of the body
    is read; a chunked body is cut the same way once it passes the limit.
    Bodies within the limit are kept in memory, never spooled to a file.

Both answers carry CIM's envelope and close the connection.

Each reply leaves in one piece, sent straight to the socket of a plain
TCP connection (L{ReplyChannel}).

The site does not parse HTML form bodies (the APIs take JSON), which
spares every POST a slow parse of its C{Content-Type}.
"""

from __future__ import annotations

import inspect
from io import BytesIO
from typing import Any

from treq.client import HTTPClient
from twisted.internet import tcp
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.server import Request, Site

from cim import envelope as codes
from cim.envelope import envelope
from cim.limits_net import REQUEST_TIMEOUT
from cim.tls import https_policy
from cim.turnflush import plain_tcp, send_now

#: The largest body a site accepts unless told otherwise.
MAX_BODY = 1024 * 1024


def _refuse(channel: HTTPChannel, status: int, phrase: bytes, message: str) -> None:
    """
    Answer C{status} with an envelope (3000, C{message}) straight on the
    channel's transport, and close the connection: for a request that is
    not going to be served, whatever state its parsing is in.
    """
    body = envelope(codes.INVALID_ARGUMENT, message)
    transport: Any = channel.transport
    if transport is None or transport.disconnecting:
        return
    transport.write(
        b"HTTP/1.1 %d %s\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (status, phrase, len(body), body)
    )
    channel.loseConnection()


class LimitedRequest(Request):
    """
    A request whose body may not be over its site's C{max_body} bytes.
    """

    _refused = False
    _received = 0

    def _limit(self) -> int:
        site = getattr(self.channel, "site", None)
        return int(getattr(site, "max_body", MAX_BODY))

    def _too_large(self, length: int | None) -> None:
        self._refused = True
        self.content = BytesIO()
        size = "" if length is None else f" ({length} bytes)"
        _refuse(
            self.channel,
            413,
            b"Content Too Large",
            f"the request body{size} is over the limit of {self._limit()} bytes",
        )

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self._too_large(length)
            return
        # Within the limit: in memory (Request spools over 100 KB to disk).
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit():
            self._too_large(None)
            return
        assert self.content is not None
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return  # answered already; the connection is closing
        super().requestReceived(command, path, version)


class ReplyChannel(HTTPChannel):
    """
    An L{HTTPChannel} whose replies leave in one piece each, straight to
    the socket.

    twisted.web writes a reply's status line and headers as a sequence of
    some twenty short pieces, which the transport checks and buffers one by
    one, then the body; the transport then has the reactor watch its socket
    for room, sends at the next poll and stops watching: two C{epoll_ctl}
    system calls and an event's dispatch per reply.  Here the head is put
    together in one piece and held until the body's first bytes (or the
    reply's end, when it has no body), and head and body are sent at once
    when the connection is plain TCP and its transport holds nothing
    unsent (L{cim.turnflush.send_now}, as the IM servers write to
    their clients; what the socket does not take, and everything on other
    transports such as TLS, goes through the transport, in order).
    The bytes are twisted.web's: only their way to the socket changed.
    """

    #: The head of the reply being written, until its body's first bytes.
    _head: bytes | None = None
    #: The plain TCP connection under the transport, when it is one.
    _tcp: tcp.Connection | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._tcp = plain_tcp(self.transport)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._head = self._tcp = None
        super().connectionLost(reason)

    def writeHeaders(
        self, version: bytes, code: bytes, reason: bytes, headers: Any
    ) -> None:
        if not isinstance(headers, Headers):
            # (As twisted.web does with pairs: sanitized through Headers.)
            pairs, headers = headers, Headers()
            for name, value in pairs:
                headers.addRawHeader(name, value)
        head = [b"%s %s %s\r\n" % (version, code, reason)]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head.append(b"%s: %s\r\n" % (name, value))
        head.append(b"\r\n")
        self._flush_head()
        self._head = b"".join(head)

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            data = head + data
        transport: Any = self.transport
        if self._tcp is None:
            transport.write(data)
        else:
            send_now(self._tcp, transport, data)

    def writeSequence(self, iovec: Any) -> None:
        self.write(b"".join(iovec))

    def requestDone(self, request: Any) -> None:
        self._flush_head()
        super().requestDone(request)

    def loseConnection(self) -> None:
        self._flush_head()
        super().loseConnection()

    def _flush_head(self) -> None:
        """
        Send the head held, if any (a reply without a body, or a new head).
        """
        if self._head is not None:
            self.write(b"")


class DeadlineChannel(ReplyChannel):
    """
    A L{ReplyChannel} that gives each request C{request_timeout} seconds
    from the connection, or from its first byte on a kept-alive connection,
    to its last byte; then it answers 408 and closes.

    One timer per connection, not one per request: a request notes when it
    began, and the timer, when it fires, cuts the connection if the request
    it finds has had its time, or waits for what is left of it; with no
    request in progress it lapses, and the next request sets it again.  (A
    call scheduled and cancelled for every request of a busy kept-alive
    connection cost more than the rest of the limits.)

    The idle time-out (twisted.web's C{timeOut}, which it turns off while a
    request is served and on again after) keeps its timer the same way:
    turned off, the timer stays and does nothing when it fires; turned on
    again, it is pushed back (L{IDelayedCall.reset}) rather than made anew.

    @ivar clock: the time and the timer (the site's reactor).
    """

    log = Logger()
    request_timeout: float = REQUEST_TIMEOUT
    clock: IReactorTime
    _deadline: IDelayedCall | None = None
    #: When the request in progress began (its time counts from then), or
    #: C{None} between requests.
    _began: float | None = None
    #: The idle time-out's timer.
    _idle: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._begin()

    def dataReceived(self, data: bytes) -> None:
        if self._began is None and not self._handlingRequest:
            self._begin()
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._began = None
        super().allContentReceived()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._began = None
        for call in (self._deadline, self._idle):
            if call is not None and call.active():
                call.cancel()
        self._deadline = self._idle = None
        super().connectionLost(reason)

    # The idle time-out (TimeoutMixin's interface, lazily)

    def setTimeout(self, period: float | None) -> float | None:  # type: ignore[override]
        previous = self.timeOut
        self.timeOut = period  # type: ignore[assignment]
        if period is not None:
            idle = self._idle
            if idle is not None and idle.active():
                idle.reset(period)
            else:
                self._idle = self.callLater(period, self._idle_expired)
        return previous

    def resetTimeout(self) -> None:
        idle = self._idle
        if idle is not None and self.timeOut is not None and idle.active():
            idle.reset(self.timeOut)

    def _idle_expired(self) -> None:
        self._idle = None
        if self.timeOut is not None:
            self.timeoutConnection()

    def _send100Continue(self) -> None:
        request = self.requests[-1] if self.requests else None
        if getattr(request, "_refused", False):
            return  # answered 413 already
        super()._send100Continue()

    def _begin(self) -> None:
        self._began = self.clock.seconds()
        if self._deadline is None:
            self._deadline = self.clock.callLater(self.request_timeout, self._expired)

    def _expired(self) -> None:
        self._deadline = None
        began = self._began
        if began is None or self._handlingRequest:
            return
        left = began + self.request_timeout - self.clock.seconds()
        if left > 0:
            self._deadline = self.clock.callLater(left, self._expired)
            return
        peer = self.transport.getPeer() if self.transport is not None else None
        self.log.info(
            "Cutting {peer}: no whole request within {timeout}s",
            peer=str(peer),
            timeout=self.request_timeout,
        )
        _refuse(
            self,
            408,
            b"Request Timeout",
            f"the request was not complete within {self.request_timeout:g} seconds",
        )
        # A client that does not read its answer either goes as the idle
        # time-out's would.
        if self.abortTimeout is not None:
            self._abortingCall = self.callLater(
                self.abortTimeout, self.forceAbortClient
            )


#: Whether this Twisted's L{Site} can be told not to parse form bodies.
_CAN_SKIP_FORMS = (
    "parsePOSTFormSubmission" in inspect.signature(Site.__init__).parameters
)


class QuietSite(Site):
    """
    A L{Site} that writes no access-log line per request (at thousands of
    requests a second the log line costs more than the request, and the
    daemons count requests in their metrics instead), and limits each
    request's time and body (see the module docstring).

    @ivar max_body: the largest request body, in bytes.
    @ivar request_timeout: seconds for a whole request.
    """

    noisy = False
    protocol = DeadlineChannel  # type: ignore[assignment]
    requestFactory = LimitedRequest

    def __init__(
        self,
        resource: Any,
        reactor: IReactorTime | None = None,
        max_body: int = MAX_BODY,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        # The daemons' APIs take JSON bodies, never HTML forms: twisted.web
        # would otherwise parse every POST's Content-Type with the email
        # package's header parser (about 0.3 ms a request, more than the
        # rest of a /p2pRoute call) to see whether the body is a form.
        forms = {"parsePOSTFormSubmission": False} if _CAN_SKIP_FORMS else {}
        super().__init__(resource, reactor=reactor, **forms)
        self.max_body = max_body
        self.request_timeout = request_timeout

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.request_timeout = self.request_timeout
        channel.clock = self.reactor
        return channel

    def log(self, request: object) -> None:
        pass


def http_client(
    reactor: IReactorTime, per_host: int = 8, ca_file: str | None = None
) -> tuple[HTTPClient, HTTPConnectionPool]:
    """
    A treq client over a persistent connection pool of its own, and the
    pool (close it with C{closeCachedConnections} when done).  Calls between
    daemons are not retried automatically: a push must not be sent twice
    by the HTTP layer.

    @param ca_file: the CAs that C{https} peers' certificates must be
        signed by (L{cim.tls.trust_root}; the platform's when C{None}).
    @raise ValueError: C{ca_file} cannot be read.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = per_host
    pool.retryAutomatically = False
    agent = Agent(reactor, contextFactory=https_policy(ca_file), pool=pool)
    return HTTPClient(agent), pool
