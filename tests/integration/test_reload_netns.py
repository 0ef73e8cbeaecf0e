"""SIGHUP to real twistd processes: a reload keeps what runs and applies what can change."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from cellvpn.billing.sqlite import SqliteLedger
from cellvpn.lab import NET_HOST_IP, VENV_BIN, VpnLab, ctl_json, wait_for
from tests.integration.helpers import (
    background,
    billing_section,
    host_snapshot,
    last_json,
    ping,
    tool,
    wallet,
    wallet_section,
)

MB = 1024 * 1024
UNITS = 4 * MB
GATEWAY = "198.18.5.1"


def send(lab: VpnLab, cli: Any, tmp: Path, port: int, nbytes: int) -> None:
    """``nbytes`` from a client to the net host, compared by hash at both ends."""
    log = tmp / f"sink-{port}.log"
    sink = background(lab.net, log, "sink", str(port), NET_HOST_IP)
    sent = tool(cli, "send", NET_HOST_IP, str(port), str(nbytes))
    assert last_json(sink, log)["sha256"] == sent["sha256"]


def receipt_values(tmp: Path, account: str) -> list[int]:
    led = SqliteLedger(tmp / "state" / "ledger.db", create=False)
    try:
        [row] = led.deposits(owner=bytes.fromhex(account))
        return [r.value for r in led.receipts(deposit_id=row.id)]
    finally:
        led.close()


def test_sighup_to_the_server_keeps_the_session_and_prices_the_next_one(
    netns: Any, tmp_path: Path
) -> None:
    """A paying session carries on across SIGHUP on the price it agreed to (same session,
    data intact, every receipt at the old price); the next session is offered the new order
    and pays the new price; a key that needs a restart is named and left as it was."""
    lab = VpnLab(netns, tmp_path)
    first_host = lab.add_client_host()
    second_host = lab.add_client_host()
    server = lab.start_server(extra=billing_section(1000, "B", UNITS))
    key1, account1 = wallet(tmp_path, "first", 1_000_000)
    key2, account2 = wallet(tmp_path, "second", 1_000_000)
    lab.start_client(first_host, "first", extra=wallet_section(key1, deposit_value=200_000))
    send(lab, first_host, tmp_path, 5001, 6 * MB)
    [before] = ctl_json(lab.srv, lab.server_socket, "vpn_stat")["sessions"]

    cfg = tmp_path / "server.cfg"
    text = cfg.read_text()
    cfg.write_text(text.replace("price = 1000", "price = 3000").replace("mtu = 1400", "mtu = 1280"))
    server.proc.send_signal(signal.SIGHUP)
    server.wait_log(r"billing: order [0-9a-f]{16} = 3000 CELL per \d+ B for new sessions")
    server.wait_log(r"reload: applied \[billing\] price")
    server.wait_log(r"reload: not applied \(needs a restart\): \[srv_vpn\] mtu")

    send(lab, first_host, tmp_path, 5002, 12 * MB)
    [after] = ctl_json(lab.srv, lab.server_socket, "vpn_stat")["sessions"]
    assert after["session_id"] == before["session_id"]
    assert after["counters"]["from_client_bytes"] > 18 * MB
    first_receipts = receipt_values(tmp_path, account1)
    assert len(first_receipts) >= 4 and set(first_receipts) == {1000}

    lab.start_client(second_host, "second", extra=wallet_section(key2, deposit_value=200_000))
    send(lab, second_host, tmp_path, 5003, 6 * MB)
    second_receipts = receipt_values(tmp_path, account2)
    assert len(second_receipts) >= 2 and set(second_receipts) == {3000}
    assert "Traceback" not in server.text()
    status = ctl_json(lab.srv, lab.server_socket, "status")
    assert status["tun"] == "cvpn-srv" and len(status["sessions"]) == 2


def test_sighup_to_the_client_keeps_its_tunnel_with_the_server_run_by_twist(
    netns: Any, tmp_path: Path
) -> None:
    """The server runs under ``twist`` (which never calls privilegedStartService: the TUN and
    the port are made all the same). SIGHUP to the client: a ping running across it loses
    nothing, the routes, addresses and resolv.conf stay exactly as they were, the same
    session goes on; the kill switch is applied, the TUN name is named as needing a restart."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    lab.start_server().stop()  # writes the lab's server.cfg and makes the TLS identity
    twist_log = tmp_path / "twist.log"
    cmd = [str(VENV_BIN / "twist"), "--log-format", "text", "cellvpn"]
    twist = lab.srv.popen([*cmd, "--config", str(tmp_path / "server.cfg")], log=twist_log)
    wait_for(
        lambda: "cellvpn server listening on" in twist_log.read_text(),
        timeout=20,
        what="the server under twist",
    )
    assert "TUN cvpn-srv up" in twist_log.read_text()

    client = lab.start_client(cli, "client", section_extra="dns = 192.0.2.53\n")
    assert ping(cli, GATEWAY)
    snapshot = host_snapshot(cli)
    status = ctl_json(cli, lab.socket("client"), "status")
    assert status["kill_switch"] is False

    cfg = tmp_path / "client.cfg"
    text = cfg.read_text()
    cfg.write_text(text.replace("tun_name = cvpn-cli\n", "tun_name = cvpn-cl2\nkill_switch = on\n"))
    pinger = cli.popen(
        ["ping", "-c", "30", "-i", "0.1", "-W", "2", GATEWAY], log=tmp_path / "ping.log"
    )
    wait_for(lambda: "bytes from" in (tmp_path / "ping.log").read_text(), what="the first echo")
    os.kill(client.proc.pid, signal.SIGHUP)
    client.wait_log(r"reload: applied \[client\] kill_switch")
    client.wait_log(r"reload: not applied \(needs a restart\): \[client\] tun_name")
    assert pinger.wait(timeout=30) == 0
    assert " 0% packet loss" in (tmp_path / "ping.log").read_text()

    assert host_snapshot(cli) == snapshot
    after = ctl_json(cli, lab.socket("client"), "status")
    assert after["status"] == "STARTED" and after["kill_switch"] is True
    assert after["session_id"] == status["session_id"] and after["tun"] == "cvpn-cli"
    assert client.proc.poll() is None and "Traceback" not in client.text()
    assert twist.poll() is None
    twist.send_signal(signal.SIGTERM)
    try:
        twist.wait(timeout=20)
    except subprocess.TimeoutExpired:
        twist.kill()
    assert "Traceback" not in twist_log.read_text()
