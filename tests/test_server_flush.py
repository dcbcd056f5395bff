"""
The IM server's writes to plain TCP connections: sent at the next turn of
the reactor, straight to the socket (L{cim.turnflush}).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.task import Clock

from cim.codec import encode_framed
from cim.message import Command, Frame
from cim.server import wire
from cim.server.protocol import ClientConnectionProtocol
from cim.turnflush import plain_tcp


class Reactor(Clock):
    """
    A clock that keeps the readers and writers registered with it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.writers: set[Any] = set()
        self.readers: set[Any] = set()

    def addWriter(self, writer: Any) -> None:
        self.writers.add(writer)

    def removeWriter(self, writer: Any) -> None:
        self.writers.discard(writer)

    def addReader(self, reader: Any) -> None:
        self.readers.add(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.discard(reader)


class Server:
    """
    The core's side, as far as a connection's writes go.
    """

    def __init__(self) -> None:
        self.overflows: list[int] = []
        self.lost = 0

    def connection_made(self, link: Any, peer: str) -> object:
        return object()

    def connection_lost(self, conn: Any, clean: bool) -> None:
        self.lost += 1

    def overflowed(self, conn: Any, unsent: int) -> None:
        self.overflows.append(unsent)


def _connected(
    max_output: int = 1 << 20,
) -> tuple[Reactor, ClientConnectionProtocol, tcp.Server, socket.socket]:
    reactor = Reactor()
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.setblocking(False)
    protocol = ClientConnectionProtocol(Server(), 1024, max_output)  # type: ignore[arg-type]
    transport = tcp.Server(ours, protocol, ("10.0.0.1", 1), None, 1, reactor)  # type: ignore[arg-type]
    transport.getPeer = lambda: type("A", (), {"host": "10.0.0.1", "port": 1})()  # type: ignore[method-assign]
    protocol.makeConnection(transport)
    return reactor, protocol, transport, peer


def _read(peer: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            data = peer.recv(1 << 20)
        except BlockingIOError:
            return out
        if not data:
            return out
        out += data


def test_the_writes_of_a_turn_leave_in_one_send_at_the_next() -> None:
    reactor, protocol, transport, peer = _connected()
    assert plain_tcp(transport) is transport
    error = wire.error(1, "x")
    protocol.send(wire.PONG)
    protocol.send(error)
    assert _read(peer) == b""
    reactor.advance(0)
    assert _read(peer) == encode_framed(wire.PONG) + encode_framed(error)
    # Nothing went through the transport's buffer or the reactor's writers.
    assert not reactor.writers and not transport.dataBuffer


def test_what_the_socket_does_not_take_goes_through_the_transport() -> None:
    """
    Past what the socket takes, the rest waits in the transport (which
    pauses the connection's producer as before); later writes queue behind
    it, in order.
    """
    reactor, protocol, transport, peer = _connected()
    frames = [
        Frame(Command.MESSAGE, req_msg=f"{i:06d}" + "x" * 3000) for i in range(300)
    ]
    for frame in frames[:200]:
        protocol.send(frame)
    reactor.advance(0)
    assert transport in reactor.writers  # the socket was full
    for frame in frames[200:]:
        protocol.send(frame)
    reactor.advance(0)
    received = b""
    while transport in reactor.writers:
        received += _read(peer)
        transport.doWrite()
    received += _read(peer)
    assert received == b"".join(encode_framed(f) for f in frames)


def test_a_close_sends_what_was_written_and_an_abort_drops_it() -> None:
    reactor, protocol, transport, peer = _connected()
    protocol.send(wire.PONG)
    protocol.close()
    assert _read(peer) == encode_framed(wire.PONG)
    reactor.advance(0)
    assert _read(peer) == b""

    reactor, protocol, transport, peer = _connected()
    protocol.send(wire.PONG)
    protocol.abort()
    reactor.advance(0)
    assert _read(peer) == b""


def test_other_transports_are_written_at_once() -> None:
    from twisted.internet.testing import StringTransport

    protocol = ClientConnectionProtocol(Server(), 1024)  # type: ignore[arg-type]
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert plain_tcp(transport) is None
    protocol.send(wire.PONG)
    assert transport.value() == encode_framed(wire.PONG)
