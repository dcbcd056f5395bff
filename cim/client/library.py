"""
The cim client library: log in through the route, hold a TCP connection to
the assigned IM server, send and receive chat, and survive everything a
network does to a connection.

What it guarantees:

  - every send is stored exactly once: it carries a client message id
    (uuid4 hex) and is written again after a reconnect until the server
    acknowledges it, and the server stores one message per id;
  - every message is shown exactly once and in order: the client keeps a
    cursor per conversation, drops anything at or below it, sends the
    cursors when it logs in so that the server replays exactly what is
    missing, and keeps them in a file so that a restarted client resumes;
  - a dead connection is noticed (heartbeat) and replaced through the route,
    with exponential backoff, until L{Client.close}.

Everything runs on the reactor thread; the reactor is injected, so tests
drive the timers with L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

import enum
import random as _random
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from twisted.internet import endpoints
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredQueue,
    ensureDeferred,
    fail,
)
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from zope.interface import Interface, implementer

from cim import envelope as codes
from cim.client.connection import ClientProtocol
from cim.client.cursors import CursorFile, state_path
from cim.client.route import RouteClient, RouteError, User
from cim.message import (
    BROADCAST,
    ChatMessage,
    Command,
    Cursor,
    ErrorCode,
    Frame,
    group_conversation,
    inbox,
)
from cim.web import http_client

__all__ = [
    "Ack",
    "Client",
    "ClientClosed",
    "ClientState",
    "IClientListener",
    "LoginError",
    "NotLoggedIn",
    "QueueListener",
    "RouteError",
    "SendError",
    "User",
]

#: Route codes after which logging in again cannot succeed by itself.
PERMANENT_LOGIN_CODES = frozenset(
    {codes.ACCOUNT_MISMATCH, codes.INVALID_ARGUMENT, codes.UNAUTHORIZED}
)
#: The KICK reason of a connection replaced by a newer login of its user.
REPLACED = "logged in again elsewhere"
#: Broadcast message ids remembered to drop duplicates.
BROADCAST_MEMORY = 1000


class ClientState(enum.Enum):
    """
    The life of a L{Client}, as reported to L{IClientListener.state_changed}.
    """

    IDLE = "idle"
    #: Logging in through the route and connecting to the IM server.
    CONNECTING = "connecting"
    #: Logged in on the IM server: sends go out at once.
    READY = "ready"
    #: The connection was lost; waiting before the next attempt.
    RECONNECTING = "reconnecting"
    #: L{Client.close} was called.
    CLOSED = "closed"
    #: Logging in cannot succeed (wrong password, replaced by another
    #: login...); the client gave up.
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Ack:
    """
    The server stored a message this client sent.

    @ivar client_msg_id: the id the client gave the send.
    @ivar msg_id: the id the store assigned.
    @ivar seq: its position in C{conversation}.
    @ivar timestamp: when it was stored, in milliseconds since the epoch.
    """

    client_msg_id: str
    msg_id: int
    seq: int
    conversation: str
    timestamp: int


class ClientClosed(Exception):
    """
    The client was closed (or gave up) before the operation completed.
    """


class NotLoggedIn(Exception):
    """
    The operation needs L{Client.login} first.
    """


class LoginError(Exception):
    """
    Logging in failed.

    @ivar code: the route's business code (a string such as C{"9100"}) or
        the IM server's error code (as a string), or C{""} for a network
        failure.
    @ivar reason: a human-readable explanation.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{reason} ({code})" if code else reason)
        self.code = code
        self.reason = reason


class SendError(Exception):
    """
    The server refused a send (no such user, not a member, empty...).

    @ivar code: the L{ErrorCode}.
    """

    def __init__(self, code: int, reason: str, client_msg_id: str = "") -> None:
        super().__init__(f"{reason} ({code})")
        self.code = code
        self.reason = reason
        self.client_msg_id = client_msg_id


