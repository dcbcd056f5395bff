"""
The daemons' log of logins (the route's and the IM servers') and of new
accounts (the route's), at a price that does not grow with their rate.

Each log event costs a daemon about 200,000 instructions, a seventh of
the route's work for a login and a sixth of an IM server's (twistd's text
log formats a time stamp, a system name and the text of every event, and
writes it to the file at once).  A L{Lines}
writes an entry at once when it wrote none in the last C{window} seconds,
as one line of its own; entries coming faster are written together, at
the end of the window (or once C{most} are waiting), joined by C{"; "}
into one event.  A quiet daemon's log reads as one line per login; a busy
one's holds every login still, a few lines a second.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

#: Seconds between two log events of one kind, at most one event per window
#: (besides a full one).
WINDOW = 1.0
#: The most entries one log event holds.
MOST = 100


class Lines:
    """
    Entries of one kind (each a line's text) written to C{log} at most one
    event per C{window} seconds, besides full ones (C{most} entries).

    @ivar clock: the windows' clock; without one, every entry is written
        at once.
    """

    def __init__(
        self,
        log: Logger,
        clock: IReactorTime | None,
        window: float = WINDOW,
        most: int = MOST,
    ) -> None:
        self.log = log
        self.clock = clock
        self.window = window
        self.most = max(1, most)
        self._waiting: list[str] = []
        #: The end of the window, while one is open.
        self._window: IDelayedCall | None = None

    def add(self, entry: str) -> None:
        """
        Log C{entry}: at once when no window is open (opening one), else
        with the others of this window.
        """
        if self.clock is None:
            self._write([entry])
            return
        if self._window is None:
            self._write([entry])
            self._window = self.clock.callLater(self.window, self._lapsed)
            return
        waiting = self._waiting
        waiting.append(entry)
        if len(waiting) >= self.most:
            self.flush()

    def flush(self) -> None:
        """
        Write the entries waiting, now.
        """
        if self._waiting:
            waiting, self._waiting = self._waiting, []
            self._write(waiting)

    def stop(self) -> None:
        """
        Write the entries waiting and close the window.
        """
        if self._window is not None and self._window.active():
            self._window.cancel()
        self._window = None
        self.flush()

    def _lapsed(self) -> None:
        self._window = None
        if self._waiting:
            self.flush()
            # Busy: the next entries wait for the end of a window too.
            assert self.clock is not None
            self._window = self.clock.callLater(self.window, self._lapsed)

    def _write(self, entries: list[str]) -> None:
        self.log.info("{entries}", entries="; ".join(entries), count=len(entries))
