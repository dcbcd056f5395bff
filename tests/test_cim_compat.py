"""
CIM's own client works against cim unchanged: everything a CIM client gets
is read here as strictly as CIM's client reads it (L{tests.cimstrict}).

The IM server is driven in memory (L{tests.serverkit}), the route through
L{StubTreq} (L{tests.test_route.Route}); C{test_cim_client_end_to_end} does
the whole flow of CIM's client against a real standalone node.
"""

from __future__ import annotations

import json
import socket
import struct
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cim.codec import decode, encode_framed
from cim.interfaces import NewMessage
from cim.message import BROADCAST, ChatMessage, Command, Frame, pair_conversation
from tests.cimstrict import CimHandler, StrictDecodeError, decode_reply
from tests.kit.cluster import Daemon
from tests.serverkit import Peer, World
from tests.test_route import Route

# The IM server: what a CIM connection receives


class CimPeer:
    """
    A CIM client's connection: it logs in without a token, as CIM's client
    does, and every frame it receives goes through CIM's handler rules.
    """

    def __init__(self, world: World, name: str) -> None:
        existing = world.result(world.store.get_account_by_name(name))
        self.user_id: int = (
            existing.user_id  # type: ignore[attr-defined]
            if existing
            else world.account(name)
        )
        self.name = name
        self.world = world
        self.handler = CimHandler(self.user_id)
        self.peer = self.login()

    def login(self) -> Peer:
        """
        Log in again as CIM's client does: the route assigns the session
        (C{/login}), then the TCP login.
        """
        self.world.token(self.user_id, self.name)
        self.peer = Peer(self.world.server)
        self.peer.send(
            Frame(cmd=Command.LOGIN_REQUEST, request_id=self.user_id, req_msg=self.name)
        )
        return self.peer

    def read(self) -> list[str]:
        """
        The texts received since the last call.
        """
        before = len(self.handler.received)
        for frame in self.peer.received():
            self.handler.handle(frame)
        return self.handler.texts()[before:]

    def commands(self) -> list[Command]:
        return [cmd for cmd, _, _ in self.handler.received]

    def ping(self) -> None:
        self.peer.send(Frame(cmd=Command.PING, req_msg="ping"))


def cim_world() -> World:
    return World(legacy_login=True)


def test_private_messages_carry_the_receivers_properties() -> None:
    world = cim_world()
    alice_peer, alice = world.login("alice")
    bob = CimPeer(world, "bob")
    alice_peer.send(
        Frame(cmd=Command.MESSAGE, req_msg="hi bob", receive_user_id=bob.user_id)
    )
    alice_peer.send(
        Frame(cmd=Command.MESSAGE, batch=["one", "two"], receive_user_id=bob.user_id)
    )
    assert bob.read() == ["hi bob", "one", "two"]
    assert {sender for _, sender, _ in bob.handler.received} == {alice}


def test_offline_replay_carries_each_senders_and_the_receivers_properties() -> None:
    world = cim_world()
    alice_peer, alice = world.login("alice")
    carol_peer, carol = world.login("carol")
    bob = world.account("bob")
    alice_peer.send(
        Frame(cmd=Command.MESSAGE, req_msg="from alice", receive_user_id=bob)
    )
    carol_peer.send(Frame(cmd=Command.MESSAGE, batch=["c1", "c2"], receive_user_id=bob))
    alice_peer.send(
        Frame(cmd=Command.MESSAGE, req_msg="alice again", receive_user_id=bob)
    )
    cim_bob = CimPeer(world, "bob")
    # Replayed one conversation after the other (each in order).
    assert cim_bob.read() == ["from alice", "alice again", "c1", "c2"]
    assert cim_bob.handler.received == [
        (Command.OFFLINE, alice, "from alice"),
        (Command.OFFLINE, alice, "alice again"),
        (Command.OFFLINE, carol, "c1"),
        (Command.OFFLINE, carol, "c2"),
    ]


