"""
The soak test: many clients of the client library chat for minutes on a
real cluster while connections drop and a server restarts; in the end every
acknowledged message must have been delivered exactly once, in order, and no
daemon's memory may have grown past a bound.

    python -m bench.soak [--quick] [--clients N] [--minutes M] [--workers K]
                         [--interval S] [--disconnects R] [--seed X]

Defaults: 2,000 clients for 10 minutes (C{--quick}: 200 clients for one
minute), driven by 2 load processes.

What runs (everything on 127.0.0.1, state and logs in
C{.run/soak/<timestamp>/}):

  - a private C{redis-server} and a private ZooKeeper, one C{twistd
    cim-route} and two C{twistd cim-server}s, with a random cluster secret;
  - C{--workers} load processes (C{python -m bench.soak --worker ...}), each
    holding its share of the clients (one L{cim.client.library.Client} each,
    in one reactor).  The coordinator (this process) tells them what to do
    with one JSON object per line on their stdin, and they answer the same
    way on their stdout.

The chat.  Client C{i} (one device of its user, C{soak-<i>}) is a member
of one group (of about 20) and has 4 friends: the private conversation
with a friend is C{p:<low id>:<high id>}, both sides in one sequence.  Clients send at random (exponential intervals of mean
C{--interval} seconds each, at most 8 unacknowledged), 30% to their group
and the rest to a random friend.  Meanwhile connections are dropped at
random (C{--disconnects} a second in all: the library notices and logs in
again), and a third into the run C{server1} is restarted (SIGTERM, then
started again on the same ports; its clients move to C{server2} or come
back).

The check.  Every text is C{"<run>|<kind>|<sender id>|<conversation>|
<counter>"}, the counter counting the sender's messages to that
conversation from 1.  At the end the senders stop, wait for every
acknowledgement, and send one last message (kind C{M}, a marker) to each of
their conversations; every recipient waits until it has the markers of all
its senders.  Then, for every acknowledged (sender, conversation, counter)
and each of its recipients (both users of a private conversation: the
friend, and the sender itself, whose own message comes back to the sending
device as its B{echo}; every member of the group, the sender too): not
received is B{lost}, received twice is B{duplicated}, and a counter after a
higher one from the same sender in the same conversation is B{out of
order}.  The echoes are checked like any other delivery, and counted apart
(deliveries per message are reported).

Memory.  The resident size of each daemon is sampled at the start of the
chat (for the restarted server: once it is back up) and at the end; the
bound is: end <= 2 x start + 50 MB.

The exit status is 1 when anything was lost, duplicated, out of order or
damaged, a send failed for good, a marker never came, a daemon died, or a
daemon's memory went past the bound.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cim.client.listeners import ClientListener
from cim.message import pair_conversation, pair_members, peer_of

DEFAULT_CLIENTS = 2000
DEFAULT_MINUTES = 10.0
QUICK_CLIENTS = 200
QUICK_MINUTES = 1.0
GROUP_SIZE = 20
FRIENDS = 4
GROUP_SHARE = 0.3
MAX_OUTSTANDING = 8
#: The memory bound: end <= FACTOR x start + SLACK.
MEMORY_FACTOR = 2.0
MEMORY_SLACK = 50 * 1024 * 1024

ROOT = Path(__file__).resolve().parent.parent


def say(message: str) -> None:
    print(message, flush=True)


# The plan: who is in which group, who are whose friends (the same in every
# process, from the seed).


class Plan:
    """
    The users of a run by index, 0 to C{clients - 1}: their names, groups
    and friends, and which worker holds each.
    """

    def __init__(self, clients: int, workers: int, seed: int, tag: str) -> None:
        self.clients = clients
        self.workers = workers
        self.seed = seed
        self.tag = tag
        self.groups = max(1, math.ceil(clients / GROUP_SIZE))
        friends = min(FRIENDS, clients - 1)
        rng = random.Random(seed)
        self._friends: list[list[int]] = []
        #: index -> the indexes that have it as a friend
        self._befriended: list[list[int]] = [[] for _ in range(clients)]
        for i in range(clients):
            others = rng.sample(range(clients - 1), friends)
            self._friends.append([o if o < i else o + 1 for o in others])
            for friend in self._friends[-1]:
                self._befriended[friend].append(i)

    def name(self, i: int) -> str:
        return f"soak{self.tag}-{i}"

    def group(self, i: int) -> str:
        return f"soak{self.tag}-g{i % self.groups}"

    def friends(self, i: int) -> list[int]:
        return self._friends[i]

    def members(self, i: int) -> list[int]:
        """
        The members of C{i}'s group (C{i} too).
        """
        return list(range(i % self.groups, self.clients, self.groups))

    def mine(self, worker: int) -> list[int]:
        return list(range(worker, self.clients, self.workers))

    def conversations(self, i: int, ids: dict[int, int]) -> list[str]:
        """
        Where C{i} sends: its group first, then its private conversations
        with its friends.
        """
        return [f"g:{self.group(i)}"] + [
            pair_conversation(ids[i], ids[f]) for f in self.friends(i)
        ]

    def recipients(self, conversation: str, by_id: dict[int, int]) -> list[int]:
        """
        The user ids that must receive what is sent to C{conversation}
        (C{by_id}: user id -> index): both users of a private conversation
        (the sender's own echo too), every member of a group.
        """
        pair = pair_members(conversation)
        if pair is not None:
            return sorted(set(pair))
        group = conversation[2:]
        index = int(group.rsplit("-g", 1)[1])
        ids = {i: uid for uid, i in by_id.items()}
        return [ids[m] for m in range(index, self.clients, self.groups)]

    def expected_markers(
        self, receiver: int, ids: dict[int, int]
    ) -> set[tuple[int, str]]:
        """
        The (sender id, conversation) pairs whose markers C{receiver} (an
        index) must get.
        """
        me = ids[receiver]
        out = {(ids[m], f"g:{self.group(receiver)}") for m in self.members(receiver)}
        # Its own markers to its friends come back (their echo) ...
        out.update((me, pair_conversation(me, ids[f])) for f in self._friends[receiver])
        # ... and those of the users that have it as a friend come in.
        out.update(
            (ids[sender], pair_conversation(ids[sender], me))
            for sender in self._befriended[receiver]
        )
        return out


def make_text(tag: str, kind: str, sender: int, conversation: str, n: int) -> str:
    return f"{tag}|{kind}|{sender}|{conversation}|{n}"


def parse_text(text: str) -> tuple[str, str, int, str, int] | None:
    parts = text.split("|")
    if len(parts) != 5:
        return None
    try:
        return parts[0], parts[1], int(parts[2]), parts[3], int(parts[4])
    except ValueError:
        return None


# The check (pure: the coordinator merges the workers' reports with it)


@dataclass
class Verdict:
    """
    @ivar expected: deliveries expected (a delivery: one message to one
        device), the echoes included.
    @ivar echoes_expected: of them, a sender's own private messages back
        to it; C{echoes_delivered}: those received.
    """

    sent: int = 0
    markers: int = 0
    expected: int = 0
    delivered: int = 0
    echoes_expected: int = 0
    echoes_delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    unacknowledged_delivered: int = 0
    examples: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.examples) < 20:
            self.examples.append(text)


def check(
    plan: Plan,
    ids: dict[int, int],
    acked: dict[tuple[int, str], list[int]],
    received: dict[tuple[int, int, str], list[int]],
) -> Verdict:
    """
    Compare what every recipient received with what was acknowledged.

    @param acked: (sender id, conversation) -> counters acknowledged.
    @param received: (receiver id, sender id, conversation) -> counters in
        order of arrival.
    """
    by_id = {uid: i for i, uid in ids.items()}
    verdict = Verdict()
    recipients_of: dict[str, list[int]] = {}
    for (sender, conversation), counters in acked.items():
        wanted = set(counters)
        verdict.sent += len(wanted)
        if conversation not in recipients_of:
            recipients_of[conversation] = plan.recipients(conversation, by_id)
        for receiver in recipients_of[conversation]:
            got = received.get((receiver, sender, conversation), [])
            seen = set(got)
            verdict.expected += len(wanted)
            verdict.delivered += len(wanted & seen)
            if receiver == sender and conversation.startswith("p:"):
                verdict.echoes_expected += len(wanted)
                verdict.echoes_delivered += len(wanted & seen)
            missing = wanted - seen
            dups = len(got) - len(seen)
            disorder = sum(1 for a, b in zip(got, got[1:]) if b < a)
            verdict.lost += len(missing)
            verdict.duplicated += dups
            verdict.out_of_order += disorder
            verdict.unacknowledged_delivered += len(seen - wanted)
            if missing or dups or disorder:
                verdict.note(
                    f"{receiver} from {sender} in {conversation}: missing "
                    f"{sorted(missing)[:10]}, {dups} duplicates, {disorder} out of "
                    f"order; arrival order {got[:30]}"
                )
    for (_receiver, sender, conversation), got in received.items():
        if (sender, conversation) not in acked:
            verdict.unacknowledged_delivered += len(set(got))
    return verdict


# The load process


def worker_main(args: argparse.Namespace) -> int:
    from twisted.internet import reactor

    worker = Worker(reactor, args)
    reactor.callWhenRunning(worker.start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return worker.exit_code


class SoakUser(ClientListener):
    """
    One client of a load process, and what it sent and received.

    Its own private messages come back to it (their echo) and are recorded
    like any other: (its own id, conversation) -> counters.
    """

    def __init__(self, worker: Worker, index: int) -> None:
        self.worker = worker
        self.index = index
        self.client: Any = None
        self.uid = 0
        self.conversations: list[str] = []
        self.counters: dict[str, int] = {}
        self.acked: dict[str, list[int]] = {}
        self.received: dict[tuple[int, str], list[int]] = {}
        self.expected: set[tuple[int, str]] = set()
        self.markers: set[tuple[int, str]] = set()
        self.outstanding = 0

    # IClientListener

    def message_received(self, message: Any) -> None:
        worker = self.worker
        parsed = parse_text(message.text)
        if parsed is None or parsed[0] != worker.plan.tag:
            worker.foreign += 1
            return
        _, kind, sender, conversation, counter = parsed
        if sender != message.sender_id or conversation != message.conversation:
            worker.damaged += 1
            return
        worker.received += 1
        if sender == self.uid and conversation.startswith("p:"):
            # Its own message back (each user has this one device only).
            worker.echoes += 1
            if not self.client.sent_here(message.client_msg_id):
                # The library no longer remembers sending it (acknowledged
                # long ago, replayed after a reconnect): still the echo.
                worker.echoes_unrecognised += 1
        self.received.setdefault((sender, conversation), []).append(counter)
        if kind == "M":
            key = (sender, conversation)
            if key in self.expected and key not in self.markers:
                self.markers.add(key)
                worker.markers_missing -= 1

    def ack_received(self, ack: Any) -> None:
        pass

    def error_received(self, code: int, reason: str, client_msg_id: str) -> None:
        self.worker.errors += 1

    def state_changed(self, state: Any, reason: str) -> None:
        if state.value == "reconnecting":
            self.worker.reconnects += 1
        elif state.value == "failed":
            self.worker.gave_up += 1

    def conversation_reset(self, conversation: str, seq: int) -> None:
        # The store never loses anything in a soak: a reset is a fault.
        self.worker.resets += 1

    def read_changed(self, user_id: int, conversation: str, seq: int) -> None:
        pass


class Worker:
    """
    A load process: logs its share of the clients in, chats on command,
    and reports.
    """

    def __init__(self, reactor: Any, args: argparse.Namespace) -> None:
        self.reactor = reactor
        self.args = args
        self.plan = Plan(args.clients, args.workers, args.seed, args.tag)
        self.rng = random.Random(args.seed * 1000 + args.index)
        self.users = {i: SoakUser(self, i) for i in self.plan.mine(args.index)}
        self.ids: dict[int, int] = {}
        self.exit_code = 0
        self.received = 0
        self.echoes = 0
        self.echoes_unrecognised = 0
        self.resets = 0
        self.acked = 0
        self.foreign = 0
        self.damaged = 0
        self.errors = 0
        self.reconnects = 0
        self.gave_up = 0
        self.disconnects = 0
        self.markers_missing = 0
        self.markers = 0
        self.failed: list[str] = []
        self._loops: list[Any] = []
        self._reporter: Any = None
        self._http: Any = None
        self._pool: Any = None

    def emit(self, event: str, **fields: Any) -> None:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()

    def start(self) -> None:
        from twisted.internet.defer import ensureDeferred
        from twisted.internet.stdio import StandardIO
        from twisted.protocols.basic import LineReceiver

        worker = self

        class Commands(LineReceiver):
            delimiter = b"\n"
            # "start" carries every user id.
            MAX_LENGTH = 64 * 1024 * 1024

            def lineReceived(self, line: bytes) -> None:
                worker.command(json.loads(line))

            def connectionLost(self, reason: object = None) -> None:
                # The coordinator went away: stop.
                if worker.reactor.running:
                    worker.reactor.stop()

        StandardIO(Commands(), reactor=self.reactor)
        ensureDeferred(self._guard(self.login_all()))

    async def _guard(self, work: Any) -> None:
        try:
            await work
        except Exception as e:
            import traceback

            traceback.print_exc()
            self.emit("error", message=f"{type(e).__name__}: {e}")
            self.exit_code = 1
            self.reactor.stop()

    def command(self, message: dict[str, Any]) -> None:
        from twisted.internet.defer import ensureDeferred

        cmd = message.get("cmd")
        if cmd == "start":
            self.ids = {int(i): uid for i, uid in message["ids"].items()}
            self.begin()
        elif cmd == "stop":
            ensureDeferred(self._guard(self.finish()))
        elif cmd == "exit":
            self.reactor.stop()

    async def login_all(self) -> None:
        from treq.client import HTTPClient
        from twisted.internet.defer import DeferredSemaphore, gatherResults
        from twisted.web.client import Agent, HTTPConnectionPool

        self._pool = pool = HTTPConnectionPool(self.reactor, persistent=True)
        pool.maxPersistentPerHost = 32
        self._http = HTTPClient(Agent(self.reactor, pool=pool))
        limit = DeferredSemaphore(32)
        await gatherResults(
            [limit.run(self._login_one, user) for user in self.users.values()],
            consumeErrors=True,
        )
        self.emit("ready", ids={str(u.index): u.uid for u in self.users.values()})

    def _login_one(self, user: SoakUser) -> Any:
        from twisted.internet.defer import ensureDeferred

        return ensureDeferred(self._login(user))

    async def _login(self, user: SoakUser) -> None:
        from twisted.internet.task import deferLater

        from cim.client.library import Client
        from cim.client.route import RouteError

        plan = self.plan
        user.client = client = Client(
            self.reactor,
            self.args.route,
            http=self._http,
            listener=user,
            device=f"soak-{user.index}",
            backoff_base=0.2,
            backoff_max=3.0,
            http_timeout=30.0,
        )
        for attempt in range(10):
            try:
                await client.login(plan.name(user.index))
                break
            except Exception:
                if attempt == 9:
                    raise
                await deferLater(self.reactor, 0.5 * (attempt + 1))
        assert client.user_id is not None
        user.uid = client.user_id
        group = plan.group(user.index)
        try:
            await client.create_group(group, policy="open")
        except RouteError as e:
            if e.code != "4090":
                raise
        await client.join_group(group)

    # The chat

    def begin(self) -> None:
        from twisted.internet.task import LoopingCall

        plan = self.plan
        for user in self.users.values():
            user.conversations = plan.conversations(user.index, self.ids)
            user.expected = plan.expected_markers(user.index, self.ids)
            self.markers_missing += len(user.expected)
        rate = len(self.users) / self.args.interval
        tick = LoopingCall(self._tick, rate)
        tick.clock = self.reactor
        self._loops.append(tick)
        tick.start(0.05, now=False)
        if self.args.disconnects > 0:
            drop = LoopingCall(self._drop)
            drop.clock = self.reactor
            self._loops.append(drop)
            drop.start(self.args.workers / self.args.disconnects, now=False)
        self._reporter = LoopingCall(self._progress)
        self._reporter.clock = self.reactor
        self._reporter.start(5.0, now=False)

    def _tick(self, rate: float) -> None:
        expected = rate * 0.05
        count = int(expected) + (1 if self.rng.random() < expected % 1 else 0)
        users = list(self.users.values())
        for _ in range(count):
            user = self.rng.choice(users)
            if user.outstanding >= MAX_OUTSTANDING:
                continue
            if self.rng.random() < GROUP_SHARE:
                conversation = user.conversations[0]
            else:
                conversation = self.rng.choice(user.conversations[1:])
            self.send(user, conversation, "m")

    def send(self, user: SoakUser, conversation: str, kind: str) -> Any:
        counter = user.counters[conversation] = user.counters.get(conversation, 0) + 1
        text = make_text(self.plan.tag, kind, user.uid, conversation, counter)
        if conversation.startswith("g:"):
            d = user.client.send_group(conversation[2:], text)
        else:
            peer = peer_of(conversation, user.uid)
            assert peer is not None, conversation
            d = user.client.send_private(peer, text)
        user.outstanding += 1

        def acked(_: object) -> None:
            user.acked.setdefault(conversation, []).append(counter)
            self.acked += 1
            if kind == "M":
                self.markers += 1

        def failed(failure: Any) -> None:
            self.failed.append(
                f"{user.uid} -> {conversation} #{counter}: {failure.getErrorMessage()}"
            )

        def done(_: object) -> None:
            user.outstanding -= 1

        return d.addCallbacks(acked, failed).addBoth(done)

    def _drop(self) -> None:
        ready = [u for u in self.users.values() if u.client.ready]
        if not ready:
            return
        user = self.rng.choice(ready)
        # As a network failure would: the library has no public call for
        # it, so its protocol is aborted.
        protocol = user.client._protocol
        if protocol is not None:
            protocol.abort("soak: connection dropped")
            self.disconnects += 1

    def _progress(self) -> None:
        self.emit("progress", **self.counts())

    def counts(self) -> dict[str, int]:
        return {
            "acked": self.acked,
            "received": self.received,
            "echoes": self.echoes,
            "echoes_unrecognised": self.echoes_unrecognised,
            "resets": self.resets,
            "outstanding": sum(u.outstanding for u in self.users.values()),
            "ready": sum(1 for u in self.users.values() if u.client.ready),
            "clients": len(self.users),
            "reconnects": self.reconnects,
            "disconnects": self.disconnects,
            "failed": len(self.failed),
            "markers_missing": self.markers_missing,
            "markers": self.markers,
        }

    async def _wait(self, predicate: Any, seconds: float) -> bool:
        from twisted.internet.task import deferLater

        end = time.monotonic() + seconds
        while not predicate():
            if time.monotonic() > end:
                return False
            await deferLater(self.reactor, 0.1)
        return True

    async def finish(self) -> None:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        drain = self.args.drain
        users = list(self.users.values())
        await self._wait(lambda: all(u.outstanding == 0 for u in users), drain)
        for user in users:
            for conversation in user.conversations:
                self.send(user, conversation, "M")
        sent = await self._wait(lambda: all(u.outstanding == 0 for u in users), drain)
        self.emit("markers_sent", ok=sent)
        await self._wait(lambda: self.markers_missing == 0, drain)
        if self._reporter is not None and self._reporter.running:
            self._reporter.stop()
        report = {
            "counts": self.counts(),
            "foreign": self.foreign,
            "damaged": self.damaged,
            "errors": self.errors,
            "gave_up": self.gave_up,
            "failed": self.failed[:50],
            "acked": {
                f"{u.uid}|{c}": counters
                for u in users
                for c, counters in u.acked.items()
            },
            "received": {
                f"{u.uid}|{s}|{c}": counters
                for u in users
                for (s, c), counters in u.received.items()
            },
            "missing_markers": [
                f"{u.uid} from {s} in {c}"
                for u in users
                for (s, c) in sorted(u.expected - u.markers)
            ][:50],
        }
        path = Path(self.args.out) / f"worker{self.args.index}.json"
        path.write_text(json.dumps(report))
        self.emit("done", report=str(path))


# The coordinator


def rss(pid: int | None) -> int | None:
    import psutil

    if pid is None:
        return None
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


def mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1024 / 1024:.1f}"


class WorkerProcess:
    """
    A load process, talked to over its stdin and stdout.
    """

    def __init__(self, coordinator: Coordinator, index: int) -> None:
        from twisted.internet.defer import Deferred
        from twisted.internet.protocol import ProcessProtocol

        self.index = index
        self.events: dict[str, Deferred[dict[str, Any]]] = {}
        self.last_progress: dict[str, int] = {}
        self.exited: Deferred[None] = Deferred()
        me = self
        self.stderr = (coordinator.directory / f"worker{index}.log").open("ab")

        class Pipe(ProcessProtocol):
            buffer = b""

            def outReceived(self, data: bytes) -> None:
                self.buffer += data
                while b"\n" in self.buffer:
                    line, self.buffer = self.buffer.split(b"\n", 1)
                    if line.strip():
                        me.event(json.loads(line))

            def errReceived(self, data: bytes) -> None:
                me.stderr.write(data)
                me.stderr.flush()

            def processEnded(self, reason: object) -> None:
                me.stderr.close()
                if not me.exited.called:
                    me.exited.callback(None)
                for d in list(me.events.values()):
                    if not d.called:
                        d.errback(RuntimeError(f"worker {me.index} exited"))

        self.protocol = Pipe()

    def expect(self, event: str) -> Any:
        from twisted.internet.defer import Deferred

        d = self.events.get(event)
        if d is None:
            d = self.events[event] = Deferred()
        return d

    def event(self, message: dict[str, Any]) -> None:
        name = message.pop("event")
        if name == "progress":
            self.last_progress = message
            return
        if name == "error":
            say(f"worker {self.index}: {message.get('message')}")
        d = self.expect(name)
        if not d.called:
            d.callback(message)

    def send(self, message: dict[str, Any]) -> None:
        transport = self.protocol.transport
        if transport is not None:
            transport.write((json.dumps(message) + "\n").encode())


class Coordinator:
    """
    Starts the services, the cluster and the load processes, runs the soak
    and judges it.
    """

    def __init__(self, reactor: Any, args: argparse.Namespace) -> None:
        self.reactor = reactor
        self.args = args
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.directory = ROOT / ".run" / "soak" / stamp
        self.directory.mkdir(parents=True, exist_ok=True)
        self.secret = secrets.token_urlsafe(24)
        self.tag = secrets.token_hex(3)
        from tests.kit.cluster import Processes

        #: Redis, ZooKeeper and the daemons (L{tests.kit}).
        self.processes = Processes(self.directory, reactor)
        self.cluster: Any = None
        self.daemons: dict[str, Any] = {}
        self.route_port = 0
        self.workers: list[WorkerProcess] = []
        self.rss_start: dict[str, int | None] = {}
        self.rss_peak: dict[str, int] = {}
        self.restart_at: float | None = None
        self.restart_took: float | None = None
        self.exit_code = 1

    # Services and daemons

    async def start_cluster(self) -> None:
        from tests.kit.cluster import Cluster
        from tests.kit.services import RedisServer, ZooKeeperServer

        redis = RedisServer(
            self.directory / "redis", self.processes, appendfsync="everysec"
        )
        zookeeper = ZooKeeperServer(self.directory / "zookeeper", self.processes)
        await zookeeper.start(self.reactor)
        await redis.start(self.reactor)
        self.cluster = Cluster(
            self.processes,
            self.directory,
            redis.url(),
            f"zk://{zookeeper.hosts}/cim",
            self.secret,
            # Every client connects from 127.0.0.1: no per-address caps.
            server_args=["--max-connections-per-address", "0"],
            route_args=["--max-connections-per-address", "0"],
        )
        await self.cluster.start()
        self.daemons = {d.name: d for d in self.cluster.daemons()}
        self.route_port = self.cluster.route_port

    async def restart_server(self, name: str) -> None:
        daemon = self.daemons[name]
        started = time.monotonic()
        say(f"soak: restarting {name}")
        await daemon.stop(self.reactor, 30)
        daemon.start(keep_ports=True)
        await daemon.wait_ready(self.reactor, 60)
        self.restart_took = time.monotonic() - started
        self.rss_start[name] = rss(daemon.process.pid)
        say(f"soak: {name} is back after {self.restart_took:.1f}s")

    def sample(self) -> dict[str, int | None]:
        out = {}
        for name, daemon in self.daemons.items():
            value = rss(daemon.process.pid if daemon.process else None)
            out[name] = value
            if value is not None:
                self.rss_peak[name] = max(self.rss_peak.get(name, 0), value)
        return out

    # Load processes

    def start_workers(self) -> None:
        args = self.args
        for index in range(args.workers):
            worker = WorkerProcess(self, index)
            command = [
                sys.executable, "-m", "bench.soak", "--worker",
                "--route", f"http://127.0.0.1:{self.route_port}",
                "--index", str(index), "--workers", str(args.workers),
                "--clients", str(args.clients), "--seed", str(args.seed),
                "--tag", self.tag, "--interval", str(args.interval),
                "--disconnects", str(args.disconnects),
                "--drain", str(args.drain), "--out", str(self.directory),
            ]  # fmt: skip
            self.reactor.spawnProcess(
                worker.protocol,
                sys.executable,
                command,
                env=dict(os.environ),
                path=str(ROOT),
            )
            self.workers.append(worker)

    async def gather(self, event: str, seconds: float) -> list[dict[str, Any]]:
        out = []
        for worker in self.workers:
            d = worker.expect(event)
            d.addTimeout(max(1.0, seconds), self.reactor)
            out.append(await d)
        return out

    def progress_line(self, elapsed: float) -> str:
        totals: dict[str, int] = {}
        for worker in self.workers:
            for key, value in worker.last_progress.items():
                totals[key] = totals.get(key, 0) + value
        sizes = self.sample()
        memory = " ".join(f"{n} {mb(v)}MB" for n, v in sizes.items())
        return (
            f"t={elapsed:5.0f}s acked {totals.get('acked', 0)} received "
            f"{totals.get('received', 0)} unacked {totals.get('outstanding', 0)} "
            f"ready {totals.get('ready', 0)}/{self.args.clients} reconnects "
            f"{totals.get('reconnects', 0)} drops {totals.get('disconnects', 0)} | "
            f"{memory}"
        )

    async def run(self) -> int:
        from twisted.internet.task import deferLater

        args = self.args
        plan = Plan(args.clients, args.workers, args.seed, self.tag)
        say(
            f"soak: {args.clients} clients in {args.workers} processes for "
            f"{args.minutes:g} min, a message every {args.interval:g}s each, "
            f"{args.disconnects:g} drops/s; logs in {self.directory}"
        )
        await self.start_cluster()
        self.start_workers()
        login_time = 120 + args.clients / 20
        ready = await self.gather("ready", login_time)
        ids: dict[str, int] = {}
        for message in ready:
            ids.update(message["ids"])
        say(f"soak: {len(ids)} clients logged in")
        self.rss_start = self.sample()
        for worker in self.workers:
            worker.send({"cmd": "start", "ids": ids})
        duration = args.minutes * 60
        start = time.monotonic()
        restart_at = start + duration / 3
        restarted = False
        next_line = start + 10
        while time.monotonic() < start + duration:
            await deferLater(self.reactor, 0.5)
            for name, daemon in self.daemons.items():
                if daemon.process.poll() is not None:
                    raise RuntimeError(f"{name} died:\n{daemon.log_tail()}")
            for worker in self.workers:
                if worker.exited.called:
                    log = (self.directory / f"worker{worker.index}.log").read_text()
                    raise RuntimeError(f"load process {worker.index} died:\n{log}")
            if not restarted and time.monotonic() >= restart_at:
                restarted = True
                self.restart_at = time.monotonic() - start
                await self.restart_server("server1")
            if time.monotonic() >= next_line:
                next_line += 10
                say(self.progress_line(time.monotonic() - start))
            self.sample()
        say(self.progress_line(time.monotonic() - start) + " (stopping the senders)")
        for worker in self.workers:
            worker.send({"cmd": "stop"})
        done = await self.gather("done", 3 * args.drain + 60)
        rss_end = self.sample()
        alive = {n: d.process.poll() is None for n, d in self.daemons.items()}
        return self.judge(
            plan, {int(k): v for k, v in ids.items()}, done, rss_end, alive
        )

    def judge(
        self,
        plan: Plan,
        ids: dict[int, int],
        done: list[dict[str, Any]],
        rss_end: dict[str, int | None],
        alive: dict[str, bool],
    ) -> int:
        acked: dict[tuple[int, str], list[int]] = {}
        received: dict[tuple[int, int, str], list[int]] = {}
        totals: dict[str, int] = {}
        failed: list[str] = []
        missing_markers: list[str] = []
        damaged = gave_up = 0
        for message in done:
            report = json.loads(Path(message["report"]).read_text())
            for key, value in report["counts"].items():
                totals[key] = totals.get(key, 0) + value
            damaged += report["damaged"]
            gave_up += report["gave_up"]
            failed += report["failed"]
            missing_markers += report["missing_markers"]
            for key, counters in report["acked"].items():
                sender, conversation = key.split("|", 1)
                acked[(int(sender), conversation)] = counters
            for key, counters in report["received"].items():
                receiver, sender, conversation = key.split("|", 2)
                received[(int(receiver), int(sender), conversation)] = counters
        verdict = check(plan, ids, acked, received)
        daemons = ["route", "server1", "server2"]
        memory_ok = True
        memory_lines = []
        for name in daemons:
            start, end = self.rss_start.get(name), rss_end.get(name)
            bound = None if start is None else int(MEMORY_FACTOR * start + MEMORY_SLACK)
            ok = (
                start is not None
                and end is not None
                and bound is not None
                and end <= bound
            )
            memory_ok = memory_ok and ok
            note = " (restarted)" if name == "server1" else ""
            memory_lines.append(
                f"  {name:8} start {mb(start):>7} MB  end {mb(end):>7} MB  "
                f"peak {mb(self.rss_peak.get(name)):>7} MB  bound {mb(bound):>7} MB"
                f"  {'ok' if ok else 'OVER'}{note}"
            )
        problems = []
        if verdict.lost:
            problems.append("lost")
        if verdict.duplicated:
            problems.append("duplicated")
        if verdict.out_of_order:
            problems.append("out of order")
        if damaged:
            problems.append("damaged")
        if failed or gave_up:
            problems.append("failed sends")
        if missing_markers:
            problems.append("missing markers")
        if totals.get("resets", 0):
            problems.append("conversations reset")
        if not memory_ok:
            problems.append("memory")
        if not all(alive.values()):
            problems.append("a daemon died")
        lines = [
            "",
            f"soak report ({self.args.clients} clients, {self.args.minutes:g} min, "
            f"seed {self.args.seed}, logs in {self.directory})",
            f"  messages sent (acknowledged) {verdict.sent} (of which "
            f"{totals.get('markers', 0)} end markers)",
            f"  deliveries expected          {verdict.expected} (of which "
            f"{verdict.echoes_expected} echoes to the sending device)",
            f"  delivered                    {verdict.delivered} (echoes "
            f"{verdict.echoes_delivered})",
            f"  deliveries per message       "
            f"{verdict.expected / max(1, verdict.sent):.2f}",
            f"  lost                         {verdict.lost}",
            f"  duplicated                   {verdict.duplicated}",
            f"  out of order                 {verdict.out_of_order}",
            f"  damaged                      {damaged}",
            f"  failed sends                 {len(failed) + gave_up}",
            f"  delivered, not acknowledged  {verdict.unacknowledged_delivered}",
            f"  connections dropped          {totals.get('disconnects', 0)}",
            f"  reconnects                   {totals.get('reconnects', 0)}",
            f"  conversations reset          {totals.get('resets', 0)}",
            f"  server1 restarted at         {self.restart_at or 0:.0f}s "
            f"(back after {self.restart_took or 0:.1f}s)",
            "  memory (RSS; bound: end <= 2 x start + 50 MB):",
            *memory_lines,
            f"  result: {'PASS' if not problems else 'FAIL: ' + ', '.join(problems)}",
        ]
        for example in verdict.examples[:10] + failed[:5] + missing_markers[:5]:
            lines.append(f"    {example}")
        say("\n".join(lines))
        summary = {
            "clients": self.args.clients,
            "minutes": self.args.minutes,
            "seed": self.args.seed,
            "sent": verdict.sent,
            "expected": verdict.expected,
            "delivered": verdict.delivered,
            "echoes_expected": verdict.echoes_expected,
            "echoes_delivered": verdict.echoes_delivered,
            "resets": totals.get("resets", 0),
            "lost": verdict.lost,
            "duplicated": verdict.duplicated,
            "out_of_order": verdict.out_of_order,
            "damaged": damaged,
            "failed_sends": len(failed) + gave_up,
            "unacknowledged_delivered": verdict.unacknowledged_delivered,
            "disconnects": totals.get("disconnects", 0),
            "reconnects": totals.get("reconnects", 0),
            "rss_start": self.rss_start,
            "rss_end": rss_end,
            "rss_peak": self.rss_peak,
            "problems": problems,
        }
        (self.directory / "report.json").write_text(json.dumps(summary, indent=1))
        return 0 if not problems else 1

    async def stop(self) -> None:
        for worker in self.workers:
            worker.send({"cmd": "exit"})
        for worker in self.workers:
            try:
                worker.exited.addTimeout(10, self.reactor)
                await worker.exited
            except Exception:
                transport = worker.protocol.transport
                if transport is not None:
                    try:
                        transport.signalProcess("KILL")
                    except Exception:
                        pass
        # The daemons first, then Redis and ZooKeeper.
        if self.cluster is not None:
            await self.cluster.stop()
        await self.processes.terminate_async(
            self.reactor, [p for _, p in self.processes.running]
        )


def coordinator_main(args: argparse.Namespace) -> int:
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    coordinator = Coordinator(reactor, args)
    outcome = {"code": 1}

    cleaned: list[bool] = []

    def clean_up() -> Any:
        # Before the reactor stops, whatever stops it (the end of the run,
        # SIGTERM, Ctrl-C): stop the load processes, daemons and services.
        if cleaned:
            return None
        cleaned.append(True)
        return ensureDeferred(coordinator.stop())

    async def main() -> None:
        try:
            outcome["code"] = await coordinator.run()
        except Exception as e:
            say(f"soak: {type(e).__name__}: {e}")
            outcome["code"] = 1
        finally:
            if reactor.running:  # type: ignore[attr-defined]
                reactor.stop()  # type: ignore[attr-defined]

    reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
        "before", "shutdown", clean_up
    )
    reactor.callWhenRunning(lambda: ensureDeferred(main()))  # type: ignore[attr-defined]
    try:
        reactor.run()  # type: ignore[attr-defined]
    finally:
        # After an interruption: nothing may be left running.
        coordinator.processes.stop_all()
    return outcome["code"]


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="200 clients, 1 minute")
    parser.add_argument("--clients", type=int, help=f"(default {DEFAULT_CLIENTS})")
    parser.add_argument("--minutes", type=float, help=f"(default {DEFAULT_MINUTES:g})")
    parser.add_argument("--workers", type=int, default=2, help="load processes (2)")
    parser.add_argument(
        "--interval",
        type=float,
        help="mean seconds between two sends of a client (10; quick: 2)",
    )
    parser.add_argument(
        "--disconnects", type=float, default=1.0, help="connections dropped a second"
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--drain", type=float, default=120.0, help="seconds allowed for the drain"
    )
    # Load process options (set by the coordinator).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--route", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.clients is None:
        args.clients = QUICK_CLIENTS if args.quick else DEFAULT_CLIENTS
    if args.minutes is None:
        args.minutes = QUICK_MINUTES if args.quick else DEFAULT_MINUTES
    if args.interval is None:
        args.interval = 2.0 if args.quick else 10.0
    if args.seed is None:
        args.seed = random.randrange(1_000_000)
    if args.clients < 2 or args.workers < 1 or args.minutes <= 0 or args.interval <= 0:
        parser.error("--clients must be at least 2, --minutes and --interval positive")
    args.workers = min(args.workers, args.clients)
    return args


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    return coordinator_main(args)


if __name__ == "__main__":
    sys.exit(main())
