"""The VPN carrying traffic between real twistd processes in network namespaces."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cellvpn.lab import NET_HOST_IP, VpnLab, ctl_json, wait_for
from tests.integration.helpers import PROBE, background, last_json, ping, tool

MB = 1024 * 1024


def test_ping_and_100_mb_both_ways(netns: Any, tmp_path: Path) -> None:
    """Ping the gateway; 100 MB up and 100 MB down through the tunnel, hashes equal."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    lab.start_server()
    lab.start_client(cli, "client", section_extra="default_route = true\n")
    assert ping(cli, "198.18.5.1")
    size = str(100 * MB)
    sink = background(lab.net, tmp_path / "sink.log", "sink", "5001", NET_HOST_IP)
    sent = tool(cli, "send", NET_HOST_IP, "5001", size)
    got = last_json(sink, tmp_path / "sink.log")
    assert got["bytes"] == 100 * MB and got["sha256"] == sent["sha256"]
    source = background(lab.net, tmp_path / "source.log", "source", "5002", NET_HOST_IP, size)
    received = tool(cli, "recv", NET_HOST_IP, "5002")
    assert received["bytes"] == 100 * MB
    assert received["sha256"] == last_json(source, tmp_path / "source.log")["sha256"]
    stat = ctl_json(lab.srv, lab.server_socket, "vpn_stat")
    [session] = stat["sessions"]
    c = session["counters"]
    assert c["from_client_bytes"] > 100 * MB and c["to_client_bytes"] > 100 * MB
    assert c["dropped_spoofed"] == 0
    status = ctl_json(cli, lab.socket("client"), "vpn_client", "status")
    # both ends count IP bytes: what the client sent is what the server took from it
    assert status["counters"]["sent_bytes"] >= c["from_client_bytes"]


def test_two_clients_reach_the_internet_host_and_each_other(netns: Any, tmp_path: Path) -> None:
    """Two clients at once: each fetches from the net host and pings the other's address.
    One runs the Python loops (``fastpath = off``), the other and the server the C ones: the
    wire is the same, so either end may run either, and the server's pump carries both."""
    lab = VpnLab(netns, tmp_path)
    a, b = lab.add_client_host(), lab.add_client_host()
    lab.serve_http()
    server = lab.start_server()
    client_a = lab.start_client(a, "a", section_extra="default_route = true\nfastpath = off\n")
    lab.start_client(b, "b", section_extra="default_route = true\nfastpath = on\n")
    status_a = ctl_json(a, lab.socket("a"), "status")
    status_b = ctl_json(b, lab.socket("b"), "status")
    assert status_a["fastpath"] == "Python (fastpath = off)"
    assert status_b["fastpath"] == "C (cellvpn.native._fastpath)"
    assert ctl_json(lab.srv, lab.server_socket, "status")["fastpath"].startswith("C ")
    server.wait_log(r"frames are cut and packed in C \(cellvpn.native._fastpath\)")
    client_a.wait_log(r"frames are cut and packed in Python \(fastpath = off\)")
    addr_a, addr_b = status_a["address"], status_b["address"]
    assert {addr_a, addr_b} == {"198.18.5.2", "198.18.5.3"}
    for ns in (a, b):
        page = ns.exec("curl", "-sS", "-m", "10", f"http://{NET_HOST_IP}/").stdout
        assert page == "hello from the cellvpn lab\n"
    assert ping(a, addr_b) and ping(b, addr_a)
    # echo requests to the net host go to the server's TUN through its pump (C), from a
    # client on either loop; the sessions' counters count them as the Python path would
    for ns in (a, b):
        ns.exec("ping", "-c", "20", "-i", "0.01", "-W", "2", NET_HOST_IP)
    stat = ctl_json(lab.srv, lab.server_socket, "vpn_stat")
    assert stat["pumped_packets"] >= 40
    sent = sum(s["counters"]["from_client_packets"] for s in stat["sessions"])
    assert sent >= stat["pumped_packets"] + 6  # the pings between clients: Python's
    http_log = (tmp_path / "http.log").read_text()
    assert f"{addr_a} - -" in http_log and f"{addr_b} - -" in http_log


def test_isolated_clients_cannot_reach_each_other(netns: Any, tmp_path: Path) -> None:
    """isolate_clients: the net host is reachable, the other client is not; drops counted."""
    lab = VpnLab(netns, tmp_path)
    a, b = lab.add_client_host(), lab.add_client_host()
    lab.start_server(vpn_extra="isolate_clients = true\n")
    lab.start_client(a, "a", section_extra="default_route = true\n")
    lab.start_client(b, "b", section_extra="default_route = true\n")
    addr_b = ctl_json(b, lab.socket("b"), "status")["address"]
    assert ping(a, NET_HOST_IP)
    assert not ping(a, addr_b, count=2)
    stat = ctl_json(lab.srv, lab.server_socket, "vpn_stat")
    dropped = {s["client_addr"]: s["counters"]["dropped_isolated"] for s in stat["sessions"]}
    assert dropped[ctl_json(a, lab.socket("a"), "status")["address"]] >= 2


