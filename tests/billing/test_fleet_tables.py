"""The fleet's tables in the shared ledger: enrolled clients and revocations, and offers.

The same tests on each backend; and a version 3 ledger of each backend is upgraded in place
with its rows kept.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cellvpn.billing.interfaces import EnrolledRow, OfferRow
from cellvpn.billing.sqlite import open_ledger

from .helpers import NOW, key

if TYPE_CHECKING:
    from .helpers import AnyLedger

FLEET = "ab" * 32
OTHER = "cd" * 32
PROVIDER = key("provider")


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[AnyLedger]:
    led = open_ledger(ledger_url)
    yield led
    led.close()


def _row(name: str, serial: str, fleet: str = FLEET, not_after: float = NOW + 1000) -> EnrolledRow:
    return EnrolledRow(fleet, name, serial, "f" * 64, not_after, NOW)


def test_enrolled_clients_and_their_revocation(ledger: AnyLedger) -> None:
    assert ledger.enroll_client(_row("alice", "a1"), now=NOW)
    assert not ledger.enroll_client(_row("alice", "a2"), now=NOW), "alice has a live one"
    assert not ledger.enroll_client(_row("bob", "a1"), now=NOW), "serial a1 is known"
    assert ledger.enroll_client(_row("bob", "b1"), now=NOW)
    assert ledger.enroll_client(_row("alice", "x1", fleet=OTHER), now=NOW), "another fleet"
    revoked = ledger.revoke_client(FLEET, "alice", NOW + 5)
    assert revoked == [EnrolledRow(FLEET, "alice", "a1", "f" * 64, NOW + 1000, NOW, NOW + 5)]
    assert ledger.revoke_client(FLEET, "alice", NOW + 6) == [], "revoked already"
    assert ledger.enroll_client(_row("alice", "a2"), now=NOW + 7), "a new one after revoking"
    assert [(r.name, r.serial, r.revoked_at) for r in ledger.enrolled_clients(FLEET)] == [
        ("alice", "a1", NOW + 5),
        ("bob", "b1", None),
        ("alice", "a2", None),
    ]
    assert [r.serial for r in ledger.enrolled_clients(OTHER)] == ["x1"]


def test_an_expired_certificate_does_not_hold_its_name(ledger: AnyLedger) -> None:
    assert ledger.enroll_client(_row("carol", "c1", not_after=NOW + 10), now=NOW)
    assert ledger.enroll_client(_row("carol", "c2"), now=NOW + 10)
    assert ledger.enroll_client(_row("dave", "d1"), now=None)
    assert ledger.enroll_client(_row("dave", "d2"), now=None), "an import checks serials only"


def test_offers_are_renewed_and_withdrawn(ledger: AnyLedger) -> None:
    account = PROVIDER.account
    ledger.publish_offer(account, "one", b"order-1", NOW)
    ledger.publish_offer(account, "two", b"order-2", NOW)
    ledger.publish_offer(account, "one", b"order-1b", NOW + 30)
    ledger.publish_offer(b"\x01" * 32, "one", b"elsewhere", NOW)
    assert ledger.offers(account) == [
        OfferRow(account, "one", b"order-1b", NOW + 30),
        OfferRow(account, "two", b"order-2", NOW),
    ]
    assert len(ledger.offers()) == 3
    assert ledger.withdraw_offer(account, "two")
    assert not ledger.withdraw_offer(account, "two")
    assert [o.instance for o in ledger.offers(account)] == ["one"]


def _version_3(ledger_url: str, backend: str) -> None:
    """Turn a fresh ledger into what cellvpn with schema 3 wrote: no clients, no offers."""
    if backend == "sqlite":
        path = ledger_url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as db:
            db.execute("DROP TABLE clients")
            db.execute("DROP TABLE offers")
            db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
        return
    import psycopg

    with psycopg.connect(ledger_url, autocommit=True) as db:
        db.execute("DROP TABLE clients")
        db.execute("DROP TABLE offers")
        db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")


def test_a_version_3_ledger_is_upgraded_in_place(ledger_url: str, backend: str) -> None:
    led = open_ledger(ledger_url)
    led.mint(PROVIDER.account, 77, PROVIDER.public)
    led.close()
    _version_3(ledger_url, backend)
    again = open_ledger(ledger_url)
    try:
        assert again.balance(PROVIDER.account) == 77
        assert again.enroll_client(_row("erin", "e1"), now=NOW)
        assert [r.serial for r in again.enrolled_clients(FLEET)] == ["e1"]
        again.publish_offer(PROVIDER.account, "one", b"x", NOW)
        assert len(again.offers()) == 1
        assert again.dump()["meta"] == [("schema_version", "4")]
    finally:
        again.close()


def test_the_fleet_tables_are_copied_by_a_migration(tmp_path: Path) -> None:
    from cellvpn.billing.migrate import migrate

    source = open_ledger(f"sqlite:///{tmp_path / 'a.db'}")
    target = open_ledger(f"sqlite:///{tmp_path / 'b.db'}")
    source.enroll_client(_row("frank", "f1"), now=NOW)
    source.publish_offer(PROVIDER.account, "one", b"x", NOW)
    migrate(source, target)
    assert target.enrolled_clients(FLEET) == source.enrolled_clients(FLEET)
    assert target.offers() == source.offers()
    source.close()
    target.close()
