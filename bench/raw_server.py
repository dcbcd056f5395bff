"""
The benchmark's baseline: a minimal Twisted server that only forwards
frames, to measure what the reactor, the varint framing and the codec can
do on this machine without any of cim's work (no store, no registry, no
sequence numbers, no pushes between servers).

It speaks just enough of cim's protocol for L{bench.loadgen} to drive it
unchanged: a client logs in with C{LOGIN_REQUEST} (C{requestId} = its id)
and gets C{LOGIN_RESPONSE}; each C{MESSAGE} it sends names a receiver in
C{receiveUserId} and is written as it came (the same bytes, re-framed) to
that receiver's connection and back to the sender's (its echo: cim writes
every private message to the sending device too), and acknowledged to the
sender with an C{ACK} carrying its C{clientMsgId}; C{PING} gets a pong.

    python -m bench.raw_server --port 12345 [--bind 127.0.0.1]   (0: any free port)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.codec import CodecError, decode, encode_framed, encode_varint
from cim.framing import VarintFrameReceiver
from cim.message import Command, ErrorCode, Frame

_PONG = encode_framed(Frame(cmd=Command.PING, req_msg="pong"))


class RawHub:
    """
    The logged-in connections, by user id.
    """

    def __init__(self) -> None:
        self.users: dict[int, RawConnection] = {}
        self.forwarded = 0
        self.unknown_receiver = 0


class RawConnection(VarintFrameReceiver):
    """
    One client: logs in, then every frame it sends is forwarded.
    """

    log = Logger()
    user_id = 0

    def __init__(self, hub: RawHub) -> None:
        super().__init__()
        self.hub = hub

    def connectionMade(self) -> None:
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:  # not TCP (tests)
            pass

    def frameReceived(self, frame: bytes) -> None:
        try:
            decoded = decode(frame)
        except CodecError as e:
            self._error(ErrorCode.MALFORMED_FRAME, str(e))
            return
        cmd = decoded.cmd
        if cmd == Command.MESSAGE and self.user_id:
            receiver = self.hub.users.get(decoded.receive_user_id)
            if receiver is None:
                self.hub.unknown_receiver += 1
                self._error(
                    ErrorCode.INVALID_ARGUMENT,
                    f"no user {decoded.receive_user_id}",
                    decoded.client_msg_id,
                )
                return
            framed = encode_varint(len(frame)) + frame
            receiver.transport.write(framed)
            self.hub.forwarded += 1
            if receiver is not self:
                # The sender's own echo, as cim's servers write every
                # private message to the sending device too.
                self.transport.write(framed)
                self.hub.forwarded += 1
            self.transport.write(
                encode_framed(
                    Frame(cmd=Command.ACK, client_msg_id=decoded.client_msg_id)
                )
            )
        elif cmd == Command.PING:
            self.transport.write(_PONG)
        elif cmd == Command.LOGIN_REQUEST and not self.user_id:
            if decoded.request_id <= 0:
                self._error(
                    ErrorCode.INVALID_ARGUMENT, "login needs requestId = userId"
                )
                return
            self.user_id = decoded.request_id
            old = self.hub.users.get(self.user_id)
            if old is not None:
                old.transport.loseConnection()
            self.hub.users[self.user_id] = self
            self.transport.write(
                encode_framed(
                    Frame(
                        cmd=Command.LOGIN_RESPONSE,
                        request_id=self.user_id,
                        req_msg=decoded.req_msg,
                    )
                )
            )
        elif not self.user_id:
            self._error(ErrorCode.NOT_LOGGED_IN, "log in first")
        # Anything else (cumulative ACKs, ...) is ignored.

    def _error(self, code: ErrorCode, reason: str, client_msg_id: str = "") -> None:
        self.transport.write(
            encode_framed(
                Frame(
                    cmd=Command.ERROR,
                    error_code=int(code),
                    error_reason=reason,
                    client_msg_id=client_msg_id,
                )
            )
        )

    def connectionLost(self, reason: object = None) -> None:
        if self.user_id and self.hub.users.get(self.user_id) is self:
            del self.hub.users[self.user_id]


class RawFactory(Factory):
    noisy = False

    def __init__(self, hub: RawHub | None = None) -> None:
        self.hub = hub or RawHub()

    def buildProtocol(self, addr: object) -> RawConnection:
        return RawConnection(self.hub)


def main(argv: list[str] | None = None) -> None:
    from twisted.internet import endpoints, reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from bench.loadgen import raise_fd_limit

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind", default="127.0.0.1")
    args = parser.parse_args(argv)
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(sys.stderr)], redirectStandardIO=False
    )
    raise_fd_limit()
    endpoint = endpoints.TCP4ServerEndpoint(
        reactor, args.port, backlog=4096, interface=args.bind
    )

    def failed(failure: Failure) -> None:
        failure.printTraceback()
        reactor.stop()  # type: ignore[attr-defined]

    def listening(port: Any) -> None:
        address = port.getHost()
        # The harness reads the port from this line (it may have asked for 0).
        Logger().info(
            "raw server listening on {host}:{port}",
            host=address.host,
            port=address.port,
        )

    endpoint.listen(RawFactory()).addCallbacks(listening, failed)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
