"""
Registry backends (L{cim.interfaces.IRegistry}): in process, and ZooKeeper.

L{open_registry} turns a C{--registry} URL into one, and L{parse_zk_url}
reads a ZooKeeper one.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from cim.interfaces import IReactor, IRegistry
from cim.registry.local import LocalRegistry

__all__ = ["open_registry", "parse_zk_url", "LocalRegistry"]

#: The default ZooKeeper root, as in CIM.
DEFAULT_ROOT = "/cim"

_USAGE = "expected 'local:' or 'zk://host:port[,host:port...][/root]'"

_local: LocalRegistry | None = None


@dataclass(frozen=True, slots=True)
class ZooKeeperAddress:
    """
    A parsed C{zk://} URL: the ensemble (C{host:port,...}) and the root.
    """

    hosts: str
    root: str = DEFAULT_ROOT


def parse_zk_url(url: str) -> ZooKeeperAddress:
    """
    Parse C{zk://host:port[,host:port...][/root]}: the one parser of
    ZooKeeper URLs (the root defaults to C{/cim}).

    @raise ValueError: C{url} is not such a URL; the message says why.
    """
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
    return ZooKeeperAddress(",".join(hosts), parts.path.rstrip("/") or DEFAULT_ROOT)


def open_registry(url: str, reactor: IReactor) -> IRegistry:
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
    address = parse_zk_url(url)
    from cim.registry.zk import ZooKeeperRegistry

    return IRegistry(ZooKeeperRegistry(reactor, address.hosts, root=address.root))
