"""
The ZooKeeper L{IRegistry}, as in CIM: each IM server holds an ephemeral node
named C{host:port:http_port} under the root (C{/cim}), and whoever needs the
list watches the root's children.

Threading: kazoo runs its own threads (a connection thread and two callback
workers).  This module never blocks the reactor thread on it:

  - ZooKeeper operations use kazoo's C{*_async} methods, which only queue a
    request; their results arrive in a kazoo thread and are handed to the
    reactor thread with C{reactor.callFromThread} (L{ZooKeeperRegistry._call}).
  - Watch and connection-state callbacks run in kazoo threads too and do
    nothing but C{reactor.callFromThread}.
  - The blocking lifecycle calls (C{KazooClient.start}, C{stop}, C{close})
    run in a one-thread pool that lives from L{ZooKeeperRegistry.start} to the
    end of L{ZooKeeperRegistry.stop}.  Its thread is a daemon thread, like
    kazoo's own: a daemon that stops without waiting for the end of
    L{ZooKeeperRegistry.stop} (its shutdown deadline passed) can exit while
    kazoo is still closing.

So every Deferred result and every L{IRegistry.watch} callback arrives on the
reactor thread, and all the registry's state is only touched there.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from threading import Thread
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import (
    BadVersionError,
    ConnectionClosedError,
    ConnectionLoss,
    NodeExistsError,
    NoNodeError,
    SessionExpiredError,
)
from kazoo.protocol.states import EventType, KazooState, WatchedEvent
from twisted.internet.defer import Deferred, DeferredLock, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from cim.interfaces import IReactor, IRegistry, ServerAddress
from cim.registry.local import Callback, sort_addresses

#: The errors of a request that was cut short by a lost connection or
#: session; the registry catches up by itself once it is connected again.
DISCONNECTED = (ConnectionLoss, SessionExpiredError, ConnectionClosedError)

#: How often L{ZooKeeperRegistry} tries to replace a node of another session
#: before giving up (each try loses only to a concurrent writer).
_ANNOUNCE_TRIES = 5


@implementer(IRegistry)
class ZooKeeperRegistry:
    """
    An L{IRegistry} on a ZooKeeper ensemble, through one kazoo session.

    The server list is cached and re-read on every change of the root's
    children and after every reconnection.  A registered address is
    re-created after a session expiry (the ephemeral node went with the old
    session).

    @ivar root: the parent node of the server nodes.
    @cvar connect_timeout: how long L{start} waits for the first connection,
        in seconds.
    """

    log = Logger()
    connect_timeout = 15.0

    def __init__(
        self,
        reactor: IReactor,
        hosts: str,
        root: str = "/cim",
        session_timeout: float = 10.0,
    ) -> None:
        """
        @param reactor: an L{IReactorFromThreads} and L{IReactorTime}.
        @param hosts: kazoo's host list, C{"host:port[,host:port...]"}.
        @param root: the absolute path of the parent node.
        @param session_timeout: the ZooKeeper session timeout, in seconds
            (the server clamps it to its own limits).
        """
        if not root.startswith("/") or (root != "/" and root.endswith("/")):
            raise ValueError(f"bad ZooKeeper root {root!r}")
        self._reactor = reactor
        self._hosts = hosts
        self.root = root
        self._session_timeout = session_timeout
        self._client = KazooClient(
            hosts=hosts,
            timeout=session_timeout,
            # Retry connecting forever, but never wait more than 2 s between
            # attempts (kazoo's default grows to an hour).
            connection_retry={"max_tries": -1, "delay": 0.1, "max_delay": 2.0},
        )
        self._pool = ThreadPool(minthreads=0, maxthreads=1, name="cim-zookeeper")
        self._pool.threadFactory = _daemon_thread  # type: ignore[assignment]
        #: Serialises node creation and deletion.
        self._lock = DeferredLock()
        #: Serialises start and stop (a stop waits for a start under way).
        self._lifecycle = DeferredLock()
        self._address: ServerAddress | None = None
        self._servers: list[ServerAddress] = []
        self._callbacks: list[Callback] = []
        #: Node names already reported as not parsing.
        self._ignored: set[str] = set()
        self._connected = False
        self._session_id: int | None = None
        self._started = False
        self._running = False

    # IRegistry

    @property
    def connected(self) -> bool:
        """
        C{True} while the kazoo client is connected (as last reported to the
        reactor thread).
        """
        return self._connected

    def start(self) -> Deferred[None]:
        """
        Connect, create the root if missing, and read and watch its children.

        @return: fires once the server list is known; fails (and leaves
            nothing running) when ZooKeeper cannot be reached within
            L{connect_timeout}.
        @raise RuntimeError: when called a second time.
        """
        if self._started:
            raise RuntimeError("a ZooKeeperRegistry can only be started once")
        self._started = True
        return self._lifecycle.run(lambda: Deferred.fromCoroutine(self._start()))

    def stop(self) -> Deferred[None]:
        """
        Unregister (giving up after one session timeout, and at once when
        not connected: closing the session, or its expiry, removes the node
        anyway), then close the session.
        """
        return self._lifecycle.run(lambda: Deferred.fromCoroutine(self._stop()))

    def register(self, address: ServerAddress) -> Deferred[None]:
        """
        Create the ephemeral node of C{address}, replacing a node of the same
        name left by another (earlier) session, and withdrawing the address
        this registry registered before, if another.

        The address stays registered until L{unregister} or L{stop}, even when
        this call fails because ZooKeeper is unreachable: the node is created
        as soon as the registry is connected again.

        @raise RuntimeError: the registry is not running (not started yet, or
            stopped).
        """
        if not self._running:
            raise RuntimeError("register needs a started ZooKeeperRegistry")
        previous, self._address = self._address, address
        return self._locked(self._publish, previous, address)

    def unregister(self) -> Deferred[None]:
        """
        Delete the node of the registered address, if it still belongs to
        this registry's session.
        """
        previous, self._address = self._address, None
        if previous is None:
            return succeed(None)
        return self._locked(self._withdraw, previous)

    def servers(self) -> list[ServerAddress]:
        return list(self._servers)

    def watch(self, callback: Callback) -> Callable[[], None]:
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return unsubscribe

    # Start and stop

    async def _start(self) -> None:
        self.log.info("connecting to ZooKeeper at {hosts}", hosts=self._hosts)
        self._pool.start()
        self._client.add_listener(self._state_changed)
        try:
            await self._in_pool(self._client.start, self.connect_timeout)
        except BaseException:
            # kazoo stops and closes the client itself when start times out.
            self._client.remove_listener(self._state_changed)
            self._pool.stop()
            raise
        self._running = True
        self._connected = True
        self._session_id = self._current_session()
        self.log.info(
            "connected to ZooKeeper, session {session}",
            session=_hex(self._session_id),
        )
        try:
            await self._call(self._client.ensure_path_async, self.root)
            await self._refresh()
        except BaseException:
            await self._shutdown()
            raise

    async def _stop(self) -> None:
        if not self._running:
            return
        # From now on, events are ignored: only the unregistration goes on.
        self._running = False
        if not self._connected:
            # A delete would wait for a connection that may never come.
            if self._address is not None:
                self.log.warn(
                    "not connected to ZooKeeper: {address} stays registered "
                    "until the session expires",
                    address=str(self._address),
                )
                self._address = None
        else:
            try:
                d = self.unregister()
                d.addTimeout(self._session_timeout, self._reactor)
                await d
            except Exception:
                self.log.failure("could not unregister from ZooKeeper")
        await self._shutdown()

    async def _shutdown(self) -> None:
        """
        Close the session and free the client and the thread pool.
        """
        self._running = False
        self._client.remove_listener(self._state_changed)
        try:
            await self._in_pool(self._client.stop)
            await self._in_pool(self._client.close)
        finally:
            self._connected = False
            self._servers = []
            # The pool is idle now; stopping it joins its thread at once.
            self._pool.stop()
            self.log.info("disconnected from ZooKeeper")

    # Thread boundaries

    def _in_pool(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Run the blocking C{f(*args)} in this registry's thread pool.
        """
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def _call(
        self, method: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Deferred[Any]:
        """
        Call one of kazoo's C{*_async} methods.

        @return: a Deferred that fires, on the reactor thread, with the
            result or the kazoo exception.
        """
        d: Deferred[Any] = Deferred()

        def done(result: Any) -> None:
            # In a kazoo thread: only hand the outcome over.
            if result.successful():
                self._reactor.callFromThread(d.callback, result.value)
            else:
                self._reactor.callFromThread(d.errback, Failure(result.exception))

        try:
            method(*args, **kwargs).rawlink(done)
        except Exception:
            return fail()
        return d

    def _state_changed(self, state: str) -> None:
        """
        kazoo's connection-state listener, in a kazoo thread.
        """
        session = self._current_session()
        self._reactor.callFromThread(self._on_state, state, session)

    def _children_changed(self, event: WatchedEvent) -> None:
        """
        kazoo's watch on the root's children, in a kazoo thread.

        kazoo also calls it with a C{NONE} event when it drops its watches on
        a disconnection; L{_on_state} re-reads the children after that.
        """
        if event.type != EventType.NONE:
            self._reactor.callFromThread(self._on_children_changed)

    def _current_session(self) -> int | None:
        client_id = self._client.client_id
        return client_id[0] if client_id else None

    # On the reactor thread

    def _on_state(self, state: str, session: int | None) -> None:
        if not self._running:
            # Before start has connected (it catches up itself), or after
            # stop.
            self._connected = state == KazooState.CONNECTED
            return
        if state == KazooState.CONNECTED:
            was_connected, self._connected = self._connected, True
            if was_connected:
                return
            if session == self._session_id:
                self.log.info(
                    "reconnected to ZooKeeper, session {session}",
                    session=_hex(session),
                )
            else:
                self.log.info(
                    "connected to ZooKeeper with a new session {session}",
                    session=_hex(session),
                )
            self._session_id = session
            self._catch_up()
        elif state == KazooState.SUSPENDED:
            self._connected = False
            self.log.warn("connection to ZooKeeper lost; reconnecting")
        else:
            self._connected = False
            self.log.warn(
                "ZooKeeper session {session} lost; reconnecting",
                session=_hex(self._session_id),
            )

    def _catch_up(self) -> None:
        """
        After a (re)connection: kazoo has dropped the children watch, and a
        new session has lost our ephemeral node.  Read the children again and
        make sure the node exists (both are no-ops when nothing changed).
        """
        self._background(self._refresh(), "re-reading the server list")
        if self._address is not None:
            d = self._locked(self._publish, None, self._address)
            self._background(d, "re-registering")

    def _on_children_changed(self) -> None:
        if self._running:
            self._background(self._refresh(), "re-reading the server list")

    def _background(self, d: Deferred[Any], what: str) -> None:
        """
        Log the failure of work nobody waits for.  Failures caused by a lost
        connection are only noted: reconnecting runs L{_catch_up}.
        """

        def failed(failure: Failure) -> None:
            if failure.check(*DISCONNECTED):
                self.log.info(
                    "{what} was interrupted by a disconnection: {error}",
                    what=what,
                    error=repr(failure.value),
                )
            else:
                self.log.failure("{what} failed", failure, what=what)

        d.addErrback(failed)

    def _refresh(self) -> Deferred[None]:
        """
        Read the root's children, set the watch again, and update the list.
        """
        d = self._call(
            self._client.get_children_async, self.root, watch=self._children_changed
        )
        d.addCallback(self._got_children)
        return d

    def _got_children(self, names: list[str]) -> None:
        if self._running:
            self._set_servers(names)

    def _set_servers(self, names: list[str]) -> None:
        addresses = set()
        for name in names:
            try:
                addresses.add(ServerAddress.parse(name))
            except ValueError:
                if name not in self._ignored:
                    self._ignored.add(name)
                    self.log.warn(
                        "ignoring node {name!r} under {root}: not host:port:http_port",
                        name=name,
                        root=self.root,
                    )
        servers = sort_addresses(addresses)
        if servers == self._servers:
            return
        self._servers = servers
        self.log.info(
            "servers under {root}: {servers}",
            root=self.root,
            servers=", ".join(map(str, servers)) or "none",
        )
        for callback in list(self._callbacks):
            try:
                callback(list(servers))
            except Exception:
                self.log.failure(
                    "registry watcher {callback!r} failed", callback=callback
                )

    def _locked(
        self, f: Callable[..., Coroutine[Any, Any, None]], *args: Any
    ) -> Deferred[None]:
        """
        Run the coroutine function C{f(*args)} under the node lock.
        """
        return self._lock.run(lambda: Deferred.fromCoroutine(f(*args)))

    def _path(self, address: ServerAddress) -> str:
        return f"{self.root.rstrip('/')}/{address}"

    async def _publish(
        self, previous: ServerAddress | None, address: ServerAddress
    ) -> None:
        """
        Withdraw C{previous} (if another address) and create the node of
        C{address} unless this session already holds it.
        """
        if previous is not None and previous != address:
            await self._withdraw(previous)
        path = self._path(address)
        for _ in range(_ANNOUNCE_TRIES):
            if self._address != address:
                return  # unregistered (or re-registered) meanwhile
            try:
                await self._call(self._client.create_async, path, b"", ephemeral=True)
            except NodeExistsError:
                pass
            else:
                self.log.info("registered {path}", path=path)
                return
            stat = await self._call(self._client.exists_async, path)
            if stat is None:
                continue
            session = self._current_session()
            if stat.ephemeralOwner == session:
                return
            self.log.info(
                "replacing {path}, left by session {owner}",
                path=path,
                owner=_hex(stat.ephemeralOwner),
            )
            try:
                await self._call(self._client.delete_async, path, version=stat.version)
            except (NoNodeError, BadVersionError):
                pass
        raise NodeExistsError(f"{path} keeps being re-created by another session")

    async def _withdraw(self, address: ServerAddress) -> None:
        """
        Delete the node of C{address} if this session holds it.
        """
        path = self._path(address)
        try:
            stat = await self._call(self._client.exists_async, path)
            if stat is None or stat.ephemeralOwner != self._current_session():
                return
            await self._call(self._client.delete_async, path, version=stat.version)
        except (NoNodeError, BadVersionError, SessionExpiredError):
            # Gone already, or replaced by another session, or gone with
            # this session.
            return
        self.log.info("unregistered {path}", path=path)


def _daemon_thread(*args: Any, **kwargs: Any) -> Thread:
    """
    The registry's pool's threads (see the module docstring).
    """
    return Thread(*args, daemon=True, **kwargs)


def _hex(session: int | None) -> str:
    return "none" if session is None else f"{session:#x}"
