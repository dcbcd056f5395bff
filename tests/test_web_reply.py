"""
How the sites' channel writes its replies (L{cim.web.ReplyChannel}): the
bytes twisted.web's own channel writes, each reply in one send, straight
to the socket of a plain TCP connection, what the socket does not take
through the transport, in order.
"""

from __future__ import annotations

import re
import socket
from typing import Any

import pytest
from twisted.internet import tcp
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from cim.web import QuietSite
from tests.test_server_flush import Reactor

#: A body the socket does not take in one send.
BIG = b"x" * (8 << 20)


class Counting:
    """
    A socket that counts its sends.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sends = 0

    def send(self, data: bytes) -> int:
        self.sends += 1
        return self.sock.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class Replies(Resource):
    """
    Replies of every shape: with a length, chunked, without a body, later.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Any] = []

    def render(self, request: Any) -> Any:
        path = request.path
        if path == b"/length":
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Content-Length", b"8")
            return b'{"a": 1}'
        if path == b"/chunks":
            request.write(b"one,")
            request.write(b"two")
            request.finish()
            return NOT_DONE_YET
        if path == b"/none":
            request.setResponseCode(204)
            return b""
        if path == b"/big":
            request.setHeader(b"Content-Length", b"%d" % len(BIG))
            return BIG
        if path == b"/later":
            self.waiting.append(request)
            return NOT_DONE_YET
        return b"plain"


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """
    Both ends of a loopback TCP connection: the server's, the client's.
    """
    with socket.create_server(("127.0.0.1", 0)) as listening:
        peer = socket.create_connection(listening.getsockname())
        ours, _ = listening.accept()
    return ours, peer


def _serve(site: Site) -> tuple[Reactor, Any, tcp.Server, Counting, socket.socket]:
    reactor = Reactor()
    site.reactor = reactor
    ours, peer = _tcp_pair()
    ours.setblocking(False)
    peer.setblocking(False)
    counting = Counting(ours)
    channel = site.buildProtocol(None)
    transport = tcp.Server(
        counting,  # type: ignore[arg-type]
        channel,
        ours.getpeername(),
        None,  # type: ignore[arg-type]
        1,
        reactor,  # type: ignore[arg-type]
    )
    channel.makeConnection(transport)
    return reactor, channel, transport, counting, peer


def _received(reactor: Reactor, transport: tcp.Server, peer: socket.socket) -> bytes:
    """
    What the peer receives, the transport's buffer drained as the reactor
    would, with the Date headers blanked.
    """
    out = b""
    while True:
        try:
            data = peer.recv(1 << 20)
        except BlockingIOError:
            if transport not in reactor.writers:
                break
            transport.doWrite()
            continue
        if not data:
            break
        out += data
    return re.sub(rb"Date: [^\r]*", b"Date: -", out)


def _get(path: bytes, *headers: bytes, method: bytes = b"GET") -> bytes:
    return b"\r\n".join(
        [b"%s %s HTTP/1.1" % (method, path), b"Host: x", *headers, b"", b""]
    )


CASES = [
    _get(b"/length"),
    _get(b"/chunks"),
    _get(b"/none"),
    _get(b"/length", method=b"HEAD"),
    _get(b"/plain", b"Connection: close"),
    b"GET /length HTTP/1.0\r\n\r\n",
    # Pipelined, then a bad request after a good one.
    _get(b"/length") + _get(b"/chunks") + _get(b"/none") + _get(b"/plain"),
    _get(b"/length") + b"NOT HTTP\r\n\r\n",
    b"POST /length HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
    b"Expect: 100-continue\r\n\r\n{}",
    _get(b"/big") + _get(b"/length"),
]


