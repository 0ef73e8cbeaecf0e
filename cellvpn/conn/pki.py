"""The server's TLS identity: a private CA and the server certificate it signs.

Nothing here touches the reactor. :func:`ensure_server_identity` runs once at start: the first
time it creates, under ``state_dir/tls``::

    ca.pem      the CA certificate (ECDSA P-256, self-signed, 10 years); clients trust this
    ca.key      its private key (0600)
    server.pem  the server certificate (ECDSA P-256, 825 days), followed by ca.pem
    server.key  its private key (0600)

Later starts reuse them. When the configured names no longer match the certificate (or it is
about to expire, or it was not signed by ``ca.pem``), a new server certificate is issued from the
same CA for the same key ``server.key``, so clients that trust the CA or pin the server's public
key (its SPKI SHA-256, :func:`spki_fingerprint`) keep working; only clients that pin the
certificate's own fingerprint need the new one, which the server logs.

The same CA signs client certificates (:func:`sign_client_request`): a client key pair and its
certificate signing request are made on the operator's side (:func:`new_client_request`), and
only the request travels to the server.

Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written file; key files are created 0600 from the start.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import secrets
import socket
import threading
from collections.abc import Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.logger import Logger

from cellvpn.config.parsers import InlinePem, PemSource

log = Logger()

TLS_DIR = "tls"
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
#: What a leaf key (a server's, a client's) may do: sign its TLS handshakes, nothing else.
_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)

#: Lifetime of the CA certificate.
CA_LIFETIME = datetime.timedelta(days=3650)
#: Lifetime of a server certificate (the longest that TLS clients commonly accept).
SERVER_LIFETIME = datetime.timedelta(days=825)
#: A server certificate that expires sooner than this is replaced at start.
RENEW_BEFORE = datetime.timedelta(days=30)
#: Certificates start this long before "now", so a peer whose clock is a little behind accepts them.
_BACKDATE = datetime.timedelta(minutes=5)

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX_PAIRS = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){31}")
_DNS_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


class TLSConfigError(Exception):
    """A TLS file or setting that cannot be used; the message is one line naming the file."""


@dataclass(frozen=True)
class ServerIdentity:
    """The server's TLS files and what they say.

    ``cert`` holds the server certificate followed by the CA certificate (its chain);
    ``fingerprint`` is the SHA-256 of the server certificate's DER, lowercase hex;
    ``spki`` is the SHA-256 of its public key (SubjectPublicKeyInfo DER), the pin that survives
    renewals; ``created`` is true when this start created the CA or issued a new server
    certificate.
    """

    ca_cert: Path
    cert: Path
    key: Path
    fingerprint: str
    names: tuple[str, ...]
    created: bool
    spki: str = ""
    not_after: datetime.datetime | None = None


@dataclass(frozen=True)
class CertificateAndKey:
    """A certificate, the certificates that followed it in its file, and its private key."""

    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes


# --- fingerprints --------------------------------------------------------------------------


def fingerprint_of(cert: x509.Certificate | bytes) -> str:
    """SHA-256 of the certificate's DER encoding, lowercase hex without colons.

    ``cert`` is a certificate object or its bytes, PEM (the first certificate) or DER. This is
    the value ``openssl x509 -noout -fingerprint -sha256`` prints, without colons.
    """
    if isinstance(cert, bytes):
        try:
            if cert.lstrip().startswith(b"-----BEGIN"):
                cert = x509.load_pem_x509_certificate(cert)
            else:
                cert = x509.load_der_x509_certificate(cert)
        except ValueError as e:
            raise ValueError(f"not a PEM or DER certificate: {e}") from None
    return cert.fingerprint(hashes.SHA256()).hex()


def spki_fingerprint(item: x509.Certificate | PrivateKeyTypes | bytes) -> str:
    """SHA-256 of the public key's SubjectPublicKeyInfo DER, lowercase hex without colons.

    The pin that survives a certificate renewal for the same key, as
    ``openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | sha256sum`` prints it.
    ``item`` is a certificate, a private key, or a certificate's PEM or DER bytes.
    """
    if isinstance(item, bytes):
        try:
            if item.lstrip().startswith(b"-----BEGIN"):
                item = x509.load_pem_x509_certificate(item)
            else:
                item = x509.load_der_x509_certificate(item)
        except ValueError as e:
            raise ValueError(f"not a PEM or DER certificate: {e}") from None
    return hashlib.sha256(_public_der(item)).hexdigest()


def normalise_fingerprint(text: str) -> str:
    """A SHA-256 fingerprint as 64 lowercase hex digits.

    Accepts ``ab12...`` and ``AB:12:...`` (any case, surrounding blanks ignored); raises
    :class:`ValueError` with a message saying what was expected otherwise.
    """
    value = text.strip().lower()
    if _HEX64.fullmatch(value):
        return value
    if _HEX_PAIRS.fullmatch(value):
        return value.replace(":", "")
    digits = sum(c in "0123456789abcdef" for c in value)
    shown = text if len(text) <= 100 else text[:97] + "..."
    raise ValueError(
        f"{shown!r} is not a SHA-256 fingerprint: expected 64 hex digits, written together "
        f"or in pairs separated by colons (AB:CD:...), got {digits} hex digits"
        + (" and other characters" if len(value.replace(":", "")) != digits else "")
    )


def format_fingerprint(fingerprint: str) -> str:
    """``AB:CD:...``: a fingerprint as log lines and other tools show it."""
    value = normalise_fingerprint(fingerprint).upper()
    return ":".join(value[i : i + 2] for i in range(0, len(value), 2))


# --- names ---------------------------------------------------------------------------------


def _general_name(name: str) -> x509.GeneralName:
    """``name`` as a subjectAltName entry: IPAddress for IPv4/IPv6 literals, else DNSName."""
    text = name.strip()
    if not text:
        raise TLSConfigError("a server certificate name is empty")
    literal = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        ip = ipaddress.ip_address(literal)
    except ValueError:
        pass
    else:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            raise TLSConfigError(
                f"a server certificate cannot name {text!r}: an address with a zone (%...) "
                "cannot go into a certificate"
            )
        return x509.IPAddress(ip)
    dns = text.lower().rstrip(".")
    if not dns.isascii():
        try:
            dns = dns.encode("idna").decode("ascii")
        except UnicodeError:
            raise TLSConfigError(f"{text!r} is not a valid host name") from None
    labels = dns.split(".")
    if labels[0] == "*":
        labels = labels[1:]
    if not labels or len(dns) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise TLSConfigError(f"{text!r} is not a valid host name or IP address")
    return x509.DNSName(dns)


def _name_text(general: x509.GeneralName) -> str:
    return str(general.value)


def _name_key(general: x509.GeneralName) -> tuple[str, str]:
    if isinstance(general, x509.IPAddress):
        return ("ip", str(general.value))
    return ("dns", str(general.value).lower())


def _general_names(names: Iterable[str]) -> list[x509.GeneralName]:
    """Parsed, in order, without duplicates."""
    result: list[x509.GeneralName] = []
    seen: set[tuple[str, str]] = set()
    for name in names:
        general = _general_name(name)
        key = _name_key(general)
        if key not in seen:
            seen.add(key)
            result.append(general)
    return result


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses in the certificate's subjectAltName, in order."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [_name_text(g) for g in san if isinstance(g, (x509.DNSName, x509.IPAddress))]


def _san_keys(cert: x509.Certificate) -> set[tuple[str, str]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {_name_key(g) for g in san if isinstance(g, (x509.DNSName, x509.IPAddress))}


# --- default names -------------------------------------------------------------------------


def _split_endpoint(description: str) -> list[str]:
    """Split a Twisted endpoint string on unescaped colons, removing the backslash escapes."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(description)
    for c in chars:
        if c == "\\":
            current.append(next(chars, ""))
        elif c == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    parts.append("".join(current))
    return parts


