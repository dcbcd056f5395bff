"""
The varint32 frame receiver, fed the way networks deliver bytes.
"""

from __future__ import annotations

import pytest
from twisted.internet.testing import StringTransport

from cim.codec import encode_varint
from cim.framing import VarintFrameReceiver


class Recorder(VarintFrameReceiver):
    def __init__(self, max_length: int = 1024) -> None:
        super().__init__()
        self.MAX_LENGTH = max_length
        self.frames: list[bytes] = []
        self.too_long: list[int] = []
        self.malformed = 0

    def frameReceived(self, frame: bytes) -> None:
        self.frames.append(frame)

    def lengthLimitExceeded(self, length: int) -> None:
        self.too_long.append(length)
        super().lengthLimitExceeded(length)

    def malformedPrefix(self) -> None:
        self.malformed += 1
        super().malformedPrefix()


def connected(max_length: int = 1024) -> tuple[Recorder, StringTransport]:
    protocol = Recorder(max_length)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def framed(body: bytes) -> bytes:
    return encode_varint(len(body)) + body


BODIES = [b"", b"a", b"hello", b"x" * 127, b"y" * 128, b"z" * 300, bytes(range(256))]


def test_varint_encoding() -> None:
    assert encode_varint(0) == b"\x00"
    assert encode_varint(127) == b"\x7f"
    assert encode_varint(128) == b"\x80\x01"
    assert encode_varint(300) == b"\xac\x02"
    assert encode_varint(2**32 - 1) == b"\xff\xff\xff\xff\x0f"
    with pytest.raises(ValueError):
        encode_varint(2**32)
    with pytest.raises(ValueError):
        encode_varint(-1)


def test_byte_at_a_time() -> None:
    protocol, _ = connected()
    stream = b"".join(framed(b) for b in BODIES)
    for i in range(len(stream)):
        protocol.dataReceived(stream[i : i + 1])
    assert protocol.frames == BODIES


def test_many_frames_in_one_read() -> None:
    protocol, _ = connected()
    protocol.dataReceived(b"".join(framed(b) for b in BODIES * 50))
    assert protocol.frames == BODIES * 50


def test_split_at_every_offset() -> None:
    stream = b"".join(framed(b) for b in BODIES)
    for cut in range(len(stream) + 1):
        protocol, _ = connected()
        protocol.dataReceived(stream[:cut])
        protocol.dataReceived(stream[cut:])
        assert protocol.frames == BODIES, cut


def test_oversized_frame_closes_before_reading_it() -> None:
    protocol, transport = connected(max_length=100)
    protocol.dataReceived(framed(b"ok") + encode_varint(101))
    assert protocol.frames == [b"ok"]
    assert protocol.too_long == [101]
    assert transport.disconnecting
    # Nothing after the limit is delivered.
    protocol.dataReceived(b"x" * 101 + framed(b"later"))
    assert protocol.frames == [b"ok"]


def test_frame_at_the_limit_is_accepted() -> None:
    protocol, transport = connected(max_length=100)
    protocol.dataReceived(framed(b"x" * 100))
    assert protocol.frames == [b"x" * 100]
    assert not transport.disconnecting


def test_prefix_longer_than_five_bytes_is_malformed() -> None:
    protocol, transport = connected()
    protocol.dataReceived(b"\x80\x80\x80\x80\x80\x01")
    assert protocol.malformed == 1
    assert transport.disconnecting


def test_prefix_over_32_bits_is_malformed() -> None:
    protocol, transport = connected(max_length=2**40)
    protocol.dataReceived(b"\xff\xff\xff\xff\x1f")
    assert protocol.malformed == 1
    assert transport.disconnecting


def test_pause_holds_frames_until_resumed() -> None:
    protocol, transport = connected()

    class Pausing(Recorder):
        def frameReceived(self, frame: bytes) -> None:
            super().frameReceived(frame)
            if frame == b"pause":
                self.pauseProducing()

    protocol = Pausing()
    protocol.makeConnection(transport)
    protocol.dataReceived(
        framed(b"one") + framed(b"pause") + framed(b"two") + framed(b"thr")
    )
    assert protocol.frames == [b"one", b"pause"]
    assert transport.producerState == "paused"
    protocol.dataReceived(framed(b"four"))
    assert protocol.frames == [b"one", b"pause"]
    protocol.resumeProducing()
    assert protocol.frames == [b"one", b"pause", b"two", b"thr", b"four"]
    assert transport.producerState == "producing"


def test_send_frame_prefixes_length() -> None:
    protocol, transport = connected()
    protocol.sendFrame(b"y" * 200)
    assert transport.value() == b"\xc8\x01" + b"y" * 200


def test_large_frame_in_small_chunks_is_linear() -> None:
    """
    A frame at the limit arriving 1 KiB at a time is assembled once.
    """
    protocol, _ = connected(max_length=1024 * 1024)
    data = framed(b"q" * (1024 * 1024))
    for i in range(0, len(data), 1024):
        protocol.dataReceived(data[i : i + 1024])
    assert protocol.frames == [b"q" * (1024 * 1024)]


def test_no_buffer_of_its_own_while_nothing_waits() -> None:
    """
    Whole frames are split from the read's bytes: afterwards the receiver
    holds no buffer (an idle connection costs none).
    """
    protocol, _ = connected()
    protocol.dataReceived(framed(b"one") + framed(b"two"))
    assert protocol.frames == [b"one", b"two"]
    assert protocol._buffer == b"" and type(protocol._buffer) is bytes


def test_the_rest_of_a_read_waits_in_a_buffer_of_its_own() -> None:
    """
    What follows the last whole frame of a read is copied once into a
    bytearray that later reads extend; once the frame is whole the
    buffer is dropped again.
    """
    protocol, _ = connected()
    data = framed(b"one") + framed(b"second")
    protocol.dataReceived(data[:7])
    assert protocol.frames == [b"one"]
    assert type(protocol._buffer) is bytearray
    assert protocol._buffer == data[4:7]
    waiting = protocol._buffer
    protocol.dataReceived(data[7:9])
    assert protocol._buffer is waiting  # extended in place
    protocol.dataReceived(data[9:])
    assert protocol.frames == [b"one", b"second"]
    assert protocol._buffer == b"" and type(protocol._buffer) is bytes


def test_frames_read_while_paused_wait_in_a_copy() -> None:
    """
    Frames that arrive in one read with the one that paused the receiver
    are kept (not the read's bytes, which may be reused) and delivered on
    resume.
    """

    class Pausing(Recorder):
        def frameReceived(self, frame: bytes) -> None:
            super().frameReceived(frame)
            if frame == b"pause":
                self.pauseProducing()

    protocol = Pausing()
    protocol.makeConnection(StringTransport())
    protocol.dataReceived(framed(b"pause") + framed(b"two"))
    assert protocol.frames == [b"pause"]
    assert type(protocol._buffer) is bytearray
    protocol.resumeProducing()
    assert protocol.frames == [b"pause", b"two"]
    assert protocol._buffer == b""


def test_closing_drops_what_waits() -> None:
    """
    A frame that closes the connection drops the rest of its read.
    """

    class Closing(Recorder):
        def frameReceived(self, frame: bytes) -> None:
            super().frameReceived(frame)
            self.stopReading()

    protocol = Closing()
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(framed(b"bye") + framed(b"more") + b"\x05ab")
    assert protocol.frames == [b"bye"]
    assert protocol._buffer == b""
    assert transport.disconnecting
    protocol.dataReceived(framed(b"late"))
    assert protocol.frames == [b"bye"]
