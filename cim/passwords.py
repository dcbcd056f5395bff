"""
Salted password hashes (scrypt), computed off the reactor thread.

A stored hash is a self-describing string::

    scrypt$<n>$<r>$<p>$<salt, base64>$<hash, base64>

so the cost parameters can be raised later without invalidating the hashes
already stored: L{verify_password} always uses the parameters written in the
string it checks.

L{hash_password} and L{verify_password} run scrypt in a thread pool and
return Deferreds; L{make_hash} and L{check_hash} are the blocking functions
they run, for callers that are not on the reactor thread (or, like the
in-memory store, do not mind blocking).

Passwords are never logged, nor put in exception messages.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads

#: The scrypt cost parameters of new hashes (16 MiB of memory, ~50 ms).
N = 2**14
R = 8
P = 1
#: Bytes of random salt and of derived key.
SALT_BYTES = 16
KEY_BYTES = 32
#: The largest parameters L{check_hash} accepts from a stored string, so a
#: corrupted (or hostile) store cannot make it allocate unbounded memory.
MAX_N = 2**20
MAX_R = 32
MAX_P = 16
_SCHEME = "scrypt"


_T = TypeVar("_T")


def _derive(password: str, salt: bytes, n: int, r: int, p: int, size: int) -> bytes:
    """
    Run scrypt with enough C{maxmem} for the given parameters.
    """
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=129 * r * (n + p) + 1024 * 1024,
        dklen=size,
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def make_hash(password: str) -> str:
    """
    Hash C{password} with a new random salt (blocking).

    @return: the self-describing hash string.
    """
    salt = os.urandom(SALT_BYTES)
    key = _derive(password, salt, N, R, P, KEY_BYTES)
    return f"{_SCHEME}${N}${R}${P}${_b64(salt)}${_b64(key)}"


def check_hash(password: str, stored: str) -> bool:
    """
    Tell whether C{password} matches the hash string C{stored} (blocking).

    The comparison takes the same time wherever the hashes differ.

    @return: C{True} on a match; C{False} otherwise, including when
        C{stored} is not a hash string this module understands.
    """
    try:
        scheme, n_text, r_text, p_text, salt_text, key_text = stored.split("$")
        n, r, p = int(n_text), int(r_text), int(p_text)
        salt = base64.b64decode(salt_text, validate=True)
        key = base64.b64decode(key_text, validate=True)
    except (ValueError, binascii.Error):
        return False
    if scheme != _SCHEME or not key:
        return False
    if not (1 < n <= MAX_N and n & (n - 1) == 0 and 0 < r <= MAX_R):
        return False
    if not 0 < p <= MAX_P:
        return False
    candidate = _derive(password, salt, n, r, p, len(key))
    return hmac.compare_digest(candidate, key)


def _inThread(
    reactor: IReactorThreads | None, f: Callable[..., _T], *args: Any
) -> Deferred[_T]:
    """
    Run C{f(*args)} in C{reactor}'s thread pool, or in the global reactor's
    when C{reactor} is C{None}.
    """
    if reactor is None:
        return threads.deferToThread(f, *args)
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)


def hash_password(
    password: str, reactor: IReactorThreads | None = None
) -> Deferred[str]:
    """
    Hash C{password} with a new random salt, in a thread.

    @param reactor: an L{IReactorThreads} whose thread pool runs scrypt; the
        global reactor's when C{None}.
    @return: a Deferred firing with the self-describing hash string.
    """
    return _inThread(reactor, make_hash, password)


def verify_password(
    password: str, stored: str, reactor: IReactorThreads | None = None
) -> Deferred[bool]:
    """
    Check C{password} against the hash string C{stored}, in a thread.

    @param reactor: as for L{hash_password}.
    @return: a Deferred firing with C{True} on a match, C{False} otherwise
        (also when C{stored} is malformed).
    """
    return _inThread(reactor, check_hash, password, stored)
