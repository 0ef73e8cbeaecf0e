"""/metrics by the book: histograms counted where the event happens, per-client series only
when asked for and bounded, and both endpoints clean under ``promtool check metrics``."""

from __future__ import annotations

import subprocess
from pathlib import Path

from prometheus_client import generate_latest

from cellvpn.client.metrics import client_registry
from cellvpn.histogram import RTT_SECONDS, SESSION_SECONDS, Buckets
from cellvpn.server.metrics import exposition
from cellvpn.server.perclient import PerClient
from tests.client.test_client_metrics import STATUS, Fixed
from tests.conftest import require_command

from .test_metrics import parse_exposition, value
from .test_session import Client, ipv4, make_server


def test_buckets_count_each_value_under_the_first_bound_it_does_not_exceed() -> None:
    b = Buckets((0.001, 0.01, 0.1))
    for v in (0.0005, 0.001, 0.002, 0.5, 7.0):
        b.observe(v)
    assert b.cumulative() == [("0.001", 2), ("0.01", 3), ("0.1", 3), ("+Inf", 5)]
    assert (b.count, round(b.total, 6)) == (5, 7.5035)
    assert SESSION_SECONDS[0] == 1.0 and SESSION_SECONDS[-1] == 86400.0
    assert RTT_SECONDS[0] == 0.0005 and RTT_SECONDS[-1] == 2.5


def test_per_client_names_are_bounded_and_never_dropped() -> None:
    per = PerClient(limit=2)
    assert [per.label(n) for n in ("alice", None, "bob", "alice")] == [
        "alice",
        "(anonymous)",
        "(other)",
        "alice",
    ]
    per.session_ended("bob", {"from_client_bytes": 10, "to_client_bytes": 20})
    per.session_ended("alice", {"from_client_bytes": 1, "to_client_packets": 3})
    assert per.rows([]) == {
        "(other)": {
            "from_client_bytes": 10,
            "to_client_bytes": 20,
            "from_client_packets": 0,
            "to_client_packets": 0,
            "sessions_active": 0,
        },
        "alice": {
            "from_client_bytes": 1,
            "to_client_bytes": 0,
            "from_client_packets": 0,
            "to_client_packets": 3,
            "sessions_active": 0,
        },
    }


def promtool(text: bytes) -> str:
    done = subprocess.run(
        [require_command("promtool", "prometheus"), "check", "metrics"],
        input=text,
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return (done.stdout + done.stderr).decode()


def test_server_metrics_with_per_client_series_are_clean(tmp_path: Path) -> None:
    server, clock, _ = make_server(tmp_path, **{"metrics.per_client": "true"})
    a, b = Client(server, clock), Client(server, clock)
    for c in (a, b):
        c.request()
        c.addr_request()
    a.send_ip(ipv4("198.18.9.2", "198.19.0.10", b"x" * 10))
    a.session.established_at -= 75  # sessions keep wall-clock times: a's began 75 s ago
    a.lose()
    b.send_ip(ipv4("198.18.9.3", "198.19.0.10"))
    server.keepalive_rtts.observe(0.003)
    text = exposition(server)
    assert promtool(text) == ""
    families = parse_exposition(text.decode())
    assert value(families, "cellvpn_session_duration_seconds", le="60.0", sample="bucket") == 0
    assert value(families, "cellvpn_session_duration_seconds", le="300.0", sample="bucket") == 1
    assert 75 <= value(families, "cellvpn_session_duration_seconds", sample="sum") < 76
    assert value(families, "cellvpn_keepalive_rtt_seconds", le="0.005", sample="bucket") == 1
    both = value(families, "cellvpn_ip_bytes_by_client_total", client="(anonymous)",
                 direction="from_client")  # fmt: skip
    assert both == value(families, "cellvpn_ip_bytes_total", direction="from_client") == 62
    assert value(families, "cellvpn_sessions_active_by_client", client="(anonymous)") == 1


def test_client_metrics_are_clean() -> None:
    assert promtool(generate_latest(client_registry(Fixed(STATUS)))) == ""
