"""
How many connections a daemon holds: per address on each listening port,
and in all.

Every port a daemon listens on (the IM server's client port and push API,
the route's HTTP port) is given a L{LimitedFactory}, a
L{twisted.protocols.policies.WrappingFactory} that refuses a connection,
closing it before its real factory sees it, when its address already holds
C{per_address} connections to that port or the daemon already holds
L{ConnectionLimits.max_total} in all.  The ports of one process share one
L{ConnectionLimits}, so the total stays below the process's file
descriptors: when C{accept} itself fails for want of them, Twisted's port
retries at once, for as long as the flood lasts.

Loopback is counted like any other address (the tests that count connect
from 127.0.0.x): a load test from one machine beyond the defaults passes
C{--max-connections-per-address 0}.

Refusals are logged at most once a minute per address (with how many there
were), so a flood does not flood the log too.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import (
    IAddress,
    IProtocolNegotiationFactory,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python import usage
from zope.interface import implementer

from cim.options import positive_float, whole_number

#: The most connections a daemon holds in all, unless told otherwise (and
#: unless its open-file limit is lower: see L{default_max_connections}):
#: under a limit of 20,000 open files, 19,000 clients on an IM server's
#: client port and room for the route's calls to its push API.
MAX_CONNECTIONS = 19_500
#: Descriptors kept for everything but accepted connections: the store's
#: and registry's connections, calls to other daemons, the log, the
#: listening ports (an IM server uses a few dozen of them).
RESERVED_FILES = 500
#: Connections from one address to an IM server's client port: room for the
#: users behind one NAT.
CLIENT_PER_ADDRESS = 200
#: Connections from one address to an HTTP port (the route, a push API):
#: room for a back-end or a load generator calling with a pool of
#: connections, or for the route's calls to a server under load (a
#: Twisted pool opens a connection per call beyond its persistent ones).
HTTP_PER_ADDRESS = 256
#: Seconds a client has to send a whole HTTP request, headers and body.
REQUEST_TIMEOUT = 30.0
#: Seconds between two log lines about one address's refused connections.
LOG_INTERVAL = 60.0
#: Addresses remembered for that; beyond it the memory starts again.
LOG_MEMORY = 10_000


def default_max_connections() -> int:
    """
    L{MAX_CONNECTIONS}, or L{RESERVED_FILES} below this process's open-file
    limit when that is lower.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(1, min(MAX_CONNECTIONS, soft - RESERVED_FILES))


@dataclass
class NetLimits:
    """
    The connection and request limits of one daemon (its options).

    @ivar max_connections: connections held in all, on every port.
    @ivar per_address: connections from one address to the client port
        (an IM server) or the HTTP port (a route); 0: no limit.
    @ivar http_per_address: connections from one address to an IM server's
        push API; 0: no limit.
    @ivar request_timeout: seconds an HTTP request has from its connection
        (or its first byte, on a kept-alive connection) to its last byte.
    """

    max_connections: int = MAX_CONNECTIONS
    per_address: int = CLIENT_PER_ADDRESS
    http_per_address: int = HTTP_PER_ADDRESS
    request_timeout: float = REQUEST_TIMEOUT


class ConnectionLimits:
    """
    The connections one process holds on all its ports.

    @ivar max_total: the most it accepts; 0: no limit.
    @ivar open: how many it holds.
    """

    def __init__(self, max_total: int) -> None:
        self.max_total = max_total
        self.open = 0

    def full(self) -> bool:
        return bool(self.max_total) and self.open >= self.max_total


class _Counted(ProtocolWrapper):
    """
    A connection of a L{LimitedFactory}, which knows the address it counts
    against.

    Its two addresses are asked once: twisted.web asks both for every
    request, and a TCP transport answers each time with a new address
    object (the local one after a C{getsockname} system call).
    """

    host: str
    _host_address: IAddress | None = None
    _peer_address: IAddress | None = None

    def getHost(self) -> IAddress:
        address = self._host_address
        if address is None:
            assert self.transport is not None
            address = self._host_address = self.transport.getHost()
        return address

    def getPeer(self) -> IAddress:
        address = self._peer_address
        if address is None:
            assert self.transport is not None
            address = self._peer_address = self.transport.getPeer()
        return address


def counted_transport(transport: Any) -> Any:
    """
    The transport under C{transport} when it is a connection counted by a
    L{LimitedFactory} (which passes its bytes through as they are);
    C{transport} itself otherwise.
    """
    if type(transport) is _Counted:
        return transport.transport
    return transport


