"""
The delivery core: every connected device of every recipient, here and on
other servers, for messages and for read positions.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from cim.delivery import Delivery, DeliveryReport, ILocalDelivery, IPusher
from cim.interfaces import NewMessage, StoreError
from cim.message import ChatMessage, pair_conversation
from cim.pushapi import ReadEvent
from cim.pusher import HttpPusher
from cim.store.memory import MemoryStore

HERE = "here:1:2"
THERE = "there:1:2"
ELSEWHERE = "elsewhere:1:2"


@implementer(IPusher)
class Pusher:
    """
    Records pushes; answers that the users in C{gone} are not there, and
    fails those to the servers in C{down}.
    """

    def __init__(self) -> None:
        self.pushes: list[tuple[str, list[int]]] = []
        self.reads: list[tuple[str, ReadEvent, list[int]]] = []
        self.gone: set[int] = set()
        self.down: set[str] = set()

    def _answer(self, server: str, user_ids: Sequence[int]) -> Deferred[list[int]]:
        if server in self.down:
            return fail(ConnectionError(server))
        return succeed([u for u in user_ids if u in self.gone])

    def push(
        self, server: str, messages: Sequence[ChatMessage], user_ids: Sequence[int]
    ) -> Deferred[list[int]]:
        self.pushes.append((server, list(user_ids)))
        return self._answer(server, user_ids)

    def push_read(
        self,
        server: str,
        reader_id: int,
        conversation: str,
        seq: int,
        user_ids: Sequence[int],
    ) -> Deferred[list[int]]:
        self.reads.append(
            (server, ReadEvent(reader_id, conversation, seq), list(user_ids))
        )
        return self._answer(server, user_ids)


@implementer(ILocalDelivery)
class Local:
    """
    The connections here: the users in C{connected}.
    """

    def __init__(self, *connected: int) -> None:
        self.connected = set(connected)
        self.messages: list[tuple[list[ChatMessage], list[int]]] = []
        self.reads: list[tuple[ReadEvent, list[int]]] = []

    def deliver_local(
        self, messages: Sequence[ChatMessage], user_ids: Sequence[int]
    ) -> list[int]:
        here = [u for u in user_ids if u in self.connected]
        if here:
            self.messages.append((list(messages), here))
        return [u for u in user_ids if u not in self.connected]

    def deliver_read_local(
        self, reader_id: int, conversation: str, seq: int, user_ids: Sequence[int]
    ) -> list[int]:
        here = [u for u in user_ids if u in self.connected]
        if here:
            self.reads.append((ReadEvent(reader_id, conversation, seq), here))
        return [u for u in user_ids if u not in self.connected]


class CountingStore(MemoryStore):
    lookups = 0
    appends = 0
    #: Session lookups fail (the store is out of reach).
    unreachable = False
    #: Session lookups wait (their Deferreds, to fire) when set.
    held: list[Deferred[object]] | None = None

    def append(self, messages):  # type: ignore[no-untyped-def]
        self.appends += 1
        return super().append(messages)

    def get_sessions(self, user_ids):  # type: ignore[no-untyped-def]
        self.lookups += 1
        if self.unreachable:
            return fail(StoreError("out of reach"))
        found = super().get_sessions(user_ids)
        if self.held is None:
            return found
        later: Deferred[object] = Deferred()
        self.held.append(later)
        return later.addCallback(lambda _: found.result)


class Setting:
    def __init__(
        self,
        *connected_here: int,
        broadcast_from: int | None = None,
        session_cache: int = 0,
    ) -> None:
        self.clock = Clock()
        self.store = CountingStore(self.clock)
        self.pusher = Pusher()
        self.local = Local(*connected_here)
        self.delivery = Delivery(
            self.store,
            self.pusher,
            local=self.local,
            here=HERE,
            clock=self.clock,
            broadcast_from=broadcast_from,
            session_cache=session_cache,
        )
        self.alice = self.store.register("alice").result.user_id
        self.bob = self.store.register("bob").result.user_id

    def connect(self, user_id: int, device: str, server: str) -> None:
        session, _ = self.store.claim_session(
            user_id, "x", server, 60, replace=True, device=device
        ).result
        self.store.activate_session(user_id, session.session_id, device=device)

    def stored(self) -> list[ChatMessage]:
        conversation = pair_conversation(self.alice, self.bob)
        return self.store.append(
            [NewMessage(conversation, self.alice, "alice", "hi", receive_user_id=2)]
        ).result  # type: ignore[no-any-return]

    def deliver(self, *user_ids: int) -> DeliveryReport:
        return self.delivery.deliver(self.stored(), user_ids).result  # type: ignore[no-any-return]

    def send_out(self, *user_ids: int) -> None:
        self.delivery.send_out(self.stored(), user_ids)
        self.clock.advance(0)


def test_every_device_is_reached_here_and_on_each_server() -> None:
    setting = Setting(1)
    alice, bob = setting.alice, setting.bob
    setting.connect(alice, "phone", HERE)
    setting.connect(alice, "laptop", THERE)
    setting.connect(bob, "phone", THERE)
    setting.connect(bob, "tablet", ELSEWHERE)
    setting.connect(bob, "laptop", ELSEWHERE)
    report = setting.deliver(alice, bob)
    assert report == DeliveryReport(delivered=[alice, bob])
    assert [users for _, users in setting.local.messages] == [[alice]]
    # One push per server, each user once.
    assert sorted(setting.pusher.pushes) == [(ELSEWHERE, [bob]), (THERE, [alice, bob])]
    assert setting.store.lookups == 1


def test_a_new_device_elsewhere_gets_the_next_delivery() -> None:
    # No cache of where users were: a device that logged in on another
    # server since the last delivery gets the next one.
    setting = Setting()
    bob = setting.bob
    setting.connect(bob, "phone", THERE)
    setting.deliver(bob)
    setting.connect(bob, "laptop", ELSEWHERE)
    setting.deliver(bob)
    # (Its sessions by device: laptop, then phone.)
    assert setting.pusher.pushes == [
        (THERE, [bob]),
        (ELSEWHERE, [bob]),
        (THERE, [bob]),
    ]
    assert setting.store.lookups == 2


def test_a_user_with_no_connected_device_is_offline() -> None:
    setting = Setting()
    bob = setting.bob
    assert setting.deliver(bob) == DeliveryReport(offline=[bob])
    # A session claimed but not connected yet, and one here whose
    # connection is gone: offline too.
    setting.store.claim_session(bob, "bob", THERE, 60, device="phone")
    setting.connect(bob, "laptop", HERE)
    assert setting.deliver(bob) == DeliveryReport(offline=[bob])
    assert setting.pusher.pushes == []


def test_a_user_gone_from_its_server_is_offline() -> None:
    setting = Setting()
    bob = setting.bob
    setting.connect(bob, "phone", THERE)
    setting.pusher.gone = {bob}
    assert setting.deliver(bob) == DeliveryReport(offline=[bob])


def test_a_server_down_fails_only_users_not_reached_elsewhere() -> None:
    setting = Setting()
    alice, bob = setting.alice, setting.bob
    setting.connect(alice, "phone", THERE)
    setting.connect(bob, "phone", THERE)
    setting.connect(bob, "laptop", ELSEWHERE)
    setting.pusher.down = {THERE}
    assert setting.deliver(alice, bob) == DeliveryReport(
        delivered=[bob], failed=[alice]
    )


def test_a_failed_lookup_fails_those_not_reached_here() -> None:
    setting = Setting(1)
    setting.store.get_sessions = lambda user_ids: fail(  # type: ignore[method-assign]
        RuntimeError("the store is down")
    )
    report = setting.deliver(setting.alice, setting.bob)
    assert report == DeliveryReport(delivered=[setting.alice], failed=[setting.bob])


def test_read_positions_reach_every_device_here_and_elsewhere() -> None:
    setting = Setting(1)
    alice, bob = setting.alice, setting.bob
    setting.connect(alice, "phone", HERE)
    setting.connect(bob, "phone", THERE)
    conversation = pair_conversation(alice, bob)
    d = setting.delivery.deliver_read(alice, conversation, 3, [alice, bob])
    assert d.result == DeliveryReport(delivered=[alice, bob])
    event = ReadEvent(alice, conversation, 3)
    assert setting.local.reads == [(event, [alice])]
    assert setting.pusher.reads == [(THERE, event, [bob])]


def test_the_http_pusher_provides_both_pushes() -> None:
    assert verifyObject(IPusher, HttpPusher(None, "s"))  # type: ignore[arg-type]
    assert verifyObject(IPusher, Pusher())
    assert verifyObject(ILocalDelivery, Local())


def test_a_large_delivery_pushes_to_every_server_without_a_lookup() -> None:
    # From broadcast_from users on (a group's members), every server that
    # holds sessions gets the push for all of them, and writes to those it
    # holds: no lookup of each user's sessions.
    setting = Setting(1, broadcast_from=2)
    alice, bob = setting.alice, setting.bob
    setting.connect(alice, "phone", HERE)
    setting.connect(alice, "laptop", THERE)
    setting.connect(bob, "phone", ELSEWHERE)
    report = setting.deliver(alice, bob)
    assert report == DeliveryReport(delivered=[alice, bob])
    assert [users for _, users in setting.local.messages] == [[alice]]
    assert sorted(setting.pusher.pushes) == [
        (ELSEWHERE, [alice, bob]),
        (THERE, [alice, bob]),
    ]
    assert setting.store.lookups == 0
    # Fewer users: looked up, as always.
    setting.pusher.pushes.clear()
    setting.deliver(bob)
    assert setting.pusher.pushes == [(ELSEWHERE, [bob])]
    assert setting.store.lookups == 1


def test_a_server_is_pushed_to_from_its_first_claim_on() -> None:
    # A device that claimed its session (its login reads the store after
    # that) is on a server that the next delivery pushes to.
    setting = Setting(broadcast_from=1)
    bob = setting.bob
    setting.deliver(bob)
    assert setting.pusher.pushes == []
    setting.store.claim_session(bob, "bob", THERE, 60, device="phone")
    setting.deliver(bob)
    assert setting.pusher.pushes == [(THERE, [bob])]


def test_a_failed_broadcast_is_kept_for_the_users_on_that_server() -> None:
    setting = Setting(broadcast_from=2)
    alice, bob = setting.alice, setting.bob
    setting.connect(alice, "phone", THERE)
    setting.connect(bob, "phone", ELSEWHERE)
    setting.pusher.down = {THERE}
    setting.deliver(alice, bob)
    # Kept once, for the user whose session is there (looked up now).
    assert setting.delivery.pending == 1
    assert setting.store.lookups == 1
    setting.pusher.down = set()
    setting.pusher.pushes.clear()
    setting.clock.advance(setting.delivery.retry.max_delay)
    assert setting.pusher.pushes == [(THERE, [alice])]
    assert setting.delivery.pending == 0


def test_the_servers_own_sends_broadcast_too() -> None:
    # send_out (a message sent over a connection of this server) takes the
    # same path as deliver: no lookup from broadcast_from users on, and a
    # failed push kept for the users on that server.
    setting = Setting(1, broadcast_from=2)
    alice, bob = setting.alice, setting.bob
    setting.connect(alice, "phone", HERE)
    setting.connect(alice, "laptop", THERE)
    setting.connect(bob, "phone", ELSEWHERE)
    setting.send_out(alice, bob)
    assert [users for _, users in setting.local.messages] == [[alice]]
    assert sorted(setting.pusher.pushes) == [
        (ELSEWHERE, [alice, bob]),
        (THERE, [alice, bob]),
    ]
    assert setting.store.lookups == 0
    setting.pusher.pushes.clear()
    setting.pusher.down = {THERE}
    setting.send_out(alice, bob)
    assert setting.delivery.pending == 1
    assert setting.store.lookups == 1
    setting.pusher.down = set()
    setting.pusher.pushes.clear()
    setting.clock.advance(setting.delivery.retry.max_delay)
    assert setting.pusher.pushes == [(THERE, [alice])]
    assert setting.delivery.pending == 0


def test_a_failed_broadcast_whose_lookup_fails_goes_to_every_device() -> None:
    # The push to one server failed and the store could not say who is
    # there: the push is kept for every device of its users, sent again
    # wherever they are once the store answers (a server drops what it
    # wrote already).
    setting = Setting(broadcast_from=2)
    alice, bob = setting.alice, setting.bob
    setting.connect(alice, "phone", THERE)
    setting.connect(bob, "phone", ELSEWHERE)
    setting.pusher.down = {THERE}
    setting.store.unreachable = True
    setting.deliver(alice, bob)
    assert setting.delivery.pending == 1
    setting.pusher.down = set()
    setting.pusher.pushes.clear()
    setting.store.unreachable = False
    setting.clock.advance(setting.delivery.retry.max_delay)
    assert sorted(setting.pusher.pushes) == [(ELSEWHERE, [bob]), (THERE, [alice])]
    assert setting.delivery.pending == 0


def test_broadcast_from_must_be_positive() -> None:
    clock = Clock()
    try:
        Delivery(MemoryStore(clock), Pusher(), clock=clock, broadcast_from=0)
    except ValueError:
        pass
    else:
        raise AssertionError("broadcast_from=0 was taken")


def test_the_broadcast_from_option_reaches_the_server() -> None:
    import pytest
    from twisted.python import usage

    from cim.limits import BROADCAST_FROM
    from cim.server import tap

    def config(*args: str) -> int | None:
        options = tap.Options()
        options.parseOptions(["--secret", "a-long-secret", *args])
        return tap.config_from(options).broadcast_from

    assert config() == BROADCAST_FROM
    assert config("--broadcast-from", "500") == 500
    # 0: always look the sessions up.
    assert config("--broadcast-from", "0") is None
    for bad in ("-1", "many"):
        with pytest.raises(usage.UsageError, match="--broadcast-from"):
            config("--broadcast-from", bad)


def test_the_server_passes_broadcast_from_to_its_delivery() -> None:
    from cim.interfaces import ServerAddress
    from cim.server.core import IMServer

    clock = Clock()
    store = MemoryStore(clock)
    address = ServerAddress("127.0.0.1", 1, 2)
    assert IMServer(clock, store, address, Pusher()).delivery.broadcast_from == 32
    server = IMServer(clock, store, address, Pusher(), broadcast_from=None)
    assert server.delivery.broadcast_from is None


def test_per_turn_deliveries_share_one_lookup() -> None:
    """
    With C{per_turn} (the route's), deliveries started in one reactor turn
    look their users up in one store call, and appends made in one turn
    are one append.
    """
    setting = Setting()
    delivery = Delivery(
        setting.store, setting.pusher, clock=setting.clock, per_turn=True
    )
    alice, bob = setting.alice, setting.bob
    setting.connect(alice, "phone", THERE)
    setting.connect(bob, "phone", ELSEWHERE)
    conversation = pair_conversation(alice, bob)
    appends = [
        delivery.append([NewMessage(conversation, alice, "alice", text)])
        for text in ("one", "two")
    ]
    assert not any(d.called for d in appends)
    setting.clock.advance(0)
    assert setting.store.appends == 1
    stored = [d.result for d in appends]
    assert [[m.seq for m in s] for s in stored] == [[1], [2]]
    reports = [delivery.deliver(s, [alice, bob]) for s in stored]
    assert setting.store.lookups == 0
    setting.clock.advance(0)
    assert setting.store.lookups == 1
    assert [r.result for r in reports] == [DeliveryReport(delivered=[alice, bob])] * 2
    assert setting.pusher.pushes == [
        (THERE, [alice]),
        (ELSEWHERE, [bob]),
        (THERE, [alice]),
        (ELSEWHERE, [bob]),
    ]


# The session cache (cim.sessioncache)


def test_a_cached_user_is_not_looked_up_again() -> None:
    setting = Setting(session_cache=100)
    alice, bob = setting.alice, setting.bob
    setting.connect(bob, "phone", THERE)
    setting.send_out(alice, bob)
    assert setting.store.lookups == 1
    setting.send_out(alice, bob)
    setting.send_out(alice, bob)
    # Alice, offline, is known to be so too.
    assert setting.store.lookups == 1
    assert setting.pusher.pushes == [(THERE, [bob])] * 3
    assert setting.deliver(alice, bob) == DeliveryReport(
        delivered=[bob], offline=[alice]
    )
    assert setting.store.lookups == 1
    cache = setting.delivery.sessions
    assert cache is not None and (cache.hits, cache.misses) == (6, 2)


def test_the_cache_counts_its_hits_and_misses_as_counters() -> None:
    setting = Setting(session_cache=100)
    alice, bob = setting.alice, setting.bob
    setting.connect(bob, "phone", THERE)
    setting.send_out(alice, bob)
    setting.send_out(alice, bob)
    text = setting.delivery.metrics.render().decode()
    assert "# TYPE cim_delivery_session_cache_hits_total counter" in text
    assert "cim_delivery_session_cache_hits_total 2" in text
    assert "cim_delivery_session_cache_misses_total 2" in text
    assert "cim_delivery_session_cache_users 2" in text


def test_a_changed_generation_looks_the_user_up() -> None:
    setting = Setting(session_cache=100)
    alice, bob = setting.alice, setting.bob
    setting.connect(bob, "phone", THERE)
    setting.send_out(alice, bob)
    # A new device elsewhere: the next append reads a new generation.
    setting.connect(bob, "laptop", ELSEWHERE)
    setting.send_out(alice, bob)
    assert setting.store.lookups == 2
    assert setting.pusher.pushes[1:] == [(ELSEWHERE, [bob]), (THERE, [bob])]
    # Gone from there: not pushed to.
    phone = setting.store.get_session(bob, "phone").result
    setting.store.release_session(bob, phone.session_id, "phone")
    setting.send_out(alice, bob)
    assert setting.store.lookups == 3
    assert setting.pusher.pushes[3:] == [(ELSEWHERE, [bob])]
    setting.send_out(alice, bob)
    assert setting.store.lookups == 3


def test_messages_of_no_known_generation_are_looked_up() -> None:
    # A group's, or given by a caller as a plain list.
    setting = Setting(session_cache=100)
    alice, bob = setting.alice, setting.bob
    setting.connect(bob, "phone", THERE)
    setting.send_out(alice, bob)
    setting.delivery.send_out(list(setting.stored()), [alice, bob])
    assert setting.store.lookups == 2


def test_a_restored_store_forgets_the_cached_sessions() -> None:
    """
    A store restored from a backup may count a user's generations again
    from an older one: the cache is forgotten when the store's run
    changes.
    """
    setting = Setting(session_cache=100)
    alice, bob = setting.alice, setting.bob
    setting.connect(bob, "phone", THERE)
    backup = setting.store.restored()
    setting.connect(bob, "laptop", ELSEWHERE)
    setting.send_out(alice, bob)
    assert setting.store.lookups == 1
    # Back to the backup, where bob's tablet logs in instead of its
    # laptop: the same generation, other sessions.
    backup.__class__ = CountingStore
    setting.delivery.store = backup
    setting.store = backup  # type: ignore[assignment]
    setting.connect(bob, "tablet", HERE + "0")
    setting.pusher.pushes.clear()
    setting.send_out(alice, bob)
    assert backup.lookups == 1
    assert setting.pusher.pushes == [(THERE, [bob]), (HERE + "0", [bob])]


def test_the_cache_holds_at_most_its_size() -> None:
    setting = Setting(session_cache=1)
    alice, bob = setting.alice, setting.bob
    setting.connect(alice, "phone", THERE)
    setting.connect(bob, "phone", THERE)
    setting.send_out(alice, bob)
    cache = setting.delivery.sessions
    assert cache is not None and len(cache) == 1
    # Bob, remembered last, is kept; alice is looked up again.
    setting.send_out(alice, bob)
    assert setting.store.lookups == 2
    assert len(cache) == 1
    assert setting.pusher.pushes == [(THERE, [alice, bob])] * 2


def test_a_cached_delivery_waits_for_an_earlier_lookup() -> None:
    """
    Pushes go in the order of the deliveries: one whose users are all
    cached does not overtake one still being looked up.
    """
    setting = Setting(session_cache=100)
    alice, bob = setting.alice, setting.bob
    setting.connect(bob, "phone", THERE)
    setting.send_out(alice, bob)
    setting.store.held = []
    first = list(setting.stored())
    setting.delivery.send_out(first, [alice, bob])
    second = setting.stored()
    setting.delivery.send_out(second, [alice, bob])
    assert len(setting.pusher.pushes) == 1
    setting.store.held.pop().callback(None)
    assert setting.pusher.pushes == [(THERE, [bob])] * 3
    assert setting.store.held == []


def test_the_session_cache_option_reaches_both_daemons() -> None:
    import pytest
    from twisted.python import usage

    from cim.interfaces import ServerAddress
    from cim.limits import SESSION_CACHE
    from cim.route import tap as route_tap
    from cim.server import tap
    from cim.server.core import IMServer

    def config(*args: str) -> int:
        options = tap.Options()
        options.parseOptions(["--secret", "a-long-secret", *args])
        return tap.config_from(options).session_cache

    assert config() == SESSION_CACHE
    assert config("--session-cache", "0") == 0
    with pytest.raises(usage.UsageError, match="--session-cache"):
        config("--session-cache", "-1")
    options = route_tap.Options()
    options.parseOptions(["--secret", "a-long-secret", "--session-cache", "7"])
    assert route_tap.config_from(options).session_cache == 7
    clock = Clock()
    address = ServerAddress("127.0.0.1", 1, 2)
    server = IMServer(clock, MemoryStore(clock), address, Pusher(), session_cache=5)
    assert server.delivery.sessions is not None
    assert server.delivery.sessions.size == 5
    server = IMServer(clock, MemoryStore(clock), address, Pusher(), session_cache=0)
    assert server.delivery.sessions is None


# The store's group feed


class FeedingStore(MemoryStore):
    """
    Records the C{feed} of each append (as the Redis store takes it).
    """

    feeds = True

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.fed: list[list[Sequence[int] | None] | None] = []

    def append(self, messages, feed=None):  # type: ignore[no-untyped-def]
        self.fed.append(None if feed is None else list(feed))
        return super().append(messages)


def test_only_a_groups_messages_to_broadcast_from_users_are_fed() -> None:
    clock = Clock()
    delivery = Delivery(FeedingStore(clock), Pusher(), clock=clock, broadcast_from=2)
    group = [NewMessage("g:g1", 1, "a", "hi", group_id="g1")]
    private = [NewMessage(pair_conversation(1, 2), 1, "a", "hi", receive_user_id=2)]
    assert not delivery.fans_out(group, [1, 2])  # the feed is off
    delivery.feed = True
    assert delivery.fans_out(group, [1, 2])
    assert not delivery.fans_out(group, [1])
    assert not delivery.fans_out(private, [1, 2])
    delivery.broadcast_from = None
    assert not delivery.fans_out(group, [1, 2])


def test_a_fed_append_gives_the_store_each_messages_users() -> None:
    clock = Clock()
    store = FeedingStore(clock)
    delivery = Delivery(store, Pusher(), clock=clock, broadcast_from=2, per_turn=True)
    delivery.feed = True
    got: list[object] = []
    members = [1, 2, 3]
    private = [NewMessage(pair_conversation(1, 2), 1, "a", "p", receive_user_id=2)]
    fed = [
        NewMessage("g:g1", 1, "a", "one", group_id="g1"),
        NewMessage("g:g1", 1, "a", "two", group_id="g1"),
    ]
    delivery.append_callback(private, got.append)
    delivery.append_fed(fed, members, got.append)
    delivery.append_callback(private, got.append)
    clock.advance(0)
    assert store.fed == [[None, members, members, None]]
    assert [[m.text for m in stored] for stored in got] == [  # type: ignore[attr-defined]
        ["p"],
        ["one", "two"],
        ["p"],
    ]
    # Without a fed request, the store is asked as any store.
    delivery.append_callback(private, got.append)
    clock.advance(0)
    assert store.fed[-1] is None
