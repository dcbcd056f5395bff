"""
The Redis store's records: a stored message's JSON, written out by hand
for speed, is what L{json} makes of the same fields, and reads back.
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from cim.interfaces import NewMessage
from cim.message import ChatMessage
from cim.store.redis.records import decode_message, encode_stored, message_fields

ids = st.integers(min_value=0, max_value=2**53)
#: Any text a JSON request may carry, lone surrogates included.
texts = st.text(st.characters(codec=None, exclude_categories=()))


def as_json(message: NewMessage, timestamp: int, ascii: bool) -> bytes:
    body = {
        "ts": timestamp,
        "s": message.sender_id,
        "n": message.sender_name,
        "t": message.text,
    }
    if message.client_msg_id:
        body["c"] = message.client_msg_id
    if message.receive_user_id:
        body["r"] = message.receive_user_id
    if message.group_id:
        body["g"] = message.group_id
    return json.dumps(body, ensure_ascii=ascii, separators=(",", ":")).encode("utf-8")


@given(
    timestamp=ids,
    sender=ids,
    name=texts,
    text=texts,
    cmid=texts,
    receiver=ids,
    group=texts,
)
def test_message_fields_are_what_json_makes_of_them(
    timestamp: int,
    sender: int,
    name: str,
    text: str,
    cmid: str,
    receiver: int,
    group: str,
) -> None:
    message = NewMessage("p:1:2", sender, name, text, cmid, receiver, group)
    fields = message_fields(message, timestamp)
    try:
        expected = as_json(message, timestamp, ascii=False)
    except UnicodeEncodeError:
        # A lone surrogate: every string escaped instead.
        expected = as_json(message, timestamp, ascii=True)
    assert b"{" + fields + b"}" == expected
    assert json.loads(b"{" + fields + b"}") == json.loads(expected)


def test_a_stored_message_reads_back() -> None:
    stored = ChatMessage(
        msg_id=41,
        conversation="p:1:2",
        seq=7,
        sender_id=1,
        sender_name='a "quoted" \\ name',
        text="h\u00e9llo\n\u2028 \U0001f600 \ud800",
        timestamp=1_700_000_000_000,
        client_msg_id="0.1",
        receive_user_id=2,
        epoch="e1",
    )
    assert decode_message("p:1:2", encode_stored(stored)) == stored
