"""``cellvpn-ctl ledger ...``: keys, accounts, deposits, orders, receipts and usage.

Each command is a function ``(ledger, ns) -> Answer`` over any :class:`ILedger`: the ledger
is opened from ``--ledger URL``, or, with ``--socket PATH``, a running server runs the same
function on its own ledger (:mod:`cellvpn.cli.viasocket`). Keys are read and records signed
here, on the user's side, so a private key never goes to the ledger.

Money (datoshi, possibly over 2**53) is a decimal string in ``--json`` answers, so no JSON
reader rounds it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cellvpn.billing.interfaces import (
    DepositRow,
    ILedger,
    LedgerError,
    LedgerUnavailableError,
    ReceiptRow,
    UsageTotals,
)
from cellvpn.billing.keys import KeyFileError, KeyPair, account_of, create_key, load_key
from cellvpn.billing.migrate import MigrateError, migrate
from cellvpn.billing.records import (
    DepositClose,
    DepositRequest,
    Order,
    SignedClose,
    SignedDeposit,
    SignedOrder,
    token_ok,
)
from cellvpn.billing.sqlite import LedgerOpenError, open_ledger
from cellvpn.cli.control import CtlError
from cellvpn.wire.receipt import Unit
from cellvpn.wire.service import SRV_UID_VPN, ErrorCode

DEFAULT_LEDGER_URL = "sqlite:////var/lib/cellvpn/ledger.db"
#: Default lifetime of a deposit or an order created here: 30 days.
DEFAULT_EXPIRES_S = 30 * 86400
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_UNITS = {"SEC": Unit.SEC, "B": Unit.B, "BYTES": Unit.B}


class _BadArgumentError(Exception):
    """An argument that cannot be used; one line for the user."""


@dataclass(frozen=True)
class Answer:
    """A command's result: JSON facts for ``--json`` and the human text."""

    result: dict[str, Any]
    text: str


LedgerCommand = Callable[[ILedger, argparse.Namespace], Answer]


# --- argument values ---------------------------------------------------------------------


def _hash_arg(text: str, what: str) -> bytes:
    if not _HEX64.fullmatch(text):
        raise _BadArgumentError(f"{what} must be 64 hex digits, not {text!r}")
    return bytes.fromhex(text)


def _account_arg(text: str, what: str = "account") -> tuple[bytes, bytes | None]:
    """An account given as 64 hex digits or as a key file; the key's public part if a file."""
    if _HEX64.fullmatch(text):
        return bytes.fromhex(text), None
    if os.path.exists(text):
        key = load_key(text)
        return key.account, key.public
    raise _BadArgumentError(f"{what} {text!r} is neither 64 hex digits nor a key file")


def _value_arg(text: str, what: str, allow_zero: bool = False) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise _BadArgumentError(f"{what} must be a whole number of datoshi, not {text!r}") from None
    if value < 0 or (value == 0 and not allow_zero):
        raise _BadArgumentError(f"{what} must be {'at least 0' if allow_zero else 'positive'}")
    return value


def _unit_arg(text: str) -> Unit:
    unit = _UNITS.get(text.upper())
    if unit is None:
        raise _BadArgumentError(f"unit must be SEC or B, not {text!r}")
    return unit


def _unit_name(unit: int) -> str:
    try:
        return Unit(unit).name
    except ValueError:
        return f"0x{unit:x}"


def _when(seconds: float) -> str:
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):
        return f"{seconds:.0f} (unix seconds)"


def _expiry(ns: argparse.Namespace, now: float) -> int:
    if ns.expires <= 0:
        raise _BadArgumentError("--expires must be a positive number of seconds from now")
    expires: int = int(now) + ns.expires
    return expires


# --- JSON facts ---------------------------------------------------------------------------


def deposit_facts(dep: DepositRow, now: float) -> dict[str, Any]:
    return {
        "id": dep.id.hex(),
        "owner": dep.owner.hex(),
        "owner_public": dep.owner_public.hex(),
        "srv_uid": dep.srv_uid,
        "unit": _unit_name(dep.unit),
        "max_unit_price": str(dep.max_unit_price),
        "initial": str(dep.initial),
        "locked": str(dep.locked),
        "returned": str(dep.returned),
        "expires": dep.expires,
        "expired": dep.expired(now),
        "state_hash": dep.state_hash.hex(),
        "closed": dep.closed,
        "active_usage": dep.active_usage,
        "created": dep.created,
        "receipts": dep.receipts,
    }


