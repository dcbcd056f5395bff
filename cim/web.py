"""
Web plumbing shared by the route and the IM servers' push API.
"""

from __future__ import annotations

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
