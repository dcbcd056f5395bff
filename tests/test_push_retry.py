"""
Pushes to other servers that failed are sent again (L{cim.delivery.Delivery}
with L{cim.delivery.PushRetry}): with backoff, to wherever the devices are
by then, within a deadline and a cap; and the options that set them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python import usage
from zope.interface import implementer
from zope.interface.verify import verifyObject

from cim.delivery import Delivery, DeliveryReport, IPusher, PushRetry
from cim.interfaces import NewMessage
from cim.limits import MAX_PUSH_RETRIES, SESSION_TTL
from cim.message import ChatMessage, pair_conversation
from cim.pushapi import ReadEvent
from tests.test_delivery import ELSEWHERE, HERE, THERE, CountingStore, Local

START = 1_700_000_000.0


@implementer(IPusher)
class FlakyPusher:
    """
    Records every push (time, server, what, users); fails the next
    C{failures[server]} pushes to a server (all of them while it is in
    C{down}); answers that the users in C{gone} are not there.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.failures: dict[str, int] = {}
        self.down: set[str] = set()
        self.gone: set[int] = set()
        self.log: list[tuple[float, str, object, list[int]]] = []

    def _answer(
        self, server: str, what: object, user_ids: Sequence[int]
    ) -> Deferred[list[int]]:
        self.log.append((self.clock.seconds() - START, server, what, list(user_ids)))
        left = self.failures.get(server, 0)
        if server in self.down or left:
            self.failures[server] = max(0, left - 1)
            return fail(ConnectionError(f"{server} timed out"))
        return succeed([u for u in user_ids if u in self.gone])

    def push(
        self, server: str, messages: Sequence[ChatMessage], user_ids: Sequence[int]
    ) -> Deferred[list[int]]:
        return self._answer(server, tuple(m.text for m in messages), user_ids)

    def push_read(
        self,
        server: str,
        reader_id: int,
        conversation: str,
        seq: int,
        user_ids: Sequence[int],
    ) -> Deferred[list[int]]:
        return self._answer(server, ReadEvent(reader_id, conversation, seq), user_ids)

    def to(self, server: str) -> list[tuple[float, object, list[int]]]:
        """
        The pushes to C{server}: (time, what, users).
        """
        return [(t, what, users) for t, s, what, users in self.log if s == server]


class Setting:
    """
    A delivery on IM server C{HERE}, with alice and bob, and a pusher that
    fails as told.
    """

    def __init__(self, *connected_here: int, **retry: float) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.store = CountingStore(self.clock)
        self.pusher = FlakyPusher(self.clock)
        self.local = Local(*connected_here)
        self.retry = PushRetry(**retry)  # type: ignore[arg-type]
        self.delivery = Delivery(
            self.store,
            self.pusher,
            local=self.local,
            here=HERE,
            clock=self.clock,
            retry=self.retry,
            rng=random.Random(7),
        )
        self.alice = self.store.register("alice").result.user_id
        self.bob = self.store.register("bob").result.user_id
        self.count = 0

    def connect(self, user_id: int, device: str, server: str) -> None:
        session, _ = self.store.claim_session(
            user_id, "x", server, 600, replace=True, device=device
        ).result
        self.store.activate_session(user_id, session.session_id, device=device)

    def disconnect(self, user_id: int, device: str) -> None:
        session = self.store.get_session(user_id, device).result
        self.store.release_session(user_id, session.session_id, device=device)

    def send(self, *user_ids: int) -> tuple[str, DeliveryReport]:
        """
        Store a message from alice to bob and deliver it to C{user_ids}.
        """
        self.count += 1
        text = f"hi {self.count}"
        stored = self.store.append(
            [
                NewMessage(
                    pair_conversation(self.alice, self.bob),
                    self.alice,
                    "alice",
                    text,
                    receive_user_id=self.bob,
                )
            ]
        ).result
        return text, self.delivery.deliver(stored, user_ids).result

    def run(self, seconds: float) -> None:
        """
        Advance the clock by C{seconds}, in small steps.
        """
        for _ in range(int(seconds * 10)):
            self.clock.advance(0.1)

    @property
    def retried(self) -> int:
        return self.delivery.m_retried.value

    @property
    def abandoned(self) -> int:
        return self.delivery.m_abandoned.value