def order_facts(signed: SignedOrder, now: float) -> dict[str, Any]:
    o = signed.order
    return {
        "hash": o.hash.hex(),
        "provider": account_of(o.provider).hex(),
        "provider_public": o.provider.hex(),
        "srv_uid": o.srv_uid,
        "unit": _unit_name(o.unit),
        "units": o.units,
        "price": str(o.price),
        "token": o.token,
        "node_addr": o.node_addr,
        "expires": o.expires,
        "expired": now >= o.expires,
        "signed": signed.encode().hex(),
    }


def receipt_facts(row: ReceiptRow) -> dict[str, Any]:
    return {
        "hash": row.hash.hex(),
        "deposit": row.deposit_id.hex(),
        "seq": row.seq,
        "provider": row.provider.hex(),
        "client": row.client.hex(),
        "unit": _unit_name(row.unit),
        "units": row.units,
        "value": str(row.value),
        "prev_hash": row.prev_hash.hex(),
        "redeemed_at": row.redeemed_at,
    }


def _totals(t: UsageTotals) -> dict[str, Any]:
    return {"seconds": t.seconds, "bytes": t.bytes, "value": str(t.value)}


# --- the commands -------------------------------------------------------------------------


def cmd_balance(ledger: ILedger, ns: argparse.Namespace) -> Answer:
    account, _ = _account_arg(ns.account)
    balance = ledger.balance(account)
    result = {"account": account.hex(), "balance": str(balance)}
    return Answer(result, f"account {account.hex()}: balance {balance} datoshi")


def cmd_mint(ledger: ILedger, ns: argparse.Namespace) -> Answer:
    account, public = _account_arg(ns.account)
    value = _value_arg(ns.value, "VALUE")
    balance = ledger.mint(account, value, public)
    result = {"account": account.hex(), "minted": str(value), "balance": str(balance)}
    return Answer(result, f"minted {value} datoshi to {account.hex()}; balance {balance}")


def _state(facts: dict[str, Any]) -> str:
    return "closed" if facts["closed"] else ("expired" if facts["expired"] else "open")


def _deposit_text(facts: dict[str, Any]) -> str:
    lines = [
        f"deposit {facts['id']} ({_state(facts)})",
        f"  owner..............{facts['owner']}",
        f"  unit...............{facts['unit']}, max unit price {facts['max_unit_price']}",
        f"  locked.............{facts['locked']} of {facts['initial']}",
        f"  expires............{_when(facts['expires'])}",
        f"  state hash.........{facts['state_hash']}",
    ]
    if facts["closed"]:
        lines.append(f"  returned...........{facts['returned']}")
    if facts["active_usage"]:
        lines.append(f"  in use by..........{facts['active_usage']}")
    lines.append(f"  receipts...........{facts['receipts']}")
    return "\n".join(lines)


def cmd_deposit_create(ledger: ILedger, ns: argparse.Namespace) -> Answer:
    key = load_key(ns.key)
    now = time.time()
    request = DepositRequest(
        owner=key.public,
        unit=_unit_arg(ns.unit),
        max_unit_price=_value_arg(ns.max_unit_price, "--max-unit-price"),
        value=_value_arg(ns.value, "--value"),
        expires=_expiry(ns, now),
        nonce=secrets.token_bytes(16),
        srv_uid=SRV_UID_VPN,
    )
    row = ledger.create_deposit(SignedDeposit.sign(request, key), now)
    balance = ledger.balance(key.account)
    facts = {**deposit_facts(row, now), "owner_balance": str(balance)}
    text = (
        f"deposit {row.id.hex()} created: {row.locked} datoshi locked, unit "
        f"{_unit_name(row.unit)}, max unit price {row.max_unit_price}, expires "
        f"{_when(row.expires)}\naccount {key.account_hex}: balance {balance}"
    )
    return Answer(facts, text)


