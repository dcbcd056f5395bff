"""
What a line typed in the console means: L{parse_line} turns it into an
intent (one small frozen dataclass per kind of command or message), a pure
function, so that every form of bad input is easy to test.

The console commands are the table L{COMMANDS}: each row has the command's
names, its usage and help text (from which C{:all}'s listing is made, see
L{help_rows}) and the parser of its arguments.  A line that is no command is
a message: plain, C{<userId>;;<text>} or C{@<name> <text>}.  What the
intents do is L{cim.client.console.Console}'s business.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from cim.limits import GROUP_ID_RULE, is_group_id
from cim.message import (
    BROADCAST,
    GROUP_PREFIX,
    INBOX_PREFIX,
    PAIR_PREFIX,
    group_conversation,
)

# Intents


@dataclass(frozen=True, slots=True)
class Say:
    """
    A plain line: to the current target (L{To}); an error while there is
    none.
    """

    text: str


@dataclass(frozen=True, slots=True)
class PrivateById:
    """
    C{<userId>;;<text>}.
    """

    user_id: int
    text: str


@dataclass(frozen=True, slots=True)
class PrivateByName:
    """
    C{@<name> <text>}.
    """

    name: str
    text: str


#: A message (a line that is no command).
Message = Say | PrivateById | PrivateByName


@dataclass(frozen=True, slots=True)
class Quit:
    """
    C{:quit} (warns first when messages are still sending or delayed), or
    C{:q!} (quits anyway: C{force}).
    """

    force: bool = False


@dataclass(frozen=True, slots=True)
class To:
    """
    C{:to <target>}: where plain lines go from now on: C{"@<name>"} (a
    user), C{"all"} (everybody online), a group id, C{"nobody"}; C{""}
    says where they go now.
    """

    target: str = ""


@dataclass(frozen=True, slots=True)
class OnlineUsers:
    """C{:olu}, or C{:pu <prefix>} with a prefix."""

    prefix: str = ""


@dataclass(frozen=True, slots=True)
class Help:
    """C{:all}."""


@dataclass(frozen=True, slots=True)
class Search:
    """C{:q <keyword>}: search the history file."""

    keyword: str


@dataclass(frozen=True, slots=True)
class Info:
    """C{:info}."""


@dataclass(frozen=True, slots=True)
class EmojiList:
    """C{:emoji [page]}."""

    page: int = 1


@dataclass(frozen=True, slots=True)
class Delay:
    """C{:delay <msg> <seconds>}: send C{message} later."""

    message: Message
    seconds: float


@dataclass(frozen=True, slots=True)
class Groups:
    """C{:groups}."""


@dataclass(frozen=True, slots=True)
class Join:
    """C{:join <group>}: join and talk there."""

    group: str


@dataclass(frozen=True, slots=True)
class Leave:
    """C{:leave <group>}."""

    group: str


@dataclass(frozen=True, slots=True)
class Create:
    """
    C{:create <group> [open|invite|approval] [join|full]}: create (with a
    policy and a history mode; the route's defaults when empty), and talk
    there.
    """

    group: str
    policy: str = ""
    history: str = ""


@dataclass(frozen=True, slots=True)
class AboutGroup:
    """C{:ginfo [group]}: a group's owner, policy, history and size."""

    group: str = ""


@dataclass(frozen=True, slots=True)
class Invite:
    """C{:invite <group> <user>} (the owner)."""

    group: str
    user: str


@dataclass(frozen=True, slots=True)
class Requests:
    """C{:requests [group]}: who waits to join (the owner)."""

    group: str = ""


@dataclass(frozen=True, slots=True)
class Approve:
    """C{:approve <group> <user>} (the owner)."""

    group: str
    user: str


@dataclass(frozen=True, slots=True)
class Reject:
    """C{:reject <group> <user>} (the owner)."""

    group: str
    user: str


@dataclass(frozen=True, slots=True)
class Remove:
    """C{:remove <group> <user>}: remove a member (the owner)."""

    group: str
    user: str


@dataclass(frozen=True, slots=True)
class Transfer:
    """C{:transfer <group> <user>}: hand the group over (the owner)."""

    group: str
    user: str


@dataclass(frozen=True, slots=True)
class Members:
    """C{:members [group]}."""

    group: str = ""


@dataclass(frozen=True, slots=True)
class ShowHistory:
    """
    C{:history [@user|group|conversation] [n]}: stored messages from the
    server, of a private conversation (both sides) or a group.
    """

    conversation: str = ""
    count: int = 20


@dataclass(frozen=True, slots=True)
class Unread:
    """C{:unread}: the unread counts."""


#: Everything L{parse_line} returns.
Intent = (
    Message
    | Quit
    | To
    | OnlineUsers
    | Help
    | Search
    | Info
    | EmojiList
    | Delay
    | Groups
    | Join
    | Leave
    | Create
    | AboutGroup
    | Invite
    | Requests
    | Approve
    | Reject
    | Remove
    | Transfer
    | Members
    | ShowHistory
    | Unread
)


class ParseError(ValueError):
    """
    A line that is no command nor message; its text is the one-line error.
    """


class LooksLikeACommand(ParseError):
    """
    A line that would be a message but reads like a command typed without
    its C{:} (C{quit}, C{clear}, C{/help}): not sent, unless typed again
    at once (then L{parse_message} sends it).
    """


class BadUsage(ParseError):
    """
    A command with the wrong arguments: L{parse_line} says how it is used.
    """


#: The longest :delay accepted, in seconds.
MAX_DELAY = 24 * 3600.0
#: The most messages :history shows.
MAX_HISTORY = 200


# Arguments


@dataclass(frozen=True, slots=True)
class Arguments:
    """
    What follows a command's name.

    @ivar words: split on white space.
    @ivar text: as typed (inner white space kept), or C{""}.
    """

    words: tuple[str, ...]
    text: str


def _group(args: Arguments) -> str:
    """
    The one group id argument of a command (C{g:} prefix allowed).
    """
    if len(args.words) != 1:
        raise BadUsage()
    return _group_id(args.words[0])


def _group_id(group: str) -> str:
    """
    A group id as typed (C{g:} prefix allowed).
    """
    if group.startswith(GROUP_PREFIX):
        group = group[len(GROUP_PREFIX) :]
    if not is_group_id(group):
        raise ParseError(f"bad group name {group!r}: {GROUP_ID_RULE}")
    return group


def _count(text: str) -> int:
    """
    A message count argument.
    """
    try:
        value = int(text)
    except ValueError:
        raise ParseError(f"{text!r} is not a number") from None
    if not 1 <= value <= MAX_HISTORY:
        raise ParseError(f"the count must be between 1 and {MAX_HISTORY}")
    return value


def _no_arguments(intent: Callable[[], Intent]) -> Callable[[Arguments], Intent]:
    """
    The parser of a command that takes no argument (and ignores any).
    """
    return lambda _: intent()


def _prefix(args: Arguments) -> OnlineUsers:
    if len(args.words) != 1:
        raise BadUsage()
    return OnlineUsers(args.words[0])


def _search(args: Arguments) -> Search:
    if not args.words:
        raise BadUsage()
    return Search(args.text)


def _emoji(args: Arguments) -> EmojiList:
    if len(args.words) > 1:
        raise BadUsage()
    if not args.words:
        return EmojiList()
    page = args.words[0]
    if not page.isdigit() or int(page) < 1:
        raise ParseError(f"{page!r} is not a page number")
    return EmojiList(int(page))


def _delay(args: Arguments) -> Delay:
    if len(args.words) < 2:
        raise BadUsage()
    try:
        seconds = float(args.words[-1])
    except ValueError:
        raise ParseError(f"{args.words[-1]!r} is not a number of seconds") from None
    if not 0 <= seconds <= MAX_DELAY:
        raise ParseError(f"the delay must be between 0 and {MAX_DELAY:g} seconds")
    text = args.text.rsplit(None, 1)[0]
    if _is_command(text.split()[0]):
        raise ParseError("only messages can be delayed")
    return Delay(parse_message(text), seconds)


#: What C{:to} takes for everybody online, and for nobody.
EVERYBODY = ("all", "everybody", "*")
NOBODY = ("nobody", "none", "-")


def _to(args: Arguments) -> To:
    text = args.text.strip()
    if not text:
        return To()
    if text.startswith("@"):
        name, rest = split_name(text[1:])
        if rest.strip():
            raise BadUsage()
        return To("@" + name)
    if len(args.words) != 1:
        raise BadUsage()
    word = args.words[0]
    if word.lower() in EVERYBODY:
        return To(BROADCAST)
    if word.lower() in NOBODY:
        return To(NOBODY[0])
    return To(GROUP_PREFIX + _group_id(word))


def _members(args: Arguments) -> Members:
    return Members(_group(args) if args.words else "")


#: The group policies and history modes C{:create} takes.
POLICIES = ("open", "invite", "approval")
HISTORY_MODES = ("join", "full")


def _create(args: Arguments) -> Create:
    if not 1 <= len(args.words) <= 3:
        raise BadUsage()
    group, *options = args.words
    policy = history = ""
    for option in options:
        if option in POLICIES and not policy:
            policy = option
        elif option in HISTORY_MODES and not history:
            history = option
        else:
            raise ParseError(
                f"{option!r}: the policy is one of {', '.join(POLICIES)}, the "
                f"history one of {', '.join(HISTORY_MODES)}"
            )
    return Create(_group_id(group), policy, history)


def _user(word: str) -> str:
    """
    A user argument: an id, or a name (C{@} allowed in front).
    """
    user = word.removeprefix("@")
    if not user:
        raise BadUsage()
    if user.isdigit() and int(user) <= 0:
        raise ParseError(f"{word!r} is not a user id")
    return user


def _group_user(
    intent: Callable[[str, str], Intent],
) -> Callable[[Arguments], Intent]:
    """
    The parser of a C{<group> <user>} command.
    """

    def parse(args: Arguments) -> Intent:
        group, _, rest = args.text.strip().partition(" ")
        rest = rest.strip()
        if rest.startswith(('"', '@"')):
            # A name in quotes: @"bob smith".
            name, after = split_name(rest.removeprefix("@"))
            if after.strip():
                raise BadUsage()
            return intent(_group_id(group), name)
        if len(args.words) != 2:
            raise BadUsage()
        return intent(_group_id(args.words[0]), _user(args.words[1]))

    return parse


def _optional_group(intent: Callable[[str], Intent]) -> Callable[[Arguments], Intent]:
    """
    The parser of a C{[group]} command (the current group when omitted).
    """
    return lambda args: intent(_group(args) if args.words else "")


def _history(args: Arguments) -> ShowHistory:
    words = args.words
    if len(words) > 2:
        raise BadUsage()
    if len(words) == 2:
        return ShowHistory(words[0], _count(words[1]))
    if len(words) == 1:
        if words[0].isdigit():
            return ShowHistory("", _count(words[0]))
        return ShowHistory(words[0])
    return ShowHistory()


# The table


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """
    One console command.

    @ivar names: what is typed (the first is the main one).
    @ivar usage: how it is typed, with its arguments.
    @ivar help: what it does, as C{:all} lists it.
    @ivar parse: makes the intent of the arguments; raises L{BadUsage} (or
        L{ParseError} with a message) when they are wrong.
    @ivar note: said after the usage when the command is misused.
    """

    names: tuple[str, ...]
    usage: str
    help: str
    parse: Callable[[Arguments], Intent]
    note: str = ""


#: Every console command, in the order C{:all} lists them.
COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec(
        (":quit",),
        ":quit",
        "quit (asks first while messages are sending or delayed)",
        _no_arguments(Quit),
    ),
    CommandSpec(
        (":q!",), ":q!", "quit now, even with messages unsent", lambda _: Quit(True)
    ),
    CommandSpec(
        (":to",),
        ":to @<user> | <group> | all | nobody",
        "where plain lines go: a user, a group, everybody online (all); "
        "alone: where they go now",
        _to,
    ),
    CommandSpec((":all",), ":all", "list the commands", _no_arguments(Help)),
    CommandSpec((":olu",), ":olu", "list the online users", _no_arguments(OnlineUsers)),
    CommandSpec(
        (":pu",),
        ":pu <prefix>",
        "online users whose name starts with <prefix>",
        _prefix,
    ),
    CommandSpec(
        (":q",),
        ":q <keyword>",
        "search the chat history",
        _search,
        note=" (:q! quits)",
    ),
    CommandSpec((":info",), ":info", "who and where you are", _no_arguments(Info)),
    CommandSpec((":emoji",), ":emoji [page]", "list the emoji aliases", _emoji),
    CommandSpec((":delay",), ":delay <msg> <seconds>", "send <msg> later", _delay),
    CommandSpec((":groups",), ":groups", "your groups", _no_arguments(Groups)),
    CommandSpec(
        (":create",),
        ":create <group> [open|invite|approval] [join|full]",
        "create a group you own and talk there: who may join (by invitation "
        "unless you say), what history members read (from their join unless "
        "full)",
        _create,
    ),
    CommandSpec(
        (":join",),
        ":join <group>",
        "join a group and talk there",
        lambda args: Join(_group(args)),
    ),
    CommandSpec(
        (":leave",), ":leave <group>", "leave a group", lambda args: Leave(_group(args))
    ),
    CommandSpec((":members",), ":members [group]", "the members of a group", _members),
    CommandSpec(
        (":ginfo",),
        ":ginfo [group]",
        "a group's owner, policy, history and size",
        _optional_group(AboutGroup),
    ),
    CommandSpec(
        (":invite",),
        ":invite <group> <user>",
        "let a user (id or name) join your group",
        _group_user(Invite),
    ),
    CommandSpec(
        (":requests",),
        ":requests [group]",
        "who asks to join your group",
        _optional_group(Requests),
    ),
    CommandSpec(
        (":approve",),
        ":approve <group> <user>",
        "let a user who asked join your group",
        _group_user(Approve),
    ),
    CommandSpec(
        (":reject",),
        ":reject <group> <user>",
        "turn down a user who asked to join your group",
        _group_user(Reject),
    ),
    CommandSpec(
        (":remove",),
        ":remove <group> <user>",
        "remove a member from your group",
        _group_user(Remove),
    ),
    CommandSpec(
        (":transfer",),
        ":transfer <group> <user>",
        "hand your group over to a member (then you may leave it)",
        _group_user(Transfer),
    ),
    CommandSpec(
        (":history",),
        ":history [@user|group] [n]",
        "the last n stored messages with a user (both sides) or of a group",
        _history,
    ),
    CommandSpec(
        (":unread",),
        ":unread",
        "how many messages you have not read, by conversation",
        _no_arguments(Unread),
    ),
)

