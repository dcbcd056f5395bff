"""
The client's receive cursors: per conversation, the highest sequence number
shown.  They are sent in C{LOGIN_REQUEST} so that a reconnect resumes exactly
where the client stopped, and kept in a small JSON file so that a restarted
client does too.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from cim.client.statefile import read_json, write_json
from cim.message import Cursor

#: The version number written in the file.
FORMAT_VERSION = 1


def state_path(state_dir: str | os.PathLike[str], user_id: int) -> Path:
    """
    The cursor file of C{user_id} under C{state_dir}.
    """
    return Path(state_dir).expanduser() / f"cursors-{user_id}.json"


class CursorFile:
    """
    Per-conversation cursors of one user, and the user's last login token
    (the proof that lets a restarted client replace its own stale session),
    saved to C{path}.

    Saving is atomic (a temporary file renamed over the old one) and happens
    at most once per C{interval} seconds after a change, and on L{close}.
    The file holds a login token, so it is readable by its owner only.

    @ivar cursors: conversation to highest seq received.
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
        self.cursors: dict[str, int] = {}
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
        cursors = data.get("cursors", {})
        if isinstance(cursors, dict):
            self.cursors = {
                str(c): int(s)
                for c, s in cursors.items()
                if isinstance(s, int) and not isinstance(s, bool) and s > 0
            }
        token = data.get("token", "")
        self.token = token if isinstance(token, str) else ""

    def get(self, conversation: str) -> int:
        """
        The cursor of C{conversation} (0 when nothing was received).
        """
        return self.cursors.get(conversation, 0)

    def advance(self, conversation: str, seq: int) -> bool:
        """
        Record that message C{seq} of C{conversation} was received.

        @return: C{True} when it is new (above the cursor), C{False} for a
            duplicate, which must not be shown again.
        """
        if seq <= self.cursors.get(conversation, 0):
            return False
        self.cursors[conversation] = seq
        self._changed()
        return True

    def set_token(self, token: str) -> None:
        """
        Remember the latest login token.
        """
        if token != self.token:
            self.token = token
            self._changed()

    def as_list(self) -> list[Cursor]:
        """
        The cursors as sent in C{LOGIN_REQUEST}.
        """
        return [Cursor(c, s) for c, s in sorted(self.cursors.items())]

    def _changed(self) -> None:
        self._dirty = True
        if self.path is None or self._timer is not None:
            return
        wait = max(0.0, self._last_save + self.interval - self.clock.seconds())
        self._timer = self.clock.callLater(wait, self._timed_save)

    def _timed_save(self) -> None:
        self._timer = None
        self.save()

    def save(self) -> None:
        """
        Write the file now if anything changed (errors are logged).
        """
        if self.path is None or not self._dirty:
            return
        self._dirty = False
        self._last_save = self.clock.seconds()
        data = {"version": FORMAT_VERSION, "cursors": self.cursors, "token": self.token}
        try:
            write_json(self.path, data)
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
