"""
A coverage-guided fuzz target (atheris) for the frame receiver and the codec:
whatever the bytes, the receiver only ever hands out frames within its
limit, and the decoder either returns a frame or raises CodecError.

    .venv/bin/python fuzz/fuzz_frames.py -max_total_time=60   # make fuzz
    .venv/bin/python fuzz/fuzz_frames.py -runs=20000          # in make test
"""

from __future__ import annotations

import sys

import atheris

from twisted.internet.testing import StringTransport

# Only cim's own code is instrumented: instrumenting Twisted too costs most
# of a short run's time, and finds nothing in cim.
with atheris.instrument_imports(include=["cim"]):
    from cim.codec import CodecError, decode, encode
    from cim.framing import VarintFrameReceiver

LIMIT = 4096


class Receiver(VarintFrameReceiver):
    MAX_LENGTH = LIMIT

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[bytes] = []

    def frameReceived(self, frame: bytes) -> None:
        assert len(frame) <= LIMIT
        self.frames.append(frame)
        try:
            decoded = decode(frame)
        except CodecError:
            return
        # What decodes must encode and decode to the same frame.
        assert decode(encode(decoded)) == decoded


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    chunk = fdp.ConsumeIntInRange(1, 64)
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    receiver = Receiver()
    receiver.makeConnection(StringTransport())
    for i in range(0, len(stream), chunk):
        receiver.dataReceived(stream[i : i + chunk])


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
