"""
Issue 13's attacks on the IM server, against real processes (a route and
IM servers, a private Redis, ZooKeeper), each followed by normal clients
chatting on with nothing lost:

  - one frame, or one C{/p2pRoute} call, cannot store thousands of
    messages, and no sender can push a receiver's unread message out of
    retention (the sender's quota per conversation);
  - one ACK cannot break an account (cursors only of the connection's own
    conversations, never beyond what it was sent);
  - a client that never reads is dropped, the server's memory stays
    bounded, and it gets its messages at its next login;
  - no session stays online after its server died: a server restarted on
    its address drops them at once, and a session nobody renews expires.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import deferLater

from cim.codec import encode_framed
from cim.limits import MAX_BATCH, SENDER_QUOTA
from cim.message import Command, Cursor, ErrorCode, Frame, Position
from tests.kit.http import call
from tests.kit.wait import wait_until, within
from tests.kit.wire import connect
from tests.test_faults import (
    Chat,
    Lab,
    clients,  # noqa: F401 (a fixture)
    members_in_group,
    procs,  # noqa: F401 (a fixture)
    raw_login,
    route_login,
)

pytestmark = pytest.mark.integration


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def rss_kb(pid: int) -> int:
    """
    A process's resident memory, in KiB.
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


async def chat_on(reactor: Any, procs: Lab, cluster: Any, group: str) -> None:  # noqa: F811
    """
    Three library clients chat through C{cluster}: every acknowledged
    message arrives once, in order.
    """
    members = await members_in_group(reactor, procs, cluster, 3, group)
    chat = Chat(reactor, members, group, seed=13)
    chat.start()
    await chat.wait_acks(30)
    await chat.stop()
    await chat.finish()


async def hgetall(redis_url: str, key: str) -> dict[str, str]:
    from cim.store.redis import connect_redis

    store = await connect_redis(redis_url)
    try:
        flat = await store._redis.execute_command("HGETALL", key)
    finally:
        await store.close()
    return dict(zip(flat[::2], flat[1::2]))


# 2. One frame can wipe anyone's inbox


@pytest_twisted.ensureDeferred
async def test_no_sender_can_push_out_a_receivers_unread_message(
    reactor: Any,
    procs: Lab,  # noqa: F811
    clients: Any,  # noqa: F811
    zk_url: str,
) -> None:
    _, cluster = await procs.redis_cluster(
        reactor, zk_url, servers=1, server_args=["--rate", "100000"]
    )
    bob_name = unique("bob")
    bob = await route_login(reactor, cluster, bob_name)
    # Bob is offline; carol's message waits for him.
    _, reply = await call(reactor, f"{cluster.url}/offLine", {"userId": bob["userId"]},
                          headers={"Authorization": f"Bearer {bob['token']}"})  # fmt: skip
    assert reply["code"] == "9000", reply
    carol, _ = await raw_login(reactor, cluster, unique("carol"))
    carol.send(
        Frame(cmd=Command.MESSAGE, req_msg="unread", receive_user_id=bob["userId"])
    )
    await carol.wait_frame(Command.ACK)

    attacker, attacker_id = await raw_login(reactor, cluster, unique("mallory"))
    # One frame of 16,000 texts is refused whole (the rate limit, counted
    # in messages, would close it at the default --rate).
    attacker.send(
        Frame(
            cmd=Command.MESSAGE,
            receive_user_id=bob["userId"],
            batch=tuple("x" for _ in range(16_000)),
            client_msg_id="big",
        )
    )
    error = await attacker.wait_frame(Command.ERROR)
    assert error.error_code == ErrorCode.INVALID_ARGUMENT, error
    assert f"at most {MAX_BATCH} texts" in error.error_reason
    attacker.frames.clear()
    # Frames within the limits: the quota stops them at 5,000.
    frames = (SENDER_QUOTA + 1000) // MAX_BATCH
    for i in range(frames):
        attacker.send(
            Frame(
                cmd=Command.MESSAGE,
                receive_user_id=bob["userId"],
                batch=tuple(f"spam {i}.{j}" for j in range(MAX_BATCH)),
                client_msg_id=f"spam-{i}",
            )
        )
    await attacker.wait(
        lambda: (
            len([f for f in attacker.frames if f.cmd in (Command.ACK, Command.ERROR)])
            >= frames
        ),
        "an answer to every send",
    )
    acks = [f for f in attacker.frames if f.cmd == Command.ACK]
    refused = [f for f in attacker.frames if f.cmd == Command.ERROR]
    assert len(acks) == SENDER_QUOTA // MAX_BATCH
    assert {f.error_code for f in refused} == {ErrorCode.RATE_LIMITED}
    assert not attacker.closed.called
    # Over HTTP too: batchMsg is capped, and the quota is the same.
    mallory = await route_login(reactor, cluster, unique("mallory"))
    auth = {"Authorization": f"Bearer {mallory['token']}"}
    body = {"userId": mallory["userId"], "receiveUserId": bob["userId"]}
    _, reply = await call(reactor, f"{cluster.url}/p2pRoute",
                          {**body, "batchMsg": ["x"] * 16_000}, headers=auth)  # fmt: skip
    assert reply["code"] == "3000", reply
    del attacker_id

    # Bob logs in and gets carol's message, then every stored spam.
    info = await route_login(reactor, cluster, bob_name)
    reader = await connect(reactor, int(info["cimServerPort"]))
    reader.send_login(info["userId"], bob_name, info["token"])
    await reader.wait(
        lambda: len(reader.messages()) >= 1 + SENDER_QUOTA, "bob's messages", 60
    )
    texts = [m.text for m in reader.messages()]
    assert texts[0] == "unread"
    assert len(texts) == 1 + SENDER_QUOTA
    reader.abort()
    await chat_on(reactor, procs, cluster, unique("quota"))


