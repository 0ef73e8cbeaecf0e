"""Offers: version 2 orders with TLV extensions, the ORDERS packet, and a server's board that
publishes, renews and withdraws its offer in a real ledger (a task.Clock drives its timer)."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from cellvpn.billing.interfaces import OfferRow
from cellvpn.billing.offers import make_offer, read_offer
from cellvpn.billing.records import ORDER_SIZE, Order, SignedOrder
from cellvpn.billing.sqlite import SqliteLedger
from cellvpn.server.offers import OfferBoard, OfferFacts
from cellvpn.wire.errors import DecodeError
from cellvpn.wire.receipt import Unit
from cellvpn.wire.service import MAX_ORDERS, MAX_ORDERS_BYTES, OrderList

from .helpers import key

PROVIDER = key("provider")
OTHER = key("other")
BASE = Order(Unit.SEC, 60, 120, "CELL", PROVIDER.public, 2_000_000_000)
SPKI = "5a" * 32


def test_an_order_without_extensions_keeps_its_version_1_bytes() -> None:
    assert len(BASE.encode()) == ORDER_SIZE and BASE.encode()[1] == 1
    assert Order.decode(BASE.encode()) == BASE


def test_extensions_make_a_version_2_order_that_round_trips() -> None:
    order = Order(Unit.B, 1, 2, "KEL", PROVIDER.public, 5, extensions=((1, b"a:1"), (200, b"")))
    raw = order.encode()
    assert (
        raw[1] == 2 and raw[ORDER_SIZE:] == bytes.fromhex("0900") + b"\x01\x03\x00a:1\xc8\x00\x00"
    )
    assert Order.decode(raw) == order and order.extension(200) == b"" and order.extension(7) is None
    signed = SignedOrder.sign(order, PROVIDER)
    assert SignedOrder.decode(signed.encode()) == signed and signed.verify()


@pytest.mark.parametrize(
    ("tail", "said"),
    [
        (b"", "format version is 2"),
        (b"\x00", "no length"),
        (b"\x00\x00", "1 to 1024"),
        (b"\x05\x00\x01\x09\x00ab", "says 9 bytes"),
        (b"\x02\x00\x01\x00", "cut short"),
        (b"\x04\x00\x01\x00\x00", "say 4 bytes, 3 follow"),
    ],
)
def test_malformed_extensions_are_refused(tail: bytes, said: str) -> None:
    head = bytearray(BASE.encode())
    head[1] = 2
    with pytest.raises(DecodeError, match=said):
        Order.decode(bytes(head) + tail)


def _offer(endpoint: str = "192.0.2.1:8089", expires: int = 1000) -> SignedOrder:
    return make_offer(
        PROVIDER, BASE, endpoint=endpoint, spki=SPKI, region="eu-1", capacity=253, sessions=4,
        instance="0123456789abcdef", expires=expires,
    )  # fmt: skip


def test_an_offer_says_where_its_server_is() -> None:
    offer = read_offer(_offer(), PROVIDER.public)
    assert (offer.endpoint, offer.spki, offer.region, offer.capacity, offer.sessions) == (
        "192.0.2.1:8089", SPKI, "eu-1", 253, 4,
    )  # fmt: skip
    assert offer.instance == "0123456789abcdef" and offer.unit_price == 2.0
    assert offer.available(999) and not offer.available(1000)
    with pytest.raises(DecodeError, match="another provider's"):
        read_offer(_offer(), OTHER.public)
    forged = SignedOrder(_offer().order, bytes(64))
    with pytest.raises(DecodeError, match="signature"):
        read_offer(forged, PROVIDER.public)
    with pytest.raises(DecodeError, match="no endpoint"):
        read_offer(SignedOrder.sign(BASE, PROVIDER), PROVIDER.public)


def test_the_orders_packet_is_bounded() -> None:
    orders = [_offer().encode(), b"x"]
    assert OrderList.decode(OrderList(tuple(orders)).encode()).orders == tuple(orders)
    assert OrderList.decode(b"\x00\x00").orders == ()
    many = [b"y" * 1000] * 40
    fitted = OrderList.fitting(many)
    assert len(fitted.encode()) <= MAX_ORDERS_BYTES and len(fitted.orders) == 32
    assert len(OrderList.fitting([b"z"] * 100).orders) == MAX_ORDERS
    for raw, said in [
        (b"", "no count"),
        (b"\x41\x00", "at most 64"),
        (b"\x01\x00\x05\x00ab", "says 5 bytes"),
        (b"\x00\x00extra", "after its orders"),
        (b"\x00" * (MAX_ORDERS_BYTES + 1), "at most"),
    ]:
        with pytest.raises(DecodeError, match=said):
            OrderList.decode(raw)


class SyncLedger:
    def __init__(self, ledger: SqliteLedger) -> None:
        self.ledger = ledger

    def publish_offer(
        self, provider: bytes, instance: str, signed: bytes, now: float
    ) -> Deferred[None]:
        return succeed(self.ledger.publish_offer(provider, instance, signed, now))

    def withdraw_offer(self, provider: bytes, instance: str) -> Deferred[bool]:
        return succeed(self.ledger.withdraw_offer(provider, instance))

    def offers(self, provider: bytes | None = None) -> Deferred[list[OfferRow]]:
        return succeed(self.ledger.offers(provider))


def _board(ledger: SyncLedger, clock: Clock, instance: str, port: int) -> OfferBoard:
    def facts() -> OfferFacts:
        return OfferFacts(f"192.0.2.1:{port}", SPKI, "", 253, 0)

    return OfferBoard(ledger, PROVIDER, instance, clock, 10.0, lambda: BASE, facts)


def test_a_board_renews_its_offer_and_a_silent_one_turns_stale(tmp_path: Path) -> None:
    ledger = SyncLedger(SqliteLedger(tmp_path / "ledger.db"))
    clock = Clock()
    clock.advance(1_000_000)
    one, two = _board(ledger, clock, "one", 1), _board(ledger, clock, "two", 2)
    one.start()
    two.start()
    endpoints = sorted(
        read_offer(SignedOrder.decode(o), PROVIDER.public).endpoint
        for o in two.available(clock.seconds())
    )
    assert endpoints == ["192.0.2.1:1", "192.0.2.1:2"]
    assert len(one.available(clock.seconds())) == 1, "it read before two published"
    clock.advance(10)
    assert len(one.available(clock.seconds())) == 2
    # two is killed: its timer stops, nothing withdraws its offer
    assert two._loop is not None
    two._loop.stop()
    for _ in range(3):
        clock.advance(10)
    [left] = one.available(clock.seconds())
    assert read_offer(SignedOrder.decode(left), PROVIDER.public).endpoint == "192.0.2.1:1"
    assert len(ledger.ledger.offers()) == 2, "a stale offer stays in the ledger, Not available"
    # a clean stop withdraws it
    Deferred.fromCoroutine(one.withdraw())
    assert [r.instance for r in ledger.ledger.offers()] == ["two"]
    ledger.ledger.close()
