"""
What a Redis command costs the store's client, in one process: the
connections of L{cim.store.redis.connection.open_pool} against
txredisapi's own way (a connection found through its pool's generator and
Deferreds, each reply through a queue's Deferred and callbacks).

    .venv/bin/python -m bench.redisclientmicro [--txredisapi] [--redis URL]

A pool of 4 connections runs 200 turns of 60 commands (50 GET of a short
value, 10 HGET of a missing key) at a time, five times; the figure is the
best time's microseconds of this process's CPU per command.  Redis's own
work is in its process, not counted.  Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from twisted.internet import defer, task

import cim.store.redis.connection as connection_module
from cim.store import parse_redis_url


def _txredisapis_own() -> None:
    """
    Keep only the faster command encoder (as before the direct path).
    """
    made = connection_module._protocol_with_fast_commands

    def encoder_only(base: type) -> type:
        cls = made(base)
        del cls.execute_command  # type: ignore[attr-defined]
        del cls.replyReceived  # type: ignore[attr-defined]
        return cls

    connection_module._protocol_with_fast_commands = encoder_only  # type: ignore[assignment]
    connection_module._call_connections_directly = lambda pool: None  # type: ignore[assignment]


async def _run(reactor: Any, url: str, label: str) -> None:
    address = parse_redis_url(url)
    pool = connection_module.open_pool(address, 4, 5.0)
    await pool._connected
    await pool.execute_command("SET", "cim:bench:client", "v")
    best = None
    for _ in range(5):
        start = time.process_time()
        for _ in range(200):
            calls = [pool.execute_command("GET", "cim:bench:client") for _ in range(50)]
            calls += [
                pool.execute_command("HGET", "cim:bench:none", "x") for _ in range(10)
            ]
            await defer.gatherResults(calls)
        spent = (time.process_time() - start) / (200 * 60) * 1e6
        best = spent if best is None else min(best, spent)
    await pool.execute_command("DEL", "cim:bench:client")
    await pool.disconnect()
    print(f"{label}: {best:.2f} us of CPU per command (best of 5)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--txredisapi", action="store_true", help="txredisapi's way")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    options = parser.parse_args()
    if options.txredisapi:
        _txredisapis_own()
    label = "txredisapi" if options.txredisapi else "direct"
    task.react(
        lambda reactor: defer.ensureDeferred(_run(reactor, options.redis, label))
    )


if __name__ == "__main__":
    main()
