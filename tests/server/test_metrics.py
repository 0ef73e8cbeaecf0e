"""The metrics site on memory: the exposition format, its sums, and remain_limits_vpn."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, fail, succeed
from twisted.web.resource import getChildForRequest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from cellvpn.billing.interfaces import LedgerUnavailableError, Limits
from cellvpn.billing.keys import KeyPair
from cellvpn.server.ended import EndedSessions
from cellvpn.server.metrics import exposition, metrics_site

from .test_session import Client, ipv4, make_server

#: Families of the process collectors (prometheus_client's own), beside the server's.
PROCESS_PREFIXES = ("process_", "python_")


def parse_exposition(text: str) -> dict[str, dict[str, Any]]:
    """Families by the name of their samples (``..._total`` for a counter): {type, help,
    samples: {frozenset(labels): value}}, read by prometheus_client's own parser."""
    assert text.endswith("\n")
    families: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        assert name not in families, f"{name} twice"
        assert family.documentation and family.type in {"counter", "gauge", "histogram"}, name
        samples: dict[frozenset[tuple[str, str]], float] = {}
        for sample in family.samples:
            items = sample.labels.items()
            if family.type == "histogram":  # _bucket{le}, _count, _sum: the suffix as a label
                suffix = sample.name.removeprefix(name)
                assert suffix in ("_bucket", "_count", "_sum"), f"{sample.name} in {name}"
                items = [*items, ("sample", suffix[1:])]
            else:
                assert sample.name == name, f"{sample.name} in {name}"
            labels = frozenset(items)
            assert labels not in samples, f"{name}{dict(labels)} twice"
            samples[labels] = sample.value
        assert samples, f"{name} has no samples"
        assert name.startswith(("cellvpn_", *PROCESS_PREFIXES)), name
        families[name] = {"help": family.documentation, "type": family.type, "samples": samples}
    return families


def value(families: dict[str, dict[str, Any]], name: str, **labels: str) -> float:
    result: float = families[name]["samples"][frozenset(labels.items())]
    return result


def test_exposition_parses_and_sums_live_and_ended_sessions(tmp_path: Path) -> None:
    """Every line is HELP, TYPE or `name{labels} value`; traffic is the sum of live and ended
    sessions, labelled by direction and reason only."""
    server, clock, _ = make_server(tmp_path)
    a, b = Client(server, clock), Client(server, clock)
    for c in (a, b):
        c.request()
        c.addr_request()
    good = ipv4("198.18.9.2", "198.19.0.10")
    a.send_ip(good)
    a.send_ip(ipv4("198.18.9.77", "198.19.0.10"))  # spoofed
    b.send_ip(ipv4("198.18.9.3", "198.19.0.10", b"z" * 30))
    to_b = ipv4("198.19.0.10", "198.18.9.3")
    # version 7: neither IPv4 nor IPv6, so malformed
    server.forwarder.from_tun([to_b, ipv4("198.19.0.10", "198.18.9.200"), b"\x70" * 40])
    b.pump()
    a.lose()

    text = exposition(server).decode()
    families = parse_exposition(text)
    assert value(families, "cellvpn_sessions_active") == 1
    assert value(families, "cellvpn_sessions_ended_total") == 1
    assert families["cellvpn_sessions_active"]["type"] == "gauge"
    assert value(families, "cellvpn_ip_packets_total", direction="from_client") == 2
    assert value(families, "cellvpn_ip_bytes_total", direction="from_client") == len(good) + 50
    assert value(families, "cellvpn_ip_packets_total", direction="to_client") == 1
    assert value(families, "cellvpn_ip_bytes_total", direction="to_client") == len(to_b)
    drops = families["cellvpn_dropped_packets_total"]["samples"]
    reasons = {dict(k)["reason"] for k in drops}
    assert reasons == {
        "spoofed", "malformed", "not_active", "isolated", "tun_write", "queue_full",
        "bad_offload", "no_route", "to_host", "ip_options", "rate_limit",
    }  # fmt: skip
    assert {frozenset(dict(k)) for k in drops} == {frozenset({"direction", "reason"})}
    assert value(families, "cellvpn_dropped_packets_total", direction="from_client",
                 reason="spoofed") == 1  # fmt: skip
    assert value(families, "cellvpn_dropped_packets_total", direction="to_client",
                 reason="no_route") == 1  # fmt: skip
    assert value(families, "cellvpn_dropped_packets_total", direction="to_client",
                 reason="malformed") == 1  # fmt: skip
    assert value(families, "cellvpn_pool_leased") == 1
    assert value(families, "cellvpn_pool_held") == 1  # a's address, kept for lease_hold
    assert value(families, "cellvpn_pool_capacity") == 253
    assert value(families, "cellvpn_tun_up") == 1
    assert "cellvpn_tun_read_packets_total" not in families  # no TUN opened
    assert "cellvpn_billing_receipts_redeemed_total" not in families  # free service
    # no per-session series: labels are direction, reason, kind or version only (and the
    # histograms' buckets)
    for name, family in families.items():
        if name.startswith(PROCESS_PREFIXES):
            continue
        for labels in family["samples"]:
            allowed = {"direction", "reason", "kind", "version", "le", "sample"}
            assert {k for k, _ in labels} <= allowed
    # a's session ended: its length is in the histogram (it lasted no time on this clock)
    assert value(families, "cellvpn_session_duration_seconds", sample="count") == 1
    assert value(families, "cellvpn_session_duration_seconds", le="1.0", sample="bucket") == 1
    assert value(families, "cellvpn_keepalive_rtt_seconds", sample="count") == 0
    assert "cellvpn_ip_bytes_by_client_total" not in families  # per_client is off


