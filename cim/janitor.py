"""
Drops the sessions of IM servers that left the registry, so that no route
keeps pointing users at a dead server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from cim.interfaces import IRegistry, IStore, ServerAddress

#: Whether the server named by an address string is alive: fires with a bool.
Probe = Callable[[str], "Deferred[bool]"]


def http_probe(http: Any, timeout: float = 2.0) -> Probe:
    """
    A L{Probe} asking a server's push API for C{/health} with C{http} (a treq
    client): a server that answers within C{timeout} seconds is alive.
    """

    async def alive(server: str) -> bool:
        address = ServerAddress.parse(server)
        response = await http.get(f"{address.push_url}/health", timeout=timeout)
        await response.content()
        return bool(response.code == 200)

    def probe(server: str) -> Deferred[bool]:
        return ensureDeferred(alive(server)).addErrback(lambda _: False)

    return probe


class DeadServerJanitor:
    """
    Watch C{registry}; when a server has been gone for C{grace} seconds
    (longer than a ZooKeeper session expiry and re-registration takes), drop
    its sessions from C{store}.  Every route and server runs one; dropping is
    idempotent.

    With a C{probe}, a server that left the registry but still answers is
    not dead (cut off from ZooKeeper, it keeps serving its clients and will
    register again): its sessions are kept, and it is checked again after
    another C{grace}.  Dropping them would strand its connected clients,
    whom nobody would deliver to any more.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        registry: IRegistry,
        store: IStore,
        grace: float = 3.0,
        probe: Probe | None = None,
    ) -> None:
        self.clock = clock
        self.registry = registry
        self.store = store
        self.grace = grace
        self.probe = probe
        #: Servers gone from the registry that still answered the probe.
        self._answering: set[str] = set()
        self._known: set[str] = set()
        self._pending: dict[str, IDelayedCall] = {}
        self._unwatch: Callable[[], None] | None = None

    def start(self) -> None:
        self._known = {str(s) for s in self.registry.servers()}
        self._unwatch = self.registry.watch(self._changed)

    def stop(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()

    def _changed(self, servers: list[ServerAddress]) -> None:
        now = {str(s) for s in servers}
        self._answering -= now
        for server in now:
            call = self._pending.pop(server, None)
            if call is not None and call.active():
                call.cancel()
        for server in self._known - now:
            if server not in self._pending:
                self._pending[server] = self.clock.callLater(
                    self.grace, self._drop, server
                )
        self._known = now

    def _drop(self, server: str) -> None:
        self._pending.pop(server, None)
        if server in {str(s) for s in self.registry.servers()}:
            return
        if self.probe is None:
            self._drop_sessions(server)
            return
        self.probe(server).addCallback(self._probed, server)

    def _probed(self, alive: bool, server: str) -> None:
        if self._unwatch is None or server in {str(s) for s in self.registry.servers()}:
            return  # stopped, or back meanwhile
        if not alive:
            self._drop_sessions(server)
        elif server not in self._pending:
            if server not in self._answering:
                self._answering.add(server)
                self.log.info(
                    "{server} left the registry but still answers; "
                    "keeping its sessions",
                    server=server,
                )
            self._pending[server] = self.clock.callLater(self.grace, self._drop, server)

    def _drop_sessions(self, server: str) -> None:
        d = self.store.drop_server_sessions(server)

        def dropped(users: list[int]) -> None:
            if users:
                self.log.info(
                    "Dropped {count} sessions of departed server {server}",
                    count=len(users),
                    server=server,
                )

        d.addCallbacks(
            dropped,
            lambda f: self.log.failure(
                "Dropping sessions of {server} failed", f, server=server
            ),
        )
