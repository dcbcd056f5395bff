"""
How the route picks an IM server for a login (C{--balancer}).

A balancer does not pick one server: it orders the live servers into a list
of candidates for a user, best first, so that a login can fall back to the
next one when the first cannot be reached.

  - L{RoundRobin} (CIM's "loop"): each login starts one server further.
  - L{RandomChoice}: a random order per login.
  - L{ConsistentHash}: a hash ring of the servers with many virtual nodes
    each; a user's first choice is the server owning the first point at or
    after the hash of its id, the fallbacks are the next distinct servers
    round the ring.  A user keeps its server while the server list is
    unchanged, and a change of the list moves only the users it must move.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence
from typing import Protocol

from cim.interfaces import ServerAddress

#: The names C{--balancer} accepts.
BALANCERS = ("round-robin", "random", "consistent-hash")

#: Virtual nodes per server on the consistent-hash ring.
VIRTUAL_NODES = 160


class Balancer(Protocol):
    """
    Orders the live servers for a user's login.
    """

    #: The C{--balancer} name.
    name: str

    def candidates(
        self, user_id: int, servers: Sequence[ServerAddress]
    ) -> list[ServerAddress]:
        """
        @param servers: the live servers, as L{cim.interfaces.IRegistry.servers}
            lists them (sorted).
        @return: every one of C{servers}, once, in the order to try them.
        """
        ...


class RoundRobin:
    """
    Start each login at the next server of the list.
    """

    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def candidates(
        self, user_id: int, servers: Sequence[ServerAddress]
    ) -> list[ServerAddress]:
        if not servers:
            return []
        start = self._next % len(servers)
        self._next = start + 1
        return list(servers[start:]) + list(servers[:start])


class RandomChoice:
    """
    Try the servers in a random order.

    @param rng: the source of randomness (seeded in tests).
    """

    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def candidates(
        self, user_id: int, servers: Sequence[ServerAddress]
    ) -> list[ServerAddress]:
        order = list(servers)
        self._rng.shuffle(order)
        return order


def hash32(text: str) -> int:
    """
    A 32-bit hash of C{text}: the first four bytes of its MD5, big-endian
    (as CIM hashes ring keys).
    """
    return int.from_bytes(hashlib.md5(text.encode("utf-8")).digest()[:4], "big")


class ConsistentHash:
    """
    A consistent-hash ring of the servers, with C{virtual_nodes} points per
    server (the hash of C{"host:port:http_port#i"}).  The ring is built
    again only when the server list differs from the one it was built for.
    """

    name = "consistent-hash"

    def __init__(self, virtual_nodes: int = VIRTUAL_NODES) -> None:
        self.virtual_nodes = virtual_nodes
        self._servers: tuple[ServerAddress, ...] | None = None
        self._points: list[int] = []
        self._owners: list[ServerAddress] = []
        #: How many times the ring was built (for tests).
        self.builds = 0

    def _ring(self, servers: Sequence[ServerAddress]) -> None:
        key = tuple(servers)
        if key == self._servers:
            return
        # Ties (astronomically rare) are broken by the server's name, so
        # every route builds the same ring.
        ring = sorted(
            (
                (hash32(f"{server}#{i}"), str(server), server)
                for server in key
                for i in range(self.virtual_nodes)
            ),
            key=lambda point: point[:2],
        )
        self._points = [point for point, _, _ in ring]
        self._owners = [server for _, _, server in ring]
        self._servers = key
        self.builds += 1

    def candidates(
        self, user_id: int, servers: Sequence[ServerAddress]
    ) -> list[ServerAddress]:
        if not servers:
            return []
        self._ring(servers)
        wanted = len(self._servers or ())
        start = bisect.bisect_left(self._points, hash32(str(user_id)))
        order: list[ServerAddress] = []
        seen: set[ServerAddress] = set()
        size = len(self._owners)
        for step in range(size):
            owner = self._owners[(start + step) % size]
            if owner not in seen:
                seen.add(owner)
                order.append(owner)
                if len(order) == wanted:
                    break
        return order


def make_balancer(name: str, rng: random.Random | None = None) -> Balancer:
    """
    The balancer called C{name} (one of L{BALANCERS}).

    @raise ValueError: no balancer has that name.
    """
    if name == "round-robin":
        return RoundRobin()
    if name == "random":
        return RandomChoice(rng)
    if name == "consistent-hash":
        return ConsistentHash()
    raise ValueError(
        f"unknown balancer {name!r}: expected one of {', '.join(BALANCERS)}"
    )
