"""
C{twistd cim-server}: one IM server of a cluster.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from cim.daemon import daemon_service
from cim.framing import DEFAULT_MAX_FRAME
from cim.limits import BROADCAST_FROM, MAX_OUTPUT, SESSION_TTL, STORE_BATCH
from cim.limits_net import (
    CLIENT_PER_ADDRESS,
    HTTP_PER_ADDRESS,
    daemon_options,
    net_limits,
)
from cim.listen import Listen, listen_option
from cim.options import (
    GC_PARAMETERS,
    PUSH_PARAMETERS,
    PUSH_RETRY,
    SECRET_PARAMETERS,
    SEND_LIMITS,
    check_ca_file,
    check_registry_url,
    check_store_url,
    positive_float,
    push_retry_from,
    secret_option,
    whole_number,
)
from cim.server.service import IMServerService, ServerConfig

#: The limits of what one connection may cost (issue 13), shared with
#: C{cim-standalone}.
SERVER_LIMITS: list[list[Any]] = [
    *SEND_LIMITS,
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
        positive_float("session-ttl", low=2.0),
    ],
    [
        "store-batch",
        None,
        STORE_BATCH,
        "The most devices one store call renews the sessions of, or saves "
        "the cursors of; more are renewed or saved in calls one after "
        "another, so that one call never holds the store long.",
        whole_number("store-batch", 1, 100_000),
    ],
    *PUSH_RETRY,
    *GC_PARAMETERS,
]


#: The WebSocket gateway's port when it is on (C{cim-standalone}'s default).
WS_PORT = 8084


def ws_port_option(default: int | None) -> list[Any]:
    """
    The C{--ws-port} parameter, with its C{default} (C{None}: off).
    """
    parse = listen_option("ws-port")

    def ws_port(text: str) -> Listen | None:
        return None if text.strip().lower() == "off" else parse(text)

    return [
        "ws-port",
        None,
        default,
        "The WebSocket gateway's port (ws://; 0: any free port), an endpoint "
        "description (ssl:...: wss://), or off"
        + (" (default: off)." if default is None else "."),
        ws_port,
    ]


class WebSocketOptions(usage.Options):
    """
    The C{--ws-origin} option of the daemons with a WebSocket gateway.
    """

    def __init__(self) -> None:
        super().__init__()
        self["ws-origin"] = []

    def opt_ws_origin(self, origin: str) -> None:
        """
        An origin whose pages may open a WebSocket: scheme://host[:port],
        with * as a wildcard (https://*.example.com), or * for any page;
        repeatable (default: pages of the host the request names).
        """
        origin = origin.strip()
        if origin != "*" and (
            "://" not in origin
            or origin.endswith("://")
            or "/" in origin.split("://", 1)[1]
        ):
            raise usage.UsageError(
                f"--ws-origin must be scheme://host[:port] or *, not {origin!r}"
            )
        self["ws-origin"].append(origin)


class Options(WebSocketOptions):
    synopsis = "[options]"
    longdesc = (
        "Run a cim IM server: it holds clients' TCP (and, with --ws-port, "
        "WebSocket) connections, pushes their messages, and registers itself "
        "in the registry."
    )
    optFlags = [
        ["legacy-login", None, "Accept CIM clients that log in without a token."],
    ]
    optParameters = [
        [
            "port",
            "p",
            11211,
            "Client port (0: any free port)."
            " A number (TCP on --bind) or a Twisted endpoint description, such as"
            " ssl:11211:privateKey=key.pem:certKey=cert.pem for TLS.",
            listen_option("port"),
        ],
        [
            "http-port",
            None,
            8081,
            "Push API HTTP port (0: any), or an endpoint description (ssl:...: https).",
            listen_option("http-port"),
        ],
        ws_port_option(None),
        [
            "host",
            None,
            "127.0.0.1",
            "The address announced to clients through the registry.",
        ],
        ["bind", None, "0.0.0.0", "The interface both ports listen on."],
        ["store", None, "redis://127.0.0.1:6379/0", "memory: or redis://host:port/db"],
        ["registry", None, "zk://127.0.0.1:2181/cim", "local: or zk://host:port/root"],
        *SECRET_PARAMETERS,
        [
            "ca-file",
            None,
            None,
            "A PEM file of the CAs whose certificates the push APIs called "
            "over https must carry (default: the system's).",
        ],
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
        [
            "broadcast-from",
            None,
            BROADCAST_FROM,
            "Deliver a message for this many users or more (a group's) "
            "by pushing it to every server that holds sessions, each writing "
            "to those of the users it holds, instead of looking up where "
            "each user is (0: always look up).",
            whole_number("broadcast-from", 0, 10**9),
        ],
        *daemon_options(CLIENT_PER_ADDRESS, HTTP_PER_ADDRESS),
        *SERVER_LIMITS,
        *PUSH_PARAMETERS,
    ]

    def postOptions(self) -> None:
        check_ca_file(self["ca-file"])
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
        limits=net_limits(options),
        shutdown_timeout=options["shutdown-timeout"],
        max_batch=options["max-batch"],
        sender_quota=options["sender-quota"],
        max_output=options["max-output"],
        session_ttl=options["session-ttl"],
        store_batch=options["store-batch"],
        push_retry=push_retry_from(options),
        broadcast_from=options["broadcast-from"] or None,
        session_cache=options["session-cache"],
        ca_file=options["ca-file"],
        ws_port=options["ws-port"],
        ws_origins=tuple(options["ws-origin"]),
        push=options["push"],
        push_timeout=options["push-timeout"],
    )


def makeService(options: usage.Options) -> IService:
    return daemon_service(IMServerService, config_from(options), options)
