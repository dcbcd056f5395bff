"""
The route's rules for groups (L{cim.route.logic}): owners, join policies
(open, by invitation, by approval), history from the join on, removal,
handing over and group information.  Driven in memory with the L{Route}
harness of C{tests/test_route.py}.
"""

from __future__ import annotations

from typing import Any

import pytest

from cim.message import Position, group_conversation
from cim.route import logic
from cim.store.memory import _Group
from tests.test_route import SECRET, Route, result


class Users:
    """
    Alice (who owns the groups), Bob, Carol and Dave, online, with their
    tokens; L{call}, L{ok} and L{code} act as one of them.
    """

    def __init__(self, route: Route) -> None:
        self.route = route
        self.ids: dict[str, int] = {}
        self.tokens: dict[str, str] = {}
        for name in ["alice", "bob", "carol", "dave"]:
            self.ids[name], self.tokens[name] = route.online(name)

    def body(self, who: str, group: str, **extra: Any) -> dict[str, Any]:
        return {"userId": self.ids[who], "groupId": group, **extra}

    def call(self, who: str, path: str, group: str, **extra: Any) -> dict:
        return self.route.call(
            path, self.body(who, group, **extra), token=self.tokens[who]
        )

    def ok(self, who: str, path: str, group: str, **extra: Any) -> Any:
        return self.route.ok(
            path, self.body(who, group, **extra), token=self.tokens[who]
        )

    def code(self, who: str, path: str, group: str, **extra: Any) -> str:
        code: str = self.call(who, path, group, **extra)["code"]
        return code

    def say(self, who: str, group: str, *texts: str) -> None:
        for text in texts:
            self.ok(who, "/group/send", group, msg=text)

    def history(self, who: str, group: str, after: int = 0) -> list[str]:
        page = self.route.ok(
            "/history",
            {"userId": self.ids[who], "conversation": f"g:{group}", "afterSeq": after},
            token=self.tokens[who],
        )
        return [m["msg"] for m in page]


def read_position(route: Route, user_id: int, group_id: str) -> int:
    conversation = group_conversation(group_id)
    positions = result(route.store.read_positions(conversation, [user_id]))
    return int(positions[user_id])


@pytest.fixture
def route() -> Route:
    return Route()


@pytest.fixture
def users(route: Route) -> Users:
    return Users(route)


def test_a_new_group_is_by_invitation_with_history_from_the_join(
    users: Users,
) -> None:
    created = users.ok("alice", "/group/create", "g")
    assert created == {"groupId": "g", "policy": "invite", "history": "join"}
    info = users.ok("alice", "/group/info", "g")
    assert info == {
        "groupId": "g",
        "ownerId": users.ids["alice"],
        "policy": "invite",
        "history": "join",
        "members": 1,
        "member": True,
        "joinedAt": 0,
    }


def test_an_outsider_cannot_join_an_invite_group_nor_read_it(users: Users) -> None:
    users.ok("alice", "/group/create", "g")
    users.say("alice", "g", "secret plan")
    answer = users.call("bob", "/group/join", "g")
    assert answer["code"] == "4010"
    assert "by invitation only" in answer["message"]
    for path in ["/group/info", "/group/members", "/group/requests"]:
        assert users.code("bob", path, "g") == "4010"
    assert users.code("bob", "/group/send", "g", msg="hi") == "4010"
    body = {"userId": users.ids["bob"], "conversation": "g:g"}
    assert users.route.code("/history", body, token=users.tokens["bob"]) == "4010"
    assert users.ok("alice", "/group/members", "g") == [
        {"userId": users.ids["alice"], "userName": "alice"}
    ]


def test_an_invited_user_joins_and_reads_from_its_join_on(users: Users) -> None:
    route = users.route
    users.ok("alice", "/group/create", "g")
    users.say("alice", "g", "one", "two", "three")
    bob = users.ids["bob"]
    assert users.ok("alice", "/group/invite", "g", inviteeId=bob) == {
        "groupId": "g",
        "inviteeId": bob,
        "invited": True,
    }
    assert users.ok("alice", "/group/invite", "g", inviteeId=bob)["invited"] is False
    # An invited user may look at the group before joining.
    assert users.ok("bob", "/group/info", "g")["member"] is False
    joined = users.ok("bob", "/group/join", "g")
    assert joined == {"groupId": "g", "joined": True, "pending": False}
    # Its read position starts at the join: its devices' streams of the
    # group start there, and nothing from before is unread.
    assert read_position(route, bob, "g") == 3
    assert users.ok("bob", "/group/info", "g")["joinedAt"] == 3
    users.say("alice", "g", "four")
    users.say("bob", "g", "five")
    assert users.history("bob", "g") == ["four", "five"]
    assert users.history("bob", "g", after=4) == ["five"]
    assert users.history("alice", "g") == ["one", "two", "three", "four", "five"]
    # The invitation was used up: removed, Bob cannot come back on it.
    users.ok("alice", "/group/remove", "g", memberId=bob)
    assert users.code("bob", "/group/join", "g") == "4010"


