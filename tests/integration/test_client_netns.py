"""The client's life on a real host: link loss and reconnect, kill switch, and cleanup."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from cellvpn.lab import NET_HOST_IP, Namespace, Twistd, VpnLab, ctl, ctl_json, wait_for
from tests.integration.helpers import background, host_snapshot, last_json, ping, second_server


def status(lab: VpnLab, ns: Namespace, name: str = "client") -> dict[str, Any]:
    result: dict[str, Any] = ctl_json(ns, lab.socket(name), "vpn_client", "status")
    return result


def test_underlay_cut_conn_lost_reconnect_same_address_tcp_survives(
    netns: Any, tmp_path: Path
) -> None:
    """Veth down for 10 s with keepalive 1: CONN_LOST (seen through cellvpn-ctl), the kill
    switch keeps the tunnel routes; the link returns: reconnect by itself, same address, and an
    idle TCP connection through the tunnel carries on."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    lab.start_server()
    lab.start_client(
        cli, "client", section_extra="default_route = true\nkill_switch = true\nkeepalive = 1\n"
    )
    before = status(lab, cli)
    echo = background(lab.net, tmp_path / "echo.log", "echo", "5003", NET_HOST_IP)
    trigger = tmp_path / "go"
    hold = background(cli, tmp_path / "hold.log", "hold", NET_HOST_IP, "5003", str(trigger))
    wait_for(lambda: '"first": true' in (tmp_path / "hold.log").read_text(), what="first echo")

    lab.cut(cli)
    wait_for(lambda: status(lab, cli)["status"] == "CONN_LOST", timeout=15, what="CONN_LOST")
    text = ctl(cli, lab.socket("client"), "vpn_client", "status").stdout
    assert text.startswith("VPN client lost connection\n")
    routes = cli.ip("-4", "route").stdout
    assert "0.0.0.0/1 dev cvpn-cli" in routes and "128.0.0.0/1 dev cvpn-cli" in routes
    time.sleep(7)  # with the ~3 s until CONN_LOST, the underlay is down for about 10 s
    lab.mend(cli)
    wait_for(lambda: status(lab, cli)["status"] == "STARTED", timeout=60, what="reconnect")
    after = status(lab, cli)
    assert after["address"] == before["address"]
    assert after["sessions_established"] == 2
    trigger.write_text("go")
    result = last_json(hold, tmp_path / "hold.log", timeout=30)
    assert result == {"second": True}
    echo.terminate()


def test_without_kill_switch_tunnel_routes_go_while_disconnected(
    netns: Any, tmp_path: Path
) -> None:
    """Server gone: CONN_LOST drops the 0/1 and 128/1 routes; the server back: they return."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    server = lab.start_server()
    lab.start_client(cli, "client", section_extra="default_route = true\nkeepalive = 1\n")
    server.stop()
    wait_for(lambda: status(lab, cli)["status"] == "CONN_LOST", timeout=15, what="CONN_LOST")
    wait_for(lambda: "0.0.0.0/1" not in cli.ip("-4", "route").stdout, timeout=10, what="routes")
    assert status(lab, cli)["tun_state"] == "up, tunnel routes removed"
    assert ping(cli, "192.0.2.1", count=1)  # the underlay itself still works
    lab.server = Twistd(lab.srv, "cellvpn", tmp_path / "server.cfg", tmp_path / "server2.log")
    lab.server.wait_log(r"TUN cvpn-srv up")
    wait_for(lambda: status(lab, cli)["status"] == "STARTED", timeout=90, what="reconnect")
    assert "0.0.0.0/1 dev cvpn-cli" in cli.ip("-4", "route").stdout
    assert status(lab, cli)["tun_state"] == "up"
    assert ping(cli, "198.18.5.1")


def test_stop_and_kill_leave_the_host_as_it_was(netns: Any, tmp_path: Path) -> None:
    """After stop, and after kill -9 then a fresh start and stop, the client namespace's
    addresses, routes, rules and resolv.conf equal what they were; the host's resolv.conf too."""
    host_resolv = Path("/etc/resolv.conf").read_bytes()
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    lab.start_server(vpn_extra="dns = 198.18.5.1\n")
    before = host_snapshot(cli)
    client = lab.start_client(cli, "client", section_extra="default_route = true\n")
    during = host_snapshot(cli)
    assert "nameserver 198.18.5.1" in during["resolv.conf"]
    assert "0.0.0.0/1" in during["routes"]
    done = ctl(cli, lab.socket("client"), "vpn_client", "stop")
    assert done.stdout.strip() == "VPN client stopped successfully"
    assert host_snapshot(cli) == before
    again = ctl(cli, lab.socket("client"), "vpn_client", "stop", check=False)
    assert (again.returncode, again.stdout.strip()) == (255, "VPN client not stopped")
    start = ["vpn_client", "start", "-addr", "192.0.2.1", "-port", "8089"]
    done = ctl(cli, lab.socket("client"), *start, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "VPN client started successfully")
    done = ctl(cli, lab.socket("client"), *start, check=False)
    assert (done.returncode, done.stdout.strip()) == (1, "VPN client already started")
    ctl(cli, lab.socket("client"), "vpn_client", "stop")
    assert host_snapshot(cli) == before
    client.stop()

    client = lab.start_client(cli, "client", section_extra="default_route = true\n")
    assert "nameserver 198.18.5.1" in cli.resolv_conf.read_text()
    client.proc.send_signal(signal.SIGKILL)
    client.proc.wait(timeout=10)
    assert host_snapshot(cli) != before  # the killed client left its changes behind
    client = lab.start_client(cli, "client", section_extra="default_route = true\n")
    client.wait_log(r"cleaned up after an earlier run: ")
    ctl(cli, lab.socket("client"), "vpn_client", "stop")
    assert host_snapshot(cli) == before
    client.stop()
    assert host_snapshot(cli) == before
    assert Path("/etc/resolv.conf").read_bytes() == host_resolv


