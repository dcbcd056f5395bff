"""
C{make bench}: run every scenario against a real cluster and print one
table.

    python -m bench.harness [--quick] [--only SCENARIO ...] [--workers N]
                            [--duration SECONDS] [--profile]

It starts Redis and ZooKeeper of its own (C{scripts/services.sh} with
C{CIM_SERVICES_DIR=.run/bench/services}, ports 16479 and 12281 unless
C{CIM_BENCH_REDIS_PORT} / C{CIM_BENCH_ZK_PORT} say otherwise), and for each
scenario a fresh cluster (one route, two IM servers with their WebSocket
gateways, as C{twistd} processes; an empty Redis database, a new
ZooKeeper root) and load
generator processes (L{bench.loadgen}).  Every process it started is
stopped at the end, also on failure or Ctrl-C.  One harness runs at a time
on a machine (C{.run/bench/lock}; another one waits).  Logs go to
C{.run/bench/<timestamp>/}; the results to C{bench/results/<timestamp>.json}
and C{bench/results/latest.json}.

The exit status is 1 when a scenario could not run (the harness broke) or
messages were lost, duplicated or damaged; missed throughput targets only
show as MISS.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from bench.loadgen import (
    Histogram,
    check_streams,
    deliveries_per_message,
    merge_reports,
    raise_fd_limit,
)
from cim.limits_net import default_max_connections
from tests.kit.cluster import ROOT, TWISTD, Cluster, LogWatch, Processes
from tests.kit.http import post_json
from tests.kit.services import redis_ping, ruok
from tests.kit.wait import wait_blocking

PYTHON = sys.executable
#: What the raw server says once it listens (it is given port 0).
RAW_LISTENING = re.compile(r"raw server listening on \S+:(\d+)")
RESULTS = ROOT / "bench" / "results"

SCENARIOS = (
    "raw",
    "p2p",
    "ws",
    "p2p-latency",
    "group",
    "devices",
    "http",
    "login",
    "connections",
)
#: Source addresses of the connections scenario: each gives the load
#: generators the system's range of ephemeral ports (about 28,000 on Linux).
SOURCES = [f"127.0.0.{i}" for i in range(2, 10)]
#: File descriptors a load generator keeps for everything but its client
#: connections (the route's HTTP pool, its standard streams, the reactor).
LOADGEN_RESERVED_FILES = 1_000
#: Connections an IM server takes beyond the connections scenario's
#: clients: the route's calls to its push API.
SERVER_SPARE_CONNECTIONS = 100
#: Connections of the connections scenario that log in before the server's
#: memory is measured (per load generator), as for the ws scenario's idle
#: part.
CONNECTIONS_WARM_UP = 8

#: Per scenario: full run, quick run.
PARAMS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "raw": (
        {"clients": 1000, "duration": 20, "window": 4},
        {"clients": 50, "duration": 2, "window": 4},
    ),
    "p2p": (
        {"clients": 1000, "duration": 20, "window": 4},
        {"clients": 50, "duration": 2, "window": 4},
    ),
    "ws": (
        {
            "clients": 1000,
            "duration": 20,
            "window": 4,
            "idle": 5000,
            "hold": 10,
            "ping_interval": 10,
            "concurrency": 64,
        },
        {
            "clients": 50,
            "duration": 2,
            "window": 4,
            "idle": 300,
            "hold": 2,
            "ping_interval": 1,
            "concurrency": 32,
        },
    ),
    "p2p-latency": (
        {"clients": 1000, "duration": 20, "rate": 5000},
        {"clients": 50, "duration": 2, "rate": 1000},
    ),
    "group": (
        {"members": 1000, "senders": 20, "window": 2, "duration": 20},
        {"members": 50, "senders": 4, "window": 2, "duration": 2},
    ),
    "devices": (
        {"users": 500, "devices": 2, "friends": 4, "window": 2, "duration": 20},
        {"users": 25, "devices": 2, "friends": 4, "window": 2, "duration": 2},
    ),
    "http": (
        {"users": 200, "concurrency": 32, "duration": 20},
        {"users": 50, "concurrency": 8, "duration": 2},
    ),
    "login": (
        {"users": 12000, "concurrency": 64, "duration": 20},
        {"users": 300, "concurrency": 16, "duration": 2},
    ),
    "connections": (
        {"connections": 19000, "hold": 60, "ping_interval": 10, "concurrency": 64},
        {"connections": 500, "hold": 3, "ping_interval": 1, "concurrency": 32},
    ),
}

SIZE = 100
#: The WebSocket subprotocols of the ws scenario: its users take them in
#: turn (half on each).
WS_SUBPROTOCOLS = ["cim.v1.proto", "cim.v1.json"]
#: Connections of the ws scenario's idle phase that log in before the
#: server's memory is measured (per load generator): the first WebSocket
#: connections import and build what all later ones share.
WS_WARM_UP = 8


class HarnessError(Exception):
    """
    The benchmark could not run a scenario.
    """


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# Processes (L{tests.kit.cluster}: the daemons, a group of processes)


class Services:
    """
    The bench's own Redis and ZooKeeper (C{scripts/services.sh}), stopped
    at the end if this harness started them.
    """

    def __init__(
        self, directory: Path, redis_port: int, zk_port: int, log: Path
    ) -> None:
        self.directory = directory
        self.redis_port = redis_port
        self.zk_port = zk_port
        self.log = log
        self.started = False
        self.env = dict(
            os.environ,
            CIM_SERVICES_DIR=str(directory),
            CIM_REDIS_PORT=str(redis_port),
            CIM_ZK_PORT=str(zk_port),
        )

    def _script(self, action: str) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            done = subprocess.run(
                ["scripts/services.sh", action],
                cwd=str(ROOT),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                timeout=300,
                start_new_session=True,
            )
        if done.returncode != 0:
            raise HarnessError(
                f"scripts/services.sh {action} failed:\n{tail(self.log)}"
            )

    def redis_ok(self) -> bool:
        return redis_ping(self.redis_port)

    def zk_ok(self) -> bool:
        return ruok(self.zk_port)

    def up(self) -> None:
        if self.redis_ok() and self.zk_ok():
            say(
                f"using the running Redis :{self.redis_port} and ZooKeeper :{self.zk_port}"
            )
            return
        say(f"starting Redis :{self.redis_port} and ZooKeeper :{self.zk_port}")
        self.started = True
        self._script("up")

    def down(self) -> None:
        if self.started:
            say("stopping Redis and ZooKeeper")
            self.started = False
            self._script("down")

    def flush(self, db: int) -> None:
        with socket.create_connection(("127.0.0.1", self.redis_port), timeout=10) as s:
            s.sendall(f"SELECT {db}\r\nFLUSHDB\r\n".encode())
            reply = b""
            while reply.count(b"\r\n") < 2:
                chunk = s.recv(64)
                if not chunk:
                    break
                reply += chunk
        if reply != b"+OK\r\n+OK\r\n":
            raise HarnessError(f"Redis FLUSHDB failed: {reply!r}")

    def pid(self, name: str) -> int | None:
        try:
            return int((self.directory / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None


class WorkerProc:
    """
    One L{bench.loadgen} process, driven over its stdin and stdout.
    """

    def __init__(self, processes: Processes, index: int, log: Path) -> None:
        self.index = index
        self.log = log
        self.proc = processes.spawn(
            f"loadgen{index}",
            [PYTHON, "-m", "bench.loadgen"],
            log,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._buffer = b""
        self._events: list[dict[str, Any]] = []

    def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(command).encode("utf-8") + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise HarnessError(
                f"loadgen {self.index} exited:\n{tail(self.log)}"
            ) from None

    def _read(self, timeout: float) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
        if not ready:
            return
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            self.proc.wait(5)
            raise HarnessError(
                f"loadgen {self.index} exited ({self.proc.returncode}):\n{tail(self.log)}"
            )
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.strip():
                self._events.append(json.loads(line))

    def poll(self, event: str, timeout: float = 0.0) -> dict[str, Any] | None:
        """
        The next C{event}, if it comes within C{timeout} seconds.
        @raise HarnessError: the process reported an error or exited.
        """
        end = time.monotonic() + timeout
        while True:
            while self._events:
                got = self._events.pop(0)
                if got.get("event") == "error":
                    raise HarnessError(f"loadgen {self.index}: {got.get('message')}")
                if got.get("event") == event:
                    return got
            remaining = end - time.monotonic()
            if remaining <= 0:
                self._read(0)
                if not self._events:
                    return None
                continue
            self._read(remaining)

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        got = self.poll(event, timeout)
        if got is None:
            raise HarnessError(
                f"loadgen {self.index}: no {event!r} within {timeout:.0f}s\n{tail(self.log)}"
            )
        return got


class Sampler:
    """
    CPU time and resident memory of the processes that matter, with psutil.
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {}
        for name, pid in pids.items():
            try:
                self.procs[name] = psutil.Process(pid)
            except psutil.Error:
                pass
        self.peak: dict[str, int] = {}
        self._cpu0: dict[str, float] = {}
        self._t0 = 0.0
        self._busy0 = 0.0
        self.cpu: dict[str, float] = {}
        self.wall = 0.0
        #: The whole machine's busy CPU over the window (% of one core).
        self.machine = 0.0

    @staticmethod
    def _busy() -> float:
        times = psutil.cpu_times()
        return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))

    def _cpu(self, proc: psutil.Process) -> float:
        times = proc.cpu_times()
        return float(times.user + times.system)

    def rss(self, name: str) -> int:
        try:
            return int(self.procs[name].memory_info().rss)
        except (KeyError, psutil.Error):
            return 0

    def fds(self, name: str) -> int:
        try:
            return int(self.procs[name].num_fds())
        except (KeyError, psutil.Error):
            return 0

    def begin(self) -> None:
        self._t0 = time.monotonic()
        self._busy0 = self._busy()
        for name, proc in self.procs.items():
            try:
                self._cpu0[name] = self._cpu(proc)
            except psutil.Error:
                pass

    def sample(self) -> None:
        for name in self.procs:
            self.peak[name] = max(self.peak.get(name, 0), self.rss(name))

    def end(self) -> None:
        self.sample()
        wall = self.wall = max(1e-6, time.monotonic() - self._t0)
        self.machine = 100.0 * (self._busy() - self._busy0) / wall
        for name, proc in self.procs.items():
            try:
                self.cpu[name] = 100.0 * (self._cpu(proc) - self._cpu0[name]) / wall
            except (psutil.Error, KeyError):
                pass


