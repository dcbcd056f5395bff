"""
Pushes between cim processes over a message bus (L{cim.interfaces.IBus}).

Every IM server subscribes to a channel of its own (named from its
L{cim.interfaces.ServerAddress} string and the deployment's key prefix);
the routes and the other servers publish to it what they push there
(L{BusPusher}): one compact protobuf payload (L{cim.codec.encode_push})
per server and reactor turn, or per publish in flight, never an HTTP
request.  The server applies each payload in order (L{BusReceiver}).

The bus is at most once, and that is enough: every message is in the store
before it is pushed.  A publish that no subscriber received means the
server is gone (its users have no device there); a subscription that was
lost and made again means its server missed what was published meanwhile,
so it resyncs every connected device from the store.

Two buses: L{MemoryBus} (one process, or the simulator's cluster on one
clock: L{MemoryHub}), and the Redis one (L{cim.store.redis.bus}), which
L{open_bus} picks for a Redis store.

Every method runs in the reactor thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cim import codec
from cim.delivery import deliver_item
from cim.interfaces import BusError, IBus, ILocalDelivery, IPusher
from cim.message import ChatMessage
from cim.metrics import Metrics
from cim.pushapi import PushItem, ReadEvent
from cim.store.redis.records import decode_message, encode_stored

__all__ = [
    "BusError",
    "BusPusher",
    "BusReceiver",
    "IBus",
    "MemoryBus",
    "MemoryHub",
    "decode_feed",
    "encode_feed",
    "open_bus",
]

#: The most push items (one per delivery to the server) in one publish.
MAX_PUSH_ITEMS = 200


def open_bus(reactor: Any, store: Any, timeout: float = 5.0) -> IBus | None:
    """
    The bus of a deployment whose store is C{store}: the Redis bus for a
    Redis store (on connections of its own, channels named with the
    store's prefix), C{None} for any other (a process that keeps pushing
    in-process or over the push API).

    @param timeout: seconds a publish, or the first subscription, may wait
        for Redis.
    """
    address = getattr(store, "address", None)
    if address is None:
        return None
    from cim.store.redis.bus import RedisBus

    return RedisBus(reactor, address, store.prefix, timeout=timeout)


# The memory bus


class _Subscription:
    """
    One subscriber of a L{MemoryHub}'s channel: its payloads wait in a queue
    drained by a call on its own clock, as a network would hand them over.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, receive: Callable[[bytes], None]) -> None:
        self.clock = clock
        self.receive = receive
        self.active = True
        self._queue: deque[bytes] = deque()
        self._call: IDelayedCall | None = None

    def offer(self, payload: bytes) -> bool:
        """
        Queue C{payload}.  @return: whether this subscriber takes it (one
        whose clock runs no more calls, a crashed simulated process, is
        gone).
        """
        if not self.active:
            return False
        self._queue.append(payload)
        if self._call is None or not self._call.active():
            call = self.clock.callLater(0, self._drain)
            if not call.active():
                self.drop()
                return False
            self._call = call
        return True

    def drop(self) -> None:
        self.active = False
        self._queue.clear()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _drain(self) -> None:
        self._call = None
        queue = self._queue
        while queue and self.active:
            payload = queue.popleft()
            try:
                self.receive(payload)
            except Exception:
                self.log.failure("A bus subscriber failed")


class MemoryHub:
    """
    The broker that L{MemoryBus}es share: what one Redis is to the Redis
    buses (the simulator's cluster, or several servers in one test).
    """

    def __init__(self) -> None:
        self.channels: dict[str, list[_Subscription]] = {}

    def bus(self, clock: IReactorTime) -> MemoryBus:
        """
        A bus on this hub for a process running on C{clock}.
        """
        return MemoryBus(clock, self)


#: A L{MemoryBus}'s subscription to a server's channel: (receive,
#: subscribed, its current L{_Subscription}).
_Mine = tuple[Callable[[bytes], None], Callable[[], None], _Subscription]


