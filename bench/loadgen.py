"""
The benchmark's load generator: one process driving many protocol-level
clients (varint framing and L{cim.codec} over TCP, or the same frames over
the servers' WebSocket gateways in either subprotocol with the hand-made
client of L{bench.wsclient}; a small keep-alive HTTP/1.1 client for the
route) and checking every message it receives.

L{bench.harness} starts one or two of these as C{python -m bench.loadgen}
and drives them with one JSON object per line on stdin; each answers with
JSON events on stdout (its log goes to stderr)::

    {"cmd": "setup", ...}   -> {"event": "registered", "users": [[id, name]...]}
    {"cmd": "login", ...}   -> {"event": "ready", "users": [ids], ...}
    {"cmd": "run", ...}     -> {"event": "quiet", ...}
    {"cmd": "report"}       -> {"event": "report", ...}
    {"cmd": "stop"}         -> {"event": "stopped"}, then exits
    (any failure)           -> {"event": "error", "message": ...}

Every chat text is made by L{make_text}: its kind, sender, target, the
sender's counter for that target (1, 2, 3, ...), the send time and a
padding derived from the sender and counter, up to the message size.  A
receiver checks all of it (L{Checker}); the figures are what receivers
actually got, never what a server says it did.

The pure parts (texts, L{Histogram}, L{Checker}, L{Ledger},
L{merge_reports}) import no reactor; the harness uses them to merge the
processes' reports.
"""

from __future__ import annotations

import json
import math
import random
import resource
import string
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from bench.wsclient import (
    BINARY,
    CLOSE,
    JSON,
    PING,
    PONG,
    PROTO,
    SUBPROTOCOLS,
    TEXT,
    FrameParser,
    HandshakeError,
    WireError,
    check_handshake,
    client_frame,
    close_code,
    frame_from_json,
    frame_to_json,
    handshake_request,
    new_key,
)
from cim.codec import ChatItem, CodecError, decode, decode_chat, encode, encode_framed
from cim.framing import VarintFrameReceiver
from cim.gcpolicy import GC_YOUNG, tune_gc
from cim.message import (
    KICK_DEVICE_LIMIT,
    KICK_REPLACED,
    Command,
    Cursor,
    ErrorCode,
    Frame,
)

# Texts

