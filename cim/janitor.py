"""
Drops the sessions of IM servers that left the registry, so that no route
keeps pointing users at a dead server.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from cim.interfaces import IRegistry, IStore, ServerAddress


class DeadServerJanitor:
    """
    Watch C{registry}; when a server has been gone for C{grace} seconds
    (longer than a ZooKeeper session expiry and re-registration takes), drop
    its sessions from C{store}.  Every route and server runs one; dropping is
    idempotent.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        registry: IRegistry,
        store: IStore,
        grace: float = 3.0,
    ) -> None:
        self.clock = clock
        self.registry = registry
        self.store = store
        self.grace = grace
        self._known: set[str] = set()
        self._pending: dict[str, IDelayedCall] = {}
        self._unwatch = None

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
