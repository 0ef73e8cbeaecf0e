"""The server identity files, fingerprints and default names (no reactor)."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from cellvpn.conn import pki
from cellvpn.conn.pki import TLSConfigError

NAMES = ["vpn.test", "127.0.0.1", "::1"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def san(cert: x509.Certificate) -> list[x509.GeneralName]:
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def read_chain(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


# --- ensure_server_identity -----------------------------------------------------------------


def test_first_start_creates_ca_and_server_certificate(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ident = pki.ensure_server_identity(state, NAMES)
    tls = state / "tls"

    assert ident.created
    assert ident.ca_cert == tls / "ca.pem"
    assert ident.cert == tls / "server.pem"
    assert ident.key == tls / "server.key"
    assert ident.names == ("vpn.test", "127.0.0.1", "::1")
    assert sorted(p.name for p in tls.iterdir()) == ["ca.key", "ca.pem", "server.key", "server.pem"]
    assert mode(tls) == 0o700
    assert mode(state) == 0o700
    assert mode(tls / "ca.key") == 0o600
    assert mode(tls / "server.key") == 0o600

    (ca,) = read_chain(tls / "ca.pem")
    leaf, chained_ca = read_chain(tls / "server.pem")
    assert chained_ca == ca

    # The CA: P-256, self-signed, CA:TRUE, ten years.
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey) and ca_key.curve.name == "secp256r1"
    assert ca.subject == ca.issuer
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days == 3650

    # The server certificate: P-256, signed by the CA, CA:FALSE, serverAuth, 825 days, SANs.
    leaf_key = leaf.public_key()
    assert isinstance(leaf_key, ec.EllipticCurvePublicKey) and leaf_key.curve.name == "secp256r1"
    leaf.verify_directly_issued_by(ca)
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days == 825
    assert san(leaf) == [
        x509.DNSName("vpn.test"),
        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
        x509.IPAddress(ipaddress.IPv6Address("::1")),
    ]

    # The key files hold the keys of those certificates.
    loaded = pki.load_private_certificate(ident.cert, ident.key)
    assert loaded.cert == leaf and loaded.chain == (ca,)
    ca_priv = pki.load_private_key(tls / "ca.key")
    assert isinstance(ca_priv, ec.EllipticCurvePrivateKey)
    assert ca_priv.public_key() == ca_key


def test_fingerprint_is_sha256_of_the_der(tmp_path: Path) -> None:
    ident = pki.ensure_server_identity(tmp_path, NAMES)
    leaf = read_chain(ident.cert)[0]
    der = leaf.public_bytes(serialization.Encoding.DER)
    expected = leaf.fingerprint(hashes.SHA256()).hex()
    assert ident.fingerprint == expected == hashlib.sha256(der).hexdigest()
    assert pki.fingerprint_of(leaf) == expected
    assert pki.fingerprint_of(der) == expected
    assert pki.fingerprint_of(ident.cert.read_bytes()) == expected  # PEM: the first certificate
    # `openssl x509 -fingerprint -sha256` prints the same digest as AB:CD:...
    assert pki.format_fingerprint(expected) == ":".join(
        f"{b:02X}" for b in leaf.fingerprint(hashes.SHA256())
    )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_fingerprint_matches_the_openssl_command(tmp_path: Path) -> None:
    ident = pki.ensure_server_identity(tmp_path, NAMES)
    out = subprocess.run(
        ["openssl", "x509", "-in", str(ident.cert), "-noout", "-fingerprint", "-sha256"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    assert out.strip().split("=", 1)[1] == pki.format_fingerprint(ident.fingerprint)


def test_two_cas_have_different_subjects(tmp_path: Path) -> None:
    a = pki.ensure_server_identity(tmp_path / "a", NAMES)
    b = pki.ensure_server_identity(tmp_path / "b", NAMES)
    assert read_chain(a.ca_cert)[0].subject != read_chain(b.ca_cert)[0].subject


def test_later_start_reuses_everything(tmp_path: Path) -> None:
    first = pki.ensure_server_identity(tmp_path, NAMES)
    before = {p.name: p.read_bytes() for p in (tmp_path / "tls").iterdir()}
    again = pki.ensure_server_identity(tmp_path, NAMES)
    assert not again.created
    assert again.fingerprint == first.fingerprint
    assert {p.name: p.read_bytes() for p in (tmp_path / "tls").iterdir()} == before
    # Order, case and duplicates do not count as a change.
    same = pki.ensure_server_identity(tmp_path, ["::1", "VPN.test", "127.0.0.1", "vpn.test"])
    assert not same.created
    assert same.fingerprint == first.fingerprint
    assert same.names == ("::1", "vpn.test", "127.0.0.1")


def test_changed_names_reissue_the_server_certificate_from_the_same_ca(tmp_path: Path) -> None:
    first = pki.ensure_server_identity(tmp_path, NAMES)
    tls = tmp_path / "tls"
    ca_pem, ca_key = (tls / "ca.pem").read_bytes(), (tls / "ca.key").read_bytes()

    second = pki.ensure_server_identity(tmp_path, ["vpn2.test", "127.0.0.1"])
    assert second.created
    assert second.fingerprint != first.fingerprint
    assert (tls / "ca.pem").read_bytes() == ca_pem
    assert (tls / "ca.key").read_bytes() == ca_key
    assert mode(tls / "server.key") == 0o600
    (ca,) = read_chain(tls / "ca.pem")
    leaf, chained_ca = read_chain(second.cert)
    assert chained_ca == ca
    leaf.verify_directly_issued_by(ca)
    assert san(leaf) == [
        x509.DNSName("vpn2.test"),
        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
    ]
    pki.load_private_certificate(second.cert, second.key)
    assert not pki.ensure_server_identity(tmp_path, ["vpn2.test", "127.0.0.1"]).created
    assert not [p for p in tls.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_a_server_key_that_does_not_match_is_replaced(tmp_path: Path) -> None:
    # As after a crash between writing server.key and server.pem.
    first = pki.ensure_server_identity(tmp_path, NAMES)
    other = pki.ensure_server_identity(tmp_path / "other", NAMES)
    first.key.write_bytes(other.key.read_bytes())
    again = pki.ensure_server_identity(tmp_path, NAMES)
    assert again.created
    pki.load_private_certificate(again.cert, again.key)


def test_a_ca_key_left_without_its_certificate_starts_over(tmp_path: Path) -> None:
    pki.ensure_server_identity(tmp_path, NAMES)
    (tmp_path / "tls" / "ca.pem").unlink()
    again = pki.ensure_server_identity(tmp_path, NAMES)
    assert again.created
    (ca,) = read_chain(again.ca_cert)
    read_chain(again.cert)[0].verify_directly_issued_by(ca)


def test_reissue_without_the_ca_key_is_a_clear_error(tmp_path: Path) -> None:
    """Without the CA key (a fleet's CA, kept by its operator) a valid certificate is used
    as it is, even for other names; one that is missing cannot be made."""
    pki.ensure_server_identity(tmp_path, NAMES)
    ca_key = tmp_path / "tls" / "ca.key"
    ca_key.unlink()
    assert not pki.ensure_server_identity(tmp_path, NAMES).created  # not needed: fine
    kept = pki.ensure_server_identity(tmp_path, ["vpn2.test"])
    assert not kept.created and pki.certificate_names(read_chain(kept.cert)[0]) != ["vpn2.test"]
    (tmp_path / "tls" / "server.pem").unlink()
    with pytest.raises(TLSConfigError, match=f"CA key {ca_key} does not exist"):
        pki.ensure_server_identity(tmp_path, ["vpn2.test"])


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    pki.ensure_server_identity(tmp_path, NAMES)
    ca = tmp_path / "tls" / "ca.pem"
    ca.write_text("not a certificate\n")
    with pytest.raises(TLSConfigError, match=f"CA certificate {ca} holds no readable PEM") as e:
        pki.ensure_server_identity(tmp_path, NAMES)
    assert "\n" not in str(e.value)


def test_bad_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match="at least one name"):
        pki.ensure_server_identity(tmp_path, [])
    with pytest.raises(TLSConfigError, match="not a valid host name"):
        pki.ensure_server_identity(tmp_path, ["bad name"])
    with pytest.raises(TLSConfigError, match="zone"):
        pki.ensure_server_identity(tmp_path, ["fe80::1%lo"])
    assert not (tmp_path / "tls").exists()


def test_load_private_certificate_errors(tmp_path: Path) -> None:
    a = pki.ensure_server_identity(tmp_path / "a", NAMES)
    b = pki.ensure_server_identity(tmp_path / "b", NAMES)
    missing = tmp_path / "missing.pem"
    with pytest.raises(TLSConfigError, match=f"certificate file {missing} does not exist"):
        pki.load_private_certificate(missing, a.key)
    with pytest.raises(TLSConfigError, match=f"private key file {a.cert} holds no readable PEM"):
        pki.load_private_certificate(a.cert, a.cert)
    with pytest.raises(
        TLSConfigError, match=f"private key {b.key} does not match the certificate in {a.cert}"
    ):
        pki.load_private_certificate(a.cert, b.key)


def test_key_files_are_created_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        ident = pki.ensure_server_identity(tmp_path / "state", NAMES)
    finally:
        os.umask(old)
    assert mode(ident.key) == 0o600
    assert mode(ident.ca_cert.parent / "ca.key") == 0o600
    assert mode(ident.ca_cert.parent) == 0o700


# --- fingerprints -----------------------------------------------------------------------------

HEX = "3f2a" + "0" * 56 + "9c1d"


@pytest.mark.parametrize(
    "text",
    [
        HEX,
        HEX.upper(),
        ":".join(HEX[i : i + 2] for i in range(0, 64, 2)),
        ":".join(HEX[i : i + 2] for i in range(0, 64, 2)).upper(),
        f"  {HEX}\n",
    ],
)
def test_normalise_fingerprint_accepts(text: str) -> None:
    assert pki.normalise_fingerprint(text) == HEX


@pytest.mark.parametrize(
    "text",
    [
        "",
        HEX[:-2],
        HEX + "00",
        HEX[:-1] + "g",
        "3f:2a" + HEX[4:],  # colons in some places only
        ":".join(HEX[i : i + 4] for i in range(0, 64, 4)),
        "sha1:" + HEX,
    ],
)
def test_normalise_fingerprint_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a SHA-256 fingerprint: expected 64 hex digits"):
        pki.normalise_fingerprint(text)


def test_format_fingerprint() -> None:
    assert pki.format_fingerprint(HEX) == "3F:2A:" + "00:" * 28 + "9C:1D"
    assert pki.normalise_fingerprint(pki.format_fingerprint(HEX)) == HEX


# --- default names ----------------------------------------------------------------------------


@pytest.fixture
def hostname(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(pki.socket, "gethostname", lambda: "cellvpn-test-host")
    return "cellvpn-test-host"


def test_default_names_with_an_interface(hostname: str) -> None:
    assert pki.default_names("tcp:8089:interface=127.0.0.1") == [hostname, "127.0.0.1"]
    assert pki.default_names("tcp:port=8089:interface=127.0.0.1:backlog=5") == [
        hostname,
        "127.0.0.1",
    ]
    assert pki.default_names(r"tcp6:8089:interface=\:\:1") == [hostname, "::1"]


def test_default_names_without_an_interface(hostname: str) -> None:
    names = pki.default_names("tcp:8089")
    assert names[0] == hostname
    addresses = [ipaddress.ip_address(n) for n in names[1:]]
    assert ipaddress.ip_address("127.0.0.1") in addresses
    assert len(set(addresses)) == len(addresses)
    assert not [a for a in addresses if a.version == 6 and a.is_link_local]
    # Every name is one a certificate can carry.
    assert [str(g.value) for g in pki._general_names(names)] == names


def test_default_names_leave_out_what_a_certificate_cannot_carry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pki.socket, "gethostname", lambda: "Cellvpn-Host")
    assert pki.default_names("tcp:8089:interface=127.0.0.1") == ["cellvpn-host", "127.0.0.1"]
    monkeypatch.setattr(pki.socket, "gethostname", lambda: "not a host name")
    assert pki.default_names("tcp:8089:interface=127.0.0.1") == ["127.0.0.1"]


def test_unspecified_interface_means_every_address(
    hostname: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pki, "host_addresses", lambda: ["127.0.0.1", "::1"])
    expected = [hostname, "127.0.0.1", "::1"]
    assert pki.default_names("tcp:8089") == expected
    assert pki.default_names("tcp:8089:interface=0.0.0.0") == expected
    assert pki.default_names(r"tcp6:8089:interface=\:\:") == expected
    assert pki.default_names("tcp:8089:interface=") == expected


def test_host_addresses_skip_link_local_ipv6(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        pki, "_netlink_addresses", lambda: ["127.0.0.1", "fe80::1", "::1", "127.0.0.1"]
    )
    assert pki.host_addresses() == ["127.0.0.1", "::1"]
