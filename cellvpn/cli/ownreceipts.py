"""``cellvpn-ctl ledger receipts --local``: the receipts this client signed, from its own record.

A user audits the provider's word (``ledger receipts``, ``ledger report``) against what the
client itself signed: :class:`cellvpn.client.receipts.ReceiptBook` keeps every receipt before it
leaves, in ``<state_dir>/receipts.jsonl``. The record is read from that file (``--state-dir``,
default the client's) or, with ``--socket``, from the running client over its control socket
(for a user who may use the socket but not read the client's state folder).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cellvpn.cli.control import CtlError, call
from cellvpn.cli.ledger import Answer, _account_arg, _hash_arg, _unit_name, _when
from cellvpn.client.receipts import RECORD_FILE, ReceiptBook

DEFAULT_STATE_DIR = Path("/var/lib/cellvpn-client")


def receipt_facts(entry: dict[str, Any]) -> dict[str, Any]:
    """One signed receipt of the record, as ``--json`` shows it (money as a decimal string)."""
    return {
        "time": float(entry["time"]),
        "deposit": str(entry["deposit"]),
        "provider": entry.get("provider"),
        "hash": str(entry["receipt"]),
        "units": int(entry["units"]),
        "unit": _unit_name(int(entry["unit"])),
        "value": str(int(entry["value"])),
        "prev": str(entry["prev"]),
        "confirmed": bool(entry.get("confirmed", False)),
        "info": entry.get("info"),
    }


def _line(f: dict[str, Any]) -> str:
    state = "confirmed" if f["confirmed"] else "not confirmed"
    return (
        f"{_when(f['time'])} receipt {f['hash']}: deposit {f['deposit']}, {f['units']} "
        f"{f['unit']} for {f['value']} datoshi, provider {f['provider']}, prev {f['prev']}, "
        f"{state}"
    )


def _from_client(socket: str) -> list[Any]:
    entries = call(socket, "local_receipts", {})
    if not isinstance(entries, list):
        raise CtlError(f"the service at {socket} did not answer with a receipt list")
    return entries


def _from_file(path: Path) -> list[Any]:
    try:
        return ReceiptBook(path).receipts()
    except OSError as e:
        raise CtlError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CtlError(f"{path} is not a receipt record: {e!r}") from None


def own_receipts(ns: argparse.Namespace) -> Answer:
    """The ``receipts --local`` answer: every receipt signed, oldest first, and the totals."""
    if getattr(ns, "ledger", None) is not None:
        raise CtlError("--local reads the client's own record, not a ledger: leave out --ledger")
    if ns.client is not None:
        raise CtlError("--client does not go with --local: the record is this client's own")
    socket = getattr(ns, "socket", None)
    if socket and ns.state_dir is not None:
        raise CtlError("--socket and --state-dir name two records: give one")
    deposit = None if ns.deposit is None else _hash_arg(ns.deposit, "--deposit").hex()
    provider = None if ns.provider is None else _account_arg(ns.provider, "--provider")[0].hex()
    if socket:
        source = f"the client at {socket}"
        entries = _from_client(socket)
    else:
        path = Path(ns.state_dir or DEFAULT_STATE_DIR) / RECORD_FILE
        source = str(path)
        if not path.exists():
            return Answer(_totals([], source), f"no receipts: {path} does not exist")
        entries = _from_file(path)
    try:
        facts = [receipt_facts(e) for e in entries]
    except (ValueError, KeyError, TypeError) as e:
        raise CtlError(f"{source} holds a malformed receipt entry: {e!r}") from None
    facts = [
        f
        for f in facts
        if (deposit is None or f["deposit"] == deposit)
        and (provider is None or f["provider"] == provider)
    ]
    result = _totals(facts, source)
    lines = [_line(f) for f in facts]
    lines.append(
        f"{len(facts)} receipt(s) signed, {result['confirmed']} confirmed; {result['total']} "
        f"datoshi signed, {result['confirmed_total']} confirmed"
    )
    return Answer(result, "\n".join(lines))


def _totals(facts: list[dict[str, Any]], source: str) -> dict[str, Any]:
    return {
        "receipts": facts,
        "record": source,
        "signed": len(facts),
        "confirmed": sum(1 for f in facts if f["confirmed"]),
        "total": str(sum(int(f["value"]) for f in facts)),
        "confirmed_total": str(sum(int(f["value"]) for f in facts if f["confirmed"])),
    }
