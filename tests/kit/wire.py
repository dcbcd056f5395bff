"""
A client that speaks cim's wire protocol itself (varint-framed protobuf
frames over TCP, with L{cim.framing} and L{cim.codec}), for tests that
check what the server says frame by frame, or that misbehave on purpose.

It keeps every frame it receives, in order; a test waits for the frames
it expects (L{WireClient.wait}, L{WireClient.wait_frame}), which fire as
soon as such a frame arrives, and fail when the connection ends first or
the deadline passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.internet import endpoints
from twisted.internet.defer import Deferred, succeed

from cim.codec import decode, encode
from cim.framing import VarintFrameReceiver
from cim.message import ChatMessage, Command, Cursor, Frame
from tests.kit.wait import DEADLINE

T = TypeVar("T")


class WireClient(VarintFrameReceiver):
    """
    One TCP connection to an IM server.

    @ivar frames: the frames received, decoded, in arrival order.
    @ivar undecodable: how many frames could not be decoded.
    @ivar closed: fires (with C{None}) when the connection ends.
    @ivar closed_at: C{time.monotonic()} when it ended.
    """

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.frames: list[Frame] = []
        self.undecodable = 0
        self.closed: Deferred[None] = Deferred()
        self.closed_at: float | None = None
        self._waiters: list[tuple[Callable[[], Any], Deferred[Any], str]] = []

    # Receiving

    def frameReceived(self, data: bytes) -> None:
        try:
            self.frames.append(decode(data))
        except Exception:
            self.undecodable += 1
            return
        self._check()

    def connectionLost(self, reason: object = None) -> None:
        self.closed_at = time.monotonic()
        waiters, self._waiters = self._waiters, []
        for _, d, what in waiters:
            d.errback(AssertionError(f"connection closed while waiting for {what}"))
        if not self.closed.called:
            self.closed.callback(None)

    def _check(self) -> None:
        for waiter in list(self._waiters):
            find, d, _ = waiter
            found = find()
            if found:
                self._waiters.remove(waiter)
                d.callback(found)

    # Sending

    def send(self, frame: Frame) -> None:
        self.sendFrame(encode(frame))

    def send_login(
        self, user_id: int, name: str, token: str, cursors: Sequence[Cursor] = ()
    ) -> None:
        """
        Send a C{LOGIN_REQUEST} with C{token} (from the route's C{/login}).
        """
        self.send(
            Frame(
                cmd=Command.LOGIN_REQUEST,
                request_id=user_id,
                req_msg=name,
                token=token,
                cursors=tuple(cursors),
            )
        )

    # Waiting

    def wait(
        self, find: Callable[[], T | None], what: str, deadline: float = DEADLINE
    ) -> Deferred[T]:
        """
        @return: a Deferred firing with C{find()} once that is true (checked
            now and after each frame), failing with C{AssertionError} when
            the connection ends first, or with C{TimeoutError} after
            C{deadline} seconds.
        """
        found = find()
        if found:
            return succeed(found)
        d: Deferred[T] = Deferred()
        if self.closed.called:
            d.errback(AssertionError(f"connection closed while waiting for {what}"))
            return d
        waiter = (find, d, what)
        self._waiters.append(waiter)

        def forget(result: object) -> object:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            return result

        return d.addTimeout(deadline, self.reactor).addBoth(forget)

    def find(self, cmd: Command) -> Frame | None:
        """
        The first frame received of kind C{cmd}, if any.
        """
        return next((f for f in self.frames if f.cmd == cmd), None)

    def wait_frame(self, cmd: Command, deadline: float = DEADLINE) -> Deferred[Frame]:
        """
        The first frame of kind C{cmd} (see L{wait}).
        """
        return self.wait(lambda: self.find(cmd), f"a {cmd.name} frame", deadline)

    def messages(self) -> list[ChatMessage]:
        """
        The chat messages received (live and offline), in arrival order.
        """
        return [
            m
            for f in self.frames
            if f.cmd in (Command.MESSAGE, Command.OFFLINE)
            for m in f.messages
        ]

    def wait_texts(
        self, texts: Sequence[str], deadline: float = DEADLINE
    ) -> Deferred[list[ChatMessage]]:
        """
        Wait until the last messages received have C{texts}.
        """

        def find() -> list[ChatMessage] | None:
            got = self.messages()[-len(texts) :]
            return got if [m.text for m in got] == list(texts) else None

        return self.wait(find, f"messages {list(texts)}", deadline)

    def epochs(self) -> dict[str, str]:
        """
        The epoch of each conversation, as the server last announced it
        (C{LOGIN_RESPONSE} and C{EPOCH} frames).
        """
        announced: dict[str, str] = {}
        for f in self.frames:
            if f.cmd in (Command.LOGIN_RESPONSE, Command.EPOCH):
                for cursor in f.cursors:
                    announced[cursor.conversation] = cursor.epoch
        return announced

    def cursors(self) -> list[Cursor]:
        """
        The highest seq received per conversation, in the epoch the server
        announced (what a client resumes from); a conversation it did not
        announce is in the epoch of its first message, as every client
        takes it.
        """
        highest: dict[str, int] = {}
        first: dict[str, str] = {}
        for m in self.messages():
            highest[m.conversation] = max(highest.get(m.conversation, 0), m.seq)
            first.setdefault(m.conversation, m.epoch)
        epochs = {**first, **self.epochs()}
        return [Cursor(c, s, epochs[c]) for c, s in highest.items()]

    # Closing

    def hang_up(self) -> Deferred[None]:
        """
        Close the connection cleanly; @return: L{closed}.
        """
        if not self.closed.called and self.transport is not None:
            self.transport.loseConnection()
        return self.closed

    def abort(self) -> None:
        """
        Drop the connection at once.
        """
        if self.transport is not None and not self.closed.called:
            self.transport.abortConnection()


async def connect(
    reactor: Any, port: int, host: str = "127.0.0.1", timeout: float = 10.0
) -> WireClient:
    """
    A L{WireClient} connected to C{host:port}.
    """
    client = WireClient(reactor)
    endpoint = endpoints.TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    await endpoints.connectProtocol(endpoint, client)
    return client
