"""
One behavioural suite for every L{IStore}: the in-memory one, and the Redis
one against the test Redis (skipped without C{CIM_TEST_REDIS}).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task
from zope.interface.verify import verifyObject

from cim.interfaces import (
    Account,
    ConversationState,
    DeviceKeyUsed,
    Epoch,
    Generations,
    GroupExists,
    GroupInfo,
    HeldSession,
    IStore,
    NewMessage,
    NoSuchGroup,
    Session,
    SessionExists,
    StoreError,
    TokenInfo,
    TooManyJoinRequests,
)
from cim.message import BROADCAST, Position, group_conversation, pair_conversation
from cim.store import Retention, open_store
from cim.store.memory import MemoryStore, token_key
from cim.store.redis import layout

#: When the test clock starts (message timestamps are realistic).
START = 1_700_000_000.0
#: A session or token time to live that ends soon, even on a real Redis.
SHORT_TTL = 0.2
#: A time to live no test outlives.
LONG_TTL = 600.0
RETENTION = Retention(max_messages=5, max_age=3600, idempotency_window=600)
#: The private conversation of users 1 and 2.
PAIR = pair_conversation(1, 2)


@dataclass
class Backend:
    """
    A store under test, and how to make its time pass.

    @ivar clock: the store's clock: message timestamps, and for the memory
        store every expiry.
    @ivar redis: the Redis connection of the Redis store, else C{None}.
    """

    store: Any
    clock: task.Clock
    redis: Any = None
    prefix: str = ""

    async def expire(self, ttl: float, gone: Callable[[], Awaitable[bool]]) -> None:
        """
        Let a time to live of C{ttl} seconds (at most L{SHORT_TTL} on Redis)
        pass, until C{gone()} is true.
        """
        if self.redis is None:
            self.clock.advance(ttl)
            assert await gone()
            return
        from twisted.internet import reactor

        deadline = time.monotonic() + 10
        while not await gone():
            assert time.monotonic() < deadline, "did not expire"
            await task.deferLater(reactor, 0.02, lambda: None)

    async def back_up(self) -> Callable[[], Awaitable[None]]:
        """
        Take a backup of the store now.

        @return: what restores it: the store then holds what it held now,
            as a store restored from a backup comes back (the memory store:
            L{MemoryStore.restored}, which becomes L{store}; Redis: the
            prefix's keys as they were, and a new Redis run, faked by
            telling this store's connections another run_id;
            tests/test_store_redis.py restores a real one).
        """
        if self.redis is None:
            twin = self.store.restored()

            async def restore_copy() -> None:
                self.store = twin

            return restore_copy
        redis, prefix = self.redis, self.prefix
        copies = f"{prefix}~backup{uuid.uuid4().hex}:"

        async def live() -> list[str]:
            keys = await redis.execute_command("KEYS", prefix + "*")
            return [k for k in keys if not k.startswith(prefix + "~backup")]

        # COPY keeps each key's time to live.
        kept = await live()
        for key in kept:
            await redis.execute_command("COPY", key, copies + key[len(prefix) :])

        async def restore_keys() -> None:
            now = await live()
            if now:
                await redis.execute_command("DEL", *now)
            for key in kept:
                copy = copies + key[len(prefix) :]
                await redis.execute_command("COPY", copy, key)
            run = uuid.uuid4().hex
            factory = redis._factory
            factory.protocol.cim_run_id = run
            for connection in factory.pool:
                connection.cim_run_id = run

        return restore_keys

    async def pttl(self, kind: str, *parts: object) -> int | None:
        """
        The PTTL of a key of the Redis store (L{layout.key}), or C{None} for
        the memory one.
        """
        if self.redis is None:
            return None
        key = layout.key(self.prefix, kind, *parts)
        ttl: int = await self.redis.execute_command("PTTL", key)
        return ttl


def make_clock() -> Any:
    """
    A L{task.Clock} at L{START}.  (Typed C{Any}: without the mypy-zope
    plugin mypy does not know that a Clock provides L{IReactorTime}.)
    """
    clock = task.Clock()
    clock.advance(START)
    return clock


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str:
    """
    Which store L{backend} makes: C{"memory:"} or the test Redis URL (that
    one is skipped when there is no test Redis).
    """
    if request.param == "memory":
        return "memory:"
    url: str = request.getfixturevalue("redis_url")
    return url


@pytest_twisted.async_yield_fixture
async def backend(store_url: str) -> AsyncIterator[Backend]:
    """
    The store under test; a Redis one uses its own key prefix, whose keys
    are deleted afterwards.
    """
    clock = make_clock()
    if store_url == "memory:":
        yield Backend(MemoryStore(clock, RETENTION), clock)
        return
    from cim.store.redis import connect_redis

    prefix = f"cimtest:{uuid.uuid4().hex}:"
    store = await connect_redis(
        store_url, clock=clock, retention=RETENTION, prefix=prefix
    )
    redis = store._redis
    try:
        yield Backend(store, clock, redis, prefix)
    finally:
        keys = await redis.execute_command("KEYS", prefix + "*")
        if keys:
            await redis.execute_command("DEL", *keys)
        await store.close()


def E(seq: int, epoch: str = "e1") -> Position:
    """
    A position of epoch C{epoch}.
    """
    return Position(epoch, seq)


def msg(
    conversation: str,
    text: str,
    sender_id: int = 1,
    client_msg_id: str = "",
    **kw: Any,
) -> NewMessage:
    return NewMessage(
        conversation, sender_id, f"user{sender_id}", text, client_msg_id, **kw
    )


async def failure_of(d: defer.Deferred[Any]) -> BaseException:
    """
    The exception C{d} fails with (the test fails if it succeeds).
    """
    try:
        result = await d
    except Exception as e:
        return e
    raise AssertionError(f"expected a failure, got {result!r}")


@pytest_twisted.ensureDeferred
async def test_interface(backend: Backend) -> None:
    assert verifyObject(IStore, backend.store)


# Accounts


@pytest_twisted.ensureDeferred
async def test_register_new_and_existing(backend: Backend) -> None:
    store = backend.store
    alice = await store.register("alice")
    assert alice == Account(alice.user_id, "alice", False)
    assert await store.register("alice") == alice
    assert await store.get_account(alice.user_id) == alice
    assert await store.get_account_by_name("alice") == alice
    assert await store.get_account(alice.user_id + 100) is None
    assert await store.get_account_by_name("nobody") is None


@pytest_twisted.ensureDeferred
async def test_register_ids_unique_and_increasing(backend: Backend) -> None:
    ids = [(await backend.store.register(f"user{i}")).user_id for i in range(5)]
    assert ids == sorted(set(ids))
    assert ids[0] >= 1


@pytest_twisted.ensureDeferred
async def test_register_names_stored_safely(backend: Backend) -> None:
    store = backend.store
    names = [
        "with space",
        "a:b:c",
        "ünïcødé 名前 🙂",
        "*",
        "123",
        "1.50",
        "user:byname",
    ]
    accounts = [await store.register(name) for name in names]
    assert len({a.user_id for a in accounts}) == len(names)
    for name, account in zip(names, accounts, strict=True):
        assert account.user_name == name
        assert await store.get_account_by_name(name) == account
        assert await store.get_account(account.user_id) == account


@pytest_twisted.ensureDeferred
async def test_register_password(backend: Backend) -> None:
    store = backend.store
    bob = await store.register("bob", "secret")
    assert bob.has_password and not bob.has_key and bob.created
    # The existing account, unchanged, whatever is given: the caller checks.
    for password in ("secret", "wrong", None):
        again = await store.register("bob", password, "a-key")
        assert again == bob and not again.created
    assert not (await store.get_account(bob.user_id)).has_key


@pytest_twisted.ensureDeferred
async def test_check_password(backend: Backend) -> None:
    store = backend.store
    bob = await store.register("bob", "pässword")
    carol = await store.register("carol")
    assert await store.check_password(bob.user_id, "pässword") is True
    assert await store.check_password(bob.user_id, "password") is False
    assert await store.check_password(carol.user_id, "") is False
    assert await store.check_password(bob.user_id + 100, "pässword") is False


@pytest_twisted.ensureDeferred
async def test_account_key(backend: Backend) -> None:
    store = backend.store
    alice = await store.register("alice", None, "alice-key-0123456789")
    assert alice.has_key and not alice.has_password and alice.created
    assert await store.get_account(alice.user_id) == alice
    assert await store.get_account_by_name("alice") == alice
    assert await store.check_account_key(alice.user_id, "alice-key-0123456789")
    assert not await store.check_account_key(alice.user_id, "alice-key-012345678")
    assert not await store.check_account_key(alice.user_id, "")
    assert not await store.check_account_key(alice.user_id + 100, "x")
    # A password wins over a key; an account with neither has neither.
    bob = await store.register("bob", "pw", "bob-key")
    assert bob.has_password and not bob.has_key
    assert not await store.check_account_key(bob.user_id, "bob-key")
    carol = await store.register("carol")
    assert not carol.has_key and not carol.has_password
    assert not await store.check_account_key(carol.user_id, "")


@pytest_twisted.ensureDeferred
async def test_account_key_stored_as_a_hash(backend: Backend) -> None:
    key = "the-account-key-of-dora-" + "x" * 20
    dora = await backend.store.register("dora", None, key)
    assert dora.has_key
    if backend.redis is None:
        kept = repr(backend.store._users)
    else:
        kept = repr(
            await backend.redis.execute_command(
                "HGETALL", layout.key(backend.prefix, "user", dora.user_id)
            )
        )
    assert key not in kept and token_key(key) in kept


@pytest_twisted.ensureDeferred
async def test_device_key(backend: Backend) -> None:
    store = backend.store
    await store.set_device_key(1, "laptop", "laptop-key-1", LONG_TTL)
    assert await store.check_device_key(1, "laptop", "laptop-key-1")
    # Never another key, device or user.
    assert not await store.check_device_key(1, "laptop", "laptop-key-")
    assert not await store.check_device_key(1, "laptop", "")
    assert not await store.check_device_key(1, "phone", "laptop-key-1")
    assert not await store.check_device_key(2, "laptop", "laptop-key-1")
    assert not await store.check_device_key(1, "", "laptop-key-1")
    # A new key replaces the old one; the device's key only.
    await store.set_device_key(1, "phone", "phone-key-1", LONG_TTL)
    await store.set_device_key(1, "laptop", "laptop-key-2", LONG_TTL)
    assert not await store.check_device_key(1, "laptop", "laptop-key-1")
    assert await store.check_device_key(1, "laptop", "laptop-key-2")
    assert await store.check_device_key(1, "phone", "phone-key-1")
    # Dropping forgets it (twice is harmless); the other device keeps its.
    await store.drop_device_key(1, "laptop")
    await store.drop_device_key(1, "laptop")
    assert not await store.check_device_key(1, "laptop", "laptop-key-2")
    assert await store.check_device_key(1, "phone", "phone-key-1")


@pytest_twisted.ensureDeferred
async def test_device_key_expires(backend: Backend) -> None:
    store = backend.store
    await store.set_device_key(1, "laptop", "laptop-key", SHORT_TTL)
    assert await store.check_device_key(1, "laptop", "laptop-key")

    async def gone() -> bool:
        return not await store.check_device_key(1, "laptop", "laptop-key")

    await backend.expire(SHORT_TTL, gone)
    # The lifetime is the ttl given, as a Redis PEXPIRE.
    await store.set_device_key(1, "laptop", "laptop-key", LONG_TTL)
    pttl = await backend.pttl("devkey", 1, "laptop")
    assert pttl is None or LONG_TTL * 1000 - 5000 < pttl <= LONG_TTL * 1000


@pytest_twisted.ensureDeferred
async def test_device_key_stored_as_a_hash(backend: Backend) -> None:
    key = "the-device-key-of-dora-" + "x" * 20
    await backend.store.set_device_key(4, "tab", key, LONG_TTL)
    if backend.redis is None:
        kept = repr(backend.store._device_keys)
    else:
        kept = repr(
            await backend.redis.execute_command(
                "GET", layout.key(backend.prefix, "devkey", 4, "tab")
            )
        )
    assert key not in kept and token_key(key) in kept


#: Names that are one account: case, surrounding whitespace, a Cyrillic
#: look-alike, fullwidth forms, NFC and NFD spellings.
SAME_AS_ZOE = ["ZOE", "zoe ", " zoe", "Zoe", "z\u043e\u0435", "\uff5a\uff4f\uff45"]


@pytest_twisted.ensureDeferred
async def test_names_are_unique_by_their_key(backend: Backend) -> None:
    store = backend.store
    zoe = await store.register("zoe", None, "k")
    for name in SAME_AS_ZOE:
        again = await store.register(name, None, "other")
        assert again == zoe and not again.created, name
        assert await store.get_account_by_name(name) == zoe
    # The display name stays as registered.
    assert (await store.get_account(zoe.user_id)).user_name == "zoe"
    nfc, nfd = "Zo\u00eb", "Zoe\u0308"
    first = await store.register(nfc)
    assert await store.register(nfd) == first
    assert first.user_id != zoe.user_id
    assert (await store.register("Zoey")).created


# Sessions


@pytest_twisted.ensureDeferred
async def test_claim_and_activate(backend: Backend) -> None:
    store = backend.store
    session, dropped = await store.claim_session(1, "alice", "h:1:2", LONG_TTL)
    assert dropped == []
    assert (session.user_id, session.user_name, session.server) == (1, "alice", "h:1:2")
    assert not session.connected
    assert (session.device, session.active) == ("", START)
    assert await store.get_session(1) == session
    assert await store.online_users() == []
    assert await store.get_sessions([1]) == {}
    pttl = await backend.pttl("session", 1, "")
    assert pttl is None or 0 < pttl <= LONG_TTL * 1000

    assert await store.activate_session(1, "not-it", LONG_TTL) is False
    backend.clock.advance(3)
    assert await store.activate_session(1, session.session_id, LONG_TTL) is True
    connected = await store.get_session(1)
    assert connected is not None and connected.connected
    assert connected.session_id == session.session_id
    assert connected.active == START + 3
    assert await store.online_users() == [(1, "alice")]
    assert await store.user_sessions(1) == [connected]
    assert await store.get_sessions([1]) == {1: [connected]}
    # An activated session lives its session ttl (its server renews it).
    pttl = await backend.pttl("session", 1, "")
    assert pttl is None or LONG_TTL * 1000 - 5000 < pttl <= LONG_TTL * 1000
    backend.clock.advance(LONG_TTL / 2)
    assert await store.get_session(1) == connected


@pytest_twisted.ensureDeferred
async def test_claim_existing(backend: Backend) -> None:
    store = backend.store
    first, _ = await store.claim_session(1, "alice", "h:1:2", LONG_TTL)
    error = await failure_of(store.claim_session(1, "alice", "h:3:4", LONG_TTL))
    assert isinstance(error, SessionExists)
    assert error.session == first
    assert await store.get_session(1) == first

    await store.activate_session(1, first.session_id)
    second, dropped = await store.claim_session(
        1, "alice", "h:3:4", LONG_TTL, replace=True
    )
    [previous] = dropped
    assert previous.session_id == first.session_id and previous.connected
    assert second.session_id != first.session_id
    assert second.server == "h:3:4" and not second.connected
    assert await store.get_session(1) == second
    # The replacement is not connected yet.
    assert await store.online_users() == []
    # The old server's late release does not erase the new session.
    assert await store.release_session(1, first.session_id) is False
    assert await store.get_session(1) == second
    # The old server dying does not drop it either.
    assert await store.drop_server_sessions("h:1:2") == []
    assert await store.get_session(1) == second


@pytest_twisted.ensureDeferred
async def test_claim_expires(backend: Backend) -> None:
    store = backend.store
    session, _ = await store.claim_session(1, "alice", "h:1:2", SHORT_TTL)
    if backend.redis is None:
        backend.clock.advance(SHORT_TTL / 2)
        assert await store.get_session(1) == session

    async def gone() -> bool:
        return await store.get_session(1) is None

    await backend.expire(SHORT_TTL, gone)
    assert await store.activate_session(1, session.session_id) is False
    assert await store.user_sessions(1) == []
    again, dropped = await store.claim_session(1, "alice", "h:1:2", LONG_TTL)
    assert dropped == []


@pytest_twisted.ensureDeferred
async def test_get_sessions(backend: Backend) -> None:
    store = backend.store
    sessions = {}
    for user_id in (1, 2, 3):
        sessions[user_id], _ = await store.claim_session(
            user_id, f"u{user_id}", f"h:{user_id}:0", LONG_TTL
        )
    await store.activate_session(1, sessions[1].session_id)
    await store.activate_session(3, sessions[3].session_id)
    found = await store.get_sessions([1, 2, 3, 4])
    assert sorted(found) == [1, 3]
    [three] = found[3]
    assert three.server == "h:3:0" and three.connected
    assert [s.session_id for s in found[1]] == [sessions[1].session_id]
    assert await store.get_sessions([]) == {}
    many = await store.get_sessions(list(range(1000)))
    assert sorted(many) == [1, 3]


@pytest_twisted.ensureDeferred
async def test_release(backend: Backend) -> None:
    store = backend.store
    session, _ = await store.claim_session(1, "alice", "h:1:2", LONG_TTL)
    await store.activate_session(1, session.session_id)
    assert await store.release_session(1, "other") is False
    assert await store.get_session(1) == await store.get_session(1)
    assert await store.release_session(1, session.session_id) is True
    assert await store.get_session(1) is None
    assert await store.online_users() == []
    assert await store.release_session(1, session.session_id) is False
    # The server no longer lists the user.
    assert await store.drop_server_sessions("h:1:2") == []


@pytest_twisted.ensureDeferred
async def test_online_users_sorted(backend: Backend) -> None:
    store = backend.store
    for user_id in (12, 3, 7):
        session, _ = await store.claim_session(
            user_id, f"n{user_id}", "s:1:1", LONG_TTL
        )
        await store.activate_session(user_id, session.session_id)
    await store.claim_session(5, "n5", "s:1:1", LONG_TTL)
    assert await store.online_users() == [(3, "n3"), (7, "n7"), (12, "n12")]


@pytest_twisted.ensureDeferred
async def test_drop_server_sessions(backend: Backend) -> None:
    store = backend.store
    for user_id, server in [(1, "a:1:1"), (2, "a:1:1"), (3, "b:1:1"), (4, "a:1:1")]:
        session, _ = await store.claim_session(user_id, f"u{user_id}", server, LONG_TTL)
        if user_id != 4:
            await store.activate_session(user_id, session.session_id)
    token = await store.issue_token(1, "a:1:1", session.session_id, LONG_TTL)
    # User 2 moved to b before a died.
    await store.claim_session(2, "u2", "b:1:1", LONG_TTL, replace=True)
    assert await store.drop_server_sessions("a:1:1") == [1, 4]
    assert await store.get_session(1) is None
    assert await store.get_session(4) is None
    assert (await store.get_session(2)).server == "b:1:1"
    assert await store.online_users() == [(3, "u3")]
    assert await store.verify_token(token) is None
    assert await store.drop_server_sessions("a:1:1") == []


@pytest_twisted.ensureDeferred
async def test_session_servers(backend: Backend) -> None:
    store = backend.store
    assert await store.session_servers() == []
    # Listed from the claim on (not yet connected), and by a renewal that
    # makes a session again.
    await store.claim_session(1, "u1", "b:1:1", LONG_TTL, device="phone")
    a, _ = await store.claim_session(2, "u2", "a:1:1", LONG_TTL)
    assert await store.session_servers() == ["a:1:1", "b:1:1"]
    assert await store.drop_server_sessions("b:1:1") == [1]
    assert await store.session_servers() == ["a:1:1"]
    await store.renew_sessions(
        "b:1:1", [HeldSession(1, "s-phone", "u1", "phone", START)], LONG_TTL
    )
    assert "b:1:1" in await store.session_servers()
    # A server's entry may outlive its sessions (harmless: a push there
    # reaches nobody), but one that never held any is never listed.
    assert await store.release_session(2, a.session_id)
    assert "c:1:1" not in await store.session_servers()


# Login tokens


@pytest_twisted.ensureDeferred
async def test_token(backend: Backend) -> None:
    store = backend.store
    session, _ = await store.claim_session(1, "alice", "h:1:2", LONG_TTL)
    token = await store.issue_token(1, "h:1:2", session.session_id, LONG_TTL)
    assert isinstance(token, str) and len(token) >= 40
    other = await store.issue_token(1, "h:1:2", session.session_id, LONG_TTL)
    assert other != token
    info = TokenInfo(1, "h:1:2", session.session_id)
    assert await store.verify_token(token) == info
    assert await store.verify_token(other) == info
    assert await store.verify_token("unknown") is None
    assert await store.verify_token("") is None
    if backend.redis is not None:
        # Redis holds the token's digest, never the token.
        keys = await backend.redis.execute_command("KEYS", backend.prefix + "*")
        assert not any(token in key for key in keys)


@pytest_twisted.ensureDeferred
async def test_token_expires(backend: Backend) -> None:
    store = backend.store
    session, _ = await store.claim_session(1, "alice", "h:1:2", LONG_TTL)
    await store.activate_session(1, session.session_id)
    token = await store.issue_token(1, "h:1:2", session.session_id, SHORT_TTL)
    assert await store.verify_token(token) is not None

    async def gone() -> bool:
        return await store.verify_token(token) is None

    await backend.expire(SHORT_TTL, gone)
    assert await store.get_session(1) is not None


@pytest_twisted.ensureDeferred
async def test_token_invalid_after_release(backend: Backend) -> None:
    store = backend.store
    session, _ = await store.claim_session(1, "alice", "h:1:2", LONG_TTL)
    token = await store.issue_token(1, "h:1:2", session.session_id, LONG_TTL)
    await store.release_session(1, session.session_id)
    assert await store.verify_token(token) is None
    # Even when the user logs in again.
    await store.claim_session(1, "alice", "h:1:2", LONG_TTL)
    assert await store.verify_token(token) is None


@pytest_twisted.ensureDeferred
async def test_token_invalid_after_replace(backend: Backend) -> None:
    store = backend.store
    first, _ = await store.claim_session(1, "alice", "h:1:2", LONG_TTL)
    old = await store.issue_token(1, "h:1:2", first.session_id, LONG_TTL)
    second, _ = await store.claim_session(1, "alice", "h:3:4", LONG_TTL, replace=True)
    assert await store.verify_token(old) is None
    new = await store.issue_token(1, "h:3:4", second.session_id, LONG_TTL)
    assert await store.verify_token(new) == TokenInfo(1, "h:3:4", second.session_id)
    # A token naming a session that is not the user's current one is invalid.
    stale = await store.issue_token(1, "h:1:2", first.session_id, LONG_TTL)
    assert await store.verify_token(stale) is None


@pytest_twisted.ensureDeferred
async def test_conversation_states_carry_their_whole_epoch(backend: Backend) -> None:
    """
    Each conversation's state names its current epoch whole (the epoch it
    follows and their shared seq too), as L{IStore.epochs} reads it.
    """
    store = backend.store
    await store.append([NewMessage("p:1:2", 1, "a", "hi")])
    await store.create_group("team", 1)
    states = await store.conversations(1)
    assert [s.conversation for s in states] == ["g:team", "p:1:2"]
    epochs = await store.epochs(["g:team", "p:1:2"])
    for state in states:
        assert state.current_epoch == epochs[state.conversation]
    assert states[0].current_epoch == Epoch()
    assert states[1].current_epoch.id == states[1].epoch != ""


@pytest_twisted.ensureDeferred
async def test_open_session(backend: Backend) -> None:
    """
    A route's login in one call: the claim, its token and the device keys,
    all or nothing.
    """
    store = backend.store
    session, dropped, token = await store.open_session(
        1, "alice", "h:1:2", LONG_TTL, LONG_TTL, device="tab", device_key="k1",
        device_key_ttl=LONG_TTL,
    )  # fmt: skip
    assert dropped == []
    assert (session.user_id, session.server, session.device) == (1, "h:1:2", "tab")
    assert not session.connected
    assert await store.get_session(1, "tab") == session
    assert await store.verify_token(token) == TokenInfo(
        1, "h:1:2", session.session_id, "tab"
    )
    assert await store.check_device_key(1, "tab", "k1")

    # Without replace, a user holding a session is refused: nothing changes.
    with pytest.raises(SessionExists):
        await store.open_session(1, "alice", "h:3:4", LONG_TTL, LONG_TTL, device="pc")
    assert await store.user_sessions(1) == [session]
    assert await store.get_session(1, "pc") is None

    # A second device, then the first again past max_devices=1: the other
    # device's session, token and device key go; the device's own key is
    # replaced.
    pc, _, pc_token = await store.open_session(
        1, "alice", "h:3:4", LONG_TTL, LONG_TTL, replace=True, device="pc",
        device_key="k2", device_key_ttl=LONG_TTL,
    )  # fmt: skip
    again, dropped, new_token = await store.open_session(
        1, "alice", "h:1:2", LONG_TTL, LONG_TTL, replace=True, device="tab",
        max_devices=1, device_key="k3", device_key_ttl=LONG_TTL,
    )  # fmt: skip
    assert sorted(s.session_id for s in dropped) == sorted(
        [session.session_id, pc.session_id]
    )
    assert await store.user_sessions(1) == [again]
    assert await store.verify_token(token) is None
    assert await store.verify_token(pc_token) is None
    assert (await store.verify_token(new_token)).session_id == again.session_id
    assert not await store.check_device_key(1, "pc", "k2")
    assert not await store.check_device_key(1, "tab", "k1")
    assert await store.check_device_key(1, "tab", "k3")

    # A login that used its device key and got no new one drops it; one
    # that did not use it keeps it.
    await store.open_session(
        1, "alice", "h:1:2", LONG_TTL, LONG_TTL, replace=True, device="tab"
    )
    assert await store.check_device_key(1, "tab", "k3")
    await store.open_session(
        1, "alice", "h:1:2", LONG_TTL, LONG_TTL, replace=True, device="tab",
        used_device_key="k3",
    )  # fmt: skip
    assert not await store.check_device_key(1, "tab", "k3")

    # Rotation is atomic: of two logins that checked the same key, the
    # second finds it used and changes nothing.
    await store.set_device_key(1, "tab", "k4", LONG_TTL)
    first, _, _ = await store.open_session(
        1, "alice", "h:1:2", LONG_TTL, LONG_TTL, replace=True, device="tab",
        device_key="k5", device_key_ttl=LONG_TTL, used_device_key="k4",
    )  # fmt: skip
    with pytest.raises(DeviceKeyUsed):
        await store.open_session(
            1, "alice", "h:1:2", LONG_TTL, LONG_TTL, replace=True, device="tab",
            device_key="k6", device_key_ttl=LONG_TTL, used_device_key="k4",
        )  # fmt: skip
    assert await store.check_device_key(1, "tab", "k5")
    assert not await store.check_device_key(1, "tab", "k6")
    [held] = [s for s in await store.user_sessions(1) if s.device == "tab"]
    assert held.session_id == first.session_id


@pytest_twisted.ensureDeferred
async def test_activate_token(backend: Backend) -> None:
    """
    An IM server's login with a token, in one call: the token's session is
    activated (connected, online, the token's device), or the login is
    refused with the first reason that applies.
    """
    from cim.interfaces import (
        SESSION_OTHER_SERVER,
        TOKEN_OTHER_SERVER,
        TOKEN_OTHER_USER,
        TOKEN_UNKNOWN,
    )

    store = backend.store
    session, _ = await store.claim_session(1, "alice", "h:1:2", LONG_TTL, device="tab")
    token = await store.issue_token(1, "h:1:2", session.session_id, LONG_TTL, "tab")
    assert await store.activate_token("unknown", 1, "h:1:2") == TOKEN_UNKNOWN
    assert await store.activate_token(token, 2, "h:1:2") == TOKEN_OTHER_USER
    assert await store.activate_token(token, 1, "h:9:9") == TOKEN_OTHER_SERVER
    assert not (await store.get_session(1, "tab")).connected
    assert await store.online_users() == []

    active = await store.activate_token(token, 1, "h:1:2", LONG_TTL)
    assert isinstance(active, Session)
    assert (active.user_id, active.user_name, active.server) == (1, "alice", "h:1:2")
    assert (active.session_id, active.device, active.connected) == (
        session.session_id,
        "tab",
        True,
    )
    stored = await store.get_session(1, "tab")
    assert stored == active
    assert await store.online_users() == [(1, "alice")]
    assert await store.get_sessions([1]) == {1: [active]}

    # Replaced: the old token is unknown; a token of a session another
    # server holds now (the route moved it) is refused.
    moved, _ = await store.claim_session(
        1, "alice", "h:3:4", LONG_TTL, replace=True, device="tab"
    )
    assert await store.activate_token(token, 1, "h:1:2") == TOKEN_UNKNOWN
    misnamed = await store.issue_token(1, "h:1:2", moved.session_id, LONG_TTL, "tab")
    assert await store.activate_token(misnamed, 1, "h:1:2") == SESSION_OTHER_SERVER
    await store.release_session(1, moved.session_id, "tab")
    assert await store.activate_token(misnamed, 1, "h:1:2") == TOKEN_UNKNOWN


# Messages


@pytest_twisted.ensureDeferred
async def test_append_assigns_seq_and_ids(backend: Backend) -> None:
    store = backend.store
    batch = [
        msg(PAIR, "one", receive_user_id=2),
        msg(group_conversation("g"), "hello", group_id="g"),
        msg(PAIR, "two", receive_user_id=2),
        msg(BROADCAST, "all of you"),
        msg(PAIR, "three", receive_user_id=2),
    ]
    stored = await store.append(batch)
    assert [m.text for m in stored] == [m.text for m in batch]
    assert [(m.conversation, m.seq) for m in stored] == [
        (PAIR, 1),
        ("g:g", 1),
        (PAIR, 2),
        ("all", 1),
        (PAIR, 3),
    ]
    ids = [m.msg_id for m in stored]
    assert len(set(ids)) == len(ids) and ids == sorted(ids)
    first = stored[0]
    assert (first.sender_id, first.sender_name, first.receive_user_id) == (
        1,
        "user1",
        2,
    )
    assert first.timestamp == int(START * 1000)
    assert stored[1].group_id == "g"

    more = await store.append([msg(PAIR, "four")])
    assert more[0].seq == 4 and more[0].msg_id > max(ids)
    assert await store.last_seq(PAIR) == 4
    assert await store.last_seq("g:g") == 1
    assert await store.last_seq("p:9:99") == 0
    assert await store.append([]) == []


@pytest_twisted.ensureDeferred
async def test_append_round_trips_content(backend: Backend) -> None:
    store = backend.store
    new = NewMessage(
        "g:é:x", 7, "ünï: 名前", 'quote " backslash \\ 🙂 \n "ts":1', "c-1", 0, "é:x"
    )
    [stored] = await store.append([new])
    [read] = await store.read("g:é:x", 0, 10)
    assert read == stored
    assert (read.sender_name, read.text, read.client_msg_id) == (
        new.sender_name,
        new.text,
        new.client_msg_id,
    )
    assert read.group_id == "é:x" and read.receive_user_id == 0
    # A lone surrogate (a JSON request can carry one) does not break a batch.
    odd = await store.append([msg("p:5:6", "half \ud800 pair"), msg("p:5:6", "fine")])
    assert [m.text for m in await store.read("p:5:6", 0, 10)] == [
        "half \ud800 pair",
        "fine",
    ]
    assert odd[0].text == "half \ud800 pair"


@pytest_twisted.ensureDeferred
async def test_append_idempotent(backend: Backend) -> None:
    store = backend.store
    [original] = await store.append([msg(PAIR, "hi", client_msg_id="c1")])
    backend.clock.advance(5)
    [retry] = await store.append([msg(PAIR, "hi", client_msg_id="c1")])
    assert retry == original
    # Another sender may use the same client id; no client id means no
    # idempotency.
    other = await store.append(
        [
            msg(PAIR, "hi", sender_id=3, client_msg_id="c1"),
            msg(PAIR, "x"),
            msg(PAIR, "x"),
        ]
    )
    assert [m.seq for m in other] == [2, 3, 4]
    assert len(await store.read(PAIR, 0, 100)) == 4


@pytest_twisted.ensureDeferred
async def test_a_reused_client_id_never_returns_another_conversations_message(
    backend: Backend,
) -> None:
    """
    A client that counts its ids (two devices of one user, each from 1)
    sends one id to two conversations: each is a message of its own, and
    neither receiver is handed the other's.
    """
    store = backend.store
    other = pair_conversation(1, 3)
    [to_bob] = await store.append([msg(PAIR, "to bob", client_msg_id="1")])
    [to_carol] = await store.append([msg(other, "to carol", client_msg_id="1")])
    assert (to_carol.conversation, to_carol.text) == (other, "to carol")
    assert to_carol.msg_id != to_bob.msg_id
    assert [m.text for m in await store.read(other, 0, 10)] == ["to carol"]
    assert [m.text for m in await store.read(PAIR, 0, 10)] == ["to bob"]


@pytest_twisted.ensureDeferred
async def test_append_idempotent_within_batch(backend: Backend) -> None:
    store = backend.store
    stored = await store.append(
        [
            msg(PAIR, "a", client_msg_id="c1"),
            msg(PAIR, "b", client_msg_id="c2"),
            msg(PAIR, "a", client_msg_id="c1"),
        ]
    )
    assert stored[2] == stored[0]
    assert [m.seq for m in stored] == [1, 2, 1]
    assert [m.text for m in await store.read(PAIR, 0, 10)] == ["a", "b"]
    assert await store.last_seq(PAIR) == 2


@pytest_twisted.ensureDeferred
async def test_append_finds_a_retry_in_a_large_batch(backend: Backend) -> None:
    """
    A retry past the first thousand messages of a batch (the Redis store
    asks for the batch's records a thousand keys at a time) returns its
    original; the others are appended.
    """
    store = backend.store
    [original] = await store.append([msg(PAIR, "m2100", client_msg_id="c2100")])
    stored = await store.append(
        [msg(PAIR, f"m{i}", client_msg_id=f"c{i}") for i in range(2500)]
    )
    assert stored[2100] == original
    others = [m for i, m in enumerate(stored) if i != 2100]
    assert [m.seq for m in others] == list(range(2, 2501))
    assert await store.last_seq(PAIR) == 2500


@pytest_twisted.ensureDeferred
async def test_append_retry_of_a_record_of_the_previous_release(
    backend: Backend,
) -> None:
    """
    An idempotency record written by the previous release (it ended with
    the conversation, which its key names) still makes a retry return the
    original.
    """
    if backend.redis is None:
        pytest.skip("the memory store keeps nothing across releases")
    store = backend.store
    [original] = await store.append([msg(PAIR, "a", client_msg_id="c1")])
    key = layout.key(backend.prefix, "sent", PAIR, 1, "c1")
    record = await backend.redis.execute_command("GET", key)
    assert record == f"{original.msg_id}:{original.seq}:{original.timestamp}"
    await backend.redis.execute_command("SET", key, f"{record}:{PAIR}", "PX", 60000)
    backend.clock.advance(5)
    [retry] = await store.append([msg(PAIR, "a", client_msg_id="c1")])
    assert retry == original
    assert await store.last_seq(PAIR) == 1


@pytest_twisted.ensureDeferred
async def test_append_idempotency_window(backend: Backend) -> None:
    store = backend.store
    [original] = await store.append([msg(PAIR, "a", client_msg_id="c1")])
    if backend.redis is not None:
        pttl = await backend.pttl("sent", PAIR, 1, "c1")
        assert pttl is not None
        assert 0 < pttl <= RETENTION.idempotency_window * 1000
        return
    backend.clock.advance(RETENTION.idempotency_window + 1)
    [again] = await store.append([msg(PAIR, "a", client_msg_id="c1")])
    assert again.seq == 2 and again.msg_id != original.msg_id


@pytest_twisted.ensureDeferred
async def test_read_paging(backend: Backend) -> None:
    store = backend.store
    await store.append([msg(PAIR, str(i)) for i in range(1, 5)])
    page = await store.read(PAIR, 0, 2)
    assert [(m.seq, m.text) for m in page] == [(1, "1"), (2, "2")]
    page = await store.read(PAIR, page[-1].seq, 2)
    assert [m.seq for m in page] == [3, 4]
    assert await store.read(PAIR, 4, 2) == []
    assert await store.read(PAIR, 2, 0) == []
    assert [m.seq for m in await store.read(PAIR, 1, 100)] == [2, 3, 4]
    assert await store.read("p:7:8", 0, 10) == []


@pytest_twisted.ensureDeferred
async def test_retention_by_count(backend: Backend) -> None:
    store = backend.store
    await store.append([msg(PAIR, str(i)) for i in range(1, 9)])
    kept = await store.read(PAIR, 0, 100)
    assert [m.seq for m in kept] == [4, 5, 6, 7, 8]
    assert await store.last_seq(PAIR) == 8
    await store.append([msg(PAIR, "9")])
    assert [m.seq for m in await store.read(PAIR, 0, 100)] == [5, 6, 7, 8, 9]
    pttl = await backend.pttl("conv", PAIR)
    assert pttl is None or 0 < pttl <= RETENTION.max_age * 1000


@pytest_twisted.ensureDeferred
async def test_retention_by_count_one_batch_at_a_time(backend: Backend) -> None:
    # The Redis store counts a conversation's messages only when their seqs
    # allow more than max_messages (5): every batch size around the bound.
    store = backend.store
    await store.append([msg(PAIR, str(i)) for i in range(1, 6)])
    assert [m.seq for m in await store.read(PAIR, 0, 100)] == [1, 2, 3, 4, 5]
    await store.append([msg(PAIR, "6")])
    assert [m.seq for m in await store.read(PAIR, 0, 100)] == [2, 3, 4, 5, 6]
    for i in range(7, 10):
        await store.append([msg(PAIR, str(i))])
    assert [m.seq for m in await store.read(PAIR, 0, 100)] == [5, 6, 7, 8, 9]
    await store.append([msg("p:1:3", str(i)) for i in range(1, 7)])
    assert [m.seq for m in await store.read("p:1:3", 0, 100)] == [2, 3, 4, 5, 6]


@pytest_twisted.ensureDeferred
async def test_retention_by_age(backend: Backend) -> None:
    store = backend.store
    await store.append([msg(PAIR, "old1"), msg(PAIR, "old2")])
    backend.clock.advance(RETENTION.max_age / 2)
    await store.append([msg(PAIR, "middle")])
    backend.clock.advance(RETENTION.max_age / 2 + 1)
    await store.append([msg(PAIR, "new")])
    kept = await store.read(PAIR, 0, 100)
    assert [(m.seq, m.text) for m in kept] == [(3, "middle"), (4, "new")]
    assert await store.last_seq(PAIR) == 4


# Cursors


@pytest_twisted.ensureDeferred
async def test_cursors(backend: Backend) -> None:
    store = backend.store
    assert await store.get_cursors(1) == {}
    assert await store.set_cursors(1, {"p:1:1": E(5), "g:a": E(2)}) is None
    await store.set_cursors(1, {"p:1:1": E(3), "g:a": E(7), "all": E(1)})
    await store.set_cursors(1, {})
    assert await store.get_cursors(1) == {"p:1:1": E(5), "g:a": E(7), "all": E(1)}
    assert await store.get_cursors(2) == {}


# Groups


@pytest_twisted.ensureDeferred
async def test_groups(backend: Backend) -> None:
    store = backend.store
    assert await store.create_group("team: ü", 5) is None
    assert isinstance(await failure_of(store.create_group("team: ü", 6)), GroupExists)
    assert await store.group_members("team: ü") == [5]
    assert await store.join_group("team: ü", 2) is True
    assert await store.join_group("team: ü", 2) is False
    assert await store.join_group("team: ü", 11) is True
    assert await store.group_members("team: ü") == [2, 5, 11]
    await store.create_group("alpha", 2)
    assert await store.user_groups(2) == ["alpha", "team: ü"]
    assert await store.user_groups(99) == []
    assert await store.leave_group("team: ü", 2) is True
    assert await store.leave_group("team: ü", 2) is False
    assert await store.group_members("team: ü") == [5, 11]
    assert await store.user_groups(2) == ["alpha"]
    # A group outlives its last member.
    await store.leave_group("alpha", 2)
    assert await store.group_members("alpha") == []
    assert await store.join_group("alpha", 3) is True


@pytest_twisted.ensureDeferred
async def test_unknown_group(backend: Backend) -> None:
    store = backend.store
    for d in [
        store.join_group("nope", 1),
        store.leave_group("nope", 1),
        store.group_members("nope"),
        store.group_info("nope", 1),
        store.invite_to_group("nope", 1),
        store.ask_to_join("nope", 1, 10),
        store.join_requests("nope"),
        store.drop_join_request("nope", 1),
        store.set_group_owner("nope", 1),
    ]:
        assert isinstance(await failure_of(d), NoSuchGroup)
    assert await store.user_groups(1) == []


@pytest_twisted.ensureDeferred
async def test_group_settings(backend: Backend) -> None:
    store = backend.store
    await store.create_group("shut", 5)
    await store.create_group("club", 6, "approval", "full")
    await store.create_group("park", 7, policy="open")
    assert await store.group_info("shut") == GroupInfo("shut", 5, "invite", "join", 1)
    assert await store.group_info("club", 6) == GroupInfo(
        "club", 6, "approval", "full", 1, member=True
    )
    assert (await store.group_info("park")).policy == "open"
    await store.join_group("club", 2, 40)
    assert (await store.group_info("club")).members == 2
    await store.set_group_owner("club", 2)
    info = await store.group_info("club", 2)
    assert (info.owner_id, info.member, info.joined_at) == (2, True, 40)


@pytest_twisted.ensureDeferred
async def test_join_points(backend: Backend) -> None:
    store = backend.store
    await store.create_group("g", 5)
    assert (await store.group_info("g", 5)).joined_at == 0
    assert await store.join_group("g", 2, 17) is True
    # Joining again changes nothing, the join point included.
    assert await store.join_group("g", 2, 30) is False
    assert (await store.group_info("g", 2)).joined_at == 17
    assert await store.join_group("g", 3) is True
    assert (await store.group_info("g", 3)).joined_at == 0
    # Leaving forgets the join point; joining again sets a new one.
    assert await store.leave_group("g", 2) is True
    info = await store.group_info("g", 2)
    assert (info.member, info.joined_at) == (False, 0)
    await store.join_group("g", 2, 55)
    assert (await store.group_info("g", 2)).joined_at == 55


@pytest_twisted.ensureDeferred
async def test_invitations(backend: Backend) -> None:
    store = backend.store
    await store.create_group("g", 5)
    assert (await store.group_info("g", 2)).invited is False
    assert await store.invite_to_group("g", 2) is True
    assert await store.invite_to_group("g", 2) is False
    info = await store.group_info("g", 2)
    assert (info.invited, info.member) == (True, False)
    # Joining uses the invitation up.
    await store.join_group("g", 2, 3)
    info = await store.group_info("g", 2)
    assert (info.invited, info.member) == (False, True)
    await store.leave_group("g", 2)
    assert (await store.group_info("g", 2)).invited is False


@pytest_twisted.ensureDeferred
async def test_join_requests(backend: Backend) -> None:
    store = backend.store
    await store.create_group("g", 5, "approval")
    assert await store.join_requests("g") == []
    for user_id in [9, 3, 11]:
        assert await store.ask_to_join("g", user_id, 3) is True
        backend.clock.advance(1)
    assert await store.ask_to_join("g", 3, 3) is False
    assert await store.join_requests("g") == [9, 3, 11]
    assert (await store.group_info("g", 3)).requested is True
    full = await failure_of(store.ask_to_join("g", 4, 3))
    assert isinstance(full, TooManyJoinRequests)
    assert await store.drop_join_request("g", 3) is True
    assert await store.drop_join_request("g", 3) is False
    assert (await store.group_info("g", 3)).requested is False
    # Joining uses the request up.
    await store.join_group("g", 9, 0)
    assert await store.join_requests("g") == [11]
    assert (await store.group_info("g", 9)).requested is False
    assert await store.ask_to_join("g", 4, 3) is True
    assert await store.join_requests("g") == [11, 4]


@pytest_twisted.ensureDeferred
async def test_group_from_before_owners(backend: Backend) -> None:
    """
    A group the previous release stored (its creator in C{group:<id>}, its
    members, no settings nor join points) is open, has no owner, and its
    members read from 0.
    """
    if backend.redis is None:
        pytest.skip("the memory store keeps nothing across releases")
    redis, prefix = backend.redis, backend.prefix
    await redis.execute_command("SET", layout.key(prefix, "group", "old"), "5")
    await redis.execute_command("SADD", layout.key(prefix, "members", "old"), "5", "6")
    await redis.execute_command("SADD", layout.key(prefix, "groups", 6), "old")
    store = backend.store
    assert await store.group_info("old", 6) == GroupInfo(
        "old", None, "open", "join", 2, member=True
    )
    assert await store.join_group("old", 7, 12) is True
    assert (await store.group_info("old", 7)).joined_at == 12
    assert await store.leave_group("old", 6) is True
    assert await store.group_members("old") == [5, 7]
    await store.set_group_owner("old", 5)
    info = await store.group_info("old")
    assert (info.owner_id, info.policy) == (5, "open")


# open_store


@pytest_twisted.ensureDeferred
async def test_open_store_memory() -> None:
    store = await open_store("memory:", make_clock())
    assert isinstance(store, MemoryStore)
    assert verifyObject(IStore, store)


@pytest_twisted.ensureDeferred
async def test_open_store_redis(redis_url: str) -> None:
    from cim.store.redis import RedisStore

    store = await open_store(redis_url, make_clock())
    try:
        assert isinstance(store, RedisStore)
        assert store.prefix == "cim:"
    finally:
        await store.close()


@pytest.mark.parametrize(
    "url", ["", "memory", "mysql://x", "redis://host:notaport/0", "redis://h/x"]
)
def test_open_store_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        open_store(url, make_clock())


# Redis only


@pytest_twisted.ensureDeferred
async def test_redis_script_sent_when_unknown(redis_url: str) -> None:
    """
    A script Redis does not have yet is sent with EVAL, then runs by SHA.
    """
    from cim.store.redis import _Script

    store = await open_store(redis_url, make_clock())
    try:
        script = _Script(f"-- {uuid.uuid4().hex}\nreturn ARGV[1] .. KEYS[1]")
        assert await store._run(script, ["k"], ["a"]) == "ak"
        assert await store._run(script, ["k"], ["b"]) == "bk"
        assert await store._redis.execute_command("SCRIPT", "EXISTS", script.sha) == [1]
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_redis_errors_are_store_errors(redis_url: str) -> None:
    from cim.store.redis import _Script

    store = await open_store(redis_url, make_clock())
    try:
        broken = _Script("return redis.call('NO-SUCH-COMMAND')")
        assert isinstance(await failure_of(store._run(broken, [], [])), StoreError)
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_redis_unreachable() -> None:
    """
    Connecting to a port where no Redis listens fails with L{StoreError}
    once the timeout passes.
    """
    from twisted.internet import reactor

    from cim.store.redis import connect_redis

    d = connect_redis("redis://127.0.0.1:1/0", clock=reactor, timeout=0.3)
    assert isinstance(await failure_of(d), StoreError)


# Password hashes


@pytest_twisted.ensureDeferred
async def test_password_hashes() -> None:
    from cim.passwords import hash_password, verify_password

    stored = await hash_password("pässword")
    scheme, n, r, p, salt, key = stored.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    assert "pässword" not in stored
    assert await hash_password("pässword") != stored  # a new salt each time
    assert await verify_password("pässword", stored) is True
    assert await verify_password("password", stored) is False
    for bad in ["", "scrypt$1$8$1$AA==$AA==", "md5$x", stored + "$x", "a$b$c$d$e$f"]:
        assert await verify_password("pässword", bad) is False


@pytest_twisted.ensureDeferred
async def test_set_many_cursors(backend: Backend) -> None:
    store = backend.store
    await store.set_cursors(1, {"p:1:1": E(5)})
    await store.set_many_cursors(
        {
            (1, ""): {"p:1:1": E(3), "g:a": E(2)},
            (2, ""): {"p:2:2": E(9)},
            (3, ""): {},
            (1, "phone"): {"p:1:1": E(1)},
        }
    )
    assert await store.get_cursors(1) == {"p:1:1": E(5), "g:a": E(2)}
    assert await store.get_cursors(1, "phone") == {"p:1:1": E(1)}
    assert await store.get_cursors(2) == {"p:2:2": E(9)}
    assert await store.get_cursors(3) == {}


@pytest_twisted.ensureDeferred
async def test_set_many_cursors_of_many_conversations(backend: Backend) -> None:
    # More cursors of one device than the Redis script reads or writes in
    # one command: each is raised, kept or added as alone.
    store = backend.store
    count = 2500
    await store.set_cursors(1, {f"g:{i}": E(10) for i in range(0, count, 2)})
    await store.set_many_cursors(
        {(1, ""): {f"g:{i}": E(5 if i % 4 else 20) for i in range(count)}}
    )
    expected = {
        f"g:{i}": E(20 if i % 4 == 0 else 10 if i % 2 == 0 else 5) for i in range(count)
    }
    assert await store.get_cursors(1) == expected


# Devices


async def connect(
    backend: Backend,
    user_id: int,
    device: str,
    server: str = "h:1:2",
    max_devices: int = 3,
) -> tuple[Any, list[Any]]:
    """
    Claim (replacing) and activate a session of the user's C{device}, one
    second after the previous one.

    @return: the connected session and the sessions the claim dropped.
    """
    backend.clock.advance(1)
    store = backend.store
    session, dropped = await store.claim_session(
        user_id,
        f"u{user_id}",
        server,
        LONG_TTL,
        replace=True,
        device=device,
        max_devices=max_devices,
    )
    assert session.device == device
    assert await store.activate_session(
        user_id, session.session_id, LONG_TTL, device=device
    )
    return await store.get_session(user_id, device), dropped


@pytest_twisted.ensureDeferred
async def test_devices_have_sessions_of_their_own(backend: Backend) -> None:
    store = backend.store
    phone, dropped = await connect(backend, 1, "phone")
    laptop, more = await connect(backend, 1, "laptop")
    assert dropped == more == []
    assert phone.session_id != laptop.session_id
    assert (phone.connected, phone.active) == (True, START + 1)
    assert await store.get_session(1, "phone") == phone
    assert await store.get_session(1, "laptop") == laptop
    assert await store.get_session(1) is None
    assert await store.user_sessions(1) == [laptop, phone]
    assert await store.get_sessions([1, 2]) == {1: [laptop, phone]}
    # A session belongs to its device: no other device's id works for it.
    assert not await store.activate_session(1, phone.session_id, device="laptop")
    assert not await store.release_session(1, phone.session_id, "laptop")
    assert not await store.release_session(1, phone.session_id)
    # Online while any device is connected.
    assert await store.online_users() == [(1, "u1")]
    assert await store.release_session(1, phone.session_id, "phone")
    assert await store.online_users() == [(1, "u1")]
    assert await store.get_sessions([1]) == {1: [laptop]}
    assert await store.release_session(1, laptop.session_id, "laptop")
    assert await store.online_users() == []
    assert await store.user_sessions(1) == []
    assert await store.get_sessions([1]) == {}


@pytest_twisted.ensureDeferred
async def test_claim_without_replace(backend: Backend) -> None:
    """
    CIM's rule: without C{replace}, any session of the user refuses a
    claim; the error names the device's own session, else the first by
    device.
    """
    store = backend.store
    laptop, _ = await connect(backend, 1, "laptop")
    phone, _ = await connect(backend, 1, "phone")
    error = await failure_of(store.claim_session(1, "u1", "h:1:2", LONG_TTL))
    assert isinstance(error, SessionExists) and error.session == laptop
    error = await failure_of(
        store.claim_session(1, "u1", "h:1:2", LONG_TTL, device="phone")
    )
    assert isinstance(error, SessionExists) and error.session == phone
    assert await store.user_sessions(1) == [laptop, phone]


@pytest_twisted.ensureDeferred
async def test_same_device_replaces_its_session(backend: Backend) -> None:
    store = backend.store
    old, _ = await connect(backend, 1, "phone")
    laptop, _ = await connect(backend, 1, "laptop")
    token = await store.issue_token(1, "h:1:2", old.session_id, LONG_TTL, "phone")
    kept = await store.issue_token(1, "h:1:2", laptop.session_id, LONG_TTL, "laptop")
    assert await store.verify_token(token) == TokenInfo(
        1, "h:1:2", old.session_id, "phone"
    )
    new, dropped = await connect(backend, 1, "phone", server="h:3:4")
    assert dropped == [old]
    assert new.server == "h:3:4" and new.session_id != old.session_id
    assert await store.verify_token(token) is None
    assert await store.verify_token(kept) == TokenInfo(
        1, "h:1:2", laptop.session_id, "laptop"
    )
    assert await store.user_sessions(1) == [laptop, new]
    # The old server's late release and death leave the new session be.
    assert not await store.release_session(1, old.session_id, "phone")
    assert await store.drop_server_sessions("h:1:2") == [1]
    assert await store.user_sessions(1) == [new]
    assert await store.verify_token(kept) is None


@pytest_twisted.ensureDeferred
async def test_device_limit_drops_the_least_recently_active(backend: Backend) -> None:
    store = backend.store
    a, _ = await connect(backend, 1, "a")
    b, _ = await connect(backend, 1, "b")
    c, _ = await connect(backend, 1, "c")
    tokens = {
        s.device: await store.issue_token(1, s.server, s.session_id, LONG_TTL, s.device)
        for s in (a, b, c)
    }
    # a is active again (its server says so at a renewal): b is the oldest.
    backend.clock.advance(1)
    later = backend.clock.seconds()
    renewal = await store.renew_sessions(
        "h:1:2", [HeldSession(1, a.session_id, "u1", "a", later)], LONG_TTL
    )
    assert renewal == ([], [])
    assert (await store.get_session(1, "a")).active == later
    # An older activity report does not lower it.
    await store.renew_sessions(
        "h:1:2", [HeldSession(1, a.session_id, "u1", "a", START)], LONG_TTL
    )
    assert (await store.get_session(1, "a")).active == later
    d, dropped = await connect(backend, 1, "d")
    assert dropped == [b]
    assert await store.verify_token(tokens["b"]) is None
    assert await store.verify_token(tokens["a"]) is not None
    assert [s.device for s in await store.user_sessions(1)] == ["a", "c", "d"]
    # A lower limit drops as many as needed, oldest first; the claiming
    # device's own session goes first.
    e, dropped = await connect(backend, 1, "c", max_devices=2)
    assert [s.device for s in dropped] == ["c", "a"]
    assert [s.device for s in await store.user_sessions(1)] == ["c", "d"]
    # The replaced session's server learns it at its next renewal.  (A
    # session the limit dropped leaves its device without one: a renewal
    # would make it again, as after an expiry; the route kicks it at once.)
    held = [HeldSession(1, s.session_id, "u1", s.device, later) for s in (c, d)]
    assert (await store.renew_sessions("h:1:2", held, LONG_TTL)).lost == [c.session_id]
    # A limit of 1 (or less) keeps the new session only.
    f, dropped = await connect(backend, 1, "f", max_devices=0)
    assert sorted(s.device for s in dropped) == ["c", "d"]
    assert await store.user_sessions(1) == [f]


@pytest_twisted.ensureDeferred
async def test_device_limit_counts_unconnected_claims(backend: Backend) -> None:
    """
    A claimed session not connected yet counts against the limit, by its
    claim's time; ties go by device.
    """
    store = backend.store
    claimed = []
    for device in ("y", "x"):
        session, _ = await store.claim_session(
            1, "u1", "h:1:2", LONG_TTL, replace=True, device=device
        )
        claimed.append(session)
    _, dropped = await store.claim_session(
        1, "u1", "h:1:2", LONG_TTL, replace=True, device="z", max_devices=2
    )
    assert dropped == [claimed[1]]
    assert [s.device for s in await store.user_sessions(1)] == ["y", "z"]


@pytest_twisted.ensureDeferred
async def test_renew_makes_expired_device_sessions_again(backend: Backend) -> None:
    store = backend.store
    backend.clock.advance(1)
    phone, _ = await store.claim_session(1, "u1", "h:1:2", LONG_TTL, device="phone")
    assert await store.activate_session(1, phone.session_id, SHORT_TTL, "phone")

    async def gone() -> bool:
        return await store.get_session(1, "phone") is None

    await backend.expire(SHORT_TTL, gone)
    held = HeldSession(1, phone.session_id, "u1", "phone", START + 50)
    # Made again, and said so: its server catches the device up.
    assert await store.renew_sessions("h:1:2", [held], LONG_TTL) == (
        [],
        [phone.session_id],
    )
    again = await store.get_session(1, "phone")
    assert again == Session(
        1, "u1", "h:1:2", phone.session_id, True, "phone", START + 50
    )
    assert await store.online_users() == [(1, "u1")]
    assert await store.drop_server_sessions("h:1:2") == [1]
    assert await store.online_users() == []


@pytest_twisted.ensureDeferred
async def test_renew_does_not_bring_back_ended_sessions(backend: Backend) -> None:
    """
    A session released (logged off), or dropped by the device limit, is
    not made again by a renewal from its server (which did not close it
    yet): it comes back as lost, for the server to close.
    """
    store = backend.store
    phone, _ = await connect(backend, 1, "phone", max_devices=2)
    laptop, _ = await connect(backend, 1, "laptop", max_devices=2)
    _, dropped = await connect(backend, 1, "tablet", max_devices=2)
    assert dropped == [phone]
    await store.release_session(1, laptop.session_id, "laptop")
    held = [
        HeldSession(1, phone.session_id, "u1", "phone", START + 50),
        HeldSession(1, laptop.session_id, "u1", "laptop", START + 50),
    ]
    assert await store.renew_sessions("h:1:2", held, LONG_TTL) == (
        sorted([phone.session_id, laptop.session_id]),
        [],
    )
    assert [s.device for s in await store.user_sessions(1)] == ["tablet"]


@pytest_twisted.ensureDeferred
async def test_renew_keeps_a_session_newer_than_a_restored_one(
    backend: Backend,
) -> None:
    """
    Once the store is restored to a backup from before a device logged in
    again, it holds the device's older session; the server holding the
    newer one keeps it at its renewal (made again), and the older one is
    ended: its server, if it still holds it, loses it.
    """
    store = backend.store
    older, _ = await connect(backend, 1, "phone", server="a:1:1")
    tablet, _ = await connect(backend, 1, "tablet", server="a:1:1")
    restore = await backend.back_up()
    newer, dropped = await connect(backend, 1, "phone", server="b:1:2")
    assert dropped == [older]
    await restore()
    store = backend.store
    assert await store.get_session(1, "phone") == older
    held = HeldSession(1, newer.session_id, "u1", "phone", START + 50)
    assert await store.renew_sessions("b:1:2", [held], LONG_TTL) == (
        [],
        [newer.session_id],
    )
    assert await store.get_session(1, "phone") == Session(
        1, "u1", "b:1:2", newer.session_id, True, "phone", START + 50
    )
    # The older session is ended; the tablet's, which is still its
    # device's, is renewed as it was.
    held_a = [
        HeldSession(1, older.session_id, "u1", "phone", START + 50),
        HeldSession(1, tablet.session_id, "u1", "tablet", tablet.active),
    ]
    assert await store.renew_sessions("a:1:1", held_a, LONG_TTL) == (
        [older.session_id],
        [],
    )
    assert await store.user_sessions(1) == [
        await store.get_session(1, "phone"),
        tablet,
    ]
    assert sorted(await store.session_servers()) == ["a:1:1", "b:1:2"]
    assert await store.drop_server_sessions("b:1:2") == [1]
    assert await store.user_sessions(1) == [tablet]


@pytest_twisted.ensureDeferred
async def test_renew_after_a_restart_loses_an_ended_older_session(
    backend: Backend,
) -> None:
    """
    A restart that lost nothing (a backup restored at once) brings back
    the sessions of an earlier run, but a session dropped by a newer login
    was ended before it: its renewal still finds it lost, and the newer
    session stays.
    """
    older, _ = await connect(backend, 1, "phone", server="a:1:1")
    newer, dropped = await connect(backend, 1, "phone", server="b:1:2")
    assert dropped == [older]
    await (await backend.back_up())()
    store = backend.store
    held = HeldSession(1, older.session_id, "u1", "phone", START + 50)
    assert await store.renew_sessions("a:1:1", [held], LONG_TTL) == (
        [older.session_id],
        [],
    )
    assert await store.get_session(1, "phone") == newer
    held = HeldSession(1, newer.session_id, "u1", "phone", newer.active)
    assert await store.renew_sessions("b:1:2", [held], LONG_TTL) == ([], [])
    assert await store.get_session(1, "phone") == newer


@pytest_twisted.ensureDeferred
async def test_renew_of_a_session_record_of_the_previous_release(
    backend: Backend,
) -> None:
    """
    A session record written by the previous release (no run in it) is
    never taken for an older one: after a restore, a renewal of another
    session of its device is lost, as before.
    """
    if backend.redis is None:
        pytest.skip("the memory store keeps nothing across releases")
    store = backend.store
    current, _ = await connect(backend, 1, "phone", server="a:1:1")
    key = layout.key(backend.prefix, "session", 1, "phone")
    assert await backend.redis.execute_command("HGET", key, "run")
    await backend.redis.execute_command("HDEL", key, "run")
    await (await backend.back_up())()
    held = HeldSession(1, "another", "u1", "phone", START + 50)
    assert await store.renew_sessions("b:1:2", [held], LONG_TTL) == (
        ["another"],
        [],
    )
    assert await store.get_session(1, "phone") == current


@pytest_twisted.ensureDeferred
async def test_drop_server_sessions_of_devices(backend: Backend) -> None:
    store = backend.store
    await connect(backend, 1, "phone", server="a:1:1")
    laptop, _ = await connect(backend, 1, "laptop", server="b:1:1")
    await connect(backend, 2, "", server="a:1:1")
    await connect(backend, 2, "tab", server="a:1:1")
    assert await store.drop_server_sessions("a:1:1") == [1, 2]
    assert await store.user_sessions(1) == [laptop]
    assert await store.user_sessions(2) == []
    assert await store.online_users() == [(1, "u1")]


# Cursors per device


@pytest_twisted.ensureDeferred
async def test_cursors_per_device(backend: Backend) -> None:
    store = backend.store
    await store.set_cursors(1, {PAIR: E(4)}, "phone")
    await store.set_cursors(1, {PAIR: E(9), "g:a": E(2)}, "laptop")
    await store.set_cursors(1, {PAIR: E(1)})
    assert await store.get_cursors(1, "phone") == {PAIR: E(4)}
    assert await store.get_cursors(1, "laptop") == {PAIR: E(9), "g:a": E(2)}
    assert await store.get_cursors(1) == {PAIR: E(1)}
    assert await store.get_cursors(1, "other") == {}
    assert await store.get_cursors(2, "phone") == {}


@pytest_twisted.ensureDeferred
async def test_cursors_of_another_epoch_replace(backend: Backend) -> None:
    store = backend.store
    await store.set_cursors(1, {PAIR: E(9), "g:a": E(5, "")}, "phone")
    # The same epoch raises only; another one replaces, lower or not.
    await store.set_cursors(1, {PAIR: E(3)}, "phone")
    assert await store.get_cursors(1, "phone") == {PAIR: E(9), "g:a": E(5, "")}
    await store.set_cursors(1, {PAIR: E(3, "e2"), "g:a": E(2, "e1")}, "phone")
    assert await store.get_cursors(1, "phone") == {PAIR: E(3, "e2"), "g:a": E(2)}
    await store.set_many_cursors({(1, "phone"): {PAIR: E(7, "e1")}})
    assert (await store.get_cursors(1, "phone"))[PAIR] == E(7, "e1")


@pytest_twisted.ensureDeferred
async def test_a_lone_cursor(backend: Backend) -> None:
    """
    A device's only cursor in a save (the Redis store's short path) raises,
    never lowers, and replaces one of another epoch, of no epoch too.
    """
    store = backend.store
    await store.set_cursors(1, {PAIR: E(4, "")}, "tab")
    await store.set_cursors(1, {PAIR: E(3, "")}, "tab")
    assert await store.get_cursors(1, "tab") == {PAIR: E(4, "")}
    await store.set_many_cursors({(1, "tab"): {PAIR: E(6, "")}})
    assert await store.get_cursors(1, "tab") == {PAIR: E(6, "")}
    await store.set_cursors(1, {PAIR: E(2, "e9")}, "tab")
    await store.set_cursors(1, {PAIR: E(1, "e9")}, "tab")
    assert await store.get_cursors(1, "tab") == {PAIR: E(2, "e9")}
    await store.set_cursors(1, {PAIR: E(1, "")}, "tab")
    assert await store.get_cursors(1, "tab") == {PAIR: E(1, "")}


@pytest_twisted.ensureDeferred
async def test_forget_cursors_of_every_device(backend: Backend) -> None:
    store = backend.store
    for device in ("", "phone", "laptop"):
        await store.set_cursors(1, {"g:a": E(3), "g:b": E(4)}, device)
    await store.set_cursors(2, {"g:a": E(3)}, "phone")
    assert await store.forget_cursors(1, "g:a") is None
    for device in ("", "phone", "laptop"):
        assert await store.get_cursors(1, device) == {"g:b": E(4)}
    assert await store.get_cursors(2, "phone") == {"g:a": E(3)}
    await store.forget_cursors(3, "g:a")


# Epochs


@pytest_twisted.ensureDeferred
async def test_epochs(backend: Backend) -> None:
    store = backend.store
    assert await store.epochs([PAIR, "g:a"]) == {PAIR: Epoch(), "g:a": Epoch()}
    assert await store.epochs([]) == {}
    first = await store.append([msg(PAIR, "one"), msg("g:a", "hi", group_id="a")])
    epoch = first[0].epoch
    assert epoch and first[1].epoch and first[1].epoch != ""
    found = await store.epochs([PAIR, "g:a", "g:b"])
    assert found == {
        PAIR: Epoch(epoch, "", 0),
        "g:a": Epoch(first[1].epoch, "", 0),
        "g:b": Epoch(),
    }
    # The epoch stays while the store holds the conversation.
    more = await store.append([msg(PAIR, "two"), msg(PAIR, "three")])
    assert [m.epoch for m in more] == [epoch, epoch]
    assert [m.epoch for m in await store.read(PAIR, 0, 10)] == [epoch] * 3
    assert [m.epoch for m in await store.read_before(PAIR, 0, 10)] == [epoch] * 3
    assert (await store.epochs([PAIR]))[PAIR] == Epoch(epoch, "", 0)
    # A retry returns the original, with its epoch.
    [original] = await store.append([msg(PAIR, "x", client_msg_id="c1")])
    [retry] = await store.append([msg(PAIR, "x", client_msg_id="c1")])
    assert retry == original and retry.epoch == epoch


@pytest_twisted.ensureDeferred
async def test_a_new_store_starts_new_epochs(backend: Backend) -> None:
    """
    A store that lost its conversations starts a new epoch at the next
    append: the memory store when made again; Redis when the epoch record
    is gone (a flushed or restored database; tests/test_store_redis.py
    flushes a whole one) or was written by another Redis run (a restart,
    a failover: faked here, restarted for real in test_store_redis.py).
    """
    store = backend.store
    [one] = await store.append([msg(PAIR, "one")])
    if backend.redis is None:
        again = MemoryStore(backend.clock, RETENTION)
        [other] = await again.append([msg(PAIR, "one again")])
        assert other.seq == 1 and other.epoch != one.epoch
        assert (await again.epochs([PAIR]))[PAIR] == Epoch(other.epoch, "", 0)
        return
    # Another run wrote the record: the next epoch follows it.
    key = layout.key(backend.prefix, "read", PAIR)
    await backend.redis.execute_command("HSET", key, "run", "another-run")
    [two] = await store.append([msg(PAIR, "two")])
    assert two.epoch not in ("", one.epoch)
    assert (await store.epochs([PAIR]))[PAIR] == Epoch(two.epoch, one.epoch, 1)
    # Everything lost: the next epoch follows nothing.
    for name in ("epoch", "seq", "conv", "read"):
        await backend.redis.execute_command(
            "DEL", layout.key(backend.prefix, name, PAIR)
        )
    [three] = await store.append([msg(PAIR, "three")])
    assert three.seq == 1 and three.epoch not in ("", one.epoch, two.epoch)
    assert (await store.epochs([PAIR]))[PAIR] == Epoch(three.epoch, "", 0)


@pytest_twisted.ensureDeferred
async def test_messages_from_before_epochs(backend: Backend) -> None:
    """
    A conversation the previous release stored (messages without an epoch
    tag, no epoch record) has no epoch until the next append, which starts
    one after its last seq; positions of no epoch are trusted up to there.
    """
    if backend.redis is None:
        pytest.skip("the memory store keeps nothing across releases")
    redis, prefix, store = backend.redis, backend.prefix, backend.store
    old = '{"i":7,"q":1,"ts":1700000000000,"s":2,"n":"bob","t":"old","r":1}'
    await redis.execute_command("ZADD", layout.key(prefix, "conv", PAIR), 1, old)
    await redis.execute_command("SET", layout.key(prefix, "seq", PAIR), 1)
    [stored] = await store.read(PAIR, 0, 10)
    assert (stored.msg_id, stored.text, stored.epoch) == (7, "old", "")
    assert await store.epochs([PAIR]) == {PAIR: Epoch(base=1)}
    assert await store.set_read(2, PAIR, 5) == 1
    [new] = await store.append([msg(PAIR, "new", sender_id=1)])
    assert new.seq == 2 and new.epoch
    assert await store.epochs([PAIR]) == {PAIR: Epoch(new.epoch, "", 1)}
    assert await store.read_positions(PAIR, [1, 2]) == {1: 2, 2: 1}


# Read positions


@pytest_twisted.ensureDeferred
async def test_read_positions(backend: Backend) -> None:
    store = backend.store
    assert await store.read_positions(PAIR, [1, 2]) == {1: 0, 2: 0}
    assert await store.set_read(2, PAIR, 3) == 0  # nothing to read yet
    await store.append([msg(PAIR, str(i), sender_id=1) for i in range(4)])
    # One's own messages are read.
    assert await store.read_positions(PAIR, [1, 2, 3]) == {1: 4, 2: 0, 3: 0}
    assert await store.set_read(2, PAIR, 2) == 2
    assert await store.set_read(2, PAIR, 1) == 2  # never lowered
    assert await store.set_read(2, PAIR, 99) == 4  # at most the last seq
    assert await store.set_read(2, PAIR, 2**80) == 4
    assert await store.read_positions(PAIR, [2, 1]) == {2: 4, 1: 4}
    await store.append([msg(PAIR, "reply", sender_id=2)])
    assert await store.read_positions(PAIR, [1, 2]) == {1: 4, 2: 5}
    assert await store.read_positions(PAIR, []) == {}


@pytest_twisted.ensureDeferred
async def test_read_positions_across_epochs(backend: Backend) -> None:
    """
    After a new epoch, read positions of the previous one count up to its
    base; the next raise writes one of the new epoch.
    """
    if backend.redis is None:
        pytest.skip("the memory store keeps its epochs for ever")
    store = backend.store
    await store.append([msg(PAIR, str(i), sender_id=1) for i in range(3)])
    await store.set_read(2, PAIR, 2)
    key = layout.key(backend.prefix, "read", PAIR)
    await backend.redis.execute_command("HSET", key, "run", "another-run")
    [new] = await store.append([msg(PAIR, "after", sender_id=3)])
    epoch = await store.epochs([PAIR])
    assert epoch[PAIR].base == 3 and epoch[PAIR].id == new.epoch
    assert await store.read_positions(PAIR, [1, 2, 3]) == {1: 3, 2: 2, 3: 4}
    assert await store.set_read(2, PAIR, 4) == 4
    # A second new epoch: positions of the first (now previous) count up to
    # its base, those of the one before not at all.
    await backend.redis.execute_command("HSET", key, "run", "yet-another-run")
    await store.append([msg(PAIR, "later", sender_id=3)])
    assert await store.read_positions(PAIR, [1, 2, 3]) == {1: 0, 2: 4, 3: 5}


# Conversations


@pytest_twisted.ensureDeferred
async def test_conversations(backend: Backend) -> None:
    store = backend.store
    assert await store.conversations(1) == []
    await store.create_group("team", 1)
    await store.join_group("team", 3)
    await store.create_group("empty", 1)
    await store.append(
        [
            msg(pair_conversation(1, 3), "to carol", sender_id=1),
            msg(PAIR, "hi alice", sender_id=2),
            msg(PAIR, "again", sender_id=2),
            msg(group_conversation("team"), "all", sender_id=3, group_id="team"),
            msg(pair_conversation(1, 1), "note to self", sender_id=1),
            msg(pair_conversation(2, 3), "not alice's", sender_id=2),
        ]
    )
    await store.set_read(1, PAIR, 1)
    states = await store.conversations(1)
    epochs = await store.epochs([s.conversation for s in states])
    assert [s.conversation for s in states] == [
        "g:empty",
        "g:team",
        "p:1:1",
        "p:1:2",
        "p:1:3",
    ]
    assert states == [
        ConversationState("g:empty", "", 0, 0, group_id="empty"),
        ConversationState("g:team", epochs["g:team"].id, 1, 0, group_id="team"),
        ConversationState("p:1:1", epochs["p:1:1"].id, 1, 1, 1, 1),
        ConversationState("p:1:2", epochs["p:1:2"].id, 2, 1, 2, 2),
        ConversationState("p:1:3", epochs["p:1:3"].id, 1, 1, 3, 0),
    ]
    assert [s.unread for s in states] == [0, 1, 0, 1, 0]
    # The peer's side: read receipts.
    await store.set_read(3, pair_conversation(1, 3), 1)
    [mine] = [s for s in await store.conversations(1) if s.peer_id == 3]
    assert mine.peer_read == 1
    [theirs] = [s for s in await store.conversations(3) if s.peer_id == 1]
    assert (theirs.read, theirs.peer_read, theirs.unread) == (1, 1, 0)
    assert [s.conversation for s in await store.conversations(2)] == [
        "p:1:2",
        "p:2:3",
    ]
    await store.leave_group("team", 1)
    assert "g:team" not in [s.conversation for s in await store.conversations(1)]


@pytest_twisted.ensureDeferred
async def test_login_reads(backend: Backend) -> None:
    """
    A login's reads: the conversations and the device's cursors, as
    L{IStore.conversations} and L{IStore.get_cursors} give them.
    """
    store = backend.store
    assert await store.login_reads(1) == ([], {})
    assert await store.login_reads(1, "phone") == ([], {})
    await store.create_group("team", 1)
    await store.append([msg(PAIR, "hi alice", sender_id=2)])
    await store.set_cursors(1, {PAIR: E(1), "g:left": E(4)})
    await store.set_cursors(1, {"g:team": E(2)}, "phone")
    states = await store.conversations(1)
    assert [s.conversation for s in states] == ["g:team", PAIR]
    assert await store.login_reads(1) == (states, {PAIR: E(1), "g:left": E(4)})
    assert await store.login_reads(1, "phone") == (states, {"g:team": E(2)})
    assert await store.login_reads(2, "phone") == (await store.conversations(2), {})


@pytest_twisted.ensureDeferred
async def test_token_login(backend: Backend) -> None:
    """
    A login with a token and its reads in one call: refused as
    L{IStore.activate_token} refuses, else the activated session, the
    user's conversations and the token's device's cursors (device C{""}
    included), as L{IStore.login_reads} reads them after the activation.
    """
    from cim.interfaces import TOKEN_OTHER_USER, TOKEN_UNKNOWN, TokenLogin

    store = backend.store
    await store.create_group("team", 1)
    await store.append([msg(PAIR, "hi alice", sender_id=2)])
    await store.set_cursors(1, {PAIR: E(1)})
    await store.set_cursors(1, {"g:team": E(2)}, "phone")
    tokens = {}
    for device in ("", "phone", "tab"):
        session, _ = await store.claim_session(
            1, "alice", "h:1:2", LONG_TTL, replace=True, device=device
        )
        tokens[device] = await store.issue_token(
            1, "h:1:2", session.session_id, LONG_TTL, device
        )
    assert await store.token_login("unknown", 1, "h:1:2") == TOKEN_UNKNOWN
    assert await store.token_login(tokens["phone"], 2, "h:1:2") == TOKEN_OTHER_USER
    assert not (await store.get_session(1, "phone")).connected
    for device in ("", "phone", "tab"):
        found = await store.token_login(tokens[device], 1, "h:1:2", LONG_TTL)
        assert isinstance(found, TokenLogin)
        assert found.session == await store.get_session(1, device)
        assert found.session.connected and found.session.device == device
        assert (found.states, found.cursors) == await store.login_reads(1, device)
    assert [s.conversation for s in found.states] == ["g:team", PAIR]
    assert await store.online_users() == [(1, "alice")]


# Paging back


@pytest_twisted.ensureDeferred
async def test_read_before(backend: Backend) -> None:
    store = backend.store
    assert await store.read_before(PAIR, 0, 10) == []
    await store.append([msg(PAIR, str(i)) for i in range(1, 8)])
    # Retention keeps 3..7.
    page = await store.read_before(PAIR, 0, 2)
    assert [m.seq for m in page] == [6, 7]
    page = await store.read_before(PAIR, page[0].seq, 2)
    assert [m.seq for m in page] == [4, 5]
    page = await store.read_before(PAIR, page[0].seq, 2)
    assert [(m.seq, m.text) for m in page] == [(3, "3")]
    assert await store.read_before(PAIR, 3, 2) == []
    assert await store.read_before(PAIR, 5, 0) == []
    assert [m.seq for m in await store.read_before(PAIR, 99, 10)] == [3, 4, 5, 6, 7]


# Session generations (cim.sessioncache)


@pytest_twisted.ensureDeferred
async def test_session_generations_follow_every_change(backend: Backend) -> None:
    """
    A user's session generation changes with each claim, activation,
    release, drop and session made again, and is read with the sessions
    by a lookup and after the messages by an append (the users of its
    private conversations).
    """
    store = backend.store

    async def generation(user_id: int) -> int:
        found = await store.get_sessions([user_id])
        assert found.generations is not None
        return found.generations.of[user_id]

    async def appended() -> Generations:
        stored = await store.append([NewMessage(PAIR, 1, "u1", "hi")])
        assert stored.generations is not None
        return stored.generations

    before = await appended()
    assert before.run
    # One run: the lookups' generations compare with the appends'.
    assert (await store.get_sessions([1])).generations.run == before.run
    seen = [await generation(1)]
    assert before.of == {1: seen[0], 2: await generation(2)}
    phone, _ = await store.claim_session(1, "u1", "a:1:1", LONG_TTL, device="phone")
    seen.append(await generation(1))
    await store.activate_session(1, phone.session_id, LONG_TTL, "phone")
    seen.append(await generation(1))
    assert (await appended()).of[1] == seen[-1]
    # A renewal that changes nothing changes nothing.
    held = HeldSession(1, phone.session_id, "u1", "phone", 5.0)
    await store.renew_sessions("a:1:1", [held], LONG_TTL)
    assert await generation(1) == seen[-1]
    await store.drop_server_sessions("a:1:1")
    seen.append(await generation(1))
    assert (await store.renew_sessions("a:1:1", [held], LONG_TTL)).restored
    seen.append(await generation(1))
    assert await store.release_session(1, phone.session_id, "phone")
    seen.append(await generation(1))
    assert seen == sorted(set(seen))
    # Another user's did not move; a group's append tells none.
    assert (await appended()).of == {1: seen[-1], 2: before.of[2]}
    stored = await store.append([NewMessage("g:x", 1, "u1", "hi")])
    assert stored.generations is None