def test_group_messages_carry_each_receivers_own_properties() -> None:
    world = cim_world()
    alice_peer, alice = world.login("alice")
    bob_id = world.account("bob")
    carol_id = world.account("carol")
    world.result(world.store.create_group("team", alice))
    world.result(world.store.join_group("team", bob_id))
    world.result(world.store.join_group("team", carol_id))
    bob, carol = CimPeer(world, "bob"), CimPeer(world, "carol")
    alice_peer.send(Frame(cmd=Command.MESSAGE, req_msg="hello team", group_id="team"))
    # One message, encoded for each CIM receiver with its own receiveUserId.
    assert bob.read() == ["hello team"]
    assert carol.read() == ["hello team"]
    # Offline group messages too.
    bob.ping()
    bob.peer.lose()
    alice_peer.send(Frame(cmd=Command.MESSAGE, req_msg="while away", group_id="team"))
    bob.login()
    assert bob.read() == ["while away"]
    assert bob.commands()[-1] == Command.OFFLINE


def test_broadcasts_carry_each_receivers_own_properties() -> None:
    world = cim_world()
    bob, carol = CimPeer(world, "bob"), CimPeer(world, "carol")
    alice = world.account("alice")
    message = ChatMessage(
        msg_id=1,
        conversation=BROADCAST,
        seq=0,
        sender_id=alice,
        sender_name="alice",
        text="to everybody",
        timestamp=1,
    )
    assert world.server.deliver_local([message], [bob.user_id, carol.user_id]) == []
    assert bob.read() == ["to everybody"]
    assert carol.read() == ["to everybody"]


def test_heartbeat_timeout_closes_a_cim_client_without_a_frame_it_cannot_read() -> None:
    world = cim_world()
    bob = CimPeer(world, "bob")
    bob.ping()
    assert bob.read() == [] and bob.handler.pongs == 1
    world.clock.advance(31)
    world.clock.advance(11)
    assert bob.peer.received() == []
    assert bob.peer.closed


def test_kick_and_shutdown_close_a_cim_client_without_a_frame() -> None:
    world = cim_world()
    bob, carol = CimPeer(world, "bob"), CimPeer(world, "carol")
    kicked = world.result(world.server.kick_user(bob.user_id, "", "replaced"))
    assert kicked is True
    assert bob.peer.received() == [] and bob.peer.closed
    world.server.stop()
    assert carol.peer.received() == [] and carol.peer.closed


def test_refused_cim_logins_are_closed_without_a_frame() -> None:
    world = cim_world()
    bob = world.account("bob")
    world.token(bob, "bob")
    for frame in [
        Frame(cmd=Command.LOGIN_REQUEST, request_id=bob, req_msg="not bob"),
        Frame(cmd=Command.LOGIN_REQUEST, request_id=0, req_msg="bob"),
        Frame(cmd=Command.LOGIN_REQUEST, request_id=bob + 1000, req_msg="ghost"),
    ]:
        peer = Peer(world.server)
        peer.send(frame)
        assert peer.received() == [] and peer.closed, frame


def test_a_cim_client_that_sends_chat_over_tcp_is_closed_without_an_error() -> None:
    world = cim_world()
    alice = world.account("alice")
    bob = CimPeer(world, "bob")
    bob.peer.send(Frame(cmd=Command.MESSAGE, req_msg="hi", receive_user_id=alice))
    assert bob.peer.received() == [] and bob.peer.closed
    assert (
        world.result(world.store.read(pair_conversation(alice, bob.user_id), 0, 10))
        == []
    )


def test_push_api_frames_are_completed_for_a_cim_client() -> None:
    world = cim_world()
    bob = CimPeer(world, "bob")
    assert world.server.send_raw(bob.user_id, Frame(cmd=Command.MESSAGE, req_msg="sys"))
    assert bob.read() == ["sys"]
    assert world.server.send_raw(
        bob.user_id,
        Frame(
            cmd=Command.MESSAGE,
            req_msg="from 7",
            properties={"sendUserId": "7", "sendUserName": "seven"},
        ),
    )
    assert bob.read() == ["from 7"] and bob.handler.received[-1][1] == 7
    for frame in [
        Frame(cmd=Command.ERROR, req_msg="x"),
        Frame(cmd=Command.MESSAGE, req_msg="x", properties={"sendUserId": "bob"}),
    ]:
        with pytest.raises(ValueError):
            world.server.send_raw(bob.user_id, frame)
    assert bob.read() == []


