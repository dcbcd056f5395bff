"""
A WebSocket client in bytes, for driving L{cim.server.websocket} in memory:
the opening handshake, masked client frames, and the server's frames parsed
back.
"""

from __future__ import annotations

import base64
import os
import struct
from dataclasses import dataclass

#: Opcodes (RFC 6455 section 5.2).
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def handshake(
    protocols: tuple[str, ...] = ("cim.v1.proto",),
    origin: str | None = None,
    host: str = "127.0.0.1:8084",
) -> bytes:
    lines = [
        "GET / HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
        "Sec-WebSocket-Version: 13",
    ]
    if protocols:
        lines.append(f"Sec-WebSocket-Protocol: {', '.join(protocols)}")
    if origin is not None:
        lines.append(f"Origin: {origin}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def frame(opcode: int, payload: bytes, fin: bool = True, length: int | None = None) -> bytes:
    """
    A masked client frame (its header may claim another C{length}).
    """
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


@dataclass
class Received:
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int:
        assert self.opcode == CLOSE
        return int(struct.unpack("!H", self.payload[:2])[0])


def parse(data: bytes) -> tuple[list[Received], bytes]:
    """
    The whole server frames in C{data} (unmasked), and what is left.
    """
    out = []
    offset = 0
    while offset + 2 <= len(data):
        n = data[offset + 1] & 0x7F
        start = offset + 2
        if n == 126:
            if start + 2 > len(data):
                break
            n = struct.unpack("!H", data[start : start + 2])[0]
            start += 2
        elif n == 127:
            if start + 8 > len(data):
                break
            n = struct.unpack("!Q", data[start : start + 8])[0]
            start += 8
        if start + n > len(data):
            break
        out.append(Received(data[offset] & 0x0F, data[start : start + n]))
        offset = start + n
    return out, data[offset:]
