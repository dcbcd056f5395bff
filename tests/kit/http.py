"""
JSON over HTTP to the daemons: L{call} with the reactor running (treq,
no persistent connections: daemons come and go), L{get_json} and
L{post_json} where no reactor runs (the benchmark's driver, fixtures that
run before the reactor does).
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool


def http_client(reactor: Any) -> HTTPClient:
    """
    A treq client without persistent connections.
    """
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, False)))


async def call(
    reactor: Any,
    url: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, Any]]:
    """
    POST C{body} as JSON to C{url} (GET without a body).

    @return: the HTTP status and the decoded JSON answer.
    """
    http = http_client(reactor)
    raw_headers: dict[bytes | str, list[bytes | str]] = {
        k.encode(): [v.encode()] for k, v in (headers or {}).items()
    }
    raw_headers[b"X-Cim-Extended"] = [b"1"]  # as cim's own clients
    if body is None:
        response = await http.get(url, headers=raw_headers, timeout=timeout)
    else:
        raw_headers[b"Content-Type"] = [b"application/json"]
        response = await http.post(
            url, data=json.dumps(body).encode(), headers=raw_headers, timeout=timeout
        )
    content = await response.content()
    return response.code, json.loads(content)


def get_json(url: str, timeout: float = 2.0) -> dict[str, Any]:
    """
    C{GET url}, blocking; @return: the decoded JSON answer.
    """
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body: dict[str, Any] = json.loads(r.read())
        return body


def post_json(
    url: str, body: dict[str, Any], headers: dict[str, str], timeout: float = 10.0
) -> dict[str, Any]:
    """
    C{POST} C{body} as JSON, blocking; @return: the decoded JSON answer.
    """
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode("utf-8"),
        headers={"Content-Type": "application/json", **headers},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as r:
        answer: dict[str, Any] = json.loads(r.read())
        return answer
