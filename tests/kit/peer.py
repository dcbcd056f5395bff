"""
A cim library client in a process of its own, driven by JSON lines: for the
browser tests (L{tests.test_web}), whose playwright calls block the test's
thread, so that a client on the test's reactor could not run meanwhile.

    python -m tests.kit.peer ROUTE_URL NAME PASSWORD

Standard output: one JSON object a line: C{{"ready": userId}} once logged
in, C{{"message": {...}}} for each message received (the route's JSON form,
L{cim.message.message_to_dict}), C{{"acked": clientMsgId, "seq": n}} for each
send stored, C{{"error": "..."}}.  Standard input: C{{"private": userId,
"text": "..."}}, C{{"group": groupId, "text": "..."}}, C{{"join":
groupId}}, C{{"read": conversation, "seq": n}}.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import stdio, task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.protocols.basic import LineReceiver

from cim.client.library import Client, ClientListener
from cim.message import ChatMessage, message_to_dict


def say(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class Printer(ClientListener):
    def message_received(self, message: ChatMessage) -> None:
        say(message=message_to_dict(message))

    def error_received(self, code: int, reason: str, client_msg_id: str) -> None:
        say(error=f"{code} {reason}")


class Commands(LineReceiver):
    delimiter = b"\n"

    def __init__(self, client: Client, done: Deferred[None]) -> None:
        self.client = client
        self.done = done

    def lineReceived(self, line: bytes) -> None:
        ensureDeferred(self.run(json.loads(line))).addErrback(
            lambda f: say(error=f.getErrorMessage())
        )

    async def run(self, command: dict[str, Any]) -> None:
        if "private" in command:
            ack = await self.client.send_private(
                int(command["private"]), command["text"]
            )
            say(acked=ack.client_msg_id, seq=ack.seq)
        elif "group" in command:
            ack = await self.client.send_group(command["group"], command["text"])
            say(acked=ack.client_msg_id, seq=ack.seq)
        elif "join" in command:
            joined = await self.client.join_group(command["join"])
            say(joined=joined.joined)
        elif "read" in command:
            self.client.mark_read(command["read"], int(command["seq"]))

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(None)


async def main(reactor: Any, url: str, name: str, password: str) -> None:
    client = Client(reactor, url, listener=Printer(), device="peer")
    await client.login(name, password)
    say(ready=client.user_id)
    done: Deferred[None] = Deferred()
    stdio.StandardIO(Commands(client, done))
    await done
    await client.close()


if __name__ == "__main__":
    task.react(lambda reactor: ensureDeferred(main(reactor, *sys.argv[1:4])))
