"""The embedded ledger: :class:`ILedger` on one SQLite file.

Why it is safe with several writers (the server's worker thread, ``cellvpn-ctl`` in another
process): every write is one ``BEGIN IMMEDIATE`` transaction, which takes SQLite's write lock
before reading anything, so the checks and the changes of a redemption see one state and no
other writer can slip in between; a writer that finds the lock taken waits for it (busy
timeout, 10 s). WAL lets readers go on meanwhile. A refusal rolls the transaction back, so it
changes nothing; a process killed mid-transaction leaves nothing behind (SQLite's journal).
The schema adds its own guards: a receipt hash and a receipt's ``prev`` hash are each unique,
so even a wrong check could not store a replay or a fork.

Money (balances, deposit values, prices) may exceed 64 bits, so it is stored as decimal TEXT
and added up in Python inside the transaction. u64 fields of the records are TEXT too, because
SQLite's integers are signed 64-bit.

Each thread gets its own connection (``threading.local``), so one object serves a worker thread
and a test's main thread alike.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zope.interface import implementer

from cellvpn.billing.checks import (
    ANY_DEPOSIT,
    Prepared,
    check_close,
    check_deposit_request,
    check_funds,
    check_order,
    check_redemption,
    hash32,
    invariant,
)
from cellvpn.billing.interfaces import (
    USAGE_KINDS,
    DepositRow,
    EnrolledRow,
    ILedger,
    LedgerError,
    LedgerUnavailableError,
    Limits,
    OfferRow,
    ReceiptRow,
    RedeemRequest,
    RedeemResult,
    UsageKind,
    UsageRow,
    UsageTotals,
)
from cellvpn.billing.keys import account_of
from cellvpn.billing.migrate import BIG_INTEGERS, COLUMNS, MigrateError, Rows, normalise
from cellvpn.billing.records import SignedClose, SignedDeposit, SignedOrder
from cellvpn.wire.receipt import Receipt, Unit
from cellvpn.wire.service import ErrorCode

if TYPE_CHECKING:
    from cellvpn.billing.postgres import PostgresLedger

SCHEMA_VERSION = 4
#: Versions this cellvpn upgrades in place: 1 lacked the grace and leases tables, 2 kept
#: limits per client rather than per deposit, 3 lacked the fleet's clients and offers.
UPGRADES_FROM = ("1", "2", "3")
BUSY_TIMEOUT_S = 10.0
SYNCHRONOUS = ("FULL", "NORMAL")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS accounts (
    account BLOB PRIMARY KEY,
    public BLOB,
    balance TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS mints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    account BLOB NOT NULL,
    value TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS orders (
    hash BLOB PRIMARY KEY,
    provider BLOB NOT NULL,
    signed BLOB NOT NULL,
    added REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_by_provider ON orders (provider);
CREATE TABLE IF NOT EXISTS deposits (
    id BLOB PRIMARY KEY,
    owner BLOB NOT NULL,
    owner_public BLOB NOT NULL,
    srv_uid TEXT NOT NULL,
    unit INTEGER NOT NULL,
    max_unit_price TEXT NOT NULL,
    initial TEXT NOT NULL,
    locked TEXT NOT NULL,
    returned TEXT NOT NULL,
    expires TEXT NOT NULL,
    state_hash BLOB NOT NULL,
    receipts INTEGER NOT NULL,
    closed REAL,
    active_usage TEXT,
    created REAL NOT NULL,
    signed BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS deposits_by_owner ON deposits (owner);
CREATE TABLE IF NOT EXISTS receipts (
    hash BLOB PRIMARY KEY,
    deposit BLOB NOT NULL REFERENCES deposits (id),
    seq INTEGER NOT NULL,
    provider BLOB NOT NULL,
    client BLOB NOT NULL,
    unit INTEGER NOT NULL,
    units TEXT NOT NULL,
    value TEXT NOT NULL,
    prev_hash BLOB NOT NULL UNIQUE,
    redeemed_at REAL NOT NULL,
    encoded BLOB NOT NULL,
    UNIQUE (deposit, seq)
);
CREATE INDEX IF NOT EXISTS receipts_by_client ON receipts (client);
CREATE INDEX IF NOT EXISTS receipts_by_provider ON receipts (provider);
CREATE TABLE IF NOT EXISTS limits (
    provider BLOB NOT NULL,
    client BLOB NOT NULL,
    deposit BLOB NOT NULL,
    bytes_left TEXT NOT NULL,
    seconds_left REAL NOT NULL,
    saved_at REAL NOT NULL,
    PRIMARY KEY (provider, client, deposit)
);
CREATE TABLE IF NOT EXISTS bans (
    provider BLOB NOT NULL,
    client BLOB NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (provider, client)
);
CREATE TABLE IF NOT EXISTS usage (
    provider BLOB NOT NULL,
    client BLOB NOT NULL,
    kind TEXT NOT NULL,
    seconds REAL NOT NULL,
    bytes TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (provider, client, kind)
);
CREATE TABLE IF NOT EXISTS grace (
    provider BLOB NOT NULL,
    subject TEXT NOT NULL,
    at REAL NOT NULL,
    seconds REAL NOT NULL,
    bytes TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS grace_by_subject ON grace (provider, subject, at);
CREATE TABLE IF NOT EXISTS leases (
    deposit BLOB PRIMARY KEY REFERENCES deposits (id),
    until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS clients (
    fleet TEXT NOT NULL,
    serial TEXT NOT NULL,
    name TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    not_after REAL NOT NULL,
    enrolled_at REAL NOT NULL,
    revoked_at REAL,
    PRIMARY KEY (fleet, serial)
);
CREATE INDEX IF NOT EXISTS clients_by_name ON clients (fleet, name);
CREATE TABLE IF NOT EXISTS offers (
    provider BLOB NOT NULL,
    instance TEXT NOT NULL,
    signed BLOB NOT NULL,
    renewed REAL NOT NULL,
    PRIMARY KEY (provider, instance)
);
"""

