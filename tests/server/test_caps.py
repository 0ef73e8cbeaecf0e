"""The caps on what one client key may use: sessions_per_key, on memory transports."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.testing import MemoryReactorClock

from cellvpn.server.service import VPNServerService
from cellvpn.wire.service import Error, ErrorCode, PacketType
from tests.server.test_session import Client, make_server


def keyed(server: VPNServerService, clock: MemoryReactorClock, key: str, token: bytes) -> Client:
    """A client whose session carries ``key`` (as a client certificate would give it)."""
    client = Client(server, clock, token=token)
    client.session.key = key
    client.request()
    return client


def outcome(client: Client) -> str:
    (ptype, body) = client.r[-1]
    if ptype == PacketType.SUCCESS:
        return "granted"
    assert ptype == PacketType.ERROR
    return Error.decode(body).name


def test_sessions_per_key_rows(tmp_path: Path) -> None:
    """Literal rows with sessions_per_key = 2: (key, resume token) -> what the session gets."""
    server, clock, _ = make_server(tmp_path, **{"srv_vpn.sessions_per_key": "2"})
    rows = [
        ("tls:aa", b"1" * 16, "granted"),
        ("tls:aa", b"2" * 16, "granted"),
        ("tls:aa", b"3" * 16, "TOO_MANY_SESSIONS"),  # a third device of the key
        ("tls:aa", b"1" * 16, "granted"),  # the first one reconnecting: it replaces itself
        ("tls:bb", b"4" * 16, "granted"),  # another key counts apart
    ]
    for key, token, expected in rows:
        assert outcome(keyed(server, clock, key, token)) == expected, (key, token)
    assert server.refusals.counts == {"sessions_per_key": 1}


def test_a_refused_session_is_closed_with_the_reason(tmp_path: Path) -> None:
    server, clock, _ = make_server(tmp_path, **{"srv_vpn.sessions_per_key": "1"})
    keyed(server, clock, "tls:aa", b"1" * 16)
    second = keyed(server, clock, "tls:aa", b"2" * 16)
    assert Error.decode(second.r[-1][1]).code == ErrorCode.TOO_MANY_SESSIONS == 0x700
    clock.advance(1)
    second.pump()
    assert "TOO_MANY_SESSIONS: client key tls:aa holds 1 session(s) already" in str(second.events)


def test_an_ended_session_frees_its_place(tmp_path: Path) -> None:
    server, clock, _ = make_server(tmp_path, **{"srv_vpn.sessions_per_key": "1"})
    first = keyed(server, clock, "tls:aa", b"1" * 16)
    first.lose()
    assert outcome(keyed(server, clock, "tls:aa", b"2" * 16)) == "granted"


def test_unlimited_and_anonymous_sessions_are_not_counted(tmp_path: Path) -> None:
    server, clock, _ = make_server(tmp_path)
    for i in range(3):
        assert outcome(keyed(server, clock, "tls:aa", bytes([i]) * 16)) == "granted"
    limited, clock2, _ = make_server(tmp_path / "l", **{"srv_vpn.sessions_per_key": "1"})
    for i in range(3):
        client = Client(limited, clock2, token=bytes([i]) * 16)  # no certificate: no key
        client.request()
        assert outcome(client) == "granted"
