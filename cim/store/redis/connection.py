"""
The Redis store's edge: the only module that imports txredisapi, which
imports the global reactor.

L{open_pool} makes the pool of connections L{cim.store.redis.store.RedisStore}
talks through, with a faster command encoder put into txredisapi's protocol
class (txredisapi itself picks its hiredis reply parser when hiredis is
installed; the encoder is added on top of whichever it picked).
L{is_noscript} recognises Redis's answer to EVALSHA of a script it does not
have.  L{is_down} says at once whether a pool that was connected lost every
connection, so that the store fails a call then instead of queueing it
until its time-out (issue 13: every route call took 10 s with Redis down).
L{bus_connection} makes the message bus's connections
(L{cim.store.redis.bus}): one for publishing, one subscribed.

L{execute_with_run_id} runs a command that needs to know which run of
Redis (its C{run_id}, new at every start of C{redis-server}) executes it:
each connection of the pool asks C{INFO server} once, at its first such
command, and keeps the answer, since a connection never outlives the run it
was made to (a restarted Redis closes it; the pool connects again, and the
new connection asks again).  The append script so learns of a restart from
an argument instead of calling C{INFO} at every append.  This holds for a
direct connection to C{redis-server}: a proxy that keeps the client's
connection while the Redis behind it restarts would hide the restart.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import Any

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.store import RedisAddress
from cim.turnflush import TurnWriter, send_now


def open_pool(address: RedisAddress, poolsize: int, timeout: float) -> Any:
    """
    A txredisapi pool of C{poolsize} connections to the Redis at
    C{address}, reconnecting when one is lost, decoding replies as UTF-8
    and leaving numbers as strings (C{convertNumbers=False}).

    The connections are made once the reactor runs.

    @param timeout: seconds to wait for a connection.
    """
    pool = txredisapi.lazyConnectionPool(
        host=address.host,
        port=address.port,
        dbid=address.db,
        poolsize=poolsize,
        reconnect=True,
        charset="utf-8",
        password=address.password,
        username=address.username,
        connectTimeout=timeout,
        convertNumbers=False,
    )
    # Connections are made once the reactor runs, so the protocol class can
    # still be swapped for one with a faster command encoder.
    pool._factory.protocol = _protocol_with_fast_commands(pool._factory.protocol)
    _call_connections_directly(pool)
    return pool


def _call_connections_directly(pool: Any) -> None:
    """
    Have C{pool} (a txredisapi connection handler) run C{execute_command}
    and C{execute_with_run_id} straight on one of its connections, picked
    at random as txredisapi picks one, when one is connected: txredisapi's
    own handler first waits for a connection through a generator and two
    Deferreds per command.  Without a connected one (before the first, or
    while reconnecting), the handler's own way.

    A command that fails at once (the connection is going away) gives a
    failed Deferred, as through the handler.
    """
    factory = pool._factory
    pending = factory.connectionQueue.pending
    choice = random.choice
    handler_execute = pool.execute_command
    handler_with_run_id = pool.execute_with_run_id

    def execute_command(*args: Any) -> defer.Deferred[Any]:
        if not pending:
            return handler_execute(*args)  # type: ignore[no-any-return]
        connection = choice(pending)
        if not connection.connected:
            return handler_execute(*args)  # type: ignore[no-any-return]
        try:
            d: defer.Deferred[Any] = connection.execute_command(*args)
        except Exception:
            d = defer.fail()
        return d

    def execute_with_run_id(make: MakeCommand) -> defer.Deferred[Any]:
        if not pending:
            return handler_with_run_id(make)  # type: ignore[no-any-return]
        connection = choice(pending)
        if not connection.connected:
            return handler_with_run_id(make)  # type: ignore[no-any-return]
        try:
            d: defer.Deferred[Any] = connection.execute_with_run_id(make)
        except Exception:
            d = defer.fail()
        return d

    # (The handler finds its methods by __getattr__: these come first.)
    pool.execute_command = execute_command
    pool.execute_with_run_id = execute_with_run_id


def is_down(pool: Any) -> bool:
    """
    Whether C{pool} (from L{open_pool}) was connected and has lost every
    connection since: Redis went away, and the pool is reconnecting.

    Before its first connection a pool is not down, only not up yet (a
    call waits for it, within the store's time-out); anything that is not
    such a pool is never down.
    """
    factory = getattr(pool, "_factory", None)
    if factory is None:
        return False
    # The factory's deferred is dropped once the pool first filled up.
    return factory.deferred is None and not factory.size and not factory.stopped


def is_noscript(failure: Failure) -> bool:
    """
    Whether C{failure} is Redis refusing EVALSHA because it does not have
    the script.
    """
    return bool(failure.check(txredisapi.ResponseError)) and str(
        failure.value
    ).startswith("NOSCRIPT")


#: How a command needing the run_id is made from it (L{execute_with_run_id}).
MakeCommand = Callable[[str], Sequence[Any]]

_RUN_ID = re.compile(r"^run_id:([0-9a-f]+)\s*$", re.MULTILINE)


def parse_run_id(info: str) -> str:
    """
    The C{run_id} in the reply to C{INFO server}, or C{""} when it holds
    none.
    """
    found = _RUN_ID.search(info or "")
    return found.group(1) if found else ""


def knows_run_ids(pool: Any) -> bool:
    """
    Whether C{pool}'s connections keep their Redis run_id (a pool of
    L{open_pool}).
    """
    factory = getattr(pool, "_factory", None)
    protocol = getattr(factory, "protocol", None)
    return hasattr(protocol, "execute_with_run_id")


def execute_with_run_id(pool: Any, make: MakeCommand) -> defer.Deferred[Any]:
    """
    Run the command C{make(run_id)} on one connection of C{pool}, C{run_id}
    being the run_id of the Redis at the other end of that very
    connection (asked once per connection: see the module docstring).

    With a connection that does not keep its run_id (not from
    L{open_pool}), C{run_id} is C{""}: the caller must then find it out
    itself (the append script asks C{INFO} when given C{""}).
    """
    if not knows_run_ids(pool):
        try:
            d: defer.Deferred[Any] = pool.execute_command(*make(""))
        except Exception:
            d = defer.fail()
        return d
    # txredisapi's handler calls the protocol method on a connection it
    # picks (the same way it runs execute_command).
    found: defer.Deferred[Any] = pool.execute_with_run_id(make)
    return found


def _protocol_with_fast_commands(base: type) -> type:
    """
    Subclass txredisapi's protocol class C{base} (the hiredis one when
    hiredis is installed) with a command encoder that costs about a third
    of the original's: it formats each argument once, where the original
    calls a type-dispatching encoder twice per argument.  Commands with
    hundreds of arguments (batched appends, session lookups) are the hot
    path of every IM server.  Commands go straight to the socket, a
    turn's first at once and its others together at the next turn
    (L{_Outbox}).
    """

    parent: Any = base

    def _build_command(self: Any, *args: Any, **kwargs: Any) -> bytes:
        parts = [b"*%d\r\n" % len(args)]
        charset = self.charset or "utf-8"
        for arg in args:
            if isinstance(arg, str):
                data = arg.encode(charset, self.errors)
            elif isinstance(arg, bytes):
                data = arg
            elif isinstance(arg, int):
                data = b"%d" % arg
            else:
                data = self._encode_value(arg)
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        return b"".join(parts)

    def connectionMade(self: Any) -> Any:
        self.cim_outbox = _Outbox(self.transport)
        return parent.connectionMade(self)

    def connectionLost(self: Any, why: Any) -> Any:
        # (What waits is dropped: its commands fail with the connection.)
        self.cim_outbox.detach()
        return parent.connectionLost(self, why)

    def execute_command(self: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        # A plain command (what the store sends): its reply fires the
        # Deferred returned here from replyReceived, without txredisapi's
        # chain of a queue's Deferred and two callbacks per reply.
        if kwargs or self.pipelining or self.inMulti or self.replyTimeout:
            # (txredisapi writes to the transport: what waits goes first.)
            if self.cim_outbox is not None:
                self.cim_outbox.flush()
            return parent.execute_command(self, *args, **kwargs)  # type: ignore[no-any-return]
        if not self.connected:
            raise txredisapi.ConnectionError("Not connected")
        self.cim_outbox.queue(self._build_command(*args))
        result = _Reply()
        # The replies come in the order of the commands: one waiter each,
        # in the queue txredisapi's own commands wait in.
        self.replyQueue.waiting.append(result)
        return result

    def replyReceived(self: Any, reply: Any) -> None:
        waiting = self.replyQueue.waiting
        if not waiting:
            self.replyQueue.put(reply)
            return
        d = waiting.pop(0)
        if type(d) is not _Reply:
            # A waiter of txredisapi's own (it converts errors itself).
            d.callback(reply)
        elif d.called:
            # Cancelled (timed out): the reply is dropped.
            pass
        elif isinstance(reply, Exception):
            d.errback(Failure(reply))
        else:
            d.callback(reply)

    def execute_with_run_id(self: Any, make: MakeCommand) -> defer.Deferred[Any]:
        # One connection, one Redis run: the run_id is asked at the first
        # command needing it (a few may ask at once; they agree) and kept.
        if self.cim_run_id:
            return self.execute_command(*make(self.cim_run_id))

        def known(info: Any) -> defer.Deferred[Any]:
            if isinstance(info, bytes):
                info = info.decode("utf-8", "replace")
            self.cim_run_id = parse_run_id(str(info))
            return self.execute_command(*make(self.cim_run_id))

        d: defer.Deferred[Any] = self.execute_command("INFO", "server")
        return d.addCallback(known)

    return type(
        "FastCommandProtocol",
        (base,),
        {
            "_build_command": _build_command,
            "execute_command": execute_command,
            "replyReceived": replyReceived,
            "execute_with_run_id": execute_with_run_id,
            "connectionMade": connectionMade,
            "connectionLost": connectionLost,
            # How the connection sends its commands (L{_Outbox}), once it is
            # made.
            "cim_outbox": None,
            # The run_id of the Redis this connection talks to, once asked.
            "cim_run_id": "",
        },
    )


class _Outbox(TurnWriter):
    """
    How a Redis connection sends its commands when it is plain TCP: a
    turn's first command at once, straight to the socket, and the others
    of that turn together at the start of the next (L{TurnWriter}), in
    order.  Twisted's own path has the reactor watch the socket for room
    at every turn with a command and stop watching after it sent (two
    C{epoll_ctl} calls and an event a turn).  The first command leaves at
    once because a timed call's (the IM server's batched appends,
    L{cim.batch}) would otherwise wait a whole turn of the reactor.

    @ivar _sent_now: a command of this turn left at once.
    """

    _sent_now = False

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.attach(transport)

    def queue(self, data: bytes) -> None:
        turn = self._turn
        if turn is None or self._tcp is None:
            self.transport.write(data)
        elif self._out is not None:
            self._out.append(data)
        elif self._sent_now:
            # (Already waiting for the next turn, since the first.)
            self._out = [data]
        else:
            self._sent_now = True
            turn.add(self)
            send_now(self._tcp, self.transport, data)

    def flush(self) -> None:
        self._sent_now = False
        super().flush()


class _Reply(defer.Deferred):  # type: ignore[type-arg]
    """
    The reply to one command sent by the store's connections' own
    C{execute_command}: fired with the reply, or failed with Redis's
    error.
    """


#: How the bus's connections are made again: soon after a loss (what is
#: published meanwhile is lost), then backing off to every few seconds.
BUS_RETRY = backoffPolicy(
    initialDelay=0.05, factor=2.0, maxDelay=5.0, jitter=lambda: random.random() / 20
)


class _Subscriber(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    """
    A subscribed connection: hands each message to its factory.
    """

    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
        self.factory.received(channel, message)


#: The bus's publishing connection: commands answered as the store's are.
_BusPublisher = _protocol_with_fast_commands(txredisapi.RedisProtocol)


class _BusFactory(Factory):
    """
    Builds the bus's txredisapi protocols (no SELECT: channels are not of a
    database; payloads stay bytes) for a L{ClientService}, which makes the
    connection again when it is lost.
    """

    log = Logger()
    noisy = False
    #: What txredisapi's protocol asks of its factory when AUTH fails.
    isLazy = True

    def __init__(
        self,
        address: RedisAddress,
        received: Callable[[bytes, bytes], None] | None,
    ) -> None:
        self.address = address
        self.received = received
        self._class: Any = _BusPublisher if received is None else _Subscriber

    def buildProtocol(self, addr: Any) -> Any:
        protocol = self._class(
            charset=None,
            password=self.address.password,
            username=self.address.username,
            convertNumbers=False,
        )
        protocol.factory = self
        return protocol

    def stopTrying(self) -> None:
        # AUTH failed: the protocol closes the connection, and the service
        # tries again later (perhaps with the password fixed meanwhile).
        pass

    def connectionError(self, why: str) -> None:
        self.log.error("The message bus cannot use Redis: {why}", why=why)


def bus_connection(
    reactor: Any,
    address: RedisAddress,
    prepare: Callable[[Any], Any],
    received: Callable[[bytes, bytes], None] | None = None,
    timeout: float = 5.0,
    retry: Callable[[int], float] = BUS_RETRY,
) -> ClientService:
    """
    A L{ClientService} keeping one connection to the Redis at C{address}
    (not started): a plain one, or with C{received} a subscriber's, which
    calls C{received(channel, payload)} for each message.

    @param prepare: called with each new connection's protocol (once it is
        usable, logged in); returns a Deferred firing when the connection
        is ready for use (a subscriber's: subscribed).
    @param timeout: seconds to wait for a TCP connection.
    @param retry: seconds to wait before the given attempt to connect
        again.
    """
    endpoint = HostnameEndpoint(reactor, address.host, address.port, timeout=timeout)

    def ready(proxy: Any) -> Any:
        # (The service hands over its proxy; this fires with the protocol.)
        return proxy.whenConnected().addCallback(prepare)

    return ClientService(
        endpoint,
        _BusFactory(address, received),
        retryPolicy=retry,
        clock=reactor,
        prepareConnection=ready,
    )
