"""
Store backends (L{cim.interfaces.IStore}): in memory, and Redis.

L{open_store} picks one from a URL (the C{--store} options), and
L{parse_redis_url} reads a Redis one.  Importing this package imports neither
backend: the Redis one pulls in txredisapi, which imports the global reactor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from cim.interfaces import IStore
from cim.limits import SENDER_QUOTA


@dataclass(frozen=True, slots=True)
class Retention:
    """
    How long a store keeps messages.

    @ivar max_messages: a conversation keeps at most this many of its latest
        messages.
    @ivar max_age: messages older than this many seconds are dropped (on
        later appends; a conversation nobody writes to for this long
        disappears as a whole).
    @ivar idempotency_window: for how many seconds an appended message's
        C{(sender_id, client_msg_id)} is remembered, so that a retry within
        that time is not appended again.
    @ivar sender_quota: how many messages one sender may append to one
        conversation within any C{max_age} seconds (0: no limit).  Below
        C{max_messages}, no sender can push out of a conversation the
        messages that others sent before its own (a receiver's unread
        messages) by sending many.
    """

    max_messages: int = 10_000
    max_age: float = 7 * 24 * 3600
    idempotency_window: float = 24 * 3600
    sender_quota: int = SENDER_QUOTA


#: What L{open_store} accepts, for error messages and C{--help} texts.
STORE_URLS = "memory: or redis://[:password@]host[:port][/db]"


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """
    Where a Redis is and how to log in to it: a parsed C{redis://} URL.

    @ivar db: the database number.
    @ivar username: the ACL user, or C{None} for the default one.
    @ivar password: the password, or C{None} for none.
    """

    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_redis_url(url: str) -> RedisAddress:
    """
    Parse C{redis://[[user]:password@]host[:port][/db]}: the one parser of
    Redis URLs.  It is here rather than in L{cim.store.redis} so that
    checking an option imports no Redis client (txredisapi imports the
    global reactor).

    @raise ValueError: C{url} is not such a URL; the message says why.
    """
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise ValueError(f"not a redis:// URL: {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad Redis URL {url!r}: bad port") from None
    db = parts.path.strip("/") or "0"
    if not parts.hostname or port == 0 or not (db.isascii() and db.isdigit()):
        raise ValueError(
            f"bad Redis URL {url!r}: expected "
            "redis://[[user]:password@]host[:port][/db]"
        )
    return RedisAddress(
        host=parts.hostname,
        port=port or 6379,
        db=int(db),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def open_store(
    url: str, clock: IReactorTime, retention: Retention = Retention()
) -> defer.Deferred[IStore]:
    """
    Open the store that C{url} names.

    @param url: C{"memory:"} for a L{cim.store.memory.MemoryStore}, or
        C{"redis://[:password@]host[:port][/db]"} for a
        L{cim.store.redis.RedisStore}.
    @param clock: the clock (the reactor) the store uses for times to live
        and timestamps.
    @return: a Deferred firing with the L{IStore} once it is usable; the
        Redis one fails with L{cim.interfaces.StoreError} when Redis cannot
        be reached.
    @raise ValueError: C{url} names no store this program knows.
    """
    if url == "memory:":
        from cim.store.memory import MemoryStore

        return defer.succeed(cast(IStore, MemoryStore(clock, retention)))
    if url.startswith("redis://"):
        from cim.store.redis import connect_redis

        d: defer.Deferred[Any] = connect_redis(url, clock=clock, retention=retention)
        return d
    raise ValueError(f"unknown store {url!r}: expected {STORE_URLS}")
