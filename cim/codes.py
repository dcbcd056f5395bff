"""
Every outcome code, declared once.

The route's HTTP API and the servers' push API carry a code as a string in
CIM's JSON envelope (C{"code": "9000"}, L{cim.envelope}); the IM server's
ERROR frames carry the same numbers in C{errorCode}.  The codes below 8000
and 9100-9202 are CIM's; the others are cim's additions.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """
    An outcome, with its number and what it means (L{meaning}).
    """

    SUCCESS = 9000
    INVALID_ARGUMENT = 3000
    FAILURE = 4000
    UNAUTHORIZED = 4010
    NOT_FOUND = 4040
    CONFLICT = 4090
    REPEAT_LOGIN = 5000
    RATE_LIMITED = 6000
    OFFLINE_USER = 7000
    NO_SERVER = 7100
    RECONNECT_FAILED = 7200
    NOT_LOGGED_IN = 8000
    BAD_TOKEN = 8001
    FRAME_TOO_LONG = 8002
    MALFORMED_FRAME = 8003
    UNKNOWN_COMMAND = 8004
    LOGIN_TIMEOUT = 8005
    NOT_A_MEMBER = 8006
    ACCOUNT_MISMATCH = 9100
    OFFLINE_STORE_ERROR = 9200
    #: A send could not be stored (the same number as CIM's store error).
    STORE_ERROR = 9200
    OFFLINE_FETCH_ERROR = 9201
    OFFLINE_DELETE_ERROR = 9202

    @property
    def text(self) -> str:
        """
        The envelope's form: C{"9000"}.
        """
        return str(self.value)

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]


_MEANINGS = {
    Code.SUCCESS: "success",
    Code.INVALID_ARGUMENT: "invalid argument",
    Code.FAILURE: "failure",
    Code.UNAUTHORIZED: "unauthorized",
    Code.NOT_FOUND: "not found",
    Code.CONFLICT: "conflict",
    Code.REPEAT_LOGIN: "repeat login: the user is already logged in",
    Code.RATE_LIMITED: "request rate limited",
    Code.OFFLINE_USER: "the receiver is offline; the message is stored for later",
    Code.NO_SERVER: "no IM server available",
    Code.RECONNECT_FAILED: "reconnect failed",
    Code.NOT_LOGGED_IN: "log in first",
    Code.BAD_TOKEN: "invalid login token",
    Code.FRAME_TOO_LONG: "frame too long",
    Code.MALFORMED_FRAME: "malformed frame",
    Code.UNKNOWN_COMMAND: "unknown command",
    Code.LOGIN_TIMEOUT: "timed out",
    Code.NOT_A_MEMBER: "not a member of the group",
    Code.ACCOUNT_MISMATCH: "userId and userName do not match an account",
    Code.OFFLINE_STORE_ERROR: "offline message store error",
    Code.OFFLINE_FETCH_ERROR: "offline message fetch error",
    Code.OFFLINE_DELETE_ERROR: "offline message delete error",
}
