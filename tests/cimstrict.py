"""
How CIM's own client (its SDK, crossoverJie/cim commit 8863d9f) reads what
cim sends it, as strictly as it does, for the compatibility tests.

- Route replies are decoded by a plain Jackson mapper into CIM's classes:
  a field that the class does not declare fails the whole call
  (L{decode_reply}).
- Every frame that is not a PING is handed to the message listener after
  its C{receiveUserId} property was parsed as a number; the SDK knows only
  CIM's four commands and CIM's five fields (L{CimHandler}).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cim.message import Command, Frame

#: CIM's BaseResponse.
ENVELOPE = frozenset({"code", "message", "reqNo", "dataBody"})
#: Jackson's longs.
_LONG = range(-(2**63), 2**63)


class StrictDecodeError(AssertionError):
    """
    CIM's client would have failed to read this.
    """


def _exact(value: Any, fields: frozenset[str], what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise StrictDecodeError(f"{what}: expected an object, got {value!r}")
    unknown = set(value) - fields
    if unknown:
        raise StrictDecodeError(f"{what}: unrecognized field(s) {sorted(unknown)}")
    return value


def _long(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise StrictDecodeError(f"{what}: {value!r} is not a long")
    try:
        number = int(value)
    except ValueError:
        raise StrictDecodeError(f"{what}: {value!r} is not a long") from None
    if number not in _LONG:
        raise StrictDecodeError(f"{what}: {value!r} overflows a long")
    return number


def _null_body(data: Any, what: str) -> None:
    # NULLBody declares no field: null or an empty object decode.
    if data is not None:
        _exact(data, frozenset(), what)


def _server(data: Any, what: str) -> None:
    # CIMServerResVO
    if data is not None:
        body = _exact(data, frozenset({"ip", "cimServerPort", "httpPort"}), what)
        _long(body.get("cimServerPort", 0), f"{what}.cimServerPort")
        _long(body.get("httpPort", 0), f"{what}.httpPort")


def _user(data: Any, what: str) -> None:
    # RegisterInfoResVO / CIMUserInfo
    if data is not None:
        body = _exact(data, frozenset({"userId", "userName"}), what)
        _long(body.get("userId", 0), f"{what}.userId")


def _users(data: Any, what: str) -> None:
    if data is None:
        return
    if not isinstance(data, list):
        raise StrictDecodeError(f"{what}: expected a list, got {data!r}")
    for i, user in enumerate(data):
        _user(user, f"{what}[{i}]")


#: CIM's endpoints and the class of their dataBody.
BODIES: dict[str, Callable[[Any, str], None]] = {
    "/registerAccount": _user,
    "/login": _server,
    "/onlineUser": _users,
    "/p2pRoute": _null_body,
    "/groupRoute": _null_body,
    "/offLine": _null_body,
    "/fetchOfflineMsgs": _null_body,
}


def decode_reply(path: str, raw: bytes) -> dict[str, Any]:
    """
    Decode the route's reply to C{path} as CIM's client does.

    @return: the envelope.
    @raise StrictDecodeError: CIM's client would have failed.
    """
    try:
        reply = json.loads(raw)
    except ValueError as e:
        raise StrictDecodeError(f"{path}: not JSON: {e}") from None
    envelope = _exact(reply, ENVELOPE, f"{path} BaseResponse")
    for key in ("code", "message", "reqNo"):
        value = envelope.get(key)
        if value is not None and not isinstance(value, str | int):
            raise StrictDecodeError(f"{path}: {key} is not a string: {value!r}")
    BODIES[path](envelope.get("dataBody"), f"{path} dataBody")
    return envelope


#: The Frame fields CIM's protocol has; everything else is cim's.
_CIM_FIELDS = {"cmd", "req_msg", "request_id", "properties", "batch"}


@dataclass
class CimHandler:
    """
    CIM's client handler for one logged-in user: feed it every frame the
    connection receives.

    @ivar received: the texts handed to the message listener, in order.
    """

    user_id: int
    received: list[tuple[Command, int, str]] = field(default_factory=list)
    pongs: int = 0

    def handle(self, frame: Frame) -> None:
        """
        @raise StrictDecodeError: CIM's client would have thrown.
        """
        if frame.cmd not in (
            Command.LOGIN_REQUEST,
            Command.MESSAGE,
            Command.PING,
            Command.OFFLINE,
        ):
            raise StrictDecodeError(f"a command CIM does not know: {frame.cmd!r}")
        extra = [
            name
            for name in Frame.__dataclass_fields__
            if name not in _CIM_FIELDS and getattr(frame, name) != getattr(_EMPTY, name)
        ]
        if extra:
            raise StrictDecodeError(f"fields CIM does not have: {extra} in {frame}")
        if frame.cmd == Command.PING:
            self.pongs += 1
            return
        props = frame.properties
        for key in ("sendUserId", "sendUserName", "receiveUserId"):
            if key not in props:
                raise StrictDecodeError(f"property {key} missing in {frame}")
        sender = _long(props["sendUserId"], "sendUserId")
        if _long(props["receiveUserId"], "receiveUserId") != self.user_id:
            raise StrictDecodeError(f"receiveUserId is not {self.user_id}: {frame}")
        if frame.request_id != self.user_id:
            raise StrictDecodeError(f"requestId is not {self.user_id}: {frame}")
        texts = list(frame.batch) if frame.batch else [frame.req_msg]
        for text in texts:
            self.received.append((frame.cmd, sender, text))

    def texts(self) -> list[str]:
        return [text for _, _, text in self.received]


_EMPTY = Frame(cmd=Command.LOGIN_REQUEST)
