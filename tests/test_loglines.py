"""
The daemons' log of logins and new accounts (L{cim.loglines}): one line at
once when the daemon is quiet, the entries of a busy second together, none
lost; the route's logins and new accounts, the IM server's logins.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger, capturedLogs, formatEvent

from cim.loglines import MOST, WINDOW, Lines
from tests.serverkit import World
from tests.test_route import Route

#: Where L{World}'s clients connect from.
PEER = "10.1.1.1:5000"


def _lines(window: float = WINDOW, most: int = MOST) -> tuple[Lines, Clock, list]:
    events: list[dict[str, Any]] = []
    clock = Clock()
    return Lines(Logger(observer=events.append), clock, window, most), clock, events


def _texts(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(event) for event in events]


def test_a_quiet_entry_is_written_at_once() -> None:
    lines, clock, events = _lines()
    lines.add("1 (alice) logs in on s1")
    assert _texts(events) == ["1 (alice) logs in on s1"]
    assert events[0]["count"] == 1
    # A window later, the next one is written at once too.
    clock.advance(WINDOW)
    lines.add("2 (bob) logs in on s2")
    assert _texts(events)[1:] == ["2 (bob) logs in on s2"]


def test_entries_within_a_window_are_written_together_at_its_end() -> None:
    lines, clock, events = _lines()
    for i in range(4):
        lines.add(f"entry {i}")
    assert _texts(events) == ["entry 0"]
    clock.advance(WINDOW)
    assert _texts(events) == ["entry 0", "entry 1; entry 2; entry 3"]
    assert events[1]["count"] == 3
    # Still busy: the next window is open, so the next entry waits for it.
    lines.add("entry 4")
    assert len(events) == 2
    clock.advance(WINDOW)
    assert _texts(events)[2:] == ["entry 4"]
    # A window without entries closes it: the next is written at once.
    clock.advance(WINDOW)
    lines.add("entry 5")
    assert _texts(events)[3:] == ["entry 5"]


def test_a_full_line_is_written_without_waiting() -> None:
    lines, clock, events = _lines(most=3)
    for i in range(8):
        lines.add(f"e{i}")
    assert _texts(events) == ["e0", "e1; e2; e3", "e4; e5; e6"]
    clock.advance(WINDOW)
    assert _texts(events)[3:] == ["e7"]


def test_stop_writes_what_waits() -> None:
    lines, clock, events = _lines()
    lines.add("e0")
    lines.add("e1")
    lines.stop()
    assert _texts(events) == ["e0", "e1"]
    assert not clock.getDelayedCalls()
    lines.stop()
    assert len(events) == 2


def test_without_a_clock_every_entry_is_a_line() -> None:
    events: list[dict[str, Any]] = []
    lines = Lines(Logger(observer=events.append), None)
    lines.add("e0")
    lines.add("e1")
    assert _texts(events) == ["e0", "e1"]


def test_the_route_logs_new_accounts_and_logins() -> None:
    events: list[dict[str, Any]] = []
    route = Route()
    router = route.api.router
    router._login_lines.log = router._account_lines.log = Logger(observer=events.append)
    alice = route.register("alice")
    route.login(alice, "alice", device="phone")
    bob = route.register("bob")
    route.login(bob, "bob")
    # The first of each kind at once; the others (the clock stands still:
    # all within a window) when the router stops.
    phone = route.session_of(alice, "phone").server
    assert _texts(events) == [
        f"Account {alice} (alice) created",
        f"{alice} (alice) logs in on {phone} from device phone",
    ]
    router.stop()
    assert _texts(events)[2:] == [
        f"{bob} (bob) logs in on {route.session(bob).server}",
        f"Account {bob} (bob) created",
    ]


def test_the_im_server_logs_logins() -> None:
    world = World()
    with capturedLogs() as events:
        alice = world.login("alice", device="phone")[1]
        bob = world.login("bob")[1]
        carol = world.login("carol")[1]
        # The first at once; the others of the window at its end.
        first = _texts(_logins(events))
        world.clock.advance(WINDOW)
        second = _texts(_logins(events))[1:]
        dave = world.login("dave")[1]
        # (Still busy: a window is open, so dave waits for the stop.)
        world.server.stop()
    assert first == [f"{alice} (alice) logged in from {PEER} as device 'phone'"]
    assert second == [
        f"{bob} (bob) logged in from {PEER}; {carol} (carol) logged in from {PEER}"
    ]
    assert _texts(_logins(events))[2:] == [f"{dave} (dave) logged in from {PEER}"]


def _logins(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if "logged in" in formatEvent(e)]
