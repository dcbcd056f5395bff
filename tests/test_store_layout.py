"""
The Redis store's key layout (L{cim.store.redis.layout}): every key that
belongs to a user, a conversation or a group carries its owner as a hash
tag, whoever names it (the store in Python, the scripts in Lua), and the
migration renames the keys of the layout before it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted

from cim.interfaces import NewMessage, StoreError
from cim.message import Position, group_conversation, pair_conversation
from cim.store.redis import layout

P = "cim:"


def test_owned_keys_carry_their_owner() -> None:
    key = layout.key
    assert key(P, "pairs", 7) == "cim:pairs:{7}"
    assert key(P, "session", 7, "phone") == "cim:session:{7}:phone"
    assert key(P, "session", 7, "") == "cim:session:{7}:"
    assert key(P, "user", 7) == "cim:user:{7}"
    assert key(P, "conv", "p:1:2") == "cim:conv:{p:1:2}"
    assert key(P, "read", "g:team") == "cim:read:{g:team}"
    assert key(P, "members", "team") == "cim:members:{g:team}"
    assert key(P, "sent", "p:1:2", 1, "c:1") == "cim:sent:{p:1:2}:1:c:1"
    assert P + "sent:" + layout.sent_id("p:1:2", 1, "c:1") == key(
        P, "sent", "p:1:2", 1, "c:1"
    )
    # A group and its conversation share their tag.
    assert key(P, "joined", "team").endswith(layout.tag(group_conversation("team")))


def test_keys_without_an_owner_have_no_tag() -> None:
    for parts in (
        ("msg", "next"),
        ("user", "next"),
        ("user", "bykey"),
        ("online",),
        ("servers",),
        ("server", "10.0.0.1:11211:8081"),
        ("token", "ab" * 32),
        ("ended", "s-1"),
    ):
        assert "{" not in layout.key(P, *parts), parts


#: Keys of the layout before hash tags, and their names now.
RENAMED = {
    "cim:user:7": "cim:user:{7}",
    "cim:session:7:phone": "cim:session:{7}:phone",
    "cim:session:7:": "cim:session:{7}:",
    "cim:session:7": "cim:session:{7}",
    "cim:sessions:7": "cim:sessions:{7}",
    "cim:sgen:7": "cim:sgen:{7}",
    "cim:tokens:7:phone": "cim:tokens:{7}:phone",
    "cim:devkey:7:tab.1": "cim:devkey:{7}:tab.1",
    "cim:cursors:7": "cim:cursors:{7}",
    "cim:cursors:7:phone": "cim:cursors:{7}:phone",
    "cim:cdevices:7": "cim:cdevices:{7}",
    "cim:pairs:7": "cim:pairs:{7}",
    "cim:groups:7": "cim:groups:{7}",
    "cim:conv:p:1:2": "cim:conv:{p:1:2}",
    "cim:conv:u:3": "cim:conv:{u:3}",
    "cim:seq:g:team": "cim:seq:{g:team}",
    "cim:read:p:1:2": "cim:read:{p:1:2}",
    "cim:epoch:p:1:2": "cim:epoch:{p:1:2}",
    "cim:sent:1:p:1:2:c1": "cim:sent:{p:1:2}:1:c1",
    "cim:sent:1:g:a.b-c:x:y": "cim:sent:{g:a.b-c}:1:x:y",
    "cim:group:team": "cim:group:{g:team}",
    "cim:ginfo:team": "cim:ginfo:{g:team}",
    "cim:members:team": "cim:members:{g:team}",
    "cim:joined:team": "cim:joined:{g:team}",
    "cim:invited:team": "cim:invited:{g:team}",
    "cim:asks:team": "cim:asks:{g:team}",
}

#: Keys that keep their name.
KEPT = [
    "cim:user:next",
    "cim:user:bykey",
    "cim:user:byname",
    "cim:msg:next",
    "cim:online",
    "cim:servers",
    "cim:server:10.0.0.1:11211:8081",
    "cim:token:" + "ab" * 32,
    "cim:ended:s-1",
    "cim:quota:p:1:2:1:5",
    "other:pairs:7",
    *RENAMED.values(),
]


def test_retagged_names_the_keys_of_the_layout_before() -> None:
    for old, new in RENAMED.items():
        assert layout.retagged(P, old) == new, old
    for name in KEPT:
        assert layout.retagged(P, name) is None, name


def _untagged(prefix: str, name: str) -> str:
    """
    A key of this layout as the layout before it named it.
    """
    kind, _, rest = name[len(prefix) :].partition(":")
    sent = re.fullmatch(r"\{([^}]*)\}:(\d+):(.*)", rest, re.DOTALL)
    if kind == "sent" and sent:
        conversation, sender, client_msg_id = sent.groups()
        return f"{prefix}sent:{sender}:{conversation}:{client_msg_id}"
    owner = re.fullmatch(r"\{([^}]*)\}(.*)", rest, re.DOTALL)
    if owner is None:
        return name
    tag, more = owner.groups()
    if kind in layout.GROUP_KINDS:
        tag = tag.removeprefix("g:")
    return f"{prefix}{kind}:{tag}{more}"


@pytest_twisted.async_yield_fixture
async def store(redis_url: str) -> AsyncIterator[Any]:
    from twisted.internet import reactor

    from cim.store.redis import connect_redis

    prefix = f"cimtest:{uuid.uuid4().hex}:"
    store = await connect_redis(redis_url, clock=reactor, prefix=prefix)
    try:
        yield store
    finally:
        for name in await store._command("KEYS", prefix + "*"):
            await store._command("DEL", name)
        await store.close()


async def _use(store: Any) -> None:
    """
    Write through the store every kind of key it has: accounts, sessions
    and tokens of two devices, device keys, private and group messages
    with idempotency records, cursors of two devices, read positions,
    a group with members, an invitation and a request to join.
    """
    server = "127.0.0.1:11211:8081"
    alice = await store.register("alice", "alice-password")
    bob = await store.register("bob", None, "bob-account-key-0123456789")
    carol = await store.register("carol", "carol-password")
    for user, device in ((alice, "phone"), (bob, "")):
        _, _, token = await store.open_session(
            user.user_id,
            user.user_name,
            server,
            claim_ttl=60,
            token_ttl=600,
            replace=True,
            device=device,
            device_key="device-key-0123456789" if device else None,
            device_key_ttl=600,
        )
        assert not isinstance(
            await store.activate_token(token, user.user_id, server), str
        )
    pair = pair_conversation(alice.user_id, bob.user_id)
    [first] = await store.append(
        [NewMessage(pair, alice.user_id, "alice", "hi", "c:1")]
    )
    await store.create_group("team", alice.user_id)
    assert await store.join_group("team", bob.user_id)
    assert await store.invite_to_group("team", carol.user_id)
    assert await store.ask_to_join("team", 99, 10)
    team = group_conversation("team")
    await store.append(
        [NewMessage(team, bob.user_id, "bob", "all", "c:2", group_id="team")]
    )
    seen = Position(first.epoch, first.seq)
    await store.set_cursors(bob.user_id, {pair: seen})
    await store.set_cursors(bob.user_id, {pair: seen}, device="tab")
    assert await store.set_read(bob.user_id, pair, first.seq) == first.seq
    assert await store.get_sessions([alice.user_id, bob.user_id])


async def _keys(store: Any) -> list[str]:
    keys: list[str] = await store._command("KEYS", store.prefix + "*")
    return sorted(keys)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_every_owned_key_the_store_writes_carries_its_owner(store: Any) -> None:
    await _use(store)
    keys = await _keys(store)
    kinds = {name[len(store.prefix) :].partition(":")[0] for name in keys}
    owned = layout.USER_KINDS | layout.CONVERSATION_KINDS | layout.GROUP_KINDS
    # Every kind of owned key the store has today was written (but the
    # previous releases' epoch records).
    assert owned - kinds == {"epoch"}
    for name in keys:
        kind, _, rest = name[len(store.prefix) :].partition(":")
        if kind not in owned or rest in ("next", "bykey"):
            assert "{" not in name, name
            continue
        tag = re.match(r"\{([^{}]+)\}", rest)
        assert tag, name
        if kind in layout.USER_KINDS:
            assert tag.group(1).isdigit(), name
        else:
            assert re.fullmatch(r"p:\d+:\d+|g:team", tag.group(1)), name


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_the_migration_renames_every_key_of_the_layout_before(store: Any) -> None:
    """
    A store written before hash tags (made here by naming every key of a
    used store the old way) reads as it did once L{retag_keys} ran: the
    same keys, values and times to live.
    """
    await _use(store)
    before = {}
    for name in await _keys(store):
        before[name] = (
            await store._command("DUMP", name),
            await store._command("PTTL", name) > 0,
        )
    for name in before:
        old = _untagged(store.prefix, name)
        if old != name:
            await store._command("RENAME", name, old)
    assert all("{" not in name for name in await _keys(store))

    renamed, taken = await store.retag_keys()
    assert taken == []
    assert renamed == sum(1 for name in before if _untagged(store.prefix, name) != name)
    after = {}
    for name in await _keys(store):
        after[name] = (
            await store._command("DUMP", name),
            await store._command("PTTL", name) > 0,
        )
    assert after == before
    # Again: nothing to do.
    assert await store.retag_keys() == (0, [])


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_the_migration_keeps_a_key_whose_new_name_is_taken(store: Any) -> None:
    new = layout.key(store.prefix, "pairs", 5)
    old = store.prefix + "pairs:5"
    await store._command("SADD", new, "p:5:6")
    await store._command("SADD", old, "p:1:5")
    assert await store.retag_keys() == (0, [(old, new)])
    assert await store._command("SMEMBERS", new) == ["p:5:6"]
    assert await store._command("SMEMBERS", old) == ["p:1:5"]


async def _connect(redis_url: str, prefix: str, **kwargs: Any) -> Any:
    from twisted.internet import reactor

    from cim.store.redis import connect_redis

    return await connect_redis(redis_url, clock=reactor, prefix=prefix, **kwargs)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_a_store_of_an_earlier_release_is_refused_until_migrated(
    store: Any, redis_url: str
) -> None:
    """
    Daemons refuse a store whose data an earlier release wrote (it would
    look empty to them: accounts and messages under other names) and say
    how to migrate it.
    """
    # An earlier release's store: accounts under their old names.
    await store._command("SET", store.prefix + "user:next", 2)
    for user_id, name in ((1, "alice"), (2, "bob")):
        await store._command("HSET", f"{store.prefix}user:{user_id}", "name", name)
    with pytest.raises(StoreError, match="earlier release.*cim.store.redis.migrate"):
        await _connect(redis_url, store.prefix)
    # The migration connects, and renames the newest account last: a
    # daemon started while it runs is still refused.
    other = await _connect(redis_url, store.prefix, check_layout=False)
    await other.close()
    await store._command(
        "RENAME", store.prefix + "user:1", layout.key(store.prefix, "user", 1)
    )
    with pytest.raises(StoreError, match="earlier release"):
        await _connect(redis_url, store.prefix)
    await store._command(
        "RENAME", layout.key(store.prefix, "user", 1), store.prefix + "user:1"
    )
    renamed: list[str] = []
    command = store._command

    def spy(*args: Any) -> Any:
        if args[0] == "RENAMENX":
            renamed.append(args[1])
        return command(*args)

    store._command = spy
    assert await store.retag_keys() == (2, [])
    del store._command
    assert renamed[-1] == store.prefix + "user:2"
    again = await _connect(redis_url, store.prefix)
    try:
        assert (await again.get_account(2)).user_name == "bob"
    finally:
        await again.close()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_a_new_or_emptied_store_is_taken(store: Any, redis_url: str) -> None:
    await (await _connect(redis_url, store.prefix)).close()
    await store.register("alice")
    await (await _connect(redis_url, store.prefix)).close()
    # Emptied (Redis lost everything) while daemons wrote on.
    for name in await _keys(store):
        await store._command("DEL", name)
    await store.register("bob")
    await (await _connect(redis_url, store.prefix)).close()