def listen_interface(listen: str) -> str | None:
    """The address a Twisted endpoint string listens on, or None for all of them.

    ``tcp:8089:interface=192.0.2.1`` gives ``192.0.2.1``; ``tcp6:8089:interface=\\:\\:1`` gives
    ``::1``; no ``interface``, or the unspecified address (``0.0.0.0``, ``::``), gives None.
    """
    for part in _split_endpoint(listen)[1:]:
        key, sep, value = part.partition("=")
        if sep and key.strip() == "interface":
            value = value.strip()
            if not value:
                return None
            address = value.split("%", 1)[0]
            try:
                if ipaddress.ip_address(address).is_unspecified:
                    return None
            except ValueError:
                return value
            return address
    return None


def _netlink_addresses() -> list[str]:
    from pyroute2 import IPRoute

    found: list[str] = []
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            address = msg.get("local") or msg.get("address")
            if address:
                found.append(str(address))
    return found


def _resolver_addresses() -> list[str]:
    found = ["127.0.0.1", "::1"] if socket.has_ipv6 else ["127.0.0.1"]
    with suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None, proto=socket.IPPROTO_TCP):
            found.append(str(info[4][0]))
    return found


def host_addresses() -> list[str]:
    """Every IPv4 and IPv6 address the host has now, except link-local IPv6 (it needs a zone).

    Reads them over netlink (in a short-lived thread of its own, so it works whatever asyncio
    loop the calling thread runs); falls back to resolving the host name where netlink is not
    available.
    """
    result: list[str] = []

    def run() -> None:
        with suppress(Exception):
            result.extend(_netlink_addresses())

    worker = threading.Thread(target=run, name="cellvpn-host-addresses", daemon=True)
    worker.start()
    worker.join(10)
    raw = list(result) if not worker.is_alive() and result else _resolver_addresses()
    addresses: list[str] = []
    for text in raw:
        try:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        if isinstance(ip, ipaddress.IPv6Address) and ip.is_link_local:
            continue
        if str(ip) not in addresses:
            addresses.append(str(ip))
    return addresses


