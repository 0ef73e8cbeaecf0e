"""Namespace scenarios no other file shows: the smallest and largest MTU, a client that roams
to a new underlay address (and, expected to fail for now, to a network where the server is
behind a router), a lease kept for a client that stops and starts again, and the kill switch
while the server is gone but the underlay works.

docs/testing.md lists every scenario of the namespace suite and the test that shows it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from cellvpn.lab import NET_HOST_IP, SERVER_IP, Namespace, Twistd, VpnLab, ctl, ctl_json, wait_for
from tests.integration.helpers import background, last_json, ping, tool

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

MB = 1024 * 1024
GATEWAY = "198.18.5.1"
#: [srv_vpn] mtu accepts 576 to 65535 (cellvpn/config/schema.py); a veth's maxmtu is 65535
LARGEST_MTU = 65535
#: IPv4 and ICMP headers: ``ping -s`` payload = MTU - 28
ICMP_OVERHEAD = 28


def client_host(lab: VpnLab) -> Namespace:
    """A client host of the lab, checked to have its own resolv.conf before a client starts."""
    ns = lab.add_client_host()
    assert ns.resolv_conf == Path("/etc/netns") / ns.name / "resolv.conf"
    assert ns.resolv_conf.read_text().endswith("nameserver 192.0.2.53\n")
    return ns


def status(lab: VpnLab, ns: Namespace, name: str = "client") -> dict[str, Any]:
    result: dict[str, Any] = ctl_json(ns, lab.socket(name), "vpn_client", "status")
    return result


def df_ping(ns: Namespace, target: str, payload: int) -> bool:
    """Two echoes of ``payload`` bytes with Don't Fragment set: they pass whole or not at all."""
    done = ns.exec(
        "ping", "-c", "2", "-i", "0.2", "-W", "3", "-M", "do", "-s", str(payload), target,
        check=False,
    )  # fmt: skip
    return done.returncode == 0


def both_ways(lab: VpnLab, ns: Namespace, work: Path, port: int, size: int) -> None:
    """``size`` bytes up to the net host and ``size`` down from it, hashes equal."""
    sink = background(lab.net, work / f"sink-{port}.log", "sink", str(port), NET_HOST_IP)
    sent = tool(ns, "send", NET_HOST_IP, str(port), str(size))
    got = last_json(sink, work / f"sink-{port}.log")
    assert (got["bytes"], got["sha256"]) == (size, sent["sha256"])
    log = work / f"source-{port + 1}.log"
    source = background(lab.net, log, "source", str(port + 1), NET_HOST_IP, str(size))
    received = tool(ns, "recv", NET_HOST_IP, str(port + 1))
    assert (received["bytes"], received["sha256"]) == (size, last_json(source, log)["sha256"])


def restart_server_with(lab: VpnLab, work: Path, old: str, new: str) -> Twistd:
    """Stop the lab's server, change one line of its config, start it again.

    ``VpnLab.start_server`` writes ``mtu = 1400`` itself, and the strict config parser refuses
    a second ``mtu`` from ``vpn_extra``."""
    assert lab.server is not None
    assert lab.server.stop() == 0
    cfg = work / "server.cfg"
    text = cfg.read_text()
    assert old in text
    cfg.write_text(text.replace(old, new))
    lab.server = Twistd(lab.srv, "cellvpn", cfg, work / "server2.log")
    lab.server.wait_log(r"TUN cvpn-srv up")
    return lab.server


# --- data path: the MTU ------------------------------------------------------------------------


