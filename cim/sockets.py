"""
Writing straight to the socket of a plain TCP connection: L{send_now} hands
the bytes to the socket when the transport holds nothing unsent, so that
they leave at once instead of at the reactor's next poll (Twisted's own
path registers the socket with the reactor for room, sends, and
unregisters it: two C{epoll_ctl} system calls and an event a write).  What
the socket does not take goes through the transport, in order.  The IM
servers' client connections (L{cim.server.turnflush}) and the sites'
replies (L{cim.web.ReplyChannel}) write this way.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

from cim.limits_net import counted_transport


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
