"""
How the console shows things: pure functions from what happened (a message,
a state change, an error, an answer of the route) to the lines printed.

L{describe} explains an error in one line, one function per kind of error
(L{functools.singledispatch}); L{STATE_LINES} says what each connection
state change prints.  Emoji aliases in messages are rendered here.
"""

from __future__ import annotations

import functools
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import CancelledError
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    DNSLookupError,
)
from twisted.web._newclient import (
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)

from cim.client import emoji
from cim.client.errors import ClientClosed, LoginError, NotLoggedIn, SendError
from cim.client.listeners import ClientState
from cim.client.route import GroupInfo, RouteError, User
from cim.message import (
    BROADCAST,
    GROUP_PREFIX,
    INBOX_PREFIX,
    PAIR_PREFIX,
    ChatMessage,
)

#: The characters a terminal may act on instead of showing: controls
#: (escape sequences, bells, carriage returns...), format characters
#: (bidi overrides, zero-width), separators, surrogates, private use.
_ACTIVE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co"})
#: What a line may keep of those: tabs, and the newlines between lines.
_KEPT = frozenset("\t\n")


def inert(text: str) -> str:
    """
    C{text} safe for a terminal: every character it would act on instead of
    showing is written as its escape (C{\\x1b}, C{\\u202e}), so that text
    from others (messages, names, reasons) can never retitle the terminal,
    erase a line or reverse what follows.  Tabs and newlines stay.
    """
    if text.isprintable():
        return text
    return "".join(
        char
        if char in _KEPT or unicodedata.category(char) not in _ACTIVE
        else (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")
        for char in text
    )


def clock_time(timestamp_ms: int, now_ms: int | None = None) -> str:
    """
    C{HH:MM:SS} of a timestamp, in local time, after its date
    (C{YYYY-MM-DD HH:MM:SS}) when that is not the day of C{now_ms} (by
    default, today).
    """
    moment = time.localtime(timestamp_ms / 1000)
    today = time.localtime(None if now_ms is None else now_ms / 1000)
    if moment[:3] != today[:3]:
        return time.strftime("%Y-%m-%d %H:%M:%S", moment)
    return time.strftime("%H:%M:%S", moment)


#: After one's own private message once its peer has read it.
READ_MARK = "\u2713"
#: After the sender's name on one's own message sent from another device.
OTHER_DEVICE = " (another device)"


def one_line(text: str) -> str:
    """
    A message's text as shown: emoji aliases rendered, on one line (a
    newline in it cannot start a made-up line).
    """
    return emoji.render(text).replace("\n", " \u21b5 ")


def format_message(
    message: ChatMessage,
    me: int = 0,
    peer_name: str = "",
    other_device: bool = False,
    read: bool = False,
    now_ms: int | None = None,
    note: str = "",
) -> str:
    """
    How a message is shown: C{[HH:MM:SS] sender: text}, marked
    C{(private)} or with its C{[group]}, emoji aliases rendered.

    @param me: the user id of the console's user: its own private
        messages show whom they went to (C{peer_name}), and a read mark
        when C{read} (the peer read them).
    @param other_device: one's own message, sent from another device.
    @param now_ms: now (the date is shown when the message is of another
        day).
    @param note: said after the text (C{(stored; bob is offline)}).
    """
    sender = message.sender_name or str(message.sender_id)
    if other_device:
        sender += OTHER_DEVICE
    text = one_line(message.text)
    stamp = clock_time(message.timestamp, now_ms)
    note = f" {note}" if note else ""
    if message.group_id or message.conversation.startswith(GROUP_PREFIX):
        group = message.group_id or message.conversation[len(GROUP_PREFIX) :]
        return f"[{stamp}] [{group}] {sender}: {text}{note}"
    private = message.conversation.startswith((PAIR_PREFIX, INBOX_PREFIX))
    if private or message.receive_user_id:
        if me and message.sender_id == me:
            to = peer_name or str(message.receive_user_id or "?")
            mark = f" {READ_MARK}" if read else ""
            return f"[{stamp}] (private) {sender} -> {to}: {text}{mark}{note}"
        return f"[{stamp}] (private) {sender}: {text}{note}"
    if me and message.sender_id == me and message.conversation == BROADCAST:
        return f"[{stamp}] {sender} -> everybody: {text}{note}"
    return f"[{stamp}] {sender}: {text}{note}"


def read_receipt(peer_name: str, message: ChatMessage) -> str:
    """
    The peer read one's private messages, up to C{message} (the latest of
    them shown).
    """
    text = one_line(message.text)
    if len(text) > 40:
        text = text[:39] + "\u2026"
    return f"{READ_MARK} {peer_name} read your messages up to: {text}"


def conversation_reset(where: str, seq: int) -> str:
    """
    The server's store lost the messages of a conversation after C{seq}.
    """
    return (
        f"the server's store lost messages of {where} after #{seq}; "
        "it resent what it holds"
    )


def unread_summary(counts: Sequence[tuple[str, int]]) -> str:
    """
    The unread counts of the conversations that have unread messages
    (C{(where, count)}), on one line.
    """
    counts = [(where, count) for where, count in counts if count > 0]
    if not counts:
        return "no unread messages"
    total = sum(count for _, count in counts)
    listed = ", ".join(f"{where} {count}" for where, count in counts)
    return f"unread: {total} ({listed})"


# Errors


@functools.singledispatch
def describe(error: BaseException) -> str:
    """
    A one-line explanation of C{error} for the user.
    """
    text = str(error).splitlines()[0] if str(error) else ""
    return text or type(error).__name__


@describe.register
def _route_error(error: RouteError) -> str:
    return error.message


@describe.register
def _unreachable(error: ConnectError | ConnectingCancelledError) -> str:
    return "the route cannot be reached (is it running?)"


@describe.register
def _timed_out(error: TimeoutError | defer.TimeoutError | CancelledError) -> str:
    return "the route did not answer in time"


@describe.register
def _cut(
    error: ResponseNeverReceived | RequestTransmissionFailed | ResponseFailed,
) -> str:
    return "the connection to the route broke"


@describe.register
def _no_such_host(error: DNSLookupError) -> str:
    return "the route's host name cannot be found"


@describe.register
def _refusal(error: LoginError | SendError) -> str:
    return error.reason


@describe.register
def _not_logged_in(error: NotLoggedIn) -> str:
    return "not logged in yet"


@describe.register
def _closed(error: ClientClosed) -> str:
    return str(error) or "the client is closed"


def error_line(text: str) -> str:
    """
    A one-line error.
    """
    return f"error: {text}"


# Connection state

#: What a change to each state prints (when the console shows it), given
#: the change's reason.
STATE_LINES: Mapping[ClientState, Callable[[str], str]] = {
    ClientState.RECONNECTING: lambda reason: (
        f"connection lost ({reason}); reconnecting..."
    ),
    ClientState.READY: lambda reason: f"reconnected to {reason}",
    ClientState.FAILED: lambda reason: error_line(
        f"disconnected: {reason} (:q! to quit)"
    ),
}


def server_error(reason: str) -> str:
    """
    An error the server reported about the connection.
    """
    return error_line(f"server: {reason}")


# Answers to commands


def help_listing(rows: Sequence[tuple[str, str]]) -> str:
    """
    C{:all}: one C{usage  help} line per row, aligned.
    """
    width = max(len(usage) for usage, _ in rows)
    return "\n".join(f"  {usage.ljust(width)}  {text}" for usage, text in rows)


def online_users(users: Sequence[User], prefix: str) -> list[str]:
    """
    C{:olu} and C{:pu}: a count, then one user per line.
    """
    if prefix:
        head = f"online users starting with {prefix!r}: {len(users)}"
    else:
        head = f"online users: {len(users)}"
    return [head] + [f"  {user.user_id}  {user.user_name}" for user in users]


def search_result(record: Mapping[str, Any]) -> str:
    """
    C{:q}: one history record.
    """
    stamp = time.strftime(
        "%Y-%m-%d %H:%M:%S", time.localtime(record.get("ts", 0) / 1000)
    )
    where = record.get("to") or record.get("group") or ""
    arrow = f" -> {where}" if where else ""
    text = emoji.render(str(record.get("text", "")))
    return f"[{stamp}] {record.get('from', '?')}{arrow}: {text}"


def emoji_page(number: int, items: Sequence[tuple[str, str]]) -> list[str]:
    """
    C{:emoji}: one page of aliases, four per line.
    """
    lines = [f"emoji page {number}/{emoji.page_count()}:"]
    for i in range(0, len(items), 4):
        lines.append(
            "  " + "   ".join(f"{alias} {char}" for alias, char in items[i : i + 4])
        )
    return lines


def group_list(groups: Iterable[str], current: str) -> list[str]:
    """
    C{:groups}: one group per line, the current one starred.
    """
    return [f"{'*' if group == current else ' '} {group}" for group in groups]


def members_line(group: str, members: Iterable[User]) -> str:
    """
    C{:members}.
    """
    return f"{group}: " + ", ".join(f"{m.user_name} ({m.user_id})" for m in members)


#: How each group policy is said.
POLICY_TEXT: Mapping[str, str] = {
    "open": "open to anyone",
    "invite": "by invitation",
    "approval": "by the owner's approval",
}


def group_info(info: GroupInfo) -> str:
    """
    C{:ginfo}: who owns the group, who may join, what members read.
    """
    owner = "no owner" if info.owner_id is None else f"owner {info.owner_id}"
    policy = POLICY_TEXT.get(info.policy, info.policy)
    if info.history == "full":
        history = "members read all its history"
    else:
        history = "members read from their join on"
    count = f"{info.members} member{'' if info.members == 1 else 's'}"
    line = f"{info.group_id}: {owner}, {policy}, {history}, {count}"
    if info.member and info.joined_at:
        line += f"; you joined after message {info.joined_at}"
    elif not info.member:
        line += "; you are not a member"
    return line


def join_requests(group: str, users: Sequence[User]) -> list[str]:
    """
    C{:requests}: who waits to join, oldest first.
    """
    if not users:
        return [f"nobody asks to join {group}"]
    return [f"asking to join {group}:"] + [
        f"  {user.user_id}  {user.user_name}" for user in users
    ]
