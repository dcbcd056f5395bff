"""
The client's inbox: what arrives in MESSAGE and OFFLINE frames is shown
exactly once and in order, and acknowledged; where the server starts each
conversation (C{LOGIN_RESPONSE} and C{EPOCH} cursors) is followed; read
positions go out in C{READ} frames and come in from the server's.

  - per conversation, the stream's position (epoch and seq: what is
    acknowledged) and per epoch tag the highest seq seen, which drops
    anything at or below it: a replay after a reconnect, a duplicate
    push, a resync after the store lost messages (L{CursorFile}, kept with
    the user's last login token so that a restarted client resumes where
    it stopped);
  - a cursor from the server with C{reset} set (the store lost what this
    client had after its seq) is told to the listener;
  - broadcasts (conversation C{"all"}) are neither ordered nor replayed:
    the ids of the last L{BROADCAST_MEMORY} are remembered instead;
  - CIM-style frames (raw text and properties, from C{/sendMsg}) become
    messages with C{seq} 0 and no conversation, shown as they come;
  - acknowledgements are coalesced: one cumulative ACK frame per
    C{ack_delay} seconds carries the cursors that moved, each with its
    stream's epoch;
  - the read state (L{ReadState}) follows the new messages and the
    server's C{READ} frames; L{Inbox.mark_read} sends this user's.

The inbox writes its ACKs and READs to the connection it is attached to
(by the session, once logged in) and knows nothing else about it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from pathlib import Path

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from cim.client.cursors import CursorFile
from cim.client.listeners import IClientListener
from cim.client.outbox import FrameWriter
from cim.client.reads import ReadState
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
    @ivar reads: the L{ReadState} of the current user.
    """

    log = Logger()

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
        self.reads = ReadState()
        self._user_id: int | None = None
        self._read_out: dict[str, int] = {}
        self._read_high: dict[str, int] = {}
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
        self.reads.reset(user_id)
        self._read_out = {}
        self._read_high = {}
        self._user_id = user_id

    def attach(self, connection: FrameWriter) -> None:
        """
        A connection is logged in (and its streams started, L{start}):
        acknowledge every position at once, so that the server stores them
        too (they are where this device starts next time), send the read
        positions not sent yet, and acknowledge on it from now on.
        """
        self._dirty.clear()
        cursors = self.cursors.as_list()
        if cursors:
            connection.send(Frame(cmd=Command.ACK, cursors=cursors))
        self._connection = connection
        self._send_reads()

    def detach(self) -> None:
        """
        The connection is lost: what moved since is acknowledged by the
        next login.
        """
        self._connection = None
        self._cancel_ack_timer()

    def start(self, cursors: Sequence[Cursor]) -> None:
        """
        The server starts (or restarts) conversations for this connection
        (the cursors of C{LOGIN_RESPONSE} or of an C{EPOCH} frame): each
        stream now stands at the cursor's epoch and seq.  A reset one (the
        store lost what this client had after its seq) is told to the
        listener.
        """
        for cursor in cursors:
            self.cursors.start(cursor.conversation, cursor.epoch, cursor.seq)
            if cursor.reset:
                self.log.info(
                    "The server lost the messages of {conversation} after "
                    "{seq}: it starts again in epoch {epoch}",
                    conversation=cursor.conversation,
                    seq=cursor.seq,
                    epoch=cursor.epoch,
                )
                self.reads.restart(cursor.conversation, cursor.seq)
                self.events.conversation_reset(cursor.conversation, cursor.seq)

    def read_received(self, frame: Frame) -> None:
        """
        A C{READ} frame from the server: user C{frame.request_id} (this
        user on another device, or a peer) read each cursor's conversation
        up to its seq.
        """
        reader = frame.request_id
        for cursor in frame.cursors:
            if self.reads.read_by(reader, cursor.conversation, cursor.seq):
                self.events.read_changed(reader, cursor.conversation, cursor.seq)

    def mark_read(self, conversation: str, seq: int) -> None:
        """
        This user read C{conversation} up to C{seq}: lower its unread
        count, and tell the server (now, or once connected).
        """
        if seq <= 0 or not conversation or conversation == BROADCAST:
            return
        if self._user_id is not None and self.reads.read_by(
            self._user_id, conversation, seq
        ):
            self.events.read_changed(self._user_id, conversation, seq)
        if seq > self._read_high.get(conversation, 0):
            self._read_high[conversation] = self._read_out[conversation] = seq
            self._send_reads()

    def _send_reads(self) -> None:
        if self._connection is None or not self._read_out:
            return
        cursors = [Cursor(c, s) for c, s in sorted(self._read_out.items())]
        self._read_out = {}
        self._connection.send(Frame(cmd=Command.READ, cursors=cursors))

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
                read = self.reads.message(message)
                self.events.message_received(message)
                if read:
                    # Its sender read the conversation up to it.
                    self.events.read_changed(
                        message.sender_id, message.conversation, message.seq
                    )
        if self._dirty and self._ack_call is None:
            self._ack_call = self.clock.callLater(self.ack_delay, self.flush)

    def is_new(self, message: ChatMessage) -> bool:
        """
        Whether C{message} was not shown before (its tag's seq not reached);
        its stream's position advances (to be acknowledged) either way.
        """
        conversation = message.conversation
        if not conversation or message.seq <= 0:
            return True
        if conversation == BROADCAST:
            if message.msg_id in self._broadcast_seen:
                return False
            self._broadcast_seen.append(message.msg_id)
            return True
        moved, new = self.cursors.received(conversation, message.epoch, message.seq)
        if moved:
            self._dirty.add(conversation)
        return new

    def flush(self) -> None:
        """
        Send one cumulative ACK with the cursors that moved since the last.
        """
        self._ack_call = None
        if not self._dirty or self._connection is None:
            return
        cursors = [self.cursors.cursor(c) for c in sorted(self._dirty)]
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
