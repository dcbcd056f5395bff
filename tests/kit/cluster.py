"""
cim's daemons as real C{twistd} processes, as a user runs them: the one
harness of the end-to-end, fault and security tests and of the benchmark.

Every daemon listens on port 0 (any free port, chosen by the kernel when
it binds) and the harness reads the ports it got from the line of its log
that names them::

    cim-server 127.0.0.1:41123:41125 ready: clients on 127.0.0.1:41123, push API on 127.0.0.1:41125
    cim-route listening on 127.0.0.1:39917 (consistent-hash; 2 servers)

(a C{cim-standalone} logs both).  Both lines are written once the daemon
has started (stores connected, ports listening, the server registered), so
a daemon whose ports are known is ready.  No port is picked before the
daemon binds it, so two tests, or a test and the benchmark, never race for
one.

    processes = Processes(directory)
    cluster = Cluster(processes, directory, store, registry, secret)
    cluster.start_blocking()          # or: await cluster.start(), reactor running
    ... cluster.url, cluster.servers["server1"].port ...
    processes.stop_all()              # whatever happened

Nothing here imports pytest: the benchmark (L{bench.harness}) runs its
clusters with this module too.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from cim.interfaces import ServerAddress
from tests.kit.http import call, get_json
from tests.kit.wait import DEADLINE, wait_blocking, wait_until

ROOT = Path(__file__).resolve().parent.parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))

#: Per plugin: its port options, and the name of the port each one sets.
PORT_OPTIONS: dict[str, dict[str, str]] = {
    "cim-server": {"port": "client", "http-port": "http"},
    "cim-route": {"port": "route"},
    "cim-standalone": {
        "port": "client",
        "http-port": "http",
        "route-port": "route",
        "ws-port": "ws",
    },
}

#: The log lines that name the ports (see the module docstring).
PORT_LINES = [
    re.compile(
        r"cim-server \S+ ready: clients on \S+:(?P<client>\d+), "
        r"push API on \S+:(?P<http>\d+)"
    ),
    re.compile(r"cim-route listening on \S+:(?P<route>\d+)"),
    # A server with a WebSocket gateway (cim-server --ws-port: in its args).
    re.compile(r"cim-server \S+ ready: .*, WebSocket on \S+:(?P<ws>\d+)"),
]


class LogWatch:
    """
    The part of a log file written since L{mark} (a process that is
    started again appends to the same file; twistd may rotate it).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def mark(self) -> None:
        try:
            self._offset = self.path.stat().st_size
        except OSError:
            self._offset = 0

    def since(self) -> str:
        try:
            with self.path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() < self._offset:  # rotated meanwhile
                    self._offset = 0
                f.seek(self._offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """
    Every process started through L{spawn}: L{stop_all} stops them all,
    whatever happened (a fixture's teardown, the benchmark's C{finally}).

    Each process runs in a session of its own, so that a Ctrl-C meant for
    the harness does not reach it before the harness stops it.

    @ivar directory: where logs go by default.
    @ivar reactor: the reactor of the tests that wait with it running
        (C{None} for code that runs none, like the benchmark's driver).
    """

    def __init__(self, directory: Path, reactor: Any = None) -> None:
        self.directory = directory
        self.reactor = reactor
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """
        Start C{argv} in L{ROOT}; its output (or only its standard error,
        when C{stdout} is given) is appended to C{log}.
        """
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            process = subprocess.Popen(
                list(argv),
                cwd=str(ROOT),
                env=env,
                stdin=stdin,
                stdout=out if stdout is None else stdout,
                stderr=out,
                start_new_session=True,
            )
        self.running.append((name, process))
        return process

    def _signal(self, processes: Iterable[subprocess.Popen[bytes]]) -> list[Any]:
        """
        Continue (a stopped one could not exit) and C{SIGTERM} every one
        still running; @return: those.
        """
        alive = [p for p in processes if p.poll() is None]
        for process in alive:
            try:
                process.send_signal(signal.SIGCONT)
                process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        return alive

    def _forget(self, processes: Iterable[subprocess.Popen[bytes]]) -> None:
        gone = set(map(id, processes))
        self.running = [(n, p) for n, p in self.running if id(p) not in gone]

    @staticmethod
    def _kill(process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.kill()
            process.wait(10)

    def terminate(
        self, processes: Sequence[subprocess.Popen[bytes]], grace: float = 10.0
    ) -> None:
        """
        C{SIGTERM} C{processes} together and wait for them to exit (blocking);
        C{SIGKILL} whatever still runs after C{grace} seconds.
        """
        alive = self._signal(processes)
        try:
            wait_blocking(
                lambda: all(p.poll() is not None for p in alive),
                "processes to exit",
                grace,
            )
        except AssertionError:
            pass
        for process in alive:
            self._kill(process)
        self._forget(processes)

    async def terminate_async(
        self,
        reactor: Any,
        processes: Sequence[subprocess.Popen[bytes]],
        grace: float = 15.0,
    ) -> None:
        """
        L{terminate}, waiting with the reactor running (for processes that
        need the test's reactor to exit: see L{tests.kit.net.Link}).
        """
        alive = self._signal(processes)
        try:
            await wait_until(
                reactor,
                lambda: all(p.poll() is not None for p in alive),
                "processes to exit",
                grace,
                0.05,
            )
        except AssertionError:
            pass
        for process in alive:
            self._kill(process)
        self._forget(processes)

    def stop(self, process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        """
        L{terminate} one process.
        """
        self.terminate([process], grace)

    def stop_all(self, grace: float = 10.0) -> None:
        """
        L{terminate} every process started here, the last one first.
        """
        self.terminate([p for _, p in reversed(self.running)], grace)

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.running if p.poll() is None}


class Daemon:
    """
    One C{twistd -n <plugin>} process, logging to C{directory/<name>.log}
    (its standard output and error go to C{<name>.out}).

    Its port options are the harness's: C{args} holds the others.  A port
    listens on TCP (C{--port 0}), or as C{listen} says: by option, an
    endpoint description with C{{port}} where the port goes (such as
    C{ssl:{port}:privateKey=...:certKey=...}); its log line names the port
    all the same.

    @ivar ports: the ports it listens on, by name (C{client}, C{http},
        C{route}: see L{PORT_OPTIONS}), as its log named them after its
        latest start (kept while it is down).
    """

    def __init__(
        self,
        name: str,
        plugin: str,
        args: Sequence[str],
        directory: Path,
        processes: Processes | None = None,
        env: dict[str, str] | None = None,
        twistd: Sequence[str] = (TWISTD,),
        listen: dict[str, str] | None = None,
    ) -> None:
        options = PORT_OPTIONS[plugin]
        self.listen = dict(listen or {})
        assert set(self.listen) <= set(options), f"not a port option: {self.listen}"
        assert not {f"--{o}" for o in options} & set(args), "ports are the harness's"
        self.name = name
        self.plugin = plugin
        self.args = list(args)
        self.directory = directory
        self.processes = processes or Processes(directory)
        self.env = dict(os.environ, **(env or {}))
        self.twistd = list(twistd)
        self.logfile = directory / f"{name}.log"
        self.log = LogWatch(self.logfile)
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}

    # Starting

    def start(self, keep_ports: bool = False) -> None:
        """
        Start the process (and return at once): on any free ports, or with
        C{keep_ports} on those of its previous run (a restart that its
        clients do not notice).
        """
        assert not self.running, f"{self.name} is running"
        ports = []
        for option, kind in PORT_OPTIONS[self.plugin].items():
            port = self.ports[kind] if keep_ports else 0
            where = self.listen.get(option, "{port}").format(port=port)
            ports += [f"--{option}", where]
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log.mark()
        self.process = self.processes.spawn(
            self.name,
            [*self.twistd, "-n", "--logfile", str(self.logfile), "--pidfile", "",
             self.plugin, *self.args, *ports],
            self.directory / f"{self.name}.out",
            env=self.env,
        )  # fmt: skip

    def ready(self) -> dict[str, int] | None:
        """
        @return: the ports, once the log of this run named them all.
        @raise RuntimeError: the process exited.
        """
        assert self.process is not None, f"{self.name} was never started"
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited ({self.process.returncode}):\n{self.log_tail()}"
            )
        found: dict[str, int] = {}
        text = self.log.since()
        for pattern in PORT_LINES:
            match = pattern.search(text)
            if match:
                found.update({k: int(v) for k, v in match.groupdict().items()})
        if set(found) < set(PORT_OPTIONS[self.plugin].values()):
            return None
        self.ports = found
        return found

    def wait_ready_blocking(self, deadline: float = DEADLINE) -> dict[str, int]:
        """
        Wait (blocking) until it is L{ready}.
        """
        try:
            return wait_blocking(self.ready, f"{self.name} to start", deadline)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log_tail()}") from None

    async def wait_ready(
        self, reactor: Any, deadline: float = DEADLINE
    ) -> dict[str, int]:
        """
        Wait, with the reactor running, until it is L{ready}.
        """
        try:
            ports: dict[str, int] = await wait_until(
                reactor, self.ready, f"{self.name} to start", deadline, 0.05
            )
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log_tail()}") from None
        return ports

    # Running

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def url(self, kind: str = "route") -> str:
        """
        C{http://127.0.0.1:<port>} for its C{route} or C{http} port.
        """
        return f"http://127.0.0.1:{self.ports[kind]}"

    def log_tail(self, lines: int = 40) -> str:
        return self.log.tail(lines)

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    # Stopping

    def kill(self) -> None:
        """
        C{kill -9}: no clean-up at all.
        """
        if self.process is not None:
            self.processes._kill(self.process)

    def stop_blocking(self, grace: float = 10.0) -> None:
        """
        C{SIGTERM}, then C{SIGKILL} after C{grace} seconds (blocking).
        """
        if self.process is not None:
            self.processes.stop(self.process, grace)

    async def stop(self, reactor: Any, grace: float = 15.0) -> None:
        """
        L{stop_blocking}, waiting with the reactor running.
        """
        if self.process is not None:
            await self.processes.terminate_async(reactor, [self.process], grace)


