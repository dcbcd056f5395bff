"""
Every interface between cim's parts, as zope interfaces (mypy-zope checks
the implementations): the store's roles (accounts, sessions and tokens,
messages, groups) and the whole store, the server registry, and the
delivery core's view of IM servers (local connections, pushes, the push
API's controls), and the message bus that carries pushes between processes.

Each has an in-memory implementation and a real one (Redis, ZooKeeper) with
the same behaviour; C{tests/test_store.py} and C{tests/test_registry.py} run
one suite against both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IReactorCore,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
)
from zope.interface import Attribute, Interface

from cim.envelope import RATE_LIMITED, ApiError
from cim.message import ChatMessage, Position, batch_client_msg_ids


class StoreError(Exception):
    """
    The store could not do what was asked (it is unreachable, or broken).
    """


class NameTaken(Exception):
    """
    A registration named an existing account without proving it owns it
    (raised by the route's logic; stores return existing accounts).
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


class DeviceKeyUsed(Exception):
    """
    The device key a login presented is no longer the device's: another
    login used it meanwhile (L{IStore.open_session}).
    """


class QuotaExceeded(ApiError):
    """
    A sender used up its quota of messages to a conversation
    (L{cim.store.Retention.sender_quota}): L{IMessages.append} did not
    store its messages past it.  An L{ApiError} of code 6000
    (rate limited), so that the route answers it as it is.

    @ivar results: per message of the refused append, the stored
        L{ChatMessage}, or C{None} for each message refused.
    """

    def __init__(self, results: Sequence[ChatMessage | None] = ()) -> None:
        super().__init__(
            RATE_LIMITED,
            "the sender's quota of messages to this conversation is used up; "
            "wait before sending more",
        )
        self.results = list(results)


@dataclass(frozen=True, slots=True)
class ServerAddress:
    """
    Where an IM server listens: the host clients connect to, its client
    port and its push API port, and whether each speaks TLS.  Its string
    form is the registry node name: C{"host:port:http_port"} as in CIM,
    with a fourth field only when TLS or WebSocket is on: flags joined by
    C{+}, C{tls} (the client port), C{https} (the push API), and
    C{ws=<port>} or C{wss=<port>} (the WebSocket gateway, with TLS), such as
    C{10.0.0.1:11211:8081:tls+https+wss=8084}.  CIM reads the first three
    fields only, and a CIM client could not speak TLS anyway.

    @ivar tls: the client port speaks TLS.
    @ivar https: the push API speaks TLS (called with C{https://}).
    @ivar ws_port: the WebSocket gateway's port; 0: none.
    @ivar wss: the WebSocket gateway speaks TLS.
    """

    host: str
    port: int
    http_port: int
    tls: bool = False
    https: bool = False
    ws_port: int = 0
    wss: bool = False

    def __str__(self) -> str:
        text = f"{self.host}:{self.port}:{self.http_port}"
        flags = [name for name, on in (("tls", self.tls), ("https", self.https)) if on]
        if self.ws_port:
            flags.append(f"{'wss' if self.wss else 'ws'}={self.ws_port}")
        return f"{text}:{'+'.join(flags)}" if flags else text

    @property
    def ws_url(self) -> str | None:
        """
        The URL of the server's WebSocket gateway, if it has one.
        """
        if not self.ws_port:
            return None
        scheme = "wss" if self.wss else "ws"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.ws_port}/"

    @property
    def push_url(self) -> str:
        """
        The base URL of the server's push API.
        """
        scheme = "https" if self.https else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.http_port}"

    @classmethod
    def parse(cls, text: str) -> ServerAddress:
        """
        Parse C{"host:port:http_port"}, perhaps followed by C{":"} and
        flags joined by C{+}: C{tls}, C{https}, C{ws=<port>}, C{wss=<port>}.

        @raise ValueError: C{text} is not of that form.
        """
        flags: set[str] = set()
        ws_port, wss = 0, False
        head, _, last = text.rpartition(":")
        if last and not last.isdigit() and head:
            flags = set(last.split("+"))
            for flag in [f for f in flags if f.startswith(("ws=", "wss="))]:
                name, _, number = flag.partition("=")
                if ws_port or not number.isdigit() or not 0 < int(number) < 65536:
                    raise ValueError(f"bad WebSocket flag {flag!r} in {text!r}")
                ws_port, wss = int(number), name == "wss"
                flags.discard(flag)
            if not flags <= {"tls", "https"}:
                raise ValueError(f"unknown flags {last!r} in {text!r}")
            text = head
        host, port, http_port = text.rsplit(":", 2)
        if not host:
            raise ValueError(f"no host in {text!r}")
        return cls(
            host,
            int(port),
            int(http_port),
            "tls" in flags,
            "https" in flags,
            ws_port,
            wss,
        )


