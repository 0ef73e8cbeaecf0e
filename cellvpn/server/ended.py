"""Ended sessions: the last ones, kept for ``vpn_stat``, and totals over all of them.

The kept list forgets its oldest entries, but a Prometheus counter must never go down, so what
every ended session carried is also added to running totals that are never forgotten.
"""

from __future__ import annotations

import collections
from typing import Any


class EndedSessions(collections.deque[dict[str, Any]]):
    """``describe()`` of the last ``maxlen`` ended sessions, plus totals over all that ended."""

    def __init__(self, maxlen: int) -> None:
        super().__init__(maxlen=maxlen)
        #: sessions ended since the server started (``count`` is deque's own method)
        self.ended = 0
        #: their ``counters`` (SessionCounters fields), summed
        self.totals: collections.Counter[str] = collections.Counter()

    def append(self, entry: dict[str, Any]) -> None:
        super().append(entry)
        self.ended += 1
        counters = entry.get("counters")
        if isinstance(counters, dict):
            self.totals.update({k: v for k, v in counters.items() if isinstance(v, int) and v > 0})
