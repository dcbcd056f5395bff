"""
Helpers to drive an L{IMServer} in memory: a fake pusher, connections over
L{StringTransport}, and frame parsing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.interface import Method

from cim.codec import decode, encode_framed
from cim.delivery import IPusher
from cim.interfaces import IStore, ServerAddress
from cim.message import ChatMessage, Command, Cursor, Frame
from cim.pushapi import ReadEvent
from cim.server.core import IMServer
from cim.server.protocol import ClientConnectionProtocol
from cim.store.memory import MemoryStore

#: The names of the store's methods (L{IStore} and what it extends).
STORE_METHODS = frozenset(
    name for name in IStore.names(all=True) if isinstance(IStore[name], Method)
)


class CountingStore(MemoryStore):
    """
    A memory store that records each call of a store method (L{IStore}'s),
    with its arguments, while L{counting}.
    """

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.counting = False
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def count(self) -> None:
        """
        Record the calls from now on (and forget those recorded).
        """
        self.calls = []
        self.counting = True

    def names(self) -> list[str]:
        """
        The names of the methods called, in order.
        """
        return [name for name, _ in self.calls]

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if name not in STORE_METHODS or not super().__getattribute__("counting"):
            return value
        calls = super().__getattribute__("calls")

        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append((name, args))
            return value(*args, **kwargs)

        return call


HERE = ServerAddress("127.0.0.1", 11211, 8081)
THERE = ServerAddress("127.0.0.2", 11211, 8081)


@implementer(IPusher)
class RecordingPusher:
    """
    Records pushes of messages and of read positions; answers that every
    user is connected there.
    """

    def __init__(self) -> None:
        self.pushes: list[tuple[str, list[ChatMessage], list[int]]] = []
        self.reads: list[tuple[str, ReadEvent, list[int]]] = []

    def push(
        self, server: str, messages: Sequence[ChatMessage], user_ids: Sequence[int]
    ) -> Deferred[list[int]]:
        self.pushes.append((server, list(messages), list(user_ids)))
        return succeed([])

    def push_read(
        self,
        server: str,
        reader_id: int,
        conversation: str,
        seq: int,
        user_ids: Sequence[int],
    ) -> Deferred[list[int]]:
        event = ReadEvent(reader_id, conversation, seq)
        self.reads.append((server, event, list(user_ids)))
        return succeed([])


class Peer:
    """
    One client connection to the server under test.
    """

    def __init__(
        self,
        server: IMServer,
        max_frame: int = 64 * 1024,
        max_output: int = 4 * 1024 * 1024,
    ) -> None:
        self.protocol = ClientConnectionProtocol(server, max_frame, max_output)
        self.transport = StringTransport(
            peerAddress=IPv4Address("TCP", "10.1.1.1", 5000)
        )
        self.protocol.makeConnection(self.transport)
        self.backlog: list[Frame] = []
        #: The LOGIN_RESPONSE of L{World.login}.
        self.login: Frame | None = None

    def send(self, frame: Frame) -> None:
        self.protocol.dataReceived(encode_framed(frame))

    def received(self) -> list[Frame]:
        """
        The frames written to this connection since the last call.
        """
        data = self.transport.value()
        self.transport.clear()
        frames, self.backlog = self.backlog, []
        offset = 0
        while offset < len(data):
            length = 0
            shift = 0
            while True:
                byte = data[offset]
                offset += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            frames.append(decode(data[offset : offset + length]))
            offset += length
        return frames

    def messages(self) -> list[ChatMessage]:
        """
        The chat messages received since the last call, from every frame.
        """
        return [m for f in self.received() for m in f.messages]

    def texts(self) -> list[str]:
        """
        The texts of the chat messages received since the last call.
        """
        return [m.text for m in self.messages()]

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def lose(self, clean: bool = False) -> None:
        """
        The connection is gone: closed in good order by the client when
        C{clean}, else lost (reset, timed out).
        """
        reason = ConnectionDone() if clean else ConnectionLost()
        self.protocol.connectionLost(Failure(reason))


class World:
    """
    A server, its store and clock, and helpers to log users in.
    """

    def __init__(
        self,
        legacy_login: bool = False,
        store: MemoryStore | None = None,
        store_class: type[MemoryStore] = MemoryStore,
        **options: Any,
    ) -> None:
        """
        @param store_class: the store made on the world's clock, unless
            C{store} is given.
        @param options: more of L{IMServer}'s options.
        """
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = store or store_class(self.clock)
        self.pusher = RecordingPusher()
        self.server = IMServer(
            self.clock,
            self.store,
            HERE,
            self.pusher,
            legacy_login=legacy_login,
            **options,
        )
        self.server.start()

    def result(self, d: Deferred) -> object:
        """
        The result of an already fired Deferred.
        """
        results: list[object] = []
        d.addBoth(results.append)
        assert results, "the Deferred has not fired"
        return results[0]

    def account(self, name: str) -> int:
        return self.result(self.store.register(name)).user_id  # type: ignore[attr-defined]

    def token(
        self,
        user_id: int,
        name: str,
        server: ServerAddress = HERE,
        device: str = "",
    ) -> str:
        session, _ = self.result(  # type: ignore[misc]
            self.store.claim_session(
                user_id, name, str(server), 60.0, replace=True, device=device
            )
        )
        return self.result(  # type: ignore[return-value]
            self.store.issue_token(
                user_id, str(server), session.session_id, 3600.0, device=device
            )
        )

    def user(self, name: str) -> int:
        """
        The id of account C{name}, registered if need be.
        """
        existing = self.result(self.store.get_account_by_name(name))
        return existing.user_id if existing else self.account(name)  # type: ignore[attr-defined]

    def login(
        self,
        name: str,
        cursors: Sequence[Cursor] = (),
        user_id: int | None = None,
        device: str = "",
    ) -> tuple[Peer, int]:
        if user_id is None:
            user_id = self.user(name)
        peer = Peer(self.server)
        peer.send(
            Frame(
                cmd=Command.LOGIN_REQUEST,
                request_id=user_id,
                req_msg=name,
                token=self.token(user_id, name, device=device),
                cursors=tuple(cursors),
            )
        )
        frames = peer.received()
        assert frames and frames[0].cmd == Command.LOGIN_RESPONSE, frames
        peer.login = frames[0]
        peer.backlog = frames[1:]
        return peer, user_id

    def legacy_login(self, name: str) -> tuple[Peer, int]:
        """
        Log C{name} in as a CIM client (no token), on a session the route
        assigned here (the server must accept legacy logins).
        """
        user_id = self.user(name)
        self.token(user_id, name)
        peer = Peer(self.server)
        peer.send(Frame(cmd=Command.LOGIN_REQUEST, request_id=user_id, req_msg=name))
        return peer, user_id

    def send(
        self, peer: Peer, text: str, receiver: int = 0, group: str = "", cmid: str = ""
    ) -> None:
        """
        C{peer} sends C{text} to user C{receiver} or to C{group}.
        """
        peer.send(
            Frame(
                cmd=Command.MESSAGE,
                req_msg=text,
                receive_user_id=receiver,
                group_id=group,
                client_msg_id=cmid,
            )
        )
