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
import tempfile
import time
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.protocol import ClientCreator

from cim.envelope import SUCCESS
from cim.interfaces import IReactor

#: The pretend IM servers' addresses (host:port:httpPort).
SERVERS = ["127.0.0.1:1001:2001", "127.0.0.1:1002:2002"]


def _serve(url: str, secret: str, profile: str | None, logfile: str, call: str) -> None:
    """
    The route process: serve until stdin closes; print the port.
    """
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.python.logfile import LogFile

    from cim.gcpolicy import GC_YOUNG, tune_gc
    from cim.interfaces import ServerAddress
    from cim.registry.local import LocalBoard, LocalRegistry
    from cim.route.service import RouteConfig, RouteService
    from cim.store import open_store

    # The log as twistd --logfile writes it.
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(LogFile.fromFullPath(logfile))],
        redirectStandardIO=False,
    )
    board = LocalBoard()
    if call == "login":
        # Logins go to these (with a WebSocket gateway each, as in the
        # benchmark, whose servers name one).
        for i, address in enumerate(SERVERS):
            LocalRegistry(board).register(
                ServerAddress.parse(f"{address}:ws={3001 + i}")
            )
    config = RouteConfig(port=0, bind="127.0.0.1", secret=secret)
    config.limits.per_address = 0
    service = RouteService(
        cast(IReactor, reactor),
        config,
        lambda: open_store(url, reactor),
        LocalRegistry(board),
        # The pretend servers accept every login.
        probe=lambda server: defer.succeed(True),
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


def _start_route(
    url: str,
    secret: str,
    profile: str | None,
    logfile: str,
    call: str,
    callgrind: str | None = None,
) -> subprocess.Popen:
    """
    The route process (see L{_serve}), started (under callgrind, with its
    instrumentation off, when C{callgrind} names a folder for its files).
    """
    wrap = []
    if callgrind:
        wrap = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={callgrind}/callgrind.out.%p",
        ]
    return subprocess.Popen(
        [*wrap, sys.executable, "-m", "bench.routemicro", "--serve", url, secret]
        + [logfile, "--call", call]
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
            self.answered(json.loads(body))

    def answered(self, reply: dict[str, Any]) -> None:
        if reply["code"] == SUCCESS:
            self.load.calls += 1
        else:
            self.load.failed(reply)
        self.call()


class _Newcomer(_Caller):
    """
    One keep-alive HTTP client registering new users (C{/registerAccount})
    or logging them in (C{/login}), as the load generator of the
    benchmark's C{login} scenario does, by the load's phase; idle (in the
    load's C{idle}) while there is nothing to do.
    """

    def call(self) -> None:
        load = self.load
        assert self.transport is not None
        if not load.running:
            self.transport.loseConnection()
            return
        if load.phase == "register":
            load.serial += 1
            body: dict[str, Any] = {"userName": f"{load.prefix}{load.serial}"}
            path, extra = b"/registerAccount", b""
        elif load.phase == "login" and load.registered:
            user_id, name = load.registered.pop()
            body = {"userId": user_id, "userName": name, "device": "bench-d0"}
            path, extra = b"/login", b"X-Cim-Secret: %s\r\n" % load.secret
        else:
            load.idle.append(self)
            return
        payload = json.dumps(body, separators=(",", ":")).encode()
        self.transport.write(
            b"POST %s HTTP/1.1\r\nHost: route\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\nX-Cim-Extended: 1\r\n%s\r\n%s"
            % (path, len(payload), extra, payload)
        )

    def answered(self, reply: dict[str, Any]) -> None:
        load = self.load
        if reply["code"] != SUCCESS:
            load.failed(reply)
        elif "ip" in reply["dataBody"]:
            load.logins += 1
        else:
            data = reply["dataBody"]
            load.registered.append((data["userId"], data["userName"]))
            load.registrations += 1
        self.call()


class _Load:
    def __init__(self, users: list[int], secret: bytes) -> None:
        self.users = users
        self.secret = secret
        self.calls = 0
        self.errors = 0
        self.running = True
        # The login calls: what the newcomers do now ("register", "login",
        # or None: nothing), the names they register, the users registered
        # and not yet logged in, and the newcomers waiting for work.
        self.phase: str | None = None
        self.prefix = f"new{secrets.token_hex(3)}-"
        self.serial = 0
        self.registered: list[tuple[int, str]] = []
        self.registrations = 0
        self.logins = 0
        self.idle: list[_Newcomer] = []

    def failed(self, reply: dict[str, Any]) -> None:
        self.errors += 1
        if self.errors < 5:
            print("error:", reply, file=sys.stderr)

    def start(self, phase: str | None) -> None:
        """
        Set the newcomers to C{phase}, waking the idle ones.
        """
        self.phase = phase
        idle, self.idle = self.idle, []
        for newcomer in idle:
            newcomer.call()


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
    from cim.store import parse_redis_url
    from cim.store.redis import connect_redis
    from cim.store.redis.bus import RedisBus

    secret = secrets.token_hex(16)
    # (Whatever the database held, of this release or another: emptied.)
    store = await connect_redis(options.redis, reactor, check_layout=False)
    await store._redis.execute_command("FLUSHDB")
    users = []
    bus = None
    received = [0]
    if options.call == "p2p":
        for i in range(options.users):
            account = await store.register(f"micro{i}")
            users.append(account.user_id)
            server = SERVERS[i % len(SERVERS)]
            session, _, _ = await store.open_session(
                account.user_id, account.user_name, server, 60.0, 3600.0
            )
            await store.activate_session(account.user_id, session.session_id, 3600.0)
        bus = RedisBus(reactor, parse_redis_url(options.redis), store.prefix)  # type: ignore[attr-defined]
        for server in SERVERS:
            await bus.subscribe(
                server,
                lambda payload: received.__setitem__(0, received[0] + 1),
                lambda: None,
            )
    with tempfile.TemporaryDirectory() as logs:
        route = _start_route(
            options.redis,
            secret,
            options.profile,
            os.path.join(logs, "route.log"),
            options.call,
            options.callgrind,
        )
        assert route.stdout is not None and route.stdin is not None
        port = int(route.stdout.readline())
        load = _Load(users, secret.encode())
        for sender in users[: options.concurrency] or range(options.concurrency):
            caller = (_Caller if options.call == "p2p" else _Newcomer)(load, sender)
            await ClientCreator(reactor, lambda c=caller: c).connectTCP(
                "127.0.0.1", port
            )
        if options.call == "p2p":
            # Warm up (accounts cached, connections made).
            await task.deferLater(reactor, 1.0, lambda: None)
        if options.profile:
            route.stdin.write(b"profile\n")
            route.stdin.flush()
        redis_before, calls_before = await _redis_calls(store), load.calls
        figures: list[float] = []
        pairs: list[tuple[float, float]] = []
        if options.call == "p2p":
            figures = await _p2p_rounds(options, route.pid, load)
            calls = load.calls - calls_before
        else:
            pairs = await _login_rounds(options, route.pid, load)
            calls = load.logins
        redis_calls = await _redis_calls(store) - redis_before
        load.running = False
        load.start(None)
        route.stdin.write(b"stop\n")
        route.stdin.flush()
        route.wait()
    if options.call == "p2p":
        print(
            f"best: {min(figures):.0f} us per call; "
            f"{redis_calls / max(1, calls):.2f} Redis commands "
            f"per call; {load.errors} errors, {received[0]} publishes received"
        )
    else:
        register = min(f[0] for f in pairs)
        login = min(f[1] for f in pairs)
        unit = " instructions" if options.callgrind else " us"
        print(
            f"best: {register:.0f}{unit} per registration, {login:.0f}{unit} per "
            f"login, {register + login:.0f}{unit} per new user; "
            f"{redis_calls / max(1, calls):.2f} Redis commands per new user; "
            f"{load.errors} errors"
        )
    if bus is not None:
        await bus.close()
    await store.close()


def _report(what: str, n: int, took: float, cpu: tuple[float, float]) -> float:
    """
    Print a round's figures; @return: its CPU per call, in microseconds.
    """
    user, system = cpu
    used = user + system
    figure = used / max(n, 1) * 1e6
    print(
        f"{n / took:7.0f} {what}/s, route CPU {100 * used / took:3.0f}%, "
        f"{figure:6.0f} us per call ({100 * system / max(used, 1e-9):.0f}% "
        "in the kernel)",
        flush=True,
    )
    return figure


class _Instructions:
    """
    The instructions the route runs in a stretch, counted by callgrind
    (C{--callgrind}): steadier than CPU time on a busy machine.
    """

    def __init__(self, folder: str, pid: int) -> None:
        self.folder = folder
        self.pid = str(pid)

    def start(self) -> None:
        subprocess.run(["callgrind_control", "-z", self.pid], capture_output=True)
        subprocess.run(["callgrind_control", "-i", "on", self.pid], capture_output=True)

    def stop(self) -> int:
        """
        @return: the instructions since L{start}.
        """
        before = set(os.listdir(self.folder))
        subprocess.run(["callgrind_control", "-d", self.pid], capture_output=True)
        subprocess.run(
            ["callgrind_control", "-i", "off", self.pid], capture_output=True
        )
        (dump,) = set(os.listdir(self.folder)) - before
        with open(os.path.join(self.folder, dump)) as f:
            for line in f:
                if line.startswith(("totals:", "summary:")):
                    return int(line.split()[1])
        raise RuntimeError(f"no totals in {dump}")


def _used(before: tuple[float, float], pid: int) -> tuple[float, float]:
    after = _cpu(pid)
    return after[0] - before[0], after[1] - before[1]


async def _p2p_rounds(
    options: argparse.Namespace, pid: int, load: _Load
) -> list[float]:
    """
    C{--rounds} rounds of C{/p2pRoute} calls; @return: each one's CPU per
    call.
    """
    figures = []
    for _ in range(options.rounds):
        calls, cpu, wall = load.calls, _cpu(pid), time.monotonic()
        await task.deferLater(reactor, options.seconds, lambda: None)
        took = time.monotonic() - wall
        figures.append(_report("calls", load.calls - calls, took, _used(cpu, pid)))
    return figures


async def _login_rounds(
    options: argparse.Namespace, pid: int, load: _Load
) -> list[tuple[float, float]]:
    """
    C{--rounds} rounds of registrations for C{--seconds}, then logins of
    the users registered; each phase is measured from idle to idle.
    @return: each round's CPU per registration and per login.
    """
    figures = []

    async def drained() -> None:
        while len(load.idle) < options.concurrency:
            await task.deferLater(reactor, 0.01, lambda: None)

    counter = _Instructions(options.callgrind, pid) if options.callgrind else None

    def counted(what: str, n: int) -> float:
        assert counter is not None
        per = counter.stop() / max(n, 1)
        print(f"{n} {what}, {per:,.0f} instructions each", flush=True)
        return per

    async def measured(what: str, count: Callable[[], int], phase: str) -> float:
        # One phase, from idle to idle: registrations for --seconds, or
        # the logins of the users registered.
        done, cpu, wall = count(), _cpu(pid), time.monotonic()
        if counter:
            counter.start()
        load.start(phase)
        if phase == "register":
            await task.deferLater(reactor, options.seconds, lambda: None)
            load.start(None)
        await drained()
        took = time.monotonic() - wall
        n = count() - done
        if counter:
            return counted(what, n)
        return _report(what, n, took, _used(cpu, pid))

    for _ in range(options.rounds):
        await drained()
        register = await measured(
            "registrations", lambda: load.registrations, "register"
        )
        login = await measured("logins", lambda: load.logins, "login")
        figures.append((register, login))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:16379/5")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", default=None)
    parser.add_argument(
        "--call",
        choices=["p2p", "login"],
        default="p2p",
        help="what to call: /p2pRoute, or /registerAccount then /login",
    )
    parser.add_argument(
        "--callgrind",
        metavar="FOLDER",
        default=None,
        help="(--call login) run the route under valgrind's callgrind, its "
        "files in FOLDER, and count instructions per call instead of CPU time",
    )
    parser.add_argument("--serve", nargs=3, default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve:
        url, secret, logfile = options.serve
        _serve(url, secret, options.profile, logfile, options.call)
        return
    task.react(lambda _: defer.ensureDeferred(_main(options)))


if __name__ == "__main__":
    main()