def test_strict_handler_refuses_what_cim_cannot_read() -> None:
    handler = CimHandler(5)
    props = {"sendUserId": "1", "sendUserName": "a", "receiveUserId": "5"}
    handler.handle(
        Frame(cmd=Command.MESSAGE, req_msg="ok", request_id=5, properties=props)
    )
    for frame in [
        Frame(cmd=Command.ERROR, req_msg="x"),
        Frame(cmd=Command.MESSAGE, req_msg="x", request_id=5),
        Frame(
            cmd=Command.MESSAGE,
            req_msg="x",
            request_id=5,
            properties={**props, "receiveUserId": "6"},
        ),
        Frame(cmd=Command.MESSAGE, req_msg="x", request_id=0, properties=props),
        Frame(cmd=Command.MESSAGE, req_msg="x", request_id=5, properties=props, seq=3),
    ]:
        with pytest.raises(StrictDecodeError):
            handler.handle(frame)
    assert handler.texts() == ["ok"]


# What CIM clients receive again: nothing after an ordinary end, everything
# after an abnormal one.


def _sent_to(world: World, bob: CimPeer, text: str) -> None:
    sender, _ = world.login(f"sender-{text}")
    sender.send(Frame(cmd=Command.MESSAGE, req_msg=text, receive_user_id=bob.user_id))


def test_no_duplicate_after_a_clean_close_before_the_next_heartbeat() -> None:
    world = cim_world()
    bob = CimPeer(world, "bob")
    _sent_to(world, bob, "once")
    assert bob.read() == ["once"]
    bob.peer.lose(clean=True)  # the client quit within a heartbeat
    bob.login()
    assert bob.read() == []
    _sent_to(world, bob, "next")
    assert bob.read() == ["next"]


def test_no_duplicate_after_log_off() -> None:
    world = cim_world()
    bob = CimPeer(world, "bob")
    _sent_to(world, bob, "once")
    assert bob.read() == ["once"]
    # CIM's /offLine: the route releases the session and has it kicked.
    session = world.result(world.store.get_session(bob.user_id))
    world.result(world.store.release_session(bob.user_id, session.session_id))  # type: ignore[attr-defined]
    world.result(world.server.kick_user(bob.user_id, "", "logged off", True))
    bob.login()
    assert bob.read() == []


def test_no_duplicate_after_a_heartbeat() -> None:
    world = cim_world()
    bob = CimPeer(world, "bob")
    _sent_to(world, bob, "once")
    assert bob.read() == ["once"]
    bob.ping()
    bob.read()
    bob.peer.lose(clean=False)
    world.clock.advance(2)  # the sweep saves the cursors
    bob.login()
    assert bob.read() == []


def test_sent_again_after_an_abnormal_loss() -> None:
    world = cim_world()
    bob = CimPeer(world, "bob")
    _sent_to(world, bob, "maybe lost")
    assert bob.read() == ["maybe lost"]
    bob.peer.lose(clean=False)  # reset before any heartbeat: not proven
    bob.login()
    assert bob.read() == ["maybe lost"]
    assert bob.commands()[-1] == Command.OFFLINE


def test_sent_again_after_a_heartbeat_timeout() -> None:
    world = cim_world()
    bob = CimPeer(world, "bob")
    _sent_to(world, bob, "maybe lost")
    assert bob.read() == ["maybe lost"]
    world.clock.advance(42)
    assert bob.peer.closed
    bob.peer.lose(clean=True)  # closed by the server, not by the client
    bob.login()
    assert bob.read() == ["maybe lost"]


# The route: CIM's endpoints answer exactly CIM's fields


def cim_call(
    route: Route, path: str, body: Any = None, method: str = "POST"
) -> dict[str, Any]:
    """
    Call C{path} as CIM's client does (no cim header, no credentials) and
    decode the reply as it does.
    """
    _, raw = route.request(method, path, body, extended=False)
    return decode_reply(path, raw)


