"""
The Lua scripts of L{cim.store.redis.store.RedisStore}, one C{.lua} file each
in this package, read once, when this module is imported.

Each file starts with a comment saying what its C{KEYS} and C{ARGV} are and
what it returns.  Redis has no C{require}: a script calling a function of
a library file (L{LIBRARIES}: C{sessions.lua}, C{claims.lua},
C{positions.lua}, C{reads.lua}) is sent
with that file in front of it, as L{_load} is told; every script has
C{keys.lua} (the key layout, L{cim.store.redis.layout}) in front.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from cim.store.redis.connection import execute_with_run_id, is_noscript


class Script:
    """
    A Lua script and its SHA1, for EVALSHA.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()

    def run(
        self,
        redis: Any,
        keys: Sequence[str],
        args: Sequence[Any],
        run_id: bool = False,
    ) -> defer.Deferred[Any]:
        """
        Run the script with EVALSHA, sending it with EVAL when Redis does
        not have it yet.

        @param redis: a txredisapi connection or pool.
        @param run_id: add, after C{args}, the run_id of the Redis that runs
            the script (C{""} when the connection cannot tell:
            L{cim.store.redis.connection.execute_with_run_id}).
        @return: a Deferred firing with the script's reply.
        """

        def evaluate(command: str, body: str) -> defer.Deferred[Any]:
            if run_id:
                return execute_with_run_id(
                    redis, lambda run: (command, body, len(keys), *keys, *args, run)
                )
            try:
                d: defer.Deferred[Any] = redis.execute_command(
                    command, body, len(keys), *keys, *args
                )
            except Exception:
                d = defer.fail()
            return d

        def unknown(failure: Failure) -> defer.Deferred[Any] | Failure:
            if is_noscript(failure):
                return evaluate("EVAL", self.source)
            return failure

        return evaluate("EVALSHA", self.sha).addErrback(unknown)


#: The text of every C{.lua} file of this package, by file name without
#: C{.lua}.
SOURCES: dict[str, str] = {
    entry.name.removesuffix(".lua"): entry.read_text(encoding="utf-8")
    for entry in resources.files(__name__).iterdir()
    if entry.name.endswith(".lua")
}

#: Every script, by the name of its file.
SCRIPTS: dict[str, Script] = {}


def _load(name: str, *needs: str) -> Script:
    """
    The script of C{name}.lua, with the files C{needs} in front of it.
    """
    script = Script("".join(SOURCES[part] for part in ("keys", *needs, name)))
    SCRIPTS[name] = script
    return script


#: The files that are not scripts of their own, but functions put in front
#: of the scripts that need them.
LIBRARIES = ("keys", "sessions", "claims", "positions", "reads")

LAYOUT = _load("layout")
ACCOUNT_BY_NAME = _load("account_by_name")
REGISTER = _load("register")
CLAIM_SESSION = _load("claim_session", "sessions", "claims")
OPEN_SESSION = _load("open_session", "sessions", "claims")
ACTIVATE_SESSION = _load("activate_session", "sessions")
GET_SESSIONS = _load("get_sessions")
RENEW_SESSIONS = _load("renew_sessions", "sessions")
ONLINE_USERS = _load("online_users", "sessions")
RELEASE_SESSION = _load("release_session", "sessions")
SERVER_SESSIONS = _load("server_sessions", "sessions")
DROP_SESSIONS = _load("drop_sessions", "sessions")
ISSUE_TOKEN = _load("issue_token", "sessions", "claims")
VERIFY_TOKEN = _load("verify_token", "sessions")
ACTIVATE_TOKEN = _load("activate_token", "sessions", "reads")
APPEND = _load("append", "positions")
SET_CURSORS = _load("set_cursors", "positions")
FORGET_CURSORS = _load("forget_cursors")
SET_READ = _load("set_read", "positions")
READ_POSITIONS = _load("read_positions")
EPOCHS = _load("epochs")
CONVERSATIONS = _load("conversations", "reads")
MIGRATE_INBOX = _load("migrate_inbox", "positions")
MOVE_EPOCH = _load("move_epoch")
CREATE_GROUP = _load("create_group")
JOIN_GROUP = _load("join_group")
LEAVE_GROUP = _load("leave_group")
GROUP_MEMBERS = _load("group_members")
GROUP_INFO = _load("group_info")
INVITE_TO_GROUP = _load("invite_to_group")
ASK_TO_JOIN = _load("ask_to_join")
JOIN_REQUESTS = _load("join_requests")
DROP_JOIN_REQUEST = _load("drop_join_request")
SET_GROUP_OWNER = _load("set_group_owner")
