"""
The messaging core shared by the IM server and the route: store a message,
then deliver it to wherever each recipient is connected.

Delivery is at-least-once on the wire and exactly-once on screen: every
message is appended to the store (and so survives) before anybody is told it
was sent.  A push to another server that fails is kept and sent again in
the background (L{PushRetry}): with backoff, to wherever the devices it was
for are connected by then, until it is delivered, they are gone, or its
time is up.  Pushes are idempotent (a server's streams drop what a
connection already got), so sending one again is safe.  A recipient that
still missed one gets it from the store when its server notices the gap or
when it logs in again.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.batch import Batcher
from cim.codec import Messages
from cim.interfaces import (
    Appended,
    Generations,
    ILocalDelivery,
    IPusher,
    IStore,
    NewMessage,
    QuotaExceeded,
    Session,
)
from cim.limits import MAX_PUSH_RETRIES, SESSION_TTL
from cim.message import ChatMessage
from cim.metrics import Metrics
from cim.pushapi import PushItem, ReadEvent
from cim.sessioncache import SessionCache

__all__ = [
    "Delivery",
    "DeliveryReport",
    "ILocalDelivery",
    "IPusher",
    "PushRetry",
    "deliver_item",
]

#: Delivers to users connected here: user ids -> those with no device here.
_Local = Callable[[Sequence[int]], list[int]]
#: Pushes to one server: (server, user ids) -> those with no device there.
_Push = Callable[[str, Sequence[int]], "Deferred[list[int]]"]


class _Fed(list[NewMessage]):
    """
    Messages to append whose store publishes them to C{users} (the group
    feed: L{Delivery.append_fed}).
    """

    __slots__ = ("users",)

    def __init__(self, messages: list[NewMessage], users: Sequence[int]) -> None:
        super().__init__(messages)
        self.users = users


@dataclass(slots=True)
class DeliveryReport:
    """
    Where a delivery went.  A user in C{offline} or C{failed} still gets the
    message from the store at its next login.

    @ivar delivered: written to at least one of the user's devices (or
        handed to a server holding one).
    @ivar offline: the user has no connected device.
    @ivar failed: no device was reached, and a server holding one could not
        be reached.
    """

    delivered: list[int] = field(default_factory=list)
    offline: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PushRetry:
    """
    How a daemon sends failed pushes again.

    @ivar time: seconds after its first failure that a push is given up
        (C{--push-retry-time}; by default a session's time to live: a
        server that cannot be reached for that long has lost its sessions),
        counted in the waits between its retries: a clock that jumps ahead
        does not make it late.
    @ivar max_pending: the most failed pushes kept (C{--push-retry-max});
        past that the oldest are given up.
    @ivar first_delay: seconds before the first retry to a server; each
        retry that fails doubles it, up to C{max_delay}.  The delay drawn is
        between half and all of it (jitter), so that daemons that failed
        together do not retry together.
    """

    time: float = SESSION_TTL
    max_pending: int = MAX_PUSH_RETRIES
    first_delay: float = 0.5
    max_delay: float = 10.0


class _AnyDevice:
    """
    Every device of a user: a failed push whose devices are unknown (the
    lookup after a failed broadcast failed too) is sent again to all of
    them.
    """

    def __contains__(self, device: object) -> bool:
        return True


#: L{_AnyDevice}'s one instance.
ANY_DEVICE = _AnyDevice()


@dataclass(slots=True, eq=False)
class _Kept:
    """
    A push that failed, kept to be sent again.

    @ivar push: sends what it carries (messages, or a read event) to a
        server; C{local}: delivers it to the devices connected here.
    @ivar devices: user id -> the devices (session device ids) it was for
        (L{ANY_DEVICE}: all of them).
    @ivar budget: the seconds it may still wait for retries (from
        C{PushRetry.time}); it is given up when none are left.  Counted
        in the waits of the retries, not on the clock, so that a clock
        that jumps ahead does not give it up early.
    @ivar live: still to be sent: C{False} once delivered, dropped or
        given up.
    """

    push: _Push
    local: _Local | None
    devices: Mapping[int, Container[str]]
    budget: float
    live: bool = True


@dataclass(slots=True, eq=False)
class _Waiting:
    """
    A delivery waiting for a session lookup (L{Delivery._where}).

    @ivar then: called with C{found} once it is C{ready} and every
        delivery before it went.
    @ivar found: the sessions found so far, or the lookup's failure.
    """

    then: Callable[[dict[int, list[Session]] | Failure], object]
    found: dict[int, list[Session]] | Failure
    ready: bool


@dataclass(slots=True, eq=False)
class _Server:
    """
    The failed pushes to one server, sent again together (one session
    lookup, one timer) in the order they failed.

    @ivar failures: retries to it in a row that failed (the backoff).
    @ivar busy: a retry round to it is in flight.
    @ivar delay: the wait before the round C{call} is for.
    """

    server: str
    queue: list[_Kept] = field(default_factory=list)
    failures: int = 0
    call: IDelayedCall | None = None
    busy: bool = False
    delay: float = 0.0


class Delivery:
    """
    Append messages to the store and deliver them to every connected device
    of their recipients.

    A user's devices may be connected to several servers, and a device may
    log in on any server at any time: so a delivery needs where the users'
    sessions are as the store holds them after the messages were stored.
    It writes at once to the devices connected to this process, then
    takes the others' sessions from its L{SessionCache} when the append
    read the same session generations (the users of private
    conversations: L{cim.interfaces.Appended}), and asks the store for the
    rest (L{IStore.get_sessions}; concurrent deliveries share one lookup,
    whose answer refreshes the cache).  The module
    L{cim.sessioncache} says why that is what a lookup right after the
    append would read.  Deliveries push in the order they were made: one
    whose sessions are all cached waits behind an earlier one still being
    looked up (a push overtaking another of the same conversation would
    open a gap in the receiving streams).

    A push that fails is kept (per server: what it carried, and the devices
    it was for) and sent again on C{clock}, after a backoff with jitter
    (L{PushRetry}); each retry looks the devices up again: one that moved
    is pushed to on its new server (or delivered to here), one with no
    session any more is dropped (it catches up at its next login).  The
    pushes kept for one server go again together, in the order they
    failed; a push made meanwhile may overtake them, which the receiving
    streams tolerate (a later message opens a gap that the store fills; a
    message that arrives again is dropped).  A push is given up past
    C{retry.time}, or when more than C{retry.max_pending} are kept (the
    oldest first), with a warning: its recipients get it at their next gap
    or login.  L{stop} cancels the retries.  (The pusher's Deferreds must
    fire in the end: its pushes time out.  A retry round to a server waits
    for its pushes before the next.)

    @param here: the L{cim.interfaces.ServerAddress} string of the IM server
        this process runs (with C{local}), or C{None} in a route.
    @param clock: the retries' timers.
    @param rng: the jitter of the retries' delays.
    @param metrics: where to count the retries
        (C{push_retries_total}, C{push_retries_abandoned_total},
        C{push_retries_pending}); a set of its own by default.
    @param broadcast_from: deliver to this many users or more (a group's
        members) without looking up their sessions: push to every other
        server that the store says may hold sessions
        (L{IStore.session_servers}, one small read instead of two store
        commands per user), each writing to those of the users it holds.
        The report then counts a user as delivered when a server took the
        push, whether or not it holds one of the user's devices (the IM
        server does not read it); a push that fails is looked up and kept
        as any.  C{None}: always look the sessions up (the route, whose
        answers tell who was offline).
    @param session_cache: how many users' sessions are kept (the
        daemons' C{--session-cache}; 0: none, every delivery looks its
        users up).
    @param per_turn: appends and session lookups that could go at once
        wait for the end of the reactor turn and go together (see
        L{Batcher}): the route's, whose sends arrive one per HTTP request,
        and whose deliveries start together when an append returns.
    """

    log = Logger()

    def __init__(
        self,
        store: IStore,
        pusher: IPusher,
        local: ILocalDelivery | None = None,
        here: str | None = None,
        *,
        clock: IReactorTime,
        retry: PushRetry | None = None,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        broadcast_from: int | None = None,
        per_turn: bool = False,
        session_cache: int = 0,
    ) -> None:
        if broadcast_from is not None and broadcast_from < 1:
            raise ValueError("broadcast_from must be at least 1")
        self.store = store
        self.broadcast_from = broadcast_from
        #: Whether the store's group feed delivers groups' messages
        #: (L{fans_out}).
        self.feed = False
        self.pusher = pusher
        self.local = local
        self.here = here
        self.clock = clock
        self.retry = retry or PushRetry()
        self._rng = rng or random.Random()
        self._servers: dict[str, _Server] = {}
        #: Every kept push, oldest first (and some no longer live).
        self._kept: deque[_Kept] = deque()
        self._pending = 0
        self._stopped = False
        self.metrics = metrics = metrics or Metrics("cim_delivery")
        self.m_retried = metrics.counter(
            "push_retries_total", "Failed pushes to other servers sent again"
        )
        self.m_abandoned = metrics.counter(
            "push_retries_abandoned_total",
            "Failed pushes given up (too old, or too many kept): their "
            "recipients get them at their next gap or login",
        )
        metrics.gauge(
            "push_retries_pending",
            "Failed pushes kept to be sent again",
            lambda: self._pending,
        )
        self._appender: Batcher[list[NewMessage], list[ChatMessage]] = Batcher(
            # One batch at a time keeps appends in submission order (a
            # sender's messages are stored in the order it sent them); and
            # when one fails, those queued behind it fail too, so that none
            # is stored before an earlier one sent again.
            self._append_batch,
            max_in_flight=1,
            max_batch=500,
            fail_queued=True,
            clock=clock if per_turn else None,
        )
        self._lookup: Batcher[list[int], dict[int, list[Session]]] = Batcher(
            self._lookup_batch,
            max_in_flight=4,
            max_batch=500,
            clock=clock if per_turn else None,
        )
        #: Where users' sessions are (None: not kept), and the deliveries
        #: waiting for their lookups, in order (L{_where}).
        self.sessions = SessionCache(session_cache) if session_cache else None
        self._waiting: deque[_Waiting] = deque()
        if self.sessions is not None:
            cache = self.sessions
            metrics.gauge(
                "session_cache_users",
                "Users whose sessions are kept (--session-cache)",
                lambda: len(cache),
            )
            metrics.read_counter(
                "session_cache_hits_total",
                "Users of deliveries whose kept sessions were current",
                lambda: cache.hits,
            )
            metrics.read_counter(
                "session_cache_misses_total",
                "Users of deliveries looked up in the store",
                lambda: cache.misses,
            )
        # A lookup is shared only by the deliveries that asked before it
        # was sent (so after their messages were stored), never joined in
        # flight.
        self._servers_lookup: Batcher[None, list[str]] = Batcher(
            self._servers_batch,
            max_in_flight=4,
            max_batch=10_000,
            clock=clock if per_turn else None,
        )

    @property
    def pending(self) -> int:
        """
        How many failed pushes are kept to be sent again.
        """
        return self._pending

    def stop(self) -> None:
        """
        Give up every kept push and cancel the retries' timers; pushes that
        fail from now on are not kept.
        """
        self._stopped = True
        for state in self._servers.values():
            if state.call is not None and state.call.active():
                state.call.cancel()
            state.call = None
        self._servers.clear()
        for kept in self._kept:
            kept.live = False
        self._kept.clear()
        self._pending = 0

    # Appending

    def fans_out(self, messages: Sequence[NewMessage], user_ids: Sequence[int]) -> bool:
        """
        Whether the store's group feed carries C{messages} to C{user_ids}
        (L{append_fed}): a group's, to C{broadcast_from} users or more,
        when the feed is on (C{feed}: the IM server sets it when it gets
        pushes over the bus from a store that feeds).
        """
        return (
            self.feed
            and self.broadcast_from is not None
            and len(user_ids) >= self.broadcast_from
            and bool(messages)
            and bool(messages[0].group_id)
        )

    def _append_batch(self, requests: list[list[NewMessage]]) -> Deferred:
        flat = [m for request in requests for m in request]
        if any(type(request) is _Fed for request in requests):
            feed = [
                request.users if type(request) is _Fed else None  # type: ignore[attr-defined]
                for request in requests
                for _ in request
            ]
            d: Deferred = self.store.append(flat, feed=feed)
        else:
            d = self.store.append(flat)

        def split(stored: list[ChatMessage]) -> list[list[ChatMessage]]:
            if len(requests) == 1:
                return [stored]
            generations = getattr(stored, "generations", None)
            out: list[list[ChatMessage]] = []
            start = 0
            for request in requests:
                out.append(Appended(stored[start : start + len(request)], generations))
                start += len(request)
            return out

        def refused(failure: Failure) -> list[list[ChatMessage] | Failure]:
            # Only the requests with a refused message fail; the others of
            # the batch were stored.
            failure.trap(QuotaExceeded)
            assert isinstance(failure.value, QuotaExceeded)
            out: list[list[ChatMessage] | Failure] = []
            for part in split(failure.value.results):  # type: ignore[arg-type]
                if None in part:
                    out.append(Failure(QuotaExceeded(part)))
                else:
                    out.append(part)
            return out

        return d.addCallbacks(split, refused)

    def append(self, messages: list[NewMessage]) -> Deferred[list[ChatMessage]]:
        """
        Append C{messages} (in order) with other concurrent appends in one
        store call.

        @return: fires with the stored messages; fails with
            L{QuotaExceeded} when the store refused them (their sender's
            quota for the conversation is used up).
        """
        return self._appender.submit_deferred(messages)

    def append_callback(
        self,
        messages: list[NewMessage],
        done: Callable[[list[ChatMessage] | Failure], object],
    ) -> None:
        """
        Like L{append}, calling C{done(stored_list_or_failure)}; the hot path
        of TCP sends, without a Deferred per message.
        """
        self._appender.submit(messages, done)

    def append_fed(
        self,
        messages: list[NewMessage],
        user_ids: Sequence[int],
        done: Callable[[list[ChatMessage] | Failure], object],
    ) -> None:
        """
        Like L{append_callback}, and the store publishes the messages it
        appends to every server holding sessions, in the order it stores
        them, for those of C{user_ids} each holds (the group feed, when
        L{fans_out}): they are then delivered from there, here too, not
        by L{send_out}.
        """
        self._appender.submit(_Fed(messages, user_ids), done)

    # Delivering

    def _lookup_batch(self, requests: list[list[int]]) -> Deferred:
        wanted = sorted({uid for request in requests for uid in request})
        cache = self.sessions

        def split(
            sessions: dict[int, list[Session]],
        ) -> list[dict[int, list[Session]]]:
            if cache is not None:
                cache.remember(sessions, getattr(sessions, "generations", None))
            return [
                {uid: sessions[uid] for uid in request if uid in sessions}
                for request in requests
            ]

        d: Deferred = self.store.get_sessions(wanted)
        return d.addCallback(split)

    def _servers_batch(self, requests: list[None]) -> Deferred:
        d: Deferred = self.store.session_servers()
        return d.addCallback(lambda servers: [servers] * len(requests))

    def deliver(
        self, messages: Sequence[ChatMessage], user_ids: Sequence[int]
    ) -> Deferred[DeliveryReport]:
        """
        Deliver C{messages} (already stored) to every connected device of
        each of C{user_ids}: those connected to this process directly, the
        others with one push per server holding any of their sessions.
        Never fails: a failure to reach a server is reported (and logged),
        the store still holds the messages, and the push is sent again in
        the background.
        """
        push, local = self._carriers(messages)
        return self._fan_out(
            user_ids, local, push, getattr(messages, "generations", None)
        )

    def _carriers(self, messages: Sequence[ChatMessage]) -> tuple[_Push, _Local | None]:
        """
        How C{messages} are pushed to a server, and delivered here.
        """
        local = self.local
        return (
            lambda server, uids: self.pusher.push(server, messages, uids),
            None if local is None else lambda uids: local.deliver_local(messages, uids),
        )

    def send_out(
        self, messages: Sequence[ChatMessage], user_ids: Sequence[int]
    ) -> None:
        """
        L{deliver}, when nobody waits for the report: the IM server's own
        sends.  The same deliveries, pushes and retries, with no Deferred
        and no report of its own (the path of every message sent over a
        connection).
        """
        local = self.local
        users = list(dict.fromkeys(user_ids))
        if not users:
            return
        generations = getattr(messages, "generations", None)
        if not isinstance(messages, Messages):
            # Each message encoded once, for the connections here and the
            # pushes to other servers alike.
            messages = Messages(messages)
        if local is not None:
            local.deliver_local(messages, users)
        if self.broadcast_from is not None and len(users) >= self.broadcast_from:
            self._servers_lookup.submit(
                None, partial(self._send_everywhere, messages, users)
            )
            return
        self._where(users, generations, partial(self._send_out, messages, users))

    def _where(
        self,
        users: list[int],
        generations: Generations | None,
        then: Callable[[dict[int, list[Session]] | Failure], object],
    ) -> None:
        """
        Call C{then} with the sessions of C{users} (or the failure to look
        them up): those the cache holds at C{generations} (the append's),
        the others looked up; after every earlier call's C{then}.
        """
        cache = self.sessions
        if cache is None:
            self._lookup.submit(users, then)
            return
        found, missed = cache.find(users, generations)
        waiting = self._waiting
        if not missed and not waiting:
            then(found)
            return
        wait = _Waiting(then, found, not missed)
        waiting.append(wait)
        if missed:
            self._lookup.submit(missed, partial(self._found, wait))

    def _found(
        self, wait: _Waiting, sessions: dict[int, list[Session]] | Failure
    ) -> None:
        """
        The lookup C{wait} needed answered: call the C{then} of each
        delivery that is ready, in order.
        """
        if isinstance(sessions, Failure):
            wait.found = sessions
        else:
            assert not isinstance(wait.found, Failure)
            wait.found.update(sessions)
        wait.ready = True
        waiting = self._waiting
        while waiting and waiting[0].ready:
            first = waiting.popleft()
            try:
                first.then(first.found)
            except Exception:
                self.log.failure("A delivery failed")

    def _send_everywhere(
        self,
        messages: Sequence[ChatMessage],
        users: list[int],
        servers: list[str] | Failure,
    ) -> None:
        # send_out's L{_push_everywhere} (see C{broadcast_from}).
        if isinstance(servers, Failure):
            self.log.failure(
                "Looking up the servers failed; messages stay stored", servers
            )
            return
        for server in servers:
            if server == self.here:
                continue
            self.pusher.push(server, messages, users).addCallbacks(
                self._sent_out,
                self._send_everywhere_failed,
                callbackArgs=(server,),
                errbackArgs=(server, users, messages),
            )

    def _send_everywhere_failed(
        self,
        failure: Failure,
        server: str,
        users: list[int],
        messages: Sequence[ChatMessage],
    ) -> None:
        push, local = self._carriers(messages)
        self._broadcast_failed(failure, server, users, set(), push, local)

    def _send_out(
        self,
        messages: Sequence[ChatMessage],
        users: list[int],
        sessions: dict[int, list[Session]] | Failure,
    ) -> None:
        if isinstance(sessions, Failure):
            self.log.failure("Session lookup failed; messages stay stored", sessions)
            return
        by_server = self._by_server(sessions, users)
        if not by_server:
            return
        pusher = self.pusher
        for server, uids in by_server.items():
            pusher.push(server, messages, uids).addCallbacks(
                self._sent_out,
                self._send_out_failed,
                callbackArgs=(server,),
                errbackArgs=(server, uids, sessions, messages),
            )

    def _sent_out(self, missing: list[int], server: str) -> None:
        if self._servers:
            self._answered(server)

    def _send_out_failed(
        self,
        failure: Failure,
        server: str,
        uids: list[int],
        sessions: dict[int, list[Session]],
        messages: Sequence[ChatMessage],
    ) -> None:
        push, local = self._carriers(messages)
        self._push_failed(failure, server, uids, sessions, set(), push, local)

    def deliver_read(
        self, reader_id: int, conversation: str, seq: int, user_ids: Sequence[int]
    ) -> Deferred[DeliveryReport]:
        """
        Tell every connected device of each of C{user_ids} that
        C{reader_id} read C{conversation} up to C{seq} (a READ frame), as
        L{deliver} does with messages.  Never fails.
        """
        local = self.local
        return self._fan_out(
            user_ids,
            None
            if local is None
            else lambda uids: local.deliver_read_local(
                reader_id, conversation, seq, uids
            ),
            lambda server, uids: self.pusher.push_read(
                server, reader_id, conversation, seq, uids
            ),
        )

    def _fan_out(
        self,
        user_ids: Sequence[int],
        local: _Local | None,
        push: _Push,
        generations: Generations | None = None,
    ) -> Deferred[DeliveryReport]:
        users = list(dict.fromkeys(user_ids))
        reached: set[int] = set()
        if local is not None:
            reached.update(users)
            reached.difference_update(local(users))
        if not users:
            return succeed(DeliveryReport())
        d: Deferred[Any]
        if self.broadcast_from is not None and len(users) >= self.broadcast_from:
            d = self._servers_lookup.submit_deferred(None)
            d.addCallback(self._push_everywhere, push, local, users, reached)
        else:
            d = Deferred()
            self._where(
                users,
                generations,
                lambda found: (
                    d.errback(found)
                    if isinstance(found, Failure)
                    else d.callback(found)
                ),
            )
            d.addCallback(self._push_remote, push, local, users, reached)
        d.addErrback(self._lookup_failed, users, reached)
        return cast("Deferred[DeliveryReport]", d)

    def _by_server(
        self, sessions: dict[int, list[Session]], users: list[int]
    ) -> dict[str, list[int]]:
        """
        Each other server holding sessions of C{users}, with those users
        (each once, in the order of C{users}).  A session here whose device
        is not connected (claimed, or its connection just went away) is
        left out: the store has the messages for its next login.  (The
        devices are only looked at when a push fails: L{_push_failed}.)
        """
        by_server: dict[str, list[int]] = {}
        here = self.here
        for uid in users:
            for s in sessions.get(uid, ()):
                server = s.server
                if server == here:
                    continue
                uids = by_server.get(server)
                if uids is None:
                    by_server[server] = [uid]
                elif uids[-1] != uid:
                    uids.append(uid)
        return by_server

    def _lookup_failed(
        self, failure: Failure, users: list[int], reached: set[int]
    ) -> DeliveryReport:
        self.log.failure("Session lookup failed; messages stay stored", failure)
        return _report(users, reached, set(users) - reached)

    def _push_remote(
        self,
        sessions: dict[int, list[Session]],
        push: _Push,
        local: _Local | None,
        users: list[int],
        reached: set[int],
    ) -> Deferred[DeliveryReport]:
        by_server = self._by_server(sessions, users)
        if not by_server:
            return succeed(_report(users, reached, set()))
        failed: set[int] = set()
        pushes = []
        for server, uids in by_server.items():
            d = push(server, uids)
            d.addCallbacks(
                self._pushed,
                self._push_failed,
                callbackArgs=(server, uids, reached),
                errbackArgs=(server, uids, sessions, failed, push, local),
            )
            pushes.append(d)
        return _all(pushes).addCallback(
            lambda _: _report(users, reached, failed - reached)
        )

    def _push_everywhere(
        self,
        servers: list[str],
        push: _Push,
        local: _Local | None,
        users: list[int],
        reached: set[int],
    ) -> Deferred[DeliveryReport]:
        """
        Push to every server but this one, for all of C{users} (see
        C{broadcast_from}).
        """
        failed: set[int] = set()
        pushes = []
        here = self.here
        for server in servers:
            if server == here:
                continue
            d = push(server, users)
            d.addCallbacks(
                self._pushed,
                self._broadcast_failed,
                callbackArgs=(server, users, reached),
                errbackArgs=(server, users, failed, push, local),
            )
            pushes.append(d)
        if not pushes:
            return succeed(_report(users, reached, set()))
        return _all(pushes).addCallback(
            lambda _: _report(users, reached, failed - reached)
        )

    def _broadcast_failed(
        self,
        failure: Failure,
        server: str,
        users: list[int],
        failed: set[int],
        push: _Push,
        local: _Local | None,
    ) -> None:
        """
        A push to all of C{users} failed: look up which of them hold
        sessions on C{server}, and keep the push for those
        (L{_push_failed}).
        """
        failed.update(users)

        def found(sessions: dict[int, list[Session]]) -> None:
            there = [
                uid
                for uid in users
                if any(s.server == server for s in sessions.get(uid, ()))
            ]
            if there:
                self._push_failed(failure, server, there, sessions, failed, push, local)

        def unknown(lookup_failure: Failure) -> None:
            # Which devices were there is unknown: the push is kept for
            # every device of its users, sent again wherever they are then
            # (a stream drops what it wrote already).
            self.log.warn(
                "Session lookup after a failed push to {server} failed: "
                "{error}; the push goes again to every device of its users",
                server=server,
                error=_error(lookup_failure),
            )
            self._keep(
                server,
                [
                    _Kept(
                        push,
                        local,
                        dict.fromkeys(users, ANY_DEVICE),
                        self.retry.time,
                    )
                ],
            )

        d: Deferred = self._lookup.submit_deferred(users)
        d.addCallbacks(found, unknown)
        d.addErrback(
            lambda f: self.log.failure(
                "Keeping a failed push to {server} failed", f, server=server
            )
        )

    def _pushed(
        self, missing: list[int], server: str, uids: list[int], reached: set[int]
    ) -> None:
        reached.update(set(uids).difference(missing) if missing else uids)
        self._answered(server)

    def _push_failed(
        self,
        failure: Failure,
        server: str,
        uids: list[int],
        sessions: dict[int, list[Session]],
        failed: set[int],
        push: _Push,
        local: _Local | None,
    ) -> None:
        self.log.warn(
            "Push to {server} failed for {count} users: {error}; sending it again",
            server=server,
            count=len(uids),
            error=_error(failure),
        )
        failed.update(uids)
        # The devices it was for: those of its users' sessions there.
        devices = {
            uid: {s.device for s in sessions[uid] if s.server == server} for uid in uids
        }
        self._keep(
            server,
            [
                _Kept(
                    push,
                    local,
                    devices,
                    self.retry.time,
                )
            ],
        )

    # Sending failed pushes again

    def _keep(self, server: str, kept: list[_Kept]) -> None:
        """
        Keep C{kept} (new failures) to be sent to C{server} again, after
        those already kept for it.
        """
        if self._stopped:
            return
        state = self._servers.get(server)
        if state is None:
            state = self._servers[server] = _Server(server)
        state.queue.extend(kept)
        self._kept.extend(kept)
        self._pending += len(kept)
        self._trim()
        self._schedule(state)

    def _trim(self) -> None:
        """
        Give up the oldest kept pushes past C{retry.max_pending}.
        """
        dropped = 0
        while self._pending > self.retry.max_pending:
            kept = self._kept.popleft()
            if kept.live:
                kept.live = False
                self._pending -= 1
                dropped += 1
        if dropped:
            self.m_abandoned.inc(dropped)
            self.log.warn(
                "Gave up {count} failed pushes: more than {limit} kept "
                "(their recipients get them at their next gap or login)",
                count=dropped,
                limit=self.retry.max_pending,
            )
        if len(self._kept) > 2 * self._pending + 64:
            self._kept = deque(k for k in self._kept if k.live)

    def _done(self, kept: _Kept) -> None:
        if kept.live:
            kept.live = False
            self._pending -= 1

    def _schedule(self, state: _Server) -> None:
        """
        Send what is kept for C{state}'s server after its backoff, unless
        a retry to it is waiting or in flight.
        """
        if state.busy or state.call is not None:
            return
        if not any(k.live for k in state.queue):
            state.queue = []
            self._forget(state)
            return
        retry = self.retry
        delay = min(retry.max_delay, retry.first_delay * 2**state.failures)
        delay *= self._rng.uniform(0.5, 1.0)
        state.delay = delay
        state.call = self.clock.callLater(delay, self._round, state)

    def _answered(self, server: str) -> None:
        """
        C{server} took a push: what is kept for it goes soon.
        """
        state = self._servers.get(server)
        if state is None or state.failures == 0:
            return
        state.failures = 0
        if state.call is not None and state.call.active():
            state.call.cancel()
            state.call = None
            self._schedule(state)

    def _round(self, state: _Server) -> None:
        """
        Send again what is kept for C{state}'s server: look its devices up,
        deliver to those connected here, push to the servers holding the
        others.
        """
        state.call = None
        kept = [k for k in state.queue if k.live]
        state.queue = []
        for k in kept:
            k.budget -= state.delay
        late = [k for k in kept if k.budget <= 0]
        if late:
            for k in late:
                self._done(k)
            self.m_abandoned.inc(len(late))
            self.log.warn(
                "Gave up {count} pushes to {server}: failing for {time}s "
                "(their recipients get them at their next gap or login)",
                count=len(late),
                server=state.server,
                time=self.retry.time,
            )
            kept = [k for k in kept if k.live]
        if not kept:
            if not state.queue:
                self._forget(state)
            return
        state.busy = True
        users = sorted({uid for k in kept for uid in k.devices})
        d: Deferred = self._lookup.submit_deferred(users)
        d.addCallback(self._resend, kept)
        d.addErrback(self._lookup_failed_again, state.server, kept)
        d.addCallback(self._round_done, state)
        d.addErrback(
            lambda f: self.log.failure("Sending failed pushes again failed", f)
        )

    def _resend(
        self, sessions: dict[int, list[Session]], kept: list[_Kept]
    ) -> Deferred[dict[str, list[_Kept]]]:
        """
        Send each of C{kept} again, where its devices are now.

        @return: fires once every push is answered, with those that failed
            again (by server, in order).
        """
        again: dict[str, list[_Kept]] = {}
        if self._stopped:
            return succeed(again)
        pushes: list[Deferred[Any]] = []
        for k in kept:
            # server -> user id -> devices, of those sessions still held.
            targets: dict[str, dict[int, set[str]]] = {}
            here: list[int] = []
            for uid, wanted in k.devices.items():
                for s in sessions.get(uid, ()):
                    if s.device not in wanted:
                        continue
                    if s.server == self.here:
                        if uid not in here:
                            here.append(uid)
                    else:
                        targets.setdefault(s.server, {}).setdefault(uid, set()).add(
                            s.device
                        )
            self._done(k)
            if here and k.local is not None:
                k.local(here)
            for server, found in targets.items():
                moved = _Kept(k.push, k.local, found, k.budget)
                self._kept.append(moved)
                self._pending += 1
                self.m_retried.inc()
                d: Deferred[Any] = k.push(server, list(found))
                d.addCallbacks(
                    self._resent,
                    self._resend_failed,
                    callbackArgs=(server, moved),
                    errbackArgs=(server, moved, again),
                )
                pushes.append(d)
        self._trim()
        done: Deferred[object] = _all(pushes) if pushes else succeed(None)
        return done.addCallback(lambda _: again)

    def _resent(self, missing: list[int], server: str, kept: _Kept) -> None:
        self._done(kept)
        self._answered(server)

    def _resend_failed(
        self,
        failure: Failure,
        server: str,
        kept: _Kept,
        again: dict[str, list[_Kept]],
    ) -> None:
        self.log.info(
            "Push to {server} failed again for {count} users: {error}",
            server=server,
            count=len(kept.devices),
            error=_error(failure),
        )
        again.setdefault(server, []).append(kept)

    def _lookup_failed_again(
        self, failure: Failure, server: str, kept: list[_Kept]
    ) -> dict[str, list[_Kept]]:
        self.log.warn(
            "Session lookup for failed pushes to {server} failed: {error}",
            server=server,
            error=_error(failure),
        )
        return {server: kept}

    def _round_done(self, again: dict[str, list[_Kept]], state: _Server) -> None:
        """
        Put what failed again back in front of what was kept for each
        server meanwhile, and schedule the next retries.
        """
        state.busy = False
        if self._stopped:
            return
        for server, kept in again.items():
            live = [k for k in kept if k.live]
            target = self._servers.get(server)
            if target is None:
                target = self._servers[server] = _Server(server)
            target.queue[:0] = live
            target.failures += 1
            self._schedule(target)
        if state.queue:
            self._schedule(state)
        elif state.call is None:
            self._forget(state)

    def _forget(self, state: _Server) -> None:
        """
        Drop C{state}, with nothing kept for its server, unless another
        took its place.
        """
        if self._servers.get(state.server) is state:
            del self._servers[state.server]


def deliver_item(local: ILocalDelivery, item: PushItem) -> list[int]:
    """
    Deliver one pushed item (messages, or a read event, for some users) to
    the devices connected here, as a push to this server carries it (the
    push API, the message bus).  @return: its users with no device here.
    """
    what, users = item
    if isinstance(what, ReadEvent):
        return local.deliver_read_local(
            what.reader_id, what.conversation, what.seq, users
        )
    return local.deliver_local(what, users)


def _error(failure: Failure) -> str:
    """
    What went wrong, for a log line (a time-out's message is empty).
    """
    return failure.getErrorMessage() or getattr(failure.type, "__name__", "error")


def _report(users: list[int], reached: set[int], failed: set[int]) -> DeliveryReport:
    """
    The report of a delivery to C{users}: those C{reached} delivered, then
    those C{failed}, the others offline.
    """
    report = DeliveryReport()
    for uid in users:
        if uid in reached:
            report.delivered.append(uid)
        elif uid in failed:
            report.failed.append(uid)
        else:
            report.offline.append(uid)
    return report


def _all(deferreds: list[Deferred]) -> Deferred:
    """
    Fire (with C{None}) once every one of C{deferreds} fired; none of them
    fails (a failure is logged).  The common single push goes as it is;
    several are counted down (a L{DeferredList} keeps every result, which
    nobody reads).
    """
    if len(deferreds) == 1:
        return deferreds[0]
    done: Deferred[None] = Deferred()
    left = len(deferreds)

    def one(result: object) -> None:
        nonlocal left
        if isinstance(result, Failure):
            Delivery.log.failure("A push's report failed", result)
        left -= 1
        if not left:
            done.callback(None)

    for d in deferreds:
        d.addBoth(one)
    return done
