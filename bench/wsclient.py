"""
The load generator's WebSocket wire, made by hand: the opening handshake,
masked client frames, the server's frames parsed back, and the proto3 JSON
form of the frames (the C{cim.v1.json} subprotocol) in plain C{json}.

Why not autobahn's client protocol (which the server side uses): the load
generator must never be the benchmark's limit, and on a 2-core machine
every microsecond it spends is taken from the servers.  Measured in memory
in one process (a 168-byte MESSAGE frame received, as the C{ws} scenario's
clients get them, and a 130-byte one sent; 20,000 of each, on a busy
machine), autobahn 26's C{WebSocketClientProtocol} took 25-50 us to
receive a message and 25-45 us to send one; this module 2-3 us and 4-7
us, 10 to 15 times less.  A private message costs its sender one send and
three receptions (its echo, its ACK, and the receiver's copy): about 100
to 200 us of load generator CPU with autobahn, more than the whole load
generator spends per message over TCP.  Likewise protobuf's
C{json_format} (L{cim.codec.decode_json}) took 150-210 us to read the
MESSAGE frame in the JSON form, plain C{json} (L{frame_from_json}) 18-30
us; both read the server's frames into the same L{Frame}s
(tests/test_bench.py compares them).

Everything here is pure (no reactor, no I/O): L{bench.loadgen} wires it to
its connections.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from typing import Any

from cim.codec import CodecError
from cim.message import ChatMessage, Command, Cursor, Frame

#: The subprotocols of the server's gateway (L{cim.server.websocket}).
PROTO = "cim.v1.proto"
JSON = "cim.v1.json"
SUBPROTOCOLS = (PROTO, JSON)

#: Opcodes (RFC 6455 section 5.2).
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class HandshakeError(Exception):
    """
    The server did not accept the opening handshake as asked.
    """


class WireError(Exception):
    """
    The server's bytes are not WebSocket frames this client accepts.
    """


# The opening handshake


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode("ascii")


def accept_key(key: str) -> str:
    """
    The C{Sec-WebSocket-Accept} that answers C{Sec-WebSocket-Key: key}.
    """
    digest = hashlib.sha1(key.encode("ascii") + _GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def handshake_request(
    host: str, port: int, path: str, protocol: str, key: str
) -> bytes:
    """
    The opening handshake of a client that is not a browser (no C{Origin}).
    """
    return (
        f"GET {path or '/'} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {protocol}\r\n\r\n"
    ).encode("latin-1")


def check_handshake(head: bytes, key: str, protocol: str) -> None:
    """
    Check the server's answer to the opening handshake (its head, without
    the blank line that ends it).

    @raise HandshakeError: not a 101 with the right accept key and
        subprotocol.
    """
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or parts[1] != "101":
        raise HandshakeError(f"handshake refused: {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("sec-websocket-accept") != accept_key(key):
        raise HandshakeError("handshake: wrong Sec-WebSocket-Accept")
    if headers.get("sec-websocket-protocol") != protocol:
        raise HandshakeError(
            f"handshake: asked for subprotocol {protocol}, got "
            f"{headers.get('sec-websocket-protocol')!r}"
        )


# Frames


def client_frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """
    One final, masked client frame (a client must mask every frame; the
    mask is random unless given).  The masking is one XOR of two integers
    the size of the payload.
    """
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    if mask is None:
        mask = os.urandom(4)
    # Masking and unmasking are the same XOR.
    return head + mask + unmask(payload, mask)


def unmask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if not n:
        return payload
    key = mask * (n // 4 + 1)
    value = int.from_bytes(payload, "big") ^ int.from_bytes(key[:n], "big")
    return value.to_bytes(n, "big")


class FrameParser:
    """
    The server's frames, from the bytes as they come (in pieces of any
    size): whole messages (a fragmented one joined) and control frames, as
    C{(opcode, payload)}.  One buffer and an offset, like Twisted's
    C{IntNStringReceiver}; a message over C{max_length} is an error.
    """

    def __init__(self, max_length: int = 16 * 1024 * 1024) -> None:
        self.max_length = max_length
        self._buffer = b""
        self._fragments: list[bytes] = []
        self._opcode = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """
        @raise WireError: a frame breaks the protocol.
        """
        buf = self._buffer + data if self._buffer else data
        out: list[tuple[int, bytes]] = []
        offset = 0
        size = len(buf)
        while size - offset >= 2:
            b0 = buf[offset]
            b1 = buf[offset + 1]
            n = b1 & 0x7F
            start = offset + 2
            if n == 126:
                if size - start < 2:
                    break
                n = (buf[start] << 8) | buf[start + 1]
                start += 2
            elif n == 127:
                if size - start < 8:
                    break
                n = int.from_bytes(buf[start : start + 8], "big")
                start += 8
            if n > self.max_length:
                raise WireError(f"a frame of {n} bytes")
            mask = b""
            if b1 & 0x80:
                mask = buf[start : start + 4]
                start += 4
            end = start + n
            if end > size:
                break
            payload = buf[start:end]
            if mask:
                if len(mask) < 4:
                    break
                payload = unmask(payload, mask)
            offset = end
            opcode = b0 & 0x0F
            if b0 & 0x70:
                raise WireError("reserved bits set (no extension was agreed)")
            fin = b0 & 0x80
            if opcode >= 0x8:
                if not fin or n > 125:
                    raise WireError("a fragmented or long control frame")
                out.append((opcode, payload))
            elif opcode == CONTINUATION:
                if not self._fragments:
                    raise WireError("a continuation frame without a message")
                self._fragments.append(payload)
                if sum(map(len, self._fragments)) > self.max_length:
                    raise WireError("a message over the length limit")
                if fin:
                    out.append((self._opcode, b"".join(self._fragments)))
                    self._fragments = []
            elif self._fragments:
                raise WireError("a new message inside a fragmented one")
            elif fin:
                out.append((opcode, payload))
            else:
                self._opcode = opcode
                self._fragments = [payload]
        self._buffer = buf[offset:] if offset < size else b""
        return out


def close_code(payload: bytes) -> int | None:
    """
    The status code of a close frame's payload, if it has one.
    """
    return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else None


# The proto3 JSON form, for the frames the load generator reads and writes

_NAMES = {c: c.name for c in Command}
_BY_NAME = {c.name: c for c in Command}

#: Frame attribute -> JSON field (as L{cim.codec.encode_json} names them);
#: the int64 fields go as strings.
_STRINGS = (
    ("req_msg", "reqMsg"),
    ("token", "token"),
    ("client_msg_id", "clientMsgId"),
    ("conversation", "conversation"),
    ("group_id", "groupId"),
    ("error_reason", "errorReason"),
    ("redirect", "redirect"),
    ("device", "device"),
)
_INT64S = (
    ("request_id", "requestId"),
    ("msg_id", "msgId"),
    ("seq", "seq"),
    ("receive_user_id", "receiveUserId"),
    ("timestamp", "timestamp"),
)
_FRAME_FIELDS = {json_name: attr for attr, json_name in _STRINGS + _INT64S}
_INT_FIELDS = {json_name for _, json_name in _INT64S} | {"errorCode"}
_CHAT_FIELDS = {
    "msgId": "msg_id",
    "conversation": "conversation",
    "seq": "seq",
    "senderId": "sender_id",
    "senderName": "sender_name",
    "text": "text",
    "timestamp": "timestamp",
    "clientMsgId": "client_msg_id",
    "receiveUserId": "receive_user_id",
    "groupId": "group_id",
    "epoch": "epoch",
}
_CHAT_INTS = {"msgId", "seq", "senderId", "timestamp", "receiveUserId"}


def _cursor_json(cursor: Cursor) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cursor.conversation:
        out["conversation"] = cursor.conversation
    if cursor.seq:
        out["seq"] = str(cursor.seq)
    if cursor.epoch:
        out["epoch"] = cursor.epoch
    if cursor.reset:
        out["reset"] = True
    return out


def frame_to_json(frame: Frame) -> str:
    """
    C{frame} in the proto3 JSON form (what L{cim.codec.encode_json} makes,
    for the fields the load generator sends: no C{messages}), with plain
    C{json}.
    """
    out: dict[str, Any] = {}
    for attr, name in _STRINGS:
        value = getattr(frame, attr)
        if value:
            out[name] = value
    for attr, name in _INT64S:
        value = getattr(frame, attr)
        if value:
            out[name] = str(value)
    if frame.cmd:
        out["cmd"] = _NAMES[frame.cmd]
    if frame.error_code:
        out["errorCode"] = frame.error_code
    if frame.properties:
        out["properties"] = dict(frame.properties)
    if frame.batch:
        out["batchReqMsg"] = list(frame.batch)
    if frame.cursors:
        out["cursors"] = [_cursor_json(c) for c in frame.cursors]
    if frame.messages:
        raise ValueError("frame_to_json does not write messages")
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise CodecError(f"not an integer: {value!r}")
    return int(value)


def frame_from_json(data: bytes | str) -> Frame:
    """
    Read one frame in the proto3 JSON form (as the server's
    L{cim.codec.encode_json} writes it) with plain C{json}.

    @raise CodecError: not such a frame (an unknown field too).
    """
    try:
        raw = json.loads(data)
    except ValueError as e:
        raise CodecError(f"undecodable JSON frame: {e}") from None
    if not isinstance(raw, dict):
        raise CodecError("undecodable JSON frame: not a JSON object")
    try:
        frame = Frame(_BY_NAME[raw.get("cmd", "LOGIN_REQUEST")])
        for name, value in raw.items():
            attr = _FRAME_FIELDS.get(name)
            if attr is not None:
                setattr(frame, attr, _int(value) if name in _INT_FIELDS else value)
            elif name == "cmd":
                continue
            elif name == "errorCode":
                frame.error_code = _int(value)
            elif name == "messages":
                frame.messages = tuple(_chat_from_json(m) for m in value)
            elif name == "cursors":
                frame.cursors = tuple(
                    Cursor(
                        c.get("conversation", ""),
                        _int(c.get("seq", 0)),
                        c.get("epoch", ""),
                        bool(c.get("reset", False)),
                    )
                    for c in value
                )
            elif name == "batchReqMsg":
                frame.batch = tuple(value)
            elif name == "properties":
                frame.properties = dict(value)
            else:
                raise CodecError(f"undecodable JSON frame: unknown field {name!r}")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CodecError(f"undecodable JSON frame: {e!r}") from None
    return frame


def _chat_from_json(raw: dict[str, Any]) -> ChatMessage:
    fields: dict[str, Any] = {
        "msg_id": 0,
        "conversation": "",
        "seq": 0,
        "sender_id": 0,
        "sender_name": "",
        "text": "",
        "timestamp": 0,
    }
    for name, value in raw.items():
        attr = _CHAT_FIELDS.get(name)
        if attr is None:
            raise CodecError(f"undecodable JSON message: unknown field {name!r}")
        fields[attr] = _int(value) if name in _CHAT_INTS else value
    return ChatMessage(**fields)
