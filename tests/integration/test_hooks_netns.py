"""Hooks on a real host: the client's up/down and the server's session_up/session_down run
with the documented variables, and a failing required up hook stops the client cleanly."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cellvpn.lab import Namespace, VpnLab, ctl, ctl_json, wait_for
from tests.integration.helpers import host_snapshot, ping

pytestmark = __import__("pytest").mark.timeout(120)


def hook_script(tmp_path: Path, name: str, exit_code: int = 0) -> Path:
    """A hook that appends its CELLVPN_ variables to tmp_path/<event>.env (a block each)."""
    out = tmp_path / "hooks"
    out.mkdir(exist_ok=True)
    script = tmp_path / f"{name}.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"{{ env | grep '^CELLVPN_' | sort; echo --; }} >> '{out}'/\"$CELLVPN_EVENT\".env\n"
        f"echo '{name} hook ran'\n"
        f"exit {exit_code}\n"
    )
    script.chmod(0o755)
    return script


def runs(tmp_path: Path, event: str) -> list[dict[str, str]]:
    """Every run of ``event`` so far, as its variables."""
    path = tmp_path / "hooks" / f"{event}.env"
    if not path.exists():
        return []
    blocks = path.read_text().split("--\n")
    return [
        dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        for block in blocks
        if block.strip()
    ]


def status(lab: VpnLab, ns: Namespace) -> dict[str, Any]:
    result: dict[str, Any] = ctl_json(ns, lab.socket("client"), "vpn_client", "status")
    return result


def test_up_down_and_session_hooks_run_with_the_sessions_facts(netns: Any, tmp_path: Path) -> None:
    """up after the tunnel is configured, down after stop, each with the status's address,
    gateway, server and session id; the server's session_up with the leased address and the
    client's peer address, session_down with the bytes the session carried."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    lab.start_server(
        vpn_extra=f"session_up = {hook_script(tmp_path, 'session')}\n"
        f"session_down = {tmp_path / 'session.sh'}\ndns = 198.18.5.1\n"
    )
    hooks = f"up = {hook_script(tmp_path, 'client')}\ndown = {tmp_path / 'client.sh'}\n"
    client = lab.start_client(cli, "client", section_extra=hooks + "default_route = false\n")
    up = wait_for(lambda: runs(tmp_path, "up"), timeout=10, what="the up hook")
    st = status(lab, cli)
    assert st["status"] == "STARTED"
    assert len(up) == 1
    env = up[0]
    assert env["CELLVPN_EVENT"] == "up"
    assert env["CELLVPN_TUN"] == st["tun"] == "cvpn-cli"
    assert env["CELLVPN_ADDRESS"] == st["address"]
    assert env["CELLVPN_GATEWAY"] == st["gateway"] == "198.18.5.1"
    assert env["CELLVPN_SERVER"] == st["server"] == "192.0.2.1:8089"
    assert int(env["CELLVPN_SESSION_ID"], 16) == st["session_id"]
    assert (env["CELLVPN_NETMASK"], env["CELLVPN_PREFIX"]) == ("255.255.255.0", "24")
    assert env["CELLVPN_MTU"] == str(st["mtu"]) == "1400"
    assert env["CELLVPN_DNS"] == "198.18.5.1"
    client.wait_log(r"hook up: client hook ran")
    client.wait_log(r"hook up \(.*client\.sh\): exit status 0")

    session_up = wait_for(lambda: runs(tmp_path, "session_up"), timeout=10, what="session_up")
    assert session_up[0]["CELLVPN_CLIENT_ADDRESS"] == st["address"]
    assert int(session_up[0]["CELLVPN_SESSION_ID"], 16) == st["session_id"]
    assert session_up[0]["CELLVPN_PEER"].startswith("192.0.2.2:")
    assert session_up[0]["CELLVPN_CLIENT"] == ""  # clients = any: no enrolled name
    assert "CELLVPN_BYTES_IN" not in session_up[0]

    assert ping(cli, "198.18.5.1")
    ctl(cli, lab.socket("client"), "vpn_client", "stop")
    down = wait_for(lambda: runs(tmp_path, "down"), timeout=10, what="the down hook")
    assert len(down) == 1
    assert {k: v for k, v in down[0].items() if k not in ("CELLVPN_EVENT", "CELLVPN_REASON")} == {
        k: v for k, v in env.items() if k not in ("CELLVPN_EVENT", "CELLVPN_REASON")
    }
    assert (down[0]["CELLVPN_EVENT"], down[0]["CELLVPN_REASON"]) == ("down", "stopped")

    ended = wait_for(lambda: runs(tmp_path, "session_down"), timeout=10, what="session_down")
    assert ended[0]["CELLVPN_SESSION_ID"] == session_up[0]["CELLVPN_SESSION_ID"]
    assert ended[0]["CELLVPN_CLIENT_ADDRESS"] == st["address"]
    assert int(ended[0]["CELLVPN_BYTES_IN"]) >= 3 * 84  # three pings at least
    assert int(ended[0]["CELLVPN_BYTES_OUT"]) >= 3 * 84
    assert lab.server is not None
    lab.server.wait_log(r"hook session_down: session hook ran")
    client.stop()
    assert len(runs(tmp_path, "up")) == 1 and len(runs(tmp_path, "down")) == 1


