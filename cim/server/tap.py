"""
C{twistd cim-server}: one IM server of a cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from cim.daemon import daemon_service
from cim.framing import DEFAULT_MAX_FRAME
from cim.limits import MAX_BATCH, MAX_OUTPUT, SENDER_QUOTA, SESSION_TTL
from cim.options import (
    check_registry_url,
    check_store_url,
    port_number,
    positive_float,
    secret_option,
)
from cim.server.service import IMServerService, ServerConfig


def whole_number(name: str, low: int, high: int) -> Callable[[str], int]:
    """
    A C{--name} option taking a whole number between C{low} and C{high}.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise usage.UsageError(
                f"--{name} must be a whole number, not {text!r}"
            ) from None
        if not low <= value <= high:
            raise usage.UsageError(f"--{name} must be between {low:,} and {high:,}")
        return value

    return parse


def seconds_at_least(name: str, low: float) -> Callable[[str], float]:
    """
    A C{--name} option taking a number of seconds, at least C{low}.
    """
    number = positive_float(name)

    def parse(text: str) -> float:
        value = number(text)
        if value < low:
            raise usage.UsageError(f"--{name} must be at least {low:g} seconds")
        return value

    return parse


#: The limits of what one connection may cost (issue 13), shared with
#: C{cim-standalone}.
SERVER_LIMITS: list[list[Any]] = [
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
        "10,000 a conversation keeps.",
        whole_number("sender-quota", 0, 10**9),
    ],
    [
        "max-output",
        None,
        MAX_OUTPUT,
        "Bytes buffered for a client that does not read them before it is dropped.",
        whole_number("max-output", 64 * 1024, 1024**3),
    ],
    [
        "session-ttl",
        None,
        SESSION_TTL,
        "Seconds a connected session lives unless this server renews it "
        "(it renews them every third of that).",
        seconds_at_least("session-ttl", 2.0),
    ],
]


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a cim IM server: it holds clients' TCP connections, pushes their "
        "messages, and registers itself in the registry."
    )
    optFlags = [
        ["legacy-login", None, "Accept CIM clients that log in without a token."],
    ]
    optParameters = [
        [
            "port",
            "p",
            11211,
            "Client TCP port (0: any free port).",
            port_number("port"),
        ],
        [
            "http-port",
            None,
            8081,
            "Push API HTTP port (0: any).",
            port_number("http-port"),
        ],
        [
            "host",
            None,
            "127.0.0.1",
            "The address announced to clients through the registry.",
        ],
        ["bind", None, "0.0.0.0", "The interface both ports listen on."],
        ["store", None, "redis://127.0.0.1:6379/0", "memory: or redis://host:port/db"],
        ["registry", None, "zk://127.0.0.1:2181/cim", "local: or zk://host:port/root"],
        ["secret", None, "", "The cluster secret (default: $CIM_SECRET)."],
        [
            "heartbeat-timeout",
            None,
            30.0,
            "Seconds of client silence before it is dropped.",
            positive_float("heartbeat-timeout"),
        ],
        [
            "max-frame",
            None,
            DEFAULT_MAX_FRAME,
            "The largest frame accepted, in bytes.",
            int,
        ],
        [
            "rate",
            None,
            2000.0,
            "Messages per second a connection may send (each text of a batch "
            "counts; a burst of twice as many).",
            positive_float("rate"),
        ],
        *SERVER_LIMITS,
    ]

    def postOptions(self) -> None:
        check_store_url(self["store"])
        check_registry_url(self["registry"])
        if not 64 <= self["max-frame"] <= 64 * 1024 * 1024:
            raise usage.UsageError("--max-frame must be between 64 bytes and 64 MiB")
        self["secret"] = secret_option(self)


def config_from(options: usage.Options) -> ServerConfig:
    return ServerConfig(
        port=options["port"],
        http_port=options["http-port"],
        host=options["host"],
        bind=options["bind"],
        secret=options["secret"],
        heartbeat_timeout=options["heartbeat-timeout"],
        max_frame=options["max-frame"],
        legacy_login=bool(options["legacy-login"]),
        rate=options["rate"],
        max_batch=options["max-batch"],
        sender_quota=options["sender-quota"],
        max_output=options["max-output"],
        session_ttl=options["session-ttl"],
    )


def makeService(options: usage.Options) -> IService:
    return daemon_service(IMServerService, config_from(options), options)
