"""
The IM server's wire adapter: frames, decodes and dispatches to
L{cim.server.core.IMServer}.
"""

from __future__ import annotations

from twisted.internet.protocol import Factory
from twisted.logger import Logger

from cim.codec import CodecError, decode
from cim.framing import VarintFrameReceiver
from cim.message import ErrorCode
from cim.server.core import Connection, IMServer


class ClientConnectionProtocol(VarintFrameReceiver):
    """
    One client's TCP connection.
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

    def connectionLost(self, reason: object = None) -> None:
        self.server.connection_lost(self.conn)

    # Transport, for the core

    def write_bytes(self, data: bytes) -> None:
        self.transport.write(data)

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