def test_counters_never_go_down_when_old_sessions_are_forgotten() -> None:
    """The kept list forgets its oldest entries; the totals do not."""
    ended = EndedSessions(2)
    for i in range(1, 4):
        ended.append({"counters": {"from_client_bytes": i, "dropped_spoofed": 0}})
    assert len(ended) == 2 and ended.ended == 3
    assert ended.totals["from_client_bytes"] == 6


def test_tun_and_billing_metrics_when_present(tmp_path: Path) -> None:
    """With a TUN: its counters; with billing: receipts redeemed and refused."""
    server, _, _ = make_server(tmp_path)
    stats = SimpleNamespace(
        wakeups=3, packets_read=5, bytes_read=500, packets_written=7, bytes_written=700,
        dropped_eagain=1, errors_eio=0, errors_invalid=2, errors_other=0, read_errors=0,
    )  # fmt: skip
    server.tun = SimpleNamespace(stats=stats)  # type: ignore[assignment]
    server.billing = SimpleNamespace(redeemed=4, refused=1)  # type: ignore[assignment]
    families = parse_exposition(exposition(server).decode())
    assert value(families, "cellvpn_tun_read_packets_total") == 5
    assert value(families, "cellvpn_tun_written_bytes_total") == 700
    assert value(families, "cellvpn_tun_write_dropped_total") == 1
    assert value(families, "cellvpn_tun_errors_total", kind="invalid") == 2
    assert value(families, "cellvpn_billing_receipts_redeemed_total") == 4
    assert value(families, "cellvpn_billing_receipts_refused_total") == 1


# --- through the site -------------------------------------------------------------------


class Ledger:
    """load_limits answers as told, and remembers what it was asked."""

    def __init__(self, answer: Deferred[Limits | None]) -> None:
        self.answer = answer
        self.asked: list[tuple[bytes, bytes]] = []

    def load_limits(self, provider: bytes, client: bytes) -> Deferred[Limits | None]:
        self.asked.append((provider, client))
        return self.answer


def get(server: Any, path: bytes, args: dict[bytes, list[bytes]] | None = None) -> DummyRequest:
    """Render ``path`` on the metrics site and wait for the answer (the ledger is on memory)."""
    site = metrics_site(server)
    request = DummyRequest(path.lstrip(b"/").split(b"/"))
    request.args = args or {}
    resource = getChildForRequest(site.resource, request)
    body = resource.render(request)
    if body is not NOT_DONE_YET:
        request.write(body)
        request.finish()
    assert request.finished, "the answer is complete (the ledger answered at once)"
    return request


