"""
Hostile input against the frame receiver and the IM server's protocol:
random, truncated, oversized and valid-but-wrong frames.  No exception may
escape, and the server keeps serving everybody else.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cim.codec import encode, encode_framed, encode_varint
from cim.message import ChatMessage, Command, Cursor, Frame
from tests.serverkit import Peer, World

ROOT = Path(__file__).resolve().parent.parent

text = st.text(max_size=40)
ids = st.integers(min_value=-(2**63), max_value=2**63 - 1)

chat_messages = st.builds(
    ChatMessage,
    msg_id=ids,
    conversation=text,
    seq=ids,
    sender_id=ids,
    sender_name=text,
    text=text,
    timestamp=ids,
)

frames = st.builds(
    Frame,
    cmd=st.sampled_from(list(Command)),
    req_msg=text,
    request_id=ids,
    properties=st.dictionaries(text, text, max_size=3),
    batch=st.lists(text, max_size=3),
    token=text,
    client_msg_id=text,
    msg_id=ids,
    seq=ids,
    conversation=text,
    receive_user_id=ids,
    group_id=text,
    cursors=st.lists(st.builds(Cursor, conversation=text, seq=ids), max_size=3),
    messages=st.lists(chat_messages, max_size=2),
)

HYPOTHESIS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def still_serving(world: World) -> None:
    """
    A logged-in user still gets answers from the server.
    """
    peer, _ = world.login(f"witness{len(world.server.users)}")
    peer.send(Frame(cmd=Command.PING, req_msg="ping"))
    assert peer.received() == [Frame(cmd=Command.PING, req_msg="pong")]


@HYPOTHESIS
@given(data=st.binary(max_size=600), chunk=st.integers(min_value=1, max_value=64))
def test_random_bytes_before_login(data: bytes, chunk: int) -> None:
    world = World()
    peer = Peer(world.server, max_frame=256)
    for i in range(0, len(data), chunk):
        peer.protocol.dataReceived(data[i : i + chunk])
    still_serving(world)


@HYPOTHESIS
@given(data=st.binary(max_size=600), chunk=st.integers(min_value=1, max_value=64))
def test_random_bytes_after_login(data: bytes, chunk: int) -> None:
    world = World()
    peer, _ = world.login("target")
    for i in range(0, len(data), chunk):
        peer.protocol.dataReceived(data[i : i + chunk])
    still_serving(world)


@HYPOTHESIS
@given(sequence=st.lists(frames, max_size=6), login_first=st.booleans())
def test_valid_but_wrong_frames(sequence: list[Frame], login_first: bool) -> None:
    world = World()
    if login_first:
        peer, _ = world.login("target")
    else:
        peer = Peer(world.server)
    for frame in sequence:
        peer.protocol.dataReceived(encode_framed(frame))
    # Whatever was answered decodes, and the server still serves others.
    peer.received()
    still_serving(world)


@HYPOTHESIS
@given(frame=frames, cut=st.integers(min_value=0, max_value=200))
def test_truncated_frames(frame: Frame, cut: int) -> None:
    world = World()
    peer, _ = world.login("target")
    body = encode(frame)
    data = encode_varint(len(body)) + body
    peer.protocol.dataReceived(data[: min(cut, len(data))])
    peer.lose()
    still_serving(world)


def test_oversized_length_prefixes() -> None:
    world = World()
    for length in (64 * 1024 + 1, 2**31, 2**32 - 1):
        peer, _ = world.login("target")
        peer.protocol.dataReceived(encode_varint(length) + b"x" * 100)
        assert peer.closed
        peer.lose()
    still_serving(world)


def test_fuzz_target_short_run() -> None:
    """
    A short run of the atheris fuzz target (the long one is `make fuzz`).
    """
    result = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "fuzz_frames.py"), "-runs=20000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Done 20000 runs" in result.stderr
