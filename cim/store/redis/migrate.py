"""
C{python -m cim.store.redis.migrate redis://host:port/db}: bring a Redis
written by an earlier release of cim up to this one.

What it does (safe to run again, and while the daemons run):

- accounts were found by their raw name (C{user:byname}); they are now
  found by their name key (L{cim.names.name_key}: NFKC, case-folded,
  confusable skeleton), so each old name is indexed by its key.  Two old
  accounts whose names now count as the same (C{Zoe} and C{zoe}) keep
  their ids and messages, but only the older one is found by that name;
  the command lists the others.

What needs no migration: groups stored before owners read as open groups
without an owner; sessions and cursors keep their layout.  Accounts made
without a password before account keys existed can log in with a token
they hold or through an application holding the cluster secret (or set a
password that way).
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import task

from cim.store.redis.store import connect_redis


async def migrate(reactor: Any, url: str, out: Any = sys.stdout) -> int:
    store = await connect_redis(url, clock=reactor)
    try:
        indexed, collisions = await store.index_old_names()
    finally:
        await store.close()
    out.write(f"indexed {indexed} account names by their name key\n")
    for name, user_id, holder in collisions:
        out.write(
            f"account {user_id} ({name!r}) is not found by name: the name "
            f"counts as that of account {holder}\n"
        )
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
