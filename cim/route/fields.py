"""
The route's request bodies, declared once: each endpoint's fields, how each
is checked (L{Request.parse}, used by L{cim.route.api}) and how it is
described (L{Request.schema}, used by L{cim.route.openapi}).

A field that fails its check is answered with code 3000 and a message that
names it.  JSON C{null} counts as absent (Java clients send null fields);
fields a request does not declare are ignored (CIM's clients send C{reqNo}
and C{timeStamp}).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cim import envelope as codes
from cim.envelope import ApiError
from cim.interfaces import (
    DEFAULT_HISTORY,
    DEFAULT_POLICY,
    GROUP_POLICIES,
    HISTORY_MODES,
)
from cim.limits import (
    DEVICE_ID,
    DEVICE_ID_PATTERN,
    DEVICE_ID_RULE,
    GROUP_ID_PATTERN,
    GROUP_ID_RULE,
    MAX_BATCH,
    MAX_CLIENT_MSG_ID,
    MAX_NAME,
    MAX_PASSWORD,
    MAX_SEQ,
    MAX_USER_ID,
    is_group_id,
)
from cim.names import NAME_RULE, BadName, check_name

Schema = dict[str, Any]
Body = Mapping[str, Any]

#: History page sizes.
DEFAULT_PAGE = 50
MAX_PAGE = 200
#: The longest token and conversation id.
MAX_TOKEN = 1024
MAX_CONVERSATION = 80


#: How deeply a request body's JSON may nest (the declared fields need 2).
MAX_DEPTH = 32


def bad(message: str) -> ApiError:
    return ApiError(codes.INVALID_ARGUMENT, message)


def _encodable(text: str) -> bool:
    """
    Whether C{text} is valid Unicode (JSON's C{"\\ud800"} escapes decode
    to lone surrogates, which no store or wire can carry).
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_SURROGATE = "a lone surrogate (an unpaired \\ud800-\\udfff escape): not text"