class IClientListener(Interface):
    """
    Receives what happens to a L{Client}.  Every method is called on the
    reactor thread; an exception it raises is logged and otherwise ignored.
    """

    def message_received(message: ChatMessage) -> None:  # type: ignore[misc]
        """
        A chat message arrived that this client has not shown before
        (private ones in the user's inbox C{"u:<id>"}, group ones in
        C{"g:<group>"} including the user's own, CIM-style broadcasts in
        C{"all"}, and raw pushes with C{seq} 0 and no conversation).
        """

    def ack_received(ack: Ack) -> None:  # type: ignore[misc]
        """
        The server stored a message this client sent (the send's Deferred
        fires with the same L{Ack}).
        """

    def error_received(code: int, reason: str, client_msg_id: str) -> None:  # type: ignore[misc]
        """
        The server reported an error: a refused send (C{client_msg_id} set;
        its Deferred fails with L{SendError} too), or an error about the
        connection.
        """

    def state_changed(state: ClientState, reason: str) -> None:  # type: ignore[misc]
        """
        The client entered C{state}; C{reason} says why (may be empty).
        """


@implementer(IClientListener)
class QueueListener:
    """
    An L{IClientListener} that queues everything, for bots and tests.

    Each kind of event has its own queue; C{get()} on one returns a Deferred
    firing with the next event.  C{log} keeps every state change, in order.

    @ivar messages: L{ChatMessage}s.
    @ivar acks: L{Ack}s.
    @ivar errors: C{(code, reason, client_msg_id)} tuples.
    @ivar states: C{(ClientState, reason)} tuples.
    """

    def __init__(self) -> None:
        self.messages: DeferredQueue[ChatMessage] = DeferredQueue()
        self.acks: DeferredQueue[Ack] = DeferredQueue()
        self.errors: DeferredQueue[tuple[int, str, str]] = DeferredQueue()
        self.states: DeferredQueue[tuple[ClientState, str]] = DeferredQueue()
        self.log: list[tuple[ClientState, str]] = []

    def message_received(self, message: ChatMessage) -> None:
        self.messages.put(message)

    def ack_received(self, ack: Ack) -> None:
        self.acks.put(ack)

    def error_received(self, code: int, reason: str, client_msg_id: str) -> None:
        self.errors.put((code, reason, client_msg_id))

    def state_changed(self, state: ClientState, reason: str) -> None:
        self.log.append((state, reason))
        self.states.put((state, reason))

    def pending_messages(self) -> list[ChatMessage]:
        """
        The messages queued and not yet taken with C{messages.get()}; they
        are taken now.
        """
        out = list(self.messages.pending)
        self.messages.pending.clear()
        return out


@dataclass(slots=True)
class _PendingSend:
    frame: Frame
    deferred: Deferred[Ack]


