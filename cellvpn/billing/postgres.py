"""The shared ledger: :class:`ILedger` on a PostgreSQL database, for several servers at once.

Why it is safe with several writers on several hosts: every write is one transaction (READ
COMMITTED) that locks the rows it decides on before reading them (``SELECT ... FOR UPDATE`` on
the deposit a receipt spends, a close closes or a mark marks; the account a deposit is paid
from), so the checks and the changes of a redemption see one state, and a second redemption
of the same deposit waits for the first to commit, then sees its new state hash. Balances
change in the row itself (``balance = balance + x``). Locks are taken deposit first, account
second, so two writers never wait for each other in a circle. A refusal rolls back; a client
killed mid transaction leaves nothing (the server rolls it back). As in SQLite, a receipt hash
and a receipt's ``prev`` hash are each unique, so even a wrong check could not store a replay.

Money is NUMERIC(78, 0): exact integers of up to 78 digits (uint256 has 78).

Each thread gets its own connection (``threading.local``); the reactor thread never gets one
(the server runs the ledger behind :class:`AsyncLedger`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
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
from cellvpn.billing.migrate import COLUMNS, MigrateError, Rows, normalise
from cellvpn.billing.records import SignedClose, SignedDeposit, SignedOrder
from cellvpn.billing.sqlite import LedgerOpenError
from cellvpn.wire.receipt import Receipt, Unit
from cellvpn.wire.service import ErrorCode

#: the same tables as SQLite's schema 4, so a ledger can move between the two
SCHEMA_VERSION = 4
#: Versions upgraded in place: 3 lacked the fleet's clients and offers (new tables only).
UPGRADES_FROM = ("3",)
#: what NUMERIC(78, 0) holds for sure: a uint256, as the records carry
MAX_VALUE = 2**256 - 1
CONNECT_TIMEOUT_S = 10
#: how long a statement may wait for a row lock before the call is "unavailable"
LOCK_TIMEOUT_MS = 10_000
#: serialises two servers creating the schema of one empty database at once
_SCHEMA_LOCK = 0x63656C6C76706E  # "cellvpn"
#: the first key of the lock that serialises one fleet's enrollments (the second: the fleet)
_CLIENTS_LOCK = 0x636C6E74  # "clnt"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS accounts (
    account BYTEA PRIMARY KEY,
    public BYTEA,
    balance NUMERIC(78, 0) NOT NULL
);
CREATE TABLE IF NOT EXISTS mints (
    seq BIGSERIAL PRIMARY KEY,
    account BYTEA NOT NULL,
    value NUMERIC(78, 0) NOT NULL,
    at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS orders (
    hash BYTEA PRIMARY KEY,
    provider BYTEA NOT NULL,
    signed BYTEA NOT NULL,
    added DOUBLE PRECISION NOT NULL,
    seq BIGSERIAL NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_by_provider ON orders (provider);
CREATE TABLE IF NOT EXISTS deposits (
    id BYTEA PRIMARY KEY,
    owner BYTEA NOT NULL,
    owner_public BYTEA NOT NULL,
    srv_uid NUMERIC(20, 0) NOT NULL,
    unit BIGINT NOT NULL,
    max_unit_price NUMERIC(78, 0) NOT NULL,
    initial NUMERIC(78, 0) NOT NULL,
    locked NUMERIC(78, 0) NOT NULL,
    returned NUMERIC(78, 0) NOT NULL,
    expires NUMERIC(20, 0) NOT NULL,
    state_hash BYTEA NOT NULL,
    receipts BIGINT NOT NULL,
    closed DOUBLE PRECISION,
    active_usage TEXT,
    created DOUBLE PRECISION NOT NULL,
    signed BYTEA NOT NULL,
    seq BIGSERIAL NOT NULL
);
CREATE INDEX IF NOT EXISTS deposits_by_owner ON deposits (owner);
CREATE TABLE IF NOT EXISTS receipts (
    hash BYTEA PRIMARY KEY,
    deposit BYTEA NOT NULL REFERENCES deposits (id),
    seq BIGINT NOT NULL,
    provider BYTEA NOT NULL,
    client BYTEA NOT NULL,
    unit BIGINT NOT NULL,
    units NUMERIC(20, 0) NOT NULL,
    value NUMERIC(78, 0) NOT NULL,
    prev_hash BYTEA NOT NULL UNIQUE,
    redeemed_at DOUBLE PRECISION NOT NULL,
    encoded BYTEA NOT NULL,
    n BIGSERIAL NOT NULL,
    UNIQUE (deposit, seq)
);
CREATE INDEX IF NOT EXISTS receipts_by_client ON receipts (client);
CREATE INDEX IF NOT EXISTS receipts_by_provider ON receipts (provider);
CREATE TABLE IF NOT EXISTS limits (
    provider BYTEA NOT NULL,
    client BYTEA NOT NULL,
    deposit BYTEA NOT NULL,
    bytes_left NUMERIC(78, 0) NOT NULL,
    seconds_left DOUBLE PRECISION NOT NULL,
    saved_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (provider, client, deposit)
);
CREATE TABLE IF NOT EXISTS bans (
    provider BYTEA NOT NULL,
    client BYTEA NOT NULL,
    until DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (provider, client)
);
CREATE TABLE IF NOT EXISTS usage (
    provider BYTEA NOT NULL,
    client BYTEA NOT NULL,
    kind TEXT NOT NULL,
    seconds DOUBLE PRECISION NOT NULL,
    bytes NUMERIC(78, 0) NOT NULL,
    value NUMERIC(78, 0) NOT NULL,
    PRIMARY KEY (provider, client, kind)
);
CREATE TABLE IF NOT EXISTS grace (
    provider BYTEA NOT NULL,
    subject TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    seconds DOUBLE PRECISION NOT NULL,
    bytes NUMERIC(78, 0) NOT NULL
);
CREATE INDEX IF NOT EXISTS grace_by_subject ON grace (provider, subject, at);
CREATE TABLE IF NOT EXISTS leases (
    deposit BYTEA PRIMARY KEY REFERENCES deposits (id),
    until DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS clients (
    fleet TEXT NOT NULL,
    serial TEXT NOT NULL,
    name TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    not_after DOUBLE PRECISION NOT NULL,
    enrolled_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION,
    seq BIGSERIAL NOT NULL,
    PRIMARY KEY (fleet, serial)
);
CREATE INDEX IF NOT EXISTS clients_by_name ON clients (fleet, name);
CREATE TABLE IF NOT EXISTS offers (
    provider BYTEA NOT NULL,
    instance TEXT NOT NULL,
    signed BYTEA NOT NULL,
    renewed DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (provider, instance)
)
"""

