"""
The names of the Redis store's keys: each key that belongs to one user,
one conversation or one group carries its owner as a Redis hash tag (the
part between braces, all that Redis Cluster hashes to pick a key's slot),
so that all the keys of one owner can be kept on one Redis (one slot of
Redis Cluster, or one shard of several): README's "Outgrowing one Redis".

- A user's keys carry its id: C{pairs:{7}}, C{session:{7}:phone}.
- A conversation's keys carry its id: C{conv:{p:1:2}}, C{read:{g:team}};
  an idempotency record names its conversation first:
  C{sent:{p:1:2}:<sender id>:<client msg id>}.
- A group's keys carry the id of its conversation, C{g:<group id>}, so a
  group and its conversation go together: C{members:{g:team}}.
- The rest have no owner and no tag: the counters and directories
  (C{msg:next}, C{user:next}, C{user:bykey}), the cluster's lists
  (C{online}, C{servers}, C{server:<server>}), and the keys named by a
  secret or a session id alone (C{token:<digest>}, C{ended:<session id>}).

This module and C{scripts/keys.lua} (the same names, for the scripts) are
where the layout is declared; L{retagged} names a key of the previous
layout (no tags) the new way, for L{cim.store.redis.migrate}.
"""

from __future__ import annotations

import re

from cim.message import group_conversation

#: The kinds of key that belong to a user (the first part after the kind
#: is the user id).
USER_KINDS = frozenset(
    {
        "user",
        "session",
        "sessions",
        "sgen",
        "tokens",
        "devkey",
        "cursors",
        "cdevices",
        "pairs",
        "groups",
    }
)

#: The kinds of key that belong to a conversation (C{epoch}: the previous
#: releases' epoch records, which the migration moves).
CONVERSATION_KINDS = frozenset({"conv", "seq", "read", "sent", "epoch"})

#: The kinds of key that belong to a group.
GROUP_KINDS = frozenset({"group", "ginfo", "members", "joined", "invited", "asks"})


def tag(owner: object) -> str:
    """
    C{owner} (a user id, a conversation id) as a hash tag.
    """
    return "{" + str(owner) + "}"


def key(prefix: str, kind: str, *parts: object) -> str:
    """
    The key of C{kind} named by C{parts} (its owner first, for the kinds
    that have one; C{user} has one only when it is a user id:
    C{user:next} and C{user:bykey} are directory keys).
    """
    if parts:
        owner = parts[0]
        if kind in CONVERSATION_KINDS or (
            kind in USER_KINDS and (kind != "user" or str(owner).isdigit())
        ):
            parts = (tag(owner), *parts[1:])
        elif kind in GROUP_KINDS:
            parts = (tag(group_conversation(str(owner))), *parts[1:])
    return prefix + ":".join([kind, *map(str, parts)])


def sent_id(conversation: str, sender_id: int, client_msg_id: str) -> str:
    """
    What follows C{sent:} in an idempotency record's key.
    """
    return f"{tag(conversation)}:{sender_id}:{client_msg_id}"


#: A previous layout's idempotency record: sender, conversation (a pair,
#: a group or an old inbox; none of them holds braces), client msg id.
_OLD_SENT = re.compile(r"(\d+):(p:\d+:\d+|[gu]:[A-Za-z0-9_.\-]+):(.*)", re.DOTALL)


def retagged(prefix: str, name: str) -> str | None:
    """
    The name in this layout of the key C{name} of the previous one (keys
    without hash tags), or C{None} when it keeps its name (a key without an
    owner, a key already in this layout, or one that is not the store's).
    """
    if not name.startswith(prefix):
        return None
    kind, colon, rest = name[len(prefix) :].partition(":")
    if not colon or rest.startswith("{"):
        return None
    if kind == "sent":
        old = _OLD_SENT.fullmatch(rest)
        if old is None:
            return None
        sender, conversation, client_msg_id = old.groups()
        return f"{prefix}sent:{sent_id(conversation, int(sender), client_msg_id)}"
    if kind in CONVERSATION_KINDS:
        return key(prefix, kind, rest)
    # (Device "" ends its keys with the colon: C{session:7:}.)
    owner, colon, more = rest.partition(":")
    if kind in USER_KINDS:
        if not owner.isdigit():
            return None
        return key(prefix, kind, owner) + colon + more
    if kind in GROUP_KINDS and not colon:
        return key(prefix, kind, owner)
    return None
