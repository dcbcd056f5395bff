"""
What a write to a client's connection costs the IM server, in one process:
Twisted's write path (a writer registered with the reactor per connection
and turn) against L{cim.turnflush} (the turn's bytes sent straight
to the socket at the next turn).

    .venv/bin/python -m bench.flushmicro [--twisted] [--connections N] [--turns N]

Each turn, 100 connections of C{--connections} (each a UNIX socket pair
under a L{twisted.internet.tcp.Server}, as a TCP connection's transport)
are written one or two 150-byte frames; the other ends are read at the
start of every turn.  The figure is microseconds of this process's CPU
per write, the reads included.  Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import random
import socket
import time
from typing import Any

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor, tcp  # noqa: E402

import cim.server.protocol as protocol_module  # noqa: E402
import cim.turnflush as turnflush  # noqa: E402
from cim.codec import encode_framed  # noqa: E402
from cim.message import Command, Frame  # noqa: E402


class _Server:
    def connection_made(self, link: Any, peer: str) -> object:
        return object()

    def connection_lost(self, conn: Any, clean: bool) -> None:
        pass

    def overflowed(self, conn: Any, unsent: int) -> None:
        pass


class _Address:
    host = "10.0.0.1"
    port = 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--twisted", action="store_true", help="Twisted's path")
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--turns", type=int, default=3000)
    options = parser.parse_args()
    if options.twisted:
        turnflush.plain_tcp = lambda transport: None  # type: ignore[assignment]
    pairs = []
    for index in range(options.connections):
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        protocol = protocol_module.ClientConnectionProtocol(_Server(), 1024)  # type: ignore[arg-type]
        transport = tcp.Server(ours, protocol, ("10.0.0.1", 1), None, index, reactor)  # type: ignore[arg-type]
        transport.getPeer = _Address  # type: ignore[assignment,method-assign]
        transport.setTcpNoDelay = lambda enabled: None  # type: ignore[method-assign]
        protocol.makeConnection(transport)
        pairs.append((protocol, theirs))
    frame = encode_framed(Frame(Command.MESSAGE, req_msg="x" * 150))
    rng = random.Random(1)
    warm = 200
    state = {"turn": 0, "writes": 0, "start": 0.0}

    def turn() -> None:
        done = state["turn"]
        if done == warm:
            state["start"] = time.process_time()
            state["writes"] = 0
        if done == options.turns:
            spent = time.process_time() - state["start"]
            print(
                f"{'twisted' if options.twisted else 'turn flush'}: "
                f"{spent / state['writes'] * 1e6:.2f} us of CPU per write"
            )
            reactor.stop()  # type: ignore[attr-defined]
            return
        state["turn"] = done + 1
        for _, theirs in pairs:
            try:
                theirs.recv(1 << 16)
            except BlockingIOError:
                pass
        for protocol, _ in rng.sample(pairs, 100):
            protocol._write(frame)
            state["writes"] += 1
            if rng.random() < 0.5:
                protocol._write(frame)
                state["writes"] += 1
        reactor.callLater(0, turn)  # type: ignore[attr-defined]

    reactor.callLater(0.1, turn)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
