"""
What the three daemons' services and taps share: an asynchronous start-up
whose failure is reported (twistd ignores what C{startService} returns), and
the C{makeService} wiring of a store and a registry from options.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    ensureDeferred,
    maybeDeferred,
)
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure


class AsyncStartService(Service):
    """
    A service that starts with the coroutine L{_start} and stops with the
    coroutine L{_stop}.

    If start-up fails, the failure is logged, L{ready} fails and
    C{on_failure} is called (the taps stop the reactor then).

    @ivar ready: fires with the service once L{_start} finished.
    """

    log = Logger()
    #: What the service is, for log messages.
    what = "the service"

    def __init__(self, on_failure: Callable[[], object] | None = None) -> None:
        self.on_failure = on_failure
        self.ready: Deferred[Any] = Deferred()
        self._starting: Deferred[None] | None = None

    async def _start(self) -> None:
        raise NotImplementedError()

    async def _stop(self) -> None:
        raise NotImplementedError()

    def startService(self) -> None:
        super().startService()
        self._starting = ensureDeferred(self._start())
        self._starting.addCallbacks(self._started, self._start_failed)

    def _started(self, _: object) -> None:
        if not self.ready.called:
            self.ready.callback(self)

    def _start_failed(self, failure: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(failure)
            self.ready.addErrback(lambda _: None)
        if failure.check(CancelledError):
            return  # stopped while starting
        self.log.failure("{what} could not start", failure, what=self.what)
        if self.on_failure is not None:
            self.on_failure()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        return ensureDeferred(self._stop())


def daemon_service(
    service: Callable[..., IService], config: object, options: usage.Options
) -> IService:
    """
    Build a daemon's service for C{makeService}: C{service(reactor, config,
    store_factory, registry, on_failure=...)} with the store and registry
    that C{options["store"]} and C{options["registry"]} name, stopping the
    reactor if it cannot start.  The only place the global reactor is used.
    """
    from twisted.internet import reactor

    from cim.registry import open_registry
    from cim.store import open_store

    return service(
        reactor,
        config,
        lambda: maybeDeferred(open_store, options["store"], reactor),
        open_registry(options["registry"], reactor),
        on_failure=reactor_stopper(reactor),
    )


def reactor_stopper(reactor: Any) -> Callable[[], None]:
    """
    An C{on_failure} for a daemon's service: stop the reactor (twistd then
    exits) unless it is already stopping.
    """

    def stop() -> None:
        if reactor.running:
            reactor.stop()

    return stop
