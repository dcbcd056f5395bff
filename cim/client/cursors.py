"""
The client's receive cursors.

Per conversation the client keeps two things:

  - the position of the server's stream (L{Position}: the epoch the server
    named at login or in an C{EPOCH} frame, and the highest seq received
    in it): what it acknowledges, and sends in C{LOGIN_REQUEST} so that a
    reconnect resumes exactly where it stopped;
  - per epoch tag (L{cim.message.ChatMessage.epoch}), the highest seq
    received with that tag: a message C{(tag, seq)} is new iff C{seq} is
    above it.  After a store lost messages, the server starts the
    conversation again from a lower seq of a new epoch: what was shown
    before keeps its tag, so nothing is shown twice and nothing new is
    hidden.

Both live in a small JSON file (with the user's last login token), so that
a restarted client resumes too.  A file of the previous release (a seq per
conversation, no epochs) still loads: its positions are of epoch C{""},
except those of the one-sided private inboxes C{u:<id>} of that release,
which are gone (their messages moved to the two-sided private
conversations, numbered anew).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from cim.client.statefile import read_json, route_slug, write_json
from cim.message import INBOX_PREFIX, Cursor, Position

#: The version number written in the file (1: seqs only, no epochs).
FORMAT_VERSION = 2
#: Epoch tags remembered per conversation (a store loses its messages
#: rarely; the oldest tags go first).
MAX_TAGS = 8

#: Where a conversation stands before anything was received.
NOWHERE = Position("", 0)


def state_path(
    state_dir: str | os.PathLike[str],
    user_id: int,
    device: str = "",
    route_url: str = "",
    account: str = "",
) -> Path:
    """
    The cursor file of C{user_id} under C{state_dir}: of its device
    C{device} (one named by the application), or of the device the folder
    keeps (C{""}; the file's name from before devices); in a folder of its
    route (C{cursors/<host_port>/}) when C{route_url} is given, so that
    two routes' users of one id never share one, and with the account's
    tag (L{cim.client.devices.account_tag}) when C{account} is given.
    """
    suffix = f"-{device}" if device else ""
    folder = Path(state_dir).expanduser()
    if route_url:
        user = f"{user_id}-{account}" if account else str(user_id)
        return folder / "cursors" / route_slug(route_url) / f"{user}{suffix}.json"
    return folder / f"cursors-{user_id}{suffix}.json"


def _seq(value: Any) -> int | None:
    """
    C{value} if it is a positive C{int} (not a C{bool}), else C{None}.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


class Received(NamedTuple):
    """
    What L{CursorFile.received} found about a message.

    @ivar moved: the stream's position moved (acknowledge it).
    @ivar new: the message was not received before (show it).
    """

    moved: bool
    new: bool


class CursorFile:
    """
    Per-conversation stream positions and seen seqs of one user, and the
    user's last login token (the proof that lets a restarted client replace
    its own stale session), saved to C{path}.

    Saving is atomic (a temporary file renamed over the old one) and happens
    at most once per C{interval} seconds after a change, and on L{close}.
    The file holds a login token, so it is readable by its owner only.

    @ivar cursors: conversation to the stream's L{Position}.
    @ivar seen: conversation to (epoch tag to the highest seq received with
        that tag).
    @ivar token: the last login token, or C{""}.
    """

    log = Logger()

    def __init__(
        self, clock: IReactorTime, path: Path | None = None, interval: float = 1.0
    ) -> None:
        """
        @param clock: for the save timer.
        @param path: where to keep the cursors; C{None} keeps them in memory.
        @param interval: the shortest time between two saves, in seconds.
        """
        self.clock = clock
        self.path = path
        self.interval = interval
        self.cursors: dict[str, Position] = {}
        self.seen: dict[str, dict[str, int]] = {}
        self.token = ""
        self._dirty = False
        self._last_save = float("-inf")
        self._timer: IDelayedCall | None = None
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        data = read_json(path, "cursor file")
        if data is None:
            return
        if not isinstance(data, dict):
            self.log.warn("Ignoring malformed cursor file {path}", path=str(path))
            return
        conversations = data.get("conversations")
        if isinstance(conversations, dict):
            for conversation, state in conversations.items():
                if isinstance(state, dict):
                    self._load_one(str(conversation), state)
        else:
            # The previous release's file: one seq per conversation.
            cursors = data.get("cursors", {})
            if isinstance(cursors, dict):
                for conversation, value in cursors.items():
                    seq = _seq(value)
                    if seq is not None and not conversation.startswith(INBOX_PREFIX):
                        self.cursors[str(conversation)] = Position("", seq)
                        self.seen[str(conversation)] = {"": seq}
        token = data.get("token", "")
        self.token = token if isinstance(token, str) else ""

    def _load_one(self, conversation: str, state: dict[str, Any]) -> None:
        epoch, seq = state.get("epoch", ""), _seq(state.get("seq"))
        if isinstance(epoch, str) and seq is not None:
            self.cursors[conversation] = Position(epoch, seq)
        seen = state.get("seen")
        if isinstance(seen, dict):
            tags = {
                str(tag): high
                for tag, value in seen.items()
                if (high := _seq(value)) is not None
            }
            if tags:
                self.seen[conversation] = tags

    def get(self, conversation: str) -> int:
        """
        The seq of C{conversation}'s stream (0 when nothing was received).
        """
        return self.cursors.get(conversation, NOWHERE).seq

    def position(self, conversation: str) -> Position:
        """
        Where C{conversation}'s stream stands (L{NOWHERE} when unknown).
        """
        return self.cursors.get(conversation, NOWHERE)

    def start(self, conversation: str, epoch: str, seq: int) -> bool:
        """
        The server (re)starts C{conversation}'s stream for this connection
        after C{seq} of C{epoch} (a login's or an C{EPOCH} frame's cursor).

        @return: whether the position changed.
        """
        position = Position(epoch, max(0, seq))
        if self.cursors.get(conversation) == position:
            return False
        self.cursors[conversation] = position
        self._changed()
        return True

    def received(self, conversation: str, tag: str, seq: int) -> Received:
        """
        Record that message C{seq} of C{conversation}, tagged with epoch
        C{tag}, was received.

        @return: whether the stream moved (to acknowledge) and whether the
            message is new (a duplicate must not be shown again).
        """
        stream = self.cursors.get(conversation)
        moved = False
        if stream is None:
            # Not announced (a conversation begun since login, sent from
            # its start): its first message names its epoch.
            self.cursors[conversation] = Position(tag, seq)
            moved = True
        elif seq > stream.seq:
            self.cursors[conversation] = Position(stream.epoch, seq)
            moved = True
        seen = self.seen.setdefault(conversation, {})
        new = seq > seen.get(tag, 0)
        if new:
            seen.pop(tag, None)  # newest last: the oldest tags go first
            seen[tag] = seq
            while len(seen) > MAX_TAGS:
                del seen[next(iter(seen))]
        if moved or new:
            self._changed()
        return Received(moved, new)

    def set_token(self, token: str) -> None:
        """
        Remember the latest login token.
        """
        if token != self.token:
            self.token = token
            self._changed()

    def cursor(self, conversation: str) -> Cursor:
        """
        The stream position of C{conversation} as acknowledged.
        """
        epoch, seq = self.position(conversation)
        return Cursor(conversation, seq, epoch)

    def as_list(self) -> list[Cursor]:
        """
        The stream positions as sent in C{LOGIN_REQUEST} (those past 0).
        """
        return [self.cursor(c) for c in sorted(self.cursors) if self.get(c) > 0]

    def _changed(self) -> None:
        self._dirty = True
        if self.path is None or self._timer is not None:
            return
        wait = max(0.0, self._last_save + self.interval - self.clock.seconds())
        self._timer = self.clock.callLater(wait, self._timed_save)

    def _timed_save(self) -> None:
        self._timer = None
        self.save()

    def as_json(self) -> dict[str, Any]:
        """
        What the file holds.
        """
        conversations: dict[str, dict[str, Any]] = {}
        for conversation in sorted(set(self.cursors) | set(self.seen)):
            state: dict[str, Any] = {}
            if conversation in self.cursors:
                epoch, seq = self.cursors[conversation]
                state["epoch"], state["seq"] = epoch, seq
            if self.seen.get(conversation):
                state["seen"] = dict(self.seen[conversation])
            conversations[conversation] = state
        return {
            "version": FORMAT_VERSION,
            "conversations": conversations,
            "token": self.token,
        }

    def save(self) -> None:
        """
        Write the file now if anything changed (errors are logged).
        """
        if self.path is None or not self._dirty:
            return
        self._dirty = False
        self._last_save = self.clock.seconds()
        try:
            write_json(self.path, self.as_json())
        except OSError as e:
            self._dirty = True
            self.log.warn(
                "Could not save cursors to {path}: {e}", path=str(self.path), e=e
            )

    def close(self) -> None:
        """
        Stop the timer and save what is pending.
        """
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        self.save()
