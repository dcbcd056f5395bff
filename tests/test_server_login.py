"""
L{cim.server.login.Authenticator} on its own, over a memory store: each
refusal, and the grants of cim and CIM clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

from cim.interfaces import ServerAddress, Session, TokenInfo
from cim.message import Command, Cursor, ErrorCode, Frame, group_conversation, inbox
from cim.server.login import Authenticator, Grant, Refusal
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

    def session(self, user_id: int) -> Session:
        session = self.value(self.get_session(user_id))
        assert session is not None
        return session

    def account(self, name: str) -> int:
        return self.value(self.register(name)).user_id

    def assign(self, user_id: int, name: str, server: ServerAddress = HERE) -> str:
        """
        Claim a session for C{user_id} on C{server}, as the route does.
        @return: its id.
        """
        claim = self.claim_session(user_id, name, str(server), 60.0, replace=True)
        session, _ = self.value(claim)
        return session.session_id

    def token(self, user_id: int, session_id: str, server: ServerAddress = HERE) -> str:
        return self.value(self.issue_token(user_id, str(server), session_id, 3600.0))


class SessionEndsAfterTheToken(Store):
    """
    The session ends (its server was declared dead) right after its token
    was checked.
    """

    def verify_token(self, token: str) -> Deferred[TokenInfo | None]:
        d = super().verify_token(token)
        self.drop_server_sessions(str(HERE))
        return d


class SessionReplacedBeforeActivation(Store):
    """
    A newer login through the route claims the session while this one is
    being checked.
    """

    def activate_session(
        self, user_id: int, session_id: str, ttl: float = 90.0
    ) -> Deferred[bool]:
        self.claim_session(user_id, "alice", str(HERE), 60.0, replace=True)
        return super().activate_session(user_id, session_id, ttl)


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


def test_a_session_that_ended_after_its_token_was_checked_is_refused() -> None:
    store = SessionEndsAfterTheToken()
    alice = store.account("alice")
    token = store.token(alice, store.assign(alice, "alice"))
    auth = Authenticator(store, str(HERE), legacy_login=False)
    assert refused(auth, login(alice, "alice", token)) == Refusal(
        ErrorCode.BAD_TOKEN, "no such session: log in through the route"
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


def test_a_session_replaced_while_checking_is_refused() -> None:
    store = SessionReplacedBeforeActivation()
    alice = store.account("alice")
    token = store.token(alice, store.assign(alice, "alice"))
    auth = Authenticator(store, str(HERE), legacy_login=False)
    assert refused(auth, login(alice, "alice", token)) == Refusal(
        ErrorCode.BAD_TOKEN, "the session was replaced or expired"
    )


# Grants


def test_a_token_login_is_granted_with_the_stored_cursors_and_groups() -> None:
    store = Store()
    alice = store.account("alice")
    store.create_group("team", alice)
    store.set_cursors(alice, {inbox(alice): 7, group_conversation("team"): 3})
    session_id = store.assign(alice, "alice")
    token = store.token(alice, session_id)
    # Tokens make a cim client even where CIM clients are accepted.
    auth = Authenticator(store, str(HERE), legacy_login=True)
    frame = login(alice, "alice", token, cursors=[Cursor(inbox(alice), 9)])
    assert not auth.is_legacy(frame)
    grant = outcome(auth, frame)
    assert grant == Grant(
        user_id=alice,
        user_name="alice",
        session_id=session_id,
        legacy=False,
        cursors={inbox(alice): 7, group_conversation("team"): 3},
        groups=["team"],
    )
    assert grant.conversations == [inbox(alice), group_conversation("team")]
    assert store.session(alice).connected


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
        cursors={},
        groups=[],
    )
    assert store.session(alice).connected