@dataclass(frozen=True, slots=True)
class Account:
    """
    A user account.

    @ivar user_name: the name as registered (the display name); the
        account is found by its key (L{cim.names.name_key}).
    @ivar has_password: the account has a password.
    @ivar has_key: the account has an account key (a random secret issued
        at its creation, for accounts without a password).
    @ivar created: set on the L{Account} that L{IAccounts.register} returns
        when it created the account (not compared).
    """

    user_id: int
    user_name: str
    has_password: bool = False
    has_key: bool = False
    created: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class Session:
    """
    One device's session of a user: which server holds (or will hold) its
    connection.  A user holds at most one session per device, and at most
    the route's C{--max-devices} sessions in all.

    @ivar session_id: unique per claim; releases compare it, so that a late
        release of an old session never erases a newer one.
    @ivar server: the L{ServerAddress} string of the server.
    @ivar connected: C{False} between the route's claim and the server's
        L{IStore.activate_session}; a session that stays unconnected past its
        claim's time to live disappears by itself.
    @ivar device: the device's id, chosen and kept by the client; C{""}
        for a client that names none (CIM's clients: one session per user,
        as in CIM).
    @ivar active: when the device was last active (its login, or its last
        send, as its server reports at renewals), in seconds since the
        epoch: past the device limit, the least recently active session
        goes.
    """

    user_id: int
    user_name: str
    server: str
    session_id: str
    connected: bool = False
    device: str = ""
    active: float = 0.0


class Generations(NamedTuple):
    """
    Users' session generations, as a store read them at one moment: a
    user's generation changes with every change of its sessions (a claim,
    an activation, a release, a drop, a session made again by a renewal),
    so sessions read at the same generation (in the same C{run}) are the
    user's sessions at that moment, but for those expired since.

    @ivar run: the store's incarnation (the Redis C{run_id}): generations
        of another run are not comparable (a restored backup goes back).
    @ivar of: user id -> generation.
    """

    run: str
    of: dict[int, int]


class Appended(list[ChatMessage]):
    """
    What L{IMessages.append} stored, with C{generations}: those of the
    users of its private conversations, read right after storing them
    (C{None}: not known; a store may not tell).
    """

    __slots__ = ("generations",)

    def __init__(
        self, stored: Sequence[ChatMessage] = (), generations: Generations | None = None
    ) -> None:
        super().__init__(stored)
        self.generations = generations


class FoundSessions(dict[int, list["Session"]]):
    """
    What L{ISessions.get_sessions} found, with C{generations}: those of
    every user asked, read with the sessions (C{None}: not known).
    """

    __slots__ = ("generations",)

    def __init__(self, generations: Generations | None = None) -> None:
        super().__init__()
        self.generations = generations


class HeldSession(NamedTuple):
    """
    A connected session that a server holds, as it renews it
    (L{ISessions.renew_sessions}).
    """

    user_id: int
    session_id: str
    user_name: str
    device: str = ""
    active: float = 0.0


class Renewal(NamedTuple):
    """
    What L{ISessions.renew_sessions} found.

    @ivar lost: the sorted session ids that are not their device's session
        any more (a newer login replaced them, the device limit dropped
        them, or they were released in the last 10 minutes): their server
        should close those connections.
    @ivar restored: the sorted session ids that had expired meanwhile and
        were made again: while they were missing, deliveries found their
        devices offline, so their server should catch those devices up.
    """

    lost: list[str]
    restored: list[str]


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """
    What a login token stands for.
    """

    user_id: int
    server: str
    session_id: str
    device: str = ""


#: Why L{ISessions.activate_token} refused a token: it is unknown,
#: expired, or its session was released or replaced;
TOKEN_UNKNOWN = "unknown"
#: it is another user's;
TOKEN_OTHER_USER = "other-user"
#: it names another server;
TOKEN_OTHER_SERVER = "other-server"
#: its session now belongs to another server.
SESSION_OTHER_SERVER = "session-elsewhere"


