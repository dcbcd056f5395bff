"""
The messaging core shared by the IM server and the route: store a message,
then deliver it to wherever each recipient is connected.

Delivery is at-least-once on the wire and exactly-once on screen: every
message is appended to the store (and so survives) before anybody is told it
was sent; pushes are best effort, and a recipient that missed one gets it
from the store when its server notices the gap or when it logs in again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cachetools import TTLCache
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.batch import Batcher
from cim.interfaces import (
    ILocalDelivery,
    IPusher,
    IStore,
    NewMessage,
    QuotaExceeded,
    Session,
)
from cim.message import ChatMessage

#: How long a user's server, once looked up, is pushed to without asking the
#: store again, in seconds; and how many such entries are kept at most.
ROUTE_CACHE_TTL = 10.0
ROUTE_CACHE_SIZE = 200_000
#: The clock of a delivery without one (its location cache stays unused).
_NO_CLOCK = Clock()


@dataclass(slots=True)
class DeliveryReport:
    """
    Where a delivery went.  A user in C{offline} or C{failed} still gets the
    message from the store at its next login.

    @ivar delivered: written to the user's connection (or handed to the
        server holding it).
    @ivar offline: the user has no connected session.
    @ivar failed: the user's server could not be reached.
    """

    delivered: list[int] = field(default_factory=list)
    offline: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)


class Delivery:
    """
    Append messages to the store and deliver them.

    @param here: the L{cim.interfaces.ServerAddress} string of the IM server
        this process runs (with C{local}), or C{None} in a route.
    @param clock: with a clock, where users were found is remembered for
        L{ROUTE_CACHE_TTL} seconds, saving a store lookup per delivery.
    """

    log = Logger()

    def __init__(
        self,
        store: IStore,
        pusher: IPusher,
        local: ILocalDelivery | None = None,
        here: str | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.store = store
        self.pusher = pusher
        self.local = local
        self.here = here
        self.clock = clock
        #: user id -> server: where a recent lookup found the user, for
        #: L{ROUTE_CACHE_TTL} seconds on C{clock}.  Never trusted for
        #: "offline" (a push that finds the user gone leads to a fresh
        #: lookup).
        self._routes: TTLCache[int, str] = TTLCache(
            ROUTE_CACHE_SIZE, ROUTE_CACHE_TTL, timer=(clock or _NO_CLOCK).seconds
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
        )
        self._lookup: Batcher[list[int], dict[int, Session]] = Batcher(
            self._lookup_batch, max_in_flight=4, max_batch=500
        )

    # Appending

    def _append_batch(self, requests: list[list[NewMessage]]) -> Deferred:
        flat = [m for request in requests for m in request]

        def split(stored: list[ChatMessage]) -> list[list[ChatMessage]]:
            out = []
            start = 0
            for request in requests:
                out.append(stored[start : start + len(request)])
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

        d: Deferred = self.store.append(flat)
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

    # Delivering

    def _lookup_batch(self, requests: list[list[int]]) -> Deferred:
        wanted = sorted({uid for request in requests for uid in request})

        def split(sessions: dict[int, Session]) -> list[dict[int, Session]]:
            return [
                {uid: sessions[uid] for uid in request if uid in sessions}
                for request in requests
            ]

        d: Deferred = self.store.get_sessions(wanted)
        return d.addCallback(split)

    def deliver(
        self, messages: Sequence[ChatMessage], user_ids: Sequence[int]
    ) -> Deferred[DeliveryReport]:
        """
        Deliver C{messages} (already stored) to each of C{user_ids}: those
        connected to this process directly, the others with one push per
        server.  Never fails: a failure to reach a server is reported (and
        logged), and the store still holds the messages.
        """
        report = DeliveryReport()
        remaining: Sequence[int] = user_ids
        if self.local is not None:
            remaining = self.local.deliver_local(messages, user_ids)
            if len(remaining) != len(user_ids):
                missing = set(remaining)
                report.delivered.extend(u for u in user_ids if u not in missing)
        if not remaining:
            return succeed(report)
        if self.clock is None:
            return self._lookup_and_push(messages, list(remaining), report)
        # Users whose server we learnt recently are pushed to directly; the
        # others (and any that a push finds gone) are looked up in the store.
        unknown = []
        cached: dict[str, list[int]] = {}
        for uid in remaining:
            server = self._routes.get(uid)
            if server is not None:
                cached.setdefault(server, []).append(uid)
            else:
                unknown.append(uid)
        work: list[Deferred[Any]] = []
        for server, uids in cached.items():
            # (Typed loosely: the callbacks chain to a DeliveryReport.)
            d: Any = self.pusher.push(server, messages, uids)
            d.addCallbacks(
                self._pushed_cached,
                self._push_cached_failed,
                callbackArgs=(uids, messages, report),
                errbackArgs=(uids, messages, report),
            )
            work.append(d)
        if unknown:
            work.append(self._lookup_and_push(messages, unknown, report))
        return _all(work).addCallback(lambda _: report)

    def _lookup_and_push(
        self,
        messages: Sequence[ChatMessage],
        user_ids: list[int],
        report: DeliveryReport,
    ) -> Deferred[DeliveryReport]:
        d: Deferred = self._lookup.submit_deferred(user_ids)
        d.addCallback(self._push_remote, messages, user_ids, report)
        d.addErrback(self._lookup_failed, user_ids, report)
        return d

    def _pushed_cached(
        self,
        missing: list[int],
        uids: list[int],
        messages: Sequence[ChatMessage],
        report: DeliveryReport,
    ) -> Deferred[DeliveryReport] | None:
        if not missing:
            report.delivered.extend(uids)
            return None
        gone = set(missing)
        report.delivered.extend(u for u in uids if u not in gone)
        # They moved (or left) since we learnt where they were: ask the store.
        for uid in gone:
            self._routes.pop(uid, None)
        return self._lookup_and_push(messages, list(gone), report)

    def _push_cached_failed(
        self,
        failure: Failure,
        uids: list[int],
        messages: Sequence[ChatMessage],
        report: DeliveryReport,
    ) -> Deferred[DeliveryReport]:
        for uid in uids:
            self._routes.pop(uid, None)
        return self._lookup_and_push(messages, uids, report)

    def _lookup_failed(
        self, failure: Failure, user_ids: list[int], report: DeliveryReport
    ) -> DeliveryReport:
        self.log.failure("Session lookup failed; messages stay stored", failure)
        report.failed.extend(user_ids)
        return report

    def _push_remote(
        self,
        sessions: dict[int, Session],
        messages: Sequence[ChatMessage],
        user_ids: list[int],
        report: DeliveryReport,
    ) -> Deferred[DeliveryReport]:
        by_server: dict[str, list[int]] = {}
        for uid in user_ids:
            session = sessions.get(uid)
            if session is None or session.server == self.here:
                # No session, or one here whose connection just went away:
                # the store has the messages for its next login.
                report.offline.append(uid)
            else:
                by_server.setdefault(session.server, []).append(uid)
        if self.clock is not None:
            for server, uids in by_server.items():
                for uid in uids:
                    self._routes[uid] = server
        if not by_server:
            return succeed(report)
        pushes = []
        for server, uids in by_server.items():
            d = self.pusher.push(server, messages, uids)
            d.addCallbacks(
                self._pushed,
                self._push_failed,
                callbackArgs=(uids, report),
                errbackArgs=(server, uids, report),
            )
            pushes.append(d)
        return _all(pushes).addCallback(lambda _: report)

    def _pushed(
        self, missing: list[int], uids: list[int], report: DeliveryReport
    ) -> None:
        gone = set(missing)
        for uid in gone:
            self._routes.pop(uid, None)
        report.delivered.extend(u for u in uids if u not in gone)
        report.offline.extend(u for u in uids if u in gone)

    def _push_failed(
        self, failure: Failure, server: str, uids: list[int], report: DeliveryReport
    ) -> None:
        self.log.warn(
            "Push to {server} failed for {count} users: {error}",
            server=server,
            count=len(uids),
            error=failure.getErrorMessage(),
        )
        for uid in uids:
            self._routes.pop(uid, None)
        report.failed.extend(uids)


def _all(deferreds: list[Deferred]) -> Deferred:
    """
    Fire once every one of C{deferreds} fired (none of which fails); the
    common single push goes without a L{DeferredList}.
    """
    return deferreds[0] if len(deferreds) == 1 else DeferredList(deferreds)
