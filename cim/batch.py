"""
Self-clocking batching: calls made while earlier ones are in flight are
coalesced into one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """
    Coalesce items into batches for C{call}, which takes a list of items and
    returns a Deferred firing with a list of results of the same length.

    With fewer than C{max_in_flight} batches outstanding, an item goes out at
    once (no added latency when idle); otherwise it waits and leaves with
    everything else that queued up, as soon as a batch completes.  Under load
    batches grow by themselves, so the cost per round trip is shared by many
    items, with no timer.

    Waiters are plain callables, not Deferreds, to keep the per-item cost
    low: C{submit(item, done)} calls C{done(result)} or C{done(failure)}.

    With C{fail_queued}, the items queued when a batch fails fail with it,
    untried: with one batch in flight, an item is then never stored after
    an earlier one that failed (their sender can send both again, in order).

    With a C{clock}, an item that could go at once waits for the end of the
    reactor turn instead (a call in 0 seconds), and goes with every other
    item submitted in that turn: when many callers submit from one burst of
    events (the waiters of one completed batch, the requests read in one
    poll), they share one call instead of filling C{max_in_flight} with
    calls of one item each.
    """

    log = Logger()

    def __init__(
        self,
        call: Callable[[list[T]], Deferred[Sequence[R]]],
        max_in_flight: int = 2,
        max_batch: int = 1000,
        fail_queued: bool = False,
        clock: IReactorTime | None = None,
    ) -> None:
        self._call = call
        self._clock = clock
        self._turn: IDelayedCall | None = None
        self._fail_queued = fail_queued
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._in_flight = 0
        self._items: list[T] = []
        self._waiters: list[Callable[[R | Failure], object]] = []

    def submit(self, item: T, done: Callable[[R | Failure], object]) -> None:
        """
        Queue C{item}; C{done} is called with its result or a L{Failure}.
        """
        self._items.append(item)
        self._waiters.append(done)
        if self._in_flight < self._max_in_flight:
            if self._clock is None:
                self._flush()
            elif self._turn is None:
                self._turn = self._clock.callLater(0, self._turn_ended)

    def _turn_ended(self) -> None:
        self._turn = None
        self._flush()

    def submit_deferred(self, item: T) -> Deferred[R]:
        """
        Queue C{item}; @return: a Deferred firing with its result.
        """
        d: Deferred[R] = Deferred()

        def done(result: R | Failure) -> None:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

        self.submit(item, done)
        return d

    def _flush(self) -> None:
        while self._items and self._in_flight < self._max_in_flight:
            items = self._items[: self._max_batch]
            waiters = self._waiters[: self._max_batch]
            del self._items[: self._max_batch]
            del self._waiters[: self._max_batch]
            self._in_flight += 1
            try:
                d = self._call(items)
            except Exception:
                d = Deferred()
                d.errback(Failure())
            d.addBoth(self._completed, waiters)

    def _completed(
        self,
        results: Sequence[R] | Failure,
        waiters: list[Callable[[R | Failure], object]],
    ) -> None:
        self._in_flight -= 1
        if isinstance(results, Failure):
            if self._fail_queued and self._waiters:
                waiters = waiters + self._waiters
                self._items, self._waiters = [], []
            outcomes: Sequence[R | Failure] = [results] * len(waiters)
        elif len(results) != len(waiters):
            error = ValueError(f"{len(results)} results for {len(waiters)} items")
            outcomes = [Failure(error)] * len(waiters)
        else:
            outcomes = results
        for done, outcome in zip(waiters, outcomes):
            try:
                done(outcome)
            except Exception:
                self.log.failure("A batch waiter failed")
        if self._items:
            self._flush()
