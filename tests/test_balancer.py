"""
Tests for L{cim.route.balancer}.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from cim.interfaces import ServerAddress
from cim.route.balancer import (
    BALANCERS,
    Balancer,
    ConsistentHash,
    RandomChoice,
    RoundRobin,
    hash32,
    make_balancer,
)

SERVERS = [ServerAddress(f"10.0.0.{i}", 11211, 8081) for i in range(1, 5)]
THREE = SERVERS[:3]
USERS = range(1, 3001)


def first_choices(
    balancer: Balancer, servers: list[ServerAddress]
) -> dict[int, ServerAddress]:
    return {uid: balancer.candidates(uid, servers)[0] for uid in USERS}


def assert_even(
    choices: dict[int, ServerAddress], servers: list[ServerAddress]
) -> None:
    """
    Each server got within 20% of its fair share.
    """
    counts = Counter(choices.values())
    fair = len(choices) / len(servers)
    assert set(counts) == set(servers)
    for server, count in counts.items():
        assert abs(count - fair) < 0.2 * fair, (server, counts)


@pytest.mark.parametrize("name", BALANCERS)
def test_candidates_are_every_server_once(name: str) -> None:
    balancer = make_balancer(name, random.Random(1))
    assert balancer.name == name
    for uid in range(1, 50):
        order = balancer.candidates(uid, SERVERS)
        assert sorted(order, key=str) == sorted(SERVERS, key=str)


@pytest.mark.parametrize("name", BALANCERS)
def test_no_servers_no_candidates(name: str) -> None:
    assert make_balancer(name).candidates(1, []) == []


def test_unknown_balancer() -> None:
    with pytest.raises(ValueError, match="round-robin, random, consistent-hash"):
        make_balancer("loop")


@pytest.mark.parametrize("name", BALANCERS)
def test_distribution_is_roughly_even(name: str) -> None:
    balancer = make_balancer(name, random.Random(42))
    assert_even(first_choices(balancer, THREE), THREE)


def test_round_robin_rotates() -> None:
    balancer = RoundRobin()
    assert [balancer.candidates(1, THREE) for _ in range(4)] == [
        THREE,
        THREE[1:] + THREE[:1],
        THREE[2:] + THREE[:2],
        THREE,
    ]
    assert Counter(first_choices(RoundRobin(), THREE).values()) == {
        s: 1000 for s in THREE
    }


def test_random_uses_its_rng() -> None:
    one = RandomChoice(random.Random(7))
    two = RandomChoice(random.Random(7))
    assert [one.candidates(1, SERVERS) for _ in range(5)] == [
        two.candidates(1, SERVERS) for _ in range(5)
    ]


def test_hash32_is_32_bits_of_md5() -> None:
    assert hash32("") == 0xD41D8CD9
    assert all(0 <= hash32(str(i)) < 2**32 for i in range(100))


def test_consistent_hash_is_stable_for_a_user() -> None:
    balancer = ConsistentHash()
    first = first_choices(balancer, THREE)
    assert first_choices(ConsistentHash(), THREE) == first
    # The order of the list does not matter either.
    assert first_choices(ConsistentHash(), list(reversed(THREE))) == first
    assert all(balancer.candidates(uid, THREE)[0] == first[uid] for uid in USERS)


def test_consistent_hash_ring_is_built_only_on_change() -> None:
    balancer = ConsistentHash()
    assert balancer.virtual_nodes >= 100
    for uid in range(100):
        balancer.candidates(uid, THREE)
    assert balancer.builds == 1
    balancer.candidates(1, list(THREE))  # an equal list
    assert balancer.builds == 1
    balancer.candidates(1, SERVERS)
    balancer.candidates(2, SERVERS)
    assert balancer.builds == 2


def test_adding_a_server_moves_about_a_quarter() -> None:
    before = first_choices(ConsistentHash(), THREE)
    after = first_choices(ConsistentHash(), SERVERS)
    moved = [uid for uid in USERS if before[uid] != after[uid]]
    assert 0.18 < len(moved) / len(USERS) < 0.32
    # Every user that moved went to the new server.
    assert {after[uid] for uid in moved} == {SERVERS[3]}


def test_removing_a_server_moves_only_its_users() -> None:
    before = first_choices(ConsistentHash(), SERVERS)
    gone = SERVERS[1]
    remaining = [s for s in SERVERS if s != gone]
    after = first_choices(ConsistentHash(), remaining)
    for uid in USERS:
        if before[uid] == gone:
            assert after[uid] in remaining
        else:
            assert after[uid] == before[uid]


def test_consistent_hash_fallback_is_where_the_user_goes_without_its_server() -> None:
    """
    A user's second candidate is the server it would get if its first one
    left: falling back keeps the ring consistent.
    """
    balancer = ConsistentHash()
    for uid in range(1, 300):
        first, second = balancer.candidates(uid, SERVERS)[:2]
        without = [s for s in SERVERS if s != first]
        assert ConsistentHash().candidates(uid, without)[0] == second
