"""
The client's small state files (cursors, account keys): JSON, readable only
by their owner, replaced atomically so that a crash never leaves half a
file, and read leniently (a missing or damaged file is as good as none).
"""

from __future__ import annotations

import json
import os
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
