"""
The device keys this client holds: the credential a route gives each
extended login of a device, that logs that device (and only it) in again
without the password, once (each login with it answers the next one).

A client whose account has a password keeps its device's key in its state
folder, in C{device-keys.json} (a L{RouteFile}), by route URL and account
(the account's name key, L{cim.names.name_key}), with the account's id and
the device it is for, so that a restarted console logs in again without
being given the password.  The file is written like the account keys
(L{cim.client.keys}): atomically, readable by its owner only (whoever
copies it can log that device in once), and merged with what other clients
sharing the folder wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cim.client.statefile import RouteFile
from cim.names import name_key

#: The file's name in the state folder.
FILE_NAME = "device-keys.json"


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

    @classmethod
    def parse(cls, raw: Any) -> HeldDeviceKey | None:
        """
        A device key from its form in the file, or C{None} when malformed.
        """
        if not isinstance(raw, dict):
            return None
        user_id, device, key = raw.get("userId"), raw.get("device"), raw.get("key")
        if (
            isinstance(user_id, int)
            and isinstance(device, str)
            and isinstance(key, str)
            and device
            and key
        ):
            return cls(user_id, device, key)
        return None

    def dump(self) -> dict[str, Any]:
        return {"userId": self.user_id, "device": self.device, "key": self.key}


class DeviceKeys:
    """
    The device keys kept in C{state_dir} (in memory only when C{None}).
    """

    def __init__(self, state_dir: Path | None) -> None:
        self._file = RouteFile(
            state_dir,
            FILE_NAME,
            "device key file",
            HeldDeviceKey.parse,
            HeldDeviceKey.dump,
        )
        self.path = self._file.path

    def get(self, route_url: str, user_name: str) -> HeldDeviceKey | None:
        """
        The device key held for account C{user_name} at C{route_url}.
        """
        # Another client of this folder may have used and replaced it.
        self._file.reload()
        return self._file.get(route_url, name_key(user_name))

    def put(
        self, route_url: str, user_name: str, user_id: int, device: str, key: str
    ) -> None:
        """
        Keep C{key}, the device key of C{device} of account C{user_name}
        (id C{user_id}) at C{route_url}, replacing the one held, and save
        the file.

        @raise OSError: the file cannot be written.
        """
        self._file.put(
            route_url, name_key(user_name), HeldDeviceKey(user_id, device, key)
        )

    def drop(self, route_url: str, user_name: str) -> None:
        """
        Forget the device key held for C{user_name} at C{route_url} (it was
        refused, or the device logged off), and save the file.

        @raise OSError: the file cannot be written.
        """
        self._file.put(route_url, name_key(user_name), None)
