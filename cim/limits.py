"""
The limits and patterns of what crosses the wire and the HTTP API, declared
once: the server, the route, the OpenAPI document and the client all take
them from here.
"""

from __future__ import annotations

import re

#: The longest client message id.
MAX_CLIENT_MSG_ID = 64
#: The longest user name and password.
MAX_NAME = 64
MAX_PASSWORD = 1024
#: The largest user id (Java's long, as CIM's clients hold it).
MAX_USER_ID = 2**63 - 1
#: The largest sequence number (and acknowledged cursor) a store keeps:
#: exact as a double, so Lua and JSON read it unchanged.
MAX_SEQ = 2**53 - 1
#: The most texts one send may carry (a frame's batch, C{batchMsg}).
MAX_BATCH = 100
#: How many messages one sender may append to one conversation within the
#: retention window (7 days): half of what a conversation keeps (10,000),
#: so that one sender cannot push a receiver's unread messages out.
SENDER_QUOTA = 5_000
#: Seconds a connected session lives unless its server renews it.
SESSION_TTL = 90.0
#: How many failed pushes to other servers a daemon keeps to send again
#: (C{--push-retry-max}); past that, the oldest are given up.
MAX_PUSH_RETRIES = 100_000
#: A delivery to this many users or more (a group's members) pushes to
#: every server holding sessions instead of looking the users' sessions
#: up (the IM server's C{--broadcast-from}; L{cim.delivery.Delivery}).
BROADCAST_FROM = 32
#: How many users' sessions a daemon that delivers keeps, checked against
#: the session generations each append reads (C{--session-cache};
#: L{cim.sessioncache}): about 300 bytes each.
SESSION_CACHE = 100_000
#: The most devices one store call of an IM server renews the sessions of,
#: or saves the cursors of (C{--store-batch}): a Redis script holds Redis
#: for its whole run, 10 to 20 us a device, so a server of 19,000
#: connections held it 0.2 to 0.4 s at once every 30 s; the calls are
#: made one after another, other clients' commands running between them.
STORE_BATCH = 250
#: How many sessions (devices) one user may hold at once by default (the
#: route's C{--max-devices}).
MAX_DEVICES = 5
#: Seconds a device key lives (the route's C{--device-key-ttl}): 30 days;
#: each login with it issues a new one, for as long again.
DEVICE_KEY_TTL = 30 * 86400.0
#: Device ids: 1-64 letters, digits, C{_}, C{-} or C{.}, chosen and kept by
#: the client (C{""}: a client that names none, such as CIM's).
DEVICE_ID_PATTERN = r"[A-Za-z0-9_.\-]{1,64}"
DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
DEVICE_ID_RULE = "1-64 letters, digits, '_', '-' or '.'"
#: Bytes a server buffers for one connection that does not read them
#: before it drops the connection.
MAX_OUTPUT = 4 * 1024 * 1024
#: Group ids: 1-64 letters, digits, C{_}, C{-} or C{.}.
GROUP_ID_PATTERN = r"[A-Za-z0-9_.\-]{1,64}"
GROUP_ID = re.compile(GROUP_ID_PATTERN)
GROUP_ID_RULE = "1-64 letters, digits, '_', '-' or '.'"


def is_group_id(value: str) -> bool:
    """
    Whether C{value} is a valid group id.
    """
    return GROUP_ID.fullmatch(value) is not None


#: The longest chat text, in characters (code points), by default: the IM
#: servers' C{max_text} and the route's C{--max-message}.
MAX_TEXT = 4096