@implementer(IBus)
class MemoryBus:
    """
    An L{IBus} in memory.  Payloads are handed to the subscribers by a
    call on the subscriber's clock (never from within L{publish}), in the
    order they were published.

    @param hub: the broker shared with the other processes' buses; one of
        its own when C{None}.
    """

    def __init__(self, clock: IReactorTime, hub: MemoryHub | None = None) -> None:
        self.clock = clock
        self.hub = hub if hub is not None else MemoryHub()
        self.closed = False
        self._mine: dict[str, _Mine] = {}

    def publish(self, server: str, payload: bytes) -> Deferred[int]:
        if self.closed:
            return fail(BusError("the bus is closed"))
        subscribers = self.hub.channels.get(server, [])
        reached = 0
        for subscription in list(subscribers):
            if subscription.offer(payload):
                reached += 1
            else:
                subscribers.remove(subscription)
        return succeed(reached)

    def subscribe(
        self,
        server: str,
        receive: Callable[[bytes], None],
        subscribed: Callable[[], None],
    ) -> Deferred[None]:
        if self.closed:
            return fail(BusError("the bus is closed"))
        done: Deferred[None] = Deferred()
        self._subscribe(server, receive, subscribed, done)
        return done

    def _subscribe(
        self,
        server: str,
        receive: Callable[[bytes], None],
        subscribed: Callable[[], None],
        done: Deferred[None] | None = None,
    ) -> None:
        subscription = _Subscription(self.clock, receive)
        self._mine[server] = (receive, subscribed, subscription)
        self.hub.channels.setdefault(server, []).append(subscription)

        def made() -> None:
            if subscription.active:
                subscribed()
            if done is not None:
                done.callback(None)

        self.clock.callLater(0, made)

    def interrupt(self, seconds: float = 0.0) -> None:
        """
        Lose every subscription of this bus (as Redis dropping a
        subscriber connection), and make them again C{seconds} later (each
        subscriber is told).  What is published meanwhile is lost.
        """
        for server, (receive, subscribed, _) in self._drop_all().items():
            self.clock.callLater(seconds, self._again, server, receive, subscribed)

    def _again(
        self,
        server: str,
        receive: Callable[[bytes], None],
        subscribed: Callable[[], None],
    ) -> None:
        if not self.closed:
            self._subscribe(server, receive, subscribed)

    def close(self) -> Deferred[None]:
        self.closed = True
        self._drop_all()
        return succeed(None)

    def _drop_all(self) -> dict[str, _Mine]:
        """
        Drop every subscription of this bus from the hub.  @return: what
        they were (L{_mine} before).
        """
        mine, self._mine = self._mine, {}
        for server, (_, _, subscription) in mine.items():
            subscription.drop()
            subscribers = self.hub.channels.get(server, [])
            if subscription in subscribers:
                subscribers.remove(subscription)
        return mine


# The two ends of a push


class _Outbox:
    """
    What waits to be published to one server, and whether a publish to it
    is in flight.
    """

    __slots__ = ("items", "waiters", "in_flight", "call")

    def __init__(self) -> None:
        self.items: list[PushItem] = []
        self.waiters: list[Deferred[list[int]]] = []
        self.in_flight = False
        self.call: IDelayedCall | None = None


