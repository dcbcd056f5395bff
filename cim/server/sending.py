"""
L{Sender}: the chat messages that clients send over their connection.

A send is checked (its ids, texts and limits from L{cim.limits}, its
receiver or group), handed to the appender of L{cim.delivery.Delivery},
acknowledged to its sender once stored (L{wire.acknowledgement}) and then
delivered: a private send to the conversation of the two users
(L{cim.message.pair_conversation}) and to every device of both, a group
send to every device of the members.  One connection's sends are stored in the order it sent them:
the common private send whose receiver is known goes straight to the
(FIFO) appender; any other waits in the connection's queue, which one
coroutine at a time checks and hands over in order.

A send over its sender's quota for the conversation
(L{cim.interfaces.QuotaExceeded}) is refused with a rate-limit error.
When the store fails a send, the sender gets an error about it and is
kicked: nothing more of that connection is stored, so that no later send
is stored before the failed one, which the client sends again after it
reconnects.
"""

from __future__ import annotations

from collections import deque
from functools import partial

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.delivery import Delivery
from cim.interfaces import IStore, NewMessage, NoSuchGroup, QuotaExceeded
from cim.limits import MAX_BATCH, MAX_CLIENT_MSG_ID
from cim.message import (
    ChatMessage,
    ErrorCode,
    Frame,
    group_conversation,
    pair_conversation,
)
from cim.metrics import Counter
from cim.server import wire
from cim.server.connection import Connection, ConnectionControl

#: A checked send: the messages to store and their recipients.
Prepared = tuple[list[NewMessage], list[int]]


