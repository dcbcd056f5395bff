"""
The device keys this client holds: the credential a route gives each
extended login of a device, that logs that device (and only it) in again
without the password, once (each login with it answers the next one).

A client whose account has a password keeps its device's key in its state
folder, in C{device-keys.json}, by route URL and account (the account's
name key, L{cim.names.name_key}), with the account's id and the device it
is for, so that a restarted console logs in again without being given the
password.  The file is written like the account keys (L{cim.client.keys}):
atomically, readable by its owner only (whoever copies it can log that
device in once), and merged with what other clients sharing the folder
wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

from cim.client.keys import route_key
from cim.client.statefile import read_json, write_json
from cim.names import name_key

#: The file's name in the state folder, and its format version.
FILE_NAME = "device-keys.json"
FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class HeldDeviceKey:
    """
    A device key this client holds.
    """

    user_id: int
    device: str
    key: str

    def __repr__(self) -> str:
        # Never in a log line.
        return f"HeldDeviceKey(user_id={self.user_id}, device={self.device!r}, key=...)"


class DeviceKeys:
    """
    The device keys kept in C{state_dir} (in memory only when C{None}).
    """

    log = Logger()

    def __init__(self, state_dir: Path | None) -> None:
        self.path = None if state_dir is None else Path(state_dir) / FILE_NAME
        self._keys: dict[str, dict[str, HeldDeviceKey]] = {}
        if self.path is not None:
            self._load(self.path)

    def _load(self, path: Path) -> None:
        data = read_json(path, "device key file")
        self._keys = {}
        if data is None:
            return
        routes = data.get("routes") if isinstance(data, dict) else None
        if not isinstance(routes, dict):
            self.log.warn("Ignoring malformed device key file {path}", path=str(path))
            return
        for route, accounts in routes.items():
            if not isinstance(accounts, dict):
                continue
            for account, held in accounts.items():
                if not isinstance(held, dict):
                    continue
                user_id, device, key = (
                    held.get("userId"),
                    held.get("device"),
                    held.get("key"),
                )
                if (
                    isinstance(user_id, int)
                    and isinstance(device, str)
                    and isinstance(key, str)
                    and device
                    and key
                ):
                    self._keys.setdefault(route, {})[account] = HeldDeviceKey(
                        user_id, device, key
                    )

    def get(self, route_url: str, user_name: str) -> HeldDeviceKey | None:
        """
        The device key held for account C{user_name} at C{route_url}.
        """
        if self.path is not None:
            # Another client of this folder may have used and replaced it.
            self._load(self.path)
        return self._keys.get(route_key(route_url), {}).get(name_key(user_name))

    def put(
        self, route_url: str, user_name: str, user_id: int, device: str, key: str
    ) -> None:
        """
        Keep C{key}, the device key of C{device} of account C{user_name}
        (id C{user_id}) at C{route_url}, replacing the one held, and save
        the file.

        @raise OSError: the file cannot be written.
        """
        if self.path is not None:
            self._load(self.path)
        accounts = self._keys.setdefault(route_key(route_url), {})
        accounts[name_key(user_name)] = HeldDeviceKey(user_id, device, key)
        self._save()

    def drop(self, route_url: str, user_name: str) -> None:
        """
        Forget the device key held for C{user_name} at C{route_url} (it was
        refused, or the device logged off), and save the file.

        @raise OSError: the file cannot be written.
        """
        if self.path is not None:
            self._load(self.path)
        accounts = self._keys.get(route_key(route_url), {})
        if accounts.pop(name_key(user_name), None) is not None:
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        data = {
            "version": FORMAT_VERSION,
            "routes": {
                route: {
                    account: {
                        "userId": held.user_id,
                        "device": held.device,
                        "key": held.key,
                    }
                    for account, held in accounts.items()
                }
                for route, accounts in self._keys.items()
                if accounts
            },
        }
        write_json(self.path, data)
