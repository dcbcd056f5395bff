"""
Shared fixtures.  Integration tests need the real Redis and ZooKeeper that
C{make test} starts (C{scripts/services.sh}); their addresses come from
C{CIM_TEST_REDIS} and C{CIM_TEST_ZK}.  Without them those tests are skipped,
except under CI, where a missing service is an error.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: needs the real Redis / ZooKeeper / processes"
    )


def _service(variable: str) -> str:
    url = os.environ.get(variable)
    if not url:
        if os.environ.get("CI"):
            pytest.fail(f"{variable} is not set; run the tests with `make test`")
        pytest.skip(f"{variable} is not set; run the tests with `make test`")
    return url


@pytest.fixture
def redis_url() -> str:
    """
    The URL of the test Redis (C{redis://host:port/db}).
    """
    return _service("CIM_TEST_REDIS")


@pytest.fixture
def zk_url() -> str:
    """
    The URL of the test ZooKeeper (C{zk://host:port/root}).
    """
    return _service("CIM_TEST_ZK")


@pytest.fixture
def reactor():  # type: ignore[no-untyped-def]
    """
    The global reactor that pytest-twisted runs.
    """
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def gc_restored() -> Iterator[None]:
    """
    Give the test process its collector's settings back after the test.
    """
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
