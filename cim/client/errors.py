"""
The exceptions of the client library: what its Deferreds and coroutines
fail with.  Plain classes, no I/O.
"""

from __future__ import annotations


class ClientClosed(Exception):
    """
    The client was closed (or gave up) before the operation completed.
    """


class NotLoggedIn(Exception):
    """
    The operation needs L{cim.client.library.Client.login} first.
    """


class LoginError(Exception):
    """
    Logging in failed.

    @ivar code: the route's business code (a string such as C{"9100"}) or
        the IM server's error code (as a string), or C{""} for a network
        failure.
    @ivar reason: a human-readable explanation.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{reason} ({code})" if code else reason)
        self.code = code
        self.reason = reason


class SendError(Exception):
    """
    The server refused a send (no such user, not a member, empty...).

    @ivar code: the L{cim.message.ErrorCode}.
    """

    def __init__(self, code: int, reason: str, client_msg_id: str = "") -> None:
        super().__init__(f"{reason} ({code})")
        self.code = code
        self.reason = reason
        self.client_msg_id = client_msg_id
