"""
L{Deadlines}: the time-out of a store's calls, with one timer for all.

C{Deferred.addTimeout} gives each call a C{DelayedCall} of its own, which
the call cancels when it is answered: about 4.5 us a call, most of it the
reactor's bookkeeping of cancelled calls, on the hot paths of the route
(three store calls per C{/p2pRoute}) and of a login.  A store's calls all
wait the same time, so their deadlines come in the order the calls were
made: one queue, and one timer at the first deadline not yet answered.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Deadlines:
    """
    Cancel each watched Deferred that has not fired C{timeout} seconds
    after it was watched (a Deferred is cancelled as C{addTimeout} does,
    but fails with C{CancelledError}: the caller says what it means).

    @ivar waiting: the watched Deferreds, oldest first, with their
        deadlines (those that fired are dropped from the front as new
        ones come and when the timer fires: at most a time-out's worth of
        calls is kept).
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.waiting: deque[tuple[float, defer.Deferred[Any]]] = deque()
        self._timer: IDelayedCall | None = None

    def watch(self, d: defer.Deferred[Any], timeout: float) -> None:
        """
        Cancel C{d} unless it fired within C{timeout} seconds.  (Calls
        watched with a shorter time-out than an earlier one still waiting
        are cancelled no earlier than that one's deadline.)
        """
        waiting = self.waiting
        while waiting and _answered(waiting[0][1]):
            waiting.popleft()
        # Without the mypy-zope plugin mypy thinks interface methods lack self.
        now: float = self._clock.seconds()  # type: ignore[misc]
        waiting.append((now + timeout, d))
        if self._timer is None:
            self._timer = self._clock.callLater(timeout, self._expire)  # type: ignore[misc]

    def _expire(self) -> None:
        self._timer = None
        now: float = self._clock.seconds()  # type: ignore[misc]
        waiting = self.waiting
        while waiting:
            deadline, d = waiting[0]
            answered = _answered(d)
            if not answered and deadline > now:
                self._timer = self._clock.callLater(  # type: ignore[misc]
                    deadline - now, self._expire
                )
                return
            waiting.popleft()
            if not answered:
                d.cancel()

    def stop(self) -> None:
        """
        Stop the timer and forget the watched Deferreds (the store is
        closed: its calls fail by themselves).
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.waiting.clear()


def _answered(d: defer.Deferred[Any]) -> bool:
    """
    Whether C{d} has its result: fired, and not waiting for another
    Deferred it returned (a script sent again with C{EVAL} after
    C{NOSCRIPT}: that one is timed out as the call).
    """
    return d.called and not d.paused
