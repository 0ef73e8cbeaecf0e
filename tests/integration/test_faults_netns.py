"""Faults with real processes: the server's TUN deleted, the server killed and back, the
client stopped by a signal mid-transfer, a client that stops reading."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from cellvpn.billing.sqlite import SqliteLedger
from cellvpn.lab import NET_HOST_IP, VpnLab, ctl_json, wait_for
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
BILLING = billing_section(1000, "B", 4 * MB)


def paid_client(lab: VpnLab, tmp_path: Path, cli: Any, name: str = "client", **kw: str) -> Any:
    key, _account = wallet(tmp_path, name, 1_000_000)
    return lab.start_client(cli, name, extra=wallet_section(key, 500_000), **kw)


def invariant(tmp_path: Path) -> None:
    ok, figures = SqliteLedger(tmp_path / "state" / "ledger.db", create=False).check_invariant()
    assert ok, figures


def test_a_deleted_tun_stops_the_server_with_the_reason_and_clients_come_back(
    netns: Any, tmp_path: Path
) -> None:
    """``ip link del`` of the server's TUN: every session is told TUNNEL_DOWN, the server stops
    with status 1 and says why (it cannot make the device again without root); started again,
    it serves the same client, which came back by itself."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    server = lab.start_server(extra=BILLING)
    client = paid_client(lab, tmp_path, cli)
    assert ping(cli, "198.18.5.1")
    lab.srv.ip("link", "del", "cvpn-srv")
    server.wait_log(r"TUN cvpn-srv is gone \(.*\); every session was told TUNNEL_DOWN")
    assert server.proc.wait(timeout=20) == 1
    wait_for(
        lambda: ctl_json(cli, lab.socket("client"), "vpn_client", "status")["status"] != "STARTED",
        timeout=20,
        what="the client to see the link go",
    )
    invariant(tmp_path)
    lab.start_server(extra=BILLING)
    client.wait_log(r"VPN up: .*", timeout=60)
    wait_for(lambda: ping(cli, "198.18.5.1", count=1), timeout=60, what="ping after restart")
    invariant(tmp_path)


def test_a_killed_server_comes_back_and_billing_resumes(netns: Any, tmp_path: Path) -> None:
    """kill -9 of the server mid-session: started again, the client reconnects by itself, pays
    again from the same deposit, and the ledger still adds up."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    server = lab.start_server(extra=BILLING)
    paid_client(lab, tmp_path, cli)
    assert ping(cli, "198.18.5.1")
    before = ctl_json(lab.srv, lab.server_socket, "vpn_stat")["sessions"][0]["billing"]
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=10)
    again = lab.start_server(extra=BILLING)
    again.wait_log(r"released \d+ deposit\(s\) marked in use by an earlier run|receipt .* redeemed")
    wait_for(
        lambda: bool(ctl_json(lab.srv, lab.server_socket, "vpn_stat")["sessions"]),
        timeout=60,
        what="the client back",
    )
    wait_for(lambda: ping(cli, "198.18.5.1", count=1), timeout=60, what="ping after restart")
    after = ctl_json(lab.srv, lab.server_socket, "vpn_stat")["sessions"][0]["billing"]
    assert after["deposit"] == before["deposit"] and after["mode"] == "paid"
    invariant(tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_client_stopped_by_a_signal_during_traffic_puts_the_host_back(
    netns: Any, tmp_path: Path, sig: signal.Signals
) -> None:
    """SIGTERM or SIGINT to the client while a transfer runs through the tunnel: routes,
    addresses, rules and resolv.conf are as they were before it started."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    lab.start_server(vpn_extra="dns = 198.18.5.1\n")
    before = host_snapshot(cli)
    client = lab.start_client(cli, "client", section_extra="default_route = true\n")
    assert host_snapshot(cli) != before
    background(lab.net, tmp_path / "sink.log", "sink", "5001", NET_HOST_IP)
    sender = background(cli, tmp_path / "send.log", "send", NET_HOST_IP, "5001", str(512 * MB))
    wait_for(lambda: counters(lab)["from_client_bytes"] > 4 * MB, timeout=20, what="traffic")
    client.proc.send_signal(sig)
    assert client.proc.wait(timeout=20) in (0, -sig)
    sender.kill()
    sender.wait(timeout=10)
    assert host_snapshot(cli) == before