def test_full_history_is_visible_to_new_members(users: Users) -> None:
    users.ok("alice", "/group/create", "g", policy="open", history="full")
    users.say("alice", "g", "before")
    users.ok("bob", "/group/join", "g")
    users.say("alice", "g", "after")
    assert users.history("bob", "g") == ["before", "after"]
    # Delivery still starts at the join (the history is there to read).
    assert read_position(users.route, users.ids["bob"], "g") == 1


def test_rejoining_starts_from_the_new_join(users: Users) -> None:
    store = users.route.store
    bob = users.ids["bob"]
    users.ok("alice", "/group/create", "g", policy="open")
    users.ok("bob", "/group/join", "g")
    users.say("alice", "g", "a")
    # Bob's phone acknowledged "a" (its server stores that cursor).
    conversation = group_conversation("g")
    epoch = result(store.epochs([conversation]))[conversation].id
    result(store.set_cursors(bob, {conversation: Position(epoch, 1)}, "phone"))
    users.ok("bob", "/group/leave", "g")
    # Leaving forgets its devices' cursors: a later join starts them from
    # the read position set at that join.
    assert result(store.get_cursors(bob, "phone")) == {}
    users.say("alice", "g", "b")
    assert users.code("bob", "/group/info", "g") == "9000"
    users.ok("bob", "/group/join", "g")
    assert read_position(users.route, bob, "g") == 2
    users.say("alice", "g", "c")
    assert users.history("bob", "g") == ["c"]


def test_anyone_joins_an_open_group(users: Users) -> None:
    users.ok("alice", "/group/create", "g", policy="open")
    info = users.ok("carol", "/group/info", "g")
    assert (info["policy"], info["members"], info["member"]) == ("open", 1, False)
    assert "joinedAt" not in info
    assert users.ok("carol", "/group/join", "g")["joined"] is True
    # Removal from an open group is no ban.
    users.ok("alice", "/group/remove", "g", memberId=users.ids["carol"])
    assert users.ok("carol", "/group/join", "g")["joined"] is True


def test_approval(users: Users) -> None:
    users.ok("alice", "/group/create", "g", policy="approval")
    bob, dave = users.ids["bob"], users.ids["dave"]
    waiting = users.ok("bob", "/group/join", "g")
    assert waiting == {"groupId": "g", "joined": False, "pending": True}
    assert users.ok("bob", "/group/join", "g")["pending"] is True
    users.ok("dave", "/group/join", "g")
    # Waiting is not belonging.
    assert users.code("bob", "/group/send", "g", msg="x") == "4010"
    assert users.ok("bob", "/group/info", "g")["member"] is False
    assert users.code("carol", "/group/info", "g") == "4010"
    assert users.ok("alice", "/group/requests", "g") == [
        {"userId": bob, "userName": "bob"},
        {"userId": dave, "userName": "dave"},
    ]
    assert users.code("bob", "/group/requests", "g") == "4010"
    assert users.code("bob", "/group/approve", "g", requesterId=dave) == "4010"

    users.say("alice", "g", "before bob")
    approved = users.ok("alice", "/group/approve", "g", requesterId=bob)
    assert approved == {"groupId": "g", "requesterId": bob, "joined": True}
    assert read_position(users.route, bob, "g") == 1
    users.say("alice", "g", "welcome")
    assert users.history("bob", "g") == ["welcome"]
    answer = users.call("alice", "/group/approve", "g", requesterId=bob)
    assert answer["code"] == "3000" and "requesterId" in answer["message"]

    rejected = users.ok("alice", "/group/reject", "g", requesterId=dave)
    assert rejected == {"groupId": "g", "requesterId": dave, "rejected": True}
    assert users.code("alice", "/group/reject", "g", requesterId=dave) == "3000"
    assert users.ok("alice", "/group/requests", "g") == []
    assert users.ok("dave", "/group/join", "g")["pending"] is True

    # An invitation lets a user into an approval group at once.
    users.ok("alice", "/group/invite", "g", inviteeId=users.ids["carol"])
    assert users.ok("carol", "/group/join", "g")["joined"] is True