def test_a_failed_push_is_sent_again_with_backoff_until_delivered() -> None:
    setting = Setting()
    bob = setting.bob
    setting.connect(bob, "phone", THERE)
    setting.pusher.failures[THERE] = 3
    text, report = setting.send(bob)
    # The first attempt's report is as before: the retries are background.
    assert report == DeliveryReport(failed=[bob])
    assert setting.delivery.pending == 1
    setting.run(10)
    pushes = setting.pusher.to(THERE)
    assert [what for _, what, _ in pushes] == [(text,)] * 4
    assert [users for _, _, users in pushes] == [[bob]] * 4
    # Each delay is between half and all of 0.5 s, doubled at each failure.
    times = [t for t, _, _ in pushes]
    gaps = [b - a for a, b in zip(times, times[1:])]
    for gap, full in zip(gaps, [0.5, 1.0, 2.0]):
        assert full / 2 - 0.1 <= gap <= full + 0.1, gaps
    assert setting.delivery.pending == 0
    assert (setting.retried, setting.abandoned) == (3, 0)
    assert setting.clock.getDelayedCalls() == []


def test_the_backoff_stops_growing_at_its_maximum() -> None:
    setting = Setting(max_delay=2.0)
    bob = setting.bob
    setting.connect(bob, "phone", THERE)
    setting.pusher.failures[THERE] = 8
    setting.send(bob)
    setting.run(30)
    times = [t for t, _, _ in setting.pusher.to(THERE)]
    assert len(times) == 9
    assert max(b - a for a, b in zip(times, times[1:])) <= 2.0 + 0.1


def test_a_device_that_moved_is_pushed_to_on_its_new_server() -> None:
    setting = Setting()
    bob = setting.bob
    setting.connect(bob, "phone", THERE)
    setting.pusher.down = {THERE}
    text, _ = setting.send(bob)
    # The phone logs in again on another server before the retry.
    setting.connect(bob, "phone", ELSEWHERE)
    setting.run(2)
    assert [(what, users) for _, what, users in setting.pusher.to(ELSEWHERE)] == [
        ((text,), [bob])
    ]
    assert len(setting.pusher.to(THERE)) == 1
    assert setting.delivery.pending == 0
    assert setting.retried == 1


def test_a_device_that_moved_here_is_delivered_to_here() -> None:
    setting = Setting()
    bob = setting.bob
    setting.connect(bob, "phone", THERE)
    setting.pusher.down = {THERE}
    setting.send(bob)
    setting.connect(bob, "phone", HERE)
    setting.local.connected.add(bob)
    setting.run(2)
    assert [users for _, users in setting.local.messages] == [[bob]]
    assert len(setting.pusher.log) == 1
    assert setting.delivery.pending == 0


def test_a_device_that_went_offline_is_dropped() -> None:
    setting = Setting()
    bob = setting.bob
    setting.connect(bob, "phone", THERE)
    setting.pusher.down = {THERE}
    setting.send(bob)
    setting.disconnect(bob, "phone")
    setting.run(5)
    # It gets the message from the store at its next login.
    assert len(setting.pusher.log) == 1
    assert setting.delivery.pending == 0
    assert (setting.retried, setting.abandoned) == (0, 0)
    assert setting.clock.getDelayedCalls() == []


def test_a_user_its_server_says_is_gone_is_dropped() -> None:
    setting = Setting()
    bob = setting.bob
    setting.connect(bob, "phone", THERE)
    setting.pusher.failures[THERE] = 1
    setting.pusher.gone = {bob}
    setting.send(bob)
    setting.run(5)
    assert len(setting.pusher.to(THERE)) == 2
    assert setting.delivery.pending == 0


def test_only_the_servers_that_failed_are_pushed_to_again() -> None:
    setting = Setting()
    alice, bob = setting.alice, setting.bob
    setting.connect(bob, "phone", THERE)
    setting.connect(bob, "laptop", ELSEWHERE)
    setting.connect(alice, "phone", ELSEWHERE)
    setting.pusher.failures[THERE] = 1
    _, report = setting.send(alice, bob)
    # bob was reached on his laptop.
    assert report == DeliveryReport(delivered=[alice, bob])
    setting.run(5)
    assert [users for _, _, users in setting.pusher.to(THERE)] == [[bob], [bob]]
    assert len(setting.pusher.to(ELSEWHERE)) == 1


def test_a_push_is_given_up_at_its_deadline() -> None:
    setting = Setting(time=20.0)
    bob = setting.bob
    setting.connect(bob, "phone", THERE)
    setting.pusher.down = {THERE}
    setting.send(bob)
    setting.run(19)
    tried = len(setting.pusher.to(THERE))
    assert tried > 3 and setting.delivery.pending == 1
    setting.run(30)
    assert setting.delivery.pending == 0
    assert setting.abandoned == 1
    assert setting.retried == len(setting.pusher.to(THERE)) - 1
    assert setting.clock.getDelayedCalls() == []


