"""
Run cim daemons as real C{twistd} processes, as a user would, for the
end-to-end tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

TWISTD = str(Path(sys.executable).with_name("twistd"))
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """
    A TCP port that was free a moment ago on the loopback interface.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """
    One C{twistd -n <plugin>} process with its log in C{directory}.
    """

    def __init__(
        self, name: str, plugin: str, args: list[str], directory: Path, env=None
    ) -> None:  # type: ignore[no-untyped-def]
        self.name = name
        self.plugin = plugin
        self.args = args
        self.directory = directory
        self.logfile = directory / f"{name}.log"
        self.env = dict(os.environ, **(env or {}))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                TWISTD,
                "-n",
                "--logfile",
                str(self.logfile),
                "--pidfile",
                "",
                self.plugin,
                *self.args,
            ],
            cwd=str(ROOT),
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )

    def wait_http(
        self, port: int, path: str = "/health", deadline: float = 20.0
    ) -> dict:
        """
        Block until C{GET path} on C{port} answers a success envelope.
        (Called from test set-up before the reactor-driven part of a test.)
        """
        import urllib.request

        end = time.monotonic() + deadline
        last: Exception | None = None
        while time.monotonic() < end:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}{path}", timeout=2
                ) as r:
                    body: dict = json.loads(r.read())
                    if body.get("code") == "9000":
                        return body
            except Exception as e:  # not up yet
                last = e
            time.sleep(0.1)
        raise TimeoutError(
            f"{self.name} not healthy on :{port}: {last}\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.logfile.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """
        C{kill -9}: no clean-up at all.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        """
        C{SIGTERM}, then C{SIGKILL} after a grace period.
        """
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()
