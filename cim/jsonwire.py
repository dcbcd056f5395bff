"""
The proto3 JSON form of frames (the WebSocket gateway's C{cim.v1.json}
subprotocol), written and read by hand: the text protobuf's own
C{json_format} makes (L{cim.codec.encode_json}), byte for byte, and the
frames it accepts (L{cim.codec.decode_json}), refused as it refuses them,
for a small part of the cost.

C{json_format} goes from a frame to a protobuf message, to a dict of JSON
values, to text, and back the same long way, each step in Python: 30 to
200 microseconds a frame.  Here a frame's fields are written straight into
the text, and the values of a parsed object go straight into a frame.

There is one declaration of the format, the protobuf schema: the tables
here are derived at import from the descriptors of C{Request}, C{Cursor}
and C{ChatMessage} (their fields' order, JSON names and types) and the
dataclasses of L{cim.message} (whose attributes are the fields' names in
snake case; C{Frame.batch} is C{batchReqMsg}).  Import fails when the two
do not name the same fields, or when L{Command} and C{BaseCommand} name
different values.

What the hand-made path does not do exactly as C{json_format}, it leaves
to C{json_format}, so that the two never differ:
  - writing: a map of more than one entry (C{json_format} writes them in
    the order of protobuf's hash table), a number out of its field's range,
    a value of a type the field does not take, an enum value with no name,
    a field of a type this module does not write (none today), text that
    is not valid Unicode (a lone surrogate);
  - reading: anything but the plain form: C{null}, a number written as a
    float or as a string that is not plain decimal digits, an enum value
    as a number, an unpaired surrogate, an unknown field, a repeated key, a
    value of the wrong type, JSON that does not parse.  C{json_format} then
    accepts it as it always did, or refuses it with its own error.
"""

from __future__ import annotations

import dataclasses
import re
from json import JSONDecoder
from json.encoder import encode_basestring
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from cim import codec
from cim.codec import CodecError
from cim.message import ChatMessage, Command, Cursor, Frame

__all__ = ["CodecError", "decode", "encode"]


class _Fallback(Exception):
    """
    The hand-made path leaves this frame to C{json_format}.
    """


# The kinds of field, and the range of each integer kind.
_STRING = "string"
_INT64 = "int64"
_INT32 = "int32"
_BOOL = "bool"
_ENUM = "enum"
_STRINGS = "repeated string"
_MESSAGES = "repeated message"
_MAP = "map<string, string>"
#: A field this module does not write or read by hand: a frame that sets
#: it goes through C{json_format}.
_OTHER = "other"

_RANGES = {_INT64: (-(1 << 63), (1 << 63) - 1), _INT32: (-(1 << 31), (1 << 31) - 1)}

_SCALAR_KINDS = {
    FieldDescriptor.TYPE_STRING: _STRING,
    FieldDescriptor.TYPE_INT64: _INT64,
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_BOOL: _BOOL,
    FieldDescriptor.TYPE_ENUM: _ENUM,
}

#: The Python class of each message, and its attributes not named as their
#: field in snake case.
_CLASSES: dict[str, tuple[type, dict[str, str]]] = {
    codec.REQUEST.full_name: (Frame, {"batchReqMsg": "batch"}),
    codec.CURSOR.full_name: (Cursor, {}),
    codec.CHAT_MESSAGE.full_name: (ChatMessage, {}),
}
#: The Python type of each enum.
_ENUMS: dict[str, type[Command]] = {
    codec.REQUEST.file.enum_types_by_name["BaseCommand"].full_name: Command
}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def _kind(field: Any) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        entry = field.message_type
        if entry.GetOptions().map_entry:
            key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
            if key.type == value.type == FieldDescriptor.TYPE_STRING:
                return _MAP
            return _OTHER
        if field.is_repeated and entry.full_name in _CLASSES:
            return _MESSAGES
        return _OTHER
    kind = _SCALAR_KINDS.get(field.type, _OTHER)
    if kind == _ENUM and field.enum_type.full_name not in _ENUMS:
        return _OTHER
    if field.is_repeated:
        return _STRINGS if kind == _STRING else _OTHER
    return kind


#: An argument the class makes itself (a new dict).
_UNSET: Any = object()


