"""
L{MemoryStore}: an L{IStore} kept in dictionaries, for tests and for a
single standalone process.

It behaves like L{cim.store.redis.RedisStore}: the same ids, sequence
numbers, idempotency, retention, session and token lifetimes.  Times come
from the injected clock, so tests drive every expiry with
L{twisted.internet.task.Clock}.  Every method returns an already-fired
Deferred; password hashing therefore runs on the calling thread.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import hmac
import secrets
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ParamSpec, TypeVar, cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from cim.interfaces import (
    DEFAULT_HISTORY,
    DEFAULT_POLICY,
    SESSION_OTHER_SERVER,
    TOKEN_OTHER_SERVER,
    TOKEN_OTHER_USER,
    TOKEN_UNKNOWN,
    Account,
    Appended,
    ConversationState,
    DeviceKeyUsed,
    Epoch,
    FoundSessions,
    Generations,
    GroupExists,
    GroupInfo,
    HeldSession,
    IStore,
    NewMessage,
    NoSuchGroup,
    QuotaExceeded,
    Renewal,
    Session,
    SessionExists,
    TokenInfo,
    TokenLogin,
    TooManyJoinRequests,
)
from cim.limits import MAX_DEVICES, MAX_SEQ, SESSION_TTL
from cim.message import (
    ChatMessage,
    Position,
    group_conversation,
    pair_members,
)
from cim.names import name_key
from cim.passwords import check_hash, make_hash
from cim.store import Retention

#: How long a session that was released or dropped by a newer claim is
#: remembered, in seconds: a renewal from its server within that time finds
#: it ended (and closes its connection) instead of making it again.
ENDED_TTL = 600.0

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _fired(f: Callable[_P, _T]) -> Callable[_P, defer.Deferred[_T]]:
    """
    Make a method that returns a value (or raises) return an already-fired
    Deferred instead.
    """

    @functools.wraps(f)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> defer.Deferred[_T]:
        try:
            return defer.succeed(f(*args, **kwargs))
        except Exception:
            return defer.fail()

    return wrapper


def token_key(token: str) -> str:
    """
    What a store keeps instead of a token or an account key: its SHA-256,
    in hex (both are random and long, so a fast hash cannot be reversed).
    """
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(slots=True)
class _User:
    user_id: int
    user_name: str
    password_hash: str | None
    #: The account key's SHA-256 (L{token_key}), or C{None}.
    key_hash: str | None = None


@dataclass(slots=True)
class _SessionRecord:
    session: Session
    #: When the session disappears (clock seconds) unless renewed, or
    #: C{None}.
    expires: float | None


@dataclass(frozen=True, slots=True)
class _Token:
    info: TokenInfo
    expires: float


@dataclass(frozen=True, slots=True)
class _Appended:
    """
    What the idempotency table remembers of an appended message.
    """

    expires: float
    msg_id: int
    conversation: str
    seq: int
    timestamp: int


@dataclass(slots=True)
class _Group:
    """
    A group: its settings, and who is in it or wants in.
    """

    owner_id: int | None
    policy: str
    history: str
    #: Member id -> the seq at which it joined.
    members: dict[int, int]
    invited: set[int]
    #: User ids asking to join, oldest first (the values are unused).
    requests: dict[int, None]


@implementer(IStore)
class MemoryStore:
    """
    An L{IStore} in memory.

    @ivar clock: the L{IReactorTime} giving the time for expiries and
        message timestamps.
    @ivar retention: the L{Retention} limits of conversations.
    """

    def __init__(self, clock: IReactorTime, retention: Retention = Retention()) -> None:
        self.clock = clock
        self.retention = retention
        self._users: dict[int, _User] = {}
        self._user_ids: dict[str, int] = {}
        #: (user id, device) -> (SHA-256 of its device key, hex; expiry)
        self._device_keys: dict[tuple[int, str], tuple[str, float]] = {}
        #: user id -> device -> its session
        self._sessions: dict[int, dict[str, _SessionRecord]] = {}
        #: server -> how many of the sessions held name it.
        self._servers: dict[str, int] = {}
        #: user id -> its session generation (L{Generations}; missing: 0),
        #: raised by every change of the user's sessions, and this
        #: incarnation of the store (a restored copy is another).
        self._generations: dict[int, int] = {}
        self._run = uuid.uuid4().hex
        self._tokens: dict[str, _Token] = {}
        self._user_tokens: dict[tuple[int, str], set[str]] = {}
        #: session id -> until when it is remembered as ended (released, or
        #: dropped by a newer claim): a renewal of it is lost
        self._ended: dict[str, float] = {}
        self._messages: dict[str, list[ChatMessage]] = {}
        self._seqs: dict[str, int] = {}
        self._last_msg_id = 0
        #: Where L{append} publishes its C{feed} (an L{cim.interfaces.IBus},
        #: as the Redis store publishes on its Redis): C{None}, no feed.
        self.feed_bus: Any = None
        #: (sender id, conversation, client message id) -> what was appended
        self._appended: dict[tuple[int, str, str], _Appended] = {}
        self._appended_order: deque[tuple[int, str, str]] = deque()
        #: (user id, device) -> conversation -> acknowledged position
        self._cursors: dict[tuple[int, str], dict[str, Position]] = {}
        #: user id -> conversation -> read position
        self._read: dict[int, dict[str, Position]] = {}
        #: user id -> its private conversations that hold messages
        self._pairs: dict[int, set[str]] = {}
        self._epochs: dict[str, Epoch] = {}
        #: Conversations brought back from a copy (L{restored}): their next
        #: append starts a new epoch that follows the one they had.
        self._restored: set[str] = set()
        #: The sessions a copy came back with (L{restored}): older than
        #: what their devices' servers may hold now.
        self._restored_sessions: set[str] = set()
        #: (conversation, sender id, window index) -> messages appended
        self._quota: dict[tuple[str, int, int], int] = {}
        self._quota_index = 0
        self._groups: dict[str, _Group] = {}
        self._user_groups: dict[int, set[str]] = {}

    def close(self) -> defer.Deferred[None]:
        """
        Nothing to release.  @return: a fired Deferred.
        """
        return defer.succeed(None)

    def restored(self) -> MemoryStore:
        """
        A copy of this store as a store restored from a backup taken now
        would come back later: everything it holds now, and the first
        append to each conversation starts a new epoch (C{previous}: the
        epoch it has now, C{base}: its last seq then), as the Redis store
        does when its run changed.  What this store does afterwards does
        not change the copy.
        """
        clock, self.clock = self.clock, None  # type: ignore[assignment]
        bus, self.feed_bus = self.feed_bus, None
        try:
            twin = copy.deepcopy(self)
        finally:
            self.clock = clock
            self.feed_bus = bus
        twin.clock = clock
        twin._run = uuid.uuid4().hex
        twin.feed_bus = bus
        twin._restored = set(twin._seqs)
        twin._restored_sessions = {
            record.session.session_id
            for records in twin._sessions.values()
            for record in records.values()
        }
        return twin

    def _seconds(self) -> float:
        """
        The clock's current time, in seconds.
        """
        now: float = self.clock.seconds()
        return now

    # Accounts

    @_fired
    def register(
        self,
        user_name: str,
        password: str | None = None,
        account_key: str | None = None,
    ) -> Account:
        key = name_key(user_name)
        user_id = self._user_ids.get(key)
        if user_id is not None:
            return self._account(self._users[user_id])
        user_id = len(self._users) + 1
        password_hash = None if password is None else make_hash(password)
        key_hash = None
        if password is None and account_key is not None:
            key_hash = token_key(account_key)
        user = _User(user_id, user_name, password_hash, key_hash)
        self._users[user_id] = user
        self._user_ids[key] = user_id
        return replace(self._account(user), created=True)

    @staticmethod
    def _account(user: _User) -> Account:
        return Account(
            user.user_id,
            user.user_name,
            has_password=user.password_hash is not None,
            has_key=user.key_hash is not None,
        )

    @_fired
    def get_account(self, user_id: int) -> Account | None:
        user = self._users.get(user_id)
        return None if user is None else self._account(user)

    @_fired
    def get_account_by_name(self, user_name: str) -> Account | None:
        user_id = self._user_ids.get(name_key(user_name))
        return None if user_id is None else self._account(self._users[user_id])

    @_fired
    def check_password(self, user_id: int, password: str) -> bool:
        user = self._users.get(user_id)
        if user is None or user.password_hash is None:
            return False
        return check_hash(password, user.password_hash)

    @_fired
    def check_account_key(self, user_id: int, account_key: str) -> bool:
        user = self._users.get(user_id)
        if user is None or user.key_hash is None:
            return False
        return hmac.compare_digest(token_key(account_key), user.key_hash)

    @_fired
    def set_device_key(
        self, user_id: int, device: str, device_key: str, ttl: float
    ) -> None:
        self._set_device_key(user_id, device, device_key, ttl)

    def _set_device_key(
        self, user_id: int, device: str, device_key: str, ttl: float
    ) -> None:
        self._device_keys[user_id, device] = (
            token_key(device_key),
            self._seconds() + ttl,
        )

    @_fired
    def check_device_key(self, user_id: int, device: str, device_key: str) -> bool:
        return self._device_key_holds(user_id, device, device_key)

    def _device_key_holds(self, user_id: int, device: str, device_key: str) -> bool:
        """
        Whether C{device_key} is C{user_id}'s C{device}'s, and not expired
        (an expired one is forgotten), as in Redis (C{PX}).
        """
        found = self._device_keys.get((user_id, device))
        if found is None:
            return False
        digest, expires = found
        if expires <= self._seconds():
            del self._device_keys[user_id, device]
            return False
        return hmac.compare_digest(token_key(device_key), digest)

    @_fired
    def drop_device_key(self, user_id: int, device: str) -> None:
        self._device_keys.pop((user_id, device), None)

    # Sessions

    def _live(self, user_id: int) -> dict[str, _SessionRecord]:
        """
        The user's sessions by device, forgetting those whose claim expired.
        """
        records = self._sessions.get(user_id)
        if not records:
            return {}
        now = self._seconds()
        for device in [
            d for d, r in records.items() if r.expires is not None and r.expires <= now
        ]:
            self._delete_session(user_id, device)
        return self._sessions.get(user_id, {})

    def _session(self, user_id: int, device: str) -> Session | None:
        record = self._live(user_id).get(device)
        return None if record is None else record.session

    def _delete_session(self, user_id: int, device: str) -> None:
        """
        Forget the device's session and its tokens.
        """
        records = self._sessions.get(user_id)
        if records is not None:
            record = records.pop(device, None)
            if record is not None:
                self._unlist(record.session.server)
                self._touch(user_id)
            if not records:
                del self._sessions[user_id]
        for key in self._user_tokens.pop((user_id, device), set()):
            self._tokens.pop(key, None)

    def _end(self, session: Session) -> None:
        """
        Delete C{session}, and remember that it ended (L{ENDED_TTL}).
        """
        self._delete_session(session.user_id, session.device)
        now = self._seconds()
        # Entries are kept in the order they end (each for ENDED_TTL), so
        # the expired ones are at the front: no scan of them all per login.
        ended = self._ended
        while ended:
            first = next(iter(ended))
            if ended[first] > now:
                break
            del ended[first]
        ended[session.session_id] = now + ENDED_TTL

    def _touch(self, user_id: int) -> None:
        """
        Raise the user's session generation: its sessions changed.
        """
        generations = self._generations
        generations[user_id] = generations.get(user_id, 0) + 1

    def _put(self, session: Session, expires: float) -> None:
        records = self._sessions.setdefault(session.user_id, {})
        old = records.get(session.device)
        if old is not None:
            self._unlist(old.session.server)
        if (
            old is None
            or old.session.session_id != session.session_id
            or old.session.server != session.server
            or old.session.connected != session.connected
        ):
            self._touch(session.user_id)
        records[session.device] = _SessionRecord(session, expires)
        servers = self._servers
        servers[session.server] = servers.get(session.server, 0) + 1

    def _unlist(self, server: str) -> None:
        """
        One session fewer names C{server} (L{session_servers}).
        """
        left = self._servers[server] - 1
        if left:
            self._servers[server] = left
        else:
            del self._servers[server]

    @_fired
    def claim_session(
        self,
        user_id: int,
        user_name: str,
        server: str,
        ttl: float,
        replace: bool = False,
        device: str = "",
        max_devices: int = MAX_DEVICES,
    ) -> tuple[Session, list[Session]]:
        return self._claim(
            user_id, user_name, server, ttl, replace, device, max_devices
        )

    @_fired
    def open_session(
        self,
        user_id: int,
        user_name: str,
        server: str,
        claim_ttl: float,
        token_ttl: float,
        replace: bool = False,
        device: str = "",
        max_devices: int = MAX_DEVICES,
        device_key: str | None = None,
        device_key_ttl: float = 0.0,
        used_device_key: str | None = None,
    ) -> tuple[Session, list[Session], str]:
        if used_device_key is not None and not self._device_key_holds(
            user_id, device, used_device_key
        ):
            raise DeviceKeyUsed()
        session, dropped = self._claim(
            user_id, user_name, server, claim_ttl, replace, device, max_devices
        )
        for old in dropped:
            if old.device != device:
                self._device_keys.pop((user_id, old.device), None)
        token = self._issue(user_id, server, session.session_id, token_ttl, device)
        if device_key is not None:
            self._set_device_key(user_id, device, device_key, device_key_ttl)
        elif used_device_key is not None:
            self._device_keys.pop((user_id, device), None)
        return session, dropped, token

    def _claim(
        self,
        user_id: int,
        user_name: str,
        server: str,
        ttl: float,
        replace: bool,
        device: str,
        max_devices: int,
    ) -> tuple[Session, list[Session]]:
        held = self._live(user_id)
        if held and not replace:
            first = held.get(device) or held[min(held)]
            raise SessionExists(first.session)
        dropped = []
        mine = held.get(device)
        if mine is not None:
            dropped.append(mine.session)
        others = sorted(
            (r.session for d, r in held.items() if d != device),
            key=lambda session: (session.active, session.device),
        )
        dropped += others[: max(0, len(others) - max(1, max_devices) + 1)]
        for old in dropped:
            self._end(old)
        now = self._seconds()
        session = Session(
            user_id, user_name, server, uuid.uuid4().hex, False, device, now
        )
        self._put(session, now + ttl)
        return session, dropped

    @_fired
    def activate_session(
        self,
        user_id: int,
        session_id: str,
        ttl: float = SESSION_TTL,
        device: str = "",
    ) -> bool:
        session = self._session(user_id, device)
        if session is None or session.session_id != session_id:
            return False
        now = self._seconds()
        self._put(replace(session, connected=True, active=now), now + ttl)
        return True

    @_fired
    def renew_sessions(
        self, server: str, sessions: Sequence[HeldSession], ttl: float
    ) -> Renewal:
        expires = self._seconds() + ttl
        lost = []
        restored = []
        for held in sessions:
            user_id, session_id, user_name, device, active = held
            current = self._session(user_id, device)
            if current is None and self._ended.get(session_id, 0) > self._seconds():
                lost.append(session_id)
                continue
            if current is None:
                restored.append(session_id)
                current = Session(
                    user_id, user_name, server, session_id, True, device, active
                )
            elif current.session_id != session_id:
                if not self._outdated(current, session_id):
                    lost.append(session_id)
                    continue
                # The store came back from an older copy: the device's
                # session it holds is from before, the one its server holds
                # is newer.  Not a newer login: the holder keeps it.
                self._end(current)
                restored.append(session_id)
                current = Session(
                    user_id, user_name, server, session_id, True, device, active
                )
            self._put(replace(current, active=max(active, current.active)), expires)
        return Renewal(sorted(lost), sorted(restored))

    def _outdated(self, current: Session, held_id: str) -> bool:
        """
        Whether C{current}, its device's session here, is older than the
        session C{held_id} that a server renews for that device: it came
        back with a restored copy (L{restored}), and this store never
        ended C{held_id} (so no newer login replaced it).
        """
        return (
            current.session_id in self._restored_sessions
            and self._ended.get(held_id, 0) <= self._seconds()
        )

    @_fired
    def get_session(self, user_id: int, device: str = "") -> Session | None:
        return self._session(user_id, device)

    @_fired
    def user_sessions(self, user_id: int) -> list[Session]:
        held = self._live(user_id)
        return [held[device].session for device in sorted(held)]

    @_fired
    def get_sessions(self, user_ids: Sequence[int]) -> dict[int, list[Session]]:
        generations = self._generations
        found = FoundSessions()
        for user_id in user_ids:
            held = self._live(user_id)
            connected = [
                held[d].session for d in sorted(held) if held[d].session.connected
            ]
            if connected:
                found[user_id] = connected
        # Read after _live forgot the expired claims (which raises them).
        found.generations = Generations(
            self._run, {uid: generations.get(uid, 0) for uid in user_ids}
        )
        return found

    @_fired
    def session_servers(self) -> list[str]:
        return sorted(self._servers)

    @_fired
    def release_session(self, user_id: int, session_id: str, device: str = "") -> bool:
        session = self._session(user_id, device)
        if session is None or session.session_id != session_id:
            return False
        self._end(session)
        return True

    @_fired
    def online_users(self) -> list[tuple[int, str]]:
        online = []
        for user_id in sorted(self._sessions):
            connected = [r for r in self._live(user_id).values() if r.session.connected]
            if connected:
                online.append((user_id, connected[0].session.user_name))
        return online

    @_fired
    def drop_server_sessions(self, server: str) -> list[int]:
        dropped = set()
        for user_id in sorted(self._sessions):
            for device, record in list(self._live(user_id).items()):
                if record.session.server == server:
                    self._delete_session(user_id, device)
                    dropped.add(user_id)
        return sorted(dropped)

    # Login tokens

    @_fired
    def issue_token(
        self,
        user_id: int,
        server: str,
        session_id: str,
        ttl: float,
        device: str = "",
    ) -> str:
        return self._issue(user_id, server, session_id, ttl, device)

    def _issue(
        self, user_id: int, server: str, session_id: str, ttl: float, device: str
    ) -> str:
        now = self._seconds()
        keys = self._user_tokens.setdefault((user_id, device), set())
        for key in [k for k in keys if self._tokens[k].expires <= now]:
            keys.discard(key)
            del self._tokens[key]
        token = secrets.token_urlsafe(32)
        key = token_key(token)
        self._tokens[key] = _Token(
            TokenInfo(user_id, server, session_id, device), now + ttl
        )
        keys.add(key)
        return token

    @_fired
    def activate_token(
        self, token: str, user_id: int, server: str, ttl: float = SESSION_TTL
    ) -> Session | str:
        found = self._tokens.get(token_key(token))
        if found is None or found.expires <= self._seconds():
            return TOKEN_UNKNOWN
        info = found.info
        session = self._session(info.user_id, info.device)
        if session is None or session.session_id != info.session_id:
            return TOKEN_UNKNOWN
        if info.user_id != user_id:
            return TOKEN_OTHER_USER
        if info.server != server:
            return TOKEN_OTHER_SERVER
        if session.server != server:
            return SESSION_OTHER_SERVER
        now = self._seconds()
        session = replace(session, connected=True, active=now)
        self._put(session, now + ttl)
        return session

    def token_login(
        self, token: str, user_id: int, server: str, ttl: float = SESSION_TTL
    ) -> defer.Deferred[TokenLogin | str]:
        """
        L{IStore.token_login}: L{activate_token}, then L{login_reads} once
        it answered (through the methods, so that a subclass of a test
        sees both).
        """
        return defer.ensureDeferred(self._token_login(token, user_id, server, ttl))

    async def _token_login(
        self, token: str, user_id: int, server: str, ttl: float
    ) -> TokenLogin | str:
        session = await self.activate_token(token, user_id, server, ttl)
        if isinstance(session, str):
            return session
        states, cursors = await self.login_reads(user_id, session.device)
        return TokenLogin(session, states, cursors)

    @_fired
    def verify_token(self, token: str) -> TokenInfo | None:
        found = self._tokens.get(token_key(token))
        if found is None or found.expires <= self._seconds():
            return None
        info = found.info
        session = self._session(info.user_id, info.device)
        if session is None or session.session_id != info.session_id:
            return None
        return info

    # Messages

    def _now_ms(self) -> int:
        return int(self._seconds() * 1000)

    def _trim(self, conversation: str) -> list[ChatMessage]:
        """
        Apply the retention limits to C{conversation}.

        @return: its remaining messages.
        """
        messages = self._messages.get(conversation, [])
        excess = len(messages) - self.retention.max_messages
        if excess > 0:
            del messages[:excess]
        cutoff = self._now_ms() - self.retention.max_age * 1000
        old = 0
        while old < len(messages) and messages[old].timestamp < cutoff:
            old += 1
        del messages[:old]
        return messages

    def _forget_appended(self) -> None:
        """
        Drop the idempotency entries whose window has passed.
        """
        now = self._seconds()
        while self._appended_order:
            key = self._appended_order[0]
            entry = self._appended.get(key)
            if entry is not None and entry.expires > now:
                break
            self._appended_order.popleft()
            if entry is not None:
                del self._appended[key]

    def _original(self, entry: _Appended, retry: NewMessage) -> ChatMessage:
        """
        The message a retry refers to: the stored one when it is still kept,
        else one rebuilt from the retry and the original's ids.
        """
        for message in self._messages.get(entry.conversation, []):
            if message.seq == entry.seq:
                return message
        return ChatMessage(
            msg_id=entry.msg_id,
            conversation=entry.conversation,
            seq=entry.seq,
            sender_id=retry.sender_id,
            sender_name=retry.sender_name,
            text=retry.text,
            timestamp=entry.timestamp,
            client_msg_id=retry.client_msg_id,
            receive_user_id=retry.receive_user_id,
            group_id=retry.group_id,
            epoch=self._epochs.get(entry.conversation, Epoch()).id,
        )

    def _quota_budget(self) -> Callable[[NewMessage], bool]:
        """
        Count new messages against their senders' quotas
        (L{Retention.sender_quota}, per window of C{max_age}: the current
        window and the one before count together).

        @return: a function telling, for each new message in order, whether
            it is within its sender's quota for its conversation (and
            counting it if so).
        """
        quota = self.retention.sender_quota
        if quota <= 0:
            return lambda new: True
        index = int(self._seconds() // self.retention.max_age)
        if index != self._quota_index:
            self._quota_index = index
            self._quota = {k: n for k, n in self._quota.items() if k[2] >= index - 1}
        counts = self._quota

        def allowed(new: NewMessage) -> bool:
            current = (new.conversation, new.sender_id, index)
            used = counts.get(current, 0) + counts.get(
                (new.conversation, new.sender_id, index - 1), 0
            )
            if used >= quota:
                return False
            counts[current] = counts.get(current, 0) + 1
            return True

        return allowed

    @property
    def feeds(self) -> bool:
        """
        Whether L{append} takes a C{feed} (with a L{feed_bus}).
        """
        return self.feed_bus is not None

    @_fired
    def append(
        self,
        messages: Sequence[NewMessage],
        feed: Sequence[Sequence[int] | None] | None = None,
    ) -> list[ChatMessage]:
        """
        L{IStore.append}; with a C{feed} (and a L{feed_bus}), as the Redis
        store's (L{cim.store.redis.store.RedisStore.append}): the messages
        appended for a list of users are published on C{feed_bus} to every
        server holding sessions, in the order stored, in one payload.
        """
        before = self._last_msg_id
        stored = self._append(messages)
        if feed and self.feed_bus is not None:
            from cim.bus import encode_feed

            # (Not a retry's original, published when it was appended.)
            fed = [
                (message, users)
                for message, users in zip(stored, feed, strict=True)
                if users is not None and message is not None and message.msg_id > before
            ]
            if fed:
                payload = encode_feed(fed)
                for server in sorted(self._servers):
                    self.feed_bus.publish(server, payload)
        if any(message is None for message in stored):
            raise QuotaExceeded(stored)
        generations = self._generations
        users: dict[int, int] = {}
        for new in messages:
            for user_id in pair_members(new.conversation) or ():
                users[user_id] = generations.get(user_id, 0)
        return Appended(
            cast(list[ChatMessage], stored),
            Generations(self._run, users) if users else None,
        )

    def _append(self, messages: Sequence[NewMessage]) -> list[ChatMessage | None]:
        self._forget_appended()
        now = self._seconds()
        timestamp = self._now_ms()
        allowed = self._quota_budget()
        stored: list[ChatMessage | None] = []
        touched = set()
        for new in messages:
            key = (new.sender_id, new.conversation, new.client_msg_id)
            entry = self._appended.get(key) if new.client_msg_id else None
            if entry is not None:
                stored.append(self._original(entry, new))
                continue
            if not allowed(new):
                stored.append(None)
                continue
            self._last_msg_id += 1
            seq = self._seqs.get(new.conversation, 0) + 1
            epoch = self._epochs.get(new.conversation)
            if epoch is None or new.conversation in self._restored:
                self._restored.discard(new.conversation)
                epoch = self._epochs[new.conversation] = Epoch(
                    uuid.uuid4().hex[:16], epoch.id if epoch else "", seq - 1
                )
            self._seqs[new.conversation] = seq
            message = ChatMessage(
                msg_id=self._last_msg_id,
                conversation=new.conversation,
                seq=seq,
                sender_id=new.sender_id,
                sender_name=new.sender_name,
                text=new.text,
                timestamp=timestamp,
                client_msg_id=new.client_msg_id,
                receive_user_id=new.receive_user_id,
                group_id=new.group_id,
                epoch=epoch.id,
            )
            self._messages.setdefault(new.conversation, []).append(message)
            touched.add(new.conversation)
            self._raise_read(new.sender_id, new.conversation, seq)
            members = pair_members(new.conversation)
            if members is not None:
                for user_id in members:
                    self._pairs.setdefault(user_id, set()).add(new.conversation)
            if new.client_msg_id:
                self._appended[key] = _Appended(
                    now + self.retention.idempotency_window,
                    message.msg_id,
                    message.conversation,
                    seq,
                    timestamp,
                )
                self._appended_order.append(key)
            stored.append(message)
        for conversation in touched:
            self._trim(conversation)
        return stored

    @_fired
    def read(self, conversation: str, after_seq: int, limit: int) -> list[ChatMessage]:
        messages = self._trim(conversation)
        if not messages or limit <= 0:
            return []
        start = max(0, after_seq - messages[0].seq + 1)
        return messages[start : start + limit]

    @_fired
    def read_before(
        self, conversation: str, before_seq: int, limit: int
    ) -> list[ChatMessage]:
        messages = self._trim(conversation)
        if before_seq > 0:
            messages = [m for m in messages if m.seq < before_seq]
        return messages[-limit:] if limit > 0 else []

    @_fired
    def last_seq(self, conversation: str) -> int:
        return self._seqs.get(conversation, 0)

    def _epoch(self, conversation: str) -> Epoch:
        epoch = self._epochs.get(conversation)
        if epoch is None:
            return Epoch(base=self._seqs.get(conversation, 0))
        return epoch

    @_fired
    def epochs(self, conversations: Sequence[str]) -> dict[str, Epoch]:
        return {c: self._epoch(c) for c in conversations}

    def _raise_cursors(
        self, user_id: int, device: str, cursors: dict[str, Position]
    ) -> None:
        current = self._cursors.setdefault((user_id, device), {})
        for conversation, position in cursors.items():
            epoch, seq = position
            if type(seq) is not int or not 0 < seq <= MAX_SEQ:
                continue
            old = current.get(conversation)
            if old is None or old.epoch != epoch or seq > old.seq:
                current[conversation] = Position(str(epoch), seq)

    @_fired
    def set_cursors(
        self, user_id: int, cursors: dict[str, Position], device: str = ""
    ) -> None:
        self._raise_cursors(user_id, device, cursors)

    @_fired
    def set_many_cursors(
        self, cursors: dict[tuple[int, str], dict[str, Position]]
    ) -> None:
        for (user_id, device), theirs in cursors.items():
            self._raise_cursors(user_id, device, theirs)

    @_fired
    def get_cursors(self, user_id: int, device: str = "") -> dict[str, Position]:
        return dict(self._cursors.get((user_id, device), {}))

    @_fired
    def forget_cursors(self, user_id: int, conversation: str) -> None:
        for (owner, _), cursors in self._cursors.items():
            if owner == user_id:
                cursors.pop(conversation, None)

    # Read positions

    def _raise_read(self, user_id: int, conversation: str, seq: int) -> int:
        epoch = self._epoch(conversation)
        positions = self._read.setdefault(user_id, {})
        current = self._read_position(user_id, conversation, epoch)
        seq = min(seq, self._seqs.get(conversation, 0))
        if seq > current:
            positions[conversation] = Position(epoch.id, seq)
            return seq
        return current

    def _read_position(self, user_id: int, conversation: str, epoch: Epoch) -> int:
        position = self._read.get(user_id, {}).get(conversation)
        if position is None:
            return 0
        start, _ = epoch.resume(position)
        return start

    @_fired
    def set_read(self, user_id: int, conversation: str, seq: int) -> int:
        if type(seq) is not int or seq > MAX_SEQ:
            seq = 0
        return self._raise_read(user_id, conversation, seq)

    @_fired
    def read_positions(
        self, conversation: str, user_ids: Sequence[int]
    ) -> dict[int, int]:
        epoch = self._epoch(conversation)
        return {u: self._read_position(u, conversation, epoch) for u in user_ids}

    @_fired
    def login_reads(
        self, user_id: int, device: str = ""
    ) -> tuple[list[ConversationState], dict[str, Position]]:
        return self._states(user_id), dict(self._cursors.get((user_id, device), {}))

    @_fired
    def conversations(self, user_id: int) -> list[ConversationState]:
        return self._states(user_id)

    def _states(self, user_id: int) -> list[ConversationState]:
        states = []
        for conversation in self._pairs.get(user_id, set()):
            members = pair_members(conversation)
            assert members is not None
            low, high = members
            peer = high if low == user_id else low
            epoch = self._epoch(conversation)
            states.append(
                ConversationState(
                    conversation,
                    epoch.id,
                    self._seqs.get(conversation, 0),
                    self._read_position(user_id, conversation, epoch),
                    peer_id=peer,
                    peer_read=self._read_position(peer, conversation, epoch),
                    epoch_previous=epoch.previous,
                    epoch_base=epoch.base,
                )
            )
        for group_id in self._user_groups.get(user_id, set()):
            conversation = group_conversation(group_id)
            epoch = self._epoch(conversation)
            states.append(
                ConversationState(
                    conversation,
                    epoch.id,
                    self._seqs.get(conversation, 0),
                    self._read_position(user_id, conversation, epoch),
                    group_id=group_id,
                    joined=self._groups[group_id].members.get(user_id, 0),
                    epoch_previous=epoch.previous,
                    epoch_base=epoch.base,
                )
            )
        return sorted(states, key=lambda state: state.conversation)

    # Groups

    @_fired
    def create_group(
        self,
        group_id: str,
        owner_id: int,
        policy: str = DEFAULT_POLICY,
        history: str = DEFAULT_HISTORY,
    ) -> None:
        if group_id in self._groups:
            raise GroupExists(group_id)
        self._groups[group_id] = _Group(
            owner_id, policy, history, {owner_id: 0}, set(), {}
        )
        self._user_groups.setdefault(owner_id, set()).add(group_id)

    def _group(self, group_id: str) -> _Group:
        group = self._groups.get(group_id)
        if group is None:
            raise NoSuchGroup(group_id)
        return group

    @_fired
    def group_info(self, group_id: str, user_id: int = 0) -> GroupInfo:
        group = self._group(group_id)
        return GroupInfo(
            group_id,
            group.owner_id,
            group.policy,
            group.history,
            len(group.members),
            member=user_id in group.members,
            joined_at=group.members.get(user_id, 0),
            invited=user_id in group.invited,
            requested=user_id in group.requests,
        )

    @_fired
    def join_group(self, group_id: str, user_id: int, seq: int = 0) -> bool:
        group = self._group(group_id)
        group.invited.discard(user_id)
        group.requests.pop(user_id, None)
        if user_id in group.members:
            return False
        group.members[user_id] = seq
        self._user_groups.setdefault(user_id, set()).add(group_id)
        return True

    @_fired
    def leave_group(self, group_id: str, user_id: int) -> bool:
        group = self._group(group_id)
        if user_id not in group.members:
            return False
        del group.members[user_id]
        self._user_groups.get(user_id, set()).discard(group_id)
        return True

    @_fired
    def group_members(self, group_id: str) -> list[int]:
        return sorted(self._group(group_id).members)

    @_fired
    def user_groups(self, user_id: int) -> list[str]:
        return sorted(self._user_groups.get(user_id, set()))

    @_fired
    def invite_to_group(self, group_id: str, user_id: int) -> bool:
        invited = self._group(group_id).invited
        if user_id in invited:
            return False
        invited.add(user_id)
        return True

    @_fired
    def ask_to_join(self, group_id: str, user_id: int, limit: int) -> bool:
        requests = self._group(group_id).requests
        if user_id in requests:
            return False
        if len(requests) >= limit:
            raise TooManyJoinRequests(group_id)
        requests[user_id] = None
        return True

    @_fired
    def join_requests(self, group_id: str) -> list[int]:
        return list(self._group(group_id).requests)

    @_fired
    def drop_join_request(self, group_id: str, user_id: int) -> bool:
        requests = self._group(group_id).requests
        if user_id not in requests:
            return False
        del requests[user_id]
        return True

    @_fired
    def set_group_owner(self, group_id: str, owner_id: int) -> None:
        self._group(group_id).owner_id = owner_id
