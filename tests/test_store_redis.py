"""
How the Redis store is put together: its Lua files, its one txredisapi
importer, and its URL parser.  (Its behaviour is checked by
C{tests/test_store.py}.)
"""

from __future__ import annotations

import ast
import itertools
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

import cim
from cim.interfaces import ConversationState, NewMessage
from cim.message import Position
from cim.store import RedisAddress, Retention, parse_redis_url
from cim.store.redis import layout, scripts
from cim.store.redis.scripts import Script
from cim.store.redis.store import MovedInboxes
from tests.kit.cluster import Processes
from tests.kit.services import RedisServer

CIM = Path(cim.__file__).parent


def test_every_lua_file_is_loaded() -> None:
    """
    Every C{.lua} file of the scripts package is read, and is part of a
    script; every one but the libraries is a script of its own.
    """
    files = {p.stem for p in Path(scripts.__file__).parent.glob("*.lua")}
    assert files
    assert set(scripts.SOURCES) == files
    for name, source in scripts.SOURCES.items():
        assert source.strip(), name
        assert any(source in s.source for s in scripts.SCRIPTS.values()), name
    assert set(scripts.LIBRARIES) <= files
    assert set(scripts.SCRIPTS) == files - set(scripts.LIBRARIES)


def test_scripts_have_the_libraries_they_call() -> None:
    """
    A script calling a function of a library is sent with that library in
    front of it (Lua would fail on the unknown name only when it runs).
    """
    for library in scripts.LIBRARIES:
        source = scripts.SOURCES[library]
        functions = re.findall(r"^local function (\w+)", source, re.MULTILINE)
        assert functions, library
        for name, script in scripts.SCRIPTS.items():
            body = scripts.SOURCES[name]
            if any(re.search(rf"\b{f}\(", body) for f in functions):
                assert source in script.source, (name, library)
                assert script.source.endswith(body), name


def _imports(path: Path) -> set[str]:
    """
    The top-level names of the modules that the module at C{path} imports.
    """
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_connection_module_imports_txredisapi() -> None:
    importers = {
        path.relative_to(CIM).as_posix()
        for path in CIM.rglob("*.py")
        if "txredisapi" in _imports(path)
    }
    assert importers == {"store/redis/connection.py"}


@pytest.mark.parametrize(
    "url, address",
    [
        ("redis://h", RedisAddress("h")),
        ("redis://127.0.0.1:16379/0", RedisAddress("127.0.0.1", 16379, 0)),
        ("redis://h/3/", RedisAddress("h", db=3)),
        ("redis://:s%40cret@h:1/2", RedisAddress("h", 1, 2, None, "s@cret")),
        ("redis://me:pw@h", RedisAddress("h", username="me", password="pw")),
    ],
)
def test_parse_redis_url(url: str, address: RedisAddress) -> None:
    assert parse_redis_url(url) == address


