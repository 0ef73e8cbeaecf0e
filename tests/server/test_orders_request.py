"""ORDERS_REQUEST on 'R': the provider's offers, only to authenticated clients, from memory,
a bounded number of times per session."""

from __future__ import annotations

from pathlib import Path

from cellvpn.stream.connection import Closed
from cellvpn.wire.channel import CHANNEL_R
from cellvpn.wire.service import OrderList, PacketType
from cellvpn.wire.setup import CloseCode

from .test_session import Client, make_server


class Board:
    """The server's offers as the board holds them (what a renewal last read)."""

    def __init__(self, orders: list[bytes]) -> None:
        self.orders = orders
        self.asked: list[float] = []

    def available(self, now: float) -> list[bytes]:
        self.asked.append(now)
        return self.orders


def _ask(c: Client, body: bytes = b"") -> None:
    c.conn.send_channel(CHANNEL_R, PacketType.ORDERS_REQUEST, body)
    c.pump()


def _closed(c: Client) -> Closed | None:
    return next((e for e in c.events if isinstance(e, Closed)), None)


def test_an_anonymous_client_gets_no_orders_before_its_request(tmp_path: Path) -> None:
    server, clock, _ = make_server(tmp_path, **{"tls.clients": "any"})
    server.offers = Board([b"order"])  # type: ignore[assignment]
    c = Client(server, clock)
    _ask(c)
    closed = _closed(c)
    assert closed is not None and closed.code == CloseCode.REFUSED
    assert "authenticated" in closed.reason and c.r == []


def test_a_served_client_gets_the_offers_a_few_times(tmp_path: Path) -> None:
    server, clock, _ = make_server(tmp_path, **{"tls.clients": "any"})
    board = Board([b"first", b"second"])
    server.offers = board  # type: ignore[assignment]
    c = Client(server, clock)
    c.request()
    assert c.r[0][0] == PacketType.SUCCESS
    _ask(c)
    ptype, body = c.r[1]
    assert ptype == PacketType.ORDERS and OrderList.decode(body).orders == (b"first", b"second")
    for _ in range(15):
        _ask(c)
    assert len(c.r) == 17 and _closed(c) is None
    _ask(c)
    closed = _closed(c)
    assert closed is not None and "too many ORDERS" in closed.reason


def test_an_enrolled_client_asks_at_once_and_a_server_without_offers_has_none(
    tmp_path: Path,
) -> None:
    server, clock, _ = make_server(tmp_path)  # clients = enrolled: TLS checked the certificate
    c = Client(server, clock)
    _ask(c)
    assert c.r == [(PacketType.ORDERS, OrderList().encode())]


def test_an_orders_request_with_a_body_is_malformed(tmp_path: Path) -> None:
    server, clock, _ = make_server(tmp_path)
    c = Client(server, clock)
    _ask(c, b"x")
    closed = _closed(c)
    assert closed is not None and closed.code == CloseCode.PROTOCOL_ERROR