#: The command of each name.
BY_NAME: dict[str, CommandSpec] = {
    name: spec for spec in COMMANDS for name in spec.names
}

#: The forms of a message, listed by C{:all} after the commands.
MESSAGE_FORMS: tuple[tuple[str, str], ...] = (
    ("<text>", "to whom the prompt names (:to sets it)"),
    ("<userId>;;<text>", "private message"),
    ("@<name> <text>", 'private message (@"<name with spaces>" <text>)'),
)


def help_rows() -> list[tuple[str, str]]:
    """
    C{(usage, help)} of every command then every message form, as C{:all}
    lists them.
    """
    return [(spec.usage, spec.help) for spec in COMMANDS] + list(MESSAGE_FORMS)


# Parsing


def _is_command(word: str) -> bool:
    """
    Whether a line starting with C{word} is a command.
    """
    # ":smile: hello" is a message that starts with an emoji alias.
    return word.startswith(":") and not (len(word) > 2 and word.endswith(":"))


def split_name(text: str) -> tuple[str, str]:
    """
    A user name at the start of C{text} (after its C{@}), and the rest: the
    first word, or a name in double quotes (C{"bob smith"}, with C{\\"}
    and C{\\\\} inside), so that every name the route accepts can be
    typed.

    @raise ParseError: an empty name, or a quote never closed.
    """
    if text.startswith('"'):
        chars: list[str] = []
        i = 1
        while i < len(text):
            char = text[i]
            if char == "\\" and i + 1 < len(text):
                chars.append(text[i + 1])
                i += 2
                continue
            if char == '"':
                break
            chars.append(char)
            i += 1
        else:
            raise ParseError('a quoted name needs its closing " (@"<name>" <text>)')
        if not "".join(chars).strip():
            raise ParseError("usage: @<name> <text>")
        return "".join(chars), text[i + 1 :]
    name, space, rest = text.partition(" ")
    if not name:
        raise ParseError("usage: @<name> <text>")
    return name, space + rest


