"""
The IM server on issue 14's model, in memory: several devices per user,
private conversations of two sides, where each device's streams start
(LOGIN_RESPONSE, EPOCH), epochs that change under a stream, read positions
(READ), and what CIM clients still see.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred

from cim.interfaces import ConversationState, Epoch, NewMessage
from cim.message import (
    KICK_REPLACED,
    ChatMessage,
    Command,
    Cursor,
    Frame,
    Position,
    group_conversation,
    pair_conversation,
)
from cim.pushapi import ReadEvent
from cim.server import wire
from cim.store.memory import MemoryStore
from tests.serverkit import HERE, THERE, CountingStore, Peer, World


def epoch_of(world: World, conversation: str) -> Epoch:
    epochs = world.result(world.store.epochs([conversation]))
    return epochs[conversation]  # type: ignore[index,no-any-return]


def of(frames: Sequence[Frame], cmd: Command) -> list[Frame]:
    return [f for f in frames if f.cmd == cmd]


def texts(frames: Sequence[Frame]) -> list[str]:
    return [m.text for f in frames for m in f.messages]


def store_from(
    world: World, sender: int, receiver: int, *texts: str
) -> list[ChatMessage]:
    """
    Store C{texts} from C{sender} to C{receiver} as the route does, without
    delivering them.
    """
    conversation = pair_conversation(sender, receiver)
    return world.result(  # type: ignore[return-value]
        world.store.append(
            [
                NewMessage(conversation, sender, "x", t, receive_user_id=receiver)
                for t in texts
            ]
        )
    )


# Devices


def test_two_devices_of_a_user_get_every_message_once_in_order() -> None:
    world = World()
    alice_peer, alice = world.login("alice")
    phone, bob = world.login("bob", device="phone")
    laptop, _ = world.login("bob", user_id=bob, device="laptop")
    for i in range(3):
        world.send(alice_peer, f"m{i}", bob)
    # Another server pushes one of them again: a duplicate, dropped.
    again = world.result(world.store.read(pair_conversation(alice, bob), 1, 1))
    world.server.deliver_local(again, [bob])  # type: ignore[arg-type]
    for peer in (phone, laptop):
        frames = peer.received()
        assert {f.cmd for f in frames} == {Command.MESSAGE}
        assert texts(frames) == ["m0", "m1", "m2"]
    assert not phone.closed and not laptop.closed


def test_the_sending_device_gets_its_own_message_and_so_do_the_others() -> None:
    world = World()
    phone, alice = world.login("alice", device="phone")
    laptop, _ = world.login("alice", user_id=alice, device="laptop")
    bob_peer, bob = world.login("bob")
    world.send(phone, "hi", bob, cmid="c1")
    frames = phone.received()
    assert [f.cmd for f in frames] == [Command.ACK, Command.MESSAGE]
    assert texts(frames) == ["hi"]
    assert texts(laptop.received()) == ["hi"]
    assert bob_peer.texts() == ["hi"]
    # The sending device acknowledges it like any other message.
    conversation = pair_conversation(alice, bob)
    epoch = epoch_of(world, conversation).id
    phone.send(Frame(cmd=Command.ACK, cursors=[Cursor(conversation, 1, epoch)]))
    assert world.server.m_acks_ignored.value == 0


def test_notes_to_oneself_reach_each_device_once() -> None:
    world = World()
    phone, alice = world.login("alice", device="phone")
    laptop, _ = world.login("alice", user_id=alice, device="laptop")
    world.send(phone, "note", alice)
    assert texts(phone.received()) == ["note"]
    assert laptop.texts() == ["note"]


def test_a_login_of_the_same_device_replaces_only_that_connection() -> None:
    world = World()
    phone, alice = world.login("alice", device="phone")
    laptop, _ = world.login("alice", user_id=alice, device="laptop")
    newer, _ = world.login("alice", user_id=alice, device="phone")
    [kick] = phone.received()
    assert (kick.cmd, kick.error_reason, phone.closed) == (
        Command.KICK,
        KICK_REPLACED,
        True,
    )
    phone.lose()
    assert laptop.received() == [] and not laptop.closed
    assert sorted(c.device for c in world.server.devices(alice)) == [
        "laptop",
        "phone",
    ]
    bob_peer, bob = world.login("bob")
    world.send(bob_peer, "to both", alice)
    assert newer.texts() == ["to both"]
    assert laptop.texts() == ["to both"]
    # The replaced connection's close released nothing.
    sessions = world.result(world.store.user_sessions(alice))
    assert [s.device for s in sessions if s.connected] == ["laptop", "phone"]  # type: ignore[attr-defined]


def test_a_session_lost_at_renewal_closes_that_device_only() -> None:
    world = World(session_ttl=9.0)
    phone, alice = world.login("alice", device="phone")
    laptop, _ = world.login("alice", user_id=alice, device="laptop")
    # The phone logged in again through the route, to another server.
    world.result(
        world.store.claim_session(
            alice, "alice", str(THERE), 60.0, replace=True, device="phone"
        )
    )
    for _ in range(4):
        world.clock.advance(1)
        laptop.send(Frame(cmd=Command.PING))
        phone.send(Frame(cmd=Command.PING))
    kicks = of(phone.received(), Command.KICK)
    assert [k.error_reason for k in kicks] == [KICK_REPLACED] and phone.closed
    assert not laptop.closed
    phone.lose()
    # Its newer session elsewhere was not released.
    session = world.result(world.store.get_session(alice, "phone"))
    assert session is not None and session.server == str(THERE)  # type: ignore[attr-defined]


def test_renewals_report_each_device_and_when_it_last_sent() -> None:
    world = World(session_ttl=9.0)
    phone, alice = world.login("alice", device="phone")
    laptop, _ = world.login("alice", user_id=alice, device="laptop")
    bob = world.account("bob")
    login_time = world.clock.seconds()
    world.clock.advance(1)
    world.send(phone, "hi", bob)
    sent_time = world.clock.seconds()
    for _ in range(4):
        world.clock.advance(1)
        laptop.send(Frame(cmd=Command.PING))
        phone.send(Frame(cmd=Command.PING))
    sessions = {s.device: s for s in world.result(world.store.user_sessions(alice))}  # type: ignore[attr-defined]
    assert sessions["phone"].active == sent_time
    assert sessions["laptop"].active == login_time


def test_kick_user_closes_one_session_or_every_device() -> None:
    world = World()
    phone, alice = world.login("alice", device="phone")
    laptop, _ = world.login("alice", user_id=alice, device="laptop")
    phone_session = world.server.connection(alice, "phone").session_id
    assert world.result(world.server.kick_user(alice, "nope", "x")) is False
    assert world.result(world.server.kick_user(alice, phone_session, "off")) is True
    assert phone.closed and not laptop.closed
    assert world.result(world.server.kick_user(alice, "", "off")) is True
    assert laptop.closed


# Where streams start


def test_login_response_names_the_device_and_where_each_conversation_starts() -> None:
    world = World()
    alice = world.account("alice")
    bob = world.account("bob")
    carol = world.account("carol")
    world.result(world.store.create_group("team", bob))
    world.result(world.store.join_group("team", alice))
    store_from(world, bob, alice, "b1", "b2", "b3")
    store_from(world, carol, alice, "c1")
    with_bob = pair_conversation(alice, bob)
    with_carol = pair_conversation(alice, carol)
    team = group_conversation("team")
    world.result(world.store.set_read(alice, with_bob, 2))
    carol_epoch = epoch_of(world, with_carol).id
    peer, _ = world.login(
        "alice",
        user_id=alice,
        device="phone",
        cursors=[Cursor(with_carol, 1, carol_epoch)],
    )
    login = peer.login
    assert login is not None and login.device == "phone"
    assert list(login.cursors) == [
        Cursor(team, 0, epoch_of(world, team).id),
        # Not from the read position: the device shows the whole
        # conversation.
        Cursor(with_bob, 0, epoch_of(world, with_bob).id),
        Cursor(with_carol, 1, carol_epoch),
    ]
    # Only what holds more than its start is replayed.
    frames = peer.received()
    assert [f.cmd for f in frames] == [Command.OFFLINE]
    assert texts(frames) == ["b1", "b2", "b3"]


def test_login_replays_only_conversations_with_more_than_the_start() -> None:
    world = World()
    alice = world.account("alice")
    store_from(world, alice, world.account("bob"), "one")
    store_from(world, world.account("carol"), alice, "two")
    reads: list[str] = []
    read = world.store.read

    def counting(conversation: str, after_seq: int, limit: int) -> Deferred:
        reads.append(conversation)
        return read(conversation, after_seq, limit)

    world.store.read = counting  # type: ignore[method-assign]
    mine = pair_conversation(alice, 2)
    epoch = epoch_of(world, mine).id
    world.result(world.store.set_cursors(alice, {mine: Position(epoch, 1)}))
    peer, _ = world.login("alice", user_id=alice)
    # The device has its own message already: nothing to read there.
    assert peer.texts() == ["two"]
    assert reads == [pair_conversation(alice, 3)]


class HeldConversations(MemoryStore):
    """
    A memory store whose logins' reads (a user's conversations) wait while
    C{slow}.
    """

    slow = False

    def __init__(self, clock) -> None:  # type: ignore[no-untyped-def]
        super().__init__(clock)
        self.held: list[tuple[Deferred, Deferred]] = []

    def login_reads(
        self, user_id: int, device: str = ""
    ) -> Deferred[tuple[list[ConversationState], dict[str, Position]]]:
        d = super().login_reads(user_id, device)
        if not self.slow:
            return d
        held: Deferred[tuple[list[ConversationState], dict[str, Position]]]
        held = Deferred()
        self.held.append((d, held))
        return held

    def release(self) -> None:
        self.slow = False
        while self.held:
            d, held = self.held.pop(0)
            d.chainDeferred(held)


def test_messages_delivered_while_a_login_reads_are_not_lost() -> None:
    world = World(store=HeldConversations(World().clock))
    store: HeldConversations = world.store  # type: ignore[assignment]
    alice_peer, alice = world.login("alice")
    bob = world.account("bob")
    world.send(alice_peer, "before", bob)
    carol_peer, carol = world.login("carol")
    store.slow = True
    bob_peer = Peer(world.server)
    bob_peer.send(
        Frame(
            cmd=Command.LOGIN_REQUEST,
            request_id=bob,
            req_msg="bob",
            token=world.token(bob, "bob"),
        )
    )
    # While the login reads bob's conversations (which do not show it yet),
    # messages are delivered to him: an old conversation and a new one.
    world.send(alice_peer, "during", bob)
    world.send(carol_peer, "new", bob)
    assert bob_peer.received() == []
    store.release()
    frames = bob_peer.received()
    assert frames[0].cmd == Command.LOGIN_RESPONSE
    assert sorted(texts(frames)) == ["before", "during", "new"]
    assert texts(frames).index("before") < texts(frames).index("during")
    # (The new one starts at 0 of the epoch of its message: no EPOCH frame.)
    assert of(frames, Command.EPOCH) == []
    # Nothing more comes of it.
    world.clock.advance(1)
    assert bob_peer.received() == []
    assert alice


def test_a_new_private_conversation_is_adopted_without_an_epoch_frame() -> None:
    # Bob's client takes the conversation's epoch from its first message.
    world = World()
    alice_peer, alice = world.login("alice")
    bob_peer, bob = world.login("bob")
    world.send(alice_peer, "hello", bob)
    world.send(alice_peer, "again", bob)
    conversation = pair_conversation(alice, bob)
    epoch = epoch_of(world, conversation).id
    frames = bob_peer.received()
    assert [f.cmd for f in frames] == [Command.MESSAGE, Command.MESSAGE]
    assert frames[0].messages[0].epoch == epoch
    assert texts(frames) == ["hello", "again"]
    # Acknowledged in that epoch, it is where the device resumes.
    bob_peer.send(Frame(cmd=Command.ACK, cursors=[Cursor(conversation, 2, epoch)]))
    bob_peer.lose()
    world.send(alice_peer, "later", bob)
    again, _ = world.login("bob", user_id=bob)
    assert again.login is not None
    assert list(again.login.cursors) == [Cursor(conversation, 2, epoch)]
    assert again.texts() == ["later"]


def test_a_position_sent_for_a_conversation_the_store_lost_is_moved() -> None:
    # Bob's client had the conversation with alice (at 4 of "gone"), which
    # the store no longer lists: its first new message is announced, so the
    # client's stream moves to the new epoch from 0.
    world = World()
    alice_peer, alice = world.login("alice")
    conversation = pair_conversation(alice, world.user("bob"))
    bob_peer, bob = world.login("bob", cursors=[Cursor(conversation, 4, "gone")])
    assert world.server.devices(bob)[0].unlisted == {conversation}
    world.send(alice_peer, "new", bob)
    frames = bob_peer.received()
    assert [f.cmd for f in frames] == [Command.EPOCH, Command.MESSAGE]
    epoch = epoch_of(world, conversation).id
    assert list(frames[0].cursors) == [Cursor(conversation, 0, epoch, False)]
    assert texts(frames) == ["new"]


def test_a_connection_without_positions_keeps_no_unlisted_set() -> None:
    world = World()
    peer, bob = world.login("bob")
    assert world.server.devices(bob)[0].unlisted == frozenset()


def counting_world() -> tuple[World, CountingStore]:
    world = World(store_class=CountingStore)
    assert isinstance(world.store, CountingStore)
    return world, world.store


#: What a conversation first seen since login could cost.
ADOPTION_CALLS = {"get_cursors", "epochs", "read", "group_info"}


def test_random_private_chat_costs_no_store_call_to_adopt() -> None:
    # Each message begins a conversation for its receiver and for the
    # sender's own device (its echo): neither reads the store for it.
    world, store = counting_world()
    peers = {name: world.login(name) for name in ("alice", "bob", "carol")}
    store.count()
    for sender, receiver in (("alice", "bob"), ("bob", "carol"), ("carol", "alice")):
        world.send(peers[sender][0], f"{sender} to {receiver}", peers[receiver][1])
    assert ADOPTION_CALLS.isdisjoint(store.names()), store.names()
    for name, (peer, _) in peers.items():
        frames = peer.received()
        # (No EPOCH frames: each starts at 0 of its first message's epoch.)
        assert [f.cmd for f in frames if f.cmd != Command.ACK] == [
            Command.MESSAGE,
            Command.MESSAGE,
        ], name


def test_a_login_reads_no_epoch() -> None:
    world, store = counting_world()
    alice_peer, alice = world.login("alice")
    bob_peer, bob = world.login("bob")
    carol = world.user("carol")
    world.send(alice_peer, "to bob", bob)
    world.send(alice_peer, "to carol", carol)
    with_bob = pair_conversation(alice, bob)
    with_carol = pair_conversation(alice, carol)
    epoch = epoch_of(world, with_bob).id
    alice_peer.send(Frame(cmd=Command.ACK, cursors=[Cursor(with_bob, 1, epoch)]))
    alice_peer.lose()
    store.count()
    again, _ = world.login("alice", user_id=alice)
    assert "epochs" not in store.names()
    assert again.login is not None
    assert list(again.login.cursors) == [
        Cursor(with_bob, 1, epoch),
        Cursor(with_carol, 0, epoch_of(world, with_carol).id),
    ]
    # Nor for a position of another epoch: the conversation's state names
    # its whole current epoch, which resumes it (reset: not trusted).
    again.lose()
    store.count()
    third, _ = world.login("alice", [Cursor(with_carol, 1, "lost")], user_id=alice)
    assert "epochs" not in store.names()
    assert third.login is not None
    assert Cursor(with_carol, 0, epoch_of(world, with_carol).id, True) in list(
        third.login.cursors
    )


def test_a_save_stores_only_the_cursors_acknowledged_since_the_last() -> None:
    world, store = counting_world()
    alice_peer, alice = world.login("alice")
    bob_peer, bob = world.login("bob", device="phone")
    conversations = []
    for name in ("carol", "dave"):
        peer, user = world.login(name)
        world.send(peer, f"from {name}", bob)
        conversation = pair_conversation(bob, user)
        epoch = epoch_of(world, conversation).id
        bob_peer.send(Frame(cmd=Command.ACK, cursors=[Cursor(conversation, 1, epoch)]))
        conversations.append((conversation, epoch))
    world.clock.advance(10)
    # Bob's phone again: its cursors come with the login; a new one with
    # alice is acknowledged, and only that one is saved.
    bob_peer.lose()
    again, _ = world.login("bob", user_id=bob, device="phone")
    world.send(alice_peer, "hi", bob)
    with_alice = pair_conversation(alice, bob)
    epoch = epoch_of(world, with_alice).id
    again.send(Frame(cmd=Command.ACK, cursors=[Cursor(with_alice, 1, epoch)]))
    store.count()
    world.clock.advance(10)
    assert store.calls == [
        ("set_many_cursors", ({(bob, "phone"): {with_alice: Position(epoch, 1)}},))
    ]
    assert world.result(store.get_cursors(bob, "phone")) == {
        with_alice: Position(epoch, 1),
        **{c: Position(e, 1) for c, e in conversations},
    }


# Epochs


def converse(world: World) -> tuple[Peer, int, Peer, int, str]:
    """
    Alice and bob logged in, with three messages from alice to bob.
    """
    alice_peer, alice = world.login("alice")
    bob_peer, bob = world.login("bob")
    for i in range(1, 4):
        world.send(alice_peer, f"m{i}", bob)
    alice_peer.received()
    assert bob_peer.texts() == ["m1", "m2", "m3"]
    return alice_peer, alice, bob_peer, bob, pair_conversation(alice, bob)


def test_a_store_that_lost_a_conversation_resets_its_streams() -> None:
    world = World()
    alice_peer, alice, bob_peer, bob, conversation = converse(world)
    old = epoch_of(world, conversation)
    # The store lost the conversation (a flushed database): it starts again
    # at 1, in a new epoch.
    store = world.store
    store._messages[conversation] = []
    store._seqs[conversation] = 0
    del store._epochs[conversation]
    world.send(alice_peer, "after", bob)
    new = epoch_of(world, conversation)
    assert new.id != old.id
    frames = bob_peer.received()
    assert [f.cmd for f in frames] == [Command.EPOCH, Command.MESSAGE]
    assert list(frames[0].cursors) == [Cursor(conversation, 0, new.id, reset=True)]
    assert texts(frames) == ["after"]
    stream = world.server.connection(bob).streams[conversation]  # type: ignore[union-attr]
    assert (stream.epoch, stream.delivered) == (new, 1)
    # The sender's own stream moved too.
    frames = alice_peer.received()
    assert of(frames, Command.EPOCH)[0].cursors[0].reset
    assert texts(frames) == ["after"]
    # Late copies of either epoch change nothing.
    stored = world.result(world.store.read(conversation, 0, 10))
    world.server.deliver_local(stored, [bob])  # type: ignore[arg-type]
    late = ChatMessage(99, conversation, 3, alice, "alice", "m3", 0, epoch=old.id)
    world.server.deliver_local([late], [bob])
    world.clock.advance(1)
    assert bob_peer.received() == []
    # Acks count in the new epoch only.
    bob_peer.send(Frame(cmd=Command.ACK, cursors=[Cursor(conversation, 1, old.id)]))
    assert world.server.m_acks_ignored.value == 1
    bob_peer.send(Frame(cmd=Command.ACK, cursors=[Cursor(conversation, 1, new.id)]))
    assert world.server.m_acks_ignored.value == 1


def test_a_store_that_lost_the_last_messages_resumes_from_what_it_kept() -> None:
    world = World()
    alice_peer, alice, bob_peer, bob, conversation = converse(world)
    old = epoch_of(world, conversation)
    # A failover to a replica that had only the first two messages.
    store = world.store
    del store._messages[conversation][2:]
    store._seqs[conversation] = 2
    store._epochs[conversation] = Epoch("replica", old.id, 2)
    world.send(alice_peer, "new 3", bob)
    frames = bob_peer.received()
    assert [f.cmd for f in frames] == [Command.EPOCH, Command.MESSAGE]
    assert list(frames[0].cursors) == [Cursor(conversation, 2, "replica", reset=True)]
    assert texts(frames) == ["new 3"]
    # Messages of the old epoch up to what both share still count.
    kept = world.result(world.store.read(conversation, 0, 10))
    assert [m.epoch for m in kept] == [old.id, old.id, "replica"]  # type: ignore[attr-defined]
    world.server.deliver_local(kept, [bob])  # type: ignore[arg-type]
    assert bob_peer.received() == []


def test_a_resync_after_the_store_lost_messages_moves_the_stream() -> None:
    world = World()
    alice_peer, alice, bob_peer, bob, conversation = converse(world)
    store = world.store
    store._messages[conversation] = []
    store._seqs[conversation] = 0
    del store._epochs[conversation]
    store_from(world, alice, bob, "lost push 1", "lost push 2")
    world.server.streams.resync(world.server.connection(bob))  # type: ignore[arg-type]
    frames = bob_peer.received()
    assert [f.cmd for f in frames] == [Command.EPOCH, Command.MESSAGE]
    assert frames[0].cursors[0].reset and frames[0].cursors[0].seq == 0
    assert texts(frames) == ["lost push 1", "lost push 2"]


def test_a_new_epoch_that_follows_the_streams_keeps_its_position() -> None:
    world = World()
    alice_peer, alice = world.login("alice")
    bob_peer, bob = world.login("bob")
    world.send(alice_peer, "m1", bob)
    conversation = pair_conversation(alice, bob)
    old = epoch_of(world, conversation)
    bob_peer.received()
    # m2 is stored (in the old epoch) but its push is lost; then the store
    # starts an epoch that follows the old one from m2 on (nothing lost).
    store_from(world, alice, bob, "m2")
    world.store._epochs[conversation] = Epoch("next", old.id, 2)
    world.send(alice_peer, "m3", bob)
    frames = bob_peer.received()
    assert [f.cmd for f in frames] == [Command.EPOCH, Command.MESSAGE]
    assert list(frames[0].cursors) == [Cursor(conversation, 1, "next", reset=False)]
    assert texts(frames) == ["m2", "m3"]


def test_a_login_with_a_position_of_a_lost_epoch_is_reset() -> None:
    world = World()
    alice_peer, alice, bob_peer, bob, conversation = converse(world)
    old = epoch_of(world, conversation)
    bob_peer.lose()
    store = world.store
    store._messages[conversation] = []
    store._seqs[conversation] = 0
    del store._epochs[conversation]
    store_from(world, alice, bob, "fresh")
    new = epoch_of(world, conversation)
    again, _ = world.login(
        "bob", user_id=bob, cursors=[Cursor(conversation, 3, old.id)]
    )
    assert again.login is not None
    assert list(again.login.cursors) == [Cursor(conversation, 0, new.id, True)]
    assert again.texts() == ["fresh"]


# Read positions


def test_a_read_reaches_the_readers_other_devices_and_the_peer() -> None:
    world = World(legacy_login=True)
    phone, alice = world.login("alice", device="phone")
    laptop, _ = world.login("alice", user_id=alice, device="laptop")
    bob_peer, bob = world.login("bob", device="phone")
    # Bob's other device is on another server.
    session, _ = world.result(
        world.store.claim_session(bob, "bob", str(THERE), 60, True, device="tablet")
    )  # type: ignore[misc]
    world.result(world.store.activate_session(bob, session.session_id, device="tablet"))
    carol_peer, carol = world.login("carol")
    for text in ("one", "two"):
        world.send(bob_peer, text, alice)
    world.send(carol_peer, "unrelated", alice)
    for peer in (phone, laptop, bob_peer, carol_peer):
        peer.received()
    conversation = pair_conversation(alice, bob)
    phone.send(Frame(cmd=Command.READ, cursors=[Cursor(conversation, 2)]))
    expected = wire.read(alice, conversation, 2)
    assert phone.received() == [expected]
    assert laptop.received() == [expected]
    assert bob_peer.received() == [expected]
    assert carol_peer.received() == []
    assert world.pusher.reads == [
        (str(THERE), ReadEvent(alice, conversation, 2), [bob])
    ]
    assert world.result(world.store.read_positions(conversation, [alice, bob])) == {
        alice: 2,
        bob: 2,
    }
    # Nothing new: nothing passed on.
    phone.send(Frame(cmd=Command.READ, cursors=[Cursor(conversation, 1)]))
    assert phone.received() == [] and bob_peer.received() == []


def test_a_read_in_a_group_reaches_only_the_readers_devices() -> None:
    world = World()
    phone, alice = world.login("alice", device="phone")
    laptop, _ = world.login("alice", user_id=alice, device="laptop")
    bob_peer, bob = world.login("bob")
    world.result(world.store.create_group("team", bob))
    world.result(world.store.join_group("team", alice))
    world.send(bob_peer, "hi team", group="team")
    for peer in (phone, laptop, bob_peer):
        peer.received()
    team = group_conversation("team")
    phone.send(Frame(cmd=Command.READ, cursors=[Cursor(team, 1)]))
    assert phone.received() == laptop.received() == [wire.read(alice, team, 1)]
    assert bob_peer.received() == []


def test_reads_beyond_what_was_sent_or_of_other_conversations_are_ignored() -> None:
    world = World()
    alice_peer, alice, bob_peer, bob, conversation = converse(world)
    bob_peer.send(
        Frame(
            cmd=Command.READ,
            cursors=[
                Cursor(conversation, 4),  # beyond what bob was sent
                Cursor(conversation, 2, "another epoch"),
                Cursor("p:998:999", 1),  # not his
                Cursor(conversation, 0),
            ],
        )
    )
    assert world.server.m_reads_ignored.value == 4
    assert bob_peer.received() == [] and alice_peer.received() == []
    assert world.result(world.store.read_positions(conversation, [bob])) == {bob: 0}


# CIM clients


def test_a_cim_client_never_sees_its_own_private_messages_nor_new_frames() -> None:
    world = World(legacy_login=True)
    legacy, alice = world.legacy_login("alice")
    bob_peer, bob = world.login("bob")
    conversation = pair_conversation(alice, bob)
    # Alice sends through the route's HTTP API: stored, delivered to both.
    stored = store_from(world, alice, bob, "from alice")
    world.result(world.server.delivery.deliver(stored, [alice, bob]))
    assert bob_peer.texts() == ["from alice"]
    world.send(bob_peer, "from bob", alice)
    bob_peer.send(Frame(cmd=Command.READ, cursors=[Cursor(conversation, 2)]))
    frames = legacy.received()
    assert {f.cmd for f in frames} <= wire.CIM_COMMANDS
    assert [(f.cmd, f.req_msg, dict(f.properties)) for f in frames] == [
        (
            Command.MESSAGE,
            "from bob",
            {
                "sendUserId": str(bob),
                "sendUserName": "bob",
                "receiveUserId": str(alice),
            },
        )
    ]
    # Its stream still advanced past its own message, and a heartbeat
    # counts both as received.
    conn = world.server.connection(alice)
    assert conn is not None and conn.streams[conversation].delivered == 2
    legacy.send(Frame(cmd=Command.PING, req_msg="ping"))
    assert legacy.received() == [wire.PONG]
    world.clock.advance(10)
    epoch = epoch_of(world, conversation).id
    assert world.result(world.store.get_cursors(alice)) == {
        conversation: Position(epoch, 2)
    }
    # At its next login, neither comes back.
    legacy.lose(clean=True)
    again, _ = world.legacy_login("alice")
    assert again.received() == []


def test_a_cim_client_gets_its_own_group_messages_as_before() -> None:
    world = World(legacy_login=True)
    legacy, alice = world.legacy_login("alice")
    world.result(world.store.create_group("team", alice))
    stored = world.result(
        world.store.append(
            [NewMessage("g:team", alice, "alice", "hi", group_id="team")]
        )
    )
    world.server.deliver_local(stored, [alice])  # type: ignore[arg-type]
    assert [f.req_msg for f in legacy.received()] == ["hi"]


def test_the_servers_own_address_is_not_pushed_to() -> None:
    world = World()
    alice_peer, alice = world.login("alice")
    bob = world.account("bob")
    world.token(bob, "bob")  # claimed here, never connected
    world.send(alice_peer, "hi", bob)
    assert world.pusher.pushes == []
    assert str(HERE) != str(THERE)


def test_devices_kept_in_login_order_through_replacements_and_losses() -> None:
    """
    A user's devices here are listed in the order they logged in; a
    device's new connection takes its old one's place; a lost one leaves
    the others (first, middle or last), and the user goes with its last.
    """
    world = World()
    phone, alice = world.login("alice", device="phone")
    laptop, _ = world.login("alice", user_id=alice, device="laptop")
    tablet, _ = world.login("alice", user_id=alice, device="tablet")
    server = world.server

    def listed() -> list[tuple[str, Peer]]:
        return [(c.device, c.link) for c in server.devices(alice)]  # type: ignore[misc]

    assert listed() == [
        ("phone", phone.protocol),
        ("laptop", laptop.protocol),
        ("tablet", tablet.protocol),
    ]
    newer, _ = world.login("alice", user_id=alice, device="laptop")
    laptop.lose()
    assert listed() == [
        ("phone", phone.protocol),
        ("laptop", newer.protocol),
        ("tablet", tablet.protocol),
    ]
    assert server.connection(alice, "laptop") is newer.protocol.conn
    assert server.connection(alice, "desktop") is None
    phone.lose()
    assert listed() == [("laptop", newer.protocol), ("tablet", tablet.protocol)]
    tablet.lose()
    assert listed() == [("laptop", newer.protocol)]
    bob_peer, bob = world.login("bob")
    world.send(bob_peer, "still here", alice)
    assert newer.texts() == ["still here"]
    assert sorted((c.user_id, c.device) for c in server.logged_in()) == sorted(
        [(alice, "laptop"), (bob, "")]
    )
    newer.lose()
    assert alice not in server.users
    assert server.devices(alice) == [] and server.connection(alice, "laptop") is None