def test_a_clock_that_jumps_ahead_does_not_give_a_push_up() -> None:
    # The retry time is counted in the waits between retries: a clock
    # stepped forward past it (a wall clock corrected) fires the next round
    # at once, which sends the push again instead of dropping it.
    setting = Setting(time=20.0)
    bob = setting.bob
    setting.connect(bob, "phone", THERE)
    setting.pusher.down = {THERE}
    setting.send(bob)
    setting.run(2)
    setting.clock.advance(30)
    assert setting.abandoned == 0 and setting.delivery.pending == 1
    setting.pusher.down = set()
    setting.run(15)
    assert setting.delivery.pending == 0
    assert setting.abandoned == 0
    assert setting.pusher.to(THERE)[-1][2] == [bob]


def test_the_default_deadline_is_a_session_lifetime() -> None:
    assert PushRetry().time == SESSION_TTL
    assert PushRetry().max_pending == MAX_PUSH_RETRIES


def test_past_the_cap_the_oldest_pushes_are_given_up() -> None:
    setting = Setting(max_pending=2)
    bob = setting.bob
    setting.connect(bob, "phone", THERE)
    setting.pusher.down = {THERE}
    texts = [setting.send(bob)[0] for _ in range(3)]
    assert setting.delivery.pending == 2
    assert setting.abandoned == 1
    setting.pusher.down = set()
    setting.run(5)
    # The oldest was given up; the other two were delivered, in order.
    assert [what for _, what, _ in setting.pusher.to(THERE)[3:]] == [
        (texts[1],),
        (texts[2],),
    ]
    assert setting.delivery.pending == 0


def test_no_push_is_kept_with_a_cap_of_zero() -> None:
    setting = Setting(max_pending=0)
    bob = setting.bob
    setting.connect(bob, "phone", THERE)
    setting.pusher.down = {THERE}
    assert setting.send(bob)[1] == DeliveryReport(failed=[bob])
    assert (setting.delivery.pending, setting.abandoned) == (0, 1)
    assert setting.clock.getDelayedCalls() == []


def test_read_events_are_sent_again_too() -> None:
    setting = Setting()
    alice, bob = setting.alice, setting.bob
    setting.connect(bob, "phone", THERE)
    setting.pusher.failures[THERE] = 2
    conversation = pair_conversation(alice, bob)
    report = setting.delivery.deliver_read(alice, conversation, 3, [bob]).result
    assert report == DeliveryReport(failed=[bob])
    setting.run(5)
    event = ReadEvent(alice, conversation, 3)
    assert setting.pusher.to(THERE)[-1][1:] == (event, [bob])
    assert len(setting.pusher.to(THERE)) == 3
    assert setting.delivery.pending == 0


def test_retries_to_one_server_go_together_in_the_order_they_failed() -> None:
    setting = Setting()
    alice, bob = setting.alice, setting.bob
    setting.connect(bob, "phone", THERE)
    setting.connect(alice, "laptop", THERE)
    setting.pusher.down = {THERE}
    texts = [setting.send(bob)[0], setting.send(alice, bob)[0], setting.send(bob)[0]]
    lookups = setting.store.lookups
    setting.run(0.6)
    # One lookup and one round for the three; they failed again...
    assert setting.store.lookups == lookups + 1
    assert [what for _, what, _ in setting.pusher.to(THERE)[3:]] == [
        (t,) for t in texts
    ]
    # ...and go again in the same order, with a push that failed meanwhile
    # behind them.
    later = setting.send(bob)[0]
    setting.pusher.down = set()
    setting.run(5)
    assert [what for _, what, _ in setting.pusher.to(THERE)[7:]] == [
        (t,) for t in [*texts, later]
    ]
    assert setting.delivery.pending == 0


def test_a_server_that_answers_again_gets_its_retries_soon() -> None:
    setting = Setting()
    alice, bob = setting.alice, setting.bob
    setting.connect(bob, "phone", THERE)
    setting.connect(alice, "phone", THERE)
    setting.pusher.down = {THERE}
    text, _ = setting.send(bob)
    setting.run(8)  # the backoff has grown to seconds
    setting.pusher.down = set()
    pending_at = setting.clock.seconds() - START
    setting.delivery.deliver_read(alice, "g:x", 1, [alice])
    setting.run(0.6)
    assert setting.delivery.pending == 0
    assert setting.pusher.to(THERE)[-1][0] <= pending_at + 0.6


