"""The SQLite ledger: exact balances, every refusal code, replays and forks change nothing."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from zope.interface.verify import verifyObject

from cellvpn.billing.interfaces import ILedger, LedgerError, RedeemRequest, UsageTotals
from cellvpn.billing.keys import KeyPair
from cellvpn.billing.records import Order, SignedOrder
from cellvpn.billing.sqlite import LedgerOpenError, SqliteLedger, open_ledger
from cellvpn.wire.receipt import Receipt, Signature, Unit
from cellvpn.wire.service import ErrorCode

from .helpers import DAY, NOW, chain, close, deposit, key, receipt

if TYPE_CHECKING:
    from .helpers import AnyLedger

PROVIDER = key("provider")
CLIENT = key("client")
STRANGER = key("stranger")


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[AnyLedger]:
    """A fresh ledger of each backend (SQLite, PostgreSQL): the same tests, the same answers."""
    led = open_ledger(ledger_url)
    yield led
    ok, figures = led.check_invariant()
    assert ok, figures
    led.close()


@pytest.fixture
def funded(ledger: AnyLedger) -> tuple[AnyLedger, bytes]:
    """A ledger with the client holding 5000 and a deposit of 1000 (max 2 per second)."""
    ledger.mint(CLIENT.account, 5000, CLIENT.public)
    row = ledger.create_deposit(deposit(CLIENT, value=1000, max_unit_price=2), NOW)
    return ledger, row.id


def refused(code: ErrorCode) -> Any:
    """pytest.raises for a LedgerError with this code."""
    return pytest.raises(LedgerError, check=lambda e: e.code == code)


def test_it_provides_the_interface(ledger: AnyLedger) -> None:
    assert verifyObject(ILedger, ledger)


def test_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    led = SqliteLedger(tmp_path / "state" / "ledger.db")
    led.mint(CLIENT.account, 1)
    assert stat.S_IMODE(os.stat(tmp_path / "state" / "ledger.db").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    wal = tmp_path / "state" / "ledger.db-wal"
    assert wal.exists() and stat.S_IMODE(os.stat(wal).st_mode) == 0o600
    led.close()
    again = SqliteLedger(tmp_path / "state" / "ledger.db", create=False)
    assert again.balance(CLIENT.account) == 1
    again.close()


def test_happy_path_exact_balances(funded: tuple[AnyLedger, bytes]) -> None:
    ledger, dep_id = funded
    assert ledger.balance(CLIENT.account) == 4000
    row = ledger.get_deposit(dep_id)
    assert row is not None
    assert (row.locked, row.initial, row.state_hash, row.owner) == (
        1000,
        1000,
        dep_id,
        CLIENT.account,
    )
    first, second = chain(PROVIDER, CLIENT, dep_id, 2, value=100)
    result = ledger.redeem(first, dep_id, PROVIDER.public, NOW)
    assert (result.receipt_hash, result.value, result.locked_left, result.provider_balance) == (
        first.hash,
        100,
        900,
        100,
    )
    result = ledger.redeem(second, dep_id, PROVIDER.public, NOW + 1)
    assert (result.locked_left, result.provider_balance) == (800, 200)
    row = ledger.get_deposit(dep_id)
    assert row is not None and row.locked == 800 and row.state_hash == second.hash
    assert ledger.balance(PROVIDER.account) == 200
    assert ledger.balance(CLIENT.account) == 4000
    assert ledger.deposits() == [row] == ledger.deposits(CLIENT.account)
    assert ledger.deposits(PROVIDER.account) == []
    rows = ledger.receipts(deposit_id=dep_id)
    assert [(r.hash, r.seq, r.value) for r in rows] == [(first.hash, 1, 100), (second.hash, 2, 100)]
    assert Receipt.decode(rows[0].encoded) == first
    assert (
        ledger.receipts(client=CLIENT.account) == rows == ledger.receipts(provider=PROVIDER.account)
    )
    assert ledger.receipts(client=PROVIDER.account) == []
    assert ledger.total_supply() == 5000
    ok, figures = ledger.check_invariant()
    assert ok and figures["redeemed"] == 200 and figures["locked"] == 800


def test_money_beyond_64_bits(ledger: AnyLedger) -> None:
    big = 10**40
    ledger.mint(CLIENT.account, 3 * big)
    row = ledger.create_deposit(deposit(CLIENT, value=2 * big, max_unit_price=big), NOW)
    r = receipt(PROVIDER, CLIENT, row.id, value=big + 7, units=2)
    assert ledger.redeem(r, row.id, PROVIDER.public, NOW).locked_left == big - 7
    assert ledger.balance(PROVIDER.account) == big + 7
    assert ledger.total_supply() == 3 * big


# --- deposits ------------------------------------------------------------------------------


def test_deposit_refusals(ledger: AnyLedger) -> None:
    with refused(ErrorCode.TX_COND_NOT_ENOUGH):  # never credited
        ledger.create_deposit(deposit(CLIENT), NOW)
    ledger.mint(CLIENT.account, 500)
    with refused(ErrorCode.TX_COND_NOT_ENOUGH):
        ledger.create_deposit(deposit(CLIENT, value=501), NOW)
    bad_sig = deposit(CLIENT, value=10)
    with refused(ErrorCode.RECEIPT_NO_SIGN):
        ledger.create_deposit(replace(bad_sig, signature=STRANGER.sign(b"x")), NOW)
    with refused(ErrorCode.TX_CREATION_ERROR):
        ledger.create_deposit(deposit(CLIENT, value=10, expires=int(NOW)), NOW)
    with refused(ErrorCode.UNIT_TYPE_ERROR):
        ledger.create_deposit(deposit(CLIENT, value=10, unit=Unit.PCS), NOW)
    with refused(ErrorCode.TX_COND_WRONG_SRV_UID):
        ledger.create_deposit(deposit(CLIENT, value=10, srv_uid=2), NOW)
    with refused(ErrorCode.TX_CREATION_ERROR):
        ledger.create_deposit(deposit(CLIENT, value=0), NOW)
    with refused(ErrorCode.PRICE_ERROR):
        ledger.create_deposit(deposit(CLIENT, value=10, max_unit_price=0), NOW)
    assert ledger.balance(CLIENT.account) == 500
    ledger.create_deposit(deposit(CLIENT, value=500), NOW)
    before = ledger.dump()
    with refused(ErrorCode.WRONG_HASH):  # the same deposit again
        ledger.create_deposit(deposit(CLIENT, value=500), NOW)
    assert ledger.dump() == before
    assert ledger.balance(CLIENT.account) == 0


def test_close_returns_exactly_the_unspent_value(funded: tuple[AnyLedger, bytes]) -> None:
    ledger, dep_id = funded
    for r in chain(PROVIDER, CLIENT, dep_id, 3, value=111):
        ledger.redeem(r, dep_id, PROVIDER.public, NOW)
    assert ledger.close_deposit(close(CLIENT, dep_id), NOW) == 1000 - 333
    assert ledger.balance(CLIENT.account) == 4000 + 667
    row = ledger.get_deposit(dep_id)
    assert row is not None and row.closed and row.locked == 0 and row.returned == 667
    with refused(ErrorCode.TX_COND_NOT_FOUND):  # twice: nothing more comes back
        ledger.close_deposit(close(CLIENT, dep_id, n=1), NOW)
    assert ledger.balance(CLIENT.account) == 4667
    with refused(ErrorCode.TX_COND_NOT_FOUND):  # no receipt on a closed deposit
        ledger.redeem(receipt(PROVIDER, CLIENT, row.state_hash), dep_id, PROVIDER.public, NOW)


def test_close_refusals(funded: tuple[AnyLedger, bytes]) -> None:
    ledger, dep_id = funded
    with refused(ErrorCode.TX_COND_NOT_FOUND):
        ledger.close_deposit(close(CLIENT, bytes(32)), NOW)
    with refused(ErrorCode.RECEIPT_WRONG_PKEY_HASH):
        ledger.close_deposit(close(STRANGER, dep_id), NOW)
    with refused(ErrorCode.RECEIPT_NO_SIGN):
        ledger.close_deposit(replace(close(CLIENT, dep_id), signature=bytes(64)), NOW)
    assert ledger.set_active_usage(dep_id, "srv:1", until=NOW + 300, now=NOW)
    before = ledger.dump()
    with refused(ErrorCode.CANT_ADD_USAGE):
        ledger.close_deposit(close(CLIENT, dep_id), NOW)
    assert ledger.dump() == before
    assert ledger.set_active_usage(dep_id, None, only_if="srv:1")
    assert ledger.close_deposit(close(CLIENT, dep_id), NOW) == 1000


def test_expired_deposit_can_only_be_closed(funded: tuple[AnyLedger, bytes]) -> None:
    ledger, dep_id = funded
    row = ledger.get_deposit(dep_id)
    assert row is not None
    later = row.expires + 1.0
    with refused(ErrorCode.TX_COND_NOT_FOUND) as info:
        ledger.redeem(receipt(PROVIDER, CLIENT, dep_id), dep_id, PROVIDER.public, later)
    assert "expired" in info.value.message
    assert ledger.close_deposit(close(CLIENT, dep_id), later) == 1000
    assert ledger.balance(CLIENT.account) == 5000


def test_active_usage_is_compare_and_set(funded: tuple[AnyLedger, bytes]) -> None:
    ledger, dep_id = funded
    assert ledger.set_active_usage(dep_id, "srv-a:1")
    assert ledger.set_active_usage(dep_id, "srv-a:1")  # the same marker again
    assert not ledger.set_active_usage(dep_id, "srv-b:7")
    assert not ledger.set_active_usage(dep_id, None, only_if="srv-b:7")
    row = ledger.get_deposit(dep_id)
    assert row is not None and row.active_usage == "srv-a:1"
    assert not ledger.set_active_usage(bytes(32), "srv-a:2")
    assert ledger.clear_active_usages("srv-b:") == 0
    assert ledger.clear_active_usages("srv-a:") == 1
    assert ledger.set_active_usage(dep_id, "srv-b:7")
    assert ledger.set_active_usage(dep_id, None)
    assert ledger.close_deposit(close(CLIENT, dep_id), NOW) == 1000
    assert not ledger.set_active_usage(dep_id, "srv-a:3")  # closed


# --- redemption refusals --------------------------------------------------------------------


def _sigs(r: Receipt, *signers: KeyPair) -> Receipt:
    data = r.info.encode()
    return Receipt(r.info, tuple(k.signature(data) for k in signers))


def test_every_redeem_refusal_has_its_code(funded: tuple[AnyLedger, bytes]) -> None:
    ledger, dep_id = funded
    ok = receipt(PROVIDER, CLIENT, dep_id, value=100, units=60)
    info = ok.info
    cases: list[tuple[ErrorCode, Receipt, bytes, bytes]] = [
        (ErrorCode.TX_COND_NOT_FOUND, ok, bytes(32), PROVIDER.public),
        (
            ErrorCode.TX_COND_WRONG_SRV_UID,
            receipt(PROVIDER, CLIENT, dep_id, srv_uid=2),
            dep_id,
            PROVIDER.public,
        ),
        (
            ErrorCode.RECEIPT_WRONG_VERSION,
            receipt(PROVIDER, CLIENT, dep_id, version=1),
            dep_id,
            PROVIDER.public,
        ),
        (ErrorCode.RECEIPT_NO_SIGN, _sigs(ok, PROVIDER), dep_id, PROVIDER.public),
        (ErrorCode.RECEIPT_NO_SIGN, Receipt(info), dep_id, PROVIDER.public),
        (
            ErrorCode.RECEIPT_NO_SIGN,
            Receipt(info, (ok.signatures[0], Signature(CLIENT.public, bytes(64)))),
            dep_id,
            PROVIDER.public,
        ),
        (
            ErrorCode.RECEIPT_NO_SIGN,
            Receipt(info, (ok.signatures[0], replace(ok.signatures[1], sig_type=1))),
            dep_id,
            PROVIDER.public,
        ),
        (ErrorCode.RECEIPT_NO_SIGN, _sigs(ok, PROVIDER, CLIENT, CLIENT), dep_id, PROVIDER.public),
        (ErrorCode.RECEIPT_WRONG_PKEY_HASH, _sigs(ok, PROVIDER, STRANGER), dep_id, PROVIDER.public),
        (ErrorCode.RECEIPT_WRONG_PKEY_HASH, _sigs(ok, STRANGER, CLIENT), dep_id, PROVIDER.public),
        (ErrorCode.RECEIPT_WRONG_PKEY_HASH, ok, dep_id, STRANGER.public),
        (
            ErrorCode.UNIT_TYPE_ERROR,
            receipt(PROVIDER, CLIENT, dep_id, unit=Unit.B),
            dep_id,
            PROVIDER.public,
        ),
        (
            ErrorCode.RECEIPT_UNITS_ERROR,
            receipt(PROVIDER, CLIENT, dep_id, value=121, units=60),
            dep_id,
            PROVIDER.public,
        ),
        (
            ErrorCode.RECEIPT_UNITS_ERROR,
            receipt(PROVIDER, CLIENT, dep_id, value=0, units=0),
            dep_id,
            PROVIDER.public,
        ),
        (ErrorCode.WRONG_HASH, receipt(PROVIDER, CLIENT, bytes(32)), dep_id, PROVIDER.public),
        (
            ErrorCode.TX_COND_NOT_ENOUGH,
            receipt(PROVIDER, CLIENT, dep_id, value=1001, units=600),
            dep_id,
            PROVIDER.public,
        ),
    ]
    before = ledger.dump()
    for code, r, where, provider in cases:
        with refused(code):
            ledger.redeem(r, where, provider, NOW)
        assert ledger.dump() == before, code
    assert ledger.redeem(ok, dep_id, PROVIDER.public, NOW).value == 100


def test_value_equal_to_the_rest_is_paid_and_then_nothing_more(
    funded: tuple[AnyLedger, bytes],
) -> None:
    ledger, dep_id = funded
    all_of_it = receipt(PROVIDER, CLIENT, dep_id, value=1000, units=500)
    assert ledger.redeem(all_of_it, dep_id, PROVIDER.public, NOW).locked_left == 0
    with refused(ErrorCode.TX_COND_NOT_ENOUGH):
        ledger.redeem(
            receipt(PROVIDER, CLIENT, all_of_it.hash, value=1), dep_id, PROVIDER.public, NOW
        )
    assert ledger.close_deposit(close(CLIENT, dep_id), NOW) == 0


def test_a_replayed_receipt_changes_nothing(funded: tuple[AnyLedger, bytes]) -> None:
    ledger, dep_id = funded
    first, second = chain(PROVIDER, CLIENT, dep_id, 2)
    ledger.redeem(first, dep_id, PROVIDER.public, NOW)
    ledger.redeem(second, dep_id, PROVIDER.public, NOW)
    before = ledger.dump()
    for r in (first, second):
        with refused(ErrorCode.WRONG_HASH) as info:
            ledger.redeem(r, dep_id, PROVIDER.public, NOW + 5)
        assert "redeemed already" in info.value.message
        assert ledger.dump() == before
    assert ledger.balance(PROVIDER.account) == 120


def test_a_forked_receipt_changes_nothing(funded: tuple[AnyLedger, bytes]) -> None:
    ledger, dep_id = funded
    one = receipt(PROVIDER, CLIENT, dep_id, value=60)
    other = receipt(PROVIDER, CLIENT, dep_id, value=59)  # same prev, different receipt
    ledger.redeem(one, dep_id, PROVIDER.public, NOW)
    before = ledger.dump()
    with refused(ErrorCode.WRONG_HASH) as info:
        ledger.redeem(other, dep_id, PROVIDER.public, NOW)
    assert "forked" in info.value.message
    assert ledger.dump() == before
    row = ledger.get_deposit(dep_id)
    assert row is not None and row.state_hash == one.hash and row.locked == 940


def test_a_receipt_for_one_deposit_is_no_good_for_another(
    funded: tuple[AnyLedger, bytes],
) -> None:
    ledger, dep_id = funded
    other = ledger.create_deposit(deposit(CLIENT, value=1000, n=1), NOW).id
    r = receipt(PROVIDER, CLIENT, dep_id)
    with refused(ErrorCode.WRONG_HASH):
        ledger.redeem(r, other, PROVIDER.public, NOW)
    ledger.redeem(r, dep_id, PROVIDER.public, NOW)


# --- orders, limits, bans, statistics --------------------------------------------------------


def test_orders(ledger: AnyLedger) -> None:
    order = Order(Unit.SEC, 3600, 36, "KEL", PROVIDER.public, int(NOW) + DAY, 0x1234)
    signed = SignedOrder.sign(order, PROVIDER)
    assert ledger.put_order(signed) == order.hash
    assert ledger.put_order(signed) == order.hash  # again: harmless
    assert ledger.orders() == [signed] == ledger.orders(PROVIDER.account)
    assert ledger.orders(CLIENT.account) == []
    assert ledger.get_order(order.hash) == signed
    assert ledger.get_order(bytes(32)) is None
    with refused(ErrorCode.RECEIPT_NO_SIGN):
        ledger.put_order(SignedOrder(order, bytes(64)))
    with refused(ErrorCode.UNIT_TYPE_ERROR):
        ledger.put_order(SignedOrder.sign(replace(order, unit=Unit.PCS), PROVIDER))
    with refused(ErrorCode.TX_COND_WRONG_SRV_UID):
        ledger.put_order(SignedOrder.sign(replace(order, srv_uid=3), PROVIDER))


def test_limits_and_bans(ledger: AnyLedger) -> None:
    p, c = PROVIDER.account, CLIENT.account
    assert ledger.load_limits(p, c) is None
    ledger.save_limits(p, c, 2**70, 59.5, NOW)
    ledger.save_limits(p, c, 1000, 30.25, NOW + 60)
    limits = ledger.load_limits(p, c)
    assert limits is not None
    assert (limits.bytes_left, limits.seconds_left, limits.saved_at) == (1000, 30.25, NOW + 60)
    assert ledger.load_limits(c, p) is None
    assert ledger.banned_until(p, c, NOW) is None
    ledger.ban(p, c, NOW + 3000)
    assert ledger.banned_until(p, c, NOW) == NOW + 3000
    assert ledger.banned_until(p, c, NOW + 3000) is None
    assert ledger.banned_until(c, p, NOW) is None
    ledger.ban(p, c, NOW + 10)  # a later ban decision replaces the earlier one
    assert ledger.banned_until(p, c, NOW) == NOW + 10


def test_usage_report(ledger: AnyLedger) -> None:
    p, c, s = PROVIDER.account, CLIENT.account, STRANGER.account
    ledger.add_usage(p, c, "paid", 60, 1000, 120)
    ledger.add_usage(p, c, "paid", 30.5, 2**65, 2**70)
    ledger.add_usage(p, c, "grace", 60, 10, 0)
    ledger.add_usage(p, s, "free", 5, 1, 0)
    with pytest.raises(ValueError, match="usage kind"):
        ledger.add_usage(p, c, "stolen", 1, 1, 1)  # type: ignore[arg-type]
    rows = {r.client: r for r in ledger.report()}
    assert rows[c].paid == UsageTotals(90.5, 1000 + 2**65, 120 + 2**70)
    assert rows[c].grace == UsageTotals(60, 10, 0)
    assert rows[c].free == UsageTotals()
    assert rows[s].free == UsageTotals(5, 1, 0)
    assert ledger.report(c) == []
    assert len(ledger.report(p)) == 2


def test_mint_checks_its_arguments(ledger: AnyLedger) -> None:
    with pytest.raises(ValueError, match="positive"):
        ledger.mint(CLIENT.account, 0)
    with pytest.raises(ValueError, match="not the account's"):
        ledger.mint(CLIENT.account, 5, STRANGER.public)
    assert ledger.mint(CLIENT.account, 5) == 5
    assert ledger.mint(CLIENT.account, 6, CLIENT.public) == 11
    assert ledger.balance(STRANGER.account) == 0


# --- opening -------------------------------------------------------------------------------


def test_open_ledger_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absolute = open_ledger(f"sqlite:///{tmp_path}/a.db")
    assert absolute.path == tmp_path / "a.db" and absolute.synchronous == "FULL"
    absolute.close()
    monkeypatch.chdir(tmp_path)
    relative = open_ledger("sqlite:rel/b.db?synchronous=normal")
    assert relative.path == Path("rel/b.db") and relative.synchronous == "NORMAL"
    assert (tmp_path / "rel" / "b.db").exists()
    relative.close()
    for bad in (
        "mysql://host/db",
        "sqlite:///relative.db",
        "sqlite:/x.db",
        "sqlite:",
        "sqlite::memory:",
        "sqlite:x.db?mode=ro",
    ):
        with pytest.raises(LedgerOpenError, match="ledger URL"):
            open_ledger(bad)
    with pytest.raises(LedgerOpenError, match="there is no ledger at"):
        open_ledger("sqlite:none.db", create=False)


def test_a_file_that_is_not_a_ledger(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(LedgerOpenError, match="cannot open ledger"):
        SqliteLedger(junk)
    led = SqliteLedger(tmp_path / "l.db")
    with led._transaction(write=True) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    led.close()
    with pytest.raises(LedgerOpenError, match="schema version 99"):
        SqliteLedger(tmp_path / "l.db")


def test_redeem_many_takes_each_request_on_its_own(funded: tuple[AnyLedger, bytes]) -> None:
    ledger, dep_id = funded
    first, second, third = chain(PROVIDER, CLIENT, dep_id, 3, value=100)
    greedy = receipt(PROVIDER, CLIENT, first.hash, value=10**6, units=1)
    results = ledger.redeem_many(
        [
            RedeemRequest(first, dep_id, PROVIDER.public, NOW),
            RedeemRequest(first, dep_id, PROVIDER.public, NOW),  # the same again
            RedeemRequest(greedy, dep_id, PROVIDER.public, NOW),
            RedeemRequest(second, dep_id, PROVIDER.public, NOW),
            RedeemRequest(third, bytes(32), PROVIDER.public, NOW),
            RedeemRequest(third, dep_id, PROVIDER.public, NOW),
        ]
    )
    codes = [r.code if isinstance(r, LedgerError) else r.locked_left for r in results]
    assert codes == [
        900,
        ErrorCode.WRONG_HASH,
        ErrorCode.RECEIPT_UNITS_ERROR,
        800,
        ErrorCode.TX_COND_NOT_FOUND,
        700,
    ]
    assert [r.hash for r in ledger.receipts()] == [first.hash, second.hash, third.hash]
    row = ledger.get_deposit(dep_id)
    assert row is not None and row.receipts == 3 and row.state_hash == third.hash
    assert ledger.balance(PROVIDER.account) == 300
    assert ledger.redeem_many([]) == []


def test_bytes_no_signature_covers_are_refused(funded: tuple[AnyLedger, bytes]) -> None:
    """Extensions or a non-zero hash_type change a receipt's hash without anyone's signature:
    the ledger refuses them, so a receipt's hash is always that of what both parties signed."""
    ledger, dep_id = funded
    good = receipt(PROVIDER, CLIENT, dep_id)
    before = ledger.dump()
    with refused(ErrorCode.WRONG_HASH) as info:
        ledger.redeem(replace(good, exts=b"\x00" * 8), dep_id, PROVIDER.public, NOW)
    assert "8 bytes of extensions" in info.value.message
    provider_sig, client_sig = good.signatures
    for sigs in ((replace(provider_sig, hash_type=2), client_sig),
                 (provider_sig, replace(client_sig, hash_type=1))):  # fmt: skip
        with refused(ErrorCode.WRONG_HASH) as info:
            ledger.redeem(replace(good, signatures=sigs), dep_id, PROVIDER.public, NOW)
        assert "hash_type" in info.value.message
    assert ledger.dump() == before
    result = ledger.redeem(good, dep_id, PROVIDER.public, NOW)
    assert result.receipt_hash == good.hash


