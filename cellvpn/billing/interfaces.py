"""The ledger's interface, the rows it returns and the one error it refuses with.

Every method is synchronous and may block (disk, locks): the reactor thread calls a ledger only
through :class:`cellvpn.billing.asyncledger.AsyncLedger`. Accounts, deposits and receipts are
identified by 32-byte hashes; money is an ``int`` of datoshi of any size.

The ledger's promise is the invariant ``sum(balances) + sum(locked) == total minted``: a
refused call changes nothing, an accepted one moves value between accounts and deposits without
creating or losing any.
"""

# zope.interface methods are declared without ``self``.
# ruff: noqa: N805

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from zope.interface import Interface

from cellvpn.billing.records import SignedClose, SignedDeposit, SignedOrder
from cellvpn.wire.receipt import Receipt
from cellvpn.wire.service import ErrorCode

UsageKind = Literal["paid", "grace", "free"]
USAGE_KINDS: tuple[UsageKind, ...] = ("paid", "grace", "free")


class LedgerError(Exception):
    """A refusal with the original's error code; the ledger is unchanged."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def summary(self) -> str:
        """One line for a user: the code's name, its hex value and why."""
        return f"{self.code.name} (0x{int(self.code):x}): {self.message}"


class LedgerUnavailableError(Exception):
    """The ledger could not be read or written (locked too long, I/O); nothing was changed."""


class LedgerBusyError(LedgerUnavailableError):
    """Too many calls are waiting for the ledger already; this one was not queued."""


@dataclass(frozen=True, slots=True)
class DepositRow:
    """A deposit as the ledger holds it; ``state_hash`` is the ``prev`` its next receipt needs."""

    id: bytes
    owner: bytes
    owner_public: bytes
    srv_uid: int
    unit: int
    max_unit_price: int
    locked: int
    initial: int
    expires: int
    state_hash: bytes
    closed: bool
    active_usage: str | None
    created: float = 0.0
    returned: int = 0
    receipts: int = 0
    #: when the in-use mark's lease ends (its server renews it while the session lives)
    active_until: float | None = None

    def expired(self, now: float) -> bool:
        return now >= self.expires

    def stale(self, now: float) -> bool:
        """A mark whose server stopped renewing it (killed, gone): it holds nothing."""
        return self.active_usage is not None and (
            self.active_until is None or self.active_until < now
        )


class RedeemRequest(NamedTuple):
    """One :meth:`ILedger.redeem` call's arguments, for :meth:`ILedger.redeem_many`."""

    receipt: Receipt
    deposit_id: bytes
    provider_public: bytes
    now: float


@dataclass(frozen=True, slots=True)
class RedeemResult:
    receipt_hash: bytes
    value: int
    locked_left: int
    provider_balance: int


@dataclass(frozen=True, slots=True)
class ReceiptRow:
    """A redeemed receipt; ``seq`` is its place in its deposit's chain, from 1."""

    hash: bytes
    deposit_id: bytes
    seq: int
    provider: bytes
    client: bytes
    unit: int
    units: int
    value: int
    prev_hash: bytes
    redeemed_at: float
    encoded: bytes


@dataclass(frozen=True, slots=True)
class Limits:
    """What a client had left with a provider when its session was last saved."""

    provider: bytes
    client: bytes
    bytes_left: int
    seconds_left: float
    saved_at: float


@dataclass(frozen=True, slots=True)
class UsageTotals:
    seconds: float = 0.0
    bytes: int = 0
    value: int = 0


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One client's usage of one provider, by kind (the original's ``net_srv report``)."""

    provider: bytes
    client: bytes
    paid: UsageTotals
    grace: UsageTotals
    free: UsageTotals


@dataclass(frozen=True, slots=True)
class EnrolledRow:
    """One client certificate a fleet's CA signed, as the shared ledger keeps it.

    ``fleet`` names the CA (the SHA-256 of its public key, hex), so one database can hold the
    clients of several fleets; ``serial`` is the certificate's serial number (lowercase hex).
    """

    fleet: str
    name: str
    serial: str
    fingerprint: str
    not_after: float
    enrolled_at: float
    revoked_at: float | None = None


@dataclass(frozen=True, slots=True)
class OfferRow:
    """A server's published order (signed, with its endpoint) and when it was last renewed."""

    provider: bytes
    instance: str
    signed: bytes
    renewed: float


