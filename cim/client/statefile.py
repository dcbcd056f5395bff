"""
The client's small state files (cursors, account keys, device ids and
keys): JSON, readable only by their owner, replaced atomically so that a
crash never leaves half a file, and read leniently (a missing or damaged
file is as good as none).

L{RouteFile} is the shape of the files that keep one record per route and
account, shared by several clients of one folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from twisted.logger import Logger

log = Logger()

_Record = TypeVar("_Record")


def read_json(path: Path, what: str) -> Any | None:
    """
    The JSON in C{path}, or C{None} when there is none or it cannot be read
    (a warning naming C{what} is logged then).
    """
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warn(
            "Ignoring unreadable {what} {path}: {e}", what=what, path=str(path), e=e
        )
        return None


def write_json(path: Path, data: Any) -> None:
    """
    Replace C{path} with C{data} as JSON (owner-only; its folder created
    owner-only when missing), through a temporary file of this process, so
    that two clients sharing a folder never write over each other's
    half-written file.

    @raise OSError: it could not be written.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def slug(text: str, hashed: bool = False) -> str:
    """
    C{text} as a file name: what is not a letter, digit, C{.}, C{_} or
    C{-} becomes C{_}; with C{hashed}, a short hash of C{text} follows, so
    that two texts with one slug still differ.
    """
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "_", text).strip("._")[:48] or "_"
    if hashed:
        name += "-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]
    return name


def route_slug(route_url: str) -> str:
    """
    The folder name of a route: its host and port (and C{https_} when it
    uses TLS), e.g. C{127.0.0.1_8083}.
    """
    url = route_url.rstrip("/")
    scheme, _, rest = url.partition("://")
    return slug(("https_" if scheme == "https" else "") + rest)


def route_key(url: str) -> str:
    """
    How a route URL names its entries in the state folder's files.
    """
    return url.rstrip("/")


class RouteFile(Generic[_Record]):
    """
    A state file C{{"version": 1, "routes": {route: {entry: record}}}}: one
    record per route URL (L{route_key}) and entry (an account's name key,
    or a user id and account tag), kept in C{state_dir} (in memory only
    when C{None}).

    Several clients may share the folder (one per account, as in the quick
    start): L{reload} before a change takes in what the others saved since,
    so that a save never drops their records.

    @param what: the file's description in log lines.
    @param parse: a record from its JSON form, or C{None} to skip a
        malformed one.
    @param dump: a record's JSON form.
    """

    log = Logger()
    version = 1

    def __init__(
        self,
        state_dir: Path | None,
        file_name: str,
        what: str,
        parse: Callable[[Any], _Record | None],
        dump: Callable[[_Record], Any],
    ) -> None:
        self.path = None if state_dir is None else Path(state_dir) / file_name
        self.what = what
        self._parse = parse
        self._dump = dump
        self._records: dict[str, dict[str, _Record]] = {}
        self.reload()

    def reload(self) -> None:
        """
        Read the file again (when there is one), in place of what is held.
        A damaged file leaves what is held as it is (a warning is logged).
        """
        if self.path is None:
            return
        data = read_json(self.path, self.what)
        if data is None:
            if not self.path.exists():
                self._records = {}
            return
        routes = data.get("routes") if isinstance(data, dict) else None
        if not isinstance(routes, dict):
            self.log.warn(
                "Ignoring malformed {what} {path}", what=self.what, path=str(self.path)
            )
            return
        records: dict[str, dict[str, _Record]] = {}
        for route, entries in routes.items():
            if not isinstance(entries, dict):
                continue
            for entry, raw in entries.items():
                record = self._parse(raw)
                if record is not None:
                    records.setdefault(str(route), {})[str(entry)] = record
        self._records = records

    def get(self, route_url: str, entry: str) -> _Record | None:
        """
        The record held for C{entry} at C{route_url}.
        """
        return self._records.get(route_key(route_url), {}).get(entry)

    def put(
        self,
        route_url: str,
        entry: str,
        record: _Record | None,
        replacing: str = "",
    ) -> None:
        """
        Keep C{record} for C{entry} at C{route_url} (forget it when
        C{None}; and forget the entry C{replacing}, when given), with what
        other clients saved since, and save the file.

        @raise OSError: the file cannot be written.
        """
        self.reload()
        entries = self._records.setdefault(route_key(route_url), {})
        changed = replacing and entries.pop(replacing, None) is not None
        if record is not None:
            entries[entry] = record
        elif entries.pop(entry, None) is None and not changed:
            return
        self.save()

    def save(self) -> None:
        """
        Write what is held to the file (nothing without a state folder).

        @raise OSError: the file cannot be written.
        """
        if self.path is None:
            return
        write_json(
            self.path,
            {
                "version": self.version,
                "routes": {
                    route: {entry: self._dump(r) for entry, r in entries.items()}
                    for route, entries in self._records.items()
                    if entries
                },
            },
        )
