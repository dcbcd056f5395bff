"""
Option helpers shared by the daemons' tap modules.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.python import usage

from cim.registry import parse_zk_url
from cim.store import STORE_URLS, parse_redis_url


def positive_float(name: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise usage.UsageError(f"--{name} must be a number, not {text!r}") from None
        if value <= 0:
            raise usage.UsageError(f"--{name} must be positive")
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


def secret_option(options: usage.Options) -> str:
    """
    The cluster secret from C{--secret} or C{$CIM_SECRET}.

    @raise usage.UsageError: neither is set.
    """
    secret: str = options["secret"] or os.environ.get("CIM_SECRET", "")
    if not secret:
        raise usage.UsageError(
            "a cluster secret is required: --secret or the CIM_SECRET environment "
            "variable (the same value on every route and server)"
        )
    if len(secret) < 8:
        raise usage.UsageError("the cluster secret must be at least 8 characters")
    return secret
