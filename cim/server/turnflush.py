"""
Writes to plain TCP connections sent at the next turn of the reactor, each
connection's in one C{send} straight to its socket (L{TurnFlush}): how the
IM server writes to its clients' connections, TCP
(L{cim.server.protocol.ClientConnectionProtocol}) and WebSocket
(L{cim.server.websocket.WebSocketConnection}), when they are plain TCP
(TLS and other transports are written at once).

Twisted's own write path registers a connection as a writer with the
reactor at its first write of a turn, sends when the next poll says the
socket is writable, and unregisters it: two C{epoll_ctl} system calls and
an event's dispatch per connection and turn, about a tenth of a busy IM
server's CPU.  Here the socket takes the bytes at once (it nearly always
has the room); whatever it does not take, or anything written while the
transport still holds unsent bytes, goes through the transport's own
C{write}, so that order, the transport's buffer and its producer work as
before.  Bytes written while the reactor handles I/O events leave no
later than through Twisted's path (which waits for the next poll); those
written by a timed call leave one turn later.

(Tried for the Redis store's connections too, each command sent at once:
in a micro-benchmark of 60 commands a turn over 4 connections it cost
more than Twisted's one send per connection and turn, and it was left.)
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet import tcp
from twisted.internet.interfaces import IDelayedCall

from cim.sockets import plain_tcp, send_now


class Flushable(Protocol):
    def flush(self) -> None:
        """
        Send what was written since the last turn (L{send_now}).
        """


class TurnFlush:
    """
    The writers that have bytes to send at the next turn of C{reactor}.
    """

    __slots__ = ("reactor", "waiting", "_call")

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.waiting: list[Flushable] = []
        self._call: IDelayedCall | None = None

    def add(self, writer: Flushable) -> None:
        """
        Call C{writer.flush()} at the start of the reactor's next turn.
        """
        self.waiting.append(writer)
        if self._call is None:
            self._call = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        self._call = None
        waiting, self.waiting = self.waiting, []
        for writer in waiting:
            writer.flush()


#: The L{TurnFlush} of each reactor (one in a daemon), by its id.
_FLUSHES: dict[int, TurnFlush] = {}


def turn_flush(reactor: Any) -> TurnFlush:
    """
    The L{TurnFlush} of C{reactor}.
    """
    flush = _FLUSHES.get(id(reactor))
    if flush is None or flush.reactor is not reactor:
        flush = _FLUSHES[id(reactor)] = TurnFlush(reactor)
    return flush


class TurnWriter:
    """
    A client connection's writes through its reactor's L{TurnFlush} when it
    is on plain TCP (L{attach}), else straight to its transport: the TCP
    and WebSocket adapters (L{cim.server.protocol},
    L{cim.server.websocket}) mix it in.

    @ivar _tcp: the plain TCP transport whose bytes are sent at the next
        turn; C{_turn}: its reactor's L{TurnFlush} (held rather than looked
        up at each turn's first write); C{_out}: what waits for it.  Class
        defaults: a connection that is not on plain TCP holds none of them.
    """

    transport: Any
    _tcp: tcp.Connection | None = None
    _turn: TurnFlush | None = None
    _out: list[bytes] | None = None

    def attach(self, transport: Any) -> None:
        """
        Send through the turn flush when C{transport} is plain TCP (at the
        connection's start).
        """
        inner = plain_tcp(transport)
        if inner is not None:
            self._tcp = inner
            self._turn = turn_flush(inner.reactor)

    def detach(self) -> None:
        """
        Drop what waits and the transport (the connection is lost, or
        aborted: the transport drops its own unsent bytes too).
        """
        if self._turn is not None:
            self._out = self._tcp = self._turn = None

    def queue(self, data: bytes) -> None:
        """
        Send C{data} at the start of the next turn, after what was queued
        before it (or write it to the transport at once, when not on plain
        TCP).
        """
        turn = self._turn
        if turn is None:
            self.transport.write(data)
        elif self._out is None:
            self._out = [data]
            turn.add(self)
        else:
            self._out.append(data)

    def flush(self) -> None:
        """
        Send what was queued since the last turn, now.
        """
        out = self._out
        if out is not None:
            self._out = None
            if self._tcp is not None:
                send_now(self._tcp, self.transport, b"".join(out))
