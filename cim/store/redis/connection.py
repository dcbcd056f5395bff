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
"""

from __future__ import annotations

from typing import Any

import txredisapi
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

    return type("FastCommandProtocol", (base,), {"_build_command": _build_command})
