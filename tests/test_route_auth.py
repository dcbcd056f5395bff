"""
The route's defences against account takeover and guessing (issue 13: items
1, 7, 9, 10, 12), driven in memory with the L{tests.test_route.Route}
harness: account keys and proofs of ownership, the guessing limits, the
name rule, answers to malformed JSON, and C{--secret-file}.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure

from cim import names, standalone
from cim.envelope import ApiError
from cim.names import check_name, name_key
from cim.options import read_secret_file
from cim.route import tap
from cim.route.logic import Credentials
from cim.route.throttle import GuessLimit, TokenBuckets
from cim.server import tap as server_tap
from tests.test_route import SECRET, Route, result

# Registration: an existing name's id only with a proof


def test_an_existing_name_needs_a_proof() -> None:
    route = Route()
    alice = route.register("alice")
    key = route.keys[alice]
    for body in (
        {"userName": "alice"},
        {"userName": "alice", "accountKey": "a guess"},
        {"userName": "alice", "password": "a guess"},
    ):
        answer = route.call("/registerAccount", body)
        assert answer["code"] == "4090", body
        assert answer["dataBody"] is None and str(alice) not in answer["message"]
    # Proven: the id, and no new key.
    data = route.ok("/registerAccount", {"userName": "alice", "accountKey": key})
    assert data == {"userId": alice, "userName": "alice"}
    # A password account: its password proves it (a key does not).
    bob = route.register("bob", "s3cret")
    assert bob not in route.keys
    assert route.register("bob", "s3cret") == bob
    body = {"userName": "bob", "accountKey": key}
    assert route.code("/registerAccount", body) == "4090"


def test_legacy_auth_keeps_cims_open_registration_and_login() -> None:
    route = Route(legacy_auth=True)
    alice = route.register("alice")
    # CIM: an existing name returns its id, and id + name log in.
    assert route.ok("/registerAccount", {"userName": "alice"})["userId"] == alice
    assert route.login(alice, "alice", accountKey=None)
    # A password still protects its account.
    bob = route.register("bob", "pw")
    assert route.code("/registerAccount", {"userName": "bob"}) == "4090"
    assert route.code("/login", {"userId": bob, "userName": "bob"}) == "9100"


def test_the_key_is_never_stored_or_logged(logged: list[dict]) -> None:
    route = Route()
    alice = route.register("alice")
    key = route.keys[alice]
    route.login(alice, "alice")
    assert key not in repr(route.store._users)
    assert key not in repr(logged)
    assert result(route.store.check_account_key(alice, key))


def test_a_login_proves_with_the_key_the_token_or_the_secret() -> None:
    route = Route()
    alice = route.register("alice")
    base = {"userId": alice, "userName": "alice"}
    data = route.login(alice, "alice")
    route.connect(alice)
    # The current token and the secret are proofs too (and replace).
    data = route.ok("/login", {**base, "token": data["token"]})
    route.connect(alice)
    assert route.ok("/login", base, token=data["token"])
    assert route.ok("/login", base, secret=SECRET)
    assert route.code("/login", base, secret="wrong secret") == "4010"


def test_a_login_after_registering_reads_no_account(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    The route remembers the accounts it registers (accounts never change):
    the first login that follows does not read the account back, and still
    checks its name and proof as any login does.
    """
    route = Route()
    alice = route.register("alice")
    bob = route.register("bob", "pw")
    read: list[int] = []
    get_account = route.store.get_account

    def counted(user_id: int) -> Deferred[Any]:
        read.append(user_id)
        return get_account(user_id)

    monkeypatch.setattr(route.store, "get_account", counted)
    assert route.login(alice, "alice")
    assert route.code("/login", {"userId": alice, "userName": "bob"}) == "9100"
    assert route.code("/login", {"userId": alice, "userName": "alice"}) == "9100"
    assert route.code("/login", {"userId": bob, "userName": "bob"}) == "9100"
    assert route.ok("/login", {"userId": bob, "userName": "bob", "password": "pw"})
    assert read == []


