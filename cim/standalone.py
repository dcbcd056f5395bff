"""
C{twistd -n cim-standalone}: a route and an IM server in one process.

By default both run on the in-memory store and the in-process registry, so
nothing else needs installing.  Given C{--store redis://...} and
C{--registry zk://...} the process is an ordinary node of a real cluster.
"""

from __future__ import annotations

import secrets

from twisted.application.service import IService
from twisted.internet.defer import succeed
from twisted.python import usage

from cim.daemon import AsyncStartService, reactor_stopper, with_store_timeout
from cim.framing import DEFAULT_MAX_FRAME
from cim.gcpolicy import tune_gc
from cim.interfaces import IStore
from cim.limits_net import (
    CLIENT_PER_ADDRESS,
    HTTP_PER_ADDRESS,
    ConnectionLimits,
    NetLimits,
    daemon_options,
    net_limits,
)
from cim.listen import is_tls, listen_option
from cim.options import (
    SECRET_PARAMETERS,
    check_ca_file,
    check_registry_url,
    check_store_url,
    push_retry_from,
    secret_option,
)
from cim.route.service import RouteConfig, RouteService
from cim.route.tap import DEVICE_KEY_TTL_OPTION, MAX_DEVICES_OPTION
from cim.server.service import IMServerService, ServerConfig
from cim.server.tap import SERVER_LIMITS, WS_PORT, WebSocketOptions, ws_port_option


class Options(WebSocketOptions):
    synopsis = "[options]"
    longdesc = (
        "Run a cim route and IM server in one process: in memory by default, "
        "or as a node of a real cluster with --store and --registry."
    )
    optFlags = [
        ["legacy-login", None, "Accept CIM clients that log in without a token."],
        ["legacy-auth", None, "Let CIM clients call the route without a token."],
    ]
    optParameters = [
        [
            "port",
            "p",
            11211,
            "Client port: a number (TCP on --bind) or a Twisted endpoint "
            "description (ssl:11211:privateKey=key.pem:certKey=cert.pem: TLS).",
            listen_option("port"),
        ],
        [
            "http-port",
            None,
            8081,
            "The IM server's push API port, or an endpoint description.",
            listen_option("http-port"),
        ],
        ws_port_option(WS_PORT),
        [
            "route-port",
            None,
            8083,
            "The route's HTTP port, or an endpoint description (ssl:...: https).",
            listen_option("route-port"),
        ],
        ["host", None, "127.0.0.1", "The address announced to clients."],
        ["bind", None, "127.0.0.1", "The interface every port listens on."],
        ["store", None, "memory:", "memory: or redis://host:port/db"],
        ["registry", None, "local:", "local: or zk://host:port/root"],
        *SECRET_PARAMETERS,
        [
            "ca-file",
            None,
            None,
            "A PEM file of the CAs whose certificates the push APIs called "
            "over https must carry (default: the system's).",
        ],
        MAX_DEVICES_OPTION,
        DEVICE_KEY_TTL_OPTION,
        *daemon_options(CLIENT_PER_ADDRESS, HTTP_PER_ADDRESS),
        *SERVER_LIMITS,
    ]

    def postOptions(self) -> None:
        check_ca_file(self["ca-file"])
        check_store_url(self["store"])
        check_registry_url(self["registry"])
        # Needed with a real registry; else nobody needs to know it (the
        # route and server share it here).
        required = self["registry"] != "local:"
        self["secret"] = secret_option(self, required) or secrets.token_urlsafe(24)


class StandaloneService(AsyncStartService):
    """
    Start the IM server, then the route with the server as its local
    delivery target (no HTTP hop between them); stop in the reverse order,
    within one shutdown deadline.  Both count their connections together
    (C{--max-connections} is the process's).
    """

    what = "cim-standalone"

    def __init__(self, reactor, options: usage.Options, on_failure=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(on_failure)
        self.reactor = reactor
        self.options = options
        self.shutdown_timeout = options["shutdown-timeout"]
        self.server: IMServerService | None = None
        self.route: RouteService | None = None
        self.store: IStore | None = None

    async def _start(self) -> None:
        from cim.registry import open_registry
        from cim.store import open_store

        o = self.options
        limits = net_limits(o)
        connections = ConnectionLimits(limits.max_connections)
        # One store for both; this service closes it, after both stopped.
        self.store = store = with_store_timeout(
            await open_store(o["store"], self.reactor), o["store-timeout"]
        )
        self.server = IMServerService(
            self.reactor,
            ServerConfig(
                port=o["port"],
                http_port=o["http-port"],
                host=o["host"],
                bind=o["bind"],
                secret=o["secret"],
                max_frame=DEFAULT_MAX_FRAME,
                legacy_login=bool(o["legacy-login"]),
                limits=limits,
                shutdown_timeout=self.shutdown_timeout,
                max_batch=o["max-batch"],
                sender_quota=o["sender-quota"],
                max_output=o["max-output"],
                session_ttl=o["session-ttl"],
                store_batch=o["store-batch"],
                push_retry=push_retry_from(o),
                ca_file=o["ca-file"],
                ws_port=o["ws-port"],
                ws_origins=tuple(o["ws-origin"]),
            ),
            lambda: succeed(store),
            open_registry(o["registry"], self.reactor),
            own_store=False,
            connections=connections,
        )
        self.server.startService()
        await self.server.ready
        self.route = RouteService(
            self.reactor,
            RouteConfig(
                port=o["route-port"],
                bind=o["bind"],
                secret=o["secret"],
                legacy_auth=bool(o["legacy-auth"]),
                limits=NetLimits(
                    max_connections=limits.max_connections,
                    per_address=limits.http_per_address,
                    request_timeout=limits.request_timeout,
                ),
                shutdown_timeout=self.shutdown_timeout,
                ca_file=o["ca-file"],
                max_devices=o["max-devices"],
                device_key_ttl=o["device-key-ttl"],
                push_retry=push_retry_from(o),
            ),
            lambda: succeed(store),
            open_registry(o["registry"], self.reactor),
            local=self.server.server,
            own_store=False,
            connections=connections,
        )
        self.route.startService()
        await self.route.ready
        assert self.server.address is not None
        self.log.info(
            "cim-standalone ready: route {scheme}://{bind}:{route}/ , IM server {address}",
            scheme="https" if is_tls(o["route-port"]) else "http",
            bind=o["bind"],
            route=self.route.port,
            address=str(self.server.address),
        )

    async def _stop(self) -> None:
        # Each part within this service's deadline (see AsyncStartService).
        if self.route is not None and self.route.running:
            await self._step("stopping the route", self.route.stopService)
        if self.server is not None and self.server.running:
            await self._step("stopping the IM server", self.server.stopService)
        if self.store is not None:
            store, self.store = self.store, None
            await self._step("closing the store", store.close)


def makeService(options: usage.Options) -> IService:
    from twisted.internet import reactor

    service = StandaloneService(reactor, options, on_failure=reactor_stopper(reactor))
    tune_gc(options["gc-young"])
    return service