def test_marks_are_leases(funded: tuple[AnyLedger, bytes]) -> None:
    """A live lease holds the deposit; once its server stops renewing it, another server may
    take it over and the owner may close it; an expired deposit closes whatever its mark."""
    ledger, dep_id = funded
    assert ledger.set_active_usage(dep_id, "p:a:1", until=NOW + 300, now=NOW)
    row = ledger.get_deposit(dep_id)
    assert row is not None and row.active_until == NOW + 300 and not row.stale(NOW + 299)
    # another server: refused while the lease lives, even naming the mark
    assert not ledger.set_active_usage(dep_id, "p:b:7", only_if="p:a:1", until=NOW + 600, now=NOW)
    # renewed by its own server (prefix p:a:), not by another's
    assert ledger.renew_marks("p:b:", NOW + 900) == 0
    assert ledger.renew_marks("p:a:", NOW + 600) == 1
    with refused(ErrorCode.CANT_ADD_USAGE) as info:
        ledger.close_deposit(close(CLIENT, dep_id), NOW + 500)
    assert "until" in info.value.message
    # not renewed past NOW + 600: stale; a takeover must name the mark it replaces
    assert not ledger.set_active_usage(dep_id, "p:b:7", until=NOW + 1000, now=NOW + 601)
    assert ledger.set_active_usage(
        dep_id, "p:b:7", only_if="p:a:1", until=NOW + 1000, now=NOW + 601
    )
    row = ledger.get_deposit(dep_id)
    assert row is not None and row.active_usage == "p:b:7" and row.active_until == NOW + 1000
    # each server clears only its own marks
    assert ledger.clear_active_usages("p:a:") == 0
    # the owner closes once p:b stops renewing too
    assert ledger.close_deposit(close(CLIENT, dep_id, n=1), NOW + 1001) == 1000
    row = ledger.get_deposit(dep_id)
    assert row is not None and row.active_usage is None and row.closed


