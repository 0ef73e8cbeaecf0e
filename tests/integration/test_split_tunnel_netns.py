"""Split tunnels, excluded networks and pushed routes, with real processes and captures.

The lab's client host reaches the server host's upstream address (198.19.0.1) and the net
host (198.19.0.10) both ways: in the clear through its default route, or through the tunnel.
A capture of ICMP on the server's bridge (the underlay) shows which went in the clear: what
goes through the tunnel crosses the bridge only inside TLS.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from cellvpn.lab import NET_GW_IP, NET_HOST_IP, Namespace, VpnLab, wait_for
from tests.integration.helpers import host_snapshot, ping

PUSHED = "routes = 198.19.0.0/24, 192.0.2.0/25\n"


class Capture:
    """ICMP seen on the server's bridge while it runs."""

    def __init__(self, lab: VpnLab, name: str) -> None:
        self.log = lab.work / f"{name}.pcap.txt"
        self.proc = lab.srv.popen(["tcpdump", "-n", "-l", "-i", "br0", "icmp"], log=self.log)
        wait_for(lambda: "listening on" in self.log.read_text(), timeout=10, what="tcpdump")

    def clear_to(self, address: str) -> bool:
        return f"> {address}: ICMP echo request" in self.log.read_text()


def routes_of(ns: Namespace) -> str:
    text: str = ns.ip("-4", "route").stdout
    return text


def test_a_split_tunnel_carries_only_its_networks(netns: Any, tmp_path: Path) -> None:
    """default_route = false, routes = the net host: ping to it goes through the tunnel (not
    seen in the clear), ping to the server host's other address goes around it (seen); the
    server's pushed routes are not taken without accept_routes; stop puts the host back."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    lab.start_server(vpn_extra=PUSHED)
    before = host_snapshot(cli)
    capture = Capture(lab, "split")
    client = lab.start_client(
        cli, "client", section_extra=f"default_route = false\nroutes = {NET_HOST_IP}/32\n"
    )
    table = routes_of(cli)
    assert f"{NET_HOST_IP} dev cvpn-cli" in table
    assert "0.0.0.0/1" not in table and "198.19.0.0/24" not in table, table
    assert ping(cli, NET_HOST_IP) and ping(cli, NET_GW_IP)
    wait_for(lambda: capture.clear_to(NET_GW_IP), timeout=5, what="the clear ping in the capture")
    assert not capture.clear_to(NET_HOST_IP)
    client.stop()
    assert host_snapshot(cli) == before


def test_exclude_wins_over_the_default_route_and_pushed_routes_pass_the_policy(
    netns: Any, tmp_path: Path
) -> None:
    """default_route = true with exclude = the server host's upstream address, and
    accept_routes: the pushed 198.19.0.0/24 is taken, the pushed 192.0.2.0/25 (it holds the
    server) is refused with its reason; the excluded address is reached in the clear, the net
    host through the tunnel. After stop, and after kill -9 and a fresh start and stop, the
    host is as it was."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    lab.start_server(vpn_extra=PUSHED)
    before = host_snapshot(cli)
    capture = Capture(lab, "exclude")
    section = f"default_route = true\nexclude = {NET_GW_IP}/32\naccept_routes = true\n"
    client = lab.start_client(cli, "client", section_extra=section)
    client.wait_log(
        r"refused the server's route 192\.0\.2\.0/25: 192\.0\.2\.0/25 contains the server's "
        r"address 192\.0\.2\.1"
    )
    table = routes_of(cli)
    assert "198.19.0.0/24 dev cvpn-cli" in table and "0.0.0.0/1 dev cvpn-cli" in table, table
    assert f"{NET_GW_IP} via 192.0.2.1 dev eth0" in table, table
    assert "192.0.2.0/25" not in table
    assert ping(cli, NET_HOST_IP) and ping(cli, NET_GW_IP)
    wait_for(lambda: capture.clear_to(NET_GW_IP), timeout=5, what="the clear ping in the capture")
    assert not capture.clear_to(NET_HOST_IP)
    client.stop()
    assert host_snapshot(cli) == before

    client = lab.start_client(cli, "client", section_extra=section)
    client.proc.send_signal(signal.SIGKILL)
    client.proc.wait(timeout=10)
    assert host_snapshot(cli) != before  # the killed client left its routes behind
    client = lab.start_client(cli, "client", section_extra=section)
    client.wait_log(r"cleaned up after an earlier run: ")
    client.stop()
    assert host_snapshot(cli) == before
