"""
Option helpers shared by the daemons' tap modules.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python import usage


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
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise usage.UsageError(
                f"--{name} must be a port number, not {text!r}"
            ) from None
        if not 0 <= value <= 65535:
            raise usage.UsageError(f"--{name} must be between 0 and 65535")
        return value

    return parse


def check_store_url(url: str) -> None:
    if url != "memory:" and not url.startswith("redis://"):
        raise usage.UsageError(
            f"--store must be memory: or redis://host:port/db, not {url!r}"
        )


def check_registry_url(url: str) -> None:
    if url != "local:" and not url.startswith("zk://"):
        raise usage.UsageError(
            f"--registry must be local: or zk://host:port/root, not {url!r}"
        )


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


def as_deferred(value: Any) -> Deferred:
    """
    Turn a coroutine, a Deferred or a plain value into a Deferred.
    """
    if inspect.iscoroutine(value):
        return ensureDeferred(value)
    if isinstance(value, Deferred):
        return value
    d: Deferred = Deferred()
    d.callback(value)
    return d
