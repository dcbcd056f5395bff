"""
The route's HTTP API (Klein): CIM's endpoints and cim's additions, as
C{cim/route/API.md} describes them.

Every answer is CIM's JSON envelope (L{cim.envelope.envelope}), HTTP 200 for
business outcomes.  Routes only parse and check their input and call the
L{Router}; business outcomes travel as L{ApiError} to the error handlers,
which answer them; anything unexpected is logged and answered 4000.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from cim import envelope as codes
from cim.envelope import ApiError, envelope
from cim.interfaces import IRegistry, IServerControl, IStore, StoreError, TokenInfo
from cim.limits import DEVICE_KEY_TTL, MAX_BATCH, MAX_DEVICES
from cim.message import ChatMessage, message_to_dict
from cim.metrics import Metrics
from cim.pushapi import SECRET_HEADER
from cim.route.balancer import Balancer
from cim.route.fields import MAX_DEPTH, REQUESTS, Limits, bad, check_json, type_name
from cim.route.logic import Credentials, Probe, RouteDelivery, Router
from cim.route.openapi import openapi_document

#: The largest request body accepted by default, in bytes.
MAX_BODY = 1024 * 1024

_JSON = b"application/json; charset=utf-8"


@dataclass(slots=True)
class _Call:
    """
    What the error handlers need to know of a request being served.
    """

    started: float
    req_no: Any = None


#: The request's attribute holding its L{_Call} while it is served (kept on
#: the request, which goes with it, rather than in a weak dictionary of the
#: API's, which cost three weak references' bookkeeping a request).
_CALL = "_cim_route_call"


def _taken(request: IRequest) -> _Call | None:
    """
    The request's L{_Call}, taken off it (C{None} when it was answered
    already or never begun).
    """
    call: _Call | None = getattr(request, _CALL, None)
    if call is not None:
        setattr(request, _CALL, None)
    return call


def _address(request: IRequest) -> str | None:
    """
    The client's address (the guessing limits count per address), or
    C{None} when the transport has none (a UNIX socket, a test).
    """
    host = getattr(request.getClientAddress(), "host", None)
    return host if isinstance(host, str) else None


def _endpoint(request: IRequest) -> str:
    """
    The endpoint a request was routed to: its path, percent-decoded as
    Klein decodes it to route it (so that C{/p2p%52oute} is C{/p2pRoute}).
    """
    path = request.path.decode("utf-8", "replace")
    return unquote(path) if "%" in path else path


def _header(request: IRequest, name: bytes) -> str | None:
    """
    A request header as text (undecodable bytes never match a credential).
    """
    value = request.getHeader(name)
    if value is None:
        return None
    return value.decode("utf-8", "replace")


@functools.lru_cache(maxsize=8)
def _openapi_json(max_message: int) -> bytes:
    """
    The OpenAPI document of a route with this C{max_message}, as served:
    built once per process (it takes a tenth of a second), not at every
    start of a route.
    """
    return json.dumps(openapi_document(max_message=max_message), indent=1).encode(
        "utf-8"
    )


class RouteAPI:
    """
    The route's Klein app.  Build it with its backends, and serve
    C{RouteAPI(...).app.resource()}.

    @param clock: times requests for the latency metric.
    @param probe: checks that a server accepts connections before a login
        is sent there (see L{cim.route.service.tcp_probe}).
    @param max_message: the longest chat text, in characters.
    @param max_body: the largest request body, in bytes.
    @param login_rate: failed logins and registrations a minute allowed per
        account; C{address_rate}: per client address (L{cim.route.throttle}).
    @param max_devices: how many devices (sessions) one user may hold.
    @param device_key_ttl: how long a device key lives, in seconds.
    Other parameters: see L{Router}.
    """

    app = Klein()
    log = Logger()

    def __init__(
        self,
        store: IStore,
        registry: IRegistry,
        delivery: RouteDelivery,
        pusher: IServerControl,
        balancer: Balancer,
        clock: IReactorTime,
        secret: str,
        probe: Probe,
        *,
        token_ttl: float = 86400.0,
        require_password: bool = False,
        legacy_auth: bool = False,
        max_message: int = 4096,
        max_batch: int = MAX_BATCH,
        max_body: int = MAX_BODY,
        login_rate: float = 10.0,
        address_rate: float = 60.0,
        max_devices: int = MAX_DEVICES,
        device_key_ttl: float = DEVICE_KEY_TTL,
    ) -> None:
        self.router = Router(
            store,
            registry,
            delivery,
            pusher,
            balancer,
            probe,
            secret,
            token_ttl=token_ttl,
            require_password=require_password,
            legacy_auth=legacy_auth,
            clock=clock,
            login_rate=login_rate,
            address_rate=address_rate,
            max_devices=max_devices,
            device_key_ttl=device_key_ttl,
        )
        self.registry = registry
        self.clock = clock
        self.limits = Limits(max_message=max_message, max_batch=max_batch)
        self.max_body = max_body
        self.metrics = metrics = Metrics("cim_route")
        self.m_requests = metrics.labelled_counter(
            "requests_total", "HTTP requests by endpoint", "endpoint"
        )
        self.m_errors = metrics.labelled_counter(
            "errors_total", "Answers other than success, by code", "code"
        )
        self.m_logins = metrics.counter("logins_total", "Successful logins")
        self.m_latency = metrics.histogram(
            "request_latency_seconds", "Time to answer a request"
        )
        metrics.gauge(
            "servers", "IM servers in the registry", lambda: len(registry.servers())
        )

    def resource(self) -> IResource:
        """
        The API as a twisted.web resource: Klein's (L{app}), except that
        the busiest calls, C{POST /p2pRoute}, C{/login} and
        C{/registerAccount}, go straight to their methods.
        Serve this one (C{app.resource()} answers the same, more slowly).
        """
        return _APIResource(self)

    def serve(
        self, request: IRequest, handler: Callable[[IRequest], Deferred[bytes]]
    ) -> object:
        """
        Serve C{request} by C{handler} (a route method returning a Deferred
        of the reply) as Klein would, without its routing: a failure goes
        to the error handler Klein would pick (L{api_error} for an
        L{ApiError}, else L{unexpected}); when the client goes away first,
        the call is cancelled and nothing is written.

        @return: C{NOT_DONE_YET}, for twisted.web.
        """
        gone: list[bool] = []
        try:
            d = handler(request)
        except Exception:
            d = fail()

        def lost(_: Failure) -> None:
            gone.append(True)
            d.cancel()

        request.notifyFinish().addErrback(lost)  # type: ignore[attr-defined]
        d.addBoth(self._reply, request, gone)
        return NOT_DONE_YET

    def _reply(
        self, result: bytes | Failure, request: IRequest, gone: list[bool]
    ) -> None:
        """
        Answer C{request} with C{result}: a reply, or a failure for the
        error handlers (one callback, not three: the busiest call's).
        """
        try:
            body = (
                self._failed(result, request, gone)
                if isinstance(result, Failure)
                else result
            )
            self._write(body, request, gone)
        except Exception:
            self.log.failure("Writing the reply to {uri} failed", uri=request.uri)

    def _failed(
        self, failure: Failure, request: IRequest, gone: list[bool]
    ) -> bytes | None:
        if gone:
            if not failure.check(CancelledError):
                self.log.failure(
                    "Request {uri} failed after its client left",
                    failure,
                    uri=request.uri,
                )
            return None
        if failure.check(ApiError):
            return self.api_error(request, failure)
        return self.unexpected(request, failure)

    @staticmethod
    def _write(body: bytes | None, request: IRequest, gone: list[bool]) -> None:
        if body is None or gone:
            return
        request.write(body)
        request.finish()

    # Request plumbing

    def _begin(self, request: IRequest) -> None:
        """
        Note the start of a request to a known endpoint.
        """
        setattr(request, _CALL, _Call(self.clock.seconds()))
        self.m_requests.inc(_endpoint(request))

    def _json(self, request: IRequest, required: bool = True) -> dict[str, Any]:
        """
        Start serving a POST: @return: its body, a JSON object (or C{{}}
        when it is empty and not C{required}).
        """
        self._begin(request)
        raw = request.content.read(self.max_body + 1) if request.content else b""
        if len(raw) > self.max_body:
            raise bad(f"the request body is over the limit of {self.max_body} bytes")
        if not raw.strip():
            if not required:
                return {}
            raise bad("the request body is empty: send a JSON object")
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise bad(f"malformed JSON: {e}") from None
        except RecursionError:
            raise bad(f"the JSON is nested deeper than {MAX_DEPTH} levels") from None
        if not isinstance(body, dict):
            raise bad(f"the body must be a JSON object, not {type_name(body)}")
        check_json(body)
        getattr(request, _CALL).req_no = body.get("reqNo")
        return body

    def _parse(self, request: IRequest) -> dict[str, Any]:
        """
        Start serving a POST: @return: its declared fields, checked
        (L{cim.route.fields.REQUESTS}).
        """
        declared = REQUESTS[_endpoint(request)]
        return declared.parse(self._json(request), self.limits)

    def _answer(
        self, request: IRequest, code: str, message: str | None = None, data: Any = None
    ) -> bytes:
        call = _taken(request)
        if call is not None:
            self.m_latency.observe(max(0.0, self.clock.seconds() - call.started))
        if code != codes.SUCCESS:
            self.m_errors.inc(code)
        body = envelope(code, message, data, call.req_no if call else None)
        request.setHeader(b"Content-Type", _JSON)
        # (With its length the reply leaves in one write, not chunked: no
        # chunk framing, and no last chunk written at the request's end.)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body

    def _ok(self, request: IRequest, data: Any = None) -> bytes:
        return self._answer(request, codes.SUCCESS, None, data)

    @staticmethod
    def _extended(request: IRequest) -> bool:
        """
        Whether the request asks for cim's extended replies
        (L{codes.EXTENDED_HEADER}); CIM's clients never do.
        """
        return request.getHeader(codes.EXTENDED_HEADER) == codes.EXTENDED

    @staticmethod
    def _credentials(request: IRequest) -> Credentials:
        """
        The bearer token and cluster secret the request carries.
        """
        token = None
        header = _header(request, b"Authorization")
        if header is not None:
            scheme, _, value = header.strip().partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise ApiError(
                    codes.UNAUTHORIZED,
                    "the Authorization header must be 'Bearer <token>'",
                )
            token = value.strip()
        return Credentials(token=token, secret=_header(request, SECRET_HEADER))

    async def _authorize(
        self, request: IRequest, user_id: int, legacy: bool = False
    ) -> TokenInfo | None:
        """
        @return: what the request's token stands for, or C{None} when it
            passed by the secret or C{--legacy-auth}.
        """
        return await self.router.authorize(user_id, self._credentials(request), legacy)

    # Error handlers (tried in this order)

    @app.handle_errors(ApiError)
    def api_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, ApiError)
        return self._answer(request, error.code, error.message, error.data)

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        self.m_requests.inc("unknown")
        request.setResponseCode(404)
        path = request.path.decode("utf-8", "replace")
        return self._answer(
            request,
            codes.INVALID_ARGUMENT,
            f"no such endpoint: {path} (see /openapi.json)",
        )

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        self.m_requests.inc("unknown")
        error = failure.value
        assert isinstance(error, MethodNotAllowed)
        allowed = ", ".join(sorted(m for m in error.valid_methods or () if m != "HEAD"))
        request.setResponseCode(405)
        request.setHeader(b"Allow", allowed.encode("ascii"))
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("utf-8", "replace")
        return self._answer(
            request,
            codes.INVALID_ARGUMENT,
            f"{method} {path} is not allowed; use {allowed}",
        )

    @app.handle_errors(HTTPException)
    def http_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, HTTPException)
        request.setResponseCode(error.code or 400)
        return self._answer(request, codes.INVALID_ARGUMENT, error.description)

    @app.handle_errors(Exception)
    def unexpected(self, request: IRequest, failure: Failure) -> bytes:
        uri = request.uri.decode("utf-8", "replace")
        if failure.check(StoreError):
            self.log.error(
                "{uri}: store failure: {error}",
                uri=uri,
                error=failure.getErrorMessage(),
            )
            return self._answer(request, codes.FAILURE, "the store is unavailable")
        self.log.failure("Request {uri} failed", failure, uri=uri)
        return self._answer(request, codes.FAILURE, "internal error")

    # CIM's endpoints

    @app.route("/registerAccount", methods=["POST"])
    async def register_account(self, request: IRequest) -> bytes:
        v = self._parse(request)
        account, new_key = await self.router.register(
            v["userName"], v["password"], v["accountKey"], _address(request)
        )
        data = {"userId": account.user_id, "userName": account.user_name}
        # The new account's key goes to cim's clients only (CIM's decode
        # exactly {userId, userName}, and could not use it anyway).
        if new_key is not None and self._extended(request):
            data["accountKey"] = new_key
        return self._ok(request, data)

    @app.route("/login", methods=["POST"])
    async def login(self, request: IRequest) -> bytes:
        v = self._parse(request)
        done = await self.router.login(
            v["userId"],
            v["userName"],
            v["password"],
            v["token"],
            self._credentials(request),
            v["accountKey"],
            _address(request),
            v["device"],
            v["deviceKey"],
            # The device key goes to cim's clients only (CIM's decode
            # exactly {ip, cimServerPort, httpPort}).
            issue_device_key=self._extended(request),
        )
        self.m_logins.inc()
        server = {
            "ip": done.server.host,
            "cimServerPort": done.server.port,
            "httpPort": done.server.http_port,
        }
        if not self._extended(request):
            return self._ok(request, server)
        extended = {
            **server,
            "token": done.token,
            "userId": done.account.user_id,
            "userName": done.account.user_name,
            "device": done.device,
        }
        if done.device_key is not None:
            extended["deviceKey"] = done.device_key
        # Whether the server's client port speaks TLS: for cim's clients
        # only (CIM's reply has exactly the three fields above).
        if done.server.tls:
            extended["tls"] = True
        if done.server.ws_url:
            extended["wsUrl"] = done.server.ws_url
        return self._ok(request, extended)

    @app.route("/groupRoute", methods=["POST"])
    async def group_route(self, request: IRequest) -> bytes:
        v = self._parse(request)
        await self._authorize(request, v["userId"], legacy=True)
        await self.router.broadcast(v["userId"], v["msg"])
        return self._ok(request)

    @app.route("/p2pRoute", methods=["POST"])
    def p2p_route(self, request: IRequest) -> Deferred[bytes]:
        # The busiest endpoint: L{resource} serves it without Klein, by
        # this same method; no coroutine either (see Router.send_private).
        v = self._parse(request)
        receiver = v["receiveUserId"]
        router = self.router
        credentials = self._credentials(request)

        def send(_: object = None) -> Deferred[Any]:
            return router.send_private(
                v["userId"], receiver, v["texts"], v["clientMsgId"]
            )

        # The secret (or --legacy-auth) passes at once, with no Deferred
        # to wait on; a token asks the store.
        d: Deferred[Any] = (
            send()
            if router.passes_now(credentials, legacy=True)
            else router.verify_token(credentials, v["userId"]).addCallback(send)
        )
        return d.addCallback(self._p2p_sent, request, receiver)

    def _p2p_sent(
        self, sent: tuple[ChatMessage, bool], request: IRequest, receiver: int
    ) -> bytes:
        last, delivered = sent
        # CIM's reply is empty (NULLBody); cim's clients learn where the
        # message was stored.
        data = (
            {"msgId": last.msg_id, "seq": last.seq} if self._extended(request) else None
        )
        if not delivered:
            raise ApiError(
                codes.OFFLINE_USER,
                f"user {receiver} is offline; the message is stored for later",
                data,
            )
        return self._ok(request, data)

    @app.route("/offLine", methods=["POST"])
    async def off_line(self, request: IRequest) -> bytes:
        user_id = self._parse(request)["userId"]
        token = await self._authorize(request, user_id, legacy=True)
        # A user's token logs off its own device; the secret (and CIM's
        # clients, under --legacy-auth) every device of the user.
        await self.router.log_off(user_id, None if token is None else token.device)
        return self._ok(request)

    @app.route("/onlineUser", methods=["GET", "POST"])
    async def online_user(self, request: IRequest) -> bytes:
        self._json(request, required=False)
        users = await self.router.online_users()
        return self._ok(
            request, [{"userId": uid, "userName": name} for uid, name in users]
        )

    @app.route("/fetchOfflineMsgs", methods=["POST"])
    async def fetch_offline_msgs(self, request: IRequest) -> bytes:
        user_id = self._parse(request)["receiveUserId"]
        await self._authorize(request, user_id, legacy=True)
        try:
            await self.router.fetch_offline(user_id)
        except ApiError as e:
            # CIM answers success whether or not the user is connected.
            if e.code != codes.OFFLINE_USER or self._extended(request):
                raise
        return self._ok(request)

    # Groups and history

    async def _group_request(self, request: IRequest) -> tuple[int, str]:
        v = self._parse(request)
        await self._authorize(request, v["userId"])
        return v["userId"], v["groupId"]

    @app.route("/group/create", methods=["POST"])
    async def group_create(self, request: IRequest) -> bytes:
        v = self._parse(request)
        await self._authorize(request, v["userId"])
        await self.router.create_group(
            v["userId"], v["groupId"], v["policy"], v["history"]
        )
        return self._ok(
            request,
            {"groupId": v["groupId"], "policy": v["policy"], "history": v["history"]},
        )

    @app.route("/group/join", methods=["POST"])
    async def group_join(self, request: IRequest) -> bytes:
        user_id, group_id = await self._group_request(request)
        joined, pending = await self.router.join_group(user_id, group_id)
        return self._ok(
            request, {"groupId": group_id, "joined": joined, "pending": pending}
        )

    @app.route("/group/leave", methods=["POST"])
    async def group_leave(self, request: IRequest) -> bytes:
        user_id, group_id = await self._group_request(request)
        left = await self.router.leave_group(user_id, group_id)
        return self._ok(request, {"groupId": group_id, "left": left})

    @app.route("/group/info", methods=["POST"])
    async def group_info(self, request: IRequest) -> bytes:
        user_id, group_id = await self._group_request(request)
        info = await self.router.group_info(user_id, group_id)
        data: dict[str, Any] = {
            "groupId": group_id,
            "ownerId": info.owner_id,
            "policy": info.policy,
            "history": info.history,
            "members": info.members,
            "member": info.member,
        }
        if info.member:
            data["joinedAt"] = info.joined_at
        return self._ok(request, data)

    async def _group_and(self, request: IRequest, other: str) -> tuple[int, str, int]:
        """
        A group request naming another user (C{other}): @return: the user,
        the group and the other user.
        """
        v = self._parse(request)
        await self._authorize(request, v["userId"])
        return v["userId"], v["groupId"], v[other]

    @app.route("/group/invite", methods=["POST"])
    async def group_invite(self, request: IRequest) -> bytes:
        user_id, group_id, invitee = await self._group_and(request, "inviteeId")
        invited = await self.router.invite(user_id, group_id, invitee)
        return self._ok(
            request, {"groupId": group_id, "inviteeId": invitee, "invited": invited}
        )

    @app.route("/group/requests", methods=["POST"])
    async def group_requests(self, request: IRequest) -> bytes:
        user_id, group_id = await self._group_request(request)
        waiting = await self.router.join_requests(user_id, group_id)
        return self._ok(
            request, [{"userId": a.user_id, "userName": a.user_name} for a in waiting]
        )

    @app.route("/group/approve", methods=["POST"])
    async def group_approve(self, request: IRequest) -> bytes:
        user_id, group_id, requester = await self._group_and(request, "requesterId")
        joined = await self.router.approve(user_id, group_id, requester)
        return self._ok(
            request, {"groupId": group_id, "requesterId": requester, "joined": joined}
        )

    @app.route("/group/reject", methods=["POST"])
    async def group_reject(self, request: IRequest) -> bytes:
        user_id, group_id, requester = await self._group_and(request, "requesterId")
        rejected = await self.router.reject(user_id, group_id, requester)
        return self._ok(
            request,
            {"groupId": group_id, "requesterId": requester, "rejected": rejected},
        )

    @app.route("/group/remove", methods=["POST"])
    async def group_remove(self, request: IRequest) -> bytes:
        user_id, group_id, member = await self._group_and(request, "memberId")
        removed = await self.router.remove_member(user_id, group_id, member)
        return self._ok(
            request, {"groupId": group_id, "memberId": member, "removed": removed}
        )

    @app.route("/group/transfer", methods=["POST"])
    async def group_transfer(self, request: IRequest) -> bytes:
        user_id, group_id, owner = await self._group_and(request, "newOwnerId")
        await self.router.transfer(user_id, group_id, owner)
        return self._ok(request, {"groupId": group_id, "ownerId": owner})

    @app.route("/group/members", methods=["POST"])
    async def group_members(self, request: IRequest) -> bytes:
        user_id, group_id = await self._group_request(request)
        members = await self.router.group_members(user_id, group_id)
        return self._ok(
            request, [{"userId": a.user_id, "userName": a.user_name} for a in members]
        )

    @app.route("/group/send", methods=["POST"])
    async def group_send(self, request: IRequest) -> bytes:
        v = self._parse(request)
        await self._authorize(request, v["userId"])
        last = await self.router.send_group(
            v["userId"], v["groupId"], v["texts"], v["clientMsgId"]
        )
        return self._ok(request, {"msgId": last.msg_id, "seq": last.seq})

    @app.route("/user/groups", methods=["POST"])
    async def user_groups(self, request: IRequest) -> bytes:
        user_id = self._parse(request)["userId"]
        await self._authorize(request, user_id)
        return self._ok(request, await self.router.user_groups(user_id))

    @app.route("/history", methods=["POST"])
    async def history(self, request: IRequest) -> bytes:
        v = self._parse(request)
        await self._authorize(request, v["userId"])
        messages = await self.router.history(
            v["userId"],
            v["conversation"],
            v["afterSeq"],
            v["limit"],
            peer_id=v["peerId"],
            before_seq=v["beforeSeq"],
        )
        return self._ok(request, [message_to_dict(m) for m in messages])

    # Conversations, read positions and devices

    async def _user_request(self, request: IRequest) -> dict[str, Any]:
        v = self._parse(request)
        await self._authorize(request, v["userId"])
        return v

    @app.route("/conversations", methods=["POST"])
    async def conversations(self, request: IRequest) -> bytes:
        v = await self._user_request(request)
        found = await self.router.conversations(v["userId"])
        data = []
        for state, peer in found:
            item: dict[str, Any] = {
                "conversation": state.conversation,
                "epoch": state.epoch,
                "lastSeq": state.last_seq,
                "read": state.read,
                "unread": state.unread,
            }
            if state.peer_id:
                item["peerId"] = state.peer_id
                if peer is not None:
                    item["peerName"] = peer.user_name
                item["peerRead"] = state.peer_read
            if state.group_id:
                item["groupId"] = state.group_id
            data.append(item)
        return self._ok(request, data)

    @app.route("/read", methods=["POST"])
    async def read(self, request: IRequest) -> bytes:
        v = await self._user_request(request)
        position = await self.router.read(v["userId"], v["conversation"], v["seq"])
        return self._ok(request, {"read": position})

    @app.route("/readPositions", methods=["POST"])
    async def read_positions(self, request: IRequest) -> bytes:
        v = await self._user_request(request)
        states = await self.router.read_positions(v["userId"], v["conversation"])
        return self._ok(
            request, [{"userId": s.user_id, "read": s.read} for s in states]
        )

    @app.route("/devices", methods=["POST"])
    async def devices(self, request: IRequest) -> bytes:
        v = await self._user_request(request)
        sessions = await self.router.devices(v["userId"])
        return self._ok(
            request,
            [
                {
                    "device": s.device,
                    "server": s.server,
                    "connected": s.connected,
                    "active": s.active,
                }
                for s in sessions
            ],
        )

    # Operations

    @app.route("/health", methods=["GET"])
    async def health(self, request: IRequest) -> bytes:
        self._begin(request)
        state = await self.router.health()
        if state["store"] != "ok":
            request.setResponseCode(503)
            return self._answer(
                request, codes.FAILURE, "the store is unreachable", state
            )
        return self._ok(request, state)

    @app.route("/metrics", methods=["GET"])
    def metrics_text(self, request: IRequest) -> bytes:
        self._begin(request)
        _taken(request)
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4")
        return self.metrics.render()

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        self._begin(request)
        _taken(request)
        request.setHeader(b"Content-Type", _JSON)
        return _openapi_json(self.limits.max_message)


class _APIResource(Resource):
    """
    L{RouteAPI.resource}: C{POST /p2pRoute}, C{/login} and
    C{/registerAccount} by L{RouteAPI.serve}, the rest by Klein.  (Klein
    answers those paths with another method, a path that only decodes to
    one of them, or a trailing slash, as before.)
    """

    isLeaf = True

    def __init__(self, api: RouteAPI) -> None:
        super().__init__()
        self.api = api
        self.klein = api.app.resource()
        #: The POSTs served without Klein's routing, by path: the busiest
        #: call, and the two of every new user's start.
        self.fast: dict[bytes, Callable[[IRequest], Deferred[bytes]]] = {
            b"/p2pRoute": api.p2p_route,
            b"/login": lambda request: Deferred.fromCoroutine(api.login(request)),
            b"/registerAccount": lambda request: Deferred.fromCoroutine(
                api.register_account(request)
            ),
        }

    def render(self, request: IRequest) -> Any:
        handler = self.fast.get(request.path)
        if handler is not None and request.method == b"POST":
            return self.api.serve(request, handler)
        return self.klein.render(request)
