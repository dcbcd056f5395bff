"""
In-order delivery of each conversation to each connection.

A connection holds one L{Stream} per conversation it receives: the epoch of
the conversation it follows (L{cim.interfaces.Epoch}), the highest seq
written to it, whether the store is being read for it, and the live
messages held meanwhile or behind a gap.  L{Streams} moves them forward:
it offers live messages (L{Streams.offer}), replays from the store
(L{Streams.fill}), shares one store read among the connections that want
the same page, and reads from the store the gaps that live messages did
not close within L{GAP_WAIT} seconds of its clock.

Epochs: a message that the stream's epoch does not name (live, or read from
the store) makes the stream read the conversation's current epoch; when it
changed, the stream resumes where L{Epoch.resume} says, tells the client in
an EPOCH frame (with C{reset} when what it had is not trusted), and reads
the store from there: live messages of another epoch are never written
(the store is the truth).

Adoption: a conversation that a connection had not been told of (a private
conversation begun since its login, a group joined since) starts when its
first live message arrives, from the device's cursor as its login read it
(L{Connection.acked}), else from the start (of a group: from where the user
joined it).  The client gets an EPOCH frame before its messages, unless it
would tell it nothing: a stream that starts at 0 of the epoch its first
messages name, and writes them at once, for a conversation the client sent
no position for at login (L{Connection.unlisted}), is not announced (every
client takes an unannounced conversation's epoch from its first message).
In random private chat nearly every message begins a conversation for its
receiver and for the sender's own device, so the common case costs no
store call, no coroutine and no EPOCH frame: without a stored position, or
with one of the message's epoch, the stream follows the epoch the message
names, and messages that follow the start without a gap are written at
once, within L{Streams.offer}.  A group's join point is read (groups are
joined rarely), the conversation's epoch only for a stored position of
another epoch, and the store only for a gap before the first message.

Every method runs in the reactor thread; the store is the only source of
waiting.  A connection that a store read fails for is handed to
L{ConnectionControl.kick}: the client logs in again and resumes from its
cursors.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import is_
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.interfaces import Epoch, IStore
from cim.message import (
    BROADCAST,
    GROUP_PREFIX,
    ChatMessage,
    Command,
    Cursor,
    Position,
)
from cim.metrics import Counter
from cim.server import wire
from cim.server.connection import Connection, ConnectionControl
from cim.server.login import resume

#: Messages read from the store per page when replaying.
REPLAY_PAGE = 200
#: How long a gap in a conversation may stay open before it is read from
#: the store, in seconds (the missing message is usually in flight).
GAP_WAIT = 0.25
#: How long a replay waits for a client to read what it was sent before
#: the connection is closed, in seconds.
DRAIN_WAIT = 30.0
#: How many frames of messages written without a batch are kept to be
#: shared (L{Streams._write}).
SHARED_BATCHES = 64
#: The position of a conversation whose start is not known yet (one first
#: seen since login, while where it starts is read).
UNKNOWN = -1
#: The epoch of a stream before any is known.
NO_EPOCH = Epoch()
#: The held messages of every stream that holds none (L{Stream.pending}):
#: most streams never hold one, and a dictionary each would be a tracked
#: object more per conversation of each connection.  Never written to.
_NOTHING_HELD: dict[int, ChatMessage] = {}
#: How many epochs L{Streams} keeps to share among the streams that adopt
#: one (see L{Streams._epoch}).
EPOCHS_KEPT = 4096


def _consume(*reads: Deferred[Any]) -> None:
    """
    Drop the failures of C{reads}, which nobody will wait for.
    """
    for d in reads:
        d.addErrback(lambda _: None)


def _same(ours: Sequence[ChatMessage], theirs: Sequence[ChatMessage]) -> bool:
    """
    Whether C{ours} are the very messages C{theirs} (in order).
    """
    return len(ours) == len(theirs) and all(map(is_, ours, theirs))


class Stream:
    """
    One conversation as one connection receives it.

    @ivar epoch: the conversation's L{Epoch} that C{delivered} counts in
        (the one the client was told, at login or in an EPOCH frame, or
        that the first message of a conversation it was not told of
        named).
    @ivar delivered: the highest seq written to the connection (or
        L{UNKNOWN}); messages are written in seq order with no gap.
    @ivar filling: the store is being read for it; live messages wait in
        C{pending}.
    @ivar pending: live messages held, by seq, until what precedes them
        is written (while none is: a dictionary shared by every stream,
        never written to; L{hold} gives the stream one of its own).
    @ivar recheck: a message that C{epoch} does not name was seen: the
        conversation's epoch is to be read again.
    """

    __slots__ = ("conversation", "delivered", "filling", "pending", "epoch", "recheck")

    def __init__(
        self,
        conversation: str,
        delivered: int = UNKNOWN,
        filling: bool = False,
        epoch: Epoch = NO_EPOCH,
    ) -> None:
        self.conversation = conversation
        self.delivered = delivered
        self.filling = filling
        self.epoch = epoch
        self.recheck = False
        self.pending: dict[int, ChatMessage] = _NOTHING_HELD

    def accepts(self, message: ChatMessage) -> bool:
        """
        Whether C{message} is one of this stream's epoch: tagged with it, or
        with the epoch it follows up to their common seq.
        """
        epoch = self.epoch
        tag = message.epoch
        return tag == epoch.id or (tag == epoch.previous and message.seq <= epoch.base)

    def hold(self, message: ChatMessage) -> None:
        pending = self.pending
        if pending is _NOTHING_HELD:
            pending = self.pending = {}
        pending[message.seq] = message

    def move_to(self, epoch: Epoch, delivered: int) -> None:
        """
        Follow C{epoch} from C{delivered} on, dropping the held messages
        that it does not name or that come no later.
        """
        self.epoch = epoch
        self.delivered = delivered
        pending = self.pending
        for seq in [
            seq for seq, m in pending.items() if seq <= delivered or not self.accepts(m)
        ]:
            del pending[seq]

    def advance(self) -> list[ChatMessage]:
        """
        Take the held messages that follow C{delivered} without a gap, in
        order, and move C{delivered} past them; drop any held at or below
        where they end (duplicates), and any of another epoch.
        """
        pending = self.pending
        if not pending:
            return []
        position = self.delivered
        ready = []
        while position + 1 in pending:
            position += 1
            m = pending.pop(position)
            if not self.accepts(m):
                position -= 1
                break
            ready.append(m)
        self.delivered = position
        for seq in [
            seq for seq, m in pending.items() if seq <= position or not self.accepts(m)
        ]:
            del pending[seq]
        return ready

    def cursor(self, reset: bool = False) -> Cursor:
        """
        Where this stream stands, as the server tells the client.
        """
        return Cursor(self.conversation, self.delivered, self.epoch.id, reset)


class Streams:
    """
    Moves the L{Stream}s of every connection of one server.

    @param written: counts the chat messages written.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        store: IStore,
        control: ConnectionControl,
        written: Counter,
    ) -> None:
        self.clock = clock
        self.store = store
        self.control = control
        self.written = written
        self._gaps: set[tuple[Connection, Stream]] = set()
        self._gap_call: IDelayedCall | None = None
        self._reads: dict[tuple[str, int], list[Deferred[list[ChatMessage]]]] = {}
        #: The frames of the messages written lately without a shared
        #: batch (see L{_write}): (id of the first, id of the last, count)
        #: -> their batch.
        self._batches: dict[tuple[int, int, int], wire.Batch] = {}
        self._epochs: dict[str, Epoch] = {}

    def _epoch(self, tag: str) -> Epoch:
        """
        The epoch C{tag} as live messages name it (no previous epoch), for
        a stream that adopts it: one object shared by the streams of the
        conversation (those of both users of a pair, and of their devices,
        here), of the last L{EPOCHS_KEPT} epochs adopted.
        """
        epochs = self._epochs
        epoch = epochs.get(tag)
        if epoch is None:
            if len(epochs) >= EPOCHS_KEPT:
                epochs.clear()
            epoch = epochs[tag] = Epoch(tag)
        return epoch

    def stop(self) -> None:
        """
        Read no more gaps.
        """
        if self._gap_call is not None and self._gap_call.active():
            self._gap_call.cancel()
            self._gap_call = None

    # Live messages

    def offer(
        self, conn: Connection, messages: Sequence[ChatMessage], batch: wire.Batch
    ) -> None:
        """
        Write live C{messages} (in seq order) to C{conn} as far as they
        follow what it has, holding the others; C{batch} is their shared
        frame.  While C{conn}'s login reads where its streams start, they
        wait in L{Connection.held}.
        """
        if conn.held is not None:
            conn.held.append((messages, batch))
            return
        # Fast path: every message is the next one of its conversation, in
        # the stream's epoch; or the first of a conversation new to the
        # connection that starts unannounced (see _start_adopted): a pair
        # conversation that the device has no position in, at seq 1 of the
        # epoch the message names.
        streams = conn.streams
        if len(messages) == 1:
            # The same for one message (most deliveries), without the
            # bookkeeping of several.
            m = messages[0]
            conversation = m.conversation
            stream = streams.get(conversation)
            if stream is not None and conversation != BROADCAST:
                if (
                    m.seq == stream.delivered + 1
                    and not stream.filling
                    and not stream.pending
                    and m.epoch == stream.epoch.id
                ):
                    stream.delivered = m.seq
                    conn.deliver(messages, Command.MESSAGE, batch)
                    self.written.inc(1)
                    return
            elif (
                stream is None
                and m.seq == 1
                and m.epoch
                and conversation != BROADCAST
                and not conversation.startswith(GROUP_PREFIX)
                and conversation not in conn.acked
                and conversation not in conn.unlisted
            ):
                streams[conversation] = Stream(
                    conversation, 1, False, self._epoch(m.epoch)
                )
                conn.deliver(messages, Command.MESSAGE, batch)
                self.written.inc(1)
                return
        positions: dict[Stream, int] = {}
        fresh: dict[str, Stream] | None = None
        for m in messages:
            conversation = m.conversation
            if conversation == BROADCAST:
                continue
            stream = streams.get(conversation)
            if stream is None:
                if (
                    m.seq != 1
                    or not m.epoch
                    or conversation.startswith(GROUP_PREFIX)
                    or conversation in conn.acked
                    or conversation in conn.unlisted
                    or (fresh is not None and conversation in fresh)
                ):
                    # (Another message of a conversation started in this
                    # batch too: the slow path takes them all.)
                    break
                stream = Stream(conversation, 0, False, self._epoch(m.epoch))
                if fresh is None:
                    fresh = {conversation: stream}
                else:
                    fresh[conversation] = stream
                positions[stream] = 1
                continue
            if stream.filling or stream.pending or m.epoch != stream.epoch.id:
                break
            if m.seq != positions.get(stream, stream.delivered) + 1:
                break
            positions[stream] = m.seq
        else:
            for stream, seq in positions.items():
                stream.delivered = seq
            if fresh is not None:
                streams.update(fresh)
            # Inline, not _write: the path of nearly every live message.
            conn.deliver(messages, Command.MESSAGE, batch)
            self.written.inc(len(messages))
            return
        # The conversations first seen here are adopted once all of the
        # batch is held: what follows their start goes in one frame.
        adopt: list[tuple[Stream, str]] = []
        for m in messages:
            self._offer_one(conn, m, adopt)
        for stream, tag in adopt:
            if tag and not stream.conversation.startswith(GROUP_PREFIX):
                stored = conn.acked.get(stream.conversation)
                if stored is None or stored.epoch == tag:
                    # No store call needed: started here and now.
                    epoch = self._epoch(tag)
                    if self._start_adopted(conn, stream, epoch, 0, stored, True, batch):
                        self.fill_in_background(conn, stream)
                    continue
            ensureDeferred(self._adopt(conn, stream, tag)).addErrback(
                self._fill_failed, conn, stream
            )

    def _offer_one(
        self, conn: Connection, m: ChatMessage, adopt: list[tuple[Stream, str]]
    ) -> None:
        conversation = m.conversation
        if conversation == BROADCAST:
            self._write(conn, [m], Command.MESSAGE)
            return
        stream = conn.streams.get(conversation)
        if stream is None:
            stream = conn.streams[conversation] = Stream(conversation)
        if stream.delivered == UNKNOWN:
            # A conversation this connection was not told of (begun or
            # joined since its login): hold the message, and find where the
            # device starts.
            stream.hold(m)
            if not stream.filling:
                stream.filling = True
                adopt.append((stream, m.epoch))
            return
        if not stream.accepts(m):
            # Of another epoch: perhaps the store lost or replaced the
            # conversation.  Read its epoch (and then the store) before
            # anything more of it is written.
            stream.recheck = True
            if not stream.filling:
                self.fill_in_background(conn, stream)
            return
        if stream.filling:
            stream.hold(m)
        elif m.seq <= stream.delivered:
            return  # a duplicate
        elif m.seq == stream.delivered + 1:
            # If this closed a gap, what waited behind it goes too.
            stream.delivered = m.seq
            self._write(conn, [m, *stream.advance()], Command.MESSAGE)
        else:
            # A gap: an earlier message is usually still on its way (pushed
            # from another server).  Hold this one; if the gap is still
            # open after GAP_WAIT, read it from the store.
            stream.hold(m)
            self._wait_for_gap(conn, stream)

    def _wait_for_gap(self, conn: Connection, stream: Stream) -> None:
        """
        Read the gap before C{stream}'s held messages from the store unless
        live messages close it within L{GAP_WAIT}.
        """
        self._gaps.add((conn, stream))
        if self._gap_call is None:
            self._gap_call = self.clock.callLater(GAP_WAIT, self._close_gaps)

    def _close_gaps(self) -> None:
        """
        Fill from the store the gaps that the live messages did not close.
        """
        self._gap_call = None
        gaps, self._gaps = self._gaps, set()
        for conn, stream in gaps:
            if not conn.closed and stream.pending and not stream.filling:
                self.fill_in_background(conn, stream)

    # Replay

    def resync(self, conn: Connection) -> None:
        """
        Write to C{conn} whatever the store holds that it has not got yet,
        reading the epoch of each conversation first (a store that lost
        messages may hold fewer than the connection was sent).
        """
        for stream in list(conn.streams.values()):
            if stream.delivered != UNKNOWN and not stream.filling:
                stream.recheck = True
                self.fill_in_background(conn, stream)

    async def catch_up(self, conn: Connection) -> None:
        """
        Bring C{conn} up to what the store holds after live messages were
        lost (pushes to this server that the bus dropped): read where its
        user stands in each conversation (as a login does, L{resume}); fill
        from the store each stream that the conversation went past, or
        whose epoch changed; and start the conversations it was not told
        of (begun or joined since its login: nothing else would show them
        before its next login) where its login would start them, telling
        the client in one EPOCH frame.
        """
        resumption = await resume(self.store, conn.user_id, conn.device)
        if conn.closed:
            return
        fresh = []
        for start in resumption.starts:
            conversation = start.conversation
            stream = conn.streams.get(conversation)
            if stream is not None:
                moved = start.epoch.id != stream.epoch.id
                if (
                    stream.delivered != UNKNOWN
                    and not stream.filling
                    and (moved or start.last_seq > stream.delivered)
                ):
                    stream.recheck = moved
                    self.fill_in_background(conn, stream)
                continue
            stream = Stream(conversation, start.seq, False, start.epoch)
            conn.streams[conversation] = stream
            position = resumption.acked.get(conversation)
            if position is not None:
                conn.acked.setdefault(conversation, position)
            fresh.append((stream, start))
        if not fresh:
            return
        conn.send(wire.epoch([start.cursor for _, start in fresh]))
        for stream, start in fresh:
            if start.last_seq > start.seq:
                self.fill_in_background(conn, stream)

    def catch_up_in_background(self, conn: Connection) -> None:
        """
        L{catch_up}; a store failure reconnects C{conn}, as a failed fill
        does.
        """

        def failed(failure: Failure) -> None:
            self.log.failure(
                "Catching up {user_id} from the store failed; reconnecting it",
                failure,
                user_id=conn.user_id,
            )
            self.control.kick(conn, "temporary store failure")

        ensureDeferred(self.catch_up(conn)).addErrback(failed)

    def fill_in_background(self, conn: Connection, stream: Stream) -> None:
        stream.filling = True
        ensureDeferred(self.fill(conn, stream, Command.MESSAGE)).addErrback(
            self._fill_failed, conn, stream
        )

    async def _adopt(self, conn: Connection, stream: Stream, tag: str) -> None:
        """
        Start C{stream}, a conversation first seen on C{conn} since its
        login (by a live message of epoch C{tag}): from the device's stored
        cursor, else from the start (of a group: from where the user joined
        it); never after a message that was offered live (that one is new
        to this connection).  Tell the client (an EPOCH frame, unless
        L{_start_adopted} finds it needs none), then write the held
        messages, reading the store only for what they miss.  L{offer}
        starts a pair conversation that needs no store call itself,
        without this coroutine.

        The device's stored cursors came with its login (L{Connection.
        acked}): a device has one connection at a time, so what was saved
        since is this connection's own.  Without a stored position, or with
        one of the live message's epoch, the stream follows that epoch as
        the message names it (no store call, but a group's join point): a
        later message of another epoch makes it read the conversation's
        epoch (L{Stream.recheck}), as any stream does.  A stored position
        of another epoch is resumed through the conversation's current
        epoch, read from the store (L{Epoch.resume}).
        """
        conversation = stream.conversation
        stored = conn.acked.get(conversation)
        try:
            tagged = bool(tag) and (stored is None or stored.epoch == tag)
            if tagged:
                floor = await self._joined(conn.user_id, conversation)
                epoch = Epoch(tag)
            else:
                # The reads at once.
                reading_epochs = self.store.epochs([conversation])
                reading_joined = self._joined(conn.user_id, conversation)
                try:
                    floor = await reading_joined
                    epochs = await reading_epochs
                except BaseException:
                    # The reads not awaited: their failures are this one's.
                    # (Never an await here: a coroutine closed while it
                    # waits must not wait again.)
                    _consume(reading_epochs)
                    raise
                epoch = epochs.get(conversation, NO_EPOCH)
        except BaseException:
            stream.filling = False
            raise
        if self._start_adopted(conn, stream, epoch, floor, stored, tagged):
            await self.fill(conn, stream, Command.MESSAGE)

    def _start_adopted(
        self,
        conn: Connection,
        stream: Stream,
        epoch: Epoch,
        floor: int,
        stored: Position | None,
        tagged: bool,
        batch: wire.Batch | None = None,
    ) -> bool:
        """
        Start adopted C{stream} in C{epoch} (read, or as C{tagged} live
        messages name it) from the device's C{stored} position, else from
        C{floor}; write at once what was held that follows the start (as
        the shared C{batch} of live messages when that is all of it).

        The client is told the start (an EPOCH frame) unless it starts at 0
        of the epoch its held messages name and they follow it at once: a
        client takes an unannounced conversation's epoch from its first
        message.  A position the client sent at login for this conversation
        (L{Connection.unlisted}) is always moved by an EPOCH frame.

        @return: whether the store is to be read for it (the caller fills
            it; C{stream} is still marked as filling).
        """
        if conn.closed:
            stream.filling = False
            return False
        conversation = stream.conversation
        position = stored or Position(epoch.id, floor)
        start, reset = epoch.resume(position)
        start = max(start, floor)
        stream.epoch = epoch
        live = [seq for seq, m in stream.pending.items() if stream.accepts(m)]
        if live:
            start = min(start, min(live) - 1)
        # A held message of another epoch is dropped: the store is read (and
        # first the conversation's epoch, unless that was just read).
        dropped = len(live) < len(stream.pending)
        stream.recheck = dropped and tagged
        stream.move_to(epoch, start)
        if position.seq > 0 and position.epoch == epoch.id:
            conn.acked.setdefault(conversation, position)
        # What was held follows the start: written at once, and the store
        # is not read (a gap after it is waited for as any).
        ready = [] if dropped else stream.advance()
        if not (
            ready
            and tagged
            and stored is None
            and start == 0
            and not reset
            and conversation not in conn.unlisted
        ):
            conn.send(wire.epoch([Cursor(conversation, start, epoch.id, reset)]))
        if not ready:
            return True
        stream.filling = False
        if batch is not None and not _same(ready, batch.messages):
            batch = None
        self._write(conn, ready, Command.MESSAGE, batch)
        if stream.pending:
            self._wait_for_gap(conn, stream)
        return False

    def _joined(self, user_id: int, conversation: str) -> Deferred[int]:
        """
        Where a device without a position starts C{conversation}: a group
        from where the user joined it, anything else from the start.
        """
        if not conversation.startswith(GROUP_PREFIX):
            return succeed(0)
        d = self.store.group_info(conversation[len(GROUP_PREFIX) :], user_id)
        return d.addCallback(lambda info: info.joined_at)

    async def _check_epoch(self, conn: Connection, stream: Stream) -> bool:
        """
        Read the conversation's current epoch; when it is not C{stream}'s,
        resume C{stream} in it and tell the client (an EPOCH frame, with
        C{reset} when what it had after the new start is not in the store).

        @return: whether C{stream} moved to another epoch.
        """
        conversation = stream.conversation
        epochs = await self.store.epochs([conversation])
        epoch = epochs.get(conversation, NO_EPOCH)
        if epoch.id == stream.epoch.id:
            # Unchanged: the message was a late one of an older epoch.
            stream.epoch = epoch
            return False
        start, reset = epoch.resume(Position(stream.epoch.id, stream.delivered))
        self.log.info(
            "{conversation} of {user_id} moved from epoch {old!r} to {new!r} "
            "at {start}{reset}",
            conversation=conversation,
            user_id=conn.user_id,
            old=stream.epoch.id,
            new=epoch.id,
            start=start,
            reset=" (reset)" if reset else "",
        )
        stream.move_to(epoch, start)
        conn.send(wire.epoch([stream.cursor(reset)]))
        return True

    def _fill_failed(self, failure: Failure, conn: Connection, stream: Stream) -> None:
        stream.filling = False
        self.log.failure(
            "Reading {conversation} for {user_id} failed; reconnecting it",
            failure,
            conversation=stream.conversation,
            user_id=conn.user_id,
        )
        # The client will log in again and resume from its cursors.
        self.control.kick(conn, "temporary store failure")

    async def fill(self, conn: Connection, stream: Stream, cmd: Command) -> None:
        """
        Write the stored messages of C{stream} after what C{conn} has (as
        C{cmd}), then whatever arrived live meanwhile, in order, without
        duplicates; moving C{stream} to the conversation's current epoch
        first when a message of another epoch was seen.  The caller marked
        C{stream} as filling.

        Live messages held after a gap are never written over it.  When the
        store holds nothing after the stream's position, it is asked again
        by this stream alone, after they were held (a message is offered
        live once it is stored): holding nothing after it still, it holds
        none of them (it lost them: restored from a backup, failed over to
        a replica that lagged; or retention dropped them), and they are
        dropped, as the store is the truth.  A client counts what it saw of
        an epoch by its highest seq (what it is sent again at or below it
        is a duplicate): written after the gap, they would make it drop
        the gap's messages for ever, if the store held them again (a
        restore to a later backup; simulator seed 2534).
        """
        conversation = stream.conversation
        # Whether the next page is read by this stream alone (not shared:
        # asked now), and which messages were held when it was asked for.
        alone = False
        asked: set[int] = set()
        try:
            while not conn.closed:
                if stream.recheck:
                    stream.recheck = False
                    await self._check_epoch(conn, stream)
                    if conn.closed:
                        return
                if conn.link.backed_up() and not await self._drained(conn):
                    return
                if alone:
                    asked = set(stream.pending)
                    page = await self.store.read(
                        conversation, stream.delivered, REPLAY_PAGE
                    )
                else:
                    page = await self._read(conversation, stream.delivered)
                if conn.closed:
                    return
                after = stream.delivered
                fresh = [m for m in page if m.seq > after]
                switched = False
                for index, m in enumerate(fresh):
                    if not stream.accepts(m):
                        if index:
                            self._write(conn, fresh[:index], cmd)
                            stream.delivered = fresh[index - 1].seq
                        if await self._check_epoch(conn, stream):
                            switched = True
                            break
                        # The store's current epoch does not name them
                        # either (it lost its epoch record): they are what
                        # the store holds all the same.
                        self._write(conn, fresh[index:], cmd)
                        stream.delivered = fresh[-1].seq
                        break
                else:
                    if fresh:
                        self._write(conn, fresh, cmd)
                        stream.delivered = fresh[-1].seq
                if conn.closed:
                    return
                if switched or stream.recheck or len(page) == REPLAY_PAGE:
                    continue
                # Caught up with the store: drain what arrived live.
                ready = stream.advance()
                if ready:
                    self._write(conn, ready, Command.MESSAGE)
                pending = stream.pending
                if not pending:
                    if stream.recheck:
                        continue
                    return
                # Still a gap (a message the store has not shown us yet, or
                # that it does not hold); go round again.
                if page or ready:
                    alone = False
                    continue
                # The store had nothing after our position.
                if not alone or not pending.keys() <= asked:
                    # Perhaps asked before the held messages were stored (a
                    # shared read asked earlier, or a message held while it
                    # was read): ask again, now, alone.
                    alone = True
                    continue
                # Asked after they were held: the store does not hold them.
                self.log.warn(
                    "Dropping {conversation} {seqs} of epoch {epoch!r}, offered "
                    "live: the store holds nothing after {seq}",
                    conversation=conversation,
                    seqs=sorted(pending),
                    epoch=stream.epoch.id,
                    seq=stream.delivered,
                )
                stream.pending = _NOTHING_HELD
                alone = False
                if not stream.recheck:
                    return
        finally:
            stream.filling = False

    async def _drained(self, conn: Connection) -> bool:
        """
        Wait until what was written to C{conn} is sent (a replay reads no
        more than the client takes), for at most L{DRAIN_WAIT} seconds:
        then, or when it closed meanwhile, @return: C{False} (a client
        that stopped reading is closed, and catches up at its next login).
        """
        try:
            await conn.link.drained().addTimeout(DRAIN_WAIT, self.clock)
        except defer.TimeoutError:
            self.log.info(
                "Closing {user_id}: it read nothing for {seconds}s",
                user_id=conn.user_id,
                seconds=DRAIN_WAIT,
            )
            self.control.kick(conn, "not reading")
            return False
        return not conn.closed

    def _read(self, conversation: str, after: int) -> Deferred[list[ChatMessage]]:
        """
        Read a page of C{conversation} after C{after}, sharing one store
        read among the connections that want the same page at once (a
        group's members catching up together).
        """
        waiter: Deferred[list[ChatMessage]] = Deferred()
        key = (conversation, after)
        waiters = self._reads.get(key)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._reads[key] = [waiter]
        self.store.read(conversation, after, REPLAY_PAGE).addBoth(self._read_done, key)
        return waiter

    def _read_done(self, result: object, key: tuple[str, int]) -> None:
        for waiter in self._reads.pop(key):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(cast(list[ChatMessage], result))

    def _write(
        self,
        conn: Connection,
        messages: Sequence[ChatMessage],
        cmd: Command,
        batch: wire.Batch | None = None,
    ) -> None:
        """
        Write C{messages} to C{conn} (as the shared C{batch} of live
        messages, when they are all of it) and count them.

        Without a C{batch}, the very same messages written to another
        connection lately share that one's frame: the members of a group
        that a gap held, or that read the same page of the store, are
        written the same messages (one store read, or one live push, gives
        every connection the same objects), and the frame is encoded once.
        """
        if batch is None and cmd == Command.MESSAGE and messages:
            batch = self._shared(messages)
        conn.deliver(messages, cmd, batch)
        self.written.inc(len(messages))

    def _shared(self, messages: Sequence[ChatMessage]) -> wire.Batch:
        """
        The batch of C{messages}, made the first time they are written.
        The last L{SHARED_BATCHES} are kept (they hold their messages, so
        the ids of the key stay theirs).
        """
        batches = self._batches
        key = (id(messages[0]), id(messages[-1]), len(messages))
        batch = batches.get(key)
        if batch is not None and _same(batch.messages, messages):
            return batch
        if len(batches) >= SHARED_BATCHES:
            batches.clear()
        batch = batches[key] = wire.Batch(list(messages))
        return batch
