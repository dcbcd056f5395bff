"""
The IM server's WebSocket gateway: a second wire adapter (an
L{IClientLink}) on the same L{cim.server.core.IMServer} as the TCP protocol
(L{cim.server.protocol}), built on autobahn's Twisted support.

A WebSocket client gets everything a TCP client gets (the login with the
route's token, heartbeats, acknowledgements, cursors, replay, devices,
limits and errors): the core cannot tell them apart.  Only the framing
differs: one protobuf C{Request} per WebSocket message, in the form of the
subprotocol the client chose in its handshake:

  - C{cim.v1.proto}: binary messages, the frame's protobuf bytes (no length
    prefix: a WebSocket message has its own length);
  - C{cim.v1.json}: text messages, the frame's proto3 JSON form as
    protobuf's own C{json_format} makes it (L{cim.codec.encode_json}),
    decoded strictly (an unknown field is an error); written and read by
    L{cim.jsonwire}, which makes and accepts the same text at a small part
    of the cost.

The handshake is refused (HTTP 400) without one of those subprotocols, and
(HTTP 403) from a browser page whose C{Origin} is not allowed
(L{OriginPolicy}); it must be done within the login timeout, in at most
L{MAX_HANDSHAKE} bytes.

Closing codes (RFC 6455 section 7.4): a message over C{--max-frame} closes
with 1009 (message too big), an undecodable one with 1007 (invalid payload
data), a text message on the binary subprotocol or the other way round with
1003 (unsupported data), a protocol violation with 1002 (autobahn's own);
each after an ERROR frame that says why, as on TCP.  Another error the core
closes a connection for closes with 1008 (policy violation), or 1011 for
the server's own failures; a KICK or a shutdown with 1000.

WebSocket pings and pongs count as activity, like a PING frame (the
heartbeat timeout), and cost one message of the connection's rate like one.

What the connection writes and its transport could not send yet is bounded
as on TCP (L{cim.server.protocol.Backlog}, the transport's streaming
producer).

Frames are written as the TCP adapter writes them: a message's WebSocket
frame (its header and payload) is made here, and a live batch going to
many connections is made once per subprotocol (L{wire.Batch.encoded}), not
once per connection.  On a plain TCP connection the frames of one turn of
the reactor leave together at the start of the next, in one send
(L{cim.turnflush}); autobahn's own frames (a close, a pong) send
what waits before them, and an abort drops it.  Over TLS each frame goes
to the transport in one write.  Only a connection that agreed on
compression (permessage-deflate, which browsers offer) has its messages
made by autobahn's C{sendMessage}.  A text message's UTF-8 is checked by
its decoding (L{cim.jsonwire.decode}), not also by autobahn's validator.

Timers (the opening and closing handshakes' deadlines) run on the clock the
factory is given, not on autobahn's global reactor.

Beyond autobahn's documented API this relies on a few of its internals
(hence the pinned major version): the factory's C{_batched_timer} and the
protocol's C{CONFIG_ATTRS}, C{_dataReceived}, C{_onOpen},
C{_max_message_size_exceeded}, C{sendCloseFrame}, C{sendData},
C{onMessageEnd}, C{failedByMe}, C{_perMessageCompress}, its reading state
(C{data}, C{current_frame}, C{inside_message}) and the names and idle
values of its connections' attributes (L{_IDLE}); the tests exercise each.
They make an idle connection cost about a third of the memory, and a
frame a fraction of the calls, that autobahn's defaults do.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from fnmatch import fnmatchcase
from types import FunctionType, MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import TrafficStats
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from cim import jsonwire
from cim.codec import CodecError, decode, encode
from cim.limits import MAX_OUTPUT
from cim.message import Command, ErrorCode, Frame
from cim.server import wire
from cim.server.connection import Connection
from cim.server.core import IMServer
from cim.server.link import IClientLink
from cim.server.protocol import Backlog
from cim.turnflush import TurnWriter

#: The subprotocols, as a client names them in C{Sec-WebSocket-Protocol}.
PROTO = "cim.v1.proto"
JSON = "cim.v1.json"
SUBPROTOCOLS = (PROTO, JSON)

#: RFC 6455 close codes.
NORMAL = 1000
PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
INVALID_PAYLOAD = 1007
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011

#: The close code of the errors that close a connection (by default
#: L{POLICY_VIOLATION}).
_ERROR_CLOSE = {
    int(ErrorCode.FRAME_TOO_LONG): MESSAGE_TOO_BIG,
    int(ErrorCode.MALFORMED_FRAME): INVALID_PAYLOAD,
    int(ErrorCode.FAILURE): INTERNAL_ERROR,
    int(ErrorCode.STORE_ERROR): INTERNAL_ERROR,
}

#: A close frame's reason has room for 123 bytes.
_MAX_REASON = 123

#: Seconds the closing handshake may take before the connection is dropped.
CLOSE_TIMEOUT = 5.0
#: The most bytes of an opening handshake (the HTTP request's head); autobahn
#: sets no limit of its own.
MAX_HANDSHAKE = 16 * 1024

#: The options autobahn copies from the factory into each connection.
_CONFIG_ATTRS = tuple(WebSocketServerProtocol.CONFIG_ATTRS)

#: What autobahn keeps of an opening handshake, not read once it is done.
_HANDSHAKE_STATE = (
    "http_headers",
    "http_request_data",
    "http_response_data",
    "http_status_line",
    "http_request_uri",
    "http_request_path",
    "http_request_params",
    "http_request_host",
    "websocket_protocols",
    "websocket_extensions",
    "websocket_origin",
    "_wskey",
)

#: The values of autobahn's (and this adapter's) attributes of a connection
#: that an open idle connection has: class attributes of
#: L{WebSocketConnection} instead of entries in each connection's dict (a
#: connection that sets one gets its own again).  The handshake's state is
#: dropped to these too.
_IDLE: dict[str, object] = {
    **dict.fromkeys(_HANDSHAKE_STATE),
    **dict.fromkeys(
        (
            "trackedTimings",
            "_perMessageCompress",
            "utf8validator",
            "wasNotCleanReason",
            "localCloseCode",
            "localCloseReason",
            "remoteCloseCode",
            "remoteCloseReason",
            "openHandshakeTimeoutCall",
            "closeHandshakeTimeoutCall",
            "autoPingTimeoutCall",
            "autoPingPending",
            "autoPingPendingCall",
            "autoPingPendingSent",
            "current_frame",
            "current_frame_masker",
            "message_data",
            "frame_data",
            "conn",
            "_closing",
            "_said",
        )
    ),
    **dict.fromkeys(
        (
            "triggered",
            "wasMaxFramePayloadSizeExceeded",
            "wasMaxMessagePayloadSizeExceeded",
            "closedByMe",
            "failedByMe",
            "droppedByMe",
            "wasClean",
            "wasServerConnectionDropTimeout",
            "wasOpenHandshakeTimeout",
            "wasCloseHandshakeTimeout",
            "wasServingFlashSocketPolicyFile",
            "inside_message",
            "_isMessageCompressed",
            "utf8validateIncomingCurrentMessage",
            "message_is_binary",
            "_overflowed",
            "_lost",
        ),
        False,
    ),
    "send_state": WebSocketServerProtocol.SEND_STATE_GROUND,
    "autoPingPendingSeq": 0,
    "data": b"",
    "send_queue": (),
    # What an open connection only reads (and most have empty).
    "websocket_extensions_in_use": (),
}

#: What every open connection has alike, shared: the observable "message"
#: event (never fired: L{WebSocketConnection.onMessageEnd}; read-only, so
#: that a write would fail loudly).
_SHARED: dict[str, object] = {
    "_valid_events": ("message",),
    "_results": MappingProxyType({"message": None}),
}

log = Logger()

#: The first byte of a final, uncompressed data frame: binary, text.
_OPCODE = {True: 0x82, False: 0x81}


def message_frame(binary: bool, payload: bytes) -> bytes:
    """
    A server's WebSocket frame carrying the whole message C{payload}
    (unmasked, unfragmented, uncompressed: RFC 6455 section 5.2).
    """
    n = len(payload)
    first = _OPCODE[binary]
    if n < 126:
        return bytes((first, n)) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


def _unmask(payload: bytes, mask: bytes) -> bytes:
    """
    A client frame's C{payload} unmasked: one XOR of two integers its size.
    """
    n = len(payload)
    if not n:
        return payload
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


#: Per subprotocol (binary or not): how a frame's payload is encoded.
_ENCODERS: dict[bool, Callable[[Frame], bytes]] = {True: encode, False: jsonwire.encode}


def _framer(binary: bool) -> Callable[[Frame], bytes]:
    encode_payload = _ENCODERS[binary]
    return lambda frame: message_frame(binary, encode_payload(frame))


#: Per subprotocol: how a frame's whole WebSocket frame is made.
_FRAMERS = {binary: _framer(binary) for binary in _ENCODERS}
#: The names of this adapter's encodings of a shared batch: its payload (for
#: a compressing connection), its WebSocket frame.
_FORMS = {True: "ws-protobuf", False: "ws-json"}
_FRAMED_FORMS = {True: "ws-protobuf-frame", False: "ws-json-frame"}
#: The answer to every heartbeat, made once per subprotocol.
_PONGS = {binary: _ENCODERS[binary](wire.PONG) for binary in _ENCODERS}
_FRAMED_PONGS = {binary: _FRAMERS[binary](wire.PONG) for binary in _ENCODERS}


def _truncate(reason: str) -> bytes:
    """
    C{reason} in UTF-8, cut to the room of a close frame (at a character).
    """
    data = reason.encode("utf-8")
    if len(data) <= _MAX_REASON:
        return data
    return data[:_MAX_REASON].decode("utf-8", "ignore").encode("utf-8")


class OriginPolicy:
    """
    Which browser pages may open a WebSocket (their C{Origin} header).

    A request without an C{Origin} header does not come from a browser page
    (the library, the console, a script): the origin is a browser's
    protection, and a non-browser client could send any, so it is allowed.

    With no pattern (the default), a page may connect only when its origin's
    host is the host the request is addressed to (its C{Host} header,
    whatever the scheme and the port): the web client served by the route
    of the same host (on its own port) connects, a page of another site
    does not (C{localhost}, C{127.0.0.1} and C{::1} count as one host).
    Otherwise an origin must match one of the patterns (C{--ws-origin}): an exact origin such as C{https://chat.example.com}
    or C{http://127.0.0.1:8083}, a pattern with C{*} such as
    C{https://*.example.com}, or C{*} alone for any page.  Origins compare
    without regard to case; C{null} (a sandboxed page, a file) is refused.
    """

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.patterns = tuple(p.strip().lower().rstrip("/") for p in patterns)

    def allows(self, origin: str | None, host: str) -> bool:
        """
        @param origin: the request's C{Origin} header, if any.
        @param host: the host of its C{Host} header (without its port).
        """
        if origin is None:
            return True
        origin = origin.strip().lower().rstrip("/")
        if origin == "null":
            return False
        if self.patterns:
            return any(fnmatchcase(origin, pattern) for pattern in self.patterns)
        try:
            origin_host = urlsplit(origin).hostname
        except ValueError:
            return False
        if origin_host is None:
            return False
        host = _bare(host)
        return origin_host == host or {origin_host, host} <= _LOOPBACK


#: The names of this machine's loopback interface: one host for the origin
#: check (a page of http://localhost:8083 opens ws://127.0.0.1:8084).
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def _bare(host: str) -> str:
    """
    C{host} as L{urlsplit} names it: lower case, no IPv6 brackets.
    """
    host = host.strip().lower()
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


class _Timers:
    """
    autobahn's timer service (its factory's C{_batched_timer}) on an
    injected clock.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock

    def call_later(self, delay: float, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return self.clock.callLater(delay, fn, *args, **kwargs)


@implementer(IClientLink)
# (mypy checks autobahn's own bases against each other once a class mixes
# another in: their attributes' declarations differ, in autobahn.)
class WebSocketConnection(TurnWriter, WebSocketServerProtocol):  # type: ignore[misc]
    """
    One client's WebSocket connection: the server core's L{IClientLink}
    (see the module docstring).

    @ivar binary: the subprotocol is L{PROTO} (else L{JSON}).
    @ivar conn: the core's connection, from the opening handshake's end.
    """

    factory: WebSocketGateway
    #: The largest message L{_messages} reads (the gateway's limits).
    _limit = 0

    def __init__(
        self, server: IMServer, origins: OriginPolicy, max_output: int = MAX_OUTPUT
    ) -> None:
        super().__init__()
        self.server = server
        self.origins = origins
        self.backlog = Backlog(max_output)
        self.binary = True
        self.conn: Connection | None = None
        self._overflowed = False
        self._lost = False
        #: The close code and reason of the next close, when this adapter
        #: decided them (else L{_said}'s, else 1000).
        self._closing: tuple[int, str] | None = None
        #: The close code and reason of the last frame written, when it was
        #: an ERROR or a KICK (the core closes right after the frame that
        #: says why).
        self._said: tuple[int, str] | None = None

    # Twisted

    def connectionMade(self) -> None:
        with self._tls_below():
            super().connectionMade()
        transport: Any = self.transport
        transport.registerProducer(self.backlog, True)
        self.attach(transport)

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state == self.STATE_OPEN:
            if not (
                self.data
                or self.current_frame
                or self.inside_message
                or self.failedByMe
            ):
                data = self._messages(data)
                if not data:
                    return
        elif (
            state == self.STATE_CONNECTING
            and len(self.data) + len(data) > MAX_HANDSHAKE
        ):
            log.info(
                "Dropped a WebSocket from {peer}: handshake over {size} bytes",
                peer=self.peer,
                size=MAX_HANDSHAKE,
            )
            self.dropConnection(abort=True)
            return
        # autobahn's Twisted adapter formats a debug line (with colours) for
        # every read, logged or not: go straight to the WebSocket code.
        self._dataReceived(data)

    def _messages(self, data: bytes) -> bytes:
        """
        Read the messages at the head of C{data} that need nothing of
        autobahn's machinery (about 10 calls and 3 objects a message):
        each whole in one final, masked, uncompressed frame of this
        subprotocol's kind, within the size limits.  What is left from the
        first other frame on (a control frame, a fragment, the other kind,
        a frame not all here, one over the limits or breaking the protocol)
        is autobahn's, and so is everything after it until autobahn's
        buffer is empty again.

        @return: the bytes not read.
        """
        binary = self.binary
        first = _OPCODE[binary]
        limit = self._limit
        size = len(data)
        offset = 0
        while size - offset >= 6 and data[offset] == first:
            length = data[offset + 1]
            if not length & 0x80:  # not masked: autobahn refuses it
                break
            length &= 0x7F
            start = offset + 2
            if length == 126:
                length = (data[start] << 8) | data[start + 1]
                if length < 126:  # not the shortest form: refused too
                    break
                start += 2
            elif length == 127:
                break
            end = start + 4 + length
            if length > limit or end > size:
                break
            payload = _unmask(data[start + 4 : end], data[start : start + 4])
            offset = end
            self.onMessage(payload, binary)
            if self.failedByMe or self.state != self.STATE_OPEN:
                break
        return data[offset:] if offset else data

    def _onOpen(self) -> None:
        with self._tls_below():
            super()._onOpen()
        self._forget_handshake()

    def _forget_handshake(self) -> None:
        """
        Drop what autobahn keeps of the opening handshake once it is done,
        and share one traffic count between the connections (nobody reads
        them): an idle connection is a few kilobytes smaller.
        """
        self.trafficStats = self.factory.traffic
        # Only written to by sends in autobahn's "sync" or "chopped" modes,
        # which this adapter does not use (a tuple fails loudly if it did).
        self.send_queue = ()  # type: ignore[assignment]
        # Never used: binary, text messages are refused unread (1003); text,
        # decoding checks the UTF-8 (L{cim.jsonwire.decode}).
        self.utf8validator = None  # type: ignore[assignment]
        attributes = self.__dict__
        for name in (*_HANDSHAKE_STATE, *_SHARED):
            attributes.pop(name, None)
        for name, value in _IDLE.items():
            if name in attributes:
                mine = attributes[name]
                if (mine == value and type(mine) is type(value)) or (
                    value == () and mine == []
                ):
                    del attributes[name]
        # A dict does not shrink by itself.
        self.__dict__ = dict(attributes)

    @contextmanager
    def _tls_below(self) -> Iterator[None]:
        """
        autobahn reads a TLS connection's details off its transport, which
        must be Twisted's TLS protocol; under the connection limits'
        wrapper (L{cim.limits_net}), which claims the interfaces of the
        transport it wraps, show it the TLS transport below meanwhile.
        """
        wrapper = self.transport
        below = getattr(wrapper, "transport", None)
        if not (
            isinstance(wrapper, ProtocolWrapper)
            and isinstance(below, TLSMemoryBIOProtocol)
        ):
            yield
            return
        self.transport = below
        try:
            yield
        finally:
            self.transport = wrapper

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.detach()
        super().connectionLost(reason)
        self.backlog.stopProducing()
        if self.conn is not None and not self._lost:
            self._lost = True
            self.server.connection_lost(self.conn, clean=bool(self.wasClean))

    # autobahn

    def onConnect(self, request: ConnectionRequest) -> str:
        origin = request.headers.get("origin")
        if not self.origins.allows(origin, request.host):
            log.info(
                "Refused a WebSocket from {peer}: origin {origin!r} not allowed",
                peer=request.peer,
                origin=origin,
            )
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "origin not allowed")
        for subprotocol in request.protocols:
            if subprotocol in SUBPROTOCOLS:
                self.binary = subprotocol == PROTO
                # The constant, not the header's copy of it.
                return PROTO if self.binary else JSON
        raise ConnectionDeny(
            ConnectionDeny.BAD_REQUEST,
            f"a cim WebSocket speaks subprotocol {PROTO} or {JSON}",
        )

    def onOpen(self) -> None:
        transport: Any = self.transport
        peer = transport.getPeer()
        where = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        self.conn = self.server.connection_made(self, where)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        conn = self.conn
        if conn is None or conn.closed:
            return
        if isBinary != self.binary:
            kind = "binary" if self.binary else "text"
            self._fail(
                conn,
                UNSUPPORTED_DATA,
                f"subprotocol {PROTO if self.binary else JSON} takes {kind} messages",
            )
            return
        try:
            frame = decode(payload) if isBinary else jsonwire.decode(payload)
        except CodecError as e:
            self._fail(conn, INVALID_PAYLOAD, str(e))
            return
        self.server.frame_received(conn, frame)

    def onMessageEnd(self) -> None:
        # autobahn's, without its "message" event (nobody observes it here):
        # one Deferred less per message.
        if not self.failedByMe:
            self.onMessage(b"".join(self.message_data), self.message_is_binary)
        self.message_data = None  # type: ignore[assignment]
        # Not read again before the next frame's header makes another.
        self.current_frame_masker = None

    def sendData(
        self, data: bytes, sync: bool = False, chopsize: int | None = None
    ) -> None:
        # autobahn's, for the only way this adapter writes (neither "sync"
        # nor chopped), without the debug line it formats for every write.
        assert not sync and not chopsize
        # (Autobahn's own frames, a close or a pong, after the messages
        # written before them.)
        self.flush()
        self.transport.write(data)  # type: ignore[union-attr]

    def onPing(self, payload: bytes) -> None:
        super().onPing(payload)
        self._active()

    def onPong(self, payload: bytes) -> None:
        self._active()

    def _max_message_size_exceeded(
        self, msg_size: int, max_msg_size: int, reason: str
    ) -> None:
        # autobahn's hook, called as soon as a frame's header says so.
        conn = self.conn
        if conn is None or conn.closed:
            super()._max_message_size_exceeded(msg_size, max_msg_size, reason)
            return
        self._closing = (MESSAGE_TOO_BIG, "message too big")
        self.server.error(
            conn,
            ErrorCode.FRAME_TOO_LONG,
            f"message of {msg_size} bytes is over the limit of {max_msg_size}",
            close=True,
        )
        # Read nothing more of it.
        self.failedByMe = True

    # Errors and activity

    def _fail(self, conn: Connection, code: int, reason: str) -> None:
        """
        An error frame saying C{reason}, then a close with C{code}.
        """
        self._closing = (code, reason)
        self.server.error(conn, ErrorCode.MALFORMED_FRAME, reason, close=True)
        self.failedByMe = True

    def _active(self) -> None:
        """
        A ping or a pong: the client is there (as a PING frame says, and at
        the same cost of the connection's rate, counted as the core counts
        it: L{IMServer.frame_received}).
        """
        conn = self.conn
        if conn is None or conn.closed:
            return
        server = self.server
        now = server.clock.seconds()
        conn.tokens = (
            min(2 * server.rate, conn.tokens + (now - conn.last_seen) * server.rate) - 1
        )
        conn.last_seen = now
        if conn.tokens < 0:
            server.error(conn, ErrorCode.RATE_LIMITED, "too many pings", close=True)

    # IClientLink, for the core

    def send(self, frame: Frame) -> None:
        if frame.cmd == Command.ERROR:
            code = _ERROR_CLOSE.get(frame.error_code, POLICY_VIOLATION)
            self._said = (code, frame.error_reason)
        elif frame.cmd == Command.KICK:
            self._said = (NORMAL, frame.error_reason)
        else:
            self._said = None
        binary = self.binary
        if self._perMessageCompress is not None:
            payload = _PONGS[binary] if frame is wire.PONG else _ENCODERS[binary](frame)
            self._send_compressed(payload)
        elif frame is wire.PONG:
            self._write(_FRAMED_PONGS[binary])
        else:
            self._write(_FRAMERS[binary](frame))

    def send_batch(self, batch: wire.Batch) -> None:
        self._said = None
        binary = self.binary
        if self._perMessageCompress is not None:
            self._send_compressed(batch.encoded(_FORMS[binary], _ENCODERS[binary]))
        else:
            self._write(batch.encoded(_FRAMED_FORMS[binary], _FRAMERS[binary]))

    def close(self) -> None:
        if self.backlog.paused:
            # A client that does not read would keep a graceful close waiting.
            self.abort()
            return
        if self.state != self.STATE_OPEN:
            return
        code, reason = self._closing or self._said or (NORMAL, "")
        self.sendCloseFrame(code=code, reasonUtf8=_truncate(reason), isReply=False)

    def abort(self) -> None:
        self.detach()
        self.dropConnection(abort=True)

    def backed_up(self) -> bool:
        return self.backlog.paused

    def drained(self) -> Deferred[None]:
        return self.backlog.drained()

    def _write(self, data: bytes) -> None:
        """
        Write a whole WebSocket frame (L{message_frame}).
        """
        if self.state != self.STATE_OPEN:
            return
        self.queue(data)
        self._wrote(len(data))

    def _send_compressed(self, payload: bytes) -> None:
        """
        Send a message on a connection that agreed on compression.
        """
        if self.state != self.STATE_OPEN:
            return
        self.sendMessage(payload, isBinary=self.binary)
        self._wrote(len(payload))

    def _wrote(self, size: int) -> None:
        if self.backlog.wrote(size) and not self._overflowed:
            self._overflowed = True
            assert self.conn is not None
            self.server.overflowed(self.conn, self.backlog.unsent)


for _name, _value in {**_IDLE, **_SHARED}.items():
    setattr(WebSocketConnection, _name, _value)


class WebSocketGateway(WebSocketServerFactory):
    """
    Builds L{WebSocketConnection}s for an L{IMServer}.

    @param clock: the reactor (its clock runs the handshakes' deadlines).
    @param max_frame: the largest message accepted, in bytes.
    @param origins: the C{--ws-origin} patterns (see L{OriginPolicy}).
    @param open_timeout: seconds a client has for its opening handshake.
    """

    noisy = False

    def __init__(
        self,
        server: IMServer,
        clock: IReactorTime,
        max_frame: int,
        max_output: int = MAX_OUTPUT,
        origins: Sequence[str] = (),
        open_timeout: float = 10.0,
    ) -> None:
        super().__init__(reactor=clock, protocols=list(SUBPROTOCOLS), server="cim")
        self._batched_timer = _Timers(clock)
        #: autobahn's traffic counts of every connection (see
        #: L{WebSocketConnection._forget_handshake}).
        self.traffic = TrafficStats()
        self.im_server = server
        self.max_output = max_output
        self.origins = OriginPolicy(origins)
        self.setProtocolOptions(
            maxFramePayloadSize=max_frame,
            maxMessagePayloadSize=max_frame,
            # Send a close frame with the reason before dropping.
            failByDrop=False,
            openHandshakeTimeout=open_timeout,
            closeHandshakeTimeout=CLOSE_TIMEOUT,
            # No status page for plain HTTP requests.
            webStatus=False,
            # A text message's UTF-8 is checked by its decoding.
            utf8validateIncoming=False,
        )
        # autobahn copies its 29 options into every connection; here they
        # are class attributes of this factory's connections instead (so
        # setProtocolOptions must not be called after this).
        # A function among them (perMessageCompressionAccept) stays one:
        # as a plain class attribute it would be bound to the connection.
        options = {
            name: staticmethod(value) if isinstance(value, FunctionType) else value
            for name in _CONFIG_ATTRS
            for value in (getattr(self, name),)
        }
        # The largest message read without autobahn's machinery.
        limit = min(
            (size for size in (max_frame, self.maxMessagePayloadSize) if size > 0),
            default=1 << 62,
        )
        self.connection_class: type[WebSocketConnection] = type(
            "WebSocketConnection",
            (WebSocketConnection,),
            {"CONFIG_ATTRS": [], "_limit": limit, **options},
        )

    def buildProtocol(self, addr: object) -> WebSocketConnection:  # type: ignore[override]
        protocol = self.connection_class(self.im_server, self.origins, self.max_output)
        protocol.factory = self
        return protocol