def test_an_expired_deposit_closes_whatever_its_mark(ledger: AnyLedger) -> None:
    ledger.mint(CLIENT.account, 5000, CLIENT.public)
    row = ledger.create_deposit(deposit(CLIENT, value=700, expires=int(NOW) + 100), NOW)
    assert ledger.set_active_usage(row.id, "p:a:1", until=NOW + 10_000, now=NOW)
    with refused(ErrorCode.CANT_ADD_USAGE):
        ledger.close_deposit(close(CLIENT, row.id), NOW + 50)
    assert ledger.close_deposit(close(CLIENT, row.id), NOW + 100) == 700
    assert ledger.balance(CLIENT.account) == 5000


def test_a_version_1_ledger_is_upgraded(tmp_path: Path) -> None:
    """A ledger written before grace budgets and leases opens as version 4 with their tables."""
    led = SqliteLedger(tmp_path / "l.db")
    with led._transaction(write=True) as db:
        db.execute("DROP TABLE leases")
        db.execute("DROP TABLE grace")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    led.close()
    again = SqliteLedger(tmp_path / "l.db")
    with again._transaction(write=False) as db:
        version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert version == ("4",) and {"leases", "grace", "clients", "offers"} <= tables
    again.close()


def test_a_redemption_adds_its_units_to_the_saved_limits(
    funded: tuple[AnyLedger, bytes],
) -> None:
    """In the redemption's own transaction: a server killed right after it resumes with the
    receipt's units. Saves are deltas, never below zero."""
    ledger, dep_id = funded
    first, second = chain(PROVIDER, CLIENT, dep_id, 2)
    ledger.redeem(first, dep_id, PROVIDER.public, NOW)
    limits = ledger.load_limits(PROVIDER.account, CLIENT.account, dep_id)
    assert limits is not None and limits.seconds_left == 60.0
    ledger.add_limits(PROVIDER.account, CLIENT.account, 0, -45.5, NOW + 1, dep_id)
    ledger.redeem(second, dep_id, PROVIDER.public, NOW + 2)
    limits = ledger.load_limits(PROVIDER.account, CLIENT.account, dep_id)
    assert limits is not None and limits.seconds_left == 74.5
    ledger.add_limits(PROVIDER.account, CLIENT.account, -5, -1000.0, NOW + 3, dep_id)
    limits = ledger.load_limits(PROVIDER.account, CLIENT.account, dep_id)
    assert limits is not None and (limits.bytes_left, limits.seconds_left) == (0, 0.0)


