"""Fifty clients paying one server at once, receipt after receipt, on one real ledger file."""

from __future__ import annotations

import json
import secrets
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from cellvpn.billing.keys import create_key, load_key
from cellvpn.billing.records import DepositRequest, SignedDeposit
from cellvpn.billing.sqlite import SqliteLedger
from cellvpn.lab import SERVER_IP, VpnLab, ctl, ctl_json, wait_for
from cellvpn.wire.receipt import Unit
from tests.integration.helpers import HERE, billing_section

PAYERS = str(HERE / "payers.py")
CLIENTS = 50
#: Seconds every client keeps paying after the last one was granted.
DURATION = 8
#: 2 datoshi per 2 seconds: the next receipt is asked for when 1 s is left, so each client
#: signs one every 2 s or so.
PRICE, UNITS = 2, 2
#: Receipts each client must see confirmed at least: the first, then one per 2 s of the 8 s
#: (one fewer, as a margin for a slow machine).
AT_LEAST = DURATION // UNITS
DEPOSIT = 1000


def test_fifty_clients_paying_at_once(netns: Any, tmp_path: Path) -> None:
    """50 clients paying at once: the ledger adds up, one chain per deposit, no receipt lost."""
    started = time.monotonic()
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    db = SqliteLedger(tmp_path / "state" / "ledger.db")
    clients = []
    for n in range(CLIENTS):
        key_file = tmp_path / "payers" / f"{n}.key"
        key = create_key(key_file)
        db.mint(key.account, 2 * DEPOSIT, key.public)
        request = DepositRequest(
            owner=key.public,
            unit=Unit.SEC,
            max_unit_price=1,
            value=DEPOSIT,
            expires=int(time.time()) + 86400,
            nonce=secrets.token_bytes(16),
        )
        deposit = db.create_deposit(SignedDeposit.sign(request, key), time.time())
        state = tmp_path / "payers" / f"{n}-state"
        clients.append({"key": str(key_file), "deposit": deposit.id.hex(), "state": str(state)})
    minted = db.total_supply()
    assert minted == CLIENTS * 2 * DEPOSIT

    lab.start_server(extra=billing_section(PRICE, "SEC", UNITS))
    assert lab.server is not None
    spec = tmp_path / "payers.json"
    spec.write_text(
        json.dumps(
            {
                "host": SERVER_IP,
                "port": 8089,
                "ca": str(lab.ca),
                "max_unit_price": 1,
                "duration": DURATION,
                "clients": clients,
            }
        )
    )
    result_file = tmp_path / "payers-result.json"
    log = tmp_path / "payers.log"
    proc = cli.popen([sys.executable, PAYERS, str(spec), str(result_file)], log=log)
    proc.wait(timeout=90)
    assert proc.returncode == 0, log.read_text()[-5000:]
    text = log.read_text()
    assert f"{CLIENTS} of {CLIENTS} granted" in text, text[-5000:]
    results: list[dict[str, Any]] = json.loads(result_file.read_text())["clients"]

    # every client was granted, paid on and on, and was never stopped or refused
    for r in results:
        assert r["granted_after"] is not None, r
        assert r["stopped"] is None and r["refused"] is None, r
        assert len(r["confirmed"]) >= AT_LEAST, r

    # the server still answers, and lets every session go (each releases its deposit last,
    # after its receipts are booked and its limits saved)
    assert ctl(lab.srv, lab.server_socket, "status").returncode == 0
    wait_for(
        lambda: ctl_json(lab.srv, lab.server_socket, "vpn_stat")["sessions"] == [],
        timeout=15,
        what="every session to end",
    )
    wait_for(
        lambda: all(d.active_usage is None for d in db.deposits()),
        timeout=15,
        what="every deposit to be released",
    )
    server_log = lab.server.text()
    assert "Traceback" not in server_log and "billing failed" not in server_log
    assert "receipt refused by the ledger" not in server_log

    ok, figures = db.check_invariant()
    assert ok, figures["problems"]
    assert figures["minted"] == minted and figures["returned"] == 0
    provider = load_key(tmp_path / "state" / "provider.key")
    receipts = db.receipts()
    counts = Counter(r.hash for r in receipts)
    assert all(n == 1 for n in counts.values())
    redeemed = sum(r.value for r in receipts)
    deposits = {d.id: d for d in db.deposits()}
    assert len(deposits) == CLIENTS
    assert redeemed == db.balance(provider.account) == figures["redeemed"]
    assert redeemed == sum(d.initial - d.locked for d in deposits.values())
    assert {r.provider for r in receipts} == {provider.account}

    usage = {u.client: u for u in db.report(provider.account)}
    confirmed_total = 0
    for r in results:
        deposit_id = bytes.fromhex(r["deposit"])
        dep = deposits[deposit_id]
        chain = db.receipts(deposit_id)
        # one chain: numbered 1..n, each on the one before, the first on the deposit itself
        assert [c.seq for c in chain] == list(range(1, len(chain) + 1))
        prev = deposit_id
        for c in chain:
            assert c.prev_hash == prev and c.client == dep.owner
            assert (c.unit, c.units, c.value) == (Unit.SEC, UNITS, PRICE)
            prev = c.hash
        assert dep.state_hash == prev and dep.receipts == len(chain)
        assert dep.locked == DEPOSIT - PRICE * len(chain)
        in_ledger = [c.hash.hex() for c in chain]
        # what the client saw confirmed is redeemed, in the order it signed them
        assert r["confirmed"] == in_ledger[: len(r["confirmed"])]
        # the ledger holds nothing the client did not sign; at most the last receipt was
        # redeemed without its SUCCESS reaching the client before it closed
        assert in_ledger == r["signed"][: len(in_ledger)]
        assert len(in_ledger) - len(r["confirmed"]) in (0, 1)
        assert len(r["signed"]) - len(in_ledger) in (0, 1)
        # the server's own account of the session: every redeemed receipt counted as paid,
        # and limits saved for the client's next session
        assert usage[dep.owner].paid.value == PRICE * len(chain)
        assert db.load_limits(provider.account, dep.owner) is not None
        confirmed_total += len(r["confirmed"])
    assert confirmed_total >= CLIENTS * AT_LEAST
    assert time.monotonic() - started < 60
