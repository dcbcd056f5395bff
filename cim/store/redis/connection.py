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

import re
from collections.abc import Callable, Sequence
from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.python.failure import Failure

from cim.store import RedisAddress


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
    return pool


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
    path of every IM server.
    """

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
            "execute_with_run_id": execute_with_run_id,
            # The run_id of the Redis this connection talks to, once asked.
            "cim_run_id": "",
        },
    )
