"""
CIM's JSON response envelope and business codes, shared by the route and the
IM server's push API.
"""

from __future__ import annotations

import json
from typing import Any

from cim.codes import Code

#: The envelope's codes (L{Code}'s string forms), by name.
SUCCESS = Code.SUCCESS.text
INVALID_ARGUMENT = Code.INVALID_ARGUMENT.text
FAILURE = Code.FAILURE.text
REPEAT_LOGIN = Code.REPEAT_LOGIN.text
RATE_LIMITED = Code.RATE_LIMITED.text
OFFLINE_USER = Code.OFFLINE_USER.text
NO_SERVER = Code.NO_SERVER.text
RECONNECT_FAILED = Code.RECONNECT_FAILED.text
ACCOUNT_MISMATCH = Code.ACCOUNT_MISMATCH.text
OFFLINE_STORE_ERROR = Code.OFFLINE_STORE_ERROR.text
OFFLINE_FETCH_ERROR = Code.OFFLINE_FETCH_ERROR.text
OFFLINE_DELETE_ERROR = Code.OFFLINE_DELETE_ERROR.text
UNAUTHORIZED = Code.UNAUTHORIZED.text
NOT_FOUND = Code.NOT_FOUND.text
CONFLICT = Code.CONFLICT.text

#: The request header by which cim's own clients ask for cim's extended
#: replies (its value: L{EXTENDED}).  Without it, every CIM endpoint answers
#: exactly the fields of CIM's reply classes, as CIM's client decodes them
#: strictly: a field it does not know fails the whole call.
EXTENDED_HEADER = b"X-Cim-Extended"
EXTENDED = b"1"

#: What each code means, by its string form.
MESSAGES = {code.text: code.meaning for code in Code}


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
    if data is None and req_no is None and message is None and code in MESSAGES:
        # The commonest replies (a send's success: CIM's NULLBody) are
        # encoded once per code.
        plain = _PLAIN.get(code)
        if plain is None:
            plain = _PLAIN[code] = _encode(code, None, None, None)
        return plain
    return _encode(code, message, data, req_no)


#: The replies with no message of their own, no data and no reqNo, by
#: code (of L{MESSAGES}).
_PLAIN: dict[str, bytes] = {}


#: The replies' encoder, made once (C{json.dumps} with options makes one
#: per call).
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _encode(code: str, message: str | None, data: Any, req_no: Any) -> bytes:
    return _ENCODER.encode(
        {
            "code": code,
            "message": message or MESSAGES.get(code, ""),
            "reqNo": req_no,
            "dataBody": data,
        }
    ).encode("utf-8")
