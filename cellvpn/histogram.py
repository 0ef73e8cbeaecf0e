"""Histograms for ``/metrics``, counted where the event happens and read at scrape time.

The collectors build their families from the services' own state at each scrape; a histogram
is the one thing that must be counted as it happens. :class:`Buckets` is plain arithmetic
(no registry, no lock: it is only touched on the reactor thread), observed once per event
that is already rare (a session's end, a keepalive answered), never per packet.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from prometheus_client.core import HistogramMetricFamily

#: Session length in seconds: from the checks and failed setups of a few seconds, through
#: browsing sessions of minutes, to a tunnel kept up for a working day and more.
SESSION_SECONDS = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 86400.0)
#: Keepalive round trip in seconds: from a LAN (under a millisecond) through one continent
#: (tens of milliseconds) to a satellite or a loaded mobile link (a second and more).
RTT_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Buckets:
    """Counts per upper bound (le), their sum, and the number observed."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("histogram bounds must rise")
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` rows, cumulative, ending with ``+Inf``: the exposition's buckets."""
        rows, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            rows.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return rows

    def family(self, name: str, help_text: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, help_text)
        family.add_metric([], self.cumulative(), self.total)
        return family
