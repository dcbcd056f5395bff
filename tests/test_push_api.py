"""
The IM server's push API, in memory through StubTreq.
"""

from __future__ import annotations

import json

import pytest_twisted
from treq.testing import StubTreq

from cim.interfaces import NewMessage
from cim.message import Command, Cursor, message_to_dict, pair_conversation
from cim.server.push import PushAPI
from tests.serverkit import World

SECRET = "s3cret-for-tests"


def api(world: World) -> StubTreq:
    return StubTreq(PushAPI(world.server, SECRET).app.resource())


async def post(
    treq: StubTreq, path: str, body: object, secret: str | None = SECRET
) -> dict:
    headers = {b"X-Cim-Secret": [secret.encode()]} if secret is not None else {}
    response = await treq.post(
        f"http://server{path}", data=json.dumps(body).encode(), headers=headers
    )
    return json.loads(await response.content())  # type: ignore[no-any-return]


@pytest_twisted.ensureDeferred
async def test_push_requires_the_secret() -> None:
    world = World()
    treq = api(world)
    assert (await post(treq, "/push", {"items": []}, secret=None))["code"] == "4010"
    assert (await post(treq, "/push", {"items": []}, secret="wrong"))["code"] == "4010"
    assert (await post(treq, "/push", {"items": []}))["code"] == "9000"


@pytest_twisted.ensureDeferred
async def test_push_delivers_and_reports_who_is_not_here() -> None:
    world = World()
    peer, bob = world.login("bob")
    alice = world.account("alice")
    [stored] = world.result(
        world.store.append(
            [
                NewMessage(
                    pair_conversation(alice, bob),
                    alice,
                    "alice",
                    "pushed",
                    receive_user_id=bob,
                )
            ]
        )
    )  # type: ignore[misc]
    reply = await post(
        api(world),
        "/push",
        {"items": [{"messages": [message_to_dict(stored)], "users": [bob, 999]}]},
    )
    assert reply["code"] == "9000"
    assert reply["dataBody"] == {"missing": [[999]]}
    assert [m.text for m in peer.messages()] == ["pushed"]


@pytest_twisted.ensureDeferred
async def test_push_of_a_read_position_reaches_every_device() -> None:
    world = World()
    phone, bob = world.login("bob", device="phone")
    laptop, _ = world.login("bob", user_id=bob, device="laptop")
    alice = world.account("alice")
    conversation = pair_conversation(alice, bob)
    reply = await post(
        api(world),
        "/push",
        {
            "items": [
                {
                    "read": {"userId": alice, "conversation": conversation, "seq": 4},
                    "users": [bob, 999],
                }
            ]
        },
    )
    assert reply["dataBody"] == {"missing": [[999]]}
    for peer in (phone, laptop):
        [frame] = peer.received()
        assert (frame.cmd, frame.request_id, list(frame.cursors)) == (
            Command.READ,
            alice,
            [Cursor(conversation, 4)],
        )


@pytest_twisted.ensureDeferred
async def test_send_msg_answers_7000_for_a_user_not_connected() -> None:
    world = World()
    peer, bob = world.login("bob")
    treq = api(world)
    reply = await post(treq, "/sendMsg", {"msg": "hey", "userId": 12345})
    assert reply["code"] == "7000"
    reply = await post(
        treq,
        "/sendMsg",
        {"msg": "hey", "userId": bob, "properties": {"sendUserId": "1"}},
    )
    assert reply["code"] == "9000"
    [frame] = peer.received()
    assert (frame.cmd, frame.req_msg, dict(frame.properties)) == (
        Command.MESSAGE,
        "hey",
        {"sendUserId": "1"},
    )


