"""
What a client reports, and to whom: its states, the acknowledgement of a
send, and L{IClientListener}, the interface of the object that receives
them.

L{ClientListener} is a base with a no-op method per event, L{QueueListener}
queues everything (bots and tests), and L{ListenerGuard} is what the
client's parts call: it passes each event on to the listener of the moment
and logs (never raises) what the listener raises.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import DeferredQueue
from twisted.logger import Logger
from zope.interface import Interface, implementer

from cim.message import ChatMessage


class ClientState(enum.Enum):
    """
    The life of a client, as reported to L{IClientListener.state_changed}.
    """

    IDLE = "idle"
    #: Logging in through the route and connecting to the IM server.
    CONNECTING = "connecting"
    #: Logged in on the IM server: sends go out at once.
    READY = "ready"
    #: The connection was lost; waiting before the next attempt.
    RECONNECTING = "reconnecting"
    #: L{cim.client.library.Client.close} was called.
    CLOSED = "closed"
    #: Logging in cannot succeed (wrong password, replaced by another
    #: login...); the client gave up.
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Ack:
    """
    The server stored a message this client sent.

    @ivar client_msg_id: the id the client gave the send.
    @ivar msg_id: the id the store assigned.
    @ivar seq: its position in C{conversation}.
    @ivar timestamp: when it was stored, in milliseconds since the epoch.
    """

    client_msg_id: str
    msg_id: int
    seq: int
    conversation: str
    timestamp: int


class IClientListener(Interface):
    """
    Receives what happens to a client.  Every method is called on the
    reactor thread; an exception it raises is logged and otherwise ignored.
    """

    def message_received(message: ChatMessage) -> None:
        """
        A chat message arrived that this client has not shown before:
        private ones in the conversation of the two users
        (C{"p:<low id>:<high id>"}, L{cim.message.pair_conversation}),
        group ones in C{"g:<group>"}, CIM-style broadcasts in C{"all"}, and
        raw pushes with C{seq} 0 and no conversation.

        The user's own messages come too, whichever of its devices sent
        them (this one included): C{message.sender_id} tells them apart,
        and L{cim.client.library.Client.sent_here} tells whether this
        client sent it.
        """

    def ack_received(ack: Ack) -> None:
        """
        The server stored a message this client sent (the send's Deferred
        fires with the same L{Ack}).
        """

    def error_received(code: int, reason: str, client_msg_id: str) -> None:
        """
        The server reported an error: a refused send (C{client_msg_id} set;
        its Deferred fails with L{cim.client.errors.SendError} too), or an
        error about the connection.
        """

    def state_changed(state: ClientState, reason: str) -> None:
        """
        The client entered C{state}; C{reason} says why (may be empty).
        """

    def conversation_reset(conversation: str, seq: int) -> None:
        """
        The server's store lost (or replaced) the messages of
        C{conversation} after C{seq} that this client had received: it
        started the conversation again from C{seq}, in a new epoch, and
        resent what it holds (nothing already shown is shown again; what
        was lost is gone).
        """

    def read_changed(user_id: int, conversation: str, seq: int) -> None:
        """
        User C{user_id} read C{conversation} up to C{seq}: this user on
        another device (or through this client's
        L{cim.client.library.Client.mark_read}: its unread count fell), or
        the other user of a private conversation (a read receipt), or a
        member of a group.  Writing in a conversation reads it: a new
        message from a user is told here too, after the message.
        """


@implementer(IClientListener)
class ClientListener:
    """
    An L{IClientListener} that ignores everything: subclass it and
    override the events of interest.
    """

    def message_received(self, message: ChatMessage) -> None:
        pass

    def ack_received(self, ack: Ack) -> None:
        pass

    def error_received(self, code: int, reason: str, client_msg_id: str) -> None:
        pass

    def state_changed(self, state: ClientState, reason: str) -> None:
        pass

    def conversation_reset(self, conversation: str, seq: int) -> None:
        pass

    def read_changed(self, user_id: int, conversation: str, seq: int) -> None:
        pass


class QueueListener(ClientListener):
    """
    An L{IClientListener} that queues everything, for bots and tests.

    Each kind of event has its own queue; C{get()} on one returns a Deferred
    firing with the next event.  C{log} keeps every state change, in order.

    @ivar messages: L{ChatMessage}s.
    @ivar acks: L{Ack}s.
    @ivar errors: C{(code, reason, client_msg_id)} tuples.
    @ivar states: C{(ClientState, reason)} tuples.
    @ivar resets: C{(conversation, seq)} tuples.
    @ivar reads: C{(user_id, conversation, seq)} tuples.
    """

    def __init__(self) -> None:
        self.messages: DeferredQueue[ChatMessage] = DeferredQueue()
        self.acks: DeferredQueue[Ack] = DeferredQueue()
        self.errors: DeferredQueue[tuple[int, str, str]] = DeferredQueue()
        self.states: DeferredQueue[tuple[ClientState, str]] = DeferredQueue()
        self.resets: DeferredQueue[tuple[str, int]] = DeferredQueue()
        self.reads: DeferredQueue[tuple[int, str, int]] = DeferredQueue()
        self.log: list[tuple[ClientState, str]] = []

    def message_received(self, message: ChatMessage) -> None:
        self.messages.put(message)

    def ack_received(self, ack: Ack) -> None:
        self.acks.put(ack)

    def error_received(self, code: int, reason: str, client_msg_id: str) -> None:
        self.errors.put((code, reason, client_msg_id))

    def state_changed(self, state: ClientState, reason: str) -> None:
        self.log.append((state, reason))
        self.states.put((state, reason))

    def conversation_reset(self, conversation: str, seq: int) -> None:
        self.resets.put((conversation, seq))

    def read_changed(self, user_id: int, conversation: str, seq: int) -> None:
        self.reads.put((user_id, conversation, seq))

    def pending_messages(self) -> list[ChatMessage]:
        """
        The messages queued and not yet taken with C{messages.get()}; they
        are taken now.
        """
        out = list(self.messages.pending)
        self.messages.pending.clear()
        return out


@implementer(IClientListener)
class ListenerGuard:
    """
    The listener the client's parts report to: each event goes on to
    C{listener} (which may be replaced at any time, or be C{None}), and
    whatever that raises is logged, so that no listener can break the
    client.

    @ivar listener: the L{IClientListener} of the moment, or C{None}.
    """

    log = Logger()

    def __init__(self, listener: IClientListener | None = None) -> None:
        self.listener = listener

    def _guarded(self, method: str, call: Callable[[IClientListener], None]) -> None:
        if self.listener is None or not hasattr(self.listener, method):
            return
        try:
            call(self.listener)
        except Exception:
            self.log.failure("The listener's {method} failed", method=method)

    def message_received(self, message: ChatMessage) -> None:
        self._guarded("message_received", lambda to: to.message_received(message))

    def ack_received(self, ack: Ack) -> None:
        self._guarded("ack_received", lambda to: to.ack_received(ack))

    def error_received(self, code: int, reason: str, client_msg_id: str) -> None:
        self._guarded(
            "error_received", lambda to: to.error_received(code, reason, client_msg_id)
        )

    def state_changed(self, state: ClientState, reason: str) -> None:
        self._guarded("state_changed", lambda to: to.state_changed(state, reason))

    def conversation_reset(self, conversation: str, seq: int) -> None:
        self._guarded(
            "conversation_reset", lambda to: to.conversation_reset(conversation, seq)
        )

    def read_changed(self, user_id: int, conversation: str, seq: int) -> None:
        self._guarded(
            "read_changed", lambda to: to.read_changed(user_id, conversation, seq)
        )
