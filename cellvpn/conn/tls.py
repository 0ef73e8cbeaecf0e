"""TLS 1.3 for cellvpn streams: connection creators for Twisted, and failures in plain words.

:func:`server_tls` and :func:`client_tls` build an :class:`OpenSSL.SSL.Context` directly and
return the connection creators that :class:`twisted.protocols.tls.TLSMemoryBIOFactory`,
``wrapClientTLS`` and the TLS endpoints take. Both speak TLS 1.3 and nothing older.

A client trusts the server in one of three ways: a CA (the chain must lead to it, and the
certificate must name the server's host name or IP address), a pinned SHA-256 of the server's
public key (its SPKI: it survives the server's certificate renewals, which keep the key), or a
pinned SHA-256 fingerprint of the server certificate itself (it breaks at the next renewal, and
the client warns so each time it connects). When the check fails, the connection's
``connectionLost`` gets a :class:`TLSVerificationError` whose message says what was wrong;
:func:`describe_tls_failure` turns that and every other way a connection ends into one line.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet import defer, error
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cellvpn.config.parsers import InlinePem, PemSource
from cellvpn.conn.pki import (
    TLSConfigError,
    certificate_names,
    fingerprint_of,
    load_certificates,
    load_private_certificate,
    normalise_fingerprint,
    spki_fingerprint,
)

if TYPE_CHECKING:
    from twisted.protocols.tls import TLSMemoryBIOProtocol

__all__ = [
    "TLSConfigError",
    "TLSVerificationError",
    "client_certificate_problem",
    "client_tls",
    "describe_tls_failure",
    "peer_certificate",
    "peer_fingerprint",
    "replace_server_context",
    "server_tls",
]

log = Logger()

#: Session ID context for the server; OpenSSL refuses resumption with client certificates
#: without one.
_SESSION_ID_CONTEXT = b"cellvpn"

_V = SSL.X509VerificationCodes
#: Verification errors that mean "this chain does not lead to the CA we trust".
_NOT_FROM_CA = frozenset(
    {
        _V.ERR_UNABLE_TO_GET_ISSUER_CERT,
        _V.ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
        _V.ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE,
        _V.ERR_SELF_SIGNED_CERT_IN_CHAIN,
        _V.ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
        _V.ERR_CERT_SIGNATURE_FAILURE,
        _V.ERR_UNABLE_TO_DECRYPT_CERT_SIGNATURE,
        _V.ERR_UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY,
        _V.ERR_CERT_UNTRUSTED,
        _V.ERR_SUBJECT_ISSUER_MISMATCH,
        _V.ERR_AKID_ISSUER_SERIAL_MISMATCH,
    }
)
del _V


class TLSVerificationError(Exception):
    """The peer's certificate was refused; the message says why, for logs and users."""


# --- contexts ------------------------------------------------------------------------------


def _openssl_reasons(exc: SSL.Error) -> str:
    """The reason strings of an OpenSSL error queue, joined; or the error's own text."""
    reasons: list[str] = []
    args = exc.args[0] if exc.args else None
    if isinstance(args, list):
        for entry in args:
            if isinstance(entry, tuple) and entry:
                text = str(entry[-1])
                if text and text not in reasons:
                    reasons.append(text)
    if reasons:
        return "; ".join(reasons)
    text = " ".join(str(a) for a in exc.args if a not in (None, "", -1))
    return text or exc.__class__.__name__


#: SSL_MODE_ENABLE_PARTIAL_WRITE (pyOpenSSL exports no name for it).
_PARTIAL_WRITE = 0x1


def _tls13_context() -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    # An idle connection gives its read and write buffers (about 34 KiB) back to OpenSSL:
    # thousands of idle sessions would otherwise cost that much each.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    # pyOpenSSL turns partial writes on: each SSL_write would stop after one 16 KiB record.
    # Off, one call encrypts a whole 64 KiB super-packet (a third less CPU per byte).
    ctx.clear_mode(_PARTIAL_WRITE)
    return ctx


