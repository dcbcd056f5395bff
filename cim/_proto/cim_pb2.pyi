from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BaseCommand(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOGIN_REQUEST: _ClassVar[BaseCommand]
    MESSAGE: _ClassVar[BaseCommand]
    PING: _ClassVar[BaseCommand]
    OFFLINE: _ClassVar[BaseCommand]
    ACK: _ClassVar[BaseCommand]
    ERROR: _ClassVar[BaseCommand]
    KICK: _ClassVar[BaseCommand]
    LOGIN_RESPONSE: _ClassVar[BaseCommand]
    EPOCH: _ClassVar[BaseCommand]
    READ: _ClassVar[BaseCommand]
LOGIN_REQUEST: BaseCommand
MESSAGE: BaseCommand
PING: BaseCommand
OFFLINE: BaseCommand
ACK: BaseCommand
ERROR: BaseCommand
KICK: BaseCommand
LOGIN_RESPONSE: BaseCommand
EPOCH: BaseCommand
READ: BaseCommand

class Cursor(_message.Message):
    __slots__ = ("conversation", "seq", "epoch", "reset")
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    conversation: str
    seq: int
    epoch: str
    reset: bool
    def __init__(self, conversation: _Optional[str] = ..., seq: _Optional[int] = ..., epoch: _Optional[str] = ..., reset: _Optional[bool] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("msgId", "conversation", "seq", "senderId", "senderName", "text", "timestamp", "clientMsgId", "receiveUserId", "groupId", "epoch")
    MSGID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SENDERID_FIELD_NUMBER: _ClassVar[int]
    SENDERNAME_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    CLIENTMSGID_FIELD_NUMBER: _ClassVar[int]
    RECEIVEUSERID_FIELD_NUMBER: _ClassVar[int]
    GROUPID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    msgId: int
    conversation: str
    seq: int
    senderId: int
    senderName: str
    text: str
    timestamp: int
    clientMsgId: str
    receiveUserId: int
    groupId: str
    epoch: str
    def __init__(self, msgId: _Optional[int] = ..., conversation: _Optional[str] = ..., seq: _Optional[int] = ..., senderId: _Optional[int] = ..., senderName: _Optional[str] = ..., text: _Optional[str] = ..., timestamp: _Optional[int] = ..., clientMsgId: _Optional[str] = ..., receiveUserId: _Optional[int] = ..., groupId: _Optional[str] = ..., epoch: _Optional[str] = ...) -> None: ...

class Request(_message.Message):
    __slots__ = ("reqMsg", "requestId", "cmd", "properties", "batchReqMsg", "token", "clientMsgId", "msgId", "seq", "conversation", "receiveUserId", "groupId", "errorCode", "errorReason", "cursors", "messages", "redirect", "timestamp", "device")
    class PropertiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQMSG_FIELD_NUMBER: _ClassVar[int]
    REQUESTID_FIELD_NUMBER: _ClassVar[int]
    CMD_FIELD_NUMBER: _ClassVar[int]
    PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    BATCHREQMSG_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLIENTMSGID_FIELD_NUMBER: _ClassVar[int]
    MSGID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    RECEIVEUSERID_FIELD_NUMBER: _ClassVar[int]
    GROUPID_FIELD_NUMBER: _ClassVar[int]
    ERRORCODE_FIELD_NUMBER: _ClassVar[int]
    ERRORREASON_FIELD_NUMBER: _ClassVar[int]
    CURSORS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    REDIRECT_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    reqMsg: str
    requestId: int
    cmd: BaseCommand
    properties: _containers.ScalarMap[str, str]
    batchReqMsg: _containers.RepeatedScalarFieldContainer[str]
    token: str
    clientMsgId: str
    msgId: int
    seq: int
    conversation: str
    receiveUserId: int
    groupId: str
    errorCode: int
    errorReason: str
    cursors: _containers.RepeatedCompositeFieldContainer[Cursor]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    redirect: str
    timestamp: int
    device: str
    def __init__(self, reqMsg: _Optional[str] = ..., requestId: _Optional[int] = ..., cmd: _Optional[_Union[BaseCommand, str]] = ..., properties: _Optional[_Mapping[str, str]] = ..., batchReqMsg: _Optional[_Iterable[str]] = ..., token: _Optional[str] = ..., clientMsgId: _Optional[str] = ..., msgId: _Optional[int] = ..., seq: _Optional[int] = ..., conversation: _Optional[str] = ..., receiveUserId: _Optional[int] = ..., groupId: _Optional[str] = ..., errorCode: _Optional[int] = ..., errorReason: _Optional[str] = ..., cursors: _Optional[_Iterable[_Union[Cursor, _Mapping]]] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., redirect: _Optional[str] = ..., timestamp: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class Response(_message.Message):
    __slots__ = ("resMsg", "responseId", "cmd", "properties", "batchResMsg")
    class PropertiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RESMSG_FIELD_NUMBER: _ClassVar[int]
    RESPONSEID_FIELD_NUMBER: _ClassVar[int]
    CMD_FIELD_NUMBER: _ClassVar[int]
    PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    BATCHRESMSG_FIELD_NUMBER: _ClassVar[int]
    resMsg: str
    responseId: int
    cmd: BaseCommand
    properties: _containers.ScalarMap[str, str]
    batchResMsg: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, resMsg: _Optional[str] = ..., responseId: _Optional[int] = ..., cmd: _Optional[_Union[BaseCommand, str]] = ..., properties: _Optional[_Mapping[str, str]] = ..., batchResMsg: _Optional[_Iterable[str]] = ...) -> None: ...

class Push(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[PushItem]
    def __init__(self, items: _Optional[_Iterable[_Union[PushItem, _Mapping]]] = ...) -> None: ...

class PushItem(_message.Message):
    __slots__ = ("users", "messages", "read")
    USERS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    READ_FIELD_NUMBER: _ClassVar[int]
    users: _containers.RepeatedScalarFieldContainer[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    read: PushRead
    def __init__(self, users: _Optional[_Iterable[int]] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., read: _Optional[_Union[PushRead, _Mapping]] = ...) -> None: ...

class PushRead(_message.Message):
    __slots__ = ("userId", "conversation", "seq")
    USERID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    userId: int
    conversation: str
    seq: int
    def __init__(self, userId: _Optional[int] = ..., conversation: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...
