"""
A TCP listening port whose connections cost less memory: what a daemon
holding tens of thousands of mostly idle connections listens with.

Twisted's L{twisted.internet.tcp.Server} keeps its state in an instance
dictionary.  CPython shares the keys of such dictionaries between the
instances of a class only for the attributes that the first instances
set: a transport sets its write buffer's attributes only at its first
write, and once enough instances exist (a flood of connections accepted
at once) every later one then gets a dictionary of its own, about 800
bytes, where a few slots would do.  L{SlimServer} is a
L{twisted.internet.tcp.Server} that keeps those attributes in
C{__slots__}, each starting from the class default it replaces, and
derives C{fileno} from its socket instead of holding a bound method: about
700 bytes less per connection, whatever the order its first instances ran
in.  Its behaviour is Twisted's (the methods are not touched).

L{SlimTCP4ServerEndpoint} is L{twisted.internet.endpoints.TCP4ServerEndpoint}
listening with a L{SlimPort} when the reactor's C{listenTCP} is the POSIX
reactors' own (any other reactor, such as a test's memory reactor, gets
its C{listenTCP} called as before).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, endpoints, tcp
from twisted.internet.interfaces import IListeningPort
from twisted.internet.posixbase import PosixReactorBase

#: The attributes of a L{tcp.Server} kept in slots: those every connection
#: sets (at accept, at its first write, when a producer registers, when it
#: closes).  Any other goes to the instance dictionary, as before.
_SLOTS = (
    "reactor",
    "socket",
    "protocol",
    "server",
    "client",
    "sessionno",
    "hostname",
    "logstr",
    "repstr",
    "connected",
    "disconnected",
    "disconnecting",
    "dataBuffer",
    "offset",
    "_tempDataBuffer",
    "_tempDataLen",
    "producer",
    "producerPaused",
    "streamingProducer",
    "_writeDisconnecting",
    "_writeDisconnected",
    "_aborting",
)

_MISSING = object()


def _class_defaults(cls: type, names: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
    """
    The class attributes of C{cls} (found along its MRO) named in
    C{names}: what an instance reads until it sets its own.
    """
    out = []
    for name in names:
        for klass in cls.__mro__:
            value = vars(klass).get(name, _MISSING)
            if value is not _MISSING:
                out.append((name, value))
                break
    return tuple(out)


def _closed_fileno() -> int:
    return -1


class SlimServer(tcp.Server):
    """
    A L{tcp.Server} with its per-connection attributes in slots (see the
    module docstring).
    """

    __slots__ = _SLOTS
    #: Each slot's starting value: the class attribute it shadows.
    _defaults = _class_defaults(tcp.Server, _SLOTS)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for name, value in self._defaults:
            setattr(self, name, value)
        super().__init__(*args, **kwargs)

    # tcp.Connection sets fileno to its socket's, and deletes it once the
    # socket is closed (FileDescriptor.fileno then answers -1): derived
    # from the socket, it costs no bound method per connection.

    @property  # type: ignore[override]
    def fileno(self) -> Callable[[], int]:
        try:
            return self.socket.fileno
        except AttributeError:
            return _closed_fileno

    @fileno.setter
    def fileno(self, value: Callable[[], int]) -> None:
        if value != self.socket.fileno:
            raise AttributeError("a SlimServer's fileno is its socket's")

    @fileno.deleter
    def fileno(self) -> None:
        pass


class SlimPort(tcp.Port):
    """
    A L{tcp.Port} whose connections are L{SlimServer}s.
    """

    transport = SlimServer


class SlimTCP4ServerEndpoint(endpoints.TCP4ServerEndpoint):
    """
    L{endpoints.TCP4ServerEndpoint} listening with a L{SlimPort} (see the
    module docstring).
    """

    def listen(self, protocolFactory: Any) -> defer.Deferred[IListeningPort]:
        listen_tcp = getattr(type(self._reactor), "listenTCP", None)
        if listen_tcp is not PosixReactorBase.listenTCP:
            return super().listen(protocolFactory)
        return defer.execute(self._listen, protocolFactory)

    def _listen(self, factory: Any) -> SlimPort:
        port = SlimPort(
            self._port, factory, self._backlog, self._interface, self._reactor
        )
        port.startListening()
        return port