@pytest.fixture
def logged() -> Iterator[list[dict]]:
    """
    The log events emitted during the test.
    """
    events: list[dict] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def code_of(attempt: Coroutine[Any, Any, Any]) -> str:
    """
    The code a call of the router ends with (its Deferreds all fire at once
    on the memory store).
    """
    out: list[Any] = []
    Deferred.fromCoroutine(attempt).addBoth(out.append)
    [outcome] = out
    if isinstance(outcome, Failure):
        return str(outcome.value.code)
    return "9000"


# Guessing limits


def test_failed_logins_are_limited_per_account() -> None:
    route = Route(login_rate=3, address_rate=1000)
    bob, token = route.online("bob", "s3cret")
    wrong = {"userId": bob, "userName": "bob", "password": "guess"}
    assert [route.code("/login", wrong) for _ in range(4)] == [
        "9100",
        "9100",
        "9100",
        "6000",
    ]
    # Refused before the password is checked: the right one too, for now.
    answer = route.call("/login", {**wrong, "password": "s3cret"})
    assert answer["code"] == "6000"
    assert "for this account" in answer["message"]
    assert "try again in 20 s" in answer["message"]
    # A credential nobody can guess still logs the owner in (its client
    # reconnecting with its token is not locked out by the guesses).
    assert route.login(bob, "bob", token=token)
    # Another account is not affected; bob's allowance refills.
    carol = route.register("carol")
    assert route.login(carol, "carol")
    route.clock.advance(20)
    assert route.login(bob, "bob", password="s3cret")


def test_guessing_at_a_keyed_account_does_not_lock_out_its_owner() -> None:
    route = Route(login_rate=3, address_rate=1000)
    alice = route.register("alice")
    for body in (
        {"userId": alice, "userName": "alice", "password": "guess"},
        {"userId": alice, "userName": "alice"},
    ):
        assert [route.code("/login", body) for _ in range(4)][-1] == "6000"
    # Wrong keys are failures too, but keys are not worth limiting per
    # account: 2**256 of them.
    wrong_key = {"userId": alice, "userName": "alice", "accountKey": "guess"}
    assert route.code("/login", wrong_key) == "9100"
    assert route.login(alice, "alice")


def test_successful_logins_are_not_limited() -> None:
    route = Route(login_rate=1, address_rate=1)
    alice = route.register("alice")
    for _ in range(50):
        route.login(alice, "alice")
        route.connect(alice)


def test_failed_attempts_are_limited_per_address() -> None:
    route = Route(login_rate=1000, address_rate=5)
    users = [route.register(f"user{i}") for i in range(7)]
    codes = [
        route.code("/login", {"userId": u, "userName": f"user{i}", "accountKey": "x"})
        for i, u in enumerate(users)
    ]
    assert codes == ["9100"] * 5 + ["6000"] * 2
    answer = route.call("/registerAccount", {"userName": "user0"})
    assert answer["code"] == "6000" and "from your address" in answer["message"]
    # (Creating the 7 accounts was no failed attempt.)  The allowance
    # refills: one attempt every 12 s.
    route.clock.advance(12)
    assert route.code("/registerAccount", {"userName": "user0"}) == "4090"


def test_registration_probes_are_limited_per_name() -> None:
    route = Route(login_rate=2, address_rate=1000)
    route.register("Alice")
    assert [
        route.code("/registerAccount", {"userName": name})
        for name in ("alice", "ALICE", " alice", "аlice")
    ] == ["4090", "4090", "6000", "6000"]


def test_the_limit_is_per_address_at_the_router() -> None:
    route = Route(login_rate=1000, address_rate=2)
    alice = route.register("alice")
    router = route.api.router

    def attempt(address: str) -> str:
        return code_of(
            router.login(alice, "alice", None, None, Credentials(), "x", address)
        )

    assert [attempt("192.0.2.1") for _ in range(3)] == ["9100", "9100", "6000"]
    assert attempt("192.0.2.2") == "9100"


