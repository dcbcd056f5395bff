"""
The IM server's logic, driven in memory: logins, heartbeats, sends, ordering
and replay.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from cim.codec import encode_varint
from cim.interfaces import StoreError
from cim.message import (
    KICK_REPLACED,
    Command,
    Cursor,
    ErrorCode,
    Frame,
    Position,
    pair_conversation,
)
from cim.store.memory import MemoryStore
from tests.serverkit import HERE, THERE, CountingStore, Peer, World


def epoch_of(world: World, conversation: str) -> str:
    """
    The current epoch id of C{conversation} in C{world}'s store.
    """
    epochs = world.result(world.store.epochs([conversation]))
    return epochs[conversation].id  # type: ignore[index,no-any-return]


def converse(world: World) -> tuple[Peer, int, Peer, int]:
    """
    Alice and Bob, logged in, with a first message from alice to bob
    before bob logged in (their conversation is one of bob's streams).
    """
    alice_peer, alice = world.login("alice")
    bob = world.account("bob")
    world.send(alice_peer, "hello", bob)
    alice_peer.received()
    bob_peer, _ = world.login("bob", user_id=bob)
    assert bob_peer.texts() == ["hello"]
    return alice_peer, alice, bob_peer, bob


def error_of(peer: Peer) -> Frame:
    frames = [f for f in peer.received() if f.cmd == Command.ERROR]
    assert frames, "no error frame"
    return frames[-1]


# Login


def test_login_with_a_good_token() -> None:
    world = World()
    peer, alice = world.login("alice")
    assert not peer.closed
    session = world.result(world.store.get_session(alice))
    assert session.connected and session.server == str(HERE)  # type: ignore[attr-defined]
    assert world.result(world.store.online_users()) == [(alice, "alice")]


def test_login_with_a_wrong_token_is_refused() -> None:
    world = World()
    alice = world.account("alice")
    world.token(alice, "alice")
    peer = Peer(world.server)
    peer.send(
        Frame(
            cmd=Command.LOGIN_REQUEST, request_id=alice, req_msg="alice", token="nope"
        )
    )
    error = error_of(peer)
    assert error.error_code == ErrorCode.BAD_TOKEN
    assert peer.closed
    assert world.result(world.store.online_users()) == []


def test_login_with_another_users_token_is_refused() -> None:
    world = World()
    alice = world.account("alice")
    bob = world.account("bob")
    token = world.token(bob, "bob")
    peer = Peer(world.server)
    peer.send(
        Frame(cmd=Command.LOGIN_REQUEST, request_id=alice, req_msg="alice", token=token)
    )
    assert "another user" in error_of(peer).error_reason
    assert peer.closed


def test_login_with_a_token_for_another_server_is_refused() -> None:
    world = World()
    alice = world.account("alice")
    token = world.token(alice, "alice", server=THERE)
    peer = Peer(world.server)
    peer.send(
        Frame(cmd=Command.LOGIN_REQUEST, request_id=alice, req_msg="alice", token=token)
    )
    assert "another server" in error_of(peer).error_reason
    assert peer.closed


def test_expired_token_is_refused() -> None:
    world = World()
    alice = world.account("alice")
    token = world.token(alice, "alice")
    world.clock.advance(3601)
    peer = Peer(world.server)
    peer.send(
        Frame(cmd=Command.LOGIN_REQUEST, request_id=alice, req_msg="alice", token=token)
    )
    assert error_of(peer).error_code == ErrorCode.BAD_TOKEN
    assert peer.closed


def test_token_replayed_after_logout_is_refused() -> None:
    world = World()
    alice = world.account("alice")
    token = world.token(alice, "alice")
    peer = Peer(world.server)
    login = Frame(
        cmd=Command.LOGIN_REQUEST, request_id=alice, req_msg="alice", token=token
    )
    peer.send(login)
    assert peer.received()[0].cmd == Command.LOGIN_RESPONSE
    peer.lose()
    again = Peer(world.server)
    again.send(login)
    assert error_of(again).error_code == ErrorCode.BAD_TOKEN


def test_missing_token_is_refused_without_legacy_mode() -> None:
    world = World()
    alice = world.account("alice")
    world.token(alice, "alice")
    peer = Peer(world.server)
    peer.send(Frame(cmd=Command.LOGIN_REQUEST, request_id=alice, req_msg="alice"))
    assert "token is required" in error_of(peer).error_reason
    assert peer.closed


def test_legacy_login_for_a_session_assigned_here() -> None:
    world = World(legacy_login=True)
    alice = world.account("alice")
    world.token(alice, "alice")  # the route assigned alice to this server
    peer = Peer(world.server)
    peer.send(Frame(cmd=Command.LOGIN_REQUEST, request_id=alice, req_msg="alice"))
    # CIM clients get no login response.
    assert peer.received() == []
    assert not peer.closed
    peer.send(Frame(cmd=Command.PING, req_msg="ping"))
    assert peer.received() == [Frame(cmd=Command.PING, req_msg="pong")]


def test_legacy_login_without_an_assigned_session_is_refused() -> None:
    world = World(legacy_login=True)
    alice = world.account("alice")
    peer = Peer(world.server)
    peer.send(Frame(cmd=Command.LOGIN_REQUEST, request_id=alice, req_msg="alice"))
    # A CIM client could not read an error frame: it is closed.
    assert peer.received() == []
    assert peer.closed


def test_legacy_login_assigned_elsewhere_is_refused() -> None:
    world = World(legacy_login=True)
    alice = world.account("alice")
    world.token(alice, "alice", server=THERE)
    peer = Peer(world.server)
    peer.send(Frame(cmd=Command.LOGIN_REQUEST, request_id=alice, req_msg="alice"))
    assert peer.received() == []
    assert peer.closed
    assert world.result(world.store.get_session(alice)).server == str(THERE)  # type: ignore[attr-defined]


def test_anything_before_login_is_refused() -> None:
    world = World()
    peer = Peer(world.server)
    peer.send(Frame(cmd=Command.MESSAGE, req_msg="hi", receive_user_id=1))
    assert error_of(peer).error_code == ErrorCode.NOT_LOGGED_IN
    assert peer.closed


def test_second_login_of_a_device_kicks_the_first_connection() -> None:
    world = World()
    first, alice = world.login("alice", device="phone")
    second, _ = world.login("alice", user_id=alice, device="phone")
    kicks = [f for f in first.received() if f.cmd == Command.KICK]
    assert [k.error_reason for k in kicks] == [KICK_REPLACED] and first.closed
    first.lose()
    # The old connection's close did not release the new session.
    session = world.result(world.store.get_session(alice, "phone"))
    assert session is not None and session.connected  # type: ignore[attr-defined]
    conn = world.server.connection(alice, "phone")
    assert conn is not None and conn.link is second.protocol
    assert [c.device for c in world.server.devices(alice)] == ["phone"]


# Heartbeats and deadlines


def test_ping_is_answered_with_pong() -> None:
    world = World()
    peer, _ = world.login("alice")
    peer.send(Frame(cmd=Command.PING, req_msg="ping"))
    assert peer.received() == [Frame(cmd=Command.PING, req_msg="pong")]


def test_silent_connection_is_dropped_and_its_session_released() -> None:
    world = World()
    peer, alice = world.login("alice")
    world.clock.advance(20)
    peer.send(Frame(cmd=Command.PING, req_msg="ping"))
    world.clock.pump([5] * 5)  # 25 s after the ping
    assert not peer.closed
    world.clock.pump([5] * 2)
    assert peer.closed
    peer.lose()
    assert world.result(world.store.get_session(alice)) is None


def test_connection_that_never_logs_in_is_dropped() -> None:
    world = World()
    peer = Peer(world.server)
    world.clock.pump([1] * 14)
    assert error_of(peer).error_code == ErrorCode.LOGIN_TIMEOUT
    assert peer.closed


# Bad frames


def test_malformed_frame_gets_an_error_and_close() -> None:
    world = World()
    peer, _ = world.login("alice")
    peer.protocol.dataReceived(b"\x02\xff\xff")
    assert error_of(peer).error_code == ErrorCode.MALFORMED_FRAME
    assert peer.closed


def test_oversized_frame_gets_an_error_and_close() -> None:
    world = World()
    peer, _ = world.login("alice")
    peer.protocol.dataReceived(encode_varint(64 * 1024 + 1))
    error = error_of(peer)
    assert error.error_code == ErrorCode.FRAME_TOO_LONG
    assert "65537" in error.error_reason
    assert peer.closed


def test_unexpected_command_gets_an_error_and_close() -> None:
    world = World()
    peer, _ = world.login("alice")
    peer.send(Frame(cmd=Command.OFFLINE))
    assert error_of(peer).error_code == ErrorCode.UNKNOWN_COMMAND
    assert peer.closed


def test_flood_is_cut_off_without_hurting_others() -> None:
    world = World()
    world.server.rate = 10
    flooder, _ = world.login("flooder")
    calm, _ = world.login("calm")
    for _ in range(25):
        flooder.send(Frame(cmd=Command.PING, req_msg="ping"))
    assert error_of(flooder).error_code == ErrorCode.RATE_LIMITED
    assert flooder.closed
    calm.send(Frame(cmd=Command.PING, req_msg="ping"))
    assert calm.received() == [Frame(cmd=Command.PING, req_msg="pong")]


# Sending and delivery


def test_private_message_is_stored_acknowledged_and_delivered() -> None:
    world = World()
    alice_peer, alice = world.login("alice")
    bob_peer, bob = world.login("bob")
    alice_peer.send(
        Frame(
            cmd=Command.MESSAGE,
            req_msg="hi bob",
            receive_user_id=bob,
            client_msg_id="c1",
        )
    )
    ack, own = alice_peer.received()
    conversation = pair_conversation(alice, bob)
    # A conversation begun since login, from its start: its first message
    # names its epoch (no EPOCH frame).
    assert own.messages[0].epoch == epoch_of(world, conversation)
    assert (ack.cmd, ack.client_msg_id, ack.seq, ack.conversation) == (
        Command.ACK,
        "c1",
        1,
        conversation,
    )
    # The sender gets its own message too (its stream has no hole).
    assert own.cmd == Command.MESSAGE and [m.text for m in own.messages] == ["hi bob"]
    [message] = bob_peer.messages()
    assert (message.text, message.sender_id, message.sender_name, message.seq) == (
        "hi bob",
        alice,
        "alice",
        1,
    )
    assert message.msg_id == ack.msg_id
    stored = world.result(world.store.read(conversation, 0, 10))
    assert [m.text for m in stored] == ["hi bob"]  # type: ignore[attr-defined]


def test_retried_send_is_stored_and_delivered_once() -> None:
    world = World()
    alice_peer, alice = world.login("alice")
    bob_peer, bob = world.login("bob")
    send = Frame(
        cmd=Command.MESSAGE, req_msg="once", receive_user_id=bob, client_msg_id="c1"
    )
    alice_peer.send(send)
    alice_peer.send(send)
    acks = [f for f in alice_peer.received() if f.cmd == Command.ACK]
    assert [a.seq for a in acks] == [1, 1]
    assert [m.text for m in bob_peer.messages()] == ["once"]
    conversation = pair_conversation(alice, bob)
    assert len(world.result(world.store.read(conversation, 0, 10))) == 1  # type: ignore[arg-type]


def test_message_to_an_unknown_user_gets_an_error() -> None:
    world = World()
    alice_peer, _ = world.login("alice")
    alice_peer.send(
        Frame(cmd=Command.MESSAGE, req_msg="hi", receive_user_id=999, client_msg_id="x")
    )
    error = error_of(alice_peer)
    assert error.error_code == ErrorCode.INVALID_ARGUMENT
    assert error.client_msg_id == "x"
    assert not alice_peer.closed


def test_message_without_a_target_gets_an_error() -> None:
    world = World()
    alice_peer, _ = world.login("alice")
    alice_peer.send(Frame(cmd=Command.MESSAGE, req_msg="hi"))
    assert error_of(alice_peer).error_code == ErrorCode.INVALID_ARGUMENT
    assert not alice_peer.closed


def test_offline_receiver_gets_everything_at_login_in_order() -> None:
    world = World()
    alice_peer, _ = world.login("alice")
    bob = world.account("bob")
    for i in range(3):
        alice_peer.send(
            Frame(
                cmd=Command.MESSAGE,
                req_msg=f"m{i}",
                receive_user_id=bob,
                client_msg_id=f"c{i}",
            )
        )
    assert world.pusher.pushes == []
    bob_peer = Peer(world.server)
    bob_peer.send(
        Frame(
            cmd=Command.LOGIN_REQUEST,
            request_id=bob,
            req_msg="bob",
            token=world.token(bob, "bob"),
        )
    )
    frames = bob_peer.received()
    assert frames[0].cmd == Command.LOGIN_RESPONSE
    assert frames[1].cmd == Command.OFFLINE
    assert [m.text for m in frames[1].messages] == ["m0", "m1", "m2"]


def test_login_resumes_after_the_clients_cursor() -> None:
    world = World()
    alice_peer, alice = world.login("alice")
    bob = world.account("bob")
    for i in range(4):
        alice_peer.send(
            Frame(cmd=Command.MESSAGE, req_msg=f"m{i}", receive_user_id=bob)
        )
    conversation = pair_conversation(alice, bob)
    bob_peer, _ = world.login(
        "bob",
        cursors=[Cursor(conversation, 2, epoch_of(world, conversation))],
        user_id=bob,
    )
    assert [m.text for m in bob_peer.messages()] == ["m2", "m3"]


def test_acknowledged_cursor_is_kept_for_a_client_without_one() -> None:
    world = World()
    alice_peer, alice = world.login("alice")
    bob_peer, bob = world.login("bob")
    for i in range(2):
        alice_peer.send(
            Frame(cmd=Command.MESSAGE, req_msg=f"m{i}", receive_user_id=bob)
        )
    assert len(bob_peer.messages()) == 2
    conversation = pair_conversation(alice, bob)
    bob_peer.send(
        Frame(
            cmd=Command.ACK,
            cursors=[Cursor(conversation, 2, epoch_of(world, conversation))],
        )
    )
    bob_peer.lose()
    alice_peer.send(Frame(cmd=Command.MESSAGE, req_msg="m2", receive_user_id=bob))
    again, _ = world.login("bob", user_id=bob)
    assert [m.text for m in again.messages()] == ["m2"]


class SlowReads(MemoryStore):
    """
    A memory store whose reads wait until the test releases them.
    """

    def __init__(self, clock) -> None:  # type: ignore[no-untyped-def]
        super().__init__(clock)
        self.slow = False
        self.reads: list[tuple[Deferred, object]] = []

    def read(self, conversation, after_seq, limit):  # type: ignore[no-untyped-def]
        d = super().read(conversation, after_seq, limit)
        if not self.slow:
            return d
        held: Deferred = Deferred()
        self.reads.append((held, d))
        return held

    def release(self) -> None:
        while self.reads:
            held, d = self.reads.pop(0)
            d.chainDeferred(held)


def test_live_messages_wait_for_the_replay() -> None:
    world = World(store=SlowReads(World().clock))
    store: SlowReads = world.store  # type: ignore[assignment]
    alice_peer, _ = world.login("alice")
    bob = world.account("bob")
    for i in range(3):
        alice_peer.send(
            Frame(cmd=Command.MESSAGE, req_msg=f"old{i}", receive_user_id=bob)
        )
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
    assert bob_peer.received()[0].cmd == Command.LOGIN_RESPONSE
    # While the replay read is in flight, a live message arrives.
    alice_peer.send(Frame(cmd=Command.MESSAGE, req_msg="live", receive_user_id=bob))
    assert bob_peer.messages() == []
    store.release()
    texts = [m.text for m in bob_peer.messages()]
    assert texts == ["old0", "old1", "old2", "live"]


class HeldTokenLogins(CountingStore):
    """
    A memory store that does each L{token_login} at once (as Redis runs
    its script) but, while C{holding}, holds its answer until the test
    releases it (the way back from the store).
    """

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.holding = False
        self.answers: list[tuple[Deferred, object]] = []

    def token_login(self, *args: Any, **kwargs: Any) -> Deferred:  # type: ignore[override]
        done = super().token_login(*args, **kwargs)
        if not self.holding:
            return done
        outcome: list[object] = []
        done.addBoth(outcome.append)
        held: Deferred = Deferred()
        self.answers.append((held, outcome[0]))
        return held

    def answer(self) -> None:
        while self.answers:
            held, outcome = self.answers.pop(0)
            held.callback(outcome)


def _token_login(world: World, user_id: int, name: str, device: str = "") -> Peer:
    peer = Peer(world.server)
    peer.send(
        Frame(
            cmd=Command.LOGIN_REQUEST,
            request_id=user_id,
            req_msg=name,
            token=world.token(user_id, name, device=device),
        )
    )
    return peer


def test_a_token_login_resumes_from_what_its_activation_read() -> None:
    """
    A device's login with a token reads where it resumes in the same store
    call as the activation (L{IStore.token_login}; the memory store's
    does it by calling L{IStore.activate_token} then
    L{IStore.login_reads}): no second read.
    """
    world = World(store_class=CountingStore)
    store: CountingStore = world.store  # type: ignore[assignment]
    alice_peer, alice = world.login("alice")
    bob = world.account("bob")
    alice_peer.send(Frame(cmd=Command.MESSAGE, req_msg="m1", receive_user_id=bob))
    store.count()
    bob_peer = _token_login(world, bob, "bob")
    login_calls = [
        n for n in store.names() if n not in ("claim_session", "issue_token")
    ]
    assert login_calls[:3] == ["token_login", "activate_token", "login_reads"]
    assert login_calls.count("login_reads") == 1
    frames = bob_peer.received()
    assert frames[0].cmd == Command.LOGIN_RESPONSE
    assert [m.text for f in frames[1:] for m in f.messages] == ["m1"]


def test_a_login_reads_again_what_was_delivered_while_its_token_was_checked() -> None:
    """
    A message delivered to a user while the store's answer to its login's
    token is on the way (after the store read where the login resumes, and
    before the connection is bound) is not lost: the login reads again.
    """
    world = World(store_class=HeldTokenLogins)
    store: HeldTokenLogins = world.store  # type: ignore[assignment]
    alice_peer, alice = world.login("alice")
    bob = world.account("bob")
    alice_peer.send(Frame(cmd=Command.MESSAGE, req_msg="m1", receive_user_id=bob))
    store.holding = True
    bob_peer = _token_login(world, bob, "bob")
    assert store.answers, "the answer is held"
    # Stored after the activation read: the delivery finds no connection.
    alice_peer.send(Frame(cmd=Command.MESSAGE, req_msg="m2", receive_user_id=bob))
    store.count()
    store.answer()
    assert "login_reads" in store.names()
    frames = bob_peer.received()
    assert frames[0].cmd == Command.LOGIN_RESPONSE
    assert [m.text for f in frames[1:] for m in f.messages] == ["m1", "m2"]
    # Nothing is left marked.
    assert not world.server._activating and not world.server._missed


def test_a_login_whose_user_got_nothing_meanwhile_reads_once() -> None:
    """
    A delivery to other users while a login's token is checked does not
    make it read again.
    """
    world = World(store_class=HeldTokenLogins)
    store: HeldTokenLogins = world.store  # type: ignore[assignment]
    alice_peer, alice = world.login("alice")
    carol_peer, carol = world.login("carol")
    bob = world.account("bob")
    store.holding = True
    bob_peer = _token_login(world, bob, "bob")
    alice_peer.send(Frame(cmd=Command.MESSAGE, req_msg="hi", receive_user_id=carol))
    assert [m.text for m in carol_peer.messages()] == ["hi"]
    store.count()
    store.answer()
    assert "login_reads" not in store.names()
    assert bob_peer.received()[0].cmd == Command.LOGIN_RESPONSE


def test_a_login_reads_again_after_a_resync_while_its_token_was_checked() -> None:
    """
    A resync of the user (or of everything) while the store's answer to
    its login's token is on the way makes the login read again: what the
    activation read may predate what the resync is for.
    """
    world = World(store_class=HeldTokenLogins)
    store: HeldTokenLogins = world.store  # type: ignore[assignment]
    bob = world.account("bob")
    carol = world.account("carol")
    store.holding = True
    bob_peer = _token_login(world, bob, "bob")
    carol_peer = _token_login(world, carol, "carol")
    assert not world.server.resync(bob)
    assert world.server.resync_all() == 0
    store.count()
    store.answer()
    assert store.names().count("login_reads") == 2
    assert bob_peer.received()[0].cmd == Command.LOGIN_RESPONSE
    assert carol_peer.received()[0].cmd == Command.LOGIN_RESPONSE


def test_two_devices_logging_in_at_once_both_read_again() -> None:
    """
    Two devices of a user log in at once and the user is delivered to
    meanwhile: both logins read again (the mark lasts until the last of
    them is answered).
    """
    world = World(store_class=HeldTokenLogins)
    store: HeldTokenLogins = world.store  # type: ignore[assignment]
    alice_peer, alice = world.login("alice")
    bob = world.account("bob")
    store.holding = True
    phone = _token_login(world, bob, "bob", device="phone")
    tab = _token_login(world, bob, "bob", device="tab")
    alice_peer.send(Frame(cmd=Command.MESSAGE, req_msg="m", receive_user_id=bob))
    held = list(store.answers)
    store.answers = held[:1]
    store.answer()
    assert world.server._missed == {bob}
    store.answers = held[1:]
    store.answer()
    assert not world.server._missed
    for peer in (phone, tab):
        frames = peer.received()
        assert frames[0].cmd == Command.LOGIN_RESPONSE
        assert [m.text for f in frames[1:] for m in f.messages] == ["m"]


def test_a_gap_is_filled_from_the_store() -> None:
    world = World()
    alice_peer, alice, bob_peer, bob = converse(world)
    # Two messages are stored, but only the second one is pushed (the first
    # push went astray): bob must still see both, in order.
    stored = world.result(
        world.server.delivery.append(
            world.server.sender.new_messages(
                world.server.connection(alice),  # type: ignore[arg-type]
                pair_conversation(alice, bob),
                ["first", "second"],
                "",
                receive_user_id=bob,
            )
        )
    )
    world.server.deliver_local(stored[1:], [bob])  # type: ignore[index]
    # It waits a moment for the first one, then reads it from the store.
    assert bob_peer.messages() == []
    world.clock.advance(0.25)
    assert [m.text for m in bob_peer.messages()] == ["first", "second"]
    world.server.deliver_local(stored, [bob])  # type: ignore[arg-type]
    assert bob_peer.messages() == []  # duplicates are dropped


def test_receiver_on_another_server_gets_one_push() -> None:
    world = World()
    alice_peer, _ = world.login("alice")
    bob = world.account("bob")
    session, _ = world.result(
        world.store.claim_session(bob, "bob", str(THERE), 60, True)
    )  # type: ignore[misc]
    world.result(world.store.activate_session(bob, session.session_id))
    alice_peer.send(Frame(cmd=Command.MESSAGE, req_msg="far", receive_user_id=bob))
    # (Alice, connected here, got it here.)
    [(server, messages, users)] = world.pusher.pushes
    assert server == str(THERE) and users == [bob]
    assert [m.text for m in messages] == ["far"]


def test_group_message_reaches_members_only() -> None:
    world = World()
    alice_peer, alice = world.login("alice")
    bob_peer, bob = world.login("bob")
    eve_peer, eve = world.login("eve")
    world.result(world.store.create_group("team", alice))
    world.result(world.store.join_group("team", bob))
    alice_peer.send(Frame(cmd=Command.MESSAGE, req_msg="hello team", group_id="team"))
    assert [f.cmd for f in alice_peer.received()][0] == Command.ACK
    assert [m.text for m in bob_peer.messages()] == ["hello team"]
    assert eve_peer.messages() == []
    eve_peer.send(Frame(cmd=Command.MESSAGE, req_msg="let me in", group_id="team"))
    assert error_of(eve_peer).error_code == ErrorCode.NOT_A_MEMBER


def test_shutdown_kicks_clients_and_releases_sessions() -> None:
    world = World()
    peer, alice = world.login("alice")
    world.result(world.server.stop())
    assert [f.cmd for f in peer.received()] == [Command.KICK]
    assert peer.closed
    assert world.result(world.store.get_session(alice)) is None


def test_group_joined_while_connected_arrives_whole_and_in_order() -> None:
    world = World()
    alice_peer, alice = world.login("alice")
    bob_peer, bob = world.login("bob")
    world.result(world.store.create_group("late", alice))
    alice_peer.send(Frame(cmd=Command.MESSAGE, req_msg="before bob", group_id="late"))
    # Bob joins as the route does it: from the last message on.
    world.result(world.store.set_read(bob, "g:late", 1))
    world.result(world.store.join_group("late", bob, 1))
    from cim.interfaces import NewMessage

    stored = world.result(
        world.store.append(
            [
                NewMessage("g:late", alice, "alice", t, group_id="late")
                for t in ("one", "two")
            ]
        )
    )
    # The second arrives first (it came through another server).
    world.server.deliver_local(stored[1:], [bob])  # type: ignore[index]
    world.server.deliver_local(stored[:1], [bob])  # type: ignore[index]
    assert [m.text for m in bob_peer.messages()] == ["one", "two"]


def test_out_of_order_arrivals_are_put_in_order_without_a_read() -> None:
    world = World(store=SlowReads(World().clock))
    store: SlowReads = world.store  # type: ignore[assignment]
    alice_peer, alice, bob_peer, bob = converse(world)
    from cim.interfaces import NewMessage

    stored = world.result(
        world.store.append(
            [
                NewMessage(
                    pair_conversation(alice, bob),
                    alice,
                    "alice",
                    t,
                    receive_user_id=bob,
                )
                for t in "abc"
            ]
        )
    )
    store.slow = True
    world.server.deliver_local(stored[2:], [bob])  # type: ignore[index]
    world.server.deliver_local(stored[1:2], [bob])  # type: ignore[index]
    assert bob_peer.messages() == []
    world.server.deliver_local(stored[:1], [bob])  # type: ignore[index]
    assert [m.text for m in bob_peer.messages()] == ["a", "b", "c"]
    world.clock.advance(1)
    assert store.reads == []
    assert bob_peer.messages() == []


def test_acknowledged_cursors_are_saved_by_the_sweep() -> None:
    world = World()
    alice_peer, alice = world.login("alice")
    bob_peer, bob = world.login("bob", device="phone")
    alice_peer.send(Frame(cmd=Command.MESSAGE, req_msg="m", receive_user_id=bob))
    conversation = pair_conversation(alice, bob)
    epoch = epoch_of(world, conversation)
    bob_peer.send(Frame(cmd=Command.ACK, cursors=[Cursor(conversation, 1, epoch)]))
    assert world.result(world.store.get_cursors(bob, "phone")) == {}
    world.clock.advance(10)
    assert world.result(world.store.get_cursors(bob, "phone")) == {
        conversation: Position(epoch, 1)
    }
    assert world.result(world.store.get_cursors(bob)) == {}


class _StoreAway(MemoryStore):
    """
    A store whose session reads fail, as when Redis is away.
    """

    away = False

    def get_session(self, user_id: int, device: str = "") -> Deferred:  # type: ignore[override]
        if self.away:
            return fail(StoreError("Redis is away"))
        return super().get_session(user_id, device)

    def activate_token(self, *args: Any, **kwargs: Any) -> Deferred:  # type: ignore[override]
        if self.away:
            return fail(StoreError("Redis is away"))
        return super().activate_token(*args, **kwargs)


def test_a_login_while_the_store_is_away_is_told_to_come_back() -> None:
    world = World()
    store = _StoreAway(world.clock)
    world = World(store=store)
    alice = world.account("alice")
    token = world.token(alice, "alice")
    store.away = True
    peer = Peer(world.server)
    peer.send(
        Frame(cmd=Command.LOGIN_REQUEST, request_id=alice, req_msg="alice", token=token)
    )
    error = error_of(peer)
    assert (error.error_code, peer.closed) == (ErrorCode.STORE_ERROR, True)
    assert "log in again" in error.error_reason
    store.away = False
    peer, _ = world.login("alice", user_id=alice)
    assert not peer.closed