class _Message:
    """
    How one message type is written and read: its fields in the order
    C{json_format} writes them (their numbers' order).

    @ivar writes: per field, its attribute, its kind, the text of its key
        (C{"name": }) and its detail: the L{_Message} of a repeated message,
        the JSON text of each value of an enum, an integer's range.
    @ivar reads: per name C{json_format} accepts (the JSON name and the
        original name), a bit of its own (a name given twice is refused),
        the field's place among the class's arguments, its kind and detail
        (the L{_Message}, the value of each name of an enum, the range).
    @ivar defaults: the class's arguments, in order, when no field is
        given (L{_UNSET} where the class makes a new value,
        L{factories}).
    """

    def __init__(self, descriptor: Any) -> None:
        self.name = descriptor.full_name
        self.cls, renamed = _CLASSES[self.name]
        attributes = [f.name for f in dataclasses.fields(self.cls)]
        self.fields = {
            renamed.get(field.name, _snake(field.name)): field
            for field in descriptor.fields
        }
        if sorted(self.fields) != sorted(attributes):
            raise TypeError(
                f"{self.cls.__name__} and {self.name} name different fields: "
                f"{sorted(attributes)} and {sorted(self.fields)}"
            )
        self.writes: list[tuple[str, str, str, Any]] = []
        self.reads: dict[str, tuple[int, int, str, Any]] = {}
        # Positional arguments: a frozen dataclass takes them at a third of
        # the cost of keywords.
        self.index = {name: i for i, name in enumerate(attributes)}
        self.defaults: list[Any] = []
        self.factories: list[tuple[int, Any]] = []
        for i, f in enumerate(dataclasses.fields(self.cls)):
            if f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = _UNSET
                self.factories.append((i, f.default_factory))
            else:
                field = self.fields[f.name]
                value = field.default_value
                if field.type == FieldDescriptor.TYPE_ENUM:
                    value = _ENUMS[field.enum_type.full_name](value)
            self.defaults.append(value)

    def link(self, messages: dict[str, _Message]) -> None:
        """
        Fill the tables (once every message type has its L{_Message}).
        """
        for attribute, field in sorted(self.fields.items(), key=lambda f: f[1].number):
            kind = _kind(field)
            detail: Any = _RANGES.get(kind)
            read_detail = detail
            if kind == _ENUM:
                python = _ENUMS[field.enum_type.full_name]
                values = field.enum_type.values
                if {v.name: v.number for v in values} != {
                    m.name: m.value for m in python
                }:
                    raise TypeError(f"{python.__name__} is not {field.enum_type.name}")
                detail = {v.number: f'"{v.name}"' for v in values}
                read_detail = {v.name: python(v.number) for v in values}
            elif kind == _MESSAGES:
                detail = read_detail = messages[field.message_type.full_name]
            key = f"{encode_basestring(field.json_name)}: "
            self.writes.append((attribute, kind, key, detail))
            for name in (field.json_name, field.name):
                bit = (
                    self.reads[name][0] if name in self.reads else 1 << len(self.reads)
                )
                self.reads[name] = (bit, self.index[attribute], kind, read_detail)


_MESSAGES_BY_NAME = {
    d.full_name: _Message(d) for d in (codec.REQUEST, codec.CURSOR, codec.CHAT_MESSAGE)
}
for _message in _MESSAGES_BY_NAME.values():
    _message.link(_MESSAGES_BY_NAME)
_FRAME = _MESSAGES_BY_NAME[codec.REQUEST.full_name]


# Writing


