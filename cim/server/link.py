"""
L{IClientLink}: what the server core needs of a client connection's wire
adapter.

The core decides what to say to a connection and hands over frames built
by L{cim.server.wire}; the adapter (L{cim.server.protocol}) alone turns
them into bytes.  Every method is called in the reactor thread and never
blocks: writes are buffered by the transport, up to a limit past which the
adapter drops the connection (L{cim.server.core.IMServer.overflowed}).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface import Interface

from cim.message import Frame
from cim.server.wire import Batch


class IClientLink(Interface):
    """
    One client connection as the server core sees it: a place to write
    frames to, and to close.
    """

    def send(frame: Frame) -> None:
        """
        Encode one frame and write it.

        @param frame: a L{cim.message.Frame}, usually built by
            L{cim.server.wire}.  The core has already decided that this
            client can read it (a CIM client gets only
            L{cim.server.wire.CIM_COMMANDS}).
        @return: C{None}.
        """

    def send_batch(batch: Batch) -> None:
        """
        Write a batch of live messages that several connections receive.

        @param batch: a L{cim.server.wire.Batch}; the adapter asks it for
            its encoding (L{cim.server.wire.Batch.encoded}), made once and
            shared by every adapter of the same encoding.
        @return: C{None}.
        """

    def close() -> None:
        """
        Close the connection once what was written is sent, and read
        nothing more from it; at once when the client is not reading what
        was written (L{backed_up}).  The adapter later reports the loss to
        the core (L{cim.server.core.IMServer.connection_lost}).

        @return: C{None}.
        """

    def abort() -> None:
        """
        Drop the connection at once, with whatever was written and not
        sent yet.

        @return: C{None}.
        """

    def backed_up() -> bool:
        """
        @return: whether more was written than the transport sends at once
            (its buffer is over its size: the client is not reading fast).
        """

    def drained() -> Deferred[None]:
        """
        @return: a Deferred firing once the connection is no longer
            L{backed_up} (at once when it is not), or it is closed.
        """
