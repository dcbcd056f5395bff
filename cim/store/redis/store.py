"""
L{RedisStore}: the L{IStore} kept in Redis, over txredisapi (which only
L{cim.store.redis.connection} imports); L{connect_redis} opens one from a
URL.

Key layout (every key starts with the store's prefix C{P}, C{"cim:"} by
default; user names and their keys are only ever hash fields and values,
never key names)::

    P user:next                    string  INCR counter of user ids
    P user:bykey                   hash    name key (cim.names.name_key:
                                           NFKC, case-folded, confusable
                                           skeleton) -> user id
    P user:<user_id>               hash    name (as registered), pw (scrypt
                                           string) or key (SHA-256 of the
                                           account key, hex), or neither
    P session:<user_id>            hash    name, server, session_id,
                                           connected ("0"/"1"); PEXPIRE'd:
                                           the claim's ttl until connected,
                                           then the session ttl, renewed by
                                           its server
    P server:<server>              set     user ids with a session on server
                                           (checked against the session
                                           record, so stale entries are
                                           harmless)
    P online                       hash    user id -> user name, connected
                                           sessions only (an entry whose
                                           session expired is dropped when
                                           read)
    P token:<sha256(token), hex>   hash    user, server, session_id; PEXPIRE
                                           ttl (the token itself is not
                                           stored)
    P tokens:<user_id>             set     token digests of the user's session
    P msg:next                     string  counter of message ids (one INCRBY
                                           per appended batch)
    P seq:<conversation>           string  INCR counter of the conversation's
                                           seq (never expires, so a seq is
                                           never reused)
    P conv:<conversation>          zset    messages scored by seq; PEXPIRE
                                           max_age, refreshed on append, which
                                           also trims it to max_messages and
                                           drops up to AGE_SCAN (append.lua)
                                           messages older than max_age
    P sent:<sender_id>:<client_msg_id>
                                   string  "msg_id:seq:timestamp:conversation"
                                           of an appended message; PEXPIRE
                                           the idempotency window
    P quota:<conversation>:<sender_id>:<window>
                                   string  messages the sender appended to
                                           the conversation in window
                                           now // max_age (INCRBY in
                                           append.lua); PEXPIRE two windows
    P cursors:<user_id>            hash    conversation -> acknowledged seq
                                           (digits, never a float's form)
    P group:<group_id>             string  the creator's id (the group exists)
    P ginfo:<group_id>             hash    owner, policy, history; absent for
                                           a group stored before groups had
                                           owners (open, no owner)
    P members:<group_id>           set     member user ids
    P joined:<group_id>            hash    member id -> seq of the group's
                                           conversation when it joined (none
                                           for the creator and for members
                                           from before owners: 0)
    P invited:<group_id>           set     user ids invited, until they join
    P asks:<group_id>              zset    user ids asking to join, scored by
                                           the time they asked (ms)
    P groups:<user_id>             set     the user's group ids

What the values hold (a stored message's JSON, a session record):
L{cim.store.redis.records}.

Every update touching more than one key is one Lua script of
L{cim.store.redis.scripts} (EVALSHA, falling back to EVAL when Redis does not
know it), so it is atomic and costs one round trip.  Scripts derive some
related keys from the prefix, so the store needs a standalone Redis (not
Redis Cluster).  The connection must decode replies as UTF-8 and leave
numbers as strings (C{convertNumbers=False}), as the pool of
L{cim.store.redis.connection.open_pool} does.
"""

from __future__ import annotations

import functools
import hmac
import secrets
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar, cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cim.interfaces import (
    DEFAULT_HISTORY,
    DEFAULT_POLICY,
    Account,
    GroupExists,
    GroupInfo,
    IStore,
    NewMessage,
    NoSuchGroup,
    QuotaExceeded,
    Session,
    SessionExists,
    StoreError,
    TokenInfo,
    TooManyJoinRequests,
)
from cim.limits import MAX_SEQ, SESSION_TTL
from cim.message import ChatMessage
from cim.names import name_key
from cim.passwords import hash_password, verify_password
from cim.store import Retention, parse_redis_url
from cim.store.memory import token_key
from cim.store.redis import scripts
from cim.store.redis.connection import is_down, open_pool
from cim.store.redis.records import (
    SESSION_FIELDS,
    decode_message,
    decode_session,
    encode_message,
)
from cim.store.redis.scripts import Script

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _deferred(
    f: Callable[_P, Coroutine[Any, Any, _T]],
) -> Callable[_P, defer.Deferred[_T]]:
    """
    Make an C{async def} method return a Deferred, as L{IStore} requires.
    """

    @functools.wraps(f)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> defer.Deferred[_T]:
        return defer.ensureDeferred(f(*args, **kwargs))

    return wrapper


