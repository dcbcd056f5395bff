"""
What a logged-in idle connection costs the server in Python memory,
measured with C{tracemalloc} (allocations, not time: the same on every
run of one Python).  The transport is a test double here: Twisted's TCP
transport (L{cim.slimtcp}) and the socket add about 600 bytes more
(C{python -m bench.connmem --loopback} measures them too).
"""

from __future__ import annotations

import gc
import tracemalloc

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from cim.codec import encode_framed
from cim.message import Command, Frame
from cim.server.protocol import ClientConnectionFactory
from tests.serverkit import World

#: Connections that log in before the measure (what all of them share).
WARM_UP = 32
MEASURED = 256
#: Bytes per connection (about 750 in Python 3.11): the protocol, its
#: L{Connection} and backlog, the user's entry in the server's tables, and
#: the memory store's session (about 160 of them; Redis holds that in a
#: server).  Before the memory work of issue 17 it took about 1,270.
BUDGET = 900


#: Allocations that are the test's: the test transport's, and the log
#: events that Twisted keeps until logging begins (a daemon writes them).
_NOT_OURS = [
    tracemalloc.Filter(False, "*/twisted/internet/testing.py"),
    tracemalloc.Filter(False, "*/twisted/logger/*"),
    tracemalloc.Filter(False, tracemalloc.__file__),
]


def _logins(world: World, count: int, prefix: str) -> list[bytes]:
    frames = []
    for i in range(count):
        name = f"{prefix}{i}"
        user_id = world.account(name)
        frames.append(
            encode_framed(
                Frame(
                    cmd=Command.LOGIN_REQUEST,
                    request_id=user_id,
                    req_msg=name,
                    token=world.token(user_id, name),
                )
            )
        )
    return frames


def test_idle_connection_under_budget() -> None:
    """
    C{MEASURED} connections that log in (with no conversation) after
    C{WARM_UP} others grow the heap by at most L{BUDGET} bytes each.
    """
    world = World()
    factory = ClientConnectionFactory(world.server, 64 * 1024)
    warm = _logins(world, WARM_UP, "warm")
    measured = _logins(world, MEASURED, "idle")
    transports = [
        StringTransport(peerAddress=IPv4Address("TCP", "10.1.1.1", 1024 + k))
        for k in range(WARM_UP + MEASURED)
    ]

    def log_in(frame: bytes, transport: StringTransport) -> None:
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(transport)
        protocol.dataReceived(frame)
        assert transport.value(), "no LOGIN_RESPONSE"
        transport.clear()

    for frame, transport in zip(warm, transports, strict=False):
        log_in(frame, transport)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot().filter_traces(_NOT_OURS)
        for frame, transport in zip(measured, transports[WARM_UP:], strict=True):
            log_in(frame, transport)
        gc.collect()
        after = tracemalloc.take_snapshot().filter_traces(_NOT_OURS)
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert len(world.server.users) == WARM_UP + MEASURED
    per_connection = grown / MEASURED
    assert per_connection <= BUDGET, f"{per_connection:.0f} bytes per connection"


def test_idle_connection_holds_no_conversation_state() -> None:
    """
    A connection that receives no conversation has made none of its
    per-conversation dictionaries, nor a frame buffer.
    """
    world = World()
    peer, alice = world.login("alice")
    conn = world.server.connection(alice)
    assert conn is not None
    for name in ("acked", "streams", "read_sent"):
        assert not _slot_set(conn, name), name
    assert type(peer.protocol._buffer) is bytes
    assert peer.protocol.backlog._waiting is None
    # Made on first use, and kept.
    assert conn.streams == {}
    assert conn.streams is conn.streams
    assert _slot_set(conn, "streams")


def _slot_set(obj: object, name: str) -> bool:
    descriptor = type(obj).__dict__[name]
    try:
        descriptor.__get__(obj, type(obj))
    except AttributeError:
        return False
    return True
