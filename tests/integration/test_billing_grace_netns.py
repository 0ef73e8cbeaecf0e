"""Billing between real twistd processes: grace, bans, key proofs and replays, on a real ledger."""

from __future__ import annotations

import json
import secrets
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cellvpn.billing.interfaces import LedgerError
from cellvpn.billing.keys import load_key
from cellvpn.billing.records import DepositRequest, SignedDeposit
from cellvpn.billing.sqlite import SqliteLedger
from cellvpn.lab import SERVER_IP, Namespace, VpnLab, ctl, ctl_json, wait_for
from cellvpn.wire.receipt import Receipt, Unit
from cellvpn.wire.service import ErrorCode
from tests.integration.helpers import (
    PROBE,
    billing_section,
    ledger_ctl,
    ping,
    wallet,
    wallet_section,
)

#: 60 datoshi per 60 seconds: one receipt lasts a minute, so none is asked for during a test
#: after the first.
PRICE = billing_section(60, "SEC", 60)
START = ["vpn_client", "start", "-addr", SERVER_IP, "-port", "8089"]


def ledger(work: Path) -> SqliteLedger:
    """The lab server's ledger file, opened from the test process (as cellvpn-ctl would)."""
    return SqliteLedger(work / "state" / "ledger.db", create=False)


def provider_account(work: Path) -> bytes:
    return load_key(work / "state" / "provider.key").account


def status(lab: VpnLab, ns: Namespace, name: str = "client") -> dict[str, Any]:
    result: dict[str, Any] = ctl_json(ns, lab.socket(name), "vpn_client", "status")
    return result


def server_sessions(lab: VpnLab) -> list[dict[str, Any]]:
    sessions: list[dict[str, Any]] = ctl_json(lab.srv, lab.server_socket, "vpn_stat")["sessions"]
    return sessions


def signed_deposit(key_file: Path, value: int, max_unit_price: int = 1) -> SignedDeposit:
    """A deposit request signed by the client's key, not yet in any ledger."""
    key = load_key(key_file)
    request = DepositRequest(
        owner=key.public,
        unit=Unit.SEC,
        max_unit_price=max_unit_price,
        value=value,
        expires=int(time.time()) + 86400,
        nonce=secrets.token_bytes(16),
    )
    return SignedDeposit.sign(request, key)


