"""
What one C{/p2pRoute} call costs the route, measured in a few seconds
without the whole cluster: a route process (L{cim.route.service.RouteService}
on a Redis store, pushing over the Redis bus, with a registry of its own)
serves keep-alive HTTP clients of this process, which also subscribes to
the channels of two pretend IM servers holding every user's session (so
every call stores its message, looks the sessions up and publishes, as in
the benchmark's C{http} scenario).

    .venv/bin/python -m bench.routemicro --redis redis://127.0.0.1:16379/5
        [--users 200] [--concurrency 32] [--seconds 5] [--rounds 3]

It prints the route process's CPU time per call (user and system, from
C{/proc}) in each round, and the best of them (a busy machine only ever
makes them worse).  C{--profile FILE} runs the route under cProfile for
the rounds and writes its statistics there.  The Redis database given is
emptied first.  Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from typing import Any, cast

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.protocol import ClientCreator

from cim.envelope import SUCCESS
from cim.interfaces import IReactor

#: The pretend IM servers' addresses (host:port:httpPort).
SERVERS = ["127.0.0.1:1001:2001", "127.0.0.1:1002:2002"]


def _serve(url: str, secret: str, profile: str | None) -> None:
    """
    The route process: serve until stdin closes; print the port.
    """
    from cim.gcpolicy import GC_YOUNG, tune_gc
    from cim.registry.local import LocalRegistry
    from cim.route.service import RouteConfig, RouteService
    from cim.store import open_store

    config = RouteConfig(port=0, bind="127.0.0.1", secret=secret)
    config.limits.per_address = 0
    service = RouteService(
        cast(IReactor, reactor),
        config,
        lambda: open_store(url, reactor),
        LocalRegistry(),
    )
    # The garbage collector's pace of the daemons (cim.daemon).
    tune_gc(GC_YOUNG)
    profiler: Any = None

    def started(_: object) -> None:
        print(service.port, flush=True)

    def command(line: bytes) -> None:
        nonlocal profiler
        if line.startswith(b"profile") and profile:
            import cProfile

            profiler = cProfile.Profile(time.thread_time)
            profiler.enable()
        elif line.startswith(b"stop"):
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(profile)
            reactor.stop()

    from twisted.internet import stdio
    from twisted.protocols.basic import LineReceiver

    class Control(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            command(line)

    stdio.StandardIO(Control())
    service.startService()
    service.ready.addCallback(started)
    reactor.run()


def _start_route(url: str, secret: str, profile: str | None) -> subprocess.Popen:
    """
    The route process (see L{_serve}), started.
    """
    return subprocess.Popen(
        [sys.executable, "-m", "bench.routemicro", "--serve", url, secret]
        + (["--profile", profile] if profile else []),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


class _Caller(protocol.Protocol):
    """
    One keep-alive HTTP client calling C{/p2pRoute} back to back.
    """

    def __init__(self, load: _Load, sender: int) -> None:
        self.load = load
        self.sender = sender
        self.buffer = b""

    def connectionMade(self) -> None:
        self.call()

    def call(self) -> None:
        load = self.load
        if not load.running:
            assert self.transport is not None
            self.transport.loseConnection()
            return
        peers = load.users
        target = peers[(self.sender + 1 + load.calls) % len(peers)]
        if target == self.sender:
            target = peers[0] if self.sender != peers[0] else peers[1]
        body = json.dumps(
            {"userId": self.sender, "receiveUserId": target, "msg": "x" * 100}
        ).encode()
        assert self.transport is not None
        self.transport.write(
            b"POST /p2pRoute HTTP/1.1\r\nHost: route\r\n"
            b"Content-Type: application/json\r\nX-Cim-Secret: %s\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (load.secret, len(body), body)
        )

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            headers = head.lower()
            if b"transfer-encoding: chunked" in headers:
                chunks, end, after = rest.partition(b"\r\n0\r\n\r\n")
                if not end:
                    return
                size, _, body = chunks.partition(b"\r\n")
                self.buffer = after
            else:
                length = int(headers.partition(b"content-length:")[2].split()[0])
                if len(rest) < length:
                    return
                body, self.buffer = rest[:length], rest[length:]
            code = json.loads(body)["code"]
            if code == SUCCESS:
                self.load.calls += 1
            else:
                self.load.errors += 1
                if self.load.errors < 5:
                    print("error:", body.decode(), file=sys.stderr)
            self.call()


class _Load:
    def __init__(self, users: list[int], secret: bytes) -> None:
        self.users = users
        self.secret = secret
        self.calls = 0
        self.errors = 0
        self.running = True


async def _redis_calls(store: Any) -> int:
    """
    How many commands the Redis has run (scripts and PUBLISH, not the
    commands that scripts run).
    """
    info = await store._redis.execute_command("INFO", "commandstats")
    total = 0
    for line in info.splitlines():
        name, _, stats = line.partition(":")
        if name in ("cmdstat_evalsha", "cmdstat_publish", "cmdstat_eval"):
            total += int(stats.split(",")[0].split("=")[1])
    return total


def _cpu(pid: int) -> tuple[float, float]:
    """
    The user and system CPU time of process C{pid}, in seconds.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