#: Plain lines that read like a command typed without its colon.
COMMAND_LIKE = frozenset(
    {"q", "q!", "quit", "exit", "bye", "logout", "clear", "cls", "help", "?"}
    | {"ls", "who", "whoami", "history", "join", "leave", "all", "olu"}
)


def _command_like(line: str) -> bool:
    word = line.split()[0].lower() if line.split() else ""
    if line.strip().lower() in COMMAND_LIKE:
        return True
    # IRC habits: /quit, /msg bob hi, /join #x.
    return word.startswith("/") and word[1:].rstrip("!") in COMMAND_LIKE | {
        "msg",
        "me",
        "nick",
        "part",
        "to",
    }


_PRIVATE_BY_ID = re.compile(r"(\d+)\s*;;(.*)", re.DOTALL)


def parse_message(line: str) -> Message:
    """
    A line that is no command: plain, C{<id>;;<text>} (spaces around
    C{;;} allowed) or C{@<name> <text>}.
    """
    if line.startswith("@"):
        name, text = split_name(line[1:])
        if not text.strip():
            raise ParseError("empty message")
        return PrivateByName(name, text.strip())
    by_id = _PRIVATE_BY_ID.fullmatch(line)
    if by_id is not None:
        target, text = by_id.groups()
        if int(target) <= 0:
            raise ParseError(f"{target!r} is not a user id (usage: <userId>;;<text>)")
        if not text.strip():
            raise ParseError("empty message")
        return PrivateById(int(target), text.strip())
    target, sep, text = line.partition(";;")
    if sep and target and not any(c.isspace() for c in target):
        raise ParseError(f"{target!r} is not a user id (usage: <userId>;;<text>)")
    return Say(line)


