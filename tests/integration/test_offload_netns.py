"""Large-packet offload carries the same bytes as the plain path, and bad headers stop."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cellvpn.lab import NET_HOST_IP, VpnLab, ctl_json, wait_for
from tests.integration.helpers import PROBE, background, last_json, tool

MB = 1024 * 1024


def transfer(lab: VpnLab, ns: Any, name: str, tmp: Path, port: int) -> dict[str, Any]:
    """64 MB up and 64 MB down; hashes compared; returns the client's and server's counters."""
    size = str(64 * MB)
    sink = background(lab.net, tmp / f"sink-{name}.log", "sink", str(port), NET_HOST_IP)
    sent = tool(ns, "send", NET_HOST_IP, str(port), size)
    got = last_json(sink, tmp / f"sink-{name}.log")
    assert got["bytes"] == 64 * MB and got["sha256"] == sent["sha256"]
    source = background(
        lab.net, tmp / f"source-{name}.log", "source", str(port + 1), NET_HOST_IP, size
    )
    received = tool(ns, "recv", NET_HOST_IP, str(port + 1))
    assert received["sha256"] == last_json(source, tmp / f"source-{name}.log")["sha256"]
    client = ctl_json(ns, lab.socket(name), "vpn_client", "status")
    sessions = ctl_json(lab.srv, lab.server_socket, "vpn_stat")["sessions"]
    [server] = [s for s in sessions if s["client_addr"] == client["address"]]
    return {"client": client, "server": server["counters"]}


def test_offload_and_plain_clients_carry_the_same_bytes(netns: Any, tmp_path: Path) -> None:
    """An offload client and a plain one: same data through both (hashes), and at each end
    of each session the client's and the server's IP-byte counters agree exactly."""
    lab = VpnLab(netns, tmp_path)
    fast, plain = lab.add_client_host(), lab.add_client_host()
    server = lab.start_server()
    assert "offload on" in server.wait_log(r"TUN cvpn-srv up.*").group(0)
    lab.start_client(fast, "fast", section_extra="default_route = true\n")
    lab.start_client(plain, "plain", section_extra="default_route = true\noffload = off\n")
    results = {
        "fast": transfer(lab, fast, "fast", tmp_path, 5100),
        "plain": transfer(lab, plain, "plain", tmp_path, 5200),
    }
    assert results["fast"]["client"]["offload"] is True
    assert results["plain"]["client"]["offload"] is False
    for r in results.values():
        c, s = r["client"]["counters"], r["server"]
        assert c["sent_bytes"] == s["from_client_bytes"]
        assert c["sent_packets"] == s["from_client_packets"]
        assert c["received_bytes"] == s["to_client_bytes"]
        assert c["received_packets"] == s["to_client_packets"]
        assert s["dropped_bad_offload"] == 0 and s["dropped_malformed"] == 0
    # the same payload costs the same IP bytes with or without offload (TCP's own variation
    # in segment sizes and ACKs aside)
    fast_up = results["fast"]["server"]["from_client_bytes"]
    plain_up = results["plain"]["server"]["from_client_bytes"]
    assert abs(fast_up - plain_up) / plain_up < 0.05


def test_malformed_vnet_headers_are_dropped_counted_and_never_reach_the_tun(
    netns: Any, tmp_path: Path
) -> None:
    """VPN_SEND_GSO with bad headers: none is written to the TUN (captured), each counted;
    among them a TCP super-packet and a checksum-offload UDP packet with More Fragments set
    (the first was once cut into segments that each said MF)."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    lab.start_server()
    log = tmp_path / "capture.log"
    capture = lab.srv.popen(["tcpdump", "-n", "-l", "-i", "cvpn-srv", "port", "9"], log=log)
    wait_for(lambda: "listening on" in log.read_text(), timeout=10, what="tcpdump")
    probe = cli.exec(sys.executable, PROBE, "192.0.2.1", "8089", str(lab.ca), "bad-gso")
    events = [json.loads(line) for line in probe.stdout.splitlines()]
    assert [e["event"] for e in events][:3] == ["established", "success", "addr"]
    stat = ctl_json(lab.srv, lab.server_socket, "vpn_stat", "-full")
    counters = (stat["sessions"] + stat["ended"])[0]["counters"]
    assert counters["dropped_bad_offload"] == 7
    assert counters["from_client_packets"] == 0
    capture.terminate()
    capture.wait(timeout=10)
    assert [ln for ln in log.read_text().splitlines() if " IP " in ln] == []