# 3. One ACK breaks an account for good


@pytest_twisted.ensureDeferred
async def test_one_ack_cannot_break_an_account(
    reactor: Any,
    procs: Lab,  # noqa: F811
    clients: Any,  # noqa: F811
    zk_url: str,
) -> None:
    redis, cluster = await procs.redis_cluster(reactor, zk_url, servers=1)
    name = unique("victim")
    raw, user_id = await raw_login(reactor, cluster, name)
    sender, _ = await raw_login(reactor, cluster, unique("friend"))
    sender.send(Frame(cmd=Command.MESSAGE, req_msg="hello", receive_user_id=user_id))
    (hello,) = await raw.wait_texts(["hello"])
    conversation = hello.conversation
    for batch in range(20):
        raw.send(
            Frame(
                cmd=Command.ACK,
                cursors=(
                    Cursor("p:998:999", 2**63 - 1, hello.epoch),
                    Cursor(conversation, 2**63 - 1, hello.epoch),
                    *[Cursor(f"g:made-up-{batch}-{i}", 1) for i in range(1000)],
                ),
            )
        )
    raw.send(Frame(cmd=Command.ACK, cursors=(Cursor(conversation, 1, hello.epoch),)))
    await raw.hang_up()

    async def cursors() -> dict[str, Position]:
        from cim.store.redis import connect_redis

        store = await connect_redis(redis.url())
        try:
            return await store.get_cursors(user_id)
        finally:
            await store.close()

    await wait_until(reactor, cursors, "the cursor")
    # Only the cursor of what it was sent was stored.
    assert await cursors() == {conversation: Position(hello.epoch, 1)}
    assert user_id not in await cluster.online()
    # The account logs in again, and chats.
    again, _ = await raw_login(reactor, cluster, name)
    sender.send(Frame(cmd=Command.MESSAGE, req_msg="again", receive_user_id=user_id))
    await again.wait_texts(["again"])
    assert user_id in await cluster.online()
    again.abort()
    await chat_on(reactor, procs, cluster, unique("acks"))


# 4. No limit on what a server buffers for a client that never reads


