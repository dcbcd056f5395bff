"""
The IM server: the connections it holds, from login to close, and the
frames they send, dispatched to the parts that handle them:

  - L{cim.server.login}: whether a login may bind its user;
  - L{cim.server.sending}: the chat messages a client sends;
  - L{cim.server.stream}: in-order delivery and replay to each connection;
  - L{cim.server.wire}: every frame the server sends.

This module owns the life cycle (start, sweep, stop), the connections of
each user's devices (one per device: a login of the same device replaces
the older connection), the rate limit, the acknowledged cursors (per
device), the read positions that clients report (READ frames) and the push
API's operations.  The wire adapter is L{cim.server.protocol} (an
L{IClientLink}); nothing here touches bytes.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cim.delivery import Delivery, ILocalDelivery, IPusher, PushRetry
from cim.interfaces import HeldSession, IStore, Renewal, ServerAddress, StoreError
from cim.limits import (
    BROADCAST_FROM,
    MAX_BATCH,
    SESSION_CACHE,
    SESSION_TTL,
    STORE_BATCH,
)
from cim.loglines import Lines
from cim.message import (
    KICK_REPLACED,
    ChatMessage,
    Command,
    Cursor,
    ErrorCode,
    Frame,
    Position,
    peer_of,
)
from cim.metrics import Metrics
from cim.server import wire
from cim.server.connection import Connection
from cim.server.link import IClientLink
from cim.server.login import (
    Authenticator,
    Grant,
    Refusal,
    Resumption,
    resume,
    resume_from,
)
from cim.server.sending import Sender
from cim.server.stream import Stream, Streams

_T = TypeVar("_T")

__all__ = ["Connection", "IMServer"]

#: Seconds over which the failed releases of closed connections' sessions
#: are reported in one line (L{FailureBurst}).
RELEASE_REPORT_WINDOW = 10.0


class FailureBurst:
    """
    Reports store failures of one operation that come in bursts (a store
    going away fails the release of every connection closing meanwhile):
    the first at once, then, C{window} seconds later (or at L{flush}: a
    daemon's stop, L{IMServer.report_failures}), how many more there
    were; one line each, without a traceback (a store error is not a bug
    in this process).

    @param what: the operation, as the start of a sentence.
    @param then: what becomes of what the operation did not do.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        what: str,
        then: str,
        window: float = RELEASE_REPORT_WINDOW,
    ) -> None:
        self.clock = clock
        self.what = what
        self.then = then
        self.window = window
        self.more = 0
        self._last = ""
        self._timer: IDelayedCall | None = None

    def failed(self, error: str, subject: object) -> None:
        """
        The operation failed with C{error}, for C{subject} (a user id).
        """
        if self._timer is None:
            self.log.warn(
                "{what} failed ({subject} first): {error}; {then}",
                what=self.what,
                subject=subject,
                error=error,
                then=self.then,
            )
            self._timer = self.clock.callLater(self.window, self.flush)
        else:
            self.more += 1
            self._last = error

    def flush(self) -> None:
        """
        Report how many more failed since the line of the first, and start
        afresh.
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.more:
            self.log.warn(
                "{what} failed {count} more times (the last: {error})",
                what=self.what,
                count=self.more,
                error=self._last,
            )
        self.more = 0


@implementer(ILocalDelivery)
class IMServer:
    """
    The logic of one IM server.

    @param address: this server's address; login tokens must name it.
    @param legacy_login: accept CIM clients that send no token, for users
        whose session the route assigned to this server.
    @param rate: messages per second a connection may send (each text of
        a batch counts, any other frame counts one), with a burst of twice
        as many; past that it gets an error and is closed.
    @param max_batch: the most texts one send may carry.
    @param session_ttl: how long the sessions of its users live in the
        store unless renewed; the sweep renews them every third of it.
    @param push_retry: how pushes to other servers that failed are sent
        again (L{cim.delivery.Delivery}); C{rng}: their jitter.
    @param session_cache: how many users' sessions the deliveries keep
        (L{cim.sessioncache}; 0: none).
    @param store_batch: the most devices one store call renews the
        sessions of, or saves the cursors of (L{STORE_BATCH}): more are
        renewed or saved in calls made one after another, so that no call
        holds the store long.
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
        max_batch: int = MAX_BATCH,
        session_ttl: float = SESSION_TTL,
        push_retry: PushRetry | None = None,
        rng: random.Random | None = None,
        broadcast_from: int | None = BROADCAST_FROM,
        session_cache: int = SESSION_CACHE,
        store_batch: int = STORE_BATCH,
    ) -> None:
        if store_batch < 1:
            raise ValueError(f"store_batch must be at least 1, not {store_batch}")
        self.clock = clock
        self.store_batch = store_batch
        self.store = store
        self.address = address
        self.here = str(address)
        self.legacy_login = legacy_login
        self.heartbeat_timeout = heartbeat_timeout
        self.login_timeout = login_timeout
        self.max_text = max_text
        self.rate = rate
        self.session_ttl = session_ttl
        self._renewed = clock.seconds()
        self._renewing = False
        self._saving = False
        #: user id -> the logged-in connection of one of its devices here,
        #: which links to the next one (L{Connection.next_device}): most
        #: users have one device, and a dictionary per user would cost
        #: more than its connection's own facts.
        self.users: dict[int, Connection] = {}
        self.connections: set[Connection] = set()
        self.metrics = metrics = Metrics("cim_server")
        self.delivery = Delivery(
            store,
            pusher,
            local=self,
            here=self.here,
            clock=clock,
            retry=push_retry,
            rng=rng,
            metrics=metrics,
            broadcast_from=broadcast_from,
            session_cache=session_cache,
        )
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = clock
        self._stopping = False
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
        self.m_overflows = metrics.counter(
            "output_overflows_total",
            "Connections dropped for leaving more than the output limit unread",
        )
        self.m_acks_ignored = metrics.counter(
            "acks_ignored_total",
            "Acknowledged cursors ignored: not a conversation of the connection, "
            "not of its epoch, or beyond what it was sent",
        )
        self.m_reads_ignored = metrics.counter(
            "reads_ignored_total",
            "Read positions ignored: not a conversation of the connection, "
            "or beyond what it was sent",
        )
        self.m_latency = metrics.histogram(
            "delivery_latency_seconds", "From store append to write, for live messages"
        )
        self.authenticator = Authenticator(store, self.here, legacy_login, session_ttl)
        self.sender = Sender(
            store,
            self.delivery,
            self,
            self.m_in,
            max_text=max_text,
            max_batch=max_batch,
        )
        self.streams = Streams(clock, store, self, self.m_out)
        #: Connections logging in when everything was resynced
        #: (L{resync_all}): resynced once logged in.
        self._resync_after_login: set[Connection] = set()
        #: user id -> how many logins of its devices wait for the store's
        #: answer to their token (L{IStore.token_login}, which read where
        #: they resume along with the activation).
        self._activating: dict[int, int] = {}
        #: The users of C{_activating} that were delivered to (or resynced)
        #: meanwhile: what their logins read may predate it, so they read
        #: again once bound (L{_login}).
        self._missed: set[int] = set()
        #: The log of logins (L{cim.loglines}).
        self._login_lines = Lines(self.log, clock)
        self._release_failures = FailureBurst(
            clock,
            "Releasing the sessions of closed connections",
            f"those sessions end in {session_ttl:g} s, or when this server "
            "starts again",
        )

    # Life cycle

    def start(self) -> None:
        """
        Start the heartbeat and login-deadline sweep.
        """
        interval = max(
            0.5, min(self.heartbeat_timeout, self.login_timeout, self.session_ttl) / 3
        )
        self._sweeper.start(interval, now=False).addErrback(
            lambda f: self.log.failure("The sweep died", f)
        )

    def stop(self) -> Deferred:
        """
        Tell every client to reconnect elsewhere, close them, release
        their sessions, and give up the failed pushes kept to be sent again.
        @return: a Deferred firing when the releases are done.
        """
        self._stopping = True
        self._login_lines.stop()
        if self._sweeper.running:
            self._sweeper.stop()
        self.streams.stop()
        self.delivery.stop()
        releases = []
        for conn in list(self.connections):
            if conn.user_id and self.connection(conn.user_id, conn.device) is conn:
                releases.append(self._release(conn))
                conn.replaced = True  # released here, not again on close
            self.kick(conn, "the server is shutting down")
        return DeferredList(releases, consumeErrors=True)

    def report_failures(self) -> None:
        """
        Report the failures counted and not reported yet (L{FailureBurst}):
        the last thing a stopping daemon does, as its reactor stops before
        their report is due.
        """
        self._release_failures.flush()

    def sweep(self) -> None:
        """
        Close connections that were silent past the heartbeat timeout, or
        that did not log in in time, save acknowledged cursors, and renew
        the sessions (every third of their time to live).
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
        if dirty and not self._saving:
            self._saving = True
            ensureDeferred(self._save_cursors(dirty)).addErrback(
                self._batches_failed, "saving cursors"
            )
        if now - self._renewed >= self.session_ttl / 3 and not self._renewing:
            self._renew(now)

    def _batches(self, items: Sequence[_T]) -> Iterator[Sequence[_T]]:
        """
        C{items} by C{store_batch}, for store calls made one after another.
        """
        for start in range(0, len(items), self.store_batch):
            yield items[start : start + self.store_batch]

    def _batches_failed(self, failure: Failure, what: str) -> None:
        self.log.failure("The sweep's {what} failed", failure, what=what)

    async def _save_cursors(self, dirty: list[Connection]) -> None:
        """
        Save the cursors that the C{dirty} connections raised: at most
        L{store_batch} devices a store call, each call made once the one
        before answered (a device's cursors are taken at its call, with
        what it raised meanwhile).  After a call that failed, the cursors
        of its devices and of those after it wait for the next sweep.
        """
        try:
            for batch in self._batches(dirty):
                if self._stopping:
                    return
                saved = [conn for conn in batch if conn.ack_dirty]
                cursors = {
                    (conn.user_id, conn.device): conn.unsaved_acks() for conn in saved
                }
                if not cursors:
                    continue
                try:
                    await self.store.set_many_cursors(cursors)
                except Exception:
                    self._save_many_failed(Failure(), saved, cursors)
                    return
        finally:
            self._saving = False

    def _renew(self, now: float) -> None:
        """
        Renew the sessions of every device connected here, with when each
        was last active (L{_renew_sessions}).
        """
        held = {
            conn.session_id: conn
            for conn in self.logged_in()
            if not conn.closed and conn.held is None
        }
        self._renewed = now
        if not held:
            return
        self._renewing = True
        sessions = [
            HeldSession(
                conn.user_id, conn.session_id, conn.user_name, conn.device, conn.active
            )
            for conn in held.values()
        ]
        ensureDeferred(self._renew_sessions(held, sessions)).addErrback(
            self._batches_failed, "renewal"
        )

    async def _renew_sessions(
        self, held: dict[str, Connection], sessions: list[HeldSession]
    ) -> None:
        """
        Renew C{sessions} (of the C{held} connections, by session id): at
        most L{store_batch} a store call, each made once the one before
        answered, each answer acted on as it comes (L{_renewed_sessions}).
        After a call that failed, the sessions after it wait for the next
        renewal (a third of their time to live later).
        """
        try:
            left = len(sessions)
            for batch in self._batches(sessions):
                if self._stopping:
                    return
                try:
                    renewal = await self.store.renew_sessions(
                        self.here, batch, self.session_ttl
                    )
                except Exception:
                    self.log.failure(
                        "Renewing the sessions of {count} devices failed",
                        Failure(),
                        count=left,
                    )
                    return
                left -= len(batch)
                self._renewed_sessions(renewal, held)
        finally:
            self._renewing = False

    def _renewed_sessions(self, renewal: Renewal, held: dict[str, Connection]) -> None:
        """
        Close the connections whose session is not their device's any more
        (a newer login of the device replaced it, or the device limit
        dropped it), and catch up those whose session the store had lost (a
        delivery meanwhile found them offline: L{Streams.catch_up}).
        """
        for session_id in renewal.restored:
            # The store had lost it: deliveries meanwhile found the
            # device offline.
            conn = held.get(session_id)
            if conn is not None and not conn.closed:
                self.log.info(
                    "Catching {user_id} ({device!r}) up: the store had "
                    "lost its session",
                    user_id=conn.user_id,
                    device=conn.device,
                )
                self._resync_connection(conn)
        for session_id in renewal.lost:
            conn = held.get(session_id)
            if conn is not None and not conn.closed:
                self.log.info(
                    "Closing {user_id} ({device!r}): its session was replaced",
                    user_id=conn.user_id,
                    device=conn.device,
                )
                conn.replaced = True
                self._save_acks(conn)
                self.kick(conn, KICK_REPLACED)

    def _save_many_failed(
        self,
        failure: Failure,
        dirty: list[Connection],
        cursors: dict[tuple[int, str], dict[str, Position]],
    ) -> None:
        for conn in dirty:
            conn.mark_unsaved(cursors[conn.user_id, conn.device])
        self.log.failure(
            "Saving the cursors of {count} devices failed", failure, count=len(dirty)
        )

    # The connections of each user's devices

    def connection(self, user_id: int, device: str = "") -> Connection | None:
        """
        The logged-in connection of C{user_id}'s C{device} here, if any.
        """
        conn = self.users.get(user_id)
        while conn is not None and conn.device != device:
            conn = conn.next_device
        return conn

    def devices(self, user_id: int) -> list[Connection]:
        """
        The logged-in connections of C{user_id}'s devices here (open or
        closing), in the order they logged in (a device's new connection
        takes its old one's place).
        """
        out = []
        conn = self.users.get(user_id)
        while conn is not None:
            out.append(conn)
            conn = conn.next_device
        return out

    def logged_in(self) -> Iterator[Connection]:
        """
        Every logged-in connection here.
        """
        for first in self.users.values():
            conn: Connection | None = first
            while conn is not None:
                yield conn
                conn = conn.next_device

    def _bind(self, conn: Connection) -> Connection | None:
        """
        Make C{conn} its device's connection here.  @return: the one it
        replaces, if any.
        """
        users = self.users
        user_id = conn.user_id
        before: Connection | None = None
        old = users.get(user_id)
        while old is not None and old.device != conn.device:
            before, old = old, old.next_device
        if old is None:
            # A new device: last of the user's.
            conn.next_device = None
        else:
            conn.next_device, old.next_device = old.next_device, None
        if before is None:
            users[user_id] = conn
        else:
            before.next_device = conn
        return old

    def _unbind(self, conn: Connection) -> bool:
        """
        Forget C{conn} as its device's connection.  @return: whether it was.
        """
        users = self.users
        before: Connection | None = None
        found = users.get(conn.user_id)
        while found is not None and found is not conn:
            before, found = found, found.next_device
        if found is None:
            return False
        following, conn.next_device = conn.next_device, None
        if before is not None:
            before.next_device = following
        elif following is not None:
            users[conn.user_id] = following
        else:
            del users[conn.user_id]
        return True

    # Connection events (from the protocol)

    def connection_made(self, link: IClientLink, peer: str) -> Connection:
        conn = Connection(link, peer, self.clock.seconds())
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
        self._resync_after_login.discard(conn)
        if not conn.user_id:
            return
        if conn.legacy and clean and closed_by_client:
            conn.acknowledge_delivered()
        if not self._unbind(conn) or conn.replaced:
            self._save_acks(conn)
            return
        self._release(conn).addErrback(self._release_failed, conn.user_id)

    def _release_failed(self, failure: Failure, user_id: int) -> None:
        if failure.check(StoreError):
            # Usually many at once (the store went away): one line a burst.
            self._release_failures.failed(failure.getErrorMessage(), user_id)
        else:
            self.log.failure("Releasing {user_id} failed", failure, user_id=user_id)

    def _release(self, conn: Connection) -> Deferred[object]:
        """
        Save C{conn}'s acknowledged cursors, then release its session: a
        new login of the device (which needs the session free) reads the
        saved cursors.
        """
        return self._save_acks(conn).addCallback(
            lambda _: self.store.release_session(
                conn.user_id, conn.session_id, conn.device
            )
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
            conn.link.close()

    def overflowed(self, conn: Connection, unsent: int) -> None:
        """
        C{conn} does not read what it is sent: C{unsent} bytes wait past
        the transport's buffer, over the limit.  Drop it at once; what it
        was sent and did not acknowledge stays stored, and it gets that at
        its next login.
        """
        self.m_overflows.inc()
        self.log.info(
            "Dropping {user_id} ({peer}): {unsent} bytes unread, over the limit",
            user_id=conn.user_id,
            peer=conn.peer,
            unsent=unsent,
        )
        conn.closed = True
        conn.link.abort()

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
        cmd = frame.cmd
        # Token bucket: refill at `rate` per second since the last frame, up
        # to a burst of 2*rate; each message of a batch (each position of a
        # READ) costs one.
        conn.tokens = min(
            2 * self.rate, conn.tokens + (now - conn.last_seen) * self.rate
        )
        conn.last_seen = now
        if frame.batch:
            conn.tokens -= len(frame.batch)
        elif cmd == Command.READ and frame.cursors:
            conn.tokens -= len(frame.cursors)
        else:
            conn.tokens -= 1
        if conn.tokens < 0:
            self.error(conn, ErrorCode.RATE_LIMITED, "too many messages", close=True)
            return
        if not conn.user_id or conn.held is not None:
            if cmd == Command.LOGIN_REQUEST and not conn.logging_in:
                conn.logging_in = True
                ensureDeferred(self._login(conn, frame)).addErrback(
                    self._login_crashed, conn
                )
            elif conn.logging_in and cmd == Command.PING:
                conn.send(wire.PONG)
            else:
                self.error(conn, ErrorCode.NOT_LOGGED_IN, "log in first", close=True)
            return
        if cmd == Command.PING:
            conn.send(wire.PONG)
            if conn.legacy and not conn.link.backed_up():
                # (What waits unsent was not received.)
                conn.acknowledge_delivered()
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
            conn.active = now
            self.sender.send(conn, frame)
        elif cmd == Command.ACK:
            ignored = conn.acknowledge(frame.cursors)
            if ignored:
                self.m_acks_ignored.inc(ignored)
        elif cmd == Command.READ:
            self._read(conn, frame.cursors)
        else:
            self.error(
                conn,
                ErrorCode.UNKNOWN_COMMAND,
                f"unexpected command {cmd.name} from a client",
                close=True,
            )

    # Login

    def _login_crashed(self, failure: Failure, conn: Connection) -> None:
        self.m_login_failures.inc()
        if failure.check(StoreError):
            # Not the client's fault, and not for long: it may log in again.
            self.log.warn(
                "Login of {peer} failed: the store is unavailable ({error})",
                peer=conn.peer,
                error=failure.getErrorMessage(),
            )
            self.error(
                conn,
                ErrorCode.STORE_ERROR,
                "the store is unavailable: log in again shortly",
                close=True,
            )
            return
        self.log.failure("Login of {peer} failed", failure, peer=conn.peer)
        self.error(conn, ErrorCode.FAILURE, "login failed: internal error", close=True)

    def _refuse(self, conn: Connection, refusal: Refusal) -> None:
        self.m_login_failures.inc()
        self.log.info(
            "Refused login from {peer}: {reason}", peer=conn.peer, reason=refusal.reason
        )
        self.error(conn, refusal.code, refusal.reason, close=True)

    async def _login(self, conn: Connection, frame: Frame) -> None:
        # From here on a CIM client gets only what CIM's client reads (a
        # refusal is then a plain close, logged here).
        conn.legacy = self.authenticator.is_legacy(frame)
        refusal = self.authenticator.check(frame)
        if refusal is not None:
            self._refuse(conn, refusal)
            return
        if self._stopping:
            self.kick(conn, "the server is shutting down")
            return
        user_id = frame.request_id
        activating = self._activating
        activating[user_id] = activating.get(user_id, 0) + 1
        try:
            grant = await self.authenticator.authenticate(frame)
        finally:
            # (Nothing runs between here and the bind below: what is
            # delivered from the bind on waits in conn.held.)
            stale = user_id in self._missed
            left = activating.pop(user_id) - 1
            if left:
                activating[user_id] = left
            else:
                self._missed.discard(user_id)
        if isinstance(grant, Refusal):
            self._refuse(conn, grant)
            return
        if conn.closed:
            # The client went away while we were checking; it still holds
            # the session, so release it.
            await self.authenticator.release_quietly(grant)
            return
        # Bound before its conversations are read: what is delivered live
        # from here on waits in conn.held, and nothing falls between the
        # reads and the streams.
        saved = self._bind_login(conn, grant)
        sent = () if grant.legacy else frame.cursors
        reads = grant.reads
        if reads is not None and not stale and saved is None:
            # What the token's login read stands: nothing was delivered to
            # the user meanwhile, and no connection of the device was
            # replaced (whose cursors it would have to read after they are
            # saved).
            resumption = resume_from(reads.states, reads.cursors, sent)
        else:
            resumption = await self._read_resumption(conn, grant, saved, sent)
        if conn.closed:
            # Gone meanwhile (or replaced): its close released the session.
            return
        streams = self._grant(conn, grant, resumption, frame.cursors)
        if conn in self._resync_after_login:
            # What was read for it may predate pushes lost meanwhile.
            self._resync_after_login.discard(conn)
            self._resync_connection(conn)
        for stream in streams:
            await self.streams.fill(conn, stream, Command.OFFLINE)

    async def _read_resumption(
        self,
        conn: Connection,
        grant: Grant,
        saved: Deferred[None] | None,
        sent: Sequence[Cursor],
    ) -> Resumption:
        """
        Read where C{conn}, bound to C{grant}'s device, resumes, once the
        cursors of the connection it replaced are C{saved}; on a failure,
        unbind it and release its session.
        """
        try:
            if saved is not None:
                await saved
            return await resume(self.store, grant.user_id, grant.device, sent)
        except BaseException:
            if self._unbind(conn):
                conn.held = None
                await self.authenticator.release_quietly(grant)
            raise

    def _bind_login(self, conn: Connection, grant: Grant) -> Deferred[None] | None:
        """
        Make C{conn} the connection of C{grant}'s device, kicking the one it
        replaces.  @return: C{None} when it replaces none, else a Deferred
        firing once the replaced one's acknowledged cursors are saved (the
        new one resumes from them).
        """
        conn.user_id = grant.user_id
        conn.user_name = grant.user_name
        conn.session_id = grant.session_id
        conn.device = grant.device
        conn.active = self.clock.seconds()
        conn.held = []
        old = self._bind(conn)
        self.sender.known_users.add(grant.user_id)
        if old is None:
            return None
        old.replaced = True
        saved = self._save_acks(old)
        self.kick(old, KICK_REPLACED)
        return saved

    def _grant(
        self,
        conn: Connection,
        grant: Grant,
        resumption: Resumption,
        sent: Sequence[Cursor] = (),
    ) -> list[Stream]:
        """
        Start C{conn}'s streams where C{resumption} says, tell the client
        (a cim client: LOGIN_RESPONSE), and offer it what arrived live
        meanwhile.  C{sent}: the positions the client sent at login (those
        of conversations the store did not list are kept, in
        L{Connection.unlisted}).  @return: the streams to replay from the
        store (those holding more than their start; live messages wait in
        them until the replay caught up).
        """
        conn.logging_in = False
        # The device's stored cursors, kept (not copied): the streams
        # adopted later start from them (L{Streams._adopt}).
        acked = resumption.acked
        if acked:
            mine = conn.acked
            if mine:
                mine.update(acked)
            else:
                conn.acked = acked
        streams = []
        for start in resumption.starts:
            behind = start.last_seq > start.seq
            stream = Stream(start.conversation, start.seq, behind, start.epoch)
            conn.streams[start.conversation] = stream
            if behind:
                streams.append(stream)
        if sent and not grant.legacy:
            unlisted = {c.conversation for c in sent} - conn.streams.keys()
            if unlisted:
                conn.unlisted = frozenset(unlisted)
        self.m_logins.inc()
        self._login_lines.add(
            f"{grant.user_id} ({grant.user_name}) logged in from {conn.peer}"
            + (f" as device {grant.device!r}" if grant.device else "")
            + (" (CIM client)" if grant.legacy else "")
        )
        if not grant.legacy:
            conn.send(
                wire.login_response(
                    grant.user_id,
                    grant.user_name,
                    int(self.clock.seconds() * 1000),
                    grant.device,
                    [start.cursor for start in resumption.starts],
                )
            )
        held, conn.held = conn.held or [], None
        for messages, batch in held:
            self.streams.offer(conn, messages, batch)
        return streams

    # Acknowledged cursors

    def _save_acks(self, conn: Connection) -> Deferred[None]:
        """
        Save C{conn}'s acknowledged cursors if they changed.  @return: a
        Deferred firing (never failing: a failure is logged) when saved.
        """
        if not conn.ack_dirty:
            return succeed(None)
        cursors = conn.unsaved_acks()
        d: Deferred[None] = self.store.set_cursors(conn.user_id, cursors, conn.device)
        return d.addErrback(self._save_acks_failed, conn, cursors)

    def _save_acks_failed(
        self, failure: Failure, conn: Connection, cursors: dict[str, Position]
    ) -> None:
        conn.mark_unsaved(cursors)
        self.log.failure(
            "Saving cursors of {user_id} failed", failure, user_id=conn.user_id
        )

    # Read positions

    def _read(self, conn: Connection, cursors: Sequence[Cursor]) -> None:
        """
        The client read up to each of C{cursors}: raise the user's read
        positions, and tell every device of the user (and of the peer, in a
        private conversation).  Only a conversation the connection receives
        counts, in its epoch (or none given), up to what it was sent.
        """
        ignored = 0
        for cursor in cursors:
            conversation = cursor.conversation
            stream = conn.streams.get(conversation)
            if (
                stream is None
                or cursor.epoch not in ("", stream.epoch.id)
                or not 0 < cursor.seq <= stream.delivered
            ):
                ignored += 1
                continue
            if cursor.seq <= conn.read_sent.get(conversation, 0):
                continue
            conn.read_sent[conversation] = cursor.seq
            ensureDeferred(
                self._set_read(conn.user_id, conversation, cursor.seq)
            ).addErrback(self._set_read_failed, conn.user_id, conversation)
        if ignored:
            self.m_reads_ignored.inc(ignored)

    def _set_read_failed(
        self, failure: Failure, user_id: int, conversation: str
    ) -> None:
        self.log.failure(
            "Setting the read position of {user_id} in {conversation} failed",
            failure,
            user_id=user_id,
            conversation=conversation,
        )

    async def _set_read(self, user_id: int, conversation: str, seq: int) -> None:
        position = await self.store.set_read(user_id, conversation, seq)
        users = [user_id]
        peer = peer_of(conversation, user_id)
        if peer is not None and peer != user_id:
            users.append(peer)
        await self.delivery.deliver_read(user_id, conversation, position, users)

    # Delivery to connections here

    def deliver_local(
        self, messages: Sequence[ChatMessage], user_ids: Sequence[int]
    ) -> list[int]:
        """
        Write C{messages} (one batch, in seq order) to every device of those
        of C{user_ids} connected here, encoding them once for all.
        @return: the users with no device connected here.
        """
        if self._activating:
            self._note_missed(user_ids)
        missing = []
        batch = wire.Batch(messages)
        now_ms = self.clock.seconds() * 1000
        offer = self.streams.offer
        users = self.users
        for uid in user_ids:
            conn = users.get(uid)
            reached = False
            while conn is not None:
                following = conn.next_device
                if not conn.closed:
                    offer(conn, messages, batch)
                    reached = True
                conn = following
            if not reached:
                missing.append(uid)
        if messages:
            self.m_latency.observe(max(0.0, (now_ms - messages[-1].timestamp) / 1000))
        return missing

    def _note_missed(self, user_ids: Iterable[int]) -> None:
        """
        Those of C{user_ids} whose logins wait for the store's answer to
        their token were delivered to: their logins read again.
        """
        activating = self._activating
        self._missed.update(uid for uid in user_ids if uid in activating)

    def deliver_read_local(
        self, reader_id: int, conversation: str, seq: int, user_ids: Sequence[int]
    ) -> list[int]:
        """
        Tell every device of those of C{user_ids} connected here that
        C{reader_id} read C{conversation} up to C{seq} (a READ frame; CIM
        clients get none).  @return: the users with no device connected
        here.
        """
        frame = wire.read(reader_id, conversation, seq)
        missing = []
        for uid in user_ids:
            reached = False
            for conn in self.devices(uid):
                if not conn.closed:
                    if conn.held is None:
                        conn.send(frame)
                    reached = True
            if not reached:
                missing.append(uid)
        return missing

    # Push API operations

    def send_raw(self, user_id: int, frame: Frame) -> bool:
        """
        Write C{frame} to every connection of C{user_id}'s devices (CIM's
        C{/sendMsg}), completed with the receiver's properties for a CIM
        client.

        @return: whether the user is connected here.
        @raise ValueError: a CIM client could not read C{frame}.
        """
        conns = [conn for conn in self.devices(user_id) if not conn.closed]
        if not conns:
            return False
        if any(conn.legacy for conn in conns):
            cim_frame = wire.raw_for_cim_client(frame, user_id)
        for conn in conns:
            conn.send(cim_frame if conn.legacy else frame)
        return True

    def kick_user(
        self, user_id: int, session_id: str, reason: str, logged_off: bool = False
    ) -> Deferred[bool]:
        """
        Close the connection of C{user_id}'s device whose session is
        C{session_id} (every device's when C{session_id} is empty).

        @param logged_off: the user logged off (CIM's C{/offLine}): what a
            CIM client was sent counts as received.
        @return: fires with whether there was such a connection, once its
            acknowledged cursors are saved.
        """
        conns = [
            conn
            for conn in self.devices(user_id)
            if not session_id or conn.session_id == session_id
        ]
        if not conns:
            return succeed(False)
        saving = []
        for conn in conns:
            conn.replaced = True
            if logged_off and conn.legacy:
                conn.acknowledge_delivered()
            saving.append(self._save_acks(conn))
            self.kick(conn, reason)
        return DeferredList(saving).addCallback(lambda _: True)

    def resync(self, user_id: int) -> bool:
        """
        Send every device of C{user_id} connected here whatever the store
        holds that it has not got yet.
        """
        if self._activating:
            self._note_missed((user_id,))
        conns = [conn for conn in self.devices(user_id) if conn.held is None]
        for conn in conns:
            self.streams.resync(conn)
        return bool(conns)

    def resync_all(self) -> int:
        """
        Pushes to this server were lost (the bus dropped its subscription):
        bring every device connected here up to the store, and show each
        the conversations begun since it was told of its own
        (L{Streams.catch_up}: three store calls per device, and a read of
        each conversation that moved).  A device still logging in is
        caught up once logged in.

        @return: how many devices.
        """
        self._missed.update(self._activating)
        count = 0
        for conn in list(self.logged_in()):
            if conn.closed:
                continue
            count += 1
            if conn.held is not None:
                self._resync_after_login.add(conn)
            else:
                self._resync_connection(conn)
        return count

    def _resync_connection(self, conn: Connection) -> None:
        self.streams.catch_up_in_background(conn)
