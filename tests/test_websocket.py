"""
The WebSocket gateway (issue 16), driven in memory: autobahn's server
protocol over a L{StringTransport}, a client speaking raw WebSocket frames
(L{tests.wskit}), the server core of L{tests.serverkit} on a
L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from cim.codec import decode, decode_json, encode, encode_json
from cim.interfaces import ServerAddress
from cim.message import Command, Cursor, ErrorCode, Frame
from cim.server.websocket import (
    JSON,
    MAX_HANDSHAKE,
    PROTO,
    OriginPolicy,
    WebSocketConnection,
    WebSocketGateway,
)
from tests import wskit
from tests.serverkit import World


class WsPeer:
    """
    One WebSocket client of the server under test.
    """

    def __init__(
        self,
        world: World,
        protocols: tuple[str, ...] = (PROTO,),
        origin: str | None = None,
        origins: tuple[str, ...] = (),
        host: str = "127.0.0.1:8084",
        max_frame: int = 64 * 1024,
        max_output: int = 4 * 1024 * 1024,
    ) -> None:
        self.world = world
        self.gateway = WebSocketGateway(
            world.server, world.clock, max_frame, max_output, origins
        )
        address = IPv4Address("TCP", "10.1.1.2", 5001)
        self.protocol: WebSocketConnection = self.gateway.buildProtocol(address)
        self.transport = StringTransport(peerAddress=address)
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(wskit.handshake(protocols, origin, host))
        head, _, rest = self.transport.value().partition(b"\r\n\r\n")
        self.response = head.decode()
        self.transport.clear()
        self._left = rest
        self.binary = PROTO in protocols and (JSON not in protocols[:1])

    @property
    def status(self) -> int:
        return int(self.response.split(" ", 2)[1])

    def send_raw(self, opcode: int, payload: bytes, **kw: object) -> None:
        self.protocol.dataReceived(wskit.frame(opcode, payload, **kw))  # type: ignore[arg-type]

    def send(self, frame: Frame) -> None:
        if self.binary:
            self.send_raw(wskit.BINARY, encode(frame))
        else:
            self.send_raw(wskit.TEXT, encode_json(frame).encode())

    def raw(self) -> list[wskit.Received]:
        frames, self._left = wskit.parse(self._left + self.transport.value())
        self.transport.clear()
        return frames

    def received(self, raw: list[wskit.Received] | None = None) -> list[Frame]:
        out = []
        for r in self.raw() if raw is None else raw:
            if r.opcode == wskit.BINARY:
                out.append(decode(r.payload))
            elif r.opcode == wskit.TEXT:
                out.append(decode_json(r.payload.decode()))
        return out

    def login(self, name: str) -> int:
        world = self.world
        existing = world.result(world.store.get_account_by_name(name))
        user_id = existing.user_id if existing else world.account(name)  # type: ignore[attr-defined]
        self.send(
            Frame(
                cmd=Command.LOGIN_REQUEST,
                request_id=user_id,
                req_msg=name,
                token=world.token(user_id, name),
            )
        )
        frames = self.received()
        assert frames and frames[0].cmd == Command.LOGIN_RESPONSE, frames
        return user_id

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


def _close_of(raw: list[wskit.Received]) -> wskit.Received:
    [close] = [r for r in raw if r.opcode == wskit.CLOSE]
    return close


# The handshake


@pytest.mark.parametrize("subprotocol", [PROTO, JSON])
def test_the_handshake_chooses_a_cim_subprotocol(subprotocol: str) -> None:
    peer = WsPeer(World(), protocols=("chat", subprotocol))
    assert peer.status == 101
    assert f"Sec-WebSocket-Protocol: {subprotocol}" in peer.response
    assert peer.protocol.binary == (subprotocol == PROTO)


@pytest.mark.parametrize("protocols", [(), ("chat",), ("cim.v2.proto",)])
def test_the_handshake_refuses_a_missing_or_unknown_subprotocol(
    protocols: tuple[str, ...],
) -> None:
    world = World()
    peer = WsPeer(world, protocols=protocols)
    assert peer.status == 400
    assert peer.closed
    assert not world.server.connections


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        (None, "127.0.0.1:8084", True),  # not a browser
        ("http://127.0.0.1:8083", "127.0.0.1:8084", True),  # the route's page
        ("https://chat.example.com", "chat.example.com", True),
        ("https://evil.example", "127.0.0.1:8084", False),
        ("http://127.0.0.1.evil.example", "127.0.0.1:8084", False),
        ("null", "127.0.0.1:8084", False),
        ("http://[::1]:8083", "[::1]:8084", True),
        ("http://localhost:8083", "127.0.0.1:8084", True),  # loopback is one host
        ("http://127.0.0.1:8083", "[::1]:8084", True),
        ("http://localhost.evil.example", "127.0.0.1:8084", False),
        ("http://127.0.0.1:8083", "10.0.0.1:8084", False),
    ],
)
def test_by_default_a_page_of_the_same_host_may_connect(
    origin: str | None, host: str, allowed: bool
) -> None:
    peer = WsPeer(World(), origin=origin, host=host)
    # (autobahn refuses a null origin itself, with 400.)
    assert peer.status == 101 if allowed else peer.status in (400, 403)


def test_the_origin_option_names_the_pages_that_may_connect() -> None:
    origins = ("https://chat.example.com", "https://*.cim.example")
    for origin, status in [
        ("https://chat.example.com", 101),
        ("HTTPS://Chat.Example.com/", 101),
        ("https://eu.cim.example", 101),
        ("http://chat.example.com", 403),
        ("http://127.0.0.1:8083", 403),  # same host, but not listed
        (None, 101),
    ]:
        assert WsPeer(World(), origin=origin, origins=origins).status == status


def test_the_origin_policy() -> None:
    anyone = OriginPolicy(["*"])
    assert anyone.allows("https://x.example", "h") and anyone.allows(None, "h")
    assert not anyone.allows("null", "h")
    assert not OriginPolicy().allows("http://[bad", "h")


# Chat: the same core as TCP


@pytest.mark.parametrize("subprotocol", [PROTO, JSON])
def test_a_websocket_client_chats_with_a_tcp_client(subprotocol: str) -> None:
    world = World()
    ws = WsPeer(world, protocols=(subprotocol,))
    alice = ws.login("alice")
    tcp, bob = world.login("bob")
    ws.send(
        Frame(
            cmd=Command.MESSAGE,
            req_msg="hi bob",
            receive_user_id=bob,
            client_msg_id="c1",
        )
    )
    frames = ws.received()
    [ack] = [f for f in frames if f.cmd == Command.ACK]
    assert (ack.client_msg_id, ack.seq) == ("c1", 1)
    [message] = tcp.messages()
    assert (message.text, message.sender_id) == ("hi bob", alice)
    tcp.send(
        Frame(
            cmd=Command.MESSAGE,
            req_msg="hi alice",
            receive_user_id=alice,
            client_msg_id="d1",
        )
    )
    texts = [m.text for f in ws.received() for m in f.messages]
    assert "hi alice" in texts


def test_the_json_form_is_protobufs_own() -> None:
    world = World()
    ws = WsPeer(world, protocols=(JSON,))
    ws.login("alice")
    ws.send_raw(wskit.TEXT, b'{"cmd": "PING", "reqMsg": "ping"}')
    [pong] = ws.raw()
    assert pong.opcode == wskit.TEXT
    assert json.loads(pong.payload) == {"cmd": "PING", "reqMsg": "pong"}


def test_a_heartbeat_frame_is_answered() -> None:
    world = World()
    ws = WsPeer(world)
    ws.login("alice")
    ws.send(Frame(cmd=Command.PING, req_msg="ping"))
    assert ws.received() == [Frame(cmd=Command.PING, req_msg="pong")]


def test_a_batch_is_encoded_once_per_form() -> None:
    world = World()
    binary, text = WsPeer(world, protocols=(PROTO,)), WsPeer(world, protocols=(JSON,))
    binary.login("ann")
    text.login("ben")
    tcp, carol = world.login("carol")
    _, dave = world.login("dave")
    from cim.message import ChatMessage
    from cim.server.wire import Batch

    batch = Batch([ChatMessage(1, "g:x", 1, carol, "carol", "hello", 5)])
    binary.protocol.send_batch(batch)
    text.protocol.send_batch(batch)
    tcp.protocol.send_batch(batch)
    assert set(batch._encoded) == {
        "ws-protobuf-frame",
        "ws-json-frame",
        "framed-protobuf",
    }
    for peer in (binary, text):
        [frame] = peer.received()
        assert [m.text for m in frame.messages] == ["hello"]


def _every_kind_of_frame() -> list[Frame]:
    from cim.message import ChatMessage, Cursor

    message = ChatMessage(7, "p:1:2", 3, 1, "ann", "hé <b>", 99, "c1", 2, "", "e1")
    return [
        Frame(
            cmd=command,
            req_msg="x",
            request_id=2**40,
            properties={"k": "v"},
            batch=("a", "b"),
            token="t",
            client_msg_id="c1",
            msg_id=5,
            seq=6,
            conversation="g:x",
            receive_user_id=2,
            group_id="x",
            error_code=8003,
            error_reason="why",
            cursors=(Cursor("p:1:2", 3, "e1", True),),
            messages=(message,),
            redirect="h:1",
            timestamp=123,
            device="phone",
        )
        for command in Command
    ]


@pytest.mark.parametrize("subprotocol", [PROTO, JSON])
def test_every_frame_kind_is_carried_unchanged(subprotocol: str) -> None:
    """
    Both ways, every command with every field (EPOCH and READ of issue 14
    too): the gateway frames, the core decides.
    """
    world = World()
    ws = WsPeer(world, protocols=(subprotocol,))
    for frame in _every_kind_of_frame():
        ws.protocol.send(frame)
        assert ws.received() == [frame]
    seen: list[Frame] = []
    world.server.frame_received = lambda conn, frame: seen.append(frame)  # type: ignore[method-assign]
    for frame in _every_kind_of_frame():
        ws.send(frame)
    assert seen == _every_kind_of_frame()


def test_messages_sent_while_away_are_replayed_on_login() -> None:
    world = World()
    tcp, bob = world.login("bob")
    alice = world.account("alice")
    tcp.send(
        Frame(cmd=Command.MESSAGE, req_msg="while away", receive_user_id=alice,
              client_msg_id="b1")
    )  # fmt: skip
    ws = WsPeer(world, protocols=(JSON,))
    ws.send(
        Frame(
            cmd=Command.LOGIN_REQUEST,
            request_id=alice,
            req_msg="alice",
            token=world.token(alice, "alice"),
        )
    )
    frames = ws.received()
    assert frames[0].cmd == Command.LOGIN_RESPONSE
    texts = [m.text for f in frames for m in f.messages]
    assert texts == ["while away"]
    replayed = [f for f in frames if f.messages]
    assert replayed[0].cmd == Command.OFFLINE
    # Acknowledged like on TCP.
    [message] = replayed[0].messages
    ws.send(
        Frame(cmd=Command.ACK, cursors=(Cursor(message.conversation, message.seq),))
    )
    assert not ws.closed


# Heartbeats: WebSocket pings count


def test_websocket_pings_keep_a_connection() -> None:
    world = World()
    ws = WsPeer(world)
    ws.login("alice")
    for _ in range(12):
        world.clock.advance(5)
        ws.send_raw(wskit.PING, b"beat")
    # 60 s, twice the heartbeat timeout: still open, every ping answered.
    assert not ws.closed
    raw = ws.raw()
    assert [r.opcode for r in raw] == [wskit.PONG] * 12
    assert raw[0].payload == b"beat"
    # Unsolicited pongs count too.
    world.clock.advance(20)
    ws.send_raw(wskit.PONG, b"")
    world.clock.advance(20)
    assert not ws.closed
    world.clock.pump([5] * 4)
    [error] = ws.received(raw := ws.raw())
    assert error.error_code == ErrorCode.LOGIN_TIMEOUT
    assert _close_of(raw).close_code == 1008


@pytest.mark.parametrize("logged_in", [True, False])
def test_a_ping_flood_is_rate_limited(logged_in: bool) -> None:
    world = World(rate=5.0)
    ws = WsPeer(world)
    if logged_in:
        ws.login("alice")
    for _ in range(20):
        ws.send_raw(wskit.PING, b"")
    raw = ws.raw()
    [error] = ws.received(raw)
    assert error.error_code == ErrorCode.RATE_LIMITED
    assert _close_of(raw).close_code == 1008


# Limits and errors


def test_a_message_over_the_limit_closes_with_1009() -> None:
    world = World()
    ws = WsPeer(world, max_frame=256)
    ws.login("alice")
    # Only the header: the server does not wait for the payload.
    ws.protocol.dataReceived(wskit.frame(wskit.BINARY, b"", length=100_000)[:14])
    raw = ws.raw()
    [error] = ws.received(raw)
    assert error.error_code == ErrorCode.FRAME_TOO_LONG
    assert "100000 bytes" in error.error_reason
    assert _close_of(raw).close_code == 1009


def test_a_fragmented_message_over_the_limit_closes_with_1009() -> None:
    world = World()
    ws = WsPeer(world, max_frame=256)
    ws.login("alice")
    ws.send_raw(wskit.BINARY, b"x" * 200, fin=False)
    ws.send_raw(0x0, b"x" * 200)
    raw = ws.raw()
    assert _close_of(raw).close_code == 1009


def test_an_undecodable_binary_message_closes_with_1007() -> None:
    world = World()
    ws = WsPeer(world)
    ws.login("alice")
    ws.send_raw(wskit.BINARY, b"\xff\xff\xff")
    raw = ws.raw()
    [error] = ws.received(raw)
    assert error.error_code == ErrorCode.MALFORMED_FRAME
    assert _close_of(raw).close_code == 1007
    # Nothing more is read.
    ws.send(Frame(cmd=Command.PING))
    assert ws.raw() == []


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b'{"cmd": "PING", "bogus": 1}', "no field named"),
        (b'{"cmd": "PING"', "Failed to load JSON"),
        (b"[]", "not a JSON object"),
        (b'{"cmd": 99}', "unknown command 99"),
        (b'{"cmd": "PING", "cmd": "MESSAGE"}', "duplicate key"),
        (b'{"cmd": "MESSAGE", "requestId": 1.5}', "requestId"),
        (b'{"cmd": "MESSAGE", "reqMsg": "\\ud800"}', "Unpaired surrogate"),
    ],
)
def test_json_is_decoded_strictly(text: bytes, reason: str) -> None:
    world = World()
    ws = WsPeer(world, protocols=(JSON,))
    ws.login("alice")
    ws.send_raw(wskit.TEXT, text)
    raw = ws.raw()
    [error] = ws.received(raw)
    assert error.error_code == ErrorCode.MALFORMED_FRAME
    assert reason in error.error_reason
    assert _close_of(raw).close_code == 1007


@pytest.mark.parametrize(
    ("subprotocol", "opcode"), [(PROTO, wskit.TEXT), (JSON, wskit.BINARY)]
)
def test_the_other_kind_of_message_closes_with_1003(
    subprotocol: str, opcode: int
) -> None:
    ws = WsPeer(World(), protocols=(subprotocol,))
    ws.send_raw(opcode, b"{}")
    assert _close_of(ws.raw()).close_code == 1003


def test_invalid_utf8_text_closes_with_1007() -> None:
    ws = WsPeer(World(), protocols=(JSON,))
    ws.send_raw(wskit.TEXT, b'{"reqMsg": "\xff"}')
    assert _close_of(ws.raw()).close_code == 1007


def test_an_unmasked_frame_is_a_protocol_error() -> None:
    ws = WsPeer(World())
    ws.protocol.dataReceived(bytes([0x82, 0x01, 0x00]))
    assert _close_of(ws.raw()).close_code == 1002


def test_a_message_before_the_login_is_refused() -> None:
    ws = WsPeer(World())
    ws.send(Frame(cmd=Command.MESSAGE, req_msg="hi", receive_user_id=1))
    raw = ws.raw()
    [error] = ws.received(raw)
    assert error.error_code == ErrorCode.NOT_LOGGED_IN
    assert _close_of(raw).close_code == 1008


def test_a_bad_token_is_refused() -> None:
    world = World()
    ws = WsPeer(world)
    user = world.account("alice")
    ws.send(
        Frame(cmd=Command.LOGIN_REQUEST, request_id=user, req_msg="alice", token="x")
    )
    raw = ws.raw()
    [error] = ws.received(raw)
    assert error.cmd == Command.ERROR
    assert _close_of(raw).close_code == 1008


def test_a_kick_closes_normally_and_the_loss_reaches_the_core() -> None:
    world = World()
    ws = WsPeer(world)
    alice = ws.login("alice")
    assert world.server.kick_user(alice, "", "bye", False) or True
    raw = ws.raw()
    [kick] = ws.received(raw)
    assert kick.cmd == Command.KICK
    assert _close_of(raw).close_code == 1000
    ws.protocol.connectionLost()
    assert ws.protocol.conn not in world.server.connections


def test_an_error_that_does_not_close_is_not_a_close_code() -> None:
    world = World()
    ws = WsPeer(world)
    alice = ws.login("alice")
    # A send to nobody: an error about that send, the connection stays.
    ws.send(
        Frame(cmd=Command.MESSAGE, req_msg="hi", receive_user_id=999, client_msg_id="x")
    )
    raw = ws.raw()
    [error] = ws.received(raw)
    assert error.cmd == Command.ERROR
    assert wskit.CLOSE not in [r.opcode for r in raw]
    ws.send(Frame(cmd=Command.PING, req_msg="ping"))
    ws.received()
    world.server.kick_user(alice, "", "bye", False)
    [close] = [r for r in ws.raw() if r.opcode == wskit.CLOSE]
    assert close.close_code == 1000


def test_a_client_that_does_not_read_is_dropped() -> None:
    world = World()
    ws = WsPeer(world, max_output=64 * 1024)
    ws.login("alice")
    ws.protocol.backlog.pauseProducing()
    assert ws.protocol.backed_up()
    drained = ws.protocol.drained()
    big = Frame(cmd=Command.PING, req_msg="x" * 40_000)
    ws.protocol.send(big)
    assert not ws.transport.disconnecting
    ws.protocol.send(big)
    assert ws.transport.disconnecting
    assert ws.protocol.conn is not None and ws.protocol.conn.closed
    ws.protocol.backlog.resumeProducing()
    assert drained.called


def test_the_handshake_has_a_deadline() -> None:
    world = World()
    gateway = WebSocketGateway(world.server, world.clock, 1024, open_timeout=10)
    protocol = gateway.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET / HTTP/1.1\r\n")
    world.clock.advance(11)
    assert transport.disconnecting
    assert not world.server.connections


def test_a_handshake_has_a_size_limit() -> None:
    world = World()
    gateway = WebSocketGateway(world.server, world.clock, 1024)
    protocol = gateway.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET / HTTP/1.1\r\n")
    for _ in range(300):
        if transport.disconnecting:
            break
        protocol.dataReceived(b"X-Padding: " + b"x" * 100 + b"\r\n")
    assert transport.disconnecting
    assert len(protocol.data) <= MAX_HANDSHAKE


def test_an_open_connection_keeps_little() -> None:
    ws = WsPeer(World(), max_frame=1000)
    protocol = ws.protocol
    assert protocol.http_headers is None and protocol.http_request_data is None
    # The options are the factory's, not copies.
    assert "maxFramePayloadSize" not in vars(protocol)
    assert protocol.maxMessagePayloadSize == 1000
    assert protocol.trafficStats is ws.gateway.traffic
    # Only what differs from an idle connection's defaults is its own.
    assert protocol.websocket_protocols is None and protocol._wskey is None
    assert protocol.current_frame_masker is None
    assert protocol._results == {"message": None}
    assert len(vars(protocol)) <= 17, sorted(vars(protocol))
    # Still speaks.
    ws.login("alice")
    ws.send(Frame(cmd=Command.PING, req_msg="ping"))
    assert ws.received() == [Frame(cmd=Command.PING, req_msg="pong")]


# The address and the login reply


@pytest.mark.parametrize(
    ("address", "text", "url"),
    [
        (ServerAddress("h", 1, 2, ws_port=8084), "h:1:2:ws=8084", "ws://h:8084/"),
        (
            ServerAddress("h", 1, 2, True, True, 8084, True),
            "h:1:2:tls+https+wss=8084",
            "wss://h:8084/",
        ),
        (ServerAddress("::1", 1, 2, ws_port=9), "::1:1:2:ws=9", "ws://[::1]:9/"),
        (ServerAddress("h", 1, 2), "h:1:2", None),
    ],
)
def test_the_address_carries_the_websocket_port(
    address: ServerAddress, text: str, url: str | None
) -> None:
    assert str(address) == text
    assert ServerAddress.parse(text) == address
    assert address.ws_url == url
    # CIM reads the first three fields only.
    if "::" not in text:
        ip, port, http_port = text.split(":")[:3]
        assert (ip, int(port), int(http_port)) == (address.host, 1, 2)


@pytest.mark.parametrize("text", ["h:1:2:ws=0", "h:1:2:ws=1+wss=2", "h:1:2:ws=x"])
def test_a_bad_websocket_flag_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="WebSocket flag"):
        ServerAddress.parse(text)


# Options


def test_the_server_gateway_is_off_unless_asked_for() -> None:
    from cim.server import tap

    options = tap.Options()
    options.parseOptions(["--secret", "s" * 20])
    config = tap.config_from(options)
    assert (config.ws_port, config.ws_origins) == (None, ())
    options = tap.Options()
    options.parseOptions(
        ["--secret", "s" * 20, "--ws-port", "tcp:0", "--ws-origin", "https://a.example",
         "--ws-origin", "*"]
    )  # fmt: skip
    config = tap.config_from(options)
    assert (config.ws_port, config.ws_origins) == ("tcp:0", ("https://a.example", "*"))


def test_the_standalone_gateway_is_on_by_default() -> None:
    from cim.standalone import Options

    options = Options()
    options.parseOptions([])
    assert (options["ws-port"], options["ws-origin"]) == (8084, [])
    options = Options()
    options.parseOptions(["--ws-port", "off"])
    assert options["ws-port"] is None
    options = Options()
    options.parseOptions(["--ws-port", "0"])
    assert options["ws-port"] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ws-port", "70000"], "--ws-port must be between"),
        (["--ws-port", "nope:1"], "--ws-port must be a port number or"),
        (["--ws-origin", "example.com"], "--ws-origin must be"),
        (["--ws-origin", "https://a.example/path"], "--ws-origin must be"),
    ],
)
def test_bad_websocket_options_are_usage_errors(args: list[str], message: str) -> None:
    from twisted.python import usage

    from cim.server import tap

    with pytest.raises(usage.UsageError, match=message):
        tap.Options().parseOptions(["--secret", "s" * 20, *args])


def test_a_browser_handshake_offering_compression_is_accepted() -> None:
    """
    Every browser offers permessage-deflate: autobahn's (default) answer to
    the offer is a function among the options, which must stay one on the
    connections' class (bound to the connection, it failed every browser's
    handshake).
    """
    world = World()
    gateway = WebSocketGateway(world.server, world.clock, 1024)
    protocol = gateway.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5002))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(
        b"GET / HTTP/1.1\r\n"
        b"Host: 127.0.0.1:8084\r\n"
        b"Origin: http://127.0.0.1:8083\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: cim.v1.json\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        b"\r\n"
    )
    assert transport.value().startswith(b"HTTP/1.1 101 "), transport.value()
    assert b"Sec-WebSocket-Protocol: cim.v1.json" in transport.value()


# Reading and writing without autobahn's machinery


def _masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    return wskit.frame(opcode, payload, fin=fin)


@pytest.mark.parametrize("subprotocol", [PROTO, JSON])
@pytest.mark.parametrize("piece", [None, 1, 7])
def test_messages_are_read_in_whatever_pieces_they_come(
    subprotocol: str, piece: int | None
) -> None:
    """
    Whole messages are read straight off the transport's bytes, the rest
    (a control frame, a partial frame) by autobahn, in order.
    """
    world = World()
    ws = WsPeer(world, protocols=(subprotocol,))
    ws.login("alice")
    seen: list[Frame] = []
    world.server.frame_received = lambda conn, frame: seen.append(frame)  # type: ignore[method-assign]
    frames = [
        Frame(cmd=Command.PING, req_msg="ping"),
        Frame(cmd=Command.MESSAGE, req_msg="é" * 150, receive_user_id=2),
        Frame(cmd=Command.ACK, cursors=(Cursor("p:1:2", 3),)),
        Frame(cmd=Command.MESSAGE, req_msg="x" * 70_000, receive_user_id=2),
        Frame(cmd=Command.PING, req_msg="ping"),
    ]
    opcode = wskit.BINARY if subprotocol == PROTO else wskit.TEXT
    data = [
        _masked(
            opcode, encode(f) if opcode == wskit.BINARY else encode_json(f).encode()
        )
        for f in frames
    ]
    data.insert(2, _masked(wskit.PING, b"are you there"))
    stream = b"".join(data)
    ws.protocol.maxMessagePayloadSize = ws.protocol.maxFramePayloadSize = 1 << 20
    for i in range(0, len(stream), piece or len(stream)):
        ws.protocol.dataReceived(stream[i : i + (piece or len(stream))])
    assert seen == frames
    assert [(r.opcode, r.payload) for r in ws.raw()] == [(wskit.PONG, b"are you there")]


def test_a_new_message_inside_a_fragmented_one_is_a_protocol_error() -> None:
    ws = WsPeer(World())
    ws.login("alice")
    ping = encode(Frame(cmd=Command.PING))
    ws.protocol.dataReceived(
        _masked(wskit.BINARY, ping, fin=False) + _masked(wskit.BINARY, ping)
    )
    assert _close_of(ws.raw()).close_code == 1002


def test_a_length_not_in_its_shortest_form_is_a_protocol_error() -> None:
    ws = WsPeer(World())
    ws.login("alice")
    payload = encode(Frame(cmd=Command.PING))
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    head = bytes([0x80 | wskit.BINARY, 0x80 | 126]) + len(payload).to_bytes(2, "big")
    ws.protocol.dataReceived(head + mask + masked)
    assert _close_of(ws.raw()).close_code == 1002


def test_a_compressing_connection_gets_compressed_messages() -> None:
    """
    The gateway does not agree on permessage-deflate (autobahn's default);
    if it did, autobahn would make the messages, compressed.
    """
    import zlib

    from autobahn.websocket.compress import PerMessageDeflateOfferAccept

    world = World()
    gateway = WebSocketGateway(world.server, world.clock, 1024)
    protocol = gateway.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5002))
    transport = StringTransport()
    protocol.makeConnection(transport)
    offer = b"\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
    protocol.dataReceived(wskit.handshake((JSON,)).replace(b"\r\n\r\n", offer))
    assert b"permessage-deflate" not in transport.value()
    assert protocol._perMessageCompress is None

    gateway.connection_class.perMessageCompressionAccept = staticmethod(  # type: ignore[attr-defined]
        lambda offers: PerMessageDeflateOfferAccept(offers[0])
    )
    protocol = gateway.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5002))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(wskit.handshake((JSON,)).replace(b"\r\n\r\n", offer))
    assert b"permessage-deflate" in transport.value()
    transport.clear()
    protocol.dataReceived(
        _masked(wskit.TEXT, b'{"cmd": "PING", "reqMsg": "ping"}')  # uncompressed
    )
    data = transport.value()
    assert data[0] == 0x80 | 0x40 | wskit.TEXT  # final, compressed (RSV1), text
    received = wskit.parse(data)[0][0]
    text = zlib.decompressobj(-15).decompress(received.payload + b"\x00\x00\xff\xff")
    assert json.loads(text)["cmd"] in {"PING", "ERROR"}
