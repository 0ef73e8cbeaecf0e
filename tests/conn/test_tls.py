"""TLS 1.3 between real sockets on 127.0.0.1: trust by CA or pin, names, mutual TLS, failures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from cellvpn.conn import pki, tls
from cellvpn.conn.tls import (
    TLSConfigError,
    TLSVerificationError,
    client_tls,
    describe_tls_failure,
    peer_fingerprint,
    server_tls,
)

from .conftest import PKIFiles

TIMEOUT = 5.0


async def within(d: defer.Deferred[Any], reactor: Any, seconds: float = TIMEOUT) -> Any:
    d.addTimeout(seconds, reactor)
    return await d


@implementer(IHandshakeListener)
class Peer(Protocol):
    """Either end: records what arrives, optionally echoes it, and reports how it ended."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.received = b""
        self.handshake_done = False
        self.peer_fp: str | None = None
        self.reason: Failure | None = None
        self.lost: defer.Deferred[None] = defer.Deferred()
        self._want: tuple[bytes, defer.Deferred[None]] | None = None

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        self.peer_fp = peer_fingerprint(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.echo:
            self.transport.write(data)
        if self._want is not None and self.received.startswith(self._want[0]):
            d, self._want = self._want[1], None
            d.callback(None)

    def wait_for(self, data: bytes) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._want = (data, d)
        if self.received.startswith(data):
            self.dataReceived(b"")
        return d

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.lost.callback(None)


class ServerFactory(Factory):
    def __init__(self) -> None:
        self.peers: list[Peer] = []
        self.first: defer.Deferred[Peer] = defer.Deferred()

    def buildProtocol(self, addr: Any) -> Peer:
        peer = Peer(echo=True)
        peer.factory = self
        self.peers.append(peer)
        if not self.first.called:
            self.first.callback(peer)
        return peer


@asynccontextmanager
async def tls_server(reactor: Any, creator: Any) -> AsyncIterator[tuple[int, ServerFactory]]:
    factory = ServerFactory()
    endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
    port = await within(endpoint.listen(TLSMemoryBIOFactory(creator, False, factory)), reactor)
    try:
        yield port.getHost().port, factory
    finally:
        for peer in factory.peers:
            if not peer.lost.called and peer.transport is not None:
                peer.transport.abortConnection()
        await port.stopListening()
        for peer in factory.peers:
            await within(peer.lost, reactor)


@asynccontextmanager
async def tls_client(reactor: Any, port: int, creator: Any) -> AsyncIterator[Peer]:
    from twisted.internet.endpoints import wrapClientTLS

    endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5))
    peer = await within(connectProtocol(endpoint, Peer()), reactor)
    try:
        yield peer
    finally:
        if not peer.lost.called and peer.transport is not None:
            peer.transport.abortConnection()
        await within(peer.lost, reactor)


async def exchange(reactor: Any, port: int, creator: Any) -> Peer:
    """Connect, send bytes, get them echoed back, close cleanly; the client end."""
    async with tls_client(reactor, port, creator) as client:
        client.transport.write(b"hello over tls")
        await within(client.wait_for(b"hello over tls"), reactor)
        assert client.handshake_done
        client.transport.loseConnection()
        await within(client.lost, reactor)
    return client


async def refused(reactor: Any, port: int, factory: ServerFactory, creator: Any) -> Failure:
    """Connect, try to send; the connection must end without the server seeing the bytes."""
    async with tls_client(reactor, port, creator) as client:
        client.transport.write(b"must not arrive")
        await within(client.lost, reactor)
    server = await within(factory.first, reactor)
    await within(server.lost, reactor)
    assert server.received == b""
    assert client.received == b""
    assert client.reason is not None
    return client.reason


def server_creator(p: PKIFiles, client_ca: Path | None = None) -> Any:
    return server_tls(p.server.cert, p.server.key, client_ca)


# --- trusting the server by its CA ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_right_ca_and_dns_name(reactor: Any, pki_files: PKIFiles) -> None:
    async with tls_server(reactor, server_creator(pki_files)) as (port, factory):
        client = await exchange(
            reactor, port, client_tls("vpn.test", pki_files.server.ca_cert, None, None, None)
        )
        assert client.peer_fp == pki_files.server.fingerprint
        server = factory.peers[0]
        await within(server.lost, reactor)
        assert server.received == b"hello over tls"
        assert server.peer_fp is None  # no client certificate asked for
        assert client.reason is not None and client.reason.check(error.ConnectionDone)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("name", ["127.0.0.1", "::1", "[::1]"])
