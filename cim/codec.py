"""
Encoding and decoding of frames, and of the pushes that the message bus
carries between cim processes (L{encode_push}, L{decode_push}): the only
module that imports the generated protobuf code.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import TypeVar

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from cim._proto import cim_pb2
from cim.message import ChatMessage, Command, Frame, new_cursor
from cim.pushapi import PushItem, ReadEvent

_COMMANDS = {int(c): c for c in Command}

#: The descriptors of the wire's messages: what L{cim.jsonwire} derives its
#: tables from (this module stays the only importer of the generated code).
REQUEST = cim_pb2.Request.DESCRIPTOR
CURSOR = cim_pb2.Cursor.DESCRIPTOR
CHAT_MESSAGE = cim_pb2.ChatMessage.DESCRIPTOR


class CodecError(ValueError):
    """
    Bytes that are not a valid frame.
    """


#: The varints of the values below 128 (one byte each).
_ONE_BYTE = [bytes((value,)) for value in range(0x80)]


def encode_varint(value: int) -> bytes:
    """
    Encode a non-negative integer below 2**32 as a base-128 varint.
    """
    if 0 <= value < 0x80:
        return _ONE_BYTE[value]
    if 0x80 <= value < 0x4000:
        # Two bytes: most frames, and most messages' forms.
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    if not 0 <= value < 1 << 32:
        raise ValueError(f"varint32 out of range: {value}")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _chat_to_pb(message: ChatMessage, pb: cim_pb2.ChatMessage) -> None:
    pb.msgId = message.msg_id
    pb.conversation = message.conversation
    pb.seq = message.seq
    pb.senderId = message.sender_id
    pb.senderName = message.sender_name
    pb.text = message.text
    pb.timestamp = message.timestamp
    if message.client_msg_id:
        pb.clientMsgId = message.client_msg_id
    if message.receive_user_id:
        pb.receiveUserId = message.receive_user_id
    if message.group_id:
        pb.groupId = message.group_id
    if message.epoch:
        pb.epoch = message.epoch


#: Frame attribute -> protobuf field, for the scalar fields.
_SCALARS = (
    ("req_msg", "reqMsg"),
    ("request_id", "requestId"),
    ("token", "token"),
    ("client_msg_id", "clientMsgId"),
    ("msg_id", "msgId"),
    ("seq", "seq"),
    ("conversation", "conversation"),
    ("receive_user_id", "receiveUserId"),
    ("group_id", "groupId"),
    ("error_code", "errorCode"),
    ("error_reason", "errorReason"),
    ("redirect", "redirect"),
    ("timestamp", "timestamp"),
    ("device", "device"),
)
_ATTRIBUTE = {field: attribute for attribute, field in _SCALARS}
#: The scalar fields' names, and a getter of their values in that order (one
#: call for all of them: encoding is on every frame's path).
_SCALAR_FIELDS = tuple(field for _, field in _SCALARS)
_scalar_values = attrgetter(*(attribute for attribute, _ in _SCALARS))


def encode(frame: Frame) -> bytes:
    """
    Serialize C{frame} (without its length prefix).
    """
    fields = {
        name: value
        for name, value in zip(_SCALAR_FIELDS, _scalar_values(frame), strict=True)
        if value
    }
    if frame.cmd:
        fields["cmd"] = int(frame.cmd)
    if frame.properties:
        fields["properties"] = frame.properties
    if frame.batch:
        fields["batchReqMsg"] = frame.batch
    pb = cim_pb2.Request(**fields)
    for cursor in frame.cursors:
        pb.cursors.add(
            conversation=cursor.conversation,
            seq=cursor.seq,
            epoch=cursor.epoch,
            reset=cursor.reset,
        )
    for message in frame.messages:
        _chat_to_pb(message, pb.messages.add())
    return pb.SerializeToString()


def encode_framed(frame: Frame) -> bytes:
    """
    Serialize C{frame} with its varint length prefix, ready for a transport.
    """
    body = encode(frame)
    return encode_varint(len(body)) + body


# Live messages encoded once: each message's protobuf form is made once
# and the frames and pushes that carry it are put together from it (a
# Request, a PushItem and a Push are their fields one after the other, each
# with its key and length), byte for byte what the generated code writes.

#: The key of Request.cmd (3, varint), of Request.messages (16,
#: length-delimited), of Push.items (1), PushItem.users (1, packed) and
#: PushItem.messages (2).
_CMD_KEY = b"\x18"
_MESSAGES_KEY = b"\x82\x01"
_ITEMS_KEY = b"\x0a"
_USERS_KEY = b"\x0a"
_ITEM_MESSAGES_KEY = b"\x12"


class Messages(list[ChatMessage]):
    """
    Chat messages (a list of them, treated as immutable) that carry their
    protobuf forms, each made once however many frames and pushes carry
    it (L{encode_messages_framed}, L{encode_push}): the live messages of
    one delivery.
    """

    __slots__ = ("_forms",)

    def __init__(
        self, messages: Sequence[ChatMessage], forms: list[bytes] | None = None
    ) -> None:
        super().__init__(messages)
        self._forms = forms

    def forms(self) -> list[bytes]:
        """
        Each message's protobuf form (a ChatMessage's bytes).
        """
        forms = self._forms
        if forms is None:
            forms = self._forms = [_message_form(m) for m in self]
        return forms


def _message_form(message: ChatMessage) -> bytes:
    pb = cim_pb2.ChatMessage()
    _chat_to_pb(message, pb)
    return pb.SerializeToString()


def _forms(messages: Sequence[ChatMessage]) -> list[bytes]:
    if isinstance(messages, Messages):
        return messages.forms()
    return [_message_form(m) for m in messages]


def encode_messages_framed(cmd: Command, messages: Sequence[ChatMessage]) -> bytes:
    """
    A frame of chat messages and nothing else (a live MESSAGE, a replayed
    OFFLINE) with its length prefix: L{encode_framed} of C{Frame(cmd,
    messages=messages)}, from the messages' forms (L{Messages}).
    """
    parts: list[bytes] = [_CMD_KEY, encode_varint(int(cmd))] if cmd else []
    for form in _forms(messages):
        parts += (_MESSAGES_KEY, encode_varint(len(form)), form)
    body = b"".join(parts)
    return encode_varint(len(body)) + body


def _chat_from_pb(m: cim_pb2.ChatMessage) -> ChatMessage:
    return ChatMessage(
        msg_id=m.msgId,
        conversation=m.conversation,
        seq=m.seq,
        sender_id=m.senderId,
        sender_name=m.senderName,
        text=m.text,
        timestamp=m.timestamp,
        client_msg_id=m.clientMsgId,
        receive_user_id=m.receiveUserId,
        group_id=m.groupId,
        epoch=m.epoch,
    )


_Parsed = TypeVar("_Parsed", cim_pb2.Request, cim_pb2.Push)


def _parsed(pb: _Parsed, data: bytes, what: str) -> _Parsed:
    """
    C{pb} filled from C{data}.  @raise CodecError: C{data} is not a valid
    C{what}.
    """
    try:
        pb.ParseFromString(data)
    except (DecodeError, RuntimeWarning, ValueError) as e:
        raise CodecError(f"undecodable {what}: {e}") from None
    return pb


def decode(data: bytes) -> Frame:
    """
    Parse one frame body.

    @raise CodecError: C{data} is not a valid frame, or names a command this
        program does not know.
    """
    pb = _parsed(cim_pb2.Request(), data, "frame")
    command = _COMMANDS.get(pb.cmd)
    if command is None:
        raise CodecError(f"unknown command {pb.cmd}")
    frame = Frame(command)
    # Only the fields on the wire: usually a handful of the eighteen.
    for descriptor, value in pb.ListFields():
        name = descriptor.name
        attribute = _ATTRIBUTE.get(name)
        if attribute is not None:
            setattr(frame, attribute, value)
        elif name == "properties":
            frame.properties = dict(value)
        elif name == "batchReqMsg":
            frame.batch = tuple(value)
        elif name == "cursors":
            frame.cursors = tuple(
                new_cursor(c.conversation, c.seq, c.epoch, c.reset) for c in value
            )
        elif name == "messages":
            frame.messages = tuple(_chat_from_pb(m) for m in value)
    return frame


#: What L{decode_chat} makes of a chat message: its text, sender id,
#: conversation, seq and epoch (the sender C{None} and the rest empty for
#: a frame's bare texts).
ChatItem = tuple[str, int | None, str, int, str]

_MESSAGE = int(Command.MESSAGE)
_OFFLINE = int(Command.OFFLINE)
_ACK = int(Command.ACK)


def decode_chat(data: bytes) -> tuple[Command, list[ChatItem], str] | None:
    """
    Parse one frame body for a reader that looks at chat messages and
    acknowledgements only (the benchmark's load processes, which check
    every message they receive): a MESSAGE or OFFLINE frame as its command
    and its messages (L{ChatItem}s: those of its C{messages}, or else its
    C{batchReqMsg} texts, or else its C{reqMsg}), an ACK as its command
    and its C{clientMsgId}.  No L{Frame} or L{ChatMessage} is built.

    @return: C{None} for a frame of any other command (read it with
        L{decode}).
    @raise CodecError: C{data} is not a valid frame.
    """
    pb = _parsed(cim_pb2.Request(), data, "frame")
    cmd = pb.cmd
    if cmd == _MESSAGE or cmd == _OFFLINE:
        items: list[ChatItem]
        if pb.messages:
            items = [
                (m.text, m.senderId, m.conversation, m.seq, m.epoch)
                for m in pb.messages
            ]
        elif pb.batchReqMsg:
            items = [(text, None, "", 0, "") for text in pb.batchReqMsg]
        elif pb.reqMsg:
            items = [(pb.reqMsg, None, "", 0, "")]
        else:
            items = []
        return _COMMANDS[cmd], items, ""
    if cmd == _ACK:
        return Command.ACK, [], pb.clientMsgId
    return None


# Pushes between cim processes (the bus's payloads, L{cim.bus})


def encode_push(items: Sequence[PushItem]) -> bytes:
    """
    Serialize the items of one push to an IM server (messages, or a read
    event, each for some users): the payload of one publish on the bus.
    The messages' forms are made once (L{Messages}).
    """
    if any(isinstance(what, ReadEvent) for what, _ in items):
        return _encode_push_pb(items)
    try:
        parts: list[bytes] = []
        for what, users in items:
            item: list[bytes] = []
            if users:
                packed = b"".join([encode_varint(user) for user in users])
                item += (_USERS_KEY, encode_varint(len(packed)), packed)
            for form in _forms(what):  # type: ignore[arg-type]
                item += (_ITEM_MESSAGES_KEY, encode_varint(len(form)), form)
            body = b"".join(item)
            parts += (_ITEMS_KEY, encode_varint(len(body)), body)
    except ValueError:
        # A user id past 32 bits: the generated code's.
        return _encode_push_pb(items)
    return b"".join(parts)


def _encode_push_pb(items: Sequence[PushItem]) -> bytes:
    """
    L{encode_push} by the generated code (the reference of the form).
    """
    pb = cim_pb2.Push()
    for what, users in items:
        item = pb.items.add()
        item.users.extend(users)
        if isinstance(what, ReadEvent):
            item.read.userId = what.reader_id
            item.read.conversation = what.conversation
            item.read.seq = what.seq
        else:
            add = item.messages.add
            for message in what:
                _chat_to_pb(message, add())
    return pb.SerializeToString()


def decode_push(data: bytes) -> list[PushItem]:
    """
    Parse the payload of one push (L{encode_push}).  Its messages come as
    L{Messages} carrying the forms they arrived in, which the frames to
    the clients are put together from (the same bytes as their encoding
    here; a field this version does not know, from a newer server, passes
    through to the clients, which skip it).

    @raise CodecError: C{data} is not such a payload.
    """
    pb = _parsed(cim_pb2.Push(), data, "push")
    items: list[PushItem] = []
    for item in pb.items:
        what: Sequence[ChatMessage] | ReadEvent
        if item.HasField("read"):
            read = item.read
            what = ReadEvent(read.userId, read.conversation, read.seq)
        else:
            # Their forms as they came, for the frames to the clients.
            pbs = item.messages
            what = Messages(
                [_chat_from_pb(m) for m in pbs], [m.SerializeToString() for m in pbs]
            )
        items.append((what, list(item.users)))
    return items


# The proto3 JSON form (the WebSocket gateway's text subprotocol)


def encode_json(frame: Frame) -> str:
    """
    C{frame} in protobuf's canonical proto3 JSON form, made by protobuf's
    own C{json_format}: lowerCamelCase field names, enum names, 64-bit
    integers as strings, default values left out.

    The reference of the form: L{cim.jsonwire.encode} makes the same text
    faster, and falls back to this for what it does not do by hand.
    """
    pb = cim_pb2.Request()
    pb.ParseFromString(encode(frame))
    return json_format.MessageToJson(pb, indent=None, ensure_ascii=False)


def decode_json(text: str) -> Frame:
    """
    Parse one frame in the proto3 JSON form, strictly: an unknown field is
    an error, as is anything L{decode} refuses.

    The reference of what is accepted: L{cim.jsonwire.decode} reads the
    same frames faster, and falls back to this for anything unusual.

    @raise CodecError: C{text} is not such a frame.
    """
    if not text.lstrip().startswith("{"):
        raise CodecError("undecodable JSON frame: not a JSON object")
    pb = cim_pb2.Request()
    try:
        json_format.Parse(text, pb)
    except (json_format.ParseError, RecursionError, ValueError) as e:
        reason = str(e).split("\n", 1)[0].strip()
        raise CodecError(f"undecodable JSON frame: {reason}") from None
    return decode(pb.SerializeToString())