def test_every_cim_endpoint_answers_exactly_cims_fields() -> None:
    route = Route(legacy_auth=True)
    alice = cim_call(route, "/registerAccount", {"userName": "alice"})["dataBody"][
        "userId"
    ]
    bob = cim_call(route, "/registerAccount", {"userName": "bob", "reqNo": "r1"})
    assert bob["reqNo"] == "r1"
    bob = bob["dataBody"]["userId"]
    login = cim_call(route, "/login", {"userId": alice, "userName": "alice"})
    assert login["code"] == "9000"
    assert set(login["dataBody"]) == {"ip", "cimServerPort", "httpPort"}
    route.connect(alice)
    # To an offline receiver: 7000, and still CIM's empty body.
    offline = cim_call(
        route, "/p2pRoute", {"userId": alice, "receiveUserId": bob, "msg": "hi"}
    )
    assert (offline["code"], offline["dataBody"]) == ("7000", None)
    cim_call(route, "/login", {"userId": bob, "userName": "bob"})
    route.connect(bob)
    online = cim_call(
        route, "/p2pRoute", {"userId": alice, "receiveUserId": bob, "msg": "hi"}
    )
    assert (online["code"], online["dataBody"]) == ("9000", None)
    batch = cim_call(
        route,
        "/p2pRoute",
        {"userId": alice, "receiveUserId": bob, "batchMsg": ["a", "b"]},
    )
    assert batch["code"] == "9000"
    assert (
        cim_call(route, "/groupRoute", {"userId": alice, "msg": "all"})["code"]
        == "9000"
    )
    users = cim_call(route, "/onlineUser", method="GET")["dataBody"]
    assert sorted(u["userId"] for u in users) == sorted([alice, bob])
    assert (
        cim_call(route, "/fetchOfflineMsgs", {"receiveUserId": bob})["code"] == "9000"
    )
    repeat = cim_call(route, "/login", {"userId": alice, "userName": "alice"})
    assert (repeat["code"], repeat["dataBody"]) == ("5000", None)
    assert (
        cim_call(route, "/offLine", {"userId": alice, "msg": "offLine"})["code"]
        == "9000"
    )
    assert route.pusher.logged_off == [alice]
    # CIM answers 9000 to /fetchOfflineMsgs whether or not the user is
    # connected.
    assert (
        cim_call(route, "/fetchOfflineMsgs", {"receiveUserId": alice})["code"] == "9000"
    )
    mismatch = cim_call(route, "/login", {"userId": alice, "userName": "bob"})
    assert mismatch["code"] == "9100"


def test_cims_own_clients_ask_for_the_extended_replies() -> None:
    route = Route(legacy_auth=True)
    alice = route.register("alice")
    bob = route.register("bob")
    login = route.ok("/login", {"userId": alice, "userName": "alice"})
    assert set(login) == {
        "ip",
        "cimServerPort",
        "httpPort",
        "token",
        "userId",
        "userName",
        "device",
    }
    with pytest.raises(StrictDecodeError):
        decode_reply(
            "/login",
            route.request("POST", "/login", {"userId": bob, "userName": "bob"})[1],
        )
    route.connect(alice)
    body = {"userId": alice, "receiveUserId": bob, "msg": "hi"}
    answer = route.call("/p2pRoute", body, token=login["token"])
    assert answer["code"] == "7000" and set(answer["dataBody"]) == {"msgId", "seq"}
    carol = route.register("carol")
    carols = route.login(carol, "carol")["token"]
    assert (
        route.code("/fetchOfflineMsgs", {"receiveUserId": carol}, token=carols)
        == "7000"
    )


def test_the_openapi_document_names_the_extended_header() -> None:
    route = Route()
    _, raw = route.request("GET", "/openapi.json")
    paths = json.loads(raw)["paths"]
    for path in ["/registerAccount", "/login", "/p2pRoute", "/fetchOfflineMsgs"]:
        [parameter] = paths[path]["post"]["parameters"]
        assert parameter["name"] == "X-Cim-Extended"
    assert "parameters" not in paths["/history"]["post"]


# The whole flow of CIM's client, against a real standalone node


