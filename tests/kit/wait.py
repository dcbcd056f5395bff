"""
Waiting, with a deadline, for what a test or the benchmark needs to happen.

Two kinds of wait, each with one implementation:

  - on an event: a Deferred (or coroutine) that fires, or the next items of
    a L{DeferredQueue} (L{within}, L{take}, L{take_until});
  - on a condition nothing announces, checked again every C{interval}
    seconds until it holds (L{wait_until} with the reactor running,
    L{wait_blocking} where no reactor runs: the benchmark's driver, and
    fixtures that run before the reactor does).

A deadline that passes raises C{AssertionError} naming what was awaited,
so that a failing test says what did not happen.  Nothing here sleeps a
fixed time for something to be done: every wait ends as soon as its event
or condition is there.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.task import deferLater

T = TypeVar("T")

#: The longest a test waits for one thing unless it says otherwise
#: (generous: two cores, several processes).
DEADLINE = 30.0


async def within(
    reactor: Any,
    d: Deferred[T] | Coroutine[Any, Any, T],
    deadline: float = DEADLINE,
) -> T:
    """
    Wait for C{d} (a Deferred or a coroutine); cancel it and fail with
    C{defer.TimeoutError} after C{deadline} seconds.
    """
    if not isinstance(d, Deferred):
        d = Deferred.fromCoroutine(d)
    d.addTimeout(deadline, reactor)
    result: T = await d
    return result


def _timed_out(
    what: str, deadline: float, last: BaseException | None = None
) -> AssertionError:
    return AssertionError(
        f"timed out after {deadline:g}s waiting for {what}"
        + (f" (last error: {last!r})" if last is not None else "")
    )


async def wait_until(
    reactor: Any,
    check: Callable[[], object | Awaitable[object]],
    what: str,
    deadline: float = DEADLINE,
    interval: float = 0.01,
    errors: tuple[type[BaseException], ...] = (),
) -> Any:
    """
    Call C{check} (which may return an awaitable) every C{interval} seconds,
    with the reactor running, until it returns something true.

    @param errors: exceptions of C{check} that mean "not yet" (a service
        that does not answer yet); any other propagates.
    @return: the true result.
    @raise AssertionError: it was still false after C{deadline} seconds
        (the message names C{what}, and the last error if any).
    """
    end = reactor.seconds() + deadline
    last: BaseException | None = None
    while True:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
        except errors as e:
            result, last = None, e
        if result:
            return result
        if reactor.seconds() > end:
            raise _timed_out(what, deadline, last)
        await deferLater(reactor, interval)


def wait_blocking(
    check: Callable[[], T | None],
    what: str,
    deadline: float = DEADLINE,
    interval: float = 0.05,
    errors: tuple[type[BaseException], ...] = (),
) -> T:
    """
    L{wait_until} for code that runs no reactor: blocks this thread.

    @return: the first true result of C{check}.
    """
    end = time.monotonic() + deadline
    last: BaseException | None = None
    while True:
        result: T | None = None
        try:
            result = check()
        except errors as e:
            last = e
        if result:
            return result
        if time.monotonic() > end:
            raise _timed_out(what, deadline, last)
        time.sleep(interval)


async def take(
    reactor: Any, queue: DeferredQueue[T], count: int, deadline: float = DEADLINE
) -> list[T]:
    """
    The next C{count} items of C{queue}, all within C{deadline} seconds.
    """
    end = reactor.seconds() + deadline
    out = []
    for _ in range(count):
        left = max(0.001, end - reactor.seconds())
        out.append(await within(reactor, queue.get(), left))
    return out


async def take_until(
    reactor: Any,
    queue: DeferredQueue[T],
    wanted: Callable[[T], bool],
    what: str,
    deadline: float = DEADLINE,
) -> T:
    """
    Take items from C{queue} (dropping the others) until one is
    C{wanted}; return it.

    @raise AssertionError: none came within C{deadline} seconds.
    """
    end = reactor.seconds() + deadline
    while True:
        left = end - reactor.seconds()
        if left <= 0:
            raise _timed_out(what, deadline)
        item = await within(reactor, queue.get(), left)
        if wanted(item):
            return item
