"""
Encoding and decoding frames, and compatibility with CIM's wire format.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cim._proto import cim_pb2
from cim.codec import (
    CodecError,
    Messages,
    _encode_push_pb,
    decode,
    decode_push,
    encode,
    encode_framed,
    encode_messages_framed,
    encode_push,
    encode_varint,
)
from cim.message import ChatMessage, Command, Cursor, Frame
from cim.pushapi import PushItem, ReadEvent


def test_round_trip_of_every_field() -> None:
    message = ChatMessage(
        msg_id=7,
        conversation="p:1:2",
        seq=3,
        sender_id=1,
        sender_name="alice",
        text="hi :smile:",
        timestamp=1700000000000,
        client_msg_id="c-1",
        receive_user_id=2,
        epoch="e1",
    )
    frame = Frame(
        cmd=Command.MESSAGE,
        req_msg="hello",
        request_id=42,
        properties={"sendUserId": "1", "sendUserName": "alice"},
        batch=("a", "b"),
        token="tok",
        client_msg_id="c-9",
        msg_id=9,
        seq=10,
        conversation="g:team",
        receive_user_id=5,
        group_id="team",
        error_code=8001,
        error_reason="bad",
        cursors=(Cursor("p:1:2", 4, "e1", True), Cursor("g:team", 2)),
        messages=(message,),
        redirect="10.0.0.1:11211",
        timestamp=123,
        device="laptop",
    )
    assert decode(encode(frame)) == frame


@pytest.mark.parametrize("command", [Command.EPOCH, Command.READ])
def test_device_commands_round_trip(command: Command) -> None:
    """
    The frames of read positions and epochs carry their cursors whole.
    """
    frame = Frame(cmd=command, request_id=3, cursors=(Cursor("p:1:3", 7, "e2", True),))
    decoded = decode(encode(frame))
    assert decoded == frame
    assert decoded.cursors[0].reset


def test_cim_v2_layout() -> None:
    """
    A frame built with only CIM's fields parses as CIM's Response and our
    Request alike, with the same numbers.
    """
    frame = Frame(
        cmd=Command.MESSAGE,
        req_msg="hi",
        request_id=9,
        properties={"sendUserId": "1"},
        batch=("x",),
    )
    response = cim_pb2.Response.FromString(encode(frame))
    assert response.resMsg == "hi"
    assert response.responseId == 9
    assert response.cmd == cim_pb2.MESSAGE == 1
    assert dict(response.properties) == {"sendUserId": "1"}
    assert list(response.batchResMsg) == ["x"]
    assert [cim_pb2.LOGIN_REQUEST, cim_pb2.PING, cim_pb2.OFFLINE] == [0, 2, 3]


def test_cim_login_request_decodes() -> None:
    raw = cim_pb2.Request(reqMsg="bob", requestId=17, cmd=cim_pb2.LOGIN_REQUEST)
    frame = decode(raw.SerializeToString())
    assert frame == Frame(cmd=Command.LOGIN_REQUEST, req_msg="bob", request_id=17)


def test_unknown_fields_are_skipped() -> None:
    # Field 100, varint 1: a future extension.
    frame = decode(encode(Frame(cmd=Command.PING, req_msg="ping")) + b"\xa0\x06\x01")
    assert frame.req_msg == "ping"


@pytest.mark.parametrize(
    "data",
    [b"\xff", b"\x0a\x05ab", b"\x12\x80", b"\x0a\x02\xc3\x28", b"\x18\x63"],
)
def test_garbage_is_a_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode(data)


def test_framed_has_varint_prefix() -> None:
    data = encode_framed(Frame(cmd=Command.PING, req_msg="pong"))
    assert data[0] == len(data) - 1
    assert decode(data[1:]).req_msg == "pong"


# Live messages encoded once (cim.codec.Messages)

_texts = st.text(max_size=20)
_ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_messages = st.builds(
    ChatMessage,
    msg_id=_ints,
    conversation=_texts,
    seq=_ints,
    sender_id=_ints,
    sender_name=_texts,
    text=_texts,
    timestamp=_ints,
    client_msg_id=_texts,
    receive_user_id=_ints,
    group_id=_texts,
    epoch=_texts,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_messages, max_size=4), st.sampled_from(list(Command)))
def test_frames_of_messages_are_those_of_the_generated_code(
    messages: list[ChatMessage], command: Command
) -> None:
    """
    A frame put together from the messages' forms is byte for byte the one
    the generated code writes, whether they carry their forms or not.
    """
    expected = encode_framed(Frame(cmd=command, messages=tuple(messages)))
    assert encode_messages_framed(command, messages) == expected
    carried = Messages(messages)
    assert encode_messages_framed(command, carried) == expected
    assert encode_messages_framed(command, carried) == expected  # (made once)
    assert carried == messages


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(
                st.lists(_messages, max_size=3),
                st.lists(_messages, max_size=3).map(Messages),
                st.builds(ReadEvent, _ints, _texts, _ints),
            ),
            st.lists(st.integers(min_value=0, max_value=2**40), max_size=3),
        ),
        max_size=3,
    )
)
def test_pushes_are_those_of_the_generated_code(items: list[PushItem]) -> None:
    """
    A push put together from the messages' forms is the generated code's,
    and reads back as it was, its messages with their forms.
    """
    payload = encode_push(items)
    assert payload == _encode_push_pb(items)
    decoded = decode_push(payload)
    assert decoded == [(what, list(users)) for what, users in items]
    for (what, _), (back, _) in zip(items, decoded):
        if not isinstance(what, ReadEvent):
            assert isinstance(back, Messages)
            assert encode_messages_framed(Command.MESSAGE, back) == encode_framed(
                Frame(cmd=Command.MESSAGE, messages=tuple(what))
            )


@pytest.mark.parametrize(
    "value", [0, 1, 0x7F, 0x80, 0x81, 300, 0x3FFF, 0x4000, 0x1FFFFF, 2**32 - 1]
)
def test_varints_are_base_128_little_end_first(value: int) -> None:
    expected = bytearray()
    rest = value
    while rest > 0x7F:
        expected.append((rest & 0x7F) | 0x80)
        rest >>= 7
    expected.append(rest)
    assert encode_varint(value) == bytes(expected)


@pytest.mark.parametrize("value", [-1, 2**32])
def test_varints_past_32_bits_are_refused(value: int) -> None:
    with pytest.raises(ValueError):
        encode_varint(value)


def test_decode_chat_reads_what_decode_reads() -> None:
    """
    L{cim.codec.decode_chat} gives a chat frame's messages (or texts) and
    an ACK's client message id as L{decode} reads them, and nothing for
    the other commands.
    """
    from cim.codec import decode_chat

    message = ChatMessage(7, "p:1:2", 3, 1, "a", "hi", 5, "c1", 2, "", "e1")
    other = ChatMessage(8, "p:1:3", 1, 3, "b", "yo", 6, epoch="e2")
    chats = [
        Frame(Command.MESSAGE, messages=[message, other]),
        Frame(Command.OFFLINE, messages=[other]),
        Frame(Command.MESSAGE, batch=["x", "y"], req_msg="z"),
        Frame(Command.MESSAGE, req_msg="z", receive_user_id=2),
        Frame(Command.MESSAGE),
    ]
    for frame in chats:
        data = encode(frame)
        got = decode_chat(data)
        assert got is not None
        cmd, items, cmid = got
        decoded = decode(data)
        assert cmd == decoded.cmd and cmid == ""
        if decoded.messages:
            assert items == [
                (m.text, m.sender_id, m.conversation, m.seq, m.epoch)
                for m in decoded.messages
            ]
        elif decoded.batch:
            assert items == [(t, None, "", 0, "") for t in decoded.batch]
        elif decoded.req_msg:
            assert items == [(decoded.req_msg, None, "", 0, "")]
        else:
            assert items == []
    ack = Frame(Command.ACK, client_msg_id="0.5", cursors=[Cursor("p:1:2", 3)])
    assert decode_chat(encode(ack)) == (Command.ACK, [], "0.5")
    for frame in (Frame(Command.PING), Frame(Command.EPOCH), Frame(Command.ERROR)):
        assert decode_chat(encode(frame)) is None
    assert decode_chat(b"\x18\x63") is None  # an unknown command: decode's
    with pytest.raises(CodecError):
        decode_chat(b"\xff\xff")


@given(
    st.lists(
        st.tuples(
            st.text(), st.integers(-(1 << 63), (1 << 63) - 1), st.text(), st.booleans()
        ),
        max_size=4,
    )
)
@settings(max_examples=50)
def test_decoded_cursors_are_those_of_their_constructor(
    fields: list[tuple[str, int, str, bool]],
) -> None:
    """
    The cursors L{decode} makes without L{Cursor}'s C{__init__} are equal
    to, hash as and are as frozen as those it makes.
    """
    made = tuple(Cursor(*f) for f in fields)
    decoded = decode(encode(Frame(Command.ACK, cursors=made))).cursors
    assert decoded == made
    assert [hash(c) for c in decoded] == [hash(c) for c in made]
    assert [repr(c) for c in decoded] == [repr(c) for c in made]
    for cursor in decoded:
        with pytest.raises(AttributeError):
            cursor.seq = 0  # type: ignore[misc]
