"""Test PKI for the TLS tests: the server identity, a second (rogue) CA, and client certificates."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cellvpn.conn import pki

SERVER_NAMES = ["vpn.test", "127.0.0.1", "::1"]


def issue_client_cert(identity: pki.ServerIdentity, out_dir: Path, name: str) -> tuple[Path, Path]:
    """A client certificate (EKU clientAuth) signed by ``identity``'s CA: (cert.pem, key.pem)."""
    ca_cert = x509.load_pem_x509_certificate(identity.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(
        (identity.ca_cert.parent / pki.CA_KEY).read_bytes(), password=None
    )
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out_dir / f"{name}.pem", out_dir / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass(frozen=True)
class PKIFiles:
    server: pki.ServerIdentity
    rogue: pki.ServerIdentity
    client_cert: Path
    client_key: Path
    rogue_client_cert: Path
    rogue_client_key: Path


@pytest.fixture
def pki_files(tmp_path: Path) -> PKIFiles:
    server = pki.ensure_server_identity(tmp_path / "server-state", SERVER_NAMES)
    rogue = pki.ensure_server_identity(tmp_path / "rogue-state", SERVER_NAMES)
    client_cert, client_key = issue_client_cert(server, tmp_path / "clients", "client-1")
    rogue_cert, rogue_key = issue_client_cert(rogue, tmp_path / "rogue-clients", "client-1")
    return PKIFiles(server, rogue, client_cert, client_key, rogue_cert, rogue_key)