def test_grace_then_the_deposit_appears_and_the_service_goes_on(netns: Any, tmp_path: Path) -> None:
    """Grace at once; the deposit appears 5 s later: a receipt is redeemed, traffic flows."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    key, account = wallet(tmp_path, "client", mint=10_000)
    signed = signed_deposit(key, 6000)
    deposit = signed.hash
    lab.start_server(extra=PRICE)
    assert lab.server is not None
    lab.start_client(
        cli,
        "client",
        section_extra="default_route = false\n",
        extra=wallet_section(key, max_unit_price=1, deposit=deposit.hex()),
    )
    up = time.monotonic()
    lab.server.wait_log(r"deposit [0-9a-f]{16} not in the ledger yet: grace for 60 s")
    lab.server.wait_log(r"service granted \(GRACE\)")
    [session] = server_sessions(lab)
    assert session["billing"]["mode"] == "grace"
    assert status(lab, cli)["status"] == "STARTED"
    assert ping(cli, "198.18.5.1")
    db = ledger(tmp_path)
    assert db.get_deposit(deposit) is None and db.receipts() == []

    time.sleep(max(0.0, 5 - (time.monotonic() - up)))
    row = db.create_deposit(signed, time.time())
    assert (row.locked, row.owner.hex()) == (6000, account)

    lab.server.wait_log(r"session 0x[0-9a-f]{8}: deposit appeared in the ledger", timeout=15)
    lab.server.wait_log(r"receipt [0-9a-f]{16} redeemed: 60 CELL for 60 seconds, 5940 left")
    [receipt] = wait_for(lambda: db.receipts(deposit), timeout=10, what="the redeemed receipt")
    assert (receipt.value, receipt.units, receipt.seq, receipt.prev_hash) == (60, 60, 1, deposit)
    assert db.balance(provider_account(tmp_path)) == 60
    assert db.get_deposit(deposit).locked == 5940  # type: ignore[union-attr]
    session = wait_for(
        lambda: (s := server_sessions(lab)[0])["billing"]["mode"] == "paid" and s,
        timeout=10,
        what="the session to be paid",
    )
    assert session["billing"]["receipts"] == 1
    # the client signed it, wrote it down, and saw the server's SUCCESS for it
    st = wait_for(
        lambda: (s := status(lab, cli))["billing"]["receipts_signed"] == 1 and s,
        timeout=10,
        what="the client's signature",
    )
    assert st["status"] == "STARTED" and st["billing"]["stopped"] is None
    book = tmp_path / "client-state" / "receipts.jsonl"
    entries = [json.loads(line) for line in book.read_text().splitlines()]
    assert [(e["event"], e["receipt"]) for e in entries] == [
        ("signed", receipt.hash.hex()),
        ("confirmed", receipt.hash.hex()),
    ]
    assert ping(cli, "198.18.5.1")
    assert status(lab, cli)["sessions_established"] == 1
    ok, figures = db.check_invariant()
    assert ok, figures["problems"]


def test_a_deposit_that_never_appears_ends_in_a_ban(netns: Any, tmp_path: Path) -> None:
    """No deposit within grace_period 3: TX_COND_NOT_FOUND, a ban, and a new start refused."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    key, account = wallet(tmp_path, "client", mint=10_000)
    never = secrets.token_bytes(32)
    lab.start_server(extra=PRICE, vpn_extra="grace_period = 3\n")
    assert lab.server is not None
    lab.start_client(
        cli,
        "client",
        section_extra="default_route = false\n",
        extra=wallet_section(key, max_unit_price=1, deposit=never.hex()),
    )
    up = time.monotonic()
    lab.server.wait_log(r"not in the ledger yet: grace for 3 s")
    st = wait_for(
        lambda: (s := status(lab, cli))["status"] == "STOPPED" and s,
        timeout=20,
        what="the client to give up",
    )
    assert time.monotonic() - up > 2  # not before the grace period is over
    assert "TX_COND_NOT_FOUND" in st["last_error"]
    assert st["billing"]["receipts_signed"] == 0
    lab.server.wait_log(r"service refused \(TX_COND_NOT_FOUND\): deposit never appeared within 3 s")
    db = ledger(tmp_path)
    until = db.banned_until(provider_account(tmp_path), bytes.fromhex(account), time.time())
    assert until is not None and until > time.time() + 100  # 3 s x 50
    assert db.get_deposit(never) is None and db.receipts() == []

    started = time.monotonic()
    done = ctl(cli, lab.socket("client"), *START, check=False)
    assert time.monotonic() - started < 10
    assert done.returncode == 254, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == "Can't connect to VPN server"
    assert "RECEIPT_BANNED_PKEY_HASH" in done.stdout
    after = status(lab, cli)
    assert after["status"] == "STOPPED"
    assert "RECEIPT_BANNED_PKEY_HASH" in after["last_error"]
    lab.server.wait_log(r"service refused \(RECEIPT_BANNED_PKEY_HASH\): key [0-9a-f]{16} is banned")
    # the refusal of a banned key grants nothing: still one grace, no second one
    assert lab.server.text().count("grace for 3 s") == 1


def probe(ns: Namespace, lab: VpnLab, *args: str) -> list[dict[str, Any]]:
    done = ns.exec(sys.executable, PROBE, SERVER_IP, "8089", str(lab.ca), *args, timeout=60)
    return [json.loads(line) for line in done.stdout.splitlines()]


def paying_wallet(work: Path, name: str) -> tuple[Path, str]:
    """A key with funds and a deposit of 6000 in the lab's ledger; returns (key, deposit id)."""
    key, _ = wallet(work, name, mint=10_000)
    made = ledger_ctl(
        work,
        "deposit",
        "create",
        "--key",
        str(key),
        "--value",
        "6000",
        "--unit",
        "SEC",
        "--max-unit-price",
        "1",
    )
    return key, str(made["id"])


