"""
L{RedisStore}: the L{IStore} kept in Redis, over txredisapi (which only
L{cim.store.redis.connection} imports); L{connect_redis} opens one from a
URL.

Key layout (every key starts with the store's prefix C{P}, C{"cim:"} by
default; user names and their keys are only ever hash fields and values,
never key names; the key of a user, a conversation or a group carries its
owner as a hash tag, between braces: L{cim.store.redis.layout})::

    P user:next                    string  INCR counter of user ids
    P user:bykey                   hash    name key (cim.names.name_key:
                                           NFKC, case-folded, confusable
                                           skeleton) -> user id
    P user:{<user_id>}             hash    name (as registered), pw (scrypt
                                           string) or key (SHA-256 of the
                                           account key, hex), or neither
    P devkey:{<user_id>}:<device>  string  the SHA-256 (hex) of the device's
                                           device key, the credential that
                                           outlives its sessions (the key
                                           itself is not stored); PEXPIRE
                                           the route's --device-key-ttl
    P session:{<user_id>}:<device>
                                   hash    one device's session (device ""
                                           for clients that name none: key
                                           "session:{<user_id>}:"): name,
                                           server, session_id, connected
                                           ("0"/"1"), active (seconds,
                                           records.encode_active),
                                           run (the Redis run_id when it
                                           was claimed or made again;
                                           missing in earlier releases'
                                           records: renew_sessions.lua);
                                           PEXPIRE'd: the claim's ttl until
                                           connected, then the session ttl,
                                           renewed by its server
    P sessions:{<user_id>}         set     the user's devices with a session
                                           (an entry whose record expired is
                                           dropped when read); PEXPIRE'd at
                                           least as long as each record
    P sgen:{<user_id>}             string  the user's session generation:
                                           INCR'd by every script that
                                           adds, connects, moves or deletes
                                           one of its sessions (missing: 0;
                                           never expires), read by appends
                                           and session lookups
                                           (sessions.lua)
    P ended:<session_id>           string  a session released or dropped by
                                           a newer claim (renewals of it are
                                           lost, not made again); PEXPIRE
                                           10 minutes (sessions.lua)
    P server:<server>              set     "<user_id>:<device>" of the
                                           sessions on server (checked
                                           against the session record, so
                                           stale entries are harmless)
    P servers                      set     the servers named by sessions
                                           (added by the claims and the
                                           renewals, dropped with a
                                           server's sessions; an entry of a
                                           server holding none is harmless)
    P online                       hash    user id -> user name, users with
                                           a connected session (an entry
                                           whose sessions expired is dropped
                                           when read)
    P token:<sha256(token), hex>   hash    user, server, session_id, device;
                                           PEXPIRE ttl (the token itself is
                                           not stored)
    P tokens:{<user_id>}:<device>  set     token digests of the device's
                                           session
    P msg:next                     string  counter of message ids (one INCRBY
                                           per appended batch)
    P seq:{<conversation>}         string  INCR counter of the conversation's
                                           seq (never expires, so a seq is
                                           never reused)
    P conv:{<conversation>}        zset    messages scored by seq; PEXPIRE
                                           max_age, refreshed on append, which
                                           also trims it to max_messages and
                                           drops up to AGE_SCAN (append.lua)
                                           messages older than max_age
    P sent:{<conversation>}:<sender_id>:<client_msg_id>
                                   string  "msg_id:seq:timestamp" of an
                                           appended message (earlier
                                           releases added
                                           ":conversation"); PEXPIRE the
                                           idempotency window
    P read:{<conversation>}        hash    the conversation's state:
                                           user id -> the user's read
                                           position, "<epoch>:<seq>" (see
                                           records); id, previous, base (the
                                           seq it started after; no
                                           previous nor base: "" and 0), run
                                           (the Redis run_id when it was
                                           written): its epoch
                                           (cim.interfaces.Epoch), written
                                           by append.lua, which starts a new
                                           one when the id is missing or the
                                           run is not Redis's; q:<sender_id>
                                           -> "<window>:<count>:<previous
                                           window's count>": the messages the
                                           sender appended in window
                                           now // max_age and the one before
                                           (the sender quota, append.lua);
                                           never expires
    P pairs:{<user_id>}            set     the user's private conversations
                                           (p:<low>:<high>) that hold
                                           messages (added by append.lua)
    P cursors:{<user_id>}          hash    conversation -> the acknowledged
                                           position of the user's device ""
                                           ("<epoch>:<seq>", or the digits of
                                           a seq of no epoch: the previous
                                           release's per-user cursors, kept
                                           as device "" cursors)
    P cursors:{<user_id>}:<device> hash    the same, of another device
    P cdevices:{<user_id>}         set     the user's devices other than ""
                                           that have cursors
                                           (forget_cursors.lua)
    P group:{g:<group_id>}         string  the creator's id (the group exists)
    P ginfo:{g:<group_id>}         hash    owner, policy, history; absent for
                                           a group stored before groups had
                                           owners (open, no owner)
    P members:{g:<group_id>}       set     member user ids
    P joined:{g:<group_id>}        hash    member id -> seq of the group's
                                           conversation when it joined (none
                                           for the creator and for members
                                           from before owners: 0)
    P invited:{g:<group_id>}       set     user ids invited, until they join
    P asks:{g:<group_id>}          zset    user ids asking to join, scored by
                                           the time they asked (ms)
    P groups:{<user_id>}           set     the user's group ids

What the values hold (a stored message's JSON with its epoch, a session
record, a position): L{cim.store.redis.records}.

Every update touching more than one key is one Lua script of
L{cim.store.redis.scripts} (EVALSHA, falling back to EVAL when Redis does not
know it), so it is atomic and costs one round trip.  Scripts name the keys
they touch in their C{KEYS} where the caller knows them; they derive from
the prefix the keys named by stored values (a user's device sessions, a
user's conversations) and, in the hot C{append.lua}, those of each message's
conversation.  Some scripts touch the keys of several owners (an append
many conversations and their users' C{pairs}, a claim a user's keys and
the cluster's lists), so the store needs a standalone Redis (not Redis
Cluster), for now: the hash tags are there so that a sharded store can
split those calls by owner (README, "Outgrowing one Redis", has the
plan).

The append script (for epochs) and the session claims and renewals (for
sessions a restored backup brought back: renew_sessions.lua) learn the
Redis C{run_id} from their connection, which asks it once
(L{cim.store.redis.connection.execute_with_run_id}), not by calling
C{INFO} at every call.

Upgrading from an earlier release (C{python -m cim.store.redis.migrate}):
its keys are renamed to the layout above first (L{RedisStore.retag_keys});
its sessions without a device (C{session:{<user_id>}},
C{tokens:{<user_id>}}) are ignored (they
expire by themselves; their clients log in again, and an IM server that
still holds a connection makes its session again, as device C{""}, at its
next renewal); its cursors are the device C{""} cursors; its private inboxes
C{conv:{u:<id>}} are moved into pair conversations by the migration
(L{RedisStore.move_old_inboxes}), and its epoch records
C{epoch:{<conversation>}} into the conversations' hashes
(L{RedisStore.move_epoch_records}); its quota counts (C{quota:...}) are
not read (they expire by themselves); its session records have no C{run}
and are renewed as before (never taken for a restored older copy).

The connection must decode replies as UTF-8 and leave numbers as strings
(C{convertNumbers=False}), as the pool of
L{cim.store.redis.connection.open_pool} does.
"""

