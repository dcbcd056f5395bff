"""
The push API's contract (L{cim.pushapi}): what one end writes, the other
reads back.
"""

from __future__ import annotations

import json

import pytest

from cim import pushapi
from cim.message import ChatMessage


def chat(seq: int) -> ChatMessage:
    return ChatMessage(
        msg_id=seq,
        conversation="p:1:2",
        seq=seq,
        sender_id=1,
        sender_name="alice",
        text=f"text {seq}",
        timestamp=1_700_000_000_000 + seq,
        client_msg_id=f"c{seq}",
        receive_user_id=2,
    )


def test_push_round_trip_through_json() -> None:
    items: list[pushapi.PushItem] = [
        ([chat(1), chat(2)], [2, 3]),
        (pushapi.ReadEvent(1, "p:1:2", 2), [1, 2]),
        ([chat(3)], [4]),
    ]
    body = json.loads(json.dumps(pushapi.push_request(items)))
    assert pushapi.parse_push(body) == [(m, u) for m, u in items]
    reply = json.loads(json.dumps(pushapi.push_reply([[3], []])))
    assert pushapi.parse_push_reply(reply, 2) == [[3], []]


@pytest.mark.parametrize(
    "body",
    [{}, {"items": {}}, {"items": [{"messages": [{}], "users": [1]}]},
     {"items": [{"messages": [], "users": ["x"]}]},
     {"items": [{"read": {"userId": 1, "seq": 2}, "users": [1]}]},
     {"items": [{"read": {"userId": 1, "conversation": "p:1:2", "seq": "x"},
                 "users": [1]}]},
     {"items": [{"read": [], "users": [1]}]}],
)  # fmt: skip
def test_malformed_pushes_are_refused(body: dict) -> None:
    with pytest.raises(ValueError):
        pushapi.parse_push(body)


def test_a_reply_for_another_number_of_items_is_refused() -> None:
    with pytest.raises(ValueError, match="answered 1 of 2"):
        pushapi.parse_push_reply({"missing": [[]]}, 2)
    with pytest.raises(ValueError):
        pushapi.parse_push_reply(None, 1)


def test_kick_round_trip() -> None:
    kick = pushapi.Kick(7, "s1", "logged off", logged_off=True)
    assert pushapi.Kick.parse(json.loads(json.dumps(kick.request()))) == kick
    plain = pushapi.Kick.parse({"userId": "7"})
    assert plain == pushapi.Kick(7, "", pushapi.KICK_REASON, False)
    assert "loggedOff" not in plain.request()
    with pytest.raises(ValueError):
        pushapi.Kick.parse({"userId": True})
