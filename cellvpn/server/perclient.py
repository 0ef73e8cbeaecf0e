"""Per-client series for ``/metrics`` (``[metrics] per_client``), with a bound on their number.

A label per client multiplies every series by the number of clients, so it is off unless asked
for, and then at most ``per_client_limit`` client names get series of their own: the first
ones seen keep them for the life of the process (a counter must never go down, so a name once
shown is never dropped), and sessions of any later name are counted under ``(other)``.
Sessions of clients without an enrolled name (``[tls] clients = any``) are ``(anonymous)``.

Ended sessions are added once, when they end; live ones are read at scrape time. Nothing is
counted per packet.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

ANONYMOUS = "(anonymous)"
OTHER = "(other)"
#: The SessionCounters fields kept per client.
FIELDS = ("from_client_bytes", "to_client_bytes", "from_client_packets", "to_client_packets")


class PerClient:
    """Traffic and live sessions per client label, for at most ``limit`` names."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.labels: dict[str, None] = {}  # the names with series, in the order first seen
        self.ended: dict[str, Counter[str]] = {}

    def label(self, name: str | None) -> str:
        """The label a session of client ``name`` is counted under."""
        label = name or ANONYMOUS
        if label in self.labels:
            return label
        if len(self.labels) >= self.limit:
            return OTHER
        self.labels[label] = None
        return label

    def session_ended(self, name: str | None, counters: Mapping[str, Any]) -> None:
        totals = self.ended.setdefault(self.label(name), Counter())
        for field in FIELDS:
            value = counters.get(field, 0)
            if isinstance(value, int) and value > 0:
                totals[field] += value

    def rows(self, live: Iterable[tuple[str | None, Any]]) -> dict[str, dict[str, int]]:
        """Per label: the FIELDS over ended and live sessions, and ``sessions_active``.

        ``live`` is ``(client name, SessionCounters)`` of each live session.
        """
        rows: dict[str, dict[str, int]] = {}
        for label, totals in self.ended.items():
            rows[label] = {f: totals[f] for f in FIELDS} | {"sessions_active": 0}
        for name, counters in live:
            row = rows.setdefault(self.label(name), dict.fromkeys((*FIELDS, "sessions_active"), 0))
            for f in FIELDS:
                row[f] += getattr(counters, f)
            row["sessions_active"] += 1
        return rows
