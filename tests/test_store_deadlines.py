"""
The time-out of the Redis store's calls (L{cim.store.redis.deadlines}):
one timer for all of a store's calls, each call cancelled at its own
deadline.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer, task

from cim.interfaces import StoreError
from cim.store.redis.deadlines import Deadlines
from cim.store.redis.store import RedisStore


def failures(d: defer.Deferred[Any]) -> list[Any]:
    failed: list[Any] = []
    d.addErrback(failed.append)
    return failed


def test_an_answered_call_is_left_alone() -> None:
    clock = task.Clock()
    deadlines = Deadlines(clock)
    d: defer.Deferred[int] = defer.Deferred()
    deadlines.watch(d, 10)
    d.callback(1)
    clock.advance(10)
    assert d.result == 1
    # The timer found nothing left to wait for, and stopped.
    assert clock.getDelayedCalls() == [] and not deadlines.waiting


def test_an_unanswered_call_is_cancelled_at_its_deadline() -> None:
    clock = task.Clock()
    deadlines = Deadlines(clock)
    d: defer.Deferred[int] = defer.Deferred()
    failed = failures(d)
    deadlines.watch(d, 10)
    clock.advance(9.999)
    assert not failed
    clock.advance(0.001)
    assert [f.type for f in failed] == [defer.CancelledError]
    assert clock.getDelayedCalls() == []


def test_a_call_waiting_for_another_is_not_answered_yet() -> None:
    """
    A call that fired with another Deferred (a script sent again after
    NOSCRIPT) is cancelled at its deadline unless that one answered.
    """
    clock = task.Clock()
    deadlines = Deadlines(clock)
    d: defer.Deferred[int] = defer.Deferred()
    again: defer.Deferred[int] = defer.Deferred()
    d.addCallback(lambda _: again)
    failed = failures(d)
    deadlines.watch(d, 10)
    d.callback(0)
    # (The next call does not drop it as answered.)
    later: defer.Deferred[int] = defer.Deferred()
    failures(later)
    deadlines.watch(later, 10)
    clock.advance(10)
    assert [f.type for f in failed] == [defer.CancelledError]
    assert again.called


def test_each_call_has_its_own_deadline_with_one_timer() -> None:
    clock = task.Clock()
    deadlines = Deadlines(clock)
    calls: list[defer.Deferred[int]] = []
    failed: list[list[Any]] = []
    for _ in range(3):
        d: defer.Deferred[int] = defer.Deferred()
        calls.append(d)
        failed.append(failures(d))
        deadlines.watch(d, 10)
        assert len(clock.getDelayedCalls()) == 1
        clock.advance(4)
    # At 12 s: the first (watched at 0) was cancelled at 10; the second
    # (at 4) is answered; the third (at 8) waits until 18.
    assert [len(f) for f in failed] == [1, 0, 0]
    calls[1].callback(2)
    clock.advance(5.9)
    assert [len(f) for f in failed] == [1, 0, 0]
    clock.advance(0.1)
    assert [len(f) for f in failed] == [1, 0, 1]
    assert calls[1].result == 2
    assert clock.getDelayedCalls() == []


def test_answered_calls_are_not_kept() -> None:
    clock = task.Clock()
    deadlines = Deadlines(clock)
    for i in range(1000):
        d: defer.Deferred[int] = defer.Deferred()
        deadlines.watch(d, 10)
        d.callback(i)
    assert len(deadlines.waiting) == 1
    assert len(clock.getDelayedCalls()) == 1


def test_stop() -> None:
    clock = task.Clock()
    deadlines = Deadlines(clock)
    d: defer.Deferred[int] = defer.Deferred()
    failed = failures(d)
    deadlines.watch(d, 10)
    deadlines.stop()
    assert clock.getDelayedCalls() == []
    clock.advance(20)
    assert not failed


class _Silent:
    """
    A Redis connection that takes every command and never answers.
    """

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any) -> defer.Deferred[Any]:
        self.commands.append(args)
        return defer.Deferred()


@pytest.mark.parametrize("timeout", [2.0, 0.25])
def test_a_store_call_without_an_answer_fails_after_the_store_timeout(
    timeout: float,
) -> None:
    clock = task.Clock()
    redis = _Silent()
    store = RedisStore(redis, clock, timeout=timeout)
    failed = failures(store.last_seq("p:1:2"))
    assert redis.commands == [("GET", "cim:seq:{p:1:2}")]
    clock.advance(timeout * 0.99)
    assert not failed
    clock.advance(timeout * 0.01)
    [failure] = failed
    assert failure.check(StoreError)
    assert (
        failure.getErrorMessage() == f"Redis GET failed: no answer within {timeout:g} s"
    )
    assert clock.getDelayedCalls() == []