#: The tables, in the order :meth:`PostgresLedger.dump` lists them (SQLite's).
TABLES = (
    "meta", "accounts", "mints", "orders", "deposits", "receipts", "limits", "bans", "usage",
    "grace", "leases", "clients", "offers",
)  # fmt: skip

#: the column that keeps the order rows were added in, where the order is shown
_ADDED = {"mints": "seq", "orders": "seq", "deposits": "seq", "receipts": "n", "clients": "seq"}

_CLIENT_COLUMNS = "fleet, name, serial, fingerprint, not_after, enrolled_at, revoked_at"

_DEPOSIT_COLUMNS = (
    "id, owner, owner_public, srv_uid, unit, max_unit_price, locked, initial, expires, "
    "state_hash, closed, active_usage, created, returned, receipts, "
    "(SELECT until FROM leases WHERE leases.deposit = deposits.id)"
)


def redacted(url: str) -> str:
    """The URL without its password (in the user part or the query), fit for a message."""
    head, sep, query = url.partition("?")
    scheme, slashes, rest = head.partition("://")
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if at and ":" in userinfo:
        authority = f"{userinfo.partition(':')[0]}:***@{host}"
    query = "&".join(
        "password=***" if item.lower().startswith("password=") else item
        for item in query.split("&")
    )
    return f"{scheme}{slashes}{authority}{slash}{path}{sep}{query}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _b(value: Any) -> bytes:
    return bytes(value)


