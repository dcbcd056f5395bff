"""
The client's outbox: every send waits here, under its client message id,
until the server acknowledges it.

A send gets a new client message id (uuid4 hex) and is written at once
when a connection is attached; after a reconnect, everything still pending
is written again, in the order it was first sent (the server stores one
message per client message id, so a resend of a message it already has is
only acknowledged).  An ACK or a refusal from the server settles the send's
Deferred.

The outbox writes to whatever connection it is attached to and knows
nothing else about it: the session attaches a connection once it is logged
in and detaches it when it is lost.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cim.client.errors import SendError
from cim.client.listeners import Ack, IClientListener
from cim.message import ErrorCode, Frame

#: Client message ids of acknowledged sends remembered, to recognise their
#: echoes (L{Outbox.sent_here}).
SENT_MEMORY = 1000


class FrameWriter(Protocol):
    """
    What the outbox and the inbox write to: a connection (such as
    L{cim.client.connection.ClientProtocol}).
    """

    def send(self, frame: Frame) -> None: ...


def new_client_msg_id() -> str:
    """
    A new client message id.
    """
    return uuid.uuid4().hex


@dataclass(slots=True)
class PendingSend:
    """
    A send not yet acknowledged: its frame (with its client message id) and
    the Deferred its sender waits on.
    """

    frame: Frame
    deferred: Deferred[Ack]


class Outbox:
    """
    The sends not yet acknowledged, in the order they were made.

    C{cmid in outbox} tells whether a send is pending, C{len(outbox)} how
    many are.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, events: IClientListener) -> None:
        """
        @param clock: for L{drain}'s timeout.
        @param events: told of each acknowledgement before the send's
            Deferred fires.
        """
        self.clock = clock
        self.events = events
        self._pending: OrderedDict[str, PendingSend] = OrderedDict()
        self._sent: OrderedDict[str, None] = OrderedDict()
        self._connection: FrameWriter | None = None
        self._drained: Deferred[None] | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, client_msg_id: object) -> bool:
        return client_msg_id in self._pending

    def sent_here(self, client_msg_id: str) -> bool:
        """
        Whether C{client_msg_id} names a send of this outbox: pending, or
        one of the last L{SENT_MEMORY} acknowledged (so that the echo of a
        message this client sent is known as such).
        """
        if not client_msg_id:
            return False
        return client_msg_id in self._pending or client_msg_id in self._sent

    def frames(self) -> list[Frame]:
        """
        The pending frames, oldest first (as they are resent).
        """
        return [pending.frame for pending in self._pending.values()]

    def add(self, frame: Frame) -> Deferred[Ack]:
        """
        Queue C{frame} under a new client message id, and write it if a
        connection is attached.

        @return: fires with the L{Ack}, fails with L{SendError} when the
            server refuses it; cancelling it drops the send (which may be
            stored anyway, if it was written).
        """
        cmid = new_client_msg_id()
        frame = replace(frame, client_msg_id=cmid)

        def cancel(_: Deferred[Ack]) -> None:
            self._pending.pop(cmid, None)

        d: Deferred[Ack] = Deferred(cancel)
        self._pending[cmid] = PendingSend(frame, d)
        if self._connection is not None:
            self._connection.send(frame)
        return d

    def attach(self, connection: FrameWriter) -> None:
        """
        A connection is logged in: write every pending send to it, in order,
        and each new one from now on.
        """
        self._connection = connection
        for frame in self.frames():
            connection.send(frame)

    def detach(self) -> None:
        """
        The connection is lost: keep the sends for the next one.
        """
        self._connection = None
        self._check_drained()

    def acknowledged(self, frame: Frame) -> None:
        """
        An ACK frame: the send it names was stored.  (An ACK of a resend
        that was acknowledged already is ignored.)
        """
        pending = self._pending.pop(frame.client_msg_id, None)
        if pending is None:
            return
        self._sent[frame.client_msg_id] = None
        while len(self._sent) > SENT_MEMORY:
            self._sent.popitem(last=False)
        ack = Ack(
            client_msg_id=frame.client_msg_id,
            msg_id=frame.msg_id,
            seq=frame.seq,
            conversation=frame.conversation,
            timestamp=frame.timestamp,
        )
        self.events.ack_received(ack)
        pending.deferred.callback(ack)
        self._check_drained()

    def refused(self, client_msg_id: str, code: int, reason: str) -> bool:
        """
        The server reported error C{code} about send C{client_msg_id}.

        A failure of the server's store is no refusal: the message may not
        be stored, and it stays pending (sent again, it is never stored
        twice: the store knows its client message id).  Anything else fails the send with
        L{SendError}.

        @return: whether the send stays pending; the connection should then
            be replaced, so that it and every later send go out again, in
            order, once the server can store them.
        """
        if code == ErrorCode.STORE_ERROR and client_msg_id in self._pending:
            self.log.info(
                "Send {cmid} may not be stored: {reason}",
                cmid=client_msg_id,
                reason=reason,
            )
            return True
        pending = self._pending.pop(client_msg_id, None)
        if pending is not None:
            pending.deferred.errback(SendError(code, reason, client_msg_id))
            self._check_drained()
        return False

    def fail_all(self, error: Exception) -> None:
        """
        Fail every pending send with C{error} (the client is closed or gave
        up).
        """
        pending, self._pending = self._pending, OrderedDict()
        for item in pending.values():
            item.deferred.errback(error)

    async def drain(self, timeout: float) -> None:
        """
        Wait until no send is pending or the connection is lost, at most
        C{timeout} seconds.
        """
        if not self._pending or self._connection is None:
            return
        self._drained = Deferred()
        self._drained.addTimeout(timeout, self.clock)
        try:
            await self._drained
        except DeferredTimeout:
            self.log.info("{count} sends still unacknowledged", count=len(self))
        finally:
            self._drained = None

    def _check_drained(self) -> None:
        if self._drained is not None and not self._drained.called:
            if not self._pending or self._connection is None:
                self._drained.callback(None)
