"""Test certificates made on the spot (cryptography): a CA, a server certificate for 127.0.0.1/localhost
and client certificates, one signed by the CA and one by a stranger CA. Nothing is committed."""
from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer_name: x509.Name | None, issuer_key, *, ca: bool, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@dataclass
class Certs:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from a CA the server does not trust
    stranger_key: Path


def make_certs(out: Path) -> Certs:
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    ca_key = _key()
    ca = _cert("searchrec test CA", ca_key, None, ca_key, ca=True)
    files["ca.pem"] = ca.public_bytes(serialization.Encoding.PEM)
    for stem, subject, issuer, issuer_key, server in (
            ("server", "localhost", ca.subject, ca_key, True),
            ("client", "storefront", ca.subject, ca_key, False)):
        key = _key()
        files[f"{stem}.pem"] = _cert(subject, key, issuer, issuer_key, ca=False, server=server).public_bytes(
            serialization.Encoding.PEM)
        files[f"{stem}.key"] = _pem_key(key)
    other_key = _key()
    other = _cert("stranger CA", other_key, None, other_key, ca=True)
    key = _key()
    files["stranger.pem"] = _cert("stranger", key, other.subject, other_key, ca=False).public_bytes(
        serialization.Encoding.PEM)
    files["stranger.key"] = _pem_key(key)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return Certs(out, out / "ca.pem", out / "server.pem", out / "server.key", out / "client.pem", out / "client.key",
                 out / "stranger.pem", out / "stranger.key")