#: The tables, in the order :meth:`SqliteLedger.dump` lists them.
TABLES = (
    "meta", "accounts", "mints", "orders", "deposits", "receipts", "limits", "bans", "usage",
    "grace", "leases", "clients", "offers",
)  # fmt: skip

_CLIENT_COLUMNS = "fleet, name, serial, fingerprint, not_after, enrolled_at, revoked_at"

_DEPOSIT_COLUMNS = (
    "id, owner, owner_public, srv_uid, unit, max_unit_price, locked, initial, expires, "
    "state_hash, closed, active_usage, created, returned, receipts, "
    "(SELECT until FROM leases WHERE leases.deposit = deposits.id)"
)


class LedgerOpenError(Exception):
    """A ledger URL or file that cannot be used; the message is one line naming it."""


def _deposit_row(row: tuple[Any, ...]) -> DepositRow:
    return DepositRow(
        id=row[0],
        owner=row[1],
        owner_public=row[2],
        srv_uid=int(row[3]),
        unit=row[4],
        max_unit_price=int(row[5]),
        locked=int(row[6]),
        initial=int(row[7]),
        expires=int(row[8]),
        state_hash=row[9],
        closed=row[10] is not None,
        active_usage=row[11],
        created=row[12],
        returned=int(row[13]),
        receipts=row[14],
        active_until=row[15] if row[11] is not None else None,
    )


def _receipt_row(row: tuple[Any, ...]) -> ReceiptRow:
    return ReceiptRow(
        hash=row[0],
        deposit_id=row[1],
        seq=row[2],
        provider=row[3],
        client=row[4],
        unit=row[5],
        units=int(row[6]),
        value=int(row[7]),
        prev_hash=row[8],
        redeemed_at=row[9],
        encoded=row[10],
    )


