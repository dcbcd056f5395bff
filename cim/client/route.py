"""
Calls to the route's HTTP API (C{cim/route/API.md}) for the client: accounts,
login, online users, groups, conversations and their read state, history
and CIM-style broadcasts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers

from cim.client.reads import ConversationInfo
from cim.envelope import EXTENDED, EXTENDED_HEADER, SUCCESS
from cim.message import ChatMessage, message_from_dict
from cim.tls import describe_tls_failure

#: Seconds an HTTP call may take before it fails.
DEFAULT_TIMEOUT = 10.0


class RouteError(Exception):
    """
    The route answered with a business code other than success.

    @ivar code: the code string (see L{cim.envelope}).
    @ivar message: the route's explanation.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class User:
    """
    An account, as the route lists it.

    @ivar account_key: the account key, when the route just created the
        account without a password (its only credential: keep it).
    """

    user_id: int
    user_name: str
    account_key: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class LoginInfo:
    """
    The route's answer to a login: the IM server to connect to, and the
    token that proves the login to it.

    @ivar tls: the server's client port speaks TLS (extended replies only).
    @ivar device: the device id the login claimed, as the route echoes it
        (C{""} when it does not).
    @ivar device_key: the device's new device key, the proof of its next
        login (C{""} when the route gave none).
    """

    host: str
    port: int
    http_port: int
    token: str
    user_id: int
    user_name: str
    tls: bool = False
    device: str = ""
    device_key: str = field(default="", repr=False)


class RouteTLSError(Exception):
    """
    The route could not be reached over https: its certificate does not
    verify, or is not for its host (see L{cim.tls}).
    """


@dataclass(frozen=True, slots=True)
class JoinResult:
    """
    The answer to a request to join a group.  True when the user joined
    now (C{if await client.join_group(g)}).

    @ivar joined: the user joined now (C{False}: already a member, or
        waiting for the owner's approval).
    @ivar pending: the request waits for the owner's approval.
    """

    joined: bool
    pending: bool = False

    def __bool__(self) -> bool:
        return self.joined


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """
    A group's settings, as C{/group/info} answers them.

    @ivar owner_id: C{None} for a group created before groups had owners.
    @ivar policy: C{open}, C{invite} or C{approval}.
    @ivar history: C{join} (members read from their join on) or C{full}.
    @ivar members: the member count.
    @ivar member: whether the asking user is a member.
    @ivar joined_at: for a member, the seq after which it reads.
    """

    group_id: str
    owner_id: int | None
    policy: str
    history: str
    members: int
    member: bool
    joined_at: int | None = None


def _users(data: Any) -> list[User]:
    """
    Parse a C{[{userId, userName}]} list.
    """
    return [User(int(u["userId"]), str(u["userName"])) for u in data or ()]


