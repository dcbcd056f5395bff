"""
L{Connection}: what the server knows of one client connection, and the
small interface (L{ConnectionControl}) through which the server's parts
report an error on a connection or close it.

A connection's conversations are its L{cim.server.stream.Stream}s; how its
sends are checked and ordered is L{cim.server.sending}'s business.  Nothing
here does I/O beyond handing frames to the connection's L{IClientLink}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from cim.message import BROADCAST, ChatMessage, Command, Cursor, Frame
from cim.server import wire
from cim.server.link import IClientLink

if TYPE_CHECKING:
    from cim.server.stream import Stream


class Connection:
    """
    One client connection's facts.

    @ivar link: the connection's wire adapter.
    @ivar opened: when it was made; C{last_seen}: when it last sent a frame.
    @ivar logging_in: a login is being checked.
    @ivar replaced: a newer login of the same user took over; closing this
        connection must not release the session.
    @ivar legacy: a CIM client (it logged in without a token): it gets only
        the frames CIM's client reads (L{wire.CIM_COMMANDS}), each message
        with its properties.
    @ivar tokens: the rate limit's token bucket.
    @ivar acked: per conversation, the highest seq the client acknowledged
        (cim clients) or, for CIM clients, that a later heartbeat proved
        was received; C{ack_dirty} when not saved yet.
    @ivar streams: per conversation, what this connection was written.
    """

    __slots__ = (
        "link",
        "peer",
        "opened",
        "last_seen",
        "user_id",
        "user_name",
        "session_id",
        "legacy",
        "logging_in",
        "replaced",
        "closed",
        "tokens",
        "acked",
        "ack_dirty",
        "streams",
    )

    def __init__(self, link: IClientLink, peer: str, now: float) -> None:
        self.link = link
        self.peer = peer
        self.opened = now
        self.last_seen = now
        self.user_id = 0
        self.user_name = ""
        self.session_id = ""
        self.legacy = False
        self.logging_in = False
        self.replaced = False
        self.closed = False
        self.tokens = 0.0
        self.acked: dict[str, int] = {}
        self.ack_dirty = False
        self.streams: dict[str, Stream] = {}

    def send(self, frame: Frame) -> None:
        """
        Send one frame, unless the connection is closed, or is a CIM client
        that could not read it.
        """
        if not self.closed and (not self.legacy or frame.cmd in wire.CIM_COMMANDS):
            self.link.send(frame)

    def deliver(
        self,
        messages: Sequence[ChatMessage],
        cmd: Command,
        batch: wire.Batch | None = None,
    ) -> None:
        """
        Send chat messages, live (C{MESSAGE}, as the shared C{batch} when
        given) or replayed (C{OFFLINE}), in the form this client reads.
        """
        if self.closed:
            return
        if self.legacy:
            for frame in wire.for_cim_client(messages, cmd, self.user_id):
                self.link.send(frame)
        elif batch is not None:
            self.link.send_batch(batch)
        else:
            self.link.send(wire.messages(cmd, messages))

    def acknowledge(self, cursors: Sequence[Cursor]) -> int:
        """
        The client acknowledged C{cursors}.  Only a conversation this
        connection receives (one of its L{streams}: its inbox, its groups)
        counts, and only up to what was written to it; any other cursor is
        ignored (it would break the user's next logins, or grow its stored
        cursors without bound).

        @return: how many cursors were ignored (the broadcast conversation,
            which has no cursor, is not counted).
        """
        ignored = 0
        acked = self.acked
        for cursor in cursors:
            conversation = cursor.conversation
            stream = self.streams.get(conversation)
            if stream is None or cursor.seq > stream.delivered:
                if conversation != BROADCAST:
                    ignored += 1
                continue
            if cursor.seq > acked.get(conversation, 0):
                acked[conversation] = cursor.seq
                self.ack_dirty = True
        return ignored

    def acknowledge_delivered(self) -> None:
        """
        Count what was written to this connection as received: a CIM client
        cannot acknowledge (L{cim.server.core.IMServer.connection_lost} says
        when this is done).
        """
        for conversation, stream in self.streams.items():
            if stream.delivered > self.acked.get(conversation, 0):
                self.acked[conversation] = stream.delivered
                self.ack_dirty = True


class ConnectionControl(Protocol):
    """
    What the server's parts may do to a connection besides writing to it
    (L{cim.server.core.IMServer} provides it).
    """

    def error(
        self,
        conn: Connection,
        code: int,
        reason: str,
        close: bool = False,
        client_msg_id: str = "",
    ) -> None:
        """
        Send an error frame (about the send C{client_msg_id}, if given), and
        close the connection when C{close}.
        """

    def kick(self, conn: Connection, reason: str, redirect: str = "") -> None:
        """
        Tell C{conn} to reconnect (through the route unless C{redirect}
        names a server) and close it.
        """
