"""Paid sessions between real twistd processes, on a real SQLite ledger."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cellvpn.billing.keys import load_key
from cellvpn.billing.sqlite import SqliteLedger
from cellvpn.lab import (
    NET_HOST_IP,
    SERVER_IP,
    VENV_BIN,
    Twistd,
    VpnLab,
    ctl_json,
    wait_for,
)
from tests.integration.helpers import (
    TCPTOOL,
    background,
    billing_section,
    last_json,
    ledger_ctl,
    second_server,
    tool,
    wallet,
    wallet_section,
)

MB = 1024 * 1024
UNITS = 8 * MB


def ledger(tmp: Path) -> SqliteLedger:
    return SqliteLedger(tmp / "state" / "ledger.db", create=False)


def paid_lab(
    netns: Any, tmp: Path, price: int, unit: str, units: int, vpn_extra: str = ""
) -> tuple[VpnLab, Any]:
    lab = VpnLab(netns, tmp)
    cli = lab.add_client_host()
    lab.start_server(extra=billing_section(price, unit, units), vpn_extra=vpn_extra)
    return lab, cli


def session_bill(lab: VpnLab) -> dict[str, Any]:
    stat = ctl_json(lab.srv, lab.server_socket, "vpn_stat", "-full")
    sessions = stat["sessions"] + stat["ended"]
    bill: dict[str, Any] = sessions[-1]["billing"]
    return {**bill, "counters": sessions[-1]["counters"]}


def test_paid_by_bytes_ledger_moves_exactly_the_receipts(netns: Any, tmp_path: Path) -> None:
    """After N MB both ways the provider's balance and the deposit change by exactly the sum
    of the redeemed receipts, and the redeemed units cover the bytes carried (the rest is
    what is left of the last receipts, at most one and a half receipts)."""
    lab, cli = paid_lab(netns, tmp_path, price=1000, unit="B", units=UNITS)
    key, account = wallet(tmp_path, "client", 1_000_000)
    lab.start_client(
        cli,
        "client",
        section_extra="default_route = true\n",
        extra=wallet_section(key, deposit_value=500_000),
    )
    sink = background(lab.net, tmp_path / "sink.log", "sink", "5001", NET_HOST_IP)
    sent = tool(cli, "send", NET_HOST_IP, "5001", str(24 * MB))
    assert last_json(sink, tmp_path / "sink.log")["sha256"] == sent["sha256"]
    source = background(lab.net, tmp_path / "src.log", "source", "5002", NET_HOST_IP, str(8 * MB))
    assert tool(cli, "recv", NET_HOST_IP, "5002")["bytes"] == 8 * MB
    last_json(source, tmp_path / "src.log")
    bill = session_bill(lab)
    led = ledger(tmp_path)
    [row] = led.deposits(owner=bytes.fromhex(account))
    receipts = led.receipts(deposit_id=row.id)
    provider = led.receipts()[0].provider
    paid = sum(r.value for r in receipts)
    assert paid == 1000 * len(receipts) and len(receipts) == bill["receipts"]
    assert led.balance(provider) == paid
    assert row.initial - row.locked == paid
    assert led.balance(bytes.fromhex(account)) == 1_000_000 - 500_000
    carried = bill["counters"]["from_client_bytes"] + bill["counters"]["to_client_bytes"]
    redeemed = sum(r.units for r in receipts)
    assert carried > 32 * MB
    assert redeemed - carried == int(bill["limit_left"])
    assert 0 <= redeemed - carried <= UNITS * 1.5
    ok, figures = led.check_invariant()
    assert ok, figures
    led.close()
    # the honest server was never refused, and the client's record names every receipt the
    # ledger redeemed by the same hash (``ledger receipts --local`` against ``ledger receipts``)
    status = ctl_json(cli, lab.socket("client"), "status")
    assert status["billing"]["receipts_refused"] == 0
    local = subprocess.run(
        [str(VENV_BIN / "cellvpn-ctl"), "--json", "ledger", "receipts", "--local",
         "--state-dir", str(tmp_path / "client-state")],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    mine = {r["hash"] for r in json.loads(local.stdout)["receipts"] if r["confirmed"]}
    theirs = {r["hash"] for r in ledger_ctl(tmp_path, "receipts")["receipts"]}
    assert mine == theirs == {r.hash.hex() for r in receipts}


def test_deposit_runs_out_stopped_no_packet_after(netns: Any, tmp_path: Path) -> None:
    """A deposit for 3 receipts runs out mid-transfer: NOTIFY_STOPPED, no packet from the
    client reaches the TUN after it (captured there), the session closes, the client says why."""
    lab, cli = paid_lab(netns, tmp_path, price=1000, unit="B", units=UNITS)
    key, _ = wallet(tmp_path, "client", 10_000)
    capture_log = tmp_path / "capture.log"
    capture = lab.srv.popen(
        ["tcpdump", "-n", "-l", "-tt", "-i", "cvpn-srv", "src", "host", "198.18.5.2"],
        log=capture_log,
    )
    wait_for(lambda: "listening on" in capture_log.read_text(), timeout=10, what="tcpdump")
    client = lab.start_client(
        cli, "client", section_extra="default_route = true\n", extra=wallet_section(key, 3000)
    )
    background(lab.net, tmp_path / "sink.log", "sink", "5001", NET_HOST_IP)
    sender = cli.popen([sys.executable, TCPTOOL, "send", NET_HOST_IP, "5001", str(64 * MB)])
    client.wait_log(r"the server stopped the service: limits used up")
    wait_for(
        lambda: ctl_json(cli, lab.socket("client"), "status")["status"] == "STOPPED",
        timeout=20,
        what="the client to stop",
    )
    sender.kill()
    status = ctl_json(cli, lab.socket("client"), "status")
    assert "limits used up" in status["last_error"]
    lab.server.wait_log(
        r"session 0x[0-9a-f]+ with \S+ ended: server closed the stream \(SERVICE_STOPPED\)"
    )  # type: ignore[union-attr]
    bill = session_bill(lab)
    assert bill["receipts"] == 3 and bill["stopped_at"] is not None
    capture.terminate()
    capture.wait(timeout=10)
    stamps = [
        float(m.group(1))
        for line in capture_log.read_text().splitlines()
        if (m := re.match(r"^(\d+\.\d+) IP ", line))
    ]
    assert stamps, "nothing was captured at all"
    assert max(stamps) <= bill["stopped_at"]
    carried = bill["counters"]["from_client_bytes"] + bill["counters"]["to_client_bytes"]
    assert 3 * UNITS <= carried <= 3 * UNITS + 70_000  # at most the packet that crossed zero


def test_seconds_with_4_second_receipts(netns: Any, tmp_path: Path) -> None:
    """SEC units, 4 s per receipt: about 3 receipts in 10 s, each asked for at half use."""
    lab, cli = paid_lab(netns, tmp_path, price=10, unit="SEC", units=4)
    key, _ = wallet(tmp_path, "client", 10_000)
    lab.start_client(
        cli, "client", section_extra="default_route = false\n", extra=wallet_section(key, 5000, 5)
    )
    server = lab.server
    assert server is not None
    server.wait_log(r"receipt \w+ redeemed")
    first = len(re.findall(r"receipt \w+ redeemed", server.text()))
    time.sleep(10)
    text = server.text()
    redeemed = len(re.findall(r"receipt \w+ redeemed", text)) - first
    assert 2 <= redeemed <= 4, redeemed
    asks = [int(m) for m in re.findall(r"(\d+) seconds left of 4: asking for the next", text)]
    assert asks and all(left <= 2 for left in asks)


def test_closing_a_deposit(netns: Any, tmp_path: Path) -> None:
    """Refused while a session uses it; afterwards it returns exactly its unspent value."""
    lab, cli = paid_lab(netns, tmp_path, price=1000, unit="B", units=UNITS)
    key, account = wallet(tmp_path, "client", 100_000)
    client = lab.start_client(
        cli, "client", section_extra="default_route = false\n", extra=wallet_section(key, 50_000)
    )
    deposit = ctl_json(cli, lab.socket("client"), "status")["billing"]["deposit"]
    refused = ledger_ctl(tmp_path, "deposit", "close", deposit, "--key", str(key), check=False)
    assert "CANT_ADD_USAGE" in refused["error"]
    client.stop()
    wait_for(
        lambda: ledger(tmp_path).get_deposit(bytes.fromhex(deposit)).active_usage is None,  # type: ignore[union-attr]
        timeout=15,
        what="the usage to end",
    )
    row = ledger(tmp_path).get_deposit(bytes.fromhex(deposit))
    assert row is not None
    before = int(ledger_ctl(tmp_path, "balance", account)["balance"])
    closed = ledger_ctl(tmp_path, "deposit", "close", deposit, "--key", str(key))
    after = int(ledger_ctl(tmp_path, "balance", account)["balance"])
    assert after - before == row.locked == int(closed["returned"])
    assert row.locked == 50_000 - 1000 * row.receipts


def test_server_killed_mid_session_ledger_holds_and_limits_resume(
    netns: Any, tmp_path: Path
) -> None:
    """kill -9 of the server, restart: all balances plus locked value are what they were, and
    the client comes back with the limits saved before the kill."""
    lab, cli = paid_lab(netns, tmp_path, price=1000, unit="B", units=UNITS)
    (tmp_path / "server.cfg").write_text(
        (tmp_path / "server.cfg").read_text() + "save_interval = 1\n"
    )
    assert lab.server is not None
    lab.server.stop()
    lab.server = Twistd(lab.srv, "cellvpn", tmp_path / "server.cfg", tmp_path / "server1.log")
    lab.server.wait_log(r"TUN cvpn-srv up")
    key, _ = wallet(tmp_path, "client", 100_000)
    lab.start_client(
        cli,
        "client",
        section_extra="default_route = true\nkeepalive = 1\n",
        extra=wallet_section(key, 50_000),
    )
    supply = ledger(tmp_path).total_supply()
    background(lab.net, tmp_path / "sink.log", "sink", "5001", NET_HOST_IP)
    tool(cli, "send", NET_HOST_IP, "5001", str(6 * MB))
    provider = load_key(tmp_path / "state" / "provider.key").account_hex
    limits = ["get_limits", "--provider", provider, "--client", load_key(key).account_hex]
    time.sleep(2)  # save_interval is 1 s: the limits after the transfer are on disk
    saved = ledger_ctl(tmp_path, *limits)
    assert int(saved["bytes"]) > 0
    lab.server.proc.send_signal(signal.SIGKILL)
    lab.server.proc.wait(timeout=10)
    led = ledger(tmp_path)
    ok, figures = led.check_invariant()
    assert ok, figures
    assert led.total_supply() == supply
    led.close()
    lab.server = Twistd(lab.srv, "cellvpn", tmp_path / "server.cfg", tmp_path / "server2.log")
    lab.server.wait_log(r"TUN cvpn-srv up")
    # the same instance (state_dir/instance-id) clears its own marks at start: the client's
    # deposit is free at once, not after mark_ttl (300 s)
    lab.server.wait_log(r"released 1 deposit\(s\) marked in use by an earlier run")
    line = lab.server.wait_log(r"resuming with (\d+) bytes saved", timeout=90)
    assert int(line.group(1)) == int(saved["bytes"])
    wait_for(
        lambda: ctl_json(cli, lab.socket("client"), "status")["status"] == "STARTED",
        timeout=60,
        what="the client back",
    )
    led = ledger(tmp_path)
    ok, figures = led.check_invariant()
    assert ok and led.total_supply() == supply
    led.close()


def test_a_deposit_comes_back_when_its_server_died_for_good(netns: Any, tmp_path: Path) -> None:
    """kill -9 of the server, never restarted: the owner's close is refused while the mark's
    lease lives (mark_ttl 10 s), then returns the unspent value; balances add up."""
    lab, cli = paid_lab(netns, tmp_path, price=1000, unit="B", units=UNITS)
    (tmp_path / "server.cfg").write_text(
        (tmp_path / "server.cfg").read_text() + "save_interval = 1\nmark_ttl = 10\n"
    )
    assert lab.server is not None
    lab.server.stop()
    lab.server = Twistd(lab.srv, "cellvpn", tmp_path / "server.cfg", tmp_path / "server1.log")
    lab.server.wait_log(r"TUN cvpn-srv up")
    key, account = wallet(tmp_path, "client", 100_000)
    lab.start_client(
        cli, "client", section_extra="default_route = false\n", extra=wallet_section(key, 50_000)
    )
    deposit = ctl_json(cli, lab.socket("client"), "status")["billing"]["deposit"]
    supply = ledger(tmp_path).total_supply()
    lab.server.proc.send_signal(signal.SIGKILL)
    lab.server.proc.wait(timeout=10)
    killed = time.monotonic()
    refused = ledger_ctl(tmp_path, "deposit", "close", deposit, "--key", str(key), check=False)
    assert "CANT_ADD_USAGE" in refused["error"] and "until" in refused["error"]
    time.sleep(max(0.0, killed + 11.5 - time.monotonic()))
    row = ledger(tmp_path).get_deposit(bytes.fromhex(deposit))
    assert row is not None and row.active_usage is not None  # the mark is still there, stale
    before = int(ledger_ctl(tmp_path, "balance", account)["balance"])
    closed = ledger_ctl(tmp_path, "deposit", "close", deposit, "--key", str(key))
    after = int(ledger_ctl(tmp_path, "balance", account)["balance"])
    assert after - before == row.locked == int(closed["returned"]) > 0
    led = ledger(tmp_path)
    ok, figures = led.check_invariant()
    assert ok and led.total_supply() == supply, figures
    led.close()


def test_two_servers_on_one_ledger_and_key_keep_their_own_marks(netns: Any, tmp_path: Path) -> None:
    """Two twistd servers, one provider key, one ledger file, a state_dir each: the second's
    start and the first's restart after kill -9 each release only their own marks, never
    the other's live session's."""
    lab, cli = paid_lab(netns, tmp_path, price=1000, unit="B", units=UNITS)
    cli2 = lab.add_client_host()
    key1, _ = wallet(tmp_path, "client", 100_000)
    key2, _ = wallet(tmp_path, "client2", 100_000)
    lab.start_client(
        cli, "client", section_extra="default_route = false\n", extra=wallet_section(key1, 50_000)
    )
    first = bytes.fromhex(ctl_json(cli, lab.socket("client"), "status")["billing"]["deposit"])
    state = tmp_path / "state"
    second = second_server(
        lab,
        8090,
        "198.18.6.0/24",
        billing_section(1000, "B", UNITS, f"key = {state / 'provider.key'}\n")
        + f"[ledger]\nurl = sqlite:///{state / 'ledger.db'}\n",
    )
    second.wait_log(r"billing: order [0-9a-f]{16}")
    assert "marked in use by an earlier run" not in second.text()

    def marker(deposit: bytes) -> str | None:
        led = ledger(tmp_path)
        try:
            row = led.get_deposit(deposit)
            assert row is not None
            return row.active_usage
        finally:
            led.close()

    mark1 = marker(first)
    assert mark1 is not None  # the first server's session kept its mark through that start
    lab.start_client(
        cli2,
        "client2",
        section_extra="default_route = false\n",
        extra=wallet_section(key2, 50_000),
        server=f"{SERVER_IP}:8090",
    )
    status2 = ctl_json(cli2, lab.socket("client2"), "status")
    other = bytes.fromhex(status2["billing"]["deposit"])
    mark2 = marker(other)
    assert mark2 is not None and mark2.rsplit(":", 1)[0] != mark1.rsplit(":", 1)[0]
    supply = ledger(tmp_path).total_supply()

    assert lab.server is not None
    lab.server.proc.send_signal(signal.SIGKILL)
    lab.server.proc.wait(timeout=10)
    lab.server = Twistd(lab.srv, "cellvpn", tmp_path / "server.cfg", tmp_path / "server1.log")
    lab.server.wait_log(r"released 1 deposit\(s\) marked in use by an earlier run")
    assert marker(other) == mark2  # the second server's live session is untouched
    assert ctl_json(cli2, lab.socket("client2"), "status")["status"] == "STARTED"
    led = ledger(tmp_path)
    ok, figures = led.check_invariant()
    assert ok and led.total_supply() == supply, figures
    led.close()


def test_free_usage_is_booked_and_reported_as_free(netns: Any, tmp_path: Path) -> None:
    """A free server with [ledger] url: a session's seconds and bytes, booked once when it
    ends, as kind free; ``ledger report`` shows them beside paid and grace (both zero)."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    url = f"sqlite:///{tmp_path / 'state' / 'ledger.db'}"
    server = lab.start_server(extra=f"[ledger]\nurl = {url}\n")
    server.wait_log(r"free service: usage booked in the ledger as provider [0-9a-f]{64}")
    client = lab.start_client(cli, "client", section_extra="default_route = false\n")
    done = cli.exec("ping", "-c", "5", "-i", "0.2", "-W", "2", "198.18.5.1", check=False)
    assert done.returncode == 0
    assert lab.ledger("report")["report"] == []  # nothing booked while the session runs
    client.stop()
    wait_for(lambda: lab.ledger("report")["report"] != [], timeout=15, what="the booking")
    [row] = lab.ledger("report")["report"]
    provider = load_key(tmp_path / "state" / "provider.key").account_hex
    assert row["provider"] == provider
    assert row["paid"]["bytes"] == 0 and row["grace"]["bytes"] == 0
    assert row["free"]["bytes"] >= 5 * 2 * 84 and row["free"]["seconds"] > 0.5
    assert row["free"]["value"] == "0"
    db = sqlite3.connect(tmp_path / "state" / "ledger.db")
    assert db.execute("SELECT kind, count(*) FROM usage GROUP BY kind").fetchall() == [("free", 1)]
