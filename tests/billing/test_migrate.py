"""``cellvpn-ctl ledger migrate``: every table copied, SQLite to PostgreSQL and back, adding up."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cellvpn.billing.interfaces import EnrolledRow
from cellvpn.billing.migrate import COLUMNS, MigrateError, migrate
from cellvpn.billing.records import Order, SignedOrder
from cellvpn.billing.sqlite import open_ledger
from cellvpn.lab import VENV_BIN
from cellvpn.wire.receipt import Unit

from .conftest import PgServer
from .helpers import DAY, NOW, chain, deposit, key

pytestmark = pytest.mark.timeout(120)

PROVIDER = key("provider")
CLIENT = key("client")


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    url = pg_server.create()
    yield url
    pg_server.drop(url)


def _fill(url: str) -> tuple[bytes, list[Any]]:
    """A ledger with a row in every table, money beyond 64 bits, a live lease."""
    ledger = open_ledger(url)
    ledger.mint(CLIENT.account, 10**30, CLIENT.public)
    ledger.mint(PROVIDER.account, 5)
    order = Order(Unit.SEC, 60, 60, "KEL", PROVIDER.public, int(NOW) + DAY, 7)
    ledger.put_order(SignedOrder.sign(order, PROVIDER))
    dep = ledger.create_deposit(deposit(CLIENT, value=10**25, max_unit_price=10**20), NOW).id
    ledger.create_deposit(deposit(CLIENT, value=9, n=1), NOW)
    receipts = chain(PROVIDER, CLIENT, dep, 4, value=10**21)
    for r in receipts[:3]:
        ledger.redeem(r, dep, PROVIDER.public, NOW)
    ledger.add_limits(PROVIDER.account, CLIENT.account, 0, -12.5, NOW, dep)
    ledger.set_active_usage(dep, "prov:inst:s1", until=NOW + 300, now=NOW)
    ledger.ban(PROVIDER.account, key("stranger").account, NOW + 600)
    ledger.add_usage(PROVIDER.account, CLIENT.account, "paid", 180.0, 2**70, 3 * 10**21)
    ledger.book_grace(PROVIDER.account, ["key:x", "net:192.0.2.0/24"], NOW, 30.0, 4096)
    fleet = "ab" * 32
    ledger.enroll_client(EnrolledRow(fleet, "alice", "a1", "f" * 64, NOW + DAY, NOW), now=NOW)
    ledger.revoke_client(fleet, "alice", NOW + 1)
    ledger.publish_offer(PROVIDER.account, "inst", b"signed order", NOW)
    ledger.close()
    return dep, receipts


def _ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "cellvpn-ctl"), "ledger", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_sqlite_to_postgresql_and_back_copies_every_row(tmp_path: Path, pg_url: str) -> None:
    sqlite_url = f"sqlite:///{tmp_path}/ledger.db"
    dep, receipts = _fill(sqlite_url)
    done = _ctl("migrate", "--from", sqlite_url, "--to", pg_url, "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["rows"]["receipts"] == 3 and answer["invariant"]["problems"] == []
    assert answer["invariant"]["redeemed"] == str(3 * 10**21)

    source, copy = open_ledger(sqlite_url, create=False), open_ledger(pg_url, create=False)
    back = open_ledger(f"sqlite:///{tmp_path}/back.db")
    migrate(copy, back)
    rows = source.export_rows()
    assert all(rows[table] for table in COLUMNS), "a table of the example is empty"
    assert copy.export_rows() == rows == back.export_rows()
    assert copy.check_invariant() == source.check_invariant() == back.check_invariant()
    assert copy.receipts() == source.receipts() and copy.deposits() == source.deposits()
    assert copy.report() == source.report()
    # the copy goes on where the original stopped: the next receipt, and only it
    assert copy.redeem(receipts[3], dep, PROVIDER.public, NOW).value == 10**21
    ok, figures = copy.check_invariant()
    assert ok and figures["redeemed"] == 4 * 10**21
    for led in (source, copy, back):
        led.close()


def test_a_target_that_is_not_empty_is_refused_with_one_line(tmp_path: Path, pg_url: str) -> None:
    sqlite_url = f"sqlite:///{tmp_path}/ledger.db"
    _fill(sqlite_url)
    target = open_ledger(pg_url)
    target.mint(CLIENT.account, 1)
    target.close()
    done = _ctl("migrate", "--from", sqlite_url, "--to", pg_url)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert "is not empty (its accounts has rows)" in line and "Traceback" not in done.stderr
    done = _ctl("migrate", "--from", f"sqlite:///{tmp_path}/none.db", "--to", pg_url)
    assert done.returncode == 2 and "there is no ledger at" in done.stderr


def test_a_source_that_does_not_add_up_is_not_copied(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    _fill(url)
    source = open_ledger(url)
    with source._transaction(write=True) as db:
        db.execute("UPDATE accounts SET balance = '1' WHERE account = ?", (PROVIDER.account,))
    target = open_ledger(f"sqlite:///{tmp_path}/copy.db")
    with pytest.raises(MigrateError, match="does not add up"):
        migrate(source, target)
    assert all(not rows for rows in target.export_rows().values())
    source.close()
    target.close()
