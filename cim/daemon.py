"""
What the three daemons' services and taps share: an asynchronous start-up
whose failure is reported (twistd ignores what C{startService} returns), a
stop that ends within a deadline whatever the backends do (L{StopDeadline}),
and the C{makeService} wiring of a store and a registry from options.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from twisted.application.service import IService, Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    ensureDeferred,
    maybeDeferred,
)
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from cim.gcpolicy import tune_gc
from cim.interfaces import IReactor
from cim.limits_net import SHUTDOWN_TIMEOUT

#: The least time a stop step is given, even past the deadline (a step that
#: is done at once, like closing a pool already closed, still gets done).
MIN_STEP = 0.05
#: How long past its deadline a whole stop sequence may run before the
#: service gives up waiting for it.
STOP_GRACE = 1.0

_LATE = object()


class StopDeadline:
    """
    The deadline of one stop sequence: each L{step} is waited for until the
    deadline at most.  A step still running then is logged and left to
    finish on its own (it is not cancelled: not every backend cancels
    cleanly), and the sequence goes on, so that the daemon exits in time
    whatever its store or registry do.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, seconds: float, what: str) -> None:
        self.clock = clock
        self.seconds = seconds
        self.what = what
        self.end = clock.seconds() + seconds

    async def step(self, name: str, f: Callable[[], Any]) -> Any:
        """
        Run C{f} (which may return a Deferred or a coroutine) and wait for
        it until the deadline.  A failure is logged, not raised.

        @return: its result, or C{None} if it failed or was late.
        """
        left = max(MIN_STEP, self.end - self.clock.seconds())
        d = maybeDeferred(f)
        done: Deferred[Any] = Deferred()

        def late() -> None:
            if not done.called:
                done.callback(_LATE)

        timer = self.clock.callLater(left, late)

        def finished(result: object) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(result)
            elif isinstance(result, Failure):
                self.log.failure(
                    "{what}: {step} failed after the deadline",
                    result,
                    what=self.what,
                    step=name,
                )

        d.addBoth(finished)
        try:
            result = await done
        except Exception:
            self.log.failure("{what}: {step} failed", what=self.what, step=name)
            return None
        if result is _LATE:
            self.log.warn(
                "{what}: {step} did not finish within the shutdown timeout "
                "({timeout:g}s); going on without it",
                what=self.what,
                step=name,
                timeout=self.seconds,
            )
            return None
        return result


class AsyncStartService(Service):
    """
    A service that starts with the coroutine L{_start} and stops with the
    coroutine L{_stop}.

    If start-up fails, the failure is logged, L{ready} fails and
    C{on_failure} is called (the taps stop the reactor then).

    Stopping gives L{_stop} C{shutdown_timeout} seconds: its steps run
    through L{deadline} (a L{StopDeadline}), and L{stopService}'s Deferred
    fires at most L{STOP_GRACE} seconds after the deadline, whatever
    L{_stop} still waits for.

    @ivar ready: fires with the service once L{_start} finished.
    @ivar reactor: the clock of the deadline (set by subclasses).
    """

    log = Logger()
    #: What the service is, for log messages.
    what = "the service"
    reactor: Any = None
    shutdown_timeout: float = SHUTDOWN_TIMEOUT
    #: The deadline of the stop under way (or of none yet: unbounded).
    deadline: StopDeadline | None = None

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
        if self.reactor is None:
            return ensureDeferred(self._stop())
        self.deadline = StopDeadline(self.reactor, self.shutdown_timeout, self.what)
        whole = StopDeadline(
            self.reactor, self.shutdown_timeout + STOP_GRACE, self.what
        )
        return ensureDeferred(whole.step("stopping", self._stop))

    async def _step(self, name: str, f: Callable[[], Any]) -> Any:
        """
        One step of L{_stop}, within the L{deadline} if there is one.
        """
        if self.deadline is None:
            try:
                return await maybeDeferred(f)
            except Exception:
                self.log.failure("{what}: {step} failed", what=self.what, step=name)
                return None
        return await self.deadline.step(name, f)


def daemon_service(
    service: Callable[..., IService], config: object, options: usage.Options
) -> IService:
    """
    Build a daemon's service for C{makeService}: C{service(reactor, config,
    store_factory, registry, on_failure=...)} with the store and registry
    that C{options["store"]} and C{options["registry"]} name, stopping the
    reactor if it cannot start, and the garbage collector's pace that
    C{options["gc-young"]} sets (L{cim.gcpolicy}).  The only place the
    global reactor is used.
    """
    from twisted.internet import reactor

    from cim.registry import open_registry
    from cim.store import open_store

    def store() -> Deferred[Any]:
        d = maybeDeferred(open_store, options["store"], reactor)
        return d.addCallback(with_store_timeout, options.get("store-timeout"))

    built = service(
        reactor,
        config,
        store,
        open_registry(options["registry"], cast(IReactor, reactor)),
        on_failure=reactor_stopper(reactor),
    )
    tune_gc(options["gc-young"])
    return built


def with_store_timeout(store: Any, timeout: float | None) -> Any:
    """
    Give C{store} the per-call time-out C{timeout} (C{--store-timeout}),
    if it has one (the Redis store; the memory store never waits).
    @return: C{store}.
    """
    if timeout is not None and hasattr(store, "timeout"):
        store.timeout = timeout
    return store


def reactor_stopper(reactor: IReactorCore) -> Callable[[], None]:
    """
    An C{on_failure} for a daemon's service: stop the reactor (twistd then
    exits) unless it is already stopping.
    """

    def stop() -> None:
        if reactor.running:
            reactor.stop()

    return stop
