"""
Option helpers shared by the daemons' tap modules.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.python import usage

from cim.delivery import PushRetry
from cim.gcpolicy import GC_YOUNG
from cim.limits import (
    MAX_BATCH,
    MAX_PUSH_RETRIES,
    SENDER_QUOTA,
    SESSION_CACHE,
    SESSION_TTL,
)
from cim.registry import parse_zk_url
from cim.store import STORE_URLS, parse_redis_url


def positive_float(
    name: str, low: float = 0.0, high: float | None = None
) -> Callable[[str], float]:
    """
    A C{--name} option taking a positive number (of seconds, often), at
    least C{low} and below C{high} when given.
    """

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise usage.UsageError(f"--{name} must be a number, not {text!r}") from None
        if value <= 0:
            raise usage.UsageError(f"--{name} must be positive")
        if value < low:
            raise usage.UsageError(f"--{name} must be at least {low:g} seconds")
        if high is not None and value >= high:
            raise usage.UsageError(f"--{name} must be between 0 and {high:g} seconds")
        return value

    return parse


def port_number(name: str) -> Callable[[str], int]:
    """
    A C{--name} port option (0 lets the system pick a free one).
    """

    def parse(text: str) -> int:
        try:
            return usage.portCoerce(text)
        except ValueError:
            if text.strip().isdigit():
                raise usage.UsageError(
                    f"--{name} must be between 0 and 65535"
                ) from None
            raise usage.UsageError(
                f"--{name} must be a port number, not {text!r}"
            ) from None

    return parse


def whole_number(name: str, low: int, high: int | None = None) -> Callable[[str], int]:
    """
    A C{--name} option taking a whole number of at least C{low} (and at
    most C{high}, when given).
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise usage.UsageError(
                f"--{name} must be an integer, not {text!r}"
            ) from None
        if high is None and value < low:
            raise usage.UsageError(f"--{name} must be at least {low}")
        if high is not None and not low <= value <= high:
            raise usage.UsageError(f"--{name} must be between {low:,} and {high:,}")
        return value

    return parse


#: What one send may store (issue 13), for every daemon that stores sends.
SEND_LIMITS: list[list[Any]] = [
    [
        "max-batch",
        None,
        MAX_BATCH,
        "The most texts one send may carry.",
        whole_number("max-batch", 1, 100_000),
    ],
    [
        "sender-quota",
        None,
        SENDER_QUOTA,
        "Messages one sender may store in one conversation within the "
        "retention window (7 days; 0: no limit). Keep it under the "
        "10,000 a conversation keeps, and the same on every daemon.",
        whole_number("sender-quota", 0, 10**9),
    ],
]


#: How routes and servers push to IM servers: over the message bus
#: (L{cim.bus}; Redis pub/sub when the store is Redis, the push API
#: otherwise), or always over the push API (HTTP).
PUSH_MODES = ("bus", "http")


def push_mode(text: str) -> str:
    """
    The C{--push} option: one of L{PUSH_MODES}.
    """
    if text not in PUSH_MODES:
        raise usage.UsageError(
            f"--push must be one of {', '.join(PUSH_MODES)}, not {text!r}"
        )
    return text


#: C{--push} and C{--push-timeout}, of the route and the IM server.
PUSH_PARAMETERS: list[list[Any]] = [
    [
        "push",
        None,
        "bus",
        "How pushes reach IM servers: bus (Redis pub/sub when the store is "
        "Redis, else the push API) or http (the push API).",
        push_mode,
    ],
    [
        "push-timeout",
        None,
        5.0,
        "Seconds a publish on the bus may wait for Redis before the push fails.",
        positive_float("push-timeout", high=600.0),
    ],
    [
        "session-cache",
        None,
        SESSION_CACHE,
        "How many users' sessions are kept to deliver private messages "
        "without looking them up while the store says they did not change "
        "(0: look up at every delivery).",
        whole_number("session-cache", 0, 10**8),
    ],
]