@dataclass(frozen=True, slots=True)
class Epoch:
    """
    Which numbering of a conversation the store holds.

    A conversation's messages are numbered 1, 2, 3...  When a store loses
    or replaces them (a new store, a flushed database, one restored from an
    older file, a failover to a replica that lagged), it numbers new
    messages again from where it stands, and their seqs may repeat seqs that
    clients saw with other messages.  So the store starts a new epoch at the
    first append after such an event (L{IMessages.append}): a new random
    C{id}, the epoch it follows (C{previous}) and the last seq the two have
    in common (C{base}, the conversation's last seq at that append).  A
    position (L{Position}) of the current epoch is trusted; one of the
    previous epoch up to C{base}; any other is not (L{resume}).

    @ivar id: C{""} when the conversation has no epoch yet (nothing was
        appended to it since epochs exist, or the store lost it).
    @ivar previous: the epoch this one follows (C{""} when unknown, or
        from before epochs).
    @ivar base: the last seq this epoch has in common with C{previous};
        without an epoch: the conversation's last seq.
    """

    id: str = ""
    previous: str = ""
    base: int = 0

    def resume(self, position: Position) -> tuple[int, bool]:
        """
        Where a client at C{position} resumes in this epoch.

        @return: the seq after which to send it messages, and whether its
            position is not trusted (C{True}: it saw messages after that seq
            that this epoch does not hold; it must be told).
        """
        epoch, seq = position
        if seq <= 0:
            return 0, False
        if self.id and epoch == self.id:
            return seq, False
        if epoch == self.previous:
            return min(seq, self.base), seq > self.base
        return 0, True


@dataclass(frozen=True, slots=True)
class ConversationState:
    """
    Where one user stands in one of its conversations (L{IMessages.
    conversations}).

    @ivar last_seq: the conversation's last seq (0: empty).
    @ivar read: the user's read position (0: nothing read, or read in an
        epoch that is not trusted any more).
    @ivar peer_id: in a private conversation, the other user (the user
        itself for its notes to itself); else 0.
    @ivar peer_read: in a private conversation, the other user's read
        position (read receipts).
    @ivar group_id: in a group conversation, the group.
    @ivar joined: in a group conversation, the seq at which the user joined
        (L{GroupInfo.joined_at}): its devices receive what follows.
    @ivar epoch_previous: the epoch C{epoch} follows, and
    @ivar epoch_base: the last seq they share (L{Epoch}; not compared:
        C{epoch} names the epoch), so that the conversation's whole
        L{current_epoch} comes with its state, in the same read.
    """

    conversation: str
    epoch: str
    last_seq: int
    read: int
    peer_id: int = 0
    peer_read: int = 0
    group_id: str = ""
    joined: int = 0
    epoch_previous: str = field(default="", compare=False)
    epoch_base: int = field(default=0, compare=False)

    @property
    def current_epoch(self) -> Epoch:
        """
        The conversation's current L{Epoch}, as L{IMessages.epochs} reads
        it (without one: its last seq as the base).
        """
        if not self.epoch:
            return Epoch(base=self.last_seq)
        return Epoch(self.epoch, self.epoch_previous, self.epoch_base)

    @property
    def unread(self) -> int:
        """
        How many messages came after the user's read position.  (Its own
        messages raise its read position: they are never unread.)
        """
        return max(0, self.last_seq - self.read)


class TokenLogin(NamedTuple):
    """
    A login with a token accepted, and what it reads
    (L{IStore.token_login}).

    @ivar session: the activated session (its device is the token's).
    @ivar states: the user's conversations, as L{IMessages.conversations}.
    @ivar cursors: the device's cursors, as L{IMessages.get_cursors}.
    """

    session: Session
    states: list[ConversationState]
    cursors: dict[str, Position]


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

    @classmethod
    def of_send(
        cls,
        conversation: str,
        sender_id: int,
        sender_name: str,
        texts: Sequence[str],
        client_msg_id: str,
        *,
        receive_user_id: int = 0,
        group_id: str = "",
    ) -> list[NewMessage]:
        """
        The messages of one send: one per text, the texts after the first
        with the client message ids of L{batch_client_msg_ids}.
        """
        ids = batch_client_msg_ids(client_msg_id, len(texts))
        return [
            cls(
                conversation,
                sender_id,
                sender_name,
                text,
                ids[i],
                receive_user_id,
                group_id,
            )
            for i, text in enumerate(texts)
        ]


class IReactor(IReactorCore, IReactorTime, IReactorTCP, IReactorThreads):
    """
    The reactor a daemon runs on, as its parts use it: life cycle, clock,
    TCP, and threads (for scrypt and ZooKeeper).  Only a tap's
    C{makeService} picks it (the global one); everything else is given it.
    """