def cmd_deposit_show(ledger: ILedger, ns: argparse.Namespace) -> Answer:
    deposit_id = _hash_arg(ns.id, "deposit id")
    row = ledger.get_deposit(deposit_id)
    if row is None:
        raise LedgerError(ErrorCode.TX_COND_NOT_FOUND, f"no deposit {deposit_id.hex()}")
    facts = deposit_facts(row, time.time())
    return Answer(facts, _deposit_text(facts))


def cmd_deposit_list(ledger: ILedger, ns: argparse.Namespace) -> Answer:
    owner = None if ns.owner is None else _account_arg(ns.owner, "--owner")[0]
    now = time.time()
    facts = [deposit_facts(row, now) for row in ledger.deposits(owner)]
    lines = [
        f"deposit {f['id']}: {_state(f)}, {f['locked']} of {f['initial']} locked, unit "
        f"{f['unit']}, owner {f['owner']}, expires {_when(f['expires'])}"
        for f in facts
    ]
    return Answer({"deposits": facts}, "\n".join(lines) or "no deposits")


def cmd_deposit_close(ledger: ILedger, ns: argparse.Namespace) -> Answer:
    key = load_key(ns.key)
    deposit_id = _hash_arg(ns.id, "deposit id")
    close = DepositClose(deposit_id, key.public, secrets.token_bytes(16))
    returned = ledger.close_deposit(SignedClose.sign(close, key), time.time())
    balance = ledger.balance(key.account)
    result = {
        "deposit": deposit_id.hex(),
        "returned": str(returned),
        "owner": key.account_hex,
        "balance": str(balance),
    }
    text = (
        f"deposit {deposit_id.hex()} closed: {returned} datoshi returned to "
        f"{key.account_hex}; balance {balance}"
    )
    return Answer(result, text)


def _order_line(facts: dict[str, Any]) -> str:
    expired = " (expired)" if facts["expired"] else ""
    return (
        f"order {facts['hash']}: {facts['price']} datoshi of {facts['token']} for {facts['units']} "
        f"{facts['unit']}, provider {facts['provider']}, node 0x{facts['node_addr']:016x}, "
        f"expires {_when(facts['expires'])}{expired}"
    )


def cmd_order_create(ledger: ILedger, ns: argparse.Namespace) -> Answer:
    key = load_key(ns.key)
    now = time.time()
    if not token_ok(ns.token):
        raise _BadArgumentError(
            f"--token must be 1-10 printable ASCII characters, not {ns.token!r}"
        )
    if ns.units <= 0 or ns.units >= 1 << 64:
        raise _BadArgumentError("--units must be a positive u64")
    if not 0 <= ns.node_addr < 1 << 64:
        raise _BadArgumentError("--node-addr must be a u64")
    order = Order(
        unit=_unit_arg(ns.unit),
        units=ns.units,
        price=_value_arg(ns.price, "--price", allow_zero=True),
        token=ns.token,
        provider=key.public,
        expires=_expiry(ns, now),
        node_addr=ns.node_addr,
        srv_uid=SRV_UID_VPN,
    )
    signed = SignedOrder.sign(order, key)
    ledger.put_order(signed)
    facts = order_facts(signed, now)
    return Answer(facts, _order_line(facts).replace(": ", " created: ", 1))


def cmd_order_list(ledger: ILedger, ns: argparse.Namespace) -> Answer:
    provider = None if ns.provider is None else _account_arg(ns.provider, "--provider")[0]
    now = time.time()
    facts = [order_facts(o, now) for o in ledger.orders(provider)]
    text = "\n".join(_order_line(f) for f in facts) or "no orders"
    return Answer({"orders": facts}, text)


def cmd_receipts(ledger: ILedger, ns: argparse.Namespace) -> Answer:
    deposit_id = None if ns.deposit is None else _hash_arg(ns.deposit, "--deposit")
    client = None if ns.client is None else _account_arg(ns.client, "--client")[0]
    provider = None if ns.provider is None else _account_arg(ns.provider, "--provider")[0]
    rows = ledger.receipts(deposit_id=deposit_id, client=client, provider=provider)
    facts = [receipt_facts(r) for r in rows]
    lines = [
        f"receipt {f['hash']}: deposit {f['deposit']} #{f['seq']}, {f['units']} {f['unit']} "
        f"for {f['value']} datoshi, provider {f['provider']}, client {f['client']}, "
        f"{_when(f['redeemed_at'])}"
        for f in facts
    ]
    total = sum(r.value for r in rows)
    lines.append(f"{len(rows)} receipt(s), {total} datoshi")
    return Answer({"receipts": facts, "total": str(total)}, "\n".join(lines))