#: How failed pushes to other servers are sent again, for every daemon
#: that delivers (L{cim.delivery.PushRetry}).
PUSH_RETRY: list[list[Any]] = [
    [
        "push-retry-time",
        None,
        SESSION_TTL,
        "Seconds a push to another server that failed is sent again (with "
        "backoff) before it is given up; its recipients then get the "
        "message at their next gap or login.",
        positive_float("push-retry-time", 1.0, 86400.0),
    ],
    [
        "push-retry-max",
        None,
        MAX_PUSH_RETRIES,
        "The most failed pushes kept to be sent again; past that, the "
        "oldest are given up.",
        whole_number("push-retry-max", 0, 10**8),
    ],
]


#: The cyclic garbage collector's pace, for every daemon (L{cim.gcpolicy}).
GC_PARAMETERS: list[list[Any]] = [
    [
        "gc-young",
        None,
        GC_YOUNG,
        "Objects allocated between two young garbage collections (Python's "
        "default is 2,000; higher spends less CPU on collections under load).",
        whole_number("gc-young", 100, 10**8),
    ],
]


def push_retry_from(options: Any) -> PushRetry:
    """
    The L{PushRetry} that the C{PUSH_RETRY} options of C{options} ask for.
    """
    return PushRetry(
        time=options["push-retry-time"], max_pending=options["push-retry-max"]
    )


def check_store_url(url: str) -> None:
    """
    @raise usage.UsageError: C{url} names no store (L{STORE_URLS}).
    """
    if url == "memory:":
        return
    try:
        parse_redis_url(url)
    except ValueError as e:
        raise usage.UsageError(f"--store must be {STORE_URLS}: {e}") from None


def check_ca_file(path: str | None) -> None:
    """
    @raise usage.UsageError: C{path} (C{--ca-file}) is given but holds no
        readable PEM certificate.
    """
    if path is None:
        return
    from cim.tls import trust_root

    try:
        trust_root(path)
    except ValueError as e:
        raise usage.UsageError(f"--ca-file: {e}") from None


def check_registry_url(url: str) -> None:
    """
    @raise usage.UsageError: C{url} names no registry.
    """
    if url == "local:":
        return
    try:
        parse_zk_url(url)
    except ValueError as e:
        raise usage.UsageError(f"--registry must be local: or zk://...: {e}") from None


#: The cluster secret's options, for a tap's C{optParameters}
#: (C{*SECRET_PARAMETERS}); L{secret_option} reads them.
SECRET_PARAMETERS: list[list[str | None]] = [
    [
        "secret",
        None,
        "",
        "The cluster secret (default: $CIM_SECRET). Prefer --secret-file: "
        "other users see command lines (ps).",
    ],
    [
        "secret-file",
        None,
        None,
        "A file holding the cluster secret (surrounding whitespace ignored).",
    ],
]


def read_secret_file(path: str) -> str:
    """
    The secret in the file C{path}: its content, stripped.

    @raise usage.UsageError: it cannot be read, is not text, or is empty.
    """
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise usage.UsageError(
            f"--secret-file: cannot read {path!r}: {reason}"
        ) from None
    if not secret:
        raise usage.UsageError(f"--secret-file: {path!r} is empty")
    return secret


def secret_option(options: usage.Options, required: bool = True) -> str:
    """
    The cluster secret from C{--secret-file}, C{--secret} or C{$CIM_SECRET}
    (the first given; C{--secret-file} and C{--secret} together are
    refused).

    @param required: refuse when none is given (else return C{""}).
    @raise usage.UsageError: none is given (and C{required}), both options
        are, the file cannot be read or is empty, or the secret is shorter
        than 8 characters.
    """
    path = options.get("secret-file")
    if path is not None and options["secret"]:
        raise usage.UsageError("give --secret or --secret-file, not both")
    if path is not None:
        secret = read_secret_file(path)
    else:
        secret = options["secret"] or os.environ.get("CIM_SECRET", "")
    if not secret:
        if not required:
            return ""
        raise usage.UsageError(
            "a cluster secret is required: --secret-file, --secret or the "
            "CIM_SECRET environment variable (the same value on every route "
            "and server)"
        )
    if len(secret) < 8:
        raise usage.UsageError("the cluster secret must be at least 8 characters")
    return secret