# Results


def ms(us: float | None) -> float | None:
    return None if us is None else round(us / 1000.0, 2)


def latency_fields(h: Histogram) -> dict[str, Any]:
    return {
        "p50_ms": ms(h.percentile(50)),
        "p99_ms": ms(h.percentile(99)),
        "max_ms": ms(h.max_us) if h.total else None,
    }


def new_row(name: str) -> dict[str, Any]:
    return {
        "scenario": name,
        "throughput": None,
        "unit": "",
        "p50_ms": None,
        "p99_ms": None,
        "max_ms": None,
        "sent": None,
        "messages": None,
        "delivered": None,
        "lost": None,
        "duplicated": None,
        "out_of_order": None,
        "damaged": None,
        "server_cpu_pct": [],
        "server_rss_mb": [],
        "cpu_pct": {},
        "targets": [],
        "notes": [],
        "error": None,
        "seconds": None,
    }


def target(row: dict[str, Any], label: str, ok: bool) -> None:
    row["targets"].append({"target": label, "ok": bool(ok)})


def fmt_num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{value:,}"


def print_table(rows: list[dict[str, Any]], quick: bool, out: Any = sys.stdout) -> None:
    header = (
        f"{'scenario':<12} {'throughput':>20} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'sent':>8} {'delivered':>10} {'lost':>5} {'dup':>4} {'srv CPU %':>10} "
        f"{'srv RSS MB':>10}  targets"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    for row in rows:
        if row["error"]:
            first = (
                row["error"].strip().splitlines()[0]
                if row["error"].strip()
                else "error"
            )
            print(f"{row['scenario']:<12} ERROR: {first[:120]}", file=out)
            continue
        tp = f"{fmt_num(row['throughput'])} {row['unit']}"
        cpu = "+".join(f"{c:.0f}" for c in row["server_cpu_pct"]) or "-"
        rss = "/".join(f"{m:.0f}" for m in row["server_rss_mb"]) or "-"
        targets = ", ".join(
            f"{t['target']} {'PASS' if t['ok'] else 'MISS'}" for t in row["targets"]
        )
        print(
            f"{row['scenario']:<12} {tp:>20} {fmt_num(row['p50_ms']):>7} "
            f"{fmt_num(row['p99_ms']):>7} {fmt_num(row['max_ms']):>7} "
            f"{fmt_num(row['sent']):>8} {fmt_num(row['delivered']):>10} "
            f"{fmt_num(row['lost']):>5} {fmt_num(row['duplicated']):>4} {cpu:>10} "
            f"{rss:>10}  {targets}",
            file=out,
        )
    print(file=out)
    for row in rows:
        if row["error"]:
            continue
        cpu = ", ".join(f"{k} {v:.0f}%" for k, v in row["cpu_pct"].items())
        print(f"{row['scenario']}: CPU {cpu}", file=out)
        for note in row["notes"]:
            print(f"    {note}", file=out)
    if quick:
        print(
            "(quick run: small scale; the targets are for the full run and only informative)",
            file=out,
        )


def failed(row: dict[str, Any]) -> bool:
    """
    Whether a row makes the run fail: an error, or messages lost,
    duplicated or damaged (or out of order, in a scenario that requires
    the order: C{order_required}).
    """
    keys = ["lost", "duplicated", "damaged"]
    if row.get("order_required"):
        keys.append("out_of_order")
    return bool(row["error"]) or any((row.get(key) or 0) > 0 for key in keys)


def ws_forms(reports: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    """
    The figures of each WebSocket subprotocol, from the load generators'
    reports: clients, deliveries a second in the window, latency.
    """
    out: dict[str, Any] = {}
    for report in reports:
        for form, got in report.get("forms", {}).items():
            mine = out.setdefault(
                form, {"clients": 0, "delivered": 0, "h": Histogram()}
            )
            mine["clients"] += int(got.get("clients", 0))
            mine["delivered"] += int(got.get("delivered_in_window", 0))
            mine["h"].merge(Histogram.from_dict(got.get("latency", {})))
    return {
        form: {
            "clients": f["clients"],
            "deliveries_per_s": f["delivered"] / max(duration, 1e-6),
            **latency_fields(f["h"]),
        }
        for form, f in out.items()
    }


# Scenarios


@dataclass
class Login:
    """
    The outcome of a login phase.

    @ivar users: the users whose connections are open.
    @ivar logged_in: how many logged in (some may have been closed since).
    """

    users: list[int]
    logged_in: int
    failed: int
    elapsed: float
    servers: dict[str, int]
    #: Open connections (devices), and users with devices on two servers.
    connections: int = 0
    spread: int = 0


class Bench:
    def __init__(
        self, quick: bool, workers: int, run_id: str, logs: Path, profile: bool = False
    ) -> None:
        self.quick = quick
        self.profile = profile
        self.duration: float | None = None
        #: The longest wait for the last messages after a run.
        self.drain = 10.0 if quick else 60.0
        self.workers = workers
        self.run_id = run_id
        self.logs = logs
        self.processes = Processes(logs)
        redis_port = int(os.environ.get("CIM_BENCH_REDIS_PORT", "16479"))
        zk_port = int(os.environ.get("CIM_BENCH_ZK_PORT", "12281"))
        self.db = int(os.environ.get("CIM_BENCH_REDIS_DB", "3"))
        self.services = Services(
            ROOT / ".run" / "bench" / "services",
            redis_port,
            zk_port,
            logs / "services.log",
        )
        self.secret = os.urandom(18).hex()
        self.rows: dict[str, dict[str, Any]] = {}
        self.last_start = 0.0
        #: The WebSocket subprotocols the ws scenario's users take in turn.
        self.ws_subprotocols = list(WS_SUBPROTOCOLS)
        #: The open-file limit of every process the harness starts (its
        #: own soft limit, raised to the hard one, is inherited).
        self.fd_limit = raise_fd_limit()

    def params(self, name: str) -> dict[str, Any]:
        full, quick = PARAMS[name]
        params = dict(quick if self.quick else full)
        if self.duration:
            params["hold" if name == "connections" else "duration"] = self.duration
        return params

    def run(self, names: list[str]) -> list[dict[str, Any]]:
        rows = []
        route_ready = (ROOT / "cim/route/service.py").exists() and (
            ROOT / "cim/route/tap.py"
        ).exists()
        services_up = False
        for name in names:
            row = new_row(name)
            started = time.monotonic()
            try:
                if name != "raw":
                    if not route_ready:
                        raise HarnessError(
                            "the route is not available yet "
                            "(cim/route/service.py and cim/route/tap.py are missing)"
                        )
                    if not services_up:
                        self.services.up()
                        services_up = True
                say(f"{name}: starting")
                getattr(self, "scenario_" + name.replace("-", "_"))(
                    row, self.params(name)
                )
            except HarnessError as e:
                row["error"] = str(e)
                say(f"{name}: ERROR {e}")
            except Exception as e:
                import traceback

                row["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
                say(f"{name}: ERROR {row['error']}")
            finally:
                self.processes.stop_all()
            row["seconds"] = round(time.monotonic() - started, 1)
            say(f"{name}: done in {row['seconds']}s")
            rows.append(row)
            self.rows[name] = row
        return rows

    def close(self) -> None:
        self.processes.stop_all()
        self.services.down()

    # Helpers

    def cluster(
        self, name: str, servers: int = 2, route_args: Sequence[str] = ()
    ) -> Cluster:
        """
        A fresh cluster (one route, C{servers} IM servers) on an empty
        Redis database and a new ZooKeeper root, started (stopped with the
        other processes after the scenario).

        @param route_args: more options of the route.
        """
        self.services.flush(self.db)
        twistd = [TWISTD]
        if self.profile:
            twistd = [PYTHON, "-m", "bench.harness", "--profiled-twistd"]
        cluster = Cluster(
            self.processes,
            self.logs / name,
            f"redis://127.0.0.1:{self.services.redis_port}/{self.db}",
            f"zk://127.0.0.1:{self.services.zk_port}/cimbench/{self.run_id}-{name}",
            self.secret,
            # Every simulated user connects from 127.0.0.1: no per-address
            # cap on the client port, and a wide one on the HTTP ports.
            # Every server has its WebSocket gateway (any free port: the
            # kit reads it from the server's log; the route names it in its
            # /login answers).
            server_args=[
                "--rate",
                "20000",
                "--max-connections-per-address",
                "0",
                "--ws-port",
                "0",
            ],
            route_args=["--max-connections-per-address", "0", *route_args],
            twistd=twistd,
        )
        cluster.start_blocking(servers)
        return cluster

    def spawn(self, name: str, n: int | None = None) -> list[WorkerProc]:
        return [
            WorkerProc(self.processes, i, self.logs / name / f"loadgen{i}.log")
            for i in range(n or self.workers)
        ]

    @staticmethod
    def split(total: int, parts: int) -> list[int]:
        return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]

    def setup_cim(
        self,
        name: str,
        cluster: Cluster,
        workers: list[WorkerProc],
        users: int,
        concurrency: int = 32,
        ping_interval: float = 10.0,
        exact: bool = False,
        transport: str = "tcp",
    ) -> list[tuple[int, str]]:
        """
        Register C{users} fresh users, spread over the workers.

        @param exact: the workers keep every stream sent and received, for
            L{check_streams}.
        @param transport: how the clients will connect to the servers:
            C{"tcp"}, or C{"ws"} (the WebSocket gateways, the users taking
            C{ws_subprotocols} in turn).
        """
        counts = self.split(users, len(workers))
        for w, count in zip(workers, counts, strict=True):
            w.send(
                {
                    "cmd": "setup",
                    "mode": "cim",
                    "scenario": name,
                    "index": w.index,
                    "size": SIZE,
                    "route": ["127.0.0.1", cluster.route_port],
                    "secret": self.secret,
                    "register": count,
                    "prefix": f"b{self.run_id}-{name}-{w.index}-",
                    "concurrency": concurrency,
                    "ping_interval": ping_interval,
                    "exact": exact,
                    "transport": transport,
                    "subprotocols": self.ws_subprotocols,
                }
            )
        say(f"{name}: registering {users} users")
        all_users: list[tuple[int, str]] = []
        elapsed = 0.0
        for w in workers:
            got = w.expect("registered", 60 + users / 50)
            all_users += [(int(u), str(n)) for u, n in got["users"]]
            elapsed = max(elapsed, got["elapsed"])
        say(f"{name}: registered {len(all_users)} users in {elapsed:.1f}s")
        return all_users

    def login(
        self,
        name: str,
        workers: list[WorkerProc],
        expected: int,
        concurrency: int = 32,
        group: str = "",
        bind: list[str] | None = None,
        connect: bool = True,
        devices: int = 1,
        part: tuple[int, int] | None = None,
    ) -> Login:
        """
        Log the registered users in (see L{bench.loadgen.Worker.login_phase};
        C{part}: only those of each worker's users, C{[start, stop]}).
        """
        for w in workers:
            w.send(
                {
                    "cmd": "login",
                    "group": group,
                    "connect": connect,
                    "bind": bind or [],
                    "concurrency": concurrency,
                    "devices": devices,
                    **({"part": list(part)} if part else {}),
                }
            )
        logged: list[int] = []
        logged_in = 0
        failed_logins = 0
        elapsed = 0.0
        servers: dict[str, int] = {}
        connections = spread = 0
        for w in workers:
            got = w.expect("ready", 60 + devices * expected / 20)
            logged += [int(u) for u in got["users"]]
            logged_in += int(got["logged_in"])
            connections += int(got.get("connections", 0))
            spread += int(got.get("spread", 0))
            failed_logins += int(got["failed"])
            elapsed = max(elapsed, float(got["elapsed"]))
            for k, v in got["servers"].items():
                servers[k] = servers.get(k, 0) + v
        if connect:
            say(
                f"{name}: {logged_in} logged in ({failed_logins} failed, "
                f"{logged_in - connections} closed since) in {elapsed:.1f}s {servers}"
            )
        return Login(
            logged, logged_in, failed_logins, elapsed, servers, connections, spread
        )

    def measure(
        self,
        workers: list[WorkerProc],
        sampler: Sampler,
        run: dict[str, Any],
        drain: float,
        per_worker: list[dict[str, Any]] | None = None,
    ) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
        """
        Start the run on every worker, sample the processes while it lasts,
        wait until all are quiet, and collect the reports (asking again for
        a while if messages seem lost, in case they are still on their way).

        @return: the merged checks, the raw reports, and the measured
            seconds.
        """
        start = self.last_start = time.monotonic() + 1.0
        duration = float(run["duration"])
        for k, w in enumerate(workers):
            extra = per_worker[k] if per_worker else {}
            w.send({"cmd": "run", "start": start, "drain": drain, **run, **extra})
        time.sleep(max(0.0, start - time.monotonic()))
        sampler.begin()
        quiet: set[int] = set()
        timeouts = 0
        end = start + duration
        deadline = end + drain + 60
        measured_end: float | None = None
        while len(quiet) < len(workers):
            if time.monotonic() > deadline:
                raise HarnessError("the load generators did not finish in time")
            for w in workers:
                if w.index in quiet:
                    continue
                got = w.poll("quiet", 0.05)
                if got is not None:
                    quiet.add(w.index)
                    timeouts += bool(got.get("timeout"))
            now = time.monotonic()
            if measured_end is None:
                sampler.sample()
                if now >= end or len(quiet) == len(workers):
                    sampler.end()
                    measured_end = min(now, end)
            time.sleep(0.1)
        if measured_end is None:
            sampler.end()
        reports = self.reports(workers)
        merged = merge_reports(reports)
        # Messages still on their way are not lost: ask again as long as
        # deliveries make progress.
        give_up = time.monotonic() + drain + 30
        progress = (merged["delivered"], time.monotonic())
        while merged["lost"] and time.monotonic() < give_up:
            time.sleep(1.0)
            reports = self.reports(workers)
            merged = merge_reports(reports)
            if merged["delivered"] > progress[0]:
                progress = (merged["delivered"], time.monotonic())
            elif time.monotonic() - progress[1] > 5:
                break
        merged["drain_timeouts"] = timeouts
        return merged, reports, duration

    def reports(self, workers: list[WorkerProc]) -> list[dict[str, Any]]:
        for w in workers:
            w.send({"cmd": "report"})
        return [w.expect("report", 60) for w in workers]

    @staticmethod
    def check_login(login: Login, expected: int) -> None:
        if login.failed or len(login.users) < expected:
            raise HarnessError(
                f"only {len(login.users)} of {expected} clients logged in "
                f"({login.failed} failed); see the load generators' logs"
            )

    def stop_workers(self, workers: list[WorkerProc]) -> None:
        for w in workers:
            try:
                w.send({"cmd": "stop"})
            except HarnessError:
                pass
        for w in workers:
            try:
                w.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.processes.stop(w.proc)

    def pids(
        self, cluster: Cluster | None, workers: list[WorkerProc]
    ) -> dict[str, int]:
        pids = cluster.pids() if cluster is not None else {}
        if cluster is not None:
            for service in ("redis", "zookeeper"):
                pid = self.services.pid(service)
                if pid:
                    pids[service] = pid
        for w in workers:
            pids[f"loadgen{w.index}"] = w.proc.pid
        return pids

    @staticmethod
    def counter(reports: list[dict[str, Any]], key: str) -> int:
        return sum(int(r["counters"].get(key, 0)) for r in reports)

    @staticmethod
    def histogram(reports: list[dict[str, Any]], key: str) -> Histogram:
        h = Histogram()
        for r in reports:
            h.merge(Histogram.from_dict(r[key]))
        return h

    def fill(
        self,
        row: dict[str, Any],
        merged: dict[str, Any],
        reports: list[dict[str, Any]],
        sampler: Sampler,
        servers: list[str],
        messages: int | None = None,
    ) -> None:
        """
        The message figures and the process figures of a row.

        @param messages: the messages of the window, for a scenario of
            group messages (C{sent_in_window}); by default the private
            messages received in it, each counted once
            (C{messages_in_window}).  The deliveries are every message
            written to every device (a private message's echo to the
            sending device too).
        """
        private = messages is None
        if messages is None:
            messages = merged["messages_in_window"]
        row.update(
            {
                "sent": merged["sent"],
                "messages": messages,
                "delivered": merged["delivered"],
                "lost": merged["lost"],
                "duplicated": merged["duplicates"],
                "out_of_order": merged["out_of_order"],
                "damaged": merged["corrupt"] + merged["misrouted"] + merged["extra"],
            }
        )
        row.update(latency_fields(merged["latency"]))
        self.fill_processes(row, sampler, servers)
        deliveries = merged["delivered_in_window"]
        kinds = deliveries_per_message(merged) if private else None
        if kinds is not None:
            row["deliveries_per_message"] = round(kinds["total"], 3)
            row["deliveries_per_message_by_kind"] = {
                k: round(v, 3) for k, v in kinds.items()
            }
            row["notes"].append(
                f"deliveries per message: {kinds['total']:.2f} ({kinds['peer']:.2f} "
                f"to the receiver's devices, {kinds['echo']:.2f} echo to the "
                f"sending device, {kinds['own']:.2f} to the sender's other "
                "devices)"
            )
        elif not private and merged["sent"]:
            ratio = merged["delivered"] / merged["sent"]
            row["deliveries_per_message"] = round(ratio, 3)
            row["notes"].append(f"deliveries per message: {ratio:.2f}")
        for label, key, count in (
            ("message", "cpu_us_per_message", messages),
            ("delivery", "cpu_us_per_delivery", deliveries),
        ):
            if not count:
                continue
            per = {
                k: v / 100 * sampler.wall / count * 1e6 for k, v in sampler.cpu.items()
            }
            row[key] = {k: round(v, 1) for k, v in per.items()}
            row["notes"].append(
                f"CPU per {label}: "
                + ", ".join(f"{k} {v:.0f} us" for k, v in per.items() if v >= 0.5)
            )
        counters: dict[str, int] = {}
        for r in reports:
            for k, v in r["counters"].items():
                counters[k] = counters.get(k, 0) + v
        row["counters"] = counters
        if merged["out_of_order"]:
            row["notes"].append(
                f"{merged['out_of_order']} messages arrived out of order"
            )
        if merged["corrupt"] or merged["misrouted"] or merged["extra"]:
            row["notes"].append(
                f"damaged: {merged['corrupt']} corrupt, {merged['misrouted']} misrouted, "
                f"{merged['extra']} never sent"
            )
        for key in (
            "rejected",
            "errors",
            "dropped",
            "kicked",
            "relogins",
            "relogin_failures",
            "bad_frames",
            "skipped",
            "device_mismatch",
            "resets",
            "epoch_frames",
            "unannounced",
            "seq_regressions",
            "final",
        ):
            if counters.get(key):
                row["notes"].append(f"{key}: {counters[key]}")
        if merged["drain_timeouts"]:
            row["notes"].append(
                "drain timed out (messages still unacknowledged or arriving)"
            )

    @staticmethod
    def fill_processes(
        row: dict[str, Any], sampler: Sampler, servers: list[str]
    ) -> None:
        row["cpu_pct"] = {k: round(v, 1) for k, v in sampler.cpu.items()}
        ours = sum(sampler.cpu.values())
        row["machine_cpu_pct"] = round(sampler.machine, 1)
        row["other_cpu_pct"] = round(max(0.0, sampler.machine - ours), 1)
        row["notes"].append(
            f"machine: {sampler.machine:.0f}% busy of {100 * (os.cpu_count() or 1)}%, "
            f"{row['other_cpu_pct']:.0f}% of it by processes outside the benchmark"
        )
        row["server_cpu_pct"] = [round(sampler.cpu.get(s, 0.0), 1) for s in servers]
        row["server_rss_mb"] = [
            round(sampler.peak.get(s, 0) / 2**20, 1) for s in servers
        ]

    def raw_cost(self) -> float | None:
        """
        The raw forwarder's CPU per message in this run (us): the unit of
        the cost targets (issue 17), or C{None} when raw did not run.
        """
        raw = self.rows.get("raw") or {}
        cost = (raw.get("cpu_us_per_message") or {}).get("raw")
        return float(cost) if cost else None

    def cost_target(
        self,
        row: dict[str, Any],
        label: str,
        processes: list[str],
        limit: float,
        per: str = "cpu_us_per_message",
    ) -> None:
        """
        A target on what C{processes} spend together per message (or per
        C{per}), as a multiple of raw's CPU per message; the ratio goes
        into the row's C{ratios}.
        """
        unit = self.raw_cost()
        costs = row.get(per) or {}
        if not unit or not costs:
            return
        ratio = sum(float(costs.get(name, 0.0)) for name in processes) / unit
        row.setdefault("ratios", {})[label] = round(ratio, 2)
        target(row, f"{label} <={limit:g}x raw ({ratio:.1f})", ratio <= limit)

    # The scenarios

    def scenario_raw(self, row: dict[str, Any], p: dict[str, Any]) -> None:
        log = self.logs / "raw" / "raw_server.log"
        watch = LogWatch(log)
        watch.mark()
        raw = self.processes.spawn(
            "raw", [PYTHON, "-m", "bench.raw_server", "--port", "0"], log
        )
        workers = self.spawn("raw")

        def listening() -> int | None:
            if raw.poll() is not None:
                raise HarnessError(f"the raw server exited:\n{tail(log)}")
            found = RAW_LISTENING.search(watch.since())
            return int(found.group(1)) if found else None

        port = wait_blocking(listening, "the raw server to listen")
        ids = list(range(1, p["clients"] + 1))
        counts = self.split(len(ids), len(workers))
        first = 0
        for w, count in zip(workers, counts, strict=True):
            w.send(
                {
                    "cmd": "setup",
                    "mode": "raw",
                    "scenario": "raw",
                    "index": w.index,
                    "size": SIZE,
                    "ids": ids[first : first + count],
                    "raw": ["127.0.0.1", port],
                }
            )
            first += count
        for w in workers:
            w.expect("registered", 30)
        login = self.login("raw", workers, len(ids))
        self.check_login(login, len(ids))
        sampler = Sampler({"raw": raw.pid, **self.pids(None, workers)})
        merged, reports, duration = self.measure(
            workers,
            sampler,
            {
                "duration": p["duration"],
                "peers": login.users,
                "window": p["window"],
                # The receiver and the sender's echo.
                "fanout": 2,
            },
            drain=self.drain,
        )
        self.fill(row, merged, reports, sampler, ["raw"])
        row["throughput"] = merged["messages_in_window"] / duration
        row["unit"] = "msgs/s"
        row["notes"].insert(
            0,
            f"{p['clients']} clients, window {p['window']}, {SIZE}-byte texts, 1 process",
        )
        self.stop_workers(workers)

    def _p2p_like(
        self,
        name: str,
        row: dict[str, Any],
        p: dict[str, Any],
        run: dict[str, Any],
        exact: bool | None = None,
        transport: str = "tcp",
    ) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
        """
        Run C{p2p}-shaped load on a fresh cluster; return the merged
        report, the workers' reports and the measured duration. Streams
        are checked exactly if C{exact} (by default on quick runs, which
        have few enough of them).
        """
        if exact is None:
            exact = self.quick
        cluster = self.cluster(name)
        workers = self.spawn(name)
        self.setup_cim(
            name, cluster, workers, p["clients"], exact=exact, transport=transport
        )
        login = self.login(name, workers, p["clients"])
        self.check_login(login, p["clients"])
        row["notes"].append(f"clients per server: {sorted(login.servers.values())}")
        sampler = Sampler(self.pids(cluster, workers))
        merged, reports, duration = self.measure(
            workers,
            sampler,
            # Each message goes to the receiver's device and back to the
            # sending device (its echo).
            {"duration": p["duration"], "peers": login.users, "fanout": 2, **run},
            drain=self.drain,
        )
        self.fill(row, merged, reports, sampler, ["server1", "server2"])
        if exact:
            self.exact_check(row, reports, 1)
        row["throughput"] = merged["messages_in_window"] / duration
        row["unit"] = "msgs/s"
        self.stop_workers(workers)
        return merged, reports, duration

    def scenario_p2p(self, row: dict[str, Any], p: dict[str, Any]) -> None:
        self._p2p_like("p2p", row, p, {"window": p["window"]})
        row["notes"].insert(
            0, f"{p['clients']} clients, window {p['window']}, {SIZE}-byte texts"
        )
        raw = self.rows.get("raw")
        if raw and raw.get("throughput"):
            ratio = row["throughput"] / raw["throughput"]
            row["ratio_to_raw"] = round(ratio, 3)
            row.setdefault("ratios", {})["msgs/s"] = round(ratio, 3)
            target(row, f">=0.5 raw ({ratio:.2f})", ratio >= 0.5)
        self.cost_target(row, "servers CPU/msg", ["server1", "server2"], 3)
        self.cost_target(row, "Redis CPU/msg", ["redis"], 0.6)
        target(row, "0 lost/dup", not row["lost"] and not row["duplicated"])

    def scenario_ws(self, row: dict[str, Any], p: dict[str, Any]) -> None:
        """
        C{p2p} over the servers' WebSocket gateways, half the clients on
        each subprotocol, checked exactly; then, on a fresh cluster of one
        server, the memory of C{idle} idle WebSocket connections.
        """
        _, reports, duration = self._p2p_like(
            "ws", row, p, {"window": p["window"]}, exact=True, transport="ws"
        )
        row["subprotocols"] = forms = ws_forms(reports, duration)
        row["notes"].insert(
            0,
            f"{p['clients']} WebSocket clients, window {p['window']}, {SIZE}-byte "
            "texts; "
            + "; ".join(
                f"{form}: {f['clients']} clients, {f['deliveries_per_s']:,.0f} "
                f"deliv/s, p50 {fmt_num(f['p50_ms'])} ms, p99 {fmt_num(f['p99_ms'])} ms"
                for form, f in forms.items()
            ),
        )
        self.processes.stop_all()
        p2p = self.rows.get("p2p")
        if p2p and p2p.get("throughput") and not p2p.get("error"):
            ratio = row["throughput"] / p2p["throughput"]
            row["ratio_to_p2p"] = round(ratio, 3)
            row["notes"].insert(
                1,
                f"throughput {ratio:.2f} of the TCP p2p of this run "
                f"({row['throughput']:,.0f} / {p2p['throughput']:,.0f} msgs/s)",
            )
            target(row, f">=0.7 p2p ({ratio:.2f})", ratio >= 0.7)
        else:
            row["notes"].insert(
                1, "no TCP p2p in this run: no ratio (run --only p2p --only ws)"
            )
        target(row, "0 lost/dup", not row["lost"] and not row["duplicated"])
        self.ws_idle(row, p)

    def ws_idle(self, row: dict[str, Any], p: dict[str, Any]) -> None:
        """
        The ws scenario's second part: C{idle} users log in over WebSocket
        (half on each subprotocol) on a fresh cluster of one server and stay
        idle (a PING every C{ping_interval} seconds) for C{hold} seconds;
        the server's resident memory grows by how much a connection.
        """
        name = "ws-idle"
        n = p["idle"]
        cluster = self.cluster(name, servers=1)
        workers = self.spawn(name)
        self.setup_cim(
            name,
            cluster,
            workers,
            n,
            concurrency=64,
            ping_interval=p["ping_interval"],
            transport="ws",
        )
        sampler = Sampler(self.pids(cluster, workers))
        # A few connections first: what every later one shares (code
        # imported on first use, caches) is not theirs.
        warm = self.login(
            name, workers, n, concurrency=p["concurrency"], part=(0, WS_WARM_UP)
        )
        time.sleep(0.5)
        before = sampler.rss("server1")
        login = self.login(
            name,
            workers,
            n,
            concurrency=p["concurrency"],
            bind=SOURCES,
            part=(WS_WARM_UP, n),
        )
        after = sampler.rss("server1")
        measured = len(login.users) - len(warm.users)
        merged, reports, _ = self.measure(
            workers, sampler, {"duration": p["hold"]}, drain=2
        )
        after_hold = sampler.rss("server1")
        peak = max(after, after_hold)
        per_conn = (peak - before) / max(1, measured)
        held = sum(int(r["held"]) for r in reports)
        missing = sum(int(r["missing_pongs"]) for r in reports)
        pings = self.counter(reports, "hold_pings")
        pongs = self.counter(reports, "hold_pongs")
        dropped = self.counter(reports, "dropped")
        forms = {
            form: sum(
                int(r.get("forms", {}).get(form, {}).get("clients", 0)) for r in reports
            )
            for form in self.ws_subprotocols
        }
        row["ws_idle"] = {
            "connections": n,
            "held": held,
            "subprotocols": forms,
            "rss_before_mb": round(before / 2**20, 1),
            "rss_after_mb": round(after / 2**20, 1),
            "rss_after_hold_mb": round(after_hold / 2**20, 1),
            "rss_per_connection_bytes": round(per_conn),
            "pings": pings,
            "pongs": pongs,
            "unanswered": missing,
            "dropped": dropped,
            "ping_latency": latency_fields(self.histogram(reports, "ping_latency")),
        }
        row["notes"].append(
            f"idle: {login.logged_in} of {n} logged in over WebSocket "
            f"({', '.join(f'{k} {v}' for k, v in forms.items())}; {login.failed} "
            f"failed) on one server, {held} held {p['hold']}s with a PING every "
            f"{p['ping_interval']}s ({pings} pings, {pongs} pongs, {missing} "
            f"unanswered, {dropped} dropped); server RSS {before / 2**20:.1f} -> "
            f"{after / 2**20:.1f} MB (after the hold {after_hold / 2**20:.1f}) "
            f"for {measured} connections = {per_conn / 1024:.2f} KB each"
        )
        target(
            row,
            f"{n:,} idle held",
            held == n and not dropped and not missing and not login.failed,
        )
        target(row, f"<=8KB/idle conn ({per_conn / 1024:.1f})", per_conn <= 8192)
        self.stop_workers(workers)

    def scenario_p2p_latency(self, row: dict[str, Any], p: dict[str, Any]) -> None:
        merged, _, _ = self._p2p_like(
            "p2p-latency",
            row,
            p,
            {"rate": p["rate"] / self.workers, "cap": 10},
        )
        offered = merged["sent_in_window"] / p["duration"]
        row["offered"] = round(offered, 1)
        row["notes"].insert(
            0,
            f"{p['clients']} clients, offered {offered:,.0f} msgs/s (asked {p['rate']:,})",
        )
        target(
            row,
            f"p99<=30ms at {p['rate']:,}/s",
            row["p99_ms"] is not None
            and row["p99_ms"] <= 30
            and offered >= 0.95 * p["rate"],
        )

    def scenario_group(self, row: dict[str, Any], p: dict[str, Any]) -> None:
        name = "group"
        cluster = self.cluster(name)
        workers = self.spawn(name)
        users = self.setup_cim(name, cluster, workers, p["members"])
        group = f"bench-{self.run_id}"
        created = post_json(
            f"http://127.0.0.1:{cluster.route_port}/group/create",
            {"userId": users[0][0], "groupId": group, "policy": "open"},
            {"X-Cim-Secret": self.secret},
        )
        if created.get("code") != "9000":
            raise HarnessError(f"/group/create: {created}")
        login = self.login(name, workers, p["members"], group=group)
        self.check_login(login, p["members"])
        logged, servers = login.users, login.servers
        senders = self.split(p["senders"], len(workers))
        sampler = Sampler(self.pids(cluster, workers))
        merged, reports, duration = self.measure(
            workers,
            sampler,
            {
                "duration": p["duration"],
                "quiet": 1.0,
                "peers": logged,
                "window": p["window"],
                "fanout": len(logged),
            },
            drain=self.drain,
            per_worker=[{"senders": n} for n in senders],
        )
        self.fill(
            row,
            merged,
            reports,
            sampler,
            ["server1", "server2"],
            messages=merged["sent_in_window"],
        )
        row["throughput"] = merged["delivered_in_window"] / duration
        row["unit"] = "deliv/s"
        row["notes"].insert(
            0,
            f"{len(logged)} members (per server {sorted(servers.values())}), "
            f"{p['senders']} senders, window {p['window']}; "
            f"{merged['sent_in_window'] / duration:,.0f} group msgs/s",
        )
        raw = self.rows.get("raw")
        if raw and raw.get("throughput"):
            ratio = row["throughput"] / raw["throughput"]
            row.setdefault("ratios", {})["deliveries/s"] = round(ratio, 2)
            target(row, f">=10x raw msgs/s ({ratio:.1f})", ratio >= 10)
        self.stop_workers(workers)

    def scenario_devices(self, row: dict[str, Any], p: dict[str, Any]) -> None:
        name = "devices"
        devices = p["devices"]
        # The route's default balancer (a hash of the user) sends every
        # device of a user to the same server; round robin spreads them.
        cluster = self.cluster(name, route_args=["--balancer", "round-robin"])
        workers = self.spawn(name)
        self.setup_cim(name, cluster, workers, p["users"], exact=True)
        login = self.login(name, workers, p["users"], devices=devices)
        self.check_login(login, p["users"])
        sampler = Sampler(self.pids(cluster, workers))
        merged, reports, duration = self.measure(
            workers,
            sampler,
            {
                "duration": p["duration"],
                "quiet": 1.0,
                "peers": login.users,
                "window": p["window"],
                "friends": p["friends"],
                # Every device of the receiver and of the sender (the
                # sending one's echo included).
                "fanout": 2 * devices,
            },
            drain=self.drain,
        )
        self.fill(row, merged, reports, sampler, ["server1", "server2"])
        exact = self.exact_check(row, reports, devices)
        row["order_required"] = True
        row["throughput"] = merged["delivered_in_window"] / duration
        row["unit"] = "deliv/s"
        messages = merged["messages_in_window"]
        row["notes"].insert(
            0,
            f"{len(login.users)} users x {devices} devices ({login.connections} "
            f"connections, per server {sorted(login.servers.values())}; "
            f"{login.spread} users on two servers), {p['friends']} friends each, "
            f"window {p['window']} per device; {messages / duration:,.0f} msgs/s",
        )
        target(
            row,
            "every device: all once, in order",
            not exact["lost"]
            and not exact["extra"]
            and not row["duplicated"]
            and not row["out_of_order"]
            and not row["damaged"],
        )
        self.stop_workers(workers)

    @staticmethod
    def exact_check(
        row: dict[str, Any], reports: list[dict[str, Any]], devices: int
    ) -> dict[str, Any]:
        """
        The exact check of the private messages of a run whose workers kept
        their streams (L{check_streams}): it decides what was lost, and
        what was received but never sent is damaged.
        """
        exact = check_streams(reports, devices)
        row["streams"] = exact
        row["lost"] = exact["lost"]
        row["damaged"] = (row["damaged"] or 0) + exact["extra"]
        kinds = exact["lost_by_kind"]
        row["notes"].append(
            f"exact check: {exact['streams']} streams, {exact['expected']} "
            f"deliveries expected (every device of both users), "
            f"{exact['delivered']} delivered, {exact['lost']} lost ({kinds['peer']} "
            f"of the receivers', {kinds['echo']} echoes, {kinds['own']} of the "
            f"senders' other devices), {exact['extra']} never sent, "
            f"{exact['devices_short']} devices short"
        )
        row["notes"].extend(f"    {e}" for e in exact["examples"][:5])
        return exact

    def scenario_http(self, row: dict[str, Any], p: dict[str, Any]) -> None:
        name = "http"
        cluster = self.cluster(name)
        workers = self.spawn(name)
        self.setup_cim(name, cluster, workers, p["users"], exact=self.quick)
        login = self.login(name, workers, p["users"])
        self.check_login(login, p["users"])
        logged = login.users
        sampler = Sampler(self.pids(cluster, workers))
        merged, reports, duration = self.measure(
            workers,
            sampler,
            {
                "duration": p["duration"],
                "peers": logged,
                "concurrency": p["concurrency"] // len(workers),
                "auth": "secret",
                # The receiver's device and the sender's (it is connected).
                "fanout": 2,
            },
            drain=self.drain,
        )
        self.fill(row, merged, reports, sampler, ["server1", "server2"])
        if self.quick:
            self.exact_check(row, reports, 1)
        ok = self.counter(reports, "http_ok_in_window")
        row["throughput"] = ok / duration
        row["unit"] = "calls/s"
        calls = self.histogram(reports, "http_latency")
        row["http_call_latency"] = latency_fields(calls)
        row["notes"].insert(
            0,
            f"{p['concurrency']} concurrent HTTP clients (X-Cim-Secret), {p['users']} TCP "
            f"receivers; call latency p50 {fmt_num(ms(calls.percentile(50)))} ms, "
            f"p99 {fmt_num(ms(calls.percentile(99)))} ms; the latency columns are end to end",
        )
        for key in ("http_errors", "http_failures", "http_offline"):
            if self.counter(reports, key):
                row["notes"].append(f"{key}: {self.counter(reports, key)}")
        self.cost_target(row, "route CPU/call", ["route"], 10)
        self.stop_workers(workers)

    def scenario_login(self, row: dict[str, Any], p: dict[str, Any]) -> None:
        name = "login"
        cluster = self.cluster(name)
        workers = self.spawn(name)
        self.setup_cim(name, cluster, workers, p["users"], concurrency=64)
        self.login(name, workers, p["users"], connect=False)
        sampler = Sampler(self.pids(cluster, workers))
        merged, reports, duration = self.measure(
            workers,
            sampler,
            {
                "duration": p["duration"],
                "concurrency": p["concurrency"] // len(workers),
                "bind": SOURCES,
            },
            drain=2,
        )
        self.fill(row, merged, reports, sampler, ["server1", "server2"])
        for key in ("sent", "delivered", "lost", "duplicated"):
            row[key] = None
        done = self.counter(reports, "logins")
        in_window = self.counter(reports, "logins_in_window")
        last = max(float(r["last_done"]) for r in reports)
        if done == p["users"] and last:
            # All done before the end: the rate over the time they took.
            row["throughput"] = done / max(last - self.last_start, 1e-3)
        else:
            row["throughput"] = in_window / duration
        row["unit"] = "logins/s"
        if done:
            per = {
                k: v / 100 * sampler.wall / max(1, in_window) * 1e6
                for k, v in sampler.cpu.items()
            }
            row["cpu_us_per_login"] = {k: round(v, 1) for k, v in per.items()}
            row["notes"].append(
                "CPU per login: "
                + ", ".join(f"{k} {v:.0f} us" for k, v in per.items() if v >= 0.5)
            )
        row.update(latency_fields(self.histogram(reports, "login_latency")))
        failures = self.counter(reports, "login_failures")
        row["notes"].insert(
            0,
            f"{done} of {p['users']} fresh users logged in (route /login + TCP login), "
            f"{p['concurrency']} at a time; latency is per login; {failures} failed",
        )
        self.cost_target(
            row,
            "CPU/login",
            [k for k in row.get("cpu_us_per_login", {}) if not k.startswith("loadgen")],
            25,
            per="cpu_us_per_login",
        )
        self.stop_workers(workers)

    def scenario_connections(self, row: dict[str, Any], p: dict[str, Any]) -> None:
        """
        C{connections} users log in to one server and stay idle (a PING
        every C{ping_interval} seconds) for C{hold} seconds; the server's
        resident memory grows by how much a connection.  A few log in
        first (C{CONNECTIONS_WARM_UP} per load generator): what every
        later connection shares is not theirs.

        As many load generators as their open-file limit needs (at least
        C{--workers}); the server must be able to take them all under its
        own (L{cim.limits_net.default_max_connections}).
        """
        name = "connections"
        n = p["connections"]
        loaders = load_processes(n, self.fd_limit, self.workers)
        # The daemons inherit this process's open-file limit.
        room = default_max_connections()
        if n + SERVER_SPARE_CONNECTIONS > room:
            raise HarnessError(
                f"an IM server holds at most {room:,} connections under this "
                f"open-file limit ({self.fd_limit:,}: ulimit -n); {n:,} clients "
                f"and {SERVER_SPARE_CONNECTIONS} for its push API need more"
            )
        cluster = self.cluster(name, servers=1)
        workers = self.spawn(name, loaders)
        self.setup_cim(
            name, cluster, workers, n, concurrency=64, ping_interval=p["ping_interval"]
        )
        sampler = Sampler(self.pids(cluster, workers))
        time.sleep(0.5)
        start = sampler.rss("server1")
        warm = self.login(
            name,
            workers,
            n,
            concurrency=p["concurrency"],
            bind=SOURCES,
            part=(0, CONNECTIONS_WARM_UP),
        )
        time.sleep(0.5)
        before = sampler.rss("server1")
        login = self.login(
            name,
            workers,
            n,
            concurrency=p["concurrency"],
            bind=SOURCES,
            part=(CONNECTIONS_WARM_UP, n),
        )
        after = sampler.rss("server1")
        fds = sampler.fds("server1")
        open_now = len(login.users)
        measured = max(1, open_now - len(warm.users))
        per_conn = (after - before) / measured
        with_warm_up = (after - start) / max(1, open_now)
        merged, reports, duration = self.measure(
            workers, sampler, {"duration": p["hold"]}, drain=2
        )
        after_hold = sampler.rss("server1")
        self.fill(row, merged, reports, sampler, ["server1"])
        for key in ("sent", "delivered", "lost", "duplicated"):
            row[key] = None
        held = sum(int(r["held"]) for r in reports)
        missing = sum(int(r["missing_pongs"]) for r in reports)
        pings = self.counter(reports, "hold_pings")
        pongs = self.counter(reports, "hold_pongs")
        dropped = self.counter(reports, "dropped")
        retries = self.counter(reports, "login_retries")
        row["throughput"] = held
        row["unit"] = "conns"
        row.update(latency_fields(self.histogram(reports, "ping_latency")))
        row["login_retries"] = retries
        row["rss_per_connection_bytes"] = round(per_conn)
        row["rss_per_connection_with_warm_up_bytes"] = round(with_warm_up)
        row["rss_before_mb"] = round(before / 2**20, 1)
        row["rss_after_mb"] = round(after / 2**20, 1)
        row["rss_after_hold_mb"] = round(after_hold / 2**20, 1)
        row["server_fds"] = fds
        row["load_processes"] = loaders
        row["fd_limit"] = self.fd_limit
        # (A load generator's count of logins is of every phase.)
        last = login.logged_in - warm.logged_in
        row["logins_per_s"] = round(last / max(login.elapsed, 1e-3), 1)
        row["notes"].insert(
            0,
            f"{login.logged_in} of {n} logged in "
            f"({login.failed + warm.failed} failed, {retries} logins made again "
            f"after a store failure; the last {last} in "
            f"{login.elapsed:.1f}s, {row['logins_per_s']:,.0f}/s) from "
            f"{len(SOURCES)} source addresses and {loaders} load processes, "
            f"{open_now} open then; server RSS {before / 2**20:.1f} -> "
            f"{after / 2**20:.1f} MB (after the hold {after_hold / 2**20:.1f}) "
            f"for {measured} connections = {per_conn / 1024:.2f} KB each "
            f"({with_warm_up / 1024:.2f} KB counting from before the "
            f"{len(warm.users)} first ones)",
        )
        row["notes"].insert(
            1,
            f"held {p['hold']}s, a PING every {p['ping_interval']}s: {pings} pings, "
            f"{pongs} pongs, {missing} unanswered, {dropped} dropped; "
            "the latency columns are the PING round trip",
        )
        row["notes"].insert(
            2,
            f"server file descriptors: {fds:,} ({fds - open_now:,} besides its "
            f"clients' connections), under an open-file limit of "
            f"{self.fd_limit:,} (it takes {room:,} connections)",
        )
        target(row, f"{n:,} held", held == n and not dropped and not missing)
        target(row, f"<=3KB/conn ({per_conn / 1024:.2f})", per_conn <= 3072)
        self.stop_workers(workers)


def load_processes(connections: int, fd_limit: int, at_least: int) -> int:
    """
    How many load generators hold C{connections} client connections with
    C{fd_limit} open files each (C{LOADGEN_RESERVED_FILES} of them kept
    for the rest): at least C{at_least}.
    """
    each = max(1, fd_limit - LOADGEN_RESERVED_FILES)
    return max(at_least, -(-connections // each))


def lock(path: Path, wait: float = 1800.0) -> IO[str]:
    """
    Take the machine's benchmark lock: two harnesses at once would share
    the services (one empties the other's Redis database) and the CPU.
    Wait for another one to finish (at most C{wait} seconds).

    @return: the open lock file; the lock lasts until the process exits.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    deadline = time.monotonic() + wait
    waiting = False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not waiting:
                f.seek(0)
                say(
                    f"another benchmark (pid {f.read().strip() or '?'}) is running; waiting"
                )
                waiting = True
            if time.monotonic() > deadline:
                raise HarnessError("another benchmark is still running") from None
            time.sleep(1.0)
            continue
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        return f


def profiled_twistd(args: list[str]) -> None:
    """
    Run C{twistd args} under cProfile counting CPU time (not wall time, so
    that waiting for the CPU on a busy machine does not count), and save
    the statistics beside its log (C{--logfile X.log}: C{X.prof}) when it
    exits.
    """
    import cProfile

    from twisted.application import app
    from twisted.scripts.twistd import run

    out = Path(args[args.index("--logfile") + 1]).with_suffix(".prof")
    # twistd ends by killing itself with the signal that stopped it; save
    # the statistics first.
    app._exitWithSignal = lambda sig: None  # type: ignore[assignment]
    profiler = cProfile.Profile(time.process_time)
    sys.argv = ["twistd", *args]
    profiler.enable()
    try:
        run()
    finally:
        profiler.disable()
        profiler.dump_stats(str(out))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--profiled-twistd"]:
        profiled_twistd(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description="The cim benchmark.")
    parser.add_argument(
        "--quick", action="store_true", help="a short, small-scale run (CI)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (may be repeated)",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="load generator processes"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the daemons under cProfile, counting CPU time "
        "(.run/bench/<timestamp>/<scenario>/<daemon>.prof)",
    )
    parser.add_argument(
        "--ws-subprotocol",
        action="append",
        choices=WS_SUBPROTOCOLS,
        help="the ws scenario's clients all speak this subprotocol "
        "(by default half of them each)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        help="measure each scenario for this many seconds instead",
    )
    args = parser.parse_args(argv)
    names = [s for s in SCENARIOS if not args.only or s in args.only]
    try:
        held = lock(ROOT / ".run" / "bench" / "lock")
    except (HarnessError, KeyboardInterrupt) as e:
        say(f"not started: {e}")
        return 1
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_id = stamp.replace("-", "")
    logs = ROOT / ".run" / "bench" / stamp
    logs.mkdir(parents=True, exist_ok=True)

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, terminate)
    bench = Bench(args.quick, args.workers, run_id, logs, args.profile)
    bench.duration = args.duration
    if args.ws_subprotocol:
        bench.ws_subprotocols = list(dict.fromkeys(args.ws_subprotocol))
    started = time.monotonic()
    say(
        f"{'quick' if args.quick else 'full'} run of {', '.join(names)}; logs in {logs}"
    )
    try:
        rows = bench.run(names)
    except KeyboardInterrupt:
        say("interrupted; stopping everything")
        return 130
    finally:
        bench.close()
        held.close()
    result = {
        "started": stamp,
        "quick": args.quick,
        "seconds": round(time.monotonic() - started, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "workers": args.workers,
        },
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{stamp}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    shutil.copyfile(path, RESULTS / "latest.json")
    print()
    print_table(rows, args.quick)
    print(
        f"\n{result['seconds']}s; results in {path.relative_to(ROOT)} and bench/results/latest.json"
    )
    return 1 if any(failed(r) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
