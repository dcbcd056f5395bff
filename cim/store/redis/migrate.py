"""
C{python -m cim.store.redis.migrate redis://host:port/db}: bring a Redis
written by an earlier release of cim up to this one.

What it does (safe to run again: a second run changes nothing):

- keys had no hash tags; each key that belongs to a user, a conversation
  or a group now carries its owner between braces (C{pairs:{7}},
  C{conv:{p:1:2}}, C{members:{g:team}}: L{cim.store.redis.layout}), so
  that one owner's keys can live on one Redis of several.  Every key is
  renamed first, keeping its value and time to live
  (L{cim.store.redis.store.RedisStore.retag_keys}); the steps below read
  the new names.  A key whose new name is taken (the new release's
  daemons ran before the migration and wrote it) is kept as it is, and
  listed.

- accounts were found by their raw name (C{user:byname}); they are now
  found by their name key (L{cim.names.name_key}: NFKC, case-folded,
  confusable skeleton), so each old name is indexed by its key.  Two old
  accounts whose names now count as the same (C{Zoe} and C{zoe}) keep
  their ids and messages, but only the older one is found by that name;
  the command lists the others.
- private messages were kept in the receiver's inbox (C{conv:u:<id>}, the
  messages others sent to user C{<id>}); private conversations now have two
  sides and one sequence (C{p:<low>:<high>},
  L{cim.message.pair_conversation}).  Each inbox's messages are moved into
  the pair conversations of their senders and receivers, merged with the
  other side's in msg id order and numbered again from 1 in a new epoch
  (L{cim.interfaces.Epoch}); each user's read position there covers the
  messages it sent and those its cursor in its inbox had reached.  Then
  the inboxes, their seq counters and the cursors in them are deleted.  A
  message without a sender that is a user id cannot be moved: it is
  dropped, and counted.  (L{cim.store.redis.store.RedisStore.
  move_old_inboxes}.)

- a conversation's epoch record (id, previous, base, run) was a hash of
  its own (C{epoch:<conversation>}); it is now kept in the conversation's
  hash (C{read:<conversation>}) beside its users' read positions, which the
  append writes in one command.  Each record is moved there
  (L{cim.store.redis.store.RedisStore.move_epoch_records}), before the
  inboxes.
- a sender's quota count was a key per conversation, sender and window
  (C{quota:...}); it is now a field of the conversation's hash.  The old
  keys are not read (they expire by themselves within two windows): for
  the first window after the upgrade, senders' counts start from nothing.

Run it after stopping the previous release's daemons (a message they
append to an inbox meanwhile is moved by the next run; a pair conversation
that the new release's daemons already appended to is merged and numbered
again, and its clients are told to start it over), before starting the new
release's.

What needs no migration: groups stored before owners read as open groups
without an owner; the previous release's sessions are ignored (their
clients log in again); its cursors are those of device C{""} (messages
stored before epochs have the epoch C{""}, whose positions are trusted up to
the seq at which a conversation's first epoch starts).  Accounts made
without a password before account keys existed can log in with a token
they hold or through an application holding the cluster secret (or set a
password that way).  The set of servers holding sessions (C{servers}) is
made by the new release's claims and renewals: servers of the previous
release, which add nothing to it, must not run beside the new ones.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import task

from cim.store.redis.store import connect_redis


async def migrate(reactor: Any, url: str, out: Any = sys.stdout) -> int:
    store = await connect_redis(url, clock=reactor, check_layout=False)
    try:
        renamed, taken = await store.retag_keys()
        indexed, collisions = await store.index_old_names()
        epochs = await store.move_epoch_records()
        moved = await store.move_old_inboxes()
    finally:
        await store.close()
    out.write(f"renamed {renamed} keys to the layout with hash tags\n")
    for old, new in taken:
        out.write(f"kept {old}: {new} exists (written by the new release)\n")
    out.write(f"indexed {indexed} account names by their name key\n")
    for name, user_id, holder in collisions:
        out.write(
            f"account {user_id} ({name!r}) is not found by name: the name "
            f"counts as that of account {holder}\n"
        )
    out.write(f"moved {epochs} epoch records into their conversations' hashes\n")
    out.write(
        f"moved {moved.messages} messages of {moved.inboxes} private inboxes "
        f"into {moved.conversations} pair conversations\n"
    )
    if moved.skipped:
        out.write(f"dropped {moved.skipped} inbox messages without a sender user id\n")
    return 0


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].startswith("redis://"):
        raise SystemExit(
            "usage: python -m cim.store.redis.migrate redis://host:port/db"
        )
    task.react(lambda reactor: _run(reactor, args[0]))


def _run(reactor: Any, url: str) -> Any:
    from twisted.internet.defer import ensureDeferred

    return ensureDeferred(migrate(reactor, url))


if __name__ == "__main__":
    main()
