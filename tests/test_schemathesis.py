"""
The route's OpenAPI document (C{GET /openapi.json}) drives schemathesis
against a real C{twistd cim-standalone} (route and IM server in one process)
on a private Redis: a few hundred generated requests, valid and invalid,
carrying the cluster secret so that they reach past authorization.  No
answer may be a 5xx, and every answer (but C{/metrics}, Prometheus text,
and the document itself) must be CIM's JSON envelope.

schemathesis runs as its CLI, in a subprocess, with a check of our own
loaded from a hooks file this test writes; the check also records every
response, so that the test can count them.  The seed is fixed (set
C{CIM_SCHEMATHESIS_SEED} to explore others).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kit.cluster import Daemon, Processes
from tests.kit.services import RedisServer
from tests.test_faults import SECRET

pytestmark = pytest.mark.integration

ST = str(Path(sys.executable).with_name("st"))
#: Generated test cases per operation (29 operations).
EXAMPLES = 12

HOOKS = '''
"""schemathesis hooks of tests/test_schemathesis.py."""
import json
import os

import schemathesis

RECORD = os.environ["CIM_ST_RECORD"]
NOT_ENVELOPES = {"/metrics", "/openapi.json"}
KEYS = {"code", "message", "reqNo", "dataBody"}


@schemathesis.check
def cim_envelope(ctx, response, case):
    """Every answer is CIM's JSON envelope (HTTP 200, 404 or 405, or 503)."""
    with open(RECORD, "a") as record:
        record.write(f"{case.method} {case.path} {response.status_code}\\n")
    if case.path in NOT_ENVELOPES:
        return None
    content_type = response.headers.get("content-type", [""])[0]
    if not content_type.startswith("application/json"):
        raise AssertionError(f"Content-Type {content_type!r}, not JSON")
    try:
        body = json.loads(response.content)
    except ValueError as e:
        raise AssertionError(f"not JSON: {e}: {response.content[:200]!r}") from None
    if not isinstance(body, dict) or set(body) != KEYS:
        raise AssertionError(f"not an envelope: {response.content[:200]!r}")
    code = body["code"]
    if not (isinstance(code, str) and code.isdigit() and len(code) == 4):
        raise AssertionError(f"code {code!r} is not a 4-digit string")
    if not isinstance(body["message"], str):
        raise AssertionError(f"message {body['message']!r} is not a string")
    return None
'''


@pytest.fixture
def standalone(tmp_path: Path) -> Iterator[int]:
    """
    A C{twistd cim-standalone} on a private Redis; @return: its route's
    port.
    """
    processes = Processes(tmp_path)
    redis = RedisServer(tmp_path / "redis", processes)
    try:
        redis.start_blocking()
        daemon = Daemon(
            "standalone",
            "cim-standalone",
            ["--store", redis.url(), "--secret", SECRET],
            tmp_path,
            processes,
        )
        daemon.start()
        daemon.wait_ready_blocking()
        yield daemon.ports["route"]
        assert daemon.running, daemon.log_tail()
        log = daemon.log_text()
        assert "Unhandled" not in log and "Traceback" not in log, log[-5000:]
    finally:
        processes.stop_all()


def test_openapi_fuzzing(standalone: int, tmp_path: Path) -> None:
    hooks = tmp_path / "cim_hooks.py"
    hooks.write_text(HOOKS)
    record = tmp_path / "responses.txt"
    seed = os.environ.get("CIM_SCHEMATHESIS_SEED", "20261129")
    env = dict(os.environ, SCHEMATHESIS_HOOKS=str(hooks), CIM_ST_RECORD=str(record))
    result = subprocess.run(
        [ST, "run", f"http://127.0.0.1:{standalone}/openapi.json",
         "--checks", "not_a_server_error,cim_envelope",
         "--phases", "examples,fuzzing",
         "--max-examples", str(EXAMPLES),
         "--seed", seed,
         "--header", f"X-Cim-Secret: {SECRET}",
         "--request-timeout", "10",
         "--workers", "1",
         "--generation-database", "none",
         "--no-color"],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    responses = record.read_text().splitlines()
    statuses = Counter(line.rsplit(" ", 1)[1] for line in responses)
    paths = {line.split(" ")[1] for line in responses}
    # It really ran: a few hundred requests over every operation.
    assert 150 <= len(responses) <= 1500, (len(responses), output[-3000:])
    assert len(paths) >= 20, paths
    assert not [s for s in statuses if s.startswith("5")], statuses
    assert "cim_envelope" in output or "No issues found" in output, output[-3000:]
