"""
Account takeover, tried on a real C{twistd cim-standalone} (default
options, the cluster secret in a file): an attacker who knows Alice's name
gets neither her id, nor a token, nor her messages; Alice, with the account
key her client keeps in its state folder, still logs in (also after a
restart of her client) and chats; look-alike and control-character names
are refused; guessing is rate limited.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq

from cim.client.library import Client, QueueListener
from tests.clientkit import take_messages, within
from tests.kit.cluster import Daemon
from tests.kit.wait import take_until

SECRET = "a-secret-kept-in-a-file"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[str]:
    """
    C{twistd cim-standalone} with its defaults (no legacy flag), the secret
    from C{--secret-file}; @return: the route's URL.
    """
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    daemon = Daemon(
        "standalone", "cim-standalone", ["--secret-file", str(secret_file)], tmp_path
    )
    try:
        daemon.start()
        route_port = daemon.wait_ready_blocking()["route"]
        yield f"http://127.0.0.1:{route_port}"
        log = daemon.log_text()
        assert "Unhandled" not in log and "Traceback" not in log, log[-5000:]
        assert SECRET not in log
    finally:
        daemon.stop_blocking()


@pytest.fixture
def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


async def post(
    reactor: Any, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """
    An attacker's call: POST C{body}, as cim's clients do (extended replies).
    """
    raw = {k.encode(): [v.encode()] for k, v in (headers or {}).items()}
    raw[b"X-Cim-Extended"] = [b"1"]
    raw[b"Content-Type"] = [b"application/json"]
    d = treq.post(url, data=json.dumps(body).encode(), headers=raw, persistent=False)
    response = await within(reactor, d)
    answer: dict[str, Any] = json.loads(await within(reactor, response.content()))
    return answer


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_no_takeover_by_name(reactor: Any, node: str, tmp_path: Path) -> None:
    alice_events, bob_events = QueueListener(), QueueListener()
    alice = Client(reactor, node, listener=alice_events, state_dir=tmp_path / "alice")
    bob = Client(reactor, node, listener=bob_events, state_dir=tmp_path / "bob")
    await within(reactor, alice.login("alice"))
    await within(reactor, bob.login("bob"))
    assert alice.user_id is not None and bob.user_id is not None
    await within(reactor, bob.send_private(alice.user_id, "for alice only"))
    await take_messages(reactor, alice_events, 1)
    await alice.close()
    await within(reactor, bob.send_private(alice.user_id, "while she is away"))

    # The attacker knows the name "alice".
    for name in ("alice", "Alice", " alice", "\u0430lice", "\uff41lice"):
        answer = await post(reactor, node + "/registerAccount", {"userName": name})
        assert answer["code"] == "4090", answer
        assert answer["dataBody"] is None
        assert str(alice.user_id) not in answer["message"]
    # Guessing ids, keys and passwords: no token, and soon no answers.
    for user_id in range(1, 5):
        body = {"userId": user_id, "userName": "alice", "accountKey": "guess"}
        answer = await post(reactor, node + "/login", body)
        assert (answer["code"], answer["dataBody"]) == ("9100", None), answer
    codes = []
    for _ in range(11):
        body = {"userId": alice.user_id, "userName": "alice", "password": "guess"}
        answer = await post(reactor, node + "/login", body)
        assert answer["dataBody"] is None, answer
        codes.append(answer["code"])
    assert codes[-1] == "6000" and set(codes) == {"9100", "6000"}
    # Her messages: not without her token.
    body = {"userId": alice.user_id, "peerId": alice.user_id}
    answer = await post(reactor, node + "/history", body)
    assert answer["code"] == "4010" and answer["dataBody"] is None
    # Control characters and whitespace-only names are refused.
    for name in ("ali\u200bce", "\u202ealice", "\x1b[31malice", "al\nice", "\t "):
        answer = await post(reactor, node + "/registerAccount", {"userName": name})
        assert answer["code"] == "3000", (name, answer)

    # Malformed input is a plain 3000: JSON nested too deep, and a lone
    # surrogate (valid JSON escapes, not valid text).
    for raw_body in (
        b"[" * 100_000 + b"]" * 100_000,
        b'{"userName": "\\ud800x"}',
        b'{"userId": 1, "receiveUserId": 2, "msg": "a\\udc00"}',
    ):
        for path in ("/registerAccount", "/p2pRoute"):
            d = treq.post(
                node + path,
                data=raw_body,
                headers={b"X-Cim-Secret": [SECRET.encode()]},
                persistent=False,
            )
            response = await within(reactor, d)
            answer = json.loads(await within(reactor, response.content()))
            assert answer["code"] == "3000", (path, raw_body[:40], answer)

    # Alice's client, restarted on her state folder: no password asked,
    # her account, her message kept while she was away, and she chats.
    alice_events = QueueListener()
    alice = Client(reactor, node, listener=alice_events, state_dir=tmp_path / "alice")
    await within(reactor, alice.login("alice"))
    assert alice.account_key
    [kept] = await take_messages(reactor, alice_events, 1)
    assert kept.text == "while she is away"
    await within(reactor, alice.send_private(bob.user_id, "hi bob"))
    # (Bob's view holds his own two messages first.)
    got = await take_until(
        reactor, bob_events.messages, lambda m: m.text == "hi bob", "hi bob"
    )
    assert got.sender_name == "alice"
    history = await within(reactor, alice.history(peer=bob.user_id, after_seq=0))
    assert [m.text for m in history] == [
        "for alice only",
        "while she is away",
        "hi bob",
    ]
    # A look-alike of an existing name is refused to its other owner too.
    mallory = Client(reactor, node, state_dir=tmp_path / "mallory")
    with pytest.raises(Exception) as refused:
        await within(reactor, mallory.login("b\u043eb"))
    assert getattr(refused.value, "code", None) == "4090"
    await alice.close()
    await bob.close()
    await mallory.close()