@pytest.mark.parametrize("script", ["wrong-key", "wrong-session"])
def test_a_request_whose_proof_fails_is_refused(netns: Any, tmp_path: Path, script: str) -> None:
    """A key proof by another key or session: RECEIPT_WRONG_PKEY_HASH, the ledger unchanged."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    key, deposit = paying_wallet(tmp_path, "client")
    lab.start_server(extra=PRICE)
    assert lab.server is not None
    db = ledger(tmp_path)
    before = db.dump()
    events = probe(cli, lab, script, str(key), deposit)
    names = [e["event"] for e in events]
    assert names == ["established", "order", "error"], events
    assert events[-1]["value"] == "RECEIPT_WRONG_PKEY_HASH"
    lab.server.wait_log(
        r"service refused \(RECEIPT_WRONG_PKEY_HASH\): REQUEST signature is not valid for this "
        r"session"
    )
    lab.server.wait_log(r"session 0x[0-9a-f]{8} with 192\.0\.2\.2:\d+ ended")
    assert db.dump() == before
    assert "grace" not in lab.server.text()


def test_replayed_sign_response_and_receipt_are_refused(netns: Any, tmp_path: Path) -> None:
    """A replayed SIGN_RESPONSE and a replayed redemption are refused; the ledger is unchanged."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    key, deposit_hex = paying_wallet(tmp_path, "client")
    deposit = bytes.fromhex(deposit_hex)
    lab.start_server(extra=PRICE)
    assert lab.server is not None
    go1, go2 = tmp_path / "go1", tmp_path / "go2"
    log = tmp_path / "probe.log"
    proc = cli.popen(
        [
            sys.executable,
            PROBE,
            SERVER_IP,
            "8089",
            str(lab.ca),
            "pay-replay",
            str(key),
            deposit_hex,
            str(go1),
            str(go2),
        ],
        log=log,
    )

    def events() -> list[dict[str, Any]]:
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]

    def seen(name: str) -> list[dict[str, Any]]:
        if proc.poll() is not None and not any(e["event"] == name for e in events()):
            raise AssertionError(f"the probe ended without {name!r}:\n{log.read_text()}")
        return [e for e in events() if e["event"] == name]

    [paid] = wait_for(lambda: seen("paid"), timeout=30, what="the probe to pay")
    assert [e["event"] for e in events()] == ["established", "order", "success", "paid"]
    db = ledger(tmp_path)
    [redeemed] = db.receipts(deposit)
    assert redeemed.hash.hex() == paid["value"] and redeemed.seq == 1
    before = db.dump()

    go1.write_text("go")
    [error] = wait_for(lambda: seen("error"), timeout=30, what="the replay's answer")
    assert error["value"] == "RECEIPT_CANT_FIND"
    lab.server.wait_log(
        r"refused \(sign_response\): .*RECEIPT_CANT_FIND: SIGN_RESPONSE for no receipt"
    )
    assert db.dump() == before  # the session is still open: nothing else wrote meanwhile
    [session] = server_sessions(lab)
    assert (session["billing"]["mode"], session["billing"]["receipts"]) == ("paid", 1)

    # the receipt the ledger holds, replayed into the ledger itself
    receipt = Receipt.decode(redeemed.encoded)
    provider = load_key(tmp_path / "state" / "provider.key").public
    with pytest.raises(LedgerError) as refused:
        db.redeem(receipt, deposit, provider, time.time())
    assert refused.value.code == ErrorCode.WRONG_HASH
    assert "redeemed already" in str(refused.value)
    assert db.dump() == before
    ok, figures = db.check_invariant()
    assert ok, figures["problems"]
    assert figures["redeemed"] == 60

    go2.write_text("go")
    proc.wait(timeout=30)
    assert proc.returncode == 0, log.read_text()
    assert [e["event"] for e in events()][-2:] == ["error", "done"]


