"""
L{cim.slimtcp}: TCP connections whose state is in slots behave as
Twisted's own, and hold no instance dictionary.
"""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure

from cim.listen import server_endpoint
from cim.slimtcp import SlimPort, SlimServer, SlimTCP4ServerEndpoint


class Recording(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: list[Failure] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.lost.append(reason)


@pytest.fixture
def pair() -> tuple[SlimServer, Recording, socket.socket]:
    ours, theirs = socket.socketpair()
    protocol = Recording()
    transport = SlimServer(ours, protocol, ("10.1.2.3", 4567), None, 7, MemoryReactor())
    protocol.makeConnection(transport)
    return transport, protocol, theirs


def test_starts_as_tcp_server(
    pair: tuple[SlimServer, Recording, socket.socket],
) -> None:
    """
    Every slot starts from the class attribute it shadows, and the
    constructor sets the rest as L{tcp.Server}'s does.
    """
    transport, protocol, _ = pair
    assert transport.connected == 1
    assert transport.disconnected == 0 and transport.disconnecting == 0
    assert transport.dataBuffer == b"" and transport.offset == 0
    assert transport.producer is None and not transport.streamingProducer
    assert transport.logstr == "Recording,7,10.1.2.3"
    assert transport.getPeer().host == "10.1.2.3"
    assert transport.getPeer().port == 4567
    assert transport.fileno() == transport.socket.fileno() > 0
    assert transport in transport.reactor.getReaders()  # type: ignore[attr-defined]
    assert protocol.transport is transport


def test_writes_reads_and_closes(
    pair: tuple[SlimServer, Recording, socket.socket],
) -> None:
    """
    Writing, reading, a producer and the loss of the connection work, and
    leave nothing in an instance dictionary; once lost, C{fileno} answers
    -1 as Twisted's does.
    """
    transport, protocol, theirs = pair

    class Producer:
        def pauseProducing(self) -> None: ...
        def resumeProducing(self) -> None: ...
        def stopProducing(self) -> None: ...

    transport.registerProducer(Producer(), True)
    transport.write(b"hello")
    transport.writeSequence([b" ", b"world"])
    transport.doWrite()
    assert theirs.recv(100) == b"hello world"
    theirs.sendall(b"ping")
    transport.doRead()
    assert protocol.received == b"ping"
    assert vars(transport) == {}
    transport.unregisterProducer()
    transport.loseConnection()
    transport.doWrite()
    theirs.close()
    transport.connectionLost(Failure(ConnectionDone()))
    assert protocol.lost
    assert transport.fileno() == -1
    assert not hasattr(transport, "socket")


def test_fileno_is_the_sockets() -> None:
    """
    C{fileno} may only be set to the socket's own.
    """
    ours, theirs = socket.socketpair()
    transport = SlimServer(
        ours, Recording(), ("::1", 1, 0, 0), None, 1, MemoryReactor()
    )
    with pytest.raises(AttributeError):
        transport.fileno = lambda: 3  # type: ignore[method-assign]
    theirs.close()
    ours.close()


def test_memory_reactor_listens_its_own_way() -> None:
    """
    A reactor whose C{listenTCP} is not the POSIX reactors' (a test's
    memory reactor) is asked to listen as with Twisted's endpoint.
    """
    reactor = MemoryReactor()
    factory = Factory.forProtocol(Protocol)
    d = server_endpoint(reactor, 1234, "127.0.0.1", 77).listen(factory)
    assert reactor.tcpServers == [(1234, factory, 77, "127.0.0.1")]
    got: list[object] = []
    d.addCallback(got.append)
    assert got


@pytest_twisted.ensureDeferred
async def test_listens_with_slim_connections(reactor: object) -> None:
    """
    On a POSIX reactor, a numbered port listens with a L{SlimPort}: its
    connections are L{SlimServer}s that carry bytes both ways.
    """
    connected: Deferred[Protocol] = Deferred()
    echoed: Deferred[bytes] = Deferred()

    class Echo(Protocol):
        def connectionMade(self) -> None:
            connected.callback(self)

        def dataReceived(self, data: bytes) -> None:
            self.transport.write(data)  # type: ignore[union-attr]

    class Client(Protocol):
        def dataReceived(self, data: bytes) -> None:
            echoed.callback(data)

    endpoint = server_endpoint(reactor, 0, "127.0.0.1", 50)
    assert isinstance(endpoint, SlimTCP4ServerEndpoint)
    port = await endpoint.listen(Factory.forProtocol(Echo))
    try:
        assert isinstance(port, SlimPort)
        client = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Client()
        )
        server = await connected
        assert isinstance(server.transport, SlimServer)
        client.transport.write(b"echo")  # type: ignore[union-attr]
        assert await echoed == b"echo"
        client.transport.loseConnection()  # type: ignore[union-attr]
    finally:
        await port.stopListening()