@implementer(IPusher)
class BusPusher:
    """
    Push to IM servers over a bus: what is pushed to one server within one
    reactor turn, or while a publish to it is in flight, goes in one
    publish (at most C{max_items} pushes each), one publish per server at a
    time, so that the pushes of this process to a server arrive in order.

    A push fires with its users as having no device there when the publish
    reached no subscriber (the server is gone; the store keeps the
    messages for their next login), with none otherwise (the server writes
    to the devices it holds); it fails with L{BusError} when the bus could
    not take the publish.

    @param clock: the reactor (a turn ends with the calls due at once).
    @ivar publishes: how many publishes were made (for the bench and tests).
    @ivar bytes: how many payload bytes they carried.
    """

    log = Logger()

    def __init__(
        self, bus: IBus, clock: IReactorTime, max_items: int = MAX_PUSH_ITEMS
    ) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self.bus = bus
        self.clock = clock
        self.max_items = max_items
        self.publishes = 0
        self.bytes = 0
        self._outboxes: dict[str, _Outbox] = {}

    def push(
        self, server: str, messages: Sequence[ChatMessage], user_ids: Sequence[int]
    ) -> Deferred[list[int]]:
        return self._queue(server, (messages, user_ids))

    def push_read(
        self,
        server: str,
        reader_id: int,
        conversation: str,
        seq: int,
        user_ids: Sequence[int],
    ) -> Deferred[list[int]]:
        event = ReadEvent(reader_id, conversation, seq)
        return self._queue(server, (event, user_ids))

    def _queue(self, server: str, item: PushItem) -> Deferred[list[int]]:
        outbox = self._outboxes.get(server)
        if outbox is None:
            outbox = self._outboxes[server] = _Outbox()
        d: Deferred[list[int]] = Deferred()
        outbox.items.append(item)
        outbox.waiters.append(d)
        if not outbox.in_flight and outbox.call is None:
            outbox.call = self.clock.callLater(0, self._flush, server, outbox)
        return d

    def _flush(self, server: str, outbox: _Outbox) -> None:
        outbox.call = None
        if outbox.in_flight or not outbox.items:
            return
        limit = self.max_items
        items, waiters = outbox.items[:limit], outbox.waiters[:limit]
        del outbox.items[:limit], outbox.waiters[:limit]
        outbox.in_flight = True
        try:
            payload = codec.encode_push(items)
            d = self.bus.publish(server, payload)
        except Exception:
            d = fail()
        else:
            self.publishes += 1
            self.bytes += len(payload)
        d.addBoth(self._published, server, outbox, items, waiters)

    def _published(
        self,
        result: int | Failure,
        server: str,
        outbox: _Outbox,
        items: list[PushItem],
        waiters: list[Deferred[list[int]]],
    ) -> None:
        outbox.in_flight = False
        if isinstance(result, Failure):
            for waiter in waiters:
                waiter.errback(result)
        elif result == 0:
            # Nobody holds the server's channel: it is gone.
            for (_, users), waiter in zip(items, waiters):
                waiter.callback(list(users))
        else:
            for waiter in waiters:
                waiter.callback([])
        if outbox.items and outbox.call is None:
            # What queued meanwhile goes at once, in one publish.
            self._flush(server, outbox)
        elif not outbox.items and outbox.call is None:
            self._outboxes.pop(server, None)


