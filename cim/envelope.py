"""
CIM's JSON response envelope and business codes, shared by the route and the
IM server's push API.
"""

from __future__ import annotations

import json
from typing import Any

SUCCESS = "9000"
INVALID_ARGUMENT = "3000"
FAILURE = "4000"
REPEAT_LOGIN = "5000"
RATE_LIMITED = "6000"
OFFLINE_USER = "7000"
NO_SERVER = "7100"
RECONNECT_FAILED = "7200"
ACCOUNT_MISMATCH = "9100"
OFFLINE_STORE_ERROR = "9200"
OFFLINE_FETCH_ERROR = "9201"
OFFLINE_DELETE_ERROR = "9202"
#: cim additions.
UNAUTHORIZED = "4010"
NOT_FOUND = "4040"
CONFLICT = "4090"

#: The request header by which cim's own clients ask for cim's extended
#: replies (its value: L{EXTENDED}).  Without it, every CIM endpoint answers
#: exactly the fields of CIM's reply classes, as CIM's client decodes them
#: strictly: a field it does not know fails the whole call.
EXTENDED_HEADER = b"X-Cim-Extended"
EXTENDED = b"1"

MESSAGES = {
    SUCCESS: "success",
    INVALID_ARGUMENT: "invalid argument",
    FAILURE: "failure",
    REPEAT_LOGIN: "repeat login: the user is already logged in",
    RATE_LIMITED: "request rate limited",
    OFFLINE_USER: "the receiver is offline; the message is stored for later",
    NO_SERVER: "no IM server available",
    RECONNECT_FAILED: "reconnect failed",
    ACCOUNT_MISMATCH: "userId and userName do not match an account",
    OFFLINE_STORE_ERROR: "offline message store error",
    OFFLINE_FETCH_ERROR: "offline message fetch error",
    OFFLINE_DELETE_ERROR: "offline message delete error",
    UNAUTHORIZED: "unauthorized",
    NOT_FOUND: "not found",
    CONFLICT: "conflict",
}


class ApiError(Exception):
    """
    A business outcome other than success, answered as an envelope.
    """

    def __init__(self, code: str, message: str | None = None, data: Any = None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message or MESSAGES.get(code, "error")
        self.data = data


def envelope(
    code: str = SUCCESS,
    message: str | None = None,
    data: Any = None,
    req_no: Any = None,
) -> bytes:
    """
    Encode a response: C{{"code", "message", "reqNo", "dataBody"}}.
    """
    return json.dumps(
        {
            "code": code,
            "message": message or MESSAGES.get(code, ""),
            "reqNo": req_no,
            "dataBody": data,
        },
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode("utf-8")
