"""
The route as a Twisted service: opens the store and the registry, serves
the HTTP API, and shuts down cleanly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from twisted.internet import endpoints
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.web.client import HTTPConnectionPool

from cim import names
from cim.bus import BusPusher, open_bus
from cim.daemon import AsyncStartService
from cim.delivery import Delivery, PushRetry
from cim.interfaces import IBus, IPusher, IReactor, IRegistry, IStore, ServerAddress
from cim.janitor import DeadServerJanitor, http_probe
from cim.limits import (
    DEVICE_KEY_TTL,
    MAX_BATCH,
    MAX_DEVICES,
    SENDER_QUOTA,
    SESSION_CACHE,
)
from cim.limits_net import (
    HTTP_PER_ADDRESS,
    SHUTDOWN_TIMEOUT,
    ConnectionLimits,
    LimitedFactory,
    NetLimits,
)
from cim.listen import Listen, bound_host, is_tls, server_endpoint
from cim.metrics import Metrics
from cim.pusher import HttpPusher
from cim.route.api import MAX_BODY, RouteAPI
from cim.route.balancer import make_balancer
from cim.route.logic import Probe
from cim.route.webclient import WebClient
from cim.web import QuietSite, http_client

if TYPE_CHECKING:
    from cim.server.core import IMServer


@dataclass
class RouteConfig:
    """
    The settings of one route (see L{cim.route.tap.Options}).

    @ivar probe_timeout: how long a login waits for a chosen server to
        accept a TCP connection before trying the next one, in seconds.
    @ivar limits: connections and requests (its C{per_address} applies to
        the HTTP port).
    @ivar shutdown_timeout: seconds the stop waits for the store and
        registry.
    @ivar login_rate: failed logins and registrations a minute per account;
        C{address_rate}: per client address (L{cim.route.throttle}).
    @ivar port: a number (TCP on C{bind}) or an endpoint description
        (L{cim.listen}).
    @ivar ca_file: the CAs of the servers' push API certificates.
    @ivar max_devices: how many devices (sessions) one user may hold.
    @ivar device_key_ttl: how long a device key lives, in seconds.
    @ivar push: how pushes reach IM servers: C{"bus"} (Redis pub/sub when
        the store is Redis, else the push API) or C{"http"} (the push API);
        C{push_timeout}: seconds a publish may wait for Redis.
    @ivar push_retry: how the pushes of HTTP sends that failed are sent
        again.
    @ivar session_cache: how many users' sessions the deliveries keep
        (L{cim.sessioncache}; 0: none).
    """

    port: Listen = 8083
    bind: str = "0.0.0.0"
    secret: str = ""
    balancer: str = "consistent-hash"
    require_password: bool = False
    token_ttl: float = 86400.0
    legacy_auth: bool = False
    max_message: int = 4096
    max_batch: int = MAX_BATCH
    sender_quota: int = SENDER_QUOTA
    max_body: int = MAX_BODY
    probe_timeout: float = 2.0
    limits: NetLimits = field(
        default_factory=lambda: NetLimits(per_address=HTTP_PER_ADDRESS)
    )
    shutdown_timeout: float = SHUTDOWN_TIMEOUT
    login_rate: float = 10.0
    address_rate: float = 60.0
    ca_file: str | None = None
    max_devices: int = MAX_DEVICES
    device_key_ttl: float = DEVICE_KEY_TTL
    push: str = "bus"
    push_timeout: float = 5.0
    push_retry: PushRetry = field(default_factory=PushRetry)
    session_cache: int = SESSION_CACHE


#: How long a probe's answer is reused, in seconds.
PROBE_CACHE = 1.0
#: How many servers' answers are kept.
PROBE_CACHE_SIZE = 10_000


class _Hangup(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


def tcp_probe(reactor: IReactor, timeout: float = 2.0) -> Probe:
    """
    A probe that connects to a server's client port (and hangs up at once).

    @return: a function of a L{ServerAddress} returning a Deferred that
        fires with whether the connection succeeded within C{timeout}
        seconds.
    """
    factory = Factory.forProtocol(_Hangup)
    factory.noisy = False

    # A probe's answer stands for a second: logins do not each open a
    # connection to their server, and a dead server is skipped at once.
    # Logins that find no answer while a probe of their server is under way
    # wait for that one (a burst of logins opens one connection, not one
    # each).  Keyed by what is probed, the host and client port.
    answers: dict[tuple[str, int], tuple[float, bool]] = {}
    probing: dict[tuple[str, int], list[Deferred[bool]]] = {}

    def remember(alive: bool, key: tuple[str, int]) -> None:
        if len(answers) >= PROBE_CACHE_SIZE:
            answers.clear()
        answers[key] = (reactor.seconds() + PROBE_CACHE, alive)
        for waiting in probing.pop(key, ()):
            waiting.callback(alive)

    def probe(server: ServerAddress) -> Deferred[bool]:
        key = (server.host, server.port)
        known = answers.get(key)
        if known is not None and known[0] > reactor.seconds():
            return succeed(known[1])
        # Each login gets a Deferred of its own: one that is cancelled (its
        # request went away) leaves the probe to the others.
        d: Deferred[bool] = Deferred()
        waiting = probing.get(key)
        if waiting is not None:
            waiting.append(d)
            return d
        probing[key] = [d]
        endpoint = endpoints.TCP4ClientEndpoint(
            reactor, server.host, server.port, timeout=timeout
        )
        connecting: Deferred[Any] = endpoint.connect(factory)
        connecting.addCallbacks(lambda _: True, lambda _: False).addCallback(
            remember, key
        )
        return d

    return probe


class RouteService(AsyncStartService):
    """
    Runs a route: opens the store (C{store_factory} returns a Deferred, or a
    coroutine, firing with it), starts the registry and a
    L{DeadServerJanitor}, then listens.

    If start-up fails, the failure is logged, L{ready} fails and
    C{on_failure} is called (the tap stops the reactor).

    @param local: the IM server running in this process (single-process
        mode), which the route delivers to directly.
    @param own_store: close the store when stopping (not when the store is
        shared, in the single-process mode).
    @param probe: checks servers before logins go there; a L{tcp_probe} by
        default.
    @param connections: the count of connections this process holds, when
        another service shares it (single-process mode).
    @ivar ready: fires with this service once it listens.
    @ivar port: the port it listens on, once L{ready} fired.
    @ivar api: the L{RouteAPI}, once L{ready} fired.
    """

    what = "The route"

    def __init__(
        self,
        reactor: IReactor,
        config: RouteConfig,
        store_factory: Callable[[], Any],
        registry: IRegistry,
        local: IMServer | None = None,
        on_failure: Callable[[], object] | None = None,
        probe: Probe | None = None,
        own_store: bool = True,
        connections: ConnectionLimits | None = None,
    ) -> None:
        super().__init__(on_failure)
        self.own_store = own_store
        self.reactor = reactor
        self.config = config
        self.shutdown_timeout = config.shutdown_timeout
        self.connections = connections or ConnectionLimits(
            config.limits.max_connections
        )
        self.store_factory = store_factory
        self.registry = registry
        self.local = local
        self.probe = probe or tcp_probe(reactor, config.probe_timeout)
        self.store: IStore | None = None
        self.api: RouteAPI | None = None
        self.port: int | None = None
        self._listening: Any = None
        #: The HTTP port's factory, with its connection counts.
        self.factory: LimitedFactory | None = None
        self._janitor: DeadServerJanitor | None = None
        self._pool: HTTPConnectionPool | None = None
        self._registry_started = False
        #: The message bus, when pushes go over one.
        self.bus: IBus | None = None
        self.delivery: Delivery | None = None

    async def _start(self) -> None:
        config = self.config
        # Before any request: names are compared by their confusable key.
        names.load()
        self.store = store = await self.store_factory()
        if self.own_store:
            # The quota is counted where messages are stored.
            store.retention = replace(store.retention, sender_quota=config.sender_quota)
        self._registry_started = True
        await self.registry.start()
        # A pool of our own, so that stopping closes its connections.
        http, self._pool = http_client(self.reactor, ca_file=config.ca_file)
        control = HttpPusher(http, config.secret)
        # Pushes over the bus with a Redis store; kicks and resyncs over
        # the push API.
        pusher: IPusher = control
        if config.push == "bus" and self.local is None:
            self.bus = open_bus(self.reactor, store, config.push_timeout)
        if self.bus is not None:
            pusher = BusPusher(self.bus, self.reactor)
        # Issue 8: a server that left the registry but still answers keeps
        # its sessions (see DeadServerJanitor).
        self._janitor = DeadServerJanitor(
            self.reactor, self.registry, store, probe=http_probe(http)
        )
        self._janitor.start()
        local = self.local
        metrics = Metrics("cim_route")
        self.delivery = delivery = Delivery(
            store,
            pusher,
            local=local,
            here=str(local.address) if local else None,
            clock=self.reactor,
            retry=config.push_retry,
            metrics=metrics,
            per_turn=True,
            session_cache=config.session_cache,
        )
        self.api = RouteAPI(
            store,
            self.registry,
            delivery,
            control,
            make_balancer(config.balancer),
            self.reactor,
            config.secret,
            self.probe,
            token_ttl=config.token_ttl,
            require_password=config.require_password,
            legacy_auth=config.legacy_auth,
            max_message=config.max_message,
            max_batch=config.max_batch,
            max_body=config.max_body,
            login_rate=config.login_rate,
            address_rate=config.address_rate,
            max_devices=config.max_devices,
            device_key_ttl=config.device_key_ttl,
        )
        self.api.metrics.include(metrics)
        site = QuietSite(
            WebClient(self.api.resource()),
            reactor=self.reactor,
            max_body=config.max_body,
            request_timeout=config.limits.request_timeout,
        )
        self.factory = LimitedFactory(
            site,
            self.connections,
            config.limits.per_address,
            self.reactor,
            "cim-route HTTP",
        )
        self._listening = await server_endpoint(
            self.reactor, config.port, config.bind, 1024
        ).listen(self.factory)
        self.port = getattr(self._listening.getHost(), "port", None)
        # tests/kit/cluster.py reads the port from this line.
        self.log.info(
            "cim-route listening on {bind}:{port} ({balancer}; {servers} servers{tls})",
            bind=bound_host(self._listening, config.bind),
            port=self.port if self.port is not None else config.port,
            balancer=config.balancer,
            servers=len(self.registry.servers()),
            tls="; TLS" if is_tls(config.port) else "",
        )

    async def _stop(self) -> None:
        # Each step within the shutdown deadline (see AsyncStartService).
        if self._listening is not None:
            listening, self._listening = self._listening, None
            await self._step("closing the HTTP port", listening.stopListening)
        if self.api is not None:
            self.api.router.stop()
        if self._janitor is not None:
            self._janitor.stop()
            self._janitor = None
        if self.delivery is not None:
            self.delivery.stop()
        if self._registry_started:
            self._registry_started = False
            await self._step("leaving the registry", self.registry.stop)
        if self.bus is not None:
            bus, self.bus = self.bus, None
            await self._step("closing the message bus", bus.close)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await self._step("closing calls to servers", pool.closeCachedConnections)
        if self.store is not None and self.own_store:
            await self._step("closing the store", self.store.close)
        self.store = None
