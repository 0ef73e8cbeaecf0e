"""The ledger's checks that need no store: every backend refuses the same things, the same way.

A ledger reads the rows (a deposit, the receipts' figures) inside its own transaction and hands
them here; what is refused, with which :class:`ErrorCode` and message, is decided once for
SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

from cellvpn.billing.interfaces import DepositRow, LedgerError, RedeemRequest
from cellvpn.billing.keys import signed_by
from cellvpn.billing.records import (
    VPN_UNITS,
    SignedClose,
    SignedDeposit,
    SignedOrder,
    receipt_units_value_ok,
)
from cellvpn.wire.receipt import RECEIPT_VERSION
from cellvpn.wire.service import SRV_UID_VPN, ErrorCode

#: the deposit of limits saved before they were kept per deposit (schema 2 and older)
ANY_DEPOSIT = b""


def hash32(name: str, value: bytes) -> bytes:
    if not isinstance(value, bytes | bytearray) or len(value) != 32:
        raise ValueError(f"{name} must be 32 bytes")
    return bytes(value)


class Prepared:
    """A redemption's work that needs no lock: encoding, hashing, the signature checks.

    Done before the write lock is taken, so other writers wait less; which keys must have
    signed is checked against the deposit inside the transaction.
    """

    __slots__ = ("encoded", "hash", "request", "signed_ok")

    def __init__(self, request: RedeemRequest) -> None:
        self.request = request
        receipt = request.receipt
        info_bytes = receipt.info.encode()
        signs = receipt.signatures
        self.signed_ok = len(signs) == 2 and all(
            signed_by(s, s.public_key, info_bytes) for s in signs
        )
        self.encoded = receipt.encode()
        self.hash = hashlib.sha3_256(self.encoded).digest()


def check_order(signed_order: SignedOrder) -> None:
    """Refuse an order the VPN service cannot sell."""
    order = signed_order.order
    if order.srv_uid != SRV_UID_VPN:
        raise LedgerError(ErrorCode.TX_COND_WRONG_SRV_UID, f"order srv_uid is {order.srv_uid}")
    if order.unit not in VPN_UNITS:
        raise LedgerError(ErrorCode.UNIT_TYPE_ERROR, f"order unit 0x{order.unit:x} is not SEC or B")
    if order.units == 0:
        raise LedgerError(ErrorCode.PRICE_ERROR, "an order must sell at least one unit")
    if not signed_order.verify():
        raise LedgerError(ErrorCode.RECEIPT_NO_SIGN, "the order's signature is not its provider's")


def check_deposit_request(signed_deposit: SignedDeposit, now: float) -> None:
    """Refuse a deposit request on its own (before its owner's balance is looked at)."""
    d = signed_deposit.deposit
    if d.srv_uid != SRV_UID_VPN:
        raise LedgerError(ErrorCode.TX_COND_WRONG_SRV_UID, f"deposit srv_uid is {d.srv_uid}")
    if d.unit not in VPN_UNITS:
        raise LedgerError(ErrorCode.UNIT_TYPE_ERROR, f"deposit unit 0x{d.unit:x} is not SEC or B")
    if not signed_deposit.verify():
        raise LedgerError(ErrorCode.RECEIPT_NO_SIGN, "the deposit's signature is not its owner's")
    if d.expires <= now:
        raise LedgerError(ErrorCode.TX_CREATION_ERROR, "the deposit's expiry is in the past")
    if d.value <= 0:
        raise LedgerError(ErrorCode.TX_CREATION_ERROR, "a deposit must lock a positive value")
    if d.max_unit_price <= 0:
        raise LedgerError(ErrorCode.PRICE_ERROR, "a deposit needs a positive maximum unit price")


def check_funds(owner: bytes, balance: int | None, value: int) -> None:
    """Refuse a deposit its owner's account cannot pay."""
    if balance is None:
        raise LedgerError(ErrorCode.TX_COND_NOT_ENOUGH, f"account {owner.hex()} was never credited")
    if balance < value:
        raise LedgerError(
            ErrorCode.TX_COND_NOT_ENOUGH,
            f"account {owner.hex()} holds {balance}, the deposit needs {value}",
        )


def check_close(signed_close: SignedClose, dep: DepositRow | None, now: float) -> DepositRow:
    """Refuse a close of a deposit that is unknown, closed, not the signer's or in use."""
    c = signed_close.close
    if dep is None:
        raise LedgerError(ErrorCode.TX_COND_NOT_FOUND, f"no deposit {c.deposit.hex()}")
    if c.owner != dep.owner_public:
        raise LedgerError(
            ErrorCode.RECEIPT_WRONG_PKEY_HASH, "only the deposit's owner can close it"
        )
    if not signed_close.verify():
        raise LedgerError(ErrorCode.RECEIPT_NO_SIGN, "the close is not signed by the owner")
    if dep.closed:
        raise LedgerError(ErrorCode.TX_COND_NOT_FOUND, f"deposit {dep.id.hex()} is closed")
    if dep.active_usage is not None and not dep.expired(now) and not dep.stale(now):
        raise LedgerError(
            ErrorCode.CANT_ADD_USAGE,
            f"deposit {dep.id.hex()} is in use ({dep.active_usage}) until "
            f"{dep.active_until:.0f}; close it when the session has ended, when its "
            "server has not renewed the mark by then, or after the deposit expires",
        )
    return dep


def check_redemption(
    request: Prepared, dep: DepositRow | None, redeemed_already: Callable[[bytes], bool]
) -> DepositRow:
    """Every check of a receipt against the deposit it spends, in the documented order.

    ``redeemed_already(hash)`` asks the store, only on the refusal path, so the message can
    say whether a wrong ``prev`` is a replay or a fork.
    """
    receipt, deposit_id, provider_public, now = request.request
    info = receipt.info
    signs = receipt.signatures
    if dep is None:
        raise LedgerError(ErrorCode.TX_COND_NOT_FOUND, f"no deposit {deposit_id.hex()}")
    if dep.closed:
        raise LedgerError(ErrorCode.TX_COND_NOT_FOUND, f"deposit {dep.id.hex()} is closed")
    if dep.expired(now):
        raise LedgerError(ErrorCode.TX_COND_NOT_FOUND, f"deposit {dep.id.hex()} has expired")
    if info.srv_uid != dep.srv_uid:
        raise LedgerError(
            ErrorCode.TX_COND_WRONG_SRV_UID,
            f"receipt srv_uid {info.srv_uid}, deposit srv_uid {dep.srv_uid}",
        )
    if info.version != RECEIPT_VERSION:
        raise LedgerError(ErrorCode.RECEIPT_WRONG_VERSION, f"receipt version {info.version}, not 2")
    if len(signs) < 2:
        raise LedgerError(
            ErrorCode.RECEIPT_NO_SIGN, "the receipt needs the provider's and the client's"
        )
    if signs[0].public_key != provider_public:
        raise LedgerError(ErrorCode.RECEIPT_WRONG_PKEY_HASH, "signature 0 is not the provider's")
    if signs[1].public_key != dep.owner_public:
        raise LedgerError(
            ErrorCode.RECEIPT_WRONG_PKEY_HASH, "signature 1 is not the deposit owner's"
        )
    unsigned = receipt.unsigned_bytes()
    if unsigned is not None:
        raise LedgerError(ErrorCode.WRONG_HASH, unsigned)
    if not request.signed_ok:
        raise LedgerError(
            ErrorCode.RECEIPT_NO_SIGN, "a signature does not verify (or there are more)"
        )
    if info.units_type != dep.unit:
        raise LedgerError(
            ErrorCode.UNIT_TYPE_ERROR,
            f"receipt unit 0x{info.units_type:x}, deposit unit 0x{dep.unit:x}",
        )
    if info.units == 0 or not receipt_units_value_ok(info.value, info.units, dep.max_unit_price):
        raise LedgerError(
            ErrorCode.RECEIPT_UNITS_ERROR,
            f"{info.value} for {info.units} units is over the deposit's maximum unit "
            f"price {dep.max_unit_price}",
        )
    if info.prev_hash != dep.state_hash:
        # A receipt whose prev is the current state cannot be stored yet (its hash would
        # be the state), so the store is only asked on this path, to say which it is.
        if redeemed_already(request.hash):
            raise LedgerError(ErrorCode.WRONG_HASH, "this receipt was redeemed already")
        raise LedgerError(
            ErrorCode.WRONG_HASH,
            "the receipt's prev hash is not the deposit's state (replayed or forked)",
        )
    if info.value > dep.locked:
        raise LedgerError(
            ErrorCode.TX_COND_NOT_ENOUGH,
            f"the receipt asks {info.value}, the deposit holds {dep.locked}",
        )
    return dep


def invariant(
    minted: int,
    balances: list[int],
    deposits: list[DepositRow],
    receipts: Iterable[tuple[bytes, int, int, bytes]],
) -> tuple[bool, dict[str, Any]]:
    """The invariant over one snapshot's rows; ``receipts`` are (deposit, seq, value, hash).

    Both backends report the same figures and problems for the same ledger.
    """
    problems: list[str] = []
    paid: dict[bytes, int] = {}
    count: dict[bytes, int] = {}
    last: dict[bytes, tuple[int, bytes]] = {}
    for dep_id, seq, value, receipt_hash in receipts:
        paid[dep_id] = paid.get(dep_id, 0) + int(value)
        count[dep_id] = count.get(dep_id, 0) + 1
        if seq > last.get(dep_id, (0, b""))[0]:
            last[dep_id] = (seq, receipt_hash)
    locked = sum(d.locked for d in deposits)
    balance_sum = sum(balances)
    problems += [f"a balance is negative: {b}" for b in balances if b < 0]
    for d in deposits:
        name = d.id.hex()
        spent = paid.get(d.id, 0)
        if d.locked < 0:
            problems.append(f"deposit {name} holds a negative value")
        if d.initial != d.locked + spent + d.returned:
            problems.append(
                f"deposit {name}: initial {d.initial} != locked {d.locked} + paid {spent} "
                f"+ returned {d.returned}"
            )
        if d.closed and d.locked != 0:
            problems.append(f"deposit {name} is closed but holds {d.locked}")
        if d.state_hash != last.get(d.id, (0, d.id))[1]:
            problems.append(f"deposit {name}: state hash is not its last receipt's")
        if not d.receipts == count.get(d.id, 0) == last.get(d.id, (0, b""))[0]:
            problems.append(f"deposit {name}: its receipts are not numbered 1 to {d.receipts}")
    if balance_sum + locked != minted:
        problems.append(f"balances {balance_sum} + locked {locked} != minted {minted}")
    figures: dict[str, Any] = {
        "minted": minted,
        "balances": balance_sum,
        "locked": locked,
        "redeemed": sum(paid.values()),
        "returned": sum(d.returned for d in deposits),
        "accounts": len(balances),
        "deposits": len(deposits),
        "problems": problems,
    }
    return not problems, figures