SECOND_IP = "192.0.2.254"


def test_fail_over_with_the_kill_switch_routes_the_next_server_around_the_tunnel(
    netns: Any, tmp_path: Path
) -> None:
    """Two servers the client reaches through its gateway (its link is a /25 here, so the
    second address is off-link), ``kill_switch = true``: the server it is on is killed; while
    the link is lost nothing leaves outside the tunnel; after its reconnect budget it moves to
    the other server with a host route to it around the tunnel's routes, the old one's gone;
    traffic flows again, and the stop leaves the host as it was."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    cli.ip("addr", "del", "192.0.2.2/24", "dev", "eth0")
    cli.ip("addr", "add", "192.0.2.2/25", "dev", "eth0")
    cli.ip("route", "replace", "default", "via", "192.0.2.1")
    lab.srv.ip("addr", "add", f"{SECOND_IP}/24", "dev", "br0")
    servers = {
        "192.0.2.1:8089": lab.start_server(names=f"192.0.2.1, {SECOND_IP}"),
        f"{SECOND_IP}:8090": second_server(lab, 8090, "198.18.6.0/24", address=SECOND_IP),
    }
    before = host_snapshot(cli)
    client = lab.start_client(
        cli,
        "client",
        section_extra=(
            f"default_route = true\nkill_switch = true\nservers = {SECOND_IP}:8090\n"
            "reconnect_budget = 2\nkeepalive = 0.5\n"
        ),
    )
    first = client.wait_log(r"VPN up: session \S+ with (\S+),").group(1)
    assert ping(cli, NET_HOST_IP)
    victim = next(name for name in servers if first.startswith(name.rsplit(":", 1)[0] + ":"))
    other_ip = next(n for n in servers if n != victim).rsplit(":", 1)[0]
    victim_ip = victim.rsplit(":", 1)[0]
    servers[victim].proc.kill()
    servers[victim].proc.wait(timeout=10)
    client.wait_log(r"connection lost: ")
    routes = cli.ip("-4", "route").stdout
    assert "0.0.0.0/1 dev cvpn-cli" in routes  # the kill switch holds the tunnel's routes
    assert not ping(cli, NET_HOST_IP, count=1)  # and nothing goes around them
    client.wait_log(rf"moving to server {other_ip}:\d+: ", timeout=30)
    client.wait_log(rf"the client moves to another server: {other_ip}/32 ", timeout=30)
    wait_for(lambda: client.text().count("VPN up: ") >= 2, timeout=60, what="the move")
    st = status(lab, cli)
    assert st["server"].startswith(other_ip) and st["status"] == "STARTED"
    assert ping(cli, NET_HOST_IP)
    host_routes = {
        line.split()[0]: line
        for line in cli.ip("-4", "route").stdout.splitlines()
        if line.startswith("192.0.2.") and "/" not in line.split()[0]
    }
    # the gateway is a server too: the way to it is the link itself, to the other one the gateway
    around = {"192.0.2.1": "192.0.2.1 dev eth0 ", SECOND_IP: f"{SECOND_IP} via 192.0.2.1 dev eth0 "}
    assert host_routes.get(other_ip, "").startswith(around[other_ip]), host_routes
    assert victim_ip not in host_routes, host_routes
    assert client.stop() == 0
    assert host_snapshot(cli) == before