def _seq(text: str) -> int | None:
    """
    A stored sequence number, or C{None} when C{text} is not a whole
    number between 0 and L{MAX_SEQ} written as digits.
    """
    if not (text.isascii() and text.isdigit()) or len(text) > 16:
        return None
    seq = int(text)
    return seq if seq <= MAX_SEQ else None


def _cursor_args(cursors: dict[str, int]) -> list[Any]:
    """
    C{cursors} as the scripts' flat C{conversation, seq} arguments, each seq
    an integer (Redis stores the digits sent); a seq that is not an integer
    between 1 and L{MAX_SEQ} is left out.
    """
    args: list[Any] = []
    for conversation, seq in cursors.items():
        if type(seq) is int and 0 < seq <= MAX_SEQ:
            args += [conversation, seq]
    return args


def _ms(seconds: float) -> int:
    """
    Seconds as whole milliseconds, at least 1 (Redis rejects 0 as a TTL).
    """
    return max(1, int(seconds * 1000))


@implementer(IStore)
class RedisStore:
    """
    An L{IStore} in Redis.

    @ivar clock: the L{IReactorTime} giving message timestamps and timing
        out Redis calls.
    @ivar retention: the L{Retention} limits of conversations.
    @ivar prefix: the start of every key.
    @ivar timeout: seconds after which a Redis call fails with
        L{StoreError} (also while no connection is available yet), or
        C{None}.  While a pool that was connected has lost every connection
        (Redis went away), a call fails with L{StoreError} at once.
    """

    log = Logger()

    def __init__(
        self,
        redis: Any,
        clock: IReactorTime,
        retention: Retention = Retention(),
        prefix: str = "cim:",
        timeout: float | None = 10.0,
    ) -> None:
        """
        @param redis: a txredisapi connection (or pool) decoding replies as
            UTF-8 with C{convertNumbers=False}.
        """
        self._redis = redis
        self.clock = clock
        self.retention = retention
        self.prefix = prefix
        self.timeout = timeout
        self._threads = clock if IReactorThreads.providedBy(clock) else None

    def close(self) -> defer.Deferred[Any]:
        """
        Close the connections.  @return: a Deferred firing once they are.
        """
        d: defer.Deferred[Any] = self._redis.disconnect()
        return d

    def _seconds(self) -> float:
        """
        The clock's current time, in seconds.
        """
        # Without the mypy-zope plugin mypy thinks interface methods lack self.
        now: float = self.clock.seconds()  # type: ignore[misc]
        return now

    # Talking to Redis

    def _guard(self, d: defer.Deferred[Any], what: str) -> Awaitable[Any]:
        """
        Time out C{d} and turn its failures into L{StoreError}.
        """
        if self.timeout is not None:
            d.addTimeout(self.timeout, self.clock)

        def failed(failure: Failure) -> None:
            raise StoreError(
                f"Redis {what} failed: {failure.getErrorMessage()}"
            ) from failure.value

        return d.addErrback(failed)

    def _down(self, what: str) -> defer.Deferred[Any] | None:
        """
        A failed call when Redis is known to be away (L{is_down}): fail at
        once rather than wait for the time-out.
        """
        if not is_down(self._redis):
            return None
        return defer.fail(StoreError(f"Redis {what} failed: Redis is unreachable"))

    def _command(self, *args: Any) -> Awaitable[Any]:
        """
        Run one Redis command.
        """
        down = self._down(args[0])
        if down is not None:
            return down
        try:
            d = self._redis.execute_command(*args)
        except Exception:
            d = defer.fail()
        return self._guard(d, args[0])

    def _run(
        self, script: Script, keys: Sequence[str], args: Sequence[Any]
    ) -> Awaitable[Any]:
        """
        Run C{script} (L{Script.run}).
        """
        down = self._down("script")
        if down is not None:
            return down
        return self._guard(script.run(self._redis, keys, args), "script")

    def _key(self, *parts: object) -> str:
        return self.prefix + ":".join(str(part) for part in parts)

    @_deferred
    async def ping(self) -> None:
        """
        Check that Redis answers.  @return: a Deferred failing with
        L{StoreError} when it does not.
        """
        await self._command("PING")

    # Accounts

    def _by_key(self, user_name: str) -> Awaitable[Any]:
        """
        The account of C{user_name}'s name key: C{None}, or C{[user_id,
        name, has password, has key]}.
        """
        return self._run(
            scripts.ACCOUNT_BY_NAME,
            [self._key("user", "bykey")],
            [name_key(user_name), self.prefix],
        )

    @staticmethod
    def _account(
        user_id: Any, name: str, has_pw: Any, has_key: Any, created: bool = False
    ) -> Account:
        return Account(
            int(user_id), name, bool(int(has_pw)), bool(int(has_key)), created
        )

    @_deferred
    async def register(
        self,
        user_name: str,
        password: str | None = None,
        account_key: str | None = None,
    ) -> Account:
        found = await self._by_key(user_name)
        if found is not None:
            return self._account(*found)
        stored = digest = ""
        if password is not None:
            stored = await hash_password(password, self._threads)
        elif account_key is not None:
            digest = token_key(account_key)
        created, user_id, name, has_pw, has_key = await self._run(
            scripts.REGISTER,
            [self._key("user", "bykey"), self._key("user", "next")],
            [name_key(user_name), user_name, stored, digest, self.prefix],
        )
        return self._account(user_id, name, has_pw, has_key, bool(int(created)))

    @_deferred
    async def get_account(self, user_id: int) -> Account | None:
        name, stored, key = await self._command(
            "HMGET", self._key("user", user_id), "name", "pw", "key"
        )
        if name is None:
            return None
        return Account(user_id, name, stored is not None, key is not None)

    @_deferred
    async def get_account_by_name(self, user_name: str) -> Account | None:
        found = await self._by_key(user_name)
        return None if found is None else self._account(*found)

    async def index_old_names(self) -> tuple[int, list[tuple[str, int, int]]]:
        """
        Index the accounts of a store written before names had keys (the
        hash C{user:byname}, raw name -> id) by their name key, as
        registrations and logins now look them up.  Safe to run again.

        @return: how many names were indexed, and the names whose key an
            other account already holds: C{(name, its id, the holder's id)}
            (that account keeps its id, tokens and messages, but is not
            found by name).
        """
        old = await self._command("HGETALL", self._key("user", "byname"))
        pairs = old.items() if isinstance(old, dict) else zip(old[::2], old[1::2])
        indexed = 0
        collisions: list[tuple[str, int, int]] = []
        bykey = self._key("user", "bykey")
        for name, user_id in sorted(pairs, key=lambda pair: int(pair[1])):
            name = name.decode() if isinstance(name, bytes) else str(name)
            key = name_key(name)
            if await self._command("HSETNX", bykey, key, int(user_id)):
                indexed += 1
                continue
            holder = int(await self._command("HGET", bykey, key))
            if holder != int(user_id):
                collisions.append((name, int(user_id), holder))
        return indexed, collisions

    @_deferred
    async def check_password(self, user_id: int, password: str) -> bool:
        stored = await self._command("HGET", self._key("user", user_id), "pw")
        if not stored:
            return False
        return bool(await verify_password(password, stored, self._threads))

    @_deferred
    async def check_account_key(self, user_id: int, account_key: str) -> bool:
        stored = await self._command("HGET", self._key("user", user_id), "key")
        if not stored:
            return False
        return hmac.compare_digest(token_key(account_key), stored)

    # Sessions

    @_deferred
    async def claim_session(
        self,
        user_id: int,
        user_name: str,
        server: str,
        ttl: float,
        replace: bool = False,
    ) -> tuple[Session, Session | None]:
        session = Session(user_id, user_name, server, uuid.uuid4().hex, False)
        result = await self._run(
            scripts.CLAIM_SESSION,
            [self._key("session", user_id)],
            [
                user_id,
                user_name,
                server,
                session.session_id,
                _ms(ttl),
                "1" if replace else "0",
                self.prefix,
            ],
        )
        previous = decode_session(user_id, result[1:]) if len(result) > 1 else None
        if not int(result[0]):
            assert previous is not None
            raise SessionExists(previous)
        return session, previous

    @_deferred
    async def activate_session(
        self, user_id: int, session_id: str, ttl: float = SESSION_TTL
    ) -> bool:
        done = await self._run(
            scripts.ACTIVATE_SESSION,
            [self._key("session", user_id), self._key("online")],
            [user_id, session_id, _ms(ttl)],
        )
        return bool(int(done))

    @_deferred
    async def renew_sessions(
        self, server: str, sessions: Sequence[tuple[int, str, str]], ttl: float
    ) -> list[int]:
        args: list[Any] = [self.prefix, server, _ms(ttl)]
        for user_id, session_id, user_name in sessions:
            args += [user_id, session_id, user_name]
        if len(args) == 3:
            return []
        lost = await self._run(scripts.RENEW_SESSIONS, [], args)
        return sorted(int(u) for u in lost)

    @_deferred
    async def get_session(self, user_id: int) -> Session | None:
        fields = await self._command(
            "HMGET", self._key("session", user_id), *SESSION_FIELDS
        )
        if fields[2] is None:
            return None
        return decode_session(user_id, fields)

    @_deferred
    async def get_sessions(self, user_ids: Sequence[int]) -> dict[int, Session]:
        user_ids = list(user_ids)
        if not user_ids:
            return {}
        found = await self._run(
            scripts.GET_SESSIONS, [self._key("session", u) for u in user_ids], []
        )
        sessions = {}
        for index, name, server, session_id in found:
            user_id = user_ids[int(index) - 1]
            sessions[user_id] = Session(user_id, name, server, session_id, True)
        return sessions

    @_deferred
    async def release_session(self, user_id: int, session_id: str) -> bool:
        done = await self._run(
            scripts.RELEASE_SESSION,
            [self._key("session", user_id)],
            [user_id, session_id, self.prefix],
        )
        return bool(int(done))

    @_deferred
    async def online_users(self) -> list[tuple[int, str]]:
        flat = await self._run(
            scripts.ONLINE_USERS, [self._key("online")], [self.prefix]
        )
        return sorted(
            (int(u), name) for u, name in zip(flat[::2], flat[1::2], strict=True)
        )

    @_deferred
    async def drop_server_sessions(self, server: str) -> list[int]:
        dropped = await self._run(
            scripts.DROP_SERVER_SESSIONS,
            [self._key("server", server)],
            [server, self.prefix],
        )
        return sorted(int(u) for u in dropped)

    # Login tokens

    @_deferred
    async def issue_token(
        self, user_id: int, server: str, session_id: str, ttl: float
    ) -> str:
        token = secrets.token_urlsafe(32)
        digest = token_key(token)
        await self._run(
            scripts.ISSUE_TOKEN,
            [self._key("token", digest), self._key("tokens", user_id)],
            [user_id, server, session_id, _ms(ttl), digest, self.prefix],
        )
        return token

    @_deferred
    async def verify_token(self, token: str) -> TokenInfo | None:
        found = await self._run(
            scripts.VERIFY_TOKEN, [self._key("token", token_key(token))], [self.prefix]
        )
        if found is None:
            return None
        user_id, server, session_id = found
        return TokenInfo(int(user_id), server, session_id)

    # Messages

    @_deferred
    async def append(self, messages: Sequence[NewMessage]) -> list[ChatMessage]:
        if not messages:
            return []
        timestamp = int(self._seconds() * 1000)
        args: list[Any] = [
            timestamp,
            self.retention.max_messages,
            _ms(self.retention.max_age),
            _ms(self.retention.idempotency_window),
            self.prefix,
            max(0, int(self.retention.sender_quota)),
        ]
        for m in messages:
            sent_id = f"{m.sender_id}:{m.client_msg_id}" if m.client_msg_id else ""
            args += [m.conversation, m.sender_id, sent_id, encode_message(m, timestamp)]
        appended, retries = await self._run(
            scripts.APPEND, [self._key("msg", "next")], args
        )
        # A retry's original: stored, or only its ids when retention dropped it.
        originals: dict[int, ChatMessage | tuple[int, int, int, str]] = {}
        for i in range(0, len(retries), 6):
            index, msg_id, seq, ts, conversation, member = retries[i : i + 6]
            originals[int(index) - 1] = (
                decode_message(conversation, member)
                if member
                else (int(msg_id), int(seq), int(ts), conversation)
            )
        stored: list[ChatMessage | None] = []
        refused = False
        for index, (m, ids) in enumerate(
            zip(messages, appended.split(","), strict=True)
        ):
            if ids == "q":
                stored.append(None)
                refused = True
                continue
            if ids:
                msg_id, seq = ids.split(":")
                fields = (int(msg_id), int(seq), timestamp, m.conversation)
            else:
                original = originals[index]
                if isinstance(original, ChatMessage):
                    stored.append(original)
                    continue
                fields = original
            stored.append(
                ChatMessage(
                    msg_id=fields[0],
                    conversation=fields[3],
                    seq=fields[1],
                    sender_id=m.sender_id,
                    sender_name=m.sender_name,
                    text=m.text,
                    timestamp=fields[2],
                    client_msg_id=m.client_msg_id,
                    receive_user_id=m.receive_user_id,
                    group_id=m.group_id,
                )
            )
        if refused:
            raise QuotaExceeded(stored)
        return cast(list[ChatMessage], stored)

    @_deferred
    async def read(
        self, conversation: str, after_seq: int, limit: int
    ) -> list[ChatMessage]:
        if limit <= 0:
            return []
        members = await self._command(
            "ZRANGEBYSCORE",
            self._key("conv", conversation),
            f"({int(after_seq)}",
            "+inf",
            "LIMIT",
            0,
            int(limit),
        )
        return [decode_message(conversation, member) for member in members]

    @_deferred
    async def last_seq(self, conversation: str) -> int:
        seq = await self._command("GET", self._key("seq", conversation))
        return 0 if seq is None else int(seq)

    @_deferred
    async def set_cursors(self, user_id: int, cursors: dict[str, int]) -> None:
        args = _cursor_args(cursors)
        if args:
            await self._run(scripts.SET_CURSORS, [self._key("cursors", user_id)], args)

    @_deferred
    async def set_many_cursors(self, cursors: dict[int, dict[str, int]]) -> None:
        keys = []
        args: list[Any] = []
        for user_id, theirs in cursors.items():
            pairs = _cursor_args(theirs)
            if pairs:
                keys.append(self._key("cursors", user_id))
                args.append(len(pairs) // 2)
                args += pairs
        if keys:
            await self._run(scripts.SET_MANY_CURSORS, keys, args)

    @_deferred
    async def get_cursors(self, user_id: int) -> dict[str, int]:
        flat = await self._command("HGETALL", self._key("cursors", user_id))
        cursors = {}
        for conversation, text in zip(flat[::2], flat[1::2], strict=True):
            seq = _seq(text)
            if seq is None:
                self.log.warn(
                    "Skipping the bad stored cursor {conversation}={value!r} "
                    "of {user_id}",
                    conversation=conversation,
                    value=text[:40],
                    user_id=user_id,
                )
                continue
            cursors[conversation] = seq
        return cursors

    # Groups

    def _group_keys(self, group_id: str, user_id: int) -> list[str]:
        return [
            self._key("group", group_id),
            self._key("members", group_id),
            self._key("groups", user_id),
        ]

    @_deferred
    async def create_group(
        self,
        group_id: str,
        owner_id: int,
        policy: str = DEFAULT_POLICY,
        history: str = DEFAULT_HISTORY,
    ) -> None:
        created = await self._run(
            scripts.CREATE_GROUP,
            [*self._group_keys(group_id, owner_id), self._key("ginfo", group_id)],
            [owner_id, group_id, policy, history],
        )
        if not int(created):
            raise GroupExists(group_id)

    @_deferred
    async def group_info(self, group_id: str, user_id: int = 0) -> GroupInfo:
        found = await self._run(
            scripts.GROUP_INFO,
            [
                self._key("group", group_id),
                self._key("ginfo", group_id),
                self._key("members", group_id),
                self._key("joined", group_id),
                self._key("invited", group_id),
                self._key("asks", group_id),
            ],
            [user_id],
        )
        if found is None:
            raise NoSuchGroup(group_id)
        owner, policy, history, count, member, joined_at, invited, requested = found
        return GroupInfo(
            group_id,
            int(owner) if owner else None,
            policy or "open",
            history or "join",
            int(count),
            member=bool(int(member)),
            joined_at=int(joined_at),
            invited=bool(int(invited)),
            requested=bool(int(requested)),
        )

    async def _changed(
        self, script: Script, keys: list[str], args: list[Any], group_id: str
    ) -> bool:
        """
        Run a group script answering 1 (changed), 0 (unchanged) or -1 (no
        such group).
        """
        changed = int(await self._run(script, keys, args))
        if changed < 0:
            raise NoSuchGroup(group_id)
        return bool(changed)

    @_deferred
    async def join_group(self, group_id: str, user_id: int, seq: int = 0) -> bool:
        return await self._changed(
            scripts.JOIN_GROUP,
            [
                *self._group_keys(group_id, user_id),
                self._key("joined", group_id),
                self._key("invited", group_id),
                self._key("asks", group_id),
            ],
            [user_id, group_id, int(seq)],
            group_id,
        )

    @_deferred
    async def leave_group(self, group_id: str, user_id: int) -> bool:
        return await self._changed(
            scripts.LEAVE_GROUP,
            [*self._group_keys(group_id, user_id), self._key("joined", group_id)],
            [user_id, group_id],
            group_id,
        )

    @_deferred
    async def group_members(self, group_id: str) -> list[int]:
        members = await self._run(
            scripts.GROUP_MEMBERS,
            [self._key("group", group_id), self._key("members", group_id)],
            [],
        )
        if members is None:
            raise NoSuchGroup(group_id)
        return sorted(int(m) for m in members)

    @_deferred
    async def user_groups(self, user_id: int) -> list[str]:
        groups = await self._command("SMEMBERS", self._key("groups", user_id))
        return sorted(groups)

    @_deferred
    async def invite_to_group(self, group_id: str, user_id: int) -> bool:
        return await self._changed(
            scripts.INVITE_TO_GROUP,
            [self._key("group", group_id), self._key("invited", group_id)],
            [user_id],
            group_id,
        )

    @_deferred
    async def ask_to_join(self, group_id: str, user_id: int, limit: int) -> bool:
        asked = int(
            await self._run(
                scripts.ASK_TO_JOIN,
                [self._key("group", group_id), self._key("asks", group_id)],
                [user_id, int(self._seconds() * 1000), int(limit)],
            )
        )
        if asked == -1:
            raise NoSuchGroup(group_id)
        if asked == -2:
            raise TooManyJoinRequests(group_id)
        return bool(asked)

    @_deferred
    async def join_requests(self, group_id: str) -> list[int]:
        pending = await self._run(
            scripts.JOIN_REQUESTS,
            [self._key("group", group_id), self._key("asks", group_id)],
            [],
        )
        if pending is None:
            raise NoSuchGroup(group_id)
        return [int(u) for u in pending]

    @_deferred
    async def drop_join_request(self, group_id: str, user_id: int) -> bool:
        return await self._changed(
            scripts.DROP_JOIN_REQUEST,
            [self._key("group", group_id), self._key("asks", group_id)],
            [user_id],
            group_id,
        )

    @_deferred
    async def set_group_owner(self, group_id: str, owner_id: int) -> None:
        await self._changed(
            scripts.SET_GROUP_OWNER,
            [self._key("group", group_id), self._key("ginfo", group_id)],
            [owner_id],
            group_id,
        )


def connect_redis(
    url: str,
    clock: IReactorTime | None = None,
    retention: Retention = Retention(),
    prefix: str = "cim:",
    poolsize: int = 4,
    timeout: float = 10.0,
) -> defer.Deferred[RedisStore]:
    """
    Open a pool of connections to the Redis at C{url}.

    @param url: C{redis://[[user]:password@]host[:port][/db]}
        (L{parse_redis_url}).
    @param clock: the store's clock; the global reactor when C{None}.
    @param timeout: seconds to wait for a connection, and for each call.
    @return: a Deferred firing with the L{RedisStore} once Redis answered a
        PING, or failing with L{StoreError} (the pool is then closed).
    @raise ValueError: C{url} is not such a URL.
    """
    address = parse_redis_url(url)
    if clock is None:
        from twisted.internet import reactor

        clock = reactor  # type: ignore[assignment]
    assert clock is not None
    pool = open_pool(address, poolsize, timeout)
    store = RedisStore(pool, clock, retention, prefix, timeout)

    def failed(failure: Failure) -> defer.Deferred[Any]:
        return pool.disconnect().addBoth(lambda _: failure)

    return store.ping().addCallbacks(lambda _: store, failed)