@pytest.mark.parametrize("mtu", [1280, LARGEST_MTU], ids=["mtu-1280", "mtu-65535"])
def test_smallest_and_largest_mtu_carry_tcp_both_ways_and_a_full_size_df_ping(
    netns: Any, tmp_path: Path, mtu: int
) -> None:
    """[srv_vpn] mtu at IPv6's minimum and at the most a TUN and a veth take: the client's TUN
    gets it from ADDR_REPLY, 16 MB go each way intact, and a ping that just fits with DF set
    reaches the gateway and the net host and comes back from it to the client; one byte more
    does not leave the client.

    The stream is TCP, so the overlay's packets are not bound by the underlay's 1500; the
    uplink to the net host is raised to the MTU so a full-size packet crosses it whole."""
    lab = VpnLab(netns, tmp_path)
    cli = client_host(lab)
    for ns, dev in ((lab.srv, "up0"), (lab.net, "up1")):
        ns.ip("link", "set", dev, "mtu", str(max(mtu, 1500)))
    lab.start_server()
    server = restart_server_with(lab, tmp_path, "mtu = 1400\n", f"mtu = {mtu}\n")
    assert f"mtu {mtu}," in server.wait_log(r"TUN cvpn-srv up: .*").group(0)
    lab.start_client(cli, "client", section_extra="default_route = true\n")
    assert status(lab, cli)["mtu"] == mtu
    assert f" mtu {mtu} " in cli.ip("link", "show", "cvpn-cli").stdout
    assert f" mtu {mtu} " in lab.srv.ip("link", "show", "cvpn-srv").stdout

    payload = mtu - ICMP_OVERHEAD
    for target in (GATEWAY, NET_HOST_IP):
        assert df_ping(cli, target, payload), f"{payload} B from the client to {target}"
    address = status(lab, cli)["address"]
    assert df_ping(lab.net, address, payload), f"{payload} B from the net host to {address}"
    if mtu < LARGEST_MTU:  # ping's own limit is 65507, the largest payload of all
        before = ctl_json(lab.srv, lab.server_socket, "vpn_stat")["sessions"][0]["counters"]
        assert not df_ping(cli, NET_HOST_IP, payload + 1)
        after = ctl_json(lab.srv, lab.server_socket, "vpn_stat")["sessions"][0]["counters"]
        assert after["from_client_packets"] == before["from_client_packets"]
    both_ways(lab, cli, tmp_path, 5001, 16 * MB)
    counters = ctl_json(lab.srv, lab.server_socket, "vpn_stat")["sessions"][0]["counters"]
    assert counters["dropped_malformed"] == 0 and counters["dropped_bad_offload"] == 0


# --- lifecycle: roaming -------------------------------------------------------------------------

#: the client host's address after it roams, and a router on the server's side of its new link
ROAMED = "192.0.2.102"
ROUTER = "192.0.2.254"
#: three unanswered PINGs half a second apart: the dead stream is found in about 2 s
FAST_LOSS = "keepalive = 0.5\n"


def roam_on_link(ns: Namespace) -> None:
    """A new address in the server's /24, the default route back (as after a DHCP renewal)."""
    ns.ip("addr", "flush", "dev", "eth0")
    ns.ip("addr", "add", f"{ROAMED}/24", "dev", "eth0")
    ns.ip("route", "replace", "default", "via", SERVER_IP)


def roam_off_link(lab: VpnLab, ns: Namespace) -> None:
    """A /32 behind a router (the server host's second address): the server is no longer on
    the link, only the default route via the router reaches it."""
    lab.srv.ip("addr", "add", f"{ROUTER}/24", "dev", "br0")
    ns.ip("addr", "flush", "dev", "eth0")
    ns.ip("addr", "add", f"{ROAMED}/32", "dev", "eth0")
    ns.ip("route", "add", ROUTER, "dev", "eth0", "scope", "link")
    ns.ip("route", "replace", "default", "via", ROUTER)


def back_from(lab: VpnLab, ns: Namespace, timeout: float) -> dict[str, Any]:
    """The client's status once it is up again on a second session."""

    def up_again() -> dict[str, Any] | None:
        st = status(lab, ns)
        return st if st["status"] == "STARTED" and st["sessions_established"] == 2 else None

    result: dict[str, Any] = wait_for(up_again, timeout=timeout, what="the client back")
    return result


