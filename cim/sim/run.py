"""
One run of the simulator: a seed gives a workload and a fault schedule;
the cluster of L{cim.sim.world} runs them on its clock, the faults heal,
everything settles, and the invariants are checked.  A run is a pure
function of its seed (and of the broken variant, if any).
"""

from __future__ import annotations

import gc
import random
import secrets
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.logger import globalLogPublisher

from cim import names
from cim.client.library import ClientState
from cim.envelope import OFFLINE_USER
from cim.message import BROADCAST, GROUP_PREFIX, group_conversation, pair_conversation
from cim.sim.world import EPOCH_START, Device, Sent, World, _logged

#: Seconds of workload and faults.
ACTIVE = 25.0
#: Seconds after the faults heal before the last messages are sent.
SETTLE = 20.0
#: Seconds after the last messages before the invariants are checked.
FINAL = 8.0

#: Exceptions that mean a bug wherever they are logged.
BUG_TYPES = (
    "AssertionError",
    "AttributeError",
    "KeyError",
    "IndexError",
    "TypeError",
    "ValueError",
    "NameError",
    "RuntimeError",
    "UnboundLocalError",
    "ZeroDivisionError",
    "AlreadyCalledError",
    "RecursionError",
)


@dataclass
class Result:
    seed: int
    violations: list[str] = field(default_factory=list)
    trace: str = ""
    sends: int = 0
    acked: int = 0
    shown: int = 0
    faults: int = 0
    #: The broken variant it ran (L{cim.sim.breaks}), if any.
    broken: str = ""

    @property
    def ok(self) -> bool:
        return not self.violations

    def report(self) -> str:
        head = f"seed {self.seed}: " + (
            "ok" if self.ok else f"{len(self.violations)} violations"
        )
        if self.ok:
            return head
        lines = [head, "trace (simulated seconds since start):", self.trace, ""]
        lines.append("violations:")
        lines += [f"  - {v}" for v in self.violations[:40]]
        extra = f' SIM_ARGS="--broken {self.broken}"' if self.broken else ""
        lines.append(f"reproduce: make sim SEED={self.seed}{extra}")
        return "\n".join(lines)


@contextmanager
def deterministic(rng: random.Random) -> Iterator[None]:
    """
    Make the ids that production code draws (uuid4, secrets) come from
    C{rng} for the duration.
    """
    saved = (uuid.uuid4, secrets.token_urlsafe, secrets.token_hex, secrets.token_bytes)

    def token_bytes(n: int | None = None) -> bytes:
        return rng.getrandbits(8 * (n or 32)).to_bytes(n or 32, "big")

    def token_hex(n: int | None = None) -> str:
        return token_bytes(n).hex()

    def token_urlsafe(n: int | None = None) -> str:
        import base64

        return base64.urlsafe_b64encode(token_bytes(n)).rstrip(b"=").decode("ascii")

    uuid.uuid4 = lambda: uuid.UUID(int=rng.getrandbits(128), version=4)  # type: ignore[assignment]
    secrets.token_urlsafe = token_urlsafe  # type: ignore[assignment]
    secrets.token_hex = token_hex  # type: ignore[assignment]
    secrets.token_bytes = token_bytes  # type: ignore[assignment]
    try:
        yield
    finally:
        uuid.uuid4, secrets.token_urlsafe, secrets.token_hex, secrets.token_bytes = (
            saved
        )


