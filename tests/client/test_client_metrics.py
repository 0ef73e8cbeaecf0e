"""The client's /metrics: what the status says, as prometheus_client's parser reads it."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import pytest_twisted
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import threads
from twisted.internet.testing import MemoryReactorClock

from cellvpn.client.metrics import client_registry, listen_client_metrics
from cellvpn.client.service import VPNClientService
from cellvpn.config import load_client_config
from cellvpn.histogram import RTT_SECONDS, Buckets

STATUS: dict[str, Any] = {
    "status": "STARTED",
    "status_code": 1,
    "sessions_established": 3,
    "reconnects": 2,
    "counters": {
        "sent_packets": 10,
        "sent_bytes": 14000,
        "received_packets": 20,
        "received_bytes": 28000,
        "dropped_not_connected": 4,
        "dropped_tun_write": 1,
    },
    "keepalive_rtt_ms": 2.5,
    "billing": {"receipts_signed": 7, "receipts_refused": 1},
}


class Fixed:
    def __init__(self, status: dict[str, Any]) -> None:
        self._status = status
        self.keepalive_rtts = Buckets(RTT_SECONDS)
        for rtt in (0.0004, 0.002, 0.002, 3.0):
            self.keepalive_rtts.observe(rtt)

    def status(self) -> dict[str, Any]:
        return self._status


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[s.name, tuple(sorted(s.labels.items()))] = s.value
    return found


def test_the_client_families_say_what_the_status_says() -> None:
    got = samples(generate_latest(client_registry(Fixed(STATUS), process=False)).decode())
    expected = {
        ("cellvpn_client_state", ()): 1.0,
        ("cellvpn_client_up", ()): 1.0,
        ("cellvpn_client_sessions_established_total", ()): 3.0,
        ("cellvpn_client_ip_packets_total", (("direction", "sent"),)): 10.0,
        ("cellvpn_client_ip_packets_total", (("direction", "received"),)): 20.0,
        ("cellvpn_client_ip_bytes_total", (("direction", "sent"),)): 14000.0,
        ("cellvpn_client_ip_bytes_total", (("direction", "received"),)): 28000.0,
        ("cellvpn_client_dropped_packets_total", (("reason", "not_connected"),)): 4.0,
        ("cellvpn_client_dropped_packets_total", (("reason", "tun_write"),)): 1.0,
        ("cellvpn_client_keepalive_last_rtt_seconds", ()): 0.0025,
        ("cellvpn_client_reconnects_total", ()): 2.0,
        ("cellvpn_client_keepalive_rtt_seconds_bucket", (("le", "0.0005"),)): 1.0,
        ("cellvpn_client_keepalive_rtt_seconds_bucket", (("le", "0.001"),)): 1.0,
        ("cellvpn_client_keepalive_rtt_seconds_bucket", (("le", "0.0025"),)): 3.0,
        ("cellvpn_client_keepalive_rtt_seconds_bucket", (("le", "2.5"),)): 3.0,
        ("cellvpn_client_keepalive_rtt_seconds_bucket", (("le", "+Inf"),)): 4.0,
        ("cellvpn_client_keepalive_rtt_seconds_count", ()): 4.0,
        ("cellvpn_client_keepalive_rtt_seconds_sum", ()): 3.0044,
        ("cellvpn_client_receipts_total", (("outcome", "signed"),)): 7.0,
        ("cellvpn_client_receipts_total", (("outcome", "refused"),)): 1.0,
    }
    assert {k: v for k, v in got.items() if k in expected} == expected
    assert any(name == "cellvpn_client_build_info" for name, _ in got)


def test_without_a_round_trip_or_a_wallet_those_families_are_absent() -> None:
    quiet = {**STATUS, "status": "CONN_LOST", "status_code": 3, "keepalive_rtt_ms": None}
    quiet["billing"] = None
    got = samples(generate_latest(client_registry(Fixed(quiet), process=False)).decode())
    names = {name for name, _ in got}
    assert "cellvpn_client_keepalive_last_rtt_seconds" not in names
    assert "cellvpn_client_receipts_total" not in names
    assert got["cellvpn_client_up", ()] == 0.0 and got["cellvpn_client_state", ()] == 3.0


@pytest_twisted.ensureDeferred
async def test_a_client_serves_its_metrics_on_loopback(tmp_path: Path, reactor: Any) -> None:
    """A real listener on 127.0.0.1, scraped over HTTP, with the process's own metrics."""
    config = load_client_config(
        None,
        {
            "client.state_dir": str(tmp_path / "state"),
            "control.socket": str(tmp_path / "c.sock"),
            "client.fingerprint": "00" * 32,
        },
    )
    client = VPNClientService(config, reactor=MemoryReactorClock())
    port = listen_client_metrics(reactor, "tcp:0:interface=127.0.0.1", client)
    assert port is not None
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/metrics"
        body = await threads.deferToThread(lambda: urllib.request.urlopen(url, timeout=10).read())
    finally:
        await port.stopListening()
    got = samples(body.decode())
    assert got["cellvpn_client_state", ()] == 0.0  # NOT_STARTED
    assert got["cellvpn_client_sessions_established_total", ()] == 0.0
    assert any(name == "process_resident_memory_bytes" for name, _ in got)
    assert listen_client_metrics(reactor, None, client) is None
