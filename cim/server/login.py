"""
L{Authenticator}: whether a login frame may bind its user to a connection.

It checks the frame against the store (the token, or for a CIM client the
session the route assigned to this server) and answers with a value: a
L{Grant} naming the user, its session and where its conversations stand,
or a L{Refusal} with the error code and reason to tell the client.  It
changes nothing but the session's state in the store
(L{IStore.activate_session} on success); applying the answer to the
connection is the server's job (L{cim.server.core.IMServer}).

A store failure is not a refusal: it fails the coroutine, and the server
answers with an internal error (a session activated before the failure is
released first).
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.logger import Logger

from cim.interfaces import IStore
from cim.limits import SESSION_TTL
from cim.message import ErrorCode, Frame, group_conversation, inbox


@dataclass(frozen=True, slots=True)
class Grant:
    """
    A login accepted.

    @ivar session_id: the session that the connection now holds.
    @ivar legacy: a CIM client (it sent no token).
    @ivar cursors: the user's stored (acknowledged) cursors, by
        conversation.
    @ivar groups: the groups the user is a member of.
    """

    user_id: int
    user_name: str
    session_id: str
    legacy: bool
    cursors: dict[str, int]
    groups: list[str]

    @property
    def conversations(self) -> list[str]:
        """
        The conversations the user receives: its inbox, then its groups.
        """
        return [inbox(self.user_id)] + [group_conversation(g) for g in self.groups]


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

    async def _release_quietly(self, user_id: int, session_id: str) -> None:
        try:
            await self.store.release_session(user_id, session_id)
        except Exception:
            self.log.failure(
                "Releasing the session of {user_id} after a failed login failed",
                user_id=user_id,
            )

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
        legacy = self.is_legacy(frame)
        if frame.token:
            info = await self.store.verify_token(frame.token)
            if info is None:
                return Refusal(ErrorCode.BAD_TOKEN, "invalid or expired token")
            if info.user_id != user_id:
                return Refusal(ErrorCode.BAD_TOKEN, "the token is for another user")
            if info.server != self.here:
                return Refusal(ErrorCode.BAD_TOKEN, "the token is for another server")
            session_id = info.session_id
        elif self.legacy_login:
            session_id = ""
        else:
            return Refusal(ErrorCode.BAD_TOKEN, "a login token is required")
        session = await self.store.get_session(user_id)
        if session is None or (not legacy and session.session_id != session_id):
            return Refusal(
                ErrorCode.BAD_TOKEN, "no such session: log in through the route"
            )
        if session.server != self.here:
            return Refusal(ErrorCode.BAD_TOKEN, "the session belongs to another server")
        if legacy and session.user_name != frame.req_msg:
            return Refusal(ErrorCode.BAD_TOKEN, "userName does not match the session")
        if not await self.store.activate_session(
            user_id, session.session_id, self.session_ttl
        ):
            return Refusal(ErrorCode.BAD_TOKEN, "the session was replaced or expired")
        try:
            # Both reads at once.
            reading_cursors = self.store.get_cursors(user_id)
            reading_groups = self.store.user_groups(user_id)
            try:
                cursors = await reading_cursors
            finally:
                groups = await reading_groups
        except BaseException:
            # The session is active but nobody will hold it: release it, so
            # that the user is not listed online and can log in again.
            await self._release_quietly(user_id, session.session_id)
            raise
        return Grant(
            user_id=user_id,
            user_name=session.user_name,
            session_id=session.session_id,
            legacy=legacy,
            cursors=cursors,
            groups=groups,
        )