class BusReceiver:
    """
    The IM server's end of the bus: subscribes to the server's channel and
    hands each payload's items, in order, to C{local}
    (L{ILocalDelivery.deliver_local}, L{ILocalDelivery.deliver_read_local}).
    When the subscription is made again after a loss, C{resync} is called:
    what was published meanwhile is lost, and only the store has it.

    A payload that does not decode is logged and dropped (the store has its
    messages); so is an item whose delivery raised.

    @param metrics: where to count payloads, malformed ones and resyncs.
    """

    log = Logger()

    def __init__(
        self,
        bus: IBus,
        server: str,
        local: ILocalDelivery,
        resync: Callable[[], object],
        metrics: Metrics | None = None,
    ) -> None:
        self.bus = bus
        self.server = server
        self.local = local
        self.resync = resync
        self.subscriptions = 0
        metrics = metrics or Metrics("cim_bus")
        self.m_received = metrics.counter(
            "bus_payloads_total", "Payloads received from the message bus"
        )
        self.m_malformed = metrics.counter(
            "bus_malformed_total", "Payloads from the message bus that did not decode"
        )
        self.m_resyncs = metrics.counter(
            "bus_resyncs_total",
            "Subscriptions to the message bus made again after a loss "
            "(every connected device was resynced)",
        )

    def start(self) -> Deferred[None]:
        """
        Subscribe.  @return: fires once subscribed.
        """
        return self.bus.subscribe(self.server, self.received, self._subscribed)

    def _subscribed(self) -> None:
        self.subscriptions += 1
        if self.subscriptions == 1:
            return
        self.m_resyncs.inc()
        self.log.warn(
            "Subscribed to the bus again: what was pushed meanwhile is lost; "
            "resyncing every connected device from the store"
        )
        try:
            self.resync()
        except Exception:
            self.log.failure("Resyncing after a bus loss failed")

    def received(self, payload: bytes) -> None:
        """
        Apply one payload's items in order.
        """
        self.m_received.inc()
        if payload[:1] == b"\0":
            self._fed(payload)
            return
        try:
            items = codec.decode_push(payload)
        except codec.CodecError as e:
            self._malformed("bus payload", payload, e)
            return
        local = self.local
        for item in items:
            try:
                deliver_item(local, item)
            except Exception:
                self.log.failure("Delivering a bus payload's item failed")

    def _malformed(self, what: str, payload: bytes, error: Exception) -> None:
        """
        Count and log a payload that does not decode, and drop it.
        """
        self.m_malformed.inc()
        self.log.warn(
            "Dropped a malformed {what} ({size} bytes): {error}",
            what=what,
            size=len(payload),
            error=str(error),
        )

    def _fed(self, payload: bytes) -> None:
        """
        Deliver a group feed's payload (L{decode_feed}) in order.
        """
        try:
            runs = decode_feed(payload)
        except ValueError as e:
            self._malformed("group feed payload", payload, e)
            return
        local = self.local
        for messages, users in runs:
            try:
                local.deliver_local(messages, users)
            except Exception:
                self.log.failure("Delivering a group feed's messages failed")


def encode_feed(fed: Sequence[tuple[ChatMessage, Sequence[int]]]) -> bytes:
    """
    A group feed's payload (L{decode_feed}) of C{fed}'s messages, each with
    its users, as the Redis store's append script writes it (the memory
    store's feed: L{cim.store.memory.MemoryStore.feed_bus}).
    """
    lists: dict[int, int] = {}
    head = ["\0"]
    lines = []
    for message, users in fed:
        ref = lists.get(id(users))
        if ref is None:
            head.append("U" + ",".join(map(str, users)))
            ref = lists[id(users)] = len(lists) + 1
        member = encode_stored(message)
        lines.append(f"{ref}\t{message.conversation}\t{member}")
    return "\n".join(head + lines).encode("utf-8", "surrogateescape")


def decode_feed(payload: bytes) -> list[tuple[list[ChatMessage], list[int]]]:
    """
    The messages of a group feed's payload (published by the Redis store's
    append script: L{cim.store.redis.store.RedisStore.append}'s C{feed}),
    in order, as runs of messages of one conversation with their users.

    The payload: a NUL line; the lists of users (C{U} then their ids
    joined by commas); then a line per message, C{<list>\t<conversation>\t
    <stored member>} (L{cim.store.redis.records}), the list numbered from
    1 in the order given.

    @raise ValueError: it does not decode.
    """
    lines = payload.decode("utf-8").split("\n")
    if lines[0] != "\0":
        raise ValueError("not a group feed")
    lists: list[list[int]] = []
    runs: list[tuple[list[ChatMessage], list[int]]] = []
    last: tuple[int, str] | None = None
    try:
        for line in lines[1:]:
            if line[:1] == "U":
                lists.append([int(uid) for uid in line[1:].split(",") if uid])
                continue
            ref, conversation, member = line.split("\t", 2)
            message = decode_message(conversation, member)
            key = (int(ref), conversation)
            if key == last:
                runs[-1][0].append(message)
            else:
                runs.append(([message], lists[key[0] - 1]))
                last = key
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise ValueError(f"bad group feed: {e!r}") from None
    return runs
