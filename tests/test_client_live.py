"""
Whole clients against a real route and IM servers running in the test
reactor on the memory store: private conversations with both sides, every
device of a user, groups, read state, reconnects and restarts.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from cim.client.cursors import state_path
from cim.client.devicekeys import DeviceKeys
from cim.client.devices import account_tag
from cim.client.keys import AccountKeys, HeldKey
from cim.client.library import (
    Client,
    ClientClosed,
    ClientState,
    LoginError,
    RouteError,
    SendError,
    User,
)
from cim.message import ErrorCode, Position, pair_conversation
from cim.names import name_key
from tests.clientkit import Harness, take_messages, wait_state
from tests.kit.wait import wait_until, within

# Against a real route and IM server (memory store)


@pytest.fixture
def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest_twisted.async_yield_fixture
async def harness(reactor: Any, tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(reactor, tmp_path)
    try:
        await h.start()
        yield h
    finally:
        await h.stop()


@pytest_twisted.async_yield_fixture
async def two_servers(reactor: Any, tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(reactor, tmp_path)
    try:
        await h.start(servers=2)
        yield h
    finally:
        await h.stop()


@pytest_twisted.ensureDeferred
async def test_private_chat_both_ways(reactor: Any, harness: Harness) -> None:
    alice, alice_events = await harness.logged_in("alice")
    bob, bob_events = await harness.logged_in("bob")
    assert alice.state == bob.state == ClientState.READY
    assert [s for s, _ in alice_events.log] == [
        ClientState.CONNECTING,
        ClientState.READY,
    ]
    assert bob.user_id is not None and alice.user_id is not None
    pair = pair_conversation(alice.user_id, bob.user_id)
    ack = await within(reactor, alice.send_private(bob.user_id, "hi bob :smile:"))
    assert (ack.conversation, ack.seq) == (pair, 1)
    [got] = await take_messages(reactor, bob_events, 1)
    assert (got.text, got.sender_name, got.msg_id, got.conversation) == (
        "hi bob :smile:",
        "alice",
        ack.msg_id,
        pair,
    )
    assert got.client_msg_id == ack.client_msg_id
    # Alice's own message comes back to her, known as sent here.
    [echo] = await take_messages(reactor, alice_events, 1)
    assert (echo.msg_id, echo.sender_id) == (ack.msg_id, alice.user_id)
    assert alice.sent_here(echo.client_msg_id)
    assert not bob.sent_here(echo.client_msg_id)
    await within(reactor, bob.send_private(alice.user_id, "hi alice"))
    [back] = await take_messages(reactor, alice_events, 1)
    assert (back.text, back.sender_id, back.conversation, back.seq) == (
        "hi alice",
        bob.user_id,
        pair,
        2,
    )
    assert await alice.online_users() == [
        User(alice.user_id, "alice"),
        User(bob.user_id, "bob"),
    ]
    # Both sides, in order, from either user.
    history = await alice.history(peer=bob.user_id)
    assert [m.text for m in history] == ["hi bob :smile:", "hi alice"]
    assert [m.text for m in await bob.history(pair, before_seq=2)] == ["hi bob :smile:"]
    # Bob acknowledged: the server saved his device's cursor.
    await wait_until(
        reactor,
        lambda: (
            harness.servers[0].server.sweep()  # type: ignore[union-attr]
            or harness.store._cursors.get((bob.user_id, bob.device), {}).get(pair)
        ),
        "bob's cursor to be saved",
    )


@pytest_twisted.ensureDeferred
async def test_read_receipts_and_unread_counts(reactor: Any, harness: Harness) -> None:
    alice, alice_events = await harness.logged_in("alice")
    bob, bob_events = await harness.logged_in("bob")
    assert alice.user_id is not None and bob.user_id is not None
    pair = pair_conversation(alice.user_id, bob.user_id)
    for i in range(3):
        await within(reactor, alice.send_private(bob.user_id, f"m{i}"))
    await take_messages(reactor, bob_events, 3)
    [info] = await bob.conversations()
    assert (info.conversation, info.unread, info.peer_id) == (pair, 3, alice.user_id)
    bob.mark_read(pair, 2)
    assert bob.unread(pair) == 1
    # Alice's devices hear of it: a read receipt.
    reads = []
    while (bob.user_id, pair, 2) not in reads:
        reads.append(await within(reactor, alice_events.reads.get()))
    assert alice.read_position(pair, bob.user_id) == 2
    await within(reactor, bob.send_private(alice.user_id, "read them"))
    await take_messages(reactor, bob_events, 1)
    assert bob.unread(pair) == 0


@pytest_twisted.ensureDeferred
async def test_every_device_of_a_user_gets_every_message(
    reactor: Any, harness: Harness
) -> None:
    alice, _ = await harness.logged_in("alice")
    phone, phone_events = await harness.logged_in("bob", device="phone")
    laptop, laptop_events = harness.client("bob-laptop", device="laptop")
    await within(reactor, laptop.login("bob", account_key=phone.account_key))
    assert phone.ready and laptop.ready
    assert alice.user_id is not None and phone.user_id is not None
    await within(reactor, alice.send_private(phone.user_id, "to both"))
    for events in (phone_events, laptop_events):
        [got] = await take_messages(reactor, events, 1)
        assert got.text == "to both"
    # What one device sends, the other shows as its user's own.
    await within(reactor, phone.send_private(alice.user_id, "from the phone"))
    [mine] = await take_messages(reactor, laptop_events, 1)
    assert mine.sender_id == phone.user_id
    assert not laptop.sent_here(mine.client_msg_id)


@pytest_twisted.ensureDeferred
async def test_group_chat_both_ways(reactor: Any, harness: Harness) -> None:
    alice, alice_events = await harness.logged_in("alice")
    bob, bob_events = await harness.logged_in("bob")
    await alice.create_group("dev")
    with pytest.raises(RouteError) as refused:
        await bob.join_group("dev")
    assert refused.value.code == "4010"
    assert await alice.invite_to_group("dev", bob.user_id)
    assert await bob.join_group("dev")
    assert not await bob.join_group("dev")
    assert await bob.my_groups() == ["dev"]
    assert [m.user_name for m in await alice.group_members("dev")] == ["alice", "bob"]
    await within(reactor, alice.send_group("dev", "hello dev"))
    await within(reactor, bob.send_group("dev", "hello alice"))
    for events in (alice_events, bob_events):
        got = await take_messages(reactor, events, 2)
        assert [(m.sender_name, m.text, m.group_id, m.seq) for m in got] == [
            ("alice", "hello dev", "dev", 1),
            ("bob", "hello alice", "dev", 2),
        ]
    history = await alice.history("g:dev")
    assert [m.text for m in history] == ["hello dev", "hello alice"]
    assert await bob.leave_group("dev")
    with pytest.raises(SendError) as e:
        await within(reactor, bob.send_group("dev", "still there?"))
    assert e.value.code == ErrorCode.NOT_A_MEMBER
    with pytest.raises(RouteError):
        await alice.create_group("dev")


@pytest_twisted.ensureDeferred
async def test_managing_a_group(reactor: Any, harness: Harness) -> None:
    alice, _ = await harness.logged_in("alice")
    bob, _ = await harness.logged_in("bob")
    carol, _ = await harness.logged_in("carol")
    await alice.create_group("club", policy="approval", history="full")
    info = await alice.group_info("club")
    assert (info.owner_id, info.policy, info.history) == (
        alice.user_id,
        "approval",
        "full",
    )
    assert (info.members, info.member, info.joined_at) == (1, True, 0)
    asked = await bob.join_group("club")
    assert (bool(asked), asked.pending) == (False, True)
    await carol.join_group("club")
    assert await alice.join_requests("club") == [
        User(bob.user_id, "bob"),
        User(carol.user_id, "carol"),
    ]
    await alice.approve_request("club", bob.user_id)
    await alice.reject_request("club", carol.user_id)
    assert await alice.join_requests("club") == []
    assert (await bob.group_info("club")).member
    with pytest.raises(RouteError) as refused:
        await bob.remove_member("club", alice.user_id)
    assert refused.value.code == "4010"
    with pytest.raises(RouteError) as refused:
        await alice.leave_group("club")
    assert refused.value.code == "4090"
    await alice.transfer_group("club", bob.user_id)
    assert await alice.leave_group("club")
    assert await bob.remove_member("club", alice.user_id) is False
    assert await bob.invite_to_group("club", carol.user_id)
    assert await carol.join_group("club")
    assert await bob.remove_member("club", carol.user_id)
    assert (await bob.group_info("club")).members == 1


@pytest_twisted.ensureDeferred
async def test_broadcast(reactor: Any, harness: Harness) -> None:
    alice, _ = await harness.logged_in("alice")
    bob, bob_events = await harness.logged_in("bob")
    await alice.broadcast("hello everybody")
    [got] = await take_messages(reactor, bob_events, 1)
    assert (got.text, got.conversation, got.sender_name) == (
        "hello everybody",
        "all",
        "alice",
    )


@pytest_twisted.ensureDeferred
async def test_send_to_nobody_fails(reactor: Any, harness: Harness) -> None:
    alice, alice_events = await harness.logged_in("alice")
    with pytest.raises(SendError) as e:
        await within(reactor, alice.send_private(9999, "anyone?"))
    assert e.value.code == ErrorCode.INVALID_ARGUMENT
    assert alice.state == ClientState.READY
    assert alice_events.messages.pending == []


@pytest_twisted.ensureDeferred
async def test_passwords(reactor: Any, harness: Harness) -> None:
    client, _ = harness.client("carol")
    carol = await client.register("carol", "s3cret-pw")
    with pytest.raises(RouteError) as taken:
        await client.register("carol")
    assert taken.value.code == "4090"
    with pytest.raises(LoginError) as wrong:
        await within(reactor, client.login("carol", "wrong-pw"))
    assert wrong.value.code == "4090"
    with pytest.raises(LoginError) as wrong:
        await within(reactor, client.login("carol", "wrong-pw", user_id=carol.user_id))
    assert wrong.value.code == "9100"
    assert client.state == ClientState.FAILED
    with pytest.raises(LoginError) as missing:
        await within(reactor, client.login("carol", user_id=carol.user_id))
    assert missing.value.code == "9100" and "password" in missing.value.reason
    await within(reactor, client.login("carol", "s3cret-pw"))
    assert client.ready


@pytest_twisted.ensureDeferred
async def test_cim_style_login_with_user_id(reactor: Any, harness: Harness) -> None:
    first, _ = harness.client("dave")
    account = await first.register("dave")
    assert account.account_key and "account_key" not in repr(account)
    client, _ = harness.client("dave2")
    with pytest.raises(LoginError) as e:
        await within(reactor, client.login("not-dave", user_id=account.user_id))
    assert e.value.code == "9100"
    # The id and name are not enough: the key is needed (given here).
    with pytest.raises(LoginError) as e:
        await within(reactor, client.login("dave", user_id=account.user_id))
    assert e.value.code == "9100" and "account key" in e.value.reason
    await within(
        reactor,
        client.login("dave", user_id=account.user_id, account_key=account.account_key),
    )
    assert client.user_id == account.user_id


@pytest_twisted.ensureDeferred
async def test_the_account_key_is_kept_in_the_state_folder(
    reactor: Any, harness: Harness, tmp_path: Path
) -> None:
    erin, _ = await harness.logged_in("erin")
    key = erin.account_key
    assert key
    await erin.close()
    # The same state folder (a restarted client): logged in again, no
    # password asked, the same account; the name by its key.
    again, _ = harness.client("erin")
    await within(reactor, again.login("Erin"))
    assert (again.user_id, again.account_key) == (erin.user_id, key)
    await again.close()
    kept = (harness.state_root / "erin" / "account-keys.json").stat()
    assert kept.st_mode & 0o077 == 0
    # Another state folder has no key: the name is taken, the id unknown.
    other, _ = harness.client("not-erin")
    with pytest.raises(LoginError) as e:
        await within(reactor, other.login("erin"))
    assert e.value.code == "4090"
    assert other.user_id is None
    # The same folder for another route keeps that route's keys apart.
    keys = AccountKeys(harness.state_root / "erin")
    assert keys.get("http://127.0.0.1:1", "erin") is None
    assert keys.get(harness.route_url + "/", "ERIN") == HeldKey(erin.user_id, key)


@pytest_twisted.ensureDeferred
async def test_the_device_key_is_kept_in_the_state_folder(
    reactor: Any, harness: Harness
) -> None:
    folder = harness.state_root / "fay"
    fay, _ = harness.client("fay")
    await within(reactor, fay.login("fay", "fay-password"))
    device = fay.device
    first = DeviceKeys(folder).get(harness.route_url, "fay")
    assert first is not None and (first.user_id, first.device) == (fay.user_id, device)
    assert first.key not in repr(first)
    assert (folder / "device-keys.json").stat().st_mode & 0o077 == 0
    # The password is kept nowhere in the folder.
    for path in folder.rglob("*"):
        if path.is_file():
            assert "fay-password" not in path.read_text("utf-8", "replace"), path
    await fay.close()
    # Restarted without the password: the device key logs the same device of
    # the same account in (no registration), and the next key is kept.
    again, events = harness.client("fay")
    await within(reactor, again.login("FAY"))
    assert (again.user_id, again.device) == (fay.user_id, device)
    second = DeviceKeys(folder).get(harness.route_url, "fay")
    assert second is not None and second.key != first.key
    # The key used stopped working.
    assert fay.user_id is not None
    with pytest.raises(RouteError) as e:
        await within(
            reactor,
            again.route.login(fay.user_id, "fay", device=device, device_key=first.key),
        )
    assert e.value.code == "9100"
    # A reconnect (no password in memory) logs in with the key, and keeps
    # the next one.
    harness.drop(again)
    await wait_state(reactor, events, ClientState.RECONNECTING)
    await wait_state(reactor, events, ClientState.READY)
    third = DeviceKeys(folder).get(harness.route_url, "fay")
    assert third is not None and third.key not in (first.key, second.key)
    # Logging off ends the key, at the route and in the folder: the password
    # is needed again.
    await again.close(log_off=True)
    assert DeviceKeys(folder).get(harness.route_url, "fay") is None
    with pytest.raises(RouteError) as e:
        await within(
            reactor,
            again.route.login(fay.user_id, "fay", device=device, device_key=third.key),
        )
    assert e.value.code == "9100"
    last, _ = harness.client("fay")
    with pytest.raises(LoginError) as refused:
        await within(reactor, last.login("fay"))
    assert refused.value.code == "4090"


@pytest_twisted.ensureDeferred
async def test_a_refused_device_key_is_forgotten(
    reactor: Any, harness: Harness
) -> None:
    folder = harness.state_root / "gil"
    gil, _ = harness.client("gil")
    await within(reactor, gil.login("gil", "gil-password"))
    held = DeviceKeys(folder).get(harness.route_url, "gil")
    assert held is not None
    await gil.close()
    # A stale key (another copy of the folder used it, say).
    DeviceKeys(folder).put(harness.route_url, "gil", held.user_id, held.device, "old")
    again, _ = harness.client("gil")
    with pytest.raises(LoginError) as e:
        await within(reactor, again.login("gil"))
    assert e.value.code == "9100"
    assert DeviceKeys(folder).get(harness.route_url, "gil") is None
    # The password logs in again, and a new key is kept.
    third, _ = harness.client("gil")
    await within(reactor, third.login("gil", "gil-password"))
    assert DeviceKeys(folder).get(harness.route_url, "gil") is not None


@pytest_twisted.ensureDeferred
async def test_cursors_across_a_reconnect(reactor: Any, harness: Harness) -> None:
    alice, _ = await harness.logged_in("alice")
    bob, bob_events = await harness.logged_in("bob", backoff_base=0.3)
    assert bob.user_id is not None and alice.user_id is not None
    for i in range(3):
        await within(reactor, alice.send_private(bob.user_id, f"before {i}"))
    await take_messages(reactor, bob_events, 3)
    harness.drop(bob)
    await wait_state(reactor, bob_events, ClientState.RECONNECTING)
    # Sent while Bob is away.
    for i in range(3):
        await within(reactor, alice.send_private(bob.user_id, f"during {i}"))
    await wait_state(reactor, bob_events, ClientState.READY)
    for i in range(3):
        await within(reactor, alice.send_private(bob.user_id, f"after {i}"))
    got = await take_messages(reactor, bob_events, 6)
    assert [m.text for m in got] == [f"during {i}" for i in range(3)] + [
        f"after {i}" for i in range(3)
    ]
    assert [m.seq for m in got] == list(range(4, 10))
    # Nothing more (no duplicate) is queued: the next message is the next one.
    await within(reactor, alice.send_private(bob.user_id, "last"))
    [last] = await take_messages(reactor, bob_events, 1)
    assert (last.text, last.seq) == ("last", 10)
    assert bob.cursors.get(pair_conversation(alice.user_id, bob.user_id)) == 10


@pytest_twisted.ensureDeferred
async def test_sends_resent_after_a_reconnect(reactor: Any, harness: Harness) -> None:
    alice, alice_events = await harness.logged_in("alice")
    bob, bob_events = await harness.logged_in("bob")
    assert bob.user_id is not None and alice.user_id is not None
    # Alice's send reaches the server, but she never reads its ack.
    assert alice._protocol is not None
    alice._protocol.transport.pauseProducing()  # type: ignore[union-attr]
    first = alice.send_private(bob.user_id, "stored once")
    [got] = await take_messages(reactor, bob_events, 1)
    alice._protocol.abort("test: the connection died")
    await wait_state(reactor, alice_events, ClientState.RECONNECTING)
    # A send while reconnecting waits for the new connection.
    second = alice.send_private(bob.user_id, "sent while away")
    ack1 = await within(reactor, first)
    ack2 = await within(reactor, second)
    assert ack1.msg_id == got.msg_id and ack1.seq == 1
    assert ack2.seq == 2
    pair = pair_conversation(alice.user_id, bob.user_id)
    stored = await harness.store.read(pair, 0, 10)
    assert [m.text for m in stored] == ["stored once", "sent while away"]
    # Bob sees each once.
    [next_one] = await take_messages(reactor, bob_events, 1)
    assert next_one.text == "sent while away"
    await within(reactor, alice.send_private(bob.user_id, "third"))
    [third] = await take_messages(reactor, bob_events, 1)
    assert third.text == "third"


@pytest_twisted.ensureDeferred
async def test_cursor_file_resumes_after_a_restart(
    reactor: Any, harness: Harness, tmp_path: Path
) -> None:
    alice, _ = await harness.logged_in("alice")
    bob, bob_events = await harness.logged_in("bob")
    bob_id = bob.user_id
    assert bob_id is not None and alice.user_id is not None
    pair = pair_conversation(alice.user_id, bob_id)
    for i in range(2):
        await within(reactor, alice.send_private(bob_id, f"first {i}"))
    await take_messages(reactor, bob_events, 2)
    await within(reactor, bob.close())
    account = account_tag(bob.account_key or name_key("bob"))
    path = state_path(tmp_path / "bob", bob_id, "", bob.route.url, account)
    saved = json.loads(path.read_text())["conversations"][pair]
    assert (saved["seq"], saved["seen"]) == (2, {saved["epoch"]: 2})
    for i in range(2):
        await within(reactor, alice.send_private(bob_id, f"second {i}"))
    # Only the client's file knows what Bob saw: forget the server's copy.
    harness.store._cursors.pop((bob_id, bob.device), None)
    harness.store._read.pop(bob_id, None)
    again, again_events = await harness.logged_in("bob")
    assert again.device == bob.device
    got = await take_messages(reactor, again_events, 2)
    assert [m.text for m in got] == ["second 0", "second 1"]
    assert again.cursors.position(pair) == Position(saved["epoch"], 4)
    await within(reactor, alice.send_private(bob_id, "third"))
    [third] = await take_messages(reactor, again_events, 1)
    assert third.text == "third"


@pytest_twisted.ensureDeferred
async def test_dead_server_is_detected(reactor: Any, harness: Harness) -> None:
    alice, _ = await harness.logged_in("alice")
    bob, bob_events = await harness.logged_in(
        "bob", heartbeat_interval=0.1, pong_timeout=0.3, idle_timeout=2.0
    )
    assert bob.user_id is not None
    # The server stops reading Bob's connection: no more pongs.
    conn = harness.connection_of(bob)
    conn.link.transport.pauseProducing()
    reason = await wait_state(reactor, bob_events, ClientState.RECONNECTING)
    assert "no pong" in reason
    await wait_state(reactor, bob_events, ClientState.READY)
    await within(reactor, alice.send_private(bob.user_id, "still there?"))
    [got] = await take_messages(reactor, bob_events, 1)
    assert got.text == "still there?"


@pytest_twisted.ensureDeferred
async def test_server_shutdown_moves_clients(
    reactor: Any, two_servers: Harness
) -> None:
    alice, _ = await two_servers.logged_in("alice")
    bob, bob_events = await two_servers.logged_in("bob")
    assert bob.user_id is not None
    assert alice.server != bob.server
    await within(reactor, alice.send_private(bob.user_id, "one"))
    await take_messages(reactor, bob_events, 1)
    old = two_servers.server_of(bob)
    await old.stopService()
    await wait_state(reactor, bob_events, ClientState.RECONNECTING)
    await within(reactor, alice.send_private(bob.user_id, "two"))
    await wait_state(reactor, bob_events, ClientState.READY)
    assert bob.server == alice.server
    await within(reactor, alice.send_private(bob.user_id, "three"))
    got = await take_messages(reactor, bob_events, 2)
    assert [m.text for m in got] == ["two", "three"]


@pytest_twisted.ensureDeferred
async def test_newer_login_replaces_the_session(reactor: Any, harness: Harness) -> None:
    first, first_events = harness.client("erin", device="desk")
    await within(reactor, first.login("erin", "pw-of-erin"))
    # Another device: both stay.
    other, _ = harness.client("erin-3", device="phone")
    await within(reactor, other.login("erin", "pw-of-erin"))
    # The same device again (a copy of its state elsewhere): the old goes.
    second, _ = harness.client("erin-2", device="desk")
    await within(reactor, second.login("erin", "pw-of-erin"))
    reason = await wait_state(reactor, first_events, ClientState.FAILED)
    assert "replaced" in reason and "not reconnecting" in reason
    assert second.ready and other.ready


@pytest_twisted.ensureDeferred
async def test_close(reactor: Any, harness: Harness) -> None:
    alice, alice_events = await harness.logged_in("alice", close_timeout=0.2)
    bob, _ = await harness.logged_in("bob")
    assert alice._protocol is not None
    alice._protocol.transport.pauseProducing()  # type: ignore[union-attr]
    alice._protocol.heartbeat.stop()
    # Unacknowledged when the client closes.
    pending = alice.send_private(9999, "lost")
    await within(reactor, alice.close())
    with pytest.raises(ClientClosed):
        await pending
    assert alice.state == ClientState.CLOSED
    assert alice_events.log[-1] == (ClientState.CLOSED, "closed")
    assert [u.user_name for u in await bob.online_users()] == ["bob"]
    with pytest.raises(ClientClosed):
        await alice.send_private(2, "after close")
    await within(reactor, alice.close())  # twice is fine


@pytest_twisted.ensureDeferred
async def test_close_waits_for_acks(reactor: Any, harness: Harness) -> None:
    alice, _ = await harness.logged_in("alice")
    bob, bob_events = await harness.logged_in("bob")
    assert bob.user_id is not None
    sends = [alice.send_private(bob.user_id, f"bye {i}") for i in range(5)]
    await within(reactor, alice.close())
    acks = [await send for send in sends]
    assert [a.seq for a in acks] == [1, 2, 3, 4, 5]
    got = await take_messages(reactor, bob_events, 5)
    assert [m.text for m in got] == [f"bye {i}" for i in range(5)]


@pytest_twisted.ensureDeferred
async def test_unreachable_route(reactor: Any, tmp_path: Path) -> None:
    from tests.kit.net import refusing_port

    with refusing_port() as port:
        client = Client(reactor, f"http://127.0.0.1:{port}", state_dir=tmp_path)
        try:
            with pytest.raises(LoginError) as e:
                await within(reactor, client.login("nobody"))
            assert "cannot reach the route" in e.value.reason
        finally:
            await within(reactor, client.close())
