"""
The parts of the client library on their own, in memory: the outbox
(pending sends, resend order, ack matching), the inbox (dedup, cursors,
coalesced acknowledgements) and the listener guard.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from zope.interface.verify import verifyObject

from cim.client.errors import SendError
from cim.client.inbox import BROADCAST_MEMORY, Inbox
from cim.client.listeners import (
    Ack,
    ClientListener,
    ClientState,
    IClientListener,
    ListenerGuard,
    QueueListener,
)
from cim.client.outbox import SENT_MEMORY, Outbox
from cim.client.reads import ConversationInfo, ReadState
from cim.message import ChatMessage, Command, Cursor, ErrorCode, Frame, Position


class Wire:
    """
    A connection that keeps what is written to it.
    """

    def __init__(self) -> None:
        self.frames: list[Frame] = []

    def send(self, frame: Frame) -> None:
        self.frames.append(frame)

    def taken(self) -> list[Frame]:
        out, self.frames = self.frames, []
        return out


def texts(frames: list[Frame]) -> list[str]:
    return [f.req_msg for f in frames]


def ack_of(frame: Frame, seq: int = 1) -> Frame:
    return Frame(
        cmd=Command.ACK,
        client_msg_id=frame.client_msg_id,
        msg_id=100 + seq,
        seq=seq,
        conversation="u:2",
        timestamp=5,
    )


def failures_of(d: Deferred[Any]) -> list[Any]:
    failures: list[Any] = []
    d.addErrback(failures.append)
    return failures


# The outbox


def outbox() -> tuple[Outbox, QueueListener, Clock]:
    clock = Clock()
    events = QueueListener()
    return Outbox(clock, events), events, clock


def send(box: Outbox, text: str) -> Deferred[Ack]:
    return box.add(Frame(cmd=Command.MESSAGE, req_msg=text, receive_user_id=2))


def test_sends_wait_for_a_connection_then_go_in_order() -> None:
    box, _, _ = outbox()
    for text in ("one", "two", "three"):
        send(box, text)
    assert len(box) == 3
    wire = Wire()
    box.attach(wire)
    assert texts(wire.taken()) == ["one", "two", "three"]
    send(box, "four")
    assert texts(wire.taken()) == ["four"]
    ids = {f.client_msg_id for f in box.frames()}
    assert len(ids) == 4 and all(len(i) == 32 for i in ids)


def test_resend_after_a_reconnect_keeps_the_order() -> None:
    box, events, _ = outbox()
    first = Wire()
    box.attach(first)
    sends = [send(box, text) for text in ("one", "two", "three", "four")]
    written = first.taken()
    box.acknowledged(ack_of(written[1]))
    box.detach()
    send(box, "five")  # while away
    second = Wire()
    box.attach(second)
    assert texts(second.taken()) == ["one", "three", "four", "five"]
    # Each resend keeps its client message id.
    assert [f.client_msg_id for f in box.frames()[:3]] == [
        written[0].client_msg_id,
        written[2].client_msg_id,
        written[3].client_msg_id,
    ]
    assert sends[1].called and not sends[0].called
    assert events.acks.pending == [sends[1].result]


def test_ack_matching() -> None:
    box, events, _ = outbox()
    wire = Wire()
    box.attach(wire)
    d = send(box, "hi")
    [frame] = wire.taken()
    box.acknowledged(ack_of(frame, seq=4))
    ack = Ack(frame.client_msg_id, 104, 4, "u:2", 5)
    assert d.result == ack
    assert events.acks.pending == [ack]
    # The ack of a resend already acknowledged, and an unknown one.
    box.acknowledged(ack_of(frame, seq=4))
    box.acknowledged(Frame(cmd=Command.ACK, client_msg_id="nobody"))
    assert events.acks.pending == [ack]
    assert len(box) == 0


def test_refusals() -> None:
    box, _, _ = outbox()
    box.attach(Wire())
    refused = send(box, "refused")
    kept = send(box, "not stored")
    [refused_frame, kept_frame] = box.frames()
    assert not box.refused(refused_frame.client_msg_id, 3000, "no user 2")
    [failure] = failures_of(refused)
    assert failure.check(SendError)
    assert (failure.value.code, failure.value.client_msg_id) == (
        3000,
        refused_frame.client_msg_id,
    )
    # A store failure is no refusal: the send stays, to go out again.
    assert box.refused(kept_frame.client_msg_id, ErrorCode.STORE_ERROR, "busy")
    assert kept_frame.client_msg_id in box and not kept.called
    assert not box.refused("unknown", 3000, "whatever")


def test_cancelled_sends_are_not_resent() -> None:
    box, _, _ = outbox()
    d = send(box, "never mind")
    send(box, "this one")
    d.cancel()
    failures_of(d)[0].trap(CancelledError)
    wire = Wire()
    box.attach(wire)
    assert texts(wire.frames) == ["this one"]


def test_fail_all() -> None:
    box, _, _ = outbox()
    sends = [send(box, "a"), send(box, "b")]
    box.fail_all(RuntimeError("closed"))
    assert [failures_of(d)[0].check(RuntimeError) for d in sends] == [
        RuntimeError,
        RuntimeError,
    ]
    assert len(box) == 0


def test_drain_waits_for_the_acks_or_the_timeout() -> None:
    box, _, clock = outbox()
    wire = Wire()
    box.attach(wire)
    send(box, "one")
    drained = Deferred.fromCoroutine(box.drain(2.0))
    assert not drained.called
    box.acknowledged(ack_of(wire.taken()[0]))
    assert drained.called
    send(box, "two")
    drained = Deferred.fromCoroutine(box.drain(2.0))
    clock.advance(1.9)
    assert not drained.called
    clock.advance(0.1)
    assert drained.called and drained.result is None
    # A lost connection ends the wait too; so does having nothing to wait for.
    drained = Deferred.fromCoroutine(box.drain(2.0))
    box.detach()
    assert drained.called
    box.fail_all(RuntimeError("closed"))
    assert Deferred.fromCoroutine(box.drain(2.0)).called


# The inbox


PAIR = "p:1:7"


def chat(
    seq: int, conversation: str = PAIR, msg_id: int = 0, epoch: str = "e"
) -> ChatMessage:
    return ChatMessage(
        msg_id=msg_id or 100 + seq,
        conversation=conversation,
        seq=seq,
        sender_id=1,
        sender_name="bob",
        text=f"m{seq}",
        timestamp=1,
        epoch=epoch,
    )


def inbox() -> tuple[Inbox, QueueListener, Clock, Wire]:
    clock = Clock()
    events = QueueListener()
    box = Inbox(clock, events, ack_delay=0.005)
    wire = Wire()
    box.attach(wire)
    return box, events, clock, wire


def seqs(events: QueueListener) -> list[tuple[str, int]]:
    return [(m.conversation, m.seq) for m in events.pending_messages()]


def test_duplicates_are_dropped_per_conversation() -> None:
    box, events, _, _ = inbox()
    box.receive(Frame(cmd=Command.OFFLINE, messages=[chat(1), chat(2)]))
    box.receive(Frame(cmd=Command.MESSAGE, messages=[chat(2), chat(1, "g:dev")]))
    box.receive(
        Frame(cmd=Command.MESSAGE, messages=[chat(1), chat(3), chat(1, "g:dev")])
    )
    assert seqs(events) == [(PAIR, 1), (PAIR, 2), ("g:dev", 1), (PAIR, 3)]
    assert box.cursors.cursors == {PAIR: Position("e", 3), "g:dev": Position("e", 1)}


def test_acknowledgements_are_coalesced_and_cumulative() -> None:
    box, _, clock, wire = inbox()
    box.receive(Frame(cmd=Command.MESSAGE, messages=[chat(1)]))
    box.receive(Frame(cmd=Command.MESSAGE, messages=[chat(2), chat(5, "g:dev")]))
    box.receive(Frame(cmd=Command.MESSAGE, messages=[chat(3)]))
    assert wire.taken() == []
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0.005)
    assert wire.taken() == [
        Frame(cmd=Command.ACK, cursors=[Cursor("g:dev", 5, "e"), Cursor(PAIR, 3, "e")])
    ]
    # Only what moved since, and nothing for duplicates.
    box.receive(Frame(cmd=Command.MESSAGE, messages=[chat(3), chat(4)]))
    box.receive(Frame(cmd=Command.MESSAGE, messages=[chat(5, "g:dev")]))
    clock.advance(0.005)
    assert wire.taken() == [Frame(cmd=Command.ACK, cursors=[Cursor(PAIR, 4, "e")])]
    box.receive(Frame(cmd=Command.MESSAGE, messages=[chat(4)]))
    assert clock.getDelayedCalls() == []


def test_a_new_connection_gets_every_cursor_at_once() -> None:
    box, _, clock, wire = inbox()
    box.receive(Frame(cmd=Command.MESSAGE, messages=[chat(1), chat(2, "g:dev")]))
    box.detach()
    assert clock.getDelayedCalls() == []
    box.receive(Frame(cmd=Command.MESSAGE, messages=[chat(2)]))  # before the login
    again = Wire()
    box.attach(again)
    assert again.taken() == [
        Frame(cmd=Command.ACK, cursors=[Cursor("g:dev", 2, "e"), Cursor(PAIR, 2, "e")])
    ]
    clock.advance(1)
    assert again.taken() == [] and wire.taken() == []


def test_broadcasts_are_remembered_by_id() -> None:
    box, events, clock, wire = inbox()
    box.receive(Frame(cmd=Command.MESSAGE, messages=[chat(5, "all"), chat(4, "all")]))
    box.receive(Frame(cmd=Command.MESSAGE, messages=[chat(5, "all")]))
    assert seqs(events) == [("all", 5), ("all", 4)]
    clock.advance(1)
    assert wire.taken() == []
    # Only the last BROADCAST_MEMORY are remembered.
    for i in range(BROADCAST_MEMORY):
        box.is_new(chat(1, "all", msg_id=1000 + i))
    assert box.is_new(chat(5, "all"))


def test_cim_style_frames_are_shown_as_they_come() -> None:
    box, events, clock, _ = inbox()
    clock.advance(12.5)
    props = {"sendUserId": "3", "sendUserName": "carol"}
    box.receive(Frame(cmd=Command.MESSAGE, batch=["a", "b"], properties=props))
    box.receive(Frame(cmd=Command.MESSAGE, req_msg="a", timestamp=7))
    box.receive(Frame(cmd=Command.MESSAGE, req_msg="c", properties={"sendUserId": "x"}))
    box.receive(Frame(cmd=Command.MESSAGE))
    got = events.pending_messages()
    assert [(m.text, m.sender_id, m.sender_name, m.timestamp) for m in got] == [
        ("a", 3, "carol", 12500),
        ("b", 3, "carol", 12500),
        ("a", 0, "", 7),
        ("c", 0, "", 12500),
    ]
    assert all(m.seq == 0 and m.conversation == "" for m in got)


def test_the_cursors_of_each_user() -> None:
    box, _, _, _ = inbox()
    box.open(7, None)
    box.receive(Frame(cmd=Command.MESSAGE, messages=[chat(3)]))
    box.open(7, None)
    assert box.cursors.get(PAIR) == 3
    box.open(8, None)
    assert box.cursors.cursors == {}


# Listeners


def test_listener_bases_provide_the_interface() -> None:
    assert verifyObject(IClientListener, ClientListener())
    assert verifyObject(IClientListener, QueueListener())
    assert verifyObject(IClientListener, ListenerGuard())


def test_the_guard_logs_what_the_listener_raises() -> None:
    class Broken(ClientListener):
        def message_received(self, message: ChatMessage) -> None:
            raise RuntimeError("oops")

    guard = ListenerGuard(Broken())
    with capturedLogs() as events:
        guard.message_received(chat(1))
        guard.state_changed(ClientState.READY, "")
    [event] = [e for e in events if e["log_level"] == LogLevel.critical]
    assert event["method"] == "message_received"
    assert event["log_failure"].check(RuntimeError)
    guard.listener = None
    guard.message_received(chat(1))
    queue = QueueListener()
    guard.listener = queue
    guard.state_changed(ClientState.READY, "there")
    assert queue.log == [(ClientState.READY, "there")]


@pytest.mark.parametrize("cls", [ClientListener, QueueListener])
def test_listeners_accept_every_event(cls: type[ClientListener]) -> None:
    listener = cls()
    listener.message_received(chat(1))
    listener.ack_received(Ack("c", 1, 1, "u:2", 1))
    listener.error_received(3000, "no", "c")
    listener.state_changed(ClientState.IDLE, "")
    listener.conversation_reset(PAIR, 3)
    listener.read_changed(1, PAIR, 3)


def test_a_listener_from_before_an_event_does_not_get_it() -> None:
    class Old:
        def __init__(self) -> None:
            self.states: list[ClientState] = []

        def state_changed(self, state: ClientState, reason: str) -> None:
            self.states.append(state)

    old = Old()
    guard = ListenerGuard(old)  # type: ignore[arg-type]
    with capturedLogs() as events:
        guard.read_changed(1, PAIR, 2)
        guard.conversation_reset(PAIR, 0)
        guard.state_changed(ClientState.READY, "")
    assert old.states == [ClientState.READY]
    assert [e for e in events if e["log_level"] >= LogLevel.warn] == []


def test_the_inbox_follows_the_server_cursors_and_reads() -> None:
    box, events, clock, wire = inbox()
    box.open(7, None)
    box.start([Cursor(PAIR, 2, "e"), Cursor("g:dev", 5, "f", reset=True)])
    assert events.resets.pending == [("g:dev", 5)]
    box.receive(Frame(cmd=Command.MESSAGE, messages=[chat(3)]))
    # Bob's message raised his own read position; this user read it on
    # another device.
    assert box.reads.read_position(PAIR, 1) == 3
    assert events.reads.pending == [(1, PAIR, 3)]
    events.reads.pending.clear()
    assert box.reads.unread(PAIR) == 1
    box.read_received(Frame(cmd=Command.READ, request_id=7, cursors=[Cursor(PAIR, 3)]))
    assert events.reads.pending == [(7, PAIR, 3)]
    assert box.reads.unread(PAIR) == 0
    clock.advance(1)
    assert wire.taken() == [Frame(cmd=Command.ACK, cursors=[Cursor(PAIR, 3, "e")])]


# Read state


def test_read_state_snapshot_and_live_counts() -> None:
    reads = ReadState()
    reads.reset(7)
    # Messages from bob arrive before the route's snapshot is loaded: 3 of
    # them are in it, 4 came after it was taken.
    for seq in (3, 4):
        reads.message(chat(seq))
    reads.load([ConversationInfo(PAIR, "e", last_seq=3, read=1, unread=2, peer_id=1)])
    assert reads.unread(PAIR) == 3
    reads.message(chat(4))  # counted already
    reads.message(chat(5))
    assert reads.unread(PAIR) == 4
    assert reads.read_by(7, PAIR, 4)
    assert reads.unread(PAIR) == 1
    assert not reads.read_by(7, PAIR, 2)
    # One's own message reads everything before it.
    mine = chat(6)
    mine.sender_id = 7
    reads.message(mine)
    assert reads.unread(PAIR) == 0 and reads.read_position(PAIR) == 6
    # The store lost what came after 2.
    reads.restart(PAIR, 2)
    info = reads.get(PAIR)
    assert info is not None
    assert (info.last_seq, info.read, info.unread, info.peer_read) == (2, 2, 0, 2)
    reads.message(chat(3, epoch="f"))
    assert reads.unread(PAIR) == 1
    assert [i.conversation for i in reads.all()] == [PAIR]
    # Broadcasts and raw pushes have no read state.
    reads.message(chat(9, "all"))
    reads.message(chat(0, ""))
    assert [i.conversation for i in reads.all()] == [PAIR]


def test_the_outbox_knows_its_own_sends() -> None:
    box, _, _ = outbox()
    wire = Wire()
    box.attach(wire)
    send(box, "one")
    [frame] = wire.taken()
    assert box.sent_here(frame.client_msg_id)  # pending
    box.acknowledged(ack_of(frame))
    assert box.sent_here(frame.client_msg_id)  # acknowledged, remembered
    assert not box.sent_here("") and not box.sent_here("another device's")
    for i in range(SENT_MEMORY):
        send(box, f"more {i}")
        box.acknowledged(ack_of(wire.taken()[0]))
    assert not box.sent_here(frame.client_msg_id)  # forgotten at last
