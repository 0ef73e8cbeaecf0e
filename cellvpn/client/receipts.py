"""The client's own record of every receipt it signed, and the checks before it signs one.

The record is an append-only JSON-lines file in the client's state folder, written (and
fsynced) before the signed receipt leaves, so a user can audit the provider's report against
it (``cellvpn-ctl ledger receipts --local``) and so the client never signs the same
``receipt_info`` twice, even across restarts.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellvpn.billing.keys import signed_by
from cellvpn.billing.records import Order
from cellvpn.wire.receipt import RECEIPT_VERSION, Receipt
from cellvpn.wire.service import SRV_UID_VPN

#: The record's file name in the client's state folder.
RECORD_FILE = "receipts.jsonl"


def check_receipt(
    receipt: Receipt,
    order: Order,
    max_unit_price: int,
    known_states: set[bytes],
    signed_before: set[bytes],
) -> str | None:
    """Why the client must not sign ``receipt`` (None: it may). Pure: no I/O, no clock."""
    info = receipt.info
    if info.srv_uid != SRV_UID_VPN:
        return f"receipt is for service {info.srv_uid}, not the VPN"
    if info.version != RECEIPT_VERSION:
        return f"receipt version {info.version} is not {RECEIPT_VERSION}"
    if info.units_type != order.unit:
        return "receipt unit differs from the order's"
    if not 0 < info.units <= order.units:
        return f"receipt is for {info.units} units; the order sells {order.units} at a time"
    if info.value > info.units * max_unit_price:
        return (
            f"receipt asks {info.value} for {info.units} units, above this client's "
            f"max_unit_price {max_unit_price}"
        )
    if info.value * order.units > order.price * info.units:
        return f"receipt asks {info.value} for {info.units} units, above the order's price"
    unsigned = receipt.unsigned_bytes()
    if unsigned is not None:
        return unsigned
    if info.prev_hash not in known_states:
        return "receipt does not follow the deposit's state this client knows (prev hash)"
    if hashlib.sha3_256(receipt.info_bytes).digest() in signed_before:
        return "this client signed that receipt already"
    if not receipt.signatures or receipt.signatures[0].public_key != order.provider:
        return "receipt is not signed by the order's provider"
    if not signed_by(receipt.signatures[0], order.provider, receipt.info_bytes):
        return "the provider's signature on the receipt is not valid"
    return None


def set_aside(path: Path, data: bytes) -> Path:
    """Write ``data`` to a new ``<path>.torn-<unix time>`` (mode 0600, fsynced with its
    folder) and return its path; an existing file of that name is never overwritten."""
    stamp = int(time.time())
    for n in range(1000):
        aside = path.with_name(f"{path.name}.torn-{stamp}" + (f".{n}" if n else ""))
        try:
            fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
        return aside
    raise FileExistsError(f"no free name for the torn tail of {path}")


@dataclass
class ReceiptBook:
    """What this client signed, per deposit; loaded from and appended to ``path``."""

    path: Path

    def __post_init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.signed_infos: set[bytes] = set()
        #: a torn last line (a crash while it was written) that was cut off at load
        self.torn: bytes | None = None
        #: where that line was set aside, next to the record
        self.torn_aside: Path | None = None
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return
        if raw and not raw.endswith(b"\n"):
            # A record is written before its receipt leaves, so a line cut short by a crash
            # is a receipt that was never sent: drop it, or every later append would be lost
            # in the same unreadable line. It is kept aside first, for a person to look at.
            keep = raw.rfind(b"\n") + 1
            self.torn = raw[keep:]
            raw = raw[:keep]
            try:
                self.torn_aside = set_aside(self.path, self.torn)
                with open(self.path, "r+b") as f:
                    f.truncate(keep)
                    os.fsync(f.fileno())
            except OSError as e:
                raise ValueError(
                    f"{self.path} ends in a torn line that cannot be set aside and cut off: "
                    f"{e.strerror or e}"
                ) from e
        for number, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError as e:
                raise ValueError(
                    f"{self.path} line {number} is unreadable ({e}); this client's record of "
                    "what it signed is damaged"
                ) from e
            self.entries.append(entry)
            if "info" in entry:
                info = bytes.fromhex(entry["info"])
                self.signed_infos.add(hashlib.sha3_256(info).digest())

    def chain(self, deposit: bytes, prev: bytes, provider: bytes) -> tuple[int, int]:
        """Units of ``provider``'s receipts this client signed on the chain that ends at
        ``prev`` (what a receipt following ``prev`` adds to), and the units of the last.

        Receipts beside that chain (another answer to the same prev, lost on the way) can no
        longer be redeemed once one following ``prev`` is, so they do not count.
        """
        links: dict[str, dict[str, Any]] = {}
        for entry in self.entries:
            if entry["event"] == "signed" and entry.get("deposit") == deposit.hex():
                links[entry["receipt"]] = entry
        committed = last = 0
        at = prev.hex()
        seen: set[str] = set()
        while at in links and at not in seen:
            seen.add(at)
            entry = links[at]
            if entry.get("provider") == provider.hex():
                committed += int(entry["units"])
                if not last:
                    last = int(entry["units"])
            at = entry["prev"]
        return committed, last

    def states(self, deposit: bytes) -> set[bytes]:
        """The prev hashes a next receipt may name: the deposit itself, or after the last
        receipt confirmed, or after the last one signed (its confirmation may have been lost)."""
        confirmed = deposit
        signed = deposit
        for entry in self.entries:
            if entry.get("deposit") != deposit.hex():
                continue
            if entry["event"] == "signed":
                signed = bytes.fromhex(entry["receipt"])
            elif entry["event"] == "confirmed":
                confirmed = bytes.fromhex(entry["receipt"])
        return {confirmed, signed}

    def _append(self, entry: dict[str, Any]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.entries.append(entry)

    def signed(self, deposit: bytes, receipt: Receipt, provider: bytes) -> None:
        info = receipt.info
        self._append(
            {
                "event": "signed",
                "time": time.time(),
                "deposit": deposit.hex(),
                "provider": provider.hex(),
                "receipt": receipt.hash.hex(),
                "info": receipt.info_bytes.hex(),
                "units": info.units,
                "unit": info.units_type,
                "value": str(info.value),
                "prev": info.prev_hash.hex(),
            }
        )
        self.signed_infos.add(hashlib.sha3_256(receipt.info_bytes).digest())

    def confirmed(self, deposit: bytes, receipt_hash: bytes) -> None:
        self._append(
            {
                "event": "confirmed",
                "time": time.time(),
                "deposit": deposit.hex(),
                "receipt": receipt_hash.hex(),
            }
        )

    def receipts(self) -> list[dict[str, Any]]:
        """Every signed receipt, marked confirmed when the server said it was redeemed."""
        confirmed = {e["receipt"] for e in self.entries if e["event"] == "confirmed"}
        return [
            {**e, "confirmed": e["receipt"] in confirmed}
            for e in self.entries
            if e["event"] == "signed"
        ]
