"""The client's ``/metrics``: its state, traffic, round trip, sessions and receipts.

A custom prometheus_client collector reads the client's own status at scrape time (nothing is
counted twice or per packet), in a registry of the client's own beside the process's metrics.
Off unless ``[metrics] listen`` names an endpoint (loopback is the sensible place).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import (
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
from twisted.web.resource import Resource
from twisted.web.server import Request

from cellvpn import __version__
from cellvpn.conn.listen import listen_now
from cellvpn.histogram import Buckets
from cellvpn.server.metrics import CONTENT_TYPE, MetricsSite


class ClientStatus(Protocol):
    """What the collector needs of the client: the status it shows ``vpn_client status``, and
    the keepalive round trips it observed."""

    @property
    def keepalive_rtts(self) -> Buckets: ...

    def status(self) -> dict[str, Any]: ...


def _gauge(name: str, help_text: str, value: float) -> Metric:
    family = GaugeMetricFamily(name, help_text)
    family.add_metric([], value)
    return family


def _counter(name: str, help_text: str, rows: Mapping[str, float], label: str = "") -> Metric:
    family = CounterMetricFamily(name, help_text, labels=[label] if label else [])
    for key, value in rows.items():
        family.add_metric([key] if label else [], value)
    return family


class ClientCollector(Collector):
    def __init__(self, client: ClientStatus) -> None:
        self.client = client

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        st = self.client.status()
        info = GaugeMetricFamily(
            "cellvpn_client_build_info",
            "The running cellvpn version, as a label.",
            labels=["version"],
        )
        info.add_metric([__version__], 1)
        yield info
        yield _gauge(
            "cellvpn_client_state",
            "The client's state: 0 not started, 1 started, 2 stopped, 3 connection lost,"
            " 4 starting.",
            st["status_code"],
        )
        yield _gauge(
            "cellvpn_client_up", "1 while the VPN carries traffic.", int(st["status"] == "STARTED")
        )
        yield _counter(
            "cellvpn_client_sessions_established",
            "Sessions established with the server since start (more than one: reconnects).",
            {"": st["sessions_established"]},
        )
        c = st["counters"]
        yield _counter(
            "cellvpn_client_ip_packets",
            "IP packets through the tunnel in the current session.",
            {"sent": c["sent_packets"], "received": c["received_packets"]},
            "direction",
        )
        yield _counter(
            "cellvpn_client_ip_bytes",
            "IP bytes through the tunnel in the current session.",
            {"sent": c["sent_bytes"], "received": c["received_bytes"]},
            "direction",
        )
        yield _counter(
            "cellvpn_client_dropped_packets",
            "Packets the client dropped: read from the TUN while not connected, or refused by it.",
            {"not_connected": c["dropped_not_connected"], "tun_write": c["dropped_tun_write"]},
            "reason",
        )
        yield _counter(
            "cellvpn_client_reconnects",
            "Sessions established again after a lost link.",
            {"": st.get("reconnects", 0)},
        )
        yield self.client.keepalive_rtts.family(
            "cellvpn_client_keepalive_rtt_seconds",
            "Round trips of the client's keepalives to the server, one per keepalive answered.",
        )
        rtt = st.get("keepalive_rtt_ms")
        if rtt is not None:
            yield _gauge(
                "cellvpn_client_keepalive_last_rtt_seconds",
                "The last keepalive round trip to the server.",
                rtt / 1000,
            )
        billing = st.get("billing")
        if billing:  # no wallet, no receipts
            yield _counter(
                "cellvpn_client_receipts",
                "Receipts the server asked for: signed, or refused by the client's checks.",
                {
                    "signed": billing.get("receipts_signed", 0),
                    "refused": billing.get("receipts_refused", 0),
                },
                "outcome",
            )


def client_registry(client: ClientStatus, process: bool = True) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClientCollector(client))
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


class ClientMetricsPage(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE)
        return generate_latest(self.registry)


def listen_client_metrics(
    reactor: Any, listen: str | None, client: ClientStatus
) -> IListeningPort | None:
    """Listen on ``[metrics] listen`` now (StartupError if it cannot); None when it is off."""
    if not listen:
        return None
    root = Resource()
    root.putChild(b"metrics", ClientMetricsPage(client_registry(client)))
    endpoint = serverFromString(reactor, listen)
    return listen_now(endpoint, MetricsSite(root), f"[metrics] listen {listen}")
