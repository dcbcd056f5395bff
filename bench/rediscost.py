"""
What Redis does per private message, in its own CPU: drive the store's
p2p mix (1-message private sends appended in batches, as
L{cim.delivery.Delivery} batches them; a session lookup of both users per
message, or with C{--session-cache} of those whose sessions a
L{cim.sessioncache.SessionCache} does not hold at the generations the
append read, as the IM server does; the sweep's cursor saves) against a
Redis, then read its C{INFO commandstats} and report calls and
microseconds per message.

    .venv/bin/python -m bench.rediscost redis://127.0.0.1:16418/9 [--messages N]

It flushes the database it is given (use a spare one).  Not a timed test:
Redis's C{usec} counts only its own work, so other load on the machine
barely moves it.

With C{--callgrind PID} (a Redis run under valgrind's callgrind, as
C{bench/README.md} shows), it counts instructions instead, which a busy
machine does not move: each phase is run for every batch in turn (all
appends, then the session lookups, then the cursor saves), and
C{callgrind_control -d PID} dumps the instructions of each; it prints
instructions and commands per message of each phase.
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import subprocess
import sys
from typing import Any

from twisted.internet import defer, task

from cim.interfaces import NewMessage
from cim.message import Position, pair_conversation
from cim.sessioncache import SessionCache
from cim.store.redis.store import RedisStore, connect_redis


def _stats(info: str) -> dict[str, tuple[int, int]]:
    """
    C{{command: (calls, usec)}} from the text of C{INFO commandstats}.
    """
    found = {}
    for line in info.splitlines():
        if not line.startswith("cmdstat_"):
            continue
        name, _, rest = line[len("cmdstat_") :].partition(":")
        fields = dict(part.split("=") for part in rest.split(","))
        found[name] = (int(fields["calls"]), int(fields["usec"]))
    return found


async def _setup(store: RedisStore, users: int) -> None:
    for uid in range(1, users + 1):
        session, _ = await store.claim_session(uid, f"u{uid}", "s1", 60.0)
        await store.activate_session(uid, session.session_id)


def _batches(messages: int, users: int, batch: int) -> list[list[NewMessage]]:
    """
    C{messages} private messages between random pairs of C{users}, in
    batches of C{batch} (the same every time: a fixed seed).
    """
    rng = random.Random(17)
    sends = []
    for cmid in range(1, messages + 1):
        a, b = rng.sample(range(1, users + 1), 2)
        sends.append(
            NewMessage(pair_conversation(a, b), a, f"u{a}", "hello " * 5, str(cmid))
        )
    return [sends[start : start + batch] for start in range(0, messages, batch)]


async def run(
    reactor: Any,
    url: str,
    messages: int,
    users: int,
    batch: int,
    by_phase: bool,
    session_cache: int = 0,
) -> None:
    # (Whatever the database held, of this release or another: emptied.)
    store = await connect_redis(url, reactor, check_layout=False)
    redis = store._redis  # noqa: SLF001 (a measuring tool)
    await redis.execute_command("FLUSHDB")
    await _setup(store, users)
    # Warm up (scripts loaded), then measure from zeroed stats.
    await store.append([NewMessage(pair_conversation(1, 2), 1, "u1", "hi", "w")])
    await redis.execute_command("CONFIG", "RESETSTAT")
    await redis.execute_command("SLOWLOG", "RESET")
    phases = {"append": 0, "get_sessions": 0, "set_many_cursors": 0}
    cache = SessionCache(session_cache) if session_cache else None
    phase_cpu = dict.fromkeys(phases, 0.0)

    async def script_usec() -> int:
        info = _stats(await redis.execute_command("INFO", "commandstats"))
        return sum(info.get(name, (0, 0))[1] for name in ("evalsha", "eval"))

    async def cpu() -> float:
        info = await redis.execute_command("INFO", "cpu")
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        return float(fields["used_cpu_sys_main_thread"]) + float(
            fields["used_cpu_user_main_thread"]
        )

    async def timed(phase: str, call: Any, *args: Any) -> Any:
        if not by_phase:
            return await call(*args)
        before = await script_usec()
        cpu_before = await cpu()
        result = await call(*args)
        phase_cpu[phase] += await cpu() - cpu_before
        phases[phase] += await script_usec() - before
        return result

    cpu_before = await cpu()
    for sends in _batches(messages, users, batch):
        stored = await timed("append", store.append, sends)
        # Both users of each message: the recipient, and the sender's echo.
        wanted = sorted({int(x) for m in sends for x in m.conversation[2:].split(":")})
        if cache is not None:
            wanted = cache.find(wanted, stored.generations)[1]
        if wanted:
            found = await timed("get_sessions", store.get_sessions, wanted)
            if cache is not None:
                cache.remember(found, found.generations)
        # Each recipient's and each sender's echo device acknowledges.
        cursors: dict[tuple[int, str], dict[str, Position]] = {}
        for m in stored:
            for uid in (int(x) for x in m.conversation[2:].split(":")):
                cursors.setdefault((uid, ""), {})[m.conversation] = Position(
                    m.epoch, m.seq
                )
        await timed("set_many_cursors", store.set_many_cursors, cursors)
    cpu_used = await cpu() - cpu_before
    stats = _stats(await redis.execute_command("INFO", "commandstats"))
    slow = await redis.execute_command("SLOWLOG", "GET", 5)
    await store.close()
    total = inner = 0
    print(f"{messages} messages, batches of {batch}, {users} users")
    print(f"{'command':<14}{'calls/msg':>10}{'usec/call':>10}{'usec/msg':>10}")
    for name, (calls, usec) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
        if name in ("config", "slowlog", "info"):
            continue
        if name in ("evalsha", "eval"):
            total += usec
        else:
            inner += calls
        print(
            f"{name:<14}{calls / messages:>10.2f}{usec / max(calls, 1):>10.2f}"
            f"{usec / messages:>10.2f}"
        )
    print(
        f"per message: {total / messages:.2f} usec in scripts (their commands"
        f" included), {inner / messages:.2f} commands"
    )
    print(
        f"Redis main thread CPU (user+sys) per message: {cpu_used * 1e6 / messages:.2f} usec"
    )
    for phase, usec in phases.items() if by_phase else ():
        print(
            f"  {phase:<18}{usec / messages:>8.2f} usec per message in scripts,"
            f" {phase_cpu[phase] * 1e6 / messages:>8.2f} of CPU"
        )
    if cache is not None:
        print(f"session cache: {cache.hits} users found, {cache.misses} looked up")
    print("slowlog:", slow)


def _dump(pid: int) -> int:
    """
    Dump callgrind's counts of Redis C{pid} (those since its last dump),
    and answer the instructions of that dump.
    """
    pattern = f"callgrind.out.{pid}*"
    before = set(_dumps(pattern))
    subprocess.run(
        ["callgrind_control", "-d", str(pid)], check=True, capture_output=True
    )
    new = sorted(set(_dumps(pattern)) - before, key=os.path.getmtime)
    if not new:
        raise SystemExit(f"callgrind_control wrote no dump for {pid}")
    with open(new[-1]) as dump:
        for line in dump:
            if line.startswith(("totals:", "summary:")):
                return int(line.split()[1])
    raise SystemExit(f"no totals in {new[-1]}")


def _dumps(pattern: str) -> list[str]:
    """
    The callgrind dumps of C{pattern} in the working directory of the
    Redis process (as C{callgrind_control} writes them) and here.
    """
    out = os.environ.get("CIM_CALLGRIND_DIR", ".")
    return glob.glob(os.path.join(out, pattern))


async def run_callgrind(
    reactor: Any,
    url: str,
    pid: int,
    messages: int,
    users: int,
    batch: int,
    session_cache: int = 0,
    sweep: int = 1,
) -> None:
    """
    L{run}'s mix, counted in instructions of Redis C{pid} under callgrind,
    one phase at a time over all batches; the cursors of C{sweep} batches
    are saved together (as a server's sweep saves those acknowledged since
    the last one).
    """
    store = await connect_redis(url, reactor, timeout=600.0, check_layout=False)
    redis = store._redis  # noqa: SLF001 (a measuring tool)
    await redis.execute_command("FLUSHDB")
    await _setup(store, users)
    await store.append([NewMessage(pair_conversation(1, 2), 1, "u1", "hi", "w")])
    batches = _batches(messages, users, batch)
    cache = SessionCache(session_cache) if session_cache else None

    async def commands() -> dict[str, int]:
        info = _stats(await redis.execute_command("INFO", "commandstats"))
        return {name: calls for name, (calls, _) in info.items()}

    async def phase(name: str, calls: Any) -> None:
        await redis.execute_command("CONFIG", "RESETSTAT")
        _dump(pid)
        for call in calls:
            await call()
        instructions = _dump(pid)
        counted = await commands()
        scripts = counted.pop("evalsha", 0) + counted.pop("eval", 0)
        for skip in ("config", "info"):
            counted.pop(skip, None)
        inner = sum(counted.values())
        detail = ", ".join(
            f"{name} {n / messages:.2f}"
            for name, n in sorted(counted.items(), key=lambda kv: -kv[1])
        )
        print(
            f"{name:<18}{instructions / messages:>10,.0f} instructions per message,"
            f" {scripts / messages:.2f} scripts, {inner / messages:.2f} commands"
            f" ({detail})"
        )

    stored_batches: list[Any] = []

    def appending(sends: list[NewMessage]) -> Any:
        async def call() -> None:
            stored_batches.append(await store.append(sends))

        return call

    print(f"{messages} messages, batches of {batch}, {users} users (callgrind)")
    await phase("append", [appending(sends) for sends in batches])

    def looking_up(sends: list[NewMessage], stored: Any) -> Any:
        async def call() -> None:
            wanted = sorted(
                {int(x) for m in sends for x in m.conversation[2:].split(":")}
            )
            if cache is not None:
                wanted = cache.find(wanted, stored.generations)[1]
            if wanted:
                found: Any = await store.get_sessions(wanted)
                if cache is not None:
                    cache.remember(found, found.generations)

        return call

    await phase(
        "get_sessions",
        [looking_up(s, st) for s, st in zip(batches, stored_batches, strict=True)],
    )

    def saving(swept: list[Any]) -> Any:
        async def call() -> None:
            # (Later messages of a conversation raise its cursors.)
            cursors: dict[tuple[int, str], dict[str, Position]] = {}
            for stored in swept:
                for m in stored:
                    for uid in (int(x) for x in m.conversation[2:].split(":")):
                        cursors.setdefault((uid, ""), {})[m.conversation] = Position(
                            m.epoch, m.seq
                        )
            await store.set_many_cursors(cursors)

        return call

    await phase(
        "set_many_cursors",
        [
            saving(stored_batches[start : start + sweep])
            for start in range(0, len(stored_batches), sweep)
        ],
    )
    await store.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--phases",
        action="store_true",
        help="also the script usec of each call (an INFO around each: slower)",
    )
    parser.add_argument(
        "--session-cache",
        type=int,
        default=0,
        help="look up only the users a session cache of this size misses",
    )
    parser.add_argument(
        "--callgrind",
        type=int,
        metavar="PID",
        help="count instructions of this Redis under callgrind (see above)",
    )
    parser.add_argument(
        "--sweep",
        type=int,
        default=1,
        help="with --callgrind: save the cursors of this many batches at once",
    )
    options = parser.parse_args(argv)
    if options.callgrind:
        task.react(
            lambda reactor: defer.ensureDeferred(
                run_callgrind(
                    reactor,
                    options.url,
                    options.callgrind,
                    options.messages,
                    options.users,
                    options.batch,
                    options.session_cache,
                    options.sweep,
                )
            )
        )
        return
    task.react(
        lambda reactor: defer.ensureDeferred(
            run(
                reactor,
                options.url,
                options.messages,
                options.users,
                options.batch,
                options.phases,
                options.session_cache,
            )
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
