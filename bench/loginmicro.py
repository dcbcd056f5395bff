"""
What a TCP login costs an IM server and Redis, in one process: the second
half of the benchmark's C{login} scenario (a fresh user, its session and
token opened as the route's C{/login} opens them, connects and sends its
login frame) without the route, the load generators or another daemon's
noise.

    .venv/bin/python -m bench.loginmicro --redis redis://127.0.0.1:6379/5
        [--logins N] [--concurrency N] [--rounds N] [--profile FILE]

An L{IMServer} on a L{RedisStore} listens on 127.0.0.1 as the daemons do
(L{cim.listen.server_endpoint}, L{cim.limits_net.LimitedFactory}); a child
process holds the clients: for each wave of C{concurrency} users it opens
one socket per user, sends the login frame, reads the LOGIN_RESPONSE, and
keeps the socket open.  After each round the clients hang up (the server
saves cursors and releases the sessions) and the next round logs in new
users.

The figures are microseconds of this process's CPU time per login (the
logins, then apart the hang-ups), and Redis's own CPU time and commands
per login (C{INFO}).  The Redis database named by C{--redis} is emptied
first: give it one of its own.  The garbage collector runs as in the
daemons (L{cim.gcpolicy}).  Not a test: nothing is asserted beyond each
login's answer.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from cim.codec import decode, encode_framed
from cim.gcpolicy import GC_YOUNG, tune_gc
from cim.interfaces import ServerAddress
from cim.message import Command, Frame

#: Users that log in before the measure starts.
WARM_UP = 128


class _NoPusher:
    def push(self, *args: object) -> Any:
        raise AssertionError("no pushes in this measure")

    push_read = push


def _login_frame(user_id: int, name: str, token: str) -> bytes:
    return encode_framed(
        Frame(
            cmd=Command.LOGIN_REQUEST,
            request_id=user_id,
            req_msg=name,
            token=token,
            device="d0",
        )
    )


class _Clients:
    """
    Client sockets in a child process.  C{login(frames)}: one socket per
    frame, all sent, then every answer read (a LOGIN_RESPONSE each);
    C{hang_up()}: close them all.  The child answers each order with one
    byte once done.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        parent, child = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            parent.close()
            try:
                self._child(child)
            finally:
                os._exit(0)
        child.close()
        self.pid = pid
        self.control = parent
        self.control.setblocking(False)

    def login(self, frames: list[bytes]) -> None:
        header = " ".join(str(len(f)) for f in frames)
        self.control.setblocking(True)
        self.control.sendall(f"L {header}\n".encode() + b"".join(frames))
        self.control.setblocking(False)

    def hang_up(self) -> None:
        self.control.setblocking(True)
        self.control.sendall(b"H\n")
        self.control.setblocking(False)

    def done(self) -> bool:
        try:
            return bool(self.control.recv(1))
        except BlockingIOError:
            return False

    def stop(self) -> None:
        self.control.close()
        os.waitpid(self.pid, 0)

    def _child(self, control: socket.socket) -> None:
        held: list[socket.socket] = []
        reader = control.makefile("rb")
        while True:
            header = reader.readline()
            if not header:
                return
            if header.startswith(b"H"):
                for s in held:
                    s.close()
                held = []
                control.sendall(b"h")
                continue
            wave = []
            for size in map(int, header.split()[1:]):
                frame = reader.read(size)
                s = socket.create_connection(("127.0.0.1", self.port))
                s.sendall(frame)
                wave.append(s)
            for s in wave:
                _read_answer(s)
            held += wave
            control.sendall(b"l")


def _read_answer(s: socket.socket) -> None:
    """
    Read one frame from C{s}: it must be a LOGIN_RESPONSE.
    """
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            raise SystemExit("the server hung up before answering")
        data += chunk
        size, shift, i = 0, 0, 0
        while i < len(data):
            byte = data[i]
            size |= (byte & 0x7F) << shift
            shift += 7
            i += 1
            if not byte & 0x80:
                break
        else:
            continue
        if len(data) >= i + size:
            frame = decode(data[i : i + size])
            if frame.cmd != Command.LOGIN_RESPONSE:
                raise SystemExit(f"answered {frame.cmd.name}: {frame.error_reason}")
            return


def _redis_cpu(info: str) -> float:
    fields = dict(
        line.split(":", 1)
        for line in info.splitlines()
        if ":" in line and line[0] != "#"
    )
    return float(fields["used_cpu_user_main_thread"]) + float(
        fields["used_cpu_sys_main_thread"]
    )