def _use_certificate(ctx: SSL.Context, cert_path: PemSource, key_path: PemSource) -> None:
    """Load a certificate chain file and its key, after checking them for clear messages."""
    loaded = load_private_certificate(cert_path, key_path)
    if isinstance(cert_path, InlinePem) or isinstance(key_path, InlinePem):
        try:
            ctx.use_certificate(crypto.X509.from_cryptography(loaded.cert))
            for extra in loaded.chain:
                ctx.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
            ctx.use_privatekey(crypto.PKey.from_cryptography_key(loaded.key))  # type: ignore[arg-type]
            ctx.check_privatekey()
        except (SSL.Error, TypeError, ValueError) as e:
            raise TLSConfigError(
                f"OpenSSL cannot use the client certificate and key: {e}"
            ) from None
        return
    try:
        ctx.use_certificate_chain_file(os.fspath(cert_path))
    except SSL.Error as e:
        raise TLSConfigError(
            f"OpenSSL cannot use certificate {cert_path}: {_openssl_reasons(e)}"
        ) from None
    try:
        ctx.use_privatekey_file(os.fspath(key_path))
        ctx.check_privatekey()
    except SSL.Error as e:
        raise TLSConfigError(
            f"OpenSSL cannot use private key {key_path} with {cert_path}: {_openssl_reasons(e)}"
        ) from None


def _trust(ctx: SSL.Context, ca: PemSource, what: str) -> list[x509.Certificate]:
    certs = load_certificates(ca, what)
    if isinstance(ca, InlinePem):
        store = ctx.get_cert_store()
        assert store is not None
        for cert in certs:
            store.add_cert(crypto.X509.from_cryptography(cert))
        return certs
    try:
        ctx.load_verify_locations(os.fspath(ca))
    except SSL.Error as e:
        raise TLSConfigError(f"OpenSSL cannot use {what} {ca}: {_openssl_reasons(e)}") from None
    return certs


# --- server --------------------------------------------------------------------------------


@implementer(IOpenSSLServerConnectionCreator)
class _ServerConnectionCreator:
    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self._context, None)

    def take_context_of(self, other: IOpenSSLServerConnectionCreator) -> None:
        """Give new connections ``other``'s context (a renewed certificate); open ones keep
        theirs."""
        if not isinstance(other, _ServerConnectionCreator):
            raise TypeError("expected a creator made by server_tls")
        self._context = other._context


def replace_server_context(
    creator: IOpenSSLServerConnectionCreator, new: IOpenSSLServerConnectionCreator
) -> None:
    """Make ``creator`` (listening now) hand out ``new``'s context from the next connection."""
    if not isinstance(creator, _ServerConnectionCreator):
        raise TypeError("expected a creator made by server_tls")
    creator.take_context_of(new)


def server_tls(
    cert_path: Path, key_path: Path, client_ca: Path | Sequence[Path] | None
) -> IOpenSSLServerConnectionCreator:
    """A TLS 1.3 server with this certificate chain file and key.

    With ``client_ca`` (one PEM file or several), every client must present a certificate that
    chains to a CA in them (mutual TLS), or the handshake fails; :func:`peer_fingerprint` and
    :func:`peer_certificate` then identify the client. Raises :class:`TLSConfigError` naming the
    file that cannot be used.
    """
    ctx = _tls13_context()
    _use_certificate(ctx, Path(cert_path), Path(key_path))
    ctx.set_session_id(_SESSION_ID_CONTEXT)
    if client_ca is not None:
        files = [client_ca] if isinstance(client_ca, (str, Path)) else list(client_ca)
        for ca_file in files:
            for ca in _trust(ctx, Path(ca_file), "client CA file"):
                ctx.add_client_ca(crypto.X509.from_cryptography(ca))
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _ClientCheck())
    return _ServerConnectionCreator(ctx)


#: The attribute of a Twisted TLS protocol that holds why its client's certificate was refused.
_CLIENT_PROBLEM = "cellvpn_client_certificate_problem"


