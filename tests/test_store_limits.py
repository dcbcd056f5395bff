"""
The store's side of the limits that keep one user from harming others
(issue 13), on every L{IStore} (the suite of C{test_store}): cursors are
integers whatever they are asked to store or find stored, a sender's
quota per conversation, sessions that expire unless renewed.
"""

from __future__ import annotations

import pytest_twisted

from cim.limits import MAX_SEQ
from cim.message import inbox
from tests import test_store
from tests.test_store import Backend

# The store suite's fixtures: every test runs on each store.
store_url = test_store.store_url
backend = test_store.backend

# Cursors


@pytest_twisted.ensureDeferred
async def test_cursors_are_stored_as_integers(backend: Backend) -> None:
    store = backend.store
    huge = 2**63 - 1
    await store.set_cursors(1, {inbox(1): huge, "g:a": 3, "g:b": MAX_SEQ})
    await store.set_many_cursors(
        {1: {"g:c": 2.5, "g:d": -4, "g:e": 0}, 2: {inbox(2): huge, "g:a": 7}}
    )
    # What is not an integer between 1 and MAX_SEQ is left out.
    assert await store.get_cursors(1) == {"g:a": 3, "g:b": MAX_SEQ}
    assert await store.get_cursors(2) == {"g:a": 7}
    if backend.redis is not None:
        stored = await backend.redis.execute_command(
            "HGET", backend.prefix + "cursors:1", "g:b"
        )
        assert stored == str(MAX_SEQ)
    # Raising still works on the stored integers.
    await store.set_cursors(1, {"g:b": MAX_SEQ - 1, "g:a": 4})
    assert await store.get_cursors(1) == {"g:a": 4, "g:b": MAX_SEQ}


@pytest_twisted.ensureDeferred
async def test_bad_stored_cursors_are_skipped(backend: Backend) -> None:
    """
    A value stored by an older version (a float's form) or written by hand
    never fails a login's read: it is left out.
    """
    store = backend.store
    await store.set_cursors(1, {inbox(1): 5})
    bad = ["9.2233720368547758e+18", "-3", "x", "", str(2**63 - 1), "1e3"]
    if backend.redis is not None:
        key = backend.prefix + "cursors:1"
        for i, value in enumerate(bad):
            await backend.redis.execute_command("HSET", key, f"g:{i}", value)
        # and the raising scripts cope with them too
        await store.set_cursors(1, {"g:0": 2, "g:2": 3})
        await store.set_many_cursors({1: {"g:1": 4}})
        assert await store.get_cursors(1) == {inbox(1): 5, "g:0": 2, "g:1": 4, "g:2": 3}
    else:
        assert await store.get_cursors(1) == {inbox(1): 5}
