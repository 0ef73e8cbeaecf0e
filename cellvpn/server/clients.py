"""The enrolled clients of a server, and the ones it revoked: a small sans-IO registry.

The server signs a client certificate for each ``cellvpn-ctl client add NAME`` and writes the
record here; ``client revoke NAME`` marks every certificate of that name revoked. The registry
is kept as JSON in ``state_dir/clients.json`` (:meth:`ClientRegistry.to_json`), so revocations
hold across restarts. A certificate is identified by its serial number (lowercase hex).

Revocation is a deny list: a certificate of the server's CA that the registry does not know
(a lost ``clients.json``) is still served, named by its CN, and the server says so in its log.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

#: Format of clients.json; a file of another version is refused at start.
VERSION = 1


class RegistryError(Exception):
    """A registry file or a request the registry refuses; the message is for the operator."""


@dataclass(frozen=True)
class ClientRecord:
    """One certificate the server signed for a client."""

    name: str
    serial: str
    fingerprint: str
    not_after: float
    enrolled_at: float
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


class ClientRegistry:
    """Records by serial, in the order they were enrolled; ``last_seen`` lives in memory."""

    def __init__(self, records: Iterable[ClientRecord] = ()) -> None:
        self._records: dict[str, ClientRecord] = {}
        self.last_seen: dict[str, float] = {}
        for record in records:
            self._records[record.serial] = record

    # --- reading -------------------------------------------------------------------------

    def records(self) -> list[ClientRecord]:
        return list(self._records.values())

    def get(self, serial: str) -> ClientRecord | None:
        return self._records.get(serial)

    def is_revoked(self, serial: str) -> bool:
        record = self._records.get(serial)
        return record is not None and record.revoked

    def current(self, name: str, now: float) -> list[ClientRecord]:
        """The certificates of ``name`` that are neither revoked nor expired."""
        return [
            r
            for r in self._records.values()
            if r.name == name and not r.revoked and r.not_after > now
        ]

    # --- changing ------------------------------------------------------------------------

    def check_new(self, name: str, now: float) -> None:
        """Refuse a second live certificate for one name: revoke the first one before."""
        if self.current(name, now):
            raise RegistryError(
                f"client {name!r} is enrolled already; revoke it first "
                f"(cellvpn-ctl client revoke {name}) or choose another name"
            )

    def add(self, record: ClientRecord) -> None:
        if record.serial in self._records:
            raise RegistryError(f"a certificate with serial {record.serial} is known already")
        self._records[record.serial] = record

    def revoke(self, name: str, now: float) -> list[ClientRecord]:
        """Mark every unrevoked certificate of ``name`` revoked; the records that changed."""
        known = [r for r in self._records.values() if r.name == name]
        if not known:
            raise RegistryError(f"no client is named {name!r} (cellvpn-ctl client list shows them)")
        changed = []
        for record in known:
            if not record.revoked:
                new = replace(record, revoked_at=now)
                self._records[record.serial] = new
                changed.append(new)
        if not changed:
            raise RegistryError(f"client {name!r} is revoked already")
        return changed

    def update(self, records: Iterable[ClientRecord]) -> None:
        """Take these records as they are now (changed in the fleet's ledger)."""
        for record in records:
            self._records[record.serial] = record

    def replace_all(self, records: Iterable[ClientRecord]) -> list[ClientRecord]:
        """Take the records as they are now (a fleet's shared ledger read again); the ones
        newly revoked. What was seen when stays."""
        fresh = {r.serial: r for r in records}
        revoked = [
            r
            for r in fresh.values()
            if r.revoked and not (r.serial in self._records and self._records[r.serial].revoked)
        ]
        self._records = fresh
        return revoked

    def seen(self, serial: str, now: float) -> None:
        self.last_seen[serial] = now

    # --- the file ------------------------------------------------------------------------

    def to_json(self) -> str:
        body = {"version": VERSION, "clients": [asdict(r) for r in self._records.values()]}
        return json.dumps(body, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "clients.json") -> ClientRegistry:
        """A registry from its file; :class:`RegistryError` naming ``where`` if it is not one."""
        try:
            body: Any = json.loads(text)
        except ValueError as e:
            raise RegistryError(f"{where} is not JSON ({e})") from None
        if not isinstance(body, dict) or body.get("version") != VERSION:
            raise RegistryError(f"{where}: expected a version {VERSION} client registry")
        items = body.get("clients")
        if not isinstance(items, list):
            raise RegistryError(f"{where}: expected a list of clients")
        records = []
        for i, item in enumerate(items):
            try:
                records.append(_record(item))
            except (TypeError, ValueError, KeyError) as e:
                raise RegistryError(
                    f"{where}: client {i + 1} is not a valid record ({e})"
                ) from None
        return cls(records)


def _record(item: Any) -> ClientRecord:
    if not isinstance(item, dict):
        raise TypeError("not an object")
    revoked = item.get("revoked_at")
    record = ClientRecord(
        name=str(item["name"]),
        serial=str(item["serial"]),
        fingerprint=str(item["fingerprint"]),
        not_after=float(item["not_after"]),
        enrolled_at=float(item["enrolled_at"]),
        revoked_at=None if revoked is None else float(revoked),
    )
    int(record.serial, 16)
    return record
