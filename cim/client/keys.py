"""
The account keys this client holds: the secret a route gives the client
that creates an account without a password, and that every later login of
that account needs (unless the route runs with C{--legacy-auth}).

They are kept in one small JSON file in the client's state folder,
C{account-keys.json} (a L{RouteFile}), by route URL and account (the
account's name key, L{cim.names.name_key}, so C{Alice} and C{alice} find
the same key), with the account's id.  The file is written atomically (a
temporary file renamed over the old one) and readable by its owner only:
whoever copies it can log in as these accounts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cim.client.statefile import RouteFile, route_key
from cim.names import name_key

__all__ = ["FILE_NAME", "AccountKeys", "HeldKey", "route_key"]

#: The file's name in the state folder.
FILE_NAME = "account-keys.json"


@dataclass(frozen=True, slots=True)
class HeldKey:
    """
    An account key this client holds.
    """

    user_id: int
    key: str

    def __repr__(self) -> str:
        # Never in a log line.
        return f"HeldKey(user_id={self.user_id}, key=...)"

    @classmethod
    def parse(cls, raw: Any) -> HeldKey | None:
        """
        A key from its form in the file, or C{None} when malformed.
        """
        if not isinstance(raw, dict):
            return None
        user_id, key = raw.get("userId"), raw.get("key")
        if isinstance(user_id, int) and isinstance(key, str) and key:
            return cls(user_id, key)
        return None

    def dump(self) -> dict[str, Any]:
        return {"userId": self.user_id, "key": self.key}


class AccountKeys:
    """
    The account keys kept in C{state_dir} (in memory only when C{None}).
    """

    def __init__(self, state_dir: Path | None) -> None:
        self._file = RouteFile(
            state_dir, FILE_NAME, "account key file", HeldKey.parse, HeldKey.dump
        )
        self.path = self._file.path

    def get(self, route_url: str, user_name: str) -> HeldKey | None:
        """
        The key held for account C{user_name} at the route C{route_url}.
        """
        return self._file.get(route_url, name_key(user_name))

    def put(self, route_url: str, user_name: str, user_id: int, key: str) -> None:
        """
        Keep C{key} for account C{user_name} (id C{user_id}) at C{route_url},
        and save the file.

        @raise OSError: the file cannot be written (the key would be lost:
            the caller must say so).
        """
        self._file.put(route_url, name_key(user_name), HeldKey(user_id, key))
