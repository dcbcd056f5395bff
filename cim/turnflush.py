"""
Writes to plain TCP connections sent at the next turn of the reactor, each
connection's in one C{send} straight to its socket (L{TurnFlush}): how the
IM server writes to its clients' connections, TCP
(L{cim.server.protocol.ClientConnectionProtocol}) and WebSocket
(L{cim.server.websocket.WebSocketConnection}), and the Redis store its
commands (L{cim.store.redis.connection}), when they are plain TCP (TLS
and other transports are written at once); and L{send_now}, a write
straight to the socket, which the sites' replies use too
(L{cim.web.ReplyChannel}).

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

(Each Redis command sent at once, instead of a turn's at the next turn,
cost more than Twisted's one send per connection and turn in a
micro-benchmark of 60 commands a turn over 4 connections.)
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet import tcp
from twisted.internet.interfaces import IDelayedCall

from cim.limits_net import counted_transport


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
    A connection's writes through its reactor's L{TurnFlush} when it is on
    plain TCP (L{attach}), else straight to its transport: the IM server's
    TCP and WebSocket adapters (L{cim.server.protocol},
    L{cim.server.websocket}) mix it in, and the Redis store's connections
    write their commands through one (L{cim.store.redis.connection}).

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


def plain_tcp(transport: Any) -> tcp.Connection | None:
    """
    The TCP transport under C{transport} when its bytes go to the socket as
    they are (a plain TCP connection, perhaps counted by
    L{cim.limits_net}); C{None} for any other (TLS, a test's transport).
    """
    inner = counted_transport(transport)
    if isinstance(inner, tcp.Connection) and not inner.TLS:
        return inner
    return None


def send_now(connection: tcp.Connection, transport: Any, data: bytes) -> None:
    """
    Send C{data} straight to C{connection}'s socket when the transport holds
    nothing unsent, and what the socket does not take (or all of it
    otherwise) through C{transport} (C{connection} or the wrapper over it).
    """
    if (
        connection.connected
        and not connection.disconnecting
        and not connection.dataBuffer
        and not connection._tempDataBuffer
    ):
        try:
            sent = connection.socket.send(data)
        except OSError:
            # (EAGAIN, or the connection failed: the transport finds out
            # when it writes.)
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
