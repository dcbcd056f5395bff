"""
The client's session: log in through the route (as this client's device),
connect to the IM server it names and log in there; when that connection is
lost, do it all again, with exponential backoff, until it works, the client
closes, or it cannot work (a permanent refusal, a newer login of the same
device, or one of another device past the user's device limit).

The session owns the connection and the L{ClientState}, and is the
connection's frame handler: it handles the frames about the session itself
(login response, kick, errors during a login) and hands messages, the
streams' starts (login response and C{EPOCH} cursors) and read positions
(C{READ}) to the L{Inbox}, and acknowledgements and refused sends to the
L{Outbox}, which it attaches to each connection once logged in.

The delays between attempts are Twisted's L{backoffPolicy} with a jitter
(L{reconnect_delays}); every timer runs on the injected reactor, so a
L{twisted.internet.task.Clock} drives them in tests.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Protocol

from twisted.application.internet import backoffPolicy
from twisted.internet import endpoints
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import (
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim import envelope as codes
from cim.client.connection import ClientProtocol
from cim.client.errors import ClientClosed, LoginError
from cim.client.inbox import Inbox
from cim.client.listeners import ClientState, IClientListener
from cim.client.outbox import Outbox
from cim.client.route import LoginInfo, RouteError
from cim.message import KICK_DEVICE_LIMIT, KICK_REPLACED, Command, Frame
from cim.tls import client_creator, describe_tls_failure

#: Route codes after which logging in again cannot succeed by itself.
PERMANENT_LOGIN_CODES = frozenset(
    {codes.ACCOUNT_MISMATCH, codes.INVALID_ARGUMENT, codes.UNAUTHORIZED}
)
#: The KICK reason of a connection replaced by a newer login of its device.
REPLACED = KICK_REPLACED
#: What the client says when a kick ends it for good, by the kick's reason.
FINAL_KICKS = {
    KICK_REPLACED: "replaced by a newer login of this device (logged in again "
    "elsewhere); not reconnecting",
    KICK_DEVICE_LIMIT: "logged out: this user logged in on more devices than "
    "allowed, and this one was the least recently active; not reconnecting",
}
#: How long closing waits for the server to close the connection.
CLOSE_WAIT = 2.0


def reconnect_delays(
    initial: float, maximum: float, jitter: float, rng: random.Random
) -> Callable[[int], float]:
    """
    The delay before reconnect attempt C{n} (from 0): C{initial} doubled
    after each failed attempt up to C{maximum} (Twisted's L{backoffPolicy}),
    varied by +/- C{jitter} (a fraction) so that the clients of a failed
    server do not all come back at once, and never over C{maximum}.
    """
    exponential = backoffPolicy(initial, maximum, factor=2.0, jitter=lambda: 0.0)

    def delay(attempt: int) -> float:
        varied = exponential(attempt) * (1 + jitter * (2 * rng.random() - 1))
        return max(0.0, min(maximum, varied))

    return delay


class Router(Protocol):
    """
    The route call the session needs (L{cim.client.route.RouteClient} has
    it).
    """

    async def login(
        self,
        user_id: int,
        user_name: str,
        password: str | None = None,
        token: str = "",
        account_key: str = "",
        device: str = "",
    ) -> LoginInfo: ...


class DeviceKeyHolder(Protocol):
    """
    Where a session keeps its device's device key
    (L{cim.client.devicekeys}), the proof of its next login.
    """

    def current(self) -> str:
        """
        The device key held now (C{""}: none).
        """

    def keep(self, key: str) -> None:
        """
        Keep C{key}, the device key the last login answered.
        """

    def refused(self) -> None:
        """
        The route refused the key held: forget it.
        """


class Session:
    """
    One user's session with the cluster, across connections.

    @ivar state: the current L{ClientState}.
    @ivar server: C{(host, port)} of the IM server of the current (or last)
        connection, or C{None}.
    @ivar protocol: the current connection, or C{None}.
    @ivar closed: set by L{close}; nothing reconnects after it.
    @ivar device: this client's device id (set by L{start}).
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        route: Router,
        inbox: Inbox,
        outbox: Outbox,
        events: IClientListener,
        delays: Callable[[int], float],
        *,
        heartbeat_interval: float = 10.0,
        idle_timeout: float = 30.0,
        pong_timeout: float = 10.0,
        login_timeout: float = 10.0,
        ca_file: str | None = None,
    ) -> None:
        """
        @param reactor: provides L{IReactorTime}, and L{IReactorTCP} for
            connecting.
        @param delays: the delay before each reconnect attempt (see
            L{reconnect_delays}).
        @param ca_file: the CAs that an IM server's certificate must be
            signed by, when the route says it speaks TLS (the system's
            when C{None}).
        """
        self.ca_file = ca_file
        self.reactor = reactor
        self.route = route
        self.inbox = inbox
        self.outbox = outbox
        self.events = events
        self.delays = delays
        self.heartbeat_interval = heartbeat_interval
        self.idle_timeout = idle_timeout
        self.pong_timeout = pong_timeout
        self.login_timeout = login_timeout
        self.user_id: int | None = None
        self.user_name = ""
        self.device = ""
        self.server: tuple[str, int] | None = None
        self.state = ClientState.IDLE
        self.protocol: ClientProtocol | None = None
        self.closed = False
        self._password: str | None = None
        self._account_key = ""
        self._device_keys: DeviceKeyHolder | None = None
        self._login_waiter: Deferred[Frame] | None = None
        self._loop: Deferred[None] | None = None
        self._final_kick = ""

    @property
    def token(self) -> str:
        """
        The current login token, kept with the cursors.
        """
        return self.inbox.cursors.token

    @property
    def ready(self) -> bool:
        """
        Whether the session is logged in on a connection now.
        """
        return self.protocol is not None and self.state == ClientState.READY

    def set_state(self, state: ClientState, reason: str = "") -> None:
        """
        Enter C{state}, and tell the listener.
        """
        self.state = state
        self.log.info(
            "Client {user}: {state} {reason}",
            user=self.user_id,
            state=state.value,
            reason=reason,
        )
        self.events.state_changed(state, reason)

    async def start(
        self,
        user_id: int,
        user_name: str,
        password: str | None,
        account_key: str = "",
        device: str = "",
        device_keys: DeviceKeyHolder | None = None,
    ) -> None:
        """
        Log in as C{user_id} (with C{password} or C{account_key}, whichever
        the account has) on device C{device}; from then on, reconnect by
        itself.

        With C{device_keys}, each login keeps the device key its reply
        carries there, and a login without a password or account key proves
        the device with the key held (a key refused is forgotten).

        @raise LoginError: the route or the server refused, or could not be
            reached; the state is then L{ClientState.FAILED}.
        """
        self.user_id = user_id
        self.user_name = user_name
        self._password = password
        self._account_key = account_key
        self.device = device
        self._device_keys = device_keys
        self._final_kick = ""
        try:
            await self._attempt()
        except LoginError as e:
            self.set_state(ClientState.FAILED, e.reason)
            raise
        except (ClientClosed, CancelledError):
            raise
        except Exception as e:
            self.set_state(ClientState.FAILED, str(e))
            raise LoginError("", f"cannot log in: {e}") from e

    def close(self) -> None:
        """
        Stop: no more reconnecting, and a login under way fails with
        L{ClientClosed}.  The connection stays until L{disconnect}.
        """
        self.closed = True
        if self._loop is not None:
            self._loop.cancel()
            self._loop = None
        waiter = self._pending_login()
        if waiter is not None:
            waiter.errback(ClientClosed("the client is closed"))

    async def disconnect(self) -> None:
        """
        Close the connection cleanly, and wait (a little) until it is.
        """
        protocol = self.protocol
        if protocol is not None and protocol.connected:
            protocol.close("closed by the client")
            lost = protocol.lost
            lost.addTimeout(CLOSE_WAIT, self.reactor)
            try:
                await lost
            except DeferredTimeout:
                protocol.abort("closed by the client")
        self.protocol = None

    # Logging in

    async def _attempt(self) -> None:
        """
        One login: route, TCP connection, TCP login.  Ends READY, or raises.
        """
        assert self.user_id is not None
        self.set_state(ClientState.CONNECTING)
        holder = self._device_keys
        # The password or account key when known (the route checks them
        # first), else the device key held; the route answers a new one.
        device_key = ""
        if holder is not None and not self._password and not self._account_key:
            device_key = holder.current()
        extra = {"device_key": device_key} if device_key else {}
        try:
            info = await self.route.login(
                self.user_id,
                self.user_name,
                self._password,
                self.token,
                account_key=self._account_key,
                device=self.device,
                **extra,
            )
        except RouteError as e:
            if device_key and e.code == codes.ACCOUNT_MISMATCH and holder is not None:
                holder.refused()
            raise LoginError(e.code, e.message) from None
        if holder is not None and info.device_key:
            holder.keep(info.device_key)
        if self.closed:
            raise ClientClosed("the client is closed")
        self.inbox.cursors.set_token(info.token)
        self.server = (info.host, info.port)
        protocol = await self._connect(info)
        await self._log_in(protocol, info)
        self.inbox.attach(protocol)
        self.set_state(ClientState.READY, f"{info.host}:{info.port}")
        self.outbox.attach(protocol)

    async def _connect(self, info: LoginInfo) -> ClientProtocol:
        """
        Open the connection to the server C{info} names: TCP, and TLS when
        the route says the server speaks it, verifying that the server's
        certificate is signed by one of our CAs and names C{info.host}.
        """
        where = f"{info.host}:{info.port}"
        protocol = ClientProtocol(
            self.reactor,
            self,
            interval=self.heartbeat_interval,
            idle_timeout=self.idle_timeout,
            pong_timeout=self.pong_timeout,
            tls=info.tls,
        )
        try:
            endpoint: IStreamClientEndpoint = endpoints.TCP4ClientEndpoint(
                IReactorTCP(self.reactor),
                info.host,
                info.port,
                timeout=self.login_timeout,
            )
            if info.tls:
                endpoint = endpoints.wrapClientTLS(
                    client_creator(info.host, self.ca_file), endpoint
                )
            await endpoints.connectProtocol(endpoint, protocol)
        except CancelledError:
            raise
        except Exception as e:
            raise LoginError("", f"cannot connect to {where}: {e}") from None
        if protocol.handshake is not None:
            await self._handshake(protocol, where)
        if self.closed:
            protocol.abort("closed by the client")
            raise ClientClosed("the client is closed")
        self.protocol = protocol
        return protocol

    async def _handshake(self, protocol: ClientProtocol, where: str) -> None:
        """
        Wait for C{protocol}'s TLS handshake.

        @raise LoginError: it failed (the certificate does not verify, is
            not for the host, or the server does not speak TLS) or took
            longer than the login time-out.
        """
        assert protocol.handshake is not None
        protocol.handshake.addTimeout(self.login_timeout, self.reactor)
        try:
            await protocol.handshake
        except CancelledError:
            raise
        except Exception as e:
            protocol.abort("TLS failed")
            if isinstance(e, DeferredTimeout):
                reason = "the TLS handshake timed out"
            else:
                reason = describe_tls_failure(e) or f"TLS failed ({e})"
            raise LoginError(
                "", f"cannot connect to the IM server {where} over TLS: {reason}"
            ) from None

    async def _log_in(self, protocol: ClientProtocol, info: LoginInfo) -> None:
        """
        Send C{LOGIN_REQUEST} (with the cursors) and wait for the answer.
        """
        assert self.user_id is not None
        waiter: Deferred[Frame] = Deferred()
        self._login_waiter = waiter
        waiter.addTimeout(self.login_timeout, self.reactor)
        protocol.send(
            Frame(
                cmd=Command.LOGIN_REQUEST,
                request_id=self.user_id,
                req_msg=self.user_name,
                token=info.token,
                cursors=self.inbox.cursors.as_list(),
            )
        )
        try:
            answer = await waiter
        except BaseException as e:
            reason = "login timed out" if isinstance(e, DeferredTimeout) else str(e)
            protocol.abort(reason)
            if isinstance(e, (LoginError, ClientClosed, CancelledError)):
                raise
            raise LoginError(
                "", f"login on {info.host}:{info.port} failed: {reason}"
            ) from None
        finally:
            self._login_waiter = None
        # Where the server starts each conversation for this connection.
        self.inbox.start(answer.cursors)

    def _pending_login(self) -> Deferred[Frame] | None:
        """
        The Deferred of the login under way on the current connection,
        while it waits for the server's answer.
        """
        waiter = self._login_waiter
        return waiter if waiter is not None and not waiter.called else None

    # Reconnecting

    def _start_reconnecting(self, reason: str) -> None:
        self.set_state(ClientState.RECONNECTING, reason)
        self._loop = ensureDeferred(self._reconnect())
        self._loop.addErrback(self._reconnect_crashed)

    async def _reconnect(self) -> None:
        """
        Log in again with backoff until it works, the client closes, or it
        cannot work.
        """
        attempt = 0
        while not self.closed:
            await deferLater(self.reactor, self.delays(attempt))
            try:
                await self._attempt()
            except LoginError as e:
                if self._final_kick:
                    self._give_up(FINAL_KICKS[self._final_kick])
                    return
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
            self.set_state(ClientState.RECONNECTING, reason)

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
        self.outbox.fail_all(ClientClosed(reason))
        self.inbox.cursors.save()
        self.set_state(ClientState.FAILED, reason)

    # The connection's frames (FrameHandler)

    def frame_received(self, protocol: ClientProtocol, frame: Frame) -> None:
        """
        Dispatch a frame of the current connection.
        """
        if protocol is not self.protocol:
            return
        cmd = frame.cmd
        if cmd in (Command.MESSAGE, Command.OFFLINE):
            self.inbox.receive(frame)
        elif cmd == Command.EPOCH:
            self.inbox.start(frame.cursors)
        elif cmd == Command.READ:
            self.inbox.read_received(frame)
        elif cmd == Command.ACK:
            self.outbox.acknowledged(frame)
        elif cmd == Command.LOGIN_RESPONSE:
            waiter = self._pending_login()
            if waiter is not None:
                waiter.callback(frame)
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
        if protocol is not self.protocol:
            return
        self.protocol = None
        self.inbox.detach()
        self.outbox.detach()
        waiter = self._pending_login()
        if waiter is not None:
            # An attempt is under way: it fails and its caller decides.
            waiter.errback(LoginError("", reason))
            return
        if self.closed or self.state != ClientState.READY:
            return
        if self._final_kick:
            self._give_up(FINAL_KICKS[self._final_kick])
            return
        self.log.info(
            "Connection to {server} lost: {reason}", server=self.server, reason=reason
        )
        self._start_reconnecting(reason)

    def _kicked(self, protocol: ClientProtocol, frame: Frame) -> None:
        """
        The server asks us to go: remember whether for good (this device
        logged in again elsewhere, or the user went over its device limit),
        close.
        """
        reason = frame.error_reason or frame.req_msg or "kicked"
        self.log.info("Kicked by the server: {reason}", reason=reason)
        if reason in FINAL_KICKS:
            self._final_kick = reason
        waiter = self._pending_login()
        if waiter is not None:
            waiter.errback(LoginError("", f"kicked: {reason}"))
        protocol.close(f"kicked: {reason}")

    def _error_received(self, frame: Frame) -> None:
        """
        An ERROR frame: a refused login, a refused send, or a notice.
        """
        code = frame.error_code
        reason = frame.error_reason or frame.req_msg
        cmid = frame.client_msg_id
        waiter = self._pending_login()
        if waiter is not None and not cmid:
            waiter.errback(LoginError(str(code), reason))
            return
        self.events.error_received(code, reason, cmid)
        if not cmid:
            self.log.warn("Server error {code}: {reason}", code=code, reason=reason)
        elif self.outbox.refused(cmid, code, reason) and self.protocol is not None:
            self.protocol.close("the server could not store a message")
