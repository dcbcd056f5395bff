"""
The IM server's wire adapter: frames, decodes and dispatches to
L{cim.server.core.IMServer}.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cim.codec import CodecError, decode, encode_framed
from cim.framing import VarintFrameReceiver
from cim.message import ErrorCode, Frame
from cim.server import wire
from cim.server.connection import Connection
from cim.server.core import IMServer
from cim.server.link import IClientLink

#: The answer to every heartbeat, encoded once.
_PONG = encode_framed(wire.PONG)
#: The name of this adapter's encoding of a shared batch.
_FORM = "framed-protobuf"


@implementer(IClientLink)
class ClientConnectionProtocol(VarintFrameReceiver):
    """
    One client's TCP connection: the server core's L{IClientLink}.
    """

    log = Logger()
    conn: Connection

    def __init__(self, server: IMServer, max_frame: int) -> None:
        super().__init__()
        self.server = server
        self.MAX_LENGTH = max_frame

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.conn = self.server.connection_made(self, f"{peer.host}:{peer.port}")
        # Small frames, latency matters.
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:  # not a TCP transport (tests)
            pass

    def connectionLost(self, reason: Failure | None = None) -> None:
        clean = reason is not None and reason.check(ConnectionDone) is not None
        self.server.connection_lost(self.conn, clean=clean)

    # IClientLink, for the core

    def send(self, frame: Frame) -> None:
        self.transport.write(_PONG if frame is wire.PONG else encode_framed(frame))

    def send_batch(self, batch: wire.Batch) -> None:
        self.transport.write(batch.encoded(_FORM, encode_framed))

    def close(self) -> None:
        self.stopReading()

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

    def __init__(self, server: IMServer, max_frame: int) -> None:
        self.server = server
        self.max_frame = max_frame

    def buildProtocol(self, addr: object) -> ClientConnectionProtocol:
        return ClientConnectionProtocol(self.server, self.max_frame)
