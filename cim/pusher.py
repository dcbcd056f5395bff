"""
Pushes (messages, read positions) to IM servers over their push API, one
batched request per server at a time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from zope.interface import implementer

from cim import pushapi
from cim.batch import Batcher
from cim.envelope import SUCCESS
from cim.interfaces import IPusher, IServerControl, ServerAddress
from cim.message import ChatMessage
from cim.pushapi import PushItem

#: Kept importable from here for the push API's users.
SECRET_HEADER = pushapi.SECRET_HEADER


class PushError(Exception):
    """
    A server answered a push with an error.
    """


@implementer(IPusher, IServerControl)
class HttpPusher:
    """
    Push to IM servers with an HTTP client (a L{treq.client.HTTPClient} or
    L{treq.testing.StubTreq}).  Pushes to one server that are made while a
    request to it is in flight are sent together in the next request.

    A push request that fails on the way (a pooled connection that the
    server's restart left stale, a time-out) is sent once more, on a new
    connection: a push is idempotent (a server writes each message of a
    conversation to a connection at most once), and the message of a lost
    push would wait for the recipient's next gap or login.
    """

    log = Logger()

    def __init__(self, http: HTTPClient, secret: str, timeout: float = 5.0) -> None:
        self._http = http
        self._secret = secret.encode("utf-8")
        self._timeout = timeout
        self._batchers: dict[str, Batcher[PushItem, list[int]]] = {}

    def push(
        self, server: str, messages: Sequence[ChatMessage], user_ids: Sequence[int]
    ) -> Deferred[list[int]]:
        return self._batcher(server).submit_deferred((messages, user_ids))

    def push_read(
        self,
        server: str,
        reader_id: int,
        conversation: str,
        seq: int,
        user_ids: Sequence[int],
    ) -> Deferred[list[int]]:
        event = pushapi.ReadEvent(reader_id, conversation, seq)
        return self._batcher(server).submit_deferred((event, user_ids))

    def _batcher(self, server: str) -> Batcher[PushItem, list[int]]:
        """
        The batcher of pushes to C{server}: pushes made while a request to
        it is in flight go together, in order, in the next request.
        """
        batcher = self._batchers.get(server)
        if batcher is None:
            batcher = self._batchers[server] = Batcher(
                partial(self._send, server), max_in_flight=2, max_batch=200
            )
        return batcher

    def _send(
        self, server: str, items: list[PushItem]
    ) -> Deferred[Sequence[list[int]]]:
        return ensureDeferred(self._post_twice(server, items))

    async def _post_twice(self, server: str, items: list[PushItem]) -> list[list[int]]:
        try:
            return await self._post(server, items)
        except PushError:
            raise
        except Exception as e:
            self.log.info(
                "Push to {server} failed ({error}); sending it again",
                server=server,
                error=str(e) or type(e).__name__,
            )
        return await self._post(server, items)

    async def _post(self, server: str, items: list[PushItem]) -> list[list[int]]:
        reply = await self._call(server, pushapi.PUSH, pushapi.push_request(items))
        if reply.get("code") != SUCCESS:
            raise PushError(f"{server}: {reply.get('code')} {reply.get('message')}")
        try:
            return pushapi.parse_push_reply(reply.get("dataBody"), len(items))
        except ValueError as e:
            raise PushError(f"{server}: {e}") from None

    def kick(
        self,
        server: str,
        user_id: int,
        session_id: str,
        reason: str,
        logged_off: bool = False,
    ) -> Deferred[dict[str, Any]]:
        request = pushapi.Kick(user_id, session_id, reason, logged_off).request()
        return ensureDeferred(self._call(server, pushapi.KICK, request))

    def resync(self, server: str, user_id: int) -> Deferred[dict[str, Any]]:
        request = pushapi.resync_request(user_id)
        return ensureDeferred(self._call(server, pushapi.RESYNC, request))

    async def _call(
        self, server: str, path: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        """
        POST C{body} to C{server}'s push API C{path}, with the cluster
        secret.  @return: the reply envelope.
        """
        address = ServerAddress.parse(server)
        response = await self._http.post(
            f"{address.push_url}/{path}",
            data=json.dumps(body, separators=(",", ":")).encode("utf-8"),
            headers=Headers(
                {
                    b"Content-Type": [b"application/json"],
                    pushapi.SECRET_HEADER: [self._secret],
                }
            ),
            timeout=self._timeout,
        )
        reply: dict[str, Any] = json.loads(await response.content())
        return reply