class IAccounts(Interface):
    """
    Accounts: ids, names and credentials (a password, or an account key;
    and per device, a device key).

    Names are unique by their key (L{cim.names.name_key}: NFKC, case-folded,
    confusable skeleton), so C{"Zoe"}, C{" zoe"} and a Cyrillic look-alike
    are one account; the name given at creation is kept for display.
    Credentials are stored as hashes only: passwords as salted scrypt
    strings (L{cim.passwords}), account keys and device keys (random,
    high-entropy) as SHA-256.  Whether a caller may learn an existing account is the
    caller's decision: the store only creates, finds and checks.
    """

    def register(
        user_name: str, password: str | None = None, account_key: str | None = None
    ) -> Deferred[Account]:
        """
        Create the account C{user_name}, with C{password} if given, else
        with C{account_key} if given; or return the existing account of the
        same name key, unchanged, whatever the credentials given (check
        them with L{check_password} and L{check_account_key}).

        @return: fires with the L{Account}, whose C{created} says whether
            this call created it.  User ids are allocated atomically and
            never reused.
        """

    def get_account(user_id: int) -> Deferred[Account | None]:
        """
        @return: fires with the L{Account} or C{None}.
        """

    def get_account_by_name(user_name: str) -> Deferred[Account | None]:
        """
        @return: fires with the L{Account} whose name has the key of
            C{user_name}, or C{None}.
        """

    def check_password(user_id: int, password: str) -> Deferred[bool]:
        """
        @return: fires with C{True} when C{password} matches the account's
            (salted scrypt hash), C{False} otherwise or when it has none.
        """

    def check_account_key(user_id: int, account_key: str) -> Deferred[bool]:
        """
        @return: fires with C{True} when C{account_key} matches the
            account's (compared as SHA-256 digests, in constant time),
            C{False} otherwise or when it has none.
        """

    def set_device_key(
        user_id: int, device: str, device_key: str, ttl: float
    ) -> Deferred[None]:
        """
        Make C{device_key} the one device key of the user's C{device} (a
        credential that outlives the device's sessions), replacing any
        older one, for C{ttl} seconds.  Only its SHA-256 digest is stored.
        """

    def check_device_key(user_id: int, device: str, device_key: str) -> Deferred[bool]:
        """
        @return: fires with C{True} when C{device_key} is the current,
            unexpired device key of the user's C{device} (compared as
            SHA-256 digests, in constant time), C{False} otherwise (another
            device's or user's key, an old or expired one, none).
        """

    def drop_device_key(user_id: int, device: str) -> Deferred[None]:
        """
        Forget the device key of the user's C{device}, if any.
        """