class Scenario:
    """
    The workload and faults of one seed, scheduled on the world's clock.
    """

    def __init__(self, world: World) -> None:
        self.world = world
        self.rng = random.Random(world.rng.getrandbits(32))
        self.count = 0
        self.faults = 0
        #: Heals scheduled for the end of the active phase.
        self.heals: list[Callable[[], None]] = []

    def text(self, device: Device) -> str:
        self.count += 1
        return f"m{self.count}-{device.name}"

    def at(self, t: float, f: Callable[..., object], *args: Any) -> None:
        self.world.call(t, f, *args)

    def build(self) -> None:
        rng = self.rng
        world = self.world
        # Logins: every device starts in, some a little later.
        for device in world.devices():
            self.at(rng.uniform(0, 2), device.login)
        for _ in range(rng.randint(15, 35)):
            self.at(rng.uniform(1, ACTIVE), self.action)
        for _ in range(rng.randint(1, 4)):
            self.at(rng.uniform(2, ACTIVE - 5), self.fault)
        for _ in range(rng.randint(1, 2)):
            self.at(rng.uniform(2, ACTIVE - 5), self.push_fault)

    # Workload

    def ready_device(self) -> Device | None:
        ready = [d for d in self.world.devices() if d.ready and not d.user.pal]
        return self.rng.choice(ready) if ready else None

    def action(self) -> None:
        rng = self.rng
        kind = rng.choices(
            [
                "private",
                "group",
                "burst",
                "broadcast",
                "history",
                "read",
                "logout",
                "join",
                "leave",
                "http_batch",
                "oneshot",
            ],
            [30, 25, 8, 3, 4, 6, 5, 4, 3, 6, 20],
        )[0]
        if kind == "logout":
            device = rng.choice(self.world.devices())
            if device.wanted:
                device.logout()
                self.at(rng.uniform(0.5, 8), device.login)
            return
        if kind == "oneshot":
            self.do_oneshot()
            return
        ready = self.ready_device()
        if ready is None:
            return
        getattr(self, "do_" + kind)(ready)

    def do_private(self, device: Device, count: int = 1) -> None:
        peer = self.rng.choice(self.world.regulars)
        conversation = pair_conversation(device.user.user_id, peer.user_id)
        for _ in range(count):
            self.send(device, conversation, peer.user_id, "")

    def do_group(self, device: Device, count: int = 1) -> None:
        groups = [
            g
            for g in self.world.groups
            if device.user.user_id in self.world.store._groups[g].members
        ]
        if not groups:
            return
        group = self.rng.choice(groups)
        for _ in range(count):
            self.send(device, group_conversation(group), 0, group)

    def do_oneshot(self) -> None:
        """
        A message in a conversation of a pal that holds none yet, and gets
        no other: nothing later reveals it if it went missing (as in random
        chat among many users, where most pairs exchange one message).
        """
        world = self.world
        pairs = sorted(
            {
                (min(a.user_id, b.user_id), max(a.user_id, b.user_id))
                for a in world.users
                if a.pal
                for b in world.users
                if b is not a
            }
        )
        free = [p for p in pairs if pair_conversation(*p) not in world.oneshots]
        if not free:
            return
        pair = self.rng.choice(free)
        senders = [d for d in world.devices() if d.ready and d.user.user_id in pair]
        if not senders:
            return
        device = self.rng.choice(senders)
        [peer] = set(pair) - {device.user.user_id}
        conversation = pair_conversation(*pair)
        text = self.send(device, conversation, peer, "")
        world.oneshots[conversation] = text

    def do_burst(self, device: Device) -> None:
        if self.rng.random() < 0.5:
            self.do_private(device, self.rng.randint(3, 10))
        else:
            self.do_group(device, self.rng.randint(3, 10))

    def send(
        self,
        device: Device,
        conversation: str,
        peer: int,
        group: str,
    ) -> str:
        """
        Send a text from C{device}; @return: the text.
        """
        world = self.world
        client = device.client
        assert client is not None and device.recorder is not None
        text = self.text(device)
        sent = Sent(
            text,
            device.name,
            device.recorder.instance,
            conversation,
            world.clock.seconds(),
        )
        sent.via = client.server[0] if client.server else ""
        world.sends[text] = sent
        world.trace(f"{device.name}#{sent.instance} sends {text!r} to {conversation}")
        d = client.send_group(group, text) if group else client.send_private(peer, text)

        def acked(ack: Any) -> None:
            sent.acked_at = world.clock.seconds()
            sent.seq = ack.seq
            world.trace(
                f"{device.name}: {text!r} acked as {ack.conversation}:{ack.seq}"
            )

        def failed(f: Any) -> None:
            sent.failed = f.getErrorMessage()
            world.trace(f"{device.name}: {text!r} not acked: {sent.failed}")

        d.addCallbacks(acked, failed)
        return text

    def do_http_batch(self, device: Device) -> None:
        """
        A batch of texts sent over HTTP (C{/p2pRoute}, C{/group/send}),
        sent again with the same client message id until it is answered.
        """
        world = self.world
        client = device.client
        assert client is not None and device.recorder is not None
        uid = device.user.user_id
        groups = [g for g in world.groups if uid in world.store._groups[g].members]
        texts = [self.text(device) for _ in range(self.rng.randint(2, 5))]
        cmid = f"http-{self.count}"
        body: dict[str, Any] = {"userId": uid, "batchMsg": texts, "clientMsgId": cmid}
        if groups and self.rng.random() < 0.5:
            group = self.rng.choice(groups)
            path, conversation = "/group/send", group_conversation(group)
            body["groupId"] = group
        else:
            peer = self.rng.choice(world.regulars).user_id
            path, conversation = "/p2pRoute", pair_conversation(uid, peer)
            body["receiveUserId"] = peer
        sent = [
            Sent(
                t,
                device.name,
                device.recorder.instance,
                conversation,
                world.clock.seconds(),
                seq=-1,
            )
            for t in texts
        ]
        for one in sent:
            world.sends[one.text] = one
        world.trace(
            f"{device.name} sends {texts!r} over HTTP to {conversation} ({cmid})"
        )

        def attempt(left: int) -> None:
            token = client.token
            d = client.route.call(path, body, token)

            def answered(_: object) -> None:
                for one in sent:
                    one.acked_at = world.clock.seconds()
                world.trace(f"{device.name}: HTTP batch {cmid} stored")

            def failed(f: Any) -> None:
                error = f.value
                if getattr(error, "code", None) == OFFLINE_USER:
                    answered(None)
                    return
                world.trace(
                    f"{device.name}: HTTP batch {cmid} failed: {f.getErrorMessage()}"
                )
                if left > 0:
                    world.call(1.0, attempt, left - 1)

            d.addCallbacks(answered, failed)

        attempt(3)

    def do_broadcast(self, device: Device) -> None:
        assert device.client is not None
        text = "b-" + self.text(device)
        self.world.trace(f"{device.name} broadcasts {text!r}")
        _logged(
            ensureDeferred(device.client.broadcast(text)), self.world.trace, "broadcast"
        )

    def do_history(self, device: Device) -> None:
        client = device.client
        assert client is not None
        conversations = (
            sorted({s.conversation for s in device.recorder.shown} - {BROADCAST, ""})
            if device.recorder
            else []
        )
        if not conversations:
            return
        conversation = self.rng.choice(conversations)
        world = self.world
        d = ensureDeferred(client.history(conversation, limit=20))

        def check(messages: list[Any]) -> None:
            seqs = [m.seq for m in messages]
            if seqs != sorted(seqs) or len(set(seqs)) != len(seqs):
                world.trace(f"VIOLATION history of {conversation} out of order: {seqs}")
                world.history_errors.append(
                    f"history of {conversation} for {device.name} out of order: {seqs}"
                )
            for m in messages:
                if m.conversation != conversation:
                    world.history_errors.append(
                        f"history of {conversation} returned {m.conversation}"
                    )

        d.addCallback(check)
        _logged(d, world.trace, f"{device.name} history")

    def do_read(self, device: Device) -> None:
        recorder = device.recorder
        client = device.client
        assert recorder is not None and client is not None
        shown = [s for s in recorder.shown if s.conversation not in (BROADCAST, "")]
        if not shown:
            return
        last = self.rng.choice(shown)
        self.world.trace(f"{device.name} read {last.conversation} up to {last.seq}")
        client.mark_read(last.conversation, last.seq)

    def do_join(self, device: Device) -> None:
        world = self.world
        group = self.rng.choice(world.groups)
        client = device.client
        assert client is not None
        world.ever_members.setdefault(group, set()).add(device.user.user_id)
        world.joined_later.setdefault(group, set()).add(device.user.user_id)
        world.trace(f"{device.name} joins {group}")
        _logged(
            ensureDeferred(client.join_group(group)), world.trace, f"{device.name} join"
        )

    def do_leave(self, device: Device) -> None:
        world = self.world
        uid = device.user.user_id
        groups = [
            g
            for g in world.groups
            if uid in world.store._groups[g].members
            and world.store._groups[g].owner_id != uid
        ]
        if not groups:
            return
        group = self.rng.choice(groups)
        client = device.client
        assert client is not None
        world.trace(f"{device.name} leaves {group}")
        _logged(
            ensureDeferred(client.leave_group(group)),
            world.trace,
            f"{device.name} leave",
        )

    # Faults

    def fault(self) -> None:
        rng = self.rng
        world = self.world
        self.faults += 1
        kind = rng.choice(
            [
                "client_link",
                "server_link",
                "store_link",
                "store_down",
                "latency",
                "crash",
                "route",
                "registry",
                "restore",
                "clock",
                "not_reading",
            ]
        )
        length = rng.uniform(0.5, 12)
        if kind == "client_link":
            device = rng.choice(world.devices())
            server = rng.choice(world.servers)
            state = rng.choice(["cut", "stall"])
            self.link(device.node.name, server.name, state, length)
        elif kind == "server_link":
            a, b = rng.sample(world.servers, 2)
            self.link(a.name, b.name, rng.choice(["cut", "stall"]), length)
        elif kind == "store_link":
            names_ = sorted(world.links)
            name = rng.choice(names_)
            state = rng.choice(["cut", "stall"])
            world.trace(f"FAULT store link of {name}: {state} for {length:.1f}s")
            world.links[name].state = state

            def heal_link() -> None:
                link = world.links.get(name)
                if link is not None and link.state != "ok":
                    world.trace(f"heal: store link of {name}")
                    link.state = "ok"

            self.heal_after(length, heal_link)
        elif kind == "store_down":
            state = rng.choice(["error", "stall"])
            world.trace(f"FAULT store: {state} for {length:.1f}s")
            world.box.state = state

            def heal_store() -> None:
                if world.box.state != "ok":
                    world.trace("heal: store answers again")
                    world.box.state = "ok"

            self.heal_after(length, heal_store)
        elif kind == "latency":
            world.trace(f"FAULT latency burst for {length:.1f}s")
            world.net.latency_range = (0.02, rng.uniform(0.1, 1.5))

            def heal_latency() -> None:
                world.net.latency_range = (0.0005, 0.005)

            self.heal_after(length, heal_latency)
        elif kind == "crash":
            server = rng.choice([s for s in world.servers if s.up] or world.servers)
            if not server.up:
                return
            server.crash(reset=rng.random() < 0.7)
            self.heal_after(length, self.restart(server))
        elif kind == "route":
            world.route.restart(rng.uniform(0.1, 4))
        elif kind == "registry":
            server = rng.choice(world.servers)
            server.registry_expired(length)
        elif kind == "restore":
            snapshot = world.store.restored()
            taken = world.clock.seconds()
            later = rng.uniform(0.5, 10)

            def restore() -> None:
                world.trace(
                    f"FAULT store restored to its backup of {taken - EPOCH_START:.3f}"
                )
                world.restores.append((taken, world.clock.seconds()))
                world.box.store = snapshot

            world.trace("store backup taken")
            self.at(later, restore)
        elif kind == "clock":
            node = rng.choice(
                [world.store_node, world.route.node]
                + [s.node for s in world.servers if s.node is not None]
                + [d.node for d in world.devices()]
            )
            if node is None:
                return
            jump = rng.choice([5.0, 30.0, 120.0])
            world.trace(f"FAULT clock of {node.name} jumps {jump}s ahead")
            node.offset += jump
        elif kind == "not_reading":
            device = rng.choice(world.devices())
            world.trace(f"FAULT {device.name} stops reading for {length:.1f}s")
            conns = [
                c for c in world.net.sorted_connections() if c.nodes[0] is device.node
            ]
            for conn in conns:
                conn.not_reading[0] = True

            def read_again() -> None:
                for conn in conns:
                    conn.not_reading[0] = False
                    conn.resume()

            self.heal_after(length, read_again)

    def push_fault(self) -> None:
        """
        Pushes to one server, or between all of them, time out for a
        while (L{cim.sim.world.FaultyPusher}): dropped, or delivered with
        their answers lost.  (Its own schedule: the loss it provokes shows
        only with a one-message conversation at the same time.)
        """
        rng = self.rng
        world = self.world
        self.faults += 1
        length = rng.uniform(0.5, 12)
        server = rng.choice([*world.servers, None])
        name, key = (
            ("every server", "*")
            if server is None
            else (
                server.name,
                str(server.address),
            )
        )
        state = rng.choice(["drop", "drop", "lost-reply"])
        world.trace(f"FAULT pushes to {name}: {state} for {length:.1f}s")
        world.push_faults[key] = state

        def heal() -> None:
            if world.push_faults.get(key) == state:
                del world.push_faults[key]
                world.trace(f"heal: pushes to {name}")

        self.heal_after(length, heal)

    def link(self, a: str, b: str, state: str, length: float) -> None:
        world = self.world
        world.trace(f"FAULT link {a}<->{b}: {state} for {length:.1f}s")
        world.net.set_link(a, b, state)

        def heal() -> None:
            if world.net.link(a, b).state != "ok":
                world.trace(f"heal: link {a}<->{b}")
                world.net.set_link(a, b, "ok")

        self.heal_after(length, heal)

    def restart(self, server: Any) -> Callable[[], None]:
        def start() -> None:
            if not server.up and (server.node is None or not server.node.alive):
                server.start()

        return start

    def heal_after(self, length: float, heal: Callable[[], None]) -> None:
        self.heals.append(heal)
        self.at(length, heal)

    def heal_all(self) -> None:
        world = self.world
        world.trace("--- every fault heals ---")
        for heal in self.heals:
            heal()
        for server in world.servers:
            if not server.up and (server.node is None or not server.node.alive):
                server.start()
        if world.route.node is not None and not world.route.node.alive:
            world.route.start()
        # Devices meant to be in whose client gave up log in again.
        for device in world.devices():
            client = device.client
            if (
                device.wanted
                and client is not None
                and client.state
                in (
                    ClientState.FAILED,
                    ClientState.CLOSED,
                )
            ):
                world.trace(
                    f"{device.name}: gave up ({client.state.value}); log in again"
                )
                device.login()

    def last_messages(self) -> None:
        """
        After the settle: one more message in every conversation that
        holds any (a gap that only a later message reveals is closed by
        it), from a device that is in it.
        """
        world = self.world
        world.trace("--- the last messages ---")
        store = world.store
        conversations = sorted(store._messages)
        for conversation in conversations:
            if conversation == BROADCAST or conversation in world.oneshots:
                continue
            if conversation.startswith(GROUP_PREFIX):
                group = conversation[len(GROUP_PREFIX) :]
                members = set(store._groups[group].members)
            else:
                members = {int(x) for x in conversation.split(":")[1:]}
            devices = [
                d for d in world.devices() if d.ready and d.user.user_id in members
            ]
            if not devices:
                continue
            device = devices[0]
            if conversation.startswith(GROUP_PREFIX):
                self.send(device, conversation, 0, conversation[len(GROUP_PREFIX) :])
            else:
                peers = members - {device.user.user_id} or members
                self.send(device, conversation, min(peers), "")
            world.finals.append(self.count)


