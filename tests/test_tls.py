"""
TLS on every listener (issue 16): the listening options (a port number or
a Twisted endpoint description), the registry address's TLS flags, and a
real C{cim-standalone} with TLS on its route and client port, certificates
made by L{cim.devcerts}, and library clients that verify them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from twisted.python import usage

from cim.client import tap as client_tap
from cim.client.library import Client, LoginError, QueueListener
from cim.devcerts import DevCerts, make_dev_certs
from cim.interfaces import ServerAddress
from cim.listen import is_tls, listen_option
from cim.route import tap as route_tap
from cim.server import tap as server_tap
from cim.standalone import Options as StandaloneOptions
from cim.web import http_client
from tests.kit.cluster import Daemon, Processes
from tests.kit.wait import wait_until, within

SECRET = "tls-test-secret"
#: The Redis database of the cluster test (users have names of their own).
REDIS_DB = 13


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    # For localhost only: 127.0.0.1 is this machine too, but a name the
    # certificate is not for.
    return make_dev_certs(tmp_path_factory.mktemp("certs"), ("localhost",))


def ssl_listen(certs: DevCerts, port: object = 0) -> str:
    return f"ssl:{port}:interface=127.0.0.1:privateKey={certs.key}:certKey={certs.cert}"


# Parsing the listening options


def test_a_number_is_a_port() -> None:
    parse = listen_option("port")
    assert parse("11211") == 11211
    assert parse(" 0 ") == 0


def test_an_endpoint_description_is_kept(certs: DevCerts) -> None:
    parse = listen_option("port")
    assert parse("tcp:11211:interface=127.0.0.1") == "tcp:11211:interface=127.0.0.1"
    description = ssl_listen(certs, 11211)
    assert parse(description) == description
    assert is_tls(description)
    assert not is_tls("tcp:11211") and not is_tls(11211)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("70000", "between 0 and 65535"),
        ("nope:1", "Unknown endpoint type: 'nope'"),
        ("tcp:abc", "invalid literal"),
        ("ssl:1:privateKey=/no/such/key.pem:certKey=/no/such.pem", "No such file"),
        ("", "a port number or an endpoint"),
    ],
)
def test_a_bad_listener_is_a_usage_error(text: str, reason: str) -> None:
    with pytest.raises(usage.UsageError) as e:
        listen_option("http-port")(text)
    assert "--http-port" in str(e.value)
    assert reason in str(e.value)


def test_the_daemons_take_endpoints(certs: DevCerts) -> None:
    ssl = ssl_listen(certs)
    server = server_tap.Options()
    server.parseOptions(
        [
            "--secret",
            SECRET,
            "--port",
            ssl,
            "--http-port",
            ssl,
            "--ca-file",
            str(certs.ca),
        ]
    )
    config = server_tap.config_from(server)
    assert (config.port, config.http_port, config.ca_file) == (ssl, ssl, str(certs.ca))
    route = route_tap.Options()
    route.parseOptions(["--secret", SECRET, "--port", ssl])
    assert route_tap.config_from(route).port == ssl
    standalone = StandaloneOptions()
    standalone.parseOptions(["--route-port", ssl, "--port", "0", "--http-port", "9"])
    assert (standalone["route-port"], standalone["port"]) == (ssl, 0)
    # The defaults stay numbers: TCP on --bind.
    defaults = StandaloneOptions()
    defaults.parseOptions([])
    assert (defaults["port"], defaults["route-port"]) == (11211, 8083)


def test_a_bad_endpoint_stops_the_daemon_before_it_starts() -> None:
    with pytest.raises(usage.UsageError, match="--port must be a port number or"):
        server_tap.Options().parseOptions(["--secret", SECRET, "--port", "sll:1"])


@pytest.mark.parametrize(
    "options", [server_tap.Options, route_tap.Options, StandaloneOptions]
)
def test_an_unreadable_ca_file_is_a_usage_error(options: Any, tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("no certificate here")
    for path, reason in [(tmp_path / "none.pem", "cannot read"), (empty, "no PEM")]:
        with pytest.raises(usage.UsageError, match=f"--ca-file: .*{reason}"):
            options().parseOptions(["--secret", SECRET, "--ca-file", str(path)])


def test_the_console_takes_https_and_a_ca_file(certs: DevCerts) -> None:
    options = client_tap.Options()
    options.parseOptions(
        ["--user", "a", "--route", "https://x:8083", "--ca-file", str(certs.ca)]
    )
    assert options["ca-file"] == str(certs.ca)
    with pytest.raises(usage.UsageError, match="--ca-file"):
        client_tap.Options().parseOptions(["--user", "a", "--ca-file", "/no/ca.pem"])


# The registry address


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (ServerAddress("10.0.0.1", 11211, 8081), "10.0.0.1:11211:8081"),
        (ServerAddress("10.0.0.1", 11211, 8081, tls=True), "10.0.0.1:11211:8081:tls"),
        (ServerAddress("h", 1, 2, https=True), "h:1:2:https"),
        (ServerAddress("h", 1, 2, True, True), "h:1:2:tls+https"),
        (ServerAddress("::1", 1, 2, tls=True), "::1:1:2:tls"),
        (ServerAddress("::1", 1, 2), "::1:1:2"),
    ],
)
def test_the_address_carries_the_tls_flags(address: ServerAddress, text: str) -> None:
    assert str(address) == text
    assert ServerAddress.parse(text) == address
    # CIM's route reads the first three fields only.
    if "::" not in text:
        ip, port, http_port = text.split(":")[:3]
        assert (ip, int(port), int(http_port)) == (
            address.host,
            address.port,
            address.http_port,
        )


def test_the_push_url_follows_the_flag() -> None:
    assert ServerAddress("h", 1, 2).push_url == "http://h:2"
    assert ServerAddress("h", 1, 2, https=True).push_url == "https://h:2"
    assert ServerAddress("::1", 1, 2).push_url == "http://[::1]:2"
    with pytest.raises(ValueError, match="unknown flags"):
        ServerAddress.parse("h:1:2:gopher")


# A real node with TLS


@pytest_twisted.async_yield_fixture
async def node(reactor: Any, tmp_path: Path, certs: DevCerts) -> AsyncIterator[Daemon]:
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
        listen={"port": ssl, "route-port": ssl},
    )
    try:
        daemon.start()
        await daemon.wait_ready(reactor)
        yield daemon
    finally:
        processes.stop_all()


async def _refused(reactor: Any, client: Client, name: str) -> str:
    try:
        with pytest.raises(LoginError) as e:
            await within(reactor, client.login(name), 10)
        return str(e.value)
    finally:
        await client.close()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_clients_chat_over_tls(
    reactor: Any, node: Daemon, certs: DevCerts, tmp_path: Path
) -> None:
    route = f"https://localhost:{node.ports['route']}"
    assert "(TLS: clients)" in node.log_text()
    assert "; TLS)" in node.log_text()
    ca = str(certs.ca)
    alice_events, bob_events = QueueListener(), QueueListener()
    alice = Client(reactor, route, listener=alice_events, ca_file=ca)
    bob = Client(reactor, route, listener=bob_events, ca_file=ca)
    try:
        await within(reactor, alice.login("alice"), 10)
        await within(reactor, bob.login("bob"), 10)
        for client in (alice, bob):
            protocol = client._session.protocol
            assert protocol is not None and protocol.handshake is not None
            assert protocol.handshake.called
        assert bob.user_id is not None
        ack = await within(
            reactor, alice.send_private(bob.user_id, "hello over TLS"), 10
        )
        assert ack.seq >= 1
        message = await within(reactor, bob_events.messages.get(), 10)
        assert message.text == "hello over TLS"
    finally:
        await alice.close()
        await bob.close()

    # Without the CA, the route's certificate does not verify.
    reason = await _refused(reactor, Client(reactor, route), "eve")
    assert "cannot reach the route" in reason
    assert "certificate does not verify" in reason

    # A name the certificate is not for.
    other = make_dev_certs(tmp_path / "other", ("cim.invalid",))
    reason = await _refused(
        reactor, Client(reactor, route, ca_file=str(other.ca)), "mallory"
    )
    assert "certificate does not verify" in reason

    # The route verifies, but the IM server's certificate is checked too.
    http, pool = http_client(reactor, ca_file=ca)
    try:
        client = Client(reactor, route, http=http, ca_file=str(other.ca))
        reason = await _refused(reactor, client, "trudy")
    finally:
        await pool.closeCachedConnections()
    assert "IM server localhost" in reason and "over TLS" in reason
    assert "certificate does not verify" in reason

    # An address the certificate is not for.
    route = f"https://127.0.0.1:{node.ports['route']}"
    reason = await _refused(reactor, Client(reactor, route, ca_file=ca), "carol")
    assert "its certificate is not for 127.0.0.1" in reason, reason


# A cluster whose push APIs speak https


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_the_push_api_is_called_over_https(
    reactor: Any, tmp_path: Path, certs: DevCerts, redis_url: str, zk_url: str
) -> None:
    """
    One route and two servers, every port with TLS: a message from a client
    of one server reaches a client of the other through the https push.
    """
    tls = "ssl:{port}:interface=127.0.0.1:" + (
        f"privateKey={certs.key}:certKey={certs.cert}"
    )
    redis = f"redis://{urlsplit(redis_url).netloc}/{REDIS_DB}"
    registry = f"zk://{urlsplit(zk_url).netloc}/cimtls-{uuid.uuid4().hex[:8]}"
    common = ["--bind", "127.0.0.1", "--store", redis, "--registry", registry,
              "--secret", SECRET, "--ca-file", str(certs.ca)]  # fmt: skip
    processes = Processes(tmp_path, reactor)
    route = Daemon(
        "route",
        "cim-route",
        [*common, "--balancer", "round-robin"],
        tmp_path,
        processes,
        listen={"port": tls},
    )
    servers = [
        Daemon(
            f"server{i}",
            "cim-server",
            [*common, "--host", "localhost"],
            tmp_path,
            processes,
            listen={"port": tls, "http-port": tls},
        )
        for i in (1, 2)
    ]
    try:
        for daemon in [*servers, route]:
            daemon.start()
        for daemon in [*servers, route]:
            await daemon.wait_ready(reactor)
        assert "(TLS: clients, push API)" in servers[0].log_text()
        url = f"https://localhost:{route.ports['route']}"
        events = [QueueListener(), QueueListener()]
        clients = [
            Client(reactor, url, listener=e, ca_file=str(certs.ca)) for e in events
        ]
        try:
            # Round robin: each on its own server (once both are listed).
            async def both_listed() -> bool:
                http, pool = http_client(reactor, ca_file=str(certs.ca))
                try:
                    response = await http.get(f"{url}/health")
                    body = json.loads(await response.content())
                finally:
                    await pool.closeCachedConnections()
                return len(body["dataBody"]["servers"]) == 2

            await wait_until(reactor, both_listed, "both servers listed", 15, 0.1)
            suffix = uuid.uuid4().hex[:8]
            for client, name in zip(clients, ["ann", "ben"], strict=True):
                await within(reactor, client.login(f"{name}{suffix}"), 10)
            alice, bob = clients
            assert alice.server is not None and bob.server is not None
            assert alice.server[1] != bob.server[1]
            assert bob.user_id is not None
            await within(reactor, alice.send_private(bob.user_id, "via https"), 10)
            message = await within(reactor, events[1].messages.get(), 10)
            assert message.text == "via https"
        finally:
            for client in clients:
                await client.close()
    finally:
        processes.stop_all()
