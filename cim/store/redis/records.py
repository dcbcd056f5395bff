"""
What L{cim.store.redis.store.RedisStore} keeps in Redis values, and how it
reads them back (where the keys are: L{cim.store.redis.store}).

A stored message (a C{conv} member) is a compact JSON object with short
keys, always starting with C{"i"} (msg_id), C{"q"} (seq) and C{"ts"}
(milliseconds) in that order, so the append script reads a timestamp without
decoding JSON; then C{"s"} sender id, C{"n"} sender name, C{"t"} text, and
when not empty C{"c"} client_msg_id, C{"r"} receive_user_id, C{"g"} group_id;
and last C{"e"}, the conversation's epoch when it was appended (messages
stored by the previous release have none: epoch C{""}).  The append script
writes C{"i"}, C{"q"} and C{"e"}; L{message_fields} the rest.

A session record (a C{session} hash) holds L{SESSION_FIELDS}, C{connected}
being C{"0"} or C{"1"} and C{active} the seconds since the epoch as Python
writes a float (L{encode_active}), so that it reads back exactly.

A position (a cursor, a read position) is C{"<epoch>:<seq>"}, or the bare
digits of the seq when its epoch is C{""} (as the previous release wrote
cursors): L{encode_position}, L{decode_position}.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from json.encoder import encode_basestring, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

from cim.interfaces import Epoch, NewMessage, Session
from cim.limits import MAX_SEQ
from cim.message import ChatMessage, Position

#: The fields of a session record, in the order L{decode_session} reads them.
SESSION_FIELDS = ("name", "server", "session_id", "connected", "active")


def message_fields(message: NewMessage, timestamp: int) -> bytes:
    """
    The JSON fields of a stored message, without its braces, its ids (the
    append script puts them in front) nor its epoch (put last), in UTF-8:
    what L{json.dumps} makes of them with C{","} and C{":"} as separators,
    written out directly (its strings quoted by L{json}'s own C function:
    a quarter of the time of a C{json.dumps} call with options, which
    makes an encoder each time).

    Strings holding lone surrogates (which UTF-8 cannot carry, but a JSON
    request may) are escaped rather than failing the whole batch.
    """
    try:
        return _fields(message, timestamp, encode_basestring).encode("utf-8")
    except UnicodeEncodeError:
        return _fields(message, timestamp, encode_basestring_ascii).encode("ascii")


def _fields(message: NewMessage, timestamp: int, quote: Callable[[str], str]) -> str:
    text = (
        f'"ts":{timestamp:d},"s":{message.sender_id:d},'
        f'"n":{quote(message.sender_name)},"t":{quote(message.text)}'
    )
    if message.client_msg_id:
        text += f',"c":{quote(message.client_msg_id)}'
    if message.receive_user_id:
        text += f',"r":{message.receive_user_id:d}'
    if message.group_id:
        text += f',"g":{quote(message.group_id)}'
    return text


def encode_stored(message: ChatMessage) -> str:
    """
    A stored message's whole JSON (L{decode_message} reads it back), as the
    append script writes it: its ids, the body (L{message_fields}) and its
    epoch.
    """
    new = NewMessage(
        message.conversation,
        message.sender_id,
        message.sender_name,
        message.text,
        message.client_msg_id,
        message.receive_user_id,
        message.group_id,
    )
    body = message_fields(new, message.timestamp).decode("utf-8")
    epoch = json.dumps(message.epoch)
    return f'{{"i":{message.msg_id},"q":{message.seq},{body},"e":{epoch}}}'


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
        epoch=d.get("e", ""),
    )


def encode_active(active: float) -> str:
    """
    A session's active time as stored: Python's own form of the float,
    which reads back exactly.
    """
    return repr(float(active))


def decode_session(user_id: int, device: str, fields: Sequence[Any]) -> Session:
    """
    The session of C{user_id}'s C{device} from the values of its record's
    L{SESSION_FIELDS}.
    """
    name, server, session_id, connected, active = fields
    try:
        when = float(active) if active else 0.0
    except ValueError:
        when = 0.0
    return Session(
        user_id, name or "", server or "", session_id, connected == "1", device, when
    )


def encode_position(position: Position) -> str:
    """
    A position as stored (see the module docstring).
    """
    epoch, seq = position
    return f"{epoch}:{seq}" if epoch else str(seq)


def decode_position(text: str | None) -> Position | None:
    """
    A stored position, or C{None} when C{text} is not one: its seq must be
    the digits of a whole number between 0 and L{MAX_SEQ}.
    """
    if text is None:
        return None
    epoch, _, digits = text.rpartition(":")
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 16:
        return None
    seq = int(digits)
    return Position(epoch, seq) if seq <= MAX_SEQ else None


def decode_epoch(id: str, previous: str, base: str, last_seq: str) -> Epoch:
    """
    A conversation's L{Epoch} from its record's fields (C{""} each without
    one) and its last seq.
    """
    if not id:
        return Epoch(base=int(last_seq or 0))
    return Epoch(id, previous or "", int(base or 0))


def resume_seq(text: str | None, epoch: Epoch) -> int:
    """
    Where a stored position (a read position) stands in C{epoch}: 0 for none,
    or one that is not trusted (L{Epoch.resume}).
    """
    position = decode_position(text or None)
    return 0 if position is None else epoch.resume(position)[0]
