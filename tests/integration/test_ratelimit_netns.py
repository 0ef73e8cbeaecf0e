"""Per-session rate limits with real processes: a limited server and an unlimited one beside it.

No timing is asserted beyond the limit itself: the limited transfer cannot be faster than
rate x time + burst allows, and the unlimited one carries more than that limit in the same
lab. How exact the limiter is lives in ``bench/``, not here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cellvpn.lab import NET_HOST_IP, SERVER_IP, VpnLab, ctl_json
from tests.integration.helpers import background, second_server, tool

MB = 1024 * 1024
RATE_BITS = 8_000_000  # 1,000,000 bytes a second
BURST = 262_144
SIZE = 4 * MB
LIMITS = f"rate_up = {RATE_BITS}\nrate_down = {RATE_BITS}\nrate_burst = {BURST}\n"


def timed_download(lab: VpnLab, cli: Any, port: str, size: int) -> float:
    """The net host sends ``size`` bytes to the client through the tunnel; seconds taken."""
    background(lab.net, lab.work / f"source{port}.log", "source", port, NET_HOST_IP, str(size))
    started = time.monotonic()
    got = tool(cli, "recv", NET_HOST_IP, port)
    elapsed = time.monotonic() - started
    assert got["bytes"] == size
    return elapsed


def timed_upload(lab: VpnLab, cli: Any, port: str, size: int) -> float:
    background(lab.net, lab.work / f"sink{port}.log", "sink", port, NET_HOST_IP)
    started = time.monotonic()
    tool(cli, "send", NET_HOST_IP, port, str(size))
    return time.monotonic() - started


def test_a_limited_session_carries_no_more_than_its_rate_and_an_unlimited_one_more(
    netns: Any, tmp_path: Path
) -> None:
    """rate_up = rate_down = 8 Mbit/s with a 256 KiB burst: 4 MiB each way takes at least
    (4 MiB - burst) / 1 MB/s; the drops are counted in vpn_stat and the metrics. The same 4 MiB
    through a server without limits, beside it, goes faster than the limit would allow."""
    lab = VpnLab(netns, tmp_path)
    limited_host = lab.add_client_host()
    free_host = lab.add_client_host()
    lab.start_server(vpn_extra=LIMITS, extra="[metrics]\nlisten = tcp:9100:interface=127.0.0.1\n")
    assert lab.server is not None
    unlimited = second_server(lab, 8090, "198.18.6.0/24")
    lab.start_client(limited_host, "limited", section_extra="default_route = true\n")
    lab.start_client(
        free_host, "free", section_extra="default_route = true\n", server=f"{SERVER_IP}:8090"
    )
    least = (SIZE - BURST) / (RATE_BITS / 8)

    down = timed_download(lab, limited_host, "5001", SIZE)
    up = timed_upload(lab, limited_host, "5002", SIZE)
    fast_down = timed_download(lab, free_host, "5003", SIZE)
    fast_up = timed_upload(lab, free_host, "5004", SIZE)
    print(
        f"4 MiB at 8 Mbit/s: down {down:.2f} s, up {up:.2f} s (at least {least:.2f} s); "
        f"unlimited: down {fast_down:.2f} s, up {fast_up:.2f} s"
    )
    assert down >= least and up >= least
    assert fast_down < least and fast_up < least

    [session] = ctl_json(lab.srv, lab.server_socket, "vpn_stat", "-full")["sessions"]
    counters = session["counters"]
    assert counters["dropped_rate_down"] > 0 and counters["dropped_rate_up"] > 0
    metrics = lab.srv.exec("curl", "-s", "http://127.0.0.1:9100/metrics").stdout
    dropped = [
        line
        for line in metrics.splitlines()
        if line.startswith("cellvpn_dropped_packets_total") and 'reason="rate_limit"' in line
    ]
    assert len(dropped) == 2 and all(float(line.split()[-1]) > 0 for line in dropped), dropped
    free_stat = ctl_json(lab.srv, tmp_path / "server8090.sock", "vpn_stat", "-full")["sessions"]
    assert free_stat[0]["counters"]["dropped_rate_down"] == 0
    assert "Traceback" not in lab.server.text() + unlimited.text()
