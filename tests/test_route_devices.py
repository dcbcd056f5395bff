"""
The route on issue 14's model: a session per device (C{/login}'s
C{device}, C{--max-devices}, kicks), two-sided private conversations
(C{/p2pRoute}, C{/history} by C{peerId}, paging back with C{beforeSeq}),
read positions (C{/conversations}, C{/read}, C{/readPositions}), the
user's devices (C{/devices}) and logging off one device (C{/offLine}).
Driven in memory with the L{Route} harness of C{tests/test_route.py}.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from twisted.python import usage

from cim import standalone
from cim.delivery import Delivery
from cim.interfaces import HeldSession
from cim.limits import MAX_DEVICES
from cim.message import KICK_DEVICE_LIMIT, KICK_REPLACED, pair_conversation
from cim.route import tap
from tests.test_route import SECRET, Route, result


@pytest.fixture
def route() -> Route:
    return Route()


def connect(route: Route, user_id: int, device: str = "") -> None:
    """
    What the device's IM server does when its TCP login arrives.
    """
    session = result(route.store.get_session(user_id, device))
    assert result(
        route.store.activate_session(user_id, session.session_id, 86400.0, device)
    )


def on(route: Route, user_id: int, name: str, device: str) -> str:
    """
    Log C{device} of a registered user in and connect it; @return: its
    token.
    """
    data = route.login(user_id, name, device=device)
    assert data["device"] == device
    connect(route, user_id, device)
    token: str = data["token"]
    return token


def devices(route: Route, user_id: int) -> list[str]:
    return [s.device for s in result(route.store.user_sessions(user_id))]


# Logins per device


def test_two_devices_of_one_user_both_hold_sessions(route: Route) -> None:
    alice = route.register("alice")
    phone = on(route, alice, "alice", "phone")
    laptop = on(route, alice, "alice", "laptop")
    assert devices(route, alice) == ["laptop", "phone"]
    assert route.pusher.kicks == []
    # Each token stands for its own device, and both are valid.
    for token, device in [(phone, "phone"), (laptop, "laptop")]:
        info = result(route.store.verify_token(token))
        assert (info.user_id, info.device) == (alice, device)
    listed = route.ok("/devices", {"userId": alice}, token=phone)
    assert [(d["device"], d["connected"]) for d in listed] == [
        ("laptop", True),
        ("phone", True),
    ]
    assert {d["server"] for d in listed} <= {
        str(route.session_of(alice, "phone").server),
        str(route.session_of(alice, "laptop").server),
    }
    assert all(d["active"] == route.clock.seconds() for d in listed)
    # The user is online once.
    assert route.ok("/onlineUser", method="GET") == [
        {"userId": alice, "userName": "alice"}
    ]


def test_the_same_device_again_replaces_and_kicks(route: Route) -> None:
    alice = route.register("alice")
    old_token = on(route, alice, "alice", "phone")
    on(route, alice, "alice", "laptop")
    old = route.session_of(alice, "phone")
    new_token = on(route, alice, "alice", "phone")
    assert route.pusher.kicks == [(old.server, alice, old.session_id, KICK_REPLACED)]
    assert devices(route, alice) == ["laptop", "phone"]
    assert result(route.store.verify_token(old_token)) is None
    assert result(route.store.verify_token(new_token)).device == "phone"


def test_the_sixth_device_evicts_the_least_recently_active(route: Route) -> None:
    alice = route.register("alice")
    for i in range(MAX_DEVICES):
        on(route, alice, "alice", f"d{i}")
        route.clock.advance(10)
    # d0 logged in first but sent something since: d1 is the least active.
    d0 = route.session_of(alice, "d0")
    result(
        route.store.renew_sessions(
            d0.server,
            [HeldSession(alice, d0.session_id, "alice", "d0", route.clock.seconds())],
            86400.0,
        )
    )
    d1 = route.session_of(alice, "d1")
    on(route, alice, "alice", "d5")
    assert route.pusher.kicks == [(d1.server, alice, d1.session_id, KICK_DEVICE_LIMIT)]
    assert devices(route, alice) == ["d0", "d2", "d3", "d4", "d5"]


def test_max_devices() -> None:
    route = Route(max_devices=2)
    alice = route.register("alice")
    on(route, alice, "alice", "a")
    route.clock.advance(1)
    on(route, alice, "alice", "b")
    first = route.session_of(alice, "a")
    route.clock.advance(1)
    on(route, alice, "alice", "c")
    assert route.pusher.kicks == [
        (first.server, alice, first.session_id, KICK_DEVICE_LIMIT)
    ]
    assert devices(route, alice) == ["b", "c"]


def test_a_device_and_a_cim_client_of_one_user() -> None:
    # A CIM client names no device: it is the device "", CIM's session.
    route = Route(legacy_auth=True)
    alice = route.register("alice")
    on(route, alice, "alice", "phone")
    # Without a proof, CIM's rule: refused while the user holds any session.
    body = {"userId": alice, "userName": "alice"}
    answer = route.call("/login", body, extended=False)
    assert answer["code"] == "5000"
    assert devices(route, alice) == ["phone"]
    # With its key, the CIM-style login is one more device.
    answer = route.call(
        "/login", {**body, "accountKey": route.keys[alice]}, extended=False
    )
    assert answer["code"] == "9000"
    assert set(answer["dataBody"]) == {"ip", "cimServerPort", "httpPort"}
    assert devices(route, alice) == ["", "phone"]
    assert route.pusher.kicks == []


def test_cim_login_without_device_keeps_5000() -> None:
    route = Route(legacy_auth=True)
    alice = route.register("alice")
    route.ok("/login", {"userId": alice, "userName": "alice"}, extended=False)
    answer = route.call(
        "/login", {"userId": alice, "userName": "alice"}, extended=False
    )
    assert answer["code"] == "5000"
    assert devices(route, alice) == [""]


@pytest.mark.parametrize(
    "device, complaint",
    [
        ("", "device must be 1-64 letters"),
        ("a b", "device must be 1-64 letters"),
        ("x" * 65, "device must be 1-64 letters"),
        ("é", "device must be 1-64 letters"),
        (5, "device must be a string"),
    ],
)
def test_bad_device(route: Route, device: Any, complaint: str) -> None:
    alice = route.register("alice")
    answer = route.call("/login", {**route.body(alice, "alice"), "device": device})
    assert answer["code"] == "3000"
    assert complaint in answer["message"]
    assert devices(route, alice) == []


def test_the_extended_login_answers_the_device(route: Route) -> None:
    alice = route.register("alice")
    assert route.login(alice, "alice")["device"] == ""
    assert route.login(alice, "alice", device="tab-1.x")["device"] == "tab-1.x"


# Logging off


def test_off_line_by_token_logs_off_only_that_device(route: Route) -> None:
    alice = route.register("alice")
    phone = on(route, alice, "alice", "phone")
    laptop = on(route, alice, "alice", "laptop")
    session = route.session_of(alice, "phone")
    assert route.ok("/offLine", {"userId": alice}, token=phone) is None
    assert devices(route, alice) == ["laptop"]
    assert route.pusher.kicks == [
        (session.server, alice, session.session_id, "logged off")
    ]
    assert result(route.store.verify_token(phone)) is None
    assert result(route.store.verify_token(laptop)) is not None
    assert route.ok("/onlineUser", method="GET") == [
        {"userId": alice, "userName": "alice"}
    ]


def test_off_line_by_secret_logs_off_every_device(route: Route) -> None:
    alice = route.register("alice")
    for device in ["a", "b", "c"]:
        on(route, alice, "alice", device)
    assert route.ok("/offLine", {"userId": alice}, secret=SECRET) is None
    assert devices(route, alice) == []
    assert sorted(kick[3] for kick in route.pusher.kicks) == ["logged off"] * 3
    assert route.pusher.logged_off == [alice] * 3


def test_off_line_under_legacy_auth_logs_off_every_device() -> None:
    route = Route(legacy_auth=True)
    alice = route.register("alice")
    on(route, alice, "alice", "a")
    on(route, alice, "alice", "b")
    assert route.ok("/offLine", {"userId": alice}, extended=False) is None
    assert devices(route, alice) == []


def test_fetch_offline_reaches_every_server_of_the_user() -> None:
    route = Route()
    alice = route.register("alice")
    on(route, alice, "alice", "a")  # on A
    on(route, alice, "alice", "b")  # on B
    route.login(alice, "alice", device="c")  # claimed, not connected
    assert (
        route.ok("/fetchOfflineMsgs", {"receiveUserId": alice}, secret=SECRET) is None
    )
    servers = {route.session_of(alice, d).server for d in ["a", "b"]}
    assert sorted(route.pusher.resyncs) == sorted((s, alice) for s in servers)
    # One server failing is 9201.
    route.pusher.down.add(route.session_of(alice, "b").server)
    body = {"receiveUserId": alice}
    assert route.code("/fetchOfflineMsgs", body, secret=SECRET) == "9201"


# Private conversations


def test_private_sends_go_to_every_device_of_both(route: Route) -> None:
    alice = route.register("alice")
    bob = route.register("bob")
    token = on(route, alice, "alice", "phone")
    on(route, alice, "alice", "laptop")
    on(route, bob, "bob", "pc")
    body = {"userId": alice, "receiveUserId": bob, "msg": "hi"}
    assert route.ok("/p2pRoute", body, token=token) == {"msgId": 1, "seq": 1}
    [message] = result(route.store.read(pair_conversation(alice, bob), 0, 10))
    pushed = sorted((server, users) for server, _, users in route.pusher.pushes)
    servers = {
        (route.session_of(alice, d).server, alice) for d in ["phone", "laptop"]
    } | {(route.session_of(bob, "pc").server, bob)}
    assert {(server, u) for server, users in pushed for u in users} == servers
    # CIM's reply is still empty.
    answer = route.call("/p2pRoute", body, token=token, extended=False)
    assert (answer["code"], answer["dataBody"]) == ("9000", None)
    # Bob's replies go to the same conversation.
    route.ok(
        "/p2pRoute", {"userId": bob, "receiveUserId": alice, "msg": "yo"}, secret=SECRET
    )
    stored = result(route.store.read(pair_conversation(alice, bob), 0, 10))
    assert [(m.seq, m.sender_id, m.text) for m in stored] == [
        (1, alice, "hi"),
        (2, alice, "hi"),
        (3, bob, "yo"),
    ]
    assert stored[0] == message


def test_offline_means_no_connected_device(route: Route) -> None:
    alice = route.register("alice")
    bob = route.register("bob")
    token = on(route, alice, "alice", "phone")
    route.login(bob, "bob", device="pc")  # claimed only
    body = {"userId": alice, "receiveUserId": bob, "msg": "hi"}
    assert route.code("/p2pRoute", body, token=token) == "7000"
    connect(route, bob, "pc")
    assert route.code("/p2pRoute", body, token=token) == "9000"


def test_notes_to_oneself(route: Route) -> None:
    alice = route.register("alice")
    token = on(route, alice, "alice", "phone")
    body = {"userId": alice, "receiveUserId": alice, "msg": "buy milk"}
    assert route.code("/p2pRoute", body, token=token) == "9000"
    conversation = pair_conversation(alice, alice)
    assert [m.text for m in result(route.store.read(conversation, 0, 10))] == [
        "buy milk"
    ]
    assert [users for _, _, users in route.pusher.pushes] == [[alice]]
    history = route.ok("/history", {"userId": alice, "peerId": alice}, token=token)
    assert [m["msg"] for m in history] == ["buy milk"]
    # Reading one's notes tells one's own devices, once.
    body = {"userId": alice, "conversation": conversation, "seq": 1}
    assert route.ok("/read", body, token=token) == {"read": 1}
    assert route.delivery.reads == [(alice, conversation, 1, [alice])]
    body = {"userId": alice, "conversation": conversation}
    assert route.ok("/readPositions", body, token=token) == [
        {"userId": alice, "read": 1}
    ]


# History


def chat(route: Route) -> tuple[int, str, int, str]:
    """
    Alice and Bob, online, exchange m0..m5 in turn; @return: their ids
    and tokens.
    """
    alice, alices = route.online("alice")
    bob, bobs = route.online("bob")
    for i in range(6):
        sender, receiver, token = (
            (alice, bob, alices) if i % 2 == 0 else (bob, alice, bobs)
        )
        body = {"userId": sender, "receiveUserId": receiver, "msg": f"m{i}"}
        route.ok("/p2pRoute", body, token=token)
    return alice, alices, bob, bobs


def test_history_by_peer_shows_both_sides_in_order(route: Route) -> None:
    alice, alices, bob, bobs = chat(route)
    mine = route.ok("/history", {"userId": alice, "peerId": bob}, token=alices)
    theirs = route.ok("/history", {"userId": bob, "peerId": str(alice)}, token=bobs)
    assert mine == theirs
    assert [(m["seq"], m["msg"], m["sendUserId"]) for m in mine] == [
        (i + 1, f"m{i}", alice if i % 2 == 0 else bob) for i in range(6)
    ]
    assert {m["conversation"] for m in mine} == {pair_conversation(alice, bob)}
    assert all(m["epoch"] for m in mine)
    by_id = route.ok(
        "/history",
        {"userId": alice, "conversation": pair_conversation(alice, bob)},
        token=alices,
    )
    assert by_id == mine
    # Another user's pair is not readable, by id or by naming a peer.
    carol, carols = route.online("carol")
    body = {"userId": carol, "conversation": pair_conversation(alice, bob)}
    assert route.code("/history", body, token=carols) == "4010"
    body = {"userId": carol, "peerId": alice}
    assert route.ok("/history", body, token=carols) == []


def test_history_pages_back_with_before_seq(route: Route) -> None:
    alice, alices, bob, _ = chat(route)

    def page(**extra: Any) -> list[str]:
        body = {"userId": alice, "peerId": bob, **extra}
        return [m["msg"] for m in route.ok("/history", body, token=alices)]

    assert page(beforeSeq=0, limit=2) == ["m4", "m5"]
    assert page(beforeSeq=5, limit=2) == ["m2", "m3"]
    assert page(beforeSeq=3, limit=2) == ["m0", "m1"]
    assert page(beforeSeq=1, limit=2) == []
    # afterSeq still bounds a page back.
    assert page(beforeSeq=0, afterSeq=4) == ["m4", "m5"]
    assert page(afterSeq=5) == ["m5"]


def test_history_of_a_group_pages_back_from_the_join(route: Route) -> None:
    alice, alices = route.online("alice")
    bob, bobs = route.online("bob")
    group = {"groupId": "g"}
    route.ok(
        "/group/create", {"userId": alice, **group, "policy": "open"}, token=alices
    )
    for text in ["a", "b", "c"]:
        route.ok("/group/send", {"userId": alice, **group, "msg": text}, token=alices)
    route.ok("/group/join", {"userId": bob, **group}, token=bobs)
    route.ok("/group/send", {"userId": alice, **group, "msg": "d"}, token=alices)
    body = {"userId": bob, "conversation": "g:g", "beforeSeq": 0, "limit": 10}
    assert [m["msg"] for m in route.ok("/history", body, token=bobs)] == ["d"]


def test_old_inboxes_are_refused_naming_peer_id(route: Route) -> None:
    alice, token = route.online("alice")
    answer = route.call(
        "/history", {"userId": alice, "conversation": f"u:{alice}"}, token=token
    )
    assert answer["code"] == "3000"
    assert "peerId" in answer["message"] and "p:" in answer["message"]


# Conversations and read positions


def test_conversations_with_unread_counts(route: Route) -> None:
    alice, alices, bob, bobs = chat(route)
    carol, carols = route.online("carol")
    route.ok(
        "/group/create",
        {"userId": carol, "groupId": "g", "policy": "open"},
        token=carols,
    )
    route.ok("/group/join", {"userId": alice, "groupId": "g"}, token=alices)
    for text in ["x", "y"]:
        body = {"userId": carol, "groupId": "g", "msg": text}
        route.ok("/group/send", body, token=carols)
    pair = pair_conversation(alice, bob)
    epoch = result(route.store.epochs([pair]))[pair].id
    group_epoch = result(route.store.epochs(["g:g"]))["g:g"].id
    # Alice sent m4 last (her own messages count as read), Bob m5.
    assert route.ok("/conversations", {"userId": alice}, token=alices) == [
        {
            "conversation": "g:g",
            "epoch": group_epoch,
            "lastSeq": 2,
            "read": 0,
            "unread": 2,
            "groupId": "g",
        },
        {
            "conversation": pair,
            "epoch": epoch,
            "lastSeq": 6,
            "read": 5,
            "unread": 1,
            "peerId": bob,
            "peerName": "bob",
            "peerRead": 6,
        },
    ]
    assert route.ok("/conversations", {"userId": bob}, token=bobs) == [
        {
            "conversation": pair,
            "epoch": epoch,
            "lastSeq": 6,
            "read": 6,
            "unread": 0,
            "peerId": alice,
            "peerName": "alice",
            "peerRead": 5,
        }
    ]
    carols_view = route.ok("/conversations", {"userId": carol}, token=carols)
    assert [(c["conversation"], c["unread"]) for c in carols_view] == [("g:g", 0)]
    # Another user's token is refused; the secret acts for anybody.
    assert route.code("/conversations", {"userId": alice}, token=bobs) == "4010"
    assert route.ok("/conversations", {"userId": bob}, secret=SECRET)


def test_read_raises_and_notifies(route: Route) -> None:
    alice, alices, bob, bobs = chat(route)
    pair = pair_conversation(alice, bob)
    body = {"userId": alice, "conversation": pair, "seq": 6}
    assert route.ok("/read", body, token=alices) == {"read": 6}
    # The reader's devices and the other user's hear of it.
    assert route.delivery.reads == [(alice, pair, 6, [alice, bob])]
    # It never lowers, and stops at the last seq.
    assert route.ok("/read", {**body, "seq": 2}, token=alices) == {"read": 6}
    assert route.ok("/read", {**body, "seq": 99}, token=alices) == {"read": 6}
    state = route.ok("/conversations", {"userId": bob}, token=bobs)[0]
    assert state["peerRead"] == 6
    # Another user's token is refused.
    assert route.code("/read", body, token=bobs) == "4010"
    # Not one of the user's conversations.
    carol, carols = route.online("carol")
    body = {"userId": carol, "conversation": pair, "seq": 6}
    assert route.code("/read", body, token=carols) == "4010"
    assert len(route.delivery.reads) == 3


def test_read_of_a_group_tells_the_readers_devices_only(route: Route) -> None:
    alice, alices = route.online("alice")
    bob, bobs = route.online("bob")
    route.ok(
        "/group/create",
        {"userId": alice, "groupId": "g", "policy": "open"},
        token=alices,
    )
    route.ok("/group/join", {"userId": bob, "groupId": "g"}, token=bobs)
    route.ok("/group/send", {"userId": alice, "groupId": "g", "msg": "x"}, token=alices)
    body = {"userId": bob, "conversation": "g:g", "seq": 1}
    assert route.ok("/read", body, token=bobs) == {"read": 1}
    assert route.delivery.reads == [(bob, "g:g", 1, [bob])]
    assert route.ok(
        "/readPositions", {"userId": alice, "conversation": "g:g"}, token=alices
    ) == [
        {"userId": alice, "read": 1},
        {"userId": bob, "read": 1},
    ]


def test_a_failing_read_notice_does_not_fail_the_read(route: Route) -> None:
    from twisted.internet.defer import fail

    alice, alices, bob, _ = chat(route)
    route.delivery.deliver_read = lambda *a: fail(RuntimeError("down"))  # type: ignore[method-assign]
    body = {"userId": alice, "conversation": pair_conversation(alice, bob), "seq": 6}
    assert route.ok("/read", body, token=alices) == {"read": 6}


@pytest.mark.parametrize(
    "extra, code, complaint",
    [
        ({"seq": None}, "3000", "seq is missing"),
        ({"seq": -1}, "3000", "seq must be between"),
        ({"seq": "x"}, "3000", "seq must be an integer"),
        ({"conversation": None}, "3000", "conversation is missing"),
        ({"conversation": "u:1"}, "3000", "peerId"),
        ({"conversation": "all"}, "4010", "p:<id>:<id>"),
        ({"conversation": "g:nope"}, "3000", "no group nope"),
    ],
)
def test_read_bad_input(route: Route, extra: dict, code: str, complaint: str) -> None:
    alice, token = route.online("alice")
    body = {"userId": alice, "conversation": pair_conversation(alice, 2), "seq": 1}
    answer = route.call("/read", {**body, **extra}, token=token)
    assert answer["code"] == code
    assert complaint in answer["message"]


def test_read_positions(route: Route) -> None:
    alice, alices, bob, bobs = chat(route)
    pair = pair_conversation(alice, bob)
    body = {"userId": bob, "conversation": pair}
    assert route.ok("/readPositions", body, token=bobs) == [
        {"userId": alice, "read": 5},
        {"userId": bob, "read": 6},
    ]
    carol, carols = route.online("carol")
    # Not hers: neither the pair nor a group she is not in.
    body = {"userId": carol, "conversation": pair}
    assert route.code("/readPositions", body, token=carols) == "4010"
    route.ok("/group/create", {"userId": alice, "groupId": "g"}, token=alices)
    body = {"userId": carol, "conversation": "g:g"}
    assert route.code("/readPositions", body, token=carols) == "4010"
    body = {"userId": alice, "conversation": "g:g"}
    assert route.ok("/readPositions", body, token=alices) == [
        {"userId": alice, "read": 0}
    ]


def test_devices_needs_the_users_token(route: Route) -> None:
    alice, _ = route.online("alice")
    _, bobs = route.online("bob")
    assert route.code("/devices", {"userId": alice}, token=bobs) == "4010"
    assert route.code("/devices", {"userId": alice}) == "4010"
    [device] = route.ok("/devices", {"userId": alice}, secret=SECRET)
    assert (device["device"], device["connected"]) == ("", True)


# Options


def test_max_devices_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIM_SECRET", SECRET)
    options = tap.Options()
    options.parseOptions([])
    assert tap.config_from(options).max_devices == MAX_DEVICES
    options = tap.Options()
    options.parseOptions(["--max-devices=2"])
    assert tap.config_from(options).max_devices == 2
    node = standalone.Options()
    node.parseOptions(["--max-devices", "3"])
    assert node["max-devices"] == 3
    node = standalone.Options()
    node.parseOptions([])
    assert node["max-devices"] == MAX_DEVICES


@pytest.mark.parametrize(
    "value, complaint",
    [
        ("0", "--max-devices must be between 1 and 1,000"),
        ("1001", "--max-devices must be between 1 and 1,000"),
        ("x", "--max-devices must be an integer"),
    ],
)
def test_bad_max_devices(
    monkeypatch: pytest.MonkeyPatch, value: str, complaint: str
) -> None:
    monkeypatch.setenv("CIM_SECRET", SECRET)
    for options in (tap.Options(), standalone.Options()):
        with pytest.raises(usage.UsageError, match=re.escape(complaint)):
            options.parseOptions([f"--max-devices={value}"])


# With the real delivery core


@pytest.mark.skipif(
    not hasattr(Delivery, "deliver_read"),
    reason="cim.delivery.Delivery is not yet the one of issue 14 (no deliver_read)",
)
def test_private_sends_with_the_real_delivery() -> None:
    route = Route()
    route.delivery = delivery = Delivery(route.store, route.pusher, clock=route.clock)
    route.api.router.delivery = delivery
    alice = route.register("alice")
    bob = route.register("bob")
    token = on(route, alice, "alice", "phone")  # on A
    on(route, alice, "alice", "laptop")  # on B
    route.login(bob, "bob", device="pc")  # claimed, not connected
    body = {"userId": alice, "receiveUserId": bob, "msg": "hi"}
    assert route.code("/p2pRoute", body, token=token) == "7000"
    reached = {(server, u) for server, _, users in route.pusher.pushes for u in users}
    assert reached == {
        (route.session_of(alice, "phone").server, alice),
        (route.session_of(alice, "laptop").server, alice),
    }
    connect(route, bob, "pc")
    assert route.code("/p2pRoute", body, token=token) == "9000"