def body(request: DummyRequest) -> bytes:
    return b"".join(request.written)


def header(request: DummyRequest, name: bytes) -> bytes:
    [raw] = request.responseHeaders.getRawHeaders(name)
    result: bytes = raw
    return result


def billed(server: Any, answer: Deferred[Limits | None]) -> tuple[Any, Ledger]:
    ledger = Ledger(answer)
    server.billing = SimpleNamespace(key=KeyPair.generate(), ledger=ledger, redeemed=0, refused=0)
    return server.billing, ledger


def test_metrics_page_content_type(tmp_path: Path) -> None:
    server, _, _ = make_server(tmp_path)
    request = get(server, b"/metrics")
    assert request.responseCode in (None, 200)
    assert header(request, b"content-type") == b"text/plain; version=0.0.4; charset=utf-8"
    parse_exposition(body(request).decode())


def test_remain_limits_answers_the_originals_json(tmp_path: Path) -> None:
    """Saved limits of (this provider, that client), hashes in lowercase hex."""
    server, _, _ = make_server(tmp_path)
    client = bytes(range(32))
    billing, ledger = billed(
        server, succeed(Limits(b"p" * 32, client, 123456, 3599.7, saved_at=1.0))
    )
    hex_upper = "0x" + client.hex().upper()
    request = get(
        server,
        b"/remain_limits_vpn",
        {b"net_id": [b"18446744073709551615"], b"user_pkey_hash": [hex_upper.encode()]},
    )
    assert request.responseCode in (None, 200)
    assert header(request, b"content-type") == b"application/json"
    assert json.loads(body(request)) == {
        "net_id": 2**64 - 1,
        "srv_uid": 1,
        "user_pkey_hash": client.hex(),
        "server_pkey_hash": billing.key.account_hex,
        "limit_bytes": 123456,
        "limit_sec": 3599,
    }
    assert ledger.asked == [(billing.key.account, client)]


def test_remain_limits_of_an_unknown_client_are_zeros(tmp_path: Path) -> None:
    server, _, _ = make_server(tmp_path)
    billed(server, succeed(None))
    request = get(
        server, b"/remain_limits_vpn", {b"net_id": [b"1"], b"user_pkey_hash": [b"ab" * 32]}
    )
    answer = json.loads(body(request))
    assert answer["limit_bytes"] == 0 and answer["limit_sec"] == 0
    assert answer["user_pkey_hash"] == "ab" * 32 and answer["net_id"] == 1


@pytest.mark.parametrize(
    ("args", "why"),
    [
        ({}, "missing parameter net_id"),
        ({b"net_id": [b"1"]}, "missing parameter user_pkey_hash"),
        ({b"net_id": [b"-1"], b"user_pkey_hash": [b"ab" * 32]}, "net_id must be"),
        ({b"net_id": [b"18446744073709551616"], b"user_pkey_hash": [b"ab" * 32]}, "net_id must"),
        ({b"net_id": [b"0x10"], b"user_pkey_hash": [b"ab" * 32]}, "net_id must be"),
        ({b"net_id": [b"1"], b"user_pkey_hash": [b"ab" * 31]}, "user_pkey_hash must be"),
        ({b"net_id": [b"1"], b"user_pkey_hash": [b"zz" * 32]}, "user_pkey_hash must be"),
        ({b"net_id": [b"\xff"], b"user_pkey_hash": [b"ab" * 32]}, "net_id must be ASCII"),
    ],
)
def test_remain_limits_bad_parameters_are_400(
    tmp_path: Path, args: dict[bytes, list[bytes]], why: str
) -> None:
    server, _, _ = make_server(tmp_path)
    _, ledger = billed(server, succeed(None))
    request = get(server, b"/remain_limits_vpn", args)
    assert request.responseCode == 400
    assert header(request, b"content-type") == b"application/json"
    assert json.loads(body(request))["error"].startswith(why)
    assert ledger.asked == []


