"""
The Redis connections' commands (L{cim.store.redis.connection}): on a
plain TCP connection a reactor turn's first command leaves at once and the
others together at the next turn, straight to the socket, in order, also
around txredisapi's own writes; their replies fire their Deferreds in
order.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from cim.store.redis.connection import _BusPublisher
from tests.test_server_flush import Reactor, _read
from tests.test_web_reply import Counting


def _connected() -> tuple[Reactor, Any, tcp.Server, Counting, socket.socket]:
    reactor = Reactor()
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.setblocking(False)
    protocol = _BusPublisher(convertNumbers=False)
    transport = tcp.Server(ours, protocol, ("10.0.0.1", 1), None, 1, reactor)  # type: ignore[arg-type]
    counting = Counting(ours)
    transport.socket = counting  # type: ignore[assignment]
    protocol.makeConnection(transport)
    return reactor, protocol, transport, counting, peer


def _replies(d: Any) -> list[Any]:
    got: list[Any] = []
    d.addBoth(got.append)
    return got


def test_a_turn_s_first_command_leaves_at_once_the_others_at_the_next() -> None:
    reactor, protocol, transport, counting, peer = _connected()
    got = [
        _replies(protocol.execute_command("SET", "a", "1")),
        _replies(protocol.execute_command("GET", "a")),
        _replies(protocol.execute_command("PING")),
    ]
    # The first at once, and the reactor does not watch the socket.
    assert counting.sends == 1 and not reactor.writers
    assert _read(peer) == b"*3\r\n$3\r\nSET\r\n$1\r\na\r\n$1\r\n1\r\n"
    reactor.advance(0)
    assert counting.sends == 2 and not reactor.writers
    assert _read(peer) == b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n*1\r\n$4\r\nPING\r\n"
    peer.send(b"+OK\r\n$1\r\n1\r\n+PONG\r\n")
    transport.doRead()
    assert got == [["OK"], ["1"], ["PONG"]]
    # A later turn's first command: at once again.
    protocol.execute_command("GET", "b")
    assert counting.sends == 3
    assert _read(peer) == b"*2\r\n$3\r\nGET\r\n$1\r\nb\r\n"
    reactor.advance(0)
    assert counting.sends == 3 and not reactor.getDelayedCalls()


def test_txredisapi_s_own_writes_come_after_what_waits() -> None:
    reactor, protocol, transport, counting, peer = _connected()
    protocol.execute_command("GET", "a")
    protocol.execute_command("GET", "b")
    # (txredisapi writes a command given keyword arguments itself.)
    protocol.execute_command("GET", "c", something=1)
    # (The transport sends what it was given at the next poll.)
    assert reactor.writers == {transport}
    transport.doWrite()
    reactor.advance(0)
    assert (
        _read(peer) == b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n*2\r\n$3\r\nGET\r\n$1\r\nb\r\n"
        b"*2\r\n$3\r\nGET\r\n$1\r\nc\r\n"
    )


def test_what_waits_fails_with_the_lost_connection() -> None:
    reactor, protocol, transport, counting, peer = _connected()
    got = _replies(protocol.execute_command("GET", "a"))
    waiting = _replies(protocol.execute_command("GET", "b"))
    peer.close()
    transport.connectionLost(Failure(ConnectionDone("gone")))
    reactor.advance(0)
    # The second never left; both fail.
    assert counting.sends == 1
    for replies in (got, waiting):
        [failure] = replies
        assert "Lost connection" in str(failure.value)