class Sender:
    """
    Checks, orders, stores and delivers the sends of every connection of
    one server.

    @param received: counts the chat messages received.
    @param max_text: the longest text of a message, in characters.
    @param max_batch: the most texts of one send.
    @ivar known_users: users known to exist (a private send to one needs
        no account lookup).
    """

    log = Logger()

    def __init__(
        self,
        store: IStore,
        delivery: Delivery,
        control: ConnectionControl,
        received: Counter,
        *,
        max_text: int,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.store = store
        self.delivery = delivery
        self.control = control
        self.received = received
        self.max_text = max_text
        self.max_batch = max_batch
        self.known_users: set[int] = set()
        #: The sends waiting, for each connection whose send loop runs.
        self._queues: dict[Connection, deque[tuple[Frame, list[str]]]] = {}

    def send(self, conn: Connection, frame: Frame) -> None:
        """
        Check, store, acknowledge and deliver a C{MESSAGE} from C{conn}.
        """
        texts = list(frame.batch) if frame.batch else [frame.req_msg]
        if len(texts) > self.max_batch:
            self._refuse(
                conn,
                frame,
                ErrorCode.INVALID_ARGUMENT,
                f"a batch holds at most {self.max_batch} texts (got {len(texts)})",
            )
            return
        if len(frame.client_msg_id) > MAX_CLIENT_MSG_ID:
            self._refuse(
                conn, frame, ErrorCode.INVALID_ARGUMENT, "clientMsgId too long"
            )
            return
        if not all(texts):
            self._refuse(conn, frame, ErrorCode.INVALID_ARGUMENT, "empty message")
            return
        if any(len(t) > self.max_text for t in texts):
            self._refuse(
                conn,
                frame,
                ErrorCode.INVALID_ARGUMENT,
                f"message over {self.max_text} characters",
            )
            return
        if bool(frame.receive_user_id > 0) == bool(frame.group_id):
            self._refuse(
                conn,
                frame,
                ErrorCode.INVALID_ARGUMENT,
                "a message needs receiveUserId or groupId",
            )
            return
        self.received.inc(len(texts))
        queue = self._queues.get(conn)
        if queue is None and frame.receive_user_id in self.known_users:
            # The common case, with nothing to look up: straight to the
            # appender, without a coroutine.
            self._store(conn, frame, self._private(conn, frame, texts))
            return
        # Sends of one connection are stored in the order they were sent:
        # they queue here, and each is handed to the (FIFO) appender only
        # after the previous one was.
        if queue is not None:
            queue.append((frame, texts))
            return
        queue = self._queues[conn] = deque([(frame, texts)])
        ensureDeferred(self._send_loop(conn, queue)).addErrback(
            self._send_loop_crashed, conn
        )

    async def _send_loop(
        self, conn: Connection, queue: deque[tuple[Frame, list[str]]]
    ) -> None:
        try:
            while queue and not conn.closed:
                frame, texts = queue.popleft()
                try:
                    prepared = await self._prepare(conn, frame, texts)
                except Exception:
                    self._failed(Failure(), conn, frame)
                    continue
                if conn.closed:
                    # Closed while we checked (after a store failure, see
                    # _failed): the client sends it again.
                    break
                if prepared is not None:
                    self._store(conn, frame, prepared)
        finally:
            del self._queues[conn]

    def _send_loop_crashed(self, failure: Failure, conn: Connection) -> None:
        self.log.failure(
            "The send loop of {user_id} crashed", failure, user_id=conn.user_id
        )

    async def _prepare(
        self, conn: Connection, frame: Frame, texts: list[str]
    ) -> Prepared | None:
        """
        Check a send's receiver or group; @return: the messages to store
        and their recipients, or C{None} after telling the sender what is
        wrong.
        """
        if frame.receive_user_id:
            receiver = frame.receive_user_id
            if receiver not in self.known_users:
                if await self.store.get_account(receiver) is None:
                    self._refuse(
                        conn, frame, ErrorCode.INVALID_ARGUMENT, f"no user {receiver}"
                    )
                    return None
                self.known_users.add(receiver)
            return self._private(conn, frame, texts)
        group_id = frame.group_id
        try:
            members = await self.store.group_members(group_id)
        except NoSuchGroup:
            self._refuse(
                conn, frame, ErrorCode.INVALID_ARGUMENT, f"no group {group_id}"
            )
            return None
        if conn.user_id not in members:
            self._refuse(
                conn, frame, ErrorCode.NOT_A_MEMBER, f"not a member of {group_id}"
            )
            return None
        messages = self.new_messages(
            conn,
            group_conversation(group_id),
            texts,
            frame.client_msg_id,
            group_id=group_id,
        )
        # The sender gets its own group messages too (in order, like the
        # others), so that its view of the group has no holes.
        return messages, members

    def _private(self, conn: Connection, frame: Frame, texts: list[str]) -> Prepared:
        """
        A private send goes to the conversation of the two users, and to
        every device of both (the sending one too: its stream of the
        conversation stays gap-free).
        """
        sender = conn.user_id
        receiver = frame.receive_user_id
        messages = self.new_messages(
            conn,
            pair_conversation(sender, receiver),
            texts,
            frame.client_msg_id,
            receive_user_id=receiver,
        )
        return messages, [sender] if receiver == sender else [sender, receiver]

    def new_messages(
        self,
        conn: Connection,
        conversation: str,
        texts: list[str],
        cmid: str,
        *,
        receive_user_id: int = 0,
        group_id: str = "",
    ) -> list[NewMessage]:
        """
        The messages to store for C{texts} sent by C{conn}'s user, as one
        send C{cmid}, to C{receive_user_id} or C{group_id}.
        """
        return NewMessage.of_send(
            conversation,
            conn.user_id,
            conn.user_name,
            texts,
            cmid,
            receive_user_id=receive_user_id,
            group_id=group_id,
        )

    def _store(self, conn: Connection, frame: Frame, prepared: Prepared) -> None:
        """
        Hand a checked send to the appender; L{_appended} acknowledges and
        delivers it once stored.
        """
        messages, recipients = prepared
        delivery = self.delivery
        if delivery.fans_out(messages, recipients):
            # The store publishes them to every server, in its order.
            delivery.append_fed(
                messages, recipients, partial(self._appended, conn, frame, None)
            )
            return
        delivery.append_callback(
            messages, partial(self._appended, conn, frame, recipients)
        )

    def _appended(
        self,
        conn: Connection,
        frame: Frame,
        recipients: list[int] | None,
        stored: list[ChatMessage] | Failure,
    ) -> None:
        # recipients: None when the store's group feed delivers them.
        if isinstance(stored, Failure):
            if isinstance(stored.value, QuotaExceeded):
                # Not a store failure: this send is refused for good (the
                # sender's later sends to other conversations go on).  The
                # texts of it stored before the quota ran out are delivered
                # all the same (they hold seqs: the streams need them).
                self._refuse(conn, frame, ErrorCode.RATE_LIMITED, stored.value.message)
                kept = [m for m in stored.value.results if m is not None]
                if kept and recipients is not None:
                    self.delivery.send_out(kept, recipients)
                return
            self._failed(stored, conn, frame)
            return
        conn.send(wire.acknowledgement(frame.client_msg_id, stored))
        if recipients is not None:
            self.delivery.send_out(stored, recipients)

    def _refuse(
        self, conn: Connection, frame: Frame, code: ErrorCode, reason: str
    ) -> None:
        self.control.error(conn, code, reason, client_msg_id=frame.client_msg_id)

    def _failed(self, failure: Failure, conn: Connection, frame: Frame) -> None:
        self.log.failure("Send from {user_id} failed", failure, user_id=conn.user_id)
        self._refuse(
            conn,
            frame,
            ErrorCode.STORE_ERROR,
            "may not be stored; send it again (it is never stored twice)",
        )
        # Store nothing more of this connection: its later sends must not be
        # stored before this one (the appender fails those queued behind a
        # failed batch).  The client reconnects and sends again, in order,
        # everything not acknowledged.
        self.control.kick(conn, "temporary store failure")
