"""
The IM server's wire adapter: frames, decodes and dispatches to
L{cim.server.core.IMServer}, and bounds what it buffers for a client that
does not read (L{Backlog}, the transport's streaming producer).
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cim.codec import CodecError, decode, encode_framed, encode_messages_framed
from cim.framing import VarintFrameReceiver
from cim.limits import MAX_OUTPUT
from cim.message import ChatMessage, Command, ErrorCode, Frame
from cim.server import wire
from cim.server.connection import Connection
from cim.server.core import IMServer
from cim.server.link import IClientLink
from cim.turnflush import TurnWriter

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
class ClientConnectionProtocol(TurnWriter, VarintFrameReceiver):
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

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.transport.registerProducer(self.backlog, True)
        self.attach(self.transport)
        self.conn = self.server.connection_made(self, f"{peer.host}:{peer.port}")
        # Small frames, latency matters.
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:  # not a TCP transport (tests)
            pass

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.detach()
        self.backlog.stopProducing()
        clean = reason is not None and reason.check(ConnectionDone) is not None
        self.server.connection_lost(self.conn, clean=clean)

    def _write(self, data: bytes) -> None:
        self.queue(data)
        if self.backlog.wrote(len(data)) and not self._overflowed:
            self._overflowed = True
            self.server.overflowed(self.conn, self.backlog.unsent)

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
        self.detach()
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