def _deposit_row(row: tuple[Any, ...]) -> DepositRow:
    return DepositRow(
        id=_b(row[0]),
        owner=_b(row[1]),
        owner_public=_b(row[2]),
        srv_uid=int(row[3]),
        unit=int(row[4]),
        max_unit_price=int(row[5]),
        locked=int(row[6]),
        initial=int(row[7]),
        expires=int(row[8]),
        state_hash=_b(row[9]),
        closed=row[10] is not None,
        active_usage=row[11],
        created=row[12],
        returned=int(row[13]),
        receipts=int(row[14]),
        active_until=row[15] if row[11] is not None else None,
    )


def _receipt_row(row: tuple[Any, ...]) -> ReceiptRow:
    return ReceiptRow(
        hash=_b(row[0]),
        deposit_id=_b(row[1]),
        seq=int(row[2]),
        provider=_b(row[3]),
        client=_b(row[4]),
        unit=int(row[5]),
        units=int(row[6]),
        value=int(row[7]),
        prev_hash=_b(row[8]),
        redeemed_at=row[9],
        encoded=_b(row[10]),
    )


Conn = psycopg.Connection[tuple[Any, ...]]


@implementer(ILedger)
class PostgresLedger:
    """:class:`ILedger` on the PostgreSQL database ``url`` names (a libpq URI)."""

    def __init__(self, url: str, create: bool = True) -> None:
        self.url = url
        self.name = redacted(url)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[Conn] = []
        self._closed = False
        try:
            self._create_schema(create)
        except LedgerUnavailableError as e:
            self.close()
            raise LedgerOpenError(str(e)) from None
        except BaseException:
            self.close()
            raise
        # The opening thread may never call again (a server opens before its worker starts).
        self._release_connection()

    # --- connections and transactions ------------------------------------------------------

    def _conn(self) -> Conn:
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is not None:
            if not (conn.closed or conn.broken):
                return conn
            self._drop(conn)  # the server went away since: connect again
        if self._closed:
            raise LedgerUnavailableError(f"ledger {self.name} is closed")
        try:
            conn = psycopg.connect(
                self.url,
                autocommit=True,  # transactions are ours: BEGIN ... COMMIT
                connect_timeout=CONNECT_TIMEOUT_S,
                application_name="cellvpn",
            )
            conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
        except (psycopg.Error, ValueError) as e:
            raise LedgerUnavailableError(
                f"cannot open ledger {self.name}: {_first_line(e)}"
            ) from None
        with self._lock:
            self._connections.append(conn)
        self._local.conn = conn
        return conn

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Conn]:
        """One transaction: READ COMMITTED with row locks for writes, a snapshot for reads."""
        conn = self._conn()
        try:
            conn.execute(
                "BEGIN ISOLATION LEVEL READ COMMITTED"
                if write
                else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
            )
        except psycopg.Error as e:
            self._drop(conn)
            raise LedgerUnavailableError(f"ledger {self.name}: {_first_line(e)}") from None
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as e:
            with suppress(psycopg.Error):  # the error to report is the first one
                conn.execute("ROLLBACK")
            if isinstance(e, psycopg.IntegrityError):
                raise LedgerError(
                    ErrorCode.WRONG_HASH, f"refused by the ledger: {_first_line(e)}"
                ) from None
            if isinstance(e, psycopg.OperationalError | psycopg.InterfaceError):
                if conn.broken or conn.closed:
                    self._drop(conn)
                raise LedgerUnavailableError(f"ledger {self.name}: {_first_line(e)}") from None
            if isinstance(e, psycopg.Error):
                raise LedgerUnavailableError(f"ledger {self.name}: {_first_line(e)}") from None
            raise

    def _drop(self, conn: Conn) -> None:
        """Forget a broken connection: the thread's next call connects again."""
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)
        with suppress(psycopg.Error):
            conn.close()

    def _create_schema(self, create: bool) -> None:
        with self._transaction(write=True) as db:
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            exists = db.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()
            if not (exists and exists[0]):
                tables = db.execute(
                    "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
                ).fetchone()
                if tables and tables[0]:
                    raise LedgerOpenError(
                        f"ledger {self.name}: the database holds tables but no cellvpn ledger"
                    )
                if not create:
                    raise LedgerOpenError(f"there is no ledger in {self.name}")
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(statement)
                db.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', %s)",
                    (str(SCHEMA_VERSION),),
                )
                return
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is not None and row[0] in UPGRADES_FROM:
                # the later versions only add tables: create what is missing
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(statement)
                db.execute(
                    "UPDATE meta SET value = %s WHERE key = 'schema_version'",
                    (str(SCHEMA_VERSION),),
                )
                return
            if row is None or row[0] != str(SCHEMA_VERSION):
                found = "no schema version" if row is None else f"schema version {row[0]}"
                raise LedgerOpenError(
                    f"ledger {self.name} has {found}; this cellvpn reads version {SCHEMA_VERSION}"
                )

    def _release_connection(self) -> None:
        """Close the calling thread's connection; it reconnects if it calls again."""
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is not None:
            self._drop(conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            with suppress(psycopg.Error):
                conn.close()
        self._local = threading.local()

    # --- accounts ---------------------------------------------------------------------------

    @staticmethod
    def _balance(db: Conn, account: bytes, lock: bool = False) -> int | None:
        row = db.execute(
            "SELECT balance FROM accounts WHERE account = %s" + (" FOR UPDATE" if lock else ""),
            (account,),
        ).fetchone()
        return None if row is None else int(row[0])

    @staticmethod
    def _credit(db: Conn, account: bytes, value: int, public: bytes | None) -> int:
        row = db.execute(
            "INSERT INTO accounts (account, public, balance) VALUES (%s, %s, %s) "
            "ON CONFLICT (account) DO UPDATE SET balance = accounts.balance + excluded.balance, "
            "public = coalesce(accounts.public, excluded.public) RETURNING balance",
            (account, public, value),
        ).fetchone()
        assert row is not None
        return int(row[0])

    def mint(self, account: bytes, value: int, public: bytes | None = None) -> int:
        account = hash32("account", account)
        if value <= 0:
            raise ValueError("only a positive value can be minted")
        if value > MAX_VALUE:
            raise ValueError("a PostgreSQL ledger mints at most 2**256 - 1 at a time")
        if public is not None and account_of(public) != account:
            raise ValueError("the public key given is not the account's")
        with self._transaction(write=True) as db:
            balance = self._credit(db, account, value, public)
            db.execute(
                "INSERT INTO mints (account, value, at) VALUES (%s, %s, %s)",
                (account, value, time.time()),
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
                "INSERT INTO orders (hash, provider, signed, added) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (hash) DO NOTHING",
                (order.hash, account_of(order.provider), signed_order.encode(), time.time()),
            )
        return order.hash

    def orders(self, provider: bytes | None = None) -> list[SignedOrder]:
        with self._transaction(write=False) as db:
            if provider is None:
                rows = db.execute("SELECT signed FROM orders ORDER BY seq").fetchall()
            else:
                rows = db.execute(
                    "SELECT signed FROM orders WHERE provider = %s ORDER BY seq", (provider,)
                ).fetchall()
        return [SignedOrder.decode(_b(row[0])) for row in rows]

    def get_order(self, order_hash: bytes) -> SignedOrder | None:
        with self._transaction(write=False) as db:
            row = db.execute("SELECT signed FROM orders WHERE hash = %s", (order_hash,)).fetchone()
        return None if row is None else SignedOrder.decode(_b(row[0]))

    # --- deposits ---------------------------------------------------------------------------

    @staticmethod
    def _deposit(db: Conn, deposit_id: bytes, lock: bool = False) -> DepositRow | None:
        """The deposit; with ``lock``, its row locked for this transaction first and read
        after (a statement of its own, so its lease is read as of the lock, not before)."""
        if (
            lock
            and db.execute(
                "SELECT 1 FROM deposits WHERE id = %s FOR UPDATE", (deposit_id,)
            ).fetchone()
            is None
        ):
            return None
        row = db.execute(
            f"SELECT {_DEPOSIT_COLUMNS} FROM deposits WHERE id = %s", (deposit_id,)
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
            balance = self._balance(db, owner, lock=True)
            check_funds(owner, balance, d.value)
            db.execute(
                "UPDATE accounts SET balance = balance - %s, public = coalesce(public, %s) "
                "WHERE account = %s",
                (d.value, d.owner, owner),
            )
            db.execute(
                "INSERT INTO deposits (id, owner, owner_public, srv_uid, unit, max_unit_price, "
                "initial, locked, returned, expires, state_hash, receipts, closed, active_usage, "
                "created, signed) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 0, %s, %s, 0, NULL, "
                "NULL, %s, %s)",
                (
                    deposit_id,
                    owner,
                    d.owner,
                    d.srv_uid,
                    d.unit,
                    d.max_unit_price,
                    d.value,
                    d.value,
                    d.expires,
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
            sql += " WHERE owner = %s"
            args = (owner,)
        with self._transaction(write=False) as db:
            return [_deposit_row(row) for row in db.execute(sql + " ORDER BY seq", args)]

    def close_deposit(self, signed_close: SignedClose, now: float) -> int:
        c = signed_close.close
        with self._transaction(write=True) as db:
            dep = check_close(signed_close, self._deposit(db, c.deposit, lock=True), now)
            # an expired deposit, or a mark its server stopped renewing, never keeps money
            db.execute("DELETE FROM leases WHERE deposit = %s", (dep.id,))
            db.execute(
                "UPDATE deposits SET active_usage = NULL, locked = 0, returned = %s, closed = %s "
                "WHERE id = %s",
                (dep.locked, now, dep.id),
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
            dep = self._deposit(db, deposit_id, lock=True)
            if dep is None:
                return False
            current, lease = dep.active_usage, dep.active_until
            if marker is None:
                if only_if is not None and current != only_if:
                    return current is None
                db.execute("DELETE FROM leases WHERE deposit = %s", (deposit_id,))
            elif dep.closed:
                return False
            elif current not in (None, marker):
                stale = lease is not None and now is not None and lease < now
                if not (stale and only_if == current):
                    return False
            db.execute("UPDATE deposits SET active_usage = %s WHERE id = %s", (marker, deposit_id))
            if marker is not None and until is not None:
                db.execute(
                    "INSERT INTO leases (deposit, until) VALUES (%s, %s) "
                    "ON CONFLICT (deposit) DO UPDATE SET until = excluded.until",
                    (deposit_id, until),
                )
            return True

    @staticmethod
    def _lock_marked(db: Conn, marker_prefix: str) -> list[bytes]:
        """Lock the deposits one server's marks are on (rechecked after any wait), so a
        renewal or a release never crosses a take-over that set_active_usage is making."""
        rows = db.execute(
            "SELECT id FROM deposits WHERE active_usage IS NOT NULL "
            "AND left(active_usage, %s) = %s ORDER BY id FOR UPDATE",
            (len(marker_prefix), marker_prefix),
        ).fetchall()
        return [_b(row[0]) for row in rows]

    def renew_marks(self, marker_prefix: str, until: float) -> int:
        """Extend the lease of every mark that starts with ``marker_prefix`` (one server's)."""
        with self._transaction(write=True) as db:
            ids = self._lock_marked(db, marker_prefix)
            cursor = db.execute(
                "UPDATE leases SET until = %s WHERE deposit = ANY(%s)", (until, ids)
            )
            return cursor.rowcount

    def clear_active_usages(self, marker_prefix: str) -> int:
        with self._transaction(write=True) as db:
            ids = self._lock_marked(db, marker_prefix)
            db.execute("DELETE FROM leases WHERE deposit = ANY(%s)", (ids,))
            cursor = db.execute(
                "UPDATE deposits SET active_usage = NULL WHERE id = ANY(%s)", (ids,)
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
        """Each request redeemed or refused on its own (a savepoint each), one commit for all."""
        prepared = [Prepared(r) for r in requests]
        results: list[RedeemResult | LedgerError] = []
        with self._transaction(write=True) as db:
            for request in prepared:
                db.execute("SAVEPOINT redeem")
                try:
                    results.append(self._redeem(db, request))
                except LedgerError as e:
                    db.execute("ROLLBACK TO SAVEPOINT redeem")
                    results.append(e)
                except psycopg.IntegrityError as e:  # the schema's own guard
                    db.execute("ROLLBACK TO SAVEPOINT redeem")
                    why = f"refused by the ledger: {_first_line(e)}"
                    results.append(LedgerError(ErrorCode.WRONG_HASH, why))
                db.execute("RELEASE SAVEPOINT redeem")
        return results

    def _redeem(self, db: Conn, request: Prepared) -> RedeemResult:
        """The checks and changes of one redemption, with the deposit's row locked."""
        receipt, deposit_id, provider_public, now = request.request
        info = receipt.info

        def stored(receipt_hash: bytes) -> bool:
            found = db.execute("SELECT 1 FROM receipts WHERE hash = %s", (receipt_hash,))
            return found.fetchone() is not None

        dep = check_redemption(request, self._deposit(db, deposit_id, lock=True), stored)
        left = dep.locked - info.value
        cursor = db.execute(
            "UPDATE deposits SET locked = %s, state_hash = %s, receipts = receipts + 1 "
            "WHERE id = %s AND state_hash = %s",
            (left, request.hash, dep.id, dep.state_hash),
        )
        if cursor.rowcount != 1:  # cannot happen under the row lock; never pay twice
            raise LedgerError(ErrorCode.WRONG_HASH, "the deposit changed during redemption")
        provider = account_of(provider_public)
        balance = self._credit(db, provider, info.value, provider_public)
        db.execute(
            "INSERT INTO receipts (hash, deposit, seq, provider, client, unit, units, value, "
            "prev_hash, redeemed_at, encoded) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                request.hash,
                dep.id,
                dep.receipts + 1,
                provider,
                dep.owner,
                info.units_type,
                info.units,
                info.value,
                info.prev_hash,
                now,
                request.encoded,
            ),
        )
        # the units bought are the client's saved limits from this commit on
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
                where.append(f"{column} = %s")
                args.append(value)
        sql = (
            "SELECT hash, deposit, seq, provider, client, unit, units, value, prev_hash, "
            "redeemed_at, encoded FROM receipts"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY n"
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
                "saved_at) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (provider, client, "
                "deposit) DO UPDATE SET bytes_left = excluded.bytes_left, "
                "seconds_left = excluded.seconds_left, saved_at = excluded.saved_at",
                (provider, client, deposit_id, int(bytes_left), float(seconds_left), now),
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
        db: Conn,
        provider: bytes,
        client: bytes,
        deposit_id: bytes,
        bytes_delta: int,
        seconds_delta: float,
        now: float,
    ) -> None:
        """Add to what the client has left on this deposit (never below zero), in the row
        itself, so a save and a redemption that overlap both count. The first row of a
        deposit takes over what an older ledger saved for the client as a whole."""
        old_bytes, old_seconds = 0, 0.0
        exists = db.execute(
            "SELECT 1 FROM limits WHERE provider = %s AND client = %s AND deposit = %s",
            (provider, client, deposit_id),
        ).fetchone()
        if exists is None and deposit_id != ANY_DEPOSIT:
            row = db.execute(
                "DELETE FROM limits WHERE provider = %s AND client = %s AND deposit = %s "
                "RETURNING bytes_left, seconds_left",
                (provider, client, ANY_DEPOSIT),
            ).fetchone()
            if row is not None:
                old_bytes, old_seconds = int(row[0]), float(row[1])
        db.execute(
            "INSERT INTO limits (provider, client, deposit, bytes_left, seconds_left, saved_at) "
            "VALUES (%(p)s, %(c)s, %(d)s, greatest(0, %(ob)s + %(b)s), "
            "greatest(0, %(os)s + %(s)s), %(now)s) "
            "ON CONFLICT (provider, client, deposit) DO UPDATE SET "
            "bytes_left = greatest(0, limits.bytes_left + %(b)s), "
            "seconds_left = greatest(0, limits.seconds_left + %(s)s), saved_at = %(now)s",
            {
                "p": provider,
                "c": client,
                "d": deposit_id,
                "ob": old_bytes,
                "os": old_seconds,
                "b": int(bytes_delta),
                "s": float(seconds_delta),
                "now": now,
            },
        )

    def load_limits(
        self, provider: bytes, client: bytes, deposit_id: bytes | None = None
    ) -> Limits | None:
        sql = (
            "SELECT bytes_left, seconds_left, saved_at FROM limits "
            "WHERE provider = %s AND client = %s"
        )
        args: tuple[bytes, ...] = (provider, client)
        if deposit_id is not None:
            sql += " AND deposit IN (%s, %s)"
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
                "INSERT INTO bans (provider, client, until) VALUES (%s, %s, %s) "
                "ON CONFLICT (provider, client) DO UPDATE SET until = excluded.until",
                (provider, client, float(until)),
            )

    def banned_until(self, provider: bytes, client: bytes, now: float) -> float | None:
        with self._transaction(write=False) as db:
            row = db.execute(
                "SELECT until FROM bans WHERE provider = %s AND client = %s", (provider, client)
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
            db.execute(
                "INSERT INTO usage (provider, client, kind, seconds, bytes, value) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (provider, client, kind) DO UPDATE "
                "SET seconds = usage.seconds + excluded.seconds, "
                "bytes = usage.bytes + excluded.bytes, value = usage.value + excluded.value",
                (provider, client, kind, float(seconds), int(bytes), int(value)),
            )

    def book_grace(
        self, provider: bytes, subjects: Sequence[str], at: float, seconds: float, bytes: int
    ) -> None:
        with self._transaction(write=True) as db:
            for subject in subjects:
                db.execute(
                    "INSERT INTO grace (provider, subject, at, seconds, bytes) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    (provider, subject, at, float(seconds), int(bytes)),
                )
            # rows older than any window anyone uses (a week) are of no further use
            db.execute("DELETE FROM grace WHERE at < %s", (at - 7 * 86400,))

    def grace_used(self, provider: bytes, subject: str, since: float) -> tuple[float, int]:
        with self._transaction(write=False) as db:
            rows = db.execute(
                "SELECT seconds, bytes FROM grace WHERE provider = %s AND subject = %s "
                "AND at >= %s",
                (provider, subject, since),
            ).fetchall()
        return sum(r[0] for r in rows), sum(int(r[1]) for r in rows)

    def report(self, provider: bytes | None = None) -> list[UsageRow]:
        sql = "SELECT provider, client, kind, seconds, bytes, value FROM usage"
        args: tuple[bytes, ...] = ()
        if provider is not None:
            sql += " WHERE provider = %s"
            args = (provider,)
        with self._transaction(write=False) as db:
            rows = db.execute(sql + " ORDER BY provider, client", args).fetchall()
        totals: dict[tuple[bytes, bytes], dict[str, UsageTotals]] = {}
        for prov, client, kind, seconds, nbytes, value in rows:
            totals.setdefault((_b(prov), _b(client)), {})[kind] = UsageTotals(
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

    # --- audit ------------------------------------------------------------------------------

    # --- the fleet: enrolled clients and offers ----------------------------------------------

    def enroll_client(self, row: EnrolledRow, now: float | None = None) -> bool:
        with self._transaction(write=True) as db:
            # one enrollment of a fleet at a time, so two servers never give one name two
            # live certificates
            db.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_CLIENTS_LOCK, row.fleet))
            if (
                now is not None
                and db.execute(
                    "SELECT 1 FROM clients WHERE fleet = %s AND name = %s AND revoked_at IS NULL "
                    "AND not_after > %s",
                    (row.fleet, row.name, now),
                ).fetchone()
            ):
                return False
            cursor = db.execute(
                f"INSERT INTO clients ({_CLIENT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (fleet, serial) DO NOTHING",
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
                f"UPDATE clients SET revoked_at = %s WHERE fleet = %s AND name = %s "
                f"AND revoked_at IS NULL RETURNING {_CLIENT_COLUMNS}",
                (now, fleet, name),
            ).fetchall()
        return sorted((EnrolledRow(*r) for r in rows), key=lambda r: r.enrolled_at)

    def enrolled_clients(self, fleet: str) -> list[EnrolledRow]:
        with self._transaction(write=False) as db:
            rows = db.execute(
                f"SELECT {_CLIENT_COLUMNS} FROM clients WHERE fleet = %s ORDER BY seq", (fleet,)
            ).fetchall()
        return [EnrolledRow(*r) for r in rows]

    def publish_offer(self, provider: bytes, instance: str, signed: bytes, now: float) -> None:
        with self._transaction(write=True) as db:
            db.execute(
                "INSERT INTO offers (provider, instance, signed, renewed) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (provider, instance) DO UPDATE SET "
                "signed = excluded.signed, renewed = excluded.renewed",
                (provider, instance, signed, now),
            )

    def withdraw_offer(self, provider: bytes, instance: str) -> bool:
        with self._transaction(write=True) as db:
            cursor = db.execute(
                "DELETE FROM offers WHERE provider = %s AND instance = %s", (provider, instance)
            )
            return cursor.rowcount == 1

    def offers(self, provider: bytes | None = None) -> list[OfferRow]:
        sql = "SELECT provider, instance, signed, renewed FROM offers"
        args: tuple[bytes, ...] = ()
        if provider is not None:
            sql += " WHERE provider = %s"
            args = (provider,)
        with self._transaction(write=False) as db:
            rows = db.execute(sql + " ORDER BY provider, instance", args).fetchall()
        return [OfferRow(_b(r[0]), r[1], _b(r[2]), r[3]) for r in rows]

    def total_supply(self) -> int:
        with self._transaction(write=False) as db:
            return sum(int(row[0]) for row in db.execute("SELECT value FROM mints"))

    def check_invariant(self) -> tuple[bool, dict[str, Any]]:
        """Money adds up, globally and per deposit, in one snapshot (REPEATABLE READ)."""
        with self._transaction(write=False) as db:
            minted = sum(int(row[0]) for row in db.execute("SELECT value FROM mints"))
            balances = [int(row[0]) for row in db.execute("SELECT balance FROM accounts")]
            deposits = [
                _deposit_row(row)
                for row in db.execute(f"SELECT {_DEPOSIT_COLUMNS} FROM deposits").fetchall()
            ]
            receipts = [
                (_b(dep_id), int(seq), int(value), _b(receipt_hash))
                for dep_id, seq, value, receipt_hash in db.execute(
                    "SELECT deposit, seq, value, hash FROM receipts"
                )
            ]
        return invariant(minted, balances, deposits, receipts)

    def export_rows(self) -> Rows:
        """Every row of every table but ``meta``, as plain values in the order added (a copy
        into another ledger, :mod:`cellvpn.billing.migrate`), from one snapshot."""
        with self._transaction(write=False) as db:
            return {
                table: [
                    normalise(table, row)
                    for row in db.execute(
                        f"SELECT {', '.join(columns)} FROM {table}"
                        + (f" ORDER BY {_ADDED[table]}" if table in _ADDED else "")
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
                        f"ledger {self.name} is not empty (its {table} has rows); a copy goes "
                        "into an empty ledger"
                    )
            with db.cursor() as cursor:
                for table, columns in COLUMNS.items():
                    if rows.get(table):
                        marks = ", ".join(["%s"] * len(columns))
                        cursor.executemany(
                            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
                            rows[table],
                        )

    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table, sorted: a test compares two dumps to see any change."""
        with self._transaction(write=False) as db:
            return {
                table: sorted(
                    (
                        tuple(_b(v) if isinstance(v, memoryview) else v for v in row)
                        for row in db.execute(f"SELECT * FROM {table}").fetchall()
                    ),
                    key=repr,
                )
                for table in TABLES
            }


def open_postgres(url: str, create: bool = True) -> PostgresLedger:
    """The ledger in the database a ``postgresql://`` URL names (libpq's URI syntax)."""
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as e:
        raise LedgerOpenError(f"ledger URL {redacted(url)!r}: {_first_line(e)}") from None
    return PostgresLedger(url, create=create)
