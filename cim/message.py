"""
Plain Python types for everything that crosses the wire or the store.

Nothing here knows about protobuf; L{cim.codec} converts between these types
and bytes.  The rest of the program only uses these.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

from cim.codes import Code


class Command(enum.IntEnum):
    """
    The frame commands.  0-3 are CIM v2's; the others are cim extensions.
    """

    LOGIN_REQUEST = 0
    MESSAGE = 1
    PING = 2
    OFFLINE = 3
    ACK = 4
    ERROR = 5
    KICK = 6
    LOGIN_RESPONSE = 7
    EPOCH = 8
    READ = 9


#: The codes of L{Command.ERROR} frames: the same enumeration as the HTTP
#: envelope's (L{cim.codes}).
ErrorCode = Code


#: Conversation id prefixes: the private conversation of two users, and a
#: group.  C{u:<userId>} was a user's private inbox before private
#: conversations had both sides (L{cim.store.redis.migrate} moves them).
PAIR_PREFIX = "p:"
GROUP_PREFIX = "g:"
INBOX_PREFIX = "u:"
#: The conversation of CIM-style broadcasts to every online user.
BROADCAST = "all"

#: KICK reasons after which a client must not log in again by itself: the
#: same device logged in again, or the user's newest login on another
#: device went over the device limit and this one was the least active.
KICK_REPLACED = "logged in again elsewhere"
KICK_DEVICE_LIMIT = (
    "logged out: this user logged in on more devices than allowed, and this "
    "one was the least recently active"
)


def inbox(user_id: int) -> str:
    """
    The id of C{user_id}'s private inbox of the old layout (one side only;
    only L{cim.store.redis.migrate} still reads those).
    """
    return f"{INBOX_PREFIX}{user_id}"


def pair_conversation(user_id: int, other_id: int) -> str:
    """
    The conversation id of the private chat between two users (both sides,
    one sequence): C{p:<lower id>:<higher id>}; C{p:<id>:<id>} for a user's
    notes to itself.
    """
    low, high = sorted((user_id, other_id))
    return f"{PAIR_PREFIX}{low}:{high}"


def pair_members(conversation: str) -> tuple[int, int] | None:
    """
    The two user ids of a L{pair_conversation} id (lower first), or
    C{None} when C{conversation} is not one.
    """
    if not conversation.startswith(PAIR_PREFIX):
        return None
    low, sep, high = conversation[len(PAIR_PREFIX) :].partition(":")
    if not (sep and low.isdigit() and high.isdigit() and low.isascii()):
        return None
    if not high.isascii() or str(int(low)) != low or str(int(high)) != high:
        return None
    if int(low) < 1 or int(low) > int(high):
        return None
    return int(low), int(high)


def peer_of(conversation: str, user_id: int) -> int | None:
    """
    The other user of a private conversation of C{user_id} (C{user_id}
    itself for its notes to itself), or C{None} when C{conversation} is not
    a private conversation of that user.
    """
    members = pair_members(conversation)
    if members is None or user_id not in members:
        return None
    low, high = members
    return high if low == user_id else low


def group_conversation(group_id: str) -> str:
    """
    The conversation id of group C{group_id}.
    """
    return f"{GROUP_PREFIX}{group_id}"


class Position(NamedTuple):
    """
    A place in a conversation: C{seq} in the sequence of epoch C{epoch}
    (L{cim.interfaces.Epoch}; C{""}: from before epochs, or unknown).
    """

    epoch: str
    seq: int


@dataclass(frozen=True, slots=True)
class Cursor:
    """
    A position in C{conversation}.  From a client (login, ACK): everything
    up to and including C{seq} of epoch C{epoch} was received; in a READ
    frame: read up to C{seq}.  From the server (LOGIN_RESPONSE, EPOCH):
    where the server starts the conversation for this connection; C{reset}
    when the client's position was of another epoch and cannot be trusted
    (the store lost or replaced what came after C{seq}).
    """

    conversation: str
    seq: int
    epoch: str = ""
    reset: bool = False


# A Cursor's fields, each set through its slot: the frozen __init__ looks
# up and calls object.__setattr__ per field, and every ACK a client sends
# carries a cursor per conversation that moved.
_SET_CONVERSATION, _SET_SEQ, _SET_EPOCH, _SET_RESET = (
    Cursor.__dict__[f.name].__set__ for f in fields(Cursor)
)


def new_cursor(conversation: str, seq: int, epoch: str, reset: bool) -> Cursor:
    """
    C{Cursor(conversation, seq, epoch, reset)}, the same frozen cursor,
    made without its C{__init__} (for the decoding of clients' frames).
    """
    made = object.__new__(Cursor)
    _SET_CONVERSATION(made, conversation)
    _SET_SEQ(made, seq)
    _SET_EPOCH(made, epoch)
    _SET_RESET(made, reset)
    return made


@dataclass(slots=True)
class ChatMessage:
    """
    A stored chat message.

    @ivar msg_id: unique over the whole system, assigned by the store.
    @ivar conversation: where it is stored (L{inbox} or L{group_conversation}
        or L{BROADCAST}).
    @ivar seq: its position in C{conversation}: 1, 2, 3, ... with no gaps.
    @ivar timestamp: milliseconds since the epoch, when it was stored.
    @ivar epoch: the conversation's epoch when it was stored
        (L{cim.interfaces.Epoch}); C{(epoch, seq)} names one message for
        ever, even across a store that lost messages and numbered new ones
        again.  C{""} for messages stored before epochs.
    """

    msg_id: int
    conversation: str
    seq: int
    sender_id: int
    sender_name: str
    text: str
    timestamp: int
    client_msg_id: str = ""
    receive_user_id: int = 0
    group_id: str = ""
    epoch: str = ""


@dataclass(slots=True)
class Frame:
    """
    One decoded frame.  Fields left at their defaults are not on the wire.

    Frames and messages are plain (not frozen) dataclasses because they are
    built on the hot path, where a frozen dataclass's C{__init__} costs
    several times more; treat them as immutable all the same.
    """

    cmd: Command
    req_msg: str = ""
    request_id: int = 0
    properties: Mapping[str, str] = field(default_factory=dict)
    batch: Sequence[str] = ()
    token: str = ""
    client_msg_id: str = ""
    msg_id: int = 0
    seq: int = 0
    conversation: str = ""
    receive_user_id: int = 0
    group_id: str = ""
    error_code: int = 0
    error_reason: str = ""
    cursors: Sequence[Cursor] = ()
    messages: Sequence[ChatMessage] = ()
    redirect: str = ""
    timestamp: int = 0
    device: str = ""


def batch_client_msg_ids(client_msg_id: str, count: int) -> list[str]:
    """
    The client message ids of the C{count} texts of one send with id
    C{client_msg_id}: the first keeps it, the others get C{#1}, C{#2}...
    (none when the send has none).
    """
    if not client_msg_id:
        return [""] * count
    return [client_msg_id] + [f"{client_msg_id}#{i}" for i in range(1, count)]


def message_to_dict(message: ChatMessage) -> dict[str, object]:
    """
    The JSON form of a message (HTTP API and push API), with CIM-style names.
    """
    out: dict[str, object] = {
        "msgId": message.msg_id,
        "conversation": message.conversation,
        "seq": message.seq,
        "sendUserId": message.sender_id,
        "sendUserName": message.sender_name,
        "msg": message.text,
        "timestamp": message.timestamp,
    }
    if message.client_msg_id:
        out["clientMsgId"] = message.client_msg_id
    if message.receive_user_id:
        out["receiveUserId"] = message.receive_user_id
    if message.group_id:
        out["groupId"] = message.group_id
    if message.epoch:
        out["epoch"] = message.epoch
    return out


def message_from_dict(data: Mapping[str, Any]) -> ChatMessage:
    """
    Parse L{message_to_dict}'s output.

    @raise ValueError: a field is missing or has the wrong type.
    """
    try:
        return ChatMessage(
            msg_id=int(data["msgId"]),
            conversation=str(data["conversation"]),
            seq=int(data["seq"]),
            sender_id=int(data["sendUserId"]),
            sender_name=str(data["sendUserName"]),
            text=str(data["msg"]),
            timestamp=int(data["timestamp"]),
            client_msg_id=str(data.get("clientMsgId", "")),
            receive_user_id=int(data.get("receiveUserId", 0)),
            group_id=str(data.get("groupId", "")),
            epoch=str(data.get("epoch", "")),
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"bad message: {e}") from None
