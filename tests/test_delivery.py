"""
The delivery core: pushes to other servers, and where users were found.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from cim.delivery import ROUTE_CACHE_TTL, Delivery, IPusher
from cim.interfaces import NewMessage
from cim.message import ChatMessage, inbox
from cim.store.memory import MemoryStore


@implementer(IPusher)
class Pusher:
    def __init__(self) -> None:
        self.pushes: list[tuple[str, list[int]]] = []
        self.gone: set[int] = set()

    def push(
        self, server: str, messages: Sequence[ChatMessage], user_ids: Sequence[int]
    ) -> Deferred[list[int]]:
        self.pushes.append((server, list(user_ids)))
        return succeed([u for u in user_ids if u in self.gone])


class CountingStore(MemoryStore):
    lookups = 0

    def get_sessions(self, user_ids):  # type: ignore[no-untyped-def]
        self.lookups += 1
        return super().get_sessions(user_ids)


def setup() -> tuple[Clock, CountingStore, Pusher, Delivery, int, list[ChatMessage]]:
    clock = Clock()
    store = CountingStore(clock)
    pusher = Pusher()
    delivery = Delivery(store, pusher, here="here:1:2", clock=clock)
    bob = store.register("bob").result.user_id
    session, _ = store.claim_session(bob, "bob", "there:1:2", 60).result
    store.activate_session(bob, session.session_id)
    stored = store.append(
        [NewMessage(inbox(bob), 9, "al", "hi", receive_user_id=bob)]
    ).result
    return clock, store, pusher, delivery, bob, stored


def test_a_users_server_is_looked_up_once() -> None:
    clock, store, pusher, delivery, bob, stored = setup()
    for _ in range(3):
        report = delivery.deliver(stored, [bob]).result
        assert report.delivered == [bob]
    assert store.lookups == 1
    assert pusher.pushes == [("there:1:2", [bob])] * 3
    clock.advance(ROUTE_CACHE_TTL + 1)
    delivery.deliver(stored, [bob])
    assert store.lookups == 2


def test_a_user_who_moved_is_looked_up_again() -> None:
    clock, store, pusher, delivery, bob, stored = setup()
    delivery.deliver(stored, [bob])
    # Bob moved to another server; the old one says he is not there.
    session, _ = store.claim_session(
        bob, "bob", "elsewhere:1:2", 60, replace=True
    ).result
    store.activate_session(bob, session.session_id)
    pusher.gone = {bob}

    def moved(server, messages, user_ids):  # type: ignore[no-untyped-def]
        pusher.pushes.append((server, list(user_ids)))
        return succeed([bob] if server == "there:1:2" else [])

    pusher.push = moved  # type: ignore[method-assign]
    report = delivery.deliver(stored, [bob]).result
    assert report.delivered == [bob] and report.offline == []
    assert pusher.pushes[-2:] == [("there:1:2", [bob]), ("elsewhere:1:2", [bob])]


def test_a_user_who_left_is_offline_not_cached() -> None:
    clock, store, pusher, delivery, bob, stored = setup()
    delivery.deliver(stored, [bob])
    store.release_session(bob, store.get_session(bob).result.session_id)
    pusher.gone = {bob}
    report = delivery.deliver(stored, [bob]).result
    assert report.offline == [bob] and report.delivered == []
    lookups = store.lookups
    delivery.deliver(stored, [bob])
    assert store.lookups == lookups + 1