@pytest.mark.parametrize("request_", CASES)
def test_replies_are_twisted_webs(request_: bytes) -> None:
    """
    Whatever the reply, the client receives what twisted.web's own channel
    sends, byte for byte.
    """
    received = []
    for site in (Site(Replies()), QuietSite(Replies())):
        if not isinstance(site, QuietSite):
            site.protocol = HTTPChannel  # type: ignore[assignment]
        reactor, channel, transport, _, peer = _serve(site)
        channel.dataReceived(request_)
        received.append(_received(reactor, transport, peer))
    assert received[0] == received[1]
    assert received[1].startswith(b"HTTP/1.")


def test_a_reply_is_one_send_straight_to_the_socket() -> None:
    """
    Head and body leave in one send at once, without the reactor watching
    the socket; a reply without a body (or to HEAD) sends its head when it
    ends.
    """
    reactor, channel, transport, counting, peer = _serve(QuietSite(Replies()))
    for path, method in [(b"/length", b"GET"), (b"/none", b"GET"), (b"/x", b"HEAD")]:
        sends = counting.sends
        channel.dataReceived(_get(path, method=method))
        assert counting.sends == sends + 1
        assert not reactor.writers and not transport.dataBuffer
        reply = peer.recv(1 << 16)
        assert reply.startswith(b"HTTP/1.1 ")
        assert reply.endswith(b'{"a": 1}' if path == b"/length" else b"\r\n\r\n")


def test_a_reply_finished_later_waits_for_its_end() -> None:
    """
    A reply written later is sent then, and the pipelined requests behind
    it are answered after it, in order.
    """
    resource = Replies()
    reactor, channel, transport, _, peer = _serve(QuietSite(resource))
    channel.dataReceived(_get(b"/later") + _get(b"/length"))
    assert _received(reactor, transport, peer) == b""
    (request,) = resource.waiting
    request.setHeader(b"Content-Length", b"5")
    request.write(b"la")
    request.write(b"ter")
    request.finish()
    replies = _received(reactor, transport, peer)
    assert replies.count(b"HTTP/1.1 200 OK") == 2
    assert replies.index(b"later") < replies.index(b'{"a": 1}')


def test_other_transports_are_written_through() -> None:
    """
    On a transport other than plain TCP (TLS, a test's), the reply goes
    through the transport, in one write.
    """
    channel = QuietSite(Replies(), reactor=Clock()).buildProtocol(None)
    transport = StringTransport()
    writes: list[bytes] = []
    write = transport.write

    def recorded(data: bytes) -> None:
        writes.append(data)
        write(data)

    transport.write = recorded  # type: ignore[method-assign]
    channel.makeConnection(transport)
    channel.dataReceived(_get(b"/length"))
    assert len(writes) == 1
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert writes[0].endswith(b'\r\n\r\n{"a": 1}')


def test_what_the_socket_does_not_take_waits_in_the_transport() -> None:
    """
    A reply larger than the socket takes: the rest waits in the transport
    (which the reactor watches), and the reply behind it follows it.
    """
    reactor, channel, transport, _, peer = _serve(QuietSite(Replies()))
    channel.dataReceived(_get(b"/big") + _get(b"/length"))
    assert transport in reactor.writers
    replies = _received(reactor, transport, peer)
    assert replies.count(b"HTTP/1.1 200 OK") == 2
    assert BIG in replies
    assert replies.endswith(b'{"a": 1}')


def test_headers_given_as_pairs_are_written_as_twisted_web_writes_them() -> None:
    """
    (twisted.web still takes a reply's headers as pairs, for old callers:
    they are sanitized the same way.)
    """
    pairs = [(b"X-One", b"1"), (b"x-two", b"a\r\nb"), (b"X-One", b"3")]
    written = []
    ours = QuietSite(Replies(), reactor=Clock()).buildProtocol(None)
    for channel in (HTTPChannel(), ours):
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.writeHeaders(b"HTTP/1.1", b"200", b"OK", pairs)
        channel.write(b"body")
        written.append(transport.value())
    assert written[0] == written[1]
    assert written[1].startswith(b"HTTP/1.1 200 OK\r\nX-One: 1\r\nX-One: 3\r\n")