@implementer(ILedger)
class SqliteLedger:
    """:class:`ILedger` on the SQLite file ``path`` (created 0600 when ``create`` is true)."""

    def __init__(
        self, path: str | os.PathLike[str], create: bool = True, synchronous: str = "FULL"
    ) -> None:
        self.path = Path(path)
        if synchronous.upper() not in SYNCHRONOUS:
            raise LedgerOpenError(f"synchronous must be one of {', '.join(SYNCHRONOUS)}")
        self.synchronous = synchronous.upper()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        self._prepare_file(create)
        try:
            self._create_schema()
        except LedgerUnavailableError as e:
            self.close()
            why = str(e).removeprefix(f"cannot open ledger {self.path}: ")
            if _read_only(self.path.parent):
                why += " (the file system is read-only; the ledger must be written)"
            raise LedgerOpenError(f"cannot open ledger {self.path}: {why}") from None
        except BaseException:
            self.close()
            raise
        # The opening thread may never call again (a server opens before its worker starts).
        self._release_connection()

    # --- connections and transactions ------------------------------------------------------

    def _prepare_file(self, create: bool) -> None:
        if self.path.exists():
            if not self.path.is_file():
                raise LedgerOpenError(f"ledger {self.path} is not a file")
            return
        if not create:
            raise LedgerOpenError(f"there is no ledger at {self.path}")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Create it 0600 ourselves: SQLite would use the umask, and it gives its WAL and
            # shared-memory files the database file's mode.
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            os.close(fd)
        except OSError as e:
            raise LedgerOpenError(f"cannot create ledger {self.path}: {e.strerror or e}") from None

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise LedgerUnavailableError(f"ledger {self.path} is closed")
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,  # transactions are ours: BEGIN IMMEDIATE ... COMMIT
                check_same_thread=False,  # only close() crosses threads
            )
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as e:
            raise LedgerUnavailableError(f"cannot open ledger {self.path}: {e}") from None
        with self._lock:
            self._connections.append(conn)
        self._local.conn = conn
        return conn

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction: IMMEDIATE (write lock first) for writes, a snapshot for reads."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN DEFERRED")
        except sqlite3.Error as e:
            raise LedgerUnavailableError(f"ledger {self.path}: {e}") from None
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:
                with suppress(sqlite3.Error):  # the error to report is the first one
                    conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.IntegrityError):
                raise LedgerError(ErrorCode.WRONG_HASH, f"refused by the ledger: {e}") from None
            if isinstance(e, sqlite3.Error):
                raise LedgerUnavailableError(f"ledger {self.path}: {e}") from None
            raise

    def _create_schema(self) -> None:
        with self._transaction(write=True) as db:
            # One statement at a time: executescript() would commit the open transaction.
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            elif row[0] in UPGRADES_FROM:
                # the new tables were created above; limits gained their deposit in 3
                columns = [c[1] for c in db.execute("PRAGMA table_info(limits)").fetchall()]
                if "deposit" not in columns:
                    _limits_per_deposit(db)
                db.execute(
                    "UPDATE meta SET value = ? WHERE key = 'schema_version'",
                    (str(SCHEMA_VERSION),),
                )
            elif row[0] != str(SCHEMA_VERSION):
                raise LedgerOpenError(
                    f"ledger {self.path} has schema version {row[0]}; this cellvpn reads "
                    f"version {SCHEMA_VERSION}"
                )

    def _release_connection(self) -> None:
        """Close the calling thread's connection; it reconnects if it calls again."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            return
        self._local.conn = None
        with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        self._local = threading.local()

    # --- accounts ---------------------------------------------------------------------------

    @staticmethod
    def _balance(db: sqlite3.Connection, account: bytes) -> int | None:
        row = db.execute("SELECT balance FROM accounts WHERE account = ?", (account,)).fetchone()
        return None if row is None else int(row[0])

    @staticmethod
    def _credit(db: sqlite3.Connection, account: bytes, value: int, public: bytes | None) -> int:
        row = db.execute(
            "SELECT balance, public FROM accounts WHERE account = ?", (account,)
        ).fetchone()
        if row is None:
            db.execute(
                "INSERT INTO accounts (account, public, balance) VALUES (?, ?, ?)",
                (account, public, str(value)),
            )
            return value
        balance = int(row[0]) + value
        db.execute(
            "UPDATE accounts SET balance = ?, public = coalesce(public, ?) WHERE account = ?",
            (str(balance), public, account),
        )
        return balance

    def mint(self, account: bytes, value: int, public: bytes | None = None) -> int:
        account = hash32("account", account)
        if value <= 0:
            raise ValueError("only a positive value can be minted")
        if public is not None and account_of(public) != account:
            raise ValueError("the public key given is not the account's")
        with self._transaction(write=True) as db:
            balance = self._credit(db, account, value, public)
            db.execute(
                "INSERT INTO mints (account, value, at) VALUES (?, ?, ?)",
                (account, str(value), time.time()),
            )
        return balance

    def balance(self, account: bytes) -> int:
        with self._transaction(write=False) as db:
            return self._balance(db, hash32("account", account)) or 0

    # --- orders -----------------------------------------------------------------------------

    def put_order(self, signed_order: SignedOrder) -> bytes:
        check_order(signed_order)
        order = signed_order.order
        with self._transaction(write=True) as db:
            db.execute(
                "INSERT OR IGNORE INTO orders (hash, provider, signed, added) VALUES (?, ?, ?, ?)",
                (order.hash, account_of(order.provider), signed_order.encode(), time.time()),
            )
        return order.hash

    def orders(self, provider: bytes | None = None) -> list[SignedOrder]:
        with self._transaction(write=False) as db:
            if provider is None:
                rows = db.execute("SELECT signed FROM orders ORDER BY rowid").fetchall()
            else:
                rows = db.execute(
                    "SELECT signed FROM orders WHERE provider = ? ORDER BY rowid", (provider,)
                ).fetchall()
        return [SignedOrder.decode(row[0]) for row in rows]

    def get_order(self, order_hash: bytes) -> SignedOrder | None:
        with self._transaction(write=False) as db:
            row = db.execute("SELECT signed FROM orders WHERE hash = ?", (order_hash,)).fetchone()
        return None if row is None else SignedOrder.decode(row[0])

    # --- deposits ---------------------------------------------------------------------------

    @staticmethod
    def _deposit(db: sqlite3.Connection, deposit_id: bytes) -> DepositRow | None:
        row = db.execute(
            f"SELECT {_DEPOSIT_COLUMNS} FROM deposits WHERE id = ?", (deposit_id,)
        ).fetchone()
        return None if row is None else _deposit_row(row)

    def create_deposit(self, signed_deposit: SignedDeposit, now: float) -> DepositRow:
        check_deposit_request(signed_deposit, now)
        d = signed_deposit.deposit
        deposit_id = d.hash
        owner = account_of(d.owner)
        with self._transaction(write=True) as db:
            if self._deposit(db, deposit_id) is not None:
                raise LedgerError(
                    ErrorCode.WRONG_HASH, f"deposit {deposit_id.hex()} already exists"
                )
            balance = self._balance(db, owner)
            check_funds(owner, balance, d.value)
            assert balance is not None
            db.execute(
                "UPDATE accounts SET balance = ?, public = coalesce(public, ?) WHERE account = ?",
                (str(balance - d.value), d.owner, owner),
            )
            db.execute(
                "INSERT INTO deposits (id, owner, owner_public, srv_uid, unit, max_unit_price, "
                "initial, locked, returned, expires, state_hash, receipts, closed, active_usage, "
                "created, signed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, '0', ?, ?, 0, NULL, NULL, ?, ?)",
                (
                    deposit_id,
                    owner,
                    d.owner,
                    str(d.srv_uid),
                    d.unit,
                    str(d.max_unit_price),
                    str(d.value),
                    str(d.value),
                    str(d.expires),
                    deposit_id,
                    now,
                    signed_deposit.encode(),
                ),
            )
            row = self._deposit(db, deposit_id)
        assert row is not None
        return row

    def get_deposit(self, deposit_id: bytes) -> DepositRow | None:
        with self._transaction(write=False) as db:
            return self._deposit(db, deposit_id)

    def deposits(self, owner: bytes | None = None) -> list[DepositRow]:
        sql = f"SELECT {_DEPOSIT_COLUMNS} FROM deposits"
        args: tuple[bytes, ...] = ()
        if owner is not None:
            sql += " WHERE owner = ?"
            args = (owner,)
        with self._transaction(write=False) as db:
            return [_deposit_row(row) for row in db.execute(sql + " ORDER BY rowid", args)]

    def close_deposit(self, signed_close: SignedClose, now: float) -> int:
        c = signed_close.close
        with self._transaction(write=True) as db:
            dep = check_close(signed_close, self._deposit(db, c.deposit), now)
            # an expired deposit, or a mark its server stopped renewing, never keeps money
            db.execute("UPDATE deposits SET active_usage = NULL WHERE id = ?", (dep.id,))
            db.execute("DELETE FROM leases WHERE deposit = ?", (dep.id,))
            db.execute(
                "UPDATE deposits SET locked = '0', returned = ?, closed = ? WHERE id = ?",
                (str(dep.locked), now, dep.id),
            )
            self._credit(db, dep.owner, dep.locked, dep.owner_public)
        return dep.locked

    def set_active_usage(
        self,
        deposit_id: bytes,
        marker: str | None,
        only_if: str | None = None,
        until: float | None = None,
        now: float | None = None,
    ) -> bool:
        """Mark the deposit in use by ``marker`` until ``until`` (a lease), or clear the mark.

        A mark held by another marker is taken over only when ``only_if`` names it and its
        lease ran out before ``now`` (its server stopped renewing it).
        """
        with self._transaction(write=True) as db:
            row = db.execute(
                "SELECT active_usage, closed, (SELECT until FROM leases WHERE deposit = id) "
                "FROM deposits WHERE id = ?",
                (deposit_id,),
            ).fetchone()
            if row is None:
                return False
            current, closed, lease = row
            if marker is None:
                if only_if is not None and current != only_if:
                    return current is None
                db.execute("DELETE FROM leases WHERE deposit = ?", (deposit_id,))
            elif closed is not None:
                return False
            elif current not in (None, marker):
                stale = lease is not None and now is not None and lease < now
                if not (stale and only_if == current):
                    return False
            db.execute("UPDATE deposits SET active_usage = ? WHERE id = ?", (marker, deposit_id))
            if marker is not None and until is not None:
                db.execute(
                    "INSERT INTO leases (deposit, until) VALUES (?, ?) "
                    "ON CONFLICT (deposit) DO UPDATE SET until = excluded.until",
                    (deposit_id, until),
                )
            return True

    def renew_marks(self, marker_prefix: str, until: float) -> int:
        """Extend the lease of every mark that starts with ``marker_prefix`` (one server's)."""
        with self._transaction(write=True) as db:
            cursor = db.execute(
                "UPDATE leases SET until = ? WHERE deposit IN (SELECT id FROM deposits WHERE "
                "active_usage IS NOT NULL AND substr(active_usage, 1, ?) = ?)",
                (until, len(marker_prefix), marker_prefix),
            )
            return cursor.rowcount

    def clear_active_usages(self, marker_prefix: str) -> int:
        with self._transaction(write=True) as db:
            db.execute(
                "DELETE FROM leases WHERE deposit IN (SELECT id FROM deposits WHERE "
                "active_usage IS NOT NULL AND substr(active_usage, 1, ?) = ?)",
                (len(marker_prefix), marker_prefix),
            )
            cursor = db.execute(
                "UPDATE deposits SET active_usage = NULL WHERE active_usage IS NOT NULL "
                "AND substr(active_usage, 1, ?) = ?",
                (len(marker_prefix), marker_prefix),
            )
            return cursor.rowcount

    # --- redemption -------------------------------------------------------------------------

    def redeem(
        self, receipt: Receipt, deposit_id: bytes, provider_public: bytes, now: float
    ) -> RedeemResult:
        request = Prepared(RedeemRequest(receipt, deposit_id, provider_public, now))
        with self._transaction(write=True) as db:
            return self._redeem(db, request)

    def redeem_many(self, requests: Sequence[RedeemRequest]) -> list[RedeemResult | LedgerError]:
        """Each request redeemed or refused on its own (a savepoint each), one commit for all.

        One commit (one fsync) for many receipts is what lets a busy server keep full
        durability; nothing is reported redeemed before the commit that makes it so.
        """
        prepared = [Prepared(r) for r in requests]
        results: list[RedeemResult | LedgerError] = []
        with self._transaction(write=True) as db:
            for request in prepared:
                db.execute("SAVEPOINT redeem")
                try:
                    results.append(self._redeem(db, request))
                except LedgerError as e:
                    db.execute("ROLLBACK TO redeem")
                    results.append(e)
                except sqlite3.IntegrityError as e:  # the schema's own guard; see _transaction
                    db.execute("ROLLBACK TO redeem")
                    results.append(LedgerError(ErrorCode.WRONG_HASH, f"refused by the ledger: {e}"))
                db.execute("RELEASE redeem")
        return results

    def _redeem(self, db: sqlite3.Connection, request: Prepared) -> RedeemResult:
        """The checks and changes of one redemption, inside the caller's transaction."""
        receipt, deposit_id, provider_public, now = request.request
        info = receipt.info
        dep = check_redemption(
            request,
            self._deposit(db, deposit_id),
            lambda h: (
                db.execute("SELECT 1 FROM receipts WHERE hash = ?", (h,)).fetchone() is not None
            ),
        )
        left = dep.locked - info.value
        cursor = db.execute(
            "UPDATE deposits SET locked = ?, state_hash = ?, receipts = receipts + 1 "
            "WHERE id = ? AND state_hash = ?",
            (str(left), request.hash, dep.id, dep.state_hash),
        )
        if cursor.rowcount != 1:  # cannot happen under the write lock; never pay twice
            raise LedgerError(ErrorCode.WRONG_HASH, "the deposit changed during redemption")
        provider = account_of(provider_public)
        balance = self._credit(db, provider, info.value, provider_public)
        db.execute(
            "INSERT INTO receipts (hash, deposit, seq, provider, client, unit, units, value, "
            "prev_hash, redeemed_at, encoded) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                request.hash,
                dep.id,
                dep.receipts + 1,
                provider,
                dep.owner,
                info.units_type,
                str(info.units),
                str(info.value),
                info.prev_hash,
                now,
                request.encoded,
            ),
        )
        # the units bought are the client's saved limits from this commit on: a server killed
        # right after the redemption resumes with them (its saves add use as deltas)
        self._add_limits(
            db,
            provider,
            dep.owner,
            dep.id,
            info.units if info.units_type == Unit.B else 0,
            float(info.units) if info.units_type == Unit.SEC else 0.0,
            now,
        )
        return RedeemResult(request.hash, info.value, left, balance)

    def receipts(
        self,
        deposit_id: bytes | None = None,
        client: bytes | None = None,
        provider: bytes | None = None,
    ) -> list[ReceiptRow]:
        where: list[str] = []
        args: list[bytes] = []
        for column, value in (("deposit", deposit_id), ("client", client), ("provider", provider)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = (
            "SELECT hash, deposit, seq, provider, client, unit, units, value, prev_hash, "
            "redeemed_at, encoded FROM receipts"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY rowid"
        )
        with self._transaction(write=False) as db:
            return [_receipt_row(row) for row in db.execute(sql, args).fetchall()]

    # --- limits, bans, statistics ----------------------------------------------------------

    def save_limits(
        self,
        provider: bytes,
        client: bytes,
        bytes_left: int,
        seconds_left: float,
        now: float,
        deposit_id: bytes = ANY_DEPOSIT,
    ) -> None:
        with self._transaction(write=True) as db:
            db.execute(
                "INSERT INTO limits (provider, client, deposit, bytes_left, seconds_left, "
                "saved_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (provider, client, deposit) "
                "DO UPDATE SET bytes_left = excluded.bytes_left, "
                "seconds_left = excluded.seconds_left, saved_at = excluded.saved_at",
                (provider, client, deposit_id, str(int(bytes_left)), float(seconds_left), now),
            )

    def add_limits(
        self,
        provider: bytes,
        client: bytes,
        bytes_delta: int,
        seconds_delta: float,
        now: float,
        deposit_id: bytes = ANY_DEPOSIT,
    ) -> None:
        with self._transaction(write=True) as db:
            self._add_limits(db, provider, client, deposit_id, bytes_delta, seconds_delta, now)

    @staticmethod
    def _add_limits(
        db: sqlite3.Connection,
        provider: bytes,
        client: bytes,
        deposit_id: bytes,
        bytes_delta: int,
        seconds_delta: float,
        now: float,
    ) -> None:
        """Add to what the client has left on this deposit (never below zero): deltas commute,
        so a save and a redemption that overlap both count. The first row of a deposit takes
        over what an older ledger saved for the client as a whole."""
        key = (provider, client, deposit_id)
        row = db.execute(
            "SELECT bytes_left, seconds_left FROM limits "
            "WHERE provider = ? AND client = ? AND deposit = ?",
            key,
        ).fetchone()
        if row is None and deposit_id != ANY_DEPOSIT:
            row = db.execute(
                "DELETE FROM limits WHERE provider = ? AND client = ? AND deposit = ? "
                "RETURNING bytes_left, seconds_left",
                (provider, client, ANY_DEPOSIT),
            ).fetchone()
        old_bytes, old_seconds = (0, 0.0) if row is None else (int(row[0]), float(row[1]))
        db.execute(
            "INSERT INTO limits (provider, client, deposit, bytes_left, seconds_left, saved_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (provider, client, deposit) DO UPDATE SET "
            "bytes_left = excluded.bytes_left, seconds_left = excluded.seconds_left, "
            "saved_at = excluded.saved_at",
            (
                *key,
                str(max(0, old_bytes + int(bytes_delta))),
                max(0.0, old_seconds + float(seconds_delta)),
                now,
            ),
        )

    def load_limits(
        self, provider: bytes, client: bytes, deposit_id: bytes | None = None
    ) -> Limits | None:
        sql = (
            "SELECT bytes_left, seconds_left, saved_at FROM limits "
            "WHERE provider = ? AND client = ?"
        )
        args: tuple[bytes, ...] = (provider, client)
        if deposit_id is not None:
            # a deposit's own row, and what an older ledger saved for the client as a whole
            sql += " AND deposit IN (?, ?)"
            args += (deposit_id, ANY_DEPOSIT)
        with self._transaction(write=False) as db:
            rows = db.execute(sql, args).fetchall()
        if not rows:
            return None
        return Limits(
            provider,
            client,
            sum(int(r[0]) for r in rows),
            sum(float(r[1]) for r in rows),
            max(float(r[2]) for r in rows),
        )

    def ban(self, provider: bytes, client: bytes, until: float) -> None:
        with self._transaction(write=True) as db:
            db.execute(
                "INSERT INTO bans (provider, client, until) VALUES (?, ?, ?) "
                "ON CONFLICT (provider, client) DO UPDATE SET until = excluded.until",
                (provider, client, float(until)),
            )

    def banned_until(self, provider: bytes, client: bytes, now: float) -> float | None:
        with self._transaction(write=False) as db:
            row = db.execute(
                "SELECT until FROM bans WHERE provider = ? AND client = ?", (provider, client)
            ).fetchone()
        if row is None or row[0] <= now:
            return None
        until: float = row[0]
        return until

    def add_usage(
        self,
        provider: bytes,
        client: bytes,
        kind: UsageKind,
        seconds: float,
        bytes: int,
        value: int,
    ) -> None:
        if kind not in USAGE_KINDS:
            raise ValueError(f"usage kind must be one of {', '.join(USAGE_KINDS)}, not {kind!r}")
        with self._transaction(write=True) as db:
            row = db.execute(
                "SELECT seconds, bytes, value FROM usage "
                "WHERE provider = ? AND client = ? AND kind = ?",
                (provider, client, kind),
            ).fetchone()
            old = (0.0, 0, 0) if row is None else (row[0], int(row[1]), int(row[2]))
            db.execute(
                "INSERT OR REPLACE INTO usage (provider, client, kind, seconds, bytes, value) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    provider,
                    client,
                    kind,
                    old[0] + float(seconds),
                    str(old[1] + int(bytes)),
                    str(old[2] + int(value)),
                ),
            )

    def book_grace(
        self, provider: bytes, subjects: Sequence[str], at: float, seconds: float, bytes: int
    ) -> None:
        with self._transaction(write=True) as db:
            for subject in subjects:
                db.execute(
                    "INSERT INTO grace (provider, subject, at, seconds, bytes) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (provider, subject, at, float(seconds), str(int(bytes))),
                )
            # rows older than any window anyone uses (a week) are of no further use
            db.execute("DELETE FROM grace WHERE at < ?", (at - 7 * 86400,))

    def grace_used(self, provider: bytes, subject: str, since: float) -> tuple[float, int]:
        with self._transaction(write=False) as db:
            rows = db.execute(
                "SELECT seconds, bytes FROM grace WHERE provider = ? AND subject = ? AND at >= ?",
                (provider, subject, since),
            ).fetchall()
        return sum(r[0] for r in rows), sum(int(r[1]) for r in rows)

    def report(self, provider: bytes | None = None) -> list[UsageRow]:
        sql = "SELECT provider, client, kind, seconds, bytes, value FROM usage"
        args: tuple[bytes, ...] = ()
        if provider is not None:
            sql += " WHERE provider = ?"
            args = (provider,)
        with self._transaction(write=False) as db:
            rows = db.execute(sql + " ORDER BY provider, client", args).fetchall()
        totals: dict[tuple[bytes, bytes], dict[str, UsageTotals]] = {}
        for prov, client, kind, seconds, nbytes, value in rows:
            totals.setdefault((prov, client), {})[kind] = UsageTotals(
                seconds, int(nbytes), int(value)
            )
        empty = UsageTotals()
        return [
            UsageRow(
                prov,
                client,
                kinds.get("paid", empty),
                kinds.get("grace", empty),
                kinds.get("free", empty),
            )
            for (prov, client), kinds in totals.items()
        ]

    # --- the fleet: enrolled clients and offers ----------------------------------------------

    def enroll_client(self, row: EnrolledRow, now: float | None = None) -> bool:
        with self._transaction(write=True) as db:
            if (
                now is not None
                and db.execute(
                    "SELECT 1 FROM clients WHERE fleet = ? AND name = ? AND revoked_at IS NULL "
                    "AND not_after > ?",
                    (row.fleet, row.name, now),
                ).fetchone()
            ):
                return False
            cursor = db.execute(
                f"INSERT OR IGNORE INTO clients ({_CLIENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    row.fleet,
                    row.name,
                    row.serial,
                    row.fingerprint,
                    row.not_after,
                    row.enrolled_at,
                    row.revoked_at,
                ),
            )
            return cursor.rowcount == 1

    def revoke_client(self, fleet: str, name: str, now: float) -> list[EnrolledRow]:
        with self._transaction(write=True) as db:
            rows = db.execute(
                f"UPDATE clients SET revoked_at = ? WHERE fleet = ? AND name = ? "
                f"AND revoked_at IS NULL RETURNING {_CLIENT_COLUMNS}",
                (now, fleet, name),
            ).fetchall()
        return sorted((EnrolledRow(*r) for r in rows), key=lambda r: r.enrolled_at)

    def enrolled_clients(self, fleet: str) -> list[EnrolledRow]:
        with self._transaction(write=False) as db:
            rows = db.execute(
                f"SELECT {_CLIENT_COLUMNS} FROM clients WHERE fleet = ? ORDER BY rowid", (fleet,)
            ).fetchall()
        return [EnrolledRow(*r) for r in rows]

    def publish_offer(self, provider: bytes, instance: str, signed: bytes, now: float) -> None:
        with self._transaction(write=True) as db:
            db.execute(
                "INSERT INTO offers (provider, instance, signed, renewed) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (provider, instance) DO UPDATE SET signed = excluded.signed, "
                "renewed = excluded.renewed",
                (provider, instance, signed, now),
            )

    def withdraw_offer(self, provider: bytes, instance: str) -> bool:
        with self._transaction(write=True) as db:
            cursor = db.execute(
                "DELETE FROM offers WHERE provider = ? AND instance = ?", (provider, instance)
            )
            return cursor.rowcount == 1

    def offers(self, provider: bytes | None = None) -> list[OfferRow]:
        sql = "SELECT provider, instance, signed, renewed FROM offers"
        args: tuple[bytes, ...] = ()
        if provider is not None:
            sql += " WHERE provider = ?"
            args = (provider,)
        with self._transaction(write=False) as db:
            rows = db.execute(sql + " ORDER BY provider, instance", args).fetchall()
        return [OfferRow(*r) for r in rows]

    # --- audit ------------------------------------------------------------------------------

    def total_supply(self) -> int:
        with self._transaction(write=False) as db:
            return sum(int(row[0]) for row in db.execute("SELECT value FROM mints"))

    def check_invariant(self) -> tuple[bool, dict[str, Any]]:
        """Money adds up, globally and per deposit, in one consistent snapshot."""
        with self._transaction(write=False) as db:
            minted = sum(int(row[0]) for row in db.execute("SELECT value FROM mints"))
            balances = [int(row[0]) for row in db.execute("SELECT balance FROM accounts")]
            deposits = [
                _deposit_row(row)
                for row in db.execute(f"SELECT {_DEPOSIT_COLUMNS} FROM deposits").fetchall()
            ]
            receipts = [
                (dep_id, seq, int(value), receipt_hash)
                for dep_id, seq, value, receipt_hash in db.execute(
                    "SELECT deposit, seq, value, hash FROM receipts"
                )
            ]
        return invariant(minted, balances, deposits, receipts)

    def export_rows(self) -> Rows:
        """Every row of every table but ``meta``, as plain values in the order added (a copy
        into another ledger, :mod:`cellvpn.billing.migrate`)."""
        with self._transaction(write=False) as db:
            return {
                table: [
                    normalise(table, row)
                    for row in db.execute(
                        f"SELECT {', '.join(columns)} FROM {table} ORDER BY rowid"
                    )
                ]
                for table, columns in COLUMNS.items()
            }

    def import_rows(self, rows: Rows) -> None:
        """Write a copy's rows into this ledger, which must be empty, in one transaction."""
        with self._transaction(write=True) as db:
            for table in COLUMNS:
                if db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None:
                    raise MigrateError(
                        f"ledger {self.path} is not empty (its {table} has rows); a copy goes "
                        "into an empty ledger"
                    )
            for table, columns in COLUMNS.items():
                marks = ", ".join("?" * len(columns))
                db.executemany(
                    f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
                    [
                        tuple(
                            str(v) if v is not None and c in BIG_INTEGERS else v
                            for c, v in zip(columns, row, strict=True)
                        )
                        for row in rows.get(table, [])
                    ],
                )

    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table, sorted: a test compares two dumps to see any change."""
        with self._transaction(write=False) as db:
            return {
                table: sorted(db.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
                for table in TABLES
            }


#: the schemes of a PostgreSQL ledger's URL (libpq's URI syntax)
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_ledger(url: str, create: bool = True) -> SqliteLedger | PostgresLedger:
    """The ledger a URL names: ``sqlite:////absolute/path``, ``sqlite:relative/path`` or
    ``postgresql://...`` (a PostgreSQL database, :mod:`cellvpn.billing.postgres`).

    A query may choose durability: ``?synchronous=normal`` (survives a crashed process, may
    lose the last transactions on power loss) instead of the default ``full``.
    """
    if url.startswith(POSTGRES_SCHEMES):
        try:
            from cellvpn.billing.postgres import open_postgres
        except ImportError as e:  # psycopg is an optional dependency
            raise LedgerOpenError(
                f"a PostgreSQL ledger needs psycopg (pip install 'cellvpn[postgres]'): {e}"
            ) from None
        return open_postgres(url, create=create)
    if not url.startswith("sqlite:"):
        raise LedgerOpenError(
            f"ledger URL {url!r} is not understood: cellvpn knows sqlite:////absolute/path, "
            "sqlite:relative/path and postgresql://user@host/database"
        )
    rest, _, query = url[len("sqlite:") :].partition("?")
    synchronous = "FULL"
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key != "synchronous" or value.upper() not in SYNCHRONOUS:
            raise LedgerOpenError(
                f"ledger URL {url!r}: the only option is synchronous=full|normal, not {item!r}"
            )
        synchronous = value.upper()
    if rest.startswith("///"):
        path = rest[3:]
        if not path.startswith("/"):
            raise LedgerOpenError(
                f"ledger URL {url!r}: after sqlite:/// comes an absolute path, as in "
                "sqlite:////var/lib/cellvpn/ledger.db (sqlite:relative/path for a relative one)"
            )
    elif rest.startswith("/") or not rest or rest == ":memory:":
        raise LedgerOpenError(
            f"ledger URL {url!r} is not understood: cellvpn knows sqlite:////absolute/path "
            "and sqlite:relative/path (a file; an in-memory ledger cannot be shared)"
        )
    else:
        path = rest
    return SqliteLedger(path, create=create, synchronous=synchronous)


def _limits_per_deposit(db: sqlite3.Connection) -> None:
    """Schema 2 to 3: limits gain their deposit; rows saved before keep ANY_DEPOSIT, which
    the client's next session on a deposit takes over."""
    db.execute("ALTER TABLE limits RENAME TO limits_v2")
    for statement in filter(str.strip, _SCHEMA.split(";")):
        if "TABLE IF NOT EXISTS limits " in statement:
            db.execute(statement)
    db.execute(
        "INSERT INTO limits (provider, client, deposit, bytes_left, seconds_left, saved_at) "
        "SELECT provider, client, ?, bytes_left, seconds_left, saved_at FROM limits_v2",
        (ANY_DEPOSIT,),
    )
    db.execute("DROP TABLE limits_v2")


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False
