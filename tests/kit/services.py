"""
Private Redis and ZooKeeper servers, for tests that stop, kill or cut
them off (the shared test services of C{scripts/services.sh} keep their
fixed ports).

Neither can listen on port 0 and tell which port it got, so each picks a
free port, and picks another when its server could not bind it (someone
took it meanwhile): it checks that the server answering is its own (its
log, or its configuration), never just that something answers.  The port
stays the same across restarts, and so does the data (in C{directory}).
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.kit.cluster import LogWatch, Processes
from tests.kit.wait import DEADLINE, wait_blocking, wait_until

#: Tries at a port before giving up.
TRIES = 4


class PortTaken(Exception):
    """
    The server could not bind its port.
    """


def pick_port() -> int:
    """
    A loopback port that was free a moment ago (for the servers here only:
    they detect a port taken meanwhile and try another).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ask(port: int, command: bytes, timeout: float = 1.0) -> bytes:
    """
    Send C{command} to C{port} and read the answer until the server closes
    or C{timeout} passes (b"" when nothing listens).
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(command)
            chunks = []
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if command == b"PING\r\n":
                    break
            return b"".join(chunks)
    except OSError:
        return b""


def ruok(port: int) -> bool:
    """
    Whether a ZooKeeper on C{port} answers C{ruok} with C{imok}.
    """
    return _ask(port, b"ruok") == b"imok"


def redis_ping(port: int) -> bool:
    """
    Whether a Redis on C{port} answers C{PING} (its data loaded).
    """
    return _ask(port, b"PING\r\n").startswith(b"+PONG")


class _Service:
    """
    A server process on a port of its own choice (see the module
    docstring).
    """

    name = "service"

    def __init__(self, directory: Path, processes: Processes | None, log: Path) -> None:
        self.directory = directory
        self.processes = processes or Processes(directory)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        #: Where it says what it does.
        self.log = LogWatch(log)
        directory.mkdir(parents=True, exist_ok=True)

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _up(self) -> bool:
        """
        Whether this process (not another one) serves the port.
        """
        raise NotImplementedError

    def _taken(self) -> bool:
        """
        Whether the process that exited could not bind its port.
        """
        raise NotImplementedError

    def log_tail(self) -> str:
        return self.log.tail()

    def _ports(self) -> Iterator[int]:
        if self.port:
            yield self.port  # a restart: the same port
        else:
            for _ in range(TRIES):
                yield pick_port()

    def _spawn(self, port: int) -> None:
        assert not self.running, f"{self.name} is running"
        self.port = port
        self.log.mark()
        self.process = self.processes.spawn(
            self.name, self._argv(), self.directory / f"{self.name}.out"
        )

    def ready(self) -> bool:
        """
        @raise PortTaken: it exited, its port taken.
        @raise RuntimeError: it exited otherwise.
        """
        assert self.process is not None
        if self.process.poll() is not None:
            if self._taken():
                raise PortTaken(self.port)
            raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")
        return self._up()

    async def start(self, reactor: Any, deadline: float = DEADLINE) -> None:
        """
        Start it and wait, with the reactor running, until it serves.
        """
        for port in self._ports():
            self._spawn(port)
            try:
                await wait_until(
                    reactor, self.ready, f"{self.name} to start", deadline, 0.05
                )
                return
            except PortTaken:
                continue
        raise RuntimeError(f"{self.name} found no port:\n{self.log_tail()}")

    def start_blocking(self, deadline: float = DEADLINE) -> None:
        """
        L{start}, blocking.
        """
        for port in self._ports():
            self._spawn(port)
            try:
                wait_blocking(self.ready, f"{self.name} to start", deadline)
                return
            except PortTaken:
                continue
        raise RuntimeError(f"{self.name} found no port:\n{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """
        C{kill -9}.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop_blocking(self, grace: float = 10.0) -> None:
        if self.process is not None:
            self.processes.stop(self.process, grace)

    async def stop(self, reactor: Any, grace: float = 10.0) -> None:
        """
        C{SIGTERM}, waiting with the reactor running; C{SIGKILL} after
        C{grace} seconds.
        """
        if self.process is not None:
            await self.processes.terminate_async(reactor, [self.process], grace)


class RedisServer(_Service):
    """
    A private C{redis-server} with its append-only file fsynced on every
    write (C{--appendfsync always}, or C{appendfsync}) in C{directory}.
    """

    name = "redis"

    def __init__(
        self,
        directory: Path,
        processes: Processes | None = None,
        appendfsync: str = "always",
    ) -> None:
        super().__init__(directory, processes, directory / "redis.log")
        self.appendfsync = appendfsync

    def url(self, db: int = 0) -> str:
        assert self.port, "start it first"
        return f"redis://127.0.0.1:{self.port}/{db}"

    def _argv(self) -> list[str]:
        return [
            "redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
            "--dir", str(self.directory), "--appendonly", "yes",
            "--appendfsync", self.appendfsync, "--save", "",
            "--logfile", str(self.log.path),
        ]  # fmt: skip

    def _up(self) -> bool:
        return "Ready to accept connections" in self.log.since()

    def _taken(self) -> bool:
        return "Address already in use" in self.log.since()


class ZooKeeperServer(_Service):
    """
    A private standalone ZooKeeper (Debian's), whose sessions last at most
    C{max_session_ms} of silence.

    @ivar hosts: C{"127.0.0.1:port"}, for kazoo (once started).
    """

    name = "zookeeper"
    CLASSPATH = "/etc/zookeeper/conf:/usr/share/java/*"
    MAIN = "org.apache.zookeeper.server.ZooKeeperServerMain"

    def __init__(
        self,
        directory: Path,
        processes: Processes | None = None,
        max_session_ms: int = 60000,
    ) -> None:
        # Debian's ZooKeeper logs nowhere: its output is all there is.
        super().__init__(directory, processes, directory / f"{self.name}.out")
        self.max_session_ms = max_session_ms
        self.data = directory / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self._config = directory / "zoo.cfg"

    @property
    def hosts(self) -> str:
        assert self.port, "start it first"
        return f"127.0.0.1:{self.port}"

    def _argv(self) -> list[str]:
        self._config.write_text(
            "tickTime=500\n"
            "minSessionTimeout=1000\n"
            f"maxSessionTimeout={self.max_session_ms}\n"
            f"dataDir={self.data}\n"
            f"clientPort={self.port}\n"
            "clientPortAddress=127.0.0.1\n"
            "admin.enableServer=false\n"
            "4lw.commands.whitelist=ruok,conf\n"
        )
        return [
            "java", "-Xmx128m", f"-Dzookeeper.log.dir={self.directory}",
            "-cp", self.CLASSPATH, self.MAIN, str(self._config),
        ]  # fmt: skip

    def _up(self) -> bool:
        # Its configuration names its data directory: it is this one.
        return f"dataDir={self.data}".encode() in _ask(self.port, b"conf")

    def _taken(self) -> bool:
        # Its output does not say: an early exit on the first start is
        # taken for a port taken, and another port is tried.
        return True
