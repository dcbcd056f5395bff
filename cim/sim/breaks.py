"""
Deliberately broken variants of the system, to prove that the simulator
catches what they break (C{python -m cim.sim --broken NAME}, and
tests/test_sim.py): each patches one production method for the duration
of a run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from twisted.python.failure import Failure

from cim.message import ChatMessage, group_conversation, pair_conversation


def _skip_gap_fill() -> tuple[Any, str, Callable[..., Any]]:
    """
    A gap that live messages did not close is never read from the store.
    """
    from cim.server.stream import Streams

    def _close_gaps(self: Streams) -> None:
        self._gap_call = None
        self._gaps = set()

    return Streams, "_close_gaps", _close_gaps


def _ack_unstored() -> tuple[Any, str, Callable[..., Any]]:
    """
    A send is acknowledged whatever the append did (as if acknowledged
    before the append): one that the store failed is lost.
    """
    from cim.server import wire
    from cim.server.sending import Sender

    def _failed(self: Sender, failure: Failure, conn: Any, frame: Any) -> None:
        conversation = (
            group_conversation(frame.group_id)
            if frame.group_id
            else pair_conversation(conn.user_id, frame.receive_user_id)
        )
        fake = ChatMessage(
            msg_id=0,
            conversation=conversation,
            seq=0,
            sender_id=conn.user_id,
            sender_name=conn.user_name,
            text="",
            timestamp=0,
        )
        conn.send(wire.acknowledgement(frame.client_msg_id, [fake]))

    return Sender, "_failed", _failed


def _forget_device() -> tuple[Any, str, Callable[..., Any]]:
    """
    Live messages go to one device of each user connected to a server,
    not to all of them.
    """
    from cim.server import wire
    from cim.server.core import IMServer

    def deliver_local(
        self: IMServer, messages: Sequence[ChatMessage], user_ids: Sequence[int]
    ) -> list[int]:
        missing = []
        batch = wire.Batch(messages)
        for uid in user_ids:
            live = [c for c in self.devices(uid) if not c.closed]
            if live:
                self.streams.offer(live[0], messages, batch)
            else:
                missing.append(uid)
        return missing

    return IMServer, "deliver_local", deliver_local


def _show_twice() -> tuple[Any, str, Callable[..., Any]]:
    """
    The client shows every message it receives, replays included.
    """
    from cim.client.inbox import Inbox

    original = Inbox.is_new

    def is_new(self: Inbox, message: ChatMessage) -> bool:
        original(self, message)
        return True

    return Inbox, "is_new", is_new


def _push_once() -> tuple[Any, str, Callable[..., Any]]:
    """
    The message-loss bug of the full bench, back (and the bug of seeds
    365, 746, 815 with it): a push to another server that fails is not
    sent again.  Broken in L{cim.delivery.Delivery}, so that it stays
    broken whatever the pushes travel on.
    """
    from cim.delivery import Delivery

    def _keep(self: Delivery, server: str, kept: list[Any]) -> None:
        pass

    return Delivery, "_keep", _keep


def _restored_sessions_replaced() -> tuple[Any, str, Callable[..., Any]]:
    """
    The bug of seeds 34, 240, 262, 278, back: after a restore, renewing a
    device's newer session closes it as replaced by the older one.
    """
    from cim.store.memory import MemoryStore

    def _outdated(self: MemoryStore, current: Any, held_id: str) -> bool:
        return False

    return MemoryStore, "_outdated", _outdated


#: Name -> what it patches.
BROKEN: dict[str, Callable[[], tuple[Any, str, Callable[..., Any]]]] = {
    "skip-gap-fill": _skip_gap_fill,
    "ack-unstored": _ack_unstored,
    "forget-device": _forget_device,
    "show-twice": _show_twice,
    # Bugs the simulator found, brought back: it must find them again.
    "push-once": _push_once,
    "restored-sessions-replaced": _restored_sessions_replaced,
}


@contextmanager
def broken_system(name: str) -> Iterator[None]:
    """
    Run the system broken as C{name} says (a key of L{BROKEN}).

    @raise KeyError: no such variant.
    """
    owner, attribute, replacement = BROKEN[name]()
    saved = owner.__dict__[attribute]
    setattr(owner, attribute, replacement)
    try:
        yield
    finally:
        setattr(owner, attribute, saved)