def test_approving_nobody(users: Users) -> None:
    users.ok("alice", "/group/create", "g", policy="approval")
    for path in ["/group/approve", "/group/reject"]:
        answer = users.call("alice", path, "g", requesterId=users.ids["bob"])
        assert answer["code"] == "3000"
        assert users.code("alice", path, "g", requesterId=999) == "3000"


def test_requests_are_limited(users: Users, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logic, "MAX_JOIN_REQUESTS", 2)
    users.ok("alice", "/group/create", "g", policy="approval")
    users.ok("bob", "/group/join", "g")
    users.ok("carol", "/group/join", "g")
    answer = users.call("dave", "/group/join", "g")
    assert answer["code"] == "4090"
    assert "requests waiting" in answer["message"]
    # Asking again is no new request.
    assert users.ok("bob", "/group/join", "g")["pending"] is True


def test_only_the_owner_invites(users: Users) -> None:
    users.ok("alice", "/group/create", "g", policy="open")
    users.ok("bob", "/group/join", "g")
    carol = users.ids["carol"]
    assert users.code("bob", "/group/invite", "g", inviteeId=carol) == "4010"
    assert users.code("alice", "/group/invite", "g", inviteeId=999) == "3000"
    answer = users.call("alice", "/group/invite", "g", inviteeId=users.ids["bob"])
    assert answer["code"] == "4090" and "member" in answer["message"]
    assert users.code("alice", "/group/invite", "nope", inviteeId=carol) == "3000"


def test_removing_members(users: Users) -> None:
    users.ok("alice", "/group/create", "g")
    bob, carol = users.ids["bob"], users.ids["carol"]
    for who in ["bob", "carol"]:
        users.ok("alice", "/group/invite", "g", inviteeId=users.ids[who])
        users.ok(who, "/group/join", "g")
    assert users.code("bob", "/group/remove", "g", memberId=carol) == "4010"
    removed = users.ok("alice", "/group/remove", "g", memberId=bob)
    assert removed == {"groupId": "g", "memberId": bob, "removed": True}
    assert users.ok("alice", "/group/remove", "g", memberId=bob)["removed"] is False
    assert users.code("bob", "/group/send", "g", msg="still here?") == "4010"
    body = {"userId": bob, "conversation": "g:g"}
    assert users.route.code("/history", body, token=users.tokens["bob"]) == "4010"
    assert users.ok("bob", "/user/groups", "g") == []
    answer = users.call("alice", "/group/remove", "g", memberId=users.ids["alice"])
    assert answer["code"] == "4090" and "/group/transfer" in answer["message"]
    assert users.code("alice", "/group/remove", "g", memberId=999) == "3000"
    # A removed member's devices forget their cursors of the group.
    conversation = group_conversation("g")
    result(users.route.store.set_cursors(carol, {conversation: Position("", 1)}, "pc"))
    users.ok("alice", "/group/remove", "g", memberId=carol)
    assert result(users.route.store.get_cursors(carol, "pc")) == {}
    users.ok("alice", "/group/invite", "g", inviteeId=carol)
    users.ok("carol", "/group/join", "g")
    # The members left get the group's messages; Bob does not.
    users.route.pusher.pushes.clear()
    users.say("alice", "g", "without bob")
    pushed = {u for _, _, ids in users.route.pusher.pushes for u in ids}
    assert pushed == {users.ids["alice"], carol}


def test_the_owner_hands_over_before_leaving(users: Users) -> None:
    users.ok("alice", "/group/create", "g", policy="open")
    bob = users.ids["bob"]
    answer = users.call("alice", "/group/leave", "g")
    assert answer["code"] == "4090" and "/group/transfer" in answer["message"]
    answer = users.call("alice", "/group/transfer", "g", newOwnerId=bob)
    assert answer["code"] == "3000" and "newOwnerId" in answer["message"]
    users.ok("bob", "/group/join", "g")
    assert users.code("bob", "/group/transfer", "g", newOwnerId=bob) == "4010"
    assert users.ok("alice", "/group/transfer", "g", newOwnerId=bob) == {
        "groupId": "g",
        "ownerId": bob,
    }
    assert users.ok("carol", "/group/info", "g")["ownerId"] == bob
    assert users.code("alice", "/group/invite", "g", inviteeId=bob) == "4010"
    assert users.ok("alice", "/group/leave", "g")["left"] is True
    assert users.code("bob", "/group/leave", "g") == "4090"


