"""
The IM server's logic: logins, heartbeats, sends, and in-order delivery to
the connections it holds.  The wire adapter is L{cim.server.protocol}; this
module never parses bytes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from functools import partial
from typing import Protocol as TypingProtocol

from twisted.internet.defer import (
    Deferred,
    DeferredList,
    ensureDeferred,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cim.delivery import Delivery, ILocalDelivery, IPusher
from cim.interfaces import IStore, NewMessage, NoSuchGroup, ServerAddress
from cim.limits import MAX_CLIENT_MSG_ID
from cim.message import (
    BROADCAST,
    ChatMessage,
    Command,
    Cursor,
    ErrorCode,
    Frame,
    batch_client_msg_ids,
    group_conversation,
    inbox,
)
from cim.metrics import Metrics
from cim.server import wire

#: Messages read from the store per page when replaying.
REPLAY_PAGE = 200
#: How long a gap in a conversation may stay open before it is read from
#: the store, in seconds (the missing message is usually in flight).
GAP_WAIT = 0.25


class Transport(TypingProtocol):
    """
    What the server core needs of a connection's wire adapter: it hands
    over frames (L{cim.server.wire}) and never bytes.
    """

    def send(self, frame: Frame) -> None:
        """
        Encode and write one frame.
        """

    def send_batch(self, batch: wire.Batch) -> None:
        """
        Write a batch of live messages shared by several connections.
        """

    def close(self) -> None:
        """
        Close the connection once what was written is sent.
        """


class Connection:
    """
    One client connection's state.

    @ivar delivered: per conversation, the highest seq written to this
        connection; messages are written in seq order with no gap.
    @ivar filling: conversations being read from the store; live messages
        for them wait in C{pending}.
    @ivar acked: per conversation, the highest seq the client acknowledged
        (cim clients) or, for CIM clients, that a later heartbeat proved
        was received.
    @ivar replaced: a newer login of the same user took over; closing this
        connection must not release the session.
    @ivar legacy: a CIM client (it logged in without a token): it gets only
        the frames CIM's client reads (L{wire.CIM_COMMANDS}), each message
        with its properties.
    """

    __slots__ = (
        "transport",
        "peer",
        "opened",
        "last_seen",
        "user_id",
        "user_name",
        "session_id",
        "legacy",
        "logging_in",
        "delivered",
        "filling",
        "pending",
        "acked",
        "ack_dirty",
        "replaced",
        "closed",
        "tokens",
        "outgoing",
        "sending",
    )

    def __init__(self, transport: Transport, peer: str, now: float) -> None:
        self.transport = transport
        self.peer = peer
        self.opened = now
        self.last_seen = now
        self.user_id = 0
        self.user_name = ""
        self.session_id = ""
        self.legacy = False
        self.logging_in = False
        self.delivered: dict[str, int] = {}
        self.filling: set[str] = set()
        self.pending: dict[str, dict[int, ChatMessage]] = {}
        self.acked: dict[str, int] = {}
        self.ack_dirty = False
        self.replaced = False
        self.closed = False
        self.tokens = 0.0
        self.outgoing: deque[tuple[Frame, list[str]]] = deque()
        self.sending = False

    def send(self, frame: Frame) -> None:
        """
        Send one frame, unless the connection is closed, or is a CIM client
        that could not read it.
        """
        if not self.closed and (not self.legacy or frame.cmd in wire.CIM_COMMANDS):
            self.transport.send(frame)

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
                self.transport.send(frame)
        elif batch is not None:
            self.transport.send_batch(batch)
        else:
            self.transport.send(wire.messages(cmd, messages))


@implementer(ILocalDelivery)
class IMServer:
    """
    The logic of one IM server.

    @param address: this server's address; login tokens must name it.
    @param legacy_login: accept CIM clients that send no token, for users
        whose session the route assigned to this server.
    @param rate: frames per second a connection may send (with a burst of
        twice as many); past that it gets an error and is closed.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        store: IStore,
        address: ServerAddress,
        pusher: IPusher,
        *,
        legacy_login: bool = False,
        heartbeat_timeout: float = 30.0,
        login_timeout: float = 10.0,
        max_text: int = 4096,
        rate: float = 2000.0,
    ) -> None:
        self.clock = clock
        self.store = store
        self.address = address
        self.here = str(address)
        self.legacy_login = legacy_login
        self.heartbeat_timeout = heartbeat_timeout
        self.login_timeout = login_timeout
        self.max_text = max_text
        self.rate = rate
        self.users: dict[int, Connection] = {}
        self.connections: set[Connection] = set()
        self.delivery = Delivery(store, pusher, local=self, here=self.here, clock=clock)
        self._known_users: set[int] = set()
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = clock
        self._stopping = False
        self._gaps: set[tuple[Connection, str]] = set()
        self._gap_call: IDelayedCall | None = None
        self._reads: dict[tuple[str, int], list[Deferred[list[ChatMessage]]]] = {}
        self.metrics = metrics = Metrics("cim_server")
        metrics.gauge(
            "connections", "Open client connections", lambda: len(self.connections)
        )
        metrics.gauge("users", "Logged-in users", lambda: len(self.users))
        self.m_logins = metrics.counter("logins_total", "Successful logins")
        self.m_login_failures = metrics.counter(
            "login_failures_total", "Refused logins"
        )
        self.m_in = metrics.counter("messages_in_total", "Chat messages received")
        self.m_out = metrics.counter("messages_out_total", "Chat messages written")
        self.m_errors = metrics.counter("errors_total", "Error frames sent")
        self.m_latency = metrics.histogram(
            "delivery_latency_seconds", "From store append to write, for live messages"
        )

    # Life cycle

    def start(self) -> None:
        """
        Start the heartbeat and login-deadline sweep.
        """
        interval = max(0.5, min(self.heartbeat_timeout, self.login_timeout) / 3)
        self._sweeper.start(interval, now=False).addErrback(
            lambda f: self.log.failure("The sweep died", f)
        )

    def stop(self) -> Deferred:
        """
        Tell every client to reconnect elsewhere, close them, and release
        their sessions.  @return: a Deferred firing when the releases are
        done.
        """
        self._stopping = True
        if self._sweeper.running:
            self._sweeper.stop()
        if self._gap_call is not None and self._gap_call.active():
            self._gap_call.cancel()
            self._gap_call = None
        releases = []
        for conn in list(self.connections):
            if conn.user_id and self.users.get(conn.user_id) is conn:
                releases.append(self._release(conn))
                conn.replaced = True  # released here, not again on close
            self.kick(conn, "the server is shutting down")
        return DeferredList(releases, consumeErrors=True)

    def sweep(self) -> None:
        """
        Close connections that were silent past the heartbeat timeout, or
        that did not log in in time, and save acknowledged cursors.
        """
        now = self.clock.seconds()
        idle = now - self.heartbeat_timeout
        late = now - self.login_timeout
        dirty: list[Connection] = []
        for conn in list(self.connections):
            if conn.user_id:
                if conn.last_seen < idle:
                    self.log.info(
                        "Closing {user_id}: silent for {timeout}s",
                        user_id=conn.user_id,
                        timeout=self.heartbeat_timeout,
                    )
                    self.error(
                        conn, ErrorCode.LOGIN_TIMEOUT, "heartbeat timeout", close=True
                    )
                elif conn.ack_dirty:
                    dirty.append(conn)
            elif not conn.logging_in and conn.opened < late:
                self.error(
                    conn, ErrorCode.LOGIN_TIMEOUT, "no login in time", close=True
                )
        if dirty:
            # Every connection's acknowledged cursors in one store call.
            for conn in dirty:
                conn.ack_dirty = False
            self.store.set_many_cursors(
                {conn.user_id: dict(conn.acked) for conn in dirty}
            ).addErrback(self._save_many_failed, dirty)

    def _save_many_failed(self, failure: Failure, dirty: list[Connection]) -> None:
        for conn in dirty:
            conn.ack_dirty = True
        self.log.failure(
            "Saving the cursors of {count} users failed", failure, count=len(dirty)
        )

    # Connection events (from the protocol)

    def connection_made(self, transport: Transport, peer: str) -> Connection:
        conn = Connection(transport, peer, self.clock.seconds())
        conn.tokens = 2 * self.rate
        self.connections.add(conn)
        return conn

    def connection_lost(self, conn: Connection, clean: bool = False) -> None:
        """
        C{conn} is gone; C{clean} when the client closed it in good order
        (not reset, not timed out, not closed by this server).

        A CIM client cannot acknowledge: what it was sent counts as received
        at its next heartbeat, or when it closes cleanly; after any other
        loss it is sent again at its next login.
        """
        closed_by_client = not conn.closed
        conn.closed = True
        self.connections.discard(conn)
        if not conn.user_id:
            return
        if conn.legacy and clean and closed_by_client:
            self._legacy_ack(conn)
        if self.users.get(conn.user_id) is not conn:
            self._save_acks(conn)
            return
        del self.users[conn.user_id]
        if conn.replaced:
            self._save_acks(conn)
            return
        self._release(conn).addErrback(
            lambda f: self.log.failure(
                "Releasing {user_id} failed", f, user_id=conn.user_id
            )
        )

    def _release(self, conn: Connection) -> Deferred[object]:
        """
        Save C{conn}'s acknowledged cursors, then release its session: a
        new login (which needs the session free) reads the saved cursors.
        """
        return self._save_acks(conn).addCallback(
            lambda _: self.store.release_session(conn.user_id, conn.session_id)
        )

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
        self.m_errors.inc()
        conn.send(wire.error(code, reason, client_msg_id))
        if close:
            self.close(conn)

    def close(self, conn: Connection) -> None:
        if not conn.closed:
            conn.closed = True
            conn.transport.close()

    def kick(self, conn: Connection, reason: str, redirect: str = "") -> None:
        """
        Tell C{conn} to reconnect (through the route unless C{redirect} names
        a server) and close it.
        """
        conn.send(wire.kick(reason, redirect))
        self.close(conn)

    def frame_received(self, conn: Connection, frame: Frame) -> None:
        """
        Dispatch one decoded frame.
        """
        if conn.closed:
            return
        now = self.clock.seconds()
        # Token bucket: refill at `rate` per second since the last frame, up
        # to a burst of 2*rate.
        conn.tokens = min(
            2 * self.rate, conn.tokens + (now - conn.last_seen) * self.rate
        )
        conn.last_seen = now
        conn.tokens -= 1
        if conn.tokens < 0:
            self.error(conn, ErrorCode.RATE_LIMITED, "too many frames", close=True)
            return
        cmd = frame.cmd
        if not conn.user_id:
            if cmd == Command.LOGIN_REQUEST and not conn.logging_in:
                conn.logging_in = True
                ensureDeferred(self._login(conn, frame)).addErrback(
                    self._login_crashed, conn
                )
            elif conn.logging_in and cmd == Command.PING:
                self._pong(conn)
            else:
                self.error(conn, ErrorCode.NOT_LOGGED_IN, "log in first", close=True)
            return
        if cmd == Command.PING:
            self._pong(conn)
            if conn.legacy:
                self._legacy_ack(conn)
        elif conn.legacy:
            # CIM clients chat through the route's HTTP API and cannot read
            # an acknowledgement or an error.
            self.log.info(
                "Closing CIM client {user_id}: it sent {cmd}",
                user_id=conn.user_id,
                cmd=cmd.name,
            )
            self.close(conn)
        elif cmd == Command.MESSAGE:
            self._send(conn, frame)
        elif cmd == Command.ACK:
            self._ack(conn, frame.cursors)
        else:
            self.error(
                conn,
                ErrorCode.UNKNOWN_COMMAND,
                f"unexpected command {cmd.name} from a client",
                close=True,
            )

    def _pong(self, conn: Connection) -> None:
        conn.send(wire.PONG)

    # Login

    def _login_crashed(self, failure: Failure, conn: Connection) -> None:
        self.log.failure("Login of {peer} failed", failure, peer=conn.peer)
        self.m_login_failures.inc()
        self.error(conn, ErrorCode.FAILURE, "login failed: internal error", close=True)

    def _refuse(self, conn: Connection, code: ErrorCode, reason: str) -> None:
        self.m_login_failures.inc()
        self.log.info(
            "Refused login from {peer}: {reason}", peer=conn.peer, reason=reason
        )
        self.error(conn, code, reason, close=True)

    async def _login(self, conn: Connection, frame: Frame) -> None:
        user_id = frame.request_id
        # Where CIM clients are accepted, a login without a token is one:
        # from here on it gets only what CIM's client reads (a refusal is
        # then a plain close, logged here).
        conn.legacy = self.legacy_login and not frame.token
        if user_id <= 0:
            self._refuse(
                conn, ErrorCode.INVALID_ARGUMENT, "login needs requestId = userId"
            )
            return
        if self._stopping:
            self.kick(conn, "the server is shutting down")
            return
        if frame.token:
            info = await self.store.verify_token(frame.token)
            if info is None:
                self._refuse(conn, ErrorCode.BAD_TOKEN, "invalid or expired token")
                return
            if info.user_id != user_id:
                self._refuse(conn, ErrorCode.BAD_TOKEN, "the token is for another user")
                return
            if info.server != self.here:
                self._refuse(
                    conn, ErrorCode.BAD_TOKEN, "the token is for another server"
                )
                return
            session_id = info.session_id
        elif self.legacy_login:
            session_id = ""
        else:
            self._refuse(conn, ErrorCode.BAD_TOKEN, "a login token is required")
            return
        legacy = conn.legacy
        session = await self.store.get_session(user_id)
        if session is None or (not legacy and session.session_id != session_id):
            self._refuse(
                conn, ErrorCode.BAD_TOKEN, "no such session: log in through the route"
            )
            return
        if session.server != self.here:
            self._refuse(
                conn, ErrorCode.BAD_TOKEN, "the session belongs to another server"
            )
            return
        if legacy and session.user_name != frame.req_msg:
            self._refuse(
                conn, ErrorCode.BAD_TOKEN, "userName does not match the session"
            )
            return
        if not await self.store.activate_session(user_id, session.session_id):
            self._refuse(
                conn, ErrorCode.BAD_TOKEN, "the session was replaced or expired"
            )
            return
        # Both reads at once.
        reading_cursors = self.store.get_cursors(user_id)
        reading_groups = self.store.user_groups(user_id)
        try:
            stored = await reading_cursors
        finally:
            groups = await reading_groups
        if conn.closed:
            # The client went away while we were checking; it still holds
            # the session, so release it.
            await self.store.release_session(user_id, session.session_id)
            return
        old = self.users.get(user_id)
        if old is not None:
            old.replaced = True
            self.kick(old, "logged in again elsewhere")
        conn.user_id = user_id
        conn.user_name = session.user_name
        conn.session_id = session.session_id
        conn.logging_in = False
        # Resume each conversation from the client's cursor, or the stored
        # one; live messages wait in `pending` until the replay caught up.
        cursors = {} if legacy else {c.conversation: c.seq for c in frame.cursors}
        conversations = [inbox(user_id)] + [group_conversation(g) for g in groups]
        for conversation in conversations:
            conn.delivered[conversation] = cursors.get(
                conversation, stored.get(conversation, 0)
            )
            conn.acked[conversation] = stored.get(conversation, 0)
            conn.filling.add(conversation)
        # Visible to deliveries from here on.  A message stored before this
        # point reached the store before the replay below reads it.
        self.users[user_id] = conn
        self._known_users.add(user_id)
        self.m_logins.inc()
        self.log.info(
            "{user_id} ({user_name}) logged in from {peer}{legacy}",
            user_id=user_id,
            user_name=session.user_name,
            peer=conn.peer,
            legacy=" (CIM client)" if legacy else "",
        )
        if not legacy:
            conn.send(
                wire.login_response(
                    user_id, session.user_name, int(self.clock.seconds() * 1000)
                )
            )
        for conversation in conversations:
            await self._fill(conn, conversation, Command.OFFLINE)

    def _fill_in_background(self, conn: Connection, conversation: str) -> None:
        conn.filling.add(conversation)
        ensureDeferred(self._fill(conn, conversation, Command.MESSAGE)).addErrback(
            self._fill_failed, conn, conversation
        )

    async def _adopt(self, conn: Connection, conversation: str) -> None:
        try:
            stored = await self.store.get_cursors(conn.user_id)
        except BaseException:
            conn.filling.discard(conversation)
            raise
        start = stored.get(conversation, 0)
        conn.delivered.setdefault(conversation, start)
        conn.acked.setdefault(conversation, start)
        await self._fill(conn, conversation, Command.MESSAGE)

    def _fill_failed(
        self, failure: Failure, conn: Connection, conversation: str
    ) -> None:
        conn.filling.discard(conversation)
        self.log.failure(
            "Reading {conversation} for {user_id} failed; reconnecting it",
            failure,
            conversation=conversation,
            user_id=conn.user_id,
        )
        # The client will log in again and resume from its cursors.
        self.kick(conn, "temporary store failure")

    async def _fill(self, conn: Connection, conversation: str, cmd: Command) -> None:
        """
        Write the stored messages of C{conversation} after what C{conn} has,
        then whatever arrived live meanwhile, in order, without duplicates.
        """
        try:
            while not conn.closed:
                after = conn.delivered[conversation]
                page = await self._read(conversation, after)
                if conn.closed:
                    return
                fresh = [m for m in page if m.seq > conn.delivered[conversation]]
                if fresh:
                    self._write(conn, fresh, cmd)
                    conn.delivered[conversation] = fresh[-1].seq
                if len(page) == REPLAY_PAGE:
                    continue
                # Caught up with the store: drain what arrived live.
                ready = self._take_pending(
                    conn, conversation, conn.delivered[conversation]
                )
                if ready:
                    self._write(conn, ready, Command.MESSAGE)
                    conn.delivered[conversation] = ready[-1].seq
                pending = conn.pending.get(conversation)
                if not pending:
                    return
                # Still a gap (a message the store has not shown us yet, or
                # that retention dropped); go round again.
                position = conn.delivered[conversation]
                if not page and not ready:
                    # The store has nothing after our position: the gap can
                    # only be messages lost to retention; skip over it.
                    first = min(pending)
                    self.log.warn(
                        "Skipping {conversation} {start}..{end} (not in the store)",
                        conversation=conversation,
                        start=position + 1,
                        end=first - 1,
                    )
                    conn.delivered[conversation] = first - 1
        finally:
            conn.filling.discard(conversation)

    def _write(
        self, conn: Connection, messages: list[ChatMessage], cmd: Command
    ) -> None:
        conn.deliver(messages, cmd)
        self.m_out.inc(len(messages))

    # Delivery to connections here

    def deliver_local(
        self, messages: Sequence[ChatMessage], user_ids: Sequence[int]
    ) -> list[int]:
        """
        Write C{messages} (one batch, in seq order) to those of C{user_ids}
        connected here, encoding them once for all.  @return: the others.
        """
        missing = []
        batch = wire.Batch(messages)
        now_ms = self.clock.seconds() * 1000
        for uid in user_ids:
            conn = self.users.get(uid)
            if conn is None or conn.closed:
                missing.append(uid)
                continue
            self._offer(conn, messages, batch)
        if messages:
            self.m_latency.observe(max(0.0, (now_ms - messages[-1].timestamp) / 1000))
        return missing

    def _offer(
        self, conn: Connection, messages: Sequence[ChatMessage], batch: wire.Batch
    ) -> None:
        # Fast path: every message is the next one of its conversation.
        delivered = conn.delivered
        in_order = True
        positions: dict[str, int] = {}
        for m in messages:
            conversation = m.conversation
            if conversation == BROADCAST:
                continue
            last = positions.get(conversation, delivered.get(conversation))
            if (
                last is None
                or m.seq != last + 1
                or conversation in conn.filling
                or conversation in conn.pending
            ):
                in_order = False
                break
            positions[conversation] = m.seq
        if in_order:
            delivered.update(positions)
            conn.deliver(messages, Command.MESSAGE, batch)
            self.m_out.inc(len(messages))
            return
        for m in messages:
            self._offer_one(conn, m)

    def _offer_one(self, conn: Connection, m: ChatMessage) -> None:
        conversation = m.conversation
        if conversation == BROADCAST:
            self._write(conn, [m], Command.MESSAGE)
            return
        last = conn.delivered.get(conversation)
        if last is None:
            # A conversation this connection has not seen (a group joined
            # since login): hold the message, and start from the user's
            # stored cursor (the route records it at the join).
            conn.pending.setdefault(conversation, {})[m.seq] = m
            if conversation not in conn.filling:
                conn.filling.add(conversation)
                ensureDeferred(self._adopt(conn, conversation)).addErrback(
                    self._fill_failed, conn, conversation
                )
            return
        if conversation in conn.filling:
            conn.pending.setdefault(conversation, {})[m.seq] = m
        elif m.seq <= last:
            return  # a duplicate
        elif m.seq == last + 1:
            # If this closed a gap, what waited behind it goes too.
            ready = [m, *self._take_pending(conn, conversation, m.seq)]
            self._write(conn, ready, Command.MESSAGE)
            conn.delivered[conversation] = ready[-1].seq
        else:
            # A gap: an earlier message is usually still on its way (pushed
            # from another server).  Hold this one; if the gap is still
            # open after GAP_WAIT, read it from the store.
            conn.pending.setdefault(conversation, {})[m.seq] = m
            self._gaps.add((conn, conversation))
            if self._gap_call is None:
                self._gap_call = self.clock.callLater(GAP_WAIT, self._close_gaps)

    def _take_pending(
        self, conn: Connection, conversation: str, position: int
    ) -> list[ChatMessage]:
        """
        Take from C{conn}'s held messages of C{conversation} those that
        follow C{position} without a gap, in order, and drop any at or below
        where they end (duplicates).
        """
        pending = conn.pending.get(conversation)
        if not pending:
            return []
        ready = []
        while position + 1 in pending:
            position += 1
            ready.append(pending.pop(position))
        for seq in [seq for seq in pending if seq <= position]:
            del pending[seq]
        if not pending:
            del conn.pending[conversation]
        return ready

    def _close_gaps(self) -> None:
        """
        Fill from the store the gaps that the live messages did not close.
        """
        self._gap_call = None
        gaps, self._gaps = self._gaps, set()
        for conn, conversation in gaps:
            if (
                not conn.closed
                and conn.pending.get(conversation)
                and conversation not in conn.filling
            ):
                self._fill_in_background(conn, conversation)

    def _read(self, conversation: str, after: int) -> Deferred[list[ChatMessage]]:
        """
        Read a page of C{conversation} after C{after}, sharing one store
        read among the connections that want the same page at once (a
        group's members catching up together).
        """
        waiter: Deferred[list[ChatMessage]] = Deferred()
        key = (conversation, after)
        waiters = self._reads.get(key)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._reads[key] = [waiter]
        self.store.read(conversation, after, REPLAY_PAGE).addBoth(self._read_done, key)
        return waiter

    def _read_done(self, result: object, key: tuple[str, int]) -> None:
        for waiter in self._reads.pop(key):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)  # type: ignore[arg-type]

    # Acknowledgements

    def _ack(self, conn: Connection, cursors: Sequence[Cursor]) -> None:
        for cursor in cursors:
            if cursor.seq > conn.acked.get(cursor.conversation, 0):
                conn.acked[cursor.conversation] = cursor.seq
                conn.ack_dirty = True

    def _legacy_ack(self, conn: Connection) -> None:
        """
        Count what was written to CIM client C{conn} as received (it cannot
        acknowledge; see L{connection_lost} for when this is done).
        """
        for conversation, seq in conn.delivered.items():
            if seq > conn.acked.get(conversation, 0):
                conn.acked[conversation] = seq
                conn.ack_dirty = True

    def _save_acks(self, conn: Connection) -> Deferred[None]:
        """
        Save C{conn}'s acknowledged cursors if they changed.  @return: a
        Deferred firing (never failing: a failure is logged) when saved.
        """
        if not conn.ack_dirty:
            return succeed(None)
        conn.ack_dirty = False
        d: Deferred[None] = self.store.set_cursors(conn.user_id, dict(conn.acked))
        return d.addErrback(self._save_acks_failed, conn)

    def _save_acks_failed(self, failure: Failure, conn: Connection) -> None:
        conn.ack_dirty = True
        self.log.failure(
            "Saving cursors of {user_id} failed", failure, user_id=conn.user_id
        )

    # Sending

    def _send(self, conn: Connection, frame: Frame) -> None:
        texts = list(frame.batch) if frame.batch else [frame.req_msg]
        cmid = frame.client_msg_id
        if len(cmid) > MAX_CLIENT_MSG_ID:
            self._send_error(
                conn, frame, ErrorCode.INVALID_ARGUMENT, "clientMsgId too long"
            )
            return
        if not all(texts):
            self._send_error(conn, frame, ErrorCode.INVALID_ARGUMENT, "empty message")
            return
        if any(len(t) > self.max_text for t in texts):
            self._send_error(
                conn,
                frame,
                ErrorCode.INVALID_ARGUMENT,
                f"message over {self.max_text} characters",
            )
            return
        if bool(frame.receive_user_id > 0) == bool(frame.group_id):
            self._send_error(
                conn,
                frame,
                ErrorCode.INVALID_ARGUMENT,
                "a message needs receiveUserId or groupId",
            )
            return
        self.m_in.inc(len(texts))
        receiver = frame.receive_user_id
        if not conn.sending and receiver in self._known_users:
            # The common case, with nothing to look up: straight to the
            # appender, without a coroutine.
            self._store(conn, frame, self._private(conn, frame, texts))
            return
        # Sends of one connection are stored in the order they were sent:
        # they queue here, and each is handed to the (FIFO) appender only
        # after the previous one was.
        conn.outgoing.append((frame, texts))
        if not conn.sending:
            conn.sending = True
            ensureDeferred(self._send_loop(conn)).addErrback(
                self._send_loop_crashed, conn
            )

    async def _send_loop(self, conn: Connection) -> None:
        try:
            while conn.outgoing and not conn.closed:
                frame, texts = conn.outgoing.popleft()
                try:
                    prepared = await self._prepare(conn, frame, texts)
                except Exception:
                    self._send_failed(Failure(), conn, frame)
                    continue
                if conn.closed:
                    # Closed while we checked (after a store failure, see
                    # _send_failed): the client sends it again.
                    break
                if prepared is not None:
                    self._store(conn, frame, prepared)
        finally:
            conn.sending = False

    def _send_loop_crashed(self, failure: Failure, conn: Connection) -> None:
        self.log.failure(
            "The send loop of {user_id} crashed", failure, user_id=conn.user_id
        )

    async def _prepare(
        self, conn: Connection, frame: Frame, texts: list[str]
    ) -> tuple[list[NewMessage], list[int]] | None:
        """
        Check a send; @return: the messages to store and their recipients,
        or C{None} after telling the sender what is wrong.
        """
        if frame.receive_user_id:
            receiver = frame.receive_user_id
            if receiver not in self._known_users:
                if await self.store.get_account(receiver) is None:
                    self._send_error(
                        conn, frame, ErrorCode.INVALID_ARGUMENT, f"no user {receiver}"
                    )
                    return None
                self._known_users.add(receiver)
            return self._private(conn, frame, texts)
        group_id = frame.group_id
        try:
            members = await self.store.group_members(group_id)
        except NoSuchGroup:
            self._send_error(
                conn, frame, ErrorCode.INVALID_ARGUMENT, f"no group {group_id}"
            )
            return None
        if conn.user_id not in members:
            self._send_error(
                conn, frame, ErrorCode.NOT_A_MEMBER, f"not a member of {group_id}"
            )
            return None
        messages = self._new_messages(
            conn,
            group_conversation(group_id),
            texts,
            frame.client_msg_id,
            group_id=group_id,
        )
        # The sender gets its own group messages too (in order, like the
        # others), so that its view of the group has no holes.
        return messages, members

    def _private(
        self, conn: Connection, frame: Frame, texts: list[str]
    ) -> tuple[list[NewMessage], list[int]]:
        receiver = frame.receive_user_id
        messages = self._new_messages(
            conn, inbox(receiver), texts, frame.client_msg_id, receive_user_id=receiver
        )
        return messages, [receiver]

    def _store(
        self,
        conn: Connection,
        frame: Frame,
        prepared: tuple[list[NewMessage], list[int]],
    ) -> None:
        """
        Hand a checked send to the appender; L{_appended} acknowledges and
        delivers it once stored.
        """
        messages, recipients = prepared
        self.delivery.append_callback(
            messages, partial(self._appended, conn, frame, recipients)
        )

    def _appended(
        self,
        conn: Connection,
        frame: Frame,
        recipients: list[int],
        stored: list[ChatMessage] | Failure,
    ) -> None:
        if isinstance(stored, Failure):
            self._send_failed(stored, conn, frame)
            return
        self._acknowledge(conn, frame, stored)
        self.delivery.deliver(stored, recipients)

    def _send_error(
        self, conn: Connection, frame: Frame, code: ErrorCode, reason: str
    ) -> None:
        self.error(conn, code, reason, client_msg_id=frame.client_msg_id)

    def _send_failed(self, failure: Failure, conn: Connection, frame: Frame) -> None:
        self.log.failure("Send from {user_id} failed", failure, user_id=conn.user_id)
        self._send_error(
            conn, frame, ErrorCode.STORE_ERROR, "not stored; send it again"
        )
        # Store nothing more of this connection: its later sends must not be
        # stored before this one (the appender fails those queued behind a
        # failed batch).  The client reconnects and sends again, in order,
        # everything not acknowledged.
        self.kick(conn, "temporary store failure")

    def _new_messages(
        self,
        conn: Connection,
        conversation: str,
        texts: list[str],
        cmid: str,
        **target: object,
    ) -> list[NewMessage]:
        ids = batch_client_msg_ids(cmid, len(texts))
        return [
            NewMessage(
                conversation=conversation,
                sender_id=conn.user_id,
                sender_name=conn.user_name,
                text=text,
                client_msg_id=ids[i],
                **target,  # type: ignore[arg-type]
            )
            for i, text in enumerate(texts)
        ]

    def _acknowledge(
        self, conn: Connection, frame: Frame, stored: list[ChatMessage]
    ) -> None:
        conn.send(wire.acknowledgement(frame.client_msg_id, stored))

    # Push API operations

    def send_raw(self, user_id: int, frame: Frame) -> bool:
        """
        Write C{frame} to C{user_id}'s connection (CIM's C{/sendMsg}),
        completed with the receiver's properties for a CIM client.

        @return: whether the user is connected here.
        @raise ValueError: a CIM client could not read C{frame}.
        """
        conn = self.users.get(user_id)
        if conn is None or conn.closed:
            return False
        if conn.legacy:
            frame = wire.raw_for_cim_client(frame, user_id)
        conn.send(frame)
        return True

    def kick_user(
        self, user_id: int, session_id: str, reason: str, logged_off: bool = False
    ) -> Deferred[bool]:
        """
        Close C{user_id}'s connection if it belongs to C{session_id} (or to
        any session when C{session_id} is empty).

        @param logged_off: the user logged off (CIM's C{/offLine}): what a
            CIM client was sent counts as received.
        @return: fires with whether there was such a connection, once its
            acknowledged cursors are saved.
        """
        conn = self.users.get(user_id)
        if conn is None or (session_id and conn.session_id != session_id):
            return succeed(False)
        conn.replaced = True
        if logged_off and conn.legacy:
            self._legacy_ack(conn)
        saved = self._save_acks(conn)
        self.kick(conn, reason)
        return saved.addCallback(lambda _: True)

    def resync(self, user_id: int) -> bool:
        """
        Send C{user_id} whatever the store holds that it has not got yet.
        """
        conn = self.users.get(user_id)
        if conn is None:
            return False
        for conversation in list(conn.delivered):
            if conversation not in conn.filling:
                self._fill_in_background(conn, conversation)
        return True
