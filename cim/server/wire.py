"""
Every frame the IM server sends, built in one place, and CIM's rules for
what a CIM client may receive.

The core decides I{what} to say to a connection and hands the frames built
here to the connection's wire adapter (L{cim.server.protocol}), which alone
turns them into bytes.  A batch of messages going to many connections is a
L{Batch}: the adapter encodes it once for all of them.

CIM's own client reads every frame that is not a PING as a chat message and
parses its C{receiveUserId} property as a number.  So a CIM connection (a
client that logged in without a token) gets only CIM's four commands, and
every MESSAGE or OFFLINE frame it gets carries the sender's C{sendUserId}
and C{sendUserName} and the receiver's own C{receiveUserId} and
C{requestId}, set for that receiver (L{for_cim_client}).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cim.message import ChatMessage, Command, Cursor, Frame

#: The commands a CIM client understands; nothing else is sent to one.
CIM_COMMANDS = frozenset(
    {Command.LOGIN_REQUEST, Command.MESSAGE, Command.PING, Command.OFFLINE}
)
#: The properties every non-PING frame to a CIM client carries.
CIM_PROPERTIES = ("sendUserId", "sendUserName", "receiveUserId")

#: The answer to every heartbeat.
PONG = Frame(cmd=Command.PING, req_msg="pong")


def error(code: int, reason: str, client_msg_id: str = "") -> Frame:
    """
    An error, about the send C{client_msg_id} when given.
    """
    return Frame(
        cmd=Command.ERROR,
        error_code=int(code),
        error_reason=reason,
        req_msg=reason,
        client_msg_id=client_msg_id,
    )


def kick(reason: str, redirect: str = "") -> Frame:
    """
    Reconnect (through the route, or to the server C{redirect}).
    """
    return Frame(
        cmd=Command.KICK, error_reason=reason, req_msg=reason, redirect=redirect
    )


def login_response(
    user_id: int,
    user_name: str,
    now_ms: int,
    device: str = "",
    cursors: Sequence[Cursor] = (),
) -> Frame:
    """
    The login of a cim client succeeded, as C{device}: C{cursors} says where
    the server starts each conversation the connection receives (its seq,
    the epoch it counts in, and C{reset} when the client's position was of
    an epoch the store does not trust).
    """
    return Frame(
        cmd=Command.LOGIN_RESPONSE,
        request_id=user_id,
        req_msg=user_name,
        timestamp=now_ms,
        device=device,
        cursors=cursors,
    )


def epoch(cursors: Sequence[Cursor]) -> Frame:
    """
    Where the server (re)starts conversations that the client was not told
    of at login (begun or joined since), or whose epoch changed: as the
    cursors of L{login_response}.
    """
    return Frame(cmd=Command.EPOCH, cursors=cursors)


def read(reader_id: int, conversation: str, seq: int) -> Frame:
    """
    User C{reader_id} read C{conversation} up to C{seq}.
    """
    return Frame(
        cmd=Command.READ, request_id=reader_id, cursors=(Cursor(conversation, seq),)
    )


def acknowledgement(client_msg_id: str, stored: Sequence[ChatMessage]) -> Frame:
    """
    The send C{client_msg_id} is stored as C{stored} (one message a text).
    """
    last = stored[-1]
    return Frame(
        cmd=Command.ACK,
        client_msg_id=client_msg_id,
        msg_id=last.msg_id,
        seq=last.seq,
        conversation=last.conversation,
        timestamp=last.timestamp,
        cursors=[Cursor(m.conversation, m.seq) for m in stored],
    )


def messages(cmd: Command, batch: Sequence[ChatMessage]) -> Frame:
    """
    Chat messages for a cim client: live (MESSAGE) or replayed (OFFLINE).
    """
    return Frame(cmd=cmd, messages=batch)


class Batch:
    """
    Live messages going to several cim connections: the wire adapters
    encode them once (L{encoded}) whatever the number of receivers.
    """

    __slots__ = ("messages", "_encoded")

    def __init__(self, messages: Sequence[ChatMessage]) -> None:
        self.messages = messages
        self._encoded: dict[str, bytes] = {}

    def frame(self) -> Frame:
        return messages(Command.MESSAGE, self.messages)

    def encoded(self, form: str, encode: Callable[[Frame], bytes]) -> bytes:
        """
        The batch's frame in C{form} (a name of the adapter's encoding),
        made by C{encode(frame)} the first time it is asked for.
        """
        data = self._encoded.get(form)
        if data is None:
            data = self._encoded[form] = encode(self.frame())
        return data

    def encoded_messages(
        self, form: str, encode: Callable[[Sequence[ChatMessage]], bytes]
    ) -> bytes:
        """
        As L{encoded}, made by C{encode(messages)}, for an adapter that
        puts a live frame together from the messages alone (no L{Frame}
        is built).
        """
        data = self._encoded.get(form)
        if data is None:
            data = self._encoded[form] = encode(self.messages)
        return data


def _cim_properties(sender_id: int, sender_name: str, receiver: int) -> dict[str, str]:
    return {
        "sendUserId": str(sender_id),
        "sendUserName": sender_name,
        "receiveUserId": str(receiver),
    }


def for_cim_client(
    batch: Sequence[ChatMessage], cmd: Command, receiver: int
) -> list[Frame]:
    """
    C{batch} as CIM client C{receiver} reads it: consecutive messages of one
    sender share a frame (the texts in C{batchReqMsg} when several, or when
    replayed), each frame with its sender's and this receiver's properties.
    """
    out: list[Frame] = []
    start = 0
    while start < len(batch):
        first = batch[start]
        end = start + 1
        while end < len(batch) and batch[end].sender_id == first.sender_id:
            end += 1
        props = _cim_properties(first.sender_id, first.sender_name, receiver)
        if end - start == 1 and cmd == Command.MESSAGE:
            out.append(
                Frame(
                    cmd=cmd, req_msg=first.text, request_id=receiver, properties=props
                )
            )
        else:
            out.append(
                Frame(
                    cmd=cmd,
                    batch=[m.text for m in batch[start:end]],
                    request_id=receiver,
                    properties=props,
                )
            )
        start = end
    return out


def raw_for_cim_client(frame: Frame, receiver: int) -> Frame:
    """
    A frame given to the push API's C{/sendMsg}, completed for CIM client
    C{receiver}: its own C{receiveUserId} and C{requestId}, and the sender
    properties (user 0, no name) when the caller gave none.

    @raise ValueError: the command is not one CIM clients read.
    """
    if frame.cmd not in CIM_COMMANDS:
        raise ValueError(f"a CIM client cannot read {frame.cmd.name} frames")
    if frame.cmd == Command.PING:
        return frame
    properties = {"sendUserId": "0", "sendUserName": "", **frame.properties}
    if not properties["sendUserId"].isdigit():
        raise ValueError("sendUserId must be a number for a CIM client")
    properties["receiveUserId"] = str(receiver)
    return Frame(
        cmd=frame.cmd,
        req_msg=frame.req_msg,
        batch=frame.batch,
        request_id=receiver,
        properties=properties,
    )