def test_remain_limits_without_billing_is_404(tmp_path: Path) -> None:
    server, _, _ = make_server(tmp_path)
    request = get(
        server, b"/remain_limits_vpn", {b"net_id": [b"1"], b"user_pkey_hash": [b"ab" * 32]}
    )
    assert request.responseCode == 404
    assert "no limits" in json.loads(body(request))["error"]


def test_ledger_trouble_is_a_json_error_without_traceback(tmp_path: Path) -> None:
    """Unavailable ledger: 503; anything else: 500 'internal error', logged, not shown."""
    server, _, _ = make_server(tmp_path)
    args = {b"net_id": [b"1"], b"user_pkey_hash": [b"ab" * 32]}
    billed(server, fail(LedgerUnavailableError("database is locked")))
    request = get(server, b"/remain_limits_vpn", args)
    assert request.responseCode == 503
    assert json.loads(body(request)) == {"error": "the ledger is unavailable now"}

    billed(server, fail(RuntimeError("secret internals")))
    request = get(server, b"/remain_limits_vpn", args)
    assert request.responseCode == 500
    assert json.loads(body(request)) == {"error": "internal error"}
    assert b"secret" not in body(request) and b"Traceback" not in body(request)


def test_an_answer_for_a_client_that_left_is_dropped(tmp_path: Path) -> None:
    """The HTTP client goes away before the ledger answers: nothing is written after."""
    server, _, _ = make_server(tmp_path)
    answer: Deferred[Limits | None] = Deferred()
    billed(server, answer)
    site = metrics_site(server)
    request = DummyRequest([b"remain_limits_vpn"])
    request.args = {b"net_id": [b"1"], b"user_pkey_hash": [b"ab" * 32]}
    resource = getChildForRequest(site.resource, request)
    assert resource.render(request) is NOT_DONE_YET
    request.processingFailed(Exception("connection lost"))  # fires notifyFinish's errback
    written = list(request.written)
    answer.callback(None)
    assert request.written == written


def test_broken_metrics_are_a_500_line(tmp_path: Path) -> None:
    server, _, _ = make_server(tmp_path)
    server.pool = None  # type: ignore[assignment]
    request = get(server, b"/metrics")
    assert request.responseCode == 500
    assert body(request) == b"cannot build the metrics now\n"


def test_the_process_metrics_come_with_the_servers(tmp_path: Path) -> None:
    """CPU, memory, file descriptors and start time of this very process, read at scrape time,
    and the Python version; the server's own figures are read at scrape time too."""
    import os

    server, clock, _ = make_server(tmp_path)
    families = parse_exposition(body(get(server, b"/metrics")).decode())
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "python_info",
    ):
        assert name in families, name
    assert 3 <= value(families, "process_open_fds") <= len(os.listdir("/proc/self/fd"))
    site = metrics_site(server)
    c = Client(server, clock)
    c.request()
    c.addr_request()

    def scrape() -> dict[str, dict[str, Any]]:
        request = DummyRequest([b"metrics"])
        resource = getChildForRequest(site.resource, request)
        return parse_exposition(resource.render(request).decode())

    assert value(scrape(), "cellvpn_sessions_active") == 1
    c.lose()
    assert value(scrape(), "cellvpn_sessions_active") == 0


def test_rate_limit_drops_and_delays_are_exposed(tmp_path: Path) -> None:
    """What the limiter drops (IP packets) and delays (proxy bytes), by direction."""
    server, clock, _ = make_server(tmp_path)
    c = Client(server, clock)
    counters = c.session.counters
    counters.dropped_rate_up, counters.dropped_rate_down = 3, 4
    counters.delayed_rate_up, counters.delayed_rate_down = 5, 6
    families = parse_exposition(exposition(server).decode())
    drops = "cellvpn_dropped_packets_total"
    delays = "cellvpn_rate_limit_delays_total"
    assert value(families, drops, direction="from_client", reason="rate_limit") == 3
    assert value(families, drops, direction="to_client", reason="rate_limit") == 4
    assert value(families, delays, direction="from_client") == 5
    assert value(families, delays, direction="to_client") == 6
    stat = server.control_vpn_stat()["sessions"][0]["counters"]
    assert (stat["delayed_rate_up"], stat["delayed_rate_down"]) == (5, 6)
