"""
A private ZooKeeper server for a test: the Debian ZooKeeper on a free
loopback port, with its data in a directory of the test's, that the test can
stop and start again (its sessions and nodes survive a restart, as on a real
server).

Waiting is done with the reactor running (C{task.deferLater}), so the
registries under test keep working while the server starts or stops.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any

from twisted.internet import task

CLASSPATH = "/etc/zookeeper/conf:/usr/share/java/*"
MAIN = "org.apache.zookeeper.server.ZooKeeperServerMain"


def free_port() -> int:
    """
    @return: a TCP port on 127.0.0.1 that nothing listens on (now).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def ruok(port: int) -> bool:
    """
    @return: whether the server on C{port} answers C{ruok} with C{imok}
        (blocks at most a second, on loopback).
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(b"ruok")
            return s.recv(16) == b"imok"
    except OSError:
        return False


class ZooKeeperServer:
    """
    One standalone ZooKeeper process.

    @ivar port: its client port (the same across restarts).
    @ivar hosts: C{"127.0.0.1:port"}, for kazoo.
    """

    def __init__(self, reactor: Any, directory: Path) -> None:
        self._reactor = reactor
        self._directory = directory
        self.port = free_port()
        self.hosts = f"127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None
        self._config = directory / "zoo.cfg"
        data = directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        self._config.write_text(
            "tickTime=500\n"
            "minSessionTimeout=1000\n"
            "maxSessionTimeout=60000\n"
            f"dataDir={data}\n"
            f"clientPort={self.port}\n"
            "clientPortAddress=127.0.0.1\n"
            "admin.enableServer=false\n"
            "4lw.commands.whitelist=ruok\n"
        )
        self._log = directory / "zookeeper.log"

    async def start(self, seconds: float = 30.0) -> None:
        """
        Start the server and wait until it answers C{ruok}.

        @raise RuntimeError: it exited or did not answer within C{seconds}
            (the message ends with its log).
        """
        assert self._process is None, "already running"
        self._process = process = self._spawn()
        deadline = self._reactor.seconds() + seconds
        while not ruok(self.port):
            if process.poll() is not None or self._reactor.seconds() > deadline:
                await self.stop()
                tail = self._log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"ZooKeeper did not start:\n{tail}")
            await task.deferLater(self._reactor, 0.1)

    def _spawn(self) -> subprocess.Popen[bytes]:
        """
        Start the server process (which returns at once).
        """
        with self._log.open("ab") as log:
            return subprocess.Popen(
                [
                    "java",
                    "-Xmx128m",
                    f"-Dzookeeper.log.dir={self._directory}",
                    "-cp",
                    CLASSPATH,
                    MAIN,
                    str(self._config),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def stop(self, seconds: float = 10.0) -> None:
        """
        Stop the server (SIGTERM, then SIGKILL after C{seconds}), and
        wait for it to exit.
        """
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        deadline = self._reactor.seconds() + seconds
        while process.poll() is None:
            if self._reactor.seconds() > deadline:
                process.kill()
                process.wait()
                break
            await task.deferLater(self._reactor, 0.05)