@pytest_twisted.ensureDeferred
async def test_a_client_that_never_reads_is_dropped(
    reactor: Any,
    procs: Lab,  # noqa: F811
    clients: Any,  # noqa: F811
    zk_url: str,
) -> None:
    _, cluster = await procs.redis_cluster(
        reactor,
        zk_url,
        servers=1,
        server_args=["--max-output", str(1024 * 1024), "--rate", "100000",
                     "--sender-quota", "0"],
    )  # fmt: skip
    server = cluster.servers["server1"].daemon
    assert server.process is not None
    before = rss_kb(server.process.pid)
    name = unique("sloth")
    sloth, sloth_id = await raw_login(reactor, cluster, name)
    assert sloth.transport is not None
    sloth.transport.pauseProducing()  # it never reads again
    flooder, _ = await raw_login(reactor, cluster, unique("flood"))
    flooder.MAX_LENGTH = 16 * 1024 * 1024  # its own batches come back
    text = "f" * 4000
    sent = 0

    def acks() -> int:
        return sum(f.cmd == Command.ACK for f in flooder.frames)

    # 60 MB for the sloth: far more than the kernel's buffers hold.  (The
    # flooder gets its own messages too, and reads them.)
    for i in range(1000):
        assert flooder.transport is not None
        flooder.transport.write(
            encode_framed(
                Frame(
                    cmd=Command.MESSAGE,
                    receive_user_id=sloth_id,
                    batch=tuple(text for _ in range(15)),
                    client_msg_id=f"f{i}",
                )
            )
        )
        sent += 15
        if i % 5 == 4:
            wanted = i - 2
            await flooder.wait(
                lambda wanted=wanted: acks() >= wanted,  # type: ignore[misc]
                "acknowledgements",
                30,
            )
            if "Dropping" in server.log_text():
                break
    await wait_until(reactor, lambda: "Dropping" in server.log_text(), "the drop", 30)
    assert f"Dropping {sloth_id}" in server.log_text()
    await flooder.wait(lambda: acks() >= sent // 15, "every acknowledgement", 60)
    assert not flooder.find(Command.ERROR)
    after = rss_kb(server.process.pid)
    # Far less than the 60 MB meant for the sloth stayed in the server.
    assert after - before < 40 * 1024, (before, after)
    flooder.abort()
    sloth.transport.resumeProducing()
    await within(reactor, sloth.closed, 10)
    # Others chat on; the sloth gets everything at its next login.
    await chat_on(reactor, procs, cluster, unique("sloth"))
    info = await route_login(reactor, cluster, name)
    reader = await connect(reactor, int(info["cimServerPort"]))
    reader.MAX_LENGTH = 16 * 1024 * 1024  # replay pages of 200 long texts
    reader.send_login(info["userId"], name, info["token"])
    await reader.wait(
        lambda: len(reader.messages()) >= sent, "the sloth's messages", 60
    )
    assert len(reader.messages()) == sent
    reader.abort()


# 6. Sessions stuck online


@pytest_twisted.ensureDeferred
async def test_a_restarted_server_drops_its_old_sessions(
    reactor: Any,
    procs: Lab,  # noqa: F811
    clients: Any,  # noqa: F811
    zk_url: str,
) -> None:
    _, cluster = await procs.redis_cluster(reactor, zk_url, servers=1)
    server = cluster.servers["server1"].daemon
    names = [unique("held") for _ in range(3)]
    held = [await raw_login(reactor, cluster, name) for name in names]
    ids = {user_id for _, user_id in held}
    assert ids <= await cluster.online()
    server.kill()
    started = time.monotonic()
    server.start(keep_ports=True)
    await server.wait_ready(reactor)
    assert time.monotonic() - started < 10
    # At once: nobody listed, every one may log in again.
    assert not ids & await cluster.online()
    for name in names:
        raw, user_id = await raw_login(reactor, cluster, name)
        assert user_id in ids
        raw.abort()
    await chat_on(reactor, procs, cluster, unique("restart"))


@pytest_twisted.ensureDeferred
async def test_a_session_nobody_renews_expires(
    reactor: Any,
    procs: Lab,  # noqa: F811
    clients: Any,  # noqa: F811
    zk_url: str,
) -> None:
    """
    Every daemon killed (or stopped while Redis was away): no session
    stays online past the session ttl.
    """
    ttl = 3.0
    redis, cluster = await procs.redis_cluster(
        reactor, zk_url, servers=1, server_args=["--session-ttl", str(ttl)]
    )
    names = [unique("ghost") for _ in range(2)]
    held = [await raw_login(reactor, cluster, name) for name in names]
    # Renewed past the ttl while the server runs.
    await deferLater(reactor, ttl * 1.5, lambda: None)
    ids = {user_id for _, user_id in held}
    assert ids <= await cluster.online()
    for daemon in cluster.daemons():
        daemon.kill()
    killed = time.monotonic()
    online = await hgetall(redis.url(), "cim:online")
    assert {int(u) for u in online} >= ids

    async def gone() -> bool:
        from cim.store.redis import connect_redis

        store = await connect_redis(redis.url())
        try:
            users = await store.online_users()
            sessions = [await store.get_session(u) for u in ids]
        finally:
            await store.close()
        return not ids & {u for u, _ in users} and sessions == [None] * len(ids)

    await wait_until(reactor, gone, "the sessions to expire", ttl + 5, 0.2)
    assert time.monotonic() - killed < ttl + 2
    # The cluster comes back; everyone logs in again.
    for daemon in cluster.daemons():
        daemon.start()
    for daemon in cluster.daemons():
        await daemon.wait_ready(reactor)
    await cluster.wait_listed(set(cluster.servers))
    for name in names:
        raw, _ = await raw_login(reactor, cluster, name)
        raw.abort()
    await chat_on(reactor, procs, cluster, unique("expiry"))
