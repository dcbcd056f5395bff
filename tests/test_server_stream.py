"""
L{cim.server.stream}: in-order delivery of each conversation to a
connection, driven on a L{task.Clock} without a server; and the
L{IClientLink} that the wire adapter provides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from cim.interfaces import Epoch, NewMessage
from cim.message import (
    ChatMessage,
    Command,
    Cursor,
    Frame,
    Position,
    group_conversation,
    pair_conversation,
)
from cim.metrics import Counter
from cim.server import stream as stream_module
from cim.server import wire
from cim.server.connection import Connection
from cim.server.link import IClientLink
from cim.server.stream import GAP_WAIT, Stream, Streams
from cim.store.memory import MemoryStore
from tests.serverkit import CountingStore, Peer, World

BOB = 2
CONVERSATION = pair_conversation(1, BOB)
#: The epoch of every conversation of these tests.
EPOCH = Epoch("e1")


@implementer(IClientLink)
class RecordingLink:
    """
    Records what the core writes to a connection.
    """

    def __init__(self) -> None:
        self.writes: list[Frame | wire.Batch] = []
        self.closed = False

    def send(self, frame: Frame) -> None:
        self.writes.append(frame)

    def send_batch(self, batch: wire.Batch) -> None:
        self.writes.append(batch)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def backed_up(self) -> bool:
        return False

    def drained(self) -> Deferred[None]:
        return succeed(None)

    def texts(self) -> list[str]:
        """
        The texts written since the last call, in order.
        """
        writes, self.writes = self.writes, []
        out: list[str] = []
        for write in writes:
            frame = write.frame() if isinstance(write, wire.Batch) else write
            out.extend(m.text for m in frame.messages)
        return out


class Control:
    """
    Records kicks and errors instead of acting on them.
    """

    def __init__(self) -> None:
        self.kicks: list[tuple[Connection, str]] = []

    def error(
        self,
        conn: Connection,
        code: int,
        reason: str,
        close: bool = False,
        client_msg_id: str = "",
    ) -> None:
        raise AssertionError(f"unexpected error {code} {reason}")

    def kick(self, conn: Connection, reason: str, redirect: str = "") -> None:
        self.kicks.append((conn, reason))


class CountingReads(CountingStore):
    """
    A memory store that counts its reads (and, once L{count} is called,
    every call), and holds its reads while C{slow}.
    """

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.reads: list[tuple[str, int]] = []
        self.slow = False
        self.held: list[tuple[Deferred[list[ChatMessage]], Deferred]] = []

    def read(
        self, conversation: str, after_seq: int, limit: int
    ) -> Deferred[list[ChatMessage]]:
        self.reads.append((conversation, after_seq))
        d = super().read(conversation, after_seq, limit)
        if not self.slow:
            return d
        held: Deferred[list[ChatMessage]] = Deferred()
        self.held.append((d, held))
        return held

    def release(self) -> None:
        self.slow = False
        while self.held:
            d, held = self.held.pop(0)
            d.chainDeferred(held)


class Setting:
    """
    A L{Streams} over a memory store, and connections to it.
    """

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = CountingReads(self.clock)
        self.seed(self.store)
        self.control = Control()
        self.written = Counter("written", "")
        self.streams = Streams(self.clock, self.store, self.control, self.written)

    @staticmethod
    def seed(store: MemoryStore) -> None:
        """
        Give the conversations of these tests the epoch L{EPOCH}.
        """
        for conversation in (CONVERSATION, group_conversation("team")):
            store._epochs[conversation] = EPOCH

    def connect(self, **positions: int) -> tuple[Connection, RecordingLink]:
        """
        A logged-in connection of bob's, at C{positions} (by conversation,
        C{inbox} for the one with alice) in its conversations.
        """
        link = RecordingLink()
        conn = Connection(link, "10.0.0.1:5000", self.clock.seconds())
        conn.user_id = BOB
        for name, delivered in positions.items():
            conversation = CONVERSATION if name == "inbox" else name
            conn.streams[conversation] = Stream(conversation, delivered, epoch=EPOCH)
        return conn, link

    def store_texts(
        self, *texts: str, conversation: str = CONVERSATION
    ) -> list[ChatMessage]:
        """
        Store C{texts} from alice (user 1) in C{conversation}.
        """
        results: list[list[ChatMessage]] = []
        self.store.append(
            [NewMessage(conversation, 1, "alice", text) for text in texts]
        ).addCallback(results.append)
        [stored] = results
        return stored

    def offer(self, conn: Connection, messages: Sequence[ChatMessage]) -> None:
        self.streams.offer(conn, messages, wire.Batch(messages))


def test_the_wire_adapter_provides_iclientlink() -> None:
    peer = Peer(World().server)
    assert verifyObject(IClientLink, peer.protocol)
    assert verifyObject(IClientLink, RecordingLink())


def test_in_order_messages_are_written_as_the_shared_batch() -> None:
    setting = Setting()
    conn, link = setting.connect(inbox=0)
    stored = setting.store_texts("one", "two")
    batch = wire.Batch(stored)
    setting.streams.offer(conn, stored, batch)
    assert link.writes == [batch]
    assert conn.streams[CONVERSATION].delivered == 2
    assert setting.written.value == 2
    assert setting.store.reads == []


def test_duplicates_are_dropped() -> None:
    setting = Setting()
    conn, link = setting.connect(inbox=0)
    one, two = setting.store_texts("one", "two")
    setting.offer(conn, [one])
    setting.offer(conn, [one])
    setting.offer(conn, [one, two])
    assert link.texts() == ["one", "two"]
    setting.offer(conn, [two])
    assert link.texts() == []
    assert conn.streams[CONVERSATION].delivered == 2


def test_a_gap_is_held_then_filled_from_the_store_on_the_clock() -> None:
    setting = Setting()
    conn, link = setting.connect(inbox=0)
    stored = setting.store_texts("one", "two", "three")
    # Only the last one arrives live: the others are still on their way.
    setting.offer(conn, stored[2:])
    stream = conn.streams[CONVERSATION]
    assert link.texts() == [] and list(stream.pending) == [3]
    setting.clock.advance(GAP_WAIT / 2)
    assert link.texts() == [] and setting.store.reads == []
    setting.clock.advance(GAP_WAIT / 2)
    assert setting.store.reads == [(CONVERSATION, 0)]
    assert link.texts() == ["one", "two", "three"]
    assert stream.delivered == 3 and not stream.pending and not stream.filling
    # What arrives late is a duplicate by now.
    setting.offer(conn, stored[:2])
    assert link.texts() == []


def test_live_messages_the_store_lost_are_not_written_over_the_gap() -> None:
    # Simulator seed 2534 in short: "three", "four" and "five" were stored,
    # then the store was restored to a backup taken after "two", and "five"
    # arrives live.  The store holds nothing after "two": "five" is
    # dropped, not written over the gap (it would tell the client it saw
    # the epoch up to 5, and the gap's messages would never be shown if a
    # restore to a later backup brought them back).
    setting = Setting()
    setting.store_texts("one", "two")
    conn, link = setting.connect(inbox=2)
    earlier = setting.store.restored()
    setting.store_texts("three", "four")
    later = setting.store.restored()
    [five] = setting.store_texts("five")
    setting.streams.store = earlier
    setting.offer(conn, [five])
    stream = conn.streams[CONVERSATION]
    setting.clock.advance(GAP_WAIT)
    assert link.texts() == []
    assert stream.delivered == 2 and not stream.pending and not stream.filling
    assert stream.epoch == EPOCH
    # Restored to the later backup: its next message starts an epoch that
    # follows EPOCH at 4.  Bob resumes at 2 without a reset, and gets the
    # gap's messages.
    setting.streams.store = later
    [six] = later.append([NewMessage(CONVERSATION, 1, "alice", "six")]).result
    assert six.epoch != EPOCH.id and six.seq == 5
    setting.offer(conn, [six])
    told, *rest = frames(link)
    assert list(told.cursors) == [Cursor(CONVERSATION, 2, six.epoch, False)]
    assert [m.text for frame in rest for m in frame.messages] == [
        "three",
        "four",
        "six",
    ]
    assert stream.delivered == 5 and not stream.pending and not stream.filling


def test_an_empty_page_read_before_the_held_messages_were_stored_is_read_again() -> (
    None
):
    # The replay asks the store before the conversation's messages are
    # stored, and the last of them, offered live, overtakes the (empty)
    # answer: the store is asked again, and holds them all.
    setting = Setting()
    conn, link = setting.connect()
    stream = conn.streams[CONVERSATION] = Stream(
        CONVERSATION, 0, filling=True, epoch=EPOCH
    )
    setting.store.slow = True
    ensureDeferred(setting.streams.fill(conn, stream, Command.OFFLINE))
    assert setting.store.reads == [(CONVERSATION, 0)]
    three = setting.store_texts("one", "two", "three")[2]
    setting.offer(conn, [three])
    setting.store.release()
    assert link.texts() == ["one", "two", "three"]
    assert setting.store.reads == [(CONVERSATION, 0)] * 2
    assert stream.delivered == 3 and not stream.pending and not stream.filling


def test_a_gap_closed_live_costs_no_store_read() -> None:
    setting = Setting()
    conn, link = setting.connect(inbox=0)
    one, two, three = setting.store_texts("one", "two", "three")
    setting.offer(conn, [one])
    setting.offer(conn, [three])
    setting.offer(conn, [two])
    assert link.texts() == ["one", "two", "three"]
    setting.clock.advance(GAP_WAIT)
    assert setting.store.reads == []
    assert link.texts() == []


def test_connections_with_the_same_gap_share_one_store_read() -> None:
    setting = Setting()
    group = group_conversation("team")
    stored = setting.store_texts("one", "two", conversation=group)
    links = []
    for _ in range(3):
        conn, link = setting.connect(**{group: 0})
        setting.offer(conn, stored[1:])
        links.append(link)
    setting.store.slow = True
    setting.clock.advance(GAP_WAIT)
    assert setting.store.reads == [(group, 0)]
    assert [link.texts() for link in links] == [[]] * 3
    setting.store.release()
    assert setting.store.reads == [(group, 0)]
    assert [link.texts() for link in links] == [["one", "two"]] * 3


def test_live_messages_wait_for_the_replay_then_drain() -> None:
    setting = Setting()
    conn, link = setting.connect()
    one, two = setting.store_texts("one", "two")
    # Bob's replay is about to read; meanwhile two (already stored) and a
    # third (still being stored) arrive live.
    stream = conn.streams[CONVERSATION] = Stream(
        CONVERSATION, 0, filling=True, epoch=EPOCH
    )
    three = replace(two, seq=3, msg_id=two.msg_id + 1, text="three")
    setting.offer(conn, [two])
    setting.offer(conn, [three])
    assert link.writes == [] and sorted(stream.pending) == [2, 3]
    ensureDeferred(setting.streams.fill(conn, stream, Command.OFFLINE))
    replayed, live = frames(link)
    assert replayed.cmd == Command.OFFLINE
    assert [m.text for m in replayed.messages] == ["one", "two"]
    assert live.cmd == Command.MESSAGE
    assert [m.text for m in live.messages] == ["three"]
    assert stream.delivered == 3 and not stream.pending and not stream.filling


def test_a_conversation_joined_since_login_starts_at_the_join() -> None:
    setting = Setting()
    conn, link = setting.connect(inbox=0)
    group = group_conversation("team")
    setting.store.create_group("team", 1)
    setting.store_texts("before", "joined", "after", conversation=group)
    # The route records where the user joined (its read position too).
    setting.store.join_group("team", BOB, 1)
    setting.store.set_read(BOB, group, 3)
    last = setting.store_texts("live", conversation=group)
    setting.offer(conn, last)
    epoch, *rest = link.writes
    assert isinstance(epoch, Frame) and epoch.cmd == Command.EPOCH
    assert list(epoch.cursors) == [Cursor(group, 1, EPOCH.id, False)]
    link.writes = rest
    assert link.texts() == ["joined", "after", "live"]
    assert conn.streams[group].delivered == 4
    assert conn.streams[group].epoch == EPOCH


def test_a_conversation_adopted_starts_at_the_device_cursor_first() -> None:
    setting = Setting()
    conn, link = setting.connect(inbox=0)
    group = group_conversation("team")
    setting.store.create_group("team", 1)
    setting.store.join_group("team", BOB, 1)
    setting.store_texts("one", "two", "three", conversation=group)
    # The device's cursor, as its login read it.
    conn.acked[group] = Position(EPOCH.id, 2)
    setting.store.count()
    setting.offer(conn, setting.store_texts("four", conversation=group))
    assert link.texts() == ["three", "four"]
    assert conn.acked[group] == Position(EPOCH.id, 2)
    # Where bob joined, then the gap before "four".
    assert setting.store.names() == ["append", "group_info", "read"]


def frames(link: RecordingLink) -> list[Frame]:
    """
    The frames written to C{link} since the last call.
    """
    writes, link.writes = link.writes, []
    return [w.frame() if isinstance(w, wire.Batch) else w for w in writes]


def test_adopting_a_new_pair_conversation_costs_no_store_call() -> None:
    # Carol writes to bob for the first time since his login: nothing to
    # read, what arrived is written at once; no EPOCH frame (bob's client
    # takes the epoch from the first message).
    setting = Setting()
    conn, link = setting.connect(inbox=0)
    conversation = pair_conversation(BOB, 3)
    setting.store._epochs[conversation] = EPOCH
    stored = setting.store_texts("one", "two", "three", conversation=conversation)
    setting.store.count()
    setting.offer(conn, stored[:2])
    setting.offer(conn, stored[2:])
    assert setting.store.calls == []
    first, second = frames(link)
    assert first.messages[0].epoch == EPOCH.id
    # The two that came together go together.
    assert [m.text for m in first.messages] == ["one", "two"]
    assert [m.text for m in second.messages] == ["three"]
    stream = conn.streams[conversation]
    assert stream.delivered == 3 and not stream.pending and not stream.filling
    assert stream.epoch.id == EPOCH.id
    setting.clock.advance(GAP_WAIT)
    assert setting.store.calls == []
    # Bob acknowledges in the epoch he was told.
    assert conn.acknowledge([Cursor(conversation, 3, EPOCH.id)]) == 0


def test_adopting_a_pair_conversation_runs_no_coroutine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The common adoption is done within offer: no Deferred, no coroutine.
    setting = Setting()
    conn, link = setting.connect()
    one, two = setting.store_texts("one", "two")

    def no_coroutine(*args: object) -> None:
        raise AssertionError("a coroutine was started")

    monkeypatch.setattr(stream_module, "ensureDeferred", no_coroutine)
    setting.offer(conn, [one])
    setting.offer(conn, [two])
    assert link.texts() == ["one", "two"]
    assert conn.streams[CONVERSATION].delivered == 2


def test_a_gap_closed_on_many_connections_is_encoded_once() -> None:
    # Two of a group's members: the second message arrived first (from
    # another server), then the first closes the gap; both get the same
    # frame, made once, though no batch of the two was offered.
    setting = Setting()
    one, two = setting.store_texts("one", "two")
    links = []
    for _ in range(2):
        conn, link = setting.connect(inbox=0)
        setting.offer(conn, [two])
        assert link.writes == []
        setting.offer(conn, [one])
        links.append(link)
    [first], [second] = (link.writes for link in links)
    assert isinstance(first, wire.Batch) and first is second
    assert [m.text for m in first.messages] == ["one", "two"]
    # Other messages get a frame of their own.
    conn, link = setting.connect(inbox=1)
    setting.offer(conn, [two])
    [alone] = link.writes
    assert isinstance(alone, wire.Batch) and alone is not first
    assert [m.text for m in alone.messages] == ["two"]


def test_an_adoption_writes_the_shared_batch() -> None:
    # The receiver and the sender's echo share one encoding, adopted or not.
    setting = Setting()
    conn, link = setting.connect()
    other, other_link = setting.connect()
    stored = setting.store_texts("one", "two")
    batch = wire.Batch(stored)
    setting.streams.offer(conn, stored, batch)
    setting.streams.offer(other, stored, batch)
    assert link.writes == [batch] and other_link.writes == [batch]
    assert setting.written.value == 4
    # A batch of which only a part is written is written as that part.
    three, four = setting.store_texts("three", "four")
    carol = pair_conversation(BOB, 3)
    [five] = setting.store_texts("five", conversation=carol)
    mixed = [three, five]
    setting.streams.offer(conn, mixed, wire.Batch(mixed))
    assert link.texts() == ["one", "two", "three", "five"]


def test_a_position_the_client_sent_for_an_unlisted_conversation_is_moved() -> None:
    # Bob's client sent a position (of another epoch) at login for a
    # conversation the store did not list: the adoption tells it the start.
    setting = Setting()
    conn, link = setting.connect()
    conn.unlisted = frozenset({CONVERSATION})
    one = setting.store_texts("one")
    setting.store.count()
    setting.offer(conn, one)
    assert setting.store.calls == []
    epoch, live = frames(link)
    assert epoch.cmd == Command.EPOCH
    assert list(epoch.cursors) == [Cursor(CONVERSATION, 0, EPOCH.id, False)]
    assert [m.text for m in live.messages] == ["one"]


def test_an_adoption_that_reads_before_its_first_message_is_announced() -> None:
    # "one" is missing before "two": the store is read after the start, so
    # the client is told where it is (its first message is read later).
    setting = Setting()
    conn, link = setting.connect()
    one, two = setting.store_texts("one", "two")
    setting.offer(conn, [two])
    epoch, *rest = frames(link)
    assert epoch.cmd == Command.EPOCH
    assert list(epoch.cursors) == [Cursor(CONVERSATION, 0, EPOCH.id, False)]
    assert [m.text for f in rest for m in f.messages] == ["one", "two"]


def test_a_stored_cursor_of_the_messages_epoch_costs_no_store_call() -> None:
    setting = Setting()
    conn, link = setting.connect()
    one, two, three = setting.store_texts("one", "two", "three")
    conn.acked[CONVERSATION] = Position(EPOCH.id, 2)
    setting.store.count()
    setting.offer(conn, [three])
    assert setting.store.calls == []
    epoch, live = frames(link)
    assert list(epoch.cursors) == [Cursor(CONVERSATION, 2, EPOCH.id, False)]
    assert [m.text for m in live.messages] == ["three"]
    assert conn.streams[CONVERSATION].delivered == 3


def test_a_gap_after_the_stored_cursor_is_one_store_read() -> None:
    setting = Setting()
    conn, link = setting.connect()
    stored = setting.store_texts(*[f"m{seq}" for seq in range(1, 8)])
    conn.acked[CONVERSATION] = Position(EPOCH.id, 3)
    setting.store.count()
    setting.offer(conn, stored[6:])
    assert setting.store.calls == [("read", (CONVERSATION, 3, 200))]
    epoch, *rest = frames(link)
    assert list(epoch.cursors) == [Cursor(CONVERSATION, 3, EPOCH.id, False)]
    assert [m.text for f in rest for m in f.messages] == ["m4", "m5", "m6", "m7"]
    stream = conn.streams[CONVERSATION]
    assert stream.delivered == 7 and not stream.pending and not stream.filling


def test_a_gap_after_what_followed_the_start_waits_as_any() -> None:
    setting = Setting()
    conn, link = setting.connect()
    one, two, three = setting.store_texts("one", "two", "three")
    setting.store.count()
    setting.offer(conn, [one, three])
    assert setting.store.calls == []
    assert link.texts() == ["one"]
    # "two" is late: read after GAP_WAIT, as any gap.
    setting.clock.advance(GAP_WAIT)
    assert setting.store.names() == ["read"]
    assert link.texts() == ["two", "three"]


def test_a_stored_cursor_of_another_epoch_is_resumed_through_the_store() -> None:
    # The store lost bob's conversation after his cursor (at 5 of "e0"): it
    # follows "e0" up to 3 in epoch "e2".
    setting = Setting()
    conn, link = setting.connect()
    setting.store._epochs[CONVERSATION] = Epoch("e2", "e0", 3)
    stored = setting.store_texts("one", "two", "three", "four")
    conn.acked[CONVERSATION] = Position("e0", 5)
    setting.store.count()
    setting.offer(conn, stored[3:])
    # ("four" follows the start: no read.)
    assert setting.store.calls == [("epochs", ([CONVERSATION],))]
    epoch, live = frames(link)
    assert list(epoch.cursors) == [Cursor(CONVERSATION, 3, "e2", True)]
    assert [m.text for m in live.messages] == ["four"]
    assert conn.streams[CONVERSATION].epoch == Epoch("e2", "e0", 3)


def test_a_stream_adopted_by_its_tag_reads_the_epoch_for_an_older_message() -> None:
    # Bob's new device adopts the conversation from its message of epoch
    # "e2" (which follows "e1" up to 2), not knowing "e1": a late "e1"
    # message makes it read the epoch; one of an epoch the store does not
    # name any more is never written.
    setting = Setting()
    conn, link = setting.connect()
    setting.store._epochs[CONVERSATION] = Epoch("e1")
    one, two = setting.store_texts("one", "two")
    setting.store._epochs[CONVERSATION] = Epoch("e2", "e1", 2)
    [three] = setting.store_texts("three")
    conn.acked[CONVERSATION] = Position("e2", 2)
    setting.store.count()
    setting.offer(conn, [three])
    assert setting.store.calls == []
    assert link.texts() == ["three"]
    stream = conn.streams[CONVERSATION]
    assert stream.epoch == Epoch("e2")
    setting.offer(conn, [two])
    assert setting.store.names() == ["epochs", "read"]
    assert link.texts() == []
    assert stream.epoch == Epoch("e2", "e1", 2)
    assert stream.delivered == 3 and not stream.filling
    # A message of an epoch the store lost ("e1" after 2) is not written.
    gone = replace(three, epoch="e1", seq=4, text="gone")
    setting.offer(conn, [gone])
    assert link.texts() == []
    [four] = setting.store_texts("four")
    setting.offer(conn, [four])
    assert link.texts() == ["four"]


def test_a_held_message_of_another_epoch_makes_the_adoption_read() -> None:
    setting = Setting()
    conn, link = setting.connect()
    one, two = setting.store_texts("one", "two")
    other = replace(two, epoch="e9", text="not stored")
    setting.store.count()
    setting.offer(conn, [one, other])
    assert setting.store.names() == ["epochs", "read"]
    assert link.texts() == ["one", "two"]


def test_a_new_conversation_starts_before_its_first_live_message() -> None:
    # Bob began a private conversation with carol from another device: his
    # read position is his own first message, and this connection had not
    # seen it: it gets it all the same (from the start: no EPOCH frame).
    setting = Setting()
    conn, link = setting.connect(inbox=0)
    conversation = pair_conversation(BOB, 3)
    results: list[list[ChatMessage]] = []
    setting.store.append(
        [NewMessage(conversation, BOB, "bob", "hi carol", receive_user_id=3)]
    ).addCallback(results.append)
    [stored] = results
    setting.offer(conn, stored)
    [live] = frames(link)
    assert live.cmd == Command.MESSAGE
    assert [m.text for m in live.messages] == ["hi carol"]


def test_a_failed_read_kicks_the_connection() -> None:
    class FailingReads(CountingReads):
        def read(
            self, conversation: str, after_seq: int, limit: int
        ) -> Deferred[list[ChatMessage]]:
            self.reads.append((conversation, after_seq))
            return fail(RuntimeError("the store is down"))

    setting = Setting()
    setting.store = store = FailingReads(setting.clock)
    setting.seed(store)
    setting.streams = Streams(setting.clock, store, setting.control, setting.written)
    conn, link = setting.connect(inbox=0)
    one, two = setting.store_texts("one", "two")
    setting.offer(conn, [two])
    setting.clock.advance(GAP_WAIT)
    assert setting.control.kicks == [(conn, "temporary store failure")]
    assert not conn.streams[CONVERSATION].filling
    assert link.texts() == []


def test_after_an_epoch_read_a_held_message_of_another_is_read_from_the_store() -> None:
    setting = Setting()
    conn, link = setting.connect()
    one, two = setting.store_texts("one", "two")
    conn.acked[CONVERSATION] = Position("old", 1)
    other = replace(two, epoch="e9", text="not stored")
    setting.store.count()
    setting.offer(conn, [one, other])
    assert setting.store.names() == ["epochs", "read"]
    epoch, *rest = frames(link)
    assert list(epoch.cursors) == [Cursor(CONVERSATION, 0, EPOCH.id, True)]
    assert [m.text for f in rest for m in f.messages] == ["one", "two"]


def test_adopted_streams_share_their_epoch_and_hold_no_dictionary() -> None:
    # Bob's two devices adopt the conversation with carol at its first
    # message: one Epoch for both streams, and no dictionary of held
    # messages until one is held.
    setting = Setting()
    conn, link = setting.connect()
    other, other_link = setting.connect()
    carol = pair_conversation(BOB, 3)
    setting.store._epochs[carol] = EPOCH
    [one] = setting.store_texts("one", conversation=carol)
    setting.offer(conn, [one])
    setting.offer(other, [one])
    first, second = conn.streams[carol], other.streams[carol]
    assert first.epoch is second.epoch and first.epoch.id == EPOCH.id
    assert first.pending is second.pending and not first.pending
    assert link.texts() == other_link.texts() == ["one"]
    # A gap makes a stream hold a message in a dictionary of its own.
    _, three = setting.store_texts("two", "three", conversation=carol)
    setting.offer(conn, [three])
    assert list(first.pending) == [3] and not second.pending
    assert link.texts() == []
