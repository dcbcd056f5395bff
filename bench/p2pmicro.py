"""
What a private message costs the IM servers, in one process: the path of
the benchmark's C{p2p} scenario (two servers, clients chatting at random,
half of each message's receivers on the other server) without the network,
Redis or another process's noise.

    .venv/bin/python -m bench.p2pmicro [--users N] [--rounds N] [--profile FILE]

Two L{cim.server.core.IMServer}s share a memory store and a memory bus on
one clock; their clients are the servers' own wire adapters over
L{StringTransport}s.  Every store call answers at the next turn of the
clock, as a real store's round trip would, so that the sends of one turn
are appended in one batch (as the servers' appenders do under load).  Each
round, a tenth of the users each send one message to another user at
random; every ten rounds, every client acknowledges what it received (the
cursors that moved, as cim clients do).

The figure is microseconds of this process's CPU time per message for the
servers' work: the clients' frames are made before and read after the
timed parts, and a client's own decoding is not counted (the memory store's
work is, in place of the Redis client's).  The garbage collector runs as in
the daemons (L{cim.gcpolicy}).  Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import random
import time
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from cim.bus import BusPusher, BusReceiver, MemoryHub
from cim.codec import decode, encode_framed
from cim.gcpolicy import GC_YOUNG, tune_gc
from cim.interfaces import ServerAddress
from cim.message import Command, Cursor, Frame
from cim.server.core import IMServer
from cim.server.protocol import ClientConnectionProtocol
from cim.store.memory import MemoryStore

TEXT = "x" * 100


class NextTurnStore:
    """
    A store whose every answer comes at the next turn of C{clock}.
    """

    def __init__(self, store: MemoryStore, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._store, name)
        if not callable(value):
            return value
        clock = self._clock

        def call(*args: Any, **kwargs: Any) -> Any:
            inner = value(*args, **kwargs)
            if not isinstance(inner, Deferred):
                return inner
            outer: Deferred[Any] = Deferred()
            inner.addBoth(lambda r: clock.callLater(0, outer.callback, r))
            return outer

        return call


class Client:
    """
    One device: its connection to a server and the cursors it received.
    """

    def __init__(self, server: IMServer, user_id: int) -> None:
        self.user_id = user_id
        self.protocol = ClientConnectionProtocol(server, 64 * 1024, 1 << 30)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 1))
        self.protocol.makeConnection(self.transport)
        self.cursors: dict[str, Cursor] = {}
        self.moved: set[str] = set()
        self.frames = 0

    def read(self) -> None:
        data = self.transport.value()
        self.transport.clear()
        offset = 0
        while offset < len(data):
            length = shift = 0
            while True:
                byte = data[offset]
                offset += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            frame = decode(data[offset : offset + length])
            offset += length
            self.frames += 1
            for m in frame.messages:
                self.cursors[m.conversation] = Cursor(m.conversation, m.seq, m.epoch)
                self.moved.add(m.conversation)

    def ack(self) -> bytes | None:
        if not self.moved:
            return None
        cursors = [self.cursors[c] for c in self.moved]
        self.moved = set()
        return encode_framed(Frame(cmd=Command.ACK, cursors=cursors))


def _result(d: Deferred[Any]) -> Any:
    """
    The result of a memory store's call (fired already).
    """
    results: list[Any] = []
    d.addBoth(results.append)
    return results[0]


def pump(clock: Clock) -> None:
    """
    Run the clock's calls due now, and those they schedule, until none is.
    """
    while any(c.getTime() <= clock.seconds() for c in clock.getDelayedCalls()):
        clock.advance(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", help="write a cProfile of the timed parts")
    options = parser.parse_args()
    rng = random.Random(options.seed)

    clock = Clock()
    clock.advance(1_700_000_000)
    memory = MemoryStore(clock)
    store: Any = NextTurnStore(memory, clock)
    hub = MemoryHub()
    servers = []
    for index in range(2):
        address = ServerAddress(f"127.0.0.{index + 1}", 11211, 8081)
        bus = hub.bus(clock)
        server = IMServer(
            clock, store, address, BusPusher(bus, clock), rate=1e9, max_text=4096
        )
        BusReceiver(bus, server.here, server, server.resync_all).start()
        server.start()
        servers.append(server)
    pump(clock)

    clients = []
    for index in range(options.users):
        name = f"user{index}"
        server = servers[index % 2]
        user_id = _result(memory.register(name)).user_id
        session, _ = _result(
            memory.claim_session(user_id, name, server.here, 3600.0, replace=True)
        )
        token = _result(
            memory.issue_token(user_id, server.here, session.session_id, 3600.0)
        )
        client = Client(server, user_id)
        client.protocol.dataReceived(
            encode_framed(
                Frame(
                    cmd=Command.LOGIN_REQUEST,
                    request_id=user_id,
                    req_msg=name,
                    token=token,
                )
            )
        )
        clients.append(client)
    pump(clock)
    for client in clients:
        client.read()
    ids = [c.user_id for c in clients]

    tune_gc(GC_YOUNG)
    collecting = [0.0, 0.0, 0]

    def timed_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collecting[0] = time.process_time()
        else:
            collecting[1] += time.process_time() - collecting[0]
            collecting[2] += 1

    gc.callbacks.append(timed_gc)
    profile = cProfile.Profile() if options.profile else None
    senders = max(1, options.users // 10)
    spent = 0.0
    messages = 0
    seq = 0
    for round_ in range(options.rounds):
        sends = []
        for client in rng.sample(clients, senders):
            receiver = rng.choice(ids)
            while receiver == client.user_id:
                receiver = rng.choice(ids)
            seq += 1
            sends.append(
                (
                    client,
                    encode_framed(
                        Frame(
                            cmd=Command.MESSAGE,
                            receive_user_id=receiver,
                            req_msg=TEXT,
                            client_msg_id=str(seq),
                        )
                    ),
                )
            )
        acks = []
        if round_ % 10 == 9:
            for client in clients:
                data = client.ack()
                if data is not None:
                    acks.append((client, data))
        if profile is not None:
            profile.enable()
        start = time.process_time()
        for client, data in sends:
            client.protocol.dataReceived(data)
        for client, data in acks:
            client.protocol.dataReceived(data)
        pump(clock)
        if round_ % 10 == 9:
            for server in servers:
                server.sweep()
            pump(clock)
        spent += time.process_time() - start
        if profile is not None:
            profile.disable()
        messages += len(sends)
        for client in clients:
            client.read()
        clock.advance(0.01)
    frames = sum(c.frames for c in clients)
    print(
        f"{messages} messages, {frames} frames to clients: "
        f"{spent / messages * 1e6:.1f} us of CPU per message (both servers), "
        f"{collecting[1] / messages * 1e6:.1f} of it in {collecting[2]} "
        "garbage collections"
    )
    caches = [s.delivery.sessions for s in servers if s.delivery.sessions]
    if caches:
        hits = sum(c.hits for c in caches)
        print(
            f"session cache: {hits} users found, "
            f"{sum(c.misses for c in caches)} looked up"
        )
    if profile is not None:
        profile.dump_stats(options.profile)
    gc.collect()


if __name__ == "__main__":
    main()
