"""
The client's small state files (cursors, account keys): JSON, readable only
by their owner, replaced atomically so that a crash never leaves half a
file, and read leniently (a missing or damaged file is as good as none).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from twisted.logger import Logger

log = Logger()


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
