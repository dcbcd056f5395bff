"""
The client's side of the TCP connection to an IM server: framing, decoding
and the heartbeat.  It only frames and dispatches; what the frames mean is
L{cim.client.session.Session}'s business.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from cim.codec import CodecError, decode, encode_framed
from cim.framing import VarintFrameReceiver
from cim.message import Command, Frame

#: The largest frame accepted from a server: a replay page of long messages
#: can be big.
MAX_FRAME = 16 * 1024 * 1024


class Heartbeat:
    """
    CIM's heartbeat, seen from the client, plus dead-server detection.

      - a PING goes out after C{interval} seconds without writing anything;
      - when nothing at all arrives for C{idle_timeout} seconds, or a PING
        gets no pong within C{pong_timeout} seconds, the connection is
        dead: C{dead(reason)} is called once.

    Every timer runs on the injected clock.
    """

    def __init__(
        self,
        clock: IReactorTime,
        ping: Callable[[], None],
        dead: Callable[[str], None],
        interval: float = 10.0,
        idle_timeout: float = 30.0,
        pong_timeout: float = 10.0,
    ) -> None:
        """
        @param ping: writes a PING (and calls L{wrote}, as every write does).
        @param dead: called with the reason when the connection is dead.
        """
        self.clock = clock
        self.ping = ping
        self.dead = dead
        self.interval = interval
        self.idle_timeout = idle_timeout
        self.pong_timeout = pong_timeout
        self._ping_call: IDelayedCall | None = None
        self._idle_call: IDelayedCall | None = None
        self._pong_call: IDelayedCall | None = None
        self.running = False

    def start(self) -> None:
        """
        Start the timers (when the connection is made).
        """
        self.running = True
        self._ping_call = self.clock.callLater(self.interval, self._send_ping)
        self._idle_call = self.clock.callLater(self.idle_timeout, self._expired, "idle")

    def stop(self) -> None:
        """
        Cancel every timer (when the connection is lost).
        """
        self.running = False
        for call in (self._ping_call, self._idle_call, self._pong_call):
            if call is not None and call.active():
                call.cancel()
        self._ping_call = self._idle_call = self._pong_call = None

    def wrote(self) -> None:
        """
        Something was written: the next PING is due C{interval} from now.
        """
        if self._ping_call is not None and self._ping_call.active():
            self._ping_call.reset(self.interval)

    def received(self, pong: bool) -> None:
        """
        A frame arrived (C{pong}: it answers our PING).
        """
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self.idle_timeout)
        if pong and self._pong_call is not None:
            if self._pong_call.active():
                self._pong_call.cancel()
            self._pong_call = None

    def _send_ping(self) -> None:
        if not self.running:
            return
        # Rescheduled first, so that the write's wrote() finds it pending.
        self._ping_call = self.clock.callLater(self.interval, self._send_ping)
        if self._pong_call is None:
            self._pong_call = self.clock.callLater(
                self.pong_timeout, self._expired, "pong"
            )
        self.ping()

    def _expired(self, which: str) -> None:
        if not self.running:
            return
        if which == "idle":
            self._idle_call = None
            reason = f"nothing received for {self.idle_timeout:g}s"
        else:
            self._pong_call = None
            reason = f"no pong within {self.pong_timeout:g}s"
        self.stop()
        self.dead(reason)


class FrameHandler(Protocol):
    """
    What a L{ClientProtocol} reports to (the L{cim.client.session.Session}).
    """

    def frame_received(self, protocol: ClientProtocol, frame: Frame) -> None: ...

    def connection_lost(self, protocol: ClientProtocol, reason: str) -> None: ...


@implementer(IHandshakeListener)
class ClientProtocol(VarintFrameReceiver):
    """
    One TCP connection to an IM server.

    Pongs are consumed here (they only feed the heartbeat); every other frame
    goes to the handler.  C{lost} fires (with the reason, a string) once the
    connection is gone.

    @ivar reason: why the connection ended, when we ended it.
    @ivar handshake: on a TLS connection (C{tls=True}), fires once the TLS
        handshake is done (the server's certificate verified), or fails
        with why the connection was lost before; C{None} otherwise.
    """

    log = Logger()
    MAX_LENGTH = MAX_FRAME

    def __init__(
        self,
        clock: IReactorTime,
        handler: FrameHandler,
        interval: float = 10.0,
        idle_timeout: float = 30.0,
        pong_timeout: float = 10.0,
        tls: bool = False,
    ) -> None:
        super().__init__()
        self.handshake: Deferred[None] | None = Deferred() if tls else None
        self.handler = handler
        self.heartbeat = Heartbeat(
            clock, self._ping, self._dead, interval, idle_timeout, pong_timeout
        )
        self.connected = False
        self.reason = ""
        self.lost: Deferred[str] = Deferred()

    def connectionMade(self) -> None:
        self.connected = True
        transport: Any = self.transport
        try:
            transport.setTcpNoDelay(True)
        except Exception:  # not a TCP transport (tests)
            pass
        self.heartbeat.start()

    def handshakeCompleted(self) -> None:
        if self.handshake is not None and not self.handshake.called:
            self.handshake.callback(None)

    def connectionLost(self, reason: Any = None) -> None:
        self.connected = False
        self.heartbeat.stop()
        if self.handshake is not None and not self.handshake.called:
            self.handshake.errback(reason)
        if not self.reason:
            self.reason = "connection lost"
            if reason is not None and hasattr(reason, "getErrorMessage"):
                self.reason = f"connection lost: {reason.getErrorMessage()}"
        self.handler.connection_lost(self, self.reason)
        if not self.lost.called:
            self.lost.callback(self.reason)

    def send(self, frame: Frame) -> None:
        """
        Write one frame (nothing once the connection is closing).
        """
        if not self.connected or self._closing:
            return
        transport: Any = self.transport
        transport.write(encode_framed(frame))
        self.heartbeat.wrote()

    def close(self, reason: str) -> None:
        """
        Close the connection cleanly (pending writes go out first).
        """
        self.reason = self.reason or reason
        self.stopReading()

    def abort(self, reason: str) -> None:
        """
        Drop the connection at once.
        """
        self.reason = self.reason or reason
        self._closing = True
        transport: Any = self.transport
        if self.connected and transport is not None:
            transport.abortConnection()

    # Framing

    def frameReceived(self, frame: bytes) -> None:
        try:
            decoded = decode(frame)
        except CodecError as e:
            # A newer server may speak commands we do not know: skip them.
            self.log.warn("Ignoring an undecodable frame: {error}", error=str(e))
            self.heartbeat.received(pong=False)
            return
        pong = decoded.cmd == Command.PING
        self.heartbeat.received(pong=pong)
        if not pong:
            self.handler.frame_received(self, decoded)

    def lengthLimitExceeded(self, length: int) -> None:
        self.reason = f"frame of {length} bytes from the server is over the limit"
        self.stopReading()

    def malformedPrefix(self) -> None:
        self.reason = "malformed frame from the server"
        self.stopReading()

    # Heartbeat

    def _ping(self) -> None:
        self.send(Frame(cmd=Command.PING, req_msg="ping"))

    def _dead(self, reason: str) -> None:
        self.log.info("The server connection is dead: {reason}", reason=reason)
        self.abort(f"dead connection: {reason}")
