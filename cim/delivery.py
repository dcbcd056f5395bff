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

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
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

__all__ = ["Delivery", "DeliveryReport", "ILocalDelivery", "IPusher"]

#: Delivers to users connected here: user ids -> those with no device here.
_Local = Callable[[Sequence[int]], list[int]]
#: Pushes to one server: (server, user ids) -> those with no device there.
_Push = Callable[[str, Sequence[int]], "Deferred[list[int]]"]


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


class Delivery:
    """
    Append messages to the store and deliver them to every connected device
    of their recipients.

    A user's devices may be connected to several servers, and a device may
    log in on any server at any time: so every delivery asks the store
    where the users' sessions are (L{IStore.get_sessions}; concurrent
    deliveries share one lookup), after writing at once to the devices
    connected to this process.  (A cache of where users were found would
    miss a device that logged in elsewhere since: its live messages would
    wait for its next gap or login.)

    @param here: the L{cim.interfaces.ServerAddress} string of the IM server
        this process runs (with C{local}), or C{None} in a route.
    @param clock: unused (deliveries keep no cache any more); accepted for
        the callers that pass one.
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
        self._lookup: Batcher[list[int], dict[int, list[Session]]] = Batcher(
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

        def split(
            sessions: dict[int, list[Session]],
        ) -> list[dict[int, list[Session]]]:
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
        Deliver C{messages} (already stored) to every connected device of
        each of C{user_ids}: those connected to this process directly, the
        others with one push per server holding any of their sessions.
        Never fails: a failure to reach a server is reported (and logged),
        and the store still holds the messages.
        """
        local = self.local
        return self._fan_out(
            user_ids,
            None if local is None else lambda uids: local.deliver_local(messages, uids),
            lambda server, uids: self.pusher.push(server, messages, uids),
        )

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
        self, user_ids: Sequence[int], local: _Local | None, push: _Push
    ) -> Deferred[DeliveryReport]:
        users = list(dict.fromkeys(user_ids))
        reached: set[int] = set()
        if local is not None:
            missing = set(local(users))
            reached.update(u for u in users if u not in missing)
        if not users:
            return succeed(DeliveryReport())
        d: Deferred = self._lookup.submit_deferred(users)
        d.addCallback(self._push_remote, push, users, reached)
        d.addErrback(self._lookup_failed, users, reached)
        return d

    def _lookup_failed(
        self, failure: Failure, users: list[int], reached: set[int]
    ) -> DeliveryReport:
        self.log.failure("Session lookup failed; messages stay stored", failure)
        return _report(users, reached, set(users) - reached)

    def _push_remote(
        self,
        sessions: dict[int, list[Session]],
        push: _Push,
        users: list[int],
        reached: set[int],
    ) -> Deferred[DeliveryReport]:
        by_server: dict[str, list[int]] = {}
        for uid in users:
            for server in dict.fromkeys(s.server for s in sessions.get(uid, ())):
                # A session here whose device is not connected (claimed, or
                # its connection just went away): the store has the
                # messages for its next login.
                if server != self.here:
                    by_server.setdefault(server, []).append(uid)
        if not by_server:
            return succeed(_report(users, reached, set()))
        failed: set[int] = set()
        pushes = []
        for server, uids in by_server.items():
            d = push(server, uids)
            d.addCallbacks(
                self._pushed,
                self._push_failed,
                callbackArgs=(uids, reached),
                errbackArgs=(server, uids, failed),
            )
            pushes.append(d)
        return _all(pushes).addCallback(
            lambda _: _report(users, reached, failed - reached)
        )

    def _pushed(self, missing: list[int], uids: list[int], reached: set[int]) -> None:
        gone = set(missing)
        reached.update(u for u in uids if u not in gone)

    def _push_failed(
        self, failure: Failure, server: str, uids: list[int], failed: set[int]
    ) -> None:
        self.log.warn(
            "Push to {server} failed for {count} users: {error}",
            server=server,
            count=len(uids),
            error=failure.getErrorMessage(),
        )
        failed.update(uids)


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
    Fire once every one of C{deferreds} fired (none of which fails); the
    common single push goes without a L{DeferredList}.
    """
    return deferreds[0] if len(deferreds) == 1 else DeferredList(deferreds)
