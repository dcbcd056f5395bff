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
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS

from cim.codec import decode, decode_json, encode, encode_json
from cim.message import Command, Frame

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


def frame(
    opcode: int, payload: bytes, fin: bool = True, length: int | None = None
) -> bytes:
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


# A real client, with autobahn's Twisted support


class HandshakeRefused(Exception):
    """
    The server refused the opening handshake (the reason names the status).
    """


class WsClient(WebSocketClientProtocol):
    """
    A WebSocket client of a real server: frames as L{Frame}s in the form of
    the subprotocol it asked for.
    """

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred[WsClient] = Deferred()
        self.lost: Deferred[tuple[int | None, str]] = Deferred()
        self.inbox: DeferredQueue[tuple[bytes, bool]] = DeferredQueue()
        self.pongs: DeferredQueue[bytes] = DeferredQueue()

    @property
    def binary(self) -> bool:
        return self.websocket_protocol_in_use == "cim.v1.proto"

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.inbox.put((payload, isBinary))

    def onPong(self, payload: bytes) -> None:
        self.pongs.put(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(HandshakeRefused(reason or ""))
        if not self.lost.called:
            self.lost.callback((code, reason or ""))

    def send(self, frame: Frame) -> None:
        if self.binary:
            self.sendMessage(encode(frame), isBinary=True)
        else:
            self.sendMessage(encode_json(frame).encode(), isBinary=False)

    async def frame(self) -> Frame:
        payload, is_binary = await self.inbox.get()
        assert is_binary == self.binary
        return decode(payload) if is_binary else decode_json(payload.decode())

    async def frame_of(self, *commands: Command) -> Frame:
        """
        The next frame of one of C{commands} (others are skipped).
        """
        while True:
            frame = await self.frame()
            if frame.cmd in commands:
                return frame


def _trust(ca_file: str | None) -> Certificate | None:
    return None if ca_file is None else Certificate.loadPEM(Path(ca_file).read_bytes())


async def connect(
    reactor: Any,
    url: str,
    protocols: tuple[str, ...] = ("cim.v1.proto",),
    origin: str | None = None,
    ca_file: str | None = None,
) -> WsClient:
    """
    Open a WebSocket to C{url} (C{ws://} or C{wss://}, verified with the
    CAs of C{ca_file}).

    @raise HandshakeRefused: the server refused it.
    """
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    factory = WebSocketClientFactory(
        url, protocols=list(protocols), origin=origin, reactor=reactor
    )
    factory.protocol = WsClient
    endpoint: Any = HostnameEndpoint(reactor, parts.hostname, parts.port)
    if parts.scheme == "wss":
        endpoint = wrapClientTLS(
            optionsForClientTLS(parts.hostname, _trust(ca_file)), endpoint
        )
    client: WsClient = await endpoint.connect(factory)
    return await client.opened