def default_names(listen: str) -> list[str]:
    """The names a server certificate gets when none are configured.

    The host name, then the address of ``interface=`` in the ``listen`` endpoint string, or,
    when it has none, every address the host has at this moment (see :func:`host_addresses`).
    Names come back as the certificate will hold them (host names in lower case); one that no
    certificate can carry is left out. Synchronous: meant for start-up, before the reactor runs.
    """
    names = [socket.gethostname()]
    interface = listen_interface(listen)
    names.extend([interface] if interface is not None else host_addresses())
    unique: list[str] = []
    for name in names:
        try:
            text = _name_text(_general_name(name))
        except TLSConfigError:
            continue  # e.g. a host name no certificate can carry: leave it out
        if text not in unique:
            unique.append(text)
    return unique


# --- loading -------------------------------------------------------------------------------


def _read(path: PemSource, what: str) -> bytes:
    if isinstance(path, InlinePem):
        return path.data
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise TLSConfigError(f"{what} {path} is a directory, not a file") from None
    except OSError as e:
        raise TLSConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None


def load_certificates(path: PemSource, what: str = "certificate file") -> list[x509.Certificate]:
    """The PEM certificates in ``path``, in order (at least one)."""
    data = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TLSConfigError(f"{what} {path} holds no readable PEM certificate ({e})") from None
    return certs