class ISessions(Interface):
    """
    Each user's sessions, one per device, and their login tokens.
    """

    def claim_session(
        user_id: int,
        user_name: str,
        server: str,
        ttl: float,
        replace: bool = False,
        device: str = "",
        max_devices: int = ...,
    ) -> Deferred[tuple[Session, list[Session]]]:
        """
        Atomically give C{user_id}'s C{device} a new, not yet connected
        session on C{server}, which expires after C{ttl} seconds unless
        activated.

        Without C{replace}, fails with L{SessionExists} when the user holds
        any session (CIM's rule: a repeat login is refused).  With it, the
        device's own session is replaced; and when the user would then hold
        more than C{max_devices} (default L{cim.limits.MAX_DEVICES})
        sessions, its least recently active other sessions (by
        L{Session.active}, connected or not) are dropped, with their tokens.

        @return: fires with a tuple of the new L{Session} and the sessions
            it replaced or dropped (their connections are to be closed).
        """

    def open_session(
        user_id: int,
        user_name: str,
        server: str,
        claim_ttl: float,
        token_ttl: float,
        replace: bool = False,
        device: str = "",
        max_devices: int = ...,
        device_key: str | None = None,
        device_key_ttl: float = 0.0,
        used_device_key: str | None = None,
    ) -> Deferred[tuple[Session, list[Session], str]]:
        """
        A route's login in one round trip, atomically: L{claim_session}
        (C{claim_ttl}), then a token for the new session as
        L{issue_token} makes it (C{token_ttl}), and the device keys: the
        device's becomes C{device_key} (kept C{device_key_ttl} seconds) when
        given, else the C{used_device_key} is dropped; those of the other
        devices whose sessions the claim dropped are dropped.

        @param used_device_key: the device key the login presented (and
            L{check_device_key} accepted): the login goes on only while it
            is still the device's key, so that of two logins with one key,
            one gets in.
        @return: fires with the new L{Session}, the sessions it replaced or
            dropped, and the token; fails with L{SessionExists} as
            L{claim_session} does, or L{DeviceKeyUsed}, changing nothing.
        """

    def activate_session(
        user_id: int, session_id: str, ttl: float = ..., device: str = ""
    ) -> Deferred[bool]:
        """
        Mark the device's session connected (its server accepted the login)
        and active now: the user is listed online, and the session lives
        C{ttl} seconds (default L{cim.limits.SESSION_TTL}) unless its server
        renews it (L{renew_sessions}).

        @return: fires with C{True}, or C{False} when C{session_id} is no
            longer the device's session.
        """

    def renew_sessions(
        server: str, sessions: Sequence[HeldSession], ttl: float
    ) -> Deferred[Renewal]:
        """
        Give the connected sessions that C{server} holds C{ttl} more seconds
        to live, and record when each device was last active, in one round
        trip.  A session that expired meanwhile (the server could not renew
        it in time, the store lost it) is made again, connected: the server
        still holds it.  One that ended (released, or dropped by a newer
        claim), or whose device has another session, is lost; unless the
        store came back from a backup (or a restart) with that other
        session, and never ended the held one: the backup's is older, so
        it is ended and the held one is made again.

        @return: fires with the L{Renewal}: the sessions C{server} should
            close, and those it should catch up.
        """

    def get_session(user_id: int, device: str = "") -> Deferred[Session | None]:
        """
        @return: fires with the device's L{Session} or C{None}.
        """

    def user_sessions(user_id: int) -> Deferred[list[Session]]:
        """
        @return: fires with all the user's sessions (claimed or connected),
            ordered by device.
        """

    def get_sessions(user_ids: Sequence[int]) -> Deferred[dict[int, list[Session]]]:
        """
        @return: fires with a C{dict} mapping each of C{user_ids} that has
            connected sessions to them (ordered by device); a
            L{FoundSessions} tells their L{Generations} too.
        """

    def session_servers() -> Deferred[list[str]]:
        """
        @return: fires with the servers that may hold sessions (sorted):
            every server that any session held now names (a claimed one
            too), and perhaps some that hold none any more.  A server is
            listed from the claim of its first session on, so a delivery
            that asks after storing its messages reaches every device
            whose login reads the store after them.
        """

    def release_session(
        user_id: int, session_id: str, device: str = ""
    ) -> Deferred[bool]:
        """
        Delete the device's session and its tokens, only if it still is
        C{session_id} (compare-and-delete).

        @return: fires with C{True} when it was deleted.
        """

    def online_users() -> Deferred[list[tuple[int, str]]]:
        """
        @return: fires with a list of C{(user_id, user_name)} of the users
            with at least one connected session, ordered by user id.
        """

    def drop_server_sessions(server: str) -> Deferred[list[int]]:
        """
        Delete every session held by C{server} (it died).

        @return: fires with the sorted user ids that lost a session.
        """

    def issue_token(
        user_id: int, server: str, session_id: str, ttl: float, device: str = ""
    ) -> Deferred[str]:
        """
        @return: fires with a new unguessable token string bound to the
            user, device, server and session, valid for C{ttl} seconds.
        """

    def verify_token(token: str) -> Deferred[TokenInfo | None]:
        """
        @return: fires with the L{TokenInfo}, or C{None} when the token is
            unknown, expired, or its session was released or replaced.
        """

    def activate_token(
        token: str, user_id: int, server: str, ttl: float = ...
    ) -> Deferred[Session | str]:
        """
        An IM server's login with a token, in one round trip: check that
        C{token} is C{user_id}'s, for C{server}, and that its device's
        session still is the token's and belongs to C{server}; then mark
        that session connected, as L{activate_session} does (C{ttl}: default
        L{cim.limits.SESSION_TTL}).  All at once, so nothing can replace
        the session between the check and the activation.

        @return: fires with the activated L{Session} (its device is the
            token's), or with why the token is refused, checked in this
            order: L{TOKEN_UNKNOWN} (also when its session was released or
            replaced), L{TOKEN_OTHER_USER}, L{TOKEN_OTHER_SERVER},
            L{SESSION_OTHER_SERVER}.
        """