def cmd_report(ledger: ILedger, ns: argparse.Namespace) -> Answer:
    provider = None if ns.provider is None else _account_arg(ns.provider, "--provider")[0]
    rows = ledger.report(provider)
    facts = [
        {
            "provider": r.provider.hex(),
            "client": r.client.hex(),
            "paid": _totals(r.paid),
            "grace": _totals(r.grace),
            "free": _totals(r.free),
        }
        for r in rows
    ]
    lines: list[str] = []
    for r in rows:
        lines.append(f"client {r.client.hex()} (provider {r.provider.hex()})")
        for kind, t in (("paid", r.paid), ("grace", r.grace), ("free", r.free)):
            lines.append(
                f"  {kind.ljust(19, '.')}{t.seconds:.0f} s, {t.bytes} bytes, {t.value} datoshi"
            )
    return Answer({"report": facts}, "\n".join(lines) or "no usage recorded")


def cmd_get_limits(ledger: ILedger, ns: argparse.Namespace) -> Answer:
    provider = _account_arg(ns.provider, "--provider")[0]
    client = _account_arg(ns.client, "--client")[0]
    limits = ledger.load_limits(provider, client)
    result: dict[str, Any] = {
        "provider": provider.hex(),
        "client": client.hex(),
        "sec": 0 if limits is None else limits.seconds_left,
        "bytes": 0 if limits is None else limits.bytes_left,
        "saved_at": None if limits is None else limits.saved_at,
    }
    if limits is None:
        text = f"no saved limits for client {client.hex()} with provider {provider.hex()}"
    else:
        text = (
            f"provider {provider.hex()}\nclient {client.hex()}\nsec {limits.seconds_left:.0f}\n"
            f"bytes {limits.bytes_left}\nsaved at {_when(limits.saved_at)}"
        )
    return Answer(result, text)


def cmd_keygen(ns: argparse.Namespace) -> Answer:
    key: KeyPair = create_key(ns.path)
    result = {"path": str(ns.path), "account": key.account_hex, "public": key.public.hex()}
    return Answer(result, f"created key {ns.path} (mode 0600)\naccount {key.account_hex}")


def cmd_migrate(ns: argparse.Namespace) -> Answer:
    """Copy every table of one ledger into another, empty one (SQLite to PostgreSQL or back)."""
    if ns.source == ns.target:
        raise _BadArgumentError("--from and --to name the same ledger")
    source = open_ledger(ns.source, create=False)
    try:
        target = open_ledger(ns.target, create=True)
        try:
            copied = migrate(source, target)
        finally:
            target.close()
    finally:
        source.close()
    figures = copied["invariant"]
    result = {
        "rows": copied["rows"],
        "invariant": {k: str(v) if isinstance(v, int) else v for k, v in figures.items()},
    }
    counts = ", ".join(f"{n} {table}" for table, n in copied["rows"].items())
    text = (
        f"copied {counts}\nboth ledgers add up the same: minted {figures['minted']}, balances "
        f"{figures['balances']}, locked {figures['locked']}, redeemed {figures['redeemed']}"
    )
    return Answer(result, text)


# --- running them -------------------------------------------------------------------------


def _fail(message: str) -> Exception:
    return CtlError(message)


def _emit(ns: argparse.Namespace, answer: Answer) -> None:
    if ns.json:
        print(json.dumps(answer.result, indent=2, sort_keys=True))
    else:
        print(answer.text)


def _guarded(run: Callable[[], Answer]) -> Answer:
    """The answer, or one line (a CtlError, exit status 2) for any refusal or bad input."""
    try:
        return run()
    except LedgerError as e:
        raise _fail(f"ledger refused: {e.summary}") from None
    except (
        _BadArgumentError,
        KeyFileError,
        LedgerOpenError,
        LedgerUnavailableError,
        MigrateError,
    ) as e:
        raise _fail(str(e)) from None
    except ValueError as e:  # a value the records or the ledger cannot take
        raise _fail(str(e)) from None