def check_json(body: dict[str, Any]) -> None:
    """
    Check a whole request body, declared fields or not (C{reqNo} is echoed):
    at most L{MAX_DEPTH} levels of nesting, and no lone surrogate in any
    string or key.

    @raise ApiError: 3000, naming the top-level field.
    """
    pending: list[tuple[str, Any, int]] = [("", body, 1)]
    while pending:
        where, value, depth = pending.pop()
        if isinstance(value, str):
            if not _encodable(value):
                raise bad(f"{where or 'a field name'} holds {_SURROGATE}")
            continue
        if not isinstance(value, dict | list):
            continue
        if depth > MAX_DEPTH:
            raise bad(f"{where} is nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if not _encodable(key):
                    raise bad(f"{where or 'a field name'} holds {_SURROGATE}")
                pending.append((where or key, item, depth + 1))
        else:
            pending.extend((where, item, depth + 1) for item in value)


def type_name(value: object) -> str:
    return {
        type(None): "null",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


@dataclass(frozen=True, slots=True)
class Limits:
    """
    What the checks depend on beyond this module: the route's options.
    """

    max_message: int = 4096
    max_batch: int = MAX_BATCH


class Field:
    """
    One field of a request body.

    @ivar name: its JSON name.
    @ivar required: whether a request without it is refused.
    """

    name: str
    required: bool = True

    def parse(self, body: Body, limits: Limits) -> Any:
        """
        @return: the checked value (C{None} when absent and optional).
        @raise ApiError: 3000, naming the field.
        """
        raise NotImplementedError

    def properties(self, limits: Limits) -> dict[str, Schema]:
        """
        The JSON-schema properties this field describes.
        """
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class UserId(Field):
    """
    A user id: a positive 64-bit integer, as a JSON number or a string of
    digits (CIM sends numbers; some clients quote them).
    """

    name: str = "userId"
    required: bool = True
    description: str = ""

    def parse(self, body: Body, limits: Limits) -> int | None:
        value = body.get(self.name)
        if value is None:
            if self.required:
                raise bad(f"{self.name} is missing")
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and value.isascii() and value.isdigit():
            number = int(value)
        else:
            raise bad(f"{self.name} must be an integer, not {type_name(value)}")
        if not 0 < number <= MAX_USER_ID:
            raise bad(f"{self.name} must be a positive 64-bit integer")
        return number

    def properties(self, limits: Limits) -> dict[str, Schema]:
        return {
            self.name: {
                "oneOf": [
                    {"type": "integer", "format": "int64", "minimum": 1},
                    {"type": "string", "pattern": "^[0-9]+$"},
                ],
                "description": (
                    "A user id, as a number or a string of digits.  " + self.description
                ).strip(),
            }
        }


@dataclass(frozen=True, slots=True)
class Text(Field):
    """
    A string of 1 to C{max_length} characters, not only spaces.
    """

    name: str
    max_length: int
    required: bool = True
    description: str = ""

    def parse(self, body: Body, limits: Limits) -> str | None:
        value = body.get(self.name)
        if value is None:
            if self.required:
                raise bad(f"{self.name} is missing")
            return None
        if not isinstance(value, str):
            raise bad(f"{self.name} must be a string, not {type_name(value)}")
        if not value.strip():
            raise bad(f"{self.name} must not be empty")
        if len(value) > self.max_length:
            raise bad(f"{self.name} is longer than {self.max_length} characters")
        return value

    def properties(self, limits: Limits) -> dict[str, Schema]:
        schema: Schema = {
            "type": "string",
            "minLength": 1,
            "maxLength": self.max_length,
        }
        if self.description:
            schema["description"] = self.description
        return {self.name: schema}


@dataclass(frozen=True, slots=True)
class UserName(Field):
    """
    A user name: 1 to L{MAX_NAME} characters, by the rule of
    L{cim.names.check_name}.
    """

    name: str = "userName"
    required: bool = True

    def parse(self, body: Body, limits: Limits) -> str:
        user_name = Text(self.name, MAX_NAME).parse(body, limits)
        assert user_name is not None
        try:
            return check_name(user_name)
        except BadName as e:
            raise bad(f"{self.name} {e}") from None

    def properties(self, limits: Limits) -> dict[str, Schema]:
        return {
            self.name: {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_NAME,
                "description": f"A user name: {NAME_RULE}.  Names are one "
                "account when equal after NFKC, case folding and Unicode's "
                "confusable skeleton.",
            }
        }


@dataclass(frozen=True, slots=True)
class GroupId(Field):
    name: str = "groupId"
    required: bool = True

    def parse(self, body: Body, limits: Limits) -> str:
        group_id = Text(self.name, 64).parse(body, limits)
        assert group_id is not None
        if not is_group_id(group_id):
            raise bad(f"{self.name} must be {GROUP_ID_RULE}")
        return group_id

    def properties(self, limits: Limits) -> dict[str, Schema]:
        return {self.name: {"type": "string", "pattern": f"^{GROUP_ID_PATTERN}$"}}


@dataclass(frozen=True, slots=True)
class Device(Field):
    """
    The client's device id (L{cim.limits.DEVICE_ID}); absent: C{""}, the
    device of a client that names none (CIM's).
    """

    name: str = "device"
    required: bool = False

    def parse(self, body: Body, limits: Limits) -> str:
        value = body.get(self.name)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise bad(f"{self.name} must be a string, not {type_name(value)}")
        if DEVICE_ID.fullmatch(value) is None:
            raise bad(f"{self.name} must be {DEVICE_ID_RULE}")
        return value

    def properties(self, limits: Limits) -> dict[str, Schema]:
        return {
            self.name: {
                "type": "string",
                "pattern": f"^{DEVICE_ID_PATTERN}$",
                "description": "This client's device id, chosen and kept by the "
                f"client ({DEVICE_ID_RULE}).  A user holds one session per "
                "device; without it the login is CIM's (one session per user).",
            }
        }


@dataclass(frozen=True, slots=True)
class ClientMsgId(Field):
    """
    The sender's id for a send: a retry with it is stored once.
    """

    name: str = "clientMsgId"
    required: bool = False

    def parse(self, body: Body, limits: Limits) -> str:
        value = body.get(self.name)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise bad(f"{self.name} must be a string, not {type_name(value)}")
        if len(value) > MAX_CLIENT_MSG_ID:
            raise bad(f"{self.name} is longer than {MAX_CLIENT_MSG_ID} characters")
        return value

    def properties(self, limits: Limits) -> dict[str, Schema]:
        return {
            self.name: {
                "type": "string",
                "maxLength": MAX_CLIENT_MSG_ID,
                "description": (
                    "The sender's id for this send: a retry with it is stored once."
                ),
            }
        }


@dataclass(frozen=True, slots=True)
class Integer(Field):
    """
    An integer between C{low} and C{high}: C{default} when absent
    (C{None}: absent stays C{None}), unless C{required}.
    """

    name: str
    default: int | None
    low: int
    high: int
    required: bool = False
    description: str = ""

    def parse(self, body: Body, limits: Limits) -> int | None:
        value = body.get(self.name)
        if value is None:
            if self.required:
                raise bad(f"{self.name} is missing")
            return self.default
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise bad(f"{self.name} must be an integer, not {type_name(value)}")
        try:
            number = int(value)
        except ValueError:
            raise bad(f"{self.name} must be an integer") from None
        if not self.low <= number <= self.high:
            raise bad(f"{self.name} must be between {self.low} and {self.high}")
        return number

    def properties(self, limits: Limits) -> dict[str, Schema]:
        schema: Schema = {"type": "integer", "minimum": self.low, "maximum": self.high}
        if self.default is not None:
            schema["default"] = self.default
        if self.description:
            schema["description"] = self.description
        return {self.name: schema}


@dataclass(frozen=True, slots=True)
class Choice(Field):
    """
    An optional string that must be one of C{options}.
    """

    name: str
    options: tuple[str, ...]
    default: str
    description: str = ""
    required: bool = False

    def parse(self, body: Body, limits: Limits) -> str:
        value = body.get(self.name)
        if value is None:
            return self.default
        if value not in self.options:
            raise bad(f"{self.name} must be one of {', '.join(self.options)}")
        return str(value)

    def properties(self, limits: Limits) -> dict[str, Schema]:
        schema: Schema = {
            "type": "string",
            "enum": list(self.options),
            "default": self.default,
        }
        if self.description:
            schema["description"] = self.description
        return {self.name: schema}


def _check_texts(texts: list[Any], where: str, limits: Limits) -> list[str]:
    for text in texts:
        if not isinstance(text, str):
            raise bad(f"{where} must be strings, not {type_name(text)}")
        if not text:
            raise bad(f"{where} must not be empty")
        if len(text) > limits.max_message:
            raise bad(
                f"{where} must be at most {limits.max_message} characters "
                f"(got {len(text)})"
            )
    return texts


def _text_schema(limits: Limits) -> Schema:
    return {"type": "string", "minLength": 1, "maxLength": limits.max_message}


@dataclass(frozen=True, slots=True)
class Message(Field):
    """
    One chat text, C{msg}.
    """

    name: str = "msg"
    required: bool = True

    def parse(self, body: Body, limits: Limits) -> str:
        value = body.get(self.name)
        if value is None:
            raise bad(f"{self.name} is missing")
        [text] = _check_texts([value], self.name, limits)
        return text

    def properties(self, limits: Limits) -> dict[str, Schema]:
        return {self.name: _text_schema(limits)}


@dataclass(frozen=True, slots=True)
class Texts(Field):
    """
    The texts of a send: C{batchMsg} when it is a non-empty list (each
    stored as its own message, in order), else C{msg}.
    """

    name: str = "texts"
    required: bool = True

    def parse(self, body: Body, limits: Limits) -> list[str]:
        batch = body.get("batchMsg")
        if batch is not None and batch != []:
            if not isinstance(batch, list):
                raise bad(f"batchMsg must be a list of strings, not {type_name(batch)}")
            if len(batch) > limits.max_batch:
                raise bad(
                    f"batchMsg holds at most {limits.max_batch} texts (got {len(batch)})"
                )
            return _check_texts(batch, "batchMsg items", limits)
        value = body.get("msg")
        if value is None:
            raise bad("msg is missing")
        return _check_texts([value], "msg", limits)

    def properties(self, limits: Limits) -> dict[str, Schema]:
        return {
            "msg": _text_schema(limits),
            "batchMsg": {
                "type": "array",
                "items": _text_schema(limits),
                "maxItems": limits.max_batch,
            },
        }


@dataclass(frozen=True, slots=True)
class Ignored(Field):
    """
    A field clients send that the route does not use.
    """

    name: str
    schema: Schema
    required: bool = False

    def parse(self, body: Body, limits: Limits) -> None:
        return None

    def properties(self, limits: Limits) -> dict[str, Schema]:
        return {self.name: self.schema}


#: Fields every request may carry: CIM's.
_CIM_EXTRAS: dict[str, Schema] = {
    "reqNo": {"description": "Any value; echoed as reqNo in the answer."},
    "timeStamp": {"description": "Ignored (CIM clients send it)."},
}


@dataclass(frozen=True, slots=True)
class Request:
    """
    A request body: its fields.
    """

    fields: tuple[Field, ...]

    def parse(self, body: Body, limits: Limits) -> dict[str, Any]:
        """
        @return: each field's checked value, by name.
        @raise ApiError: 3000, naming the first bad field.
        """
        return {field.name: field.parse(body, limits) for field in self.fields}

    def schema(self, limits: Limits) -> Schema:
        properties: dict[str, Schema] = {}
        required = []
        for field in self.fields:
            described = field.properties(limits)
            properties.update(described)
            if field.required and field.name in described:
                required.append(field.name)
        schema: Schema = {"type": "object", "properties": {**properties, **_CIM_EXTRAS}}
        if required:
            schema["required"] = required
        return schema


def _request(*fields: Field) -> Request:
    return Request(fields)


_GROUP = _request(UserId(), GroupId())
_POLICY = Choice(
    "policy",
    GROUP_POLICIES,
    DEFAULT_POLICY,
    "Who may join: anyone (open), the users the owner invited (invite), or "
    "those whose request the owner approved (approval).",
)
_HISTORY = Choice(
    "history",
    HISTORY_MODES,
    DEFAULT_HISTORY,
    "What a member reads with /history: the messages from its join on "
    "(join), or all that is kept (full).",
)


def _group_and(other: str) -> Request:
    """
    A group request naming another user: C{{userId, groupId, <other>}}.
    """
    return _request(UserId(), GroupId(), UserId(other))


def _conversation(required: bool = True, also: str = "") -> Text:
    return Text(
        "conversation",
        MAX_CONVERSATION,
        required=required,
        description=(
            "p:<lower userId>:<higher userId> (a private conversation of yours) "
            f"or g:<groupId> (a group of yours), e.g. p:3:7 or g:friends.  {also}"
        ).strip(),
    )


_ACCOUNT_KEY = Text(
    "accountKey",
    MAX_TOKEN,
    required=False,
    description="The account key /registerAccount gave the client that created "
    "the account (a proof of ownership, like the password).",
)

_DEVICE_KEY = Text(
    "deviceKey",
    MAX_TOKEN,
    required=False,
    description="The device key the last extended /login of this device "
    "returned (a proof of ownership for this device only, with device; each "
    "login with it answers a new one, and the old one stops working).",
)

#: Every endpoint's request body, by path.
REQUESTS: dict[str, Request] = {
    "/registerAccount": _request(
        UserName(),
        Text("password", MAX_PASSWORD, required=False),
        _ACCOUNT_KEY,
    ),
    "/login": _request(
        UserId(),
        UserName(),
        Text("password", MAX_PASSWORD, required=False),
        Text("token", MAX_TOKEN, required=False),
        _ACCOUNT_KEY,
        Device(),
        _DEVICE_KEY,
    ),
    "/groupRoute": _request(UserId(), Message()),
    "/p2pRoute": _request(UserId(), UserId("receiveUserId"), Texts(), ClientMsgId()),
    "/offLine": _request(UserId(), Ignored("msg", {"type": "string"})),
    "/fetchOfflineMsgs": _request(UserId("receiveUserId")),
    "/group/create": _request(UserId(), GroupId(), _POLICY, _HISTORY),
    "/group/join": _GROUP,
    "/group/leave": _GROUP,
    "/group/members": _GROUP,
    "/group/info": _GROUP,
    "/group/invite": _group_and("inviteeId"),
    "/group/requests": _GROUP,
    "/group/approve": _group_and("requesterId"),
    "/group/reject": _group_and("requesterId"),
    "/group/remove": _group_and("memberId"),
    "/group/transfer": _group_and("newOwnerId"),
    "/group/send": _request(UserId(), GroupId(), Texts(), ClientMsgId()),
    "/user/groups": _request(UserId()),
    "/history": _request(
        UserId(),
        _conversation(
            required=False,
            also="Give either it or peerId; u:<userId> inboxes are gone.",
        ),
        UserId(
            "peerId",
            required=False,
            description="The other user of a private conversation (instead "
            "of conversation).",
        ),
        Integer("afterSeq", 0, 0, MAX_SEQ, description="Messages after this seq."),
        Integer(
            "beforeSeq",
            None,
            0,
            MAX_SEQ,
            description="Paging back: the latest messages before this seq "
            "(0: the latest of all), instead of those after afterSeq.",
        ),
        Integer("limit", DEFAULT_PAGE, 1, MAX_PAGE),
    ),
    "/conversations": _request(UserId()),
    "/read": _request(
        UserId(),
        _conversation(),
        Integer(
            "seq",
            None,
            0,
            MAX_SEQ,
            required=True,
            description="The seq of the last message read (never lowers the "
            "position; at most the conversation's last seq).",
        ),
    ),
    "/readPositions": _request(UserId(), _conversation()),
    "/devices": _request(UserId()),
}
