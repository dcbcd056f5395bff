"""
The message bus (L{cim.interfaces.IBus}) over Redis pub/sub.

Threading and order: everything runs in the reactor thread.  A process
publishes through one connection of its own, so the publishes it makes to
one server reach Redis, and so that server's subscription, in the order
they were made.  It subscribes on another connection (a subscribed
connection can do nothing else).  Both are made again when they are lost
(L{cim.store.redis.connection.BUS_RETRY}); the subscriber is told each time
its subscription is made again, since what was published meanwhile is
lost (as it is when Redis drops a subscriber whose output buffer overflowed,
C{client-output-buffer-limit pubsub}).

Channels: C{<prefix>bus:<db>:<server address>}.  Channels are not of a
database, so the database number is in the name too: two deployments on
one Redis, with other prefixes or other databases, never hear each other.

A publish fails with L{BusError} at once while the connection that was up
is being made again (Redis went away), and after C{timeout} seconds when
Redis does not answer (the connection is then dropped and made again).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cim.interfaces import BusError, IBus
from cim.store import RedisAddress
from cim.store.redis.connection import BUS_RETRY, bus_connection


def bus_channel(prefix: str, db: int, server: str) -> str:
    """
    The channel of the IM server C{server} (its address string) in the
    deployment whose keys start with C{prefix} in database C{db}.
    """
    return f"{prefix}bus:{db}:{server}"


@implementer(IBus)
class RedisBus:
    """
    An L{IBus} on the Redis at C{address}.

    @param prefix: the deployment's key prefix (the store's).
    @param timeout: seconds a publish, or the first subscription, may wait.
    @ivar retry: seconds to wait before the given attempt to connect again
        after a loss (read at each attempt).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        address: RedisAddress,
        prefix: str = "cim:",
        timeout: float = 5.0,
    ) -> None:
        self.reactor = reactor
        self.address = address
        self.prefix = prefix
        self.timeout = timeout
        self.closed = False
        self.retry: Callable[[int], float] = BUS_RETRY
        self._publisher = bus_connection(
            reactor,
            address,
            self._publisher_ready,
            timeout=timeout,
            retry=self._retry,
        )
        #: The publishing connection while it is usable.
        self._live: Any = None
        self._ever_live = False
        self._subscriber: Any = None
        #: channel -> (receive, subscribed).
        self._channels: dict[bytes, tuple[Callable[[bytes], None], Callable[[], None]]]
        self._channels = {}
        #: channel -> the Deferreds of subscribe() waiting for its first time.
        self._first: dict[bytes, list[Deferred[None]]] = {}
        #: Fires when the SUBSCRIBE of a new subscriber connection is answered.
        self._subscribing: Deferred[None] | None = None
        self._publisher.startService()

    def _retry(self, attempt: int) -> float:
        return self.retry(attempt)

    def channel(self, server: str) -> str:
        return bus_channel(self.prefix, self.address.db, server)

    # Publishing

    def _publisher_ready(self, protocol: Any) -> None:
        self._live = protocol
        self._ever_live = True
        protocol.whenDisconnected().addCallback(self._publisher_lost)

    def _publisher_lost(self, protocol: Any) -> None:
        if self._live is protocol:
            self._live = None
            if not self.closed:
                self.log.warn("Lost the message bus's publishing connection to Redis")

    def publish(self, server: str, payload: bytes) -> Deferred[int]:
        if self.closed:
            return fail(BusError("the bus is closed"))
        channel = self.channel(server)
        live = self._live
        if live is not None:
            d = self._execute(live, channel, payload)
        elif self._ever_live:
            return fail(BusError("Redis is unreachable"))
        else:
            # Before the first connection: wait for it (within the time-out).
            d = self._publisher.whenConnected()
            d.addCallback(lambda protocol: self._execute(protocol, channel, payload))
        d.addTimeout(self.timeout, self.reactor, onTimeoutCancel=self._timed_out)
        d.addErrback(self._failed)
        return d

    def _execute(self, protocol: Any, channel: str, payload: bytes) -> Deferred[Any]:
        try:
            d: Deferred[Any] = protocol.execute_command("PUBLISH", channel, payload)
        except Exception:
            return fail()
        return d

    def _timed_out(self, result: Any, timeout: float) -> Any:
        live = self._live
        if live is not None:
            # Redis does not answer: drop the connection, make another.
            self.log.warn(
                "Redis did not answer a publish in {timeout}s; reconnecting",
                timeout=timeout,
            )
            live.transport.abortConnection()
        return fail(BusError(f"Redis did not answer in {timeout}s"))

    def _failed(self, failure: Failure) -> Failure:
        if failure.check(BusError):
            return failure
        return Failure(BusError(f"publish failed: {failure.getErrorMessage()}"))

    # Subscribing

    def subscribe(
        self,
        server: str,
        receive: Callable[[bytes], None],
        subscribed: Callable[[], None],
    ) -> Deferred[None]:
        if self.closed:
            return fail(BusError("the bus is closed"))
        channel = self.channel(server).encode("utf-8")
        self._channels[channel] = (receive, subscribed)
        first: Deferred[None] = Deferred()
        self._first.setdefault(channel, []).append(first)
        if self._subscriber is None:
            self._subscriber = bus_connection(
                self.reactor,
                self.address,
                self._subscribe_all,
                received=self._received,
                timeout=self.timeout,
                retry=self._retry,
            )
            self._subscriber.startService()
        else:
            # Subscribed on the current connection, if there is one; on the
            # next one otherwise.
            self._subscriber.whenConnected().addCallback(
                lambda protocol: self._subscribe_on(protocol, [channel])
            ).addErrback(lambda _: None)

        def too_late(result: Any, timeout: float) -> Any:
            waiting = self._first.get(channel, [])
            if first in waiting:
                waiting.remove(first)
            return fail(BusError(f"could not subscribe within {timeout}s"))

        return first.addTimeout(self.timeout, self.reactor, onTimeoutCancel=too_late)

    def _subscribe_all(self, protocol: Any) -> Deferred[Any]:
        protocol.whenDisconnected().addCallback(self._subscriber_lost)
        answered: Deferred[None] = Deferred()
        self._subscribing = answered
        d = self._subscribe_on(protocol, list(self._channels))

        def done(result: object) -> object:
            # Once the service took the connection (a turn later).
            def fire() -> None:
                if not answered.called:
                    answered.callback(None)

            self.reactor.callLater(0, fire)
            return result

        return d.addBoth(done)

    def _subscribe_on(self, protocol: Any, channels: list[bytes]) -> Deferred[Any]:
        if not channels:
            return defer.succeed(None)

        def made(_: object) -> None:
            for channel in channels:
                entry = self._channels.get(channel)
                if entry is None:
                    continue
                try:
                    entry[1]()
                except Exception:
                    self.log.failure("A bus subscriber's callback failed")
                for first in self._first.pop(channel, []):
                    first.callback(None)

        def refused(failure: Failure) -> None:
            self.log.error(
                "Subscribing to the message bus failed: {error}; reconnecting",
                error=failure.getErrorMessage(),
            )
            # Dropped once the service holds it (a connection it refused
            # would stay open), then made again.
            transport = protocol.transport
            if transport is not None:
                self.reactor.callLater(0, transport.abortConnection)

        d: Deferred[Any] = protocol.subscribe([c.decode("utf-8") for c in channels])
        return d.addCallbacks(made, refused)

    def _subscriber_lost(self, protocol: Any) -> None:
        if not self.closed:
            self.log.warn(
                "Lost the message bus subscription; subscribing again "
                "(what is pushed meanwhile is lost)"
            )

    def _received(self, channel: bytes, payload: bytes) -> None:
        entry = self._channels.get(channel)
        if entry is None:
            return
        try:
            entry[0](payload)
        except Exception:
            self.log.failure("A bus subscriber failed")

    def close(self) -> Deferred[None]:
        self.closed = True
        self._live = None
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        subscribing = self._subscribing
        if subscribing is not None and not subscribing.called:
            # Stopped while its SUBSCRIBE is in flight, the service would
            # leave the connection open: wait for the answer first.
            try:
                await subscribing.addTimeout(self.timeout, self.reactor)
            except defer.TimeoutError:
                pass
        stops = [self._publisher.stopService()]
        if self._subscriber is not None:
            stops.append(self._subscriber.stopService())
        await defer.gatherResults(stops, consumeErrors=True)
