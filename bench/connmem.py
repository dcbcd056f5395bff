"""
What one logged-in idle client connection costs an IM server in Python
memory, measured with C{tracemalloc} in one process (no Redis, no route):

    python -m bench.connmem [--connections N] [--loopback] [--top K]

An L{IMServer} on the memory store takes C{N} connections, each logging in
with a token (no conversations), after a few that warm up what every later
one shares (code imported on first use, caches).  The figure is what the
heap grew by, per connection, once they are all logged in; C{--top} lists
where it went, by line.

By default the connections are L{StringTransport}s, as in the unit tests:
the figure is the server's own structures.  With C{--loopback} they are
real TCP connections on 127.0.0.1 through the daemon's wrapping factory
(L{cim.limits_net.LimitedFactory}): the figure also holds Twisted's
transport (C{tcp.Server}, the socket object, the reactor's tables), and the
process's resident memory is reported too.  The clients then run in a
child process, so their memory is not counted.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import tracemalloc
from collections.abc import Callable
from typing import Any

from cim.codec import encode_framed
from cim.interfaces import ServerAddress
from cim.message import Command, Frame
from cim.server.core import IMServer
from cim.store.memory import MemoryStore

#: Connections that log in before the measure starts.
WARM_UP = 32


class _NoPusher:
    def push(self, *args: object) -> Any:
        raise AssertionError("no pushes in this measure")

    push_read = push


def _fired(d: Any) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the memory store answers at once"
    return out[0]


def _logins(
    store: MemoryStore, here: str, count: int, prefix: str
) -> list[tuple[int, str, str]]:
    """
    Register C{count} users and give each a session here and a token.
    """
    out = []
    for i in range(count):
        name = f"{prefix}{i}"
        user_id = _fired(store.register(name)).user_id
        session, _ = _fired(
            store.claim_session(user_id, name, here, 600.0, replace=True)
        )
        token = _fired(store.issue_token(user_id, here, session.session_id, 3600.0))
        out.append((user_id, name, token))
    return out


def _login_frame(user_id: int, name: str, token: str) -> bytes:
    return encode_framed(
        Frame(cmd=Command.LOGIN_REQUEST, request_id=user_id, req_msg=name, token=token)
    )


def _heap() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def measure_memory(count: int, top: int = 0) -> dict[str, Any]:
    """
    Log C{count} connections in over L{StringTransport}s.

    @return: the heap growth per connection (C{"per_connection"}, bytes)
        and the lines it came from (C{top} of them).
    """
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from cim.server.protocol import ClientConnectionFactory

    clock = Clock()
    clock.advance(1_700_000_000)
    store = MemoryStore(clock)
    address = ServerAddress("127.0.0.1", 11211, 8081)
    server = IMServer(clock, store, address, _NoPusher())  # type: ignore[arg-type]
    factory = ClientConnectionFactory(server, 64 * 1024)
    users = _logins(store, str(address), WARM_UP + count, "m")
    held: list[Any] = []

    def connect(user: tuple[int, str, str], port: int) -> None:
        protocol = factory.buildProtocol(None)
        transport = StringTransport(
            peerAddress=IPv4Address("TCP", "10.1.1.1", 1024 + port)
        )
        protocol.makeConnection(transport)
        protocol.dataReceived(_login_frame(*user))
        assert transport.value(), "no LOGIN_RESPONSE"
        # What the login wrote went to the client.
        transport.clear()
        held.append(transport)

    for k, user in enumerate(users[:WARM_UP]):
        connect(user, k)

    def connect_measured() -> None:
        for k, user in enumerate(users[WARM_UP:]):
            connect(user, WARM_UP + k)

    return _measured(
        connect_measured,
        count,
        top,
        lambda: len(server.users) == WARM_UP + count,
    )


def _measured(
    run: Callable[[], object], count: int, top: int, check: Callable[[], bool]
) -> dict[str, Any]:
    tracemalloc.start(1)
    try:
        before_heap = _heap()
        before = tracemalloc.take_snapshot() if top else None
        run()
        assert check(), "not every connection logged in"
        after_heap = _heap()
        lines = []
        if before is not None:
            after = tracemalloc.take_snapshot()
            for stat in after.compare_to(before, "lineno")[:top]:
                frame = stat.traceback[0]
                lines.append(
                    (
                        f"{frame.filename.rsplit('site-packages/', 1)[-1]}:"
                        f"{frame.lineno}",
                        stat.size_diff / count,
                        stat.count_diff / count,
                    )
                )
    finally:
        tracemalloc.stop()
    return {"per_connection": (after_heap - before_heap) / count, "lines": lines}


def measure_loopback(
    count: int, top: int = 0, plain_port: bool = False
) -> dict[str, Any]:
    """
    Log C{count} connections in over real TCP connections, from a child
    process, to a port such as the daemons listen with (Twisted's own
    C{listenTCP} when C{plain_port}).

    @return: as L{measure_memory}, and the resident memory growth per
        connection (C{"rss_per_connection"}, measured without tracing).
    """
    import psutil
    from twisted.internet import reactor

    from cim.limits_net import ConnectionLimits, LimitedFactory
    from cim.listen import server_endpoint
    from cim.server.protocol import ClientConnectionFactory

    store = MemoryStore(reactor)  # type: ignore[arg-type]
    limits = ConnectionLimits(0)
    factory = LimitedFactory(
        ClientConnectionFactory(None, 64 * 1024),  # type: ignore[arg-type]
        limits,
        0,
        reactor,  # type: ignore[arg-type]
        "clients",
    )
    if plain_port:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=1024)  # type: ignore[attr-defined,arg-type]
    else:
        # As the daemons listen (with cim.slimtcp's lighter transport).
        listening = server_endpoint(reactor, 0, "127.0.0.1", 1024).listen(factory)
        port = _fired(listening)
    address = ServerAddress("127.0.0.1", port.getHost().port, 8081)  # type: ignore[attr-defined]
    server = IMServer(reactor, store, address, _NoPusher())  # type: ignore[arg-type]
    factory.wrappedFactory.server = server
    # Twice: once for the resident memory, then traced.
    warm, plain, traced = (
        _logins(store, str(address), n, p)
        for n, p in ((WARM_UP, "w"), (count, "p"), (count, "t"))
    )
    results: dict[str, Any] = {}
    clients = _Clients(address.port)

    def logged_in(n: int) -> Callable[[], bool]:
        return lambda: len(server.users) == n

    def spin(until: Callable[[], bool]) -> None:
        while not until():
            reactor.iterate(0.05)  # type: ignore[attr-defined]

    try:
        clients.start(warm)
        spin(logged_in(WARM_UP))
        proc = psutil.Process()
        gc.collect()
        rss = proc.memory_info().rss
        clients.start(plain)
        spin(logged_in(WARM_UP + count))
        gc.collect()
        rss_per_connection = (proc.memory_info().rss - rss) / count

        def connect_measured() -> None:
            clients.start(traced)
            spin(logged_in(WARM_UP + 2 * count))

        results = _measured(
            connect_measured,
            count,
            top,
            logged_in(WARM_UP + 2 * count),
        )
        results["rss_per_connection"] = rss_per_connection
    finally:
        clients.stop()
        port.stopListening()
    return results


class _Clients:
    """
    Client connections held by a child process: each batch is sent to it
    as login frames; it connects one socket per login and keeps them until
    it is stopped.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        parent, child = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            parent.close()
            self._child(child)
            os._exit(0)
        child.close()
        self.pid = pid
        self.control = parent

    def start(self, users: list[tuple[int, str, str]]) -> None:
        frames = [_login_frame(*u) for u in users]
        # The header: each frame's size (the child need not parse them).
        sizes = " ".join(str(len(f)) for f in frames)
        self.control.sendall(f"{sizes}\n".encode() + b"".join(frames))

    def stop(self) -> None:
        self.control.close()
        os.waitpid(self.pid, 0)

    def _child(self, control: socket.socket) -> None:
        held = []
        reader = control.makefile("rb")
        while True:
            header = reader.readline()
            if not header:
                return
            for size in map(int, header.split()):
                frame = reader.read(size)
                s = socket.create_connection(("127.0.0.1", self.port))
                s.sendall(frame)
                held.append(s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--loopback", action="store_true")
    parser.add_argument(
        "--plain-port",
        action="store_true",
        help="with --loopback: listen with Twisted's listenTCP, not as the daemons do",
    )
    parser.add_argument("--top", type=int, default=0)
    args = parser.parse_args(argv)
    if args.loopback:
        got = measure_loopback(args.connections, args.top, args.plain_port)
    else:
        got = measure_memory(args.connections, args.top)
    print(
        f"{args.connections} logged-in idle connections "
        f"({'loopback TCP' if args.loopback else 'StringTransport'}): "
        f"Python heap {got['per_connection']:,.0f} bytes each"
        + (
            f", resident {got['rss_per_connection']:,.0f} bytes each"
            if "rss_per_connection" in got
            else ""
        )
    )
    for where, size, count in got["lines"]:
        print(f"  {size:8,.1f} B {count:6.2f} blocks  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
