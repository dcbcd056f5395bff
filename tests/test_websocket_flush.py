"""
A WebSocket connection's writes to a plain TCP connection: sent at the next
turn of the reactor, a turn's frames in one send straight to the socket
(L{cim.turnflush}), as the TCP adapter's are (L{test_server_flush}).
A real TCP transport over a socket pair, on a clock that stands for the
reactor; the client's side is the other socket, read as a client would.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from cim.codec import encode
from cim.limits_net import ConnectionLimits, LimitedFactory
from cim.message import Command, Frame
from cim.server.websocket import PROTO, WebSocketConnection, WebSocketGateway
from cim.turnflush import plain_tcp
from tests import wskit
from tests.serverkit import World
from tests.test_server_flush import Reactor, _read

ADDRESS = IPv4Address("TCP", "10.1.1.2", 5001)


class CountingSocket(socket.socket):
    """
    A socket that counts its sends (Twisted's and the turn flush's).
    """

    sends = 0

    def send(self, data: Any, flags: int = 0) -> int:
        self.sends += 1
        return super().send(data, flags)


class Connected:
    """
    A logged-in WebSocket client of the server under test, over a socket
    pair: C{protocol} on a TCP transport (under the connection limits'
    wrapper, as the daemon's port has it, when C{counted}), C{peer} the
    client's socket.
    """

    def __init__(self, counted: bool = False) -> None:
        self.world = world = World()
        self.reactor = reactor = Reactor()
        ours, self.peer = socket.socketpair()
        self.socket = CountingSocket(fileno=ours.detach())
        self.socket.setblocking(False)
        self.peer.setblocking(False)
        gateway = WebSocketGateway(world.server, world.clock, 1 << 20)
        top: Any = gateway.buildProtocol(ADDRESS)
        if counted:
            limited = LimitedFactory(gateway, ConnectionLimits(0), 0, world.clock)
            top = limited.buildProtocol(ADDRESS)
        self.protocol: WebSocketConnection = getattr(top, "wrappedProtocol", top)
        self.transport = tcp.Server(
            self.socket,
            top,
            ("10.1.1.2", 5001),
            None,  # type: ignore[arg-type]
            1,
            reactor,  # type: ignore[arg-type]
        )
        self.transport.getPeer = lambda: ADDRESS  # type: ignore[method-assign]
        self.transport.getHost = lambda: IPv4Address("TCP", "10.1.1.1", 8084)  # type: ignore[method-assign]
        # (Not a TCP socket: autobahn's setting would log an error.)
        self.transport.setTcpNoDelay = lambda enabled: None  # type: ignore[method-assign]
        top.makeConnection(self.transport)
        self.protocol.dataReceived(wskit.handshake((PROTO,)))
        head, _, rest = self.drain().partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        assert not rest
        user_id = world.account("alice")  # type: ignore[attr-defined]
        self.protocol.dataReceived(
            wskit.frame(
                wskit.BINARY,
                encode(
                    Frame(
                        cmd=Command.LOGIN_REQUEST,
                        request_id=user_id,
                        req_msg="alice",
                        token=world.token(user_id, "alice"),
                    )
                ),
            )
        )
        reactor.advance(0)
        [login] = self.frames(self.drain())
        assert login.opcode == wskit.BINARY
        self.socket.sends = 0

    def drain(self) -> bytes:
        """
        What the client reads once the transport has sent all it holds.
        """
        received = _read(self.peer)
        while self.transport in self.reactor.writers:
            self.transport.doWrite()
            received += _read(self.peer)
        return received

    @staticmethod
    def frames(data: bytes) -> list[wskit.Received]:
        frames, left = wskit.parse(data)
        assert not left
        return frames

    def nothing_in_the_transport(self) -> bool:
        transport = self.transport
        return (
            not transport.dataBuffer
            and not transport._tempDataBuffer
            and transport not in self.reactor.writers
        )


def _messages(*texts: str) -> list[Frame]:
    return [
        Frame(cmd=Command.MESSAGE, req_msg=text, receive_user_id=2) for text in texts
    ]


def _sent(frames: list[Frame]) -> list[tuple[int, bytes]]:
    return [(wskit.BINARY, encode(frame)) for frame in frames]


def _seen(received: list[wskit.Received]) -> list[tuple[int, bytes]]:
    return [(r.opcode, r.payload) for r in received]


@pytest.mark.parametrize("counted", [False, True])
def test_the_frames_of_a_turn_leave_in_one_send_at_the_next(counted: bool) -> None:
    c = Connected(counted)
    assert (c.protocol.transport is not c.transport) == counted
    assert plain_tcp(c.protocol.transport) is c.transport
    frames = _messages("one", "two")
    for frame in frames:
        c.protocol.send(frame)
    assert _read(c.peer) == b""
    assert c.socket.sends == 0 and c.nothing_in_the_transport()
    c.reactor.advance(0)
    # Both, in order, in one read after one send; nothing went through the
    # transport's buffer or the reactor's writers.
    assert _seen(c.frames(c.peer.recv(1 << 20))) == _sent(frames)
    assert c.socket.sends == 1
    assert c.nothing_in_the_transport()
    assert _read(c.peer) == b""


def test_what_the_socket_does_not_take_goes_through_the_transport() -> None:
    """
    The socket takes what it has room for at once; the rest waits in the
    transport, and the frames of later turns queue behind it, in order.
    """
    c = Connected()
    frames = _messages(*(f"{i:06d}" + "x" * 3000 for i in range(300)))
    for frame in frames[:200]:
        c.protocol.send(frame)
    assert _read(c.peer) == b""
    c.reactor.advance(0)
    assert c.socket.sends == 1
    # The socket took its fill at once, the transport holds the rest.
    received = _read(c.peer)
    assert received
    assert c.transport in c.reactor.writers
    for frame in frames[200:]:
        c.protocol.send(frame)
    c.reactor.advance(0)
    received += c.drain()
    assert _seen(c.frames(received)) == _sent(frames)


@pytest.mark.parametrize("closer", ["server", "client"])
def test_a_close_frame_comes_after_the_frames_written_before_it(closer: str) -> None:
    c = Connected()
    frames = _messages("one", "two")
    for frame in frames:
        c.protocol.send(frame)
    if closer == "server":
        c.protocol.close()
    else:
        # The client's close, answered at once.
        c.protocol.dataReceived(wskit.frame(wskit.CLOSE, (1000).to_bytes(2, "big")))
    # The messages left at once, ahead of the close frame (which the
    # transport sends).
    assert _seen(c.frames(_read(c.peer))) == _sent(frames)
    received = c.drain()
    c.reactor.advance(0)
    received += c.drain()
    [close] = c.frames(received)
    assert close.opcode == wskit.CLOSE and close.close_code == 1000


def test_a_pong_comes_after_the_frames_written_before_it() -> None:
    c = Connected()
    frames = _messages("one", "two")
    for frame in frames:
        c.protocol.send(frame)
    c.protocol.dataReceived(wskit.frame(wskit.PING, b"are you there"))
    # The messages left at once, ahead of the pong (which the transport
    # sends).
    assert _seen(c.frames(_read(c.peer))) == _sent(frames)
    c.protocol.send(_messages("three")[0])
    received = c.drain()
    c.reactor.advance(0)
    received += c.drain()
    assert _seen(c.frames(received)) == [
        (wskit.PONG, b"are you there"),
        *_sent(_messages("three")),
    ]


def test_an_abort_drops_what_waits_and_sends_nothing_more() -> None:
    c = Connected()
    for frame in _messages("one", "two"):
        c.protocol.send(frame)
    # They wait in the connection, not in the transport (which would drop
    # them itself).
    assert c.nothing_in_the_transport()
    c.protocol.abort()
    c.protocol.send(_messages("three")[0])
    c.reactor.advance(0)
    assert c.socket.sends == 0
    assert _read(c.peer) == b""  # the end of the stream, and nothing before
    assert c.protocol.conn is not None and c.protocol.conn.closed


def test_other_transports_are_written_at_once() -> None:
    world = World()
    gateway = WebSocketGateway(world.server, world.clock, 1 << 20)
    protocol = gateway.buildProtocol(ADDRESS)
    transport = StringTransport(peerAddress=ADDRESS)
    protocol.makeConnection(transport)
    assert plain_tcp(transport) is None
    protocol.dataReceived(wskit.handshake((PROTO,)))
    transport.clear()
    frames = _messages("one", "two")
    for frame in frames:
        protocol.send(frame)
    assert _seen(wskit.parse(transport.value())[0]) == _sent(frames)