def test_token_buckets() -> None:
    clock = Clock()
    buckets = TokenBuckets(clock, rate=6, max_buckets=2)
    assert buckets.wait("a") == 0
    for _ in range(6):
        buckets.take("a")
    assert buckets.wait("a") == pytest.approx(10.0)
    clock.advance(5)
    assert buckets.wait("a") == pytest.approx(5.0)
    clock.advance(5)
    assert buckets.wait("a") == 0
    # Full buckets are forgotten; at most max_buckets are kept.
    clock.advance(60)
    assert buckets.wait("a") == 0 and "a" not in buckets._buckets
    for key in "bcd":
        buckets.take(key)
    assert len(buckets._buckets) == 2
    limit = GuessLimit(clock, 1, 100)
    limit.failed(("user", 1), None)
    with pytest.raises(ApiError) as e:
        limit.check(("user", 1), "192.0.2.1")
    assert e.value.code == "6000"


# Names


@pytest.mark.parametrize(
    "name",
    [
        "ZOE",
        "zoe ",
        " zoe",
        "Zoe",
        "z\u043e\u0435",  # Cyrillic o and e
        "\uff3a\uff4f\uff45",  # fullwidth
    ],
)
def test_look_alike_names_are_one_account(name: str) -> None:
    route = Route()
    zoe = route.register("zoe")
    answer = route.call("/registerAccount", {"userName": name})
    assert answer["code"] == "4090"
    # Its owner gets the existing account, under its registered name.
    body = {"userName": name, "accountKey": route.keys[zoe]}
    assert route.ok("/registerAccount", body) == {"userId": zoe, "userName": "zoe"}
    assert route.login(zoe, name)["userName"] == "zoe"


def test_nfc_and_nfd_are_one_account() -> None:
    route = Route()
    first = route.register(unicodedata.normalize("NFC", "Zoë"))
    body = {"userName": unicodedata.normalize("NFD", "Zoë")}
    assert route.code("/registerAccount", body) == "4090"
    assert route.register("Zoey") != first


