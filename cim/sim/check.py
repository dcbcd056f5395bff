"""
The invariants a run must end with, checked against the store's final
contents (the truth: what it still holds after any restore) and against
what each client instance showed its user.
"""

from __future__ import annotations

from collections import Counter

from cim.interfaces import ConversationState
from cim.message import BROADCAST, GROUP_PREFIX, ChatMessage, pair_members
from cim.sim.world import EPOCH_START, SESSION_TTL, Device, Recorder, World


def _t(seconds: float) -> str:
    return f"{seconds - EPOCH_START:.3f}"


def check(world: World) -> list[str]:
    out: list[str] = []
    store = world.store
    messages: dict[str, list[ChatMessage]] = {
        c: list(ms) for c, ms in sorted(store._messages.items())
    }

    # The store: no send stored twice.
    for conversation, ms in messages.items():
        counts = Counter(m.text for m in ms)
        for text, n in sorted(counts.items()):
            if n > 1:
                out.append(f"store: {text!r} stored {n} times in {conversation}")

    # Every acknowledged send is held (unless a restore lost it), as acked.
    held = {m.text: m for ms in messages.values() for m in ms}
    for text, sent in sorted(world.sends.items()):
        if sent.acked_at is None:
            continue
        # Appended between its send and its ack: lost if that was after a
        # backup that a restore brought back.
        lost_ok = any(
            sent.at <= at and sent.acked_at > taken for taken, at in world.restores
        )
        m = held.get(text)
        if m is None:
            if not lost_ok:
                out.append(
                    f"acked send {text!r} (acked at {_t(sent.acked_at)}) is not in the store"
                )
        elif m.conversation != sent.conversation:
            out.append(
                f"{text!r} stored in {m.conversation}, sent to {sent.conversation}"
            )
        elif sent.seq >= 0 and m.seq != sent.seq and not world.restores:
            out.append(f"{text!r} acked as seq {sent.seq} but stored as {m.seq}")

    # Daemons answer, devices meant to be in are in, last sends acked.
    for device in world.devices():
        if device.wanted and not device.ready:
            state = device.client.state.value if device.client else "none"
            out.append(f"{device.name} is meant to be logged in but is {state}")
    for count in world.finals:
        for text, sent in world.sends.items():
            if text.startswith(f"m{count}-") and sent.acked_at is None:
                out.append(f"the last message {text!r} was not acknowledged")

    # What each client instance showed.
    for device in world.devices():
        for recorder in device.recorders:
            out += _check_shown(world, device, recorder, messages)
        out += _check_oneshots(world, device, messages)

    # Read positions never pass the end of their conversation.
    for user in world.users:
        infos: list[ConversationState] = store.conversations(user.user_id).result  # type: ignore[attr-defined,assignment]
        for info in infos:
            if info.read > info.last_seq or info.unread < 0:
                out.append(
                    f"user {user.user_id} read {info.conversation} up to "
                    f"{info.read} of {info.last_seq} ({info.unread} unread)"
                )

    # Registry, sessions, cursors.
    addresses = sorted(str(s.address) for s in world.servers)
    registered = sorted(str(a) for a in world.board.servers())
    if registered != addresses:
        out.append(f"registry holds {registered}, servers are {addresses}")
    for device in world.devices():
        if not device.ready:
            continue
        client = device.client
        assert client is not None
        uid = device.user.user_id
        session = store._session(uid, device.device_id)
        host = client.server[0] if client.server else ""
        if session is None:
            out.append(f"{device.name} is connected but has no session in the store")
        elif not session.server.startswith(host + ":"):
            out.append(
                f"{device.name} is connected to {host} but its session names {session.server}"
            )
        holders = [
            s.name
            for s in world.servers
            if s.server is not None
            and s.server.connection(uid, device.device_id) is not None
        ]
        if len(holders) != 1:
            out.append(f"{device.name} is held by servers {holders}")
        for conversation, position in sorted(
            store._cursors.get((uid, device.device_id), {}).items()
        ):
            epoch = store._epochs.get(conversation)
            if epoch is not None and position.epoch == epoch.id:
                last = store._seqs.get(conversation, 0)
                if position.seq > last:
                    out.append(
                        f"{device.name}'s cursor of {conversation} is at {position.seq}, past the last seq {last}"
                    )
    for server in world.servers:
        if server.server is None:
            out.append(f"{server.name} is not running at the end")
            continue
        bound = sorted(
            (
                (conn.user_id, conn.device, conn.session_id)
                for conn in server.server.logged_in()
            ),
        )
        for uid, dev, session_id in bound:
            session = store._session(uid, dev)
            if session is None or session.session_id != session_id:
                # Only a connection whose client is gone may linger.
                owners = [
                    d
                    for d in world.devices()
                    if d.user.user_id == uid and d.device_id == dev and d.ready
                ]
                if owners:
                    out.append(
                        f"{server.name} holds {uid}/{dev} on session {session_id[:6]}, the store has "
                        f"{session.session_id[:6] if session else None}"
                    )
    return out