from __future__ import annotations

import functools
import hmac
import json
import secrets
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, NamedTuple, ParamSpec, TypeVar, cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
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
    StoreError,
    TokenInfo,
    TokenLogin,
    TooManyJoinRequests,
)
from cim.limits import MAX_DEVICES, MAX_SEQ, SESSION_TTL
from cim.message import (
    INBOX_PREFIX,
    ChatMessage,
    Position,
    inbox,
    pair_conversation,
    peer_of,
)
from cim.names import name_key
from cim.passwords import hash_password, verify_password
from cim.store import RedisAddress, Retention, parse_redis_url
from cim.store.memory import token_key
from cim.store.redis import layout, scripts
from cim.store.redis.bus import bus_channel
from cim.store.redis.connection import is_down, open_pool
from cim.store.redis.deadlines import Deadlines
from cim.store.redis.records import (
    SESSION_FIELDS,
    decode_epoch,
    decode_message,
    decode_position,
    decode_session,
    encode_active,
    encode_position,
    message_fields,
    resume_seq,
)
from cim.store.redis.scripts import Script

_P = ParamSpec("_P")
_T = TypeVar("_T")

#: How many entries one step of a scan looks at (Redis's C{HSCAN} or
#: C{SSCAN ... COUNT}, a hint), each step a script call of a few
#: milliseconds: the online users (C{online_users.lua}), a server's
#: sessions (C{server_sessions.lua}).
SCAN_STEP = 250


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


def _cursor_args(cursors: dict[str, Position]) -> list[Any]:
    """
    C{cursors} as set_cursors.lua's flat C{conversation, position}
    arguments, each position as it is stored (L{encode_position}); a seq that is not an integer between
    1 and L{MAX_SEQ} is left out.
    """
    args: list[Any] = []
    for conversation, position in cursors.items():
        seq = position[1]
        if type(seq) is int and 0 < seq <= MAX_SEQ:
            args += [conversation, encode_position(position)]
    return args


def _generations(reply: str) -> Generations | None:
    """
    The L{Generations} of append.lua's reply (run_id, then user id and
    generation of each user, separated by commas; C{""}: none).
    """
    if not reply:
        return None
    parts = reply.split(",")
    return Generations(
        parts[0], dict(zip(map(int, parts[1::2]), map(int, parts[2::2]), strict=True))
    )


def _new_epoch_id() -> str:
    """
    A new random epoch id (as L{cim.store.memory.MemoryStore} makes them).
    """
    return secrets.token_hex(8)


def _glob_escape(text: str) -> str:
    """
    C{text} as a Redis glob pattern matching only itself.
    """
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _old_sender(member: str) -> int | None:
    """
    The sender of a message of a previous release's inbox, or C{None} when
    it has none that is a user id (or is not a stored message).
    """
    try:
        sender = json.loads(member).get("s")
    except (ValueError, AttributeError):
        return None
    return sender if type(sender) is int and sender >= 1 else None


