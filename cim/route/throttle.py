"""
Limits on guessing credentials at the route (C{/login}, C{/registerAccount}):
token buckets on the injected clock, one per account and one per client
address, that only failed attempts drain.

A failed attempt is one that did not prove its claim: a wrong password or
account key, no credential for an account that needs one, a user id and
name that do not match, an existing name registered without proof.  While
an address's bucket is empty, every attempt from it is answered 6000
before any credential is checked, and so is every attempt on an account
whose bucket is empty, unless it carries a credential nobody can guess (an
account key, a token, the cluster secret): guessing gets no answers, and
guessing at an account does not lock out its owner's client.  A successful
login costs nothing, so normal use is never slowed.
Buckets refill continuously (C{rate} a minute, at most C{rate} saved up).

The buckets live in the route process's memory (bounded, least recently
used dropped first): each route of a cluster limits on its own, and a
restart forgets them.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

from cachetools import LRUCache
from twisted.internet.interfaces import IReactorTime

from cim import envelope as codes
from cim.envelope import ApiError

#: How many buckets of each kind are kept.
MAX_BUCKETS = 100_000


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class TokenBuckets:
    """
    One token bucket per key: C{rate} tokens a minute, holding at most
    C{rate} (and at least one).
    """

    def __init__(
        self, clock: IReactorTime, rate: float, max_buckets: int = MAX_BUCKETS
    ) -> None:
        self.clock = clock
        self.capacity = max(1.0, rate)
        self.per_second = rate / 60.0
        self._buckets: LRUCache[Hashable, _Bucket] = LRUCache(max_buckets)

    def _now(self) -> float:
        now: float = self.clock.seconds()
        return now

    def _bucket(self, key: Hashable) -> _Bucket | None:
        """
        C{key}'s bucket, refilled up to now; C{None} when full (forgotten).
        """
        bucket = self._buckets.get(key)
        if bucket is None:
            return None
        now = self._now()
        bucket.tokens = min(
            self.capacity, bucket.tokens + (now - bucket.at) * self.per_second
        )
        bucket.at = now
        if bucket.tokens >= self.capacity:
            del self._buckets[key]
            return None
        return bucket

    def wait(self, key: Hashable) -> float:
        """
        @return: seconds until C{key} has a token (0: it has one now).
        """
        bucket = self._bucket(key)
        if bucket is None or bucket.tokens >= 1:
            return 0.0
        if self.per_second <= 0:
            return math.inf
        return (1 - bucket.tokens) / self.per_second

    def take(self, key: Hashable) -> None:
        """
        Take a token from C{key}'s bucket (it may go below zero: each
        attempt made while empty pushes the next one further away).
        """
        bucket = self._bucket(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.capacity, self._now())
        bucket.tokens = max(bucket.tokens - 1, -self.capacity)


class GuessLimit:
    """
    The per-account and per-address limits of failed credential checks.

    @param account_rate: failed attempts a minute per account (C{--login-rate}).
    @param address_rate: failed attempts a minute per client address
        (C{--address-rate}).
    """

    def __init__(
        self, clock: IReactorTime, account_rate: float, address_rate: float
    ) -> None:
        self.accounts = TokenBuckets(clock, account_rate)
        self.addresses = TokenBuckets(clock, address_rate)

    def check(
        self, account: Hashable, address: str | None, guessable: bool = True
    ) -> None:
        """
        Refuse an attempt on C{account} from C{address} while either has
        run out of attempts.

        @param guessable: whether the attempt's credential could be guessed
            (a password, or none).  One that cannot (an account key, a
            token, the secret: long random strings) passes an empty account
            bucket, so that guessing at an account does not lock its owner
            out; its address's limit still applies.
        @raise ApiError: L{codes.RATE_LIMITED}, saying when to retry.
        """
        wait = self.accounts.wait(account) if guessable else 0.0
        what = "for this account"
        if address is not None:
            by_address = self.addresses.wait(address)
            if by_address > wait:
                wait, what = by_address, "from your address"
        if wait > 0:
            raise ApiError(
                codes.RATE_LIMITED,
                f"too many failed attempts {what}: try again in "
                f"{max(1, math.ceil(wait))} s",
            )

    def failed(self, account: Hashable, address: str | None) -> None:
        """
        Count a failed attempt on C{account} from C{address}.
        """
        self.accounts.take(account)
        if address is not None:
            self.addresses.take(address)
