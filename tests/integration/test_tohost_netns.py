"""What a client reaches on the server host itself through the TUN: ping, and nothing else."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cellvpn.lab import VpnLab, ctl_json, wait_for
from tests.integration.helpers import PROBE, ping


def test_packets_to_the_host_are_dropped_and_counted_but_ping_works(
    netns: Any, tmp_path: Path
) -> None:
    """UDP to the host's underlay, uplink and gateway addresses, and a packet with a loose
    source route: none reaches the TUN (captured), each is counted; a real client still pings
    the gateway."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    lab.start_server()
    log = tmp_path / "capture.log"
    capture = lab.srv.popen(["tcpdump", "-n", "-l", "-i", "cvpn-srv", "udp"], log=log)
    wait_for(lambda: "listening on" in log.read_text(), timeout=10, what="tcpdump")
    probe = cli.exec(sys.executable, PROBE, "192.0.2.1", "8089", str(lab.ca), "to-host")
    events = [json.loads(line) for line in probe.stdout.splitlines()]
    assert [e["event"] for e in events][:3] == ["established", "success", "addr"]
    stat = ctl_json(lab.srv, lab.server_socket, "vpn_stat", "-full")
    counters = (stat["sessions"] + stat["ended"])[0]["counters"]
    assert counters["dropped_to_host"] == 3
    assert counters["dropped_ip_options"] == 1
    assert counters["from_client_packets"] == 0
    lab.start_client(cli, "client")
    assert ping(cli, "198.18.5.1")
    capture.terminate()
    capture.wait(timeout=10)
    assert [ln for ln in log.read_text().splitlines() if " IP " in ln] == []