@pytest.mark.parametrize(
    "url, complaint",
    [
        ("memory:", "not a redis:// URL"),
        ("rediss://h/0", "not a redis:// URL"),
        ("redis://h:notaport/0", "bad port"),
        ("redis://h:99999/0", "bad port"),
        ("redis://h:0/0", "expected redis://"),
        ("redis:///0", "expected redis://"),
        ("redis://h/zero", "expected redis://"),
        ("redis://h/-1", "expected redis://"),
    ],
)
def test_parse_redis_url_rejects(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_redis_url(url)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_redis_knows_every_script(redis_url: str) -> None:
    """
    Redis compiles every script, and names it by the SHA1 EVALSHA uses.
    """
    from twisted.internet import reactor

    from cim.store.redis import connect_redis

    store = await connect_redis(redis_url, clock=reactor)
    try:
        for name, script in scripts.SCRIPTS.items():
            sha = await store._redis.execute_command("SCRIPT", "LOAD", script.source)
            assert sha == script.sha, name
    finally:
        await store.close()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_migrating_names_of_an_earlier_release(redis_url: str) -> None:
    """
    Accounts an earlier release stored by raw name are found by name (and
    their names are taken) after C{python -m cim.store.redis.migrate}.
    """
    import io
    import uuid

    from twisted.internet import reactor

    from cim.store.redis import connect_redis
    from cim.store.redis.migrate import migrate

    prefix = f"cimtest:{uuid.uuid4().hex}:"
    store = await connect_redis(redis_url, clock=reactor, prefix=prefix)
    try:
        # What the earlier release wrote: ids 1-3, found by raw name.
        await store._command("SET", prefix + "user:next", 3)
        for user_id, name in [(1, "Zoe"), (2, "bob"), (3, "zoe")]:
            await store._command("HSET", prefix + f"user:{user_id}", "name", name)
            await store._command("HSET", prefix + "user:byname", name, user_id)
        assert await store.get_account_by_name("bob") is None
        assert await store.retag_keys() == (3, [])
        assert await store.index_old_names() == (2, [("zoe", 3, 1)])
        assert (await store.get_account_by_name("BOB")).user_id == 2  # type: ignore[union-attr]
        assert (await store.get_account_by_name("zoe")).user_id == 1  # type: ignore[union-attr]
        # Registering an old name finds its account instead of a new one.
        again = await store.register("Bob")
        assert (again.user_id, again.created) == (2, False)
        # Running it again changes nothing.
        assert await store.index_old_names() == (0, [("zoe", 3, 1)])
        # The command itself (on the default prefix).
        out = io.StringIO()
        assert await migrate(reactor, redis_url, out) == 0
        assert out.getvalue().startswith("renamed ")
    finally:
        await store._command(
            "EVAL",
            "for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end",
            0,
            prefix + "*",
        )
        await store.close()


async def _delete_prefix(store: Any, prefix: str) -> None:
    await store._command(
        "EVAL",
        "for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end",
        0,
        prefix + "*",
    )


def _old_message(msg_id: int, seq: int, sender: int, receiver: int, text: str) -> str:
    """
    A message as the previous release stored it in a private inbox.
    """
    return json.dumps(
        {
            "i": msg_id,
            "q": seq,
            "ts": 1_700_000_000_000 + msg_id,
            "s": sender,
            "n": f"user{sender}",
            "t": text,
            "r": receiver,
        },
        separators=(",", ":"),
    )


async def _snapshot(store: Any, prefix: str) -> dict[str, Any]:
    """
    Every key of C{prefix} with its type and contents.
    """
    snapshot: dict[str, Any] = {}
    for key in sorted(await store._command("KEYS", prefix + "*")):
        kind = await store._command("TYPE", key)
        if kind == "string":
            value = await store._command("GET", key)
        elif kind == "hash":
            flat = await store._command("HGETALL", key)
            value = sorted(zip(flat[::2], flat[1::2], strict=True))
        elif kind == "set":
            value = sorted(await store._command("SMEMBERS", key))
        else:
            value = await store._command("ZRANGE", key, 0, -1, "WITHSCORES")
        snapshot[key] = (kind, value)
    return snapshot


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_migrating_private_inboxes(redis_url: str) -> None:
    """
    The previous release's inboxes (C{conv:u:<id>}: what others sent to
    <id>) become both users' pair conversations, merged in msg id order
    with what the new release appended there, numbered again in a new
    epoch, with read positions from the senders and the inbox cursors.
    """
    import uuid

    from twisted.internet import reactor

    from cim.store.redis import connect_redis

    prefix = f"cimtest:{uuid.uuid4().hex}:"
    store = await connect_redis(
        redis_url,
        clock=reactor,
        prefix=prefix,
        retention=Retention(sender_quota=0),
    )
    try:
        # The previous release: alice (1) got 10 and 12 from bob (2), 14
        # from carol (3) and 15 from herself; bob got 11 and 13 from alice,
        # and one without a sender.  Alice's cursor reached seq 2 of hers.
        inboxes = {
            1: [(10, 2, "b1"), (12, 2, "b2"), (14, 3, "c1"), (15, 1, "note")],
            2: [(11, 1, "a1"), (13, 1, "a2")],
        }
        for owner, messages in inboxes.items():
            for seq, (msg_id, sender, text) in enumerate(messages, 1):
                member = _old_message(msg_id, seq, sender, owner, text)
                await store._command("ZADD", f"{prefix}conv:u:{owner}", seq, member)
            await store._command("SET", f"{prefix}seq:u:{owner}", len(messages))
            await store._command("PEXPIRE", f"{prefix}conv:u:{owner}", 3_600_000)
        await store._command("ZADD", f"{prefix}conv:u:2", 3, '{"i":16,"q":3}')
        await store._command("HSET", f"{prefix}cursors:1", "u:1", "2", "g:x", "4")
        await store._command("SET", f"{prefix}msg:next", 20)
        # The new release's daemons ran before the migration: bob sent one.
        [early] = await store.append([NewMessage("p:1:2", 2, "user2", "b3")])
        assert (early.msg_id, early.seq) == (21, 1)

        assert await store.retag_keys() == (5, [])
        moved = await store.move_old_inboxes()
        assert moved == MovedInboxes(2, 6, 3, 1)

        pair = await store.read("p:1:2", 0, 100)
        assert [(m.msg_id, m.seq, m.text) for m in pair] == [
            (10, 1, "b1"),
            (11, 2, "a1"),
            (12, 3, "b2"),
            (13, 4, "a2"),
            (21, 5, "b3"),
        ]
        assert [(m.sender_id, m.receive_user_id) for m in pair[:2]] == [(2, 1), (1, 2)]
        epoch = (await store.epochs(["p:1:2"]))["p:1:2"]
        assert {m.epoch for m in pair} == {epoch.id}
        assert epoch.base == 0 and epoch.previous not in ("", early.epoch)
        assert await store.last_seq("p:1:2") == 5
        ids = {c: e.id for c, e in (await store.epochs(["p:1:1", "p:1:3"])).items()}
        assert all(ids.values())
        assert await store.conversations(1) == [
            ConversationState("p:1:1", ids["p:1:1"], 1, 1, 1, 1),
            ConversationState("p:1:2", epoch.id, 5, 4, 2, 5),
            ConversationState("p:1:3", ids["p:1:3"], 1, 0, 3, 1),
        ]
        [bob] = await store.conversations(2)
        assert (bob.conversation, bob.read, bob.peer_read, bob.unread) == (
            "p:1:2",
            5,
            4,
            0,
        )
        [carol] = await store.conversations(3)
        assert (carol.conversation, carol.read, carol.unread) == ("p:1:3", 1, 0)
        # The old keys are gone; other cursors stay.
        for kind, inbox in itertools.product(("conv", "seq"), ("u:1", "u:2")):
            assert not await store._command("EXISTS", layout.key(prefix, kind, inbox))
        assert await store.get_cursors(1) == {"g:x": Position("", 4)}
        pttl = await store._command("PTTL", layout.key(prefix, "conv", "p:1:3"))
        assert 0 < pttl <= 3_600_000

        # Running it again changes nothing.
        before = await _snapshot(store, prefix)
        assert await store.move_old_inboxes() == MovedInboxes(0, 0, 0, 0)
        assert await _snapshot(store, prefix) == before

        # Appending goes on in the migration's epoch.
        [next_one] = await store.append([NewMessage("p:1:2", 1, "user1", "a3")])
        assert (next_one.seq, next_one.epoch) == (6, epoch.id)
    finally:
        await _delete_prefix(store, prefix)
        await store.close()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_migrating_epoch_records(redis_url: str) -> None:
    """
    The previous release's epoch records (C{epoch:<conversation>}) move into
    the conversations' hashes, beside the read positions; appending goes on
    in the moved epoch, and an epoch the new release started stands.
    """
    import uuid

    from twisted.internet import reactor

    from cim.interfaces import Epoch
    from cim.store.redis import connect_redis

    prefix = f"cimtest:{uuid.uuid4().hex}:"
    store = await connect_redis(redis_url, clock=reactor, prefix=prefix)
    try:
        run_id = await store._command("INFO", "server")
        run_id = run_id.split("run_id:", 1)[1].split()[0]
        # The previous release: p:1:2 at seq 3 of epoch "e2" (after "e1" up
        # to seq 1), bob read up to 2; p:1:3 in epoch "x" of another run.
        await store._command(
            "HSET", f"{prefix}epoch:p:1:2", "id", "e2", "previous", "e1",
            "base", "1", "run", run_id,
        )  # fmt: skip
        await store._command("SET", f"{prefix}seq:p:1:2", 3)
        await store._command("HSET", f"{prefix}read:p:1:2", "2", "e2:2")
        await store._command("HSET", f"{prefix}epoch:p:1:3", "id", "x", "run", "old")
        await store._command("SET", f"{prefix}seq:p:1:3", 1)
        # The new release started an epoch of p:1:4 before the migration.
        await store._command("HSET", f"{prefix}epoch:p:1:4", "id", "old", "run", "old")
        [early] = await store.append([NewMessage("p:1:4", 1, "user1", "hi")])

        assert await store.retag_keys() == (6, [])
        assert await store.move_epoch_records() == 3
        assert await store.epochs(["p:1:2", "p:1:3", "p:1:4"]) == {
            "p:1:2": Epoch("e2", "e1", 1),
            "p:1:3": Epoch("x", "", 0),
            "p:1:4": Epoch(early.epoch, "", 0),
        }
        assert await store.read_positions("p:1:2", [2]) == {2: 2}
        for conversation in ("p:1:2", "p:1:3", "p:1:4"):
            key = layout.key(prefix, "epoch", conversation)
            assert not await store._command("EXISTS", key)
        # Running it again changes nothing.
        before = await _snapshot(store, prefix)
        assert await store.move_epoch_records() == 0
        assert await _snapshot(store, prefix) == before
        # The same run's epoch goes on; another run's is followed by a new one.
        [same, new] = await store.append(
            [NewMessage("p:1:2", 1, "user1", "a"), NewMessage("p:1:3", 1, "user1", "b")]
        )
        assert (same.seq, same.epoch) == (4, "e2")
        assert new.seq == 2 and new.epoch not in ("", "x")
        assert (await store.epochs(["p:1:3"]))["p:1:3"] == Epoch(new.epoch, "x", 1)
    finally:
        await _delete_prefix(store, prefix)
        await store.close()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_migrate_command(redis_url: str) -> None:
    import io

    from twisted.internet import reactor

    from cim.store.redis.migrate import migrate

    out = io.StringIO()
    assert await migrate(reactor, redis_url, out) == 0
    assert "private inboxes" in out.getvalue()


# Epochs of a Redis that lost its data or restarted


@pytest.fixture
def private_redis(reactor: Any, tmp_path: Path) -> Iterator[RedisServer]:
    """
    A private C{redis-server} (append only, fsynced at every write) on a
    port of its own, not started; stopped at the end.
    """
    processes = Processes(tmp_path, reactor)
    try:
        yield RedisServer(tmp_path / "redis", processes)
    finally:
        processes.stop_all()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_epochs_of_a_flushed_and_a_restarted_redis(
    reactor: Any, private_redis: RedisServer
) -> None:
    from cim.interfaces import Epoch
    from cim.store.redis import connect_redis

    await private_redis.start(reactor)
    store = await connect_redis(private_redis.url(), clock=reactor)
    try:
        first = await store.append(
            [NewMessage("p:1:2", 1, "a", str(i)) for i in range(3)]
        )
        e1 = first[0].epoch
        assert (await store.epochs(["p:1:2"]))["p:1:2"] == Epoch(e1, "", 0)
        await store.set_read(2, "p:1:2", 2)
        # Everything lost: the next append starts an epoch after nothing.
        await store._command("FLUSHALL")
        assert (await store.epochs(["p:1:2"]))["p:1:2"] == Epoch()
        [lost] = await store.append([NewMessage("p:1:2", 1, "a", "again")])
        e2 = lost.epoch
        assert lost.seq == 1 and e2 not in ("", e1)
        assert (await store.epochs(["p:1:2"]))["p:1:2"] == Epoch(e2, "", 0)
        await store.append([NewMessage("p:1:2", 1, "a", "more")])
        await store.set_read(2, "p:1:2", 1)
    finally:
        await store.close()

    # A restart (here with nothing lost): Redis has another run_id, and the
    # next append starts an epoch following the last, after its last seq.
    await private_redis.stop(reactor)
    await private_redis.start(reactor)
    store = await connect_redis(private_redis.url(), clock=reactor)
    try:
        assert (await store.epochs(["p:1:2"]))["p:1:2"] == Epoch(e2, "", 0)
        assert [m.epoch for m in await store.read("p:1:2", 0, 10)] == [e2, e2]
        [after] = await store.append([NewMessage("p:1:2", 3, "c", "after")])
        assert after.seq == 3 and after.epoch not in ("", e1, e2)
        assert (await store.epochs(["p:1:2"]))["p:1:2"] == Epoch(after.epoch, e2, 2)
        [state] = await store.conversations(1)
        assert state.current_epoch == Epoch(after.epoch, e2, 2)
        # Positions of the previous epoch are trusted up to its base.
        assert await store.read_positions("p:1:2", [1, 2, 3]) == {1: 2, 2: 1, 3: 3}
        [next_one] = await store.append([NewMessage("p:1:2", 3, "c", "next")])
        assert next_one.epoch == after.epoch
    finally:
        await store.close()


def test_parse_run_id() -> None:
    from cim.store.redis.connection import parse_run_id

    info = "# Server\r\nredis_version:7.0.15\r\nrun_id:0a1b2c3d\r\ntcp_port:1\r\n"
    assert parse_run_id(info) == "0a1b2c3d"
    assert parse_run_id("# Server\r\nredis_version:7.0.15\r\n") == ""
    assert parse_run_id("") == ""


def test_a_connection_that_keeps_no_run_id_sends_none() -> None:
    """
    A connection not of L{cim.store.redis.connection.open_pool} (it keeps
    no run_id) is sent C{""}, so that the append script asks Redis itself.
    """
    from twisted.internet import defer

    from cim.store.redis.connection import execute_with_run_id, knows_run_ids

    sent: list[tuple[Any, ...]] = []

    class Plain:
        def execute_command(self, *args: Any) -> defer.Deferred[str]:
            sent.append(args)
            return defer.succeed("done")

    assert not knows_run_ids(Plain())
    d = execute_with_run_id(Plain(), lambda run: ("EVALSHA", "x", 0, run))
    assert d.result == "done"
    assert sent == [("EVALSHA", "x", 0, "")]


async def _until_up(reactor: Any, store: Any) -> None:
    """
    Wait until C{store}'s pool connected again (after its Redis restarted).
    """
    from cim.interfaces import StoreError
    from tests.kit.wait import wait_until

    async def answers() -> bool:
        await store.ping()
        return True

    await wait_until(reactor, answers, "the pool to reconnect", errors=(StoreError,))


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_appends_do_not_ask_redis_its_run_id(redis_url: str) -> None:
    """
    Each connection asks Redis its run_id once (an INFO), not every append.
    (This Redis is the test run's own: nothing else asks it INFO.)
    """
    from twisted.internet import reactor

    from cim.store.redis import connect_redis

    store = await connect_redis(redis_url, clock=reactor, prefix="runid:", poolsize=2)
    try:
        for i in range(4):
            await store.append([NewMessage(f"p:1:{i + 2}", 1, "a", "warm")])
        await store._command("CONFIG", "RESETSTAT")
        for i in range(20):
            await store.append([NewMessage(f"p:1:{i + 2}", 1, "a", str(i))])
        stats = await store._command("INFO", "commandstats")
        found = re.search(r"cmdstat_info:calls=(\d+),", stats)
        # At most once per connection (one that first appends here asks).
        assert found is None or int(found.group(1)) <= 2
        assert "cmdstat_evalsha:calls=20," in stats
    finally:
        await store.close()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_one_pool_sees_restarts_and_a_restored_file(
    reactor: Any, private_redis: RedisServer
) -> None:
    """
    A store whose pool outlives Redis restarts (it reconnects, and each new
    connection asks the new run_id) starts a new epoch at each: after a
    plain restart, following the last epoch; after a restore of an older
    append-only file, following the epoch that file holds, at its last seq,
    so positions of the epoch the restore lost are not trusted.
    """
    import shutil

    from cim.interfaces import Epoch
    from cim.store.redis import connect_redis

    await private_redis.start(reactor)
    store = await connect_redis(private_redis.url(), clock=reactor, poolsize=2)
    aof = private_redis.directory / "appendonlydir"
    backup = private_redis.directory.parent / "backup"
    try:
        first = await store.append(
            [NewMessage("p:1:2", 1, "a", str(i)) for i in range(3)]
        )
        e1 = first[0].epoch
        await private_redis.stop(reactor)
        shutil.copytree(aof, backup)

        await private_redis.start(reactor)
        await _until_up(reactor, store)
        later = []
        for text in ("d", "e"):
            later += await store.append([NewMessage("p:1:2", 2, "b", text)])
        e2 = later[0].epoch
        assert [m.seq for m in later] == [4, 5]
        assert e2 not in ("", e1) and later[1].epoch == e2
        assert (await store.epochs(["p:1:2"]))["p:1:2"] == Epoch(e2, e1, 3)

        # Back to the file from before the restart: seqs 4 and 5 are lost.
        await private_redis.stop(reactor)
        shutil.rmtree(aof)
        shutil.copytree(backup, aof)
        await private_redis.start(reactor)
        await _until_up(reactor, store)
        assert (await store.epochs(["p:1:2"]))["p:1:2"] == Epoch(e1, "", 0)
        [again] = await store.append([NewMessage("p:1:2", 2, "b", "again")])
        e3 = again.epoch
        assert again.seq == 4 and e3 not in ("", e1, e2)
        epoch = (await store.epochs(["p:1:2"]))["p:1:2"]
        assert epoch == Epoch(e3, e1, 3)
        # A device that saw seq 5 of the lost epoch is told to start over;
        # one at seq 3 of the epoch before keeps its place.
        assert epoch.resume(Position(e2, 5)) == (0, True)
        assert epoch.resume(Position(e1, 3)) == (3, False)
        [next_one] = await store.append([NewMessage("p:1:2", 1, "a", "next")])
        assert (next_one.seq, next_one.epoch) == (5, e3)
    finally:
        await store.close()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_a_stream_drops_what_a_restored_redis_lost(
    reactor: Any, private_redis: RedisServer
) -> None:
    """
    Simulator seed 2534 against Redis: a message that reaches a server live
    but that Redis, restored to an older copy, does not hold is not written
    after the gap before it (the client would count the gap as seen); a
    restore to a later copy brings the gap back, and it is written.
    """
    import shutil

    from twisted.internet.task import Clock

    from cim.interfaces import Epoch
    from cim.message import Command, Cursor
    from cim.metrics import Counter
    from cim.server.connection import Connection
    from cim.server.stream import Stream, Streams
    from cim.store.redis import connect_redis
    from tests.test_server_stream import Control, RecordingLink, frames

    conversation = "p:1:2"
    await private_redis.start(reactor)
    store = await connect_redis(private_redis.url(), clock=reactor, poolsize=2)
    aof = private_redis.directory / "appendonlydir"
    copies = private_redis.directory.parent

    def back_up(name: str) -> None:
        # Redis fsyncs every write before it answers, and nothing is
        # written meanwhile: the files are a consistent copy.
        shutil.copytree(aof, copies / name)

    async def restore(name: str) -> None:
        await private_redis.stop(reactor)
        shutil.rmtree(aof)
        shutil.copytree(copies / name, aof)
        await private_redis.start(reactor)
        await _until_up(reactor, store)

    async def append(*texts: str) -> list[Any]:
        return await store.append([NewMessage(conversation, 1, "a", t) for t in texts])

    try:
        await append("one", "two")
        back_up("earlier")
        three, four = await append("three", "four")
        back_up("later")
        [five] = await append("five")
        e1 = five.epoch
        assert three.epoch == four.epoch == e1

        await restore("earlier")
        streams = Streams(Clock(), store, Control(), Counter("written", ""))
        link = RecordingLink()
        conn = Connection(link, "10.0.0.1:5000", 0.0)
        conn.user_id = 2
        stream = conn.streams[conversation] = Stream(conversation, 2, epoch=Epoch(e1))
        # "five" arrived live behind a gap, which is read.
        stream.hold(five)
        stream.filling = True
        await streams.fill(conn, stream, Command.MESSAGE)
        assert link.texts() == []
        assert stream.delivered == 2 and not stream.pending and not stream.filling

        await restore("later")
        [six] = await append("six")
        assert six.seq == 5 and six.epoch != e1
        assert (await store.epochs([conversation]))[conversation] == Epoch(
            six.epoch, e1, 4
        )
        # "six" is of an epoch the stream does not follow: it reads it.
        stream.recheck = True
        stream.filling = True
        await streams.fill(conn, stream, Command.MESSAGE)
        told, *rest = frames(link)
        assert list(told.cursors) == [Cursor(conversation, 2, six.epoch, False)]
        assert [m.text for f in rest for m in f.messages] == ["three", "four", "six"]
        assert stream.delivered == 5
    finally:
        await store.close()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_renewals_after_a_restored_and_a_restarted_redis(
    reactor: Any, private_redis: RedisServer
) -> None:
    """
    Restored to an append-only file from before a device logged in again,
    Redis holds the device's older session: the renewal of the newer one
    keeps it (and ends the older).  A plain restart keeps the ending of a
    session a newer login dropped: its renewal still finds it lost.
    """
    import shutil

    from cim.interfaces import HeldSession, Renewal
    from cim.store.redis import connect_redis

    await private_redis.start(reactor)
    store = await connect_redis(private_redis.url(), clock=reactor, poolsize=2)
    aof = private_redis.directory / "appendonlydir"
    backup = private_redis.directory.parent / "backup"

    async def restart() -> None:
        await private_redis.stop(reactor)
        await private_redis.start(reactor)
        await _until_up(reactor, store)

    async def login(server: str) -> Any:
        session, _ = await store.claim_session(
            1, "u1", server, 600.0, replace=True, device="phone"
        )
        assert await store.activate_session(1, session.session_id, 600.0, "phone")
        return await store.get_session(1, "phone")

    def held(session: Any) -> list[HeldSession]:
        return [HeldSession(1, session.session_id, "u1", "phone", session.active)]

    try:
        older = await login("a:1:1")
        # Redis fsyncs every write before it answers: a consistent copy.
        shutil.copytree(aof, backup)
        newer = await login("b:1:2")

        await private_redis.stop(reactor)
        shutil.rmtree(aof)
        shutil.copytree(backup, aof)
        await private_redis.start(reactor)
        await _until_up(reactor, store)
        assert await store.get_session(1, "phone") == older
        renewal = await store.renew_sessions("b:1:2", held(newer), 600.0)
        assert renewal == Renewal([], [newer.session_id])
        assert await store.get_session(1, "phone") == newer
        renewal = await store.renew_sessions("a:1:1", held(older), 600.0)
        assert renewal == Renewal([older.session_id], [])

        # Nothing lost: the newer session stays, the one it drops is lost.
        latest = await login("a:1:1")
        await restart()
        renewal = await store.renew_sessions("b:1:2", held(newer), 600.0)
        assert renewal == Renewal([newer.session_id], [])
        assert await store.renew_sessions("a:1:1", held(latest), 600.0) == (
            Renewal([], [])
        )
        assert await store.get_session(1, "phone") == latest
    finally:
        await store.close()


#: Sessions held by server "s1" in L{held_store}: past Redis's small-hash
#: and small-set forms (up to 512 entries in Debian's configuration),
#: which HSCAN and SSCAN answer whole.
HELD = 600


@pytest_twisted.async_yield_fixture
async def held_store(redis_url: str) -> AsyncIterator[Any]:
    """
    A Redis store of its own prefix where users 1 to L{HELD} (named
    C{u<id>}) hold a connected session on server C{"s1"}; emptied after.
    """
    import uuid

    from twisted.internet import reactor

    from cim.store.redis import connect_redis

    prefix = f"cimtest:{uuid.uuid4().hex}:"
    store = await connect_redis(redis_url, clock=reactor, prefix=prefix)
    try:
        for uid in range(1, HELD + 1):
            session, _ = await store.claim_session(uid, f"u{uid}", "s1", 60.0)
            assert await store.activate_session(uid, session.session_id, 60.0)
        yield store
    finally:
        for name in await store._command("KEYS", prefix + "*"):
            await store._command("DEL", name)
        await store.close()


def counted_steps(
    store: Any,
    monkeypatch: pytest.MonkeyPatch,
    step: int,
    between: Callable[[list[Script]], Awaitable[None]] | None = None,
) -> list[Script]:
    """
    Scan in steps of C{step} entries; @return: the scripts C{store} runs
    from now on, in order (C{between} is awaited before each).
    """
    from cim.store.redis import store as redis_store

    monkeypatch.setattr(redis_store, "SCAN_STEP", step)
    steps: list[Script] = []
    run = store._run

    async def counting(script: Script, keys: Any, args: Any, **kw: Any) -> Any:
        steps.append(script)
        if between is not None:
            await between(steps)
        return await run(script, keys, args, **kw)

    monkeypatch.setattr(store, "_run", counting)
    return steps


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_online_users_are_scanned_a_step_at_a_time(
    held_store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The online users are read in steps of SCAN_STEP entries, one script
    call each (no call holds Redis for all of them); the entries of users
    whose sessions expired are dropped on the way.
    """
    store = held_store
    expired = [7, 300, 599]
    for uid in expired:
        await store._command("DEL", store._session_key(uid, ""))
    steps = counted_steps(store, monkeypatch, 2)
    online = await store.online_users()
    assert online == [(u, f"u{u}") for u in range(1, HELD + 1) if u not in expired]
    assert len(steps) > HELD // 10
    left = await store._command("HKEYS", store.prefix + "online")
    assert sorted(map(int, left)) == [u for u, _ in online]


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_a_servers_sessions_are_dropped_a_step_at_a_time(
    held_store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A departed server's sessions are dropped in steps of SCAN_STEP (no
    script call holds Redis for all of them).  A session the server makes
    once they were read (restarted at the same address) stays, and so
    does the server among those holding sessions; a session that moved to
    another server stays there.
    """
    store = held_store
    await store.claim_session(3, "u3", "s2", 60.0, replace=True)
    made = []

    async def back(steps: list[Script]) -> None:
        if steps[-1] is scripts.DROP_SESSIONS and steps.count(steps[-1]) == 5:
            # The server is back at the same address: a new device and a
            # device of a user being dropped log in there.
            for uid in (HELD + 1, 10):
                session, _ = await store.claim_session(
                    uid, "u", "s1", 60.0, replace=True
                )
                made.append(session)

    steps = counted_steps(store, monkeypatch, 5, back)
    dropped = await store.drop_server_sessions("s1")
    scans = (scripts.SERVER_SESSIONS, scripts.DROP_SESSIONS)
    assert len([script for script in steps if script in scans]) > HELD // 5
    kept = {3, HELD + 1, 10}
    assert set(dropped) >= set(range(1, HELD + 1)) - kept
    for session in made:
        assert await store.get_session(session.user_id) == session
    assert (await store.get_session(3)).server == "s2"
    for uid in range(1, HELD + 1):
        if uid not in kept:
            assert await store.get_session(uid) is None, uid
    assert "s1" in await store._command("SMEMBERS", store.prefix + "servers")
    assert sorted(
        await store._command("SMEMBERS", store.prefix + "server:s1")
    ) == sorted(f"{session.user_id}:" for session in made)