@pytest.mark.parametrize(
    "name, complaint",
    [
        ("zo\u200be", "U+200B (ZERO WIDTH SPACE)"),
        ("\u202ezoe", "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
        ("\x1b[31mzoe", "U+001B"),
        ("zoe\n", "U+000A"),
        ("zo\x00e", "U+0000"),
        ("\u3000\t ", "must not be empty"),
        ("zoe\u2028x", "U+2028"),
        ("\ue000", "U+E000"),
    ],
)
def test_names_with_control_or_format_characters_are_refused(
    name: str, complaint: str
) -> None:
    route = Route()
    for path, body in (
        ("/registerAccount", {"userName": name}),
        ("/login", {"userId": 1, "userName": name}),
    ):
        answer = route.call(path, body)
        assert answer["code"] == "3000", (path, answer)
        assert answer["message"].startswith("userName ")
        assert complaint in answer["message"]
    assert result(route.store.get_account(1)) is None


def test_the_name_rule() -> None:
    assert check_name("ünïcødé 名前 🙂") == "ünïcødé 名前 🙂"
    assert name_key(" Ｚoë ") == name_key("zoë") == name_key("ZOË")
    assert name_key("paypal") == name_key("p\u0430yp\u0430l")
    assert name_key("alice") != name_key("alicia")


def test_the_skeleton_maps_every_confusable_as_the_table_says() -> None:
    # The skeleton translates with a table made from Unicode's mappings:
    # each mapped character (alone, and among ASCII) becomes its prototype.
    for source in names._prototypes():
        expected = unicodedata.normalize(
            "NFD",
            "".join(
                names._prototypes().get(char, char)
                for char in unicodedata.normalize("NFD", f"a{source}1")
            ),
        )
        assert names.skeleton(f"a{source}1") == expected, hex(ord(source))


def test_printable_ascii_names_pass_the_rule_and_controls_do_not() -> None:
    printable = "".join(chr(c) for c in range(0x20, 0x7F))
    assert check_name(printable) == printable
    for control in [*range(0x20), 0x7F]:
        with pytest.raises(names.BadName, match=f"U\\+{control:04X}"):
            check_name(f"zoe{chr(control)}x")


def test_name_keys_are_remembered_up_to_a_limit() -> None:
    name_key.cache_clear()
    for i in range(names.NAME_KEYS + 10):
        name_key(f"user{i}")
    assert name_key("user5") == "user5"
    info = name_key.cache_info()
    assert info.currsize == names.NAME_KEYS and info.maxsize == names.NAME_KEYS


# Wrong answers: deep JSON, lone surrogates


def test_deeply_nested_json_is_an_invalid_argument(logged: list[dict]) -> None:
    route = Route()
    deep = "[" * 100_000 + "]" * 100_000
    for raw in (
        f'{{"userName": {deep}}}',
        deep,
        json.dumps({"userName": "x", "reqNo": json.loads("[" * 40 + "]" * 40)}),
    ):
        answer = json.loads(
            route.request("POST", "/registerAccount", raw=raw.encode())[1]
        )
        assert answer["code"] == "3000", answer
        assert "nested deeper than 32" in answer["message"]
    levels = {e["log_level"].name for e in logged if "log_level" in e}
    assert not levels & {"error", "critical"}


@pytest.mark.parametrize(
    "path, body",
    [
        ("/registerAccount", '{"userName": "zo\\ud800e"}'),
        ("/login", '{"userId": 1, "userName": "\\udfff"}'),
        ("/p2pRoute", '{"userId": 1, "receiveUserId": 2, "msg": "hi \\ud800"}'),
        ("/p2pRoute", '{"userId": 1, "receiveUserId": 2, "batchMsg": ["\\ud800"]}'),
        (
            "/p2pRoute",
            '{"userId": 1, "receiveUserId": 2, "msg": "hi", "clientMsgId": "\\ud800"}',
        ),
        ("/history", '{"userId": 1, "conversation": "g:\\ud800"}'),
        ("/groupRoute", '{"userId": 1, "msg": "x", "reqNo": "\\ud800"}'),
        ("/registerAccount", '{"userName": "zoe", "\\ud800": 1}'),
    ],
)
def test_a_lone_surrogate_is_an_invalid_argument(
    path: str, body: str, logged: list[dict]
) -> None:
    route = Route()
    status, content = route.request("POST", path, raw=body.encode(), secret=SECRET)
    answer = json.loads(content)
    assert answer["code"] == "3000", answer
    assert "lone surrogate" in answer["message"]
    assert not any("store" in str(e.get("log_format", "")) for e in logged)


# --secret-file


def test_secret_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIM_SECRET", raising=False)
    path = tmp_path / "secret"
    path.write_text("  the-secret-from-a-file\n")
    for parse in (
        lambda *a: _parse(tap.Options, *a),
        lambda *a: _parse(server_tap.Options, *a),
        lambda *a: _parse(standalone.Options, "--registry", "zk://h:1/cim", *a),
    ):
        assert parse("--secret-file", str(path))["secret"] == "the-secret-from-a-file"
        with pytest.raises(usage.UsageError, match="not both"):
            parse("--secret-file", str(path), "--secret", SECRET)
        with pytest.raises(usage.UsageError, match="cannot read"):
            parse("--secret-file", str(tmp_path / "missing"))
        with pytest.raises(usage.UsageError, match="cluster secret is required"):
            parse()
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(usage.UsageError, match="is empty"):
        read_secret_file(str(tmp_path / "empty"))
    with pytest.raises(usage.UsageError, match="cannot read"):
        read_secret_file(str(tmp_path))
    (tmp_path / "short").write_text("short")
    with pytest.raises(usage.UsageError, match="at least 8"):
        _parse(tap.Options, "--secret-file", str(tmp_path / "short"))
    # The standalone node makes one up when it needs none.
    assert len(_parse(standalone.Options)["secret"]) >= 24


def _parse(cls: Any, *args: str) -> usage.Options:
    options = cls()
    options.parseOptions(list(args))
    return options


def test_guessing_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIM_SECRET", SECRET)
    config = tap.config_from(_parse(tap.Options))
    assert (config.login_rate, config.address_rate) == (10.0, 60.0)
    config = tap.config_from(
        _parse(tap.Options, "--login-rate", "3", "--address-rate", "30")
    )
    assert (config.login_rate, config.address_rate) == (3.0, 30.0)
    for bad in (["--login-rate", "0"], ["--address-rate", "many"]):
        with pytest.raises(usage.UsageError):
            _parse(tap.Options, *bad)
