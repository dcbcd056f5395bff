"""
Encoding and decoding of frames: the only module that imports the generated
protobuf code.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from cim._proto import cim_pb2
from cim.message import ChatMessage, Command, Cursor, Frame

_KNOWN_COMMANDS = frozenset(int(c) for c in Command)


class CodecError(ValueError):
    """
    Bytes that are not a valid frame.
    """


def encode_varint(value: int) -> bytes:
    """
    Encode a non-negative integer below 2**32 as a base-128 varint.
    """
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


def encode(frame: Frame) -> bytes:
    """
    Serialize C{frame} (without its length prefix).
    """
    pb = cim_pb2.Request(
        cmd=int(frame.cmd),  # type: ignore[arg-type]
        reqMsg=frame.req_msg,
        requestId=frame.request_id,
        token=frame.token,
        clientMsgId=frame.client_msg_id,
        msgId=frame.msg_id,
        seq=frame.seq,
        conversation=frame.conversation,
        receiveUserId=frame.receive_user_id,
        groupId=frame.group_id,
        errorCode=frame.error_code,
        errorReason=frame.error_reason,
        redirect=frame.redirect,
        timestamp=frame.timestamp,
    )
    if frame.properties:
        pb.properties.update(frame.properties)
    if frame.batch:
        pb.batchReqMsg.extend(frame.batch)
    for cursor in frame.cursors:
        pb.cursors.add(conversation=cursor.conversation, seq=cursor.seq)
    for message in frame.messages:
        _chat_to_pb(message, pb.messages.add())
    return pb.SerializeToString()


def encode_framed(frame: Frame) -> bytes:
    """
    Serialize C{frame} with its varint length prefix, ready for a transport.
    """
    body = encode(frame)
    return encode_varint(len(body)) + body


def decode(data: bytes) -> Frame:
    """
    Parse one frame body.

    @raise CodecError: C{data} is not a valid frame, or names a command this
        program does not know.
    """
    pb = cim_pb2.Request()
    try:
        pb.ParseFromString(data)
    except (DecodeError, RuntimeWarning, ValueError) as e:
        raise CodecError(f"undecodable frame: {e}") from None
    if pb.cmd not in _KNOWN_COMMANDS:
        raise CodecError(f"unknown command {pb.cmd}")
    return Frame(
        cmd=Command(pb.cmd),
        req_msg=pb.reqMsg,
        request_id=pb.requestId,
        properties=dict(pb.properties),
        batch=tuple(pb.batchReqMsg),
        token=pb.token,
        client_msg_id=pb.clientMsgId,
        msg_id=pb.msgId,
        seq=pb.seq,
        conversation=pb.conversation,
        receive_user_id=pb.receiveUserId,
        group_id=pb.groupId,
        error_code=pb.errorCode,
        error_reason=pb.errorReason,
        cursors=tuple(Cursor(c.conversation, c.seq) for c in pb.cursors),
        messages=tuple(
            ChatMessage(
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
            )
            for m in pb.messages
        ),
        redirect=pb.redirect,
        timestamp=pb.timestamp,
    )
