"""
Pushes to IM servers over their push API, one batched request per server at
a time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial

from twisted.internet.defer import Deferred, ensureDeferred
from zope.interface import implementer

from cim.batch import Batcher
from cim.interfaces import IPusher, IServerControl, ServerAddress
from cim.message import ChatMessage, message_to_dict

#: The header carrying the cluster secret between daemons.
SECRET_HEADER = b"X-Cim-Secret"

_Item = tuple[Sequence[ChatMessage], Sequence[int]]


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
    """

    def __init__(self, http, secret: str, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
        self._http = http
        self._secret = secret.encode("utf-8")
        self._timeout = timeout
        self._batchers: dict[str, Batcher[_Item, list[int]]] = {}

    def push(
        self, server: str, messages: Sequence[ChatMessage], user_ids: Sequence[int]
    ) -> Deferred[list[int]]:
        batcher = self._batchers.get(server)
        if batcher is None:
            batcher = self._batchers[server] = Batcher(
                partial(self._send, server), max_in_flight=2, max_batch=200
            )
        return batcher.submit_deferred((messages, user_ids))

    def _send(self, server: str, items: list[_Item]) -> Deferred[Sequence[list[int]]]:
        return ensureDeferred(self._post(server, items))

    async def _post(self, server: str, items: list[_Item]) -> list[list[int]]:
        body = {
            "items": [
                {
                    "messages": [message_to_dict(m) for m in messages],
                    "users": list(users),
                }
                for messages, users in items
            ]
        }
        reply = await self._call(server, "push", body)
        if reply.get("code") != "9000":
            raise PushError(f"{server}: {reply.get('code')} {reply.get('message')}")
        missing = reply["dataBody"]["missing"]
        if len(missing) != len(items):
            raise PushError(f"{server}: answered {len(missing)} of {len(items)} items")
        return [list(m) for m in missing]

    def kick(
        self,
        server: str,
        user_id: int,
        session_id: str,
        reason: str,
        logged_off: bool = False,
    ) -> Deferred:
        """
        Ask C{server} to close C{user_id}'s connection if it still belongs to
        C{session_id} (C{logged_off}: because the user logged off).
        @return: a Deferred firing with the reply envelope.
        """
        body: dict[str, object] = {
            "userId": user_id,
            "sessionId": session_id,
            "reason": reason,
        }
        if logged_off:
            body["loggedOff"] = True
        return ensureDeferred(self._call(server, "kick", body))

    def resync(self, server: str, user_id: int) -> Deferred:
        """
        Ask C{server} to send C{user_id} any stored message it has not got.
        """
        return ensureDeferred(self._call(server, "resync", {"userId": user_id}))

    async def _call(self, server: str, path: str, body: dict) -> dict:
        """
        POST C{body} to C{server}'s push API C{path}, with the cluster
        secret.  @return: the reply envelope.
        """
        address = ServerAddress.parse(server)
        response = await self._http.post(
            f"http://{address.host}:{address.http_port}/{path}",
            data=json.dumps(body, separators=(",", ":")).encode("utf-8"),
            headers={
                b"Content-Type": [b"application/json"],
                SECRET_HEADER: [self._secret],
            },
            timeout=self._timeout,
        )
        reply: dict = json.loads(await response.content())
        return reply
