"""
What an idle WebSocket connection keeps in the server's memory, counted by
C{tracemalloc} in one process: C{N} connections of the gateway
(L{cim.server.websocket}), half on each subprotocol, on a
L{twisted.internet.testing.StringTransport} each, first just open (the
adapter's own share), then logged in to the server core of
L{tests.serverkit} (the core's share too, with the memory store).

    .venv/bin/python -m bench.wsmem [-n N] [--top K]

The issue's budget is 8 KB of resident memory per idle connection, measured
by the C{ws} scenario of L{bench.harness} on a real server (which adds the
kernel's socket buffers and the reactor's own).  Not a test: nothing is
asserted.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tracemalloc
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from cim.message import Command, Frame
from cim.server.websocket import JSON, PROTO, WebSocketGateway
from tests import wskit
from tests.serverkit import World


def open_connections(world: World, n: int) -> list[tuple[Any, StringTransport]]:
    gateway = WebSocketGateway(world.server, world.clock, 64 * 1024)
    out = []
    for i in range(n):
        address = IPv4Address("TCP", "10.1.1.2", 5000 + i)
        protocol = gateway.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        subprotocol = (PROTO, JSON)[i % 2]
        protocol.dataReceived(wskit.handshake((subprotocol,)))
        transport.clear()
        out.append((protocol, transport))
    return out


def log_in(world: World, connections: list[tuple[Any, StringTransport]]) -> None:
    from cim import codec

    for i, (protocol, transport) in enumerate(connections):
        name = f"user{i}"
        user_id = world.account(name)  # type: ignore[attr-defined]
        frame = Frame(
            cmd=Command.LOGIN_REQUEST,
            request_id=user_id,
            req_msg=name,
            token=world.token(user_id, name),
        )
        if protocol.binary:
            data = wskit.frame(wskit.BINARY, codec.encode(frame))
        else:
            data = wskit.frame(wskit.TEXT, codec.encode_json(frame).encode())
        protocol.dataReceived(data)
        transport.clear()


def measure(n: int, top: int) -> None:
    world = World()
    # Warm up: what every connection shares (imports, caches) is not theirs.
    log_in(world, open_connections(world, 20))
    gc.collect()
    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    connections = open_connections(world, n)
    gc.collect()
    opened = tracemalloc.take_snapshot()
    log_in(world, connections)
    gc.collect()
    logged_in = tracemalloc.take_snapshot()

    def per_connection(a: tracemalloc.Snapshot, b: tracemalloc.Snapshot) -> float:
        return sum(s.size_diff for s in b.compare_to(a, "filename")) / n

    # The transports are the test's, not the server's.
    transports = sum(sys.getsizeof(t) + sys.getsizeof(t.io) for _, t in connections)
    print(f"{n} idle WebSocket connections, half on each subprotocol")
    print(
        f"  open (the adapter):       {per_connection(before, opened):8.0f} bytes each"
        f" (of which StringTransport ~{transports / n:.0f})"
    )
    print(
        f"  logged in (adapter+core): {per_connection(before, logged_in):8.0f} bytes each"
    )
    protocol = connections[0][0]
    print(
        f"  a connection's own dict: {len(vars(protocol))} attributes, "
        f"{sys.getsizeof(vars(protocol))} bytes"
    )
    print(f"\ntop {top} allocation sites, logged in, per connection:")
    for stat in logged_in.compare_to(before, "lineno")[:top]:
        frame = stat.traceback[0]
        print(f"  {stat.size_diff / n:8.0f}  {frame.filename}:{frame.lineno}")
    del connections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    measure(args.n, args.top)


if __name__ == "__main__":
    main()
