"""
The hand-made proto3 JSON form (L{cim.jsonwire}) against protobuf's own
C{json_format} (L{cim.codec.encode_json}, L{cim.codec.decode_json}): the
same text for every frame written, the same frame for every text read, the
same refusal (and reason) for every text refused.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cim import codec, jsonwire
from cim.codec import CodecError
from cim.message import ChatMessage, Command, Cursor, Frame

#: json_format's own, as the tests call them (the fixture L{fallbacks}
#: counts L{cim.jsonwire}'s calls only).
encode_json = codec.encode_json
decode_json = codec.decode_json

INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)

#: Text that JSON escapes, or does not: quotes, backslashes, control
#: characters, non-ASCII of every width, line separators, markup.
TEXTS = [
    "x",
    'say "hi"\\ \n\t\r\b\f \x00 \x1f \x7f',
    "héllo wörld ñ",
    "漢字かな",
    "👋🏽 family: 👨‍👩‍👧",
    "\u2028\u2029",
    "</script><img src=x onerror=alert(1)>",
    " ",
]
INTS = [1, -1, 2**31 - 1, 2**53 + 1, 2**63 - 1, -(2**63), 1764505000123]


def _message(i: int = 0) -> ChatMessage:
    return ChatMessage(
        msg_id=INTS[i % len(INTS)],
        conversation="p:1:2",
        seq=i + 1,
        sender_id=1001,
        sender_name=TEXTS[i % len(TEXTS)],
        text=TEXTS[(i + 1) % len(TEXTS)],
        timestamp=1764505000123,
        client_msg_id="c-1" if i % 2 else "",
        receive_user_id=2 if i % 3 else 0,
        group_id="team" if i % 3 == 0 else "",
        epoch="e1" if i % 2 else "",
    )


#: A value of each Frame attribute other than the command, and others that
#: are defaults or edge cases.
VALUES: dict[str, list[Any]] = {
    "req_msg": TEXTS,
    "request_id": INTS,
    "properties": [{"sendUserId": "1"}, {"ключ": "значение 👋"}, {"": ""}],
    "batch": [("a",), ("", "b", "👋"), tuple(TEXTS)],
    "token": ["t0k.en-" * 10],
    "client_msg_id": ["c-1#2"],
    "msg_id": INTS,
    "seq": INTS,
    "conversation": ["p:1:2", "g:téam"],
    "receive_user_id": INTS,
    "group_id": ["g", "équipe"],
    "error_code": [8003, -5, 2**31 - 1, -(2**31)],
    "error_reason": TEXTS,
    "cursors": [
        (Cursor("p:1:2", 3),),
        (Cursor("", 0),),
        (Cursor("p:1:2", 2**63 - 1, "e1", True), Cursor("g:x", -1, "", False)),
    ],
    "messages": [
        (_message(),),
        tuple(_message(i) for i in range(7)),
        (ChatMessage(0, "", 0, 0, "", "", 0),),
    ],
    "redirect": ["10.0.0.1:11211", "[::1]:1"],
    "timestamp": INTS,
    "device": ["phone 📱"],
}


def frames() -> Iterator[Frame]:
    """
    Every command: alone, with each field (each of its values), with every
    field.
    """
    for command in Command:
        yield Frame(command)
        for attribute, values in VALUES.items():
            for value in values:
                yield Frame(command, **{attribute: value})
        yield Frame(command, **{a: v[0] for a, v in VALUES.items()})
        yield Frame(command, **{a: v[-1] for a, v in VALUES.items()})


def reference(frame: Frame) -> bytes:
    return encode_json(frame).encode("utf-8")


@pytest.fixture
def fallbacks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """
    The calls to json_format the hand-made path makes.
    """
    calls: list[str] = []
    for name in ("encode_json", "decode_json"):

        def spy(
            arg: Any,
            _real: Callable[..., Any] = getattr(codec, name),
            _name: str = name,
        ) -> Any:
            calls.append(f"{_name}: {repr(arg)[:200]}")
            return _real(arg)

        monkeypatch.setattr(codec, name, spy)
    return calls


# Writing


def test_every_frame_is_written_as_json_format_writes_it() -> None:
    count = 0
    for frame in frames():
        assert jsonwire.encode(frame) == reference(frame), frame
        count += 1
    assert count > 700


def test_the_hand_made_path_writes_every_frame_the_server_sends(
    fallbacks: list[str],
) -> None:
    """
    Only a map of several entries (whose order is protobuf's hash table's)
    goes to json_format: the server sends one only to a CIM client through
    the push API.
    """
    for frame in frames():
        jsonwire.encode(frame)
    assert fallbacks == []
    jsonwire.encode(Frame(Command.MESSAGE, properties={"a": "1", "b": "2"}))
    assert len(fallbacks) == 1


def test_the_writing_is_compact_and_in_field_number_order() -> None:
    frame = Frame(
        Command.ACK,
        timestamp=5,
        client_msg_id="c",
        cursors=(Cursor("p:1:2", 3, "e", True), Cursor("", 0)),
    )
    assert jsonwire.encode(frame) == (
        b'{"cmd": "ACK", "clientMsgId": "c", "cursors": [{"conversation": '
        b'"p:1:2", "seq": "3", "epoch": "e", "reset": true}, {}], "timestamp": "5"}'
    )
    assert jsonwire.encode(Frame(Command.LOGIN_REQUEST)) == b"{}"


@pytest.mark.parametrize(
    "frame",
    [
        Frame(Command.MESSAGE, properties={"k1": "v", "k2": "w", "k3": ""}),
        Frame(Command.PING, error_code=5.0),  # type: ignore[arg-type]
        Frame(Command.PING, request_id=True),  # type: ignore[arg-type]
        Frame(99),  # type: ignore[arg-type]
    ],
)
def test_what_is_not_written_by_hand_is_json_formats(frame: Frame) -> None:
    try:
        expected = reference(frame)
    except Exception as e:
        with pytest.raises(type(e)):
            jsonwire.encode(frame)
    else:
        assert jsonwire.encode(frame) == expected


@pytest.mark.parametrize(
    "frame",
    [
        Frame(Command.MESSAGE, request_id=2**63),
        Frame(Command.MESSAGE, seq=-(2**63) - 1),
        Frame(Command.ERROR, error_code=2**31),
        Frame(Command.MESSAGE, req_msg="lone \ud800 surrogate"),
        Frame(Command.MESSAGE, batch=("a", 5)),  # type: ignore[arg-type]
        Frame(Command.MESSAGE, messages=(_message(), None)),  # type: ignore[arg-type]
    ],
)
def test_a_frame_json_format_cannot_write_is_not_written(frame: Frame) -> None:
    with pytest.raises(Exception) as expected:
        reference(frame)
    with pytest.raises(type(expected.value)):
        jsonwire.encode(frame)


# Reading

texts = st.text(max_size=20)


def ints(low: int, high: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(low, high), st.sampled_from([low, high, 0, 1, -1]))


cursors = st.builds(
    Cursor,
    conversation=texts,
    seq=ints(*INT64),
    epoch=texts,
    reset=st.booleans(),
)
chat_messages = st.builds(
    ChatMessage,
    msg_id=ints(*INT64),
    conversation=texts,
    seq=ints(*INT64),
    sender_id=ints(*INT64),
    sender_name=texts,
    text=texts,
    timestamp=ints(*INT64),
    client_msg_id=texts,
    receive_user_id=ints(*INT64),
    group_id=texts,
    epoch=texts,
)
random_frames = st.builds(
    Frame,
    cmd=st.sampled_from(Command),
    req_msg=texts,
    request_id=ints(*INT64),
    properties=st.dictionaries(texts, texts, max_size=3),
    batch=st.lists(texts, max_size=3).map(tuple),
    token=texts,
    client_msg_id=texts,
    msg_id=ints(*INT64),
    seq=ints(*INT64),
    conversation=texts,
    receive_user_id=ints(*INT64),
    group_id=texts,
    error_code=ints(*INT32),
    error_reason=texts,
    cursors=st.lists(cursors, max_size=3).map(tuple),
    messages=st.lists(chat_messages, max_size=2).map(tuple),
    redirect=texts,
    timestamp=ints(*INT64),
    device=texts,
)


@settings(max_examples=300, deadline=None)
@given(random_frames)
def test_random_frames_are_written_as_json_format_writes_them(frame: Frame) -> None:
    assert jsonwire.encode(frame) == reference(frame)


def _variants(text: str, rng: random.Random) -> list[str]:
    """
    The same frame as other clients may write it: compact, keys in another
    order, 64-bit integers as numbers, non-ASCII escaped.
    """

    def numbers(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: numbers(v) for k, v in value.items()}
        if isinstance(value, list):
            return [numbers(v) for v in value]
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
        return value

    def shuffled(value: Any) -> Any:
        if isinstance(value, dict):
            items = list(value.items())
            rng.shuffle(items)
            return {k: shuffled(v) for k, v in items}
        if isinstance(value, list):
            return [shuffled(v) for v in value]
        return value

    raw = json.loads(text)
    return [
        text,
        json.dumps(raw, separators=(",", ":"), ensure_ascii=False),
        json.dumps(shuffled(raw)),
        # Only where no text field holds digits alone (they stay strings).
        json.dumps({k: numbers(v) if k not in _TEXTUAL else v for k, v in raw.items()}),
        f"  \n{text}\t ",
    ]


_TEXTUAL = {"reqMsg", "properties", "batchReqMsg", "token", "clientMsgId"} | {
    "conversation",
    "groupId",
    "errorReason",
    "cursors",
    "messages",
    "redirect",
    "device",
}


def same_reading(text: str) -> Frame | str:
    """
    What both readings of C{text} give, the frame or the refusal's reason.
    """
    try:
        expected: Frame | str = decode_json(text)
    except CodecError as e:
        expected = f"refused: {e}"
    try:
        got: Frame | str = jsonwire.decode(text.encode("utf-8"))
    except CodecError as e:
        got = f"refused: {e}"
    assert got == expected, text
    return got


@settings(max_examples=300, deadline=None)
@given(random_frames, st.randoms(use_true_random=False))
def test_random_frames_are_read_as_json_format_reads_them(
    frame: Frame, rng: random.Random
) -> None:
    for text in _variants(encode_json(frame), rng):
        result = same_reading(text)
        assert isinstance(result, Frame)


def test_every_frame_is_read_as_json_format_reads_it(fallbacks: list[str]) -> None:
    rng = random.Random(17)
    for frame in frames():
        for text in _variants(encode_json(frame), rng):
            assert isinstance(same_reading(text), Frame)
    assert fallbacks == []


def test_the_hand_made_path_reads_what_clients_send(fallbacks: list[str]) -> None:
    from bench.wsclient import frame_to_json

    sent = [
        Frame(Command.MESSAGE, receive_user_id=2, req_msg="hé 👋", client_msg_id="c"),
        Frame(Command.MESSAGE, group_id="team", req_msg="x", client_msg_id="c"),
        Frame(Command.ACK, cursors=(Cursor("p:1:2", 5, "e"), Cursor("g:t", 9))),
        Frame(Command.READ, cursors=(Cursor("p:1:2", 5),)),
        Frame(Command.PING, req_msg="ping"),
        Frame(
            Command.LOGIN_REQUEST,
            request_id=1,
            req_msg="ann",
            token="t",
            device="d",
            cursors=(Cursor("p:1:2", 5, "e"),),
        ),
    ]
    # As the load generator and the web client (JSON.stringify) write them.
    for frame in sent:
        for text in (frame_to_json(frame), encode_json(frame)):
            assert jsonwire.decode(text.encode()) == frame
    assert fallbacks == []


@pytest.mark.parametrize(
    "text",
    [
        # Accepted by json_format in forms the hand-made path leaves to it.
        '{"cmd": "MESSAGE", "requestId": null}',
        '{"cmd": "MESSAGE", "requestId": 1.0}',
        '{"cmd": "MESSAGE", "requestId": "1e3"}',
        '{"cmd": "MESSAGE", "requestId": "+7"}',
        '{"cmd": "MESSAGE", "requestId": "0007"}',
        '{"cmd": "MESSAGE", "requestId": "1_000"}',
        '{"cmd": 1}',
        '{"cmd": "1"}',
        '{"cmd": null}',
        '{"cursors": [{"reset": false}], "cmd": "ACK"}',
        '{"cursors": null}',
        '{"properties": {"a": "1", "b": "2", "c": "3"}}',
        '{"reqMsg": "\\ud83d\\udc4b \\u00e9 \\n \\/"}',
        '{"req_msg": "original name"}',
        '{"batchReqMsg": []}',
        '{"messages": [{}]}',
        '{"errorCode": "-12"}',
        '{"errorCode": 12.0}',
        # Refused, by both, for the same reason.
        '{"cmd": "PING", "bogus": 1}',
        '{"cmd": "PING"',
        "[]",
        '"PING"',
        "",
        '{"cmd": 99}',
        '{"cmd": "NOPE"}',
        '{"cmd": "PING", "cmd": "MESSAGE"}',
        '{"cursors": [{"seq": "1", "seq": "2"}]}',
        '{"cmd": "MESSAGE", "requestId": 1.5}',
        '{"cmd": "MESSAGE", "requestId": "1.5"}',
        '{"cmd": "MESSAGE", "requestId": " 1"}',
        '{"cmd": "MESSAGE", "requestId": ""}',
        '{"cmd": "MESSAGE", "requestId": true}',
        '{"cmd": "MESSAGE", "requestId": "9223372036854775808"}',
        '{"cmd": "MESSAGE", "requestId": -9223372036854775809}',
        '{"errorCode": 2147483648}',
        '{"requestId": ' + "9" * 5000 + "}",
        '{"cmd": "MESSAGE", "reqMsg": "\\ud800"}',
        '{"cmd": "MESSAGE", "reqMsg": "\\udc00\\ud800"}',
        '{"reqMsg": "\\ud83d\\ud83d\\udc4b"}',
        '{"reqMsg": "\\\\ud83d\\udc4b"}',
        '{"reqMsg": "\\\\ud83d \\u00e9"}',
        '{"reqMsg": "\\ud83d\\\\\\udc4b"}',
        '{"reqMsg": "\\\\\\ud83d\\udc4b"}',
        '{"cmd": "MESSAGE", "reqMsg": 5}',
        '{"batchReqMsg": "a"}',
        '{"batchReqMsg": [null]}',
        '{"batchReqMsg": [1]}',
        '{"cursors": {}}',
        '{"cursors": [null]}',
        '{"cursors": [{"reset": "true"}]}',
        '{"cursors": [{"bogus": 1}]}',
        '{"messages": [{"text": ["x"]}]}',
        '{"properties": []}',
        '{"properties": {"a": "1", "a": "2"}}',
        '{"properties": {}}',
        '{"cursors": [[]]}',
        '{"cursors": [[["seq", "1"]]]}',
        '{"batchReqMsg": [{}]}',
        '{"reqMsg": {}}',
        '{"properties": {"a": 1}}',
        '{"properties": {"a": null}}',
        '{"reqMsg": NaN}',
        '{"requestId": Infinity}',
        "[" * 5000 + "]" * 5000,
        '{"a":' * 200 + "1" + "}" * 200,
    ],
)
def test_unusual_texts_are_read_or_refused_as_json_format_does(text: str) -> None:
    same_reading(text)


def test_a_refusal_says_why() -> None:
    with pytest.raises(CodecError, match='has no field named "bogus"'):
        jsonwire.decode(b'{"cmd": "PING", "bogus": 1}')
    with pytest.raises(CodecError, match="duplicate key"):
        jsonwire.decode(b'{"cmd": "PING", "cmd": "PING"}')
    with pytest.raises(CodecError, match="not UTF-8"):
        jsonwire.decode(b'{"reqMsg": "\xff"}')


# One declaration of the format


def test_the_tables_are_the_descriptors() -> None:
    """
    Every field of the three messages, under both names json_format reads,
    in field number order.
    """
    for descriptor in (codec.REQUEST, codec.CURSOR, codec.CHAT_MESSAGE):
        table = jsonwire._MESSAGES_BY_NAME[descriptor.full_name]
        names = set(
            itertools.chain.from_iterable(
                (f.json_name, f.name) for f in descriptor.fields
            )
        )
        assert set(table.reads) == names
        keys = [key for _, _, key, _ in table.writes]
        ordered = sorted(descriptor.fields, key=lambda f: f.number)
        assert keys == [f'"{f.json_name}": ' for f in ordered]


def test_a_class_that_drifts_from_the_schema_fails_at_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dataclasses import dataclass

    @dataclass
    class Shorter:
        conversation: str
        seq: int

    monkeypatch.setitem(jsonwire._CLASSES, codec.CURSOR.full_name, (Shorter, {}))
    with pytest.raises(TypeError, match="name different fields"):
        jsonwire._Message(codec.CURSOR)
