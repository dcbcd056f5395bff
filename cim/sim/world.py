"""
The simulated cluster: a route, three IM servers, the store and the
registry, and the clients (the real L{cim.client.library.Client}, several
devices per user), built from the production classes on the simulated
nodes and network of L{cim.sim.net}, and the fault actions that the
schedule (L{cim.sim.run}) calls.

The daemons are put together as their services put them together
(L{cim.server.service.IMServerService}, L{cim.route.service.RouteService}):
the same classes, the same start order; only the reactor, the network and
the store's transport are simulated.  HTTP (client to route, route to
push APIs, janitor probes) is the real twisted.web client and server over
the simulated TCP; with L{SERVER_PUSH} "bus" (the default), the servers
push to each other over a memory bus (L{cim.bus.MemoryHub}), as over Redis
pub/sub.  Their deliveries push through a L{FaultyPusher} around the
production pusher, for the push faults.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from treq.client import HTTPClient
from treq.testing import _SynchronousProducer
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import implementer

from cim.bus import BusPusher, BusReceiver, MemoryHub
from cim.client.library import Ack, Client, ClientState, IClientListener
from cim.delivery import Delivery, IPusher, PushRetry
from cim.framing import DEFAULT_MAX_FRAME
from cim.interfaces import ServerAddress
from cim.janitor import DeadServerJanitor, http_probe
from cim.limits import MAX_OUTPUT, STORE_BATCH
from cim.message import ChatMessage
from cim.pusher import HttpPusher
from cim.registry.local import LocalBoard, LocalRegistry
from cim.route.api import RouteAPI
from cim.route.balancer import make_balancer
from cim.route.service import tcp_probe
from cim.server.core import IMServer
from cim.server.protocol import ClientConnectionFactory
from cim.server.push import PushAPI
from cim.sim.net import HeapClock, Network, Node
from cim.sim.store import StoreBox, StoreLink
from cim.store.memory import MemoryStore
from cim.web import QuietSite

SECRET = "sim-cluster-secret"
ROUTE_HOST = "10.0.1.1"
ROUTE_PORT = 8083
ROUTE_URL = f"http://{ROUTE_HOST}:{ROUTE_PORT}"
CLIENT_PORT = 11211
PUSH_PORT = 8081
#: The clock's time at the start of every run.
EPOCH_START = 1_700_000_000.0
#: Shorter than production, so that a run sees several renewals.
SESSION_TTL = 30.0
#: How the servers push to each other: over a memory bus ("bus", as over
#: Redis pub/sub in production), or over the push API ("http").
SERVER_PUSH = "bus"
#: How long a push under a push fault waits before it fails.
PUSH_TIMEOUT = 3.0


class _Endpoints:
    """
    An endpoint factory for L{Agent}: TCP over the simulated network.
    """

    def __init__(self, node: Node) -> None:
        self.node = node

    def endpointForURI(self, uri: Any) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(
            self.node, uri.host.decode("ascii"), uri.port, timeout=5
        )


class SimHTTP:
    """
    A treq client on a simulated node: a real L{Agent} (with a persistent
    pool, as L{cim.web.http_client}) over the simulated TCP; time-outs on
    the node's clock.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        self.pool = HTTPConnectionPool(node, persistent=True)  # type: ignore[arg-type]
        self.pool.retryAutomatically = False
        self.pool.maxPersistentPerHost = 2
        agent = Agent.usingEndpointFactory(node, _Endpoints(node), pool=self.pool)  # type: ignore[arg-type]
        # A body is written at once (treq's default producer cooperates
        # on the global reactor).
        self._client = HTTPClient(agent, data_to_body_producer=_SynchronousProducer)

    def get(self, url: str, **kwargs: Any) -> Deferred[Any]:
        kwargs.setdefault("reactor", self.node)
        return self._client.get(url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Deferred[Any]:
        kwargs.setdefault("reactor", self.node)
        return self._client.post(url, **kwargs)


class Trace:
    """
    What happened in a run, in order: the simulator's own events, and the
    warnings and errors the production code logged.
    """

    def __init__(self, clock: HeapClock) -> None:
        self.clock = clock
        self.lines: list[tuple[float, str]] = []

    def __call__(self, text: str) -> None:
        self.lines.append((self.clock.seconds() - EPOCH_START, text))

    def render(self, last: int = 400) -> str:
        lines = self.lines[-last:]
        skipped = len(self.lines) - len(lines)
        out = [f"  ... {skipped} earlier events" for _ in range(1) if skipped]
        out += [f"  {t:9.3f}  {text}" for t, text in lines]
        return "\n".join(out)


def _logged(d: Deferred[Any], trace: Trace, what: str) -> None:
    """
    Note in the trace how C{d} ended; its failure is consumed (the
    simulator's own calls are allowed to fail, as a user's would).
    """

    def failed(f: Failure) -> None:
        trace(f"{what} failed: {f.value.__class__.__name__}: {f.getErrorMessage()}")

    d.addErrback(failed)


@implementer(IPusher)
class FaultyPusher:
    """
    Whichever L{IPusher} a daemon's deliveries use, under the world's push
    faults (L{World.push_faults}: server address, or C{"*"} for every
    server -> fault), as an
    overloaded server's pushes fail: with C{"drop"} a push to that server
    is never sent, with C{"lost-reply"} it is sent but its answer is lost;
    either way the caller sees a time-out (L{CancelledError}) after
    L{PUSH_TIMEOUT} seconds on its node's clock.
    """

    def __init__(self, pusher: IPusher, world: World, node: Node) -> None:
        self.pusher = pusher
        self.world = world
        self.node = node

    def push(
        self, server: str, messages: Sequence[ChatMessage], user_ids: Sequence[int]
    ) -> Deferred[list[int]]:
        return self._through(
            server, lambda: self.pusher.push(server, messages, user_ids)
        )

    def push_read(
        self,
        server: str,
        reader_id: int,
        conversation: str,
        seq: int,
        user_ids: Sequence[int],
    ) -> Deferred[list[int]]:
        return self._through(
            server,
            lambda: self.pusher.push_read(
                server, reader_id, conversation, seq, user_ids
            ),
        )

    def _through(
        self, server: str, send: Callable[[], Deferred[list[int]]]
    ) -> Deferred[list[int]]:
        faults = self.world.push_faults
        fault = faults.get(server) or faults.get("*")
        if fault is None:
            return send()
        if fault == "lost-reply":
            send().addErrback(lambda _: None)
        timed_out: Deferred[list[int]] = Deferred()
        self.node.callLater(PUSH_TIMEOUT, timed_out.errback, CancelledError())
        return timed_out


class ServerProc:
    """
    One IM server process: started as L{IMServerService} starts one.
    """

    def __init__(self, world: World, index: int) -> None:
        self.world = world
        self.name = f"server{index + 1}"
        self.host = f"10.0.0.{index + 1}"
        self.address = ServerAddress(self.host, CLIENT_PORT, PUSH_PORT)
        self.node: Node | None = None
        self.server: IMServer | None = None
        self.registry: LocalRegistry | None = None
        self.janitor: DeadServerJanitor | None = None
        self.store: StoreLink | None = None
        self.up = False
        self.runs = 0

    def start(self) -> None:
        world = self.world
        self.runs += 1
        self.node = node = world.net.node(self.name, self.host)
        self.store = world.store_link(node)
        self.registry = LocalRegistry(world.board)
        world.trace(f"{self.name}: starting (run {self.runs})")
        d = ensureDeferred(self._start(node))
        d.addErrback(self._start_failed, node)

    async def _start(self, node: Node) -> None:
        world = self.world
        store = self.store
        assert store is not None and self.registry is not None
        await store.drop_server_sessions(str(self.address))
        bus = world.bus.bus(node) if world.server_push == "bus" else None
        server = IMServer(
            node,
            store,  # type: ignore[arg-type]
            self.address,
            FaultyPusher(
                BusPusher(bus, node)
                if bus is not None
                else HttpPusher(SimHTTP(node), SECRET),  # type: ignore[arg-type]
                world,
                node,
            ),
            session_ttl=SESSION_TTL,
            push_retry=PushRetry(time=SESSION_TTL),
            rng=random.Random(world.rng.getrandbits(32)),
            broadcast_from=world.broadcast_from,
            session_cache=world.session_cache,
            store_batch=world.store_batch,
        )
        world.net.listen(
            node,
            self.host,
            CLIENT_PORT,
            ClientConnectionFactory(server, DEFAULT_MAX_FRAME, MAX_OUTPUT),
        )
        world.net.listen(
            node,
            self.host,
            PUSH_PORT,
            QuietSite(PushAPI(server, SECRET).app.resource(), reactor=node),
        )
        server.start()
        self.server = server
        if bus is not None:
            await BusReceiver(bus, server.here, server, server.resync_all).start()
            server.delivery.feed = world.group_feed
        await self.registry.start()
        await self.registry.register(self.address)
        self.janitor = DeadServerJanitor(
            node,
            self.registry,
            store,  # type: ignore[arg-type]
            probe=http_probe(SimHTTP(node)),
        )
        self.janitor.start()
        self.up = True
        world.trace(f"{self.name}: ready")

    def _start_failed(self, failure: Failure, node: Node) -> None:
        # Its supervisor starts it again.
        self.world.trace(f"{self.name}: start failed: {failure.getErrorMessage()}")
        if node.alive:
            self.world.net.crash(node, reset=True)
            if self.registry is not None:
                self.registry.stop()
            self.world.clock.callLater(1.0, self._again, self.runs)

    def _again(self, run: int) -> None:
        # Unless it was started since (the faults healed).
        if self.runs == run and not self.up:
            self.start()

    def crash(self, reset: bool) -> None:
        """
        The process dies: memory gone, sessions left in the store; its
        registry entry goes when its (ZooKeeper) session expires.
        """
        assert self.node is not None
        self.world.trace(f"{self.name}: crash ({'reset' if reset else 'silent'})")
        self.world.crashes.append((self.world.clock.seconds(), self.host))
        self.world.net.crash(self.node, reset)
        self.up = False
        self.server = None
        registry = self.registry
        if registry is not None:
            self.world.clock.callLater(2.0, registry.stop)

    def registry_expired(self, seconds: float) -> None:
        """
        Its registry session expires: the address leaves the registry, and
        is announced again C{seconds} later.
        """
        registry, node = self.registry, self.node
        if registry is None or not self.up:
            return
        self.world.trace(f"{self.name}: registry session expired for {seconds:.1f}s")
        registry.unregister()

        def again() -> None:
            if self.registry is registry and node is not None and node.alive:
                self.world.trace(f"{self.name}: registered again")
                registry.register(self.address)

        self.world.clock.callLater(seconds, again)


class RouteProc:
    """
    The route process: put together as L{RouteService} does.
    """

    name = "route"

    def __init__(self, world: World) -> None:
        self.world = world
        self.node: Node | None = None
        self.api: RouteAPI | None = None
        self.runs = 0

    def start(self) -> None:
        world = self.world
        self.runs += 1
        world.trace(f"route: starting (run {self.runs})")
        self.node = node = world.net.node(self.name, ROUTE_HOST)
        store = world.store_link(node)
        registry = LocalRegistry(world.board)
        http = SimHTTP(node)
        pusher = HttpPusher(http, SECRET)  # type: ignore[arg-type]
        self.janitor = DeadServerJanitor(
            node,
            registry,
            store,  # type: ignore[arg-type]
            probe=http_probe(http),
        )
        self.janitor.start()
        delivery = Delivery(
            store,  # type: ignore[arg-type]
            FaultyPusher(pusher, world, node),
            clock=node,
            retry=PushRetry(time=SESSION_TTL),
            rng=random.Random(world.rng.getrandbits(32)),
            per_turn=True,
            session_cache=world.session_cache,
        )
        self.api = RouteAPI(
            store,  # type: ignore[arg-type]
            registry,
            delivery,
            pusher,
            make_balancer("consistent-hash"),
            node,
            SECRET,
            tcp_probe(node),  # type: ignore[arg-type]
        )
        world.net.listen(
            node,
            ROUTE_HOST,
            ROUTE_PORT,
            QuietSite(self.api.resource(), reactor=node),
        )

    def restart(self, down: float) -> None:
        assert self.node is not None
        self.world.trace(f"route: restart, down for {down:.1f}s")
        self.janitor.stop()
        self.world.net.crash(self.node, reset=True)
        self.world.clock.callLater(down, self._again, self.runs)

    def _again(self, run: int) -> None:
        # Unless it was started since (the faults healed).
        if self.runs == run:
            self.start()


@dataclass
class Shown:
    """
    A message a client showed its user.
    """

    conversation: str
    epoch: str
    seq: int
    sender_id: int
    text: str
    at: float


@implementer(IClientListener)
class Recorder:
    """
    The listener of one client instance: what it showed, what was
    acknowledged, and its states.
    """

    def __init__(self, device: Device, instance: int) -> None:
        self.device = device
        self.instance = instance
        self.shown: list[Shown] = []
        self.acks: dict[str, Ack] = {}
        self.resets: list[tuple[str, int]] = []
        self.state = ClientState.IDLE

    def message_received(self, message: ChatMessage) -> None:
        world = self.device.world
        shown = Shown(
            message.conversation,
            message.epoch,
            message.seq,
            message.sender_id,
            message.text,
            world.clock.seconds(),
        )
        self.shown.append(shown)
        if world.verbose:
            world.trace(
                f"{self.device.name}#{self.instance} shows {message.conversation} "
                f"{message.epoch[:4]}:{message.seq} {message.text!r}"
            )

    def ack_received(self, ack: Ack) -> None:
        self.acks[ack.client_msg_id] = ack

    def error_received(self, code: int, reason: str, client_msg_id: str) -> None:
        self.device.world.trace(
            f"{self.device.name}#{self.instance}: error {code} {reason} {client_msg_id}"
        )

    def state_changed(self, state: ClientState, reason: str) -> None:
        self.state = state
        self.device.world.trace(
            f"{self.device.name}#{self.instance}: {state.value} {reason}"
        )

    def conversation_reset(self, conversation: str, seq: int) -> None:
        self.resets.append((conversation, seq))
        self.device.world.trace(
            f"{self.device.name}#{self.instance}: {conversation} reset to {seq}"
        )

    def read_changed(self, user_id: int, conversation: str, seq: int) -> None:
        pass


@dataclass
class Sent:
    """
    A send of the workload, named by its text (unique in a run).
    """

    text: str
    device: str
    instance: int
    conversation: str
    at: float
    acked_at: float | None = None
    seq: int = 0
    failed: str = ""
    #: The host of the server it was sent to (a TCP send).
    via: str = ""


@dataclass
class User:
    """
    A user of the workload; a C{pal} takes part only in one-message
    conversations (L{World.oneshots}).
    """

    index: int
    name: str
    user_id: int = 0
    key: str = ""
    devices: list[Device] = field(default_factory=list)
    pal: bool = False


class Device:
    """
    One device of a user: the client instance running on it now (a new
    one after each log-out), on a node of its own.
    """

    def __init__(self, world: World, user: User, index: int) -> None:
        self.world = world
        self.user = user
        self.device_id = f"dev{index}"
        self.name = f"{user.name}/{self.device_id}"
        self.host = f"10.0.2.{user.index * 8 + index + 1}"
        self.node = world.net.node(f"c-{self.name}", self.host)
        self.client: Client | None = None
        self.recorder: Recorder | None = None
        #: Every instance's recorder, in order.
        self.recorders: list[Recorder] = []
        #: Whether it is meant to be logged in (the workload logged it in
        #: and did not log it out).
        self.wanted = False

    def login(self) -> None:
        world = self.world
        self.wanted = True
        instance = len(self.recorders) + 1
        recorder = Recorder(self, instance)
        self.recorders.append(recorder)
        self.recorder = recorder
        self.client = client = Client(
            self.node,
            ROUTE_URL,
            http=SimHTTP(self.node),  # type: ignore[arg-type]
            listener=recorder,
            device=self.device_id,
            rng=random.Random(world.rng.getrandbits(32)),
            heartbeat_interval=5.0,
            idle_timeout=15.0,
            pong_timeout=5.0,
            login_timeout=5.0,
            http_timeout=5.0,
            backoff_base=0.2,
            backoff_max=3.0,
            close_timeout=2.0,
        )
        world.trace(f"{self.name}#{instance}: log in")
        d = ensureDeferred(
            client.login(
                self.user.name, user_id=self.user.user_id, account_key=self.user.key
            )
        )
        d.addErrback(self._login_failed, client)

    def _login_failed(self, failure: Failure, client: Client) -> None:
        self.world.trace(f"{self.name}: login failed: {failure.getErrorMessage()}")
        # The application tries again, as long as it is meant to be in.
        if self.client is client and self.wanted:
            self.world.clock.callLater(
                1.0 + self.world.rng.random(), self.relogin, client
            )

    def relogin(self, client: Client) -> None:
        if self.client is client and self.wanted:
            self.login()

    def logout(self) -> None:
        client = self.client
        self.wanted = False
        if client is None:
            return
        self.world.trace(f"{self.name}: log out")
        _logged(ensureDeferred(client.close()), self.world.trace, f"{self.name} close")

    @property
    def ready(self) -> bool:
        return self.client is not None and self.client.ready


class World:
    """
    Everything of one run.
    """

    def __init__(
        self,
        seed: int,
        users: int = 4,
        devices: int = 2,
        verbose: bool = False,
        pals: int = 0,
    ) -> None:
        self.seed = seed
        self.verbose = verbose
        self.rng = random.Random(seed)
        self.clock = HeapClock(EPOCH_START)
        self.trace = Trace(self.clock)
        self.net = Network(self.clock, random.Random(self.rng.getrandbits(32)))
        self.store_node = self.net.node("store", "10.0.3.1")
        self.box = StoreBox(MemoryStore(self.store_node))  # type: ignore[arg-type]
        self.links: dict[str, StoreLink] = {}
        self.board = LocalBoard()
        #: The servers' message bus (Redis pub/sub in production), used
        #: when C{server_push} is "bus" (L{SERVER_PUSH}).
        self.bus = MemoryHub()
        self.server_push = SERVER_PUSH
        #: The servers' C{broadcast_from} (L{cim.delivery.Delivery}): the
        #: simulated groups are small, so half of the worlds push every
        #: group message to every server holding sessions, as large groups
        #: are delivered.  (Drawn from a generator of its own: the seeds
        #: play what they played before.)
        self.broadcast_from = random.Random(seed * 7919 + 1).choice([None, 2])
        #: How many users' sessions each delivery keeps
        #: (L{cim.sessioncache}): none, a few (entries are dropped all the
        #: time), or all.  (A generator of its own, as above.)
        self.session_cache = random.Random(seed * 7919 + 2).choice([0, 3, 10_000])
        #: The servers' C{store_batch}: renewals and cursor saves of a
        #: device or two a store call (each call after the one before, any
        #: of them failing on its own), or all of them in one.  (A
        #: generator of its own, as above.)
        self.store_batch = random.Random(seed * 7919 + 3).choice([1, 2, STORE_BATCH])
        #: Whether a group's messages reach the servers from the store's
        #: feed (the append publishing them on the bus in its order, as the
        #: Redis store does), in the worlds that broadcast them.
        self.group_feed = self.server_push == "bus" and self.broadcast_from is not None
        if self.group_feed:
            self.box.store.feed_bus = self.bus.bus(self.store_node)
        self.servers = [ServerProc(self, i) for i in range(3)]
        self.route = RouteProc(self)
        self.users = [User(i, f"user{i}") for i in range(users)]
        for user in self.users:
            user.devices = [Device(self, user, k) for k in range(devices)]
        for i in range(users, users + pals):
            pal = User(i, f"pal{i}", pal=True)
            pal.devices = [Device(self, pal, 0)]
            self.users.append(pal)
        #: Server address -> its push fault (L{FaultyPusher}).
        self.push_faults: dict[str, str] = {}
        #: The one-message conversations: conversation -> its text.
        self.oneshots: dict[str, str] = {}
        #: (time, host) of each server crash.
        self.crashes: list[tuple[float, str]] = []
        self.groups: list[str] = []
        self.sends: dict[str, Sent] = {}
        #: (snapshot time, restore time) of each restore of the store.
        self.restores: list[tuple[float, float]] = []
        self.ever_members: dict[str, set[int]] = {}
        self.joined_later: dict[str, set[int]] = {}
        #: Numbers of the last messages (L{cim.sim.run.Scenario.last_messages}).
        self.finals: list[int] = []
        self.history_errors: list[str] = []

    def store_link(self, node: Node) -> StoreLink:
        link = StoreLink(self.box, node, random.Random(self.rng.getrandbits(32)))
        self.links[node.name] = link
        return link

    @property
    def store(self) -> MemoryStore:
        return self.box.store

    def devices(self) -> list[Device]:
        return [d for u in self.users for d in u.devices]

    @property
    def regulars(self) -> list[User]:
        """
        The users of the ordinary workload (not the pals).
        """
        return [u for u in self.users if not u.pal]

    def call(self, delay: float, f: Callable[..., object], *args: Any) -> None:
        self.clock.callLater(delay, f, *args)
