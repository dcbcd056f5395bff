"""
The console's chat history: every message sent or received, one JSON object
per line, in a file per user.  C{:q <keyword>} searches it, and the names it
saw let C{@name} reach users who are offline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger

from cim.client.devices import account_tag
from cim.client.statefile import route_slug, slug
from cim.message import ChatMessage

#: Runs a blocking function away from the reactor thread: C{run(f, *args)}
#: returns a Deferred of its result.
Runner = Callable[..., Deferred[Any]]


def inline_runner(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """
    A L{Runner} that runs C{f} at once (tests; tiny files).
    """
    return succeed(f(*args))


def thread_runner(reactor: IReactorThreads) -> Runner:
    """
    A L{Runner} on the reactor's thread pool.
    """
    from twisted.internet.threads import deferToThreadPool

    def run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run


def history_path(
    history_dir: str | os.PathLike[str],
    user_id: int,
    route_url: str = "",
    account: str = "",
    device: str = "",
) -> Path:
    """
    The history file of C{user_id} under C{history_dir}: per route, account
    and device when they are given (C{<route>/<id>-<account>-<device>.jsonl},
    the account as its L{account_tag}, a hash of what proves it, so that an
    account of a new store that was given the same id never reads
    another's history).
    """
    folder = Path(history_dir).expanduser()
    if not route_url:
        return folder / f"{user_id}.jsonl"
    parts = [str(user_id)]
    if account:
        parts.append(account_tag(account))
    if device:
        parts.append(slug(device))
    return folder / route_slug(route_url) / ("-".join(parts) + ".jsonl")


def record_of(
    message: ChatMessage, direction: str, to_name: str = ""
) -> dict[str, Any]:
    """
    The history record of C{message}; C{direction} is C{"in"} or C{"out"}.
    """
    record: dict[str, Any] = {
        "ts": message.timestamp,
        "dir": direction,
        "conversation": message.conversation,
        "fromId": message.sender_id,
        "from": message.sender_name,
        "text": message.text,
    }
    if message.msg_id:
        record["msgId"] = message.msg_id
        record["seq"] = message.seq
    if message.receive_user_id:
        record["toId"] = message.receive_user_id
    if to_name:
        record["to"] = to_name
    if message.group_id:
        record["group"] = message.group_id
    return record


def _read(path: Path) -> list[dict[str, Any]]:
    records = []
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash
                if isinstance(record, dict):
                    records.append(record)
    except FileNotFoundError:
        pass
    return records


def _search(path: Path, keyword: str, limit: int) -> list[dict[str, Any]]:
    needle = keyword.casefold()
    found = [
        r
        for r in _read(path)
        if needle in str(r.get("text", "")).casefold()
        or needle in str(r.get("from", "")).casefold()
        or needle in str(r.get("to", "")).casefold()
    ]
    return found[-limit:]


def _names(path: Path) -> dict[str, int]:
    names: dict[str, int] = {}
    for r in _read(path):
        if r.get("from") and isinstance(r.get("fromId"), int):
            names[str(r["from"])] = r["fromId"]
        if r.get("to") and isinstance(r.get("toId"), int):
            names[str(r["to"])] = r["toId"]
    return names


class History:
    """
    One user's history file.  Appends are small buffered writes on the
    reactor thread; reading the whole file (search, known names) runs
    through C{runner}, off the reactor thread.

    @ivar names: user name to id, of every user seen in the history.
    """

    log = Logger()

    def __init__(self, path: Path | None, runner: Runner = inline_runner) -> None:
        """
        @param path: the file; C{None} keeps no history.
        """
        self.path = path
        self.runner = runner
        self.names: dict[str, int] = {}
        self._file: IO[str] | None = None

    def load(self) -> Deferred[None]:
        """
        Read the names of the users in the history.
        """
        if self.path is None:
            return succeed(None)

        def loaded(names: dict[str, int]) -> None:
            # Names seen since the load started win.
            self.names = {**names, **self.names}

        d: Deferred[Any] = self.runner(_names, self.path)
        return d.addCallback(loaded)

    def add(self, message: ChatMessage, direction: str, to_name: str = "") -> None:
        """
        Append C{message} (errors are logged, never raised).
        """
        if message.sender_name:
            self.names[message.sender_name] = message.sender_id
        if to_name and message.receive_user_id:
            self.names[to_name] = message.receive_user_id
        if self.path is None:
            return
        line = json.dumps(record_of(message, direction, to_name), ensure_ascii=False)
        try:
            if self._file is None:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._file = self.path.open("a", encoding="utf-8")
            self._file.write(line + "\n")
            self._file.flush()
        except OSError as e:
            self.log.warn(
                "Could not write the history {path}: {e}", path=str(self.path), e=e
            )

    def search(self, keyword: str, limit: int = 50) -> Deferred[list[dict[str, Any]]]:
        """
        The last C{limit} records whose text or names contain C{keyword}
        (case-insensitive), oldest first.
        """
        if self.path is None:
            return succeed([])
        d: Deferred[list[dict[str, Any]]] = self.runner(
            _search, self.path, keyword, limit
        )
        return d

    def close(self) -> None:
        """
        Close the file.
        """
        if self._file is not None:
            self._file.close()
            self._file = None
