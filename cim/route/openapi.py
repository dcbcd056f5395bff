"""
The OpenAPI 3.0 description of the route's HTTP API, served at
C{GET /openapi.json}.  C{tests/test_openapi.py} checks that it names every
route of L{cim.route.api.RouteAPI} and nothing else.
"""

from __future__ import annotations

from typing import Any

from cim import envelope as codes
from cim.interfaces import GROUP_POLICIES, HISTORY_MODES
from cim.limits import GROUP_ID_PATTERN
from cim.route.fields import REQUESTS, Limits

Schema = dict[str, Any]

_CODES = ", ".join(f"{code} {text}" for code, text in codes.MESSAGES.items())


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict[str, Schema], required: list[str] | None = None) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def _array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


_GROUP_ID: Schema = {"type": "string", "pattern": f"^{GROUP_ID_PATTERN}$"}
#: The header by which cim's clients ask for cim's extended replies.
_EXTENDED: Schema = {
    "name": codes.EXTENDED_HEADER.decode("ascii"),
    "in": "header",
    "required": False,
    "schema": {"type": "string", "enum": [codes.EXTENDED.decode("ascii")]},
    "description": (
        "cim's own clients send it to get cim's extended replies.  Without "
        "it (as from CIM's clients, which decode replies strictly), a CIM "
        "endpoint answers exactly CIM's fields."
    ),
}


def _answer(data: Schema | None, description: str) -> Schema:
    """
    The envelope with C{dataBody} of schema C{data} (C{null} when C{None}).
    """
    body: Schema = {"nullable": True, "description": description}
    if data is not None and "$ref" in data:
        body = {"allOf": [data], "nullable": True, "description": description}
    elif data is not None:
        body = {**data, "nullable": True, "description": description}
    return {
        "description": "The envelope (HTTP 200 for every business outcome).",
        "content": {
            "application/json": {
                "schema": {
                    "allOf": [
                        _ref("Envelope"),
                        {"type": "object", "properties": {"dataBody": body}},
                    ]
                }
            }
        },
    }


def _operation(
    summary: str,
    description: str,
    request: Schema | None,
    data: Schema | None,
    data_description: str,
    auth: str = "",
    cim: bool = False,
) -> Schema:
    """
    One operation.  C{auth}: C{""} (none), C{"user"} (the user's token or
    the secret), C{"legacy"} (the same, unless C{--legacy-auth}).  C{cim}:
    one of CIM's endpoints, whose extended reply needs L{_EXTENDED}.
    """
    if auth:
        description += (
            "\n\nActs for a user: needs that user's login token (bearer) or the "
            "cluster secret; 4010 otherwise."
        )
        if auth == "legacy":
            description += " With --legacy-auth, CIM clients may omit both."
    operation: Schema = {
        "summary": summary,
        "description": description,
        "responses": {
            "200": _answer(data, data_description),
            "404": {"description": "No such endpoint (code 3000)."},
            "405": {"description": "Wrong method (code 3000)."},
        },
    }
    if auth:
        operation["security"] = [{"bearer": []}, {"clusterSecret": []}]
    if cim:
        operation["parameters"] = [_EXTENDED]
    if request is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": request}},
        }
    return operation


