"""
The IM server as a Twisted service: listens, registers, and shuts down
cleanly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from twisted.web.client import HTTPConnectionPool

from cim.bus import BusPusher, BusReceiver, open_bus
from cim.daemon import AsyncStartService
from cim.delivery import PushRetry
from cim.framing import DEFAULT_MAX_FRAME
from cim.interfaces import IBus, IPusher, IRegistry, IStore, ServerAddress
from cim.janitor import DeadServerJanitor, http_probe
from cim.limits import (
    BROADCAST_FROM,
    MAX_BATCH,
    MAX_OUTPUT,
    SENDER_QUOTA,
    SESSION_CACHE,
    SESSION_TTL,
    STORE_BATCH,
)
from cim.limits_net import (
    SHUTDOWN_TIMEOUT,
    ConnectionLimits,
    LimitedFactory,
    NetLimits,
)
from cim.listen import Listen, bound_host, bound_port, is_tls, server_endpoint
from cim.pusher import HttpPusher
from cim.server.core import IMServer
from cim.server.protocol import ClientConnectionFactory
from cim.server.push import MAX_BODY, PushAPI
from cim.web import QuietSite, http_client


@dataclass
class ServerConfig:
    """
    The settings of one IM server (see L{cim.server.tap.Options}).

    @ivar limits: connections and requests (C{per_address} for the client
        port, C{http_per_address} for the push API).
    @ivar shutdown_timeout: seconds the stop waits for the store, the
        registry and the clients' releases.
    @ivar port: the client port: a number (TCP on C{bind}) or an endpoint
        description (L{cim.listen}); C{http_port} the same for the push API.
    @ivar ca_file: the CAs of the other servers' push API certificates.
    @ivar ws_port: the WebSocket gateway's listener (L{cim.server.websocket}),
        like C{port}; C{None}: no gateway.
    @ivar ws_origins: the C{--ws-origin} patterns of the pages that may
        open a WebSocket (none: pages of the host the request names).
    @ivar push: how pushes reach other servers: C{"bus"} (Redis pub/sub
        when the store is Redis, else the push API) or C{"http"} (the push
        API); C{push_timeout}: seconds a publish may wait for Redis.
    @ivar push_retry: how failed pushes to other servers are sent again.
    @ivar broadcast_from: deliveries to this many users or more push to
        every server holding sessions, without a lookup of each user
        (L{cim.delivery.Delivery}); C{None}: never.
    @ivar session_cache: how many users' sessions the deliveries keep
        (L{cim.sessioncache}; 0: none).
    @ivar store_batch: the most devices one store call renews the
        sessions of or saves the cursors of (L{IMServer}).
    """

    port: Listen = 11211
    http_port: Listen = 8081
    host: str = "127.0.0.1"
    bind: str = "0.0.0.0"
    secret: str = ""
    heartbeat_timeout: float = 30.0
    login_timeout: float = 10.0
    max_frame: int = DEFAULT_MAX_FRAME
    legacy_login: bool = False
    rate: float = 2000.0
    limits: NetLimits = field(default_factory=NetLimits)
    shutdown_timeout: float = SHUTDOWN_TIMEOUT
    max_batch: int = MAX_BATCH
    sender_quota: int = SENDER_QUOTA
    max_output: int = MAX_OUTPUT
    session_ttl: float = SESSION_TTL
    store_batch: int = STORE_BATCH
    ca_file: str | None = None
    ws_port: Listen | None = None
    ws_origins: tuple[str, ...] = ()
    push: str = "bus"
    push_timeout: float = 5.0
    push_retry: PushRetry = field(default_factory=PushRetry)
    broadcast_from: int | None = BROADCAST_FROM
    session_cache: int = SESSION_CACHE


class IMServerService(AsyncStartService):
    """
    Runs an L{IMServer}: opens the store and registry (given as factories
    returning Deferreds, so that a failure is reported, not lost), listens
    on the client and push ports, then registers.  Stopping deregisters
    first, then tells clients to reconnect elsewhere.

    If start-up fails, the failure is logged, L{ready} fails and
    C{on_failure} is called (the tap stops the reactor).

    With a Redis store, pushes go to the other servers over the message
    bus (L{cim.bus}), and the server subscribes to its own channel before
    it registers; the push API stays for kicks, resyncs and application
    back-ends.

    Both ports refuse connections over the limits of C{config.limits}
    (L{cim.limits_net}); C{connections} is the process's count when another
    service shares it (single-process mode).
    """

    what = "The IM server"

    def __init__(
        self,
        reactor,
        config: ServerConfig,
        store_factory,
        registry: IRegistry,
        on_failure=None,
        own_store: bool = True,
        connections: ConnectionLimits | None = None,
    ) -> None:  # type: ignore[no-untyped-def]
        super().__init__(on_failure)
        self.own_store = own_store
        self.reactor = reactor
        self.config = config
        self.shutdown_timeout = config.shutdown_timeout
        self.connections = connections or ConnectionLimits(
            config.limits.max_connections
        )
        #: The client port's and the push API's factories.
        self.factories: dict[str, LimitedFactory] = {}
        self.store_factory = store_factory
        self.registry = registry
        self.server: IMServer | None = None
        self.address: ServerAddress | None = None
        self.store: IStore | None = None
        self._ports: list = []
        self._janitor: DeadServerJanitor | None = None
        self._pool: HTTPConnectionPool | None = None
        #: The message bus, when pushes go over one.
        self.bus: IBus | None = None
        self.receiver: BusReceiver | None = None

    async def _start(self) -> None:
        config = self.config
        self.store = store = await self.store_factory()
        # The quota is counted where messages are stored.
        store.retention = replace(store.retention, sender_quota=config.sender_quota)
        http, self._pool = http_client(self.reactor, ca_file=config.ca_file)
        pusher: IPusher = HttpPusher(http, config.secret)
        if config.push == "bus":
            self.bus = open_bus(self.reactor, store, config.push_timeout)
        if self.bus is not None:
            pusher = BusPusher(self.bus, self.reactor)
        # The address is known once the ports listen (they may be 0).
        clients = _LateFactory("cim-server clients")
        self.factories["clients"] = LimitedFactory(
            clients,
            self.connections,
            config.limits.per_address,
            self.reactor,
            clients.name,
        )
        client_port = await server_endpoint(
            self.reactor, config.port, config.bind, 4096
        ).listen(self.factories["clients"])
        self._ports.append(client_port)
        push = _LateFactory("cim-server push API")
        self.factories["push"] = LimitedFactory(
            push,
            self.connections,
            config.limits.http_per_address,
            self.reactor,
            push.name,
        )
        http_port = await server_endpoint(
            self.reactor, config.http_port, config.bind, 1024
        ).listen(self.factories["push"])
        self._ports.append(http_port)
        ws = _LateFactory("cim-server WebSocket")
        ws_port = None
        if config.ws_port is not None:
            # Its own per-address count, as for the client port.
            self.factories["ws"] = LimitedFactory(
                ws,
                self.connections,
                config.limits.per_address,
                self.reactor,
                ws.name,
            )
            ws_port = await server_endpoint(
                self.reactor, config.ws_port, config.bind, 4096
            ).listen(self.factories["ws"])
            self._ports.append(ws_port)
        self.address = ServerAddress(
            config.host,
            bound_port(client_port, "port"),
            bound_port(http_port, "http-port"),
            tls=is_tls(config.port),
            https=is_tls(config.http_port),
            ws_port=bound_port(ws_port, "ws-port") if ws_port is not None else 0,
            wss=config.ws_port is not None and is_tls(config.ws_port),
        )
        # Sessions naming this address are of an earlier run of this server
        # (killed, or stopped while the store was away): nobody holds them.
        # Drop them before any login is accepted here.
        dropped = await store.drop_server_sessions(str(self.address))
        if dropped:
            self.log.info(
                "Dropped {count} sessions of an earlier run of {address}",
                count=len(dropped),
                address=str(self.address),
            )
        self.server = server = IMServer(
            self.reactor,
            store,
            self.address,
            pusher,
            legacy_login=config.legacy_login,
            heartbeat_timeout=config.heartbeat_timeout,
            login_timeout=config.login_timeout,
            rate=config.rate,
            max_batch=config.max_batch,
            session_ttl=config.session_ttl,
            store_batch=config.store_batch,
            push_retry=config.push_retry,
            broadcast_from=config.broadcast_from,
            session_cache=config.session_cache,
        )
        clients.wrapped = ClientConnectionFactory(
            server, config.max_frame, config.max_output
        )
        if ws_port is not None:
            # autobahn is imported only by a server that speaks WebSocket.
            from cim.server.websocket import WebSocketGateway

            ws.wrapped = WebSocketGateway(
                server,
                self.reactor,
                config.max_frame,
                config.max_output,
                config.ws_origins,
                open_timeout=config.login_timeout,
            )
        push.wrapped = QuietSite(
            PushAPI(server, config.secret).app.resource(),
            reactor=self.reactor,
            max_body=MAX_BODY,
            request_timeout=config.limits.request_timeout,
        )
        server.start()
        if self.bus is not None:
            # Before it registers: nothing is pushed here before that.
            self.receiver = BusReceiver(
                self.bus, server.here, server, server.resync_all, server.metrics
            )
            await self.receiver.start()
            # Groups' messages come from the store's feed (in its order),
            # over the bus.
            server.delivery.feed = bool(getattr(store, "feeds", False))
            self.log.info("Pushes reach this server over the message bus")
        await self.registry.start()
        await self.registry.register(self.address)
        # Sessions of a server that left the registry are dropped only if it
        # does not answer either (issue 8: one cut off from ZooKeeper keeps
        # serving its clients).
        self._janitor = DeadServerJanitor(
            self.reactor, self.registry, store, probe=http_probe(http)
        )
        self._janitor.start()
        # tests/kit/cluster.py reads the ports from this line.
        self.log.info(
            "cim-server {address} ready: clients on {bind}:{port}, "
            "push API on {http_bind}:{http}{ws}{tls}",
            address=str(self.address),
            bind=bound_host(client_port, config.bind),
            port=self.address.port,
            http_bind=bound_host(http_port, config.bind),
            http=self.address.http_port,
            ws=(
                f", WebSocket on {bound_host(ws_port, config.bind)}:"
                f"{self.address.ws_port}"
                if ws_port is not None
                else ""
            ),
            tls=_tls_note(self.address),
        )

    async def _stop(self) -> None:
        # Each step within the shutdown deadline (see AsyncStartService).
        if self._janitor is not None:
            self._janitor.stop()
        await self._step("leaving the registry", self.registry.stop)
        if self.server is not None:
            await self._step("releasing the clients' sessions", self.server.stop)
        if self.bus is not None:
            bus, self.bus = self.bus, None
            await self._step("closing the message bus", bus.close)
        ports, self._ports = self._ports, []
        for port in ports:
            await self._step("closing a port", port.stopListening)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await self._step("closing calls to servers", pool.closeCachedConnections)
        if self.store is not None and self.own_store:
            await self._step("closing the store", self.store.close)
        if self.server is not None:
            # (Connections closing meanwhile failed to release their sessions
            # if the store was away.)
            self.server.report_failures()


def _tls_note(address: ServerAddress) -> str:
    """
    What of C{address} speaks TLS, for the ready line.
    """
    parts = [
        n
        for n, on in (
            ("clients", address.tls),
            ("push API", address.https),
            ("WebSocket", address.wss),
        )
        if on
    ]
    return f" (TLS: {', '.join(parts)})" if parts else ""


class _LateFactory:
    """
    A factory whose real factory is set after the port is listening (so the
    server knows its own port before it builds anything).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.wrapped: Any = None
        self.noisy = False

    def logPrefix(self) -> str:
        return self.name

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    def buildProtocol(self, addr):  # type: ignore[no-untyped-def]
        if self.wrapped is None:
            return None
        return self.wrapped.buildProtocol(addr)
