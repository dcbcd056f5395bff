"""
The benchmark's own logic, on in-memory fakes: the raw server forwards
frames (and echoes them to the sender), the load generator counts lost,
duplicated, out-of-order and damaged messages correctly, a sender's own
echo is a delivery to its device, checked like any other, the devices
check finds every missing, doubled or stray delivery, and the soak's plan
and check know two-sided private conversations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from bench.harness import failed, new_row, ws_forms
from bench.loadgen import (
    ACK_SLOTS,
    ECHO,
    NO_DEVICE,
    OWN,
    PEER,
    BenchClient,
    Checker,
    Histogram,
    Ledger,
    Worker,
    WsBenchClient,
    _HTTPConnection,
    check_streams,
    checker_report,
    deliveries_per_message,
    device_name,
    friends_of,
    make_text,
    merge_reports,
    parse_text,
)
from bench.raw_server import RawFactory
from bench.soak import Plan, check
from bench.wsclient import (
    BINARY,
    CLOSE,
    JSON,
    PING,
    PROTO,
    TEXT,
    FrameParser,
    HandshakeError,
    WireError,
    accept_key,
    check_handshake,
    client_frame,
    close_code,
    frame_from_json,
    frame_to_json,
    handshake_request,
    new_key,
)
from cim.codec import (
    CodecError,
    decode,
    decode_json,
    encode,
    encode_framed,
    encode_json,
)
from cim.framing import VarintFrameReceiver
from cim.message import (
    KICK_REPLACED,
    ChatMessage,
    Command,
    Cursor,
    Frame,
    pair_conversation,
)
from cim.server.websocket import WebSocketGateway
from tests.serverkit import World


class Frames(VarintFrameReceiver):
    def __init__(self) -> None:
        super().__init__()
        self.frames: list[bytes] = []

    def frameReceived(self, frame: bytes) -> None:
        self.frames.append(frame)


def written(transport: StringTransport) -> list[Frame]:
    """
    The frames written to C{transport} since the last call.
    """
    splitter = Frames()
    splitter.dataReceived(transport.value())
    transport.clear()
    return [decode(f) for f in splitter.frames]


# The raw server


def raw_client(factory: RawFactory, user_id: int) -> tuple[object, StringTransport]:
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(
        encode_framed(
            Frame(cmd=Command.LOGIN_REQUEST, request_id=user_id, req_msg=f"u{user_id}")
        )
    )
    [answer] = written(transport)
    assert answer.cmd == Command.LOGIN_RESPONSE
    assert answer.request_id == user_id
    return protocol, transport


def test_raw_server_forwards_echoes_and_acknowledges() -> None:
    factory = RawFactory()
    alice, alice_t = raw_client(factory, 1)
    _, bob_t = raw_client(factory, 2)
    body = encode(
        Frame(
            cmd=Command.MESSAGE, receive_user_id=2, req_msg="hello", client_msg_id="7"
        )
    )
    framed = encode_framed(
        Frame(
            cmd=Command.MESSAGE, receive_user_id=2, req_msg="hello", client_msg_id="7"
        )
    )
    # Two frames, fed a byte at a time.
    for byte in framed + framed:
        alice.dataReceived(bytes([byte]))  # type: ignore[attr-defined]
    splitter = Frames()
    splitter.dataReceived(bob_t.value())
    assert splitter.frames == [body, body]
    # The sender gets each message back (its echo), then the ACK.
    back = written(alice_t)
    assert [(f.cmd, f.client_msg_id) for f in back] == [
        (Command.MESSAGE, "7"),
        (Command.ACK, "7"),
    ] * 2
    assert factory.hub.forwarded == 4


def test_raw_server_unknown_receiver_ping_and_logout() -> None:
    factory = RawFactory()
    alice, alice_t = raw_client(factory, 1)
    alice.dataReceived(  # type: ignore[attr-defined]
        encode_framed(
            Frame(
                cmd=Command.MESSAGE, receive_user_id=9, req_msg="x", client_msg_id="1"
            )
        )
        + encode_framed(Frame(cmd=Command.PING, req_msg="ping"))
    )
    error, pong = written(alice_t)
    assert error.cmd == Command.ERROR and error.client_msg_id == "1"
    assert pong.cmd == Command.PING and pong.req_msg == "pong"
    bob, _ = raw_client(factory, 2)
    bob.connectionLost(None)  # type: ignore[attr-defined]
    assert 2 not in factory.hub.users and 1 in factory.hub.users


def test_raw_server_wants_a_login_first() -> None:
    factory = RawFactory()
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(
        encode_framed(Frame(cmd=Command.MESSAGE, receive_user_id=2, req_msg="x"))
    )
    [error] = written(transport)
    assert error.cmd == Command.ERROR


# Texts and checks


def test_text_round_trip_and_damage() -> None:
    text = make_text("p", 12, 34, 5, 1_000_000, 100)
    assert len(text) == 100
    assert parse_text(text, 100) == ("p", 12, "34", 5, 1_000_000, 0)
    second = make_text("p", 12, 34, 5, 1_000_000, 100, device=1)
    assert parse_text(second, 100) == ("p", 12, "34", 5, 1_000_000, 1)
    http = make_text("p", 12, 34, 5, 1_000_000, 100, device=NO_DEVICE)
    assert parse_text(http, 100).device == NO_DEVICE  # type: ignore[union-attr]
    # Another device's padding is not this one's.
    assert parse_text(text[:20] + second[20:], 100) is None
    assert parse_text(text[:-1] + ("a" if text[-1] != "a" else "b"), 100) is None
    assert parse_text(text[:-1], 100) is None
    assert parse_text("hello", 100) is None
    # Another sender's padding is not this one's.
    other = make_text("p", 13, 34, 5, 1_000_000, 100)
    assert parse_text(text[:20] + other[20:], 100) is None
    # A header longer than the size is allowed (no padding).
    assert parse_text(make_text("g", 1, "g" * 50, 1, 1, 10), 10) is not None


def feed(
    checker: Checker,
    receiver: int,
    sender: int,
    seqs: list[int],
    device: int = 0,
    target: int | None = None,
    sending_device: int = 0,
) -> None:
    """
    C{receiver}'s device C{device} gets C{sender}'s (device
    C{sending_device}'s) messages to C{target} (by default C{receiver})
    with these counters.
    """
    to = receiver if target is None else target
    for seq in seqs:
        checker.receive(
            receiver,
            make_text("p", sender, to, seq, 0, 100, sending_device),
            1000,
            device=device,
        )


def test_checker_in_order() -> None:
    checker = Checker(100)
    feed(checker, 2, 1, [1, 2, 3])
    assert (checker.total, checker.duplicates, checker.out_of_order) == (3, 0, 0)
    assert checker.received == {1: 3}


def test_checker_duplicates() -> None:
    checker = Checker(100)
    feed(checker, 2, 1, [1, 2, 2, 1, 3])
    assert (checker.total, checker.duplicates, checker.out_of_order) == (3, 2, 0)


def test_checker_out_of_order() -> None:
    checker = Checker(100)
    feed(checker, 2, 1, [1, 3, 4, 2, 5])
    # 3 and 4 came before 2: two out of order, nothing lost or duplicated.
    assert (checker.total, checker.duplicates, checker.out_of_order) == (5, 0, 2)
    # 3 again, after the gap was filled, and 4 again: duplicates.
    feed(checker, 2, 1, [3])
    checker.receive(2, make_text("p", 1, 2, 6, 0, 100), 1000)
    feed(checker, 2, 1, [6])
    assert (checker.total, checker.duplicates) == (6, 2)


def test_checker_duplicate_of_a_message_ahead_of_a_gap() -> None:
    checker = Checker(100)
    feed(checker, 2, 1, [1, 3, 3])
    assert (checker.total, checker.duplicates, checker.out_of_order) == (2, 1, 1)


def test_checker_streams_are_per_receiver_and_target() -> None:
    checker = Checker(100)
    feed(checker, 2, 1, [1, 2])
    feed(checker, 3, 1, [1, 2])
    checker.receive(2, make_text("g", 1, "grp", 1, 0, 100), 1000)
    checker.receive(3, make_text("g", 1, "grp", 1, 0, 100), 1000)
    assert (checker.total, checker.duplicates, checker.out_of_order) == (6, 0, 0)


def test_checker_damage() -> None:
    checker = Checker(100)
    good = make_text("p", 1, 2, 1, 0, 100)
    checker.receive(2, good[:-1] + "?", 1000)
    checker.receive(2, good, 1000, sender_id=5)  # the server names another sender
    checker.receive(3, good, 1000)  # someone else's private message
    assert (checker.corrupt, checker.misrouted, checker.total) == (2, 1, 0)


# The sender's own echo


def test_an_echo_is_a_delivery_to_the_sending_device() -> None:
    """
    User 1 (device 0) writes to user 2: the message reaches user 2 and
    comes back to device 0 of user 1, each a delivery, each checked.
    """
    checker = Checker(100)
    checker.window = (0, 10_000)
    feed(checker, 2, 1, [1, 2])  # the receiver
    feed(checker, 1, 1, [1, 2], target=2)  # the echo, on the sending device
    assert checker.total == 4
    assert checker.kinds == {PEER: 2, ECHO: 2, OWN: 0}
    assert checker.received == {1: 4}
    assert (checker.misrouted, checker.corrupt, checker.duplicates) == (0, 0, 0)
    # Two messages, each delivered twice: the figures stay comparable.
    assert checker.messages_in_window == checker.messages == 2
    merged = merge_reports([checker_report(checker, Ledger())])
    assert deliveries_per_message(merged) == {
        PEER: 1.0,
        ECHO: 1.0,
        OWN: 0.0,
        "total": 2.0,
    }


def test_an_echo_is_checked_like_any_other_delivery() -> None:
    checker = Checker(100)
    # Duplicated and out of order, on the sending device only.
    feed(checker, 1, 1, [1, 3, 2, 2], target=2)
    assert (checker.total, checker.duplicates, checker.out_of_order) == (3, 1, 1)
    assert checker.kinds[ECHO] == 3
    # Damaged: the server names another sender.
    checker.receive(1, make_text("p", 1, 2, 4, 0, 100), 1000, sender_id=2)
    assert checker.corrupt == 1


def test_the_senders_other_devices_and_the_receivers_devices() -> None:
    """
    Device 1 of user 1 writes to user 2 (two devices): device 1 gets its
    echo, device 0 of user 1 an own delivery, both devices of user 2 a
    peer delivery; the message counts once in msgs/s (on device 0 of the
    receiver).
    """
    checker = Checker(100)
    checker.window = (0, 10_000)
    for user, device in ((1, 0), (1, 1), (2, 0), (2, 1)):
        feed(checker, user, 1, [1], device=device, target=2, sending_device=1)
    assert checker.kinds == {PEER: 2, ECHO: 1, OWN: 1}
    assert (checker.total, checker.messages_in_window) == (4, 1)
    # Each device is its own stream: none of these is a duplicate.
    assert checker.duplicates == 0
    feed(checker, 2, 1, [1], device=1, target=2, sending_device=1)
    assert checker.duplicates == 1


def test_losses_count_the_echo() -> None:
    """
    A private message between two one-device users is expected twice: a
    missing echo is a loss like a missing delivery to the receiver.
    """
    ledger = Ledger()
    ledger.sent_message(1, fanout=2)
    ledger.sent_message(1, fanout=2)
    checker = Checker(100)
    feed(checker, 2, 1, [1, 2])
    feed(checker, 1, 1, [1], target=2)  # the second echo never came
    merged = merge_reports([checker_report(checker, ledger)])
    assert (merged["expected"], merged["delivered"], merged["lost"]) == (4, 3, 1)


# The devices check


def devices_reports(
    deliveries: dict[tuple[int, int], list[int]], sent: int = 3
) -> list[dict]:
    """
    Device 0 of user 1 sent C{sent} messages to user 2 (two devices each);
    C{deliveries}: per receiving (user, device), the counters it got, in
    order.  One process holds user 1, the other user 2.
    """
    ledger = Ledger(track=True)
    for counter in range(1, sent + 1):
        ledger.sent_message(1, 4, stream=(0, "2", counter))
    checkers = {1: Checker(100), 2: Checker(100)}
    for (user, device), counters in deliveries.items():
        feed(checkers[user], user, 1, counters, device=device, target=2)
    return [
        checker_report(checkers[1], ledger),
        checker_report(checkers[2], Ledger(track=True)),
    ]


ALL = {(1, 0): [1, 2, 3], (1, 1): [1, 2, 3], (2, 0): [1, 2, 3], (2, 1): [1, 2, 3]}


def test_devices_check_every_device_got_everything() -> None:
    result = check_streams(devices_reports(ALL), devices=2)
    assert result["streams"] == 1
    assert (result["expected"], result["delivered"]) == (12, 12)
    assert (result["lost"], result["extra"], result["devices_short"]) == (0, 0, 0)
    assert result["examples"] == []


def test_devices_check_finds_a_device_short() -> None:
    # The sender's other device misses 2; the receiver's second device 3.
    got = {**ALL, (1, 1): [1, 3], (2, 1): [1, 2]}
    result = check_streams(devices_reports(got), devices=2)
    assert (result["lost"], result["devices_short"]) == (2, 2)
    assert result["lost_by_kind"] == {PEER: 1, ECHO: 0, OWN: 1}
    assert result["delivered"] == 10
    assert "device 1 of 1 (own)" in result["examples"][0]


def test_devices_check_finds_a_missing_echo() -> None:
    got = {**ALL, (1, 0): [1, 2]}
    result = check_streams(devices_reports(got), devices=2)
    assert (result["lost"], result["devices_short"]) == (1, 1)
    assert result["lost_by_kind"] == {PEER: 0, ECHO: 1, OWN: 0}


def test_devices_check_refused_and_stray_messages() -> None:
    reports = devices_reports({**ALL, (2, 0): [1, 2, 3, 4]})
    # Counter 2 was refused: nobody should have it...
    reports[0]["sent_streams"] = [[1, 0, "2", 3, [2]]]
    result = check_streams(reports, devices=2)
    # ... every device has it, and device 0 of user 2 has a 4 never sent.
    assert result["extra"] == 5 and result["lost"] == 0
    # A stream nobody sent at all.
    reports[1]["received_streams"].append([2, 0, 7, 0, "2", 3, []])
    assert check_streams(reports, devices=2)["extra"] == 7


def test_devices_check_duplicates_and_order_come_from_the_checker() -> None:
    got = {**ALL, (2, 1): [1, 3, 2, 3]}
    reports = devices_reports(got)
    merged = merge_reports(reports)
    assert (merged["duplicates"], merged["out_of_order"]) == (1, 1)
    # Nothing lost: the stream has every counter, once.
    assert check_streams(reports, devices=2)["lost"] == 0
    row = new_row("devices")
    row.update(out_of_order=1, order_required=True)
    assert failed(row)
    row["order_required"] = False
    assert not failed(row)


def test_friends_in_a_ring() -> None:
    peers = [30, 10, 20, 40]
    assert friends_of(10, peers, 2) == [20, 30]
    assert friends_of(40, peers, 2) == [10, 20]
    assert friends_of(40, peers, 9) == [10, 20, 30]
    assert friends_of(50, peers, 2) == [10, 20]


def test_losses_across_processes() -> None:
    # Process A sends (senders 1 and 4), process B receives.
    ledger_a = Ledger()
    for _ in range(4):
        ledger_a.sent_message(1)
    ledger_a.sent_message(4, fanout=3)  # a group message to three members
    ledger_a.sent_message(4, fanout=3)
    ledger_a.cancel(4, fanout=3)  # refused: not expected any more
    checker_b = Checker(100)
    feed(checker_b, 2, 1, [1, 2, 4, 4])  # 3 lost, 4 duplicated
    for member in (2, 5):  # the third member never got it
        checker_b.receive(member, make_text("g", 4, "grp", 1, 0, 100), 1000)
    merged = merge_reports(
        [checker_report(Checker(100), ledger_a), checker_report(checker_b, Ledger())]
    )
    assert merged["sent"] == 5
    assert merged["expected"] == 7
    assert merged["delivered"] == 5
    assert merged["lost"] == 2
    assert merged["duplicates"] == 1
    assert merged["out_of_order"] == 1
    assert merged["extra"] == 0


def test_messages_nobody_sent_are_extra() -> None:
    checker = Checker(100)
    feed(checker, 2, 1, [1, 2])
    merged = merge_reports([checker_report(checker, Ledger())])
    assert (merged["lost"], merged["extra"]) == (0, 2)


def test_window_counts() -> None:
    checker = Checker(100)
    checker.window = (500, 1500)
    checker.receive(2, make_text("p", 1, 2, 1, 0, 100), 400)
    checker.receive(2, make_text("p", 1, 2, 2, 0, 100), 1000)
    checker.receive(2, make_text("p", 1, 2, 3, 0, 100), 1600)
    assert (checker.total, checker.in_window) == (3, 1)


def test_histogram() -> None:
    h = Histogram()
    for us in range(1, 1001):
        h.add(us * 1000)
    assert abs(h.percentile(50) - 500_000) / 500_000 < 0.03  # type: ignore[operator]
    assert abs(h.percentile(99) - 990_000) / 990_000 < 0.03  # type: ignore[operator]
    assert h.percentile(100) == 1_000_000
    other = Histogram.from_dict(h.to_dict())
    other.merge(h)
    assert other.total == 2000 and other.max_us == 1_000_000
    assert Histogram().percentile(50) is None


# The load generator's client, on a fake connection


def logged_in_client(
    worker: Worker,
    user_id: int,
    device: int = 0,
    cursors: tuple[Cursor, ...] = (),
) -> tuple[BenchClient, StringTransport]:
    client = BenchClient(
        worker, user_id, f"u{user_id}", "token", device_name(device), device
    )
    transport = StringTransport()
    client.makeConnection(transport)
    [login] = written(transport)
    assert (login.cmd, login.request_id, login.token) == (
        Command.LOGIN_REQUEST,
        user_id,
        "token",
    )
    client.dataReceived(
        encode_framed(
            Frame(
                cmd=Command.LOGIN_RESPONSE,
                request_id=user_id,
                device=device_name(device),
                cursors=cursors,
            )
        )
    )
    assert client.login.called and client.logged_in
    worker.clients.append(client)
    return client, transport


def chat(
    seq: int, sender: int, receiver: int, counter: int, epoch: str = "e1"
) -> ChatMessage:
    return ChatMessage(
        msg_id=seq,
        conversation=pair_conversation(sender, receiver),
        seq=seq,
        sender_id=sender,
        sender_name=f"u{sender}",
        text=make_text("p", sender, receiver, counter, 0, 100),
        timestamp=0,
        epoch=epoch,
    )


def test_worker_checks_server_frames() -> None:
    events: list[dict] = []
    worker = Worker(MemoryReactorClock(), events.append)
    worker.checker = Checker(100)
    client, transport = logged_in_client(worker, 2)
    batch = [chat(1, 1, 2, 1), chat(2, 1, 2, 2)]
    client.dataReceived(
        encode_framed(Frame(cmd=Command.MESSAGE, messages=batch))
        + encode_framed(Frame(cmd=Command.MESSAGE, messages=batch[1:]))  # again
        + encode_framed(Frame(cmd=Command.OFFLINE, messages=[chat(3, 1, 2, 4)]))
        + encode_framed(Frame(cmd=Command.MESSAGE, messages=[chat(4, 1, 2, 3)]))
    )
    checker = worker.checker
    assert (checker.total, checker.duplicates, checker.out_of_order) == (4, 1, 1)
    # The again-sent message is a step back in the conversation's order.
    assert worker.counters["seq_regressions"] == 1
    # Not announced at login: it takes the epoch of the messages.
    assert worker.counters["unannounced"] == 1
    assert client.cursors == {"p:1:2": ["e1", 4]}
    worker._ack_cursors(worker.clients)
    [ack] = written(transport)
    assert ack.cmd == Command.ACK and list(ack.cursors) == [Cursor("p:1:2", 4, "e1")]


def test_worker_spreads_its_acks_over_the_second() -> None:
    """
    Each connection acknowledges what it received once a second, the
    connections taking turns over the second instead of all at once.
    """
    clock = MemoryReactorClock()
    worker = Worker(clock, lambda event: None)
    worker.checker = Checker(100)
    count = 3 * ACK_SLOTS + 7
    clients = [logged_in_client(worker, uid) for uid in range(2, count + 2)]
    for uid, (client, _) in enumerate(clients, start=2):
        client.dataReceived(
            encode_framed(Frame(cmd=Command.MESSAGE, messages=[chat(1, 1, uid, 1)]))
        )
    worker._loop(1.0 / ACK_SLOTS, worker._ack_slot)
    clock.advance(1.0 / ACK_SLOTS)
    first = [uid for uid, (_, t) in enumerate(clients, start=2) if t.value()]
    # One slot: every ACK_SLOTS-th connection.
    assert first == list(range(2, count + 2, ACK_SLOTS))
    for _ in range(10 * ACK_SLOTS):
        if worker._ack_tick >= ACK_SLOTS:
            break
        clock.advance(1.0 / ACK_SLOTS)
    assert worker._ack_tick == ACK_SLOTS
    for uid, (_, transport) in enumerate(clients, start=2):
        [ack] = written(transport)
        assert ack.cmd == Command.ACK
        assert list(ack.cursors) == [Cursor(pair_conversation(1, uid), 1, "e1")]
    # Nothing moved since: the next round sends nothing.
    clock.advance(1.0)
    assert not any(t.value() for _, t in clients)


def test_worker_window_and_acks() -> None:
    worker = Worker(MemoryReactorClock(), lambda event: None)
    worker.checker = Checker(100)
    worker.peers = [1, 2]
    client, transport = logged_in_client(worker, 1)
    worker.sending = True
    worker._send(client)
    worker._send(client)
    sent = written(transport)
    assert [(f.cmd, f.receive_user_id, f.client_msg_id) for f in sent] == [
        (Command.MESSAGE, 2, "0.1"),
        (Command.MESSAGE, 2, "0.2"),
    ]
    assert [parse_text(f.req_msg, 100).seq for f in sent] == [1, 2]  # type: ignore[union-attr]
    assert worker.outstanding == 2 and worker.ledger.expected == {1: 2}
    assert client.pending["0.1"].target == "2" and client.pending["0.1"].counter == 1
    # An ACK sends the next one; an error cancels the message.
    client.dataReceived(encode_framed(Frame(cmd=Command.ACK, client_msg_id="0.1")))
    [third] = written(transport)
    assert third.client_msg_id == "0.3"
    worker.sending = False
    client.dataReceived(
        encode_framed(Frame(cmd=Command.ERROR, error_code=9200, client_msg_id="0.2"))
        + encode_framed(Frame(cmd=Command.ACK, client_msg_id="0.3"))
        + encode_framed(Frame(cmd=Command.ACK, client_msg_id="0.3"))
    )
    assert worker.outstanding == 0
    assert worker.ledger.expected == {1: 2} and worker.ledger.sent == 2
    assert worker.counters["rejected"] == 1 and worker.counters["unknown_acks"] == 1
    # Another device of the same user: other client message ids.
    second, second_t = logged_in_client(worker, 1, device=1)
    worker._send(second)
    [other] = written(second_t)
    assert other.client_msg_id == "1.1"


def test_worker_raw_frames_and_group_cache() -> None:
    worker = Worker(MemoryReactorClock(), lambda event: None)
    worker.checker = Checker(100)
    worker._decoded = {}
    a, _ = logged_in_client(worker, 2)
    b, _ = logged_in_client(worker, 3)
    # The raw server forwards the sender's own frame.
    a.dataReceived(
        encode_framed(
            Frame(cmd=Command.MESSAGE, req_msg=make_text("p", 1, 2, 1, 0, 100))
        )
    )
    assert worker.checker.kinds[PEER] == 1
    group = ChatMessage(1, "g:x", 1, 1, "u1", make_text("g", 1, "x", 1, 0, 100), 0)
    frame = encode_framed(Frame(cmd=Command.MESSAGE, messages=[group]))
    a.dataReceived(frame)
    b.dataReceived(frame)
    b.dataReceived(frame)
    checker = worker.checker
    assert (checker.total, checker.duplicates, checker.corrupt) == (3, 1, 0)


def test_http_responses() -> None:
    conn = _HTTPConnection()
    conn.makeConnection(StringTransport())
    results: list[tuple[int, bytes]] = []
    conn.request(b"POST / HTTP/1.1\r\n\r\n").addCallback(results.append)
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    for byte in response:
        conn.dataReceived(bytes([byte]))
    conn.request(b"POST / HTTP/1.1\r\n\r\n").addCallback(results.append)
    conn.dataReceived(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
    )
    assert results == [(200, b"hello"), (200, b"abcde")]
    failures: list[object] = []
    conn.request(b"POST / HTTP/1.1\r\n\r\n").addErrback(failures.append)
    conn.connectionLost()
    assert len(failures) == 1 and not conn.open


def test_login_resumes_from_the_cursors_with_their_epochs() -> None:
    worker = Worker(MemoryReactorClock(), lambda event: None)
    client = BenchClient(worker, 2, "u2", "token", "bench-d1", 1)
    client.cursors = {"p:1:2": ["e1", 7], "g:x": ["e2", 3]}
    transport = StringTransport()
    client.makeConnection(transport)
    [login] = written(transport)
    assert sorted(login.cursors, key=lambda c: c.conversation) == [
        Cursor("g:x", 3, "e2"),
        Cursor("p:1:2", 7, "e1"),
    ]


def test_cursors_follow_login_response_and_epoch_frames() -> None:
    """
    The stream epoch comes from LOGIN_RESPONSE and EPOCH; ACKs carry it,
    with the highest seq received in the stream.
    """
    worker = Worker(MemoryReactorClock(), lambda event: None)
    worker.checker = Checker(100)
    client, transport = logged_in_client(
        worker, 2, device=1, cursors=(Cursor("p:1:2", 5, "e1"),)
    )
    assert client.cursors == {"p:1:2": ["e1", 5]} and client.device == "bench-d1"
    client.dataReceived(
        encode_framed(Frame(cmd=Command.MESSAGE, messages=[chat(6, 1, 2, 1)]))
    )
    # The store lost the conversation: a new epoch, from 0, said.
    client.dataReceived(
        encode_framed(
            Frame(cmd=Command.EPOCH, cursors=[Cursor("p:1:2", 0, "e9", reset=True)])
        )
        + encode_framed(
            Frame(cmd=Command.MESSAGE, messages=[chat(1, 1, 2, 2, epoch="e9")])
        )
    )
    assert client.cursors == {"p:1:2": ["e9", 1]}
    assert worker.counters["resets"] == 1 and worker.counters["epoch_frames"] == 1
    assert "seq_regressions" not in worker.counters
    worker._ack_cursors(worker.clients)
    [ack] = written(transport)
    assert list(ack.cursors) == [Cursor("p:1:2", 1, "e9")]
    # The receiving device is device 1: a peer delivery there.
    assert worker.checker.streams.keys() == {(2, 1, 1, 0, "2")}


def test_a_device_replaced_or_over_the_limit_stays_out() -> None:
    reactor = MemoryReactorClock()
    worker = Worker(reactor, lambda event: None)
    client, _ = logged_in_client(worker, 2)
    client.dataReceived(
        encode_framed(Frame(cmd=Command.KICK, error_reason=KICK_REPLACED))
    )
    client.connectionLost()
    assert client.final and worker.counters["final"] == 1
    assert not reactor.getDelayedCalls()
    # Any other drop: it logs in again.
    other, _ = logged_in_client(worker, 3)
    other.connectionLost()
    assert not other.final and len(reactor.getDelayedCalls()) == 1


def test_a_device_mismatch_is_noted() -> None:
    worker = Worker(MemoryReactorClock(), lambda event: None)
    client = BenchClient(worker, 2, "u2", "token", "bench-d0", 0)
    client.makeConnection(StringTransport())
    client.dataReceived(
        encode_framed(Frame(cmd=Command.LOGIN_RESPONSE, request_id=2, device="x"))
    )
    assert worker.counters["device_mismatch"] == 1


# The soak's plan and check


def soak_plan() -> tuple[Plan, dict[int, int]]:
    plan = Plan(clients=6, workers=2, seed=7, tag="t")
    return plan, {i: 100 + i for i in range(6)}


def test_soak_private_conversations_have_both_sides() -> None:
    plan, ids = soak_plan()
    by_id = {uid: i for i, uid in ids.items()}
    conversations = plan.conversations(0, ids)
    assert conversations[0].startswith("g:")
    friend = plan.friends(0)[0]
    pair = pair_conversation(ids[0], ids[friend])
    assert conversations[1] == pair
    # Both users receive: the friend, and the sender (its echo).
    assert plan.recipients(pair, by_id) == sorted([ids[0], ids[friend]])
    markers = plan.expected_markers(0, ids)
    assert (ids[0], pair) in markers  # its own marker comes back
    for other in range(6):
        if 0 in plan.friends(other):
            assert (ids[other], pair_conversation(ids[other], ids[0])) in markers


def test_soak_check_counts_echoes_exactly() -> None:
    plan, ids = soak_plan()
    a, b = ids[0], ids[plan.friends(0)[0]]
    pair = pair_conversation(a, b)
    acked = {(a, pair): [1, 2, 3]}
    received = {(b, a, pair): [1, 2, 3], (a, a, pair): [1, 3, 3, 2]}
    verdict = check(plan, ids, acked, received)
    assert (verdict.sent, verdict.expected, verdict.delivered) == (3, 6, 6)
    assert (verdict.echoes_expected, verdict.echoes_delivered) == (3, 3)
    assert (verdict.lost, verdict.duplicated, verdict.out_of_order) == (0, 1, 1)
    # A missing echo is lost.
    received[(a, a, pair)] = [1, 2]
    verdict = check(plan, ids, acked, received)
    assert (verdict.lost, verdict.echoes_delivered) == (1, 2)


@pytest.mark.integration
def test_bench_quick_runs_every_scenario(tmp_path: Path) -> None:
    """
    `make bench-quick`: every scenario runs end to end and nothing is lost
    or duplicated (the throughput targets are for the full run).
    """
    if not os.environ.get("CIM_TEST_REDIS"):
        pytest.skip("runs with `make test`")
    result = subprocess.run(
        [sys.executable, "-m", "bench.harness", "--quick"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for scenario in (
        "raw",
        "p2p",
        "ws",
        "p2p-latency",
        "group",
        "devices",
        "http",
        "login",
        "connections",
    ):
        assert f"\n{scenario} " in result.stdout, scenario
    assert "ERROR" not in result.stdout


# The load generator's WebSocket wire (bench.wsclient)


def test_the_accept_key_is_rfc_6455s() -> None:
    # RFC 6455 section 1.3's example.
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def _answer(key: str, protocol: str, status: str = "101 Switching Protocols") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\n"
        f"Sec-WebSocket-Protocol: {protocol}\r\n"
    ).encode()


def test_the_handshake_answer_is_checked() -> None:
    key = new_key()
    check_handshake(_answer(key, PROTO), key, PROTO)
    with pytest.raises(HandshakeError, match="refused"):
        check_handshake(_answer(key, PROTO, "400 Bad Request"), key, PROTO)
    with pytest.raises(HandshakeError, match="Accept"):
        check_handshake(_answer(new_key(), PROTO), key, PROTO)
    with pytest.raises(HandshakeError, match="subprotocol"):
        check_handshake(_answer(key, JSON), key, PROTO)
    request = handshake_request("127.0.0.1", 8084, "/", JSON, key).decode()
    assert request.startswith("GET / HTTP/1.1\r\nHost: 127.0.0.1:8084\r\n")
    assert f"Sec-WebSocket-Key: {key}\r\n" in request
    assert "Sec-WebSocket-Protocol: cim.v1.json\r\n\r\n" in request
    assert "Origin" not in request


@pytest.mark.parametrize("size", [0, 1, 5, 125, 126, 65535, 65536])
def test_client_frames_are_masked_and_parse_back(size: int) -> None:
    payload = os.urandom(size)
    data = client_frame(BINARY, payload, mask=b"\x01\x02\x03\x04")
    # Masked: the mask bit is set and the payload is not sent as it is.
    assert data[1] & 0x80
    if size > 8:
        assert payload not in data
    # What the tests' own client would send.
    assert data == wskit_frame_with_mask(BINARY, payload, b"\x01\x02\x03\x04")
    parser = FrameParser()
    got = []
    for byte in data:
        got += parser.feed(bytes([byte]))
    assert got == [(BINARY, payload)]


def wskit_frame_with_mask(opcode: int, payload: bytes, mask: bytes) -> bytes:
    """
    RFC 6455's masking, byte by byte.
    """
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_server_frames_fragments_and_control_frames() -> None:
    from tests.wskit import frame as masked

    def unmasked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
        return bytes([(0x80 if fin else 0) | opcode, len(payload)]) + payload

    data = (
        unmasked(TEXT, b'{"a"', fin=False)
        + unmasked(PING, b"p")
        + unmasked(0x0, b":1}")
        + masked(BINARY, b"xyz")
        + unmasked(CLOSE, (1009).to_bytes(2, "big") + b"too big")
    )
    parser = FrameParser()
    assert parser.feed(data[:5]) == []
    assert parser.feed(data[5:]) == [
        (PING, b"p"),
        (TEXT, b'{"a":1}'),
        (BINARY, b"xyz"),
        (CLOSE, (1009).to_bytes(2, "big") + b"too big"),
    ]
    assert close_code((1009).to_bytes(2, "big") + b"too big") == 1009
    assert close_code(b"") is None
    for bad in (
        unmasked(0x0, b"x"),  # a continuation of nothing
        bytes([0x80 | 0x40 | BINARY, 0]),  # a reserved bit
        unmasked(PING, b"p", fin=False),  # a fragmented control frame
        unmasked(TEXT, b"a", fin=False) + unmasked(TEXT, b"b"),
    ):
        with pytest.raises(WireError):
            FrameParser().feed(bad)
    with pytest.raises(WireError):
        FrameParser(max_length=10).feed(unmasked(BINARY, b"x" * 11))


def _server_frames() -> list[Frame]:
    message = ChatMessage(
        msg_id=2**40,
        conversation="p:1:2",
        seq=3,
        sender_id=1,
        sender_name="ann",
        text=make_text("p", 1, 2, 1, 5, 100),
        timestamp=1_700_000_000_123,
        client_msg_id="0.1",
        receive_user_id=2,
        epoch="e1",
    )
    group = ChatMessage(7, "g:x", 1, 2, "bob", "hé <b> 😀", 9, group_id="x")
    return [
        Frame(cmd=Command.MESSAGE, messages=(message, group)),
        Frame(cmd=Command.OFFLINE, batch=("a", "b")),
        Frame(
            cmd=Command.ACK,
            client_msg_id="0.1",
            msg_id=2**40,
            seq=3,
            conversation="p:1:2",
            timestamp=1_700_000_000_123,
        ),
        Frame(
            cmd=Command.LOGIN_RESPONSE,
            request_id=2,
            device="bench-d0",
            cursors=(Cursor("p:1:2", 0, "e1"), Cursor("g:x", 4, "e2", reset=True)),
        ),
        Frame(cmd=Command.EPOCH, cursors=(Cursor("p:1:2", 0, "e9", reset=True),)),
        Frame(
            cmd=Command.ERROR, error_code=9200, error_reason="why", client_msg_id="c"
        ),
        Frame(cmd=Command.KICK, error_reason=KICK_REPLACED, redirect="h:1"),
        Frame(cmd=Command.PING, req_msg="pong"),
        Frame(cmd=Command.LOGIN_REQUEST, properties={"k": "v"}),
    ]


@pytest.mark.parametrize("frame", _server_frames(), ids=lambda f: f.cmd.name)
def test_the_json_reader_reads_what_protobuf_writes(frame: Frame) -> None:
    """
    L{frame_from_json} (plain json) reads the server's JSON form
    (protobuf's json_format) into the same frame as protobuf does.
    """
    text = encode_json(frame)
    assert frame_from_json(text.encode()) == decode_json(text) == frame


def test_the_json_reader_refuses_what_is_not_a_frame() -> None:
    for bad in (b"[]", b"{", b'{"cmd": "NOPE"}', b'{"bogus": 1}', b'{"seq": true}'):
        with pytest.raises(CodecError):
            frame_from_json(bad)
    with pytest.raises(CodecError):
        frame_from_json(b'{"cmd": "MESSAGE", "messages": [{"bogus": 1}]}')


@pytest.mark.parametrize(
    "frame",
    [
        Frame(
            cmd=Command.LOGIN_REQUEST,
            request_id=2**40,
            req_msg="ann",
            token="t.k",
            cursors=(Cursor("p:1:2", 7, "e1"), Cursor("g:x", 0, "")),
        ),
        Frame(
            cmd=Command.MESSAGE,
            receive_user_id=2,
            req_msg=make_text("p", 1, 2, 1, 5, 100),
            client_msg_id="0.1",
        ),
        Frame(cmd=Command.MESSAGE, group_id="x", req_msg="hé 😀", client_msg_id="1.2"),
        Frame(cmd=Command.PING, req_msg="ping"),
        Frame(cmd=Command.ACK, cursors=(Cursor("p:1:2", 9, "e1"),)),
    ],
    ids=lambda f: f.cmd.name,
)
def test_the_json_writer_writes_what_protobuf_writes(frame: Frame) -> None:
    text = frame_to_json(frame)
    assert json.loads(text) == json.loads(encode_json(frame))
    assert decode_json(text) == frame


# The load generator's WebSocket client, against the server's gateway


class Link:
    """
    A load generator's client and a gateway's connection, joined in
    memory.
    """

    def __init__(self, world: World, client: WsBenchClient) -> None:
        gateway = WebSocketGateway(world.server, world.clock, 64 * 1024)
        address = IPv4Address("TCP", "127.0.0.1", 5001)
        self.server = gateway.buildProtocol(address)
        self.server_t = StringTransport(peerAddress=address)
        self.client = client
        self.client_t = StringTransport()
        self.server.makeConnection(self.server_t)
        client.makeConnection(self.client_t)
        self.pump()

    def pump(self) -> None:
        for _ in range(100):
            up, down = self.client_t.value(), self.server_t.value()
            if not up and not down:
                return
            self.client_t.clear()
            self.server_t.clear()
            if up:
                self.server.dataReceived(up)
            if down:
                self.client.dataReceived(down)


def ws_client(world: World, worker: Worker, name: str, form: str) -> Link:
    uid = world.user(name)
    token = world.token(uid, name, device=device_name(0))
    client = WsBenchClient(
        worker, uid, name, token, device_name(0), 0, form, "127.0.0.1", 8084
    )
    link = Link(world, client)
    assert client.opened and client.logged_in and client.login.called
    worker.clients.append(client)
    return link


def test_websocket_clients_of_both_subprotocols_chat_through_the_gateway() -> None:
    """
    The load generator's hand-made client speaks the server's gateway:
    handshake, login, sends, deliveries with their echoes, ACKs, PINGs,
    in both subprotocols; every delivery is checked exactly.
    """
    world = World()
    worker = Worker(MemoryReactorClock(), lambda event: None)
    worker.checker = Checker(100)
    worker.ledger = Ledger(track=True)
    worker.fanout = 2
    ann = ws_client(world, worker, "ann", PROTO)
    bob = ws_client(world, worker, "bob", JSON)
    assert (ann.server.binary, bob.server.binary) == (True, False)
    worker.peers = [ann.client.user_id, bob.client.user_id]
    worker.sending = True
    for link in (ann, bob):
        for _ in range(3):
            worker._send(link.client)
    # Each ACK sends one more, until the window closes.
    for _ in range(3):
        ann.pump()
        bob.pump()
    worker.sending = False
    for _ in range(3):
        ann.pump()
        bob.pump()
    assert worker.outstanding == 0 and "bad_frames" not in worker.counters
    checker = worker.checker
    sent = worker.ledger.sent
    assert sent >= 12
    assert checker.total == 2 * sent
    assert checker.kinds[ECHO] == checker.kinds[PEER] == sent
    assert (checker.duplicates, checker.corrupt, checker.out_of_order) == (0, 0, 0)
    exact = check_streams([checker_report(checker, worker.ledger)], 1)
    assert (exact["lost"], exact["extra"], exact["delivered"]) == (0, 0, 2 * sent)
    # A PING, in each form, is answered; cursors go back in ACKs.
    worker._beat_tick = 0
    worker.heartbeat = 0.1
    worker._heartbeat(ann.client)
    worker._heartbeat(bob.client)
    worker._beat()
    ann.pump()
    bob.pump()
    assert worker.counters["pongs"] == 2
    # An ACK carries the cursors that moved since the last one, only.
    moved = set(ann.client.moved)
    assert moved and moved <= set(ann.client.cursors)
    assert {c.conversation for c in ann.client.moved_cursors()} == moved
    assert ann.client.moved_cursors() == []
    ann.client.moved = moved
    worker._ack_cursors(worker.clients)
    ann.pump()
    bob.pump()
    assert not ann.client.moved and ann.client.cursors


def test_a_websocket_client_answers_the_servers_close() -> None:
    world = World()
    worker = Worker(MemoryReactorClock(), lambda event: None)
    link = ws_client(world, worker, "ann", JSON)
    # An undecodable message: the gateway closes with 1007.
    link.client_t.write(client_frame(TEXT, b"{nope"))
    link.pump()
    assert link.client.close_code == 1007
    assert worker.counters["ws_closes"] == 1 and worker.counters["errors"] == 1
    assert link.server_t.disconnecting


def test_a_refused_websocket_handshake_fails_the_login() -> None:
    worker = Worker(MemoryReactorClock(), lambda event: None)
    client = WsBenchClient(worker, 1, "ann", "t", device_name(0), 0, PROTO)
    transport = StringTransport()
    client.makeConnection(transport)
    assert transport.value().startswith(b"GET / HTTP/1.1\r\n")
    failures: list[object] = []
    client.login.addErrback(failures.append)
    client.dataReceived(_answer(client.key, PROTO, "400 Bad Request") + b"\r\n")
    assert len(failures) == 1 and transport.disconnecting
    with pytest.raises(ValueError):
        WsBenchClient(worker, 1, "ann", form="chat")


def test_the_ws_figures_per_subprotocol() -> None:
    h = Histogram()
    for us in (1000, 2000, 3000):
        h.add(us)
    report = {
        "forms": {
            PROTO: {"clients": 3, "delivered_in_window": 40, "latency": h.to_dict()},
            JSON: {"clients": 2, "delivered_in_window": 10, "latency": {}},
        }
    }
    forms = ws_forms([report, report], 2.0)
    assert forms[PROTO]["clients"] == 6 and forms[PROTO]["deliveries_per_s"] == 40
    assert forms[PROTO]["p50_ms"] == pytest.approx(2.0, rel=0.03)
    assert forms[JSON]["deliveries_per_s"] == 10 and forms[JSON]["p50_ms"] is None


def test_login_made_again_after_a_store_failure() -> None:
    """
    A login that the server refused for want of its store is made again
    a second later (a few times at most, counted); any other refusal is
    final.
    """
    from twisted.internet.defer import ensureDeferred

    from bench.loadgen import LOGIN_RETRIES, LoginRefused

    reactor = MemoryReactorClock()
    worker = Worker(reactor, lambda event: None)
    answers: list[object] = [
        LoginRefused("9200 the store is unavailable: log in again shortly"),
        LoginRefused("9200 the store is unavailable: log in again shortly"),
        "client",
    ]

    async def login_user(*args: object, **kwargs: object) -> object:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    worker.login_user = login_user  # type: ignore[assignment,method-assign]
    got: list[object] = []
    ensureDeferred(worker._login_retrying(1, "a")).addBoth(got.append)
    assert got == [] and worker.counters["login_retries"] == 1
    reactor.advance(1.0)
    assert got == [] and worker.counters["login_retries"] == 2
    reactor.advance(1.0)
    assert got == ["client"]

    answers[:] = [LoginRefused("5000 no such session")]
    ensureDeferred(worker._login_retrying(1, "a")).addBoth(got.append)
    assert isinstance(got[-1].value, LoginRefused)  # type: ignore[attr-defined]
    assert worker.counters["login_retries"] == 2

    answers[:] = [LoginRefused("9200 down")] * (LOGIN_RETRIES + 1)
    ensureDeferred(worker._login_retrying(1, "a")).addBoth(got.append)
    for _ in range(LOGIN_RETRIES):
        reactor.advance(1.0)
    assert "9200 down" in str(got[-1].value)  # type: ignore[attr-defined]
    assert worker.counters["login_retries"] == 2 + LOGIN_RETRIES


def test_connections_split_over_load_processes_by_their_file_limit() -> None:
    """
    The connections scenario starts as many load generators as their
    open-file limit needs (1,000 files each kept for the rest), never
    fewer than asked for.
    """
    from bench.harness import load_processes

    assert load_processes(19_000, 20_000, 2) == 2
    assert load_processes(19_000, 20_000, 1) == 1
    assert load_processes(19_001, 20_000, 1) == 2
    assert load_processes(19_000, 4_096, 2) == 7
    assert load_processes(500, 1_024, 2) == 21
