"""The server's read-only HTTP face: Prometheus metrics and the original's remain_limits_vpn.

Served on ``[metrics] listen`` (a Twisted endpoint string; empty = off). Nothing here changes
any state; the ledger is read on its own thread (never on the reactor's), and an error reaches
the HTTP client as a status and one line of JSON or text, never as a traceback.

- ``GET /metrics``: the Prometheus text exposition format, version 0.0.4, written by
  prometheus_client from a collector that reads the server's counters at scrape time, plus the
  process's own metrics. Traffic is summed over live sessions and every session that ended,
  labelled only by direction and drop reason, so the number of series does not grow with the
  number of clients.
- ``GET /remain_limits_vpn?net_id=<dec>&user_pkey_hash=<hex>``: what a client has left with this
  provider, as the original's JSON ``{net_id, srv_uid, user_pkey_hash, server_pkey_hash,
  limit_bytes, limit_sec}``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from cellvpn import __version__
from cellvpn.billing.interfaces import LedgerUnavailableError, Limits
from cellvpn.conn.listen import listen_now
from cellvpn.device.counters import SessionCounters
from cellvpn.server.edge import Refusal
from cellvpn.wire.service import SRV_UID_VPN

if TYPE_CHECKING:
    from cellvpn.server.service import VPNServerService

log = Logger()

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4.encode()
JSON_TYPE = b"application/json"

_COUNTER_NAMES = tuple(f.name for f in fields(SessionCounters))
#: Drop reasons of packets from clients, by their SessionCounters field.
_FROM_CLIENT_DROPS = (
    ("spoofed", "dropped_spoofed"),
    ("malformed", "dropped_malformed"),
    ("not_active", "dropped_not_active"),
    ("isolated", "dropped_isolated"),
    ("tun_write", "dropped_tun_write"),
    ("bad_offload", "dropped_bad_offload"),
    ("to_host", "dropped_to_host"),
    ("ip_options", "dropped_ip_options"),
    ("rate_limit", "dropped_rate_up"),
)
_DIRECTIONS = ("from_client", "to_client")
#: the rate limit's name of each direction
_RATE_WAYS = (("from_client", "up"), ("to_client", "down"))
#: TUN counters: metric name, TunStats field, help.
_TUN_COUNTERS = (
    ("cellvpn_tun_read_packets_total", "packets_read", "Packets read from the TUN."),
    ("cellvpn_tun_read_bytes_total", "bytes_read", "Bytes read from the TUN."),
    ("cellvpn_tun_written_packets_total", "packets_written", "Packets written to the TUN."),
    ("cellvpn_tun_written_bytes_total", "bytes_written", "Bytes written to the TUN."),
    (
        "cellvpn_tun_write_dropped_total",
        "dropped_eagain",
        "Packets not written because the TUN's queue was full.",
    ),
    ("cellvpn_tun_wakeups_total", "wakeups", "Times the TUN was found readable."),
)
_U64 = 1 << 64
_HASH = re.compile(r"(?:0[xX])?([0-9a-fA-F]{64})")
_NET_ID = re.compile(r"[0-9]{1,20}")

Sample = tuple[Mapping[str, str], int | float]


# --- /metrics ------------------------------------------------------------------------------


def _family(
    kind: str, name: str, help_text: str, samples: Iterable[Sample]
) -> CounterMetricFamily | GaugeMetricFamily:
    """One family from ``(labels, value)`` samples; every sample has the same label names."""
    rows = list(samples)
    names = list(rows[0][0]) if rows else []
    family: CounterMetricFamily | GaugeMetricFamily
    if kind == "counter":
        family = CounterMetricFamily(name, help_text, labels=names)
    else:
        family = GaugeMetricFamily(name, help_text, labels=names)
    for labels, number in rows:
        family.add_metric([labels[n] for n in names], number)
    return family


def _one(kind: str, name: str, help_text: str, number: int | float) -> Metric:
    return _family(kind, name, help_text, [({}, number)])


class ServerCollector(Collector):
    """The server's counters, read at scrape time (nothing is kept twice or updated per
    packet): a custom collector over what the sessions, the forwarder, the pool, the TUN and
    billing count anyway."""

    def __init__(self, server: VPNServerService) -> None:
        self.vpn = server

    def describe(self) -> list[Metric]:
        """Nothing: the registry then does not collect at registration (the TUN and billing
        families come and go with the server's state)."""
        return []

    def collect(self) -> Iterator[Metric]:
        server = self.vpn
        t = session_totals(server)
        yield _family(
            "gauge",
            "cellvpn_build_info",
            "The running cellvpn version, as a label (the value is always 1).",
            [({"version": __version__}, 1)],
        )
        yield _one(
            "gauge", "cellvpn_sessions_active", "Live client sessions.", len(server.sessions)
        )
        yield _one(
            "counter",
            "cellvpn_sessions_ended_total",
            "Client sessions ended since the server started.",
            server.finished.ended,
        )
        yield _family(
            "counter",
            "cellvpn_ip_packets_total",
            "IP packets (IPv4 and IPv6) carried between clients and the TUN (offload"
            " super-packets count as the packets they stand for).",
            [({"direction": d}, t[f"{d}_packets"]) for d in _DIRECTIONS],
        )
        yield _family(
            "counter",
            "cellvpn_ip_bytes_total",
            "IP bytes carried between clients and the TUN: whole IP packets, header included, "
            "stream and TLS overhead excluded.",
            [({"direction": d}, t[f"{d}_bytes"]) for d in _DIRECTIONS],
        )
        yield _family(
            "counter",
            "cellvpn_ip_lost_bytes_total",
            "IP bytes of packets dropped on their way between a client and the TUN.",
            [({"direction": d}, t[f"{d}_lost_bytes"]) for d in _DIRECTIONS],
        )
        fwd = server.forwarder
        drops: list[Sample] = [
            ({"direction": "from_client", "reason": reason}, t[field])
            for reason, field in _FROM_CLIENT_DROPS
        ]
        drops += [
            ({"direction": "to_client", "reason": "queue_full"}, t["dropped_queue_full"]),
            ({"direction": "to_client", "reason": "rate_limit"}, t["dropped_rate_down"]),
            ({"direction": "to_client", "reason": "no_route"}, fwd.dropped_no_route),
            ({"direction": "to_client", "reason": "malformed"}, fwd.dropped_malformed),
        ]
        yield _family(
            "counter",
            "cellvpn_dropped_packets_total",
            "Packets dropped, by direction and reason.",
            drops,
        )
        yield _family(
            "counter",
            "cellvpn_rate_limit_delays_total",
            "Times the L4 proxy paused a direction for a session's rate limit (TCP bytes are"
            " delayed, not dropped; dropped IP packets are in cellvpn_dropped_packets_total).",
            [({"direction": d}, t[f"delayed_rate_{w}"]) for d, w in _RATE_WAYS],
        )
        yield _family(
            "counter",
            "cellvpn_proxy_bytes_total",
            "TCP payload bytes carried by the L4 proxy.",
            [({"direction": d}, t[f"proxy_{d}_bytes"]) for d in _DIRECTIONS],
        )
        yield _family(
            "counter",
            "cellvpn_refused_total",
            "Connections, sessions and packets refused or cut off at the edge, by kind.",
            [({"kind": kind.value}, server.refusals.counts.get(kind.value, 0)) for kind in Refusal],
        )
        yield server.session_lengths.family(
            "cellvpn_session_duration_seconds",
            "Length of the client sessions that ended, from setup to end.",
        )
        yield server.keepalive_rtts.family(
            "cellvpn_keepalive_rtt_seconds",
            "Round trips of the server's keepalives to its clients, one per keepalive answered.",
        )
        if server.per_client is not None:
            yield from _per_client(server)
        checks = server.checks
        yield _one(
            "counter",
            "cellvpn_check_requests_total",
            "CHECK_REQUESTs answered (vpn_client check).",
            checks.requests,
        )
        yield _family(
            "counter",
            "cellvpn_check_bytes_total",
            "Data bytes of CHECKs: sent by clients (from_client), sent back (to_client).",
            [
                ({"direction": "from_client"}, checks.from_client_bytes),
                ({"direction": "to_client"}, checks.to_client_bytes),
            ],
        )
        edge = server.edge_stats()
        yield _one("gauge", "cellvpn_streams", "Streams (TCP connections) open.", edge["streams"])
        yield _one("gauge", "cellvpn_handshakes", "TLS handshakes in flight.", edge["handshakes"])
        yield _one(
            "gauge",
            "cellvpn_ledger_queued",
            "Ledger calls queued or running.",
            edge["ledger_queued"],
        )
        pool = server.pool.stats()
        yield _one("gauge", "cellvpn_pool_leased", "Addresses leased to sessions.", pool["leased"])
        yield _one(
            "gauge",
            "cellvpn_pool_held",
            "Addresses kept for clients that left, until lease_hold passes.",
            pool["held"],
        )
        yield _one(
            "gauge", "cellvpn_pool_capacity", "Addresses the pool can lease.", pool["capacity"]
        )
        yield _one(
            "gauge", "cellvpn_tun_up", "1 when the TUN is configured and up.", int(server.tun_ready)
        )
        yield _one(
            "counter",
            "cellvpn_pumped_packets_total",
            "Client packets the C pump wrote to the TUN (counted in cellvpn_ip_packets_total too).",
            server.forwarder.pumped_packets,
        )
        tun = server.tun
        if tun is not None:
            for name, attr, help_text in _TUN_COUNTERS:
                yield _one("counter", name, help_text, getattr(tun.stats, attr))
            s = tun.stats
            yield _family(
                "counter",
                "cellvpn_tun_errors_total",
                "TUN errors: writes the device refused (eio, invalid, other), failed reads (read).",
                [
                    ({"kind": "eio"}, s.errors_eio),
                    ({"kind": "invalid"}, s.errors_invalid),
                    ({"kind": "other"}, s.errors_other),
                    ({"kind": "read"}, s.read_errors),
                ],
            )
        billing = server.billing
        if billing is not None:
            yield _one(
                "counter",
                "cellvpn_billing_receipts_redeemed_total",
                "Signed receipts redeemed in the ledger.",
                billing.redeemed,
            )
            yield _one(
                "counter",
                "cellvpn_billing_receipts_refused_total",
                "Signed receipts refused (bad client signature, or by the ledger).",
                billing.refused,
            )


def _per_client(server: VPNServerService) -> Iterator[Metric]:
    """The per-client families ([metrics] per_client): traffic and live sessions by name."""
    assert server.per_client is not None
    live = ((s.client_name, s.counters) for s in server.sessions)
    rows = server.per_client.rows(live)
    for kind in ("packets", "bytes"):
        yield _family(
            "counter",
            f"cellvpn_ip_{kind}_by_client_total",
            f"IP {kind} carried between one client's sessions and the TUN.",
            [
                ({"client": label, "direction": d}, row[f"{d}_{kind}"])
                for label, row in rows.items()
                for d in _DIRECTIONS
            ],
        )
    yield _family(
        "gauge",
        "cellvpn_sessions_active_by_client",
        "Live sessions of one client.",
        [({"client": label}, row["sessions_active"]) for label, row in rows.items()],
    )


def session_totals(server: VPNServerService) -> Counter[str]:
    """SessionCounters summed over the live sessions and every session that ended."""
    totals = Counter(server.finished.totals)
    for session in server.sessions:
        c = session.counters
        for name in _COUNTER_NAMES:
            value = getattr(c, name)
            if value:
                totals[name] += value
    return totals


def registry_for(server: VPNServerService, process: bool = True) -> CollectorRegistry:
    """The server's own registry (never prometheus_client's global one, so two servers in one
    process never mix): its collector and, with ``process``, the process's CPU, memory, file
    descriptors and start time, the Python version and the garbage collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(server))
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def exposition(server: VPNServerService, registry: CollectorRegistry | None = None) -> bytes:
    """The server's metrics now, in the Prometheus text format 0.0.4."""
    return generate_latest(registry if registry is not None else registry_for(server))


class MetricsPage(Resource):
    """``GET /metrics``."""

    isLeaf = True

    def __init__(self, server: VPNServerService) -> None:
        super().__init__()
        self.vpn = server
        self.registry = registry_for(server)

    def render_GET(self, request: Request) -> bytes:
        try:
            body = exposition(self.vpn, self.registry)
        except Exception:
            log.failure("building the metrics failed")
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"cannot build the metrics now\n"
        request.setHeader(b"content-type", CONTENT_TYPE)
        return body


# --- /remain_limits_vpn --------------------------------------------------------------------


class QueryError(ValueError):
    """A missing or bad query parameter; the message is for the HTTP client."""


def _param(args: Mapping[bytes, list[bytes]], name: str) -> str:
    values = args.get(name.encode())
    if not values:
        raise QueryError(f"missing parameter {name}")
    try:
        return values[0].decode("ascii").strip()
    except UnicodeDecodeError:
        raise QueryError(f"{name} must be ASCII") from None


def parse_limits_query(args: Mapping[bytes, list[bytes]]) -> tuple[int, bytes]:
    """``net_id`` (a decimal u64) and ``user_pkey_hash`` (64 hex digits, ``0x`` allowed)."""
    net_text = _param(args, "net_id")
    if not _NET_ID.fullmatch(net_text) or int(net_text) >= _U64:
        raise QueryError("net_id must be a decimal number below 2**64")
    hash_text = _param(args, "user_pkey_hash")
    m = _HASH.fullmatch(hash_text)
    if m is None:
        raise QueryError("user_pkey_hash must be 64 hex digits")
    return int(net_text), bytes.fromhex(m.group(1))


def limits_answer(
    net_id: int, client: bytes, provider: bytes, limits: Limits | None
) -> dict[str, Any]:
    """The original's JSON; nothing saved is zeros. Both are u64 there, so never negative."""
    return {
        "net_id": net_id,
        "srv_uid": SRV_UID_VPN,
        "user_pkey_hash": client.hex(),
        "server_pkey_hash": provider.hex(),
        "limit_bytes": 0 if limits is None else max(0, int(limits.bytes_left)),
        "limit_sec": 0 if limits is None else max(0, int(limits.seconds_left)),
    }


def _json_body(request: Request, code: int, value: Mapping[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", JSON_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(value, sort_keys=True).encode() + b"\n"


class RemainLimitsPage(Resource):
    """``GET /remain_limits_vpn?net_id=<dec>&user_pkey_hash=<hex>``."""

    isLeaf = True

    def __init__(self, server: VPNServerService) -> None:
        super().__init__()
        self.vpn = server

    def render_GET(self, request: Request) -> bytes | int:
        billing = self.vpn.billing
        if billing is None:
            return _json_body(
                request, 404, {"error": "this server runs without billing, so it keeps no limits"}
            )
        try:
            net_id, client = parse_limits_query(request.args or {})
        except QueryError as e:
            return _json_body(request, 400, {"error": str(e)})
        provider = billing.key.account
        gone: list[bool] = []
        request.notifyFinish().addBoth(lambda _: gone.append(True))

        def answer(limits: Limits | None) -> None:
            self._finish(request, gone, 200, limits_answer(net_id, client, provider, limits))

        def failed(failure: Failure) -> None:
            if failure.check(LedgerUnavailableError):
                self._finish(request, gone, 503, {"error": "the ledger is unavailable now"})
                return
            log.failure("remain_limits_vpn: reading the ledger failed", failure)
            self._finish(request, gone, 500, {"error": "internal error"})

        d = billing.ledger.load_limits(provider, client)
        d.addCallbacks(answer, failed)
        d.addErrback(lambda f: log.failure("remain_limits_vpn: answering failed", f))
        return NOT_DONE_YET

    @staticmethod
    def _finish(request: Request, gone: list[bool], code: int, value: Mapping[str, Any]) -> None:
        if gone:  # the HTTP client went away meanwhile
            return
        request.write(_json_body(request, code, value))
        request.finish()


# --- the site -------------------------------------------------------------------------------


class MetricsSite(Site):
    """A Site that never shows a traceback and logs no line per scrape."""

    noisy = False
    displayTracebacks = False

    def log(self, request: http.Request) -> None:
        """No access log: a scrape every few seconds would flood the server's log."""


def metrics_site(server: VPNServerService) -> MetricsSite:
    root = Resource()
    root.putChild(b"metrics", MetricsPage(server))
    root.putChild(b"remain_limits_vpn", RemainLimitsPage(server))
    return MetricsSite(root)


def listen_metrics(server: VPNServerService) -> IListeningPort | None:
    """Listen on ``[metrics] listen`` now (StartupError if it cannot); None when it is off."""
    listen = server.config.metrics.listen
    if not listen:
        return None
    endpoint = serverFromString(server.reactor, listen)
    return listen_now(endpoint, metrics_site(server), f"[metrics] listen {listen}")
