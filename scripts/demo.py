"""
`make demo`: start a standalone cim node, have two scripted clients
register, exchange private and group messages, read them (with read
receipts and unread counts), page through a private conversation's history
and list the online users, print the transcript, and exit 0 only if every
message arrived.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from twisted.internet import defer, task

from cim.client.library import Client, QueueListener
from cim.message import ChatMessage

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def say(line: str) -> None:
    print(line, flush=True)


async def next_message(
    reactor, client: Client, listener: QueueListener, timeout: float = 10.0
) -> ChatMessage:  # type: ignore[no-untyped-def]
    """
    The next message from someone else (a client gets its own messages
    back too: they are skipped).
    """
    deadline = reactor.seconds() + timeout
    while reactor.seconds() < deadline:
        while listener.messages.pending:
            message = listener.messages.pending.pop(0)
            if message.sender_id != client.user_id:
                return message
        await task.deferLater(reactor, 0.02, lambda: None)
    raise TimeoutError("no message arrived in time")


async def next_read(
    reactor, listener: QueueListener, timeout: float = 10.0
) -> tuple[int, str, int]:  # type: ignore[no-untyped-def]
    """
    The next read position the listener hears of.
    """
    deadline = reactor.seconds() + timeout
    while reactor.seconds() < deadline:
        if listener.reads.pending:
            return listener.reads.pending.pop(0)
        await task.deferLater(reactor, 0.02, lambda: None)
    raise TimeoutError("no read receipt arrived in time")


async def run(reactor, route_url: str, state: str) -> bool:  # type: ignore[no-untyped-def]
    alice_events, bob_events = QueueListener(), QueueListener()
    alice = Client(
        reactor, route_url, listener=alice_events, state_dir=f"{state}/alice"
    )
    bob = Client(reactor, route_url, listener=bob_events, state_dir=f"{state}/bob")
    ok = True
    try:
        await alice.login("alice")
        say(f"alice logged in as user {alice.user_id} on {alice.server}")
        await bob.login("bob")
        say(f"bob logged in as user {bob.user_id} on {bob.server}")

        online = await alice.online_users()
        names = sorted(u.user_name for u in online)
        say(f"online users: {', '.join(names)}")
        ok &= names == ["alice", "bob"]

        assert bob.user_id is not None and alice.user_id is not None
        ack = await alice.send_private(bob.user_id, "hi bob :smile:")
        say(
            f"alice -> bob: 'hi bob :smile:' (stored as #{ack.seq} of {ack.conversation})"
        )
        got = await next_message(reactor, bob, bob_events)
        say(f"bob got from {got.sender_name}: {got.text!r}")
        ok &= (got.sender_name, got.text) == ("alice", "hi bob :smile:")
        await bob.conversations()
        say(f"bob has {bob.unread(got.conversation)} unread message(s) from alice")
        bob.mark_read(got.conversation, got.seq)
        reader, _, seq = await next_read(reactor, alice_events)
        say(f"alice's read receipt: user {reader} read up to #{seq}")
        ok &= (reader, seq) == (bob.user_id, got.seq)

        await bob.send_private(alice.user_id, "hello alice")
        got = await next_message(reactor, alice, alice_events)
        say(f"alice got from {got.sender_name}: {got.text!r}")
        ok &= (got.sender_name, got.text) == ("bob", "hello alice")
        history = await alice.history(peer=bob.user_id)
        say("alice's history with bob: " + ", ".join(repr(m.text) for m in history))
        ok &= [m.text for m in history] == ["hi bob :smile:", "hello alice"]

        await alice.create_group("demo")  # by invitation
        await alice.invite_to_group("demo", bob.user_id)
        await bob.join_group("demo")
        await alice.send_group("demo", "welcome to the group")
        got = await next_message(reactor, bob, bob_events)
        say(f"bob got in group {got.group_id}: {got.text!r} from {got.sender_name}")
        ok &= got.text == "welcome to the group"
    except Exception as e:
        say(f"demo failed: {e!r}")
        ok = False
    finally:
        await alice.close()
        await bob.close()
    return ok


def main() -> int:
    route_port, server_port, http_port = free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="cim-demo-") as state:
        log = Path(state) / "standalone.log"
        twistd = str(Path(sys.executable).with_name("twistd"))
        node = subprocess.Popen(
            [twistd, "-n", "--pidfile", "", "--logfile", str(log), "cim-standalone",
             "--port", str(server_port), "--http-port", str(http_port),
             "--route-port", str(route_port), "--ws-port", str(free_port())],
            cwd=ROOT,
            env=dict(os.environ),
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    urllib.request.urlopen(
                        f"http://127.0.0.1:{route_port}/health", timeout=1
                    )
                    break
                except OSError:
                    if time.monotonic() > deadline or node.poll() is not None:
                        say("the standalone node did not start:\n" + log.read_text())
                        return 1
                    time.sleep(0.1)
            say(f"standalone node up: route :{route_port}, server :{server_port}")
            result: list[bool] = []

            def go(reactor):  # type: ignore[no-untyped-def]
                d = defer.ensureDeferred(
                    run(reactor, f"http://127.0.0.1:{route_port}", state)
                )
                return d.addCallback(result.append)

            try:
                task.react(go)
            except SystemExit:
                pass
            ok = bool(result and result[0])
            say("demo passed: every message arrived" if ok else "demo FAILED")
            return 0 if ok else 1
        finally:
            node.terminate()
            node.wait(10)


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """
    The demo takes no option; C{--help} says what it does.
    """
    parser = argparse.ArgumentParser(
        prog="scripts/demo.py",
        description=(
            "Start a standalone cim node on free ports, have two scripted "
            "clients (alice and bob) chat privately and in a group, read "
            "each other's messages and page through the history, print the "
            "transcript, and exit 0 only if every message arrived (make demo)."
        ),
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_arguments(sys.argv[1:])
    sys.exit(main())
