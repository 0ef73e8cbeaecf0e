"""IPv6 inside the tunnel (dual stack), with real namespaces, TUNs and twistd processes.

Only 2001:db8::/32 is used for IPv6: the underlay 2001:db8::/64, the pool 2001:db8:1::/64 and
the net host's link 2001:db8:5::/64 (the lab's ``overlay6``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cellvpn.lab import NET_HOST_IP, NET_HOST_IP6, Namespace, VpnLab, ctl_json, wait_for
from tests.integration.helpers import background, host_snapshot, last_json, ping, tool

MB = 1024 * 1024
SIZE = 100 * MB


def ping6(ns: Namespace, target: str, count: int = 3) -> bool:
    done = ns.exec("ping", "-6", "-c", str(count), "-i", "0.2", "-W", "2", target, check=False)
    return done.returncode == 0


def status(lab: VpnLab, ns: Namespace, name: str) -> Any:
    return ctl_json(ns, lab.socket(name), "vpn_client", "status")


def server_session(lab: VpnLab, address: str) -> dict[str, Any]:
    sessions = ctl_json(lab.srv, lab.server_socket, "vpn_stat")["sessions"]
    [found] = [s for s in sessions if s["client_addr"] == address]
    return dict(found)


def settled_counters(lab: VpnLab, ns: Namespace, name: str) -> tuple[Any, dict[str, Any]]:
    """The client's status and its session's server counters, once both ends agree.

    The kernel's own IPv6 chatter on the client's TUN (a router solicitation from ::, 48
    bytes, every few seconds) has no leased source: the server drops it as spoofed, so it is
    what the client sent and lost. One can fall between the two reads; a server read that
    sits between two equal client reads is a settled one.
    """
    found: list[Any] = []

    def agree() -> bool:
        before = status(lab, ns, name)
        counters = server_session(lab, before["address"])["counters"]
        after = status(lab, ns, name)
        carried = counters["from_client_bytes"] + counters["from_client_lost_bytes"]
        sent = before["counters"]["sent_bytes"]
        found[:] = [after, counters, carried, sent]
        return bool(sent == after["counters"]["sent_bytes"] == carried)

    try:
        wait_for(agree, timeout=20, what=f"{name}'s counters at both ends")
    except AssertionError as timed_out:
        raise AssertionError(
            f"sent {found[3]}, server carried {found[2]}: {found[1]}"
        ) from timed_out
    return found[0], found[1]


def transfer6(lab: VpnLab, ns: Namespace, name: str, port: int) -> None:
    """SIZE bytes up to the net host over IPv6, hashes compared."""
    log = lab.work / f"sink6-{name}.log"
    sink = background(lab.net, log, "sink", str(port), NET_HOST_IP6)
    sent = tool(ns, "send", NET_HOST_IP6, str(port), str(SIZE))
    got = last_json(sink, log)
    assert got["bytes"] == SIZE and got["sha256"] == sent["sha256"]


def test_dual_stack_clients_with_and_without_offload(netns: Any, tmp_path: Path) -> None:
    """Both clients get an IPv4 and an IPv6 address; ping6 and 100 MB over IPv6 reach the net
    host through the tunnel from each; the client's and the server's counters agree; ::/1 and
    8000::/1 go into the TUN instead of the guard, and all of it is gone after the stop."""
    lab = VpnLab(netns, tmp_path, overlay6=True)
    fast, plain = lab.add_client_host(), lab.add_client_host()
    before = host_snapshot(fast)
    server = lab.start_server()
    assert "and 2001:db8:1::1/64" in server.wait_log(r"TUN cvpn-srv up.*").group(0)
    clients = {
        "fast": lab.start_client(fast, "fast", section_extra="default_route = true\n"),
        "plain": lab.start_client(
            plain, "plain", section_extra="default_route = true\noffload = off\n"
        ),
    }
    for name, ns, address6 in (("fast", fast, "2001:db8:1::2"), ("plain", plain, "2001:db8:1::3")):
        st = status(lab, ns, name)
        assert st["address6"] == address6 and st["gateway6"] == "2001:db8:1::1"
        routes6 = ns.ip("-6", "route").stdout
        assert "::/1 dev cvpn-cli" in routes6 and "8000::/1 dev cvpn-cli" in routes6
        assert "unreachable" not in routes6
        assert ping6(ns, NET_HOST_IP6) and ping(ns, NET_HOST_IP)
    started = time.monotonic()
    transfer6(lab, fast, "fast", 5300)
    transfer6(lab, plain, "plain", 5301)
    took = time.monotonic() - started
    print(f"2 x {SIZE // MB} MB over IPv6 in {took:.1f} s")
    for name, ns in (("fast", fast), ("plain", plain)):
        st, counters = settled_counters(lab, ns, name)
        assert counters["dropped_spoofed"] <= 4, counters
        assert counters["from_client_bytes"] > SIZE
        assert counters["dropped_bad_offload"] == counters["dropped_malformed"] == 0
    assert status(lab, fast, "fast")["offload"] is True
    assert status(lab, plain, "plain")["offload"] is False
    assert clients["fast"].stop() == 0
    assert host_snapshot(fast) == before


def test_a_forged_ipv6_source_never_leaves_the_server(netns: Any, tmp_path: Path) -> None:
    """UDP from a forged IPv6 source: none is seen on the server's upstream link, each is
    counted as spoofed; the client's own IPv6 still passes."""
    lab = VpnLab(netns, tmp_path, overlay6=True)
    cli = lab.add_client_host()
    lab.start_server()
    lab.start_client(cli, "cli", section_extra="default_route = true\n")
    log = tmp_path / "capture6.log"
    capture = lab.srv.popen(["tcpdump", "-n", "-l", "-i", "up0", "ip6", "and", "udp"], log=log)
    wait_for(lambda: "listening on" in log.read_text(), timeout=10, what="tcpdump")
    assert tool(cli, "spoof", "2001:db8:1::99", NET_HOST_IP6, "20")["sent"] == 20
    assert tool(cli, "spoof", "2001:db8:1::2", NET_HOST_IP6, "1")["sent"] == 1
    wait_for(lambda: "2001:db8:1::2." in log.read_text(), timeout=10, what="the real source")
    counters = server_session(lab, "198.18.5.2")["counters"]
    assert counters["dropped_spoofed"] >= 20
    capture.terminate()
    capture.wait(timeout=10)
    assert "2001:db8:1::99" not in log.read_text()