class RouteClient:
    """
    The route's HTTP API.  Every method fails with L{RouteError} for a
    business refusal, and with the underlying error (connection refused,
    L{twisted.internet.defer.TimeoutError}...) when the route cannot be
    reached.
    """

    def __init__(
        self,
        clock: IReactorTime,
        http: HTTPClient,
        url: str,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """
        @param clock: an L{IReactorTime} for timeouts.
        @param url: the route's base URL, such as C{http://127.0.0.1:8083}.
        """
        self.clock = clock
        self.http = http
        self.url = url.rstrip("/")
        self.timeout = timeout

    def call(
        self,
        path: str,
        body: dict[str, Any] | None = None,
        token: str = "",
        timeout: float | None = None,
    ) -> Deferred[Any]:
        """
        POST C{body} as JSON to C{path} (GET when C{body} is C{None}).

        @param token: sent as the bearer token when not empty.
        @param timeout: seconds before it fails (the client's default when
            C{None}).
        @return: fires with the C{dataBody} of a success envelope.
        """
        d = ensureDeferred(self._call(path, body, token))
        d.addTimeout(self.timeout if timeout is None else timeout, self.clock)
        return d

    async def _call(self, path: str, body: dict[str, Any] | None, token: str) -> Any:
        # cim's extended replies (the login token, where a message was
        # stored...), which CIM's own clients never ask for.
        headers = Headers({EXTENDED_HEADER: [EXTENDED]})
        if token:
            headers.addRawHeader(b"Authorization", f"Bearer {token}".encode())
        url = self.url + path
        try:
            if body is None:
                response = await self.http.get(url, headers=headers)
            else:
                response = await self.http.post(url, json=body, headers=headers)
        except Exception as e:
            reason = describe_tls_failure(e) if self.url.startswith("https:") else None
            if reason is None:
                raise
            raise RouteTLSError(f"the route {self.url}: {reason}") from None
        content = await response.content()
        try:
            answer = json.loads(content)
            code = str(answer["code"])
        except (ValueError, KeyError, TypeError):
            raise RouteError(
                "4000", f"unexpected HTTP {response.code} answer from {path}"
            ) from None
        if code != SUCCESS:
            raise RouteError(code, str(answer.get("message") or "error"))
        return answer.get("dataBody")

    async def register(
        self, user_name: str, password: str | None = None, account_key: str = ""
    ) -> User:
        """
        Create the account C{user_name}, or get the existing one's id by
        proving it is ours (its password, or C{account_key}).

        @return: the account; its C{account_key} is set when the route
            created it without a password.
        """
        body: dict[str, Any] = {"userName": user_name}
        if password:
            body["password"] = password
        if account_key:
            body["accountKey"] = account_key
        data = await self.call("/registerAccount", body)
        return User(
            int(data["userId"]),
            str(data["userName"]),
            str(data.get("accountKey") or ""),
        )

    async def login(
        self,
        user_id: int,
        user_name: str,
        password: str | None = None,
        token: str = "",
        account_key: str = "",
        device: str = "",
        device_key: str = "",
    ) -> LoginInfo:
        """
        Log in: the route picks an IM server and issues a token for it.

        @param token: an earlier token of this user, the proof that lets this
            login replace the user's current session.
        @param account_key: the account's key (its credential when it has
            no password).
        @param device: this client's device id (the session is this
            device's; C{""}: none, CIM's one session per user).
        @param device_key: the device's device key (its credential, used
            up by this login: the reply carries the next one).
        """
        body: dict[str, Any] = {"userId": user_id, "userName": user_name}
        if device:
            body["device"] = device
        if password:
            body["password"] = password
        if token:
            body["token"] = token
        if account_key:
            body["accountKey"] = account_key
        if device_key:
            body["deviceKey"] = device_key
        data = await self.call("/login", body)
        return LoginInfo(
            host=str(data["ip"]),
            port=int(data["cimServerPort"]),
            http_port=int(data.get("httpPort", 0)),
            token=str(data["token"]),
            user_id=int(data.get("userId", user_id)),
            user_name=str(data.get("userName", user_name)),
            tls=data.get("tls") is True,
            device=str(data.get("device") or ""),
            device_key=str(data.get("deviceKey") or ""),
        )

    async def offline(self, user_id: int, token: str) -> None:
        """
        End the user's session (CIM's C{/offLine}).
        """
        # Quickly: a client that quits should not hang on a dead route.
        timeout = min(self.timeout, 3.0)
        await self.call("/offLine", {"userId": user_id, "msg": "bye"}, token, timeout)

    async def online_users(self) -> list[User]:
        """
        The users connected now.
        """
        return _users(await self.call("/onlineUser"))

    async def broadcast(self, user_id: int, token: str, text: str) -> None:
        """
        Send C{text} to every other online user (CIM's C{/groupRoute}).
        """
        await self.call("/groupRoute", {"userId": user_id, "msg": text}, token)

    async def create_group(
        self,
        user_id: int,
        token: str,
        group_id: str,
        policy: str | None = None,
        history: str | None = None,
    ) -> None:
        """
        Create group C{group_id}, owned by the user, its first member.

        @param policy: C{open}, C{invite} or C{approval} (the route's
            default, C{invite}, when C{None}).
        @param history: C{join} or C{full} (the route's default, C{join}).
        """
        body: dict[str, Any] = {"userId": user_id, "groupId": group_id}
        if policy is not None:
            body["policy"] = policy
        if history is not None:
            body["history"] = history
        await self.call("/group/create", body, token)

    async def join_group(self, user_id: int, token: str, group_id: str) -> JoinResult:
        """
        Join a group (or ask to, for a group by approval).
        """
        data = await self.call(
            "/group/join", {"userId": user_id, "groupId": group_id}, token
        )
        if not isinstance(data, dict):
            return JoinResult(True)
        return JoinResult(bool(data.get("joined")), bool(data.get("pending")))

    async def leave_group(self, user_id: int, token: str, group_id: str) -> bool:
        """
        Leave a group.  @return: C{False} if not a member.
        """
        data = await self.call(
            "/group/leave", {"userId": user_id, "groupId": group_id}, token
        )
        return bool(data.get("left", True)) if isinstance(data, dict) else True

    async def group_info(self, user_id: int, token: str, group_id: str) -> GroupInfo:
        """
        A group's owner, policy, history mode and member count.
        """
        data = await self.call(
            "/group/info", {"userId": user_id, "groupId": group_id}, token
        )
        owner = data.get("ownerId")
        joined_at = data.get("joinedAt")
        return GroupInfo(
            group_id=str(data.get("groupId", group_id)),
            owner_id=None if owner is None else int(owner),
            policy=str(data.get("policy", "")),
            history=str(data.get("history", "")),
            members=int(data.get("members", 0)),
            member=bool(data.get("member")),
            joined_at=None if joined_at is None else int(joined_at),
        )

    async def _about(
        self, path: str, user_id: int, token: str, group_id: str, **other: int
    ) -> Any:
        """
        Call a group endpoint that names another user (C{other}).
        """
        return await self.call(
            path, {"userId": user_id, "groupId": group_id, **other}, token
        )

    async def invite(
        self, user_id: int, token: str, group_id: str, invitee_id: int
    ) -> bool:
        """
        The owner invites a user.  @return: C{False} if invited already.
        """
        data = await self._about(
            "/group/invite", user_id, token, group_id, inviteeId=invitee_id
        )
        return bool(data.get("invited", True)) if isinstance(data, dict) else True

    async def join_requests(
        self, user_id: int, token: str, group_id: str
    ) -> list[User]:
        """
        The users waiting for the owner's approval, oldest first.
        """
        return _users(await self._about("/group/requests", user_id, token, group_id))

    async def approve(
        self, user_id: int, token: str, group_id: str, requester_id: int
    ) -> None:
        """
        The owner lets a waiting user in.
        """
        await self._about(
            "/group/approve", user_id, token, group_id, requesterId=requester_id
        )

    async def reject(
        self, user_id: int, token: str, group_id: str, requester_id: int
    ) -> None:
        """
        The owner turns a waiting user down.
        """
        await self._about(
            "/group/reject", user_id, token, group_id, requesterId=requester_id
        )

    async def remove_member(
        self, user_id: int, token: str, group_id: str, member_id: int
    ) -> bool:
        """
        The owner removes a member.  @return: C{False} if not a member.
        """
        data = await self._about(
            "/group/remove", user_id, token, group_id, memberId=member_id
        )
        return bool(data.get("removed", True)) if isinstance(data, dict) else True

    async def transfer_group(
        self, user_id: int, token: str, group_id: str, new_owner_id: int
    ) -> None:
        """
        The owner hands the group over to another member.
        """
        await self._about(
            "/group/transfer", user_id, token, group_id, newOwnerId=new_owner_id
        )

    async def group_members(
        self, user_id: int, token: str, group_id: str
    ) -> list[User]:
        """
        The members of a group the user belongs to.
        """
        return _users(
            await self.call(
                "/group/members", {"userId": user_id, "groupId": group_id}, token
            )
        )

    async def user_groups(self, user_id: int, token: str) -> list[str]:
        """
        The ids of the user's groups.
        """
        data = await self.call("/user/groups", {"userId": user_id}, token)
        return [str(g) for g in data or ()]

    async def conversations(self, user_id: int, token: str) -> list[ConversationInfo]:
        """
        Where the user stands in each of its private conversations that
        holds messages and in each of its groups: last seq, read position,
        unread count, and the peer's read position (C{/conversations}).
        """
        data = await self.call("/conversations", {"userId": user_id}, token)
        return [ConversationInfo.from_json(c) for c in data or ()]

    async def read_positions(
        self, user_id: int, token: str, conversation: str
    ) -> dict[int, int]:
        """
        How far each member of C{conversation} (a group's members, or the
        two users of a private conversation) has read it
        (C{/readPositions}).
        """
        data = await self.call(
            "/readPositions", {"userId": user_id, "conversation": conversation}, token
        )
        return {int(p["userId"]): int(p["read"]) for p in data or ()}

    async def history(
        self,
        user_id: int,
        token: str,
        conversation: str = "",
        limit: int = 20,
        *,
        peer_id: int | None = None,
        after_seq: int | None = None,
        before_seq: int | None = None,
    ) -> list[ChatMessage]:
        """
        Up to C{limit} stored messages, in order, of C{conversation} or of
        the private conversation with C{peer_id}: those after C{after_seq},
        else the latest before C{before_seq} (C{0} or C{None}: the latest).
        """
        body: dict[str, Any] = {"userId": user_id, "limit": limit}
        if peer_id is not None:
            body["peerId"] = peer_id
        else:
            body["conversation"] = conversation
        if after_seq is not None:
            body["afterSeq"] = after_seq
        else:
            body["beforeSeq"] = before_seq or 0
        data = await self.call("/history", body, token)
        return [message_from_dict(m) for m in data or ()]
