"""
The daemons' garbage-collector pace (L{cim.gcpolicy}, C{--gc-young}).
"""

from __future__ import annotations

import gc
from typing import Any

import pytest
from twisted.python import usage

from cim import standalone
from cim.gcpolicy import GC_YOUNG, tune_gc
from cim.route import tap as route_tap
from cim.server import tap as server_tap

SECRET = "a-long-enough-secret"
TAPS = [server_tap, route_tap, standalone]


def _options(tap: Any, *args: str) -> usage.Options:
    options = tap.Options()
    common = ["--secret", SECRET, "--port", "0"]
    if tap is not standalone:
        common += ["--store", "memory:", "--registry", "local:"]
    options.parseOptions([*common, *args])
    return options


@pytest.mark.parametrize("tap", TAPS)
def test_every_daemon_takes_the_option(tap: Any) -> None:
    assert _options(tap)["gc-young"] == GC_YOUNG == 50_000
    assert _options(tap, "--gc-young", "700")["gc-young"] == 700
    for value, complaint in [
        ("99", "--gc-young must be between 100 and 100,000,000"),
        ("lots", "--gc-young must be an integer"),
    ]:
        with pytest.raises(usage.UsageError, match=complaint):
            _options(tap, "--gc-young", value)


@pytest.mark.parametrize("tap", TAPS)
def test_building_a_daemon_sets_the_pace(tap: Any, gc_restored: None) -> None:
    gc.set_threshold(2000)
    tap.makeService(_options(tap, "--gc-young", "12345"))
    assert gc.get_threshold()[0] == 12345


def test_what_exists_at_start_is_frozen(gc_restored: None) -> None:
    class Kept:
        pass

    kept = Kept()
    gc.unfreeze()
    tune_gc(3000)
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == 3000
    assert not any(o is kept for o in gc.get_objects())
    gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())