@implementer(IProtocolNegotiationFactory)
class LimitedFactory(WrappingFactory[_Counted]):
    """
    Wraps one port's factory: refuses connections over the limits (see the
    module docstring).

    On a TLS port it names the wrapped factory's protocols to ALPN (a
    L{Site}'s), else C{http/1.1} (a WebSocket's): Twisted fails the
    handshake of a client that offers protocols (every browser) when the
    factory names none.

    @ivar peers: open connections per address.
    @ivar refused: connections refused since start.
    """

    protocol = _Counted
    noisy = False
    log = Logger()

    def __init__(
        self,
        wrapped: Any,
        limits: ConnectionLimits,
        per_address: int,
        clock: IReactorTime,
        name: str = "port",
    ) -> None:
        super().__init__(wrapped)
        self.limits = limits
        self.per_address = per_address
        self.clock = clock
        self.name = name
        self.peers: dict[str, int] = {}
        self.refused = 0
        #: Per address: when its refusals were last logged, and how many
        #: came since.
        self._logged: dict[str, tuple[float, int]] = {}

    def logPrefix(self) -> str:
        return self.name

    def acceptableProtocols(self) -> list[bytes]:
        wrapped = IProtocolNegotiationFactory(self.wrappedFactory, None)
        if wrapped is not None:
            return list(wrapped.acceptableProtocols())
        return [b"http/1.1"]

    def buildProtocol(self, addr: IAddress | None) -> _Counted:  # type: ignore[override]
        # None refuses the connection (the port closes it at once).
        host = str(getattr(addr, "host", addr))
        held = self.peers.get(host, 0)
        if self.per_address and held >= self.per_address:
            self._refuse(host, f"{held} connections from it already")
            return None  # type: ignore[return-value]
        if self.limits.full():
            self._refuse(host, f"{self.limits.open} connections in all already")
            return None  # type: ignore[return-value]
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None  # type: ignore[return-value]
        self.peers[host] = held + 1
        self.limits.open += 1
        wrapper = self.protocol(self, inner)
        wrapper.host = host
        return wrapper

    def unregisterProtocol(self, p: Protocol) -> None:
        super().unregisterProtocol(p)
        assert isinstance(p, _Counted)
        self.limits.open -= 1
        left = self.peers.get(p.host, 0) - 1
        if left > 0:
            self.peers[p.host] = left
        else:
            self.peers.pop(p.host, None)

    def _refuse(self, host: str, why: str) -> None:
        self.refused += 1
        now = self.clock.seconds()
        last, since = self._logged.get(host, (None, 0))
        if last is not None and now - last < LOG_INTERVAL:
            self._logged[host] = (last, since + 1)
            return
        if len(self._logged) >= LOG_MEMORY:
            self._logged.clear()
        self._logged[host] = (now, 0)
        self.log.warn(
            "{port}: refused a connection from {host} ({why}); "
            "{since} more from it in the last {interval:g}s",
            port=self.name,
            host=host,
            why=why,
            since=since,
            interval=LOG_INTERVAL,
        )


# Options, shared by the daemons' taps


#: The store and shutdown defaults, in seconds.
STORE_TIMEOUT = 3.0
SHUTDOWN_TIMEOUT = 5.0


def daemon_options(
    per_address: int, http_per_address: int | None = None
) -> list[list[Any]]:
    """
    The C{optParameters} of the limits every daemon has: connections,
    request deadline, store time-out and shutdown deadline.

    @param per_address: the default of C{--max-connections-per-address}.
    @param http_per_address: the default of
        C{--max-http-connections-per-address}, for a daemon with a push API.
    """
    options: list[list[Any]] = [
        [
            "max-connections",
            None,
            None,
            f"Connections held in all, on every port (default {MAX_CONNECTIONS:,}, "
            f"or {RESERVED_FILES:,} below the open-file limit if lower).",
            whole_number("max-connections", 1),
        ],
        [
            "max-connections-per-address",
            None,
            per_address,
            "Connections from one IP address"
            + (" to the client port" if http_per_address is not None else "")
            + " (0: no limit).",
            whole_number("max-connections-per-address", 0),
        ],
        [
            "request-timeout",
            None,
            REQUEST_TIMEOUT,
            "Seconds a client has to send a whole HTTP request.",
            positive_float("request-timeout", high=86400),
        ],
        [
            "store-timeout",
            None,
            STORE_TIMEOUT,
            "Seconds a Redis call may take before it fails.",
            positive_float("store-timeout", high=86400),
        ],
        [
            "shutdown-timeout",
            None,
            SHUTDOWN_TIMEOUT,
            "Seconds the shutdown waits for the store and registry.",
            positive_float("shutdown-timeout", high=86400),
        ],
    ]
    if http_per_address is not None:
        options.insert(
            2,
            [
                "max-http-connections-per-address",
                None,
                http_per_address,
                "Connections from one IP address to the HTTP port(s) (0: no limit).",
                whole_number("max-http-connections-per-address", 0),
            ],
        )
    return options


def net_limits(options: usage.Options) -> NetLimits:
    """
    The L{NetLimits} that a tap's options (L{daemon_options}) ask for.
    """
    per_address = options["max-connections-per-address"]
    return NetLimits(
        max_connections=options["max-connections"] or default_max_connections(),
        per_address=per_address,
        http_per_address=options.get("max-http-connections-per-address", per_address),
        request_timeout=options["request-timeout"],
    )
