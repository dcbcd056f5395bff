"""
Where a daemon listens.  Every listening option (C{--port}, C{--http-port},
C{--route-port}) takes either a port number, which keeps its old meaning
(TCP on C{--bind}), or a Twisted server endpoint description, such as
C{ssl:11211:privateKey=key.pem:certKey=cert.pem} (TLS), C{tcp6:11211} or
C{unix:/run/cim.sock}, which ignores C{--bind}.

A listener speaks TLS when its description is of type C{ssl}.  What a
client needs to connect (the port that was bound, whether it is TLS) is read
from the listening port once it listens (L{bound_port}).

Descriptions are checked when the options are parsed (L{listen_option}): a
bad type, a missing argument or an unreadable key or certificate is a
L{usage.UsageError} then, not a failure of the started daemon.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import endpoints
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.python import usage

from cim.slimtcp import SlimTCP4ServerEndpoint

#: A listener: a port number (TCP on C{--bind}) or an endpoint description.
Listen = int | str

#: The endpoint types that speak TLS.
TLS_TYPES = frozenset({"ssl"})

EXAMPLE = "ssl:11211:privateKey=key.pem:certKey=cert.pem"


def listen_option(name: str) -> Callable[[str], Listen]:
    """
    The coercer of a C{--name} listening option: a port number (0 lets the
    system pick one) or a server endpoint description.

    @raise usage.UsageError: neither, with the reason.
    """

    def parse(text: str) -> Listen:
        text = text.strip()
        if text.isdigit():
            port = int(text)
            if port > 65535:
                raise usage.UsageError(f"--{name} must be between 0 and 65535")
            return port
        if not text:
            raise usage.UsageError(f"--{name} must be a port number or an endpoint")
        check_description(name, text)
        return text

    return parse


def check_description(name: str, text: str) -> None:
    """
    Parse C{text} as a server endpoint description (without listening).

    @raise usage.UsageError: it is not one; the message says why.
    """
    from twisted.internet.testing import MemoryReactor

    try:
        endpoints.serverFromString(MemoryReactor(), text)
    except Exception as e:  # ValueError, KeyError, OSError, OpenSSL errors...
        reason = str(e) or type(e).__name__
        if isinstance(e, OSError) and e.strerror:
            reason = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        raise usage.UsageError(
            f"--{name} must be a port number or a Twisted endpoint description "
            f"(such as {EXAMPLE}); {text!r}: {reason}"
        ) from None


def is_tls(where: Listen) -> bool:
    """
    Whether the listener C{where} speaks TLS.
    """
    return isinstance(where, str) and where.split(":", 1)[0].strip() in TLS_TYPES


def server_endpoint(
    reactor: Any, where: Listen, bind: str, backlog: int
) -> IStreamServerEndpoint:
    """
    The endpoint of C{where}: TCP on C{bind} for a port number (with the
    lighter connections of L{cim.slimtcp}), else the endpoint the
    description names.
    """
    if isinstance(where, int):
        return SlimTCP4ServerEndpoint(reactor, where, interface=bind, backlog=backlog)
    return endpoints.serverFromString(reactor, where)


def bound_port(listening: IListeningPort, option: str) -> int:
    """
    The port C{listening} listens on.

    @raise ValueError: it has none (a UNIX socket), where one is needed.
    """
    port = getattr(listening.getHost(), "port", None)
    if not isinstance(port, int):
        raise ValueError(
            f"--{option} must listen on a TCP port (a number, tcp: or ssl:): "
            "its address is announced to others"
        )
    return port


def bound_host(listening: IListeningPort, default: str) -> str:
    """
    The interface C{listening} listens on (for log lines), else C{default}.
    """
    host = getattr(listening.getHost(), "host", None)
    return host if isinstance(host, str) else default