class BlockingCimClient:
    """
    What CIM's client SDK does, on plain sockets: the route's HTTP API
    without any cim header or credential, and a TCP connection that logs
    in with the user's id and name.  Every reply and frame is read as
    strictly as CIM's client reads it.
    """

    def __init__(self, route_port: int, name: str) -> None:
        self.route = f"http://127.0.0.1:{route_port}"
        self.name = name
        self.user_id = self.http("/registerAccount", {"userName": name})["dataBody"][
            "userId"
        ]
        self.handler = CimHandler(self.user_id)
        self.sock: socket.socket | None = None
        self.buffer = b""

    def http(self, path: str, body: Any = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.route + path,
            data=data,
            headers={"Content-Type": "application/json"},
            method="GET" if body is None else "POST",
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            return decode_reply(path, reply.read())

    def login(self) -> str:
        """
        C{/login} (retried while the previous session is being released, as
        the SDK's reconnect does), then the TCP login.  @return: the code.
        """
        body = {"userId": self.user_id, "userName": self.name}
        deadline = time.monotonic() + DEADLINE
        answer = self.http("/login", body)
        while answer["code"] == "5000" and time.monotonic() < deadline:
            time.sleep(0.05)
            answer = self.http("/login", body)
        if answer["code"] != "9000":
            return str(answer["code"])
        server = answer["dataBody"]
        self.sock = socket.create_connection(
            (server["ip"], server["cimServerPort"]), timeout=DEADLINE
        )
        self.send(
            Frame(Command.LOGIN_REQUEST, request_id=self.user_id, req_msg=self.name)
        )
        return "9000"

    def send(self, frame: Frame) -> None:
        assert self.sock is not None
        self.sock.sendall(encode_framed(frame))

    def frame(self) -> Frame:
        """
        The next frame (waiting up to the deadline), through CIM's handler.
        """
        assert self.sock is not None
        while True:
            length, used = _varint(self.buffer)
            if used and len(self.buffer) >= used + length:
                frame = decode(self.buffer[used : used + length])
                self.buffer = self.buffer[used + length :]
                self.handler.handle(frame)
                return frame
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"{self.name}: the server closed the connection")
            self.buffer += data

    def texts(self, count: int) -> list[str]:
        before = len(self.handler.received)
        while len(self.handler.received) < before + count:
            self.frame()
        return self.handler.texts()[before:]

    def ping(self) -> None:
        self.send(Frame(Command.PING, req_msg="ping"))
        pongs = self.handler.pongs
        while self.handler.pongs == pongs:
            self.frame()

    def close(self, reset: bool = False) -> None:
        assert self.sock is not None
        if reset:  # a crash with data unread: RST, not FIN
            self.sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        self.sock.close()
        self.sock, self.buffer = None, b""

    def p2p(self, receiver: BlockingCimClient, text: str) -> str:
        body = {"userId": self.user_id, "receiveUserId": receiver.user_id, "msg": text}
        return str(self.http("/p2pRoute", body)["code"])


def _varint(data: bytes) -> tuple[int, int]:
    """
    The varint at the start of C{data} and its size (0 when incomplete).
    """
    value = shift = 0
    for i, byte in enumerate(data[:5]):
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    return 0, 0


DEADLINE = 10.0


@pytest.fixture
def cim_node(tmp_path: Path) -> Iterator[int]:
    """
    C{twistd cim-standalone --legacy-login --legacy-auth}, as CIM's users run
    it; @return: the route's port.
    """
    daemon = Daemon(
        "standalone",
        "cim-standalone",
        ["--legacy-login", "--legacy-auth"],
        tmp_path,
    )
    try:
        daemon.start()
        yield daemon.wait_ready_blocking()["route"]
        log = daemon.log_text()
        assert "Unhandled" not in log and "Traceback" not in log, log[-5000:]
    finally:
        daemon.stop_blocking()