def test_limits_are_kept_per_deposit(funded: tuple[AnyLedger, bytes]) -> None:
    """Two deposits of one client with one provider: what one buys and uses never moves the
    other's; without a deposit the answer is the client's total."""
    ledger, first = funded
    second = ledger.create_deposit(deposit(CLIENT, value=1000, n=1), NOW).id
    (r1,) = chain(PROVIDER, CLIENT, first, 1)
    r2a, r2b = chain(PROVIDER, CLIENT, second, 2)
    ledger.redeem(r1, first, PROVIDER.public, NOW)
    ledger.redeem(r2a, second, PROVIDER.public, NOW)
    ledger.redeem(r2b, second, PROVIDER.public, NOW)
    ledger.add_limits(PROVIDER.account, CLIENT.account, 0, -50.0, NOW + 1, first)

    def left(dep: bytes | None) -> float:
        limits = ledger.load_limits(PROVIDER.account, CLIENT.account, dep)
        assert limits is not None
        return limits.seconds_left

    assert (left(first), left(second), left(None)) == (10.0, 120.0, 130.0)
    ledger.save_limits(PROVIDER.account, CLIENT.account, 0, 7.0, NOW + 2, second)
    assert (left(first), left(second), left(None)) == (10.0, 7.0, 17.0)
    assert ledger.load_limits(PROVIDER.account, CLIENT.account, b"\x01" * 32) is None


