"""
A development certificate authority and certificates for cim's daemons on
this machine (C{make dev-certs}, or C{python -m cim.devcerts DIR})::

    DIR/ca.pem          the CA's certificate: give it as --ca-file
    DIR/ca-key.pem      the CA's key
    DIR/server.pem      a certificate for localhost, 127.0.0.1 and ::1
    DIR/server-key.pem  its key

For development and tests only: anyone holding C{ca-key.pem} can make
certificates this CA vouches for.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The names the server certificate is for, by default.
DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")
#: How long the certificates are valid.
VALID_DAYS = 825


@dataclass(frozen=True)
class DevCerts:
    """
    The files L{make_dev_certs} wrote.
    """

    ca: Path
    ca_key: Path
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cim development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _alternative(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(
        path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644
    )
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_dev_certs(
    directory: str | Path, names: tuple[str, ...] = DEFAULT_NAMES
) -> DevCerts:
    """
    Write a new CA and a server certificate for C{names} (host names and
    IP addresses) into C{directory}, replacing any there.
    """
    directory = Path(directory)
    now = datetime.datetime.now(datetime.UTC)
    start = now - datetime.timedelta(minutes=5)
    end = now + datetime.timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("cim development CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([_alternative(n) for n in names]),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = DevCerts(
        ca=directory / "ca.pem",
        ca_key=directory / "ca-key.pem",
        cert=directory / "server.pem",
        key=directory / "server-key.pem",
    )
    _write(files.ca, ca.public_bytes(serialization.Encoding.PEM))
    _write(files.ca_key, _pem_key(ca_key), private=True)
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    _write(files.key, _pem_key(key), private=True)
    return files


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2) or args[0].startswith("-"):
        print(
            "usage: python -m cim.devcerts DIR [NAME,NAME...]\n"
            f"  writes a development CA and a certificate for {', '.join(DEFAULT_NAMES)}"
            " (or the NAMEs) into DIR",
            file=sys.stderr,
        )
        return 2
    names = tuple(args[1].split(",")) if len(args) == 2 else DEFAULT_NAMES
    files = make_dev_certs(args[0], names)
    print(f"CA certificate (--ca-file):  {files.ca}")
    print(f"server certificate:          {files.cert}")
    print(f"server key:                  {files.key}")
    print(f"listen with:  --port ssl:11211:privateKey={files.key}:certKey={files.cert}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
