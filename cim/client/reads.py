"""
Read state as the client sees it: per conversation, how far this user has
read (on any of its devices), how many messages from others it has not
read, and how far the other user of a private conversation has read (read
receipts).

The route's C{/conversations} gives a snapshot at login
(L{ReadState.load}); from then on the client keeps it live: a new message
from someone else raises the unread count, one of the user's own (from any
device) marks everything before it read, and the server's C{READ} frames
raise the read positions of the user and of its peers.  Positions only
rise, as in the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from cim.message import BROADCAST, GROUP_PREFIX, ChatMessage, peer_of


@dataclass(slots=True)
class ConversationInfo:
    """
    Where this user stands in one conversation.

    @ivar epoch: the conversation's epoch (as the route last said).
    @ivar last_seq: the highest seq known.
    @ivar read: this user's read position.
    @ivar unread: how many messages from others after C{read}.
    @ivar peer_id: the other user of a private conversation (this user for
        its notes to itself), else C{None}.
    @ivar peer_name: its name, when the route gave it.
    @ivar peer_read: its read position.
    @ivar group_id: the group of a group conversation, else C{""}.
    """

    conversation: str
    epoch: str = ""
    last_seq: int = 0
    read: int = 0
    unread: int = 0
    peer_id: int | None = None
    peer_name: str = ""
    peer_read: int = 0
    group_id: str = ""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConversationInfo:
        """
        Parse one entry of the route's C{/conversations} answer.

        @raise ValueError: a field is missing or has the wrong type.
        """
        try:
            peer = data.get("peerId")
            return cls(
                conversation=str(data["conversation"]),
                epoch=str(data.get("epoch") or ""),
                last_seq=int(data.get("lastSeq", 0)),
                read=int(data.get("read", 0)),
                unread=int(data.get("unread", 0)),
                peer_id=None if peer is None else int(peer),
                peer_name=str(data.get("peerName") or ""),
                peer_read=int(data.get("peerRead", 0)),
                group_id=str(data.get("groupId") or ""),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"bad conversation: {e}") from None


@dataclass(slots=True)
class _Tracked:
    """
    A conversation's state, the snapshot it came from, and the seqs of the
    messages from others received since.
    """

    info: ConversationInfo
    snapshot_last: int = 0
    snapshot_unread: int = 0
    live: list[int] = field(default_factory=list)
    others: dict[int, int] = field(default_factory=dict)

    def recount(self) -> None:
        info = self.info
        counted = min(self.snapshot_unread, max(0, self.snapshot_last - info.read))
        info.unread = counted + sum(1 for seq in self.live if seq > info.read)


class ReadState:
    """
    The read state of the logged-in user's conversations.
    """

    def __init__(self) -> None:
        self.user_id = 0
        self._tracked: dict[str, _Tracked] = {}

    def reset(self, user_id: int) -> None:
        """
        Forget everything: C{user_id} logs in.
        """
        self.user_id = user_id
        self._tracked = {}

    def load(self, infos: list[ConversationInfo]) -> None:
        """
        Take the route's snapshot: it replaces what was known, except read
        positions that rose since (they never fall) and messages from
        others received after the snapshot was taken.
        """
        for info in infos:
            old = self._tracked.get(info.conversation)
            info = replace(info)
            tracked = _Tracked(info, info.last_seq, info.unread)
            if old is not None and old.info.epoch in ("", info.epoch):
                info.read = max(info.read, old.info.read)
                info.peer_read = max(info.peer_read, old.info.peer_read)
                info.last_seq = max(info.last_seq, old.info.last_seq)
                tracked.live = [s for s in old.live if s > tracked.snapshot_last]
                tracked.others = dict(old.others)
            tracked.recount()
            self._tracked[info.conversation] = tracked

    def _track(self, conversation: str) -> _Tracked:
        tracked = self._tracked.get(conversation)
        if tracked is None:
            group = ""
            if conversation.startswith(GROUP_PREFIX):
                group = conversation[len(GROUP_PREFIX) :]
            info = ConversationInfo(
                conversation,
                peer_id=peer_of(conversation, self.user_id),
                group_id=group,
            )
            tracked = self._tracked[conversation] = _Tracked(info)
        return tracked

    def message(self, message: ChatMessage) -> bool:
        """
        A new message arrived: count it unread if it is from someone else.
        Writing in a conversation reads it (the store raises a sender's
        read position when it appends): the sender's read position rises
        to the message.

        @return: whether the sender's read position rose (so that the
            listeners hear of a reply as a read receipt).
        """
        conversation = message.conversation
        if not conversation or conversation == BROADCAST or message.seq <= 0:
            return False
        tracked = self._track(conversation)
        info = tracked.info
        if message.seq <= info.last_seq:
            return False  # counted already (in the snapshot, or before)
        info.last_seq = message.seq
        if not info.epoch:
            info.epoch = message.epoch
        sender, seq = message.sender_id, message.seq
        if sender == self.user_id:
            rose = seq > info.read
            info.read = max(info.read, seq)
        else:
            tracked.live.append(seq)
            if sender == info.peer_id:
                rose = seq > info.peer_read
                info.peer_read = max(info.peer_read, seq)
            else:
                rose = seq > tracked.others.get(sender, 0)
                if rose:
                    tracked.others[sender] = seq
        tracked.recount()
        return rose

    def read_by(self, user_id: int, conversation: str, seq: int) -> bool:
        """
        C{user_id} read C{conversation} up to C{seq}.

        @return: whether a read position rose.
        """
        tracked = self._track(conversation)
        info = tracked.info
        if user_id == self.user_id:
            if seq <= info.read:
                return False
            info.read = seq
            tracked.live = [s for s in tracked.live if s > seq]
            tracked.recount()
            return True
        if user_id == info.peer_id:
            if seq <= info.peer_read:
                return False
            info.peer_read = seq
            return True
        if seq <= tracked.others.get(user_id, 0):
            return False
        tracked.others[user_id] = seq
        return True

    def restart(self, conversation: str, seq: int) -> None:
        """
        The store lost what came after C{seq} in C{conversation}: no
        position is past it any more.
        """
        tracked = self._tracked.get(conversation)
        if tracked is None:
            return
        info = tracked.info
        info.last_seq = min(info.last_seq, seq)
        info.read = min(info.read, seq)
        info.peer_read = min(info.peer_read, seq)
        tracked.snapshot_last = min(tracked.snapshot_last, seq)
        tracked.live = [s for s in tracked.live if s <= seq]
        tracked.others = {u: min(s, seq) for u, s in tracked.others.items()}
        tracked.recount()

    def get(self, conversation: str) -> ConversationInfo | None:
        """
        A copy of the state of C{conversation}, if known.
        """
        tracked = self._tracked.get(conversation)
        return None if tracked is None else replace(tracked.info)

    def all(self) -> list[ConversationInfo]:
        """
        Copies of the state of every conversation known, by id.
        """
        return [replace(self._tracked[c].info) for c in sorted(self._tracked)]

    def read_position(self, conversation: str, user_id: int | None = None) -> int:
        """
        How far C{user_id} (this user by default) read C{conversation}, as
        far as this client knows (0 when unknown).
        """
        tracked = self._tracked.get(conversation)
        if tracked is None:
            return 0
        if user_id is None or user_id == self.user_id:
            return tracked.info.read
        if user_id == tracked.info.peer_id:
            return tracked.info.peer_read
        return tracked.others.get(user_id, 0)

    def unread(self, conversation: str) -> int:
        """
        How many messages from others this user has not read in
        C{conversation}.
        """
        tracked = self._tracked.get(conversation)
        return 0 if tracked is None else tracked.info.unread