def parse_line(line: str) -> Intent:
    """
    Parse one typed line.

    @raise ParseError: the line is an unknown command, a command with bad
        arguments, or a message without text or with a bad recipient.
    """
    line = line.strip()
    if not line:
        raise ParseError("empty message (:all lists the commands)")
    name, *after = line.split(None, 1)
    if not _is_command(name):
        if _command_like(line):
            raise LooksLikeACommand(
                f"not sent: {line!r} looks like a command (commands start with "
                "':', :all lists them); type it again to send it as a message"
            )
        return parse_message(line)
    spec = BY_NAME.get(name)
    if spec is None:
        raise ParseError(f"unknown command {name} (:all lists the commands)")
    rest = after[0] if after else ""
    try:
        return spec.parse(Arguments(tuple(rest.split()), rest))
    except BadUsage:
        raise ParseError(f"usage: {spec.usage}{spec.note}") from None


def conversation_of(target: str) -> str:
    """
    The conversation id a user means by C{target}: C{"p:<id>:<id>"},
    C{"g:<group>"} and C{"u:<id>"} as they are, anything else a group id.
    (C{"@<name>"} is a user, which L{cim.client.console.Console} finds.)
    """
    if target.startswith((PAIR_PREFIX, INBOX_PREFIX, GROUP_PREFIX)):
        return target
    if target == BROADCAST:
        return target
    return group_conversation(target)
