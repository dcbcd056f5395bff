"""
L{cim.batch.Batcher}: items submitted while calls are in flight share the
next call; with a clock, items submitted in one reactor turn share one.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from cim.batch import Batcher


class Calls:
    """
    The batch call: records each batch and leaves its Deferred to the test.
    """

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.pending: list[Deferred[list[int]]] = []

    def __call__(self, items: list[int]) -> Deferred[list[int]]:
        self.batches.append(items)
        d: Deferred[list[int]] = Deferred()
        self.pending.append(d)
        return d


def answer_oldest(calls: Calls) -> None:
    batch = calls.batches[len(calls.batches) - len(calls.pending)]
    calls.pending.pop(0).callback([i * 10 for i in batch])


def test_an_item_goes_at_once_when_a_call_is_free() -> None:
    calls = Calls()
    batcher: Batcher[int, int] = Batcher(calls, max_in_flight=2)
    results: list[int | Failure] = []
    batcher.submit(1, results.append)
    batcher.submit(2, results.append)
    batcher.submit(3, results.append)
    assert calls.batches == [[1], [2]]
    answer_oldest(calls)
    # What waited goes as soon as a call completes.
    assert calls.batches == [[1], [2], [3]]
    answer_oldest(calls)
    answer_oldest(calls)
    assert results == [10, 20, 30]


def test_with_a_clock_one_turn_makes_one_call() -> None:
    clock = Clock()
    calls = Calls()
    batcher: Batcher[int, int] = Batcher(calls, max_in_flight=4, clock=clock)
    results: list[int | Failure] = []
    for item in (1, 2, 3):
        batcher.submit(item, results.append)
    assert calls.batches == []
    clock.advance(0)
    assert calls.batches == [[1, 2, 3]]
    batcher.submit(4, results.append)
    clock.advance(0)
    assert calls.batches == [[1, 2, 3], [4]]
    answer_oldest(calls)
    answer_oldest(calls)
    assert results == [10, 20, 30, 40]
    assert clock.getDelayedCalls() == []


def test_with_a_clock_items_queued_behind_full_calls_go_on_completion() -> None:
    clock = Clock()
    calls = Calls()
    batcher: Batcher[int, int] = Batcher(calls, max_in_flight=1, clock=clock)
    results: list[int | Failure] = []
    batcher.submit(1, results.append)
    clock.advance(0)
    batcher.submit(2, results.append)
    batcher.submit(3, results.append)
    # The only call is in flight: no turn call is needed.
    assert clock.getDelayedCalls() == []
    answer_oldest(calls)
    assert calls.batches == [[1], [2, 3]]
    answer_oldest(calls)
    assert results == [10, 20, 30]


def test_a_failed_batch_fails_the_queued_items_with_fail_queued() -> None:
    clock = Clock()
    calls = Calls()
    batcher: Batcher[int, int] = Batcher(
        calls, max_in_flight=1, fail_queued=True, clock=clock
    )
    results: list[int | Failure] = []
    batcher.submit(1, results.append)
    clock.advance(0)
    batcher.submit(2, results.append)
    calls.pending.pop().errback(Failure(ValueError("down")))
    assert [r.value.args for r in results if isinstance(r, Failure)] == [
        ("down",),
        ("down",),
    ]
    assert calls.batches == [[1]]