def test_small_pool_no_free_addr_already_assigned_and_reuse(netns: Any, tmp_path: Path) -> None:
    """A /29: a second ADDR_REQUEST on one session gets ALREADY_ASSIGNED_ADDR and the address
    comes back when that session ends; five leases, the sixth client gets NO_FREE_ADDR; after a
    client leaves, the waiting one gets its address.

    The scripted session runs while the pool still has room: once the sixth client waits, it
    retries on its own and would race a probe for the address a leaver frees."""
    lab = VpnLab(netns, tmp_path, pool="198.18.7.0/29")
    hosts = [lab.add_client_host() for _ in range(6)]
    lab.start_server()
    clients = []
    for i, ns in enumerate(hosts[:4]):
        clients.append(lab.start_client(ns, f"c{i}", section_extra="default_route = false\n"))
    # a scripted client on the fifth host: two ADDR_REQUESTs on one session
    probe = hosts[4].exec(sys.executable, PROBE, "192.0.2.1", "8089", str(lab.ca), "addr-twice")
    events = [json.loads(line) for line in probe.stdout.splitlines()]
    assert [e["event"] for e in events] == ["established", "success", "addr", "problem"]
    assert events[3]["value"] == "ALREADY_ASSIGNED_ADDR"
    lab.server.wait_log(r"session 0x[0-9a-f]+ with 192\.0\.2\.6:\d+ ended")  # type: ignore[union-attr]
    clients.append(lab.start_client(hosts[4], "c4", section_extra="default_route = false\n"))
    addrs = [
        ctl_json(ns, lab.socket(f"c{i}"), "status")["address"] for i, ns in enumerate(hosts[:5])
    ]
    assert sorted(addrs) == [f"198.18.7.{n}" for n in range(2, 7)]
    assert addrs[4] == events[2]["value"]  # the probe's address came back to the pool
    sixth = lab.start_client(hosts[5], "c5", section_extra="default_route = false\n", wait=False)
    sixth.wait_log(r"server has no free address \(NO_FREE_ADDR\)")
    lab.server.wait_log(r"no free address in 198\.18\.7\.0/29")  # type: ignore[union-attr]
    for i, ns in enumerate(hosts[:5]):
        assert ping(ns, "198.18.7.1", count=1), f"client {i} lost its tunnel"
    # the first client leaves; the waiting sixth client (retrying) gets that address
    clients[0].stop()
    wait_for(
        lambda: ctl_json(hosts[5], lab.socket("c5"), "status")["status"] == "STARTED",
        timeout=90,
        what="the sixth client to start",
    )
    assert ctl_json(hosts[5], lab.socket("c5"), "status")["address"] == addrs[0]


def test_forged_source_addresses_never_leave_the_server(netns: Any, tmp_path: Path) -> None:
    """Packets whose source is not the client's lease: none reaches the server's namespaces
    (captured there and on the net host), and vpn_stat --json counts them."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    lab.start_server()
    lab.start_client(cli, "client", section_extra="default_route = true\n")
    captures = []
    for ns in (lab.srv, lab.net):
        log = tmp_path / f"capture-{ns.name}.log"
        captures.append(
            (ns.popen(["tcpdump", "-n", "-l", "-i", "any", "udp", "port", "9"], log=log), log)
        )
    wait_for(
        lambda: all("listening on" in log.read_text() for _, log in captures),
        timeout=10,
        what="tcpdump",
    )
    assert tool(cli, "spoof", "198.18.5.99", NET_HOST_IP, "20")["sent"] == 20
    assert tool(cli, "spoof", "192.0.2.77", NET_HOST_IP, "5")["sent"] == 5
    stat = wait_for(
        lambda: (
            (s := ctl_json(lab.srv, lab.server_socket, "vpn_stat"))["sessions"][0]["counters"][
                "dropped_spoofed"
            ]
            >= 25
            and s
        ),
        timeout=10,
        what="25 spoofed packets counted",
    )
    assert stat["sessions"][0]["counters"]["dropped_spoofed"] == 25
    for proc, log in captures:
        proc.terminate()
        proc.wait(timeout=10)
        lines = [ln for ln in log.read_text().splitlines() if " IP " in ln]
        assert lines == [], lines
    text = ctl_json(lab.srv, lab.server_socket, "vpn_stat", "-full")
    assert text["sessions"][0]["counters"]["from_client_lost_bytes"] >= 25 * 34
