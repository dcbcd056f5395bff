"""
The store's side of the limits that keep one user from harming others
(issue 13), on every L{IStore} (the suite of C{test_store}): cursors are
integers whatever they are asked to store or find stored, a sender's
quota per conversation, sessions that expire unless renewed.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest_twisted

from cim.interfaces import HeldSession, QuotaExceeded
from cim.limits import MAX_SEQ
from cim.store.redis import layout
from tests import test_store
from tests.test_store import LONG_TTL, PAIR, SHORT_TTL, Backend, E, failure_of, msg

# The store suite's fixtures: every test runs on each store.
store_url = test_store.store_url
backend = test_store.backend

# Cursors


@pytest_twisted.ensureDeferred
async def test_cursors_are_stored_as_integers(backend: Backend) -> None:
    store = backend.store
    huge = 2**63 - 1
    await store.set_cursors(1, {PAIR: E(huge), "g:a": E(3), "g:b": E(MAX_SEQ)})
    await store.set_many_cursors(
        {
            (1, ""): {"g:c": E(2.5), "g:d": E(-4), "g:e": E(0)},  # type: ignore[arg-type]
            (2, ""): {PAIR: E(huge), "g:a": E(7)},
        }
    )
    # What is not an integer between 1 and MAX_SEQ is left out.
    assert await store.get_cursors(1) == {"g:a": E(3), "g:b": E(MAX_SEQ)}
    assert await store.get_cursors(2) == {"g:a": E(7)}
    if backend.redis is not None:
        stored = await backend.redis.execute_command(
            "HMGET", layout.key(backend.prefix, "cursors", 1), "g:a", "g:b"
        )
        assert stored == ["e1:3", f"e1:{MAX_SEQ}"]
    # Raising still works on the stored integers.
    await store.set_cursors(1, {"g:b": E(MAX_SEQ - 1), "g:a": E(4)})
    assert await store.get_cursors(1) == {"g:a": E(4), "g:b": E(MAX_SEQ)}


@pytest_twisted.ensureDeferred
async def test_bad_stored_cursors_are_skipped(backend: Backend) -> None:
    """
    A value stored by an older version (a float's form) or written by hand
    never fails a login's read: it is left out.  The previous release's
    bare digits are positions of no epoch.
    """
    store = backend.store
    await store.set_cursors(1, {PAIR: E(5)})
    bad = ["9.2233720368547758e+18", "-3", "x", "", str(2**63 - 1), "1e3", "e1:"]
    if backend.redis is not None:
        key = layout.key(backend.prefix, "cursors", 1)
        for i, value in enumerate(bad):
            await backend.redis.execute_command("HSET", key, f"g:{i}", value)
        await backend.redis.execute_command("HSET", key, "g:old", "12")
        assert await store.get_cursors(1) == {PAIR: E(5), "g:old": E(12, "")}
        # and the raising scripts cope with them too
        await store.set_cursors(1, {"g:0": E(2), "g:2": E(3), "g:old": E(13, "")})
        await store.set_many_cursors({(1, ""): {"g:1": E(4), "g:6": E(1)}})
        assert await store.get_cursors(1) == {
            PAIR: E(5),
            "g:0": E(2),
            "g:1": E(4),
            "g:2": E(3),
            "g:6": E(1),
            "g:old": E(13, ""),
        }
    else:
        assert await store.get_cursors(1) == {PAIR: E(5)}


# The senders' quota


def quota_store(backend: Backend, quota: int) -> Any:
    """
    The backend's store with a quota of C{quota} messages per sender and
    conversation (its retention keeps 5 per conversation, for an hour).
    """
    backend.store.retention = replace(backend.store.retention, sender_quota=quota)
    return backend.store


@pytest_twisted.ensureDeferred
async def test_quota_keeps_a_receivers_unread_message(backend: Backend) -> None:
    store = quota_store(backend, 4)
    [unread] = await store.append([msg(PAIR, "from carol", sender_id=3)])
    attacker = [msg(PAIR, f"spam{i}", sender_id=9) for i in range(4)]
    assert len(await store.append(attacker)) == 4
    error = await failure_of(store.append([msg(PAIR, "one more", sender_id=9)]))
    assert isinstance(error, QuotaExceeded)
    assert error.code == "6000"
    assert error.results == [None]
    # The receiver's unread message is still there (retention keeps 5).
    kept = await store.read(PAIR, 0, 10)
    assert kept[0] == unread
    assert [m.text for m in kept] == ["from carol"] + [f"spam{i}" for i in range(4)]
    # Others still write to that conversation, and the sender to others.
    await store.append([msg(PAIR, "from dave", sender_id=4)])
    await store.append([msg("p:1:5", "elsewhere", sender_id=9)])


@pytest_twisted.ensureDeferred
async def test_quota_refuses_only_what_is_over_it(backend: Backend) -> None:
    store = quota_store(backend, 2)
    batch = [
        msg(PAIR, "a1", sender_id=1),
        msg(PAIR, "b1", sender_id=9),
        msg(PAIR, "b2", sender_id=9),
        msg(PAIR, "b3", sender_id=9),  # one too many
        msg("p:1:3", "b-elsewhere", sender_id=9),
        msg(PAIR, "a2", sender_id=1),
    ]
    error = await failure_of(store.append(batch))
    assert isinstance(error, QuotaExceeded)
    texts = [r and r.text for r in error.results]
    assert texts == ["a1", "b1", "b2", None, "b-elsewhere", "a2"]
    stored = await store.read(PAIR, 0, 10)
    assert [(m.seq, m.text) for m in stored] == [
        (1, "a1"),
        (2, "b1"),
        (3, "b2"),
        (4, "a2"),
    ]
    # The quota is used up: nothing more of 9's fits.
    error = await failure_of(store.append([msg(PAIR, "b4", sender_id=9)]))
    assert isinstance(error, QuotaExceeded)


@pytest_twisted.ensureDeferred
async def test_quota_does_not_count_retries(backend: Backend) -> None:
    store = quota_store(backend, 2)
    first = await store.append(
        [msg(PAIR, "x", client_msg_id="c1"), msg(PAIR, "y", client_msg_id="c2")]
    )
    again = await store.append(
        [msg(PAIR, "x", client_msg_id="c1"), msg(PAIR, "y", client_msg_id="c2")]
    )
    assert again == first
    # A duplicate within one call is a retry too.
    error = await failure_of(
        store.append(
            [
                msg(PAIR, "z", client_msg_id="c3"),
                msg(PAIR, "z", client_msg_id="c3"),
            ]
        )
    )
    assert isinstance(error, QuotaExceeded)
    assert error.results == [None, None]


@pytest_twisted.ensureDeferred
async def test_quota_window(backend: Backend) -> None:
    """
    The quota counts over any C{max_age} (an hour here): the window before
    the current one counts too.
    """
    store = quota_store(backend, 3)
    clock = backend.clock
    hour = store.retention.max_age
    # Late in one window...
    clock.advance(hour - clock.seconds() % hour - 60)
    await store.append([msg(PAIR, f"a{i}") for i in range(3)])
    # ...and early in the next: still the same hour.
    clock.advance(120)
    assert isinstance(await failure_of(store.append([msg(PAIR, "b")])), QuotaExceeded)
    # An hour later, the first window no longer counts.
    clock.advance(hour)
    await store.append([msg(PAIR, f"c{i}") for i in range(3)])
    if backend.redis is not None:
        # Counted in the conversation's read positions' hash, a field per
        # sender: the window, its count, the previous window's count.
        window = int(clock.seconds() * 1000) // int(hour * 1000)
        stored = await backend.redis.execute_command(
            "HGET", layout.key(backend.prefix, "read", PAIR), "q:1"
        )
        assert stored == f"{window}:3:0"
        assert (
            await backend.redis.execute_command("KEYS", backend.prefix + "quota:*")
            == []
        )


@pytest_twisted.ensureDeferred
async def test_no_quota(backend: Backend) -> None:
    store = quota_store(backend, 0)
    for _ in range(3):
        await store.append([msg(PAIR, f"m{i}") for i in range(10)])
    assert len(await store.read(PAIR, 0, 100)) == 5


# Sessions live only while renewed


@pytest_twisted.ensureDeferred
async def test_connected_sessions_expire_unless_renewed(backend: Backend) -> None:
    store = backend.store
    ttl = SHORT_TTL
    alice, _ = await store.claim_session(1, "alice", "h:1:2", LONG_TTL)
    bob, _ = await store.claim_session(2, "bob", "h:1:2", LONG_TTL)
    assert await store.activate_session(1, alice.session_id, ttl)
    assert await store.activate_session(2, bob.session_id, LONG_TTL)
    assert await store.online_users() == [(1, "alice"), (2, "bob")]

    async def gone() -> bool:
        return await store.get_session(1) is None

    await backend.expire(ttl, gone)
    # No longer online: not listed, not found for delivery, free to log in.
    assert await store.online_users() == [(2, "bob")]
    assert await store.get_sessions([1, 2]) == {2: [await store.get_session(2)]}
    if backend.redis is not None:
        online = await backend.redis.execute_command("HKEYS", backend.prefix + "online")
        assert online == ["2"]
    again, dropped = await store.claim_session(1, "alice", "h:3:4", LONG_TTL)
    assert dropped == []


@pytest_twisted.ensureDeferred
async def test_renew_sessions(backend: Backend) -> None:
    store = backend.store
    server = "h:1:2"
    alice, _ = await store.claim_session(1, "alice", server, LONG_TTL)
    bob, _ = await store.claim_session(2, "bob", server, LONG_TTL)
    await store.activate_session(1, alice.session_id, 5.0)
    await store.activate_session(2, bob.session_id, 5.0)
    # Bob logs in again elsewhere: his session here is another one now.
    newer, _ = await store.claim_session(2, "bob", "h:3:4", LONG_TTL, replace=True)
    held = [
        HeldSession(1, alice.session_id, "alice"),
        HeldSession(2, bob.session_id, "bob"),
    ]
    assert await store.renew_sessions(server, held, LONG_TTL) == ([bob.session_id], [])
    assert await store.renew_sessions(server, [], LONG_TTL) == ([], [])
    pttl = await backend.pttl("session", 1, "")
    assert pttl is None or pttl > 5000
    backend.clock.advance(10)
    assert (await store.get_session(1)).session_id == alice.session_id
    assert await store.get_session(2) == newer
    # A session that expired while its server could not renew it (Redis
    # away) is made again: the server still holds it.
    assert await store.activate_session(1, alice.session_id, SHORT_TTL)

    async def gone() -> bool:
        return await store.get_session(1) is None

    await backend.expire(SHORT_TTL, gone)
    assert await store.renew_sessions(server, held[:1], LONG_TTL) == (
        [],
        [alice.session_id],
    )
    again = await store.get_session(1)
    assert again is not None and again.connected
    assert (again.session_id, again.server, again.user_name) == (
        alice.session_id,
        server,
        "alice",
    )
    assert (1, "alice") in await store.online_users()
    # and dropped with its server's sessions.
    assert await store.drop_server_sessions(server) == [1]
