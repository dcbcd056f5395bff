"""
The benchmark's own logic, on in-memory fakes: the raw server forwards
frames, and the load generator counts lost, duplicated, out-of-order and
damaged messages correctly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport

from bench.loadgen import (
    BenchClient,
    Checker,
    Histogram,
    Ledger,
    Worker,
    _HTTPConnection,
    checker_report,
    make_text,
    merge_reports,
    parse_text,
)
from bench.raw_server import RawFactory
from cim.codec import decode, encode, encode_framed
from cim.framing import VarintFrameReceiver
from cim.message import ChatMessage, Command, Frame


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


def test_raw_server_forwards_and_acknowledges() -> None:
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
    acks = written(alice_t)
    assert [(f.cmd, f.client_msg_id) for f in acks] == [(Command.ACK, "7")] * 2
    assert factory.hub.forwarded == 2


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
    assert parse_text(text, 100) == ("p", 12, "34", 5, 1_000_000)
    assert parse_text(text[:-1] + ("a" if text[-1] != "a" else "b"), 100) is None
    assert parse_text(text[:-1], 100) is None
    assert parse_text("hello", 100) is None
    # Another sender's padding is not this one's.
    other = make_text("p", 13, 34, 5, 1_000_000, 100)
    assert parse_text(text[:20] + other[20:], 100) is None
    # A header longer than the size is allowed (no padding).
    assert parse_text(make_text("g", 1, "g" * 50, 1, 1, 10), 10) is not None


def feed(checker: Checker, receiver: int, sender: int, seqs: list[int]) -> None:
    for seq in seqs:
        checker.receive(receiver, make_text("p", sender, receiver, seq, 0, 100), 1000)


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
    worker: Worker, user_id: int
) -> tuple[BenchClient, StringTransport]:
    client = BenchClient(worker, user_id, f"u{user_id}", "token")
    transport = StringTransport()
    client.makeConnection(transport)
    [login] = written(transport)
    assert (login.cmd, login.request_id, login.token) == (
        Command.LOGIN_REQUEST,
        user_id,
        "token",
    )
    client.dataReceived(
        encode_framed(Frame(cmd=Command.LOGIN_RESPONSE, request_id=user_id))
    )
    assert client.login.called and client.logged_in
    worker.clients.append(client)
    return client, transport


def chat(seq: int, sender: int, receiver: int, counter: int) -> ChatMessage:
    return ChatMessage(
        msg_id=seq,
        conversation=f"u:{receiver}",
        seq=seq,
        sender_id=sender,
        sender_name=f"u{sender}",
        text=make_text("p", sender, receiver, counter, 0, 100),
        timestamp=0,
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
    assert client.cursors == {"u:2": 4}
    worker._ack_cursors()
    [ack] = written(transport)
    assert ack.cmd == Command.ACK and [
        (c.conversation, c.seq) for c in ack.cursors
    ] == [("u:2", 4)]


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
        (Command.MESSAGE, 2, "1"),
        (Command.MESSAGE, 2, "2"),
    ]
    assert [parse_text(f.req_msg, 100).seq for f in sent] == [1, 2]  # type: ignore[union-attr]
    assert worker.outstanding == 2 and worker.ledger.expected == {1: 2}
    # An ACK sends the next one; an error cancels the message.
    client.dataReceived(encode_framed(Frame(cmd=Command.ACK, client_msg_id="1")))
    [third] = written(transport)
    assert third.client_msg_id == "3"
    worker.sending = False
    client.dataReceived(
        encode_framed(Frame(cmd=Command.ERROR, error_code=9200, client_msg_id="2"))
        + encode_framed(Frame(cmd=Command.ACK, client_msg_id="3"))
        + encode_framed(Frame(cmd=Command.ACK, client_msg_id="3"))
    )
    assert worker.outstanding == 0
    assert worker.ledger.expected == {1: 2} and worker.ledger.sent == 2
    assert worker.counters["rejected"] == 1 and worker.counters["unknown_acks"] == 1


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


def test_login_resumes_from_the_cursors() -> None:
    worker = Worker(MemoryReactorClock(), lambda event: None)
    client = BenchClient(worker, 2, "u2", "token")
    client.cursors = {"u:2": 7, "g:x": 3}
    transport = StringTransport()
    client.makeConnection(transport)
    [login] = written(transport)
    assert sorted((c.conversation, c.seq) for c in login.cursors) == [
        ("g:x", 3),
        ("u:2", 7),
    ]


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
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for scenario in (
        "raw",
        "p2p",
        "p2p-latency",
        "group",
        "http",
        "login",
        "connections",
    ):
        assert f"\n{scenario} " in result.stdout, scenario
    assert "ERROR" not in result.stdout