def test_a_group_from_before_owners(users: Users) -> None:
    """
    A group stored by the previous release has no owner: it is open,
    nobody manages it, and its members from then read everything.
    """
    alice, bob = users.ids["alice"], users.ids["bob"]
    store = users.route.store
    result(store.create_group("old", alice))
    store._groups["old"] = _Group(None, "open", "join", {alice: 0}, set(), {})
    users.say("alice", "old", "from before")
    assert users.history("alice", "old") == ["from before"]
    assert users.ok("carol", "/group/info", "old")["ownerId"] is None
    assert users.ok("bob", "/group/join", "old")["joined"] is True
    assert users.history("bob", "old") == []
    for path, extra in [
        ("/group/invite", {"inviteeId": bob}),
        ("/group/remove", {"memberId": bob}),
        ("/group/transfer", {"newOwnerId": bob}),
        ("/group/requests", {}),
    ]:
        answer = users.call("alice", path, "old", **extra)
        assert answer["code"] == "4010" and "no owner" in answer["message"]
    assert users.ok("alice", "/group/leave", "old")["left"] is True


@pytest.mark.parametrize(
    "extra, complaint",
    [
        ({"policy": "closed"}, "policy must be one of open, invite, approval"),
        ({"policy": 1}, "policy must be one of"),
        ({"history": "some"}, "history must be one of join, full"),
        ({"history": ["full"]}, "history must be one of"),
    ],
)
def test_bad_settings(users: Users, extra: dict, complaint: str) -> None:
    answer = users.call("alice", "/group/create", "g", **extra)
    assert answer["code"] == "3000"
    assert complaint in answer["message"]


@pytest.mark.parametrize(
    "path, other",
    [
        ("/group/invite", "inviteeId"),
        ("/group/approve", "requesterId"),
        ("/group/reject", "requesterId"),
        ("/group/remove", "memberId"),
        ("/group/transfer", "newOwnerId"),
    ],
)
def test_the_other_user_is_required(users: Users, path: str, other: str) -> None:
    users.ok("alice", "/group/create", "g")
    answer = users.call("alice", path, "g")
    assert answer["code"] == "3000" and f"{other} is missing" in answer["message"]
    answer = users.call("alice", path, "g", **{other: "x"})
    assert answer["code"] == "3000" and other in answer["message"]


NEW_ENDPOINTS = [
    "/group/info",
    "/group/invite",
    "/group/requests",
    "/group/approve",
    "/group/reject",
    "/group/remove",
    "/group/transfer",
]


@pytest.mark.parametrize("path", NEW_ENDPOINTS)
def test_group_endpoints_need_the_users_token(users: Users, path: str) -> None:
    users.ok("alice", "/group/create", "g")
    body = users.body("alice", "g", inviteeId=2, requesterId=2, memberId=2)
    body["newOwnerId"] = 2
    route = users.route
    assert route.code(path, body) == "4010"
    assert route.code(path, body, token=users.tokens["bob"]) == "4010"
    assert route.code(path, body, secret="wrong") == "4010"


@pytest.mark.parametrize("path", NEW_ENDPOINTS)
def test_unknown_group(users: Users, path: str) -> None:
    body = users.body("alice", "nope", inviteeId=2, requesterId=2, memberId=2)
    body["newOwnerId"] = 2
    answer = users.route.call(path, body, token=users.tokens["alice"])
    assert answer["code"] == "3000" and "no group nope" in answer["message"]


def test_the_secret_acts_for_the_owner(users: Users) -> None:
    route = users.route
    alice, bob = users.ids["alice"], users.ids["bob"]
    route.ok("/group/create", {"userId": alice, "groupId": "g"}, secret=SECRET)
    body = {"userId": alice, "groupId": "g", "inviteeId": bob}
    assert route.ok("/group/invite", body, secret=SECRET)["invited"] is True
    body = {"userId": bob, "groupId": "g"}
    assert route.ok("/group/join", body, secret=SECRET)["joined"] is True
