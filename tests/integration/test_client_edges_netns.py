"""The client at its edges, on a real host: an IPv6 server behind the IPv6 leak guard, an
interface of someone else's that took the name of a killed client's TUN, and a receipt record
torn by a crash."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from cellvpn.lab import NET_HOST_IP, SERVER_IP, SERVER_IP6, Namespace, VpnLab, ctl, wait_for
from cellvpn.net.journal import Journal
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
from tests.integration.test_client_netns import status

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

MB = 1024 * 1024
#: the torn tail a crash leaves: a line cut short, no newline
TORN = b'{"deposit": "0123", "event": "signed", "info": "01ab'


def ifindex(ns: Namespace, name: str) -> int | None:
    done = ns.ip("-o", "link", "show", name, check=False)
    return int(done.stdout.split(":", 1)[0]) if done.returncode == 0 else None


def transfer(lab: VpnLab, ns: Namespace, work: Path, port: str, size: int) -> None:
    """``size`` random bytes from ``ns`` to the net host through the tunnel, hashes equal."""
    log = work / f"sink-{port}.log"
    sink = background(lab.net, log, "sink", port, NET_HOST_IP)
    sent = tool(ns, "send", NET_HOST_IP, port, str(size))
    got = last_json(sink, log)
    assert (got["sha256"], got["bytes"]) == (sent["sha256"], size)


def test_a_dual_stack_client_reaches_an_ipv6_server_with_the_leak_guard_on(
    netns: Any, tmp_path: Path
) -> None:
    """By the IPv6 literal, with default_route = true: the server's /128 keeps the stream out
    of the guard's unreachable halves, the tunnel carries traffic, and stop leaves the host's
    routes as they were. A second client reaches the same server by IPv4."""
    lab = VpnLab(netns, tmp_path, ipv6=True)
    cli = lab.add_client_host()
    cli2 = lab.add_client_host()
    # the host's own way out for IPv6, which the guard must close while the tunnel is up
    cli.ip("-6", "route", "add", "default", "via", SERVER_IP6, "dev", "eth0")
    lab.start_server()
    assert "nameserver 192.0.2.53" in cli.resolv_conf.read_text()  # its own, from the lab
    before = host_snapshot(cli)
    assert cli.ip("-6", "route", "get", "2001:db8:ff::1").returncode == 0

    client = lab.start_client(
        cli, "client", section_extra="default_route = true\n", server=f"[{SERVER_IP6}]:8089"
    )
    assert status(lab, cli)["server"] == f"[{SERVER_IP6}]:8089"
    streams = cli.exec("ss", "-Htn", "state", "established").stdout
    assert f"[{SERVER_IP6}]:8089" in streams
    routes6 = cli.ip("-6", "route").stdout
    assert re.search(rf"^{re.escape(SERVER_IP6)} dev eth0 ", routes6, re.M), routes6
    assert "unreachable ::/1" in routes6 and "unreachable 8000::/1" in routes6
    assert " dev eth0 " in cli.ip("-6", "route", "get", SERVER_IP6).stdout
    leak = cli.ip("-6", "route", "get", "2001:db8:ff::1", check=False)
    assert leak.returncode != 0 and "No route to host" in leak.stderr  # the guard
    assert "0.0.0.0/1 dev cvpn-cli" in cli.ip("-4", "route").stdout
    assert ping(cli, "198.18.5.1")
    transfer(lab, cli, tmp_path, "5001", 4 * MB)

    other = lab.start_client(cli2, "client2", server=f"{SERVER_IP}:8089")
    assert ping(cli2, "198.18.5.1")
    other.stop()

    done = ctl(cli, lab.socket("client"), "vpn_client", "stop")
    assert done.stdout.strip() == "VPN client stopped successfully"
    assert host_snapshot(cli) == before
    client.stop()
    assert host_snapshot(cli) == before


def test_a_killed_clients_name_taken_by_another_device_and_a_torn_record(
    netns: Any, tmp_path: Path
) -> None:
    """A paid client is killed with -9; another VPN then makes its own ``cvpn-cli`` with a
    0.0.0.0/1 route like the client's, and the client's receipt record ends in a torn line.
    The next start cleans up the rest, leaves that device and its route alone (same ifindex),
    sets the torn tail aside and says where; once the name is free again it comes up with a
    TUN marked as its own."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    lab.start_server(extra=billing_section(1000, "B", 4 * MB), vpn_extra="dns = 198.18.5.1\n")
    key, _ = wallet(tmp_path, "client", 1_000_000)
    before = host_snapshot(cli)
    state = tmp_path / "client-state"
    extra = wallet_section(key, deposit_value=100_000)
    section = "default_route = true\n"

    killed = lab.start_client(cli, "client", section_extra=section, extra=extra)
    transfer(lab, cli, tmp_path, "5001", 6 * MB)  # enough for a receipt in the record
    wait_for(lambda: (state / "receipts.jsonl").exists(), timeout=30, what="a signed receipt")
    killed.kill()
    wait_for(lambda: ifindex(cli, "cvpn-cli") is None, timeout=10, what="the TUN to go")
    journal = json.loads((state / "journal.json").read_text())
    assert journal["tun"] == "cvpn-cli" and journal["tun_marker"] == Journal(state / "x").marker

    cli.ip("link", "add", "cvpn-cli", "type", "bridge")  # someone else's, by the same name
    cli.ip("link", "set", "cvpn-cli", "up")
    cli.ip("route", "add", "0.0.0.0/1", "dev", "cvpn-cli")
    foreign = ifindex(cli, "cvpn-cli")
    assert foreign is not None and foreign != journal["tun_ifindex"]
    record = state / "receipts.jsonl"
    intact = record.read_bytes()
    assert intact.endswith(b"\n")
    with open(record, "ab") as f:
        f.write(TORN)

    client = lab.start_client(cli, "client", section_extra=section, extra=extra, wait=False)
    client.wait_log(r"cleaned up after an earlier run: left interface cvpn-cli alone: ")
    text = client.text()
    assert "cleaned up after an earlier run: left route 0.0.0.0/1 dev cvpn-cli alone" in text
    assert f"cleaned up after an earlier run: removed leftover route {SERVER_IP}/32" in text
    assert "cleaned up after an earlier run: restored /etc/resolv.conf" in text
    torn = re.search(
        rf"receipt record {re.escape(str(record))}: cut off a torn last line of {len(TORN)} "
        r"bytes .*, set aside as (\S+)$",
        text,
        re.M,
    )
    assert torn, text[-3000:]
    aside = Path(torn.group(1))
    assert aside.parent == state and re.fullmatch(r"receipts\.jsonl\.torn-\d+", aside.name)
    assert aside.read_bytes() == TORN
    assert record.read_bytes() == intact
    # the name is taken, so this start has no TUN; the other device stays as it was
    client.wait_log(r"cannot start: cannot set up the tunnel: ")
    assert ifindex(cli, "cvpn-cli") == foreign
    assert "0.0.0.0/1 dev cvpn-cli" in cli.ip("-4", "route").stdout
    assert "alias" not in cli.ip("-d", "link", "show", "cvpn-cli").stdout

    cli.ip("link", "del", "cvpn-cli")  # the other VPN goes
    start = ["vpn_client", "start", "-addr", SERVER_IP, "-port", "8089"]
    done = ctl(cli, lab.socket("client"), *start, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "VPN client started successfully")
    own = ifindex(cli, "cvpn-cli")
    marker = Journal(state / "journal.json").marker
    assert f"alias {marker}" in cli.ip("-d", "link", "show", "cvpn-cli").stdout
    journal = json.loads((state / "journal.json").read_text())
    assert (journal["version"], journal["tun_ifindex"], journal["tun_marker"]) == (2, own, marker)
    assert ping(cli, "198.18.5.1")
    ctl(cli, lab.socket("client"), "vpn_client", "stop")
    assert host_snapshot(cli) == before
    client.stop()
    assert host_snapshot(cli) == before