class IMessages(Interface):
    """
    Conversations (numbered messages) and each user's acknowledged cursors.
    """

    retention = Attribute(
        "The L{cim.store.Retention} limits of conversations, read at each "
        "append: a daemon may replace it with one built from its options "
        "before it appends."
    )

    feeds = Attribute(
        "Whether L{append} takes a C{feed}: the messages appended for a "
        "list of users are then published, in the order stored, to every "
        "server holding sessions (the group feed).  A store that does not "
        "feed may have no such attribute."
    )

    def append(
        messages: Sequence[NewMessage],
        feed: Sequence[Sequence[int] | None] | None = None,
    ) -> Deferred[list[ChatMessage]]:
        """
        Append each message to its conversation, in order.

        With a C{feed} (one entry per message: the users it is for, or
        C{None}) and when L{feeds}, the new messages with users are also
        published on the message bus to every server holding sessions, in
        the order stored, in one payload per server; a store that does not
        feed ignores it.

        Each sender may append at most C{retention.sender_quota} new
        messages to one conversation within any C{retention.max_age}
        seconds, counted in order in the same round trip; a retry of an
        appended message does not count.  A message past its sender's quota
        for its conversation is not appended (the others are).

        An appended message is tagged with its conversation's epoch
        (L{ChatMessage.epoch}), which starts here when the conversation has
        none or the store lost or replaced its messages since the last
        append (L{Epoch}).  It raises its sender's read position in the
        conversation to its seq (one's own messages are never unread); a
        message to a private conversation (L{cim.message.pair_conversation})
        lists it among both users' L{conversations}.

        @return: fires with a list of L{ChatMessage}, one per input: the
            stored message with its C{msg_id}, C{seq} and C{epoch}.  A
            message whose C{(sender_id, conversation, client_msg_id)} was
            appended before is not appended again; its original is
            returned.  (Never one of another conversation: a client that
            reuses an id for another conversation gets a new message, not
            another conversation's.)  Fails with
            L{QuotaExceeded} (giving the messages that were stored) when
            any was refused.  An L{Appended} list tells the L{Generations}
            of the users of its private conversations, read after storing
            them.
        """

    def read(
        conversation: str, after_seq: int, limit: int
    ) -> Deferred[list[ChatMessage]]:
        """
        @return: fires with up to C{limit} messages of C{conversation} with
            C{seq > after_seq}, in order.  Messages past the retention
            limits may be missing.
        """

    def read_before(
        conversation: str, before_seq: int, limit: int
    ) -> Deferred[list[ChatMessage]]:
        """
        @return: fires with the (up to) C{limit} latest messages of
            C{conversation} with C{seq < before_seq} (0: no bound), in
            order (paging back through history).
        """

    def last_seq(conversation: str) -> Deferred[int]:
        """
        @return: fires with the highest sequence number of C{conversation}
            (0 when empty).
        """

    def epochs(conversations: Sequence[str]) -> Deferred[dict[str, Epoch]]:
        """
        @return: fires with the current L{Epoch} of each conversation (an
            C{Epoch()} with C{base} its last seq when it has none), in one
            round trip.
        """

    def set_cursors(
        user_id: int, cursors: dict[str, Position], device: str = ""
    ) -> Deferred[None]:
        """
        Store the device's acknowledged position in each conversation: a
        position of the stored one's epoch raises it (never lowers it); one
        of another epoch replaces it.  A seq that is not an C{int} between
        1 and L{cim.limits.MAX_SEQ} is left out.  Callers store only
        positions in the user's own conversations, never beyond what the
        device was sent.

        @return: fires with C{None}.
        """

    def set_many_cursors(
        cursors: dict[tuple[int, str], dict[str, Position]],
    ) -> Deferred[None]:
        """
        L{set_cursors} for several devices at once (C{(user id, device)} to
        cursors), in one round trip.

        @return: fires with C{None}.
        """

    def get_cursors(user_id: int, device: str = "") -> Deferred[dict[str, Position]]:
        """
        @return: fires with a C{dict} of conversation to the device's
            acknowledged L{Position} (empty for a device never seen).  A
            stored value that is not such a position is left out (with a
            warning in the log), never a failure.
        """

    def set_read(user_id: int, conversation: str, seq: int) -> Deferred[int]:
        """
        Raise the user's read position in C{conversation} (of its current
        epoch) to C{seq}, at most its last seq; a lower one never lowers it.

        @return: fires with the user's read position after the call.
        """

    def read_positions(
        conversation: str, user_ids: Sequence[int]
    ) -> Deferred[dict[int, int]]:
        """
        @return: fires with each user's read position in C{conversation}
            (0 for none, or one of an epoch not trusted any more).
        """

    def conversations(user_id: int) -> Deferred[list[ConversationState]]:
        """
        @return: fires with where the user stands in each of its private
            conversations that holds messages and in each of its groups
            (L{ConversationState}), ordered by conversation id.
        """

    def login_reads(
        user_id: int, device: str = ""
    ) -> Deferred[tuple[list[ConversationState], dict[str, Position]]]:
        """
        What a device's login reads, at once: the user's conversations (as
        L{conversations}) and the device's cursors (as L{get_cursors}).

        @return: fires with both, in that order.
        """

    def forget_cursors(user_id: int, conversation: str) -> Deferred[None]:
        """
        Drop the acknowledged positions of all the user's devices in
        C{conversation} (it left the group: when it joins again, its
        devices start from its read position, set at the join).

        @return: fires with C{None}.
        """


#: Who may join a group: anyone (C{open}), the users its owner invited
#: (C{invite}, the default), or those whose request the owner approved
#: (C{approval}; an invitation counts as approval too).
GROUP_POLICIES = ("open", "invite", "approval")
DEFAULT_POLICY = "invite"
#: What history a member reads: from the seq at which it joined (C{join},
#: the default), or all that is kept (C{full}).
HISTORY_MODES = ("join", "full")
DEFAULT_HISTORY = "join"


