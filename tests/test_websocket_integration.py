"""
The WebSocket gateway (issue 16) of real C{twistd} processes, with
autobahn's Twisted client (L{tests.wskit}): a login with the route's token,
chat with a TCP library client on both subprotocols, refused handshakes,
the size limit's close code, pings as heartbeats, and wss with the
development CA.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from twisted.internet.task import deferLater

from cim.client.library import Client, QueueListener
from cim.devcerts import DevCerts, make_dev_certs
from cim.interfaces import ServerAddress
from cim.message import Command, ErrorCode, Frame
from tests.kit.cluster import Cluster, Daemon, Processes
from tests.kit.http import call
from tests.kit.wait import within
from tests.wskit import HandshakeRefused, WsClient, connect

pytestmark = pytest.mark.integration

SECRET = "websocket-test-secret"
PROTO, JSON = "cim.v1.proto", "cim.v1.json"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    return make_dev_certs(tmp_path_factory.mktemp("certs"), ("localhost",))


async def route_login(reactor: Any, route: str, name: str) -> dict[str, Any]:
    """
    Register C{name} with a password and log in through the route, as a
    browser does: the extended reply, with the token and C{wsUrl}.
    """
    status, body = await call(
        reactor,
        f"{route}/registerAccount",
        {"userName": name, "password": "pw-" + name},
    )
    assert status == 200 and body["code"] == "9000", body
    user_id = body["dataBody"]["userId"]
    status, body = await call(
        reactor,
        f"{route}/login",
        {"userId": user_id, "userName": name, "password": "pw-" + name},
    )
    assert status == 200 and body["code"] == "9000", body
    data: dict[str, Any] = body["dataBody"]
    return data


async def ws_login(
    reactor: Any,
    route: str,
    name: str,
    protocol: str = PROTO,
    ca_file: str | None = None,
) -> tuple[WsClient, int, dict[str, Any]]:
    reply = await route_login(reactor, route, name)
    client = await within(
        reactor, connect(reactor, reply["wsUrl"], (protocol,), ca_file=ca_file), 10
    )
    client.send(
        Frame(
            cmd=Command.LOGIN_REQUEST,
            request_id=reply["userId"],
            req_msg=name,
            token=reply["token"],
        )
    )
    response = await within(reactor, client.frame(), 10)
    assert response.cmd == Command.LOGIN_RESPONSE, response
    return client, reply["userId"], reply


def _names() -> str:
    return uuid.uuid4().hex[:8]


# A standalone node: its gateway is on by default


@pytest_twisted.async_yield_fixture
async def node(reactor: Any, tmp_path: Path) -> AsyncIterator[Daemon]:
    processes = Processes(tmp_path, reactor)
    daemon = Daemon("node", "cim-standalone", ["--secret", SECRET], tmp_path, processes)
    try:
        daemon.start()
        await daemon.wait_ready(reactor)
        yield daemon
    finally:
        processes.stop_all()


@pytest.mark.parametrize("protocol", [PROTO, JSON])
@pytest_twisted.ensureDeferred
async def test_a_websocket_client_chats_with_a_tcp_client(
    reactor: Any, node: Daemon, protocol: str
) -> None:
    route = node.url()
    suffix = _names()
    ws, alice, reply = await ws_login(reactor, route, f"ann{suffix}", protocol)
    # The login reply names the gateway; the registry entry carries it.
    assert reply["wsUrl"] == f"ws://127.0.0.1:{node.ports['ws']}/"
    _, health = await call(reactor, f"{route}/health")
    [server] = health["dataBody"]["servers"]
    assert ServerAddress.parse(server).ws_url == reply["wsUrl"]
    assert server.endswith(f":ws={node.ports['ws']}")
    events = QueueListener()
    bob = Client(reactor, route, listener=events)
    try:
        await within(reactor, bob.login(f"ben{suffix}"), 10)
        assert bob.user_id is not None
        ws.send(
            Frame(
                cmd=Command.MESSAGE,
                req_msg="hello from a browser",
                receive_user_id=bob.user_id,
                client_msg_id="w1",
            )
        )
        ack = await within(reactor, ws.frame_of(Command.ACK), 10)
        assert ack.client_msg_id == "w1" and ack.seq >= 1
        message = await within(reactor, events.messages.get(), 10)
        assert (message.text, message.sender_id) == ("hello from a browser", alice)
        await within(reactor, bob.send_private(alice, "hello from a terminal"), 10)
        while True:
            frame = await within(reactor, ws.frame_of(Command.MESSAGE), 10)
            texts = [m.text for m in frame.messages]
            if "hello from a terminal" in texts:
                break
        # A heartbeat frame is answered in the subprotocol's form.
        ws.send(Frame(cmd=Command.PING, req_msg="ping"))
        pong = await within(reactor, ws.frame_of(Command.PING), 10)
        assert pong.req_msg == "pong"
    finally:
        await bob.close()
        ws.sendClose(1000)
        await within(reactor, ws.lost, 10)


@pytest_twisted.ensureDeferred
async def test_refused_handshakes(reactor: Any, node: Daemon) -> None:
    url = f"ws://127.0.0.1:{node.ports['ws']}/"
    for protocols, origin, status in [
        ((), None, "400"),
        (("chat",), None, "400"),
        ((PROTO,), "https://evil.example", "403"),
    ]:
        with pytest.raises(HandshakeRefused, match=status):
            await within(reactor, connect(reactor, url, protocols, origin), 10)
    # A page of the same host (the route's web client) may connect.
    client = await within(
        reactor,
        connect(reactor, url, (JSON,), f"http://127.0.0.1:{node.ports['route']}"),
        10,
    )
    assert client.websocket_protocol_in_use == JSON
    client.sendClose(1000)
    await within(reactor, client.lost, 10)


@pytest_twisted.ensureDeferred
async def test_a_bad_token_is_an_error_and_a_close(reactor: Any, node: Daemon) -> None:
    url = f"ws://127.0.0.1:{node.ports['ws']}/"
    client = await within(reactor, connect(reactor, url, (JSON,)), 10)
    client.send(Frame(cmd=Command.LOGIN_REQUEST, request_id=1, req_msg="x", token="no"))
    error = await within(reactor, client.frame(), 10)
    assert error.cmd == Command.ERROR
    code, _ = await within(reactor, client.lost, 10)
    assert code == 1008


# A cluster server: the gateway by option, with its limits


@pytest_twisted.async_yield_fixture
async def cluster(
    reactor: Any, tmp_path: Path, redis_url: str, zk_url: str
) -> AsyncIterator[Cluster]:
    processes = Processes(tmp_path, reactor)
    redis = f"redis://{urlsplit(redis_url).netloc}/12"
    registry = f"zk://{urlsplit(zk_url).netloc}/cimws-{uuid.uuid4().hex[:8]}"
    cluster = Cluster(
        processes,
        tmp_path,
        redis,
        registry,
        SECRET,
        server_args=[
            "--ws-port",
            "0",
            "--max-frame",
            "4096",
            "--heartbeat-timeout",
            "2",
        ],  # fmt: skip
    )
    try:
        await cluster.start(servers=1)
        yield cluster
    finally:
        processes.stop_all()


@pytest_twisted.ensureDeferred
async def test_a_cluster_server_gateway(reactor: Any, cluster: Cluster) -> None:
    [server] = cluster.servers.values()
    suffix = _names()
    ws, _, reply = await ws_login(reactor, cluster.url, f"cat{suffix}")
    assert reply["wsUrl"] == f"ws://127.0.0.1:{server.daemon.ports['ws']}/"
    # CIM's own fields are intact.
    assert (reply["ip"], reply["cimServerPort"], reply["httpPort"]) == (
        "127.0.0.1",
        server.port,
        server.http_port,
    )
    # WebSocket pings keep the connection past the heartbeat timeout (2 s).
    for _ in range(8):
        ws.sendPing(b"beat")
        assert await within(reactor, ws.pongs.get(), 5) == b"beat"
        await deferLater(reactor, 0.5, lambda: None)
    assert not ws.lost.called
    # A message over --max-frame: an error frame, then 1009.
    ws.sendMessage(b"\x00" * 5000, isBinary=True)
    error = await within(reactor, ws.frame(), 10)
    assert error.error_code == ErrorCode.FRAME_TOO_LONG
    code, _ = await within(reactor, ws.lost, 10)
    assert code == 1009

    # A silent one is closed after the heartbeat timeout.
    silent, _, _ = await ws_login(reactor, cluster.url, f"dan{suffix}", JSON)
    error = await within(reactor, silent.frame(), 10)
    assert error.error_code == ErrorCode.LOGIN_TIMEOUT
    code, _ = await within(reactor, silent.lost, 10)
    assert code == 1008


# wss with the development CA


@pytest_twisted.async_yield_fixture
async def tls_node(
    reactor: Any, tmp_path: Path, certs: DevCerts
) -> AsyncIterator[Daemon]:
    processes = Processes(tmp_path, reactor)
    ssl = (
        "ssl:{port}:interface=127.0.0.1:"
        + f"privateKey={certs.key}:certKey={certs.cert}"
    )
    daemon = Daemon(
        "node",
        "cim-standalone",
        ["--secret", SECRET, "--host", "localhost"],
        tmp_path,
        processes,
        listen={"ws-port": ssl},
    )
    try:
        daemon.start()
        await daemon.wait_ready(reactor)
        yield daemon
    finally:
        processes.stop_all()


@pytest_twisted.ensureDeferred
async def test_wss_with_the_development_ca(
    reactor: Any, tls_node: Daemon, certs: DevCerts, tmp_path: Path
) -> None:
    assert "(TLS: WebSocket)" in tls_node.log_text()
    route = tls_node.url()
    suffix = _names()
    ws, _, reply = await ws_login(reactor, route, f"eve{suffix}", JSON, str(certs.ca))
    assert reply["wsUrl"] == f"wss://localhost:{tls_node.ports['ws']}/"
    ws.send(Frame(cmd=Command.PING, req_msg="ping"))
    pong = await within(reactor, ws.frame_of(Command.PING), 10)
    assert pong.req_msg == "pong"
    ws.sendClose(1000)
    await within(reactor, ws.lost, 10)
    # Without the CA, the certificate does not verify.
    with pytest.raises(HandshakeRefused, match="certificate verify failed"):
        await within(reactor, connect(reactor, reply["wsUrl"], (JSON,)), 10)
    # Nor with a CA whose certificate is for another name.
    other = make_dev_certs(tmp_path / "other", ("cim.invalid",))
    with pytest.raises(HandshakeRefused, match="certificate verify failed"):
        await within(
            reactor,
            connect(reactor, reply["wsUrl"], (JSON,), ca_file=str(other.ca)),
            10,
        )


# The service, in process: the gateway's own connection caps


@pytest_twisted.ensureDeferred
async def test_the_gateway_counts_connections_per_address(reactor: Any) -> None:
    from twisted.internet.defer import succeed

    from cim.limits_net import NetLimits
    from cim.registry.local import LocalBoard, LocalRegistry
    from cim.server.service import IMServerService, ServerConfig
    from cim.store.memory import MemoryStore

    service = IMServerService(
        reactor,
        ServerConfig(
            port=0,
            http_port=0,
            ws_port=0,
            bind="127.0.0.1",
            secret=SECRET,
            limits=NetLimits(per_address=2),
        ),
        lambda: succeed(MemoryStore(reactor)),
        LocalRegistry(LocalBoard()),
    )
    service.startService()
    clients: list[WsClient] = []
    try:
        await within(reactor, service.ready, 10)
        address = service.address
        assert address is not None and address.ws_url is not None
        assert service.factories["ws"].per_address == 2
        for _ in range(2):
            clients.append(await within(reactor, connect(reactor, address.ws_url), 10))
        # The third from the same address is refused before its handshake.
        with pytest.raises(HandshakeRefused):
            await within(reactor, connect(reactor, address.ws_url), 10)
        assert service.factories["ws"].refused == 1
        # The TCP client port counts its own.
        assert service.factories["clients"].peers == {}
    finally:
        for client in clients:
            client.sendClose(1000)
            await within(reactor, client.lost, 10)
        await service.stopService()
