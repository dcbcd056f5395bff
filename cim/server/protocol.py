"""
The IM server's wire adapter: frames, decodes and dispatches to
L{cim.server.core.IMServer}, and bounds what it buffers for a client that
does not read (L{Backlog}, the transport's streaming producer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cim.codec import CodecError, decode, encode_framed, encode_messages_framed
from cim.framing import VarintFrameReceiver
from cim.limits import MAX_OUTPUT
from cim.limits_net import counted_transport
from cim.message import ChatMessage, Command, ErrorCode, Frame
from cim.server import wire
from cim.server.connection import Connection
from cim.server.core import IMServer
from cim.server.link import IClientLink

#: The answer to every heartbeat, encoded once.
_PONG = encode_framed(wire.PONG)
#: The name of this adapter's encoding of a shared batch.
_FORM = "framed-protobuf"


def _encode_batch(messages: Sequence[ChatMessage]) -> bytes:
    """
    A shared batch's MESSAGE frame, from its messages' forms when they
    carry them (L{cim.codec.Messages}).
    """
    return encode_messages_framed(Command.MESSAGE, messages)


class TurnFlush:
    """
    The plain TCP connections that were written to during one turn of the
    reactor, whose bytes are sent at the start of its next turn (before it
    polls), each connection's in one C{send} straight to its socket.

    Twisted's own write path registers a connection as a writer with the
    reactor at its first write of a turn, sends when the next poll says the
    socket is writable, and unregisters it: two C{epoll_ctl} system calls
    and an event's dispatch per connection and turn, about a tenth of a busy
    server's CPU.  Here the socket takes the bytes at once (it nearly
    always has the room); whatever it does not take, or anything written
    while the transport still holds unsent bytes, goes through the
    transport's own C{write}, so that order, the transport's buffer and its
    producer (L{Backlog}) work as before.  The bytes leave no later than
    through Twisted's path (which waits for the next poll).
    """

    __slots__ = ("reactor", "waiting", "_call")

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.waiting: list[ClientConnectionProtocol] = []
        self._call: IDelayedCall | None = None

    def add(self, protocol: ClientConnectionProtocol) -> None:
        self.waiting.append(protocol)
        if self._call is None:
            self._call = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        self._call = None
        waiting, self.waiting = self.waiting, []
        for protocol in waiting:
            protocol.flush()


#: The L{TurnFlush} of each reactor (one in a daemon), by its id.
_FLUSHES: dict[int, TurnFlush] = {}


def _turn_flush(reactor: Any) -> TurnFlush:
    flush = _FLUSHES.get(id(reactor))
    if flush is None or flush.reactor is not reactor:
        flush = _FLUSHES[id(reactor)] = TurnFlush(reactor)
    return flush


def plain_tcp(transport: Any) -> tcp.Server | None:
    """
    The TCP transport under C{transport} when its bytes go to the socket as
    they are (a plain TCP connection, perhaps counted by
    L{cim.limits_net}); C{None} for any other (TLS, a test's transport).
    """
    inner = counted_transport(transport)
    if isinstance(inner, tcp.Server) and not inner.TLS:
        return inner
    return None


@implementer(IPushProducer)
class Backlog:
    """
    What a connection has written that its transport could not send yet,
    as far as it goes past the transport's buffer size: registered as the
    transport's streaming producer, it is paused when the transport's
    buffer fills (the client is not reading) and resumed once it drained.

    Nothing is held back: writes go on (messages to a connection are not
    delayed), counted in L{unsent} while paused; past C{limit} bytes the
    connection is over its limit.

    One per connection: slots, and no list of waiters until one waits.
    """

    __slots__ = ("limit", "paused", "unsent", "_waiting")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.paused = False
        #: Bytes written since the transport was paused.
        self.unsent = 0
        self._waiting: list[Deferred[None]] | None = None

    def wrote(self, size: int) -> bool:
        """
        C{size} more bytes were written.  @return: whether that is over the
        limit.
        """
        if not self.paused:
            return False
        self.unsent += size
        return self.unsent > self.limit

    def drained(self) -> Deferred[None]:
        if not self.paused:
            return succeed(None)
        d: Deferred[None] = Deferred()
        if self._waiting is None:
            self._waiting = []
        self._waiting.append(d)
        return d

    def _release(self) -> None:
        waiting, self._waiting = self._waiting, None
        for d in waiting or ():
            d.callback(None)

    # IPushProducer, for the transport

    def pauseProducing(self) -> None:
        # The transport calls it again at each write while its buffer is
        # full: count from the first.
        if not self.paused:
            self.paused = True
            self.unsent = 0

    def resumeProducing(self) -> None:
        self.paused = False
        self.unsent = 0
        self._release()

    def stopProducing(self) -> None:
        self.paused = False
        self._release()


@implementer(IClientLink)
class ClientConnectionProtocol(VarintFrameReceiver):
    """
    One client's TCP connection: the server core's L{IClientLink}.

    @param max_output: bytes written and not sent past the transport's
        buffer after which the connection is dropped.
    """

    log = Logger()
    conn: Connection

    def __init__(
        self, server: IMServer, max_frame: int, max_output: int = MAX_OUTPUT
    ) -> None:
        super().__init__()
        self.server = server
        self.MAX_LENGTH = max_frame
        self.backlog = Backlog(max_output)
        self._overflowed = False
        #: The plain TCP transport whose bytes are sent at the next turn
        #: (L{TurnFlush}), and what waits for it.
        self._tcp: tcp.Server | None = None
        self._out: list[bytes] | None = None

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.transport.registerProducer(self.backlog, True)
        self._tcp = plain_tcp(self.transport)
        self.conn = self.server.connection_made(self, f"{peer.host}:{peer.port}")
        # Small frames, latency matters.
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:  # not a TCP transport (tests)
            pass

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._out = None
        self._tcp = None
        self.backlog.stopProducing()
        clean = reason is not None and reason.check(ConnectionDone) is not None
        self.server.connection_lost(self.conn, clean=clean)

    def _write(self, data: bytes) -> None:
        if self._tcp is None:
            self.transport.write(data)
        elif self._out is None:
            self._out = [data]
            _turn_flush(self._tcp.reactor).add(self)
        else:
            self._out.append(data)
        if self.backlog.wrote(len(data)) and not self._overflowed:
            self._overflowed = True
            self.server.overflowed(self.conn, self.backlog.unsent)

    def flush(self) -> None:
        """
        Send what was written since the last turn (L{TurnFlush}): straight
        to the socket when the transport holds nothing unsent, the rest
        through the transport.
        """
        out, self._out = self._out, None
        connection = self._tcp
        if not out or connection is None:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        if (
            connection.connected
            and not connection.disconnecting
            and not connection.dataBuffer
            and not connection._tempDataBuffer
        ):
            try:
                sent = connection.socket.send(data)
            except OSError:
                # (EAGAIN, or the connection failed: the transport finds
                # out when it writes.)
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        self.transport.write(data)

    # IClientLink, for the core

    def send(self, frame: Frame) -> None:
        self._write(_PONG if frame is wire.PONG else encode_framed(frame))

    def send_batch(self, batch: wire.Batch) -> None:
        self._write(batch.encoded_messages(_FORM, _encode_batch))

    def close(self) -> None:
        # What was written goes first (a graceful close sends it); a client
        # that does not read would keep a graceful close waiting.
        self.flush()
        self.stopReading(abort=self.backlog.paused)

    def abort(self) -> None:
        # What waits unsent is dropped, as the transport drops its own.
        self._out = None
        self.stopReading(abort=True)

    def backed_up(self) -> bool:
        return self.backlog.paused

    def drained(self) -> Deferred[None]:
        return self.backlog.drained()

    # Framing

    def frameReceived(self, frame: bytes) -> None:
        try:
            decoded = decode(frame)
        except CodecError as e:
            self.server.error(self.conn, ErrorCode.MALFORMED_FRAME, str(e), close=True)
            return
        self.server.frame_received(self.conn, decoded)

    def lengthLimitExceeded(self, length: int) -> None:
        self.server.error(
            self.conn,
            ErrorCode.FRAME_TOO_LONG,
            f"frame of {length} bytes is over the limit of {self.MAX_LENGTH}",
            close=True,
        )

    def malformedPrefix(self) -> None:
        self.server.error(
            self.conn, ErrorCode.MALFORMED_FRAME, "bad length prefix", close=True
        )


class ClientConnectionFactory(Factory):
    """
    Builds L{ClientConnectionProtocol}s for an L{IMServer}.
    """

    def __init__(
        self, server: IMServer, max_frame: int, max_output: int = MAX_OUTPUT
    ) -> None:
        self.server = server
        self.max_frame = max_frame
        self.max_output = max_output

    def buildProtocol(self, addr: object) -> ClientConnectionProtocol:
        return ClientConnectionProtocol(self.server, self.max_frame, self.max_output)
