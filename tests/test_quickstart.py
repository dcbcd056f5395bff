"""
README's quick start, run as a person runs it: a standalone node started as
C{make run} starts it, then two consoles, C{.venv/bin/twistd -n cim-client
--user alice} and C{--user bob}, from the same folder, with no other
option, each in its own pseudo-terminal.  The test types into them and
reads their screens through a terminal emulator (pyte), waiting for what
it expects with a deadline (no sleeps), then runs README's library example.

The folder is a fresh temporary one holding C{.venv} (a link to this
checkout's) and nothing else; C{HOME} points into it, so that C{~/.cim} is
new.  When the quick start's ports (8083, 11211, 8084) are taken on this
machine, the node gets free ones and the consoles C{--route}: the only
option added, and only then.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pyte
import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.prefix)
README = (ROOT / "README.rst").read_text("utf-8")
MAKEFILE = (ROOT / "Makefile").read_text("utf-8")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

#: How long anything may take to show.
DEADLINE = 30.0


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Console:
    """
    A process on a pseudo-terminal of 100 x 30, its screen kept by pyte.
    """

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        self.process = subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        self.master = master
        self.screen = pyte.Screen(100, 30)
        self.stream = pyte.ByteStream(self.screen)
        self.output = b""

    def read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return
        try:
            data = os.read(self.master, 65536)
        except OSError as e:
            if e.errno != errno.EIO:  # EIO: the process is gone
                raise
            data = b""
        self.output += data
        self.stream.feed(data)

    @property
    def text(self) -> str:
        return "\n".join(row.rstrip() for row in self.screen.display)

    def wait_for(self, pattern: str, deadline: float = DEADLINE) -> re.Match[str]:
        """
        Read until C{pattern} (a regular expression) is on the screen.
        """
        end = time.monotonic() + deadline
        while True:
            found = re.search(pattern, self.text, re.MULTILINE)
            if found:
                return found
            if time.monotonic() > end:
                raise AssertionError(f"{pattern!r} not on the screen:\n{self.text}")
            if self.process.poll() is not None:
                self.read(0.1)
                found = re.search(pattern, self.text, re.MULTILINE)
                if found:
                    return found
                raise AssertionError(
                    f"the process ended ({self.process.returncode}) before "
                    f"{pattern!r}:\n{self.text}"
                )
            self.read(0.1)

    def type(self, keys: str | bytes) -> None:
        os.write(self.master, keys.encode() if isinstance(keys, str) else keys)

    def wait_exit(self, deadline: float = DEADLINE) -> int:
        end = time.monotonic() + deadline
        while self.process.poll() is None:
            if time.monotonic() > end:
                raise AssertionError(f"still running:\n{self.text}")
            self.read(0.1)
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(10)
        os.close(self.master)


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / ".venv").symlink_to(VENV)
    (tmp_path / "home").mkdir()
    yield tmp_path


def test_the_quick_start_as_written(folder: Path) -> None:
    # What README says to run, and what `make run` runs.
    assert "    make run\n" in README
    for user in ("alice", "bob"):
        assert f"    .venv/bin/twistd -n cim-client --user {user}\n" in README
    run = "$(BIN)/twistd --pidfile=.run/standalone.pid -n cim-standalone"
    assert run in MAKEFILE

    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CIM_", "TWISTED"))
    }
    env.update(HOME=str(folder / "home"), TERM="xterm-256color", LANG="C.UTF-8")
    node = [".venv/bin/twistd", "--pidfile=.run/standalone.pid", "-n", "cim-standalone"]
    extra: list[str] = []
    route = "http://127.0.0.1:8083"
    if not all(port_free(p) for p in (8083, 11211, 8084, 8081)):
        route_port, im_port = free_port(), free_port()
        node += [
            f"--route-port={route_port}",
            f"--port={im_port}",
            f"--http-port={free_port()}",
            "--ws-port=off",
        ]
        route = f"http://127.0.0.1:{route_port}"
        extra = [f"--route={route}"]
    (folder / ".run").mkdir()
    log = folder / "standalone.log"  # as make run's terminal would show it
    with log.open("wb") as output:
        standalone = subprocess.Popen(
            node,
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    consoles: list[Console] = []
    try:
        # Up once the route answers its health check.
        end = time.monotonic() + DEADLINE
        while not _answers(route):
            assert time.monotonic() < end, log.read_text("utf-8", "replace")
            assert standalone.poll() is None, log.read_text("utf-8", "replace")
            select.select([], [], [], 0.1)

        alice = Console(
            [".venv/bin/twistd", "-n", "cim-client", "--user", "alice", *extra],
            folder,
            env,
        )
        consoles.append(alice)
        alice.wait_for(r"logged in as alice \(id \d+\)")
        bob = Console(
            [".venv/bin/twistd", "-n", "cim-client", "--user", "bob", *extra],
            folder,
            env,
        )
        consoles.append(bob)
        bob.wait_for(r"logged in as bob \(id \d+\)")
        # Neither client wrote a pid file; the node's is in .run.
        assert not (folder / "twistd.pid").exists()
        assert (folder / ".run" / "standalone.pid").exists()
        # No two clients share a log file; none logs into the console.
        logs = sorted((folder / "home" / ".cim" / "state" / "logs").rglob("*.log"))
        assert len(logs) == 2
        assert "Log opened" not in alice.text

        # A plain line goes nowhere before :to says where.
        bob.wait_for(r"\(:to whom\?\)>$")
        bob.type("hello?\r")
        bob.wait_for(r"error: not sent: say to whom first")

        alice.type(":to @Bob\r")
        alice.wait_for(r"plain lines go to @bob now")
        alice.wait_for(r"to @bob>$")
        bob.type("half a li")  # bob is typing when alice's message arrives
        alice.type("hi bob, 你好\r")
        alice.wait_for(r"\(private\) alice -> bob: hi bob, 你好")
        bob.wait_for(r"\[\d\d:\d\d:\d\d\] \(private\) alice: hi bob, 你好")
        bob.wait_for(r"\(:to whom\?\)> half a li$")
        bob.type("ne\x15@alice hi alice\r")  # Ctrl-U, then a private message
        alice.wait_for(r"\(private\) bob: hi alice")
        # Bob read alice's message (it was on his screen; he answered).
        alice.wait_for(r"✓ bob read your messages up to: hi bob")
        # Arrows edit; they are never sent as text.
        alice.type("\x1b[A")
        alice.wait_for(r"to @bob> hi bob, 你好$")
        alice.type("\x15")
        bob.type(":history @alice\r")
        bob.wait_for(r"alice: hi bob, 你好[\s\S]*bob -> alice: hi alice")

        # README's library example, as written, while bob is online.
        example = _library_example().replace("http://127.0.0.1:8083", route)
        (folder / "mybot.py").write_text(example, "utf-8")
        ran = subprocess.run(
            [".venv/bin/python", "mybot.py"],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ran.returncode == 0, ran.stderr
        bob.wait_for(r"\(private\) mybot: hello")

        # Ctrl-D quits; the terminal is left as it was.
        for console in (alice, bob):
            console.type("\x04")
            console.wait_for(r"bye")
            assert console.wait_exit() == 0
        assert b"\x1b[?2004l" in alice.output
    finally:
        for console in consoles:
            console.kill()
        if standalone.poll() is None:
            os.killpg(standalone.pid, signal.SIGTERM)
            standalone.wait(10)


def _answers(route: str) -> bool:
    """
    Whether the route answers its health check.
    """
    import urllib.request

    try:
        with urllib.request.urlopen(route + "/health", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _library_example() -> str:
    """
    The client library's example in README, as a program.
    """
    start = README.index("This one runs\nas it is")
    block = README[README.index("::\n\n", start) + 4 :]
    lines = []
    for line in block.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines)


def test_demo_help() -> None:
    ran = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ran.returncode == 0
    assert "usage" in ran.stdout.lower() and "standalone" in ran.stdout
