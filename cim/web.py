"""
Web plumbing shared by the route and the IM servers' push API.
"""

from __future__ import annotations

from typing import Any

from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site


class QuietSite(Site):
    """
    A L{Site} that writes no access-log line per request: at thousands of
    requests a second the log line costs more than the request, and the
    daemons count requests in their metrics instead.
    """

    noisy = False

    def log(self, request: object) -> None:
        pass


def http_client(
    reactor: Any, per_host: int = 8
) -> tuple[HTTPClient, HTTPConnectionPool]:
    """
    A treq client over a persistent connection pool of its own, and the
    pool (close it with C{closeCachedConnections} when done).  Calls between
    daemons are not retried automatically: a push must not be sent twice
    by the HTTP layer.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = per_host
    pool.retryAutomatically = False
    return HTTPClient(Agent(reactor, pool=pool)), pool
