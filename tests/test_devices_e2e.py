"""
Devices on real processes (a private Redis, ZooKeeper, one C{twistd
cim-route} spreading logins round robin, two C{twistd cim-server}s), seen
as an outsider sees them: the route's HTTP API and raw TCP connections
(L{tests.kit.wire}).

Alice is on two devices, each on its own server, and Bob on one: every
message of their private conversation reaches every device once, in order,
both sides; a device logging in again replaces its old connection; the
device limit logs the least recently active device out; killing the server
of one device leaves the other chatting, and the moved one catches up; read
positions reach the other device and the peer; a store flushed under
running clients makes them resync, said, with nothing hidden or doubled.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.utils import getProcessOutputAndValue

from cim.message import (
    KICK_DEVICE_LIMIT,
    KICK_REPLACED,
    ChatMessage,
    Command,
    Cursor,
    Frame,
    pair_conversation,
)
from tests.kit.cluster import Cluster
from tests.kit.http import call
from tests.kit.wait import within
from tests.kit.wire import WireClient, connect
from tests.test_faults import Lab

pytestmark = pytest.mark.integration


@pytest.fixture
def lab(reactor: Any, tmp_path: Path) -> Iterator[Lab]:
    """
    The processes of one test, all stopped at its end.
    """
    processes = Lab(reactor, tmp_path)
    try:
        yield processes
    finally:
        processes.stop_all()


PASSWORD = "correct horse battery"


class Device:
    """
    One device of a user, connected to an IM server over raw TCP.

    @ivar wire: its connection.
    @ivar port: the client port of its server.
    @ivar login: its C{LOGIN_RESPONSE} frame.
    """

    def __init__(
        self, account: dict[str, Any], device: str, wire: WireClient, port: int
    ) -> None:
        self.account = account
        self.device = device
        self.wire = wire
        self.port = port
        self.login = Frame(Command.LOGIN_RESPONSE)
        self.sent = 0

    @property
    def user_id(self) -> int:
        return int(self.account["userId"])

    def send(self, receiver: int, text: str) -> None:
        self.sent += 1
        self.wire.send(
            Frame(
                cmd=Command.MESSAGE,
                req_msg=text,
                receive_user_id=receiver,
                client_msg_id=f"{self.device}-{self.sent}-{uuid.uuid4().hex[:6]}",
            )
        )

    def chat(self, conversation: str) -> list[ChatMessage]:
        """
        The messages of C{conversation} received, in arrival order.
        """
        return [m for m in self.wire.messages() if m.conversation == conversation]

    async def wait_chat(self, reactor: Any, conversation: str, count: int) -> None:
        await self.wire.wait(
            lambda: len(self.chat(conversation)) >= count,
            f"{count} messages of {conversation} on {self.device}",
        )

    def reads(self) -> list[tuple[int, str, int]]:
        """
        The read positions the server told this device: C{(reader, conversation,
        seq)}.
        """
        return [
            (f.request_id, c.conversation, c.seq)
            for f in self.wire.frames
            if f.cmd == Command.READ
            for c in f.cursors
        ]


async def register(reactor: Any, cluster: Cluster, prefix: str) -> dict[str, Any]:
    """
    A new account with a password: its C{/login} body (without a device).
    """
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    body = {"userName": name, "password": PASSWORD}
    _, reply = await call(reactor, f"{cluster.url}/registerAccount", body)
    assert reply["code"] == "9000", reply
    return {**body, "userId": reply["dataBody"]["userId"]}


async def login(
    reactor: Any,
    cluster: Cluster,
    account: dict[str, Any],
    device: str,
    cursors: Sequence[Cursor] = (),
    port: int | None = None,
) -> Device:
    """
    Log C{account}'s C{device} in at the route, then at the server it names
    (with C{cursors}); with C{port}, log in again until the round robin
    names the server of that client port.
    """
    for _ in range(8):
        _, reply = await call(
            reactor, f"{cluster.url}/login", {**account, "device": device}
        )
        assert reply["code"] == "9000", reply
        data = reply["dataBody"]
        assert data["device"] == device
        if port is None or int(data["cimServerPort"]) == port:
            break
    else:
        raise AssertionError(f"the route never chose the server of port {port}")
    wire = await connect(reactor, int(data["cimServerPort"]))
    wire.send_login(account["userId"], account["userName"], data["token"], cursors)
    me = Device(account, device, wire, int(data["cimServerPort"]))
    me.login = await wire.wait_frame(Command.LOGIN_RESPONSE)
    assert me.login.device == device
    return me


def ports(cluster: Cluster) -> list[int]:
    return [server.port for server in cluster.servers.values()]


def assert_conversation(
    devices: Sequence[Device], conversation: str, texts: Sequence[str]
) -> None:
    """
    Every device got C{texts} in C{conversation}, each once, in seq order
    1, 2, 3...
    """
    for device in devices:
        got = device.chat(conversation)
        assert [m.seq for m in got] == list(range(1, len(texts) + 1)), device.device
        assert [m.text for m in got] == list(texts), device.device


@pytest_twisted.ensureDeferred
async def test_every_device_sees_both_sides_once_in_order(
    reactor: Any, lab: Lab, zk_url: str
) -> None:
    _, cluster = await lab.redis_cluster(reactor, zk_url)
    first, second = ports(cluster)
    alice = await register(reactor, cluster, "alice")
    bob = await register(reactor, cluster, "bob")
    laptop = await login(reactor, cluster, alice, "laptop", port=first)
    phone = await login(reactor, cluster, alice, "phone", port=second)
    bobs = await login(reactor, cluster, bob, "desk")
    conversation = pair_conversation(laptop.user_id, bobs.user_id)

    texts = []
    for i in range(3):
        laptop.send(bob["userId"], f"laptop {i}")
        texts.append(f"laptop {i}")
        await laptop.wait_chat(reactor, conversation, len(texts))
    for i in range(3):
        bobs.send(alice["userId"], f"bob {i}")
        texts.append(f"bob {i}")
        await bobs.wait_chat(reactor, conversation, len(texts))
    for i in range(2):
        phone.send(bob["userId"], f"phone {i}")
        texts.append(f"phone {i}")
        await phone.wait_chat(reactor, conversation, len(texts))
    everyone = [laptop, phone, bobs]
    for device in everyone:
        await device.wait_chat(reactor, conversation, len(texts))
    assert_conversation(everyone, conversation, texts)
    # Each sending device was also acknowledged what it sent.
    for device in everyone:
        acks = [f for f in device.wire.frames if f.cmd == Command.ACK]
        assert len(acks) == device.sent

    # The history has both sides, for either user, by peer.
    for me, peer in ((alice, bob), (bob, alice)):
        _, reply = await call(
            reactor,
            f"{cluster.url}/history",
            {"userId": me["userId"], "peerId": peer["userId"]},
            {"X-Cim-Secret": cluster.secret},
        )
        assert reply["code"] == "9000", reply
        assert [m["msg"] for m in reply["dataBody"]] == texts

    # A device that comes back catches up from its cursors, and only that.
    phone_cursors = phone.wire.cursors()
    await phone.wire.hang_up()
    bobs.send(alice["userId"], "while the phone was away")
    texts.append("while the phone was away")
    await laptop.wait_chat(reactor, conversation, len(texts))
    phone = await login(reactor, cluster, alice, "phone", phone_cursors)
    await phone.wait_chat(reactor, conversation, 1)
    assert [m.text for m in phone.chat(conversation)] == texts[-1:]
    assert [c.reset for c in phone.login.cursors] == [False]
    for device in (laptop, phone, bobs):
        await device.wire.hang_up()


@pytest_twisted.ensureDeferred
async def test_same_device_replaces_and_the_limit_evicts(
    reactor: Any, lab: Lab, zk_url: str
) -> None:
    _, cluster = await lab.redis_cluster(
        reactor, zk_url, route_args=["--max-devices", "3"]
    )
    alice = await register(reactor, cluster, "alice")
    old = await login(reactor, cluster, alice, "laptop")
    new = await login(reactor, cluster, alice, "laptop")
    kick = await old.wire.wait_frame(Command.KICK)
    assert kick.error_reason == KICK_REPLACED
    await within(reactor, old.wire.closed)
    assert not new.wire.closed.called

    # Three devices fit; a fourth logs out the least recently active one.
    second = await login(reactor, cluster, alice, "phone")
    third = await login(reactor, cluster, alice, "tablet")
    _, reply = await call(
        reactor,
        f"{cluster.url}/devices",
        {"userId": alice["userId"]},
        {"X-Cim-Secret": cluster.secret},
    )
    assert reply["code"] == "9000", reply
    assert sorted(d["device"] for d in reply["dataBody"]) == [
        "laptop",
        "phone",
        "tablet",
    ]
    fourth = await login(reactor, cluster, alice, "browser")
    kick = await new.wire.wait_frame(Command.KICK)
    assert kick.error_reason == KICK_DEVICE_LIMIT
    await within(reactor, new.wire.closed)
    for device in (second, third, fourth):
        assert not device.wire.closed.called
        await device.wire.hang_up()


@pytest_twisted.ensureDeferred
async def test_killed_server_of_one_device(reactor: Any, lab: Lab, zk_url: str) -> None:
    _, cluster = await lab.redis_cluster(reactor, zk_url)
    first, second = ports(cluster)
    alice = await register(reactor, cluster, "alice")
    bob = await register(reactor, cluster, "bob")
    laptop = await login(reactor, cluster, alice, "laptop", port=first)
    phone = await login(reactor, cluster, alice, "phone", port=second)
    bobs = await login(reactor, cluster, bob, "desk", port=first)
    conversation = pair_conversation(laptop.user_id, bobs.user_id)
    bobs.send(alice["userId"], "before")
    for device in (laptop, phone, bobs):
        await device.wait_chat(reactor, conversation, 1)
    phone_cursors = phone.wire.cursors()

    victim = next(s for s in cluster.servers.values() if s.port == second)
    victim.daemon.kill()
    await within(reactor, phone.wire.closed)

    texts = ["before"]
    for i in range(5):
        who, to = (laptop, bob) if i % 2 else (bobs, alice)
        who.send(to["userId"], f"after {i}")
        texts.append(f"after {i}")
        await laptop.wait_chat(reactor, conversation, len(texts))
    await bobs.wait_chat(reactor, conversation, len(texts))
    assert_conversation([laptop, bobs], conversation, texts)

    # The phone comes back (on the live server) and gets what it missed.
    phone = await login(reactor, cluster, alice, "phone", phone_cursors, port=first)
    await phone.wait_chat(reactor, conversation, len(texts) - 1)
    assert [m.text for m in phone.chat(conversation)] == texts[1:]
    laptop.send(bob["userId"], "all here")
    texts.append("all here")
    for device in (laptop, phone, bobs):
        await device.wait_chat(
            reactor, conversation, len(texts) - (1 if device is phone else 0)
        )
    assert phone.chat(conversation)[-1].seq == len(texts)
    for device in (laptop, phone, bobs):
        await device.wire.hang_up()


@pytest_twisted.ensureDeferred
async def test_read_positions_sync_devices_and_reach_the_peer(
    reactor: Any, lab: Lab, zk_url: str
) -> None:
    _, cluster = await lab.redis_cluster(reactor, zk_url)
    first, second = ports(cluster)
    alice = await register(reactor, cluster, "alice")
    bob = await register(reactor, cluster, "bob")
    laptop = await login(reactor, cluster, alice, "laptop", port=first)
    phone = await login(reactor, cluster, alice, "phone", port=second)
    bobs = await login(reactor, cluster, bob, "desk", port=first)
    conversation = pair_conversation(laptop.user_id, bobs.user_id)
    for i in range(3):
        bobs.send(alice["userId"], f"hello {i}")
    await laptop.wait_chat(reactor, conversation, 3)
    secret = {"X-Cim-Secret": cluster.secret}

    async def state(user: dict[str, Any]) -> dict[str, Any]:
        _, reply = await call(
            reactor, f"{cluster.url}/conversations", {"userId": user["userId"]}, secret
        )
        assert reply["code"] == "9000", reply
        (found,) = [c for c in reply["dataBody"] if c["conversation"] == conversation]
        return found  # type: ignore[no-any-return]

    assert (await state(alice))["unread"] == 3
    assert (await state(bob))["unread"] == 0

    # Alice reads two on her laptop: her phone and Bob are told.
    laptop.wire.send(Frame(Command.READ, cursors=(Cursor(conversation, 2),)))
    told = (laptop.user_id, conversation, 2)
    await phone.wire.wait(lambda: told in phone.reads(), "the read on the phone")
    await bobs.wire.wait(lambda: told in bobs.reads(), "the receipt at Bob's")
    alice_state = await state(alice)
    assert (alice_state["read"], alice_state["unread"]) == (2, 1)
    assert (await state(bob))["peerRead"] == 2

    # Over HTTP from the phone, the same.
    _, reply = await call(
        reactor,
        f"{cluster.url}/read",
        {"userId": alice["userId"], "conversation": conversation, "seq": 3},
        secret,
    )
    assert reply["code"] == "9000", reply
    told = (laptop.user_id, conversation, 3)
    await laptop.wire.wait(lambda: told in laptop.reads(), "the read on the laptop")
    await bobs.wire.wait(lambda: told in bobs.reads(), "the second receipt")
    assert (await state(alice))["unread"] == 0
    _, reply = await call(
        reactor,
        f"{cluster.url}/readPositions",
        {"userId": bob["userId"], "conversation": conversation},
        secret,
    )
    assert reply["code"] == "9000", reply
    positions = {p["userId"]: p["read"] for p in reply["dataBody"]}
    assert positions[alice["userId"]] == 3
    for device in (laptop, phone, bobs):
        await device.wire.hang_up()


@pytest_twisted.ensureDeferred
async def test_store_flushed_under_running_clients(
    reactor: Any, lab: Lab, zk_url: str
) -> None:
    redis, cluster = await lab.redis_cluster(reactor, zk_url)
    alice = await register(reactor, cluster, "alice")
    bob = await register(reactor, cluster, "bob")
    # On one server: the store forgets the sessions too, which the server
    # makes again at its next renewal; until then only it can deliver.
    (first, _) = ports(cluster)
    alices = await login(reactor, cluster, alice, "laptop", port=first)
    bobs = await login(reactor, cluster, bob, "desk", port=first)
    conversation = pair_conversation(alices.user_id, bobs.user_id)
    before = [f"before {i}" for i in range(4)]
    for text in before:
        alices.send(bob["userId"], text)
    await bobs.wait_chat(reactor, conversation, 4)
    (old_epoch,) = {m.epoch for m in bobs.chat(conversation)}
    assert old_epoch

    out, err, status = await getProcessOutputAndValue(
        "redis-cli", ["-p", str(redis.port), "FLUSHALL"], reactor=reactor
    )
    assert status == 0 and out.strip() == b"OK", (out, err)
    after = [f"after {i}" for i in range(6)]
    for text in after:
        alices.send(bob["userId"], text)
    for device in (alices, bobs):
        await device.wait_chat(reactor, conversation, 10)
        resets = [
            c
            for f in device.wire.frames
            if f.cmd == Command.EPOCH
            for c in f.cursors
            if c.conversation == conversation and c.reset
        ]
        assert resets, f"{device.device} was not told of the new epoch"
        assert resets[0].epoch != old_epoch
        got = device.chat(conversation)
        # Nothing hidden, nothing twice: the old four, then the new six,
        # numbered again from 1 in the new epoch.
        assert [m.text for m in got] == before + after
        assert [m.seq for m in got[4:]] == list(range(1, 7))
        assert {m.epoch for m in got[4:]} == {resets[0].epoch}
    for device in (alices, bobs):
        await device.wire.hang_up()
