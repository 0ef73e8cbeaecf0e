"""Keys, receipts and ledgers for the billing tests (plain functions: workers import them too)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from cellvpn.billing.keys import KeyPair
from cellvpn.billing.records import DepositClose, DepositRequest, SignedClose, SignedDeposit
from cellvpn.billing.sqlite import SqliteLedger

if TYPE_CHECKING:
    from cellvpn.billing.postgres import PostgresLedger

    #: a ledger of either backend, as the parametrised tests get it
    AnyLedger = SqliteLedger | PostgresLedger
from cellvpn.wire.receipt import Receipt, ReceiptInfo, Unit

NOW = 1_800_000_000.0
DAY = 86400


def key(name: str) -> KeyPair:
    """A reproducible key pair per name."""
    return KeyPair.from_seed(hashlib.sha3_256(name.encode()).digest())


def nonce(n: int) -> bytes:
    return n.to_bytes(16, "big")


def deposit(
    owner: KeyPair,
    value: int = 1000,
    max_unit_price: int = 2,
    unit: int = Unit.SEC,
    expires: int = int(NOW) + DAY,
    n: int = 0,
    srv_uid: int = 1,
) -> SignedDeposit:
    request = DepositRequest(owner.public, unit, max_unit_price, value, expires, nonce(n), srv_uid)
    return SignedDeposit.sign(request, owner)


def close(owner: KeyPair, deposit_id: bytes, n: int = 0) -> SignedClose:
    return SignedClose.sign(DepositClose(deposit_id, owner.public, nonce(n)), owner)


def receipt(
    provider: KeyPair,
    client: KeyPair,
    prev: bytes,
    value: int = 60,
    units: int = 60,
    unit: int = Unit.SEC,
    srv_uid: int = 1,
    version: int = 2,
    addition: int = 0,
) -> Receipt:
    """A receipt signed by the provider, then the client, over its receipt_info."""
    info = ReceiptInfo(srv_uid, unit, units, value, prev, addition, version)
    data = info.encode()
    return (
        Receipt(info)
        .with_signature(provider.signature(data))
        .with_signature(client.signature(data))
    )


def chain(
    provider: KeyPair, client: KeyPair, deposit_id: bytes, count: int, value: int = 60
) -> list[Receipt]:
    """``count`` receipts, each on the previous one's hash: one deposit's whole history."""
    out: list[Receipt] = []
    prev = deposit_id
    for n in range(count):
        r = receipt(provider, client, prev, value=value, addition=n)
        out.append(r)
        prev = r.hash
    return out


def new_ledger(path: Path) -> SqliteLedger:
    return SqliteLedger(path / "ledger.db")
