"""Which server address the client routes around: the stream's peer, IPv4 or IPv6, never a
lookup of its own."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from cellvpn.client.machine import ClientInput
from cellvpn.client.service import VPNClientService, peer_address
from cellvpn.client.stream import ClientStream
from cellvpn.config import load_client_config
from cellvpn.conn.protocol import StreamProtocol
from cellvpn.net.netlink import NetConfigError
from cellvpn.stream.connection import Role, StreamConnection, StreamSettings
from cellvpn.wire.vpn import AddrReply

REPLY = AddrReply(
    ipaddress.IPv4Address("198.18.5.2"),
    ipaddress.IPv4Address("198.18.5.1"),
    ipaddress.IPv4Address("255.255.255.0"),
)


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        (address.IPv4Address("TCP", "192.0.2.1", 8089), ipaddress.IPv4Address("192.0.2.1")),
        (address.IPv6Address("TCP", "2001:db8::1", 8089), ipaddress.IPv6Address("2001:db8::1")),
        (address.IPv6Address("TCP", "::ffff:192.0.2.1", 8089), ipaddress.IPv4Address("192.0.2.1")),
        (address.IPv6Address("TCP", "fe80::1%eth0", 8089), ipaddress.IPv6Address("fe80::1")),
        (address.UNIXAddress(b"/run/x.sock"), None),
        (address.IPv4Address("TCP", "server.example", 8089), None),
        (None, None),
    ],
)
def test_the_peer_address_is_taken_as_the_transport_has_it(peer: Any, expected: Any) -> None:
    assert peer_address(peer) == expected


def service(tmp_path: Path, server: str) -> VPNClientService:
    config = load_client_config(
        None,
        {
            "client.state_dir": str(tmp_path / "state"),
            "control.socket": str(tmp_path / "c.sock"),
            "client.fingerprint": "00" * 32,
            "client.default_route": "true",
        },
    )
    client = VPNClientService(config, reactor=MemoryReactorClock())
    client.host, client.port = server, 8089
    return client


def established(client: VPNClientService, peer: Any) -> ClientStream:
    """A stream whose transport has ``peer`` as its other end, reported established."""
    stream = ClientStream(client.reactor, 3.0, client)
    client.stream = stream
    proto = StreamProtocol(StreamConnection(Role.CLIENT, StreamSettings()), stream, client.reactor)
    proto.makeConnection(StringTransport(peerAddress=peer))
    client.stream_established(stream)
    return stream


def bring_up(client: VPNClientService, stream: ClientStream) -> Failure | None:
    d = Deferred.fromCoroutine(client._bring_up(stream, REPLY))
    result: list[Failure | None] = []
    d.addCallbacks(lambda _: result.append(None), result.append)
    assert result, "the bring-up waited for something"
    return result[0]


def test_an_ipv6_server_is_passed_on_as_the_streams_peer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = service(tmp_path, "2001:db8::1")
    seen: list[Any] = []

    async def setup(reply: AddrReply, server: Any, default_route: bool, *a: Any, **k: Any) -> None:
        seen.append((server, default_route))

    monkeypatch.setattr(client.tunnel, "setup", setup)
    stream = established(client, address.IPv6Address("TCP", "2001:db8::1", 8089))
    assert bring_up(client, stream) is None
    assert seen == [(ipaddress.IPv6Address("2001:db8::1"), True)]
    assert client._server_text() == "[2001:db8::1]:8089"


def test_an_unknown_server_address_fails_the_bring_up_without_a_lookup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = service(tmp_path, "vpn.example")

    def no_lookup(*_: Any) -> Any:
        raise AssertionError("a blocking lookup on the reactor thread")

    monkeypatch.setattr(socket, "gethostbyname", no_lookup)
    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    stream = established(client, address.UNIXAddress(b"/run/relay.sock"))
    assert client.server_ip is None
    failure = bring_up(client, stream)
    assert failure is not None and failure.check(NetConfigError)
    assert failure.getErrorMessage() == (
        "the stream to vpn.example:8089 has no IP address as its peer, so no route can keep "
        "the server reachable"
    )


def test_a_bracketed_ipv6_literal_is_dialled_without_brackets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = service(tmp_path, "")
    monkeypatch.setattr(client, "_connect", lambda: None)
    client.start("[2001:db8::1]", 8089)
    assert client.host == "2001:db8::1"
    assert client.status()["server"] == "[2001:db8::1]:8089"


def test_a_retry_keeps_the_reason_in_the_status_and_a_new_start_clears_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The status showed no reason while the client retried (after a refused address offer)."""
    client = service(tmp_path, "")
    monkeypatch.setattr(client, "_connect", lambda: None)
    client.last_error = "refused the server's address offer: netmask 0.0.0.0 is wider than /16"
    client.start("192.0.2.1", 8089, keep_trying=True)
    assert client.status()["last_error"] == client.last_error is not None
    client.machine.fire(ClientInput.STOP)
    client.start("192.0.2.1", 8089)
    assert client.status()["last_error"] is None