async def test_right_ca_and_ip_address(reactor: Any, pki_files: PKIFiles, name: str) -> None:
    # The name is only checked against the certificate; the connection is to 127.0.0.1.
    async with tls_server(reactor, server_creator(pki_files)) as (port, _):
        await exchange(reactor, port, client_tls(name, pki_files.server.ca_cert, None, None, None))


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("name", "shown"),
    [("wrong.test", "'wrong.test'"), ("127.0.0.2", "'127.0.0.2'"), ("::2", "'::2'")],
)
async def test_wrong_name_is_refused(
    reactor: Any, pki_files: PKIFiles, name: str, shown: str
) -> None:
    async with tls_server(reactor, server_creator(pki_files)) as (port, factory):
        creator = client_tls(name, pki_files.server.ca_cert, None, None, None)
        reason = await refused(reactor, port, factory, creator)
    assert reason.check(TLSVerificationError)
    expected = f"server certificate is not valid for {shown} (it names: vpn.test, 127.0.0.1, ::1)"
    assert str(reason.value) == expected
    assert describe_tls_failure(reason) == expected


@pytest_twisted.ensureDeferred
async def test_ca_that_did_not_sign_the_server_is_refused(
    reactor: Any, pki_files: PKIFiles
) -> None:
    rogue_ca = pki_files.rogue.ca_cert
    async with tls_server(reactor, server_creator(pki_files)) as (port, factory):
        reason = await refused(
            reactor, port, factory, client_tls("vpn.test", rogue_ca, None, None, None)
        )
    assert reason.check(TLSVerificationError)
    assert describe_tls_failure(reason) == (
        f"server certificate is not signed by the CA in {rogue_ca} "
        "(self-signed certificate in certificate chain)"
    )


@pytest_twisted.ensureDeferred
async def test_an_exception_while_checking_becomes_a_clear_refusal(
    reactor: Any, pki_files: PKIFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(cert: Any, name: str) -> None:
        raise RuntimeError("checker broke")

    monkeypatch.setattr(tls, "verify_certificate_hostname", broken)
    async with tls_server(reactor, server_creator(pki_files)) as (port, factory):
        creator = client_tls("vpn.test", pki_files.server.ca_cert, None, None, None)
        reason = await refused(reactor, port, factory, creator)
    assert reason.check(TLSVerificationError)
    assert describe_tls_failure(reason) == (
        "cannot check the server certificate: RuntimeError: checker broke"
    )


# --- trusting the server by its fingerprint ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_right_pin_connects_whatever_the_name(reactor: Any, pki_files: PKIFiles) -> None:
    pin = pki.format_fingerprint(pki_files.server.fingerprint)  # AB:CD:... is accepted too
    async with tls_server(reactor, server_creator(pki_files)) as (port, _):
        client = await exchange(
            reactor, port, client_tls("any.name.invalid", None, pin, None, None)
        )
    assert client.peer_fp == pki_files.server.fingerprint


@pytest_twisted.ensureDeferred
async def test_wrong_pin_is_refused(reactor: Any, pki_files: PKIFiles) -> None:
    pin = pki_files.rogue.fingerprint
    async with tls_server(reactor, server_creator(pki_files)) as (port, factory):
        reason = await refused(
            reactor, port, factory, client_tls("vpn.test", None, pin, None, None)
        )
    assert reason.check(TLSVerificationError)
    assert describe_tls_failure(reason).startswith(
        f"server certificate fingerprint {pki_files.server.fingerprint} does not match the "
        f"pinned {pin} (a certificate pin stops matching when the server renews its certificate"
    )


# --- protocol version -------------------------------------------------------------------------


@implementer(IOpenSSLClientConnectionCreator)
class TLS12OnlyClient:
    def __init__(self) -> None:
        self.ctx = SSL.Context(SSL.TLS_METHOD)
        self.ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        self.ctx.set_verify(SSL.VERIFY_NONE)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self.ctx, None)


@pytest_twisted.ensureDeferred
async def test_tls12_only_client_is_refused(reactor: Any, pki_files: PKIFiles) -> None:
    async with tls_server(reactor, server_creator(pki_files)) as (port, factory):
        reason = await refused(reactor, port, factory, TLS12OnlyClient())
        server_reason = factory.peers[0].reason
    assert reason.check(SSL.Error)
    assert describe_tls_failure(reason).startswith("TLS handshake failed: ")
    assert server_reason is not None and server_reason.check(SSL.Error)
    assert describe_tls_failure(server_reason) == (
        "TLS handshake failed: unsupported protocol (the other side does not speak TLS 1.3)"
    )
    assert not factory.peers[0].handshake_done


# --- mutual TLS -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_mutual_tls_accepts_the_right_client_certificate(
    reactor: Any, pki_files: PKIFiles
) -> None:
    p = pki_files
    creator = client_tls("vpn.test", p.server.ca_cert, None, p.client_cert, p.client_key)
    async with tls_server(reactor, server_creator(p, p.server.ca_cert)) as (port, factory):
        client = await exchange(reactor, port, creator)
        server = factory.peers[0]
        await within(server.lost, reactor)
    assert server.received == b"hello over tls"
    assert server.peer_fp == pki.fingerprint_of(p.client_cert.read_bytes())
    assert client.peer_fp == p.server.fingerprint


