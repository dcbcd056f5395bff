"""
An in-process L{IRegistry}: for a route and IM servers that run in one
process (the single-process mode), and for tests.

The shared state is a L{LocalBoard}, the in-process counterpart of a
ZooKeeper root: every L{LocalRegistry} on the same board sees the addresses
announced through any of them.  As with a ZooKeeper session, one registry
announces at most one address.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from cim.interfaces import IRegistry, ServerAddress

Callback = Callable[[list[ServerAddress]], None]


def sort_addresses(addresses: set[ServerAddress]) -> list[ServerAddress]:
    """
    @return: C{addresses} as the sorted list that L{IRegistry.servers}
        returns (by host, then port, then HTTP port).
    """
    return sorted(addresses, key=lambda a: (a.host, a.port, a.http_port))


class LocalBoard:
    """
    The addresses announced in this process, and the registries that watch
    them.
    """

    def __init__(self) -> None:
        #: Each announced address, and the registry that announced it.
        self._owners: dict[ServerAddress, LocalRegistry] = {}
        self._members: weakref.WeakSet[LocalRegistry] = weakref.WeakSet()
        self._servers: list[ServerAddress] = []

    def servers(self) -> list[ServerAddress]:
        """
        @return: the sorted list of announced addresses (a copy).
        """
        return list(self._servers)

    def _join(self, registry: LocalRegistry) -> None:
        self._members.add(registry)

    def _announce(self, address: ServerAddress, owner: LocalRegistry) -> None:
        """
        Announce C{address} on behalf of C{owner} (taking it over when
        another registry announced the same address).
        """
        self._owners[address] = owner
        self._changed()

    def _withdraw(self, address: ServerAddress, owner: LocalRegistry) -> None:
        """
        Withdraw C{address} if C{owner} still holds it.
        """
        if self._owners.get(address) is owner:
            del self._owners[address]
            self._changed()

    def _changed(self) -> None:
        servers = sort_addresses(set(self._owners))
        if servers == self._servers:
            return
        self._servers = servers
        for member in list(self._members):
            member._notify(list(servers))


@implementer(IRegistry)
class LocalRegistry:
    """
    An L{IRegistry} over a L{LocalBoard}.

    Everything happens synchronously on the calling (reactor) thread: the
    Deferreds it returns have already fired, and L{watch} callbacks run
    before the L{register} or L{unregister} call that caused them returns.
    Callbacks are not called while the registry is stopped.

    @ivar board: the shared L{LocalBoard}.
    """

    log = Logger()

    def __init__(self, board: LocalBoard | None = None) -> None:
        """
        @param board: the board to share with other registries; a new,
            private one by default.
        """
        self.board = board if board is not None else LocalBoard()
        self.board._join(self)
        self._address: ServerAddress | None = None
        self._callbacks: list[Callback] = []
        self._stopped = False

    @property
    def connected(self) -> bool:
        """
        Always C{True}: there is no backend to lose.
        """
        return True

    def start(self) -> Deferred[None]:
        """
        Start delivering L{watch} callbacks (again, after L{stop}).
        """
        self._stopped = False
        return succeed(None)

    def stop(self) -> Deferred[None]:
        """
        Unregister, and deliver no more L{watch} callbacks until L{start}.
        """
        d = self.unregister()
        self._stopped = True
        return d

    def register(self, address: ServerAddress) -> Deferred[None]:
        """
        Announce C{address}, withdrawing the address this registry announced
        before (if another).
        """
        previous, self._address = self._address, address
        if previous is not None and previous != address:
            self.board._withdraw(previous, self)
        self.log.info("registered {address}", address=str(address))
        self.board._announce(address, self)
        return succeed(None)

    def unregister(self) -> Deferred[None]:
        previous, self._address = self._address, None
        if previous is not None:
            self.log.info("unregistered {address}", address=str(previous))
            self.board._withdraw(previous, self)
        return succeed(None)

    def servers(self) -> list[ServerAddress]:
        return self.board.servers()

    def watch(self, callback: Callback) -> Callable[[], None]:
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return unsubscribe

    def _notify(self, servers: list[ServerAddress]) -> None:
        """
        Call every watcher with C{servers}; a failing watcher is logged and
        does not stop the others.
        """
        if self._stopped:
            return
        for callback in list(self._callbacks):
            try:
                callback(list(servers))
            except Exception:
                self.log.failure(
                    "registry watcher {callback!r} failed", callback=callback
                )
