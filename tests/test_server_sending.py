"""
The server's sends when the store fails: the sender is told which send was
not stored and is kicked, and nothing it sent after is stored before that
send is sent again.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from cim.interfaces import NewMessage, StoreError
from cim.message import ChatMessage, Command, ErrorCode, Frame, inbox
from cim.store.memory import MemoryStore
from tests.serverkit import World


class HeldAppends(MemoryStore):
    """
    A memory store whose appends wait, in order, until the test stores or
    fails them.
    """

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.held: list[tuple[Deferred[list[ChatMessage]], list[NewMessage]]] = []

    def append(self, messages: Sequence[NewMessage]) -> Deferred[list[ChatMessage]]:
        d: Deferred[list[ChatMessage]] = Deferred()
        self.held.append((d, list(messages)))
        return d

    def store_next(self) -> None:
        d, messages = self.held.pop(0)
        super().append(messages).chainDeferred(d)

    def fail_next(self) -> None:
        d, _ = self.held.pop(0)
        d.errback(StoreError("the store is down"))


def private(text: str, cmid: str, receiver: int) -> Frame:
    return Frame(
        cmd=Command.MESSAGE, req_msg=text, client_msg_id=cmid, receive_user_id=receiver
    )


def to_group(text: str, cmid: str, group_id: str) -> Frame:
    return Frame(
        cmd=Command.MESSAGE, req_msg=text, client_msg_id=cmid, group_id=group_id
    )


def test_a_failed_append_is_an_error_then_a_kick_and_stores_nothing_after() -> None:
    store = HeldAppends(Clock())
    world = World(store=store)
    alice_peer, alice = world.login("alice")
    bob_peer, bob = world.login("bob")
    world.result(store.create_group("team", alice))
    world.result(store.join_group("team", bob))
    sends = [
        private("one", "a1", bob),  # straight to the appender
        to_group("two", "a2", "team"),  # checked first (the send loop)
        private("three", "a3", bob),
    ]
    for frame in sends:
        alice_peer.send(frame)
    # The first is being stored, the others wait behind it.
    assert len(store.held) == 1 and alice_peer.received() == []
    store.fail_next()
    error, kick = alice_peer.received()
    assert error.cmd == Command.ERROR
    assert error.error_code == ErrorCode.STORE_ERROR
    assert error.client_msg_id == "a1"
    assert (
        error.error_reason
        == "may not be stored; send it again (it is never stored twice)"
    )
    assert kick.cmd == Command.KICK
    assert kick.error_reason == "temporary store failure"
    assert alice_peer.closed
    # Neither the sends queued behind the failed one nor any later send of
    # that connection reached the store.
    alice_peer.send(private("four", "a4", bob))
    assert store.held == []
    assert bob_peer.messages() == []
    assert world.result(store.read(inbox(bob), 0, 10)) == []

    # The client reconnects and sends again, in order, what was not
    # acknowledged.
    alice_peer.lose()
    again, _ = world.login("alice", user_id=alice)
    for frame in sends:
        again.send(frame)
    while store.held:
        store.store_next()
    acks = [f for f in again.received() if f.cmd == Command.ACK]
    assert [f.client_msg_id for f in acks] == ["a1", "a2", "a3"]
    assert [m.text for m in bob_peer.messages()] == ["one", "two", "three"]
