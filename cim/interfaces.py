"""
The backends every daemon needs, as zope interfaces: the store (accounts,
sessions, tokens, messages, groups) and the server registry.

Each has an in-memory implementation and a real one (Redis, ZooKeeper) with
the same behaviour; C{tests/test_store.py} and C{tests/test_registry.py} run
one suite against both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from zope.interface import Attribute, Interface


class StoreError(Exception):
    """
    The store could not do what was asked (it is unreachable, or broken).
    """


class NameTaken(Exception):
    """
    A registration named an existing account with a different password.
    """


class NoSuchUser(Exception):
    """
    No account has that id.
    """


class NoSuchGroup(Exception):
    """
    No group has that id.
    """


class GroupExists(Exception):
    """
    A group with that id already exists.
    """


class SessionExists(Exception):
    """
    The user already holds a session, and the claim did not ask to replace it.

    @ivar session: the existing L{Session}.
    """

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.session = session


@dataclass(frozen=True, slots=True)
class ServerAddress:
    """
    Where an IM server listens: the host clients connect to, its client TCP
    port and its push API HTTP port.  Its string form
    C{"host:port:http_port"} is the registry node name (as in CIM).
    """

    host: str
    port: int
    http_port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}:{self.http_port}"

    @classmethod
    def parse(cls, text: str) -> ServerAddress:
        """
        Parse C{"host:port:http_port"}.

        @raise ValueError: C{text} is not of that form.
        """
        host, port, http_port = text.rsplit(":", 2)
        if not host:
            raise ValueError(f"no host in {text!r}")
        return cls(host, int(port), int(http_port))


@dataclass(frozen=True, slots=True)
class Account:
    user_id: int
    user_name: str
    has_password: bool = False


@dataclass(frozen=True, slots=True)
class Session:
    """
    A user's single session: which server holds (or will hold) its
    connection.

    @ivar session_id: unique per claim; releases compare it, so that a late
        release of an old session never erases a newer one.
    @ivar server: the L{ServerAddress} string of the server.
    @ivar connected: C{False} between the route's claim and the server's
        L{IStore.activate_session}; a session that stays unconnected past its
        claim's time to live disappears by itself.
    """

    user_id: int
    user_name: str
    server: str
    session_id: str
    connected: bool = False


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """
    What a login token stands for.
    """

    user_id: int
    server: str
    session_id: str


@dataclass(frozen=True, slots=True)
class NewMessage:
    """
    A message to append.

    @ivar client_msg_id: the sender's id for this send; the same id from the
        same sender appends once (empty: no idempotency).
    """

    conversation: str
    sender_id: int
    sender_name: str
    text: str
    client_msg_id: str = ""
    receive_user_id: int = 0
    group_id: str = ""


class IStore(Interface):
    """
    Accounts, sessions, login tokens, messages and groups.

    Every method returns a L{Deferred}; any of them may fail with
    L{StoreError} when the backend is unreachable.
    """

    # Accounts

    def register(user_name: str, password: str | None = None):  # type: ignore[no-untyped-def]
        """
        Create the account C{user_name}, or return the existing one.

        @return: fires with the L{Account}.  An existing account is returned
            when it has no password or C{password} matches it; otherwise
            fails with L{NameTaken}.  User ids are allocated atomically and
            never reused.
        """

    def get_account(user_id: int):  # type: ignore[no-untyped-def]
        """
        @return: fires with the L{Account} or C{None}.
        """

    def get_account_by_name(user_name: str):  # type: ignore[no-untyped-def]
        """
        @return: fires with the L{Account} or C{None}.
        """

    def check_password(user_id: int, password: str):  # type: ignore[no-untyped-def]
        """
        @return: fires with C{True} when C{password} matches the account's
            (salted scrypt hash), C{False} otherwise or when it has none.
        """

    # Sessions

    def claim_session(  # type: ignore[no-untyped-def]
        user_id: int, user_name: str, server: str, ttl: float, replace: bool = False
    ):
        """
        Atomically give C{user_id} a new, not yet connected session on
        C{server}, which expires after C{ttl} seconds unless activated.

        @return: fires with a tuple of the new L{Session} and the one it
            replaced (or C{None}).  When the user already holds a session and
            C{replace} is false, fails with L{SessionExists}.
        """

    def activate_session(user_id: int, session_id: str):  # type: ignore[no-untyped-def]
        """
        Mark the session connected (its server accepted the user's TCP
        login): it no longer expires, and the user is listed online.

        @return: fires with C{True}, or C{False} when C{session_id} is no
            longer the user's session.
        """

    def get_session(user_id: int):  # type: ignore[no-untyped-def]
        """
        @return: fires with the user's L{Session} or C{None}.
        """

    def get_sessions(user_ids: Sequence[int]):  # type: ignore[no-untyped-def]
        """
        @return: fires with a C{dict} mapping each of C{user_ids} that has a
            connected session to it.
        """

    def release_session(user_id: int, session_id: str):  # type: ignore[no-untyped-def]
        """
        Delete the user's session and its tokens, only if it still is
        C{session_id} (compare-and-delete).

        @return: fires with C{True} when it was deleted.
        """

    def online_users():  # type: ignore[no-untyped-def]
        """
        @return: fires with a list of C{(user_id, user_name)} of connected
            sessions, ordered by user id.
        """

    def drop_server_sessions(server: str):  # type: ignore[no-untyped-def]
        """
        Delete every session held by C{server} (it died).

        @return: fires with the list of user ids whose session was dropped.
        """

    # Login tokens

    def issue_token(user_id: int, server: str, session_id: str, ttl: float):  # type: ignore[no-untyped-def]
        """
        @return: fires with a new unguessable token string bound to the user,
            server and session, valid for C{ttl} seconds.
        """

    def verify_token(token: str):  # type: ignore[no-untyped-def]
        """
        @return: fires with the L{TokenInfo}, or C{None} when the token is
            unknown, expired, or its session was released or replaced.
        """

    # Messages

    def append(messages: Sequence[NewMessage]):  # type: ignore[no-untyped-def]
        """
        Append each message to its conversation, in order.

        @return: fires with a list of L{cim.message.ChatMessage}, one per
            input: the stored message with its C{msg_id} and C{seq}.  A
            message whose C{(sender_id, client_msg_id)} was appended before
            is not appended again; its original is returned.
        """

    def read(conversation: str, after_seq: int, limit: int):  # type: ignore[no-untyped-def]
        """
        @return: fires with up to C{limit} messages of C{conversation} with
            C{seq > after_seq}, in order.  Messages past the retention
            limits may be missing.
        """

    def last_seq(conversation: str):  # type: ignore[no-untyped-def]
        """
        @return: fires with the highest sequence number of C{conversation}
            (0 when empty).
        """

    def set_cursors(user_id: int, cursors: dict[str, int]):  # type: ignore[no-untyped-def]
        """
        Raise the user's acknowledged cursor of each conversation to the
        given seq (a lower value never lowers it).

        @return: fires with C{None}.
        """

    def set_many_cursors(cursors: dict[int, dict[str, int]]):  # type: ignore[no-untyped-def]
        """
        L{set_cursors} for several users at once (user id to cursors), in
        one round trip.

        @return: fires with C{None}.
        """

    def get_cursors(user_id: int):  # type: ignore[no-untyped-def]
        """
        @return: fires with a C{dict} of conversation to acknowledged seq.
        """

    def close():  # type: ignore[no-untyped-def]
        """
        Let go of the backend (connections).  @return: a Deferred.
        """

    # Groups

    def create_group(group_id: str, owner_id: int):  # type: ignore[no-untyped-def]
        """
        Create group C{group_id} with C{owner_id} as its first member.

        @return: fires with C{None}; fails with L{GroupExists}.
        """

    def join_group(group_id: str, user_id: int):  # type: ignore[no-untyped-def]
        """
        @return: fires with C{True} if the user joined, C{False} if already a
            member; fails with L{NoSuchGroup}.
        """

    def leave_group(group_id: str, user_id: int):  # type: ignore[no-untyped-def]
        """
        @return: fires with C{True} if the user left, C{False} if not a
            member; fails with L{NoSuchGroup}.
        """

    def group_members(group_id: str):  # type: ignore[no-untyped-def]
        """
        @return: fires with the sorted list of member user ids; fails with
            L{NoSuchGroup}.
        """

    def user_groups(user_id: int):  # type: ignore[no-untyped-def]
        """
        @return: fires with the sorted list of the user's group ids.
        """


class IRegistry(Interface):
    """
    The live IM servers of a cluster.

    A server calls L{register}; routes (and servers) read L{servers} and
    L{watch} for changes.  Callbacks and Deferred results always arrive on
    the reactor thread.
    """

    def start():  # type: ignore[no-untyped-def]
        """
        Connect.  @return: a Deferred firing once the server list is known.
        """

    def stop():  # type: ignore[no-untyped-def]
        """
        Unregister (if registered) and disconnect.  @return: a Deferred.
        """

    def register(address: ServerAddress):  # type: ignore[no-untyped-def]
        """
        Announce C{address} (an ephemeral node) until L{unregister} or
        L{stop}, re-announcing it by itself after a session expiry.

        @return: a Deferred firing once it is announced.
        """

    def unregister():  # type: ignore[no-untyped-def]
        """
        Withdraw the announcement.  @return: a Deferred.
        """

    def servers():  # type: ignore[no-untyped-def]
        """
        @return: the cached, sorted list of live L{ServerAddress} (not a
            Deferred).
        """

    def watch(callback: Callable[[list[ServerAddress]], None]):  # type: ignore[no-untyped-def]
        """
        Call C{callback} with the new list each time it changes.

        @return: a no-argument callable that stops watching.
        """

    connected = Attribute("True while the registry's backend is reachable.")
