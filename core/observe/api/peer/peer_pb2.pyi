from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChangeNotificationType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNKNOWN: _ClassVar[ChangeNotificationType]
    PEER_ADDED: _ClassVar[ChangeNotificationType]
    PEER_DELETED: _ClassVar[ChangeNotificationType]
    PEER_UPDATED: _ClassVar[ChangeNotificationType]
UNKNOWN: ChangeNotificationType
PEER_ADDED: ChangeNotificationType
PEER_DELETED: ChangeNotificationType
PEER_UPDATED: ChangeNotificationType

class NotifyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ChangeNotification(_message.Message):
    __slots__ = ("name", "address", "type", "tls")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    type: ChangeNotificationType
    tls: TLS
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., type: _Optional[_Union[ChangeNotificationType, str]] = ..., tls: _Optional[_Union[TLS, _Mapping]] = ...) -> None: ...

class TLS(_message.Message):
    __slots__ = ("server_name",)
    SERVER_NAME_FIELD_NUMBER: _ClassVar[int]
    server_name: str
    def __init__(self, server_name: _Optional[str] = ...) -> None: ...