def test_a_failed_lookup_keeps_the_pushes_for_later() -> None:
    setting = Setting()
    bob = setting.bob
    setting.connect(bob, "phone", THERE)
    setting.pusher.down = {THERE}
    text, _ = setting.send(bob)
    setting.pusher.down = set()
    real = setting.store.get_sessions
    setting.store.get_sessions = lambda user_ids: fail(  # type: ignore[method-assign]
        RuntimeError("the store is down")
    )
    setting.run(1)
    assert setting.delivery.pending == 1 and len(setting.pusher.log) == 1
    setting.store.get_sessions = real  # type: ignore[method-assign]
    setting.run(5)
    assert setting.pusher.to(THERE)[-1][1] == (text,)
    assert setting.delivery.pending == 0


def test_stop_cancels_the_retries() -> None:
    setting = Setting()
    bob = setting.bob
    setting.connect(bob, "phone", THERE)
    setting.pusher.down = {THERE}
    setting.send(bob)
    assert setting.clock.getDelayedCalls()
    setting.delivery.stop()
    assert setting.clock.getDelayedCalls() == []
    assert setting.delivery.pending == 0
    # A push that fails after the stop is not kept.
    setting.send(bob)
    assert setting.clock.getDelayedCalls() == []
    setting.run(5)
    assert len(setting.pusher.log) == 2


def test_stop_while_a_retry_is_in_flight() -> None:
    setting = Setting()
    bob = setting.bob
    setting.connect(bob, "phone", THERE)
    answers: list[Deferred[list[int]]] = []

    @implementer(IPusher)
    class Waiting(FlakyPusher):
        def push(self, server, messages, user_ids):  # type: ignore[no-untyped-def]
            if not self.log:
                self.log.append((0, server, None, list(user_ids)))
                return fail(ConnectionError("first"))
            d: Deferred[list[int]] = Deferred()
            answers.append(d)
            return d

    setting.delivery.pusher = Waiting(setting.clock)
    setting.send(bob)
    setting.run(1)
    assert len(answers) == 1
    setting.delivery.stop()
    answers[0].errback(ConnectionError("again"))
    assert setting.clock.getDelayedCalls() == []
    assert setting.delivery.pending == 0


def test_an_im_server_stops_its_retries() -> None:
    from tests.serverkit import World

    world = World()
    bob = world.account("bob")
    pusher = FlakyPusher(world.clock)
    pusher.down = {THERE}
    world.server.delivery.pusher = pusher
    session, _ = world.store.claim_session(
        bob, "bob", THERE, 600, device="phone"
    ).result
    world.store.activate_session(bob, session.session_id, device="phone")
    stored = world.store.append(
        [NewMessage("g:x", bob, "bob", "hi", receive_user_id=0)]
    ).result
    world.server.delivery.deliver(stored, [bob])
    assert world.server.delivery.pending == 1
    world.result(world.server.stop())
    assert world.server.delivery.pending == 0
    world.clock.advance(60)
    assert len(pusher.log) == 1


def test_the_retries_are_counted_in_the_servers_metrics() -> None:
    from tests.serverkit import World

    world = World()
    text = world.server.metrics.render().decode()
    assert "cim_server_push_retries_total 0" in text
    assert "cim_server_push_retries_abandoned_total 0" in text
    assert "cim_server_push_retries_pending 0" in text


def test_the_fake_pusher_is_a_pusher() -> None:
    assert verifyObject(IPusher, FlakyPusher(Clock()))


# Options


@pytest.mark.parametrize(
    "module", ["cim.server.tap", "cim.route.tap", "cim.standalone"]
)
def test_the_push_retry_options(module: str) -> None:
    import importlib

    options_class = importlib.import_module(module).Options
    defaults = options_class()
    defaults.parseOptions(["--secret", "a-long-secret"])
    assert (defaults["push-retry-time"], defaults["push-retry-max"]) == (
        SESSION_TTL,
        MAX_PUSH_RETRIES,
    )
    given = options_class()
    given.parseOptions(
        ["--secret", "a-long-secret", "--push-retry-time", "30",
         "--push-retry-max", "500"]
    )  # fmt: skip
    assert (given["push-retry-time"], given["push-retry-max"]) == (30.0, 500)
    for args, complaint in [
        (["--push-retry-time", "0"], "--push-retry-time must be positive"),
        (["--push-retry-time", "0.5"], "--push-retry-time must be at least 1"),
        (["--push-retry-time", "x"], "--push-retry-time must be a number"),
        (["--push-retry-max", "-1"], "--push-retry-max must be between 0"),
        (["--push-retry-max", "many"], "--push-retry-max must be an integer"),
    ]:
        with pytest.raises(usage.UsageError, match=complaint):
            options_class().parseOptions(["--secret", "a-long-secret", *args])


