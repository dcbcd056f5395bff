"""
Deliberately broken variants of the system, to prove that the simulator
catches what they break (tests/test_sim.py): each is a context manager
that patches one production method for its duration.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

BROKEN: dict[str, str] = {}


@contextmanager
def broken_system(name: str) -> Iterator[None]:
    raise KeyError(name)
    yield