class ILedger(Interface):
    """Accounts, orders, deposits and receipts, and the atomic redemption between them."""

    def mint(account: bytes, value: int, public: bytes | None = None) -> int:
        """Credit ``account`` with new money (a local ledger's operator); the new balance."""

    def balance(account: bytes) -> int:
        """The account's balance; 0 for an account never credited."""

    def put_order(signed_order: SignedOrder) -> bytes:
        """Store a provider-signed order (again is harmless); its hash."""

    def orders(provider: bytes | None = None) -> list[SignedOrder]:
        """Stored orders, of one provider account or all."""

    def get_order(order_hash: bytes) -> SignedOrder | None:
        """The order with this hash, if stored."""

    def create_deposit(signed_deposit: SignedDeposit, now: float) -> DepositRow:
        """Lock the deposit's value from its owner's account; refuses with LedgerError."""

    def get_deposit(deposit_id: bytes) -> DepositRow | None:
        """The deposit with this id, if any."""

    def deposits(owner: bytes | None = None) -> list[DepositRow]:
        """Deposits, oldest first, of one owner account or all (an owner who lost an id)."""

    def close_deposit(signed_close: SignedClose, now: float) -> int:
        """End a deposit with no active usage; return its unspent value to the owner."""

    def set_active_usage(
        deposit_id: bytes,
        marker: str | None,
        only_if: str | None = None,
        until: float | None = None,
        now: float | None = None,
    ) -> bool:
        """Mark (or, with ``None``, unmark) the deposit as in use; whether it now is ``marker``.

        A mark is a lease until ``until``. Setting fails while another marker holds a live
        lease; a stale one (its lease ended before ``now``) is taken over when ``only_if``
        names it. Clearing with ``only_if`` clears only that marker. An unknown or closed
        deposit cannot be marked.
        """

    def renew_marks(marker_prefix: str, until: float) -> int:
        """Extend the leases of the marks one server holds (those starting with the prefix)."""

    def clear_active_usages(marker_prefix: str) -> int:
        """Unmark every deposit whose marker starts with ``marker_prefix``; how many."""

    def redeem(
        receipt: Receipt, deposit_id: bytes, provider_public: bytes, now: float
    ) -> RedeemResult:
        """Pay ``provider_public`` from the deposit with a receipt both parties signed."""

    def redeem_many(requests: Sequence[RedeemRequest]) -> list[RedeemResult | LedgerError]:
        """Redeem each request as :meth:`redeem` would, in order; its result or its refusal."""

    def receipts(
        deposit_id: bytes | None = None, client: bytes | None = None, provider: bytes | None = None
    ) -> list[ReceiptRow]:
        """Redeemed receipts, oldest first, filtered by deposit and/or accounts."""

    def save_limits(
        provider: bytes,
        client: bytes,
        bytes_left: int,
        seconds_left: float,
        now: float,
        deposit_id: bytes = b"",
    ) -> None:
        """Remember what the client has left with this provider on this deposit."""

    def add_limits(
        provider: bytes,
        client: bytes,
        bytes_delta: int,
        seconds_delta: float,
        now: float,
        deposit_id: bytes = b"",
    ) -> None:
        """Add (or, negative, take) units to what the client has left on the deposit; never
        below zero. Every redemption adds its receipt's units in its own transaction."""

    def load_limits(
        provider: bytes, client: bytes, deposit_id: bytes | None = None
    ) -> Limits | None:
        """What the client has left on one deposit (with what an older ledger kept for the
        client as a whole), or, without ``deposit_id``, on all its deposits together."""

    def ban(provider: bytes, client: bytes, until: float) -> None:
        """Ban the client from this provider until ``until`` (unix seconds)."""

    def banned_until(provider: bytes, client: bytes, now: float) -> float | None:
        """The end of the client's ban, if it is still banned at ``now``."""

    def add_usage(
        provider: bytes, client: bytes, kind: UsageKind, seconds: float, bytes: int, value: int
    ) -> None:
        """Add to the client's usage statistics of this kind."""

    def book_grace(
        provider: bytes, subjects: Sequence[str], at: float, seconds: float, bytes: int
    ) -> None:
        """Record grace a session used, against each subject (a key, a source prefix)."""

    def grace_used(provider: bytes, subject: str, since: float) -> tuple[float, int]:
        """Seconds and bytes of grace booked against ``subject`` since ``since``."""

    def report(provider: bytes | None = None) -> list[UsageRow]:
        """Usage statistics per (provider, client)."""

    def total_supply() -> int:
        """Everything ever minted."""

    def enroll_client(row: EnrolledRow, now: float | None = None) -> bool:
        """Record a client certificate; False (nothing stored) when its serial is known, or,
        with ``now``, when its name has a certificate that is neither revoked nor expired."""

    def revoke_client(fleet: str, name: str, now: float) -> list[EnrolledRow]:
        """Revoke every unrevoked certificate of ``name``; the rows as they are now."""

    def enrolled_clients(fleet: str) -> list[EnrolledRow]:
        """Every certificate of the fleet, in the order they were enrolled."""

    def publish_offer(provider: bytes, instance: str, signed: bytes, now: float) -> None:
        """Store (or renew) one server instance's offer: its signed order, renewed at ``now``."""

    def withdraw_offer(provider: bytes, instance: str) -> bool:
        """Remove the instance's offer (a server that stops); whether there was one."""

    def offers(provider: bytes | None = None) -> list[OfferRow]:
        """The stored offers, of one provider account or all, fresh or not."""

    def check_invariant() -> tuple[bool, dict[str, Any]]:
        """Whether balances plus locked value equal the total minted, with the figures."""

    def close() -> None:
        """Release the ledger's connections."""
