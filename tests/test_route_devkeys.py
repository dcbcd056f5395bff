"""
Device keys: the credential per (user, device) that outlives the device's
sessions, so that a client logs in again after a disconnect or a reload
without keeping the password.  Driven in memory with the L{Route} harness
of C{tests/test_route.py} (a L{MemoryStore} on a L{Clock}).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from twisted.python import usage

from cim import standalone
from cim.limits import DEVICE_KEY_TTL
from cim.message import KICK_DEVICE_LIMIT
from cim.route import tap
from cim.store.memory import token_key
from tests.test_route import SECRET, Route, result
from tests.test_route_devices import connect


@pytest.fixture
def route() -> Route:
    return Route()


def by_key(user_id: int, name: str, device: str, key: Any) -> dict[str, Any]:
    """
    A C{/login} body whose proof is a device key.
    """
    return {"userId": user_id, "userName": name, "device": device, "deviceKey": key}


def key_of(route: Route, user_id: int, device: str, password: str = "pw") -> str:
    """
    Log C{device} in with the password and connect it; @return: the
    device key the reply carries.
    """
    data = route.login(user_id, "alice", password=password, device=device)
    connect(route, user_id, device)
    key: str = data["deviceKey"]
    return key


def test_issued_only_to_an_extended_login_that_names_a_device(route: Route) -> None:
    alice = route.register("alice", "pw")
    data = route.login(alice, "alice", password="pw", device="tab")
    assert len(data["deviceKey"]) >= 43
    assert data["deviceKey"] != data["token"]
    # Only its hash is stored.
    assert result(route.store.check_device_key(alice, "tab", data["deviceKey"]))
    kept = repr(route.store._device_keys)
    assert data["deviceKey"] not in kept and token_key(data["deviceKey"]) in kept
    # No device: none.
    assert "deviceKey" not in route.login(alice, "alice", password="pw")
    # CIM's reply is unchanged, with or without a device.
    for extra in ({}, {"device": "cim"}):
        cim = route.ok(
            "/login",
            {"userId": alice, "userName": "alice", "password": "pw", **extra},
            extended=False,
        )
        assert set(cim) == {"ip", "cimServerPort", "httpPort"}
    assert not result(route.store.check_device_key(alice, "cim", ""))
    assert set(route.store._device_keys) == {(alice, "tab")}


def test_a_device_key_logs_in_and_is_rotated(route: Route) -> None:
    alice = route.register("alice", "pw")
    first = key_of(route, alice, "tab")
    # The page reloads: the connection is gone, the key is not.
    data = route.ok("/login", by_key(alice, "alice", "tab", first))
    assert data["device"] == "tab" and data["userId"] == alice
    second = data["deviceKey"]
    assert second != first
    assert result(route.store.verify_token(data["token"])).device == "tab"
    # The old key stopped working; the new one works, once.
    assert route.code("/login", by_key(alice, "alice", "tab", first)) == "9100"
    third = route.ok("/login", by_key(alice, "alice", "tab", second))["deviceKey"]
    assert route.code("/login", by_key(alice, "alice", "tab", second)) == "9100"
    assert route.ok("/login", by_key(alice, "alice", "tab", third))["deviceKey"]


def test_a_device_key_of_an_account_without_a_password(route: Route) -> None:
    bob = route.register("bob")
    key = route.login(bob, "bob", device="phone")["deviceKey"]
    assert route.ok("/login", by_key(bob, "bob", "phone", key))["deviceKey"]


def test_a_non_extended_login_with_a_device_key_uses_it_up(route: Route) -> None:
    alice = route.register("alice", "pw")
    key = key_of(route, alice, "tab")
    cim = route.ok("/login", by_key(alice, "alice", "tab", key), extended=False)
    assert set(cim) == {"ip", "cimServerPort", "httpPort"}
    assert route.code("/login", by_key(alice, "alice", "tab", key)) == "9100"


def test_a_wrong_device_key_is_9100_and_a_failed_attempt() -> None:
    route = Route(login_rate=3, address_rate=1000)
    alice = route.register("alice", "pw")
    key = key_of(route, alice, "tab")
    wrong = by_key(alice, "alice", "tab", "guess")
    answer = route.call("/login", wrong)
    assert answer["code"] == "9100" and "device key" in answer["message"]
    # Each wrong key counts against the account: after three, guessing the
    # password is refused before it is checked...
    assert [route.code("/login", wrong) for _ in range(2)] == ["9100", "9100"]
    guess = {"userId": alice, "userName": "alice", "password": "pw"}
    assert route.code("/login", guess) == "6000"
    # ... but a key is unguessable (2**256 of them), so the owner's device
    # key passes the account's empty bucket, as an account key does.
    assert route.code("/login", {**wrong, "deviceKey": key}) == "9000"


def test_wrong_device_keys_empty_the_address_bucket() -> None:
    route = Route(login_rate=1000, address_rate=2)
    alice = route.register("alice", "pw")
    key_of(route, alice, "tab")
    wrong = by_key(alice, "alice", "tab", "guess")
    assert [route.code("/login", wrong) for _ in range(3)] == ["9100", "9100", "6000"]


def test_a_device_key_is_for_its_device_and_user_only(route: Route) -> None:
    alice = route.register("alice", "pw")
    bob = route.register("bob")
    tab = key_of(route, alice, "tab")
    phone = key_of(route, alice, "phone")
    # Another device's key, the key without a device, another user's device.
    assert route.code("/login", by_key(alice, "alice", "phone", tab)) == "9100"
    assert route.code("/login", by_key(alice, "alice", "laptop", tab)) == "9100"
    no_device = {"userId": alice, "userName": "alice", "deviceKey": tab}
    assert route.code("/login", no_device) == "9100"
    assert route.code("/login", by_key(bob, "bob", "tab", tab)) == "9100"
    # None of these used either key up.
    assert route.ok("/login", by_key(alice, "alice", "tab", tab))
    assert route.ok("/login", by_key(alice, "alice", "phone", phone))


def test_off_line_of_the_device_drops_its_key(route: Route) -> None:
    alice = route.register("alice", "pw")
    tab = route.login(alice, "alice", password="pw", device="tab")
    connect(route, alice, "tab")
    phone = key_of(route, alice, "phone")
    assert route.ok("/offLine", {"userId": alice}, token=tab["token"]) is None
    assert route.code("/login", by_key(alice, "alice", "tab", tab["deviceKey"])) == (
        "9100"
    )
    # The user's other devices keep theirs.
    assert route.ok("/login", by_key(alice, "alice", "phone", phone))


def test_off_line_by_the_secret_drops_every_devices_key(route: Route) -> None:
    alice = route.register("alice", "pw")
    keys = {device: key_of(route, alice, device) for device in ("a", "b")}
    assert route.ok("/offLine", {"userId": alice}, secret=SECRET) is None
    for device, key in keys.items():
        assert route.code("/login", by_key(alice, "alice", device, key)) == "9100"


def test_a_device_dropped_by_the_limit_loses_its_key() -> None:
    route = Route(max_devices=2)
    alice = route.register("alice", "pw")
    a = key_of(route, alice, "a")
    route.clock.advance(1)
    b = key_of(route, alice, "b")
    route.clock.advance(1)
    key_of(route, alice, "c")
    assert [kick[3] for kick in route.pusher.kicks] == [KICK_DEVICE_LIMIT]
    assert route.code("/login", by_key(alice, "alice", "a", a)) == "9100"
    assert route.ok("/login", by_key(alice, "alice", "b", b))


def test_the_same_device_with_the_password_gets_a_new_key(route: Route) -> None:
    alice = route.register("alice", "pw")
    old = key_of(route, alice, "tab")
    new = key_of(route, alice, "tab")
    assert new != old
    assert route.code("/login", by_key(alice, "alice", "tab", old)) == "9100"
    assert route.ok("/login", by_key(alice, "alice", "tab", new))


def test_a_device_key_expires() -> None:
    route = Route(device_key_ttl=3600.0)
    alice = route.register("alice", "pw")
    key = key_of(route, alice, "tab")
    route.clock.advance(3599)
    key = route.ok("/login", by_key(alice, "alice", "tab", key))["deviceKey"]
    # Each use starts a new lifetime.
    route.clock.advance(3599)
    key = route.ok("/login", by_key(alice, "alice", "tab", key))["deviceKey"]
    route.clock.advance(3600)
    answer = route.call("/login", by_key(alice, "alice", "tab", key))
    assert answer["code"] == "9100" and "expired" in answer["message"]


def test_the_default_lifetime_is_30_days(route: Route) -> None:
    assert DEVICE_KEY_TTL == 30 * 86400
    alice = route.register("alice", "pw")
    key = key_of(route, alice, "tab")
    route.clock.advance(DEVICE_KEY_TTL - 1)
    key = route.ok("/login", by_key(alice, "alice", "tab", key))["deviceKey"]
    route.clock.advance(DEVICE_KEY_TTL)
    assert route.code("/login", by_key(alice, "alice", "tab", key)) == "9100"


def test_a_bad_device_key_field(route: Route) -> None:
    alice = route.register("alice", "pw")
    for value, complaint in [(7, "must be a string"), ("", "must not be empty")]:
        answer = route.call("/login", by_key(alice, "alice", "tab", value))
        assert answer["code"] == "3000" and complaint in answer["message"]


# Options


def test_device_key_ttl_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIM_SECRET", SECRET)
    options = tap.Options()
    options.parseOptions([])
    assert tap.config_from(options).device_key_ttl == DEVICE_KEY_TTL
    options = tap.Options()
    options.parseOptions(["--device-key-ttl=3600"])
    assert tap.config_from(options).device_key_ttl == 3600.0
    node = standalone.Options()
    node.parseOptions(["--device-key-ttl", "7200"])
    assert node["device-key-ttl"] == 7200.0
    node = standalone.Options()
    node.parseOptions([])
    assert node["device-key-ttl"] == DEVICE_KEY_TTL


@pytest.mark.parametrize(
    "value, complaint",
    [
        ("0", "--device-key-ttl must be positive"),
        ("-5", "--device-key-ttl must be positive"),
        ("30", "--device-key-ttl must be at least 60 seconds"),
        ("1e12", "--device-key-ttl must be between 0 and"),
        ("x", "--device-key-ttl must be a number"),
    ],
)
def test_bad_device_key_ttl(
    monkeypatch: pytest.MonkeyPatch, value: str, complaint: str
) -> None:
    monkeypatch.setenv("CIM_SECRET", SECRET)
    for options in (tap.Options(), standalone.Options()):
        with pytest.raises(usage.UsageError, match=re.escape(complaint)):
            options.parseOptions([f"--device-key-ttl={value}"])
