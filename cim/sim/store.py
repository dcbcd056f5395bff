"""
The store as each simulated daemon reaches it: one shared
L{cim.store.memory.MemoryStore} (the store process), and per daemon a
L{StoreLink} that carries its calls with a latency, in order, and fails or
stalls them when the fault schedule says the store is unreachable from
that daemon (as the Redis store fails them: L{StoreError}, after its
time-out when nothing answers).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.python.failure import Failure

from cim.interfaces import StoreError
from cim.sim.net import Node
from cim.store.memory import MemoryStore

#: Seconds a call waits for an answer before it fails, as the Redis
#: store's C{--store-timeout}.
STORE_TIMEOUT = 3.0


class StoreBox:
    """
    The store process: the L{MemoryStore} it holds (replaced when it is
    restored from a backup) and whether it answers.

    @ivar state: C{"ok"}, C{"error"} (answers every call with an error) or
        C{"stall"} (answers nothing: calls time out).
    """

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.state = "ok"


class StoreLink:
    """
    A daemon's connection to the store: every method of L{IStore} goes to
    the L{StoreBox}'s current store after a latency and answers after
    another, in call order.

    @ivar state: C{"ok"}, C{"cut"} (calls fail at once) or C{"stall"}
        (calls time out; a stalled call may have been done or not).
    """

    def __init__(self, box: StoreBox, node: Node, rng: random.Random) -> None:
        self._box = box
        self._node = node
        self._rng = rng
        self._due = 0.0
        self.state = "ok"
        self.calls = 0

    @property
    def retention(self) -> Any:
        return self._box.store.retention

    def close(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d

    def __getattr__(self, name: str) -> Callable[..., Deferred[Any]]:
        if name.startswith("_"):
            raise AttributeError(name)
        if not callable(getattr(self._box.store, name, None)):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Deferred[Any]:
            return self._call(name, args, kwargs)

        call.__name__ = name
        return call

    def _call(self, name: str, args: Any, kwargs: Any) -> Deferred[Any]:
        self.calls += 1
        node = self._node
        box = self._box
        if self.state == "cut":
            return fail(StoreError(f"sim: the store is unreachable ({name})"))
        d: Deferred[Any] = Deferred()

        def timed_out() -> None:
            if not d.called:
                d.errback(StoreError(f"sim: {name} timed out"))

        timer = node.callLater(STORE_TIMEOUT, timed_out)
        if self.state == "stall" or box.state == "stall":
            # The call may or may not have reached the store.
            if self._rng.random() < 0.5 and box.state != "stall":
                maybeDeferred(getattr(box.store, name), *args, **kwargs).addErrback(
                    lambda _: None
                )
            return d
        now = node.clock.seconds()
        latency = self._rng.uniform(0.0002, 0.002)
        self._due = max(self._due, now + latency)
        if box.state == "error":
            result: Deferred[Any] | None = None
        else:
            # The store does it now (one command at a time, atomically)...
            result = maybeDeferred(getattr(box.store, name), *args, **kwargs)
        outcome: list[Any] = []
        if result is None:
            outcome.append(Failure(StoreError(f"sim: the store failed ({name})")))
        else:
            result.addBoth(outcome.append)

        def answer() -> None:
            # ...and the daemon hears of it after the way back.
            if timer.active():
                timer.cancel()
            if d.called:
                return
            if self.state != "ok":
                d.errback(StoreError(f"sim: the store went away ({name})"))
            elif outcome:
                d.callback(outcome[0]) if not isinstance(
                    outcome[0], Failure
                ) else d.errback(outcome[0])

        node.callLater(self._due - now, answer)
        return d