class TooManyJoinRequests(Exception):
    """
    A group has as many pending join requests as it may hold.
    """


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """
    A group's settings, and where one user stands in it.

    A group stored before groups had owners has none: C{owner_id} is
    C{None}, its policy C{open}, its history C{join}, and its members from
    then have no join point (C{joined_at} 0: they read everything kept).

    @ivar owner_id: the owner (its creator, unless it handed the group
        over), or C{None}.
    @ivar policy: one of L{GROUP_POLICIES}.
    @ivar history: one of L{HISTORY_MODES}.
    @ivar members: how many members it has.
    @ivar member: whether the user asked about is a member.
    @ivar joined_at: the seq of the group's conversation when that member
        joined (0 for the creator and for members from before owners).
    @ivar invited: whether the user has an invitation not used yet.
    @ivar requested: whether the user's request to join is pending.
    """

    group_id: str
    owner_id: int | None
    policy: str
    history: str
    members: int
    member: bool = False
    joined_at: int = 0
    invited: bool = False
    requested: bool = False


class IGroups(Interface):
    """
    Groups, their owners and policies, and their members.

    The store keeps the facts (who is owner, member, invited or asking, and
    each member's join point) and changes them atomically; who may change
    them (the owner only, a policy's rules) is the route's business.
    """

    def create_group(
        group_id: str,
        owner_id: int,
        policy: str = DEFAULT_POLICY,
        history: str = DEFAULT_HISTORY,
    ) -> Deferred[None]:
        """
        Create group C{group_id} with C{owner_id} as its owner and first
        member (joined at 0).

        @param policy: one of L{GROUP_POLICIES}.
        @param history: one of L{HISTORY_MODES}.
        @return: fires with C{None}; fails with L{GroupExists}.
        """

    def group_info(group_id: str, user_id: int = 0) -> Deferred[GroupInfo]:
        """
        The group's settings and member count, and where C{user_id} stands.

        @return: fires with a L{GroupInfo}; fails with L{NoSuchGroup}.
        """

    def join_group(group_id: str, user_id: int, seq: int = 0) -> Deferred[bool]:
        """
        Make the user a member (whatever the group's policy: the caller
        checked it), joined at C{seq}, using up its invitation and its
        pending request.

        @param seq: the seq of the group's conversation from which the
            member reads (the route passes the last one at the join).
        @return: fires with C{True} if the user joined, C{False} if already a
            member (its join point unchanged); fails with L{NoSuchGroup}.
        """

    def leave_group(group_id: str, user_id: int) -> Deferred[bool]:
        """
        Remove the user from the members, with its join point.

        @return: fires with C{True} if the user left, C{False} if not a
            member; fails with L{NoSuchGroup}.
        """

    def group_members(group_id: str) -> Deferred[list[int]]:
        """
        @return: fires with the sorted list of member user ids; fails with
            L{NoSuchGroup}.
        """

    def user_groups(user_id: int) -> Deferred[list[str]]:
        """
        @return: fires with the sorted list of the user's group ids.
        """

    def invite_to_group(group_id: str, user_id: int) -> Deferred[bool]:
        """
        Record an invitation of C{user_id} (kept until it joins).

        @return: fires with C{True} if new, C{False} if already invited;
            fails with L{NoSuchGroup}.
        """

    def ask_to_join(group_id: str, user_id: int, limit: int) -> Deferred[bool]:
        """
        Record the user's request to join, after the pending ones.

        @param limit: how many requests the group may have pending.
        @return: fires with C{True} if new, C{False} if already pending;
            fails with L{NoSuchGroup}, or L{TooManyJoinRequests} when
            C{limit} requests are pending.
        """

    def join_requests(group_id: str) -> Deferred[list[int]]:
        """
        @return: fires with the user ids whose requests are pending, oldest
            first; fails with L{NoSuchGroup}.
        """

    def drop_join_request(group_id: str, user_id: int) -> Deferred[bool]:
        """
        Forget the user's pending request (refused).

        @return: fires with C{True} if there was one; fails with
            L{NoSuchGroup}.
        """

    def set_group_owner(group_id: str, owner_id: int) -> Deferred[None]:
        """
        Hand the group over to C{owner_id} (the caller checked it is a
        member).

        @return: fires with C{None}; fails with L{NoSuchGroup}.
        """


class IStore(IAccounts, ISessions, IMessages, IGroups):
    """
    The whole store: one backend that plays every role.

    Every method returns a L{Deferred}; any of them may fail with
    L{StoreError} when the backend is unreachable.
    """

    def close() -> Deferred[None]:
        """
        Let go of the backend (connections).
        """

    def token_login(
        token: str, user_id: int, server: str, ttl: float = ...
    ) -> Deferred[TokenLogin | str]:
        """
        An IM server's login with a token and its reads, in one round
        trip: L{ISessions.activate_token}, then, when it activated the
        session, L{IMessages.login_reads} of its device, as read right
        after the activation (a backend may read them at once with it).

        @return: fires with the L{TokenLogin}, or with why the token is
            refused (as L{ISessions.activate_token}).
        """


