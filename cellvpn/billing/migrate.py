"""Copying a ledger from one backend to another (SQLite to PostgreSQL, or back), row by row.

Both ledgers hold schema 4's tables with the same columns; only how a number is stored
differs (decimal text in SQLite, NUMERIC in PostgreSQL). A copy reads every row of the source
in one snapshot as plain Python values (ints for money, in the order the rows were added),
writes them into an empty target in one transaction, and is accepted only when the target's
:meth:`check_invariant` figures equal the source's.
"""

from __future__ import annotations

from typing import Any, Protocol

#: What a copy holds: every table's rows, each a tuple in :data:`COLUMNS`' order.
Rows = dict[str, list[tuple[Any, ...]]]

#: The columns copied, per table, in the order the tables are written (deposits before the
#: receipts and leases that refer to them). ``meta`` is not copied: each ledger writes its own
#: schema version, and the two must be equal.
COLUMNS: dict[str, tuple[str, ...]] = {
    "accounts": ("account", "public", "balance"),
    "mints": ("account", "value", "at"),
    "orders": ("hash", "provider", "signed", "added"),
    "deposits": (
        "id", "owner", "owner_public", "srv_uid", "unit", "max_unit_price", "initial", "locked",
        "returned", "expires", "state_hash", "receipts", "closed", "active_usage", "created",
        "signed",
    ),
    "receipts": (
        "hash", "deposit", "seq", "provider", "client", "unit", "units", "value", "prev_hash",
        "redeemed_at", "encoded",
    ),
    "limits": ("provider", "client", "deposit", "bytes_left", "seconds_left", "saved_at"),
    "bans": ("provider", "client", "until"),
    "usage": ("provider", "client", "kind", "seconds", "bytes", "value"),
    "grace": ("provider", "subject", "at", "seconds", "bytes"),
    "leases": ("deposit", "until"),
    "clients": (
        "fleet", "serial", "name", "fingerprint", "not_after", "enrolled_at", "revoked_at",
    ),
    "offers": ("provider", "instance", "signed", "renewed"),
}  # fmt: skip

#: Columns that hold integers beyond 64 bits (SQLite stores them as decimal text).
BIG_INTEGERS = frozenset(
    {
        "balance", "value", "srv_uid", "max_unit_price", "initial", "locked", "returned",
        "expires", "units", "bytes_left", "bytes",
    }
)  # fmt: skip


class MigrateError(Exception):
    """A copy that was refused or does not add up; one line for the user."""


class Copyable(Protocol):
    def export_rows(self) -> Rows: ...

    def import_rows(self, rows: Rows) -> None: ...

    def check_invariant(self) -> tuple[bool, dict[str, Any]]: ...


def normalise(table: str, row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A row as plain Python values: ints for big integers, bytes for blobs."""
    out: list[Any] = []
    for column, value in zip(COLUMNS[table], row, strict=True):
        if value is not None and column in BIG_INTEGERS:
            value = int(value)
        elif isinstance(value, memoryview | bytearray):
            value = bytes(value)
        out.append(value)
    return tuple(out)


def migrate(source: Copyable, target: Copyable) -> dict[str, Any]:
    """Copy every row of ``source`` into the empty ``target``; the figures both agree on."""
    ok, before = source.check_invariant()
    if not ok:
        raise MigrateError(
            "the source ledger does not add up, so it is not copied: "
            + "; ".join(before["problems"])
        )
    rows = source.export_rows()
    target.import_rows(rows)
    ok, after = target.check_invariant()
    if not ok or after != before:
        raise MigrateError(
            f"the copy does not add up: source {before}, target {after}; the target now holds "
            "the copied rows and should be emptied before another try"
        )
    return {"rows": {table: len(r) for table, r in rows.items()}, "invariant": after}