def test_an_ipv4_only_client_against_a_dual_stack_server(netns: Any, tmp_path: Path) -> None:
    """[client] ipv6 = false: no IPv6 address, the guard blackholes IPv6 as before, IPv4
    works, and the server routes no IPv6 to the session."""
    lab = VpnLab(netns, tmp_path, overlay6=True)
    cli = lab.add_client_host()
    lab.start_server()
    lab.start_client(cli, "cli", section_extra="default_route = true\nipv6 = false\n")
    st = status(lab, cli, "cli")
    assert st["address"] == "198.18.5.2" and st["address6"] is None
    routes6 = cli.ip("-6", "route").stdout
    assert "unreachable ::/1" in routes6 and "unreachable 8000::/1" in routes6
    assert ping(cli, NET_HOST_IP)
    assert not ping6(cli, NET_HOST_IP6, count=1)
    assert server_session(lab, "198.18.5.2")["client_addr6"] is None


def test_a_split_tunnel_with_an_ipv6_prefix(netns: Any, tmp_path: Path) -> None:
    """default_route = false, routes = the net host's IPv6 link: it goes into the TUN, IPv6
    elsewhere stays outside (no ::/1, no guard)."""
    lab = VpnLab(netns, tmp_path, overlay6=True)
    cli = lab.add_client_host()
    lab.start_server()
    extra = "default_route = false\nroutes = 2001:db8:5::/64\n"
    lab.start_client(cli, "cli", section_extra=extra)
    routes6 = cli.ip("-6", "route").stdout
    assert "2001:db8:5::/64 dev cvpn-cli" in routes6
    assert "2001:db8:1::/64 dev cvpn-cli" in routes6
    assert "::/1" not in routes6 and "unreachable" not in routes6
    assert ping6(cli, NET_HOST_IP6)


def test_ipv6_excludes_and_dns_are_undone_after_kill_9(netns: Any, tmp_path: Path) -> None:
    """An IPv6 exclude (a route outside the TUN) and an IPv6 DNS server from the server: a
    client killed with -9 leaves them, its next start removes them, its stop leaves the host
    as it was."""
    lab = VpnLab(netns, tmp_path, overlay6=True)
    cli = lab.add_client_host()
    before = host_snapshot(cli)
    lab.start_server(vpn_extra="dns = 2001:db8:1::1\n")
    extra = "default_route = true\nexclude = 2001:db8::/120\n"
    client = lab.start_client(cli, "cli", section_extra=extra)
    assert "nameserver 2001:db8:1::1" in cli.resolv_conf.read_text()
    assert "2001:db8::/120 dev eth0" in cli.ip("-6", "route").stdout
    client.kill()
    left = host_snapshot(cli)
    assert "2001:db8::/120 dev eth0" in left["routes6"]
    assert "nameserver 2001:db8:1::1" in left["resolv.conf"]
    again = lab.start_client(cli, "cli", section_extra=extra)
    assert ping6(cli, NET_HOST_IP6)
    assert again.stop() == 0
    assert host_snapshot(cli) == before
