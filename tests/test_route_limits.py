"""
The route's side of what one send may store (issue 13): at most
L{cim.limits.MAX_BATCH} texts in C{batchMsg}, and a sender over its quota
for a conversation gets 6000 while every other send goes on (also those
stored in the same store call).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from cim.delivery import Delivery
from cim.interfaces import NewMessage, QuotaExceeded
from cim.limits import MAX_BATCH
from cim.message import group_conversation, pair_conversation
from cim.store.memory import MemoryStore
from tests.test_route import FakePusher, Route, result


def test_batch_over_the_limit() -> None:
    route = Route()
    alice, token = route.online("alice")
    bob, _ = route.online("bob")
    route.ok("/group/create", {"userId": alice, "groupId": "g"}, token=token)
    too_many = [f"t{i}" for i in range(MAX_BATCH + 1)]
    for path, body in [
        ("/p2pRoute", {"userId": alice, "receiveUserId": bob}),
        ("/group/send", {"userId": alice, "groupId": "g"}),
    ]:
        answer = route.call(path, {**body, "batchMsg": too_many}, token=token)
        assert answer["code"] == "3000"
        assert f"at most {MAX_BATCH} texts" in answer["message"]
        route.ok(path, {**body, "batchMsg": too_many[:MAX_BATCH]}, token=token)
    assert (
        len(result(route.store.read(pair_conversation(alice, bob), 0, 1000)))
        == MAX_BATCH
    )
    assert len(result(route.store.read(group_conversation("g"), 0, 1000))) == MAX_BATCH
    # The OpenAPI document says so too.
    document = route.request("GET", "/openapi.json")[1]
    assert f'"maxItems": {MAX_BATCH}'.encode() in document


def test_sender_quota_is_6000() -> None:
    route = Route()
    route.store.retention = replace(route.store.retention, sender_quota=3)
    alice, token = route.online("alice")
    bob, _ = route.online("bob")
    carol, carols = route.online("carol")
    body = {"userId": alice, "receiveUserId": bob, "batchMsg": ["1", "2", "3"]}
    route.ok("/p2pRoute", body, token=token)
    answer = route.call(
        "/p2pRoute", {"userId": alice, "receiveUserId": bob, "msg": "4"}, token=token
    )
    assert answer["code"] == "6000"
    assert "quota" in answer["message"]
    assert len(result(route.store.read(pair_conversation(alice, bob), 0, 10))) == 3
    # Someone else still writes to bob (another conversation).
    route.ok(
        "/p2pRoute", {"userId": carol, "receiveUserId": bob, "msg": "c"}, token=carols
    )
    # and the group's quota is its own.
    route.ok("/group/create", {"userId": alice, "groupId": "g"}, token=token)
    body = {"userId": alice, "groupId": "g", "batchMsg": ["a", "b", "c", "d"]}
    assert route.code("/group/send", body, token=token) == "6000"
    stored = result(route.store.read(group_conversation("g"), 0, 10))
    assert [m.text for m in stored] == ["a", "b", "c"]


class HeldAppends(MemoryStore):
    """
    A memory store whose appends wait until the test releases them.
    """

    def __init__(self, clock: Any) -> None:
        super().__init__(clock)
        self.held: list[tuple[Deferred[Any], Deferred[Any]]] = []
        self.calls: list[int] = []

    def append(self, messages: Any) -> Deferred[Any]:
        self.calls.append(len(messages))
        done = super().append(messages)
        waiting: Deferred[Any] = Deferred()
        self.held.append((done, waiting))
        return waiting

    def release(self) -> None:
        held, self.held = self.held, []
        for done, waiting in held:
            done.chainDeferred(waiting)


def test_one_refused_send_fails_alone() -> None:
    """
    Sends stored in one store call: only the one over its quota fails.
    """
    clock = Clock()
    store = HeldAppends(clock)
    store.retention = replace(store.retention, sender_quota=2)
    delivery = Delivery(store, FakePusher(), clock=clock)

    def new(sender: int, text: str) -> NewMessage:
        return NewMessage(group_conversation("g"), sender, f"user{sender}", text)

    results: list[Any] = []
    # The first append is in flight; the next three queue and leave together.
    sends = [
        delivery.append([new(1, "a")]),
        delivery.append([new(9, "x1"), new(9, "x2"), new(9, "x3")]),
        delivery.append([new(1, "b")]),
        delivery.append([new(3, "c")]),
    ]
    for d in sends:
        d.addBoth(results.append)
    store.release()
    store.release()
    assert store.calls == [1, 5]
    assert len(results) == 4
    assert [m.text for m in results[0]] == ["a"]
    assert isinstance(results[1], Failure) and results[1].check(QuotaExceeded)
    assert [m.text for m in results[2]] == ["b"]
    assert [m.text for m in results[3]] == ["c"]
    stored = result(store.read(group_conversation("g"), 0, 10))
    assert [m.text for m in stored] == ["a", "x1", "x2", "b", "c"]