async def _main(options: argparse.Namespace) -> None:
    from cim.interfaces import IStore
    from cim.store import open_store, parse_redis_url
    from cim.store.redis.bus import RedisBus

    secret = secrets.token_hex(16)
    store: IStore = await open_store(options.redis, reactor)
    await store._redis.execute_command("FLUSHDB")  # type: ignore[attr-defined]
    users = []
    for i in range(options.users):
        account = await store.register(f"micro{i}")
        users.append(account.user_id)
        server = SERVERS[i % len(SERVERS)]
        session, _, _ = await store.open_session(
            account.user_id, account.user_name, server, 60.0, 3600.0
        )
        await store.activate_session(account.user_id, session.session_id, 3600.0)
    bus = RedisBus(reactor, parse_redis_url(options.redis), store.prefix)  # type: ignore[attr-defined]
    received = [0]
    for server in SERVERS:
        await bus.subscribe(
            server,
            lambda payload: received.__setitem__(0, received[0] + 1),
            lambda: None,
        )
    route = _start_route(options.redis, secret, options.profile)
    assert route.stdout is not None and route.stdin is not None
    port = int(route.stdout.readline())
    load = _Load(users, secret.encode())
    for sender in users[: options.concurrency]:
        caller = _Caller(load, sender)
        await ClientCreator(reactor, lambda c=caller: c).connectTCP("127.0.0.1", port)
    # Warm up (accounts cached, connections made).
    await task.deferLater(reactor, 1.0, lambda: None)
    if options.profile:
        route.stdin.write(b"profile\n")
        route.stdin.flush()
    figures = []
    redis_before, calls_before = await _redis_calls(store), load.calls
    for _ in range(options.rounds):
        calls, cpu, wall = load.calls, _cpu(route.pid), time.monotonic()
        await task.deferLater(reactor, options.seconds, lambda: None)
        n = load.calls - calls
        user, system = (b - a for a, b in zip(cpu, _cpu(route.pid), strict=True))
        used = user + system
        took = time.monotonic() - wall
        figures.append(used / max(n, 1) * 1e6)
        print(
            f"{n / took:7.0f} calls/s, route CPU {100 * used / took:3.0f}%, "
            f"{figures[-1]:6.0f} us per call ({100 * system / max(used, 1e-9):.0f}% "
            "in the kernel)",
            flush=True,
        )
    redis_calls = await _redis_calls(store) - redis_before
    load.running = False
    route.stdin.write(b"stop\n")
    route.stdin.flush()
    route.wait()
    print(
        f"best: {min(figures):.0f} us per call; "
        f"{redis_calls / max(1, load.calls - calls_before):.2f} Redis commands "
        f"per call; {load.errors} errors, {received[0]} publishes received"
    )
    await bus.close()
    await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:16379/5")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--serve", nargs=2, default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve:
        _serve(options.serve[0], options.serve[1], options.profile)
        return
    task.react(lambda _: defer.ensureDeferred(_main(options)))


if __name__ == "__main__":
    main()