def load_private_key(path: PemSource, what: str = "private key file") -> PrivateKeyTypes:
    """The unencrypted PEM private key in ``path``."""
    data = _read(path, what)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSConfigError(
            f"{what} {path} is encrypted; cellvpn needs an unencrypted key (mode 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        first = str(e).splitlines()[0] if str(e) else "unreadable"
        raise TLSConfigError(f"{what} {path} holds no readable PEM private key ({first})") from None


def _public_der(key: PrivateKeyTypes | x509.Certificate) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_certificate(cert_path: PemSource, key_path: PemSource) -> CertificateAndKey:
    """A certificate file (the certificate, then any chain) and the private key that matches it."""
    certs = load_certificates(cert_path)
    key = load_private_key(key_path)
    if _public_der(key) != _public_der(certs[0]):
        raise TLSConfigError(
            f"private key {key_path} does not match the certificate in {cert_path}"
        )
    return CertificateAndKey(certs[0], tuple(certs[1:]), key)


# --- writing -------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a new file created with ``mode``, then rename it to ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        with suppress(OSError):
            os.unlink(tmp)
        raise TLSConfigError(f"cannot write {path}: {e.strerror or e}") from None
    _fsync_dir(path.parent)


def write_state_file(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` atomically (a new file created with ``mode``, renamed)."""
    _write_atomically(Path(path), data, mode)


def _key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


# --- issuing -------------------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _signing_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()


def _common_name(text: str) -> str:
    return text[:64]


def _new_ca(label: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cellvpn"),
            # A random part keeps the subjects of two cellvpn CAs apart: peers find an issuer
            # by its subject.
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"CA {secrets.token_hex(8)}"),
            x509.NameAttribute(NameOID.COMMON_NAME, _common_name(f"cellvpn CA {label}")),
        ]
    )
    start = _now() - _BACKDATE
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + CA_LIFETIME)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issuer_key(key: PrivateKeyTypes, path: Path) -> CertificateIssuerPrivateKeyTypes:
    if isinstance(
        key,
        (
            ec.EllipticCurvePrivateKey,
            rsa.RSAPrivateKey,
            dsa.DSAPrivateKey,
            ed25519.Ed25519PrivateKey,
            ed448.Ed448PrivateKey,
        ),
    ):
        return key
    raise TLSConfigError(f"CA key {path} is of a kind that cannot sign certificates")


def _new_server_cert(
    names: Sequence[x509.GeneralName],
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    key: CertificateIssuerPrivateKeyTypes | None = None,
) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    """A server certificate for ``key`` (a new P-256 key when None)."""
    if key is None:
        key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cellvpn"),
            x509.NameAttribute(NameOID.COMMON_NAME, _common_name(_name_text(names[0]))),
        ]
    )
    start = _now() - _BACKDATE
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(min(start + SERVER_LIFETIME, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_LEAF_KEY_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = builder.add_extension(aki, critical=False)
    return builder.sign(ca_key, _signing_hash(ca_key)), key


def _why_reissue(
    cert_path: Path,
    key_path: Path,
    ca_cert: x509.Certificate,
    wanted: set[tuple[str, str]],
) -> tuple[str | None, x509.Certificate | None]:
    """Why the server certificate must be issued anew (None: it is fine), and the certificate."""
    if not cert_path.exists() or not key_path.exists():
        return "there is none yet", None
    certs = load_certificates(cert_path)
    leaf = certs[0]
    key = load_private_key(key_path)
    if _public_der(key) != _public_der(leaf):
        return f"{key_path} does not match {cert_path}", leaf
    try:
        leaf.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return f"it was not issued by the CA in {cert_path.parent / CA_CERT}", leaf
    have = _san_keys(leaf)
    if have != wanted:
        return "the configured names changed", leaf
    if leaf.not_valid_after_utc - _now() < RENEW_BEFORE:
        return f"it expires on {leaf.not_valid_after_utc:%Y-%m-%d}", leaf
    return None, leaf


def ensure_server_identity(state_dir: Path, names: Sequence[str]) -> ServerIdentity:
    """The server's CA and certificate under ``state_dir/tls``, created or renewed as needed.

    ``names`` (host names and IPv4/IPv6 addresses) go into the server certificate's
    subjectAltName. Raises :class:`TLSConfigError` when a name is not usable, a file cannot be
    read or written, or a new certificate is needed but the CA key is missing.
    """
    generals = _general_names(names)
    if not generals:
        raise TLSConfigError("the server certificate needs at least one name")
    wanted = {_name_key(g) for g in generals}
    state_dir = Path(state_dir)
    tls_dir = state_dir / TLS_DIR
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tls_dir.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        raise TLSConfigError(f"cannot create {tls_dir}: {e.strerror or e}") from None
    ca_path, ca_key_path = tls_dir / CA_CERT, tls_dir / CA_KEY
    cert_path, key_path = tls_dir / SERVER_CERT, tls_dir / SERVER_KEY
    created = False

    ca_key: CertificateIssuerPrivateKeyTypes | None = None
    if ca_path.exists():
        ca_cert = load_certificates(ca_path, "CA certificate")[0]
    else:
        # A ca.key without ca.pem is a first start that stopped half-way: start again.
        ca_cert, ca_key = _new_ca(_name_text(generals[0]))
        _write_atomically(ca_key_path, _key_pem(ca_key), 0o600)
        _write_atomically(ca_path, _cert_pem(ca_cert), 0o644)
        created = True
        log.info("created a new TLS certificate authority {path}", path=str(ca_path))

    why, leaf = _why_reissue(cert_path, key_path, ca_cert, wanted)
    if why is not None and _kept_offline(why, leaf, ca_key, ca_key_path):
        log.warn(
            "the TLS server certificate {path} should be issued anew ({why}), but the CA key "
            "is kept elsewhere (a fleet's CA): it is used as it is until it expires; issue a new"
            " one with cellvpn-ctl fleet server-cert",
            path=str(cert_path),
            why=why,
        )
        why = None
    if why is not None:
        if ca_key is None:
            if not ca_key_path.exists():
                raise TLSConfigError(
                    f"a new server certificate is needed ({why}) but the CA key {ca_key_path} "
                    "does not exist"
                )
            ca_key = _issuer_key(load_private_key(ca_key_path, "CA key"), ca_key_path)
            if _public_der(ca_key) != _public_der(ca_cert):
                raise TLSConfigError(f"CA key {ca_key_path} does not match the CA in {ca_path}")
        kept = _reusable_key(key_path)
        leaf, server_key = _new_server_cert(generals, ca_cert, ca_key, kept)
        if kept is None:
            _write_atomically(key_path, _key_pem(server_key), 0o600)
        _write_atomically(cert_path, _cert_pem(leaf, ca_cert), 0o644)
        created = True
        log.info(
            "issued a new TLS server certificate {path} for {names} ({why}), {key}",
            path=str(cert_path),
            names=", ".join(_name_text(g) for g in generals),
            why=why,
            key="same key: key pins (SPKI) still match" if kept is not None else "new key",
        )
    assert leaf is not None
    return _identity(ca_path, cert_path, key_path, leaf, generals, created)


def _kept_offline(
    why: str,
    leaf: x509.Certificate | None,
    ca_key: CertificateIssuerPrivateKeyTypes | None,
    ca_key_path: Path,
) -> bool:
    """A certificate a fleet's CA issued elsewhere, still valid, whose names or nearing end
    would have it issued anew here, where there is no CA key to do it."""
    if leaf is None or ca_key is not None or ca_key_path.exists():
        return False
    if not (why == "the configured names changed" or why.startswith("it expires on")):
        return False
    return leaf.not_valid_after_utc > _now()


# --- a fleet's CA, kept by its operator --------------------------------------------------


def create_fleet_ca(folder: Path, label: str) -> CertificateAuthority:
    """A new CA for a fleet of servers in ``folder`` (ca.pem, ca.key 0600); refuses to
    replace one. Its key stays with the operator: servers get only ca.pem."""
    folder = Path(folder)
    ca_path, key_path = folder / CA_CERT, folder / CA_KEY
    if ca_path.exists() or key_path.exists():
        raise TLSConfigError(f"{folder} holds a CA already ({CA_CERT}, {CA_KEY})")
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise TLSConfigError(f"cannot create {folder}: {e.strerror or e}") from None
    cert, key = _new_ca(label)
    _write_atomically(key_path, _key_pem(key), 0o600)
    _write_atomically(ca_path, _cert_pem(cert), 0o644)
    return CertificateAuthority(cert, key)


def load_fleet_ca(folder: Path) -> CertificateAuthority:
    """The fleet's CA and its key from ``folder``."""
    folder = Path(folder)
    ca_path, key_path = folder / CA_CERT, folder / CA_KEY
    if not ca_path.exists():
        raise TLSConfigError(f"there is no CA in {folder} (cellvpn-ctl fleet ca init {folder})")
    cert = load_certificates(ca_path, "CA certificate")[0]
    key = _issuer_key(load_private_key(key_path, "CA key"), key_path)
    if _public_der(key) != _public_der(cert):
        raise TLSConfigError(f"CA key {key_path} does not match the CA in {ca_path}")
    return CertificateAuthority(cert, key)


def issue_fleet_server(
    authority: CertificateAuthority, state_dir: Path, names: Sequence[str]
) -> ServerIdentity:
    """A server certificate from the fleet's CA into ``state_dir/tls`` (ca.pem, server.pem
    with its chain, server.key 0600, never ca.key). An existing server key is kept, so pins
    of it survive; a CA other than the fleet's there is replaced by the fleet's."""
    generals = _general_names(names)
    if not generals:
        raise TLSConfigError("the server certificate needs at least one name")
    tls_dir = Path(state_dir) / TLS_DIR
    try:
        tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise TLSConfigError(f"cannot create {tls_dir}: {e.strerror or e}") from None
    ca_path, cert_path, key_path = tls_dir / CA_CERT, tls_dir / SERVER_CERT, tls_dir / SERVER_KEY
    if (
        (tls_dir / CA_KEY).exists()
        and ca_path.exists()
        and _public_der(load_certificates(ca_path)[0]) != _public_der(authority.cert)
    ):
        raise TLSConfigError(
            f"{tls_dir} holds a CA of its own with its key ({CA_KEY}); move both away "
            "before the server joins the fleet"
        )
    kept = _reusable_key(key_path)
    leaf, key = _new_server_cert(generals, authority.cert, authority.key, kept)
    if kept is None:
        _write_atomically(key_path, _key_pem(key), 0o600)
    _write_atomically(ca_path, _cert_pem(authority.cert), 0o644)
    _write_atomically(cert_path, _cert_pem(leaf, authority.cert), 0o644)
    return _identity(ca_path, cert_path, key_path, leaf, generals, True)


def _reusable_key(key_path: Path) -> CertificateIssuerPrivateKeyTypes | None:
    """The existing server key, kept across renewals so key pins survive; None: make one."""
    if not key_path.exists():
        return None
    try:
        key = load_private_key(key_path, "server key")
    except TLSConfigError as e:
        log.warn("cannot reuse the server key: {why}; a new key is made", why=str(e))
        return None
    if isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        return key
    return None


# --- client enrollment ---------------------------------------------------------------------

#: Lifetime of a client certificate when the operator names none.
CLIENT_LIFETIME_DAYS = 365
#: The longest client certificate the server signs.
CLIENT_MAX_DAYS = 3650
_CLIENT_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9])?")


class EnrollmentError(Exception):
    """A client name, request or lifetime the server will not sign; the message says why."""


def check_client_name(name: str) -> str:
    """``name`` if it can name a client (1 to 64 letters, digits, ``.``, ``_``, ``-``)."""
    if not isinstance(name, str) or not _CLIENT_NAME.fullmatch(name):
        raise EnrollmentError(
            f"{str(name)[:80]!r} cannot name a client: expected 1 to 64 ASCII letters, digits, "
            "'.', '_' or '-', starting and ending with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class ClientRequest:
    """What the operator's side keeps (the key) and sends (the request) when enrolling."""

    key_pem: bytes
    csr_pem: bytes


def new_client_request(name: str) -> ClientRequest:
    """A new P-256 key pair for client ``name`` and a certificate signing request for it."""
    check_client_name(name)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return ClientRequest(_key_pem(key), csr.public_bytes(serialization.Encoding.PEM))


@dataclass(frozen=True)
class CertificateAuthority:
    """The server's CA, loaded once at start, that signs client certificates."""

    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes

    @property
    def pem(self) -> bytes:
        return _cert_pem(self.cert)


def load_authority(state_dir: Path) -> CertificateAuthority:
    """The CA under ``state_dir/tls`` (created if there is none yet), with its key."""
    tls_dir = Path(state_dir) / TLS_DIR
    try:
        tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise TLSConfigError(f"cannot create {tls_dir}: {e.strerror or e}") from None
    ca_path, ca_key_path = tls_dir / CA_CERT, tls_dir / CA_KEY
    if not ca_path.exists():
        cert, new_key = _new_ca(socket.gethostname())
        _write_atomically(ca_key_path, _key_pem(new_key), 0o600)
        _write_atomically(ca_path, _cert_pem(cert), 0o644)
        log.info("created a new TLS certificate authority {path}", path=str(ca_path))
        return CertificateAuthority(cert, new_key)
    cert = load_certificates(ca_path, "CA certificate")[0]
    key = _issuer_key(load_private_key(ca_key_path, "CA key"), ca_key_path)
    if _public_der(key) != _public_der(cert):
        raise TLSConfigError(f"CA key {ca_key_path} does not match the CA in {ca_path}")
    return CertificateAuthority(cert, key)


def sign_client_request(
    authority: CertificateAuthority,
    name: str,
    csr_pem: bytes,
    days: int,
    now: datetime.datetime | None = None,
) -> x509.Certificate:
    """A client certificate for ``name`` (CN, EKU clientAuth) over the request's public key.

    The request must be a PEM CSR whose own signature verifies and whose key is P-256, P-384,
    Ed25519 or RSA of 2048 bits or more. Raises :class:`EnrollmentError` saying what is wrong.
    """
    check_client_name(name)
    if not isinstance(days, int) or not 1 <= days <= CLIENT_MAX_DAYS:
        raise EnrollmentError(f"expected a lifetime of 1 to {CLIENT_MAX_DAYS} days, got {days!r}")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise EnrollmentError(f"not a PEM certificate signing request ({e})") from None
    if not csr.is_signature_valid:
        raise EnrollmentError("the certificate signing request's signature does not verify")
    public = csr.public_key()
    ok = (
        (isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name in _CURVES)
        or isinstance(public, ed25519.Ed25519PublicKey)
        or (isinstance(public, rsa.RSAPublicKey) and public.key_size >= 2048)
    )
    if not ok:
        raise EnrollmentError(
            "the request's key is of a kind the server does not sign (P-256, P-384, Ed25519 or "
            "RSA of at least 2048 bits)"
        )
    start = (now or _now()) - _BACKDATE
    end = min(start + datetime.timedelta(days=days), authority.cert.not_valid_after_utc)
    ca_key = authority.key
    try:
        ski = authority.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cellvpn"),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(authority.cert.subject)
        .public_key(public)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_LEAF_KEY_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(aki, critical=False)
    )
    return builder.sign(ca_key, _signing_hash(ca_key))


_CURVES = frozenset({"secp256r1", "secp384r1"})


def serial_text(cert: x509.Certificate) -> str:
    """A certificate's serial number as lowercase hex, the way ``client list`` shows it."""
    return f"{cert.serial_number:x}"


def certificate_pem(cert: x509.Certificate) -> bytes:
    return _cert_pem(cert)


def client_common_name(cert: x509.Certificate) -> str | None:
    """The CN of a client certificate, or None."""
    found = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(found[0].value) if found else None


def _identity(
    ca_path: Path,
    cert_path: Path,
    key_path: Path,
    leaf: x509.Certificate,
    generals: Sequence[x509.GeneralName],
    created: bool,
) -> ServerIdentity:
    """The identity a server runs on, as its files and certificate describe it."""
    return ServerIdentity(
        ca_cert=ca_path,
        cert=cert_path,
        key=key_path,
        fingerprint=fingerprint_of(leaf),
        names=tuple(_name_text(g) for g in generals),
        created=created,
        spki=spki_fingerprint(leaf),
        not_after=leaf.not_valid_after_utc,
    )
