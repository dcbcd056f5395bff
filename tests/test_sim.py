"""
The cluster simulator (L{cim.sim}, issue 18): its CI seed budget, the
seeds that found bugs, the deliberately broken variants it must catch, and
the parts it is built of (the simulated network, clock and store copies).

The seed runs go through C{python -m cim.sim} in a child process with a
fixed C{PYTHONHASHSEED}, as C{make sim} runs them: a seed's run depends on
the order of sets of strings, so only that reproduces exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.internet.protocol import Factory, Protocol

from cim.interfaces import HeldSession, NewMessage
from cim.message import Position
from cim.sim.breaks import BROKEN
from cim.sim.net import HeapClock, Network
from cim.store.memory import MemoryStore

ROOT = Path(__file__).resolve().parent.parent

#: How many seeds CI runs (make test), and within how long.
CI_SEEDS = 500
CI_SECONDS = 120.0

#: Seeds that found bugs, run on their own too.  A change to the scenario
#: generator changes what a seed does: each bug is also brought back on
#: purpose (cim/sim/breaks.py: push-once, restored-sessions-replaced), and
#: must be caught within the CI budget like the other broken variants.
REGRESSIONS = [
    # A store restored from a backup holds older sessions of devices that
    # logged in again since: renewing the newer one closed it as
    # "replaced", and the client stopped for good.
    34,
    240,
    262,
    278,
    # The last message of a conversation went no further when its push
    # to another server met a pooled connection that the server's restart
    # had left stale (HttpPusher sends a failed push once more, and
    # Delivery keeps failed pushes and sends them again: push-once breaks
    # the latter).
    365,
    746,
    815,
    # A group's message that reached the servers live just after a restore
    # to a backup had lost it and the two before it was written over the
    # gap; a restore to a later backup brought those two back, and clients
    # dropped them as seen (tests/test_server_stream.py brings it back:
    # one seed in 3,000 meets it, too few for a variant).
    2534,
]


def simulate(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONHASHSEED="0")
    return subprocess.run(
        [sys.executable, "-m", "cim.sim", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(900)
def test_the_ci_seed_budget_passes_in_time() -> None:
    started = time.monotonic()
    done = simulate("--seeds", str(CI_SEEDS), "--jobs", "2")
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]
    assert f"{CI_SEEDS} seeds" in done.stdout
    # On two cores of its own; a machine busy with more gets more time.
    busy = os.getloadavg()[0] / max(1, os.cpu_count() or 1)
    assert elapsed < CI_SECONDS * max(1.0, busy), done.stdout[-500:]


def test_the_seeds_that_found_bugs_pass() -> None:
    args = [a for seed in REGRESSIONS for a in ("--seed", str(seed))]
    done = simulate(*args)
    assert done.returncode == 0, done.stdout[-20000:]


def test_a_failing_seed_prints_its_trace_and_reproduces() -> None:
    first = simulate("--seed", "1", "--broken", "forget-device")
    second = simulate("--seed", "1", "--broken", "forget-device")
    assert first.returncode == 1
    assert "trace (simulated seconds since start):" in first.stdout
    assert "violations:" in first.stdout
    assert "make sim SEED=1" in first.stdout
    assert first.stdout == second.stdout


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", sorted(BROKEN))
def test_each_broken_variant_is_caught_within_the_ci_budget(name: str) -> None:
    done = simulate(
        "--seeds", str(CI_SEEDS), "--jobs", "2", "--broken", name, "--stop-at-first"
    )
    assert done.returncode == 1, f"{name} was not caught:\n{done.stdout[-3000:]}"
    assert "violations:" in done.stdout


# The parts


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: object = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.lost = reason


def _pair(net: Network) -> tuple[Collect, object]:
    server = net.node("server", "10.0.0.1")
    client = net.node("client", "10.0.0.2")
    net.listen(server, "10.0.0.1", 7, Factory.forProtocol(Echo))
    collect = Collect()
    factory = Factory.forProtocol(lambda: collect)
    factory.clientConnectionFailed = lambda c, r: None  # type: ignore[attr-defined]
    factory.startedConnecting = lambda c: None  # type: ignore[attr-defined]
    net.connect(client, "10.0.0.1", 7, factory, 5)
    return collect, client


def _run(clock: HeapClock, seconds: float) -> None:
    end = clock.seconds() + seconds
    while (due := clock.next_due()) is not None and due <= end:
        clock.advance(due - clock.seconds())
    clock.advance(max(0.0, end - clock.seconds()))


def test_bytes_arrive_in_order_after_a_latency_and_wait_on_a_stalled_link() -> None:
    import random

    clock = HeapClock()
    net = Network(clock, random.Random(1))
    collect, _ = _pair(net)
    _run(clock, 1)
    assert collect.transport is not None
    for chunk in (b"a", b"b", b"c"):
        collect.transport.write(chunk)
    assert collect.data == b""
    _run(clock, 1)
    assert collect.data == b"abc"
    net.set_link("client", "server", "stall")
    collect.transport.write(b"d")
    _run(clock, 5)
    assert collect.data == b"abc"
    net.set_link("client", "server", "ok")
    _run(clock, 1)
    assert collect.data == b"abcd"


def test_a_silent_crash_leaves_the_other_end_to_its_timers() -> None:
    import random

    clock = HeapClock()
    net = Network(clock, random.Random(2))
    collect, _ = _pair(net)
    _run(clock, 1)
    net.crash(net.listeners[("10.0.0.1", 7)][0], reset=False)
    assert collect.transport is not None
    collect.transport.write(b"x")
    _run(clock, 5)
    assert collect.data == b"" and collect.lost is None
    collect.transport.abortConnection()  # type: ignore[attr-defined]
    assert collect.lost is not None


def test_the_heap_clock_runs_postponed_calls_at_their_new_time() -> None:
    clock = HeapClock()
    ran: list[float] = []
    call = clock.callLater(1, lambda: ran.append(clock.seconds()))
    clock.advance(0.5)
    call.reset(2)  # now due at 2.5
    _run(clock, 1)
    assert ran == []
    _run(clock, 2)
    assert ran == [2.5]
    first = clock.callLater(1, lambda: ran.append(1))
    clock.callLater(1, lambda: ran.append(2))
    first.cancel()
    _run(clock, 2)
    assert ran == [2.5, 2]


def _fired(d: object) -> object:
    results: list[object] = []
    d.addBoth(results.append)  # type: ignore[attr-defined]
    return results[0]


def test_a_restored_store_starts_new_epochs_that_follow_the_old_ones() -> None:
    clock = HeapClock(1000.0)
    store = MemoryStore(clock)  # type: ignore[arg-type]
    new = [
        NewMessage("g:x", 1, "a", "one", "c1"),
        NewMessage("g:x", 1, "a", "two", "c2"),
    ]
    _fired(store.append(new))
    before = _fired(store.epochs(["g:x"]))["g:x"]  # type: ignore[index]
    backup = store.restored()
    _fired(store.append([NewMessage("g:x", 1, "a", "lost", "c3")]))
    # The copy holds what the store held then, and follows on in a new epoch.
    assert [m.text for m in _fired(backup.read("g:x", 0, 10))] == ["one", "two"]  # type: ignore[attr-defined]
    [again] = _fired(backup.append([NewMessage("g:x", 1, "a", "after", "c4")]))  # type: ignore[misc]
    epoch = _fired(backup.epochs(["g:x"]))["g:x"]  # type: ignore[index]
    assert again.seq == 3 and again.epoch == epoch.id != before.id
    assert (epoch.previous, epoch.base) == (before.id, 2)
    assert epoch.resume(Position(before.id, 3)) == (2, True)
    # The next append stays in that epoch.
    [later] = _fired(backup.append([NewMessage("g:x", 1, "a", "later", "c5")]))  # type: ignore[misc]
    assert later.epoch == epoch.id


def test_a_restored_store_lets_the_newer_session_of_a_device_be_renewed() -> None:
    clock = HeapClock(1000.0)
    store = MemoryStore(clock)  # type: ignore[arg-type]
    old, _ = _fired(store.claim_session(1, "a", "s1", 30.0, replace=True, device="d"))  # type: ignore[misc]
    backup = store.restored()
    # The device logs in again (to another server) after the backup.
    newer, _ = _fired(store.claim_session(1, "a", "s2", 30.0, replace=True, device="d"))  # type: ignore[misc]
    held = HeldSession(1, newer.session_id, "a", "d", 1000.0)
    # Brought back from the backup, the store holds the older session; the
    # server holding the newer one keeps it.
    assert _fired(backup.renew_sessions("s2", [held], 30.0)) == (
        [],
        [newer.session_id],
    )
    assert _fired(backup.get_session(1, "d")).session_id == newer.session_id  # type: ignore[attr-defined]
    # ...and the older one is over.
    stale = HeldSession(1, old.session_id, "a", "d", 1000.0)
    assert _fired(backup.renew_sessions("s1", [stale], 30.0)).lost == [old.session_id]
    # A store that was not restored still closes a replaced session.
    assert _fired(store.renew_sessions("s1", [stale], 30.0)).lost == [old.session_id]


def test_the_push_fault_drops_pushes_or_their_answers() -> None:
    from twisted.internet.defer import CancelledError

    from cim.sim.world import PUSH_TIMEOUT, FaultyPusher, World
    from tests.test_push_retry import FlakyPusher

    world = World(1)
    node = world.net.node("sender", "10.0.9.1")
    inner = FlakyPusher(world.clock)  # type: ignore[arg-type]
    pusher = FaultyPusher(inner, world, node)
    a, b = "10.0.0.1:11211:8081", "10.0.0.2:11211:8081"
    assert _fired(pusher.push(a, [], [1])) == []
    world.push_faults[a] = "drop"
    dropped = pusher.push(a, [], [1])
    answered = pusher.push_read(b, 1, "p:1:2", 3, [2])
    assert _fired(answered) == [] and len(inner.log) == 2
    results: list[object] = []
    dropped.addErrback(lambda f: results.append(f.type))
    _run(world.clock, PUSH_TIMEOUT - 0.1)
    assert results == []
    _run(world.clock, 0.2)
    assert results == [CancelledError]
    # Its answer lost: sent, and failed all the same; "*": every server.
    world.push_faults = {"*": "lost-reply"}
    lost = pusher.push(b, [], [2])
    assert len(inner.log) == 3
    lost.addErrback(lambda f: results.append(f.type))
    _run(world.clock, PUSH_TIMEOUT)
    assert results == [CancelledError, CancelledError]


# Bugs found by the simulator, as unit tests


def test_a_stream_start_closed_while_it_reads_does_not_read_again() -> None:
    # Found by the simulator (seeds 10001-14000): a server that died while
    # it adopted a conversation left the coroutine waiting; closing it
    # (garbage collection) raised "coroutine ignored GeneratorExit", its
    # finally clauses awaiting the other reads.
    from twisted.internet.defer import Deferred

    from cim.server.stream import Stream
    from tests.serverkit import World

    world = World()
    _, alice = world.login("alice", device="phone")
    conn = world.server.connection(alice, "phone")
    assert conn is not None

    class Waiting:
        def __getattr__(self, name: str) -> object:
            return lambda *args, **kwargs: Deferred()

    world.server.streams.store = Waiting()  # type: ignore[assignment]
    # Of an unknown epoch (its epoch and the join point are read at once),
    # and of the live message's epoch (only the join point is read).
    for tag in ("", "e1"):
        stream = Stream("g:x", filling=True)
        adopting = world.server.streams._adopt(conn, stream, tag)
        adopting.send(None)
        adopting.close()  # raised RuntimeError
        assert not stream.filling
