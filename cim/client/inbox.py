"""
The client's inbox: what arrives in MESSAGE and OFFLINE frames is shown
exactly once and in order, and acknowledged.

  - per conversation, a cursor (the highest seq shown) drops anything at
    or below it: a replay after a reconnect, a duplicate push.  The
    cursors live in a L{CursorFile} (with the user's last login token), so
    that a restarted client resumes where it stopped;
  - broadcasts (conversation C{"all"}) are neither ordered nor replayed:
    the ids of the last L{BROADCAST_MEMORY} are remembered instead;
  - CIM-style frames (raw text and properties, from C{/sendMsg}) become
    messages with C{seq} 0 and no conversation, shown as they come;
  - acknowledgements are coalesced: one cumulative ACK frame per
    C{ack_delay} seconds carries the cursors that moved.

The inbox writes its ACKs to the connection it is attached to (by the
session, once logged in) and knows nothing else about it.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from cim.client.cursors import CursorFile
from cim.client.listeners import IClientListener
from cim.client.outbox import FrameWriter
from cim.message import BROADCAST, ChatMessage, Command, Cursor, Frame

#: Broadcast message ids remembered to drop duplicates.
BROADCAST_MEMORY = 1000


def legacy_messages(frame: Frame, now_ms: int) -> list[ChatMessage]:
    """
    The messages of a CIM-style frame (text in C{req_msg}, or several in
    C{batch}; the sender in the C{sendUserId} and C{sendUserName}
    properties): C{seq} 0, no conversation, stamped C{now_ms} unless the
    frame has a timestamp.  None when the frame has no text.
    """
    if not (frame.req_msg or frame.batch):
        return []
    props = frame.properties
    try:
        sender_id = int(props.get("sendUserId", "0"))
    except ValueError:
        sender_id = 0
    texts = list(frame.batch) if frame.batch else [frame.req_msg]
    return [
        ChatMessage(
            msg_id=0,
            conversation="",
            seq=0,
            sender_id=sender_id,
            sender_name=props.get("sendUserName", ""),
            text=text,
            timestamp=frame.timestamp or now_ms,
        )
        for text in texts
    ]


class Inbox:
    """
    Drops what was shown already, passes the rest to the listener, and
    acknowledges it.

    @ivar cursors: the L{CursorFile} of the current user (in memory only
        until L{open}).
    """

    def __init__(
        self,
        clock: IReactorTime,
        events: IClientListener,
        ack_delay: float = 0.005,
        save_interval: float = 1.0,
    ) -> None:
        """
        @param events: receives each new message.
        @param ack_delay: at most one ACK frame per this many seconds.
        @param save_interval: the shortest time between two writes of the
            cursor file.
        """
        self.clock = clock
        self.events = events
        self.ack_delay = ack_delay
        self.save_interval = save_interval
        self.cursors = CursorFile(clock)
        self._user_id: int | None = None
        self._dirty: set[str] = set()
        self._ack_call: IDelayedCall | None = None
        self._broadcast_seen: deque[int] = deque(maxlen=BROADCAST_MEMORY)
        self._connection: FrameWriter | None = None

    def open(self, user_id: int, path: Path | None) -> None:
        """
        Use the cursors of C{user_id}, kept in C{path} (in memory if
        C{None}); nothing changes if they are in use already.
        """
        if user_id == self._user_id:
            return
        self.cursors.close()
        self.cursors = CursorFile(self.clock, path, self.save_interval)
        self._user_id = user_id

    def attach(self, connection: FrameWriter) -> None:
        """
        A connection is logged in with the cursors (which the server now
        knows): acknowledge them all at once, so that the server stores
        them too (they are what another device of this user starts from),
        and acknowledge on it from now on.
        """
        self._dirty.clear()
        if self.cursors.cursors:
            connection.send(Frame(cmd=Command.ACK, cursors=self.cursors.as_list()))
        self._connection = connection

    def detach(self) -> None:
        """
        The connection is lost: what moved since is acknowledged by the
        next login.
        """
        self._connection = None
        self._cancel_ack_timer()

    def receive(self, frame: Frame) -> None:
        """
        Show the new messages of a MESSAGE or OFFLINE frame; acknowledge
        soon.
        """
        messages = list(frame.messages) or legacy_messages(
            frame, int(self.clock.seconds() * 1000)
        )
        for message in messages:
            if self.is_new(message):
                self.events.message_received(message)
        if self._dirty and self._ack_call is None:
            self._ack_call = self.clock.callLater(self.ack_delay, self.flush)

    def is_new(self, message: ChatMessage) -> bool:
        """
        Whether C{message} was not shown before (advancing its cursor, to be
        acknowledged, if so).
        """
        conversation = message.conversation
        if not conversation or message.seq <= 0:
            return True
        if conversation == BROADCAST:
            if message.msg_id in self._broadcast_seen:
                return False
            self._broadcast_seen.append(message.msg_id)
            return True
        if not self.cursors.advance(conversation, message.seq):
            return False
        self._dirty.add(conversation)
        return True

    def flush(self) -> None:
        """
        Send one cumulative ACK with the cursors that moved since the last.
        """
        self._ack_call = None
        if not self._dirty or self._connection is None:
            return
        cursors = [Cursor(c, self.cursors.get(c)) for c in sorted(self._dirty)]
        self._dirty.clear()
        self._connection.send(Frame(cmd=Command.ACK, cursors=cursors))

    def close(self) -> None:
        """
        Stop acknowledging and save the cursors.
        """
        self._connection = None
        self._cancel_ack_timer()
        self.cursors.close()

    def _cancel_ack_timer(self) -> None:
        if self._ack_call is not None:
            if self._ack_call.active():
                self._ack_call.cancel()
            self._ack_call = None
