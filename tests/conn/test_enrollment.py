"""Client enrollment and pins that survive renewal: CSRs signed by the server's CA, the server
key kept across renewals, SPKI pins, and client files whose PEM texts are inline (TLS on
127.0.0.1 where a handshake is the point)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cellvpn.config.parsers import InlinePem
from cellvpn.conn import pki
from cellvpn.conn.tls import (
    TLSVerificationError,
    client_certificate_problem,
    client_tls,
    describe_tls_failure,
    server_tls,
)

from .conftest import SERVER_NAMES, PKIFiles
from .test_tls import exchange, refused, server_creator, tls_server, within


def test_renewal_keeps_the_server_key_so_the_key_pin_holds(tmp_path: Path) -> None:
    first = pki.ensure_server_identity(tmp_path, ["vpn.test"])
    renewed = pki.ensure_server_identity(tmp_path, ["vpn.test", "127.0.0.1"])
    assert renewed.created and renewed.fingerprint != first.fingerprint
    assert renewed.spki == first.spki
    assert renewed.not_after is not None
    leaf = x509.load_pem_x509_certificates(renewed.cert.read_bytes())[0]
    assert pki.spki_fingerprint(leaf) == first.spki


def test_spki_fingerprint_is_what_openssl_prints(tmp_path: Path) -> None:
    identity = pki.ensure_server_identity(tmp_path, ["vpn.test"])
    der = subprocess.run(
        ["openssl", "x509", "-in", str(identity.cert), "-pubkey", "-noout"],
        check=True,
        capture_output=True,
    ).stdout
    spki = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "der"], input=der, check=True, capture_output=True
    ).stdout
    assert identity.spki == hashlib.sha256(spki).hexdigest()
    assert pki.spki_fingerprint(identity.cert.read_bytes()) == identity.spki
    key = pki.load_private_key(identity.key)
    assert pki.spki_fingerprint(key) == identity.spki


def test_a_request_is_signed_for_client_auth_by_the_ca(tmp_path: Path) -> None:
    authority = pki.load_authority(tmp_path)
    assert (tmp_path / "tls" / "ca.pem").exists() and (tmp_path / "tls" / "ca.key").exists()
    assert pki.load_authority(tmp_path).cert == authority.cert  # created once, then read
    request = pki.new_client_request("alice")
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = pki.sign_client_request(authority, "alice", request.csr_pem, 30, now)
    cert.verify_directly_issued_by(authority.cert)
    assert pki.client_common_name(cert) == "alice"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(days=30)
    assert cert.not_valid_before_utc < now
    key = serialization.load_pem_private_key(request.key_pem, None)
    assert pki.spki_fingerprint(key) == pki.spki_fingerprint(cert)
    assert int(pki.serial_text(cert), 16) == cert.serial_number


def _csr(key: Any, name: str = "x") -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("name", "csr", "days", "said"),
    [
        ("bad name!", None, 30, "cannot name a client"),
        ("-x", None, 30, "cannot name a client"),
        ("x", b"not a csr", 30, "not a PEM certificate signing request"),
        ("x", None, 0, "lifetime of 1 to 3650 days"),
        ("x", None, 5000, "lifetime of 1 to 3650 days"),
        ("x", "rsa1024", 30, "of a kind the server does not sign"),
        ("x", "p521", 30, "of a kind the server does not sign"),
    ],
)
def test_bad_requests_are_refused_with_the_reason(
    tmp_path: Path, name: str, csr: Any, days: int, said: str
) -> None:
    authority = pki.load_authority(tmp_path)
    if csr is None:
        data = pki.new_client_request("x").csr_pem
    elif csr == "rsa1024":
        data = _csr(rsa.generate_private_key(65537, 1024))
    elif csr == "p521":
        data = _csr(ec.generate_private_key(ec.SECP521R1()))
    else:
        data = csr
    with pytest.raises(pki.EnrollmentError, match=said):
        pki.sign_client_request(authority, name, data, days)


def test_a_tampered_request_is_refused(tmp_path: Path) -> None:
    authority = pki.load_authority(tmp_path)
    good = x509.load_pem_x509_csr(pki.new_client_request("x").csr_pem)
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 1  # the signature's last byte
    pem = b"-----BEGIN CERTIFICATE REQUEST-----\n"
    pem += base64.encodebytes(bytes(der)) + b"-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(pki.EnrollmentError, match=r"signature does not verify|not a PEM"):
        pki.sign_client_request(authority, "x", pem, 30)


# --- pins over TLS --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_key_pin_connects_and_a_wrong_one_is_refused(
    reactor: Any, pki_files: PKIFiles
) -> None:
    spki = pki_files.server.spki
    async with tls_server(reactor, server_creator(pki_files)) as (port, factory):
        client = await exchange(
            reactor, port, client_tls("any.name", None, None, None, None, server_key=spki)
        )
        assert client.peer_fp == pki_files.server.fingerprint
    wrong = pki_files.rogue.spki
    async with tls_server(reactor, server_creator(pki_files)) as (port, factory):
        creator = client_tls("any.name", None, None, None, None, server_key=wrong)
        reason = await refused(reactor, port, factory, creator)
    assert reason.check(TLSVerificationError)
    assert describe_tls_failure(reason) == (
        f"server key SHA-256 {spki} does not match the pinned server_key {wrong}"
    )


@pytest_twisted.ensureDeferred
async def test_a_key_pin_holds_across_a_renewal_and_a_certificate_pin_does_not(
    reactor: Any, tmp_path: Path
) -> None:
    old = pki.ensure_server_identity(tmp_path, SERVER_NAMES)
    renewed = pki.ensure_server_identity(tmp_path, [*SERVER_NAMES, "other.test"])
    creator = server_tls(renewed.cert, renewed.key, None)
    async with tls_server(reactor, creator) as (port, factory):
        await exchange(reactor, port, client_tls("x", None, None, None, None, server_key=old.spki))
    async with tls_server(reactor, creator) as (port, factory):
        reason = await refused(
            reactor, port, factory, client_tls("x", None, old.fingerprint, None, None)
        )
    assert "pin the server's key instead" in describe_tls_failure(reason)


@pytest_twisted.ensureDeferred
async def test_a_certificate_pin_warns_while_it_matches(reactor: Any, pki_files: PKIFiles) -> None:
    from twisted.logger import globalLogPublisher

    said: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if "warning" in event:
            said.append(str(event["warning"]))

    globalLogPublisher.addObserver(observe)
    try:
        async with tls_server(reactor, server_creator(pki_files)) as (port, _):
            await exchange(
                reactor, port, client_tls("x", None, pki_files.server.fingerprint, None, None)
            )
    finally:
        globalLogPublisher.removeObserver(observe)
    assert any(
        "stops matching when the server renews it" in s
        and f"server_key = {pki_files.server.spki}" in s
        for s in said
    )


@pytest_twisted.ensureDeferred
async def test_inline_ca_certificate_and_key_work_like_files(
    reactor: Any, pki_files: PKIFiles
) -> None:
    p = pki_files

    def inline(path: Path) -> InlinePem:
        return InlinePem(path.read_text().strip())

    creator = client_tls(
        "vpn.test",
        inline(p.server.ca_cert),
        None,
        inline(p.client_cert),
        inline(p.client_key),
    )
    async with tls_server(reactor, server_creator(p, p.server.ca_cert)) as (port, factory):
        await exchange(reactor, port, creator)
        server = factory.peers[0]
        await within(server.lost, reactor)
    assert server.peer_fp == pki.fingerprint_of(p.client_cert.read_bytes())


def test_inline_pem_that_is_not_pem_is_a_clear_error() -> None:
    with pytest.raises(pki.TLSConfigError, match=r"CA file \(PEM text in the config file\)"):
        client_tls("x", InlinePem("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"),
                   None, None, None)  # fmt: skip


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("which", ["other-ca", "expired"])
async def test_the_server_keeps_why_it_refused_a_client_certificate(
    reactor: Any, pki_files: PKIFiles, tmp_path: Path, which: str
) -> None:
    p = pki_files
    if which == "other-ca":
        cert, key = p.rogue_client_cert, p.rogue_client_key
    else:
        authority = pki.load_authority(p.server.ca_cert.parent.parent)
        request = pki.new_client_request("late")
        then = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
        signed = pki.sign_client_request(authority, "late", request.csr_pem, 1, then)
        cert, key = tmp_path / "late.pem", tmp_path / "late.key"
        cert.write_bytes(pki.certificate_pem(signed))
        key.write_bytes(request.key_pem)
    creator = client_tls("vpn.test", p.server.ca_cert, None, cert, key)
    async with tls_server(reactor, server_creator(p, p.server.ca_cert)) as (port, factory):
        reason = await refused(reactor, port, factory, creator)
        server = factory.peers[0]
    problem = client_certificate_problem(server.transport)
    if which == "other-ca":
        assert problem is not None and "not signed by this server's CA" in problem
        assert "does not trust the CA of our certificate" in describe_tls_failure(reason)
    else:
        assert problem == "its client certificate is not acceptable: certificate has expired"
        assert "says our certificate expired" in describe_tls_failure(reason)
