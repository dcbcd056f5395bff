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
from typing import Any

from twisted.logger import Logger

from cim.client.statefile import RouteFile
from cim.limits import DEVICE_ID

#: The file's name in the state folder.
FILE_NAME = "devices.json"


def new_device_id() -> str:
    """
    A new random device id.
    """
    return uuid.uuid4().hex


def account_tag(credential: str) -> str:
    """
    A short tag of an account, from what proves it (its account key, else
    its name): two accounts of one id in two incarnations of a store have
    two tags.  Not the credential: a hash of it.
    """
    return hashlib.sha256(credential.encode("utf-8")).hexdigest()[:12]


def _user(user_id: int, account: str) -> str:
    return f"{user_id}-{account}" if account else str(user_id)


def _parse(raw: Any) -> str | None:
    return raw if isinstance(raw, str) and DEVICE_ID.fullmatch(raw) else None


def _dump(device: str) -> str:
    return device


class DeviceIds:
    """
    The device ids kept in C{state_dir} (in memory only when C{None}), by
    route URL and user id (a L{RouteFile}).
    """

    log = Logger()

    def __init__(self, state_dir: Path | None) -> None:
        self._file = RouteFile(state_dir, FILE_NAME, "device file", _parse, _dump)
        self.path = self._file.path

    def get(self, route_url: str, user_id: int, account: str = "") -> str | None:
        """
        The device id kept for C{user_id} at C{route_url} (and account
        C{account}, an L{account_tag}, when given), if any.
        """
        return self._file.get(route_url, _user(user_id, account))

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
        # Another client sharing the folder may have saved one since.
        self._file.reload()
        device = self.get(route_url, user_id, account)
        if device is not None:
            return device
        legacy = str(user_id) if account else ""
        device = (legacy and self._file.get(route_url, legacy)) or new_device_id()
        try:
            self._file.put(route_url, _user(user_id, account), device, legacy)
        except OSError as e:
            self.log.error(
                "Cannot save the device id in {path}: {e}; the next run "
                "will be another device",
                path=str(self.path),
                e=e,
            )
        return device