@pytest.mark.parametrize("module", ["cim.server.tap", "cim.route.tap"])
def test_the_push_retry_options_reach_the_config(module: str) -> None:
    import importlib

    tap = importlib.import_module(module)
    options = tap.Options()
    options.parseOptions(
        ["--secret", "a-long-secret", "--push-retry-time", "12",
         "--push-retry-max", "9"]
    )  # fmt: skip
    config = tap.config_from(options)
    assert config.push_retry == PushRetry(time=12.0, max_pending=9)


@pytest_twisted.ensureDeferred
async def test_a_route_counts_its_retries_and_stops_them() -> None:
    from twisted.internet import reactor

    from cim.registry.local import LocalRegistry
    from cim.route.service import RouteConfig, RouteService
    from cim.store.memory import MemoryStore

    store = MemoryStore(reactor)  # type: ignore[arg-type]
    service = RouteService(
        reactor,  # type: ignore[arg-type]
        RouteConfig(
            port=0,
            bind="127.0.0.1",
            secret="a-long-secret",
            push_retry=PushRetry(time=30.0, max_pending=10),
        ),
        lambda: succeed(store),
        LocalRegistry(),
    )
    service.startService()
    await service.ready
    delivery = service.delivery
    assert delivery is not None and delivery.retry.max_pending == 10
    assert service.api is not None
    assert b"cim_route_push_retries_total 0" in service.api.metrics.render()
    bob = store.register("bob").result.user_id  # type: ignore[attr-defined]
    session, _ = store.claim_session(bob, "bob", THERE, 600, device="phone").result  # type: ignore[attr-defined]
    store.activate_session(bob, session.session_id, device="phone")
    pusher = FlakyPusher(Clock())
    pusher.down = {THERE}
    delivery.pusher = pusher
    stored = store.append([NewMessage("g:x", bob, "bob", "hi")]).result  # type: ignore[attr-defined]
    report = await delivery.deliver(stored, [bob])
    assert report == DeliveryReport(failed=[bob]) and delivery.pending == 1
    await service.stopService()
    assert delivery.pending == 0
    rounds = [
        call
        for call in reactor.getDelayedCalls()  # type: ignore[attr-defined]
        if getattr(call.func, "__name__", "") == "_round"
    ]
    assert rounds == []


def test_a_send_out_reaches_here_and_elsewhere_with_one_lookup() -> None:
    """
    L{Delivery.send_out} (the IM server's own sends, with no report)
    delivers here, pushes once per server, and looks the users up once.
    """
    setting = Setting()
    alice, bob = setting.alice, setting.bob
    setting.local.connected.add(alice)
    setting.connect(alice, "phone", HERE)
    setting.connect(alice, "laptop", THERE)
    setting.connect(bob, "phone", THERE)
    setting.connect(bob, "tablet", ELSEWHERE)
    lookups = setting.store.lookups
    setting.delivery.send_out(_stored(setting), [alice, bob, alice])
    assert [users for _, users in setting.local.messages] == [[alice]]
    assert sorted((server, users) for _, server, _, users in setting.pusher.log) == [
        (ELSEWHERE, [bob]),
        (THERE, [alice, bob]),
    ]
    assert setting.store.lookups == lookups + 1
    assert setting.delivery.pending == 0


def test_a_failed_send_out_push_is_sent_again() -> None:
    setting = Setting()
    bob = setting.bob
    setting.connect(bob, "phone", THERE)
    setting.pusher.failures[THERE] = 2
    setting.delivery.send_out(_stored(setting), [bob])
    assert setting.delivery.pending == 1
    setting.run(10)
    pushes = setting.pusher.to(THERE)
    assert [users for _, _, users in pushes] == [[bob]] * 3
    assert setting.delivery.pending == 0
    assert (setting.retried, setting.abandoned) == (2, 0)


def test_a_failed_send_out_lookup_is_logged() -> None:
    setting = Setting()
    bob = setting.bob
    setting.connect(bob, "phone", THERE)
    setting.store.get_sessions = lambda user_ids: fail(  # type: ignore[method-assign]
        RuntimeError("the store is down")
    )
    setting.delivery.send_out(_stored(setting), [bob])
    # (Logged: the store keeps the message for the device's next gap or
    # login.)
    assert setting.pusher.log == []
    assert setting.delivery.pending == 0


def _stored(setting: Setting) -> list[ChatMessage]:
    """
    A message from alice to bob, stored.
    """
    return setting.store.append(  # type: ignore[no-any-return]
        [
            NewMessage(
                pair_conversation(setting.alice, setting.bob),
                setting.alice,
                "alice",
                "hi",
                receive_user_id=setting.bob,
            )
        ]
    ).result