def test_a_receipt_redeemed_after_the_client_left_is_not_lost(netns: Any, tmp_path: Path) -> None:
    """A receipt redeemed after its client left still counts: its limits are saved."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    key, deposit_hex = paying_wallet(tmp_path, "client")
    client = load_key(key).account
    lab.start_server(extra=PRICE)
    assert lab.server is not None
    go = tmp_path / "go"
    log = tmp_path / "probe.log"
    args = ["pay-and-leave", str(key), deposit_hex, str(go)]
    proc = cli.popen([sys.executable, PROBE, SERVER_IP, "8089", str(lab.ca), *args], log=log)
    wait_for(lambda: '"asked"' in log.read_text(), timeout=30, what="the first receipt")

    # another writer holds the ledger's write lock: the redemption waits for it
    lock = sqlite3.connect(tmp_path / "state" / "ledger.db", isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        go.write_text("go")
        proc.wait(timeout=30)
        assert '"left"' in log.read_text(), log.read_text()
        lab.server.wait_log(r"ended: client closed the stream \(NORMAL\): paid and gone")
        time.sleep(0.5)  # the session's end is handled while the receipt is still waiting
        lock.execute("ROLLBACK")
    finally:
        lock.close()
    lab.server.wait_log(r"receipt [0-9a-f]{16} redeemed: 60 CELL for 60 seconds, 5940 left")

    db = ledger(tmp_path)
    provider = provider_account(tmp_path)
    deposit = bytes.fromhex(deposit_hex)
    wait_for(
        lambda: db.get_deposit(deposit).active_usage is None,  # type: ignore[union-attr]
        timeout=10,
        what="the session to let the deposit go",
    )
    assert len(db.receipts(deposit)) == 1
    limits = db.load_limits(provider, client)
    assert limits is not None and limits.seconds_left == 60, limits
    [usage] = db.report(provider)
    assert usage.paid.value == 60
    ok, figures = db.check_invariant()
    assert ok, figures["problems"]


def test_grace_cannot_be_farmed_with_one_key_or_with_fresh_ones(netns: Any, tmp_path: Path) -> None:
    """Sessions with unknown deposits that leave just inside grace_period (3 s): one key gets
    grace until the budget (4 s) is spent, then none; fresh keys from the same source get none
    either. The ledger holds the grace rows and ``ledger report`` shows them as grace."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    lab.start_server(extra=PRICE + "grace_budget_seconds = 4\n", vpn_extra="grace_period = 3\n")
    assert lab.server is not None
    key, _ = wallet(tmp_path, "farmer", mint=0)
    granted = []
    for n, name in enumerate(["farmer", "farmer", "farmer", "fresh1", "fresh2"]):
        if name != "farmer":
            key, _ = wallet(tmp_path, name, mint=0)
        unknown = secrets.token_bytes(32).hex()
        events = probe(cli, lab, "grace-hold", str(key), unknown, "2.5")
        granted.append(events[-1]["value"])
        wait_for(
            lambda n=n: lab.server.text().count(" ended: ") >= n + 1,  # type: ignore[union-attr]
            timeout=10,
            what="the server to end the session",
        )
    assert granted == [True, True, False, False, False]
    # the lab counts each client address as its own source (/32)
    lab.server.wait_log(r"no grace left for key:[0-9a-f]+, net:192\.0\.2\.\d+/32")
    db = sqlite3.connect(tmp_path / "state" / "ledger.db")
    rows = db.execute("SELECT subject, seconds FROM grace ORDER BY at").fetchall()
    db.close()
    assert sorted({subject.split(":")[0] for subject, _ in rows}) == ["key", "net"]
    assert len(rows) == 4 and all(2.0 <= seconds <= 4.0 for _, seconds in rows)
    report = ledger_ctl(tmp_path, "report")["report"]
    [farmer] = [r for r in report if float(r["grace"]["seconds"]) > 0]
    assert 4.0 <= float(farmer["grace"]["seconds"]) <= 8.0
    assert float(farmer["paid"]["seconds"]) == 0
