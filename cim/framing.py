"""
Varint32 length-prefixed framing, as Netty's C{ProtobufVarint32FrameDecoder}
and C{ProtobufVarint32LengthFieldPrepender} speak it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Protocol

from cim.codec import encode_varint

#: The default largest frame body accepted, in bytes.
DEFAULT_MAX_FRAME = 64 * 1024


class FrameError(Exception):
    """
    The byte stream cannot be split into frames.
    """


class VarintFrameReceiver(Protocol):
    """
    Split a byte stream into frames, each preceded by its length as a
    base-128 varint of at most five bytes.

    Subclasses implement L{frameReceived}, and may override
    L{lengthLimitExceeded} and L{malformedPrefix} (both drop the connection by
    default).  Like L{twisted.protocols.basic.IntNStringReceiver}, it keeps
    one buffer plus an offset, so partial frames and many frames per read cost
    no quadratic copying; it stops delivering frames while paused
    (L{pauseProducing}) or after the connection started closing.

    A connection holds a buffer of its own only while part of a frame waits
    (or frames wait while paused): the frames of a read are split from the
    read's bytes themselves, and an idle connection holds nothing.

    @ivar MAX_LENGTH: the largest frame body accepted.
    """

    MAX_LENGTH = DEFAULT_MAX_FRAME
    #: A TCP transport (or a test double of one): pausable, with a peer.
    transport: Any
    paused = False
    _closing = False
    #: What was received and not delivered yet: the shared empty bytes
    #: when nothing waits, else a bytearray of the connection's own (or,
    #: while a read is split, the read's bytes).
    _buffer: bytes | bytearray = b""

    def frameReceived(self, frame: bytes) -> None:
        """
        Handle one frame body.
        """
        raise NotImplementedError()

    def lengthLimitExceeded(self, length: int) -> None:
        """
        A frame announced C{length} bytes, more than L{MAX_LENGTH}.
        """
        self.stopReading()

    def malformedPrefix(self) -> None:
        """
        A length prefix ran over five bytes or 32 bits.
        """
        self.stopReading()

    def stopReading(self, abort: bool = False) -> None:
        """
        Deliver no further frames and close the connection: once what was
        written is sent, or at once (C{abort}: what waits unsent is dropped).
        """
        self._closing = True
        self._buffer = b""
        if self.transport is None:
            return
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def sendFrame(self, body: bytes) -> None:
        """
        Write one frame body with its length prefix.
        """
        self.transport.write(encode_varint(len(body)) + body)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._buffer:
            # Extends the waiting bytearray in place.
            self._buffer += data
        else:
            self._buffer = data
        self._deliver()

    def _deliver(self) -> None:
        buf = self._buffer
        size = len(buf)
        offset = 0
        while offset < size and not self.paused and not self._closing:
            # Decode the varint prefix in place.
            length = 0
            shift = 0
            pos = offset
            while True:
                if pos >= size:
                    # Incomplete prefix: wait for more bytes, unless it is
                    # already too long to be valid.
                    if pos - offset >= 5:
                        self.malformedPrefix()
                        return
                    length = -1
                    break
                byte = buf[pos]
                pos += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
                shift += 7
                if shift >= 35:
                    self.malformedPrefix()
                    return
            if length < 0:
                break
            if length >= 1 << 32:
                self.malformedPrefix()
                return
            if length > self.MAX_LENGTH:
                self.lengthLimitExceeded(length)
                return
            end = pos + length
            if end > size:
                break
            body = bytes(buf[pos:end])
            offset = end
            self.frameReceived(body)
            # frameReceived may have closed the connection or replaced the
            # buffer; stop if so.
            if self._buffer is not buf:
                return
        if offset == size:
            # Nothing waits: share the empty bytes.
            self._buffer = b""
        elif isinstance(buf, bytearray):
            if offset:
                del buf[:offset]
        else:
            # The rest of a read waits: copy it once, into a buffer that
            # later reads extend in place.
            self._buffer = bytearray(memoryview(buf)[offset:])

    def pauseProducing(self) -> None:
        """
        Stop delivering frames (buffered ones wait) and stop reading.
        """
        self.paused = True
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        """
        Deliver buffered frames again and resume reading.
        """
        self.paused = False
        self._deliver()
        if self.transport is not None and not self._closing:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.stopReading()