def openapi_document(max_message: int = 4096) -> Schema:
    """
    The OpenAPI 3.0 document of the route API.

    @param max_message: the C{--max-message} limit, shown in the schemas.
    """
    limits = Limits(max_message=max_message)

    def body(path: str) -> Schema:
        return REQUESTS[path].schema(limits)

    sent = _obj(
        {"msgId": {"type": "integer"}, "seq": {"type": "integer"}}, ["msgId", "seq"]
    )
    user = _ref("User")
    post = {
        "/registerAccount": _operation(
            "Register an account",
            "Creates the account (one without a password gets an account key, "
            "its credential, in the extended reply), or returns the existing "
            "one of that name (equal after NFKC, case folding and the "
            "confusable skeleton) when the request gives its password or "
            "accountKey; 4090 otherwise (with --legacy-auth an account without "
            "a password is returned to anyone).  Names with control or format "
            "characters are refused (3000).  With --require-password a "
            "password is required (3000).  Failed attempts are limited per "
            "name and per address (6000).",
            body("/registerAccount"),
            _ref("Registered"),
            "The account, and with X-Cim-Extended the new account's key.",
            cim=True,
        ),
        "/login": _operation(
            "Log in: choose an IM server",
            "Checks the account and the request's proof that it is the user: "
            "its password, its accountKey, the deviceKey of its device, a "
            "valid token in the body or the bearer header, or the secret (9100 without one; with "
            "--legacy-auth an account without a password needs none, and a "
            "user already holding any session then gets 5000).  Picks a "
            "reachable IM server with the balancer (7100 when none), claims "
            "the session of the user's device there (one per device; no "
            'device: the device "", CIM\'s single session), replacing (and '
            "closing) the device's older one, and past --max-devices sessions "
            "closing the least recently active other device's; then issues a "
            "token bound to that device for the TCP login, and with "
            "X-Cim-Extended and a device a new deviceKey for that device "
            "(the one used, if any, stops working).  Failed attempts "
            "are limited per account and per address (6000).",
            body("/login"),
            _ref("LoginResult"),
            "Where to connect (CIM's fields), and with X-Cim-Extended the "
            "token to log in with, the device and its new deviceKey.",
            cim=True,
        ),
        "/groupRoute": _operation(
            "Send to every other online user (CIM's group chat)",
            "Stored once, delivered to each online user but the sender.",
            body("/groupRoute"),
            None,
            "null",
            auth="legacy",
            cim=True,
        ),
        "/p2pRoute": _operation(
            "Send a private message",
            "Stored in the private conversation of the two users, "
            "p:<lower id>:<higher id> (batchMsg: several texts, in order), then "
            "delivered to every connected device of both; 7000 when no device "
            "of the receiver is connected or reachable: the message waits for "
            "its next login.  3000 for an unknown receiver.  dataBody is null "
            "(CIM's NULLBody) unless the request has X-Cim-Extended (then also "
            "with 7000).",
            body("/p2pRoute"),
            sent,
            "null; with X-Cim-Extended the last stored message's id and seq.",
            auth="legacy",
            cim=True,
        ),
        "/offLine": _operation(
            "Log off",
            "With the user's token: releases the session of that token's "
            "device and closes its connection.  With the secret (or no "
            "credential under --legacy-auth): every device of the user.",
            body("/offLine"),
            None,
            "null",
            auth="legacy",
            cim=True,
        ),
        "/fetchOfflineMsgs": _operation(
            "Have the stored messages pushed again",
            "Asks the IM servers of the user's devices to send them what they "
            "have not got.  "
            "Success whether or not the user is connected, as CIM answers; "
            "with X-Cim-Extended, 7000 when the user is not connected.",
            body("/fetchOfflineMsgs"),
            None,
            "null",
            auth="legacy",
            cim=True,
        ),
        "/group/create": _operation(
            "Create a group",
            "The creator is its owner and first member.  policy: who may join "
            "(open: anyone; invite, the default: the users the owner invited; "
            "approval: those whose request the owner approved, or invited).  "
            "history: what a member reads with /history (join, the default: "
            "the messages after the seq at which it joined; full: all that is "
            "kept).  4090 when the group exists; 3000 for an unknown policy or "
            "history.",
            body("/group/create"),
            _obj(
                {
                    "groupId": _GROUP_ID,
                    "policy": {"type": "string"},
                    "history": {"type": "string"},
                }
            ),
            "The group id and its settings.",
            auth="user",
        ),
        "/group/join": _operation(
            "Join a group",
            "As its policy allows: an open group (or one created before groups "
            "had owners) takes anyone; an invite group only a user the owner "
            "invited (4010 otherwise); an approval group an invited user, and "
            "records anyone else's request (pending: true) for the owner's "
            "/group/approve (4090 when 1000 requests wait).  A new member "
            "receives and reads the messages from its join on.  3000 when "
            "there is no such group.",
            body("/group/join"),
            _obj(
                {
                    "groupId": _GROUP_ID,
                    "joined": {"type": "boolean"},
                    "pending": {"type": "boolean"},
                }
            ),
            "joined: false when already a member or waiting; pending: the "
            "request waits for the owner.",
            auth="user",
        ),
        "/group/leave": _operation(
            "Leave a group",
            "3000 when there is no such group; 4090 for its owner, who hands "
            "the group over first (/group/transfer).",
            body("/group/leave"),
            _obj({"groupId": _GROUP_ID, "left": {"type": "boolean"}}),
            "left: false when not a member.",
            auth="user",
        ),
        "/group/members": _operation(
            "List a group's members",
            "For members only (4010).",
            body("/group/members"),
            _array(user),
            "The members.",
            auth="user",
        ),
        "/group/info": _operation(
            "A group's settings",
            "For its members, users invited or waiting, and anyone when the "
            "group is open (4010 otherwise).  ownerId is null for a group "
            "created before groups had owners.",
            body("/group/info"),
            _obj(
                {
                    "groupId": _GROUP_ID,
                    "ownerId": {"type": "integer", "nullable": True},
                    "policy": {"type": "string", "enum": list(GROUP_POLICIES)},
                    "history": {"type": "string", "enum": list(HISTORY_MODES)},
                    "members": {"type": "integer"},
                    "member": {"type": "boolean"},
                    "joinedAt": {
                        "type": "integer",
                        "description": "For a member: the seq after which it "
                        "reads (history join).",
                    },
                }
            ),
            "The owner, policy, history mode and member count.",
            auth="user",
        ),
        "/group/invite": _operation(
            "Invite a user to a group",
            "For the owner only (4010).  The invitation lets the invitee join "
            "once (an approval group without a request).  4090 when the "
            "invitee is a member; 3000 for an unknown user.",
            body("/group/invite"),
            _obj(
                {
                    "groupId": _GROUP_ID,
                    "inviteeId": {"type": "integer"},
                    "invited": {"type": "boolean"},
                }
            ),
            "invited: false when already invited.",
            auth="user",
        ),
        "/group/requests": _operation(
            "List the requests to join",
            "For the owner only (4010).",
            body("/group/requests"),
            _array(user),
            "The users waiting, oldest first.",
            auth="user",
        ),
        "/group/approve": _operation(
            "Approve a request to join",
            "For the owner only (4010).  The requester becomes a member from "
            "the group's last message on.  3000 when it has no request "
            "waiting.",
            body("/group/approve"),
            _obj(
                {
                    "groupId": _GROUP_ID,
                    "requesterId": {"type": "integer"},
                    "joined": {"type": "boolean"},
                }
            ),
            "joined: true.",
            auth="user",
        ),
        "/group/reject": _operation(
            "Turn down a request to join",
            "For the owner only (4010); the user may ask again.  3000 when it "
            "has no request waiting.",
            body("/group/reject"),
            _obj(
                {
                    "groupId": _GROUP_ID,
                    "requesterId": {"type": "integer"},
                    "rejected": {"type": "boolean"},
                }
            ),
            "rejected: true.",
            auth="user",
        ),
        "/group/remove": _operation(
            "Remove a member",
            "For the owner only (4010), who cannot remove itself (4090).  A "
            "member removed from an open group may join again.",
            body("/group/remove"),
            _obj(
                {
                    "groupId": _GROUP_ID,
                    "memberId": {"type": "integer"},
                    "removed": {"type": "boolean"},
                }
            ),
            "removed: false when it was not a member.",
            auth="user",
        ),
        "/group/transfer": _operation(
            "Hand a group over",
            "For the owner only (4010): another member (3000 otherwise) "
            "becomes the owner.",
            body("/group/transfer"),
            _obj({"groupId": _GROUP_ID, "ownerId": {"type": "integer"}}),
            "The new owner.",
            auth="user",
        ),
        "/group/send": _operation(
            "Send to a group",
            "For members only (4010).  Stored in the group's conversation and "
            "delivered to every member, the sender included.",
            body("/group/send"),
            sent,
            "The last stored message's id and seq.",
            auth="user",
        ),
        "/user/groups": _operation(
            "List a user's groups",
            "",
            body("/user/groups"),
            _array(_GROUP_ID),
            "The group ids, sorted.",
            auth="user",
        ),
        "/history": _operation(
            "Read a conversation",
            "conversation: p:<lower id>:<higher id> (a private conversation of "
            "the user; 4010 for another's) or g:<groupId> (a group the user "
            "belongs to; 4010 otherwise); or peerId instead, for the private "
            "conversation with that user.  u:<userId> inboxes are gone (3000, "
            "naming peerId).  The messages with seq > afterSeq or, with "
            "beforeSeq, the latest ones before it (0: the latest), to page "
            "back.  Of a group whose history is join, only the messages after "
            "the seq at which the user joined.",
            body("/history"),
            _array(_ref("Message")),
            "Up to limit messages, in seq order.",
            auth="user",
        ),
        "/conversations": _operation(
            "The user's conversations and unread counts",
            "Each private conversation that holds messages and each group of "
            "the user: its epoch (the numbering the store holds; a client "
            "position of another epoch is not trusted), last seq, the user's "
            "read position and unread count; the other user, its name and "
            "read position (read receipts) of a private one; the group id of "
            "a group.",
            body("/conversations"),
            _array(_ref("Conversation")),
            "Ordered by conversation id.",
            auth="user",
        ),
        "/read": _operation(
            "Mark a conversation read",
            "Raises the user's read position in one of its conversations to "
            "seq (never lowers it; at most the last seq), and tells every "
            "connected device of the user and, in a private conversation, of "
            "the other user (a READ frame).  4010 for a conversation not the "
            "user's; 3000 for an unknown group or a malformed id.",
            body("/read"),
            _obj({"read": {"type": "integer"}}, ["read"]),
            "read: the user's read position after the call.",
            auth="user",
        ),
        "/readPositions": _operation(
            "Who read how far",
            "The read positions of a group's members (for a member), or of "
            "both users of a private conversation (for either); 4010 "
            "otherwise.",
            body("/readPositions"),
            _array(_ref("ReadPosition")),
            "By user id.",
            auth="user",
        ),
        "/devices": _operation(
            "The user's devices",
            'One session per device: the device id ("" for a client naming '
            "none), its IM server, whether it is connected (false: logged in, "
            "not connected yet), and when it was last active.",
            body("/devices"),
            _array(_ref("Device")),
            "Ordered by device.",
            auth="user",
        ),
    }
    online_users = _operation(
        "List the online users",
        "Users with a connected session, by user id.",
        None,
        _array(user),
        "The online users.",
        cim=True,
    )
    paths: dict[str, Schema] = {path: {"post": op} for path, op in post.items()}
    paths["/onlineUser"] = {
        "get": online_users,
        "post": {**online_users, "description": "The same as GET (CIM clients POST)."},
    }
    paths["/health"] = {
        "get": _operation(
            "Health",
            "HTTP 503 with code 4000 when the store does not answer.",
            None,
            _obj(
                {
                    "servers": _array({"type": "string"}),
                    "registry": {
                        "type": "string",
                        "enum": ["connected", "disconnected"],
                    },
                    "store": {"type": "string"},
                }
            ),
            "The registered IM servers, the registry and store states.",
        )
    }
    paths["/metrics"] = {
        "get": {
            "summary": "Prometheus metrics",
            "responses": {
                "200": {
                    "description": "The text exposition format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    }
    paths["/openapi.json"] = {
        "get": {
            "summary": "This document",
            "responses": {
                "200": {
                    "description": "The OpenAPI 3.0 document.",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "cim route",
            "version": "1",
            "description": (
                "The HTTP API of the cim route, compatible with CIM's.  Every "
                "answer is an Envelope, HTTP 200 for business outcomes.  Codes: "
                f"{_CODES}."
            ),
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "clusterSecret": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-Cim-Secret",
                },
            },
            "schemas": {
                "Envelope": _obj(
                    {
                        "code": {"type": "string", "enum": list(codes.MESSAGES)},
                        "message": {"type": "string"},
                        "reqNo": {
                            "nullable": True,
                            "description": "The request's reqNo.",
                        },
                        "dataBody": {"nullable": True},
                    },
                    ["code", "message", "reqNo", "dataBody"],
                ),
                "User": _obj(
                    {"userId": {"type": "integer"}, "userName": {"type": "string"}},
                    ["userId", "userName"],
                ),
                "Registered": _obj(
                    {
                        "userId": {"type": "integer"},
                        "userName": {"type": "string"},
                        "accountKey": {
                            "type": "string",
                            "description": "With X-Cim-Extended, for an account "
                            "this call created without a password: its "
                            "credential (keep it secret).",
                        },
                    },
                    ["userId", "userName"],
                ),
                "LoginResult": _obj(
                    {
                        "ip": {"type": "string"},
                        "cimServerPort": {"type": "integer"},
                        "httpPort": {"type": "integer"},
                        "token": {
                            "type": "string",
                            "description": "With X-Cim-Extended only.",
                        },
                        "userId": {
                            "type": "integer",
                            "description": "With X-Cim-Extended only.",
                        },
                        "userName": {
                            "type": "string",
                            "description": "With X-Cim-Extended only.",
                        },
                        "device": {
                            "type": "string",
                            "description": "With X-Cim-Extended only: the "
                            'device logged in ("" when the request named '
                            "none).",
                        },
                        "deviceKey": {
                            "type": "string",
                            "description": "With X-Cim-Extended only, and "
                            "only when the request named a device: the "
                            "device's new device key (keep it secret), which "
                            "logs this device in again (with userId, "
                            "userName and device) until it is used, the "
                            "device logs off, or it expires "
                            "(--device-key-ttl).",
                        },
                        "tls": {
                            "type": "boolean",
                            "description": "With X-Cim-Extended only, and "
                            "only when true: the server's client port speaks "
                            "TLS (verify its certificate for ip).",
                        },
                        "wsUrl": {
                            "type": "string",
                            "description": "With X-Cim-Extended only, and "
                            "only when the server has a WebSocket gateway: "
                            "its URL (ws:// or wss://).",
                        },
                    },
                    ["ip", "cimServerPort", "httpPort"],
                ),
                "Conversation": _obj(
                    {
                        "conversation": {"type": "string"},
                        "epoch": {"type": "string"},
                        "lastSeq": {"type": "integer"},
                        "read": {"type": "integer"},
                        "unread": {"type": "integer"},
                        "peerId": {
                            "type": "integer",
                            "description": "A private conversation's other "
                            "user (the user itself for its notes).",
                        },
                        "peerName": {"type": "string"},
                        "peerRead": {
                            "type": "integer",
                            "description": "The other user's read position.",
                        },
                        "groupId": {"type": "string"},
                    },
                    ["conversation", "epoch", "lastSeq", "read", "unread"],
                ),
                "ReadPosition": _obj(
                    {"userId": {"type": "integer"}, "read": {"type": "integer"}},
                    ["userId", "read"],
                ),
                "Device": _obj(
                    {
                        "device": {"type": "string"},
                        "server": {"type": "string"},
                        "connected": {"type": "boolean"},
                        "active": {
                            "type": "number",
                            "description": "Seconds since the epoch.",
                        },
                    },
                    ["device", "server", "connected", "active"],
                ),
                "Message": _obj(
                    {
                        "msgId": {"type": "integer"},
                        "conversation": {"type": "string"},
                        "seq": {"type": "integer"},
                        "sendUserId": {"type": "integer"},
                        "sendUserName": {"type": "string"},
                        "msg": {"type": "string"},
                        "timestamp": {"type": "integer", "description": "ms"},
                        "clientMsgId": {"type": "string"},
                        "receiveUserId": {"type": "integer"},
                        "groupId": {"type": "string"},
                        "epoch": {
                            "type": "string",
                            "description": "The conversation's epoch when it "
                            "was stored: (epoch, seq) names it for ever.",
                        },
                    },
                    [
                        "msgId",
                        "conversation",
                        "seq",
                        "sendUserId",
                        "sendUserName",
                        "msg",
                        "timestamp",
                    ],
                ),
            },
        },
    }