class LedgerHandler:
    """A ctl handler that runs ``command`` on ``--ledger``, or in the server at ``--socket``."""

    def __init__(self, command: LedgerCommand, create: bool = False) -> None:
        self.command = command
        self.create = create

    def __call__(self, ns: argparse.Namespace) -> int:
        if getattr(ns, "socket", None):
            from cellvpn.cli.viasocket import call_server

            _emit(ns, call_server(ns))
            return 0

        def run() -> Answer:
            ledger = open_ledger(ns.ledger or DEFAULT_LEDGER_URL, create=self.create)
            try:
                return self.command(ledger, ns)
            finally:
                ledger.close()

        _emit(ns, _guarded(run))
        return 0


def run_with_ledger(command: LedgerCommand, create: bool = False) -> LedgerHandler:
    """The handler of ``command``; ``create``: the only one that may create a ledger file."""
    return LedgerHandler(command, create)


class _ReceiptsHandler(LedgerHandler):
    """``receipts``: the ledger's, or with ``--local`` the ones this client signed."""

    def __call__(self, ns: argparse.Namespace) -> int:
        if not ns.local:
            if ns.state_dir is not None:
                raise _fail("--state-dir goes with --local")
            return super().__call__(ns)
        from cellvpn.cli.ownreceipts import own_receipts

        _emit(ns, _guarded(lambda: own_receipts(ns)))
        return 0


def _migrate_handler(ns: argparse.Namespace) -> int:
    if getattr(ns, "socket", None):
        raise _fail("migrate copies between two ledgers it opens itself; it has no --socket")
    _emit(ns, _guarded(lambda: cmd_migrate(ns)))
    return 0


def _keygen_handler(ns: argparse.Namespace) -> int:
    if getattr(ns, "socket", None):
        from cellvpn.cli.viasocket import KEYGEN_REFUSAL

        raise _fail(KEYGEN_REFUSAL)
    _emit(ns, _guarded(lambda: cmd_keygen(ns)))
    return 0


_SOCKET_HELP = (
    "run the command in the server at this control socket, on its ledger "
    "(receipts --local: the client's socket)"
)