def test_roaming_to_a_new_underlay_address_keeps_the_lease_and_an_idle_tcp_connection(
    netns: Any, tmp_path: Path
) -> None:
    """The client host's address changes mid-session: the client finds the stream dead,
    reconnects by itself from the new address, and the server, which still holds the session
    of the old address, hands the lease over to the new one (the old stream is closed as
    TAKEN_OVER); a TCP connection through the tunnel that was idle across the change carries
    on, since its overlay address stayed the same."""
    lab = VpnLab(netns, tmp_path)
    cli = client_host(lab)
    server = lab.start_server()
    client = lab.start_client(cli, "client", section_extra=f"default_route = true\n{FAST_LOSS}")
    before = status(lab, cli)
    [old] = ctl_json(lab.srv, lab.server_socket, "vpn_stat")["sessions"]
    assert old["peer"].startswith("192.0.2.2:")
    echo = background(lab.net, tmp_path / "echo.log", "echo", "5003", NET_HOST_IP)
    trigger = tmp_path / "go"
    hold = background(cli, tmp_path / "hold.log", "hold", NET_HOST_IP, "5003", str(trigger))
    wait_for(lambda: '"first": true' in (tmp_path / "hold.log").read_text(), what="first echo")

    roam_on_link(cli)
    after = back_from(lab, cli, timeout=45)
    assert after["address"] == before["address"]
    assert after["session_id"] != before["session_id"]
    server.wait_log(
        rf"session {after['session_id']:#010x} takes over {re.escape(before['address'])} "
        rf"from session {old['session_id']:#010x}"
    )
    sessions = ctl_json(lab.srv, lab.server_socket, "vpn_stat")["sessions"]
    [new] = [s for s in sessions if s["client_addr"] is not None]
    assert new["peer"].startswith(f"{ROAMED}:") and new["client_addr"] == before["address"]
    assert new["identity"] == old["identity"]  # the resume token the client kept
    trigger.write_text("go")
    assert last_json(hold, tmp_path / "hold.log", timeout=30) == {"second": True}
    echo.terminate()
    assert ping(cli, NET_HOST_IP)
    ctl(cli, lab.socket("client"), "vpn_client", "stop")
    assert "cvpn-cli" not in cli.ip("-4", "route").stdout
    server.wait_log(
        rf"session {old['session_id']:#010x} with 192\.0\.2\.2:\d+ ended: server closed the "
        r"stream \(TAKEN_OVER\)"
    )
    assert "Traceback" not in client.text() + server.text()


def test_roaming_behind_a_router_with_the_kill_switch_reconnects(
    netns: Any, tmp_path: Path
) -> None:
    """Roaming to a network where the server is off the link: the reconnect must route the
    stream to the server through the new gateway, not into the tunnel's 0.0.0.0/1. (A fresh
    start on such a network sets up a host route via the router and works.)"""
    lab = VpnLab(netns, tmp_path)
    cli = client_host(lab)
    lab.start_server()
    lab.start_client(
        cli, "client", section_extra=f"default_route = true\nkill_switch = true\n{FAST_LOSS}"
    )
    roam_off_link(lab, cli)
    try:
        back_from(lab, cli, timeout=12)  # the on-link roam is back in about 8 s
    finally:
        print("routes after the roam:\n" + cli.ip("-4", "route").stdout)
        print("the way to the server:", cli.ip("route", "get", SERVER_IP).stdout.split("\n")[0])
    assert f"{SERVER_IP} via {ROUTER} dev eth0" in cli.ip("route", "get", SERVER_IP).stdout
    assert ping(cli, GATEWAY)


# --- addresses: sticky leases -------------------------------------------------------------------


