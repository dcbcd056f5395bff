"""
The cim client library: log in through the route, hold a TCP connection to
the assigned IM server, send and receive chat, and survive everything a
network does to a connection.

What it guarantees:

  - every send is stored exactly once: it carries a client message id
    (uuid4 hex) and is written again after a reconnect until the server
    acknowledges it, and the server stores one message per id;
  - every message is shown exactly once and in order: the client keeps,
    per conversation, the position of the server's stream (epoch and seq)
    and the highest seq seen of each epoch, drops anything at or below it,
    sends the positions when it logs in so that the server replays exactly
    what is missing, and keeps them in a file so that a restarted client
    resumes; when the server's store lost messages, the listener is told
    (L{IClientListener.conversation_reset}) and nothing is shown twice;
  - it is one device of its user (C{device}, else an id kept in the state
    folder): the user may be logged in on several, each receiving every
    message of the user's conversations, its own included; read positions
    go to the other devices and to the peers of private conversations
    (L{Client.mark_read}, L{IClientListener.read_changed}), and unread
    counts are kept live (L{Client.conversations}, L{Client.unread});
  - a dead connection is noticed (heartbeat) and replaced through the route,
    with exponential backoff, until L{Client.close}.

L{Client} is the façade over the parts that do this: the session
(L{cim.client.session}: logging in, the connection, reconnecting), the
outbox (L{cim.client.outbox}: pending sends), the inbox
(L{cim.client.inbox}: dedup, cursors, acknowledgements, read state), and
the listener
(L{cim.client.listeners}), which receives what happens.

Everything runs on the reactor thread; the reactor is injected, so tests
drive the timers with L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

import random as _random
from pathlib import Path

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool

from cim.client.connection import ClientProtocol
from cim.client.cursors import CursorFile, state_path
from cim.client.devicekeys import DeviceKeys
from cim.client.devices import DeviceIds, account_tag, new_device_id
from cim.client.errors import ClientClosed, LoginError, NotLoggedIn, SendError
from cim.client.inbox import Inbox
from cim.client.keys import AccountKeys
from cim.client.listeners import (
    Ack,
    ClientListener,
    ClientState,
    IClientListener,
    ListenerGuard,
    QueueListener,
)
from cim.client.outbox import Outbox
from cim.client.reads import ConversationInfo
from cim.client.route import GroupInfo, JoinResult, RouteClient, RouteError, User
from cim.client.session import Session, reconnect_delays
from cim.limits import DEVICE_ID, DEVICE_ID_RULE
from cim.message import (
    GROUP_PREFIX,
    PAIR_PREFIX,
    ChatMessage,
    Command,
    ErrorCode,
    Frame,
    pair_conversation,
)
from cim.names import name_key
from cim.web import http_client

__all__ = [
    "Ack",
    "Client",
    "ClientClosed",
    "ClientListener",
    "ClientState",
    "ConversationInfo",
    "GroupInfo",
    "IClientListener",
    "JoinResult",
    "LoginError",
    "NotLoggedIn",
    "QueueListener",
    "RouteError",
    "SendError",
    "User",
]


class Client:
    """
    A cim user's connection to a cluster.

    Typical use::

        client = Client(reactor, "http://127.0.0.1:8083", listener=listener)
        await client.login("alice")
        ack = await client.send_private(bob_id, "hi")
        await client.close()
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
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
        ca_file: str | None = None,
        device: str | None = None,
    ) -> None:
        """
        @param reactor: provides L{IReactorTime} and L{IReactorTCP}: every
            timer and connection goes through it.
        @param route_url: the route's base URL.
        @param http: the treq client for the route; by default a new one
            with a persistent pool (closed by L{close}).
        @param listener: receives messages and events (see
            L{IClientListener}); none by default.
        @param state_dir: where the cursor files (one per user and device),
            the account keys (L{cim.client.keys}) and the device ids
            (L{cim.client.devices}) are kept; C{None} keeps them in memory
            only.
        @param ack_delay: receive acknowledgements are coalesced: at most
            one ACK frame per this many seconds.
        @param backoff_base: the first reconnect delay, doubled after each
            failed attempt up to C{backoff_max}, each varied by +/- C{jitter}
            (a fraction), never over C{backoff_max}.
        @param close_timeout: how long L{close} waits for the
            acknowledgements of sends already written.
        @param ca_file: a PEM file of the CAs that the route's (for an
            C{https://} C{route_url}) and the IM servers' certificates must
            be signed by; the system's CAs when C{None}.  A certificate that
            does not verify, or is not for the host called, fails the login
            with a L{LoginError} that says so.
        @param device: this client's device id (L{cim.limits.DEVICE_ID_RULE}):
            a new login of the same device replaces its session, and each
            device of a user has its own cursors.  By default one kept in
            the state folder per route and account (a restarted client is
            the same device), or a random one per L{Client} without a state
            folder.
        @raise ValueError: C{ca_file} cannot be read, or C{device} is not a
            device id.
        """
        if device is not None and not DEVICE_ID.fullmatch(device):
            raise ValueError(f"bad device id {device!r}: {DEVICE_ID_RULE}")
        self.reactor = reactor
        self.state_dir = Path(state_dir).expanduser() if state_dir is not None else None
        self.close_timeout = close_timeout
        self._pool: HTTPConnectionPool | None = None
        if http is None:
            http, self._pool = http_client(reactor, per_host=2, ca_file=ca_file)
        self.route = RouteClient(reactor, http, route_url, timeout=http_timeout)
        self._keys = AccountKeys(self.state_dir)
        self._device_keys = DeviceKeys(self.state_dir)
        #: Where this login keeps its device key, if it keeps one.
        self._held_device_key: _HeldDeviceKey | None = None
        self._devices = DeviceIds(self.state_dir)
        self._device_given = device
        self._device = ""
        self._account_key = ""
        self._events = ListenerGuard(listener)
        self._inbox = Inbox(
            reactor,
            self._events,
            ack_delay=ack_delay,
            save_interval=cursor_save_interval,
        )
        self._outbox = Outbox(reactor, self._events)
        self._session = Session(
            reactor,
            self.route,
            self._inbox,
            self._outbox,
            self._events,
            reconnect_delays(
                backoff_base, backoff_max, jitter, rng or _random.Random()
            ),
            heartbeat_interval=heartbeat_interval,
            idle_timeout=idle_timeout,
            pong_timeout=pong_timeout,
            login_timeout=login_timeout,
            ca_file=ca_file,
        )

    # State

    @property
    def listener(self) -> IClientListener | None:
        """
        Receives messages and events; may be replaced at any time.
        """
        return self._events.listener

    @listener.setter
    def listener(self, listener: IClientListener | None) -> None:
        self._events.listener = listener

    @property
    def state(self) -> ClientState:
        """
        The current L{ClientState}.
        """
        return self._session.state

    @property
    def ready(self) -> bool:
        """
        Whether the client is logged in on an IM server right now.
        """
        return self._session.state == ClientState.READY

    @property
    def user_id(self) -> int | None:
        """
        Set by L{login}.
        """
        return self._session.user_id

    @property
    def user_name(self) -> str:
        """
        Set by L{login}.
        """
        return self._session.user_name

    @property
    def server(self) -> tuple[str, int] | None:
        """
        C{(host, port)} of the IM server of the current (or last)
        connection, or C{None}.
        """
        return self._session.server

    @property
    def token(self) -> str:
        """
        The current login token (the bearer token for the route), or C{""}.
        """
        return self._session.token

    @property
    def device(self) -> str:
        """
        This client's device id: the one given, else (once L{login} picked
        it) the one kept in the state folder or a random one; C{""} before.
        """
        return self._device

    @property
    def cursors(self) -> CursorFile:
        """
        The receive cursors of the logged-in user.
        """
        return self._inbox.cursors

    @property
    def _protocol(self) -> ClientProtocol | None:
        # The current connection, for tests and the soak test that drop it.
        return self._session.protocol

    # Public API

    async def register(
        self,
        user_name: str,
        password: str | None = None,
        account_key: str | None = None,
    ) -> User:
        """
        Create the account C{user_name}, or get the id of the existing one
        by proving it is ours: its password, or its account key
        (C{account_key}, else the one kept in the state folder).

        A new account without a password comes with an account key, its
        credential: it is kept in the state folder (and in memory), by
        route URL and account, and used by every later login.

        @raise RouteError: the route refused (C{4090}: the name is taken,
            and neither a password nor a key of ours proves it is ours).
        """
        if account_key is None:
            held = self._keys.get(self.route.url, user_name)
            account_key = held.key if held is not None else ""
        account = await self.route.register(user_name, password, account_key)
        if account.account_key:
            self._keep_key(account.user_name, account.user_id, account.account_key)
        return account

    def _keep_key(self, user_name: str, user_id: int, key: str) -> None:
        try:
            self._keys.put(self.route.url, user_name, user_id, key)
        except OSError as e:
            self.log.error(
                "Cannot save the account key of {user_name} in {path}: {e}; "
                "without it this account cannot log in after this run",
                user_name=user_name,
                path=str(self._keys.path),
                e=e,
            )

    @property
    def account_key(self) -> str:
        """
        The account key of the account logged in (or being logged in), or
        C{""} when it has none here.  Whoever holds it can log in as this
        account: keep it secret.
        """
        return self._account_key

    async def login(
        self,
        user_name: str,
        password: str | None = None,
        user_id: int | None = None,
        account_key: str | None = None,
    ) -> None:
        """
        Log in and connect: register C{user_name} unless C{user_id} is given
        (CIM style: an existing id and its name), get a server and a token
        from the route, connect there and log in.  Returns once the client
        is L{ClientState.READY}; from then on it reconnects by itself.

        The account's credential is C{password}, or its account key:
        C{account_key}, else the one kept in the state folder for this
        route and name, else the one the route gives when C{register}
        creates the account (then kept there).

        With a state folder, a login with a password keeps the device key
        the route answers (L{cim.client.devicekeys}) and every later login
        keeps the next one: a client started again without the password
        (C{password} C{None}) logs this device in with it, and the
        reconnects of this session use it too.  A key the route refuses
        (used by another client, expired, the device logged off or dropped
        by the device limit) is forgotten: the password is needed again.

        @raise LoginError: the route or the server refused (C{4090}: the
            name is taken, and not proven ours; C{9100}: wrong id, name,
            password or key; C{5000}: logged in elsewhere; C{6000}: too
            many failed attempts), or could not be reached (one attempt
            only: the caller decides whether to retry).
        """
        if self._session.closed:
            raise ClientClosed("the client is closed")
        if self.state not in (ClientState.IDLE, ClientState.FAILED):
            raise LoginError("", f"already {self.state.value}")
        if account_key is None:
            held = self._keys.get(self.route.url, user_name)
            account_key = held.key if held is not None else ""
        device_key = None
        if self.state_dir is not None:
            device_key = self._device_keys.get(self.route.url, user_name)
        if user_id is None and password is None and not account_key and device_key:
            # The device key proves the account is ours: no registration.
            user_id = device_key.user_id
        if user_id is None:
            try:
                account = await self.register(user_name, password, account_key)
            except RouteError as e:
                raise LoginError(e.code, e.message) from None
            except CancelledError:
                raise
            except Exception as e:
                raise LoginError("", f"cannot reach the route: {e}") from e
            user_id = account.user_id
            account_key = account.account_key or account_key
        elif account_key:
            # A key given here for an id is worth keeping for the next run.
            held = self._keys.get(self.route.url, user_name)
            if held is None or held.key != account_key:
                self._keep_key(user_name, user_id, account_key)
        self._account_key = account_key
        # The account's tag keeps its device id and cursors apart from those
        # of another account that got the same id (a new store).
        tag = account_tag(account_key or name_key(user_name))
        if self._device_given is not None:
            self._device = self._device_given
        elif self.state_dir is not None:
            self._device = self._devices.device_for(self.route.url, user_id, tag)
        elif not self._device:
            self._device = new_device_id()
        # The cursors (and last token) of this user's device, from its file:
        # a device named by the application has its own.
        path = None
        if self.state_dir is not None:
            named = self._device_given or ""
            path = state_path(self.state_dir, user_id, named, self.route.url, tag)
            legacy = state_path(self.state_dir, user_id, named)
            if not path.exists() and legacy.exists():
                # Kept before cursors were per route: carried over once
                # (the server's epochs tell a stale cursor).
                try:
                    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                    legacy.rename(path)
                except OSError as e:
                    self.log.warn("Cannot move {legacy}: {e}", legacy=str(legacy), e=e)
        self._inbox.open(user_id, path)
        holder = None
        if self.state_dir is not None and (password or device_key is not None):
            holder = _HeldDeviceKey(
                self._device_keys, self.route.url, user_name, user_id, self._device
            )
        self._held_device_key = holder
        await self._session.start(
            user_id, user_name, password, account_key, self._device, holder
        )

    def send_private(self, receive_user_id: int, text: str) -> Deferred[Ack]:
        """
        Send C{text} to user C{receive_user_id}, in the private
        conversation of the two (L{private_conversation}).  It comes back
        to this client too (and to the user's other devices), like to
        every device of the receiver: L{sent_here} tells it apart.

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
        await self.route.broadcast(user_id, self.token, text)

    async def online_users(self) -> list[User]:
        """
        The users connected now, by user id.
        """
        return await self.route.online_users()

    async def find_user(self, name: str) -> User | None:
        """
        The user called C{name}, by the route's naming rule
        (L{cim.names.name_key}: C{"Bob"} finds bob): among the users online
        now, else the peers of this user's private conversations (after
        L{conversations}).  C{None} when neither knows the name.
        """
        key = name_key(name)
        for user in await self.online_users():
            if name_key(user.user_name) == key:
                return user
        for info in self._inbox.reads.all():
            if info.peer_id is not None and info.peer_name:
                if name_key(info.peer_name) == key:
                    return User(info.peer_id, info.peer_name)
        return None

    async def create_group(
        self, group_id: str, policy: str | None = None, history: str | None = None
    ) -> None:
        """
        Create group C{group_id}, owned by this user, its first member.

        @param policy: who may join: C{"open"} (anyone), C{"invite"} (the
            users this user invites; the route's default) or C{"approval"}
            (those whose request this user approves).
        @param history: what members read with L{history}: C{"join"} (from
            their join on; the default) or C{"full"}.
        @raise RouteError: C{4090} when it exists; C{3000} for a bad policy.
        """
        user_id = self._need_login()
        await self.route.create_group(user_id, self.token, group_id, policy, history)

    async def join_group(self, group_id: str) -> JoinResult:
        """
        Join group C{group_id}, or ask to (a group by approval).

        @return: a L{JoinResult}, true when the user joined now; false when
            already a member, or (C{pending}) waiting for the owner.
        @raise RouteError: C{3000} when there is no such group; C{4010} when
            the group is by invitation and this user was not invited.
        """
        user_id = self._need_login()
        return await self.route.join_group(user_id, self.token, group_id)

    async def leave_group(self, group_id: str) -> bool:
        """
        Leave group C{group_id}.  @return: C{False} if not a member.

        @raise RouteError: C{4090} for its owner (L{transfer_group} first).
        """
        user_id = self._need_login()
        return await self.route.leave_group(user_id, self.token, group_id)

    async def group_info(self, group_id: str) -> GroupInfo:
        """
        The owner, policy, history mode and member count of a group (for
        members, invited users, and anyone when the group is open).
        """
        user_id = self._need_login()
        return await self.route.group_info(user_id, self.token, group_id)

    async def invite_to_group(self, group_id: str, user_id: int) -> bool:
        """
        Invite C{user_id} to a group this user owns.

        @return: C{False} if it was invited already.
        @raise RouteError: C{4010} when this user is not the owner; C{4090}
            when C{user_id} is a member.
        """
        me = self._need_login()
        return await self.route.invite(me, self.token, group_id, user_id)

    async def join_requests(self, group_id: str) -> list[User]:
        """
        The users waiting to join a group this user owns, oldest first.
        """
        me = self._need_login()
        return await self.route.join_requests(me, self.token, group_id)

    async def approve_request(self, group_id: str, user_id: int) -> None:
        """
        Let a waiting user into a group this user owns.

        @raise RouteError: C{3000} when it has no request waiting.
        """
        me = self._need_login()
        await self.route.approve(me, self.token, group_id, user_id)

    async def reject_request(self, group_id: str, user_id: int) -> None:
        """
        Turn a waiting user down.

        @raise RouteError: C{3000} when it has no request waiting.
        """
        me = self._need_login()
        await self.route.reject(me, self.token, group_id, user_id)

    async def remove_member(self, group_id: str, user_id: int) -> bool:
        """
        Remove a member from a group this user owns.

        @return: C{False} if it was not a member.
        """
        me = self._need_login()
        return await self.route.remove_member(me, self.token, group_id, user_id)

    async def transfer_group(self, group_id: str, user_id: int) -> None:
        """
        Hand a group this user owns over to another member.
        """
        me = self._need_login()
        await self.route.transfer_group(me, self.token, group_id, user_id)

    async def group_members(self, group_id: str) -> list[User]:
        """
        The members of group C{group_id} (this user must be one).
        """
        user_id = self._need_login()
        return await self.route.group_members(user_id, self.token, group_id)

    async def my_groups(self) -> list[str]:
        """
        The ids of the groups this user belongs to.
        """
        user_id = self._need_login()
        return await self.route.user_groups(user_id, self.token)

    async def history(
        self,
        conversation: str | None = None,
        limit: int = 20,
        *,
        peer: int | None = None,
        after_seq: int | None = None,
        before_seq: int | None = None,
    ) -> list[ChatMessage]:
        """
        Stored messages, in order, of C{conversation} (C{"g:<group>"}, or
        a private conversation C{"p:<id>:<id>"} of this user) or of the
        private conversation with user C{peer} (both sides).

        @param after_seq: those after this seq (up to C{limit}).
        @param before_seq: the last C{limit} before this seq, for paging
            back; by default (neither given) the last C{limit}.
        @raise ValueError: neither or both of C{conversation} and C{peer}.
        """
        user_id = self._need_login()
        if (conversation is None) == (peer is None):
            raise ValueError("name either a conversation or a peer")
        return await self.route.history(
            user_id,
            self.token,
            conversation or "",
            limit,
            peer_id=peer,
            after_seq=after_seq,
            before_seq=before_seq,
        )

    def private_conversation(self, peer: int) -> str:
        """
        The conversation id of this user's private messages with C{peer}.
        """
        return pair_conversation(self._need_login(), peer)

    async def conversations(self) -> list[ConversationInfo]:
        """
        Ask the route where this user stands in each of its private
        conversations and groups (last seq, read position, unread count,
        the peer's read position), and keep it: from then on L{unread} and
        L{read_position} follow new messages and read positions live.
        """
        user_id = self._need_login()
        infos = await self.route.conversations(user_id, self.token)
        self._inbox.reads.load(infos)
        return self._inbox.reads.all()

    async def read_positions(self, conversation: str) -> dict[int, int]:
        """
        Ask the route how far each member of C{conversation} (a group's
        members, or both users of a private conversation) has read it: the
        server pushes a peer's read position in a private conversation,
        not those of a group's members.  L{read_position} knows them from
        then on.
        """
        user_id = self._need_login()
        positions = await self.route.read_positions(user_id, self.token, conversation)
        for reader, seq in positions.items():
            self._inbox.reads.read_by(reader, conversation, seq)
        return positions

    def conversation_states(self) -> list[ConversationInfo]:
        """
        Where this user stands in each conversation this client knows of
        (L{conversations} loads them all), by id, kept live.
        """
        return self._inbox.reads.all()

    def unread(self, conversation: str | None = None) -> int:
        """
        How many messages from others this user has not read in
        C{conversation}, or in all the conversations known.
        """
        reads = self._inbox.reads
        if conversation is not None:
            return reads.unread(conversation)
        return sum(info.unread for info in reads.all())

    def read_position(self, conversation: str, user_id: int | None = None) -> int:
        """
        How far C{user_id} (this user by default; the peer of a private
        conversation: its read receipts) read C{conversation}, as far as
        this client knows.
        """
        return self._inbox.reads.read_position(conversation, user_id)

    def mark_read(self, conversation: str, seq: int) -> None:
        """
        This user read C{conversation} up to C{seq}: its unread count falls
        now, and the server (now, or once connected) stores it and tells
        the user's other devices and, in a private conversation, the peer.
        A position never falls: a lower seq changes nothing.  Only private
        conversations and groups have read positions (a broadcast has
        none: nothing is sent for it).
        """
        self._need_login()
        if conversation.startswith((GROUP_PREFIX, PAIR_PREFIX)):
            self._inbox.mark_read(conversation, seq)

    def sent_here(self, client_msg_id: str) -> bool:
        """
        Whether this client sent the message of C{client_msg_id} (pending,
        or among the last ones acknowledged): an own message that comes
        back without it was sent from another device.
        """
        return self._outbox.sent_here(client_msg_id)

    async def close(self, log_off: bool | None = None) -> None:
        """
        Log off and close: wait (up to C{close_timeout}) for the
        acknowledgements of sends already written, acknowledge what was
        received, save the cursors, end the session at the route, close the
        connection.  Sends still not acknowledged fail with
        L{ClientClosed}.  Safe to call twice.

        @param log_off: end the session at the route (C{/offLine}), which
            also ends the device key of this device (and this client
            forgets it).  By default, unless this client keeps a device key
            in its state folder: then the connection is only closed, so that
            the next run logs in again without the password.
        """
        session = self._session
        if session.closed:
            return
        session.close()
        holder = self._held_device_key
        if log_off is None:
            log_off = holder is None
        if log_off and holder is not None:
            holder.refused()
        if session.ready:
            await self._outbox.drain(self.close_timeout)
            self._inbox.flush()
            if log_off and session.user_id is not None and session.token:
                try:
                    await self.route.offline(session.user_id, session.token)
                except Exception as e:
                    self.log.info("Logging off at the route failed: {e}", e=e)
        await session.disconnect()
        self._inbox.close()
        self._outbox.fail_all(ClientClosed("the client is closed"))
        if self._pool is not None:
            await self._pool.closeCachedConnections()
        session.set_state(ClientState.CLOSED, "closed")

    def _need_login(self) -> int:
        if self.user_id is None:
            raise NotLoggedIn("log in first")
        return self.user_id

    def _send(self, frame: Frame) -> Deferred[Ack]:
        """
        Queue C{frame} in the outbox (which writes it if the client is
        READY), unless the client cannot send.
        """
        if self._session.closed or self.state == ClientState.FAILED:
            return fail(ClientClosed("the client is closed"))
        if self.user_id is None:
            return fail(NotLoggedIn("log in first"))
        if not frame.req_msg:
            return fail(SendError(int(ErrorCode.INVALID_ARGUMENT), "empty message"))
        return self._outbox.add(frame)


class _HeldDeviceKey:
    """
    The device key of one account's device, kept in the state folder
    (L{cim.client.session.DeviceKeyHolder}); a file that cannot be written
    is logged, never a failed login.
    """

    log = Logger()

    def __init__(
        self,
        keys: DeviceKeys,
        route_url: str,
        user_name: str,
        user_id: int,
        device: str,
    ) -> None:
        self.keys = keys
        self.route_url = route_url
        self.user_name = user_name
        self.user_id = user_id
        self.device = device

    def current(self) -> str:
        held = self.keys.get(self.route_url, self.user_name)
        if held is None or (held.user_id, held.device) != (self.user_id, self.device):
            return ""
        return held.key

    def keep(self, key: str) -> None:
        try:
            self.keys.put(
                self.route_url, self.user_name, self.user_id, self.device, key
            )
        except OSError as e:
            self.log.warn(
                "Could not keep the device key in {path}: {e}",
                path=str(self.keys.path),
                e=e,
            )

    def refused(self) -> None:
        try:
            self.keys.drop(self.route_url, self.user_name)
        except OSError as e:
            self.log.warn(
                "Could not forget the device key in {path}: {e}",
                path=str(self.keys.path),
                e=e,
            )