class IRegistry(Interface):
    """
    The live IM servers of a cluster.

    A server calls L{register}; routes (and servers) read L{servers} and
    L{watch} for changes.  Callbacks and Deferred results always arrive on
    the reactor thread.
    """

    def start() -> Deferred[None]:
        """
        Connect.  @return: a Deferred firing once the server list is known.
        """

    def stop() -> Deferred[None]:
        """
        Unregister (if registered) and disconnect.
        """

    def register(address: ServerAddress) -> Deferred[None]:
        """
        Announce C{address} (an ephemeral node) until L{unregister} or
        L{stop}, re-announcing it by itself after a session expiry.

        @return: a Deferred firing once it is announced.
        """

    def unregister() -> Deferred[None]:
        """
        Withdraw the announcement.
        """

    def servers() -> list[ServerAddress]:
        """
        @return: the cached, sorted list of live L{ServerAddress} (not a
            Deferred).
        """

    def watch(callback: Callable[[list[ServerAddress]], None]) -> Callable[[], None]:
        """
        Call C{callback} with the new list each time it changes.

        @return: a no-argument callable that stops watching.
        """

    connected = Attribute("True while the registry's backend is reachable.")


class ILocalDelivery(Interface):
    """
    The connections of the IM server this process runs, if any.
    """

    def deliver_local(
        messages: Sequence[ChatMessage], user_ids: Sequence[int]
    ) -> list[int]:
        """
        Write C{messages} to every device of each of C{user_ids} that is
        connected here.

        @return: the list of C{user_ids} with no device connected here.
        """

    def deliver_read_local(
        reader_id: int, conversation: str, seq: int, user_ids: Sequence[int]
    ) -> list[int]:
        """
        Tell every device of each of C{user_ids} that is connected here (a
        READ frame) that C{reader_id} read C{conversation} up to C{seq}.

        @return: the list of C{user_ids} with no device connected here.
        """


class IPusher(Interface):
    """
    Sends messages, and read positions, to the users of another IM server.
    """

    def push(
        server: str, messages: Sequence[ChatMessage], user_ids: Sequence[int]
    ) -> Deferred[list[int]]:
        """
        Ask C{server} to write C{messages} to every device of each of
        C{user_ids} connected there.

        @return: a Deferred firing with the list of C{user_ids} with no
            device connected there; fails when the server cannot be reached.
        """

    def push_read(
        server: str,
        reader_id: int,
        conversation: str,
        seq: int,
        user_ids: Sequence[int],
    ) -> Deferred[list[int]]:
        """
        Ask C{server} to tell every device of each of C{user_ids} connected
        there that C{reader_id} read C{conversation} up to C{seq}; in order
        with the pushes of messages to that server.

        @return: as L{push}.
        """


class BusError(Exception):
    """
    The bus could not take a publish (it is unreachable, or closed).
    """


class IBus(Interface):
    """
    A message bus between cim processes: every IM server subscribes to its
    own channel, and routes and servers publish pushes (opaque bytes) to
    it.  Delivery is at most once: what is published while a subscription
    is lost is lost (the subscriber is told when it is back, and resyncs
    from the store).  Payloads published by one process to one server
    arrive in the order they were published.
    """

    def publish(server: str, payload: bytes) -> Deferred[int]:
        """
        Send C{payload} to the subscribers of C{server}'s channel
        (C{server} is a L{ServerAddress} string).

        @return: fires with how many subscribers it reached (0: nobody holds
            that server's channel: the server is gone); fails with
            L{BusError} when the bus cannot be reached in time.
        """

    def subscribe(
        server: str,
        receive: Callable[[bytes], None],
        subscribed: Callable[[], None],
    ) -> Deferred[None]:
        """
        Call C{receive(payload)} with each payload published to C{server}'s
        channel, in the reactor thread, never from within L{publish}; call
        C{subscribed()} each time the subscription is made, the first time
        and after each loss (what was published meanwhile was lost).

        @return: fires once the first subscription is made; fails with
            L{BusError} when it could not be made in time.
        """

    def close() -> Deferred[None]:
        """
        Drop the subscriptions and the connections; later publishes fail.
        """


class IServerControl(IPusher):
    """
    What a route asks of IM servers besides pushes (their push API).
    """

    def kick(
        server: str,
        user_id: int,
        session_id: str,
        reason: str,
        logged_off: bool = False,
    ) -> Deferred[dict[str, Any]]:
        """
        Ask C{server} to close the connection of C{user_id}'s device whose
        session is C{session_id} (every device's when empty; C{logged_off}:
        because the user logged off).

        @return: fires with the server's reply envelope once it is done.
        """

    def resync(server: str, user_id: int) -> Deferred[dict[str, Any]]:
        """
        Ask C{server} to send every device of C{user_id} connected there the
        stored messages it has not got.

        @return: fires with the server's reply envelope.
        """
