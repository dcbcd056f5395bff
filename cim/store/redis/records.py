"""
What L{cim.store.redis.store.RedisStore} keeps in Redis values, and how it
reads them back (where the keys are: L{cim.store.redis.store}).

A stored message (a C{conv} member) is a compact JSON object with short
keys, always starting with C{"i"} (msg_id), C{"q"} (seq) and C{"ts"}
(milliseconds) in that order, so the append script reads a timestamp without
decoding JSON; then C{"s"} sender id, C{"n"} sender name, C{"t"} text, and
when not empty C{"c"} client_msg_id, C{"r"} receive_user_id, C{"g"} group_id.
The append script writes C{"i"} and C{"q"}; L{encode_message} the rest.

A session record (a C{session} hash) holds L{SESSION_FIELDS}, C{connected}
being C{"0"} or C{"1"}.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from cim.interfaces import NewMessage, Session
from cim.message import ChatMessage

#: The fields of a session record, in the order L{decode_session} reads them.
SESSION_FIELDS = ("name", "server", "session_id", "connected")


def encode_message(message: NewMessage, timestamp: int) -> bytes:
    """
    The JSON body of a stored message, without its ids (the append script
    puts them in front), in UTF-8.

    Strings holding lone surrogates (which UTF-8 cannot carry, but a JSON
    request may) are escaped rather than failing the whole batch.
    """
    body: dict[str, Any] = {
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
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(body, separators=(",", ":")).encode("ascii")


def decode_message(conversation: str, member: str) -> ChatMessage:
    """
    A stored message from its JSON.
    """
    d = json.loads(member)
    return ChatMessage(
        msg_id=d["i"],
        conversation=conversation,
        seq=d["q"],
        sender_id=d["s"],
        sender_name=d.get("n", ""),
        text=d.get("t", ""),
        timestamp=d["ts"],
        client_msg_id=d.get("c", ""),
        receive_user_id=d.get("r", 0),
        group_id=d.get("g", ""),
    )


def decode_session(user_id: int, fields: Sequence[Any]) -> Session:
    """
    The session of C{user_id} from the values of its record's
    L{SESSION_FIELDS}.
    """
    name, server, session_id, connected = fields
    return Session(user_id, name, server, session_id, connected == "1")