class Server:
    """
    One C{twistd cim-server} of a L{Cluster}; its ports are those of its
    latest run.
    """

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    @property
    def name(self) -> str:
        return self.daemon.name

    @property
    def port(self) -> int:
        return self.daemon.ports["client"]

    @property
    def http_port(self) -> int:
        return self.daemon.ports["http"]

    @property
    def address(self) -> str:
        ws_port = self.daemon.ports.get("ws", 0)  # with --ws-port
        return str(
            ServerAddress("127.0.0.1", self.port, self.http_port, ws_port=ws_port)
        )


class Cluster:
    """
    One C{twistd cim-route} and some C{twistd cim-server}s on a store and a
    registry given as URLs, all on loopback, sharing C{secret}.

    The methods that wait come in two kinds: C{async} ones for tests whose
    reactor must keep running meanwhile (its clients chat), C{_blocking}
    ones for fixtures that run before the reactor does and for the
    benchmark.
    """

    def __init__(
        self,
        processes: Processes,
        directory: Path,
        store: str,
        registry: str,
        secret: str,
        server_args: Sequence[str] = (),
        route_args: Sequence[str] = (),
        twistd: Sequence[str] = (TWISTD,),
    ) -> None:
        self.processes = processes
        self.reactor = processes.reactor
        self.directory = directory
        self.store = store
        self.registry = registry
        self.secret = secret
        self.server_args = list(server_args)
        self.twistd = list(twistd)
        self.route = self._daemon("route", "cim-route", registry, list(route_args))
        self.servers: dict[str, Server] = {}

    def _daemon(self, name: str, plugin: str, registry: str, args: list[str]) -> Daemon:
        return Daemon(
            name,
            plugin,
            ["--bind", "127.0.0.1", "--store", self.store, "--registry", registry,
             "--secret", self.secret, *args],
            self.directory,
            self.processes,
            twistd=self.twistd,
        )  # fmt: skip

    def add_server(self, name: str, registry: str | None = None) -> Server:
        """
        One more server (not started), registering with C{registry}
        (default: the cluster's).
        """
        daemon = self._daemon(
            name, "cim-server", registry or self.registry, self.server_args
        )
        self.servers[name] = server = Server(daemon)
        return server

    def daemons(self) -> list[Daemon]:
        return [self.route] + [s.daemon for s in self.servers.values()]

    @property
    def route_port(self) -> int:
        return self.route.ports["route"]

    @property
    def url(self) -> str:
        return self.route.url()

    # Starting

    def _start_all(self, servers: int) -> None:
        if not self.servers:
            for i in range(servers):
                self.add_server(f"server{i + 1}")
        for daemon in self.daemons():
            daemon.start()

    async def start(self, servers: int = 2) -> Cluster:
        """
        Start C{servers} servers (unless added already) and the route, all
        at once; wait until each is ready and the route lists every server.
        """
        self._start_all(servers)
        for daemon in self.daemons():
            await daemon.wait_ready(self.reactor)
        await self.wait_listed(set(self.servers))
        return self

    def start_blocking(self, servers: int = 2) -> Cluster:
        """
        L{start}, blocking.
        """
        self._start_all(servers)
        for daemon in self.daemons():
            daemon.wait_ready_blocking()
        self.wait_listed_blocking(set(self.servers))
        return self

    async def start_server(self, name: str) -> Server:
        """
        Add a server and start it; wait until it is ready (the route may
        not list it yet).
        """
        server = self.add_server(name)
        server.daemon.start()
        await server.daemon.wait_ready(self.reactor)
        return server

    # Asking the route

    def _lists(self, health: dict[str, Any], names: set[str]) -> bool:
        wanted = sorted(self.servers[n].address for n in names)
        return bool(sorted(health["dataBody"]["servers"]) == wanted)

    async def health(self) -> dict[str, Any]:
        _, body = await call(self.reactor, f"{self.url}/health", timeout=5)
        return body

    async def wait_listed(self, names: set[str], deadline: float = DEADLINE) -> None:
        """
        Wait until the route's registry lists exactly the servers C{names}.
        """

        async def check() -> bool:
            return self._lists(await self.health(), names)

        await wait_until(
            self.reactor,
            check,
            f"the route to list {sorted(names)}",
            deadline,
            0.1,
            errors=(Exception,),
        )

    def wait_listed_blocking(self, names: set[str], deadline: float = DEADLINE) -> None:
        """
        L{wait_listed}, blocking.
        """
        wait_blocking(
            lambda: self._lists(get_json(f"{self.url}/health"), names),
            f"the route to list {sorted(names)}",
            deadline,
            0.1,
            errors=(Exception,),
        )

    async def online(self) -> set[int]:
        """
        The ids of the users the route says are online.
        """
        _, body = await call(self.reactor, f"{self.url}/onlineUser", timeout=5)
        return {int(u["userId"]) for u in body["dataBody"]}

    def server_of(self, client: Any) -> str:
        """
        The name of the server a library client is connected to.
        """
        assert client.server is not None
        for name, server in self.servers.items():
            if server.daemon.ports.get("client") == client.server[1]:
                return name
        raise AssertionError(f"no server on {client.server}")

    # Watching

    def pids(self) -> dict[str, int]:
        return {d.name: d.process.pid for d in self.daemons() if d.process is not None}

    def assert_running(self) -> None:
        for daemon in self.daemons():
            assert daemon.running, f"{daemon.name} exited:\n{daemon.log_tail()}"

    def logs(self) -> dict[str, str]:
        return {daemon.name: daemon.log_text() for daemon in self.daemons()}

    # Stopping

    def _processes(self) -> list[subprocess.Popen[bytes]]:
        return [d.process for d in self.daemons() if d.process is not None]

    def stop_blocking(self) -> None:
        """
        Stop every daemon (blocking).
        """
        self.processes.terminate(self._processes())

    async def stop(self) -> None:
        """
        Stop every daemon, with the reactor running (for daemons that reach
        a service through it, see L{tests.kit.net.Link}).
        """
        await self.processes.terminate_async(self.reactor, self._processes())
