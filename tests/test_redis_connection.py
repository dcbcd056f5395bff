"""
The Redis store's connections (L{cim.store.redis.connection}): commands
answered straight from the connection's replies, in order.
"""

from __future__ import annotations

from typing import Any

import pytest
import txredisapi
from twisted.internet.testing import StringTransport

from cim.store.redis.connection import _protocol_with_fast_commands


def _connected() -> tuple[Any, StringTransport]:
    protocol = _protocol_with_fast_commands(txredisapi.RedisProtocol)(
        charset="utf-8", convertNumbers=False
    )
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def _results(d: Any) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_replies_fire_their_commands_in_order() -> None:
    protocol, transport = _connected()
    first = _results(protocol.execute_command("GET", "a"))
    second = _results(protocol.execute_command("EVALSHA", "x", 0))
    third = _results(protocol.execute_command("GET", "b"))
    assert transport.value() == (
        b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n"
        b"*3\r\n$7\r\nEVALSHA\r\n$1\r\nx\r\n$1\r\n0\r\n"
        b"*2\r\n$3\r\nGET\r\n$1\r\nb\r\n"
    )
    protocol.dataReceived(b"$1\r\n1\r\n-NOSCRIPT No matching script\r\n$-1\r\n")
    assert first == ["1"]
    [failure] = second
    assert failure.check(txredisapi.ResponseError)
    assert str(failure.value).startswith("NOSCRIPT")
    assert third == [None]


def test_a_cancelled_command_drops_its_reply_only() -> None:
    """
    A command given up on (the store's time-out cancels it) takes its own
    reply when it comes, not the next command's.
    """
    protocol, _ = _connected()
    late = protocol.execute_command("GET", "a")
    late.addErrback(lambda f: None)
    late.cancel()
    after = _results(protocol.execute_command("GET", "b"))
    protocol.dataReceived(b"$1\r\n1\r\n$1\r\n2\r\n")
    assert after == ["2"]


def test_txredisapis_own_commands_keep_their_turn() -> None:
    """
    Commands sent the way txredisapi sends them (here with a keyword
    argument) wait in the same queue, in order with the others.
    """
    protocol, _ = _connected()
    first = _results(protocol.execute_command("GET", "a"))
    own = _results(protocol.execute_command("GET", "b", apply_timeout=False))
    last = _results(protocol.execute_command("GET", "c"))
    protocol.dataReceived(b"$1\r\n1\r\n-ERR wrong\r\n$1\r\n3\r\n")
    assert first == ["1"]
    assert own[0].check(txredisapi.ResponseError)
    assert last == ["3"]


def test_a_lost_connection_fails_what_waits_and_refuses_more() -> None:
    protocol, transport = _connected()
    waiting = _results(protocol.execute_command("GET", "a"))
    transport.loseConnection()
    protocol.connectionLost(None)
    assert waiting[0].check(txredisapi.ConnectionError)
    with pytest.raises(txredisapi.ConnectionError):
        protocol.execute_command("GET", "b")


def test_the_pool_runs_commands_on_a_connected_connection() -> None:
    """
    The pool hands a command straight to a connected connection; with
    none connected, to txredisapi's handler (which waits for one); a
    command that fails at once gives a failed Deferred.
    """
    from twisted.internet import defer

    from cim.store.redis.connection import _call_connections_directly

    class Queue:
        pending: list[Any] = []

    class Factory:
        connectionQueue = Queue()

    class Handler:
        _factory = Factory()

        def __init__(self) -> None:
            self.calls: list[tuple[Any, ...]] = []

        def execute_command(self, *args: Any) -> defer.Deferred[str]:
            self.calls.append(args)
            return defer.succeed("handler")

        def execute_with_run_id(self, make: Any) -> defer.Deferred[str]:
            self.calls.append(make("r"))
            return defer.succeed("handler")

    class Connection:
        connected = 1

        def execute_command(self, *args: Any) -> defer.Deferred[str]:
            if args[0] == "BAD":
                raise txredisapi.ConnectionError("Not connected")
            return defer.succeed("direct")

        def execute_with_run_id(self, make: Any) -> defer.Deferred[str]:
            return self.execute_command(*make("r"))

    pool = Handler()
    _call_connections_directly(pool)
    assert _results(pool.execute_command("GET", "a")) == ["handler"]
    pending = Factory.connectionQueue.pending
    pending.append(Connection())
    assert _results(pool.execute_command("GET", "a")) == ["direct"]
    assert _results(pool.execute_with_run_id(lambda run: ("GET", run))) == ["direct"]
    [failure] = _results(pool.execute_command("BAD"))
    assert failure.check(txredisapi.ConnectionError)
    pending[0].connected = 0
    assert _results(pool.execute_command("GET", "b")) == ["handler"]
    assert pool.calls == [("GET", "a"), ("GET", "b")]
