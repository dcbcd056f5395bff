"""
What one frame costs the WebSocket gateway, per subprotocol, in one
process (no network, no reactor): the JSON form's encoding and decoding
alone (protobuf's C{json_format}, and L{cim.jsonwire} when it exists), and
the whole adapter (L{cim.server.websocket}) writing a frame and reading one.

    .venv/bin/python -m bench.wsmicro [--number N]

The figures are microseconds of this process's CPU time per frame, the best
of five runs (a busy machine only ever makes them worse).  Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import time
import timeit
from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from bench.wsclient import BINARY, TEXT, client_frame, frame_to_json
from cim import codec
from cim.message import ChatMessage, Command, Cursor, Frame
from cim.server import wire

try:
    from cim import jsonwire
except ImportError:  # before the fast JSON form
    jsonwire = None  # type: ignore[assignment]

TEXT_100 = "x" * 90 + " héllo 👋"


def server_frames() -> dict[str, Frame]:
    """
    What the C{ws} scenario's clients get most: a live message, an ACK.
    """
    message = ChatMessage(
        msg_id=1234567890123,
        conversation="p:1001:1002",
        seq=4711,
        sender_id=1001,
        sender_name="user1001",
        text=TEXT_100,
        timestamp=1764505000123,
        client_msg_id="c-1001-4711",
        receive_user_id=1002,
        epoch="e8f3a1",
    )
    ack = wire.acknowledgement("c-1001-4711", [message])
    return {
        "MESSAGE (1 message)": wire.messages(Command.MESSAGE, [message]),
        "ACK": ack,
        "PONG": wire.PONG,
    }


def client_frames() -> dict[str, Frame]:
    """
    What they send most: a private message, an ACK of their cursors.
    """
    return {
        "MESSAGE (send)": Frame(
            cmd=Command.MESSAGE,
            receive_user_id=1002,
            req_msg=TEXT_100,
            client_msg_id="c-1001-4711",
        ),
        "ACK (3 cursors)": Frame(
            cmd=Command.ACK,
            cursors=tuple(
                Cursor(f"p:1001:{1002 + i}", 4711 + i, "e8f3a1") for i in range(3)
            ),
        ),
        "PING": Frame(cmd=Command.PING, req_msg="ping"),
    }


def best(number: int, fn: Callable[..., object], *args: Any) -> float:
    """
    Microseconds per call of C{fn(*args)}, the best of five runs.
    """
    timer = timeit.Timer(partial(fn, *args), timer=time.process_time)
    return min(timer.repeat(number=number, repeat=5)) / number * 1e6


class _Core:
    """
    A server core that takes frames and drops them.
    """

    def __init__(self) -> None:
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.rate = 1000.0

    def connection_made(self, link: Any, where: str) -> Any:
        from cim.server.connection import Connection

        conn = Connection.__new__(Connection)
        conn.closed = False
        return conn

    def frame_received(self, conn: Any, frame: Frame) -> None:
        pass


def adapter(subprotocol: str) -> tuple[Any, StringTransport]:
    from cim.server.websocket import WebSocketGateway
    from tests import wskit

    gateway = WebSocketGateway(_Core(), _Core().clock, 64 * 1024)  # type: ignore[arg-type]
    address = IPv4Address("TCP", "10.1.1.2", 5001)
    protocol = gateway.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    protocol.dataReceived(wskit.handshake((subprotocol,), None, "127.0.0.1:8084"))
    transport.clear()
    return protocol, transport


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--number", type=int, default=2000)
    n = parser.parse_args().number
    rows: list[tuple[str, str, float]] = []

    for name, frame in server_frames().items():
        rows.append(
            ("encode", f"{name}, json_format", best(n, codec.encode_json, frame))
        )
        if jsonwire is not None:
            rows.append(
                ("encode", f"{name}, jsonwire", best(n, jsonwire.encode, frame))
            )
        rows.append(("encode", f"{name}, protobuf", best(n, codec.encode, frame)))
    for name, frame in client_frames().items():
        text = frame_to_json(frame)
        rows.append(
            ("decode", f"{name}, json_format", best(n, codec.decode_json, text))
        )
        if jsonwire is not None:
            utf8 = text.encode("utf-8")
            rows.append(("decode", f"{name}, jsonwire", best(n, jsonwire.decode, utf8)))
        data = codec.encode(frame)
        rows.append(("decode", f"{name}, protobuf", best(n, codec.decode, data)))

    from cim.server.websocket import JSON, PROTO

    def send(protocol: Any, transport: StringTransport, frame: Frame) -> None:
        protocol.send(frame)
        transport.clear()

    def send_batch(protocol: Any, transport: StringTransport, frame: Frame) -> None:
        # A new batch each time, to one connection: its encoding counts.
        protocol.send_batch(wire.Batch(frame.messages))
        transport.clear()

    for subprotocol in (PROTO, JSON):
        protocol, transport = adapter(subprotocol)
        protocol.conn = _Core().connection_made(protocol, "")
        binary = subprotocol == PROTO
        for name, frame in server_frames().items():
            us = best(n, send, protocol, transport, frame)
            rows.append(("adapter send", f"{name}, {subprotocol}", us))
        message = server_frames()["MESSAGE (1 message)"]
        us = best(n, send_batch, protocol, transport, message)
        rows.append(("adapter send", f"new Batch, {subprotocol}", us))
        for name, frame in client_frames().items():
            payload = (
                codec.encode(frame) if binary else frame_to_json(frame).encode("utf-8")
            )
            data = client_frame(
                BINARY if binary else TEXT, payload, b"\x01\x02\x03\x04"
            )
            us = best(n, protocol.dataReceived, data)
            rows.append(("adapter receive", f"{name}, {subprotocol}", us))

    width = max(len(label) for _, label, _ in rows)
    group = ""
    for kind, label, us in rows:
        if kind != group:
            print(f"\n{kind} (us per frame)")
            group = kind
        print(f"  {label:<{width}}  {us:8.2f}")


if __name__ == "__main__":
    main()
