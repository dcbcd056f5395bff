"""
L{Connection}: what the server knows of one client connection, and the
small interface (L{ConnectionControl}) through which the server's parts
report an error on a connection or close it.

A connection's conversations are its L{cim.server.stream.Stream}s; how its
sends are checked and ordered is L{cim.server.sending}'s business.  Nothing
here does I/O beyond handing frames to the connection's L{IClientLink}.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

from cim.message import (
    BROADCAST,
    PAIR_PREFIX,
    ChatMessage,
    Command,
    Cursor,
    Frame,
    Position,
)
from cim.server import wire
from cim.server.link import IClientLink

if TYPE_CHECKING:
    from cim.server.stream import Stream


class Connection:
    """
    One client connection's facts.

    @ivar link: the connection's wire adapter.
    @ivar opened: when it was made; C{last_seen}: when it last sent a frame.
    @ivar active: when its device was last active (its login, or its last
        send), reported at session renewals.
    @ivar device: the device it logged in as (C{""} for CIM clients and
        clients that name none).
    @ivar logging_in: a login is being checked.
    @ivar replaced: a newer login of the same device took over, or its
        session was released elsewhere; closing this connection must not
        release the session.
    @ivar held: while its login reads where its conversations start, the
        live messages that arrived for it (offered to its streams once they
        exist); C{None} otherwise.
    @ivar legacy: a CIM client (it logged in without a token): it gets only
        the frames CIM's client reads (L{wire.CIM_COMMANDS}), each message
        with its properties.
    @ivar tokens: the rate limit's token bucket.
    @ivar acked: per conversation, the device's stored cursor as its login
        read it (all of them: the conversations adopted since start from
        there, L{cim.server.stream.Streams}), raised to the highest
        position (of the stream's epoch) the client acknowledged (cim
        clients) or, for CIM clients, that a later heartbeat proved was
        received.
    @ivar ack_dirty: the conversations whose C{acked} position was raised
        since it was last saved (L{unsaved_acks}), or C{None}: a save
        stores only those, not every conversation the device ever had.
    @ivar streams: per conversation, what this connection was written.
    @ivar read_sent: per conversation, the highest read position this
        connection reported (a READ frame that does not raise it is not
        passed on).
    @ivar next_device: the connection of the user's next device here (the
        server's list of a user's devices: L{cim.server.core.IMServer}).
    @ivar unlisted: the conversations the client sent a position for at
        login that the store did not list (usually none): adopting one
        tells the client where it starts (an EPOCH frame), which moves the
        client's stream off its old position; any other conversation that
        starts at 0 does without (the client takes the epoch of its first
        message, L{cim.server.stream.Streams}).

    A server holds tens of thousands of these, most of them idle: every
    attribute is a slot, and L{acked}, L{streams} and L{read_sent} are made
    on first use (a connection that never receives a conversation has
    none of them).
    """

    __slots__ = (
        "link",
        "peer",
        "opened",
        "last_seen",
        "user_id",
        "user_name",
        "session_id",
        "device",
        "active",
        "legacy",
        "logging_in",
        "replaced",
        "closed",
        "tokens",
        "acked",
        "ack_dirty",
        "streams",
        "held",
        "read_sent",
        "next_device",
        "unlisted",
    )
    acked: dict[str, Position]
    streams: dict[str, Stream]
    read_sent: dict[str, int]

    def __init__(self, link: IClientLink, peer: str, now: float) -> None:
        self.link = link
        self.peer = peer
        self.opened = now
        self.last_seen = now
        self.user_id = 0
        self.user_name = ""
        self.session_id = ""
        self.device = ""
        self.active = now
        self.legacy = False
        self.logging_in = False
        self.replaced = False
        self.closed = False
        self.tokens = 0.0
        self.ack_dirty: set[str] | None = None
        self.held: list[tuple[Sequence[ChatMessage], wire.Batch]] | None = None
        self.next_device: Connection | None = None
        self.unlisted: frozenset[str] = _NONE

    if not TYPE_CHECKING:  # (mypy would take any attribute name for one)

        def __getattr__(self, name: str) -> object:
            # Only an unset slot gets here: make the dictionaries on first
            # use, and keep them (later reads are plain slot reads).
            if name in _LAZY:
                value = {}
                setattr(self, name, value)
                return value
            raise AttributeError(
                f"{type(self).__name__!r} object has no attribute {name!r}"
            )

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
        given) or replayed (C{OFFLINE}), in the form this client reads: a
        CIM client never gets its own messages of a private conversation
        (it did not get them in CIM; its streams advance all the same).
        """
        if self.closed:
            return
        if self.legacy:
            user_id = self.user_id
            theirs = [m for m in messages if not _own_private(m, user_id)]
            for frame in wire.for_cim_client(theirs, cmd, user_id):
                self.link.send(frame)
        elif batch is not None:
            self.link.send_batch(batch)
        else:
            self.link.send(wire.messages(cmd, messages))

    def acknowledge(self, cursors: Sequence[Cursor]) -> int:
        """
        The client acknowledged C{cursors}.  Only a conversation this
        connection receives (one of its L{streams}: its private
        conversations, its groups) counts, only in the stream's epoch (the
        one the server told it at login or in an EPOCH frame, or that the
        first message of a conversation it was not told of named), and only
        up to what was written to it; any other cursor is ignored (it would
        break the device's next logins, or grow its stored cursors without
        bound).

        @return: how many cursors were ignored (the broadcast conversation,
            which has no cursor, is not counted).
        """
        ignored = 0
        streams = self.streams
        raise_acked = self._raise_acked
        for cursor in cursors:
            conversation = cursor.conversation
            stream = streams.get(conversation)
            if (
                stream is None
                or cursor.epoch != stream.epoch.id
                or not 0 < cursor.seq <= stream.delivered
            ):
                if conversation != BROADCAST:
                    ignored += 1
                continue
            raise_acked(conversation, stream.epoch.id, cursor.seq)
        return ignored

    def _raise_acked(self, conversation: str, epoch: str, seq: int) -> None:
        acked = self.acked
        old = acked.get(conversation)
        if old is None or old.epoch != epoch or seq > old.seq:
            acked[conversation] = Position(epoch, seq)
            dirty = self.ack_dirty
            if dirty is None:
                self.ack_dirty = {conversation}
            else:
                dirty.add(conversation)

    def mark_unsaved(self, conversations: Iterable[str]) -> None:
        """
        The C{acked} positions of C{conversations} are to be saved (again,
        when saving them failed).
        """
        dirty = self.ack_dirty
        if dirty is None:
            self.ack_dirty = set(conversations)
        else:
            dirty.update(conversations)

    def unsaved_acks(self) -> dict[str, Position]:
        """
        Take the C{acked} positions raised since they were last taken, to
        save them.
        """
        dirty, self.ack_dirty = self.ack_dirty, None
        if not dirty:
            return {}
        acked = self.acked
        return {conversation: acked[conversation] for conversation in dirty}

    def acknowledge_delivered(self) -> None:
        """
        Count what was written to this connection as received: a CIM client
        cannot acknowledge (L{cim.server.core.IMServer.connection_lost} says
        when this is done).
        """
        for conversation, stream in self.streams.items():
            if stream.delivered > 0:
                self._raise_acked(conversation, stream.epoch.id, stream.delivered)


#: No conversations (shared by every connection's L{Connection.unlisted}).
_NONE: frozenset[str] = frozenset()

#: The attributes of a L{Connection} made on first use: empty dictionaries.
_LAZY = frozenset({"acked", "streams", "read_sent"})


def _own_private(message: ChatMessage, user_id: int) -> bool:
    """
    Whether C{message} is C{user_id}'s own message of a private conversation
    with another user.
    """
    return (
        message.sender_id == user_id
        and message.conversation.startswith(PAIR_PREFIX)
        and message.conversation != f"{PAIR_PREFIX}{user_id}:{user_id}"
    )


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