def counters(lab: VpnLab) -> dict[str, int]:
    sessions = ctl_json(lab.srv, lab.server_socket, "vpn_stat")["sessions"]
    return sessions[0]["counters"] if sessions else {"from_client_bytes": 0}


def test_a_client_that_stops_reading_is_bounded_then_cut_and_no_one_else_notices(
    netns: Any, tmp_path: Path
) -> None:
    """A paying client frozen with SIGSTOP while UDP nobody acknowledges pours down to it:
    the server keeps at most its bounded queue for it and drops the rest (counted, its memory
    flat), closes the stream once ``idle_timeout`` passes without a frame, and says why; a
    second paying client's upload through the same server arrives whole meanwhile, its
    session untouched. Thawed, the first client comes back by itself; the ledger adds up."""
    lab = VpnLab(netns, tmp_path)
    stuck, busy = lab.add_client_host(), lab.add_client_host()
    # a receipt pays for 256 MB: the frozen client cannot sign its next one, and the server
    # would stop carrying to it at the end of the paid bytes, which is not what is tried here
    server = lab.start_server(
        extra=billing_section(1000, "B", 256 * MB),
        server_extra="keepalive = 1\nidle_timeout = 6\n",
    )
    frozen = paid_client(lab, tmp_path, stuck, "stuck", section_extra="default_route = true\n")
    paid_client(lab, tmp_path, busy, "busy", section_extra="default_route = true\n")
    stuck_addr = ctl_json(stuck, lab.socket("stuck"), "vpn_client", "status")["address"]
    busy_addr = ctl_json(busy, lab.socket("busy"), "vpn_client", "status")["address"]
    busy_id = session_of(lab, busy_addr)["session_id"]
    stuck_id = session_of(lab, stuck_addr)["session_id"]
    sink = background(lab.net, tmp_path / "sink.log", "sink", "5001", NET_HOST_IP)
    upload = background(busy, tmp_path / "send.log", "send", NET_HOST_IP, "5001", str(48 * MB))
    rss_before = rss(server.proc.pid)
    frozen.proc.send_signal(signal.SIGSTOP)
    try:
        blasted = tool(lab.net, "blast", stuck_addr, "9", str(128 * MB))["sent"]
        counters = session_of(lab, stuck_addr)["counters"]
        grown = rss(server.proc.pid) - rss_before
        print(
            f"blasted {blasted} B; carried {counters['to_client_bytes']} B, dropped "
            f"{counters['dropped_queue_full']} packets; server RSS +{grown // 1024} KiB"
        )
        assert counters["dropped_queue_full"] > 0
        # the queue's bound, the transport's buffer and the kernel's socket buffers
        assert counters["to_client_bytes"] < 32 * MB < blasted
        assert grown < 16 * MB
        line = server.wait_log(rf"session {stuck_id:#010x}.*(idle|nothing received).*", 30)
        print(line.group(0))
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
    sent = last_json(upload, tmp_path / "send.log")
    assert last_json(sink, tmp_path / "sink.log")["sha256"] == sent["sha256"]
    assert session_of(lab, busy_addr)["session_id"] == busy_id
    wait_for(
        lambda: stuck_addr in {s["client_addr"] for s in sessions(lab)},
        timeout=60,
        what="the thawed client back",
    )
    invariant(tmp_path)


def sessions(lab: VpnLab) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = ctl_json(lab.srv, lab.server_socket, "vpn_stat")["sessions"]
    return found


def session_of(lab: VpnLab, address: str) -> dict[str, Any]:
    [found] = [s for s in sessions(lab) if s["client_addr"] == address]
    return found


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")
