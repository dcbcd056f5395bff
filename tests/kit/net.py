"""
Network tricks for tests: a TCP link that a test can cut and restore (a
network partition between one process and a service), and a port that
refuses connections.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.protocols import portforward


class _Forwarded(portforward.ProxyServer):
    factory: _ForwardFactory

    def connectionMade(self) -> None:
        self.factory.open.add(self)
        super().connectionMade()

    def connectionLost(self, reason: object = None) -> None:
        self.factory.open.discard(self)
        super().connectionLost(reason)


class _ForwardFactory(portforward.ProxyFactory):
    protocol = _Forwarded
    noisy = False

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.open: set[_Forwarded] = set()


class Link:
    """
    A TCP forwarder on loopback, in the test's reactor, to
    C{target_host:target_port}.

    L{listen} the first time listens on any free port, and L{port} is then
    the one to give the process under test; L{cut} drops every connection
    and stops listening (new connections are refused); L{listen} again
    listens on the same port.
    """

    def __init__(
        self, reactor: Any, target_port: int, target_host: str = "127.0.0.1"
    ) -> None:
        self.reactor = reactor
        self.port = 0
        self.factory = _ForwardFactory(target_host, target_port)
        self._listening: Any = None

    def listen(self) -> int:
        """
        Let connections through; @return: L{port}.
        """
        assert self._listening is None, "already listening"
        self._listening = self.reactor.listenTCP(
            self.port, self.factory, interface="127.0.0.1"
        )
        self.port = self._listening.getHost().port
        return self.port

    async def cut(self) -> None:
        """
        Drop every connection and refuse new ones.
        """
        listening, self._listening = self._listening, None
        if listening is not None:
            await listening.stopListening()
        for proxy in list(self.factory.open):
            for side in (proxy, proxy.peer):
                transport: Any = side.transport if side is not None else None
                if transport is not None:
                    transport.abortConnection()


@contextmanager
def refusing_port() -> Iterator[int]:
    """
    A loopback port that refuses connections while the block runs: bound
    by this process and never listened on, so that nobody else can take it
    meanwhile.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])