#: The characters of the padding that fills each text up to its size.
ALPHABET = string.ascii_letters + string.digits
_CYCLE = ALPHABET * (8192 // len(ALPHABET) + 2)
#: The largest text size supported (the server's default limit).
MAX_SIZE = 4096
#: The device number in the texts of a message sent over HTTP (no device).
NO_DEVICE = -1


#: The load's cumulative ACKs: each connection sends one a second (the
#: cursors that moved), the connections taking turns in this many slots
#: of the second (L{Worker._ack_slot}).  All of them at the same moment
#: made a burst of a thousand ACK frames every second, that the servers
#: read ahead of the messages behind them and that no population of
#: clients makes: it alone took the p99 of C{p2p-latency} at 1,000 msgs/s
#: from 20-31 ms to 45-50 ms (alternated runs).
ACK_SLOTS = 100


def now_us() -> int:
    """
    Microseconds of C{CLOCK_MONOTONIC}, which every process of the machine
    shares: a sender's timestamp is comparable with its receiver's clock.
    """
    return time.monotonic_ns() // 1000


def padding(sender: int, seq: int, length: int, device: int = 0) -> str:
    """
    The padding of C{sender}'s (device C{device}'s) message number C{seq}:
    C{length} characters that depend on all three, so a swapped or damaged
    text is noticed.
    """
    start = (sender * 31 + seq * 7 + device * 13) % len(ALPHABET)
    return _CYCLE[start : start + length]


def make_text(
    kind: str,
    sender: int,
    target: str | int,
    seq: int,
    sent_us: int,
    size: int,
    device: int = 0,
) -> str:
    """
    A chat text of C{size} characters (or its header alone when longer):
    C{kind|sender|device|target|seq|sent_us|padding}.

    @param kind: C{"p"} (private) or C{"g"} (group).
    @param target: the receiver's id, or the group id.
    @param seq: the sending device's counter for this target, from 1.
    @param device: the number of the sending device among its user's
        (0, 1, ...; L{NO_DEVICE} for an HTTP send).
    """
    head = f"{kind}|{sender}|{device}|{target}|{seq}|{sent_us}|"
    return head + padding(sender, seq, max(0, size - len(head)), device)


class Parsed(NamedTuple):
    kind: str
    sender: int
    target: str
    seq: int
    sent_us: int
    device: int = 0


def parse_text(text: str, size: int = 0) -> Parsed | None:
    """
    Parse and check a L{make_text} text.  @return: its fields, or C{None}
    when it is not such a text, its padding is wrong, or (with C{size}) it
    has another length than C{make_text} gives.
    """
    parts = text.split("|", 6)
    if len(parts) != 7:
        return None
    kind, sender_s, device_s, target, seq_s, sent_s, pad = parts
    try:
        sender = int(sender_s)
        device = int(device_s)
        seq = int(seq_s)
        sent_us = int(sent_s)
    except ValueError:
        return None
    if pad != padding(sender, seq, len(pad), device):
        return None
    if size and len(text) != max(size, len(text) - len(pad)):
        return None
    return Parsed(kind, sender, target, seq, sent_us, device)


# Figures


class Histogram:
    """
    A latency histogram in microseconds, with logarithmic buckets 2% wide;
    histograms of several processes merge exactly.
    """

    RATIO = 1.02
    _LOG = math.log(RATIO)

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        self.max_us = 0

    def add(self, us: int) -> None:
        if us < 1:
            us = 1
        index = int(math.log(us) / self._LOG)
        counts = self.counts
        counts[index] = counts.get(index, 0) + 1
        self.total += 1
        if us > self.max_us:
            self.max_us = us

    def merge(self, other: Histogram) -> None:
        for index, count in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + count
        self.total += other.total
        self.max_us = max(self.max_us, other.max_us)

    def percentile(self, p: float) -> float | None:
        """
        The C{p}th percentile (0-100) in microseconds, within 2% (the upper
        edge of its bucket, never above the maximum); C{None} when empty.
        """
        if not self.total:
            return None
        rank = max(1, math.ceil(self.total * p / 100))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return min(float(self.max_us), self.RATIO ** (index + 1))
        return float(self.max_us)

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": {str(k): v for k, v in self.counts.items()},
            "total": self.total,
            "max_us": self.max_us,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Histogram:
        h = cls()
        h.counts = {int(k): int(v) for k, v in data.get("counts", {}).items()}
        h.total = int(data.get("total", 0))
        h.max_us = int(data.get("max_us", 0))
        return h


#: The kinds of deliveries (a delivery is one message written to one
#: device): to a device of another user (the receiver, a group member), the
#: sender's own echo (back to the device that sent it), and to the
#: sender's other devices.
PEER, ECHO, OWN = "peer", "echo", "own"
KINDS = (PEER, ECHO, OWN)

#: A stream as a receiving device sees it: (receiver, its device, sender,
#: the sending device, target).
StreamKey = tuple[int, int, int, int, str]


class Checker:
    """
    Checks the messages one load process receives.

    A delivery is one message written to one device.  A stream is one
    (receiving user, its device, sender, sending device, target): its
    counters must arrive as 1, 2, 3, ... A counter seen before is a
    duplicate; one that arrives before an earlier one is out of order (it
    still counts as received).  Texts that do not parse or check are
    corrupt; a private message that is neither for the receiving user nor
    from it is misrouted.

    A private message goes to every device of both users, the sending
    device too: a delivery to the device that sent it is its B{echo}, to
    the sender's other devices B{own}, to anybody else B{peer}.  Each is
    checked like any other (its own stream: order, duplicates, damage) and
    counted by kind.  Losses need the senders' L{Ledger}s: see
    L{merge_reports} (counts per sender) and L{check_streams} (exact, per
    stream and receiving device).

    @ivar received: distinct deliveries received, per sender.
    @ivar kinds: distinct deliveries per kind (L{KINDS}).
    @ivar window: (start, end) in L{now_us} time: receptions within it are
        counted in C{in_window}, C{kinds_in_window} and
        C{messages_in_window}.
    @ivar messages: private messages received by the first device (0)
        of their receiver: each message once, whatever the number of
        devices.
    @ivar messages_in_window: private messages received by the first
        device (0) of their receiver in the window: each message once,
        whatever the number of devices, so msgs/s stay comparable.
    """

    def __init__(self, size: int = 0) -> None:
        self.size = size
        self.streams: dict[StreamKey, list[Any]] = {}
        self.received: dict[int, int] = {}
        self.kinds = dict.fromkeys(KINDS, 0)
        self.kinds_in_window = dict.fromkeys(KINDS, 0)
        self.total = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.corrupt = 0
        self.misrouted = 0
        self.in_window = 0
        self.messages = 0
        self.messages_in_window = 0
        self.window = (0, -1)
        self.latency = Histogram()
        #: Texts already parsed, when many connections of this process get
        #: the same ones (a group's members): each is checked once.
        self.parsed: dict[str, Parsed | None] | None = None

    def receive(
        self,
        receiver: int,
        text: str,
        now: int,
        sender_id: int | None = None,
        device: int = 0,
    ) -> int | None:
        """
        Check one received message.

        @param receiver: the user whose connection got it.
        @param now: the reception time (L{now_us}).
        @param sender_id: the sender the server named, if it names one.
        @param device: the number of the receiving device among its user's.
        @return: its latency in microseconds when it counts as a delivery
            (not damaged, not a duplicate).
        """
        cache = self.parsed
        if cache is None:
            parsed = parse_text(text, self.size)
        else:
            try:
                parsed = cache[text]
            except KeyError:
                if len(cache) > 4096:
                    cache.clear()
                parsed = cache[text] = parse_text(text, self.size)
        if parsed is None or (sender_id is not None and sender_id != parsed.sender):
            self.corrupt += 1
            return None
        sender = parsed.sender
        if sender == receiver:
            kind = ECHO if parsed.device == device else OWN
        else:
            kind = PEER
            if parsed.kind == "p" and parsed.target != str(receiver):
                self.misrouted += 1
                return None
        key = (receiver, device, sender, parsed.device, parsed.target)
        state: list[Any] | None = self.streams.get(key)
        if state is None:
            state = self.streams[key] = [1, None]
        seq = parsed.seq
        expected = state[0]
        if seq == expected:
            expected += 1
            ahead = state[1]
            if ahead:
                while expected in ahead:
                    ahead.discard(expected)
                    expected += 1
            state[0] = expected
        elif seq < expected or (state[1] is not None and seq in state[1]):
            self.duplicates += 1
            return None
        else:
            self.out_of_order += 1
            ahead = state[1]
            if ahead is None:
                ahead = state[1] = set()
            ahead.add(seq)
        self.received[sender] = self.received.get(sender, 0) + 1
        self.kinds[kind] += 1
        self.total += 1
        latency = now - parsed.sent_us
        self.latency.add(latency)
        first = kind == PEER and device == 0 and parsed.kind == "p"
        self.messages += first
        if self.window[0] <= now <= self.window[1]:
            self.in_window += 1
            self.kinds_in_window[kind] += 1
            self.messages_in_window += first
        return latency

    def stream_report(self) -> list[list[Any]]:
        """
        Every stream received: C{[receiver, device, sender, sending device,
        target, next counter expected, [counters received beyond a gap]]}.
        """
        return [
            [*key, state[0], sorted(state[1] or ())]
            for key, state in self.streams.items()
        ]


class Ledger:
    """
    What one load process sent: per sender, how many deliveries its
    messages should make (one per device of the receiver and of the
    sender for a private message, the sending device's echo included; one
    per member for a group message).

    @ivar streams: with C{track}, per (sender, sending device, target), the
        highest counter sent and the counters refused (not stored).
    """

    def __init__(self, track: bool = False) -> None:
        self.expected: dict[int, int] = {}
        self.sent = 0
        self.sent_in_window = 0
        self.track = track
        self.streams: dict[tuple[int, int, str], list[Any]] = {}

    def sent_message(
        self,
        sender: int,
        fanout: int = 1,
        in_window: bool = False,
        stream: tuple[int, str, int] | None = None,
    ) -> None:
        """
        @param stream: C{(sending device, target, counter)}, kept with
            C{track}.
        """
        self.expected[sender] = self.expected.get(sender, 0) + fanout
        self.sent += 1
        if in_window:
            self.sent_in_window += 1
        if self.track and stream is not None:
            device, target, counter = stream
            state = self.streams.setdefault((sender, device, str(target)), [0, []])
            state[0] = max(state[0], counter)

    def cancel(
        self,
        sender: int,
        fanout: int = 1,
        stream: tuple[int, str, int] | None = None,
    ) -> None:
        """
        A message was refused (it was not stored): expect nothing of it.
        """
        self.expected[sender] = self.expected.get(sender, 0) - fanout
        self.sent -= 1
        if self.track and stream is not None:
            device, target, counter = stream
            state = self.streams.setdefault((sender, device, str(target)), [0, []])
            state[1].append(counter)

    def stream_report(self) -> list[list[Any]]:
        """
        C{[sender, sending device, target, highest counter, [refused]]}.
        """
        return [
            [*key, n, sorted(refused)] for key, (n, refused) in self.streams.items()
        ]


def checker_report(checker: Checker, ledger: Ledger) -> dict[str, Any]:
    """
    The JSON form of one process's L{Checker} and L{Ledger}, for
    L{merge_reports} (and, when the ledger tracks streams, L{check_streams}).
    """
    report = {
        "expected": {str(k): v for k, v in ledger.expected.items()},
        "received": {str(k): v for k, v in checker.received.items()},
        "sent": ledger.sent,
        "sent_in_window": ledger.sent_in_window,
        "delivered": checker.total,
        "delivered_in_window": checker.in_window,
        "messages": checker.messages,
        "messages_in_window": checker.messages_in_window,
        "kinds": dict(checker.kinds),
        "kinds_in_window": dict(checker.kinds_in_window),
        "duplicates": checker.duplicates,
        "out_of_order": checker.out_of_order,
        "corrupt": checker.corrupt,
        "misrouted": checker.misrouted,
        "latency": checker.latency.to_dict(),
    }
    if ledger.track:
        report["sent_streams"] = ledger.stream_report()
        report["received_streams"] = checker.stream_report()
    return report


def merge_reports(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """
    Merge the L{checker_report}s of every process: a delivery a sender's
    ledger expects but no receiver got is lost; one received beyond what
    was expected is extra (a message nobody sent, which should not exist).
    """
    expected: dict[str, int] = {}
    received: dict[str, int] = {}
    latency = Histogram()
    totals = dict.fromkeys(
        (
            "sent",
            "sent_in_window",
            "delivered",
            "delivered_in_window",
            "messages",
            "messages_in_window",
            "duplicates",
            "out_of_order",
            "corrupt",
            "misrouted",
        ),
        0,
    )
    kinds = dict.fromkeys(KINDS, 0)
    kinds_in_window = dict.fromkeys(KINDS, 0)
    for report in reports:
        for sender, n in report.get("expected", {}).items():
            expected[sender] = expected.get(sender, 0) + n
        for sender, n in report.get("received", {}).items():
            received[sender] = received.get(sender, 0) + n
        for key in totals:
            totals[key] += int(report.get(key, 0))
        for kind in KINDS:
            kinds[kind] += int(report.get("kinds", {}).get(kind, 0))
            kinds_in_window[kind] += int(report.get("kinds_in_window", {}).get(kind, 0))
        latency.merge(Histogram.from_dict(report.get("latency", {})))
    lost = sum(max(0, n - received.get(s, 0)) for s, n in expected.items())
    extra = sum(max(0, n - expected.get(s, 0)) for s, n in received.items())
    return {
        **totals,
        "kinds": kinds,
        "kinds_in_window": kinds_in_window,
        "expected": sum(expected.values()),
        "lost": lost,
        "extra": extra,
        "latency": latency,
    }


def deliveries_per_message(merged: dict[str, Any]) -> dict[str, float] | None:
    """
    The deliveries of a private message, per kind and in all
    (C{"total"}), over the whole run (the window would count the
    deliveries of messages sent before it and not those of messages
    delivered after it), from L{merge_reports}' figures; C{None} without
    messages.
    """
    messages = merged.get("messages", 0)
    if not messages:
        return None
    per = {k: v / messages for k, v in merged["kinds"].items()}
    per["total"] = merged["delivered"] / messages
    return per


def check_streams(reports: Sequence[dict[str, Any]], devices: int) -> dict[str, Any]:
    """
    The exact check of private messages between users with C{devices}
    devices each, from the L{checker_report}s of processes whose ledgers
    tracked their streams: every message that a device of user A sent to
    user B (and that was not refused) must reach every device of A (the
    sending one too: its echo) and of B; each (receiving device, sending
    device, target) stream must hold exactly the counters sent.

    @return: C{streams} (sent streams), C{expected} and C{delivered}
        (deliveries), C{lost} (expected, not received) and C{lost_by_kind}
        (L{KINDS}: the receiver's devices, the echo, the sender's other
        devices), C{extra} (received, never sent), C{devices_short}
        (receiving devices that miss something) and a few C{examples}.
    """
    sent: dict[tuple[int, int, str], tuple[int, set[int]]] = {}
    for report in reports:
        for sender, device, target, n, refused in report.get("sent_streams", []):
            sent[(int(sender), int(device), str(target))] = (int(n), set(refused))
    received: dict[StreamKey, set[int]] = {}
    for report in reports:
        for row in report.get("received_streams", []):
            receiver, device, sender, sdevice, target, next_expected, ahead = row
            got = set(range(1, int(next_expected))) | set(ahead)
            key = (int(receiver), int(device), int(sender), int(sdevice), str(target))
            received[key] = received.get(key, set()) | got
    out: dict[str, Any] = {
        "streams": len(sent),
        "expected": 0,
        "delivered": 0,
        "lost": 0,
        "lost_by_kind": dict.fromkeys(KINDS, 0),
        "extra": 0,
        "devices_short": 0,
        "examples": [],
    }
    short: set[tuple[int, int]] = set()
    seen: set[StreamKey] = set()
    for (sender, sdevice, target), (n, refused) in sorted(sent.items()):
        wanted = set(range(1, n + 1)) - refused
        users = {sender, int(target)}
        for user in sorted(users):
            for device in range(devices):
                key = (user, device, sender, sdevice, target)
                seen.add(key)
                got = received.get(key, set())
                missing = wanted - got
                extra = got - wanted
                out["expected"] += len(wanted)
                out["delivered"] += len(wanted & got)
                out["lost"] += len(missing)
                out["extra"] += len(extra)
                if user != sender:
                    kind = PEER
                else:
                    kind = ECHO if device == sdevice else OWN
                out["lost_by_kind"][kind] += len(missing)
                if missing:
                    short.add((user, device))
                if (missing or extra) and len(out["examples"]) < 10:
                    out["examples"].append(
                        f"device {device} of {user} ({kind}), from device "
                        f"{sdevice} of {sender} to {target}: missing "
                        f"{sorted(missing)[:10]}, never sent {sorted(extra)[:10]}"
                    )
    for key, got in received.items():
        if key not in seen:
            out["extra"] += len(got)
            if len(out["examples"]) < 10:
                out["examples"].append(f"{key}: {len(got)} received, none sent")
    out["devices_short"] = len(short)
    return out


# The route: a lean keep-alive HTTP/1.1 client


class HTTPError(Exception):
    """
    A response that could not be read, or a connection that closed first.
    """


class _HTTPConnection(Protocol):
    """
    One persistent connection, one request at a time.  Reads responses
    with a Content-Length or chunked bodies (what twisted.web sends).
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._waiting: Deferred[tuple[int, bytes]] | None = None
        self.open = False

    def connectionMade(self) -> None:
        self.open = True
        try:
            self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
        except Exception:
            pass

    def request(self, data: bytes) -> Deferred[tuple[int, bytes]]:
        d: Deferred[tuple[int, bytes]] = Deferred()
        self._waiting = d
        self.transport.write(data)  # type: ignore[union-attr]
        return d

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        self._parse()

    def _parse(self) -> None:
        buf = self._buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        lines = buf[:end].decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            self._fail(HTTPError(f"bad status line {lines[0]!r}"))
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        start = end + 4
        if "content-length" in headers:
            stop = start + int(headers["content-length"])
            if len(buf) < stop:
                return
            body = buf[start:stop]
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            pos = start
            while True:
                line_end = buf.find(b"\r\n", pos)
                if line_end < 0:
                    return
                size = int(buf[pos:line_end].split(b";")[0], 16)
                if size == 0:
                    # No trailers from twisted.web: the final CRLF follows.
                    stop = line_end + 4
                    if len(buf) < stop:
                        return
                    break
                chunk_start = line_end + 2
                if len(buf) < chunk_start + size + 2:
                    return
                chunks.append(buf[chunk_start : chunk_start + size])
                pos = chunk_start + size + 2
            body = b"".join(chunks)
        else:
            self._fail(HTTPError("a response without a length"))
            return
        self._buffer = buf[stop:]
        if headers.get("connection", "").lower() == "close":
            self.open = False
            self.transport.loseConnection()  # type: ignore[union-attr]
        d, self._waiting = self._waiting, None
        if d is not None:
            d.callback((status, body))

    def _fail(self, error: Exception) -> None:
        self.open = False
        self.transport.abortConnection()  # type: ignore[union-attr]
        d, self._waiting = self._waiting, None
        if d is not None:
            d.errback(error)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.open = False
        d, self._waiting = self._waiting, None
        if d is not None:
            d.errback(HTTPError(f"connection lost: {reason.getErrorMessage()}"))


class HTTPPool:
    """
    Up to C{size} persistent connections to one HTTP server, for JSON
    POSTs that answer JSON.
    """

    def __init__(self, reactor: Any, host: str, port: int, size: int) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.size = size
        self._idle: list[_HTTPConnection] = []
        self._count = 0
        self._waiters: deque[Deferred[_HTTPConnection]] = deque()
        self._all: set[_HTTPConnection] = set()

    async def _acquire(self) -> _HTTPConnection:
        while self._idle:
            conn = self._idle.pop()
            if conn.open:
                return conn
            self._count -= 1
        if self._count < self.size:
            self._count += 1
            conn = _HTTPConnection()
            endpoint = TCP4ClientEndpoint(
                self.reactor, self.host, self.port, timeout=30
            )
            try:
                await connectProtocol(endpoint, conn)
            except BaseException:
                self._count -= 1
                raise
            self._all.add(conn)
            return conn
        d: Deferred[_HTTPConnection] = Deferred()
        self._waiters.append(d)
        return await d

    def _release(self, conn: _HTTPConnection) -> None:
        if not conn.open:
            self._all.discard(conn)
            self._count -= 1
            if self._waiters:
                # Let a waiter open a new connection.
                waiter = self._waiters.popleft()
                ensureDeferred(self._acquire()).chainDeferred(waiter)
            return
        if self._waiters:
            self._waiters.popleft().callback(conn)
        else:
            self._idle.append(conn)

    async def post(
        self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """
        POST C{body} as JSON.  @return: the decoded JSON answer.
        @raise HTTPError: the connection or the response broke.
        """
        payload = json.dumps(body, separators=(",", ":")).encode("utf-8")
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        data = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            "X-Cim-Extended: 1\r\n"
            f"{extra}\r\n"
        ).encode("latin-1") + payload
        conn = await self._acquire()
        try:
            _, raw = await conn.request(data)
        finally:
            self._release(conn)
        try:
            answer: dict[str, Any] = json.loads(raw)
        except ValueError as e:
            raise HTTPError(f"{path}: not JSON: {raw[:200]!r}") from e
        return answer

    def close(self) -> None:
        for conn in list(self._all):
            if conn.transport is not None:
                conn.transport.loseConnection()
        self._all.clear()
        self._idle.clear()


# TCP clients

_PING = encode_framed(Frame(cmd=Command.PING, req_msg="ping"))


#: How many times, and after how long, a login that the server refused
#: for want of its store is made again.
LOGIN_RETRIES = 3
LOGIN_RETRY_DELAY = 1.0


class LoginRefused(Exception):
    """
    The route or the server refused a login.
    """


class Pending(NamedTuple):
    """
    A message sent and not acknowledged yet: the deliveries it should
    make, its frame (sent again after a reconnection), its target and its
    counter.
    """

    fanout: int
    data: bytes
    target: str = ""
    counter: int = 0


def device_name(index: int) -> str:
    """
    The device id that the bench's device number C{index} logs in with.
    """
    return f"bench-d{index}"


class BenchClient(VarintFrameReceiver):
    """
    One device's TCP connection: logs in on connect, hands every frame to
    its L{Worker}.

    @ivar device: the device id it logs in with (C{""} in raw mode).
    @ivar device_index: its number among its user's devices (0, 1, ...).
    @ivar login: fires once the login succeeded; fails if refused.
    @ivar pending: the client message ids sent and not acknowledged yet
        (L{Pending}).
    @ivar seqs: the counter of the last message sent, per target.
    @ivar cursors: per conversation, C{[epoch, seq]}: the stream's epoch
        as the server announced it (C{LOGIN_RESPONSE}, C{EPOCH}) and the
        highest seq received in it (sent back, with the epoch, in
        cumulative ACKs and at the next login).
    @ivar moved: the conversations whose cursor moved since the last ACK
        (only those are acknowledged, as cim clients do).
    @ivar friends: the users it sends to (all the peers when empty).
    @ivar final: kicked for good (replaced, or over the device limit): it
        must not log in again by itself.
    @ivar pings: send times of the PINGs not answered yet.
    @ivar form: the WebSocket subprotocol (L{WsBenchClient}); C{""} on TCP.
    """

    MAX_LENGTH = 16 * 1024 * 1024
    form = ""
    #: A PING frame as this connection writes it.
    ping_data = _PING

    def __init__(
        self,
        worker: Worker,
        user_id: int,
        name: str,
        token: str = "",
        device: str = "",
        device_index: int = 0,
    ) -> None:
        super().__init__()
        self.worker = worker
        self.user_id = user_id
        self.name = name
        self.token = token
        self.device = device
        self.device_index = device_index
        self.login: Deferred[None] = Deferred()
        self.logged_in = False
        self.closed = False
        self.final = False
        self.pending: dict[str, Pending] = {}
        self.bind: str | None = None
        self.server = ""
        self.next_cmid = 0
        self.seqs: dict[object, int] = {}
        self.cursors: dict[str, list[Any]] = {}
        self.moved: set[str] = set()
        self.friends: list[int] = []
        self.pings: deque[int] = deque()

    def cursor_list(self) -> list[Cursor]:
        """
        The cursors to send (ACK, login): each conversation's highest seq
        received, with its stream's epoch.
        """
        return [Cursor(c, seq, epoch) for c, (epoch, seq) in self.cursors.items()]

    def moved_cursors(self) -> list[Cursor]:
        """
        The cursors that moved since this was last called (what a
        cumulative ACK carries).
        """
        cursors = self.cursors
        moved = [Cursor(c, cursors[c][1], cursors[c][0]) for c in self.moved]
        self.moved.clear()
        return moved

    def announced(self, cursors: Iterable[Cursor]) -> int:
        """
        The server says where conversations start (C{LOGIN_RESPONSE},
        C{EPOCH}): take each one's epoch and start.  @return: how many
        were reset (the position sent was of another epoch).
        """
        resets = 0
        for cursor in cursors:
            self.cursors[cursor.conversation] = [cursor.epoch, cursor.seq]
            resets += cursor.reset
        return resets

    def encode(self, frame: Frame) -> bytes:
        """
        C{frame} as this connection writes it (varint framing and
        protobuf).
        """
        return encode_framed(frame)

    def connectionMade(self) -> None:
        try:
            self.transport.setTcpNoDelay(True)  # type: ignore[attr-defined]
        except Exception:
            pass
        self.send_login()

    def send_login(self) -> None:
        self.transport.write(  # type: ignore[union-attr]
            self.encode(
                Frame(
                    cmd=Command.LOGIN_REQUEST,
                    request_id=self.user_id,
                    req_msg=self.name,
                    token=self.token,
                    cursors=self.cursor_list(),
                )
            )
        )

    def frameReceived(self, frame: bytes) -> None:
        self.worker.frame(self, frame)

    def lengthLimitExceeded(self, length: int) -> None:
        self.worker.count("bad_frames")
        super().lengthLimitExceeded(length)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.closed = True
        if not self.login.called:
            self.login.errback(
                LoginRefused(f"connection lost: {reason.getErrorMessage()}")
            )
        self.worker.client_lost(self)

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.loseConnection()


#: Per subprotocol: a PING frame, masked once (a client may send the same
#: frame again: the mask is only a key in it).
_WS_PINGS = {
    PROTO: client_frame(BINARY, encode(Frame(cmd=Command.PING, req_msg="ping"))),
    JSON: client_frame(
        TEXT, frame_to_json(Frame(cmd=Command.PING, req_msg="ping")).encode("utf-8")
    ),
}


class WsBenchClient(BenchClient):
    """
    One device's WebSocket connection to a server's gateway, in the form of
    subprotocol C{form} (L{PROTO}: protobuf bytes in binary messages;
    L{JSON}: proto3 JSON in text messages), by hand (L{bench.wsclient}
    says why): the opening handshake, then the same frames and the same
    L{Worker} as a L{BenchClient} on TCP.

    @ivar host: the host of the WebSocket URL (its C{Host} header).
    """

    def __init__(
        self,
        worker: Worker,
        user_id: int,
        name: str,
        token: str = "",
        device: str = "",
        device_index: int = 0,
        form: str = PROTO,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = "/",
    ) -> None:
        super().__init__(worker, user_id, name, token, device, device_index)
        if form not in SUBPROTOCOLS:
            raise ValueError(f"not a cim subprotocol: {form!r}")
        self.form = form
        self.binary = form == PROTO
        self.ping_data = _WS_PINGS[form]
        self.host = host
        self.port = port
        self.path = path
        self.key = new_key()
        self.opened = False
        self.close_code: int | None = None
        self._head = b""
        self._parser = FrameParser(self.MAX_LENGTH)

    def encode(self, frame: Frame) -> bytes:
        if self.binary:
            return client_frame(BINARY, encode(frame))
        return client_frame(TEXT, frame_to_json(frame).encode("utf-8"))

    def connectionMade(self) -> None:
        try:
            self.transport.setTcpNoDelay(True)  # type: ignore[attr-defined]
        except Exception:
            pass
        self.transport.write(  # type: ignore[union-attr]
            handshake_request(self.host, self.port, self.path, self.form, self.key)
        )

    def dataReceived(self, data: bytes) -> None:
        if not self.opened:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > 16384:
                    self._refused("an opening handshake answer over 16 KB")
                return
            try:
                check_handshake(self._head[:end], self.key, self.form)
            except HandshakeError as e:
                self._refused(str(e))
                return
            data = self._head[end + 4 :]
            self._head = b""
            self.opened = True
            self.send_login()
            if not data:
                return
        try:
            messages = self._parser.feed(data)
        except WireError as e:
            self.worker.note("bad_frames", "{error}", error=str(e))
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        worker = self.worker
        for opcode, payload in messages:
            if opcode == BINARY or opcode == TEXT:
                if (opcode == BINARY) != self.binary:
                    worker.note(
                        "bad_frames",
                        "{form}: a message of opcode {opcode}",
                        form=self.form,
                        opcode=opcode,
                    )
                elif self.binary:
                    worker.frame(self, payload)
                else:
                    worker.frame_json(self, payload)
            elif opcode == PING:
                self.transport.write(client_frame(PONG, payload))  # type: ignore[union-attr]
            elif opcode == CLOSE:
                self._closed_by_server(payload)
                return

    def _refused(self, reason: str) -> None:
        if not self.login.called:
            self.login.errback(LoginRefused(reason))
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _closed_by_server(self, payload: bytes) -> None:
        """
        The server's close frame: answer it (the closing handshake) and
        let the server close the TCP connection.
        """
        self.close_code = close_code(payload)
        if self.close_code not in (None, 1000):
            self.worker.note(
                "ws_closes",
                "{user}: closed with {code} {reason}",
                user=self.user_id,
                code=self.close_code,
                reason=payload[2:].decode("utf-8", "replace"),
            )
        self.transport.write(client_frame(CLOSE, payload[:2]))  # type: ignore[union-attr]

    def close(self) -> None:
        if self.closed or self.transport is None:
            return
        if self.opened:
            self.transport.write(  # type: ignore[union-attr]
                client_frame(CLOSE, (1000).to_bytes(2, "big"))
            )
        self.transport.loseConnection()


async def bounded(
    items: Iterable[Any], concurrency: int, call: Callable[[Any], Awaitable[Any]]
) -> None:
    """
    Call C{call} on every item, at most C{concurrency} at a time.
    """
    iterator = iter(items)

    async def lane() -> None:
        for item in iterator:
            await call(item)

    await gatherResults([ensureDeferred(lane()) for _ in range(max(1, concurrency))])


def sleep(reactor: Any, seconds: float) -> Deferred[None]:
    return deferLater(reactor, max(0.0, seconds), lambda: None)


def friends_of(user: int, peers: Sequence[int], count: int) -> list[int]:
    """
    The C{count} users after C{user} in the sorted C{peers}, in a ring
    (every process computes the same).
    """
    ring = sorted(set(peers))
    if user not in ring or len(ring) < 2:
        return [p for p in ring if p != user][:count]
    at = ring.index(user)
    return [ring[(at + k) % len(ring)] for k in range(1, min(count, len(ring) - 1) + 1)]


class Worker:
    """
    The scenarios, as one load process runs them.  The harness sends the
    commands (see the module docstring); times are C{time.monotonic()}
    seconds, which every process of the machine shares.
    """

    log = Logger()

    def __init__(self, reactor: Any, emit: Callable[[dict[str, Any]], None]) -> None:
        self.reactor = reactor
        self.emit = emit
        self.spec: dict[str, Any] = {}
        self.index = 0
        self.mode = "cim"
        self.scenario = ""
        self.size = 100
        self.http: HTTPPool | None = None
        self.users: list[tuple[int, str]] = []
        self.clients: list[BenchClient] = []
        self.checker = Checker()
        self.ledger = Ledger()
        self.counters: dict[str, int] = {}
        self.login_latency = Histogram()
        self.http_latency = Histogram()
        self.ping_latency = Histogram()
        self.peers: list[int] = []
        self.group = ""
        self.fanout = 1
        #: Devices per user, and friends per user (0: any peer).
        self.devices = 1
        self.friends = 0
        self.sending = False
        self.closed_loop = True
        self.outstanding = 0
        self.last_receive = 0
        self.start = 0.0
        self.end = 0.0
        self.last_done = 0.0
        self.stopping = False
        self.servers: dict[str, int] = {}
        self._decoded: dict[bytes, list[ChatItem]] | None = None
        self._loops: list[LoopingCall] = []
        self._logged: dict[str, int] = {}
        self.heartbeat = 10.0
        #: C{"tcp"} or C{"ws"}, and the WebSocket subprotocols the users
        #: take in turn.
        self.transport = "tcp"
        self.forms: list[str] = list(SUBPROTOCOLS)
        #: Over WebSocket, per subprotocol: the latency of its deliveries,
        #: and its deliveries in the window.
        self.form_latency: dict[str, Histogram] = {}
        self.form_in_window: dict[str, int] = {}
        self._beats: list[list[BenchClient]] = []
        self._beat_tick = 0
        self._ack_tick = 0

    # Bookkeeping

    def count(self, name: str, amount: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + amount

    def note(self, kind: str, message: str, **kw: Any) -> None:
        """
        Count an event of C{kind} and log the first few of each kind.
        """
        self.count(kind)
        seen = self._logged[kind] = self._logged.get(kind, 0) + 1
        if seen <= 5:
            self.log.warn(
                "worker {index}: {kind}: " + message, index=self.index, kind=kind, **kw
            )

    # Commands

    def command(self, cmd: dict[str, Any]) -> None:
        name = cmd.get("cmd", "")
        handler = {
            "setup": self.setup,
            "login": self.login_phase,
            "run": self.run,
            "report": self.report,
            "stop": self.stop,
        }.get(name)
        if handler is None:
            self.emit({"event": "error", "message": f"unknown command {name!r}"})
            return
        ensureDeferred(handler(cmd)).addErrback(self._failed, name)

    def _failed(self, failure: Failure, name: str) -> None:
        self.log.failure(
            "worker {index}: {name} failed", failure, index=self.index, name=name
        )
        self.emit({"event": "error", "message": f"{name}: {failure.getTraceback()}"})

    def control_lost(self) -> None:
        """
        The harness went away: stop.
        """
        if not self.stopping:
            ensureDeferred(self.stop({}))

    async def setup(self, cmd: dict[str, Any]) -> None:
        """
        C{{mode, scenario, index, size, route: [host, port], secret,
        register: n, prefix, ids, concurrency, transport, subprotocols}}:
        register C{n} fresh users (or take C{ids} in raw mode).  With
        C{transport} C{"ws"} the clients will connect to the servers'
        WebSocket gateways, the users in turn in each of C{subprotocols}
        (both by default).
        """
        self.spec = cmd
        self.index = int(cmd.get("index", 0))
        self.mode = cmd.get("mode", "cim")
        self.scenario = cmd["scenario"]
        self.size = int(cmd.get("size", 100))
        if not 0 < self.size <= MAX_SIZE:
            raise ValueError(f"size must be 1..{MAX_SIZE}")
        self.checker = Checker(self.size)
        self.ledger = Ledger(track=bool(cmd.get("exact", False)))
        self.heartbeat = float(cmd.get("ping_interval", 10))
        self.transport = cmd.get("transport", "tcp")
        self.forms = list(cmd.get("subprotocols") or SUBPROTOCOLS)
        if self.transport not in ("tcp", "ws") or not set(self.forms) <= set(
            SUBPROTOCOLS
        ):
            raise ValueError(f"transport {self.transport!r}, forms {self.forms!r}")
        if self.transport == "ws" and self.mode != "cim":
            raise ValueError("WebSocket clients log in through the route")
        started = time.monotonic()
        if self.mode == "raw":
            self.users = [(int(i), f"u{i}") for i in cmd["ids"]]
        else:
            host, port = cmd["route"]
            self.http = HTTPPool(
                self.reactor, host, int(port), int(cmd.get("concurrency", 32))
            )
            names = [f"{cmd['prefix']}{i}" for i in range(int(cmd["register"]))]
            found: dict[str, int] = {}

            async def register(name: str) -> None:
                assert self.http is not None
                reply = await self.http.post("/registerAccount", {"userName": name})
                if reply.get("code") != "9000":
                    raise RuntimeError(f"/registerAccount {name}: {reply}")
                found[name] = int(reply["dataBody"]["userId"])

            await bounded(names, int(cmd.get("concurrency", 32)), register)
            self.users = [(found[n], n) for n in names]
        self.emit(
            {
                "event": "registered",
                "users": self.users,
                "elapsed": time.monotonic() - started,
            }
        )

    def _secret(self) -> dict[str, str]:
        return {"X-Cim-Secret": str(self.spec.get("secret", ""))}

    async def login_phase(self, cmd: dict[str, Any]) -> None:
        """
        C{{group, connect, bind: [addresses], concurrency, devices,
        part}}: join the group (if any), then log every user in (unless
        C{connect} is false) on C{devices} devices each (1 by default):
        each device after the first on another server than the first one
        where the route's round robin allows.  With C{part} C{[start,
        stop]}, only those of the registered users (the others may log in
        with another command); the answer counts every open connection.
        """
        started = time.monotonic()
        concurrency = int(cmd.get("concurrency", 32))
        self.devices = devices = max(1, int(cmd.get("devices", 1)))
        self.group = cmd.get("group") or ""
        if self.group:

            async def join(user: tuple[int, str]) -> None:
                assert self.http is not None
                reply = await self.http.post(
                    "/group/join",
                    {"userId": user[0], "groupId": self.group},
                    self._secret(),
                )
                if reply.get("code") != "9000":
                    raise RuntimeError(f"/group/join {user}: {reply}")

            await bounded(self.users, concurrency, join)
        failed = 0
        if cmd.get("connect", True):
            binds = cmd.get("bind") or [None]

            async def login(item: tuple[int, tuple[int, str]]) -> None:
                nonlocal failed
                k, (uid, name) = item
                first: BenchClient | None = None
                for index in range(devices):
                    try:
                        client = await self._login_retrying(
                            uid,
                            name,
                            binds[k % len(binds)],
                            device_index=index,
                            avoid=first.server if first is not None else "",
                            form=self.forms[k % len(self.forms)],
                        )
                    except Exception as e:
                        failed += 1
                        self.note(
                            "login_failures",
                            "{user}: {error}",
                            user=uid,
                            error=str(e),
                        )
                        return
                    if first is None:
                        first = client

            start, stop = cmd.get("part") or (0, len(self.users))
            await bounded(
                list(enumerate(self.users))[int(start) : int(stop)], concurrency, login
            )
        elapsed = time.monotonic() - started
        open_devices: dict[int, list[BenchClient]] = {}
        for c in self.clients:
            if not c.closed:
                open_devices.setdefault(c.user_id, []).append(c)
        complete = [u for u, cs in open_devices.items() if len(cs) == devices]
        self.emit(
            {
                "event": "ready",
                "logged_in": len(self.clients),
                "users": complete,
                "connections": sum(len(cs) for cs in open_devices.values()),
                "spread": sum(
                    1 for cs in open_devices.values() if len({c.server for c in cs}) > 1
                ),
                "failed": failed,
                "elapsed": elapsed,
                "servers": self.servers,
            }
        )

    async def _login_retrying(self, *args: Any, **kwargs: Any) -> BenchClient:
        """
        L{login_user}, again (after L{LOGIN_RETRY_DELAY} seconds, at most
        L{LOGIN_RETRIES} times) while the server answers that its store
        is unavailable and the client should log in again shortly, as a
        client does (counted in C{login_retries}).
        """
        for attempt in range(LOGIN_RETRIES + 1):
            try:
                return await self.login_user(*args, **kwargs)
            except LoginRefused as e:
                if attempt == LOGIN_RETRIES or not str(e).startswith(
                    f"{int(ErrorCode.STORE_ERROR)} "
                ):
                    raise
            self.count("login_retries")
            await deferLater(self.reactor, LOGIN_RETRY_DELAY, lambda: None)
        raise AssertionError("unreachable")

    async def login_user(
        self,
        uid: int,
        name: str,
        bind: str | None = None,
        previous: BenchClient | None = None,
        device_index: int = 0,
        avoid: str = "",
        form: str = "",
    ) -> BenchClient:
        """
        Log C{uid}'s device number C{device_index} in: route C{/login}
        with its device id (cim mode), then TCP (or, with C{transport}
        C{"ws"}, the WebSocket URL of the route's answer) and
        C{LOGIN_REQUEST} with the token, until C{LOGIN_RESPONSE}.

        @param previous: the connection this one replaces (same device):
            its token proves the login, its cursors (with their epochs)
            resume the conversations, and its unacknowledged messages are
            sent again (with the same client message ids, so that the
            server stores them once).
        @param avoid: C{"host:port"} of a server to avoid: ask the route
            again (a few times) while it names that one.
        @param form: over WebSocket (C{transport} C{"ws"}), the subprotocol
            (the first of C{forms} by default; a new connection of a
            device keeps its previous one's).
        """
        if previous is not None:
            device_index = previous.device_index
        device = "" if self.mode == "raw" else device_name(device_index)
        ws_url = ""
        if self.mode == "raw":
            host, port = self.spec["raw"]
            token = ""
        else:
            assert self.http is not None
            body: dict[str, Any] = {"userId": uid, "userName": name, "device": device}
            if previous is not None:
                body["token"] = previous.token
            for _ in range(8):
                # The load generator is a trusted back-end: the cluster
                # secret stands for the users' credentials.
                reply = await self.http.post("/login", body, self._secret())
                if reply.get("code") != "9000":
                    raise LoginRefused(
                        f"/login: {reply.get('code')} {reply.get('message')}"
                    )
                data = reply["dataBody"]
                host, port = data["ip"], int(data["cimServerPort"])
                token = data["token"]
                ws_url = str(data.get("wsUrl") or "")
                if not avoid or f"{host}:{port}" != avoid:
                    break
            if data.get("device", "") != device:
                raise LoginRefused(
                    f"/login: asked for device {device!r}, "
                    f"the answer names {data.get('device')!r}"
                )
        client: BenchClient
        if self.transport == "ws":
            if previous is not None:
                form = previous.form
            # The server's WebSocket gateway, as the route names it.
            url = urlsplit(ws_url)
            if url.scheme != "ws" or not url.hostname or not url.port:
                raise LoginRefused(f"/login: no ws:// URL: {ws_url!r}")
            client = WsBenchClient(
                self,
                uid,
                name,
                token,
                device,
                device_index,
                form or self.forms[0],
                url.hostname,
                url.port,
                url.path or "/",
            )
            connect_to: tuple[str, int] = (url.hostname, url.port)
        else:
            client = BenchClient(self, uid, name, token, device, device_index)
            connect_to = (host, int(port))
        client.bind = bind
        client.server = f"{host}:{port}"
        if previous is not None:
            client.seqs = previous.seqs
            client.cursors = previous.cursors
            client.friends = previous.friends
            client.next_cmid = previous.next_cmid
        endpoint = TCP4ClientEndpoint(
            self.reactor,
            connect_to[0],
            connect_to[1],
            timeout=30,
            bindAddress=(bind, 0) if bind else None,
        )
        await connectProtocol(endpoint, client)

        def late() -> None:
            if not client.login.called:
                client.login.errback(LoginRefused("no answer in 30 s"))

        timer = self.reactor.callLater(30, late)
        try:
            await client.login
        except BaseException:
            client.close()
            raise
        finally:
            if timer.active():
                timer.cancel()
        if previous is None:
            self.clients.append(client)
        else:
            self.clients[self.clients.index(previous)] = client
            client.pending = previous.pending
            for pending in client.pending.values():
                client.transport.write(pending.data)  # type: ignore[union-attr]
        self._heartbeat(client)
        where = f"{host}:{port}"
        self.servers[where] = self.servers.get(where, 0) + 1
        return client

    # Frames

    def frame(self, client: BenchClient, body: bytes) -> None:
        """
        One frame's protobuf bytes, from C{client}: chat messages and ACKs
        (nearly all of them) read without building a L{Frame}
        (L{decode_chat}: the same items, checked the same way), any other
        frame by L{_decode}.
        """
        if self._cached(client, body):
            return
        try:
            chat = decode_chat(body)
        except CodecError as e:
            self.note("bad_frames", "{error}", error=str(e))
            return
        if chat is None:
            self._decode(client, body, decode)
            return
        cmd, items, cmid = chat
        if cmd == Command.ACK:
            self._acked(client, cmid)
            return
        self._remember(body, items)
        self._receive(client, items)

    def _cached(self, client: BenchClient, body: bytes) -> bool:
        """
        Whether C{body}'s messages were decoded before (a group's message
        reaches every member in the same bytes): then received again.
        """
        cache = self._decoded
        if cache is not None:
            cached = cache.get(body)
            if cached is not None:
                self._receive(client, cached)
                return True
        return False

    def _remember(self, body: bytes, items: list[ChatItem]) -> None:
        """
        Keep C{body}'s decoded messages (L{_cached}), a bounded number.
        """
        cache = self._decoded
        if cache is not None:
            if len(cache) > 4096:
                cache.clear()
            cache[body] = items

    def frame_json(self, client: BenchClient, text: bytes) -> None:
        """
        One frame in the proto3 JSON form (UTF-8), from C{client}.
        """
        self._decode(client, text, frame_from_json)

    def _decode(
        self, client: BenchClient, body: bytes, decoder: Callable[[bytes], Frame]
    ) -> None:
        if self._cached(client, body):
            return
        try:
            frame = decoder(body)
        except CodecError as e:
            self.note("bad_frames", "{error}", error=str(e))
            return
        self._dispatch(client, frame, body)

    def _dispatch(self, client: BenchClient, frame: Frame, body: bytes) -> None:
        cmd = frame.cmd
        if cmd == Command.MESSAGE or cmd == Command.OFFLINE:
            items: list[ChatItem]
            if frame.messages:
                items = [
                    (m.text, m.sender_id, m.conversation, m.seq, m.epoch)
                    for m in frame.messages
                ]
            elif frame.batch:
                items = [(text, None, "", 0, "") for text in frame.batch]
            elif frame.req_msg:
                # The raw server forwards the sender's own frame.
                items = [(frame.req_msg, None, "", 0, "")]
            else:
                items = []
            self._remember(body, items)
            self._receive(client, items)
        elif cmd == Command.ACK:
            self._acked(client, frame.client_msg_id)
        elif cmd == Command.PING:
            if client.pings:
                self.ping_latency.add(now_us() - client.pings.popleft())
            self.count("pongs")
        elif cmd == Command.LOGIN_RESPONSE:
            if frame.device != client.device:
                self.note(
                    "device_mismatch",
                    "{user}: logged in as device {device!r}, the server says {said!r}",
                    user=client.user_id,
                    device=client.device,
                    said=frame.device,
                )
            self._announced(client, frame)
            client.logged_in = True
            if not client.login.called:
                client.login.callback(None)
        elif cmd == Command.EPOCH:
            self.count("epoch_frames")
            self._announced(client, frame)
        elif cmd == Command.READ:
            self.count("read_frames")
        elif cmd == Command.ERROR:
            self._error(client, frame)
        elif cmd == Command.KICK:
            if frame.error_reason in (KICK_REPLACED, KICK_DEVICE_LIMIT):
                client.final = True
            self.note(
                "kicked",
                "{user} ({device}): {reason}",
                user=client.user_id,
                device=client.device,
                reason=frame.error_reason,
            )

    def _announced(self, client: BenchClient, frame: Frame) -> None:
        resets = client.announced(frame.cursors)
        if resets:
            self.note(
                "resets",
                "{user} ({device}): {n} conversations reset",
                user=client.user_id,
                device=client.device,
                n=resets,
            )

    def _receive(self, client: BenchClient, items: list[ChatItem]) -> None:
        """
        Check what C{client} received, and keep its cursors: the highest
        seq of each conversation's stream.  A seq at or below it is a
        step back in the conversation's order (counted as
        C{seq_regressions}); a conversation the server had not announced
        takes the epoch of its first message (C{unannounced}).
        """
        now = now_us()
        receive = self.checker.receive
        uid = client.user_id
        device = client.device_index
        cursors = client.cursors
        form = client.form
        latencies = None
        if form:
            latencies = self.form_latency.get(form)
            if latencies is None:
                latencies = self.form_latency[form] = Histogram()
            window = self.checker.window
            in_window = window[0] <= now <= window[1]
        for text, sender_id, conversation, seq, epoch in items:
            latency = receive(uid, text, now, sender_id, device)
            if latencies is not None and latency is not None:
                latencies.add(latency)
                if in_window:
                    self.form_in_window[form] = self.form_in_window.get(form, 0) + 1
            if not conversation:
                continue
            cursor = cursors.get(conversation)
            if cursor is None:
                self.count("unannounced")
                cursors[conversation] = [epoch, seq]
                client.moved.add(conversation)
            elif seq > cursor[1]:
                cursor[1] = seq
                client.moved.add(conversation)
            else:
                self.count("seq_regressions")
        self.last_receive = now

    def _acked(self, client: BenchClient, cmid: str) -> None:
        if client.pending.pop(cmid, None) is None:
            self.count("unknown_acks")
            return
        self.outstanding -= 1
        self.count("acked")
        if self.sending and self.closed_loop:
            self._send(client)

    def _error(self, client: BenchClient, frame: Frame) -> None:
        reason = f"{frame.error_code} {frame.error_reason}"
        if not client.logged_in:
            if not client.login.called:
                client.login.errback(LoginRefused(reason))
            return
        pending = (
            client.pending.pop(frame.client_msg_id, None)
            if frame.client_msg_id
            else None
        )
        if pending is None:
            self.note("errors", "{user}: {reason}", user=client.user_id, reason=reason)
            return
        self.outstanding -= 1
        self.ledger.cancel(
            client.user_id,
            pending.fanout,
            (client.device_index, pending.target, pending.counter),
        )
        self.note("rejected", "{user}: {reason}", user=client.user_id, reason=reason)
        if self.sending and self.closed_loop:
            self.reactor.callLater(0.05, self._send_if_sending, client)

    def client_lost(self, client: BenchClient) -> None:
        """
        A connection closed.  Unless the run is over, log in again (as
        clients do), resuming from the cursors.
        """
        if client.logged_in and not self.stopping:
            self.note("dropped", "{user} lost its connection", user=client.user_id)
            if client.final:
                # Replaced or over the device limit: clients stop there.
                self.note("final", "{user} stays logged out", user=client.user_id)
                return
            if self.mode == "cim" and client in self.clients:
                delay = 0.5 + random.random()
                self.reactor.callLater(
                    delay, lambda: ensureDeferred(self._relogin(client))
                )

    async def _relogin(self, previous: BenchClient) -> None:
        for attempt in range(10):
            if self.stopping:
                return
            try:
                await self.login_user(
                    previous.user_id, previous.name, previous.bind, previous
                )
            except Exception as e:
                self.note(
                    "relogin_failures",
                    "{user}: {error}",
                    user=previous.user_id,
                    error=str(e),
                )
                await sleep(self.reactor, 1.0 + attempt)
                continue
            self.count("relogins")
            return

    # Sending

    def _send_if_sending(self, client: BenchClient) -> None:
        if self.sending:
            self._send(client)

    def _send(self, client: BenchClient) -> None:
        if client.closed:
            return
        sender = client.user_id
        now = now_us()
        if self.group:
            target: int | str = self.group
            kind = "g"
        else:
            peers = client.friends or self.peers
            target = peers[random.randrange(len(peers))]
            while target == sender:
                target = peers[random.randrange(len(peers))]
            kind = "p"
        seq = client.seqs[target] = client.seqs.get(target, 0) + 1
        device = client.device_index
        text = make_text(kind, sender, target, seq, now, self.size, device)
        client.next_cmid += 1
        # Unique per user, not only per device: the store keeps a send's id
        # per sender, and takes a second send with the same id (from
        # another device) for a retry of the first.
        cmid = f"{device}.{client.next_cmid}"
        self.outstanding += 1
        self.ledger.sent_message(
            sender,
            self.fanout,
            self.checker.window[0] <= now <= self.checker.window[1],
            (device, str(target), seq),
        )
        if kind == "g":
            frame = Frame(
                cmd=Command.MESSAGE,
                group_id=self.group,
                req_msg=text,
                client_msg_id=cmid,
            )
        else:
            frame = Frame(
                cmd=Command.MESSAGE,
                receive_user_id=int(target),
                req_msg=text,
                client_msg_id=cmid,
            )
        data = client.encode(frame)
        client.pending[cmid] = Pending(self.fanout, data, str(target), seq)
        client.transport.write(data)  # type: ignore[union-attr]

    def _heartbeat(self, client: BenchClient) -> None:
        """
        Have C{client} send a PING every L{heartbeat} seconds from now on,
        as clients do (the server drops silent connections).  The clients
        are spread over slots of 0.1 s so that the PINGs are evenly spread.
        """
        if not self._beats:
            slots = max(1, round(self.heartbeat / 0.1))
            self._beats = [[] for _ in range(slots)]
            self._loop(self.heartbeat / slots, self._beat)
        self._beats[random.randrange(len(self._beats))].append(client)

    def _beat(self) -> None:
        slot = self._beats[self._beat_tick % len(self._beats)]
        self._beat_tick += 1
        now = now_us()
        alive = [c for c in slot if not c.closed]
        for client in alive:
            client.pings.append(now)
            client.transport.write(client.ping_data)  # type: ignore[union-attr]
        slot[:] = alive
        self.count("pings", len(alive))

    def _ack_slot(self) -> None:
        """
        The ACKs of the next of the L{ACK_SLOTS} slots of connections
        (every L{ACK_SLOTS}th one): called L{ACK_SLOTS} times a second,
        it has each connection acknowledge once a second, the connections
        spread over the second.
        """
        slot = self._ack_tick % ACK_SLOTS
        self._ack_tick += 1
        self._ack_cursors(self.clients[slot::ACK_SLOTS])

    def _ack_cursors(self, clients: Sequence[BenchClient]) -> None:
        """
        Send the cumulative ACKs of what each of C{clients} received, as
        cim clients do: each carries the cursors that moved since the last.
        """
        # The same cursors make the same bytes over TCP (a group's members
        # acknowledge the same message): encoded once.  (A WebSocket
        # client's frames are masked, each its own.)
        shared: dict[tuple[Cursor, ...], bytes] = {}
        for client in clients:
            if client.moved and not client.closed:
                cursors = client.moved_cursors()
                if type(client) is BenchClient:
                    key = tuple(cursors)
                    data = shared.get(key)
                    if data is None:
                        data = shared[key] = client.encode(
                            Frame(cmd=Command.ACK, cursors=cursors)
                        )
                else:
                    data = client.encode(Frame(cmd=Command.ACK, cursors=cursors))
                client.transport.write(data)  # type: ignore[union-attr]

    def _loop(self, interval: float, call: Callable[[], object]) -> LoopingCall:
        loop = LoopingCall(call)
        loop.clock = self.reactor
        loop.start(interval, now=False).addErrback(self._failed, "loop")
        self._loops.append(loop)
        return loop

    # The measured run

    async def run(self, cmd: dict[str, Any]) -> None:
        """
        C{{start, duration, peers, window, senders, fanout, friends, rate,
        cap, concurrency, ping_interval, quiet, drain}}: wait for C{start},
        run the scenario for C{duration} seconds, then wait until every
        sent message was acknowledged and nothing arrived for C{quiet}
        seconds (at most C{drain} seconds), and answer C{quiet}.

        C{fanout} is the deliveries each message makes (a private message:
        every device of the receiver and of the sender, its echo
        included); with C{friends}, each user sends only to the
        C{friends} users after it in C{peers} (in a ring).
        """
        self.start = float(cmd["start"])
        self.end = self.start + float(cmd["duration"])
        self.checker.window = (int(self.start * 1e6), int(self.end * 1e6))
        self.peers = [int(p) for p in cmd.get("peers", [])]
        self.fanout = int(cmd.get("fanout", 1))
        self.friends = int(cmd.get("friends", 0))
        if self.friends:
            for client in self.clients:
                client.friends = friends_of(client.user_id, self.peers, self.friends)
        if self.scenario == "group":
            self._decoded = {}
            self.checker.parsed = {}
        if self.mode == "cim" and self.clients:
            self._loop(1.0 / ACK_SLOTS, self._ack_slot)
        await sleep(self.reactor, self.start - time.monotonic())
        scenario = self.scenario
        if scenario in ("raw", "p2p", "group", "devices", "ws"):
            await self._closed_loop(cmd)
        elif scenario == "p2p-latency":
            await self._open_loop(cmd)
        elif scenario == "http":
            await self._http(cmd)
        elif scenario == "login":
            await self._logins(cmd)
        elif scenario in ("connections", "ws-idle"):
            await self._hold(cmd)
        else:
            raise ValueError(f"unknown scenario {scenario!r}")
        timed_out = await self._drain(
            float(cmd.get("quiet", 0.5)), float(cmd.get("drain", 10))
        )
        self.emit({"event": "quiet", "timeout": timed_out})

    async def _closed_loop(self, cmd: dict[str, Any]) -> None:
        """
        Each sender keeps C{window} messages unacknowledged: one more goes
        out with each ACK, until the end.
        """
        senders = self.clients[: int(cmd.get("senders", len(self.clients)))]
        window = int(cmd.get("window", 4))
        self.closed_loop = True
        self.sending = True
        for client in senders:
            for _ in range(window):
                self._send(client)
        await sleep(self.reactor, self.end - time.monotonic())
        self.sending = False

    async def _open_loop(self, cmd: dict[str, Any]) -> None:
        """
        A fixed offered load: C{rate} messages a second from the clients in
        turn (skipping one that has C{cap} unacknowledged).
        """
        rate = float(cmd["rate"])
        cap = int(cmd.get("cap", 50))
        clients = self.clients
        order = list(range(len(clients)))
        random.shuffle(order)
        self.closed_loop = False
        self.sending = True
        issued = 0
        turn = 0
        done: Deferred[None] = Deferred()

        def tick() -> None:
            nonlocal issued, turn
            now = time.monotonic()
            due = int((min(now, self.end) - self.start) * rate)
            while issued < due:
                client = clients[order[turn % len(order)]]
                turn += 1
                issued += 1
                if client.closed or len(client.pending) >= cap:
                    self.count("skipped")
                    continue
                self._send(client)
            if now >= self.end:
                loop.stop()
                done.callback(None)

        loop = LoopingCall(tick)
        loop.clock = self.reactor
        loop.start(0.005)
        await done
        self.sending = False

    async def _http(self, cmd: dict[str, Any]) -> None:
        """
        C{concurrency} HTTP clients, each for one sender, calling
        C{/p2pRoute} back to back until the end.
        """
        assert self.http is not None
        concurrency = min(int(cmd.get("concurrency", 8)), len(self.users))
        auth = cmd.get("auth", "secret")
        tokens = {c.user_id: c.token for c in self.clients}
        window = self.checker.window

        async def lane(sender: int) -> None:
            assert self.http is not None
            headers = (
                self._secret()
                if auth == "secret"
                else {"Authorization": f"Bearer {tokens[sender]}"}
            )
            seqs: dict[int, int] = {}
            peers = self.peers
            while time.monotonic() < self.end:
                target = peers[random.randrange(len(peers))]
                if target == sender:
                    continue
                seq = seqs[target] = seqs.get(target, 0) + 1
                sent = now_us()
                text = make_text("p", sender, target, seq, sent, self.size, NO_DEVICE)
                stream = (NO_DEVICE, str(target), seq)
                self.ledger.sent_message(
                    sender, self.fanout, window[0] <= sent <= window[1], stream
                )
                try:
                    reply = await self.http.post(
                        "/p2pRoute",
                        {"userId": sender, "receiveUserId": target, "msg": text},
                        headers,
                    )
                except Exception as e:
                    # Unknown whether it was stored: keep expecting it.
                    self.note("http_failures", "{error}", error=str(e))
                    await sleep(self.reactor, 0.05)
                    continue
                code = reply.get("code")
                done = now_us()
                if code == "9000":
                    self.count("http_ok")
                    if window[0] <= done <= window[1]:
                        self.count("http_ok_in_window")
                    self.http_latency.add(done - sent)
                elif code == "7000":
                    self.note("http_offline", "{target} offline", target=target)
                else:
                    self.ledger.cancel(sender, self.fanout, stream)
                    self.note(
                        "http_errors",
                        "{code} {reason}",
                        code=code,
                        reason=reply.get("message"),
                    )

        senders = [uid for uid, _ in self.users[:concurrency]]
        await gatherResults([ensureDeferred(lane(s)) for s in senders])

    async def _logins(self, cmd: dict[str, Any]) -> None:
        """
        Log in the registered users (route and TCP), C{concurrency} at a
        time, until they are all in or the end; connections stay open.
        """
        queue = list(enumerate(self.users))
        queue.reverse()
        binds = cmd.get("bind") or [None]
        window = self.checker.window

        async def lane() -> None:
            while queue and time.monotonic() < self.end:
                k, (uid, name) = queue.pop()
                started = now_us()
                try:
                    await self.login_user(uid, name, binds[k % len(binds)])
                except Exception as e:
                    self.note(
                        "login_failures", "{user}: {error}", user=uid, error=str(e)
                    )
                    continue
                done = now_us()
                self.login_latency.add(done - started)
                self.count("logins")
                if done <= window[1]:
                    self.count("logins_in_window")
                self.last_done = done / 1e6

        await gatherResults(
            [ensureDeferred(lane()) for _ in range(int(cmd.get("concurrency", 16)))]
        )

    async def _hold(self, cmd: dict[str, Any]) -> None:
        """
        Keep every connection open (each sends its PING every
        L{heartbeat} seconds) until the end; count the PINGs of this time.
        """
        self.ping_latency = Histogram()
        pings = self.counters.get("pings", 0)
        pongs = self.counters.get("pongs", 0)
        await sleep(self.reactor, self.end - time.monotonic())
        # Let the last PINGs be answered.
        await sleep(self.reactor, 1.0)
        self.counters["hold_pings"] = self.counters.get("pings", 0) - pings
        self.counters["hold_pongs"] = self.counters.get("pongs", 0) - pongs

    async def _drain(self, quiet: float, drain: float) -> bool:
        """
        Wait until nothing is unacknowledged and nothing arrived for
        C{quiet} seconds.  @return: whether C{drain} seconds passed first.
        """
        deadline = time.monotonic() + drain
        while time.monotonic() < deadline:
            if self.outstanding <= 0 and now_us() - self.last_receive >= quiet * 1e6:
                return False
            await sleep(self.reactor, 0.05)
        return True

    async def report(self, cmd: dict[str, Any]) -> None:
        stale = now_us() - 2_000_000
        report = checker_report(self.checker, self.ledger)
        report.update(
            {
                "event": "report",
                "index": self.index,
                "counters": self.counters,
                "outstanding": self.outstanding,
                "clients": len(self.clients),
                "held": sum(1 for c in self.clients if not c.closed),
                "missing_pongs": sum(
                    1 for c in self.clients for t in c.pings if t < stale
                ),
                "last_done": self.last_done,
                "login_latency": self.login_latency.to_dict(),
                "http_latency": self.http_latency.to_dict(),
                "ping_latency": self.ping_latency.to_dict(),
                "servers": self.servers,
                "forms": {
                    form: {
                        "clients": sum(1 for c in self.clients if c.form == form),
                        "delivered_in_window": self.form_in_window.get(form, 0),
                        "latency": self.form_latency.get(form, Histogram()).to_dict(),
                    }
                    for form in (self.forms if self.transport == "ws" else ())
                },
            }
        )
        self.emit(report)

    async def stop(self, cmd: dict[str, Any]) -> None:
        self.stopping = True
        self.sending = False
        for loop in self._loops:
            if loop.running:
                loop.stop()
        for client in self.clients:
            client.close()
        if self.http is not None:
            self.http.close()
        self.emit({"event": "stopped"})
        self.reactor.callLater(0.2, self.reactor.stop)


class Control(LineReceiver):
    """
    The harness's commands on stdin, one JSON object per line.
    """

    delimiter = b"\n"
    MAX_LENGTH = 256 * 1024 * 1024

    def __init__(self) -> None:
        self.worker: Worker | None = None

    def send(self, event: dict[str, Any]) -> None:
        self.sendLine(json.dumps(event, separators=(",", ":")).encode("utf-8"))

    def lineReceived(self, line: bytes) -> None:
        if not line.strip():
            return
        assert self.worker is not None
        try:
            cmd = json.loads(line)
        except ValueError as e:
            self.send({"event": "error", "message": f"bad command: {e}"})
            return
        self.worker.command(cmd)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self.worker is not None:
            self.worker.control_lost()


def raise_fd_limit() -> int:
    """
    Raise C{RLIMIT_NOFILE} to its hard limit.  @return: the new limit.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def main() -> None:
    from twisted.internet import reactor, stdio
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    # Warnings and errors only: Twisted logs every connection's factory.
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr),
                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
            )
        ],
        redirectStandardIO=False,
    )
    raise_fd_limit()
    control = Control()
    control.worker = Worker(reactor, control.send)
    stdio.StandardIO(control, reactor=reactor)
    # The collector's pace of the daemons it measures: thousands of clients'
    # cursors and pending sends are long-lived objects.
    tune_gc(GC_YOUNG)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