@pytest_twisted.ensureDeferred
async def test_mutual_tls_refuses_a_client_without_certificate(
    reactor: Any, pki_files: PKIFiles
) -> None:
    p = pki_files
    async with tls_server(reactor, server_creator(p, p.server.ca_cert)) as (port, factory):
        reason = await refused(
            reactor, port, factory, client_tls("vpn.test", p.server.ca_cert, None, None, None)
        )
        server = factory.peers[0]
    assert not server.handshake_done
    assert server.reason is not None and server.reason.check(SSL.Error)
    assert describe_tls_failure(server.reason) == (
        "TLS handshake failed: peer did not return a certificate (the client sent no certificate)"
    )
    assert reason.check(SSL.Error)
    assert describe_tls_failure(reason) == (
        "TLS handshake failed: tlsv13 alert certificate required "
        "(the server requires a client certificate: enroll this client (cellvpn-ctl client add "
        "on the server) and use the file it writes)"
    )


@pytest_twisted.ensureDeferred
async def test_mutual_tls_refuses_a_client_certificate_from_another_ca(
    reactor: Any, pki_files: PKIFiles
) -> None:
    p = pki_files
    creator = client_tls(
        "vpn.test", p.server.ca_cert, None, p.rogue_client_cert, p.rogue_client_key
    )
    async with tls_server(reactor, server_creator(p, p.server.ca_cert)) as (port, factory):
        reason = await refused(reactor, port, factory, creator)
        server = factory.peers[0]
    assert not server.handshake_done
    assert server.reason is not None and server.reason.check(SSL.Error)
    assert describe_tls_failure(server.reason) == (
        "TLS handshake failed: certificate verify failed "
        "(the peer's certificate does not verify against our CA)"
    )
    assert reason.check(SSL.Error)
    assert describe_tls_failure(reason) == (
        "TLS handshake failed: tlsv1 alert unknown ca "
        "(the other side does not trust the CA of our certificate)"
    )


# --- configuration errors ---------------------------------------------------------------------


def test_client_needs_exactly_one_way_to_trust_the_server(pki_files: PKIFiles) -> None:
    ca, fp = pki_files.server.ca_cert, pki_files.server.fingerprint
    with pytest.raises(TLSConfigError, match="exactly one of a CA file"):
        client_tls("vpn.test", None, None, None, None)
    with pytest.raises(TLSConfigError, match="not several"):
        client_tls("vpn.test", ca, fp, None, None)
    with pytest.raises(TLSConfigError, match="server fingerprint: 'abc' is not a SHA-256"):
        client_tls("vpn.test", None, "abc", None, None)
    with pytest.raises(TLSConfigError, match="both the certificate file and its private key"):
        client_tls("vpn.test", ca, None, pki_files.client_cert, None)


def test_config_errors_name_the_file(tmp_path: Path, pki_files: PKIFiles) -> None:
    p = pki_files
    missing = tmp_path / "nothing.pem"
    with pytest.raises(TLSConfigError, match=f"CA file {missing} does not exist"):
        client_tls("vpn.test", missing, None, None, None)
    with pytest.raises(TLSConfigError, match=f"certificate file {missing} does not exist"):
        server_tls(missing, p.server.key, None)
    with pytest.raises(
        TLSConfigError, match=f"private key {p.rogue.key} does not match the certificate in"
    ):
        server_tls(p.server.cert, p.rogue.key, None)
    with pytest.raises(TLSConfigError, match=f"client CA file {missing} does not exist"):
        server_tls(p.server.cert, p.server.key, missing)
    with pytest.raises(TLSConfigError, match=f"private key file {p.client_cert} holds no"):
        client_tls("vpn.test", p.server.ca_cert, None, p.client_cert, p.client_cert)


# --- describe_tls_failure ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (TLSVerificationError("server certificate is bad"), "server certificate is bad"),
        (error.ConnectionDone(), "connection closed by peer"),
        (error.ConnectionLost(), "connection lost (closed by peer without a clean shutdown)"),
        (error.ConnectionAborted(), "connection aborted"),
        (error.ConnectionRefusedError(), "connection refused"),
        (error.TimeoutError(), "connection timed out"),
        (defer.TimeoutError(), "connection timed out"),
        (
            SSL.Error([("SSL routines", "", "wrong version number")]),
            "TLS handshake failed: wrong version number (the other side is not speaking TLS)",
        ),
        (
            SSL.Error([("SSL routines", "", "a"), ("SSL routines", "", "b")]),
            "TLS handshake failed: a; b",
        ),
        (ValueError("odd"), "ValueError: odd"),
    ],
)
def test_describe_tls_failure(exc: Exception, text: str) -> None:
    assert describe_tls_failure(Failure(exc)) == text


def test_peer_fingerprint_without_tls() -> None:
    assert peer_fingerprint(object()) is None