@pytest_twisted.ensureDeferred
async def test_bad_json_and_bad_fields_get_3000() -> None:
    world = World()
    treq = api(world)
    response = await treq.post(
        "http://server/push",
        data=b"{nope",
        headers={b"X-Cim-Secret": [SECRET.encode()]},
    )
    assert json.loads(await response.content())["code"] == "3000"
    assert (await post(treq, "/sendMsg", {"msg": "x", "userId": "abc"}))[
        "code"
    ] == "3000"
    assert (await post(treq, "/push", {"items": [{"users": [1]}]}))["code"] == "3000"


@pytest_twisted.ensureDeferred
async def test_kick_closes_only_the_named_session() -> None:
    world = World()
    peer, bob = world.login("bob")
    treq = api(world)
    reply = await post(treq, "/kick", {"userId": bob, "sessionId": "not-it"})
    assert reply["dataBody"] == {"kicked": False}
    assert not peer.closed
    other, _ = world.login("bob", user_id=bob, device="laptop")
    session_id = world.server.connection(bob).session_id
    reply = await post(treq, "/kick", {"userId": bob, "sessionId": session_id})
    assert reply["dataBody"] == {"kicked": True}
    assert peer.closed and not other.closed
    assert [f.cmd for f in peer.received()] == [Command.KICK]
    # No session: every device.
    reply = await post(treq, "/kick", {"userId": bob, "sessionId": ""})
    assert reply["dataBody"] == {"kicked": True}
    assert other.closed


@pytest_twisted.ensureDeferred
async def test_the_http_pusher_carries_messages_and_reads_in_order() -> None:
    from cim.pusher import HttpPusher
    from tests.serverkit import HERE

    world = World()
    phone, bob = world.login("bob", device="phone")
    laptop, _ = world.login("bob", user_id=bob, device="laptop")
    alice = world.account("alice")
    conversation = pair_conversation(alice, bob)
    stored = world.result(
        world.store.append(
            [NewMessage(conversation, alice, "alice", "hi", receive_user_id=bob)]
        )
    )
    pusher = HttpPusher(api(world), SECRET)  # type: ignore[arg-type]
    pushed = pusher.push(str(HERE), stored, [bob, 999])  # type: ignore[arg-type]
    read = pusher.push_read(str(HERE), alice, conversation, 1, [bob])
    assert await pushed == [999]
    assert await read == []
    for peer in (phone, laptop):
        frames = peer.received()
        assert [f.cmd for f in frames] == [Command.MESSAGE, Command.READ]
        assert list(frames[1].cursors) == [Cursor(conversation, 1)]
        assert frames[1].request_id == alice


class _StaleOnce:
    """
    An HTTP client whose first request fails on the way (a pooled
    connection that the server's restart left stale), then works.
    """

    def __init__(self, http: StubTreq) -> None:
        self.http = http
        self.calls = 0

    def post(self, *args: object, **kwargs: object) -> object:
        from twisted.internet.defer import fail
        from twisted.web._newclient import ResponseNeverReceived

        self.calls += 1
        if self.calls == 1:
            return fail(ResponseNeverReceived([]))
        kwargs.pop("timeout", None)
        return self.http.post(*args, **kwargs)


@pytest_twisted.ensureDeferred
async def test_a_push_that_fails_on_the_way_is_sent_once_more() -> None:
    # Found by the simulator (issue 18, seeds 365, 746, 815): the last
    # message of a conversation went no further when its push met a stale
    # connection, until the recipient's next gap or login.
    from cim.pusher import HttpPusher
    from tests.serverkit import HERE

    world = World()
    phone, bob = world.login("bob", device="phone")
    alice = world.account("alice")
    conversation = pair_conversation(alice, bob)
    stored = world.result(
        world.store.append(
            [NewMessage(conversation, alice, "alice", "hi", receive_user_id=bob)]
        )
    )
    http = _StaleOnce(api(world))
    pusher = HttpPusher(http, SECRET)  # type: ignore[arg-type]
    assert await pusher.push(str(HERE), stored, [bob]) == []  # type: ignore[arg-type]
    assert http.calls == 2
    assert [m.text for m in phone.messages()] == ["hi"]
