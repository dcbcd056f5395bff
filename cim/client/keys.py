"""
The account keys this client holds: the secret a route gives the client
that creates an account without a password, and that every later login of
that account needs (unless the route runs with C{--legacy-auth}).

They are kept in one small JSON file in the client's state folder,
C{account-keys.json}, by route URL and account (the account's name key,
L{cim.names.name_key}, so C{Alice} and C{alice} find the same key), with the
account's id.  The file is written atomically (a temporary file renamed over
the old one) and readable by its owner only: whoever copies it can log in
as these accounts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

from cim.client.statefile import read_json, write_json
from cim.names import name_key

#: The file's name in the state folder, and its format version.
FILE_NAME = "account-keys.json"
FORMAT_VERSION = 1


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


def route_key(url: str) -> str:
    """
    How a route URL names its entries in the state folder's key files.
    """
    return url.rstrip("/")


class AccountKeys:
    """
    The account keys kept in C{state_dir} (in memory only when C{None}).
    """

    log = Logger()

    def __init__(self, state_dir: Path | None) -> None:
        self.path = None if state_dir is None else Path(state_dir) / FILE_NAME
        self._keys: dict[str, dict[str, HeldKey]] = {}
        if self.path is not None:
            self._load(self.path)

    def _load(self, path: Path) -> None:
        data = read_json(path, "account key file")
        if data is None:
            return
        routes = data.get("routes") if isinstance(data, dict) else None
        if not isinstance(routes, dict):
            self.log.warn("Ignoring malformed account key file {path}", path=str(path))
            return
        for route, accounts in routes.items():
            if not isinstance(accounts, dict):
                continue
            for account, held in accounts.items():
                if not isinstance(held, dict):
                    continue
                user_id, key = held.get("userId"), held.get("key")
                if isinstance(user_id, int) and isinstance(key, str) and key:
                    self._keys.setdefault(route, {})[account] = HeldKey(user_id, key)

    def get(self, route_url: str, user_name: str) -> HeldKey | None:
        """
        The key held for account C{user_name} at the route C{route_url}.
        """
        return self._keys.get(route_key(route_url), {}).get(name_key(user_name))

    def put(self, route_url: str, user_name: str, user_id: int, key: str) -> None:
        """
        Keep C{key} for account C{user_name} (id C{user_id}) at C{route_url},
        and save the file.

        @raise OSError: the file cannot be written (the key would be lost:
            the caller must say so).
        """
        if self.path is not None:
            # Other clients sharing the folder (one per account, as in the
            # quick start) may have added keys since this one read it.
            self._load(self.path)
        accounts = self._keys.setdefault(route_key(route_url), {})
        accounts[name_key(user_name)] = HeldKey(user_id, key)
        if self.path is not None:
            self._save(self.path)

    def _save(self, path: Path) -> None:
        data = {
            "version": FORMAT_VERSION,
            "routes": {
                route: {
                    account: {"userId": held.user_id, "key": held.key}
                    for account, held in accounts.items()
                }
                for route, accounts in self._keys.items()
            },
        }
        write_json(path, data)
