"""
The device id of this client: the name its sessions carry, so that a user
may be logged in on several devices at once, and a new login of the same
device replaces its old session (C{cim.message.KICK_REPLACED}).

A client that names none keeps one per route and account in its state
folder, in C{devices.json} (written like the account keys: atomically,
owner-only, merged with what other clients sharing the folder wrote), so
that a restarted client is the same device; without a state folder, each
L{cim.client.library.Client} is a device of its own.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

from twisted.logger import Logger

from cim.client.statefile import read_json, write_json
from cim.limits import DEVICE_ID

#: The file's name in the state folder, and its format version.
FILE_NAME = "devices.json"
FORMAT_VERSION = 1


def new_device_id() -> str:
    """
    A new random device id.
    """
    return uuid.uuid4().hex


def _route(url: str) -> str:
    return url.rstrip("/")


def account_tag(credential: str) -> str:
    """
    A short tag of an account, from what proves it (its account key, else
    its name): two accounts of one id in two incarnations of a store have
    two tags.  Not the credential: a hash of it.
    """
    return hashlib.sha256(credential.encode("utf-8")).hexdigest()[:12]


def _user(user_id: int, account: str) -> str:
    return f"{user_id}-{account}" if account else str(user_id)


class DeviceIds:
    """
    The device ids kept in C{state_dir} (in memory only when C{None}), by
    route URL and user id.
    """

    log = Logger()

    def __init__(self, state_dir: Path | None) -> None:
        self.path = None if state_dir is None else Path(state_dir) / FILE_NAME
        self._ids: dict[str, dict[str, str]] = {}
        if self.path is not None:
            self._load(self.path)

    def _load(self, path: Path) -> None:
        data = read_json(path, "device file")
        if data is None:
            return
        routes = data.get("routes") if isinstance(data, dict) else None
        if not isinstance(routes, dict):
            self.log.warn("Ignoring malformed device file {path}", path=str(path))
            return
        for route, users in routes.items():
            if not isinstance(users, dict):
                continue
            for user, device in users.items():
                if isinstance(device, str) and DEVICE_ID.fullmatch(device):
                    self._ids.setdefault(str(route), {})[str(user)] = device

    def get(self, route_url: str, user_id: int, account: str = "") -> str | None:
        """
        The device id kept for C{user_id} at C{route_url} (and account
        C{account}, an L{account_tag}, when given), if any.
        """
        return self._ids.get(_route(route_url), {}).get(_user(user_id, account))

    def device_for(self, route_url: str, user_id: int, account: str = "") -> str:
        """
        The device id of C{user_id} at C{route_url}: the one kept, else a
        new one, kept from now on (a failure to save it is logged: the id
        then lasts as long as this object).

        @param account: the L{account_tag} of the account: an account of
            a new store that got the same id is another device.  The id
            kept for C{user_id} alone (before accounts were told apart) is
            taken over once.
        """
        if self.path is not None:
            # Another client sharing the folder may have saved one since.
            self._load(self.path)
        device = self.get(route_url, user_id, account)
        if device is not None:
            return device
        users = self._ids.setdefault(_route(route_url), {})
        device = users.pop(str(user_id), None) if account else None
        device = device or new_device_id()
        users[_user(user_id, account)] = device
        if self.path is not None:
            try:
                write_json(self.path, {"version": FORMAT_VERSION, "routes": self._ids})
            except OSError as e:
                self.log.error(
                    "Cannot save the device id in {path}: {e}; the next run "
                    "will be another device",
                    path=str(self.path),
                    e=e,
                )
        return device