def test_a_persistent_tun_of_the_users_is_used_but_never_deleted(
    netns: Any, tmp_path: Path
) -> None:
    """A TUN made beforehand (``ip tuntap add``) is attached to, not created: the client does
    not mark or journal it, so the cleanup after kill -9 takes the routes and not the TUN."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    lab.start_server()
    cli.ip("tuntap", "add", "dev", "cvpn-cli", "mode", "tun")
    made = ifindex(cli, "cvpn-cli")
    section = "default_route = true\n"
    client = lab.start_client(cli, "client", section_extra=section)
    client.wait_log(r"TUN cvpn-cli exists already \(persistent\): using it")
    state = tmp_path / "client-state"
    assert json.loads((state / "journal.json").read_text())["tun"] is None
    assert "alias" not in cli.ip("-d", "link", "show", "cvpn-cli").stdout
    assert ping(cli, "198.18.5.1")
    client.kill()
    assert "0.0.0.0/1 dev cvpn-cli" in cli.ip("-4", "route").stdout  # the device lives on

    client = lab.start_client(cli, "client", section_extra=section, wait=False)
    client.wait_log(r"cleaned up after an earlier run: removed leftover route 0\.0\.0\.0/1 ")
    assert "leftover interface" not in client.text()
    client.stop()
    assert ifindex(cli, "cvpn-cli") == made
    assert "cvpn-cli" not in cli.ip("-4", "route").stdout