@pytest.mark.integration
def test_cim_client_end_to_end(cim_node: int) -> None:
    alice = BlockingCimClient(cim_node, "alice")
    bob = BlockingCimClient(cim_node, "bob")
    carol = BlockingCimClient(cim_node, "carol")
    assert alice.login() == "9000" and bob.login() == "9000"
    alice.ping()
    bob.ping()
    # Private chat, one text and a batch.
    assert alice.p2p(bob, "hi bob") == "9000"
    assert bob.texts(1) == ["hi bob"]
    batch = {
        "userId": alice.user_id,
        "receiveUserId": bob.user_id,
        "batchMsg": ["a", "b"],
    }
    assert alice.http("/p2pRoute", batch)["code"] == "9000"
    assert bob.texts(2) == ["a", "b"]
    # CIM's group chat: everybody online but the sender.
    assert (
        alice.http("/groupRoute", {"userId": alice.user_id, "msg": "all"})["code"]
        == "9000"
    )
    assert bob.texts(1) == ["all"]
    online = alice.http("/onlineUser")["dataBody"]
    assert sorted(u["userName"] for u in online) == ["alice", "bob"]
    # A repeat login is refused with 5000, the session stays.
    repeat = alice.http("/login", {"userId": alice.user_id, "userName": "alice"})
    assert (repeat["code"], repeat["dataBody"]) == ("5000", None)
    # To an offline user: 7000, delivered at its login as OFFLINE.
    assert alice.p2p(carol, "while you were away") == "7000"
    assert carol.login() == "9000"
    assert carol.texts(1) == ["while you were away"]
    assert carol.handler.received[-1][0] == Command.OFFLINE
    assert (
        carol.http("/fetchOfflineMsgs", {"receiveUserId": carol.user_id})["code"]
        == "9000"
    )
    # Log off, log in again: nothing comes back twice.
    assert (
        bob.http("/offLine", {"userId": bob.user_id, "msg": "offLine"})["code"]
        == "9000"
    )
    bob.close()
    assert (
        bob.http("/fetchOfflineMsgs", {"receiveUserId": bob.user_id})["code"] == "9000"
    )
    assert bob.login() == "9000"
    assert alice.p2p(bob, "after the log-off") == "9000"
    assert bob.texts(1) == ["after the log-off"]
    # Quit within a heartbeat of a message, without /offLine: not again.
    bob.close()
    assert bob.login() == "9000"
    assert alice.p2p(bob, "fresh") == "9000"
    assert bob.texts(1) == ["fresh"]
    bob.ping()  # proves "fresh" arrived
    # A crash (the connection reset) before any heartbeat: sent again.
    assert alice.p2p(bob, "unproven") == "9000"
    assert bob.texts(1) == ["unproven"]
    bob.close(reset=True)
    assert bob.login() == "9000"
    assert bob.texts(1) == ["unproven"]
    assert bob.handler.received[-1][0] == Command.OFFLINE


def test_a_cim_client_never_gets_its_own_private_messages() -> None:
    """
    A private conversation holds both sides, and every device of both users
    gets it; but CIM's client shows whatever it receives as a message from
    someone else, so its own messages (sent through the route's
    C{/p2pRoute}) never reach it.
    """
    world = cim_world()
    alice = CimPeer(world, "alice")
    bob = CimPeer(world, "bob")
    conversation = pair_conversation(alice.user_id, bob.user_id)

    def send(sender: CimPeer, receiver: CimPeer, text: str) -> None:
        stored = world.result(
            world.server.delivery.append(
                NewMessage.of_send(
                    conversation,
                    sender.user_id,
                    sender.name,
                    [text],
                    "",
                    receive_user_id=receiver.user_id,
                )
            )
        )
        world.result(
            world.server.delivery.deliver(stored, [sender.user_id, receiver.user_id])
        )

    send(alice, bob, "from alice")
    send(bob, alice, "from bob")
    send(alice, bob, "again from alice")
    assert alice.read() == ["from bob"]
    assert bob.read() == ["from alice", "again from alice"]
    # Logging in again replays nothing of its own either: only what the
    # other side sent meanwhile.
    alice.ping()
    alice.peer.lose()
    send(alice, bob, "while alice was away")
    send(bob, alice, "to alice while away")
    alice.login()
    assert alice.read() == ["to alice while away"]