def test_a_failing_required_up_hook_stops_the_client_and_leaves_the_host_as_it_was(
    netns: Any, tmp_path: Path
) -> None:
    """up exits 3 with up_required: the tunnel is taken down, STOPPED with the hook and its exit
    status in last_error, no retry; addresses, routes, rules and resolv.conf as before."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    lab.start_server(vpn_extra="dns = 198.18.5.1\n")
    before = host_snapshot(cli)
    script = hook_script(tmp_path, "failing", exit_code=3)
    client = lab.start_client(
        cli,
        "client",
        section_extra=f"up = {script}\ndown = {script}\nup_required = true\ndefault_route = true\n",
        wait=False,
    )
    client.wait_log(r"cannot start: the up hook .*failing\.sh failed: exit status 3")
    st = wait_for(
        lambda: (s := status(lab, cli))["status"] == "STOPPED" and s["address"] is None and s,
        timeout=10,
        what="STOPPED with the tunnel down",
    )
    assert st["last_error"] == f"the up hook {script} failed: exit status 3"
    assert st["retrying_in"] is None
    assert len(runs(tmp_path, "up")) == 1
    wait_for(lambda: runs(tmp_path, "down"), timeout=10, what="the down after the failed up")
    assert host_snapshot(cli) == before
    time.sleep(2)  # longer than the first back-off: no second attempt
    assert len(runs(tmp_path, "up")) == 1
    assert status(lab, cli)["status"] == "STOPPED"
    assert "VPN up" not in client.text()
    client.stop()
    assert host_snapshot(cli) == before


def test_a_lost_link_without_the_kill_switch_runs_down_then_up_again(
    netns: Any, tmp_path: Path
) -> None:
    """The underlay cut: CONN_LOST takes the tunnel routes down and runs down (the reason
    says the connection was lost); back, the reconnect keeps the address and runs up again
    with the new session's id."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    lab.start_server()
    script = hook_script(tmp_path, "client")
    lab.start_client(
        cli,
        "client",
        section_extra=f"up = {script}\ndown = {script}\nkeepalive = 1\ndefault_route = true\n",
    )
    first = status(lab, cli)
    lab.cut(cli)
    down = wait_for(lambda: runs(tmp_path, "down"), timeout=15, what="down after the cut")
    assert down[0]["CELLVPN_REASON"].startswith("connection lost: ")
    assert down[0]["CELLVPN_ADDRESS"] == first["address"]
    assert "0.0.0.0/1" not in cli.ip("-4", "route").stdout
    lab.mend(cli)
    wait_for(lambda: len(runs(tmp_path, "up")) == 2, timeout=30, what="up after the reconnect")
    again = wait_for(
        lambda: (s := status(lab, cli))["status"] == "STARTED" and s, timeout=10, what="STARTED"
    )
    up = runs(tmp_path, "up")[1]
    assert up["CELLVPN_ADDRESS"] == again["address"] == first["address"]
    assert int(up["CELLVPN_SESSION_ID"], 16) == again["session_id"] != first["session_id"]
    assert len(runs(tmp_path, "down")) == 1