def setup(world: World) -> None:
    """
    Accounts and groups, straight in the store (before any backup, so that
    a restore never forgets an account), then the daemons.
    """
    names.load()
    store = world.store
    for user in world.users:
        user.key = f"key-{world.seed}-{user.index}"
        account = store.register(user.name, account_key=user.key).result  # type: ignore[attr-defined]
        user.user_id = account.user_id  # type: ignore[attr-defined]
    for g in range(2):
        group = f"grp{g}"
        owner = world.users[g % len(world.users)]
        store.create_group(group, owner.user_id, policy="open")
        world.groups.append(group)
        world.ever_members[group] = {owner.user_id}
        for user in world.regulars:
            if user is not owner and world.rng.random() < 0.6:
                store.join_group(group, user.user_id, 0)
                world.ever_members[group].add(user.user_id)
    for server in world.servers:
        server.start()
    world.route.start()


def advance(world: World, until: float) -> None:
    """
    Run the clock's calls, each at its own time, up to C{until}.
    """
    clock = world.clock
    while True:
        due = clock.next_due()
        if due is None or due > until:
            break
        clock.advance(max(0.0, due - clock.seconds()))
    if clock.seconds() < until:
        clock.advance(until - clock.seconds())


def run(seed: int, verbose: bool = False) -> Result:
    """
    Run seed C{seed}; @return: its L{Result}.
    """
    rng = random.Random(seed ^ 0x5EED)
    errors: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        failure = event.get("log_failure")
        text = event.get("log_format") or ""
        if failure is not None:
            name = failure.type.__name__
            if name in BUG_TYPES or "Unhandled error in Deferred" in text:
                errors.append(f"{name}: {failure.getErrorMessage()} ({text[:80]})")
                trace(f"ERROR logged: {name}: {failure.getErrorMessage()}")
                if verbose:
                    trace(failure.getTraceback())
        elif "Unhandled error in Deferred" in text:
            errors.append(text)
        elif (
            verbose
            and event.get("log_level") is not None
            and event["log_level"].name in ("warn", "error", "critical")
        ):
            from twisted.logger import formatEvent

            trace("log: " + formatEvent(event)[:200])

    with deterministic(rng):
        world = World(seed, users=3, pals=2, verbose=verbose)
        trace = world.trace
        result = Result(seed)
        globalLogPublisher.addObserver(observe)  # type: ignore[arg-type]
        # One collection at the end (of the run's garbage, where a Deferred
        # whose error nobody handled is reported) instead of many, which
        # need not look at what was there before the run.
        gc.freeze()
        gc.disable()
        # Python's own reports: a coroutine that would not close, an
        # exception in a __del__.
        saved_hook = sys.unraisablehook

        def unraisable(report: Any) -> None:
            errors.append(
                f"unraisable {report.exc_type.__name__}: {report.exc_value} "
                f"({report.err_msg or 'ignored'} in {report.object!r})"
            )

        sys.unraisablehook = unraisable
        try:
            result.violations = _play(world, result)
            del world
            gc.collect()
        finally:
            sys.unraisablehook = saved_hook
            gc.enable()
            globalLogPublisher.removeObserver(observe)  # type: ignore[arg-type]
    result.violations += errors
    if result.violations:
        result.trace = trace.render()
    return result


def _play(world: World, result: Result) -> list[str]:
    """
    Set C{world} up, play its scenario, heal, settle, and check it.
    @return: the violations.
    """
    from cim.sim.check import check

    setup(world)
    scenario = Scenario(world)
    scenario.build()
    start = world.clock.seconds()
    advance(world, start + ACTIVE)
    scenario.heal_all()
    advance(world, start + ACTIVE + SETTLE)
    scenario.last_messages()
    advance(world, start + ACTIVE + SETTLE + FINAL)
    violations = check(world) + world.history_errors
    result.sends = len(world.sends)
    result.acked = sum(1 for s in world.sends.values() if s.acked_at is not None)
    result.shown = sum(len(r.shown) for d in world.devices() for r in d.recorders)
    result.faults = scenario.faults
    return violations
