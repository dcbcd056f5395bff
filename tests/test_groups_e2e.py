"""
Groups on real processes (Redis, ZooKeeper, one C{twistd cim-route}, two
C{twistd cim-server}s): an outsider can neither join a group by invitation
nor read its history; an invited user joins, receives and reads only the
messages from its join on (also when it logs in again), and the members
chat.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_twisted
import treq
from twisted.internet.task import deferLater

from cim.client.library import Client, QueueListener, RouteError, SendError
from cim.message import ChatMessage, group_conversation
from tests.kit.cluster import Cluster, Processes
from tests.kit.wait import take_until, within

pytestmark = pytest.mark.integration

SECRET = "groups-e2e-secret"
#: The Redis database this module's cluster uses (emptied first).
GROUPS_DB = 11


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from twisted.internet import reactor

    redis = os.environ.get("CIM_TEST_REDIS")
    zk = os.environ.get("CIM_TEST_ZK")
    if not redis or not zk:
        if os.environ.get("CI"):
            pytest.fail("CIM_TEST_REDIS / CIM_TEST_ZK not set; run `make test`")
        pytest.skip("needs Redis and ZooKeeper (make test)")
    directory = tmp_path_factory.mktemp("groups")
    processes = Processes(directory, reactor)
    store = f"redis://{urlsplit(redis).netloc}/{GROUPS_DB}"
    root = f"/cimgroups-{uuid.uuid4().hex[:8]}"
    cluster = Cluster(
        processes, directory, store, f"zk://{urlsplit(zk).netloc}{root}", SECRET
    )
    try:
        cluster.start_blocking()
        yield cluster
    finally:
        processes.stop_all()


async def client(
    reactor: Any, cluster: Cluster, name: str, state: Path
) -> tuple[Client, QueueListener]:
    events = QueueListener()
    c = Client(reactor, cluster.url, listener=events, state_dir=state / name)
    await within(reactor, c.login(name))
    return c, events


async def post(cluster: Cluster, path: str, body: dict, token: str | None) -> dict:
    headers = {b"Content-Type": [b"application/json"], b"X-Cim-Extended": [b"1"]}
    if token:
        headers[b"Authorization"] = [f"Bearer {token}".encode()]
    response = await treq.post(
        cluster.url + path, data=json.dumps(body).encode(), headers=headers
    )
    return json.loads(await response.content())  # type: ignore[no-any-return]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


async def group_text(
    reactor: Any, events: QueueListener, group: str, text: str
) -> ChatMessage:
    """
    The message of C{group} saying C{text}, dropping the others.
    """
    return await take_until(
        reactor,
        events.messages,
        lambda m: m.group_id == group and m.text == text,
        f"{text!r} in {group}",
    )


def texts_of(events: QueueListener, group: str) -> list[str]:
    """
    The texts of C{group} that arrived and were not taken yet.
    """
    return [m.text for m in events.pending_messages() if m.group_id == group]


@pytest_twisted.ensureDeferred
async def test_invitation_history_and_chat(
    reactor: Any, cluster: Cluster, tmp_path: Path
) -> None:
    group = unique("team")
    conversation = group_conversation(group)
    names = {who: unique(who) for who in ("owner", "invited", "outsider")}
    owner, owner_events = await client(reactor, cluster, names["owner"], tmp_path)
    bob, bob_events = await client(reactor, cluster, names["invited"], tmp_path)
    eve, eve_events = await client(reactor, cluster, names["outsider"], tmp_path)
    try:
        await within(reactor, owner.create_group(group))
        for text in ("before 1", "before 2"):
            await within(reactor, owner.send_group(group, text))
            await group_text(reactor, owner_events, group, text)

        # The outsider can neither join nor read nor send.
        with pytest.raises(RouteError) as refused:
            await within(reactor, eve.join_group(group))
        assert refused.value.code == "4010"
        for path, body in [
            ("/history", {"userId": eve.user_id, "conversation": conversation}),
            ("/group/members", {"userId": eve.user_id, "groupId": group}),
            ("/group/info", {"userId": eve.user_id, "groupId": group}),
        ]:
            answer = await post(cluster, path, body, eve.token)
            assert answer["code"] == "4010", (path, answer)
        with pytest.raises(SendError):
            await within(reactor, eve.send_group(group, "let me in"))

        # Invited, Bob joins; he reads and receives from his join on.
        assert bob.user_id is not None
        assert await within(reactor, owner.invite_to_group(group, bob.user_id))
        assert await within(reactor, bob.join_group(group))
        assert await within(reactor, bob.history(conversation, after_seq=0)) == []
        await within(reactor, owner.send_group(group, "after 1"))
        await within(reactor, bob.send_group(group, "from bob"))
        for events in (owner_events, bob_events):
            for text in ("after 1", "from bob"):
                got = await group_text(reactor, events, group, text)
                assert got.conversation == conversation
        history = await within(reactor, bob.history(conversation, after_seq=0))
        assert [m.text for m in history] == ["after 1", "from bob"]
        history = await within(reactor, owner.history(conversation, after_seq=0))
        assert [m.text for m in history] == [
            "before 1",
            "before 2",
            "after 1",
            "from bob",
        ]

        # Logged in again, Bob gets what he missed, nothing from before.
        await bob.close()
        await within(reactor, owner.send_group(group, "while away"))
        bob, bob_events = await client(reactor, cluster, names["invited"], tmp_path)
        await group_text(reactor, bob_events, group, "while away")
        await deferLater(reactor, 0.5, lambda: None)
        assert "before 1" not in texts_of(bob_events, group)

        # The outsider got nothing of the group, and still cannot read it.
        assert texts_of(eve_events, group) == []
        answer = await post(
            cluster,
            "/history",
            {"userId": eve.user_id, "conversation": conversation},
            eve.token,
        )
        assert answer["code"] == "4010"
    finally:
        for c in (owner, bob, eve):
            await c.close()


@pytest_twisted.ensureDeferred
async def test_approval_on_real_processes(
    reactor: Any, cluster: Cluster, tmp_path: Path
) -> None:
    group = unique("club")
    owner, owner_events = await client(reactor, cluster, unique("owner"), tmp_path)
    carol, carol_events = await client(reactor, cluster, unique("carol"), tmp_path)
    try:
        await within(reactor, owner.create_group(group, policy="approval"))
        asked = await within(reactor, carol.join_group(group))
        assert asked.pending and not asked
        with pytest.raises(SendError):
            await within(reactor, carol.send_group(group, "too early"))
        waiting = await within(reactor, owner.join_requests(group))
        assert [u.user_id for u in waiting] == [carol.user_id]
        assert carol.user_id is not None
        await within(reactor, owner.approve_request(group, carol.user_id))
        await within(reactor, carol.send_group(group, "thanks"))
        for events in (owner_events, carol_events):
            await group_text(reactor, events, group, "thanks")
    finally:
        for c in (owner, carol):
            await c.close()
