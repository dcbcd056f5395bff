"""
L{cim.server.login.Authenticator} on its own, over a memory store: each
refusal, and the grants of cim and CIM clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

from cim.interfaces import NewMessage, ServerAddress, Session
from cim.message import (
    Command,
    Cursor,
    ErrorCode,
    Frame,
    Position,
    group_conversation,
    pair_conversation,
)
from cim.server.login import Authenticator, Grant, Refusal, Resumption, resume
from cim.store.memory import MemoryStore
from tests.serverkit import HERE, THERE

T = TypeVar("T")


class Store(MemoryStore):
    """
    A memory store with helpers for the route's part of a login.
    """

    def __init__(self) -> None:
        self.time = Clock()
        self.time.advance(1_700_000_000)
        super().__init__(self.time)

    def value(self, d: Deferred[T]) -> T:
        results: list[T] = []
        d.addCallback(results.append)
        assert results, "the Deferred has not fired"
        return results[0]

    def session(self, user_id: int, device: str = "") -> Session:
        session = self.value(self.get_session(user_id, device))
        assert session is not None
        return session

    def account(self, name: str) -> int:
        return self.value(self.register(name)).user_id

    def assign(
        self, user_id: int, name: str, server: ServerAddress = HERE, device: str = ""
    ) -> str:
        """
        Claim a session for C{user_id}'s C{device} on C{server}, as the route
        does.  @return: its id.
        """
        claim = self.claim_session(
            user_id, name, str(server), 60.0, replace=True, device=device
        )
        session, _ = self.value(claim)
        return session.session_id

    def token(
        self,
        user_id: int,
        session_id: str,
        server: ServerAddress = HERE,
        device: str = "",
    ) -> str:
        return self.value(
            self.issue_token(user_id, str(server), session_id, 3600.0, device)
        )


class SessionEndsBeforeTheLogin(Store):
    """
    The session ends (its server was declared dead) just before its token
    is checked.  (A token is checked and its session activated in one store
    call: nothing can end it in between.)
    """

    def activate_token(
        self, token: str, user_id: int, server: str, ttl: float = 90.0
    ) -> Deferred[Session | str]:
        self.drop_server_sessions(str(HERE))
        return super().activate_token(token, user_id, server, ttl)


class SessionReplacedBeforeActivation(Store):
    """
    A newer login through the route claims the session while this one is
    being checked.
    """

    def activate_session(
        self, user_id: int, session_id: str, ttl: float = 90.0, device: str = ""
    ) -> Deferred[bool]:
        self.claim_session(
            user_id, "alice", str(HERE), 60.0, replace=True, device=device
        )
        return super().activate_session(user_id, session_id, ttl, device)


def login(
    user_id: int, name: str, token: str = "", cursors: Sequence[Cursor] = ()
) -> Frame:
    return Frame(
        cmd=Command.LOGIN_REQUEST,
        request_id=user_id,
        req_msg=name,
        token=token,
        cursors=tuple(cursors),
    )


def outcome(auth: Authenticator, frame: Frame) -> Grant | Refusal:
    results: list[object] = []
    ensureDeferred(auth.authenticate(frame)).addBoth(results.append)
    [result] = results
    assert isinstance(result, (Grant, Refusal)), result
    return result


def refused(auth: Authenticator, frame: Frame) -> Refusal:
    result = outcome(auth, frame)
    assert isinstance(result, Refusal), result
    return result


# Refusals


def test_a_login_without_a_user_id_is_refused_before_any_store_read() -> None:
    auth = Authenticator(Store(), str(HERE), legacy_login=True)
    frame = login(0, "alice", token="t")
    expected = Refusal(ErrorCode.INVALID_ARGUMENT, "login needs requestId = userId")
    assert auth.check(frame) == expected
    assert refused(auth, frame) == expected


def test_an_unknown_token_is_refused() -> None:
    store = Store()
    alice = store.account("alice")
    store.token(alice, store.assign(alice, "alice"))
    auth = Authenticator(store, str(HERE), legacy_login=False)
    assert refused(auth, login(alice, "alice", token="nope")) == Refusal(
        ErrorCode.BAD_TOKEN, "invalid or expired token"
    )


def test_an_expired_token_is_refused() -> None:
    store = Store()
    alice = store.account("alice")
    token = store.token(alice, store.assign(alice, "alice"))
    store.time.advance(3601)
    auth = Authenticator(store, str(HERE), legacy_login=False)
    assert refused(auth, login(alice, "alice", token)).reason == (
        "invalid or expired token"
    )


def test_another_users_token_is_refused() -> None:
    store = Store()
    alice = store.account("alice")
    bob = store.account("bob")
    token = store.token(bob, store.assign(bob, "bob"))
    auth = Authenticator(store, str(HERE), legacy_login=False)
    assert refused(auth, login(alice, "alice", token)) == Refusal(
        ErrorCode.BAD_TOKEN, "the token is for another user"
    )


def test_a_token_for_another_server_is_refused() -> None:
    store = Store()
    alice = store.account("alice")
    token = store.token(alice, store.assign(alice, "alice", THERE), THERE)
    auth = Authenticator(store, str(HERE), legacy_login=False)
    assert refused(auth, login(alice, "alice", token)) == Refusal(
        ErrorCode.BAD_TOKEN, "the token is for another server"
    )


def test_a_missing_token_is_refused_without_legacy_login() -> None:
    store = Store()
    alice = store.account("alice")
    store.assign(alice, "alice")
    auth = Authenticator(store, str(HERE), legacy_login=False)
    frame = login(alice, "alice")
    assert not auth.is_legacy(frame)
    assert refused(auth, frame) == Refusal(
        ErrorCode.BAD_TOKEN, "a login token is required"
    )


def test_a_token_whose_session_ended_is_refused() -> None:
    store = SessionEndsBeforeTheLogin()
    alice = store.account("alice")
    token = store.token(alice, store.assign(alice, "alice"))
    auth = Authenticator(store, str(HERE), legacy_login=False)
    assert refused(auth, login(alice, "alice", token)) == Refusal(
        ErrorCode.BAD_TOKEN, "invalid or expired token"
    )


def test_a_cim_client_without_a_session_is_refused() -> None:
    store = Store()
    alice = store.account("alice")
    auth = Authenticator(store, str(HERE), legacy_login=True)
    assert refused(auth, login(alice, "alice")) == Refusal(
        ErrorCode.BAD_TOKEN, "no such session: log in through the route"
    )


def test_a_cim_client_assigned_to_another_server_is_refused() -> None:
    store = Store()
    alice = store.account("alice")
    store.assign(alice, "alice", THERE)
    auth = Authenticator(store, str(HERE), legacy_login=True)
    assert refused(auth, login(alice, "alice")) == Refusal(
        ErrorCode.BAD_TOKEN, "the session belongs to another server"
    )
    # Nothing changed in the store.
    session = store.session(alice)
    assert session.server == str(THERE) and not session.connected


def test_a_cim_client_with_another_name_is_refused() -> None:
    store = Store()
    alice = store.account("alice")
    store.assign(alice, "alice")
    auth = Authenticator(store, str(HERE), legacy_login=True)
    assert refused(auth, login(alice, "mallory")) == Refusal(
        ErrorCode.BAD_TOKEN, "userName does not match the session"
    )


def test_a_cim_session_replaced_while_checking_is_refused() -> None:
    """
    A CIM client's login (no token) reads its session, then activates it:
    a newer login in between wins.
    """
    store = SessionReplacedBeforeActivation()
    alice = store.account("alice")
    store.assign(alice, "alice")
    auth = Authenticator(store, str(HERE), legacy_login=True)
    assert refused(auth, login(alice, "alice")) == Refusal(
        ErrorCode.BAD_TOKEN, "the session was replaced or expired"
    )


def test_a_token_login_is_one_store_call() -> None:
    """
    A login with a token asks the store once (L{IStore.token_login}), and
    the grant carries what it read.
    """
    store = Store()
    alice = store.account("alice")
    token = store.token(alice, store.assign(alice, "alice", device="tab"), device="tab")
    calls: list[str] = []

    class Counting:
        def __getattr__(self, name: str) -> Any:
            calls.append(name)
            return getattr(store, name)

    auth = Authenticator(Counting(), str(HERE), legacy_login=False)  # type: ignore[arg-type]
    grant = outcome(auth, login(alice, "alice", token))
    assert isinstance(grant, Grant)
    assert calls == ["token_login"]
    assert store.session(alice, "tab").connected
    assert grant.reads is not None
    assert grant.reads.session.device == "tab"
    assert (grant.reads.states, grant.reads.cursors) == ([], {})


# Grants


def test_a_token_login_is_granted_for_the_tokens_device() -> None:
    store = Store()
    alice = store.account("alice")
    store.assign(alice, "alice", device="laptop")
    session_id = store.assign(alice, "alice", device="phone")
    token = store.token(alice, session_id, device="phone")
    # Tokens make a cim client even where CIM clients are accepted.
    auth = Authenticator(store, str(HERE), legacy_login=True)
    frame = login(alice, "alice", token)
    assert not auth.is_legacy(frame)
    grant = outcome(auth, frame)
    assert isinstance(grant, Grant)
    assert replace(grant, reads=None) == Grant(
        user_id=alice,
        user_name="alice",
        session_id=session_id,
        legacy=False,
        device="phone",
    )
    assert store.session(alice, "phone").connected
    assert not store.session(alice, "laptop").connected


def test_a_cim_client_is_granted_the_session_the_route_assigned() -> None:
    store = Store()
    alice = store.account("alice")
    session_id = store.assign(alice, "alice")
    auth = Authenticator(store, str(HERE), legacy_login=True)
    frame = login(alice, "alice")
    assert auth.is_legacy(frame)
    assert outcome(auth, frame) == Grant(
        user_id=alice,
        user_name="alice",
        session_id=session_id,
        legacy=True,
        device="",
    )
    assert store.session(alice).connected


# Where a device resumes


def resumed(store: Store, user_id: int, device: str = "", sent=()) -> Resumption:  # type: ignore[no-untyped-def]
    results: list[Resumption] = []
    ensureDeferred(resume(store, user_id, device, sent)).addCallback(results.append)
    [result] = results
    return result


def test_each_conversation_starts_from_the_client_the_device_or_the_start() -> None:
    store = Store()
    alice = store.account("alice")
    bob = store.account("bob")
    carol = store.account("carol")
    dave = store.account("dave")
    store.create_group("team", alice)
    team = group_conversation("team")
    with_bob = pair_conversation(alice, bob)
    with_carol = pair_conversation(alice, carol)
    with_dave = pair_conversation(alice, dave)
    for conversation, sender in (
        (with_bob, bob),
        (with_carol, carol),
        (with_dave, dave),
        (team, alice),
    ):
        store.append([NewMessage(conversation, sender, "x", f"m{i}") for i in range(5)])
    epochs = store.value(store.epochs([with_bob, with_carol, with_dave, team]))
    store.set_read(alice, with_carol, 3)
    store.set_cursors(alice, {with_bob: Position(epochs[with_bob].id, 2)}, "phone")
    store.set_cursors(alice, {with_carol: Position(epochs[with_carol].id, 4)}, "phone")
    sent = [Cursor(with_carol, 1, epochs[with_carol].id)]
    resumption = resumed(store, alice, "phone", sent)
    assert [s.cursor for s in resumption.starts] == [
        # The group: from where alice joined it (she created it), her own
        # messages too, whatever her read position.
        Cursor(team, 0, epochs[team].id),
        Cursor(with_bob, 2, epochs[with_bob].id),  # the device's cursor
        Cursor(with_carol, 1, epochs[with_carol].id),  # what the client sent
        Cursor(with_dave, 0, epochs[with_dave].id),  # nothing read
    ]
    assert [s.last_seq for s in resumption.starts] == [5] * 4
    assert resumption.acked == {
        with_bob: Position(epochs[with_bob].id, 2),
        with_carol: Position(epochs[with_carol].id, 4),
    }
    # Another device has no cursors: everything kept, not from the read
    # positions (a device shows the whole conversation).
    other = resumed(store, alice, "laptop")
    assert [s.seq for s in other.starts] == [0, 0, 0, 0]
    assert other.acked == {}


def test_a_position_of_another_epoch_or_beyond_the_last_is_reset() -> None:
    store = Store()
    alice = store.account("alice")
    bob = store.account("bob")
    conversation = pair_conversation(alice, bob)
    store.append([NewMessage(conversation, bob, "bob", f"m{i}") for i in range(3)])
    epoch = store.value(store.epochs([conversation]))[conversation]
    [start] = resumed(store, alice, "", [Cursor(conversation, 7, "gone")]).starts
    assert start.cursor == Cursor(conversation, 0, epoch.id, True)
    [start] = resumed(store, alice, "", [Cursor(conversation, 7, epoch.id)]).starts
    assert start.cursor == Cursor(conversation, 3, epoch.id, True)
    # Bob's device without a position gets his own messages too.
    assert resumed(store, bob, "", []).starts[0].seq == 0
