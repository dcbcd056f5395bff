"""
The IM servers' push API, the contract between its two ends: the routes and
servers that call it (L{cim.pusher}) and the server that answers it
(L{cim.server.push}).  Every request is a JSON POST carrying the cluster
secret in L{SECRET_HEADER}; every answer is CIM's envelope.

- C{/push}: C{{"items": [item...]}}, each item
  C{{"messages": [message...], "users": [id...]}} (write the messages to
  every device of those users connected there) or
  C{{"read": {"userId", "conversation", "seq"}, "users": [id...]}} (tell
  those devices, in a READ frame, that user C{userId} read the conversation
  up to C{seq}); answered with C{{"missing": [[id...], ...]}}, one list per
  item: the users with no device connected there.  Items are applied in
  order.
- C{/kick}: C{{userId, sessionId, reason, loggedOff?}}, answered with
  C{{"kicked": bool}} once the connection's cursors are saved.
- C{/resync}: C{{userId}}; 7000 when the user is not connected there.
- C{/sendMsg}: CIM's C{{msg, batchMsg, userId, cmd, properties}}.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cim.message import (
    KICK_REPLACED,
    ChatMessage,
    message_from_dict,
    message_to_dict,
)

#: The header carrying the cluster secret between daemons (and from
#: application back-ends to the route).
SECRET_HEADER = b"X-Cim-Secret"

PUSH = "push"
KICK = "kick"
RESYNC = "resync"
SEND_MSG = "sendMsg"

#: Why a connection is kicked when the request does not say.
KICK_REASON = KICK_REPLACED


@dataclass(frozen=True, slots=True)
class ReadEvent:
    """
    User C{reader_id} read C{conversation} up to C{seq}.
    """

    reader_id: int
    conversation: str
    seq: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "userId": self.reader_id,
            "conversation": self.conversation,
            "seq": self.seq,
        }

    @classmethod
    def from_dict(cls, data: Any) -> ReadEvent:
        """
        @raise ValueError: C{data} is not a read event.
        """
        if not isinstance(data, Mapping) or not isinstance(
            data.get("conversation"), str
        ):
            raise ValueError("a read event needs userId, conversation and seq")
        return cls(integer(data, "userId"), data["conversation"], integer(data, "seq"))


#: Messages, or a read event, for some users: one item of a C{/push}.
PushItem = tuple[Sequence[ChatMessage] | ReadEvent, Sequence[int]]


def integer(body: Mapping[str, Any], key: str) -> int:
    """
    An integer field (a JSON number or a string of digits).

    @raise ValueError: it is missing or not an integer.
    """
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{key} must be an integer")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{key} must be an integer") from None


def push_request(items: Sequence[PushItem]) -> dict[str, Any]:
    out = []
    for what, users in items:
        if isinstance(what, ReadEvent):
            out.append({"read": what.to_dict(), "users": list(users)})
        else:
            out.append(
                {"messages": [message_to_dict(m) for m in what], "users": list(users)}
            )
    return {"items": out}


def parse_push(body: Mapping[str, Any]) -> list[PushItem]:
    """
    @raise ValueError: C{body} is not a push request.
    """
    items = body.get("items")
    if not isinstance(items, list):
        raise ValueError("items must be a list")
    parsed: list[PushItem] = []
    for item in items:
        try:
            what: Sequence[ChatMessage] | ReadEvent
            if "read" in item:
                what = ReadEvent.from_dict(item["read"])
            else:
                what = [message_from_dict(m) for m in item["messages"]]
            users = [int(u) for u in item["users"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"bad item: {e}") from None
        parsed.append((what, users))
    return parsed


def push_reply(missing: Sequence[Sequence[int]]) -> dict[str, Any]:
    return {"missing": [list(m) for m in missing]}


def parse_push_reply(data: Any, count: int) -> list[list[int]]:
    """
    The users missing from each of C{count} items.

    @raise ValueError: the reply does not answer C{count} items.
    """
    try:
        missing = [[int(u) for u in m] for m in data["missing"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"a malformed push reply: {e}") from None
    if len(missing) != count:
        raise ValueError(f"answered {len(missing)} of {count} items")
    return missing


@dataclass(frozen=True, slots=True)
class Kick:
    """
    Close the connection of C{user_id}'s device whose session is
    C{session_id} (every device's when empty); C{logged_off}: because the
    user logged off.
    """

    user_id: int
    session_id: str = ""
    reason: str = KICK_REASON
    logged_off: bool = False

    def request(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "userId": self.user_id,
            "sessionId": self.session_id,
            "reason": self.reason,
        }
        if self.logged_off:
            body["loggedOff"] = True
        return body

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> Kick:
        """
        @raise ValueError: C{body} is not a kick request.
        """
        return cls(
            user_id=integer(body, "userId"),
            session_id=str(body.get("sessionId") or ""),
            reason=str(body.get("reason") or KICK_REASON),
            logged_off=body.get("loggedOff") is True,
        )


def resync_request(user_id: int) -> dict[str, Any]:
    return {"userId": user_id}