def add_ledger_commands(subparsers: Any) -> None:
    """Register ``ledger`` and its actions on cellvpn-ctl's sub-command parsers."""
    # Accepted after the action as well as before it (``ledger balance X --json``).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ledger", metavar="URL", default=argparse.SUPPRESS, help="ledger URL")
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the answer as JSON"
    )
    common.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS, help=_SOCKET_HELP)
    p = subparsers.add_parser(
        "ledger", help="the billing ledger: accounts, deposits, orders, receipts, usage"
    )
    p.add_argument(
        "--ledger",
        metavar="URL",
        default=None,
        help=(
            "sqlite:////absolute/path, sqlite:relative/path or postgresql://user@host/db "
            f"(default {DEFAULT_LEDGER_URL})"
        ),
    )
    p.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS, help=_SOCKET_HELP)
    actions = p.add_subparsers(dest="ledger_action", metavar="ACTION", required=True)

    a = actions.add_parser("keygen", parents=[common], help="create a 0600 Ed25519 key file")
    a.add_argument("path", help="key file to create (never overwritten)")
    a.set_defaults(handler=_keygen_handler)

    a = actions.add_parser(
        "migrate",
        parents=[common],
        help="copy every table into another, empty ledger and check both add up the same",
    )
    a.add_argument("--from", dest="source", required=True, metavar="URL", help="ledger to copy")
    a.add_argument("--to", dest="target", required=True, metavar="URL", help="an empty ledger")
    a.set_defaults(handler=_migrate_handler)

    a = actions.add_parser("balance", parents=[common], help="an account's balance")
    a.add_argument("account", metavar="ACCOUNT", help="account id (64 hex digits) or key file")
    a.set_defaults(handler=run_with_ledger(cmd_balance))

    a = actions.add_parser("mint", parents=[common], help="credit an account (local ledger)")
    a.add_argument("account", metavar="ACCOUNT", help="account id (64 hex digits) or key file")
    a.add_argument("value", metavar="VALUE", help="datoshi to credit")
    a.set_defaults(handler=run_with_ledger(cmd_mint, create=True))

    deposit = actions.add_parser("deposit", help="create, show, list or close deposits")
    dep_actions = deposit.add_subparsers(dest="deposit_action", metavar="ACTION", required=True)
    a = dep_actions.add_parser("create", parents=[common], help="lock value for the VPN service")
    a.add_argument("--key", required=True, help="the owner's key file")
    a.add_argument("--value", required=True, help="datoshi to lock")
    a.add_argument("--unit", required=True, help="SEC or B")
    a.add_argument("--max-unit-price", required=True, help="most datoshi paid per unit")
    a.add_argument(
        "--expires",
        type=int,
        default=DEFAULT_EXPIRES_S,
        metavar="SECONDS",
        help=f"lifetime in seconds from now (default {DEFAULT_EXPIRES_S})",
    )
    a.set_defaults(handler=run_with_ledger(cmd_deposit_create))
    a = dep_actions.add_parser("show", parents=[common], help="a deposit's state")
    a.add_argument("id", metavar="ID", help="deposit id (64 hex digits)")
    a.set_defaults(handler=run_with_ledger(cmd_deposit_show))
    a = dep_actions.add_parser("list", parents=[common], help="deposits, oldest first")
    a.add_argument("--owner", help="only this owner (account id or key file)")
    a.set_defaults(handler=run_with_ledger(cmd_deposit_list))
    a = dep_actions.add_parser(
        "close", parents=[common], help="close a deposit, take the rest back"
    )
    a.add_argument("id", metavar="ID", help="deposit id (64 hex digits)")
    a.add_argument("--key", required=True, help="the owner's key file")
    a.set_defaults(handler=run_with_ledger(cmd_deposit_close))

    order = actions.add_parser("order", help="create or list orders")
    order_actions = order.add_subparsers(dest="order_action", metavar="ACTION", required=True)
    a = order_actions.add_parser("create", parents=[common], help="publish a signed price")
    a.add_argument("--key", required=True, help="the provider's key file")
    a.add_argument("--price", required=True, help="datoshi for --units units")
    a.add_argument("--unit", required=True, help="SEC or B")
    a.add_argument("--units", required=True, type=int, help="units per receipt")
    a.add_argument("--token", required=True, help="token ticker (1-10 ASCII characters)")
    a.add_argument("--node-addr", type=lambda s: int(s, 0), default=0, help="node address")
    a.add_argument(
        "--expires",
        type=int,
        default=DEFAULT_EXPIRES_S,
        metavar="SECONDS",
        help=f"lifetime in seconds from now (default {DEFAULT_EXPIRES_S})",
    )
    a.set_defaults(handler=run_with_ledger(cmd_order_create))
    a = order_actions.add_parser("list", parents=[common], help="stored orders")
    a.add_argument("--provider", help="only this provider (account id or key file)")
    a.set_defaults(handler=run_with_ledger(cmd_order_list))

    a = actions.add_parser(
        "receipts", parents=[common], help="redeemed receipts (--local: those this client signed)"
    )
    a.add_argument("--deposit", help="only this deposit")
    a.add_argument("--client", help="only this client (account id or key file)")
    a.add_argument("--provider", help="only this provider (account id or key file)")
    a.add_argument(
        "--local", action="store_true", help="the receipts this client signed (its own record)"
    )
    a.add_argument(
        "--state-dir",
        metavar="DIR",
        help="with --local: the client's state folder (default /var/lib/cellvpn-client)",
    )
    a.set_defaults(handler=_ReceiptsHandler(cmd_receipts))

    a = actions.add_parser("report", parents=[common], help="usage per client: paid, grace, free")
    a.add_argument("--provider", help="only this provider (account id or key file)")
    a.set_defaults(handler=run_with_ledger(cmd_report))

    a = actions.add_parser("get_limits", parents=[common], help="a client's saved limits")
    a.add_argument("--provider", required=True, help="provider account id or key file")
    a.add_argument("--client", required=True, help="client account id or key file")
    a.set_defaults(handler=run_with_ledger(cmd_get_limits))
