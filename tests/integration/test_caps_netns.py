"""The caps on one client key, with real processes: sessions_per_key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cellvpn.lab import NET_HOST_IP, VpnLab, ctl_json
from tests.integration.helpers import ping


def test_sessions_per_key_refuses_the_next_device(netns: Any, tmp_path: Path) -> None:
    """One enrolled client file on two hosts with sessions_per_key = 1: the first works, the
    second is refused with ERROR TOO_MANY_SESSIONS and a line on each side saying why; once
    the first stops, the second gets in on its next try."""
    lab = VpnLab(netns, tmp_path)
    one, two = lab.add_client_host(), lab.add_client_host()
    server = lab.start_server(clients=None, vpn_extra="sessions_per_key = 1\n")
    cfg = lab.enroll("laptop")
    first = lab.start_enrolled_client(one, "first", cfg)
    second = lab.start_enrolled_client(two, "second", cfg, wait=False)
    second.wait_log(r"server refused the service: TOO_MANY_SESSIONS")
    server.wait_log(
        r"refused \(sessions_per_key\): session 0x[0-9a-f]+ with 192\.0\.2\.3:\d+: client key tls:"
    )
    assert ping(one, NET_HOST_IP)
    stat = ctl_json(lab.srv, lab.server_socket, "vpn_stat")
    assert stat["refused"]["sessions_per_key"] >= 1
    assert first.stop() == 0
    second.wait_log(r"VPN up: ", timeout=40)
    assert ping(two, NET_HOST_IP)
