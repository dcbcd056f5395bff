"""
What the route does, apart from HTTP: accounts, logins, authorization,
sends, groups and history.  L{cim.route.api} parses requests and calls a
L{Router}; every business outcome other than success is an L{ApiError}.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from cachetools import LRUCache
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    fail,
    gatherResults,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim import envelope as codes
from cim.delivery import DeliveryReport
from cim.envelope import ApiError
from cim.interfaces import (
    DEFAULT_HISTORY,
    DEFAULT_POLICY,
    Account,
    ConversationState,
    DeviceKeyUsed,
    GroupExists,
    GroupInfo,
    IRegistry,
    IServerControl,
    IStore,
    NewMessage,
    NoSuchGroup,
    ServerAddress,
    Session,
    SessionExists,
    TokenInfo,
    TooManyJoinRequests,
)
from cim.limits import DEVICE_KEY_TTL, MAX_DEVICES
from cim.loglines import Lines
from cim.message import (
    BROADCAST,
    GROUP_PREFIX,
    INBOX_PREFIX,
    KICK_DEVICE_LIMIT,
    KICK_REPLACED,
    PAIR_PREFIX,
    ChatMessage,
    group_conversation,
    pair_conversation,
    pair_members,
    peer_of,
)
from cim.names import name_key
from cim.route.balancer import Balancer
from cim.route.throttle import GuessLimit

#: How many accounts the route keeps in memory for existence checks.
ACCOUNT_CACHE_SIZE = 100_000
#: How long a login's session claim waits for the client's TCP login.
CLAIM_TTL = 60.0

#: How many requests to join a group may wait for its owner.
MAX_JOIN_REQUESTS = 1000

#: Checks that an IM server accepts connections: fires with a bool.
Probe = Callable[[ServerAddress], "Deferred[bool]"]

#: Why a session's connection is closed when its user logs off.
KICK_LOGGED_OFF = "logged off"


class RouteDelivery(Protocol):
    """
    What the route asks of the delivery core (L{cim.delivery.Delivery}).
    """

    def append(self, messages: list[NewMessage]) -> Deferred[list[ChatMessage]]:
        """
        Store C{messages}, in order.  @return: fires with the stored ones.
        """

    def deliver(
        self, messages: Sequence[ChatMessage], user_ids: Sequence[int]
    ) -> Deferred[DeliveryReport]:
        """
        Deliver stored messages to every connected device of each user.
        """

    def deliver_read(
        self, reader_id: int, conversation: str, seq: int, user_ids: Sequence[int]
    ) -> Deferred[DeliveryReport]:
        """
        Tell every connected device of each of C{user_ids} that
        C{reader_id} read C{conversation} up to C{seq} (a READ frame).
        """


#: What a login with a device key that is not the device's is told.
_DEVICE_KEY_REFUSED = (
    "the device key is wrong, expired, used already or not this "
    "device's: log in with the password (or the account key)"
)


@dataclass(frozen=True, slots=True)
class Credentials:
    """
    What a request presents to act for a user.

    @ivar token: the bearer token of the C{Authorization} header.
    @ivar secret: the C{X-Cim-Secret} header.
    """

    token: str | None = None
    secret: str | None = None


@dataclass(frozen=True, slots=True)
class Login:
    """
    A successful login: the server the client must connect to, and the
    token it presents there.

    @ivar device_key: the device's new device key (L{Router.login}), or
        C{None} when none was issued.
    """

    account: Account
    server: ServerAddress
    token: str
    device: str = ""
    device_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class ReadState:
    """
    One user's read position in a conversation (C{/readPositions}).
    """

    user_id: int
    read: int


class Router:
    """
    The route's logic over a store, a registry and the delivery core.

    @param probe: checks that a server chosen for a login accepts
        connections.
    @param secret: the cluster secret, which lets its holder act for any
        user.
    @param token_ttl: how long a login token lives, in seconds.
    @param require_password: refuse registrations without a password.
    @param legacy_auth: let the CIM endpoints act for a user without
        credentials, as CIM clients send none, and let anyone log in as (and
        learn the id of) an account without a password, as CIM does.
    @param clock: the clock of the guessing limits; none without one.
    @param login_rate: failed logins or registrations a minute allowed per
        account (L{GuessLimit}).
    @param address_rate: failed logins or registrations a minute allowed per
        client address.
    @param max_devices: how many sessions (devices) one user may hold: a
        login past it drops the least recently active ones.
    @param device_key_ttl: how long a device key lives, in seconds.
    """

    log = Logger()

    def __init__(
        self,
        store: IStore,
        registry: IRegistry,
        delivery: RouteDelivery,
        pusher: IServerControl,
        balancer: Balancer,
        probe: Probe,
        secret: str,
        *,
        token_ttl: float = 86400.0,
        require_password: bool = False,
        legacy_auth: bool = False,
        clock: IReactorTime | None = None,
        login_rate: float = 10.0,
        address_rate: float = 60.0,
        max_devices: int = MAX_DEVICES,
        device_key_ttl: float = DEVICE_KEY_TTL,
    ) -> None:
        self.store = store
        #: The calls of L{online_users} waiting for the store's answer,
        #: while it is asked.
        self._online_waiting: list[Deferred[list[tuple[int, str]]]] | None = None
        self.max_devices = max_devices
        self.device_key_ttl = device_key_ttl
        self.guesses = (
            None if clock is None else GuessLimit(clock, login_rate, address_rate)
        )
        #: Accounts seen, by id: they are never deleted, and their names and
        #: credentials' kinds never change, so existence checks and logins
        #: need not ask the store twice.
        self._accounts: LRUCache[int, Account] = LRUCache(ACCOUNT_CACHE_SIZE)
        self.registry = registry
        self.delivery = delivery
        self.pusher = pusher
        self.balancer = balancer
        self.probe = probe
        self._secret = secret.encode("utf-8")
        self.token_ttl = token_ttl
        self.require_password = require_password
        self.legacy_auth = legacy_auth
        # The log of logins and of new accounts (cim.loglines).
        self._login_lines = Lines(self.log, clock)
        self._account_lines = Lines(self.log, clock)

    def stop(self) -> None:
        """
        Write the log lines waiting (logins and new accounts).
        """
        self._login_lines.stop()
        self._account_lines.stop()

    # Authorization

    def secret_matches(self, given: str) -> bool:
        """
        Whether C{given} is the cluster secret (compared in constant time).
        """
        return bool(self._secret) and hmac.compare_digest(
            given.encode("utf-8"), self._secret
        )

    def authorize(
        self, user_id: int, credentials: Credentials, legacy: bool = False
    ) -> Deferred[TokenInfo | None]:
        """
        Check that the request may act for C{user_id}: it carries the
        cluster secret, or a valid token of that user.  With C{legacy} (a
        CIM endpoint) and C{--legacy-auth}, a request without any credential
        passes too; wrong credentials never do.

        The secret and C{--legacy-auth} are checked here and now (the
        Deferred has fired on return); only a token asks the store.

        @return: a Deferred firing with what the token stands for (its
            device), or C{None} when the request passed by the secret or by
            C{--legacy-auth}; failing with L{ApiError}
            (L{codes.UNAUTHORIZED}).
        """
        try:
            if self.passes_now(credentials, legacy):
                return succeed(None)
        except ApiError:
            return fail()
        return self.verify_token(credentials, user_id)

    def verify_token(
        self, credentials: Credentials, user_id: int
    ) -> Deferred[TokenInfo | None]:
        """
        The part of L{authorize} that asks the store, for a request that
        L{passes_now} did not pass: that its token is one of C{user_id}'s.
        """
        assert credentials.token is not None
        d: Deferred[TokenInfo | None] = self.store.verify_token(credentials.token)
        return d.addCallback(self._token_of, user_id)

    def passes_now(self, credentials: Credentials, legacy: bool = False) -> bool:
        """
        The part of L{authorize} that needs no store: whether the request
        passes by the cluster secret or C{--legacy-auth} (C{False}: it
        carries a token, which only the store can check).

        @raise ApiError: L{codes.UNAUTHORIZED}, when the request is refused
            whatever the store holds.
        """
        if credentials.secret is not None:
            if not self.secret_matches(credentials.secret):
                raise ApiError(codes.UNAUTHORIZED, "the cluster secret is wrong")
            return True
        if credentials.token is not None:
            return False
        if legacy and self.legacy_auth:
            return True
        raise ApiError(
            codes.UNAUTHORIZED,
            "this call needs the user's login token (Authorization: Bearer "
            "<token>) or the cluster secret (X-Cim-Secret)",
        )

    @staticmethod
    def _token_of(info: TokenInfo | None, user_id: int) -> TokenInfo:
        """
        C{info}, the token's, if it is C{user_id}'s.  @raise ApiError:
        L{codes.UNAUTHORIZED}.
        """
        if info is None:
            raise ApiError(
                codes.UNAUTHORIZED,
                "the token is invalid, expired or of an old session: log in again",
            )
        if info.user_id != user_id:
            raise ApiError(
                codes.UNAUTHORIZED, f"the token does not belong to user {user_id}"
            )
        return info

    async def account(self, user_id: int, field: str = "userId") -> Account:
        """
        @raise ApiError: L{codes.INVALID_ARGUMENT} when there is no such user.
        """
        known = self._accounts.get(user_id)
        if known is not None:
            return known
        account: Account | None = await self.store.get_account(user_id)
        if account is None:
            raise ApiError(codes.INVALID_ARGUMENT, f"{field}: no user {user_id}")
        self._accounts[user_id] = account
        return account

    # Accounts and sessions

    async def register(
        self,
        user_name: str,
        password: str | None,
        account_key: str | None = None,
        address: str | None = None,
    ) -> tuple[Account, str | None]:
        """
        Create an account, or return the existing one of that name (by
        L{cim.names.name_key}) when the request proves it owns it: its
        password, or its account key.  With C{--legacy-auth}, an existing
        account without a password is returned to anyone (CIM's open
        behaviour).

        An account created without a password gets a new random account key,
        the credential its client logs in with; the store keeps its hash.

        @param account_key: the key the client holds for this name (proof).
        @param address: the client's address, for the guessing limit.
        @return: the account, and the new account key when this call created
            the account without a password (else C{None}).
        @raise ApiError: L{codes.INVALID_ARGUMENT} without a password under
            C{--require-password}; L{codes.CONFLICT} when the name is taken
            and not proven; L{codes.RATE_LIMITED}.
        """
        if password is None and self.require_password:
            raise ApiError(codes.INVALID_ARGUMENT, "password is required")
        subject = ("name", name_key(user_name))
        self._check_rate(
            subject, address, guessable=not account_key or password is not None
        )
        new_key = None if password is not None else secrets.token_urlsafe(32)
        account: Account = await self.store.register(user_name, password, new_key)
        # A new account's first login usually follows at once: it need not
        # ask the store for what the registration just wrote.
        self._accounts[account.user_id] = replace(account, created=False)
        if account.created:
            self._account_lines.add(
                f"Account {account.user_id} ({account.user_name}) created"
            )
            return account, new_key
        if self.legacy_auth and not account.has_password:
            return account, None
        if await self._owns(account, password, account_key):
            return account, None
        self._failed(subject, address)
        raise ApiError(
            codes.CONFLICT,
            f"the user name {user_name!r} is taken: registering it again needs "
            "its password or its account key",
        )

    async def _owns(
        self, account: Account, password: str | None, account_key: str | None
    ) -> bool:
        """
        Whether C{password} or C{account_key} is the account's.
        """
        if password is not None and account.has_password:
            if await self.store.check_password(account.user_id, password):
                return True
        if account_key is not None and account.has_key:
            if await self.store.check_account_key(account.user_id, account_key):
                return True
        return False

    def _check_rate(
        self, subject: object, address: str | None, guessable: bool = True
    ) -> None:
        if self.guesses is not None:
            self.guesses.check(subject, address, guessable)

    def _failed(self, subject: object, address: str | None) -> None:
        if self.guesses is not None:
            self.guesses.failed(subject, address)

    async def login(
        self,
        user_id: int,
        user_name: str,
        password: str | None,
        token: str | None,
        credentials: Credentials,
        account_key: str | None = None,
        address: str | None = None,
        device: str = "",
        device_key: str | None = None,
        issue_device_key: bool = False,
    ) -> Login:
        """
        Log one of a user's devices in: check the account and the request's
        proof, pick a reachable server, claim the device's session there and
        issue a token for it.

        The proof is the cluster secret, the account's password or account
        key, the device's device key, or a valid token of the user (see
        L{_proof}).  Without one the
        login is refused (L{codes.ACCOUNT_MISMATCH}) unless C{--legacy-auth}
        is on; then (CIM's behaviour) a user who already holds any session
        is refused with L{codes.REPEAT_LOGIN}.  A login with a proof
        replaces the device's session (connected or only claimed: a login
        that never connected cannot lock the owner out), and past
        C{max_devices} sessions drops the user's least recently active
        ones; each dropped session's server is asked to close its
        connection (L{KICK_REPLACED}, L{KICK_DEVICE_LIMIT}).  Nothing is
        left behind when a step fails.

        Device keys: with C{issue_device_key} (cim's clients, which read
        the extended reply) a login that names a C{device} gets a new random
        device key for it, replacing the device's older one (so a key used
        to log in works once); the store keeps its hash for
        C{device_key_ttl} seconds.  A login with a device key that is not
        given a new one (a reply that could not carry it) drops it.  The
        device keys of the devices the limit drops are dropped.

        @param address: the client's address, for the guessing limit.
        @param device: the client's device id (C{""}: a client naming none,
            such as CIM's).
        @param device_key: the device key the client holds for C{device}
            (a proof).
        @param issue_device_key: issue the device a new device key.
        @raise ApiError: L{codes.ACCOUNT_MISMATCH}, L{codes.REPEAT_LOGIN},
            L{codes.NO_SERVER}, L{codes.UNAUTHORIZED}, L{codes.RATE_LIMITED}.
        """
        subject = ("user", user_id)
        unguessable = (
            account_key
            or device_key
            or token
            or credentials.token
            or credentials.secret
        )
        self._check_rate(
            subject, address, guessable=not unguessable or password is not None
        )
        account = self._accounts.get(user_id)
        if account is None:
            account = await self.store.get_account(user_id)
            if account is not None:
                self._accounts[user_id] = account
        if account is None or (
            # The same name has the same key: most logins spare computing it.
            account.user_name != user_name
            and name_key(account.user_name) != name_key(user_name)
        ):
            self._failed(subject, address)
            raise ApiError(
                codes.ACCOUNT_MISMATCH,
                f"userId {user_id} and userName {user_name!r} do not match an account",
            )
        try:
            proof = await self._proof(
                account, password, token, credentials, account_key, device, device_key
            )
        except ApiError as e:
            if e.code == codes.ACCOUNT_MISMATCH:
                self._failed(subject, address)
            raise
        if not proof:
            held: list[Session] = await self.store.user_sessions(user_id)
            if held:
                raise self._repeat_login(user_id)
        server = await self._pick_server(user_id)
        new_key = secrets.token_urlsafe(32) if device and issue_device_key else None
        # Claim, token and device keys: one store call, all or nothing.
        try:
            session, dropped, issued = await self.store.open_session(
                user_id,
                account.user_name,
                str(server),
                claim_ttl=CLAIM_TTL,
                token_ttl=self.token_ttl,
                replace=proof,
                device=device,
                max_devices=self.max_devices,
                device_key=new_key,
                device_key_ttl=self.device_key_ttl,
                used_device_key=device_key if device else None,
            )
        except SessionExists:
            raise self._repeat_login(user_id) from None
        except DeviceKeyUsed:
            # Another login with the same key got in first.
            self._failed(subject, address)
            raise ApiError(codes.ACCOUNT_MISMATCH, _DEVICE_KEY_REFUSED) from None
        for old in dropped:
            self.kick(old, KICK_REPLACED if old.device == device else KICK_DEVICE_LIMIT)
        self._login_lines.add(
            f"{user_id} ({account.user_name}) logs in on {server}"
            + (f" from device {device}" if device else "")
        )
        return Login(account, server, issued, device, new_key)

    @staticmethod
    def _repeat_login(user_id: int) -> ApiError:
        return ApiError(
            codes.REPEAT_LOGIN,
            f"user {user_id} is already logged in; log off first, or prove "
            "it is you with the password or the current token",
        )

    async def _proof(
        self,
        account: Account,
        password: str | None,
        token: str | None,
        credentials: Credentials,
        account_key: str | None = None,
        device: str = "",
        device_key: str | None = None,
    ) -> bool:
        """
        Whether the login request proves it comes from the account's owner:
        the cluster secret, the account's password or account key, the
        device key of the request's C{device}, or a still valid token of the
        user (in the body or the bearer header).

        Without C{--legacy-auth} a login needs one of these; with it, only
        an account with a password does.

        @raise ApiError: L{codes.ACCOUNT_MISMATCH} for a wrong password,
            account key or device key (another device's, an old or expired
            one, one without its device), or a missing proof where one is needed (the
            message says which credential the account takes);
            L{codes.UNAUTHORIZED} for a wrong cluster secret.
        """
        if credentials.secret is not None:
            if not self.secret_matches(credentials.secret):
                raise ApiError(codes.UNAUTHORIZED, "the cluster secret is wrong")
            return True
        if account.has_password and password is not None:
            if await self.store.check_password(account.user_id, password):
                return True
            raise ApiError(codes.ACCOUNT_MISMATCH, "the password is wrong")
        if account.has_key and account_key is not None:
            if await self.store.check_account_key(account.user_id, account_key):
                return True
            raise ApiError(codes.ACCOUNT_MISMATCH, "the account key is wrong")
        if device_key is not None:
            if device and await self.store.check_device_key(
                account.user_id, device, device_key
            ):
                return True
            raise ApiError(codes.ACCOUNT_MISMATCH, _DEVICE_KEY_REFUSED)
        for candidate in (token, credentials.token):
            if candidate:
                info = await self.store.verify_token(candidate)
                if info is not None and info.user_id == account.user_id:
                    return True
        if account.has_password:
            raise ApiError(
                codes.ACCOUNT_MISMATCH,
                "this account has a password: give it (or the current token)",
            )
        if self.legacy_auth:
            return False
        if account.has_key:
            raise ApiError(
                codes.ACCOUNT_MISMATCH,
                "this account logs in with its account key (accountKey), which "
                "the client that created it keeps in its state folder, or with "
                "a current token of the user",
            )
        raise ApiError(
            codes.ACCOUNT_MISMATCH,
            "this account was created without any credential: only a current "
            "token of the user or the cluster secret can log it in",
        )

    async def _pick_server(self, user_id: int) -> ServerAddress:
        """
        The first server of the balancer's candidates that accepts
        connections.

        @raise ApiError: L{codes.NO_SERVER}.
        """
        servers = self.registry.servers()
        if not servers:
            raise ApiError(codes.NO_SERVER, "no IM server is registered")
        for server in self.balancer.candidates(user_id, servers):
            if await self._reachable(server):
                return server
            self.log.warn("IM server {server} is unreachable", server=str(server))
        raise ApiError(
            codes.NO_SERVER, f"none of the {len(servers)} IM servers is reachable"
        )

    async def _reachable(self, server: ServerAddress) -> bool:
        try:
            return bool(await self.probe(server))
        except CancelledError:
            raise
        except Exception:
            self.log.failure("Probing {server} failed", server=str(server))
            return False

    def kick(
        self, session: Session, reason: str, logged_off: bool = False
    ) -> Deferred[None]:
        """
        Ask the server of C{session} to close the connection of that
        session.  @return: a Deferred firing when the server answered (or
        failed to: a failure is only logged); callers may leave it running.
        """

        def failed(failure: Failure) -> None:
            self.log.warn(
                "Could not ask {server} to drop {user_id}'s old connection: {error}",
                server=session.server,
                user_id=session.user_id,
                error=failure.getErrorMessage(),
            )

        try:
            d = self.pusher.kick(
                session.server,
                session.user_id,
                session.session_id,
                reason,
                logged_off,
            )
        except Exception:
            failed(Failure())
            return succeed(None)
        return d.addCallbacks(lambda _: None, failed)

    async def log_off(self, user_id: int, device: str | None = None) -> bool:
        """
        Release the sessions of the user's C{device} (C{None}: all its
        devices), each only if it is still the device's (compare-and-delete),
        forget their device keys, and ask their servers to close the
        connections.

        @return: whether there was a session to release.
        """
        if device is None:
            sessions: list[Session] = await self.store.user_sessions(user_id)
        else:
            session: Session | None = await self.store.get_session(user_id, device)
            sessions = [] if session is None else [session]
        # Logging off a device forgets its device key: its next login needs
        # the password (or the account key).
        devices = {device} if device is not None else {s.device for s in sessions}
        for each in sorted(devices - {""}):
            await self.store.drop_device_key(user_id, each)
        released = False
        for session in sessions:
            if await self.store.release_session(
                user_id, session.session_id, session.device
            ):
                released = True
                # Answer once the server closed the connection and saved its
                # cursors: what a CIM client was sent counts as received,
                # and a login right after this one must not get it again.
                await self.kick(session, KICK_LOGGED_OFF, logged_off=True)
        return released

    def online_users(self) -> Deferred[list[tuple[int, str]]]:
        """
        The users with a device connected (C{/onlineUser}, which anyone
        may call).  The store reads every online user for it, so the calls
        made while it reads wait for that read and share its answer: a
        flood of calls costs the store one read at a time, never several
        at once.  The list is shared: not to be changed.
        """
        # Each call gets a Deferred of its own: one cancelled (its request
        # went away) leaves the answer to the others.
        d: Deferred[list[tuple[int, str]]] = Deferred()
        if self._online_waiting is not None:
            self._online_waiting.append(d)
            return d
        self._online_waiting = [d]
        self.store.online_users().addBoth(self._online_answered)
        return d

    def _online_answered(self, answer: list[tuple[int, str]] | Failure) -> None:
        waiting, self._online_waiting = self._online_waiting or [], None
        for d in waiting:
            if isinstance(answer, Failure):
                d.errback(answer)
            else:
                d.callback(answer)

    async def fetch_offline(self, user_id: int) -> None:
        """
        Ask the servers of the user's connected devices to send them the
        stored messages they have not got.

        @raise ApiError: L{codes.OFFLINE_USER} when no device of the user is
            connected; L{codes.OFFLINE_FETCH_ERROR} when a server fails.
        """
        sessions: list[Session] = await self.store.user_sessions(user_id)
        servers = sorted({s.server for s in sessions if s.connected})
        if not servers:
            raise ApiError(codes.OFFLINE_USER, f"user {user_id} is not connected")
        answers = [await self._resync(server, user_id) for server in servers]
        if all(code == codes.OFFLINE_USER for code in answers):
            raise ApiError(codes.OFFLINE_USER, f"user {user_id} is not connected")
        for server, code in zip(servers, answers, strict=True):
            if code not in (codes.SUCCESS, codes.OFFLINE_USER):
                raise ApiError(
                    codes.OFFLINE_FETCH_ERROR,
                    f"the server {server} did not answer"
                    if code is None
                    else f"the server {server} answered {code}",
                )

    async def _resync(self, server: str, user_id: int) -> str | None:
        """
        Ask C{server} to resync the user's devices there.

        @return: the code it answered (C{None}: it did not answer).
        """
        try:
            reply = await self.pusher.resync(server, user_id)
        except CancelledError:
            raise
        except Exception as e:
            self.log.warn(
                "Resync of {user_id} on {server} failed: {error}",
                user_id=user_id,
                server=server,
                error=str(e),
            )
            return None
        code = reply.get("code") if isinstance(reply, dict) else None
        return str(code)

    # Messages

    @staticmethod
    def _messages(
        sender: Account,
        conversation: str,
        texts: Sequence[str],
        client_msg_id: str,
        **target: Any,
    ) -> list[NewMessage]:
        """
        The messages of one send by C{sender} (L{NewMessage.of_send}).
        """
        return NewMessage.of_send(
            conversation,
            sender.user_id,
            sender.user_name,
            texts,
            client_msg_id,
            **target,
        )

    async def broadcast(self, user_id: int, text: str) -> ChatMessage:
        """
        CIM's group chat: store C{text} once in the L{BROADCAST}
        conversation and deliver it to every other online user.
        """
        sender = await self.account(user_id)
        stored = await self.delivery.append(
            self._messages(sender, BROADCAST, [text], "")
        )
        online = await self.store.online_users()
        recipients = [uid for uid, _ in online if uid != user_id]
        if recipients:
            report = await self.delivery.deliver(stored, recipients)
            self._report("broadcast", report)
        return stored[-1]

    def send_private(
        self,
        user_id: int,
        receiver_id: int,
        texts: Sequence[str],
        client_msg_id: str = "",
    ) -> Deferred[tuple[ChatMessage, bool]]:
        """
        Store C{texts} (in order) in the private conversation of the sender
        and the receiver (L{pair_conversation}), then deliver them to every
        connected device of both (the sender's other devices see what it
        sent; the sending one keeps its stream without gaps).

        The route's busiest call: when both accounts are known already,
        the store call is made at once, with no coroutine on the way.

        @return: a Deferred firing with the last stored message, and whether
            it reached a device of the receiver; failing with L{ApiError}
            (L{codes.INVALID_ARGUMENT}) when either user does not exist.
        """
        accounts = self._accounts
        sender = accounts.get(user_id)
        if sender is None or accounts.get(receiver_id) is None:
            return Deferred.fromCoroutine(
                self._load_and_send(user_id, receiver_id, texts, client_msg_id)
            )
        return self._send_private(sender, receiver_id, texts, client_msg_id)

    async def _load_and_send(
        self,
        user_id: int,
        receiver_id: int,
        texts: Sequence[str],
        client_msg_id: str,
    ) -> tuple[ChatMessage, bool]:
        sender = await self.account(user_id)
        await self.account(receiver_id, "receiveUserId")
        return await self._send_private(sender, receiver_id, texts, client_msg_id)

    def _send_private(
        self,
        sender: Account,
        receiver_id: int,
        texts: Sequence[str],
        client_msg_id: str,
    ) -> Deferred[tuple[ChatMessage, bool]]:
        user_id = sender.user_id
        users = [user_id] if receiver_id == user_id else [user_id, receiver_id]
        return _PrivateSend(self.delivery, users, receiver_id).start(
            self._messages(
                sender,
                pair_conversation(user_id, receiver_id),
                texts,
                client_msg_id,
                receive_user_id=receiver_id,
            )
        )

    def _report(self, what: str, report: DeliveryReport) -> None:
        if report.failed:
            self.log.warn(
                "{what}: {count} recipients could not be reached now "
                "(they get the message from the store later)",
                what=what,
                count=len(report.failed),
            )

    # Groups

    async def create_group(
        self,
        user_id: int,
        group_id: str,
        policy: str = DEFAULT_POLICY,
        history: str = DEFAULT_HISTORY,
    ) -> None:
        """
        Create a group owned by C{user_id}, its first member.

        @raise ApiError: L{codes.CONFLICT} when the group exists.
        """
        await self.account(user_id)
        try:
            await self.store.create_group(group_id, user_id, policy, history)
        except GroupExists:
            raise ApiError(codes.CONFLICT, f"the group {group_id} exists") from None

    async def _info(self, group_id: str, user_id: int = 0) -> GroupInfo:
        """
        @raise ApiError: L{codes.INVALID_ARGUMENT} when there is no such group.
        """
        try:
            info: GroupInfo = await self.store.group_info(group_id, user_id)
        except NoSuchGroup:
            raise self._no_group(group_id) from None
        return info

    async def _owned(self, user_id: int, group_id: str) -> GroupInfo:
        """
        The group, which C{user_id} must own.

        @raise ApiError: L{codes.INVALID_ARGUMENT} (no such group),
            L{codes.UNAUTHORIZED} (not its owner, or it has none).
        """
        info = await self._info(group_id, user_id)
        if info.owner_id is None:
            raise ApiError(
                codes.UNAUTHORIZED,
                f"the group {group_id} has no owner (it was created before groups "
                "had owners): it is open, and nobody manages it",
            )
        if info.owner_id != user_id:
            raise ApiError(
                codes.UNAUTHORIZED,
                f"only the owner of {group_id} (user {info.owner_id}) may do this",
            )
        return info

    async def _admit(self, group_id: str, user_id: int) -> bool:
        """
        Make C{user_id} a member from the group's last message on: its read
        position is set there (before the join, so that nothing sent after
        it can be skipped: the devices' streams of a group joined since
        their login start from the read position), and so does what its
        C{/history} may read (unless the group's history is C{full}).
        """
        conversation = group_conversation(group_id)
        last: int = await self.store.last_seq(conversation)
        await self.store.set_read(user_id, conversation, last)
        try:
            joined: bool = await self.store.join_group(group_id, user_id, last)
        except NoSuchGroup:
            raise self._no_group(group_id) from None
        return joined

    async def join_group(self, user_id: int, group_id: str) -> tuple[bool, bool]:
        """
        Join a group, as its policy allows: an C{open} group (or one from
        before owners) takes anyone; an C{invite} group the users its owner
        invited; an C{approval} group the invited, and records anyone
        else's request for the owner to approve.

        @return: whether the user joined now (C{False}: already a member, or
            waiting), and whether its request waits for the owner.
        @raise ApiError: L{codes.UNAUTHORIZED} (not invited),
            L{codes.CONFLICT} (too many requests waiting),
            L{codes.INVALID_ARGUMENT} (no such group).
        """
        await self.account(user_id)
        info = await self._info(group_id, user_id)
        if info.member:
            return False, False
        if info.policy == "open" or info.invited:
            return await self._admit(group_id, user_id), False
        if info.policy != "approval":
            raise ApiError(
                codes.UNAUTHORIZED,
                f"the group {group_id} is by invitation only: its owner (user "
                f"{info.owner_id}) must invite you first",
            )
        try:
            await self.store.ask_to_join(group_id, user_id, MAX_JOIN_REQUESTS)
        except TooManyJoinRequests:
            raise ApiError(
                codes.CONFLICT,
                f"the group {group_id} has {MAX_JOIN_REQUESTS} requests waiting "
                "for its owner: try again later",
            ) from None
        return False, True

    async def leave_group(self, user_id: int, group_id: str) -> bool:
        """
        Leave a group; its owner cannot (it hands the group over first).

        @raise ApiError: L{codes.CONFLICT} for the owner.
        """
        info = await self._info(group_id, user_id)
        if info.owner_id == user_id:
            raise ApiError(
                codes.CONFLICT,
                f"the owner cannot leave {group_id}: hand it over to another "
                "member first (/group/transfer)",
            )
        try:
            left: bool = await self.store.leave_group(group_id, user_id)
        except NoSuchGroup:
            raise self._no_group(group_id) from None
        if left:
            await self.store.forget_cursors(user_id, group_conversation(group_id))
        return left

    async def group_info(self, user_id: int, group_id: str) -> GroupInfo:
        """
        A group's owner, policy, history mode and member count, for its
        members, the users invited or asking to join, and anyone when the
        group is open.

        @raise ApiError: L{codes.UNAUTHORIZED} for anyone else.
        """
        info = await self._info(group_id, user_id)
        if not (info.member or info.invited or info.requested):
            if info.policy != "open":
                raise ApiError(
                    codes.UNAUTHORIZED,
                    f"user {user_id} is not a member of {group_id}, which is not open",
                )
        return info

    async def _other(self, group_id: str, user_id: int, field: str) -> GroupInfo:
        """
        Where another user (named by C{field}) stands in the group.

        @raise ApiError: L{codes.INVALID_ARGUMENT} when there is no such user.
        """
        await self.account(user_id, field)
        return await self._info(group_id, user_id)

    async def invite(self, user_id: int, group_id: str, invitee_id: int) -> bool:
        """
        The owner invites C{invitee_id}: the invitation lets it join (an
        C{approval} group without a request), once.

        @return: C{False} if it was invited already.
        @raise ApiError: L{codes.UNAUTHORIZED} (not the owner),
            L{codes.CONFLICT} (already a member).
        """
        await self._owned(user_id, group_id)
        if (await self._other(group_id, invitee_id, "inviteeId")).member:
            raise ApiError(
                codes.CONFLICT, f"user {invitee_id} is a member of {group_id} already"
            )
        try:
            invited: bool = await self.store.invite_to_group(group_id, invitee_id)
        except NoSuchGroup:
            raise self._no_group(group_id) from None
        return invited

    async def join_requests(self, user_id: int, group_id: str) -> list[Account]:
        """
        The users waiting for the owner's approval, oldest first.
        """
        await self._owned(user_id, group_id)
        try:
            waiting: list[int] = await self.store.join_requests(group_id)
        except NoSuchGroup:
            raise self._no_group(group_id) from None
        return await self._accounts_of(waiting)

    async def _requested(self, user_id: int, group_id: str, requester_id: int) -> None:
        """
        Check that C{user_id} owns the group and C{requester_id} waits.

        @raise ApiError: L{codes.INVALID_ARGUMENT} when no request waits.
        """
        await self._owned(user_id, group_id)
        if not (await self._other(group_id, requester_id, "requesterId")).requested:
            raise ApiError(
                codes.INVALID_ARGUMENT,
                f"requesterId: user {requester_id} has no request to join "
                f"{group_id} waiting",
            )

    async def approve(self, user_id: int, group_id: str, requester_id: int) -> bool:
        """
        The owner lets a waiting user in, from the group's last message on.
        """
        await self._requested(user_id, group_id, requester_id)
        return await self._admit(group_id, requester_id)

    async def reject(self, user_id: int, group_id: str, requester_id: int) -> bool:
        """
        The owner turns a waiting request down (the user may ask again).
        """
        await self._requested(user_id, group_id, requester_id)
        try:
            dropped: bool = await self.store.drop_join_request(group_id, requester_id)
        except NoSuchGroup:
            raise self._no_group(group_id) from None
        return dropped

    async def remove_member(self, user_id: int, group_id: str, member_id: int) -> bool:
        """
        The owner removes a member (from an C{open} group it may join
        again).

        @return: C{False} if it was not a member.
        @raise ApiError: L{codes.CONFLICT} for the owner itself.
        """
        await self._owned(user_id, group_id)
        if member_id == user_id:
            raise ApiError(
                codes.CONFLICT,
                f"the owner cannot remove itself from {group_id}: hand the group "
                "over first (/group/transfer)",
            )
        await self.account(member_id, "memberId")
        try:
            removed: bool = await self.store.leave_group(group_id, member_id)
        except NoSuchGroup:
            raise self._no_group(group_id) from None
        if removed:
            await self.store.forget_cursors(member_id, group_conversation(group_id))
        return removed

    async def transfer(self, user_id: int, group_id: str, new_owner_id: int) -> None:
        """
        The owner hands the group over to another member.

        @raise ApiError: L{codes.INVALID_ARGUMENT} when the new owner is not
            a member.
        """
        await self._owned(user_id, group_id)
        if not (await self._other(group_id, new_owner_id, "newOwnerId")).member:
            raise ApiError(
                codes.INVALID_ARGUMENT,
                f"newOwnerId: user {new_owner_id} is not a member of {group_id}",
            )
        try:
            await self.store.set_group_owner(group_id, new_owner_id)
        except NoSuchGroup:
            raise self._no_group(group_id) from None

    @staticmethod
    def _no_group(group_id: str) -> ApiError:
        return ApiError(codes.INVALID_ARGUMENT, f"groupId: no group {group_id}")

    async def _accounts_of(self, user_ids: Sequence[int]) -> list[Account]:
        accounts: list[Account | None] = await gatherResults(
            [self.store.get_account(u) for u in user_ids], consumeErrors=True
        )
        return [a for a in accounts if a is not None]

    async def _members_for(self, user_id: int, group_id: str) -> list[int]:
        """
        The members of the group, which C{user_id} must be one of.

        @raise ApiError: L{codes.INVALID_ARGUMENT} (no such group),
            L{codes.UNAUTHORIZED} (not a member).
        """
        try:
            members: list[int] = await self.store.group_members(group_id)
        except NoSuchGroup:
            raise self._no_group(group_id) from None
        if user_id not in members:
            raise ApiError(
                codes.UNAUTHORIZED, f"user {user_id} is not a member of {group_id}"
            )
        return members

    async def group_members(self, user_id: int, group_id: str) -> list[Account]:
        return await self._accounts_of(await self._members_for(user_id, group_id))

    async def send_group(
        self, user_id: int, group_id: str, texts: Sequence[str], client_msg_id: str = ""
    ) -> ChatMessage:
        """
        Store C{texts} in the group's conversation and deliver them to every
        member (the sender too, so that its other views stay complete).
        """
        members = await self._members_for(user_id, group_id)
        sender = await self.account(user_id)
        stored = await self.delivery.append(
            self._messages(
                sender,
                group_conversation(group_id),
                texts,
                client_msg_id,
                group_id=group_id,
            )
        )
        report = await self.delivery.deliver(stored, members)
        self._report(f"group {group_id}", report)
        return stored[-1]

    async def user_groups(self, user_id: int) -> list[str]:
        groups: list[str] = await self.store.user_groups(user_id)
        return groups

    # Conversations and read positions

    async def _conversation(
        self, user_id: int, conversation: str
    ) -> tuple[GroupInfo | None, int | None]:
        """
        Check that C{conversation} is one of the user's: a private one of
        its (L{pair_conversation}), or a group it belongs to.

        @return: the group's L{GroupInfo} (for a group), and the other user
            (for a private conversation; the user itself for its notes).
        @raise ApiError: L{codes.INVALID_ARGUMENT} for an id that names no
            conversation (or an old C{u:} inbox), or an unknown group;
            L{codes.UNAUTHORIZED} for another user's conversation.
        """
        if conversation.startswith(GROUP_PREFIX):
            group_id = conversation[len(GROUP_PREFIX) :]
            info = await self._info(group_id, user_id)
            if not info.member:
                raise ApiError(
                    codes.UNAUTHORIZED, f"user {user_id} is not a member of {group_id}"
                )
            return info, None
        if conversation.startswith(INBOX_PREFIX):
            raise ApiError(
                codes.INVALID_ARGUMENT,
                f"conversation: {conversation} is an old one-sided inbox; a private "
                "conversation is p:<lower id>:<higher id> with both sides: give "
                "the other user as peerId (or that id as conversation)",
            )
        if conversation.startswith(PAIR_PREFIX):
            if pair_members(conversation) is None:
                raise ApiError(
                    codes.INVALID_ARGUMENT,
                    f"conversation: {conversation!r} is not p:<lower id>:<higher id>",
                )
            peer = peer_of(conversation, user_id)
            if peer is None:
                raise ApiError(
                    codes.UNAUTHORIZED,
                    f"{conversation} is not a conversation of user {user_id}",
                )
            return None, peer
        raise ApiError(
            codes.UNAUTHORIZED,
            f"user {user_id} may use its private conversations p:<id>:<id> and "
            "its groups' g:<groupId> only",
        )

    async def history(
        self,
        user_id: int,
        conversation: str | None,
        after_seq: int,
        limit: int,
        *,
        peer_id: int | None = None,
        before_seq: int | None = None,
    ) -> list[ChatMessage]:
        """
        A page of one of the user's conversations (see L{_conversation}),
        named by its id or, for a private one, by the other user
        (C{peer_id}): the messages after C{after_seq} or, with
        C{before_seq}, the latest ones before it (0: the latest), paging
        back.  Of a group, a member reads only the messages after the seq
        at which it joined, unless the group's history is C{full}.

        @raise ApiError: L{codes.INVALID_ARGUMENT} without exactly one of
            C{conversation} and C{peer_id}; see L{_conversation}.
        """
        if (conversation is None) == (peer_id is None):
            raise ApiError(
                codes.INVALID_ARGUMENT,
                "give either conversation (p:<id>:<id> or g:<groupId>) or peerId "
                "(the other user of a private conversation)",
            )
        if peer_id is not None:
            await self.account(peer_id, "peerId")
            conversation = pair_conversation(user_id, peer_id)
        assert conversation is not None
        info, _ = await self._conversation(user_id, conversation)
        if info is not None and info.history != "full":
            after_seq = max(after_seq, info.joined_at)
        messages: list[ChatMessage]
        if before_seq is None:
            messages = await self.store.read(conversation, after_seq, limit)
        else:
            messages = await self.store.read_before(conversation, before_seq, limit)
            messages = [m for m in messages if m.seq > after_seq]
        return messages

    async def conversations(
        self, user_id: int
    ) -> list[tuple[ConversationState, Account | None]]:
        """
        Where the user stands in each of its private conversations that
        hold messages and in each of its groups.

        @return: each L{ConversationState}, with the other user's account
            for a private conversation (C{None} for a group, or an unknown
            peer).
        """
        await self.account(user_id)
        states: list[ConversationState] = await self.store.conversations(user_id)
        out: list[tuple[ConversationState, Account | None]] = []
        for state in states:
            peer = None
            if state.peer_id:
                try:
                    peer = await self.account(state.peer_id)
                except ApiError:
                    peer = None
            out.append((state, peer))
        return out

    async def read(self, user_id: int, conversation: str, seq: int) -> int:
        """
        Raise the user's read position in one of its conversations to
        C{seq} (never lowering it; at most the last seq), and tell every
        connected device of the user and, in a private conversation, of
        the other user (read receipts).  Group members' positions are not
        pushed (L{read_positions} answers them).

        @return: the user's read position after the call.
        """
        _, peer = await self._conversation(user_id, conversation)
        position: int = await self.store.set_read(user_id, conversation, seq)
        told = [user_id] if peer is None or peer == user_id else [user_id, peer]
        try:
            report: DeliveryReport = await self.delivery.deliver_read(
                user_id, conversation, position, told
            )
            self._report(f"read position in {conversation}", report)
        except CancelledError:
            raise
        except Exception:
            self.log.failure(
                "Telling the devices of {users} about a read position failed",
                users=told,
            )
        return position

    async def read_positions(self, user_id: int, conversation: str) -> list[ReadState]:
        """
        The read positions of the members of one of the user's groups, or
        of both users of one of its private conversations, by user id.
        """
        info, peer = await self._conversation(user_id, conversation)
        if info is not None:
            users = await self._members_for(user_id, info.group_id)
        else:
            assert peer is not None
            users = sorted({user_id, peer})
        positions: dict[int, int] = await self.store.read_positions(conversation, users)
        return [ReadState(u, positions.get(u, 0)) for u in users]

    async def devices(self, user_id: int) -> list[Session]:
        """
        The user's sessions, one per device (claimed or connected), ordered
        by device.
        """
        await self.account(user_id)
        sessions: list[Session] = await self.store.user_sessions(user_id)
        return sessions

    # Health

    async def health(self) -> dict[str, Any]:
        """
        The registered servers and whether the store answers (when it can
        be pinged).
        """
        store = "ok"
        ping = getattr(self.store, "ping", None)
        if ping is not None:
            try:
                await ping()
            except CancelledError:
                raise
            except Exception as e:
                store = f"unreachable: {e}"
        return {
            "servers": [str(s) for s in self.registry.servers()],
            "registry": "connected" if self.registry.connected else "disconnected",
            "store": store,
        }


class _PrivateSend:
    """
    One L{Router.send_private} under way: the append, then the delivery,
    each answering this object's one Deferred (L{result}) by a plain
    callback, not by a chain of Deferreds returned from callbacks (the
    route's busiest call; each such link costs a pause and a resumption of
    the chain).  Cancelling L{result} cancels the step in progress, as a
    chain would.
    """

    __slots__ = ("delivery", "users", "receiver_id", "result", "_step", "_stored")

    def __init__(
        self, delivery: RouteDelivery, users: list[int], receiver_id: int
    ) -> None:
        self.delivery = delivery
        self.users = users
        self.receiver_id = receiver_id
        self.result: Deferred[tuple[ChatMessage, bool]] = Deferred(self._cancel)
        self._step: Deferred[Any] | None = None
        self._stored: list[ChatMessage] = []

    def start(self, messages: list[NewMessage]) -> Deferred[tuple[ChatMessage, bool]]:
        """
        Append C{messages}, then deliver them.  @return: L{result}.
        """
        try:
            step: Deferred[Any] = self.delivery.append(messages)
        except Exception:
            self.result.errback()
            return self.result
        self._step = step
        step.addCallbacks(self._appended, self._failed)
        return self.result

    def _appended(self, stored: list[ChatMessage]) -> None:
        self._stored = stored
        try:
            step: Deferred[Any] = self.delivery.deliver(stored, self.users)
        except Exception:
            self._failed(Failure())
            return
        self._step = step
        step.addCallbacks(self._delivered, self._failed)

    def _delivered(self, report: DeliveryReport) -> None:
        self._step = None
        self.result.callback((self._stored[-1], self.receiver_id in report.delivered))

    def _failed(self, failure: Failure) -> None:
        self._step = None
        self.result.errback(failure)

    def _cancel(self, result: Deferred[Any]) -> None:
        step = self._step
        if step is not None:
            step.cancel()