class _ClientCheck:
    """The server's verify callback: OpenSSL decides; the reason of a refusal is kept on the
    connection's Twisted protocol (:func:`client_certificate_problem`) for the server's log,
    while the client still gets OpenSSL's alert."""

    def __call__(
        self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        if not ok:
            text = _verify_error_text(errno)
            if errno in _NOT_FROM_CA:
                problem = f"its client certificate is not signed by this server's CA ({text})"
            else:
                where = f" (certificate {depth} of its chain)" if depth else ""
                problem = f"its client certificate is not acceptable: {text}{where}"
            with suppress(Exception):
                tls_protocol = conn.get_app_data()
                if getattr(tls_protocol, _CLIENT_PROBLEM, None) is None:
                    setattr(tls_protocol, _CLIENT_PROBLEM, problem)
        return bool(ok)


def client_certificate_problem(transport: object) -> str | None:
    """Why the server refused this connection's client certificate, or None."""
    problem = getattr(transport, _CLIENT_PROBLEM, None)
    return problem if isinstance(problem, str) else None


# --- client --------------------------------------------------------------------------------


def _verify_error_text(errno: int) -> str:
    """OpenSSL's words for an X509 verification error number."""
    try:
        from OpenSSL._util import ffi, lib

        text = ffi.string(lib.X509_verify_cert_error_string(errno)).decode("utf-8", "replace")
    except Exception:
        text = ""
    return str(text) or f"verification error {errno}"


def _fail_verification(conn: SSL.Connection, message: str) -> None:
    """Give the Twisted TLS protocol driving ``conn`` the reason its handshake is refused."""
    try:
        tls_protocol = conn.get_app_data()
        fail = getattr(tls_protocol, "failVerification", None)
        if fail is not None:
            fail(Failure(TLSVerificationError(message)))  # type: ignore[no-untyped-call]
    except Exception:
        log.failure("while refusing the server certificate: {message}", message=message)


class _ServerCheck:
    """The client's OpenSSL verify callback: no references but to its own settings.

    The connection, and through its app data the Twisted protocol, are looked up on each call,
    so no cycle runs through the context that holds this callback.
    """

    def __call__(
        self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        try:
            problem = self.check(cert, errno, depth, bool(ok))
        except Exception as e:
            problem = f"cannot check the server certificate: {e.__class__.__name__}: {e}"
        if problem is None:
            return True
        _fail_verification(conn, problem)
        return False

    def check(self, cert: crypto.X509, errno: int, depth: int, ok: bool) -> str | None:
        """None if this certificate is acceptable, else what is wrong with it."""
        raise NotImplementedError


class _CACheck(_ServerCheck):
    def __init__(self, ca: PemSource, name: str, is_ip: bool) -> None:
        self.ca = ca
        self.name = name
        self.is_ip = is_ip

    def check(self, cert: crypto.X509, errno: int, depth: int, ok: bool) -> str | None:
        if not ok:
            text = _verify_error_text(errno)
            if errno in _NOT_FROM_CA:
                return f"server certificate is not signed by the CA in {self.ca} ({text})"
            where = f" (certificate {depth} of its chain)" if depth else ""
            return f"server certificate is not acceptable: {text}{where}"
        if depth != 0:
            return None
        leaf = cert.to_cryptography()
        try:
            if self.is_ip:
                verify_certificate_ip_address(leaf, self.name)
            else:
                verify_certificate_hostname(leaf, self.name)
        except (VerificationError, CertificateError):
            names = ", ".join(certificate_names(leaf)) or "nothing: it has no subjectAltName"
            return f"server certificate is not valid for {self.name!r} (it names: {names})"
        return None


class _PinCheck(_ServerCheck):
    """A pin of the server certificate itself: it matches until the server renews it."""

    def __init__(self, fingerprint: str, warn: Callable[[str], object] | None = None) -> None:
        self.fingerprint = fingerprint
        self.warn = warn

    def check(self, cert: crypto.X509, errno: int, depth: int, ok: bool) -> str | None:
        if depth != 0:
            return None
        leaf = cert.to_cryptography()
        actual = fingerprint_of(leaf)
        if hmac.compare_digest(actual, self.fingerprint):
            warning = leaf_pin_warning(leaf)
            log.warn("{warning}", warning=warning)
            if self.warn is not None:
                self.warn(warning)
            return None
        return (
            f"server certificate fingerprint {actual} does not match the pinned "
            f"{self.fingerprint} (a certificate pin stops matching when the server renews its "
            "certificate; pin the server's key instead: [client] server_key, which the server "
            "logs at start)"
        )


def leaf_pin_warning(leaf: x509.Certificate) -> str:
    """What a client pinned by certificate fingerprint is told each time it connects."""
    return (
        "the server certificate is pinned by its fingerprint ([client] fingerprint): the pin "
        f"stops matching when the server renews it (by {leaf.not_valid_after_utc:%Y-%m-%d}, "
        "or sooner if its names change); pin the server's key instead, which renewals keep: "
        f"server_key = {spki_fingerprint(leaf)}"
    )


class _KeyPinCheck(_ServerCheck):
    """A pin of the server's public key (SPKI SHA-256): it survives certificate renewals."""

    def __init__(self, spki: str) -> None:
        self.spki = spki

    def check(self, cert: crypto.X509, errno: int, depth: int, ok: bool) -> str | None:
        if depth != 0:
            return None
        actual = spki_fingerprint(cert.to_cryptography())
        if hmac.compare_digest(actual, self.spki):
            return None
        return f"server key SHA-256 {actual} does not match the pinned server_key {self.spki}"


@implementer(IOpenSSLClientConnectionCreator)
class _ClientConnectionCreator:
    def __init__(self, context: SSL.Context, server_name_indication: bytes | None) -> None:
        self._context = context
        self._sni = server_name_indication

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        return connection


def _server_name(server_name: str) -> tuple[str, bool]:
    """The name to check (an A-label host name or an IP address) and whether it is an address."""
    text = server_name.strip()
    literal = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return str(ipaddress.ip_address(literal.split("%", 1)[0])), True
    except ValueError:
        pass
    name = text.rstrip(".")
    if not name:
        raise TLSConfigError("the server name to check the certificate against is empty")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise TLSConfigError(f"server name {server_name!r} is not a valid host name") from None
    if any(c.isspace() or c in "/:@" for c in name):
        raise TLSConfigError(f"server name {server_name!r} is not a valid host name")
    return name, False


def client_tls(
    server_name: str,
    ca: PemSource | None,
    fingerprint: str | None,
    certificate: PemSource | None,
    private_key: PemSource | None,
    server_key: str | None = None,
    warn: Callable[[str], object] | None = None,
) -> IOpenSSLClientConnectionCreator:
    """A TLS 1.3 client that trusts the server by ``ca``, ``server_key`` or ``fingerprint``.

    Exactly one of them. With ``ca`` (a PEM file or text), the server's chain must lead to it
    and its certificate must name ``server_name`` (a host name, sent as SNI, or an IPv4/IPv6
    address). With ``server_key`` (SHA-256 of the server's SubjectPublicKeyInfo), any
    certificate for that key is accepted, whatever its chain and names. With ``fingerprint``
    (SHA-256 of the server certificate, with or without colons), only that certificate.
    ``certificate`` and ``private_key`` (both or neither) are the client's own, for servers
    that require one; ``warn`` hears the warning a certificate pin gives at each connection.
    Raises :class:`TLSConfigError`.
    """
    given = sum(x is not None for x in (ca, fingerprint, server_key))
    if given != 1:
        raise TLSConfigError(
            "to trust the server, give exactly one of a CA file (ca), the server key's SHA-256 "
            "(server_key) or the server certificate's SHA-256 fingerprint (fingerprint)"
            + (", not several" if given else "")
        )
    if (certificate is None) != (private_key is None):
        raise TLSConfigError(
            "a client certificate needs both the certificate file and its private key file"
        )
    name, is_ip = _server_name(server_name)
    ctx = _tls13_context()
    check: _ServerCheck
    if ca is not None:
        if not isinstance(ca, InlinePem):
            ca = Path(ca)
        _trust(ctx, ca, "CA file")
        check = _CACheck(ca, name, is_ip)
    elif server_key is not None:
        try:
            check = _KeyPinCheck(normalise_fingerprint(server_key))
        except ValueError as e:
            raise TLSConfigError(f"server key: {e}") from None
    else:
        assert fingerprint is not None
        try:
            check = _PinCheck(normalise_fingerprint(fingerprint), warn)
        except ValueError as e:
            raise TLSConfigError(f"server fingerprint: {e}") from None
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, check)
    if certificate is not None and private_key is not None:
        _use_certificate(
            ctx,
            certificate if isinstance(certificate, InlinePem) else Path(certificate),
            private_key if isinstance(private_key, InlinePem) else Path(private_key),
        )
    return _ClientConnectionCreator(ctx, None if is_ip else name.encode("ascii"))


# --- after the handshake -------------------------------------------------------------------


def peer_certificate(transport: object) -> x509.Certificate | None:
    """The certificate the peer presented, or None if it sent none."""
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    try:
        cert = get()
    except (AttributeError, SSL.Error):
        return None
    if isinstance(cert, crypto.X509):
        cert = cert.to_cryptography()
    if isinstance(cert, x509.Certificate):
        return cert
    return None


def peer_fingerprint(transport: object) -> str | None:
    """SHA-256 fingerprint of the certificate the peer presented, or None if it sent none.

    Meant for ``handshakeCompleted`` on a server with ``client_ca``: the client's identity.
    """
    cert = peer_certificate(transport)
    return None if cert is None else fingerprint_of(cert)


#: OpenSSL reasons worth a word of explanation.
_HINTS = {
    "unsupported protocol": "the other side does not speak TLS 1.3",
    "tlsv1 alert protocol version": "the other side does not speak TLS 1.3",
    "no protocols available": "the other side does not speak TLS 1.3",
    "wrong version number": "the other side is not speaking TLS",
    "packet length too long": "the other side is not speaking TLS",
    "http request": "the other side is speaking plain HTTP",
    "peer did not return a certificate": "the client sent no certificate",
    "tlsv13 alert certificate required": "the server requires a client certificate: enroll "
    "this client (cellvpn-ctl client add on the server) and use the file it writes",
    "tlsv1 alert unknown ca": "the other side does not trust the CA of our certificate",
    "alert certificate expired": "the other side says our certificate expired: a client is "
    "enrolled again with cellvpn-ctl client add",
    "certificate verify failed": "the peer's certificate does not verify against our CA",
    "tlsv1 alert decrypt error": "the handshake signature did not verify",
}


def describe_tls_failure(reason: Failure) -> str:
    """One line for logs and users saying why a connection ended (its ``connectionLost``)."""
    value = reason.value
    if isinstance(value, TLSVerificationError):
        return str(value)
    if isinstance(value, SSL.ZeroReturnError):
        return "connection closed by peer"
    if isinstance(value, SSL.SysCallError):
        return f"TLS connection failed: {_openssl_reasons(value)}"
    if isinstance(value, SSL.Error):
        text = _openssl_reasons(value)
        hints = [hint for key, hint in _HINTS.items() if key in text]
        extra = f" ({'; '.join(dict.fromkeys(hints))})" if hints else ""
        return f"TLS handshake failed: {text}{extra}"
    if isinstance(value, error.ConnectionDone):
        return "connection closed by peer"
    if isinstance(value, error.ConnectionAborted):
        return "connection aborted"
    if isinstance(value, error.ConnectionLost):
        return "connection lost (closed by peer without a clean shutdown)"
    if isinstance(value, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(value, (error.TimeoutError, error.TCPTimedOutError, defer.TimeoutError)):
        return "connection timed out"
    if isinstance(value, defer.CancelledError):
        return "connection attempt cancelled"
    if isinstance(value, error.DNSLookupError):
        return f"cannot resolve the server's host name: {value}"
    if isinstance(value, error.ConnectError):
        return f"cannot connect: {value}"
    text = str(value)
    return f"{value.__class__.__name__}: {text}" if text else value.__class__.__name__
