"""
L{Authenticator}: whether a login frame may bind its user to a connection.

It checks the frame against the store (the token, which names the
device, or for a CIM client the session the route assigned to this server;
a token is checked, its session activated and the login's reads read in
one store call, L{IStore.token_login})
and answers with a value: a L{Grant} naming the user, its device and its
session, or a L{Refusal} with the error code and reason to tell the client.
It changes nothing but the session's state in the store
(L{IStore.activate_session} on success); applying the answer to the
connection is the server's job (L{cim.server.core.IMServer}), which then
finds where the device starts each conversation (L{resume_from} what the
token's login read, or L{resume} from the store).

A store failure is not a refusal: it fails the coroutine, and the server
answers with an internal error (a session activated before the failure is
released first: L{Authenticator.release_quietly}).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from twisted.logger import Logger

from cim.interfaces import (
    SESSION_OTHER_SERVER,
    TOKEN_OTHER_SERVER,
    TOKEN_OTHER_USER,
    TOKEN_UNKNOWN,
    ConversationState,
    Epoch,
    IStore,
    TokenLogin,
)
from cim.limits import SESSION_TTL
from cim.message import Cursor, ErrorCode, Frame, Position


@dataclass(frozen=True, slots=True)
class Grant:
    """
    A login accepted.

    @ivar session_id: the session that the connection now holds.
    @ivar legacy: a CIM client (it sent no token).
    @ivar device: the device the session is of (the token's; C{""} for a
        CIM client).
    @ivar reads: what the store read with the activation of a token
        (L{IStore.token_login}): where the login resumes from, unless
        something changed meanwhile (L{cim.server.core.IMServer} says
        what); C{None} for a CIM client.
    """

    user_id: int
    user_name: str
    session_id: str
    legacy: bool
    device: str = ""
    reads: TokenLogin | None = None


@dataclass(frozen=True, slots=True)
class Start:
    """
    Where a connection starts one of its conversations.

    @ivar epoch: the conversation's current L{Epoch}.
    @ivar seq: the seq after which it is sent messages.
    @ivar reset: the position it resumed from was of an epoch that the
        store does not trust (the client must be told).
    @ivar last_seq: the conversation's last seq when it was read (nothing
        to replay when not above C{seq}).
    """

    conversation: str
    epoch: Epoch
    seq: int
    reset: bool = False
    last_seq: int = 0

    @property
    def cursor(self) -> Cursor:
        """
        The start as the server tells the client.
        """
        return Cursor(self.conversation, self.seq, self.epoch.id, self.reset)


@dataclass(frozen=True, slots=True)
class Resumption:
    """
    Where a device resumes each of its user's conversations.

    @ivar starts: one L{Start} per conversation the connection receives
        (the user's private conversations that hold messages, and its
        groups), ordered by conversation.
    @ivar acked: the device's stored (acknowledged) cursors, all of them,
        as the store read them (the connection keeps this C{dict}:
        L{cim.server.connection.Connection.acked}).
    """

    starts: list[Start] = field(default_factory=list)
    acked: dict[str, Position] = field(default_factory=dict)


async def resume(
    store: IStore, user_id: int, device: str, sent: Sequence[Cursor] = ()
) -> Resumption:
    """
    Where C{user_id}'s C{device} resumes each of its conversations: after
    the position the client C{sent} at login, else the device's stored
    cursor, else from the start (of a group: from where the user joined
    it); each through the conversation's current epoch (L{Epoch.resume}),
    never past its last seq (a position beyond it is not trusted), and
    never before the user joined a group.

    Not from the user's read position: a device must show the whole
    conversation, also what the user read elsewhere, and its own messages
    (sending raises the read position) that it has not received yet.

    Reads the conversations (each with its current L{Epoch}:
    L{ConversationState.current_epoch}) and the device's cursors in one
    store call (L{IStore.login_reads}), whatever epoch the positions name.
    """
    states, stored = await store.login_reads(user_id, device)
    return resume_from(states, stored, sent)


def resume_from(
    states: Sequence[ConversationState],
    stored: dict[str, Position],
    sent: Sequence[Cursor] = (),
) -> Resumption:
    """
    As L{resume}, from what L{IStore.login_reads} read: the user's
    conversations (C{states}) and the device's C{stored} cursors.
    """
    if not states:
        return Resumption(acked=stored)
    client = {c.conversation: Position(c.epoch, c.seq) for c in sent}
    starts = []
    for state in states:
        conversation = state.conversation
        position = client.get(conversation) or stored.get(conversation)
        epoch = state.current_epoch
        # A device without a position gets everything kept, of a group
        # from where the user joined it.
        floor = min(state.joined, state.last_seq) if state.group_id else 0
        seq, reset = epoch.resume(position or Position(epoch.id, floor))
        if seq > state.last_seq:
            seq, reset = state.last_seq, True
        seq = max(seq, floor)
        starts.append(Start(conversation, epoch, seq, reset, state.last_seq))
    return Resumption(starts, stored)


#: What a client is told for each refusal of L{IStore.activate_token}.
_TOKEN_REFUSALS = {
    TOKEN_UNKNOWN: "invalid or expired token",
    TOKEN_OTHER_USER: "the token is for another user",
    TOKEN_OTHER_SERVER: "the token is for another server",
    SESSION_OTHER_SERVER: "the session belongs to another server",
}


@dataclass(frozen=True, slots=True)
class Refusal:
    """
    A login refused, with what to tell the client.
    """

    code: ErrorCode
    reason: str


class Authenticator:
    """
    Checks the logins of one IM server.

    @param here: this server's L{cim.interfaces.ServerAddress} string;
        tokens and sessions must name it.
    @param legacy_login: accept CIM clients that send no token, for users
        whose session the route assigned to this server.
    @param session_ttl: how long an activated session lives unless the
        server renews it.
    """

    log = Logger()

    def __init__(
        self,
        store: IStore,
        here: str,
        legacy_login: bool,
        session_ttl: float = SESSION_TTL,
    ) -> None:
        self.store = store
        self.here = here
        self.legacy_login = legacy_login
        self.session_ttl = session_ttl

    def is_legacy(self, frame: Frame) -> bool:
        """
        Whether the login C{frame} comes from a CIM client: where those are
        accepted, a login without a token is one.
        """
        return self.legacy_login and not frame.token

    def check(self, frame: Frame) -> Refusal | None:
        """
        What is wrong with the login C{frame} itself, before any store is
        asked, or C{None}.
        """
        if frame.request_id <= 0:
            return Refusal(ErrorCode.INVALID_ARGUMENT, "login needs requestId = userId")
        return None

    async def authenticate(self, frame: Frame) -> Grant | Refusal:
        """
        Check the login C{frame} and, when it is accepted, mark its session
        connected.
        """
        refusal = self.check(frame)
        if refusal is not None:
            return refusal
        user_id = frame.request_id
        if frame.token:
            return await self._with_token(frame.token, user_id)
        if not self.legacy_login:
            return Refusal(ErrorCode.BAD_TOKEN, "a login token is required")
        # A CIM client: the session the route claimed for it, of device "".
        session = await self.store.get_session(user_id, "")
        if session is None:
            return Refusal(
                ErrorCode.BAD_TOKEN, "no such session: log in through the route"
            )
        if session.server != self.here:
            return Refusal(ErrorCode.BAD_TOKEN, "the session belongs to another server")
        if session.user_name != frame.req_msg:
            return Refusal(ErrorCode.BAD_TOKEN, "userName does not match the session")
        if not await self.store.activate_session(
            user_id, session.session_id, self.session_ttl, ""
        ):
            return Refusal(ErrorCode.BAD_TOKEN, "the session was replaced or expired")
        return Grant(user_id, session.user_name, session.session_id, True, "")

    async def _with_token(self, token: str, user_id: int) -> Grant | Refusal:
        """
        A login with a token: checked, activated and its reads read in one
        store call (L{IStore.token_login}).
        """
        found = await self.store.token_login(
            token, user_id, self.here, self.session_ttl
        )
        if isinstance(found, str):
            return Refusal(ErrorCode.BAD_TOKEN, _TOKEN_REFUSALS[found])
        session = found.session
        return Grant(
            user_id=user_id,
            user_name=session.user_name,
            session_id=session.session_id,
            legacy=False,
            device=session.device,
            reads=found,
        )

    async def release_quietly(self, grant: Grant) -> None:
        """
        Release C{grant}'s session (its login failed after it was
        activated), logging a failure to do so.
        """
        try:
            await self.store.release_session(
                grant.user_id, grant.session_id, grant.device
            )
        except Exception:
            self.log.failure(
                "Releasing the session of {user_id} after a failed login failed",
                user_id=grant.user_id,
            )