def test_limits_saved_by_a_version_2_ledger_go_to_the_clients_next_deposit(
    tmp_path: Path,
) -> None:
    """Limits kept per client (version 2) survive the upgrade: the client's next session on
    any deposit sees them, and its first save takes them over, so they count once."""
    led = SqliteLedger(tmp_path / "l.db")
    led.mint(CLIENT.account, 5000)
    first = led.create_deposit(deposit(CLIENT, value=1000), NOW).id
    second = led.create_deposit(deposit(CLIENT, value=1000, n=1), NOW).id
    with led._transaction(write=True) as db:
        db.execute("DROP TABLE limits")
        db.execute(
            "CREATE TABLE limits (provider BLOB NOT NULL, client BLOB NOT NULL, "
            "bytes_left TEXT NOT NULL, seconds_left REAL NOT NULL, saved_at REAL NOT NULL, "
            "PRIMARY KEY (provider, client))"
        )
        db.execute(
            "INSERT INTO limits VALUES (?, ?, '0', 300.0, ?)",
            (PROVIDER.account, CLIENT.account, NOW),
        )
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    led.close()
    again = SqliteLedger(tmp_path / "l.db")
    limits = again.load_limits(PROVIDER.account, CLIENT.account, first)
    assert limits is not None and limits.seconds_left == 300.0
    again.add_limits(PROVIDER.account, CLIENT.account, 0, -100.0, NOW + 1, first)
    limits = again.load_limits(PROVIDER.account, CLIENT.account, first)
    assert limits is not None and limits.seconds_left == 200.0
    assert again.load_limits(PROVIDER.account, CLIENT.account, second) is None
    total = again.load_limits(PROVIDER.account, CLIENT.account)
    assert total is not None and total.seconds_left == 200.0
    again.close()