class Client:
    """
    A cim user's connection to a cluster.

    Typical use::

        client = Client(reactor, "http://127.0.0.1:8083", listener=listener)
        await client.login("alice")
        ack = await client.send_private(bob_id, "hi")
        await client.close()

    @ivar user_id: set by L{login}.
    @ivar user_name: set by L{login}.
    @ivar server: C{(host, port)} of the IM server of the current (or last)
        connection, or C{None}.
    @ivar state: the current L{ClientState}.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        route_url: str = "http://127.0.0.1:8083",
        http: HTTPClient | None = None,
        listener: IClientListener | None = None,
        state_dir: str | Path | None = None,
        *,
        heartbeat_interval: float = 10.0,
        idle_timeout: float = 30.0,
        pong_timeout: float = 10.0,
        login_timeout: float = 10.0,
        http_timeout: float = 10.0,
        ack_delay: float = 0.005,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        jitter: float = 0.2,
        cursor_save_interval: float = 1.0,
        close_timeout: float = 2.0,
        rng: _random.Random | None = None,
    ) -> None:
        """
        @param reactor: provides L{IReactorTime} and L{IReactorTCP}: every
            timer and connection goes through it.
        @param route_url: the route's base URL.
        @param http: the treq client for the route; by default a new one
            with a persistent pool (closed by L{close}).
        @param listener: receives messages and events (see
            L{IClientListener}); none by default.
        @param state_dir: where the cursor file is kept; C{None} keeps the
            cursors in memory only.
        @param ack_delay: receive acknowledgements are coalesced: at most
            one ACK frame per this many seconds.
        @param backoff_base: the first reconnect delay, doubled after each
            failed attempt up to C{backoff_max}, each varied by +/- C{jitter}
            (a fraction), never over C{backoff_max}.
        @param close_timeout: how long L{close} waits for the
            acknowledgements of sends already written.
        """
        self.reactor = reactor
        self.listener = listener
        self.state_dir = Path(state_dir).expanduser() if state_dir is not None else None
        self.heartbeat_interval = heartbeat_interval
        self.idle_timeout = idle_timeout
        self.pong_timeout = pong_timeout
        self.login_timeout = login_timeout
        self.ack_delay = ack_delay
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.jitter = jitter
        self.cursor_save_interval = cursor_save_interval
        self.close_timeout = close_timeout
        self._rng = rng or _random.Random()
        self._pool: HTTPConnectionPool | None = None
        if http is None:
            http, self._pool = http_client(reactor, per_host=2)
        self.route = RouteClient(reactor, http, route_url, timeout=http_timeout)
        self.user_id: int | None = None
        self.user_name = ""
        self.server: tuple[str, int] | None = None
        self.state = ClientState.IDLE
        self._password: str | None = None
        self._token = ""
        self.cursors = CursorFile(reactor)
        self._cursors_of: int | None = None
        self._protocol: ClientProtocol | None = None
        self._login_waiter: Deferred[Frame] | None = None
        self._pending: OrderedDict[str, _PendingSend] = OrderedDict()
        self._ack_dirty: set[str] = set()
        self._ack_call: IDelayedCall | None = None
        self._loop: Deferred[None] | None = None
        self._replaced = False
        self._closed = False
        self._broadcast_seen: deque[int] = deque(maxlen=BROADCAST_MEMORY)
        self._drained: Deferred[None] | None = None

    # Public API

    @property
    def token(self) -> str:
        """
        The current login token (the bearer token for the route), or C{""}.
        """
        return self._token

    @property
    def ready(self) -> bool:
        """
        Whether the client is logged in on an IM server right now.
        """
        return self.state == ClientState.READY

    async def register(self, user_name: str, password: str | None = None) -> User:
        """
        Create the account C{user_name}, or get the id of the existing one
        (whose password, if it has one, must match).

        @raise RouteError: the route refused (C{4090}: the name is taken
            with another password).
        """
        return await self.route.register(user_name, password)

    async def login(
        self, user_name: str, password: str | None = None, user_id: int | None = None
    ) -> None:
        """
        Log in and connect: register C{user_name} unless C{user_id} is given
        (CIM style: an existing id and its name), get a server and a token
        from the route, connect there and log in.  Returns once the client
        is L{ClientState.READY}; from then on it reconnects by itself.

        @raise LoginError: the route or the server refused (C{4090}: the
            name is taken with another password; C{9100}: wrong id, name or
            password; C{5000}: logged in elsewhere), or could not be reached
            (one attempt only: the caller decides whether to retry).
        """
        if self._closed:
            raise ClientClosed("the client is closed")
        if self.state not in (ClientState.IDLE, ClientState.FAILED):
            raise LoginError("", f"already {self.state.value}")
        if user_id is None:
            try:
                account = await self.register(user_name, password)
            except RouteError as e:
                raise LoginError(e.code, e.message) from None
            except CancelledError:
                raise
            except Exception as e:
                raise LoginError("", f"cannot reach the route: {e}") from e
            user_id = account.user_id
        self.user_id = user_id
        self.user_name = user_name
        self._password = password
        self._replaced = False
        if user_id != self._cursors_of:
            # The cursors (and last token) of this user, from its file.
            self.cursors.close()
            path = state_path(self.state_dir, user_id) if self.state_dir else None
            self.cursors = CursorFile(self.reactor, path, self.cursor_save_interval)
            self._token = self.cursors.token
            self._cursors_of = user_id
        try:
            await self._attempt()
        except LoginError as e:
            self._set_state(ClientState.FAILED, e.reason)
            raise
        except ClientClosed:
            raise
        except CancelledError:
            raise
        except Exception as e:
            self._set_state(ClientState.FAILED, str(e))
            raise LoginError("", f"cannot log in: {e}") from e

    def send_private(self, receive_user_id: int, text: str) -> Deferred[Ack]:
        """
        Send C{text} to user C{receive_user_id}.

        @return: fires with the L{Ack} once the server stored the message
            (after reconnects if need be); fails with L{SendError} when the
            server refuses it, L{ClientClosed} when the client closes first.
            Cancelling it stops resending (the message may be stored
            anyway).
        """
        return self._send(
            Frame(cmd=Command.MESSAGE, req_msg=text, receive_user_id=receive_user_id)
        )

    def send_group(self, group_id: str, text: str) -> Deferred[Ack]:
        """
        Send C{text} to group C{group_id} (the client must be a member).
        The message comes back to this client too, like to every member.

        @return: as L{send_private}.
        """
        return self._send(Frame(cmd=Command.MESSAGE, req_msg=text, group_id=group_id))

    async def broadcast(self, text: str) -> None:
        """
        CIM's group chat: send C{text} to every other online user, through
        the route.
        """
        user_id = self._need_login()
        await self.route.broadcast(user_id, self._token, text)

    async def online_users(self) -> list[User]:
        """
        The users connected now, by user id.
        """
        return await self.route.online_users()

    async def create_group(self, group_id: str) -> None:
        """
        Create group C{group_id}, with this user as its first member.

        @raise RouteError: C{4090} when it exists.
        """
        user_id = self._need_login()
        await self.route.create_group(user_id, self._token, group_id)

    async def join_group(self, group_id: str) -> bool:
        """
        Join group C{group_id}.  @return: C{False} if already a member.

        @raise RouteError: C{3000} when there is no such group.
        """
        user_id = self._need_login()
        return await self.route.join_group(user_id, self._token, group_id)

    async def leave_group(self, group_id: str) -> bool:
        """
        Leave group C{group_id}.  @return: C{False} if not a member.
        """
        user_id = self._need_login()
        return await self.route.leave_group(user_id, self._token, group_id)

    async def group_members(self, group_id: str) -> list[User]:
        """
        The members of group C{group_id} (this user must be one).
        """
        user_id = self._need_login()
        return await self.route.group_members(user_id, self._token, group_id)

    async def my_groups(self) -> list[str]:
        """
        The ids of the groups this user belongs to.
        """
        user_id = self._need_login()
        return await self.route.user_groups(user_id, self._token)

    async def history(
        self,
        conversation: str | None = None,
        limit: int = 20,
        after_seq: int | None = None,
    ) -> list[ChatMessage]:
        """
        Stored messages of C{conversation} (this user's inbox by default,
        or C{"g:<group>"}).

        @param after_seq: read after this seq; by default the last C{limit}
            messages up to this client's cursor.
        """
        user_id = self._need_login()
        if conversation is None:
            conversation = inbox(user_id)
        if after_seq is None:
            after_seq = max(0, self.cursors.get(conversation) - limit)
        return await self.route.history(
            user_id, self._token, conversation, after_seq, limit
        )

    def inbox(self) -> str:
        """
        The conversation id of this user's private messages.
        """
        return inbox(self._need_login())

    async def close(self) -> None:
        """
        Log off and close: wait (up to C{close_timeout}) for the
        acknowledgements of sends already written, acknowledge what was
        received, save the cursors, end the session at the route, close the
        connection.  Sends still not acknowledged fail with
        L{ClientClosed}.  Safe to call twice.
        """
        if self._closed:
            return
        self._closed = True
        if self._loop is not None:
            self._loop.cancel()
            self._loop = None
        if self._login_waiter is not None and not self._login_waiter.called:
            self._login_waiter.errback(ClientClosed("the client is closed"))
        proto = self._protocol
        if proto is not None and self.state == ClientState.READY:
            if self._pending:
                await self._drain()
            self._flush_acks()
            if self.user_id is not None and self._token:
                try:
                    await self.route.offline(self.user_id, self._token)
                except Exception as e:
                    self.log.info("Logging off at the route failed: {e}", e=e)
        if proto is not None and proto.connected:
            proto.close("closed by the client")
            lost = proto.lost
            lost.addTimeout(2.0, self.reactor)
            try:
                await lost
            except DeferredTimeout:
                proto.abort("closed by the client")
        self._protocol = None
        self._cancel_ack_timer()
        self.cursors.close()
        self._fail_pending(ClientClosed("the client is closed"))
        if self._pool is not None:
            await self._pool.closeCachedConnections()
        self._set_state(ClientState.CLOSED, "closed")

    async def _drain(self) -> None:
        """
        Wait until no send is pending (or the connection is lost), at most
        C{close_timeout} seconds.
        """
        self._drained = Deferred()
        self._drained.addTimeout(self.close_timeout, self.reactor)
        try:
            await self._drained
        except DeferredTimeout:
            self.log.info(
                "{count} sends still unacknowledged", count=len(self._pending)
            )
        finally:
            self._drained = None

    def _check_drained(self) -> None:
        if self._drained is not None and not self._drained.called:
            if not self._pending or self._protocol is None:
                self._drained.callback(None)

    # Internals: connecting

    def _need_login(self) -> int:
        if self.user_id is None:
            raise NotLoggedIn("log in first")
        return self.user_id

    def _set_state(self, state: ClientState, reason: str = "") -> None:
        self.state = state
        self.log.info(
            "Client {user}: {state} {reason}",
            user=self.user_id,
            state=state.value,
            reason=reason,
        )
        self._notify("state_changed", state, reason)

    def _notify(self, method: str, *args: Any) -> None:
        if self.listener is None:
            return
        try:
            getattr(self.listener, method)(*args)
        except Exception:
            self.log.failure("The listener's {method} failed", method=method)

    async def _attempt(self) -> None:
        """
        One login: route, TCP connection, TCP login.  Ends READY, or raises.
        """
        assert self.user_id is not None
        self._set_state(ClientState.CONNECTING)
        try:
            info = await self.route.login(
                self.user_id, self.user_name, self._password, self._token
            )
        except RouteError as e:
            raise LoginError(e.code, e.message) from None
        if self._closed:
            raise ClientClosed("the client is closed")
        self._token = info.token
        self.cursors.set_token(info.token)
        self.server = (info.host, info.port)
        proto = ClientProtocol(
            self.reactor,
            self,
            interval=self.heartbeat_interval,
            idle_timeout=self.idle_timeout,
            pong_timeout=self.pong_timeout,
        )
        endpoint = endpoints.TCP4ClientEndpoint(
            self.reactor, info.host, info.port, timeout=self.login_timeout
        )
        try:
            await endpoints.connectProtocol(endpoint, proto)
        except CancelledError:
            raise
        except Exception as e:
            raise LoginError(
                "", f"cannot connect to {info.host}:{info.port}: {e}"
            ) from None
        if self._closed:
            proto.abort("closed by the client")
            raise ClientClosed("the client is closed")
        self._protocol = proto
        waiter: Deferred[Frame] = Deferred()
        self._login_waiter = waiter
        waiter.addTimeout(self.login_timeout, self.reactor)
        proto.send(
            Frame(
                cmd=Command.LOGIN_REQUEST,
                request_id=self.user_id,
                req_msg=self.user_name,
                token=info.token,
                cursors=self.cursors.as_list(),
            )
        )
        try:
            await waiter
        except BaseException as e:
            reason = "login timed out" if isinstance(e, DeferredTimeout) else str(e)
            proto.abort(reason)
            if isinstance(e, (LoginError, ClientClosed, CancelledError)):
                raise
            raise LoginError(
                "", f"login on {info.host}:{info.port} failed: {reason}"
            ) from None
        finally:
            self._login_waiter = None
        # The server now knows our cursors; acknowledge them too, so that it
        # stores them (they are what another device of this user starts
        # from).
        self._ack_dirty.clear()
        if self.cursors.cursors:
            proto.send(Frame(cmd=Command.ACK, cursors=self.cursors.as_list()))
        self._set_state(ClientState.READY, f"{info.host}:{info.port}")
        for pending in list(self._pending.values()):
            proto.send(pending.frame)

    def _start_reconnecting(self, reason: str) -> None:
        self._set_state(ClientState.RECONNECTING, reason)
        self._loop = ensureDeferred(self._reconnect())
        self._loop.addErrback(self._reconnect_crashed)

    def _backoff(self, attempt: int) -> float:
        """
        The delay before reconnect attempt C{attempt} (from 0).
        """
        delay = min(self.backoff_max, self.backoff_base * 2 ** min(attempt, 30))
        delay *= 1 + self.jitter * (2 * self._rng.random() - 1)
        return max(0.0, min(self.backoff_max, delay))

    async def _reconnect(self) -> None:
        """
        Log in again with backoff until it works, the client closes, or it cannot work.
        """
        attempt = 0
        while not self._closed:
            await deferLater(self.reactor, self._backoff(attempt))
            try:
                await self._attempt()
            except LoginError as e:
                if e.code in PERMANENT_LOGIN_CODES:
                    self._give_up(f"cannot log in again: {e.reason}")
                    return
                reason = e.reason
            except (CancelledError, ClientClosed):
                raise
            except Exception as e:
                reason = str(e) or type(e).__name__
            else:
                self._loop = None
                return
            attempt += 1
            self.log.info(
                "Reconnect attempt {attempt} failed: {reason}",
                attempt=attempt,
                reason=reason,
            )
            self._set_state(ClientState.RECONNECTING, reason)

    def _reconnect_crashed(self, failure: Failure) -> None:
        self._loop = None
        if failure.check(CancelledError, ClientClosed):
            return
        self.log.failure("The reconnect loop crashed", failure)
        self._give_up(f"internal error: {failure.getErrorMessage()}")

    def _give_up(self, reason: str) -> None:
        """
        Stop for good: fail the pending sends, enter FAILED.
        """
        self._loop = None
        self._fail_pending(ClientClosed(reason))
        self.cursors.save()
        self._set_state(ClientState.FAILED, reason)

    def _fail_pending(self, error: Exception) -> None:
        pending, self._pending = self._pending, OrderedDict()
        for item in pending.values():
            item.deferred.errback(error)

    # Internals: sending

    def _send(self, frame: Frame) -> Deferred[Ack]:
        """
        Queue C{frame} with a new client message id, and write it if READY.
        """
        if self._closed or self.state == ClientState.FAILED:
            return fail(ClientClosed("the client is closed"))
        if self.user_id is None:
            return fail(NotLoggedIn("log in first"))
        if not frame.req_msg:
            return fail(SendError(int(ErrorCode.INVALID_ARGUMENT), "empty message"))
        cmid = uuid.uuid4().hex
        frame = replace(frame, client_msg_id=cmid)

        def cancel(_: Deferred[Ack]) -> None:
            self._pending.pop(cmid, None)

        d: Deferred[Ack] = Deferred(cancel)
        self._pending[cmid] = _PendingSend(frame, d)
        if self._protocol is not None and self.state == ClientState.READY:
            self._protocol.send(frame)
        return d

    # Internals: receiving (FrameHandler)

    def frame_received(self, protocol: ClientProtocol, frame: Frame) -> None:
        """
        Dispatch a frame of the current connection.
        """
        if protocol is not self._protocol:
            return
        cmd = frame.cmd
        if cmd in (Command.MESSAGE, Command.OFFLINE):
            self._messages_received(frame)
        elif cmd == Command.ACK:
            self._ack_received(frame)
        elif cmd == Command.LOGIN_RESPONSE:
            if self._login_waiter is not None and not self._login_waiter.called:
                self._login_waiter.callback(frame)
        elif cmd == Command.ERROR:
            self._error_received(frame)
        elif cmd == Command.KICK:
            self._kicked(protocol, frame)
        else:
            self.log.debug("Ignoring a {cmd} frame", cmd=cmd.name)

    def connection_lost(self, protocol: ClientProtocol, reason: str) -> None:
        """
        The connection C{protocol} ended.
        """
        if protocol is not self._protocol:
            return
        self._protocol = None
        self._cancel_ack_timer()
        self._check_drained()
        if self._login_waiter is not None and not self._login_waiter.called:
            # An attempt is under way: it fails and its caller decides.
            self._login_waiter.errback(LoginError("", reason))
            return
        if self._closed or self.state != ClientState.READY:
            return
        if self._replaced:
            self._give_up("replaced by a newer login of this user")
            return
        self.log.info(
            "Connection to {server} lost: {reason}", server=self.server, reason=reason
        )
        self._start_reconnecting(reason)

    def _kicked(self, protocol: ClientProtocol, frame: Frame) -> None:
        """
        The server asks us to go: remember whether we were replaced, close.
        """
        reason = frame.error_reason or frame.req_msg or "kicked"
        self.log.info("Kicked by the server: {reason}", reason=reason)
        if reason == REPLACED:
            self._replaced = True
        if self._login_waiter is not None and not self._login_waiter.called:
            self._login_waiter.errback(LoginError("", f"kicked: {reason}"))
        protocol.close(f"kicked: {reason}")

    def _error_received(self, frame: Frame) -> None:
        """
        An ERROR frame: a refused login, a refused send, or a notice.
        """
        code = frame.error_code
        reason = frame.error_reason or frame.req_msg
        cmid = frame.client_msg_id
        if (
            self._login_waiter is not None
            and not self._login_waiter.called
            and not cmid
        ):
            self._login_waiter.errback(LoginError(str(code), reason))
            return
        self._notify("error_received", code, reason, cmid)
        if code == ErrorCode.STORE_ERROR and cmid and cmid in self._pending:
            # Not a refusal: the server's store failed for a moment and the
            # message was not stored.  Keep it pending and reconnect, so
            # that it and every later send go out again, in order, once the
            # server can store them (a resend is stored once, by its client
            # message id).
            self.log.info("Send {cmid} not stored: {reason}", cmid=cmid, reason=reason)
            if self._protocol is not None:
                self._protocol.close("the server could not store a message")
            return
        pending = self._pending.pop(cmid, None) if cmid else None
        if pending is not None:
            pending.deferred.errback(SendError(code, reason, cmid))
            self._check_drained()
        elif not cmid:
            self.log.warn("Server error {code}: {reason}", code=code, reason=reason)

    def _ack_received(self, frame: Frame) -> None:
        """
        An ACK frame: a send was stored.
        """
        ack = Ack(
            client_msg_id=frame.client_msg_id,
            msg_id=frame.msg_id,
            seq=frame.seq,
            conversation=frame.conversation,
            timestamp=frame.timestamp,
        )
        pending = self._pending.pop(frame.client_msg_id, None)
        if pending is None:
            return  # an ack of a resend already acknowledged
        self._notify("ack_received", ack)
        pending.deferred.callback(ack)
        self._check_drained()

    def _messages_received(self, frame: Frame) -> None:
        """
        Show the new messages of a MESSAGE or OFFLINE frame; acknowledge soon.
        """
        messages: list[ChatMessage] = list(frame.messages)
        if not messages and (frame.req_msg or frame.batch):
            # A CIM-style frame (raw text and properties, from /sendMsg).
            props = frame.properties
            try:
                sender_id = int(props.get("sendUserId", "0"))
            except ValueError:
                sender_id = 0
            texts = list(frame.batch) if frame.batch else [frame.req_msg]
            messages = [
                ChatMessage(
                    msg_id=0,
                    conversation="",
                    seq=0,
                    sender_id=sender_id,
                    sender_name=props.get("sendUserName", ""),
                    text=text,
                    timestamp=frame.timestamp or int(self.reactor.seconds() * 1000),
                )
                for text in texts
            ]
        for message in messages:
            if not self._is_new(message):
                continue
            self._notify("message_received", message)
        if self._ack_dirty and self._ack_call is None:
            self._ack_call = self.reactor.callLater(self.ack_delay, self._flush_acks)

    def _is_new(self, message: ChatMessage) -> bool:
        """
        Whether C{message} was not shown before (advancing the cursor if so).
        """
        conversation = message.conversation
        if not conversation or message.seq <= 0:
            return True
        if conversation == BROADCAST:
            # Broadcasts are not ordered nor replayed: remember their ids.
            if message.msg_id in self._broadcast_seen:
                return False
            self._broadcast_seen.append(message.msg_id)
            return True
        if not self.cursors.advance(conversation, message.seq):
            return False
        self._ack_dirty.add(conversation)
        return True

    def _flush_acks(self) -> None:
        """
        Send one cumulative ACK with the cursors that moved since the last.
        """
        self._ack_call = None
        if not self._ack_dirty or self._protocol is None:
            return
        cursors = [Cursor(c, self.cursors.get(c)) for c in sorted(self._ack_dirty)]
        self._ack_dirty.clear()
        self._protocol.send(Frame(cmd=Command.ACK, cursors=cursors))

    def _cancel_ack_timer(self) -> None:
        if self._ack_call is not None:
            if self._ack_call.active():
                self._ack_call.cancel()
            self._ack_call = None


def conversation_of(target: str) -> str:
    """
    The conversation id a user means by C{target}: C{"u:<id>"} and
    C{"g:<group>"} as they are, anything else a group id.
    """
    if target.startswith(("u:", "g:")) or target == BROADCAST:
        return target
    return group_conversation(target)