def _write(obj: Any, message: _Message) -> str:
    parts = []
    for attribute, kind, key, detail in message.writes:
        value = getattr(obj, attribute)
        # proto3: a field at its default value is not on the wire.
        if not value:
            continue
        if kind is _STRING:
            parts.append(key + encode_basestring(value))
        elif kind is _INT64:
            low, high = detail
            if type(value) is not int or not low <= value <= high:
                raise _Fallback
            parts.append(f'{key}"{value}"')
        elif kind is _ENUM:
            parts.append(key + detail[value])
        elif kind is _MESSAGES:
            parts.append(
                key + "[" + ", ".join([_write(item, detail) for item in value]) + "]"
            )
        elif kind is _STRINGS:
            parts.append(key + "[" + ", ".join(map(encode_basestring, value)) + "]")
        elif kind is _INT32:
            low, high = detail
            if type(value) is not int or not low <= value <= high:
                raise _Fallback
            parts.append(f"{key}{value}")
        elif kind is _BOOL:
            if value is not True:
                raise _Fallback
            parts.append(key + "true")
        elif kind is _MAP and len(value) == 1:
            [(k, v)] = value.items()
            parts.append(f"{key}{{{encode_basestring(k)}: {encode_basestring(v)}}}")
        else:
            raise _Fallback
    return "{" + ", ".join(parts) + "}"


def encode(frame: Frame) -> bytes:
    """
    C{frame} in the proto3 JSON form, in UTF-8: exactly the text of
    L{cim.codec.encode_json}.

    @raise ValueError: C{frame} cannot be encoded (as
        L{cim.codec.encode_json} raises).
    """
    try:
        return _write(frame, _FRAME).encode("utf-8")
    except (_Fallback, KeyError, TypeError, AttributeError, UnicodeEncodeError):
        return codec.encode_json(frame).encode("utf-8")


# Reading


#: A JSON decoder made once (C{json.loads} with an option makes one a
#: call) that gives each object as the tuple of its (key, value) pairs: a
#: repeated key stays visible (json_format refuses one; a dict would keep
#: the last), and an object is never taken for an array (a list).
_DECODER = JSONDecoder(object_pairs_hook=tuple)

#: The escape of an unpaired surrogate (json_format refuses one), in a text
#: where every "\\u" begins an escape.
_UNPAIRED = re.compile(
    r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
    r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F]"
)


def _read(raw: Any, message: _Message) -> Any:
    if type(raw) is not tuple:
        raise _Fallback
    reads = message.reads
    values = message.defaults.copy()
    seen = 0
    for name, value in raw:
        bit, index, kind, detail = reads[name]
        if seen & bit:
            raise _Fallback
        seen |= bit
        t = type(value)
        if kind is _STRING:
            if t is not str:
                raise _Fallback
        elif kind is _INT64 or kind is _INT32:
            if t is str:
                digits = value[1:] if value[:1] == "-" else value
                if not (digits.isascii() and digits.isdigit()):
                    raise _Fallback
                value = int(value)
            elif t is not int:
                raise _Fallback
            low, high = detail
            if not low <= value <= high:
                raise _Fallback
        elif kind is _ENUM:
            value = detail[value] if t is str else None
            if value is None:
                raise _Fallback
        elif kind is _MESSAGES:
            if t is not list:
                raise _Fallback
            value = tuple([_read(item, detail) for item in value])
        elif kind is _STRINGS:
            if t is not list:
                raise _Fallback
            for item in value:
                if type(item) is not str:
                    raise _Fallback
            value = tuple(value)
        elif kind is _MAP:
            if t is not tuple:
                raise _Fallback
            pairs = value
            value = dict(pairs)
            if len(value) != len(pairs):
                raise _Fallback
            for item in value.values():
                if type(item) is not str:
                    raise _Fallback
        elif kind is _BOOL:
            if t is not bool:
                raise _Fallback
        else:
            raise _Fallback
        values[index] = value
    for index, factory in message.factories:
        if values[index] is _UNSET:
            values[index] = factory()
    return message.cls(*values)


def decode(data: bytes) -> Frame:
    """
    Read one frame in the proto3 JSON form from its UTF-8 bytes: the frame
    L{cim.codec.decode_json} reads from the same text.

    @raise CodecError: not such a frame, refused with
        L{cim.codec.decode_json}'s reason (or the bytes are not UTF-8).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CodecError(f"undecodable JSON frame: not UTF-8 ({e.reason})") from None
    try:
        # Each escaped backslash made two other characters: every "\\u"
        # left begins an escape.
        if "\\u" in text and _UNPAIRED.search(text.replace("\\\\", "--")):
            raise _Fallback
        return _read(_DECODER.decode(text), _FRAME)  # type: ignore[no-any-return]
    except (_Fallback, KeyError, ValueError, RecursionError):
        return codec.decode_json(text)
