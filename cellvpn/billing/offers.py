"""A server's offer: its order with where to reach it, signed by the provider (sans-IO).

An offer is a version 2 :class:`~cellvpn.billing.records.Order` whose extensions say which
server sells it. The provider's key signs it, so a client that learned it from one server of
the fleet can trust what it says of another. Extension types::

    1  endpoint   host:port, ASCII (as ``[client] server`` writes it; at most 255 bytes)
    2  spki       32 bytes: SHA-256 of the server's TLS public key (``[client] server_key``)
    3  region     ASCII, at most 32 bytes (``[server] region``), may be empty
    4  capacity   u32: sessions the server takes (its address pool, or ``[server] capacity``)
    5  sessions   u32: live sessions when the offer was renewed
    6  instance   ASCII: the server instance's name (its offers and marks carry it)

An offer's ``expires`` is when it stops being available unless renewed: a server renews it every
``[server] offer_interval`` seconds and an offer is stale (Not available) once
``OFFER_STALE_INTERVALS`` intervals pass without a renewal (see docs/fleet.md).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cellvpn.billing.keys import KeyPair
from cellvpn.billing.records import Order, SignedOrder
from cellvpn.wire.errors import DecodeError

EXT_ENDPOINT = 1
EXT_SPKI = 2
EXT_REGION = 3
EXT_CAPACITY = 4
EXT_SESSIONS = 5
EXT_INSTANCE = 6
#: renewals an offer may miss before it is stale
OFFER_STALE_INTERVALS = 3
MAX_REGION = 32
_U32 = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class Offer:
    """What a client needs of one server's offer, read from the signed order."""

    signed: SignedOrder
    endpoint: str
    spki: str
    region: str
    capacity: int
    sessions: int
    instance: str

    @property
    def order(self) -> Order:
        return self.signed.order

    @property
    def unit_price(self) -> float:
        """Datoshi per unit, for comparing offers (the ledger's checks stay in integers)."""
        return self.order.price / self.order.units

    def available(self, now: float) -> bool:
        return now < self.order.expires


def make_offer(
    key: KeyPair,
    base: Order,
    *,
    endpoint: str,
    spki: str,
    region: str,
    capacity: int,
    sessions: int,
    instance: str,
    expires: int,
) -> SignedOrder:
    """The server's order with its extensions, valid until ``expires``, signed by ``key``."""
    if not endpoint or len(endpoint) > 255 or not endpoint.isascii():
        raise ValueError(f"offer endpoint {endpoint!r} is not 1-255 ASCII characters")
    if len(region) > MAX_REGION or not region.isascii():
        raise ValueError(f"region {region!r} is not at most {MAX_REGION} ASCII characters")
    extensions = (
        (EXT_ENDPOINT, endpoint.encode("ascii")),
        (EXT_SPKI, bytes.fromhex(spki)),
        (EXT_REGION, region.encode("ascii")),
        (EXT_CAPACITY, _U32.pack(min(capacity, 0xFFFFFFFF))),
        (EXT_SESSIONS, _U32.pack(min(sessions, 0xFFFFFFFF))),
        (EXT_INSTANCE, instance.encode("ascii")),
    )
    order = Order(
        base.unit,
        base.units,
        base.price,
        base.token,
        base.provider,
        expires,
        base.node_addr,
        base.srv_uid,
        extensions,
    )
    return SignedOrder.sign(order, key)


def _text(order: Order, kind: int, what: str, limit: int) -> str:
    raw = order.extension(kind)
    if raw is None:
        return ""
    if len(raw) > limit or not raw.isascii():
        raise DecodeError(f"offer {what} is not at most {limit} ASCII bytes")
    return raw.decode("ascii")


def _u32(order: Order, kind: int, what: str) -> int:
    raw = order.extension(kind)
    if raw is None:
        return 0
    if len(raw) != _U32.size:
        raise DecodeError(f"offer {what} must be 4 bytes, got {len(raw)}")
    value: int = _U32.unpack(raw)[0]
    return value


def read_offer(signed: SignedOrder, provider: bytes) -> Offer:
    """The offer in a signed order of ``provider``; :class:`DecodeError` saying what is wrong
    (another provider's, a bad signature, no endpoint, a malformed extension)."""
    order = signed.order
    if order.provider != provider:
        raise DecodeError("the offer is another provider's")
    if not signed.verify():
        raise DecodeError("the offer's signature is not its provider's")
    endpoint = _text(order, EXT_ENDPOINT, "endpoint", 255)
    if not endpoint:
        raise DecodeError("the offer names no endpoint")
    spki = order.extension(EXT_SPKI)
    if spki is None or len(spki) != 32:
        raise DecodeError("the offer's server key is not 32 bytes")
    return Offer(
        signed,
        endpoint,
        spki.hex(),
        _text(order, EXT_REGION, "region", MAX_REGION),
        _u32(order, EXT_CAPACITY, "capacity"),
        _u32(order, EXT_SESSIONS, "sessions"),
        _text(order, EXT_INSTANCE, "instance", 64),
    )
