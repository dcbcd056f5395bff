"""
How the Redis store is put together: its Lua files, its one txredisapi
importer, and its URL parser.  (Its behaviour is checked by
C{tests/test_store.py}.)
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import pytest_twisted

import cim
from cim.store import RedisAddress, parse_redis_url
from cim.store.redis import scripts

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
        assert out.getvalue().startswith("indexed ")
    finally:
        await store._command(
            "EVAL",
            "for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end",
            0,
            prefix + "*",
        )
        await store.close()
