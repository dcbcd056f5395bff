"""
Slow failure and slow shutdown (issue 13 item 11), on real processes: a
route and a server on a private Redis (and ZooKeeper), which a test kills
(C{kill -9}) or freezes (C{SIGSTOP}):

  - with Redis dead, C{/health} answers 503 within a second, and a
    C{/login} answers 4000 "the store is unavailable" within a second
    (the store fails at once while its connections are down, instead of
    waiting for its time-out);
  - once Redis is back, logins and chats work again;
  - with Redis dead or frozen, or ZooKeeper dead, C{SIGTERM} makes the
    daemons exit within C{--shutdown-timeout} (and a little), the step
    that was cut named in the log.
"""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from cim.client.errors import LoginError
from tests.kit.cluster import Cluster, Daemon
from tests.kit.http import call
from tests.kit.services import ZooKeeperServer
from tests.kit.wait import wait_until
from tests.test_faults import (
    Lab,
    Member,
    assert_chats,
    assert_no_unhandled_errors,
    clients,  # noqa: F401 (a fixture)
    login_member,
    private_zk,  # noqa: F401 (a fixture)
    procs,  # noqa: F401 (a fixture)
)

pytestmark = pytest.mark.integration

#: The daemons' defaults.
STORE_TIMEOUT = 3.0
SHUTDOWN_TIMEOUT = 5.0
#: What exiting may take beyond the shutdown deadline: the stop's grace
#: (1 s), the reactor's own shutdown, the interpreter's exit.
EXIT_MARGIN = 2.5


async def timed_call(
    reactor: Any, url: str, body: dict[str, Any] | None = None
) -> tuple[float, int, dict[str, Any]]:
    start = time.monotonic()
    status, answer = await call(reactor, url, body, timeout=30)
    return time.monotonic() - start, status, answer


async def register(reactor: Any, cluster: Cluster) -> dict[str, Any]:
    name = f"u{uuid.uuid4().hex[:10]}"
    _, reply = await call(reactor, f"{cluster.url}/registerAccount", {"userName": name})
    assert reply["code"] == "9000", reply
    login = {"userId": reply["dataBody"]["userId"], "userName": name}
    if "accountKey" in reply["dataBody"]:
        login["accountKey"] = reply["dataBody"]["accountKey"]
    return login


async def wait_health(reactor: Any, cluster: Cluster, status: int) -> None:
    """
    Wait until the route's C{/health} answers with C{status}.
    """

    async def check() -> bool:
        got, _ = await call(reactor, f"{cluster.url}/health", timeout=30)
        return got == status

    await wait_until(
        reactor, check, f"/health to answer {status}", 30, 0.1, errors=(Exception,)
    )


async def sigterm_exits(reactor: Any, daemon: Daemon, bound: float) -> float:
    """
    C{SIGTERM} C{daemon}; @return: how long it took to exit (at most
    C{bound} seconds, or the test fails).
    """
    assert daemon.process is not None
    start = time.monotonic()
    daemon.signal(signal.SIGTERM)
    await wait_until(
        reactor,
        lambda: daemon.process is not None and daemon.process.poll() is not None,
        f"{daemon.name} to exit",
        bound + 10,
        0.05,
    )
    took = time.monotonic() - start
    assert took <= bound, f"{daemon.name} took {took:.1f}s:\n{daemon.log_tail()}"
    return took


