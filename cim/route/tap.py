"""
C{twistd cim-route}: the stateless HTTP route of a cluster (run several
behind a load balancer).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from cim.daemon import daemon_service
from cim.limits import DEVICE_KEY_TTL, MAX_DEVICES
from cim.limits_net import HTTP_PER_ADDRESS, daemon_options, net_limits
from cim.listen import listen_option
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
from cim.route.balancer import BALANCERS
from cim.route.service import RouteConfig, RouteService

#: C{--max-devices}, of the route and of the standalone process.
MAX_DEVICES_OPTION: list[Any] = [
    "max-devices",
    None,
    MAX_DEVICES,
    "How many devices (sessions) one user may hold at once: a login from "
    "one more device logs out the least recently active one.",
    whole_number("max-devices", 1, 1000),
]
#: C{--device-key-ttl}, of the route and of the standalone process.
DEVICE_KEY_TTL_OPTION: list[Any] = [
    "device-key-ttl",
    None,
    DEVICE_KEY_TTL,
    "Lifetime of a device key (the credential that logs a device in again "
    "without its password), in seconds; each login with it issues a new one.",
    positive_float("device-key-ttl", 60.0, 10 * 365 * 86400.0),
]


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a cim route: the HTTP API for accounts, logins, routing and "
        "history.  Routes keep no state of their own; run several behind a "
        "load balancer."
    )
    optFlags = [
        ["require-password", None, "Refuse registrations without a password."],
        [
            "legacy-auth",
            None,
            "Let CIM clients call /p2pRoute, /groupRoute, /offLine and "
            "/fetchOfflineMsgs without a token, log in with userId and userName "
            "only, and learn an existing name's id from /registerAccount "
            "(anyone may then act for anyone without a password).",
        ],
    ]
    optParameters = [
        [
            "port",
            "p",
            8083,
            "HTTP port (0: any free port), or a Twisted endpoint description, "
            "such as ssl:8083:privateKey=key.pem:certKey=cert.pem for https.",
            listen_option("port"),
        ],
        ["bind", None, "0.0.0.0", "The interface to listen on."],
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
            "balancer",
            None,
            "consistent-hash",
            f"How to pick a user's IM server: {', '.join(BALANCERS)}.",
        ],
        [
            "token-ttl",
            None,
            86400.0,
            "Lifetime of login tokens, in seconds.",
            positive_float("token-ttl"),
        ],
        [
            "login-rate",
            None,
            10.0,
            "Failed logins or registrations a minute allowed per account "
            "(then 6000 until the allowance refills).",
            positive_float("login-rate"),
        ],
        [
            "address-rate",
            None,
            60.0,
            "Failed logins or registrations a minute allowed per client address.",
            positive_float("address-rate"),
        ],
        [
            "max-message",
            None,
            4096,
            "The longest chat message, in characters.",
            whole_number("max-message", 1, 1024 * 1024),
        ],
        MAX_DEVICES_OPTION,
        DEVICE_KEY_TTL_OPTION,
        *SEND_LIMITS,
        *PUSH_RETRY,
        *GC_PARAMETERS,
        *daemon_options(HTTP_PER_ADDRESS),
        *PUSH_PARAMETERS,
    ]

    def postOptions(self) -> None:
        check_ca_file(self["ca-file"])
        check_store_url(self["store"])
        check_registry_url(self["registry"])
        if self["balancer"] not in BALANCERS:
            raise usage.UsageError(
                f"--balancer must be one of {', '.join(BALANCERS)}, "
                f"not {self['balancer']!r}"
            )
        self["secret"] = secret_option(self)


def config_from(options: usage.Options) -> RouteConfig:
    return RouteConfig(
        port=options["port"],
        bind=options["bind"],
        secret=options["secret"],
        balancer=options["balancer"],
        require_password=bool(options["require-password"]),
        token_ttl=options["token-ttl"],
        legacy_auth=bool(options["legacy-auth"]),
        max_message=options["max-message"],
        max_batch=options["max-batch"],
        sender_quota=options["sender-quota"],
        login_rate=options["login-rate"],
        address_rate=options["address-rate"],
        # A body holds a message and its JSON escapes (up to 6 bytes a
        # character), or a batch of a few.
        max_body=max(1024 * 1024, 64 * options["max-message"]),
        limits=net_limits(options),
        shutdown_timeout=options["shutdown-timeout"],
        ca_file=options["ca-file"],
        max_devices=options["max-devices"],
        device_key_ttl=options["device-key-ttl"],
        push=options["push"],
        push_timeout=options["push-timeout"],
        push_retry=push_retry_from(options),
        session_cache=options["session-cache"],
    )


def makeService(options: usage.Options) -> IService:
    return daemon_service(RouteService, config_from(options), options)
