"""A node application can run cellvpn's services in its own service tree, without twistd."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cellvpn.lab import link

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "node_app.py"


def test_server_and_client_services_in_one_node_app(netns: Any, tmp_path: Path) -> None:
    """docs/examples/node_app.py: both services under one MultiService; the client comes up."""
    ns = netns("node")
    peer = netns("peer")
    link(ns, "192.0.2.1/24", peer, "192.0.2.2/24")
    server_cfg = tmp_path / "server.cfg"
    server_cfg.write_text(
        "[server]\nlisten = tcp:8089:interface=192.0.2.1\nstate_dir = state\n"
        "[tls]\nclients = any\n"  # the client here has no certificate of its own
        "[srv_vpn]\nnetwork_address = 198.18.6.0\ntun_name = cvpn-srv\n"
        f"[control]\nsocket = {tmp_path / 'server.sock'}\n"
    )
    client_cfg = tmp_path / "client.cfg"
    client_cfg.write_text(
        f"[client]\nca = {tmp_path / 'state' / 'tls' / 'ca.pem'}\ndefault_route = false\n"
        f"tun_name = cvpn-cli\nstate_dir = {tmp_path / 'client-state'}\n"
        f"[control]\nsocket = {tmp_path / 'client.sock'}\n"
    )
    done = ns.exec(sys.executable, str(EXAMPLE), str(server_cfg), str(client_cfg), timeout=60)
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["start"] == 0
    status = result["status"]
    assert status["status"] == "STARTED" and status["address"] == "198.18.6.2"
    assert status["tun"] == "cvpn-cli"
    # everything is gone after the stop: no TUN left in the namespace
    assert ns.ip("-o", "link", "show", "type", "tun").stdout == ""