def _check_shown(
    world: World,
    device: Device,
    recorder: Recorder,
    messages: dict[str, list[ChatMessage]],
) -> list[str]:
    out: list[str] = []
    who = f"{device.name}#{recorder.instance}"
    uid = device.user.user_id
    seen: set[tuple[str, str, int]] = set()
    texts: Counter[str] = Counter()
    last: dict[tuple[str, str], int] = {}
    for s in recorder.shown:
        if s.conversation == BROADCAST or not s.conversation:
            if s.text in texts:
                out.append(f"{who} showed broadcast {s.text!r} twice")
            texts[s.text] += 1
            continue
        key = (s.conversation, s.epoch, s.seq)
        if key in seen:
            out.append(f"{who} showed {s.conversation} {s.epoch[:4]}:{s.seq} twice")
        seen.add(key)
        texts[s.text] += 1
        if texts[s.text] > 1 and not world.restores:
            out.append(f"{who} showed {s.text!r} twice")
        previous = last.get((s.conversation, s.epoch))
        if previous is not None and s.seq <= previous:
            out.append(
                f"{who} showed {s.conversation} {s.epoch[:4]}:{s.seq} after {previous} (out of order)"
            )
        last[(s.conversation, s.epoch)] = s.seq
        # Only to recipients.
        members = pair_members(s.conversation)
        if members is not None:
            if uid not in members:
                out.append(
                    f"{who} (user {uid}) was shown {s.text!r} of {s.conversation}"
                )
        elif s.conversation.startswith(GROUP_PREFIX):
            group = s.conversation[len(GROUP_PREFIX) :]
            if uid not in world.ever_members.get(group, set()):
                out.append(
                    f"{who} (user {uid}) was shown {s.text!r} of {s.conversation}, never a member"
                )
    if recorder is not device.recorder or not device.ready:
        return out
    # The instance connected at the end: everything the store holds of its
    # conversations, from where it started each to the end.
    store = world.store
    first = recorder.instance == 1
    shown_keys = {(s.conversation, s.epoch, s.seq) for s in recorder.shown}
    for conversation, ms in messages.items():
        if not ms or conversation == BROADCAST or conversation in world.oneshots:
            continue
        members = pair_members(conversation)
        if members is not None:
            if uid not in members:
                continue
            start = 0
        elif conversation.startswith(GROUP_PREFIX):
            record = store._groups.get(conversation[len(GROUP_PREFIX) :])
            if record is None or uid not in record.members:
                continue
            start = record.members[uid]
        else:
            continue
        mine = [m for m in ms if (conversation, m.epoch, m.seq) in shown_keys]
        if not (first and start == 0) or _joined_later(world, uid, conversation):
            # Not there from the start: from its first message here on.
            if not mine:
                out.append(
                    f"{who} showed nothing of {conversation} (last {ms[-1].seq}, {ms[-1].text!r})"
                )
                continue
            start = max(start, mine[0].seq - 1)
        missing = [
            m
            for m in ms
            if m.seq > start and (conversation, m.epoch, m.seq) not in shown_keys
        ]
        if missing:
            listed = ", ".join(f"{m.epoch[:4]}:{m.seq} {m.text!r}" for m in missing[:6])
            out.append(
                f"{who} never showed {len(missing)} of {conversation} after {start}: {listed}"
            )
    return out


def _check_oneshots(
    world: World, device: Device, messages: dict[str, list[ChatMessage]]
) -> list[str]:
    """
    Every acknowledged message of a one-message conversation of the
    device's user that the store holds was shown by some instance of the
    device: nothing later in the conversation would reveal it missing, so
    only its push (or a push sent again) or a login brings it.

    One case is excused, where the recipients get the message only at
    their next login: failed pushes are kept in the memory of the server
    that made them, so a message whose server crashed within the retry
    time after the send.  (A device connected while the store had lost its
    session, which deliveries found offline, is caught up by its server's
    next renewal: not excused.)
    """
    out: list[str] = []
    uid = device.user.user_id
    shown = {
        (s.conversation, s.epoch, s.seq) for r in device.recorders for s in r.shown
    }
    for conversation in sorted(world.oneshots):
        members = pair_members(conversation)
        if members is None or uid not in members:
            continue
        for m in messages.get(conversation, []):
            sent = world.sends.get(m.text)
            if sent is None or sent.acked_at is None:
                continue
            if any(
                host == sent.via and sent.at <= at <= sent.at + SESSION_TTL
                for at, host in world.crashes
            ):
                continue
            if (conversation, m.epoch, m.seq) not in shown:
                out.append(
                    f"{device.name} never showed {m.text!r}, the one message of "
                    f"{conversation} (acked at {_t(sent.acked_at)})"
                )
    return out


def _joined_later(world: World, uid: int, conversation: str) -> bool:
    """
    Whether C{uid} joined the group of C{conversation} during the run.
    """
    if not conversation.startswith(GROUP_PREFIX):
        return False
    return uid in world.joined_later.get(conversation[len(GROUP_PREFIX) :], set())
