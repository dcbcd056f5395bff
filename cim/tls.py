"""
The calling side of TLS: verifying a daemon's certificate.

A daemon or client that calls another (the route's and servers' push API
calls, the client library's route calls and IM server connection) verifies
the other's certificate against the CA file it was given (C{--ca-file},
C{ca_file=}), or the system's trusted CAs without one, and checks that the
certificate is for the host it called (a name or an IP address).

L{describe_tls_failure} turns what a failed handshake fails with into a
sentence for a login error.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS

_BEGIN = b"-----BEGIN CERTIFICATE-----"


def trust_root(ca_file: str | None) -> Any:
    """
    The trust root of C{ca_file} (a PEM file of one or more CA
    certificates), or the platform's when C{None}.

    @raise ValueError: the file cannot be read or holds no certificate.
    """
    if ca_file is None:
        return ssl.platformTrust()
    try:
        with open(ca_file, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ValueError(f"cannot read the CA file {ca_file!r}: {e.strerror}") from None
    blocks = [_BEGIN + b for b in pem.split(_BEGIN)[1:]]
    if not blocks:
        raise ValueError(f"the CA file {ca_file!r} holds no PEM certificate")
    try:
        certificates = [ssl.Certificate.loadPEM(b) for b in blocks]
    except Exception as e:
        raise ValueError(f"the CA file {ca_file!r} is not valid: {e}") from None
    return ssl.trustRootFromCertificates(certificates)


def client_creator(host: str, ca_file: str | None) -> IOpenSSLClientConnectionCreator:
    """
    The TLS client options of a connection to C{host}: its certificate
    must be signed by C{ca_file}'s CAs (the platform's when C{None}) and be
    for C{host}.
    """
    return ssl.optionsForClientTLS(host, trustRoot=trust_root(ca_file))


def https_policy(ca_file: str | None) -> IPolicyForHTTPS:
    """
    An agent's C{https} policy verifying against C{ca_file} (else the
    platform's CAs).
    """
    return BrowserLikePolicyForHTTPS(trustRoot=trust_root(ca_file))


def _failures(error: Any) -> Iterable[Any]:
    """
    C{error} and the failures it wraps (the agent's C{ResponseNeverReceived},
    C{ResponseFailed}, C{_WrapperException}: a list in C{reasons}).
    """
    if isinstance(error, Failure):
        error = error.value
    yield error
    for reason in getattr(error, "reasons", None) or ():
        yield from _failures(reason)


def describe_tls_failure(error: Any) -> str | None:
    """
    A sentence about the TLS failure in C{error} (an exception or a
    L{Failure}, perhaps wrapping others), or C{None} if it is not one.
    """
    from OpenSSL import SSL
    from service_identity import VerificationError

    for e in _failures(error):
        if isinstance(e, VerificationError):
            ids = [getattr(m, "mismatched_id", None) for m in e.errors]
            names = [
                str(getattr(i, "ip", None) or getattr(i, "hostname", None) or i)
                for i in ids
                if i is not None
            ]
            return f"its certificate is not for {' or '.join(names) or 'this host'}"
        if isinstance(e, SSL.Error):
            texts = [
                str(part[-1])
                for part in (
                    e.args[0] if e.args and isinstance(e.args[0], list) else []
                )
                if isinstance(part, tuple) and part
            ]
            reason = "; ".join(t for t in texts if t) or str(e)
            if "certificate verify failed" in reason:
                return f"its certificate does not verify ({reason})"
            return f"TLS failed ({reason})"
    return None