@pytest_twisted.ensureDeferred
async def test_redis_down_fast_answers_then_recovery_then_shutdown(
    reactor: Any,
    procs: Lab,  # noqa: F811
    clients: Any,  # noqa: F811
    zk_url: str,
) -> None:
    redis, cluster = await procs.redis_cluster(reactor, zk_url, servers=1)
    known = await register(reactor, cluster)
    alice = await login_member(reactor, procs, cluster, f"a-{uuid.uuid4().hex[:6]}")
    bob = await login_member(reactor, procs, cluster, f"b-{uuid.uuid4().hex[:6]}")
    await assert_chats(reactor, alice, bob)

    redis.kill()
    await wait_health(reactor, cluster, 503)
    for _ in range(3):
        took, status, answer = await timed_call(reactor, f"{cluster.url}/health")
        assert status == 503 and answer["code"] == "4000", answer
        assert answer["dataBody"]["store"] != "ok"
        assert took < 1.0, took
        took, status, answer = await timed_call(reactor, f"{cluster.url}/login", known)
        assert answer["code"] == "4000", answer
        assert answer["message"] == "the store is unavailable"
        assert took < 1.0, took

    # Redis back (on its append-only file): everything works again.
    await redis.start(reactor)
    await wait_health(reactor, cluster, 200)
    # The server's own store connection may come back a moment after the
    # route's: until then a TCP login is answered 9200 (the store is
    # unavailable), never an internal error.
    carols: list[Member] = []
    carol_name = f"c-{uuid.uuid4().hex[:6]}"

    async def carol_logs_in() -> bool:
        try:
            carols.append(await login_member(reactor, procs, cluster, carol_name))
        except LoginError as e:
            assert e.code == "9200", e
            raise
        return True

    await wait_until(reactor, carol_logs_in, "a login", errors=(LoginError,))
    [carol] = carols
    dave = await login_member(reactor, procs, cluster, f"d-{uuid.uuid4().hex[:6]}")
    await assert_chats(reactor, carol, dave)
    _, _, answer = await timed_call(reactor, f"{cluster.url}/login", known)
    assert answer["code"] == "9000", answer
    assert_no_unhandled_errors(cluster)

    # Redis dead again: both daemons exit promptly on SIGTERM.
    redis.kill()
    await wait_health(reactor, cluster, 503)
    for daemon in cluster.daemons():
        await sigterm_exits(reactor, daemon, SHUTDOWN_TIMEOUT + EXIT_MARGIN)


@pytest_twisted.ensureDeferred
async def test_frozen_redis_shutdown_is_cut_at_the_deadline(
    reactor: Any,
    procs: Lab,  # noqa: F811
    clients: Any,  # noqa: F811
    zk_url: str,
) -> None:
    """
    A Redis that accepts but never answers (SIGSTOP): the server's stop
    waits for its session releases until C{--shutdown-timeout}, no longer,
    though the store's time-out is longer.
    """
    args = ["--store-timeout", "30", "--shutdown-timeout", "2"]
    redis, cluster = await procs.redis_cluster(
        reactor, zk_url, servers=1, server_args=args, route_args=args
    )
    await login_member(reactor, procs, cluster, f"a-{uuid.uuid4().hex[:6]}")
    assert redis.process is not None
    redis.process.send_signal(signal.SIGSTOP)
    try:
        server = cluster.servers["server1"].daemon
        await sigterm_exits(reactor, server, 2 + EXIT_MARGIN)
        assert "did not finish within the shutdown timeout (2s)" in server.log_text()
        await sigterm_exits(reactor, cluster.route, 2 + EXIT_MARGIN)
    finally:
        redis.process.send_signal(signal.SIGCONT)


@pytest_twisted.ensureDeferred
async def test_zookeeper_down_shutdown(
    reactor: Any,
    private_zk: ZooKeeperServer,  # noqa: F811
    procs: Lab,  # noqa: F811
    clients: Any,  # noqa: F811
    redis_url: str,
    tmp_path: Path,
) -> None:
    registry = f"zk://{private_zk.hosts}/cim-{uuid.uuid4().hex[:8]}"
    cluster = await procs.cluster(redis_url, registry).start(servers=1)
    await login_member(reactor, procs, cluster, f"a-{uuid.uuid4().hex[:6]}")
    private_zk.kill()
    for daemon in cluster.daemons():
        await sigterm_exits(reactor, daemon, SHUTDOWN_TIMEOUT + EXIT_MARGIN)
