"""
The IM server's internal HTTP push API (Klein), for routes and other
servers.  Every endpoint but C{/health} and C{/metrics} requires the cluster
secret in the C{X-Cim-Secret} header.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from klein import Klein
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from cim import envelope as codes
from cim import pushapi
from cim.delivery import deliver_item
from cim.envelope import ApiError, envelope
from cim.message import Command, Frame
from cim.pushapi import SECRET_HEADER
from cim.server.core import IMServer

#: The largest request body accepted.
MAX_BODY = 4 * 1024 * 1024


def _int(body: dict[str, Any], key: str) -> int:
    try:
        return pushapi.integer(body, key)
    except ValueError as e:
        raise ApiError(codes.INVALID_ARGUMENT, str(e)) from None


class PushAPI:
    """
    The push API of one L{IMServer}.
    """

    app = Klein()
    log = Logger()

    def __init__(self, server: IMServer, secret: str) -> None:
        self.server = server
        self.secret = secret.encode("utf-8")

    def _json(self, request: IRequest) -> dict[str, Any]:
        request.setHeader(b"Content-Type", b"application/json")
        given = request.getHeader(SECRET_HEADER) or b""
        if not self.secret or not hmac.compare_digest(given, self.secret):
            raise ApiError(codes.UNAUTHORIZED, "the cluster secret is missing or wrong")
        raw = request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            raise ApiError(codes.INVALID_ARGUMENT, "request body too large")
        try:
            body = json.loads(raw or b"{}")
        except ValueError as e:
            raise ApiError(codes.INVALID_ARGUMENT, f"malformed JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(codes.INVALID_ARGUMENT, "the body must be a JSON object")
        return body

    @app.handle_errors(ApiError)
    def api_error(self, request: IRequest, failure: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        error = failure.value
        return envelope(error.code, error.message, error.data)

    @app.handle_errors(Exception)
    def unexpected(self, request: IRequest, failure: Any) -> bytes:
        self.log.failure("Push API request {uri} failed", failure, uri=request.uri)
        request.setHeader(b"Content-Type", b"application/json")
        return envelope(codes.FAILURE, "internal error")

    @app.route(f"/{pushapi.PUSH}", methods=["POST"])
    def push(self, request: IRequest) -> bytes:
        """
        C{{"items": [{"messages": [...], "users": [ids]}, {"read": {...},
        "users": [ids]}]}}: write each item's stored messages, or its read
        event, to every device of its users connected here, in order.
        Answers C{{"missing": [[ids with no device here], ...]}}, one list
        per item.
        """
        try:
            items = pushapi.parse_push(self._json(request))
        except ValueError as e:
            raise ApiError(codes.INVALID_ARGUMENT, str(e)) from None
        missing = [deliver_item(self.server, item) for item in items]
        return envelope(data=pushapi.push_reply(missing))

    @app.route(f"/{pushapi.SEND_MSG}", methods=["POST"])
    def send_msg(self, request: IRequest) -> bytes:
        """
        CIM's C{/sendMsg}: C{{msg, batchMsg, userId, cmd, properties}} written
        as one frame to C{userId}'s connection.  Answers 7000 when the user
        is not connected here (CIM answered success).
        """
        body = self._json(request)
        user_id = _int(body, "userId")
        msg = body.get("msg") or ""
        batch = body.get("batchMsg") or []
        props = body.get("properties") or {}
        cmd = body.get("cmd", Command.MESSAGE)
        if not isinstance(msg, str) or not isinstance(batch, list):
            raise ApiError(
                codes.INVALID_ARGUMENT, "msg must be a string, batchMsg a list"
            )
        if not isinstance(props, dict):
            raise ApiError(codes.INVALID_ARGUMENT, "properties must be an object")
        try:
            command = Command(int(cmd))
        except (TypeError, ValueError):
            raise ApiError(codes.INVALID_ARGUMENT, f"unknown cmd {cmd!r}") from None
        frame = Frame(
            cmd=command,
            req_msg=msg,
            batch=[str(b) for b in batch],
            properties={str(k): str(v) for k, v in props.items()},
        )
        try:
            connected = self.server.send_raw(user_id, frame)
        except ValueError as e:
            raise ApiError(codes.INVALID_ARGUMENT, f"user {user_id}: {e}") from None
        if not connected:
            raise ApiError(codes.OFFLINE_USER, f"user {user_id} is not connected here")
        return envelope()

    @app.route(f"/{pushapi.KICK}", methods=["POST"])
    async def kick(self, request: IRequest) -> bytes:
        """
        C{{userId, sessionId, reason, loggedOff}}: close the connection of
        the user's device whose session that is (every device's when
        C{sessionId} is empty); answered once its cursors are saved.  C{loggedOff}: the user logged off, so what a CIM client
        was sent counts as received.
        """
        try:
            kick = pushapi.Kick.parse(self._json(request))
        except ValueError as e:
            raise ApiError(codes.INVALID_ARGUMENT, str(e)) from None
        kicked = await self.server.kick_user(
            kick.user_id, kick.session_id, kick.reason, kick.logged_off
        )
        return envelope(data={"kicked": kicked})

    @app.route(f"/{pushapi.RESYNC}", methods=["POST"])
    def resync(self, request: IRequest) -> bytes:
        """
        C{{userId}}: send every device of the user connected here the stored
        messages it has not got.
        """
        body = self._json(request)
        user_id = _int(body, "userId")
        if not self.server.resync(user_id):
            raise ApiError(codes.OFFLINE_USER, f"user {user_id} is not connected here")
        return envelope()

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return envelope(
            data={
                "server": self.server.here,
                "connections": len(self.server.connections),
                "users": len(self.server.users),
            }
        )

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4")
        return self.server.metrics.render()

    @app.route("/", branch=True)
    def not_found(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        request.setResponseCode(404)
        return envelope(codes.NOT_FOUND, f"no such endpoint: {request.path.decode()}")
