"""Free service's usage booked in a real SQLite ledger as totals, one write per session end."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from cellvpn.cli.ledger import cmd_report
from cellvpn.server.freeusage import FreeUsage
from cellvpn.wire.service import PacketType
from tests.server.test_billing import PROVIDER, Ledger
from tests.server.test_session import Client, ipv4, make_server

PAYLOAD = b"x" * 1372  # 1,392-byte IP packets


def free_server(tmp_path: Path, **overrides: str) -> tuple[object, object, Ledger]:
    server, clock, _written = make_server(tmp_path, **overrides)
    ledger = Ledger(tmp_path / "ledger.db")
    server.free_usage = FreeUsage(ledger, PROVIDER.account, clock)  # type: ignore[arg-type]
    return server, clock, ledger


def test_a_free_session_is_booked_as_free_when_it_ends(tmp_path: Path) -> None:
    """Seven seconds and ten packets of free service: one booking at the end, as "free"; a
    second session of the same client adds to the same total, and the report shows it."""
    server, clock, ledger = free_server(tmp_path)
    token = bytes(range(16))
    c = Client(server, clock, token=token)  # type: ignore[arg-type]
    c.request()
    assert c.r[0][0] == PacketType.SUCCESS
    c.addr_request()
    address = "198.18.9.2"
    for _ in range(10):
        c.send_ip(ipv4(address, "198.19.0.10", PAYLOAD))
    carried = c.session.carried()
    assert carried == 13_920
    clock.advance(7)  # type: ignore[attr-defined]
    assert ledger.calls.get("add_usage", 0) == 0  # nothing per packet, nothing before the end
    c.lose()
    assert ledger.calls["add_usage"] == 1
    [row] = ledger.ledger.report()
    client = hashlib.sha3_256(f"token:{token.hex()}".encode()).digest()
    assert (row.provider, row.client) == (PROVIDER.account, client)
    assert (row.free.seconds, row.free.bytes, row.free.value) == (7.0, 13_920, 0)
    assert row.paid.bytes == row.grace.bytes == 0

    again = Client(server, clock, token=token)  # type: ignore[arg-type]
    again.request()
    clock.advance(3)  # type: ignore[attr-defined]
    again.lose()
    [row] = ledger.ledger.report()
    assert (row.free.seconds, row.free.bytes) == (10.0, 13_920)

    text = cmd_report(ledger.ledger, argparse.Namespace(provider=None)).text
    assert f"client {client.hex()} (provider {PROVIDER.account_hex})" in text
    assert "  free...............10 s, 13920 bytes, 0 datoshi" in text
    assert "  paid...............0 s, 0 bytes, 0 datoshi" in text


def test_a_refused_session_books_nothing(tmp_path: Path) -> None:
    server, clock, ledger = free_server(tmp_path, **{"srv_vpn.allow_free_srv": "false"})
    c = Client(server, clock)  # type: ignore[arg-type]
    c.request()
    assert c.r[0][0] == PacketType.ERROR
    c.lose()
    assert ledger.calls.get("add_usage", 0) == 0 and ledger.ledger.report() == []


def test_sessions_live_at_the_servers_stop_are_booked_once(tmp_path: Path) -> None:
    server, clock, ledger = free_server(tmp_path)
    c = Client(server, clock)  # type: ignore[arg-type]
    c.request()
    clock.advance(4)  # type: ignore[attr-defined]
    done = server.free_usage.stop(list(server.sessions))  # type: ignore[attr-defined]
    assert done.called
    c.lose()  # the stream's end after the stop: booked already
    assert ledger.calls["add_usage"] == 1
    [row] = ledger.ledger.report()
    assert row.free.seconds == 4.0