def test_a_client_that_stops_and_starts_again_gets_its_address_back(
    netns: Any, tmp_path: Path
) -> None:
    """lease_hold: after a clean stop the address is held for that client (its resume token),
    so a client arriving meanwhile gets another one although the freed address would be next,
    and the next start of the first client gets its old address again."""
    lab = VpnLab(netns, tmp_path)
    a, b, c = client_host(lab), client_host(lab), client_host(lab)
    server = lab.start_server()
    for ns, name in ((a, "a"), (b, "b")):
        lab.start_client(ns, name, section_extra="default_route = false\n")
    first = status(lab, a, "a")["address"]
    assert (first, status(lab, b, "b")["address"]) == ("198.18.5.2", "198.18.5.3")
    ctl(a, lab.socket("a"), "vpn_client", "stop")
    server.wait_log(r"session 0x[0-9a-f]+ with 192\.0\.2\.2:\d+ ended")
    pool = ctl_json(lab.srv, lab.server_socket, "vpn_stat")["pool"]
    assert (pool["leased"], pool["held"], pool["free_stack"]) == (1, 1, 0)

    lab.start_client(c, "c", section_extra="default_route = false\n")
    assert status(lab, c, "c")["address"] == "198.18.5.4"
    start = ["vpn_client", "start", "-addr", SERVER_IP, "-port", "8089"]
    done = ctl(a, lab.socket("a"), *start, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "VPN client started successfully")
    assert status(lab, a, "a")["address"] == first
    assert ping(a, GATEWAY, count=1)
    pool = ctl_json(lab.srv, lab.server_socket, "vpn_stat")["pool"]
    assert (pool["leased"], pool["held"]) == (3, 0)


# --- lifecycle: the kill switch -----------------------------------------------------------------


def test_the_kill_switch_leaks_nothing_while_the_server_is_down_and_the_underlay_works(
    netns: Any, tmp_path: Path
) -> None:
    """The server stops, the client's link stays up: with kill_switch the tunnel routes stay,
    so traffic for the net host goes into the TUN and is dropped (counted) instead of out of
    eth0 in the clear to the server host, which would forward it (captured on its bridge)."""
    lab = VpnLab(netns, tmp_path)
    cli = client_host(lab)
    server = lab.start_server()
    lab.start_client(
        cli, "client", section_extra="default_route = true\nkill_switch = true\nkeepalive = 1\n"
    )
    assert ping(cli, NET_HOST_IP, count=1)
    log = tmp_path / "capture.log"
    capture = lab.srv.popen(
        ["tcpdump", "-n", "-l", "-i", "br0", "icmp", "and", "host", NET_HOST_IP], log=log
    )
    wait_for(lambda: "listening on" in log.read_text(), timeout=10, what="tcpdump")
    assert server.stop() == 0
    wait_for(lambda: status(lab, cli)["status"] == "CONN_LOST", timeout=15, what="CONN_LOST")
    dropped = status(lab, cli)["counters"]["dropped_not_connected"]
    assert not ping(cli, NET_HOST_IP, count=3)
    assert ping(cli, SERVER_IP, count=1)  # the underlay itself works
    st = status(lab, cli)
    assert st["status"] == "CONN_LOST"
    assert st["counters"]["dropped_not_connected"] >= dropped + 3
    routes = cli.ip("-4", "route").stdout
    assert "0.0.0.0/1 dev cvpn-cli" in routes and "128.0.0.0/1 dev cvpn-cli" in routes
    assert clear(log) == []
    # the capture does see such packets: with the client stopped they go out in the clear
    ctl(cli, lab.socket("client"), "vpn_client", "stop")
    # one echo request, unanswered: the net host has no way back to 192.0.2.0/24
    cli.exec("ping", "-c", "1", "-W", "1", NET_HOST_IP, check=False)
    wait_for(lambda: clear(log), timeout=10, what="the clear echo request captured")
    capture.terminate()
    capture.wait(timeout=10)


def clear(log: Path) -> list[str]:
    """The captured IP packets (tcpdump's own lines left out)."""
    return [ln for ln in log.read_text().splitlines() if " IP " in ln]