class MovedInboxes(NamedTuple):
    """
    What L{RedisStore.move_old_inboxes} did: how many inboxes it found,
    messages it moved, pair conversations it wrote, and messages it could
    not move (dropped).
    """

    inboxes: int
    messages: int
    conversations: int
    skipped: int


#: What activate_token.lua may answer instead of a session.
_REFUSALS = frozenset(
    {TOKEN_UNKNOWN, TOKEN_OTHER_USER, TOKEN_OTHER_SERVER, SESSION_OTHER_SERVER}
)


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
        #: The time-out of every call (L{_guard}).
        self._deadlines = Deadlines(clock)
        self._threads = clock if IReactorThreads.providedBy(clock) else None
        #: Where the Redis is, when known (L{connect_redis}): the message
        #: bus (L{cim.bus.open_bus}) connects there too.
        self.address: RedisAddress | None = None

    def close(self) -> defer.Deferred[Any]:
        """
        Close the connections.  @return: a Deferred firing once they are.
        """
        self._deadlines.stop()
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
        timeout = self.timeout
        if timeout is not None:
            self._deadlines.watch(d, timeout)

        def failed(failure: Failure) -> None:
            if timeout is not None and failure.check(defer.CancelledError):
                why = f"no answer within {timeout:g} s"
            else:
                why = failure.getErrorMessage()
            raise StoreError(f"Redis {what} failed: {why}") from failure.value

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
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[Any],
        run_id: bool = False,
    ) -> Awaitable[Any]:
        """
        Run C{script} (L{Script.run}; with C{run_id}, the run_id of the Redis
        running it is its last argument).
        """
        down = self._down("script")
        if down is not None:
            return down
        return self._guard(script.run(self._redis, keys, args, run_id), "script")

    def _key(self, kind: str, *parts: object) -> str:
        """
        The key of C{kind} named by C{parts} (L{layout.key}).
        """
        return layout.key(self.prefix, kind, *parts)

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
        key = name_key(user_name)
        stored = digest = ""
        if password is not None:
            # A password is hashed (slowly, in a thread) only for a name
            # that is free.
            found = await self._by_key(user_name)
            if found is not None:
                return self._account(*found)
            stored = await hash_password(password, self._threads)
        elif account_key is not None:
            digest = token_key(account_key)
        # One round trip: the script returns the existing account, if any.
        created, user_id, name, has_pw, has_key = await self._run(
            scripts.REGISTER,
            [self._key("user", "bykey"), self._key("user", "next")],
            [key, user_name, stored, digest, self.prefix],
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

    async def _scan(self, pattern: str) -> list[str]:
        """
        Every key of the store whose name after the prefix matches the glob
        C{pattern}.
        """
        found: set[str] = set()
        cursor = "0"
        while True:
            cursor, keys = await self._command(
                "SCAN",
                cursor,
                "MATCH",
                _glob_escape(self.prefix) + pattern,
                "COUNT",
                1000,
            )
            found.update(keys)
            if str(cursor) == "0":
                return sorted(found, key=lambda k: (len(k), k))

    async def _scan_steps(self, script: Script, key: str, args: list[Any]) -> list[Any]:
        """
        What C{script} finds in C{key} (a hash or set it scans, its
        C{ARGV} ending with the cursor and the step's size), a step of
        L{SCAN_STEP} entries a call, so that no call holds Redis long: the
        flat lists of every step, joined.
        """
        found: list[Any] = []
        cursor = "0"
        while True:
            cursor, step = await self._run(script, [key], [*args, cursor, SCAN_STEP])
            found += step
            if cursor == "0":
                return found

    async def written_before_layout(self) -> bool:
        """
        Whether the store is one of the releases before L{layout} that was
        not migrated (its newest account has its old name).
        """
        earlier = await self._run(
            scripts.LAYOUT, [self._key("user", "next")], [self.prefix]
        )
        return bool(int(earlier))

    async def retag_keys(self) -> tuple[int, list[tuple[str, str]]]:
        """
        Rename the keys of a store written before keys had hash tags
        (L{layout}: C{pairs:7} becomes C{pairs:{7}}, C{conv:p:1:2}
        C{conv:{p:1:2}}), keeping their values and time to live.  Run
        before the other steps of the migration, which read the new names.
        Safe to run again: a key is renamed at most once.

        @return: how many keys were renamed, and the keys left as they are
            because their new name is taken (by the new release's daemons,
            run before the migration): C{(old name, new name)}.
        """
        renamed = 0
        taken: list[tuple[str, str]] = []
        names = await self._scan("*")
        # The newest account last: until it is renamed, daemons take the
        # store for an earlier release's (L{written_before_layout}).
        newest = (
            f"{self.prefix}user:{await self._command('GET', self._key('user', 'next'))}"
        )
        names.sort(key=lambda name: name == newest)
        for name in names:
            new = layout.retagged(self.prefix, name)
            if new is None:
                continue
            if int(await self._command("RENAMENX", name, new)):
                renamed += 1
            else:
                taken.append((name, new))
        return renamed, taken

    async def move_epoch_records(self) -> int:
        """
        Move the conversations' epoch records of a store written by an
        earlier release (C{epoch:{<conversation>}}, a hash of its own, once
        L{retag_keys} has named it) into the conversations' hashes
        (C{read:{<conversation>}}, beside the read positions), and delete
        them; returns how many were moved.  A conversation whose hash holds
        an epoch already (one the new release's daemons started) keeps it.
        Safe to run again: nothing is left to move the second time.
        """
        # (What comes before the conversation: the key of "" less its "}".)
        start = len(self._key("epoch", "")) - 1
        moved = 0
        for key in await self._scan("epoch:{*}"):
            conversation = key[start:-1]
            moved += int(
                await self._run(
                    scripts.MOVE_EPOCH, [key, self._key("read", conversation)], []
                )
            )
        return moved

    async def move_old_inboxes(self) -> MovedInboxes:
        """
        Move the private inboxes of a store written by an earlier release
        (C{conv:{u:<id>}}, once L{retag_keys} has named them: the messages
        others sent to user C{<id>}) into the
        pair conversations of their senders and receivers
        (L{cim.message.pair_conversation}), then delete them (with their
        seq counters and their owners' cursors in them).  Each pair
        conversation gets its messages of both inboxes merged in msg id
        order, numbered again from 1 in a new epoch; each user's read
        position there covers its own messages and those it had received
        (its cursor in its inbox).  A message whose sender is not a user id
        cannot be moved: it is dropped, and counted.  Safe to run again: a
        message is moved at most once (each pair's move is one script,
        taking the messages out of the inbox as it moves them), and
        nothing is left to move the second time.
        """
        # (What comes before the user id: the key of inbox "u:" less its "}".)
        start = len(self._key("conv", INBOX_PREFIX)) - 1
        inboxes = messages = skipped = 0
        conversations: set[str] = set()
        for key in await self._scan("conv:{u:*}"):
            owner_text = key[start:-1]
            if not owner_text.isdigit() or str(int(owner_text)) != owner_text:
                continue
            owner = int(owner_text)
            if owner < 1:
                continue
            inboxes += 1
            received = decode_position(
                await self._command("HGET", self._key("cursors", owner), inbox(owner))
            )
            by_sender: dict[int, list[str]] = {}
            bad: list[str] = []
            for member in await self._command("ZRANGE", key, 0, -1):
                sender = _old_sender(member)
                if sender is None:
                    bad.append(member)
                else:
                    by_sender.setdefault(sender, []).append(member)
            for sender, members in sorted(by_sender.items()):
                conversation = pair_conversation(owner, sender)
                moved = await self._run(
                    scripts.MIGRATE_INBOX,
                    [
                        key,
                        self._key("conv", conversation),
                        self._key("seq", conversation),
                        self._key("read", conversation),
                        self._key("read", conversation),
                        self._key("pairs", owner),
                        self._key("pairs", sender),
                    ],
                    [
                        owner,
                        sender,
                        _new_epoch_id(),
                        0 if received is None else received.seq,
                        conversation,
                        *members,
                    ],
                )
                if int(moved):
                    messages += int(moved)
                    conversations.add(conversation)
            if bad:
                skipped += int(await self._command("ZREM", key, *bad))
            if not int(await self._command("EXISTS", key)):
                await self._command("DEL", self._key("seq", inbox(owner)))
                await self._command("HDEL", self._key("cursors", owner), inbox(owner))
        return MovedInboxes(inboxes, messages, len(conversations), skipped)

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

    @_deferred
    async def set_device_key(
        self, user_id: int, device: str, device_key: str, ttl: float
    ) -> None:
        await self._command(
            "SET",
            self._key("devkey", user_id, device),
            token_key(device_key),
            "PX",
            _ms(ttl),
        )

    @_deferred
    async def check_device_key(
        self, user_id: int, device: str, device_key: str
    ) -> bool:
        stored = await self._command("GET", self._key("devkey", user_id, device))
        if not stored:
            return False
        return hmac.compare_digest(token_key(device_key), stored)

    @_deferred
    async def drop_device_key(self, user_id: int, device: str) -> None:
        await self._command("DEL", self._key("devkey", user_id, device))

    # Sessions

    def _session_key(self, user_id: int, device: str) -> str:
        return self._key("session", user_id, device)

    def _sessions(self, user_id: int, flat: Sequence[Any]) -> list[Session]:
        """
        Sessions from a script's flat fields: device, name, server, session
        id, connected, active each.
        """
        found = []
        for i in range(0, len(flat), 6):
            device, name, server, session_id, connected, active = flat[i : i + 6]
            found.append(
                decode_session(
                    user_id, device, (name, server, session_id, connected, active)
                )
            )
        return found

    def _claim(
        self,
        user_id: int,
        user_name: str,
        server: str,
        ttl: float,
        replace: bool,
        device: str,
        max_devices: int,
    ) -> tuple[Session, list[str], list[Any]]:
        """
        A new, not yet connected session of C{user_id}'s C{device}, and the
        keys and arguments that claim it (claims.lua's C{claim}, the first
        ones of claim_session.lua and open_session.lua).
        """
        active = encode_active(self._seconds())
        session = Session(
            user_id, user_name, server, uuid.uuid4().hex, False, device, float(active)
        )
        keys = [
            self._session_key(user_id, device),
            self._key("sessions", user_id),
            self._key("server", server),
        ]
        args: list[Any] = [
            user_id,
            user_name,
            server,
            session.session_id,
            _ms(ttl),
            "1" if replace else "0",
            self.prefix,
            device,
            int(max_devices),
            active,
        ]
        return session, keys, args

    def _claimed(self, user_id: int, result: Sequence[Any]) -> list[Session]:
        """
        The sessions a claim (claims.lua's C{claim}) dropped.

        @raise SessionExists: it was refused.
        """
        sessions = self._sessions(user_id, result[1:])
        if not int(result[0]):
            raise SessionExists(sessions[0])
        return sessions

    @_deferred
    async def claim_session(
        self,
        user_id: int,
        user_name: str,
        server: str,
        ttl: float,
        replace: bool = False,
        device: str = "",
        max_devices: int = MAX_DEVICES,
    ) -> tuple[Session, list[Session]]:
        session, keys, args = self._claim(
            user_id, user_name, server, ttl, replace, device, max_devices
        )
        result = await self._run(scripts.CLAIM_SESSION, keys, args, run_id=True)
        return session, self._claimed(user_id, result)

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
    ) -> defer.Deferred[tuple[Session, list[Session], str]]:
        # A Deferred and one callback, not a coroutine: every route login
        # comes here.
        try:
            session, keys, args = self._claim(
                user_id, user_name, server, claim_ttl, replace, device, max_devices
            )
            token = secrets.token_urlsafe(32)
            digest = token_key(token)
            keys += [
                self._key("token", digest),
                self._key("tokens", user_id, device),
                self._key("devkey", user_id, device),
            ]
            args += [
                _ms(token_ttl),
                digest,
                "" if device_key is None else token_key(device_key),
                _ms(device_key_ttl),
                "" if used_device_key is None else token_key(used_device_key),
            ]
            ran = self._run(scripts.OPEN_SESSION, keys, args, run_id=True)
        except Exception:
            return defer.fail()

        def opened(result: Any) -> tuple[Session, list[Session], str]:
            if int(result[0]) < 0:
                raise DeviceKeyUsed()
            return session, self._claimed(user_id, result), token

        d: defer.Deferred[Any] = ran  # type: ignore[assignment]
        return d.addCallback(opened)

    @_deferred
    async def activate_session(
        self,
        user_id: int,
        session_id: str,
        ttl: float = SESSION_TTL,
        device: str = "",
    ) -> bool:
        done = await self._run(
            scripts.ACTIVATE_SESSION,
            [
                self._session_key(user_id, device),
                self._key("online"),
                self._key("sessions", user_id),
                self._key("sgen", user_id),
            ],
            [user_id, session_id, _ms(ttl), encode_active(self._seconds())],
        )
        return bool(int(done))

    @_deferred
    async def renew_sessions(
        self, server: str, sessions: Sequence[HeldSession], ttl: float
    ) -> Renewal:
        args: list[Any] = [self.prefix, server, _ms(ttl)]
        for user_id, session_id, user_name, device, active in sessions:
            args += [user_id, session_id, user_name, device, encode_active(active)]
        if len(args) == 3:
            return Renewal([], [])
        lost, restored = await self._run(scripts.RENEW_SESSIONS, [], args, run_id=True)
        return Renewal(sorted(lost), sorted(restored))

    @_deferred
    async def get_session(self, user_id: int, device: str = "") -> Session | None:
        fields = await self._command(
            "HMGET", self._session_key(user_id, device), *SESSION_FIELDS
        )
        if fields[2] is None:
            return None
        return decode_session(user_id, device, fields)

    async def _user_sessions(
        self, user_ids: Sequence[int], connected: bool
    ) -> dict[int, list[Session]]:
        """
        The sessions of each of C{user_ids} that has any (only the connected
        ones if C{connected}, then with their L{Generations}: a
        L{FoundSessions}), ordered by device.
        """
        found = await self._run(
            scripts.GET_SESSIONS,
            [self._key("sessions", u) for u in user_ids],
            [self.prefix, "2" if connected else "0", *user_ids],
            run_id=connected,
        )
        sessions: dict[int, list[Session]] = {}
        start = 0
        if connected:
            start = len(user_ids) + 1
            run = found[0]
            sessions = FoundSessions(
                Generations(
                    run, dict(zip(user_ids, map(int, found[1:start]), strict=True))
                )
                if run
                else None
            )
        for i in range(start, len(found), 7):
            user_id = user_ids[int(found[i]) - 1]
            sessions.setdefault(user_id, []).append(
                decode_session(user_id, found[i + 1], found[i + 2 : i + 7])
            )
        for held in sessions.values():
            held.sort(key=lambda session: session.device)
        return sessions

    @_deferred
    async def user_sessions(self, user_id: int) -> list[Session]:
        found = await self._user_sessions([user_id], False)
        return found.get(user_id, [])

    @_deferred
    async def get_sessions(self, user_ids: Sequence[int]) -> dict[int, list[Session]]:
        user_ids = list(user_ids)
        if not user_ids:
            return {}
        return await self._user_sessions(user_ids, True)

    @_deferred
    async def session_servers(self) -> list[str]:
        servers = await self._command("SMEMBERS", self._key("servers"))
        return sorted(servers)

    @_deferred
    async def release_session(
        self, user_id: int, session_id: str, device: str = ""
    ) -> bool:
        done = await self._run(
            scripts.RELEASE_SESSION,
            [self._session_key(user_id, device)],
            [user_id, session_id, self.prefix, device],
        )
        return bool(int(done))

    @_deferred
    async def online_users(self) -> list[tuple[int, str]]:
        # (One script over 19,000 online users held Redis 150 ms.  An
        # entry may come twice, HSCAN's rule: hence the dictionary.)
        flat = await self._scan_steps(
            scripts.ONLINE_USERS, self._key("online"), [self.prefix]
        )
        return sorted(dict(zip(map(int, flat[::2]), flat[1::2], strict=True)).items())

    @_deferred
    async def drop_server_sessions(self, server: str) -> list[int]:
        # (One script dropping 19,000 sessions held Redis 0.5 s, when a
        # server died and its clients log in elsewhere.)  First the
        # server's sessions and their ids are read, then those still the
        # same are dropped, SCAN_STEP a call: a session the server makes
        # after the read (restarted at the same address) stays.
        key = self._key("server", server)
        found = await self._scan_steps(
            scripts.SERVER_SESSIONS, key, [server, self.prefix]
        )
        dropped: set[int] = set()
        size = 2 * SCAN_STEP
        for start in range(0, max(len(found), 1), size):
            last = start + size >= len(found)
            users = await self._run(
                scripts.DROP_SESSIONS,
                [key],
                [
                    server,
                    self.prefix,
                    "1" if last else "0",
                    *found[start : start + size],
                ],
            )
            dropped.update(map(int, users))
        return sorted(dropped)

    # Login tokens

    @_deferred
    async def issue_token(
        self,
        user_id: int,
        server: str,
        session_id: str,
        ttl: float,
        device: str = "",
    ) -> str:
        token = secrets.token_urlsafe(32)
        digest = token_key(token)
        await self._run(
            scripts.ISSUE_TOKEN,
            [self._key("token", digest), self._key("tokens", user_id, device)],
            [user_id, server, session_id, _ms(ttl), digest, self.prefix, device],
        )
        return token

    @_deferred
    async def activate_token(
        self, token: str, user_id: int, server: str, ttl: float = SESSION_TTL
    ) -> Session | str:
        active = encode_active(self._seconds())
        found = await self._run(
            scripts.ACTIVATE_TOKEN,
            [self._key("token", token_key(token)), self._key("online")],
            [self.prefix, user_id, server, _ms(ttl), active],
        )
        return self._activated(found, user_id, server, active)

    @staticmethod
    def _activated(
        found: Sequence[Any], user_id: int, server: str, active: str
    ) -> Session | str:
        """
        The session that C{activate_token.lua} activated, or why it refused.
        """
        refused, device, name, session_id = found[:4]
        if refused:
            if refused not in _REFUSALS:
                raise StoreError(f"activate_token.lua answered {refused!r}")
            return str(refused)
        return Session(user_id, name, server, session_id, True, device, float(active))

    @_deferred
    async def token_login(
        self, token: str, user_id: int, server: str, ttl: float = SESSION_TTL
    ) -> TokenLogin | str:
        """
        L{IStore.token_login}: C{activate_token.lua} reads the user's
        conversations and the device's cursors right after the activation,
        in the same script.
        """
        active = encode_active(self._seconds())
        found = await self._run(
            scripts.ACTIVATE_TOKEN,
            [self._key("token", token_key(token)), self._key("online")],
            [self.prefix, user_id, server, _ms(ttl), active, "1"],
        )
        session = self._activated(found, user_id, server, active)
        if isinstance(session, str):
            return session
        return TokenLogin(
            session,
            self._decode_states(found[4], user_id),
            self._decode_cursors(found[5], user_id, session.device),
        )

    @_deferred
    async def verify_token(self, token: str) -> TokenInfo | None:
        found = await self._run(
            scripts.VERIFY_TOKEN, [self._key("token", token_key(token))], [self.prefix]
        )
        if found is None:
            return None
        user_id, server, session_id, device = found
        return TokenInfo(int(user_id), server, session_id, device)

    # Messages

    #: L{append} takes a C{feed} (see there).
    feeds = True

    @_deferred
    async def append(
        self,
        messages: Sequence[NewMessage],
        feed: Sequence[Sequence[int] | None] | None = None,
    ) -> list[ChatMessage]:
        """
        L{IStore.append}.

        @param feed: the group feed: for each message, C{None}, or the
            users to deliver it to.  The script publishes those it appends
            (not a retry's, which was published when it was appended) to
            the bus channel of every server holding sessions
            (L{session_servers}), in the order it stores them, all of one
            call in one payload (L{cim.bus.decode_feed}); each server
            delivers them to the users it holds.  So no server gets a
            group's messages out of order, whichever server sent them.
        """
        if not messages:
            return []
        timestamp = int(self._seconds() * 1000)
        new_epoch = _new_epoch_id()
        args: list[Any] = [
            timestamp,
            self.retention.max_messages,
            _ms(self.retention.max_age),
            _ms(self.retention.idempotency_window),
            self.prefix,
            max(0, int(self.retention.sender_quota)),
            new_epoch,
        ]
        for m in messages:
            sent_id = (
                layout.sent_id(m.conversation, m.sender_id, m.client_msg_id)
                if m.client_msg_id
                else ""
            )
            # (Without its braces: the script adds its ids and epoch.)
            args += [
                m.conversation,
                m.sender_id,
                sent_id,
                message_fields(m, timestamp),
            ]
        args.append(self._feed_spec(feed) if feed else "")
        appended, retries, epoch_ids, generations = await self._run(
            scripts.APPEND, [self._key("msg", "next")], args, run_id=True
        )
        # (The conversations that kept their epoch; the others started
        # new_epoch.)
        epochs = dict(zip(epoch_ids[::2], epoch_ids[1::2], strict=True))
        # A retry's original: stored, or only its ids when retention dropped it.
        originals: dict[int, ChatMessage | tuple[int, int, int, str, str]] = {}
        for i in range(0, len(retries), 7):
            index, msg_id, seq, ts, conversation, member, epoch = retries[i : i + 7]
            originals[int(index) - 1] = (
                decode_message(conversation, member)
                if member
                else (int(msg_id), int(seq), int(ts), conversation, epoch)
            )
        stored: list[ChatMessage | None] = []
        refused = False
        ids = appended.split(",")
        for index, m in enumerate(messages):
            msg_id = ids[2 * index]
            if msg_id == "q":
                stored.append(None)
                refused = True
                continue
            if msg_id:
                seq = ids[2 * index + 1]
                fields = (
                    int(msg_id),
                    int(seq),
                    timestamp,
                    m.conversation,
                    epochs.get(m.conversation, new_epoch),
                )
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
                    epoch=fields[4],
                )
            )
        if refused:
            raise QuotaExceeded(stored)
        return Appended(cast(list[ChatMessage], stored), _generations(generations))

    def _feed_spec(self, feed: Sequence[Sequence[int] | None]) -> str:
        """
        The append script's group feed argument for C{feed} (see
        append.lua): each list of users written once.
        """
        assert self.address is not None, "the store is not open"
        lists: dict[int, int] = {}
        texts: list[str] = []
        by_text: dict[str, int] = {}
        refs = []
        for users in feed:
            if not users:
                # (Nobody to deliver to: an empty list would be no line.)
                refs.append("0")
                continue
            ref = lists.get(id(users))
            if ref is None:
                text = ",".join(map(str, users))
                ref = by_text.get(text)
                if ref is None:
                    texts.append(text)
                    ref = by_text[text] = len(texts)
                lists[id(users)] = ref
            refs.append(str(ref))
        channels = bus_channel(self.prefix, self.address.db, "")
        return "\n".join([channels, " ".join(refs), *texts])

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
    async def read_before(
        self, conversation: str, before_seq: int, limit: int
    ) -> list[ChatMessage]:
        if limit <= 0:
            return []
        members = await self._command(
            "ZREVRANGEBYSCORE",
            self._key("conv", conversation),
            f"({int(before_seq)}" if before_seq > 0 else "+inf",
            "-inf",
            "LIMIT",
            0,
            int(limit),
        )
        return [decode_message(conversation, member) for member in reversed(members)]

    @_deferred
    async def last_seq(self, conversation: str) -> int:
        seq = await self._command("GET", self._key("seq", conversation))
        return 0 if seq is None else int(seq)

    @_deferred
    async def epochs(self, conversations: Sequence[str]) -> dict[str, Epoch]:
        conversations = list(dict.fromkeys(conversations))
        if not conversations:
            return {}
        keys = []
        for conversation in conversations:
            keys += [self._key("read", conversation), self._key("seq", conversation)]
        flat = await self._run(scripts.EPOCHS, keys, [])
        return {
            conversation: decode_epoch(*flat[4 * i : 4 * i + 4])
            for i, conversation in enumerate(conversations)
        }

    # Cursors

    def _cursor_key(self, user_id: int, device: str) -> str:
        """
        The device's cursors: device C{""} keeps the key of the previous
        release's (per user) cursors, which so remain its.
        """
        if not device:
            return self._key("cursors", user_id)
        return self._key("cursors", user_id, device)

    def _cursor_script_args(
        self,
        user_id: int,
        device: str,
        cursors: dict[str, Position],
        keys: list[str],
        args: list[Any],
    ) -> None:
        """
        Add a device's cursors to the keys and arguments of C{set_cursors.lua}.
        """
        pairs = _cursor_args(cursors)
        if pairs:
            keys += [self._cursor_key(user_id, device), self._key("cdevices", user_id)]
            args += [device, len(pairs) // 2, *pairs]

    @_deferred
    async def set_cursors(
        self, user_id: int, cursors: dict[str, Position], device: str = ""
    ) -> None:
        keys: list[str] = []
        args: list[Any] = []
        self._cursor_script_args(user_id, device, cursors, keys, args)
        if keys:
            await self._run(scripts.SET_CURSORS, keys, args)

    @_deferred
    async def set_many_cursors(
        self, cursors: dict[tuple[int, str], dict[str, Position]]
    ) -> None:
        keys: list[str] = []
        args: list[Any] = []
        for (user_id, device), theirs in cursors.items():
            self._cursor_script_args(user_id, device, theirs, keys, args)
        if keys:
            await self._run(scripts.SET_CURSORS, keys, args)

    @_deferred
    async def get_cursors(self, user_id: int, device: str = "") -> dict[str, Position]:
        flat = await self._command("HGETALL", self._cursor_key(user_id, device))
        return self._decode_cursors(flat, user_id, device)

    def _decode_cursors(
        self, flat: Sequence[str], user_id: int, device: str
    ) -> dict[str, Position]:
        cursors = {}
        for conversation, text in zip(flat[::2], flat[1::2], strict=True):
            position = decode_position(text)
            if position is None:
                self.log.warn(
                    "Skipping the bad stored cursor {conversation}={value!r} "
                    "of {user_id} ({device!r})",
                    conversation=conversation,
                    value=text[:40],
                    user_id=user_id,
                    device=device,
                )
                continue
            cursors[conversation] = position
        return cursors

    @_deferred
    async def forget_cursors(self, user_id: int, conversation: str) -> None:
        await self._run(
            scripts.FORGET_CURSORS,
            [self._key("cdevices", user_id), self._cursor_key(user_id, "")],
            [conversation, self.prefix, user_id],
        )

    # Read positions

    def _read_keys(self, conversation: str) -> list[str]:
        return [
            self._key("read", conversation),
            self._key("read", conversation),
            self._key("seq", conversation),
        ]

    @_deferred
    async def set_read(self, user_id: int, conversation: str, seq: int) -> int:
        if type(seq) is not int or seq > MAX_SEQ:
            seq = 0
        read = await self._run(
            scripts.SET_READ, self._read_keys(conversation), [user_id, seq]
        )
        return int(read)

    @_deferred
    async def read_positions(
        self, conversation: str, user_ids: Sequence[int]
    ) -> dict[int, int]:
        user_ids = list(user_ids)
        found = await self._run(
            scripts.READ_POSITIONS, self._read_keys(conversation), user_ids
        )
        epoch = decode_epoch(*found[:4])
        return {
            user_id: resume_seq(text, epoch)
            for user_id, text in zip(user_ids, found[4:], strict=True)
        }

    @_deferred
    async def conversations(self, user_id: int) -> list[ConversationState]:
        flat = await self._run(
            scripts.CONVERSATIONS,
            [self._key("pairs", user_id), self._key("groups", user_id)],
            [user_id, self.prefix],
        )
        return self._decode_states(flat, user_id)

    @_deferred
    async def login_reads(
        self, user_id: int, device: str = ""
    ) -> tuple[list[ConversationState], dict[str, Position]]:
        flat, cursors = await self._run(
            scripts.CONVERSATIONS,
            [
                self._key("pairs", user_id),
                self._key("groups", user_id),
                self._cursor_key(user_id, device),
            ],
            [user_id, self.prefix],
        )
        return (
            self._decode_states(flat, user_id),
            self._decode_cursors(cursors, user_id, device),
        )

    @staticmethod
    def _decode_states(flat: Sequence[str], user_id: int) -> list[ConversationState]:
        """
        The states that C{conversations.lua} lists (flat, eight fields
        each), ordered by conversation.
        """
        states = []
        for i in range(0, len(flat), 8):
            conversation, group_id, id, previous, base, last, read, other = flat[
                i : i + 8
            ]
            epoch = decode_epoch(id, previous, base, last)
            peer = 0 if group_id else peer_of(conversation, user_id)
            joined = int(other) if group_id and other.isdigit() else 0
            states.append(
                ConversationState(
                    conversation,
                    epoch.id,
                    int(last),
                    resume_seq(read, epoch),
                    peer_id=peer or 0,
                    peer_read=resume_seq(other, epoch) if peer else 0,
                    group_id=group_id,
                    joined=joined,
                    epoch_previous=epoch.previous,
                    epoch_base=epoch.base,
                )
            )
        return sorted(states, key=lambda state: state.conversation)

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
        return sorted(map(int, members))

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
    check_layout: bool = True,
) -> defer.Deferred[RedisStore]:
    """
    Open a pool of connections to the Redis at C{url}.

    @param url: C{redis://[[user]:password@]host[:port][/db]}
        (L{parse_redis_url}).
    @param clock: the store's clock; the global reactor when C{None}.
    @param timeout: seconds to wait for a connection, and for each call.
    @param check_layout: refuse a store whose keys are laid out as an
        earlier release laid them out (L{RedisStore.written_before_layout}): it
        must be migrated first, or its data would look lost.
    @return: a Deferred firing with the L{RedisStore} once Redis answered a
        PING (and the layout is this release's), or failing with
        L{StoreError} (the pool is then closed).
    @raise ValueError: C{url} is not such a URL.
    """
    address = parse_redis_url(url)
    if clock is None:
        from twisted.internet import reactor

        clock = reactor  # type: ignore[assignment]
    assert clock is not None
    pool = open_pool(address, poolsize, timeout)
    store = RedisStore(pool, clock, retention, prefix, timeout)
    store.address = address

    async def check() -> RedisStore:
        await store.ping()
        if not check_layout:
            return store
        if await store.written_before_layout():
            # (Not the URL: it may hold a password.)
            where = f"redis://{address.host}:{address.port}/{address.db}"
            raise StoreError(
                f"the Redis store at {where} was written by an earlier release "
                f"of cim: stop its daemons and run python -m cim.store.redis.migrate "
                f"{where} (with its password, if any) before starting this release"
            )
        return store

    def failed(failure: Failure) -> defer.Deferred[Any]:
        return pool.disconnect().addBoth(lambda _: failure)

    return defer.ensureDeferred(check()).addErrback(failed)
