"""
Where users' sessions are, as a delivery last looked them up, kept for as
long as the store says they have not changed (L{SessionCache}).

Why a copy is exact: the store gives every user a session generation,
raised by every change of the user's sessions (a claim, an activation, a
release, a drop of a server's sessions, a session made again by a
renewal), and read in the same atomic step as what it goes with: by the
session lookup (L{cim.interfaces.FoundSessions}) with the sessions, and by
the append (L{cim.interfaces.Appended}) right after storing the messages,
for the users of their private conversations.  So a copy looked up at
generation I{g} whose user the append read at I{g} too is what a lookup
made right after the append would have read, and a delivery that uses it
reaches every device that a lookup would have: the ordering argument of a
lookup after the append holds unchanged (a device claimed after the
append reads the messages at its login).  Generations are compared only
within one run of the store (the Redis C{run_id}; a restored backup, a
restart or a failover is another run, whose generations may have gone
back): when the run changes, the copies are forgotten.

What a generation does not follow is a session record that expires by
itself (its server stopped renewing it, or Redis was away): a copy then
names a session more than the store, and the delivery pushes once to a
server that writes to the device if it still holds it (a push is
idempotent), or finds it gone.  A device that stays connected while the
store lost its session may so get live messages a lookup would have
missed; its server's next renewal catches it up as before.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

from cim.interfaces import Generations, Session

__all__ = ["SessionCache"]

_NONE: list[Session] = []


class SessionCache:
    """
    User id -> (session generation, connected sessions), for at most
    C{size} users; past that, the entries remembered first go first.

    @ivar run: the store run the entries are of.
    @ivar hits: users found here, over the cache's life.
    @ivar misses: users that had to be looked up.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a session cache holds at least one user")
        self.size = size
        self.run = ""
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[int, tuple[int, list[Session]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def flush(self, run: str = "") -> None:
        """
        Forget every entry: they were of another run than C{run}.
        """
        self._entries.clear()
        self.run = run

    def remember(
        self, found: Mapping[int, list[Session]], generations: Generations | None
    ) -> None:
        """
        Keep what a lookup C{found} for each user of C{generations} (read
        with it): a user it does not list has no connected session.
        """
        if generations is None or not generations.run:
            return
        if generations.run != self.run:
            self.flush(generations.run)
        entries = self._entries
        size = self.size
        for user_id, generation in generations.of.items():
            if user_id not in entries and len(entries) >= size:
                entries.popitem(last=False)
            entries[user_id] = (generation, found.get(user_id, _NONE))

    def find(
        self, users: Sequence[int], generations: Generations | None
    ) -> tuple[dict[int, list[Session]], list[int]]:
        """
        The sessions of those of C{users} whose entry has the generation
        C{generations} gives (those with none left out, as a lookup
        does), and the others, to look up.
        """
        if generations is None or not generations.run:
            self.misses += len(users)
            return {}, list(users)
        if generations.run != self.run:
            self.flush(generations.run)
        of = generations.of
        entries = self._entries
        found: dict[int, list[Session]] = {}
        missed: list[int] = []
        for user_id in users:
            entry = entries.get(user_id)
            if entry is None or entry[0] != of.get(user_id):
                missed.append(user_id)
            elif entry[1]:
                found[user_id] = entry[1]
        self.misses += len(missed)
        self.hits += len(users) - len(missed)
        return found, missed
