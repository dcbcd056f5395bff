"""
The IM server's limits against one user harming others (issue 13), in
memory on L{tests.serverkit}: acknowledgements only of what a connection
was sent, a failed login that releases its session, texts per batch, the
rate limit in messages, the senders' quota, sessions that expire unless
the server renews them, and the output a connection may leave unread.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from cim.interfaces import StoreError
from cim.message import Command, Cursor, ErrorCode, Frame, inbox
from cim.store.memory import MemoryStore
from tests.serverkit import Peer, World

# Acknowledgements


def test_acks_only_of_own_conversations_and_what_was_sent() -> None:
    world = World()
    alice_peer, _ = world.login("alice")
    bob_peer, bob = world.login("bob")
    for text in ("m1", "m2"):
        alice_peer.send(Frame(cmd=Command.MESSAGE, req_msg=text, receive_user_id=bob))
    assert len(bob_peer.messages()) == 2
    bob_peer.send(
        Frame(
            cmd=Command.ACK,
            cursors=[
                Cursor("u:999", 2**63 - 1),  # someone else's inbox
                Cursor(inbox(bob), 2**63 - 1),  # beyond what bob was sent
                Cursor("g:made-up", 1),  # not a group of bob's
                *[Cursor(f"g:x{i}", 5) for i in range(1000)],
                Cursor("all", 3),  # the broadcast conversation: no cursor
            ],
        )
    )
    assert world.server.m_acks_ignored.value == 1003
    assert not bob_peer.closed
    world.clock.advance(10)
    assert world.result(world.store.get_cursors(bob)) == {}
    # What bob was sent may be acknowledged.
    bob_peer.send(Frame(cmd=Command.ACK, cursors=[Cursor(inbox(bob), 2)]))
    world.clock.advance(10)
    assert world.result(world.store.get_cursors(bob)) == {inbox(bob): 2}
    # and bob still logs in, and resumes after it.
    bob_peer.lose()
    alice_peer.send(Frame(cmd=Command.MESSAGE, req_msg="m3", receive_user_id=bob))
    again, _ = world.login("bob", user_id=bob)
    assert [m.text for m in again.messages()] == ["m3"]


class FailingCursors(MemoryStore):
    """
    A memory store whose cursor reads fail while C{failing}.
    """

    failing = False

    def get_cursors(self, user_id: int) -> Deferred[dict[str, int]]:
        if self.failing:
            return fail(StoreError("Redis HGETALL failed"))
        return super().get_cursors(user_id)


def test_a_login_failing_after_activation_releases_the_session() -> None:
    world = World(store=FailingCursors(Clock()))
    store = world.store
    assert isinstance(store, FailingCursors)
    bob = world.account("bob")
    store.failing = True
    peer = Peer(world.server)
    peer.send(
        Frame(
            cmd=Command.LOGIN_REQUEST,
            request_id=bob,
            req_msg="bob",
            token=world.token(bob, "bob"),
        )
    )
    peer_frames = peer.received()
    assert [f.cmd for f in peer_frames] == [Command.ERROR]
    assert peer_frames[0].error_code == ErrorCode.FAILURE
    assert peer.closed
    # No ghost: nobody online, the session is free for the next login.
    assert world.result(store.online_users()) == []
    assert world.result(store.get_session(bob)) is None
    store.failing = False
    world.login("bob", user_id=bob)
    assert world.result(store.online_users()) == [(bob, "bob")]
