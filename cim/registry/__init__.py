"""
Registry backends (L{cim.interfaces.IRegistry}): in process, and ZooKeeper.

L{open_registry} turns a C{--registry} URL into one.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from cim.interfaces import IRegistry
from cim.registry.local import LocalRegistry

__all__ = ["open_registry", "LocalRegistry"]

#: The default ZooKeeper root, as in CIM.
DEFAULT_ROOT = "/cim"

_USAGE = "expected 'local:' or 'zk://host:port[,host:port...][/root]'"

_local: LocalRegistry | None = None


def open_registry(url: str, reactor: Any) -> IRegistry:
    """
    Make the registry that C{url} names:

      - C{local:}: the process-wide L{LocalRegistry} (the same one on every
        call, so a route and a server in one process see each other);
      - C{zk://host:port[,host:port...]/root}: a new
        L{cim.registry.zk.ZooKeeperRegistry} (the root defaults to C{/cim}).

    The registry is not started.

    @param reactor: the reactor the ZooKeeper registry hands its results to.
    @raise ValueError: C{url} is not one of those forms.
    """
    global _local
    if url == "local:":
        if _local is None:
            _local = LocalRegistry()
        return IRegistry(_local)
    parts = urlsplit(url)
    if parts.scheme != "zk":
        raise ValueError(f"unsupported registry URL {url!r}: {_USAGE}")
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"unsupported registry URL {url!r}: {_USAGE}")
    hosts = parts.netloc.split(",")
    for host_port in hosts:
        host, _, port = host_port.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"bad ZooKeeper address {host_port!r} in {url!r}: {_USAGE}"
            )
    root = parts.path.rstrip("/") or DEFAULT_ROOT
    from cim.registry.zk import ZooKeeperRegistry

    return IRegistry(ZooKeeperRegistry(reactor, ",".join(hosts), root=root))