def _commands(info: str) -> int:
    total = 0
    for line in info.splitlines():
        if line.startswith("cmdstat_"):
            calls = line.split(":", 1)[1].split(",")[0]
            total += int(calls.split("=")[1])
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--redis",
        default=os.environ.get("CIM_TEST_REDIS", "redis://127.0.0.1:6379/0"),
        help="the Redis database to use (emptied first)",
    )
    parser.add_argument("--logins", type=int, default=2048, help="per round")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", help="write a cProfile of the measured logins")
    args = parser.parse_args(argv)

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from cim.limits_net import ConnectionLimits, LimitedFactory
    from cim.listen import server_endpoint
    from cim.server.core import IMServer
    from cim.server.protocol import ClientConnectionFactory
    from cim.store.redis import connect_redis

    def wait(d: Any) -> Any:
        out: list[Any] = []
        d.addBoth(out.append)
        while not out:
            reactor.iterate(0.01)  # type: ignore[attr-defined]
        if hasattr(out[0], "raiseException"):
            out[0].raiseException()
        return out[0]

    def spin(until: Callable[[], bool]) -> None:
        while not until():
            reactor.iterate(0.005)  # type: ignore[attr-defined]

    # Logged as twistd logs a daemon's events (to a file).
    log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115
        "w", prefix="loginmicro-", suffix=".log", encoding="utf-8"
    )
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(log_file)], redirectStandardIO=False
    )
    # The Redis pool connects once the reactor runs: it runs here one
    # iteration at a time.
    reactor.startRunning(installSignalHandlers=False)  # type: ignore[attr-defined]
    # (Whatever the database held, of this release or another: emptied.)
    store = wait(connect_redis(args.redis, reactor, check_layout=False))  # type: ignore[arg-type]
    wait(store._command("FLUSHDB"))
    factory = LimitedFactory(
        ClientConnectionFactory(None, 64 * 1024),  # type: ignore[arg-type]
        ConnectionLimits(0),
        0,
        reactor,  # type: ignore[arg-type]
        "clients",
    )
    port = wait(server_endpoint(reactor, 0, "127.0.0.1", 4096).listen(factory))
    address = ServerAddress("127.0.0.1", port.getHost().port, 8081)
    server = IMServer(reactor, store, address, _NoPusher())  # type: ignore[arg-type]
    factory.wrappedFactory.server = server
    server.start()
    here = str(address)

    made = 0

    def users(count: int) -> list[bytes]:
        """
        C{count} new users, each with a session here and a token, opened
        as the route's /login opens them.
        """
        nonlocal made
        frames = []
        for _ in range(count):
            made += 1
            name = f"u{made}"
            account = wait(store.register(name))
            _, _, token = wait(
                store.open_session(account.user_id, name, here, 30.0, 60.0, device="d0")
            )
            frames.append(_login_frame(account.user_id, name, token))
        return frames

    clients = _Clients(address.port)

    def run(frames: list[bytes]) -> None:
        for start in range(0, len(frames), args.concurrency):
            clients.login(frames[start : start + args.concurrency])
            spin(clients.done)

    def hang_up(expected_users: int) -> None:
        clients.hang_up()
        spin(clients.done)
        spin(lambda: len(server.users) == expected_users and not server.connections)
        # The releases' answers.
        for _ in range(200):
            reactor.iterate(0.001)  # type: ignore[attr-defined]

    tune_gc(GC_YOUNG)
    profile = cProfile.Profile() if args.profile else None
    try:
        run(users(WARM_UP))
        hang_up(0)
        logins, hangups, redis_us, commands = [], [], [], []
        for _ in range(args.rounds):
            frames = users(args.logins)
            gc.collect()
            info = wait(store._command("INFO", "all"))
            wait(store._command("CONFIG", "RESETSTAT"))
            if profile is not None:
                profile.enable()
            started = time.process_time()
            run(frames)
            logins.append((time.process_time() - started) / args.logins * 1e6)
            if profile is not None:
                profile.disable()
            after = wait(store._command("INFO", "all"))
            redis_us.append((_redis_cpu(after) - _redis_cpu(info)) / args.logins * 1e6)
            # (INFO itself counts one.)
            commands.append((_commands(after) - 1) / args.logins)
            assert len(server.users) == args.logins, len(server.users)
            started = time.process_time()
            hang_up(0)
            hangups.append((time.process_time() - started) / args.logins * 1e6)
    finally:
        clients.stop()
        port.stopListening()
        # The shutdown's triggers (the thread pool's stop among them).
        reactor.stop()  # type: ignore[attr-defined]
        for _ in range(10):
            reactor.iterate(0.01)  # type: ignore[attr-defined]
        log_file.close()
    if profile is not None:
        profile.dump_stats(args.profile)
    print(
        f"{args.rounds} rounds of {args.logins} TCP logins, {args.concurrency} at a "
        "time; per login:"
    )
    print("  server CPU us (login):  " + "  ".join(f"{v:6.1f}" for v in logins))
    print("  server CPU us (hang-up):" + "  ".join(f"{v:6.1f}" for v in hangups))
    print("  Redis CPU us (login):   " + "  ".join(f"{v:6.1f}" for v in redis_us))
    print("  Redis commands (login): " + "  ".join(f"{v:6.2f}" for v in commands))
    print(f"  best: server {min(logins):.1f} us, Redis {min(redis_us):.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
