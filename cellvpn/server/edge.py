"""The server's edge rules before payment: who may open a stream, and what refusals cost us.

Plain Python with the time passed in: :class:`Admission` decides whether a new TCP connection
is taken (streams in total and per source prefix, TLS handshakes in flight per source prefix,
new connections per source prefix per second as a token bucket), and :class:`Refusals` counts
every refused thing by kind and says so in at most one log line per kind per interval, so
nothing an attacker repeats turns into one log line per attempt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from cellvpn.ratelimit import TokenBucket


class Refusal(StrEnum):
    """Kinds of refused or cut-off input, the keys of ``vpn_stat``'s ``refused``."""

    CONNECTION_RATE = "connection_rate"
    STREAMS_TOTAL = "streams_total"
    STREAMS_PER_SOURCE = "streams_per_source"
    HANDSHAKES_PER_SOURCE = "handshakes_per_source"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    TLS_FAILED = "tls_failed"
    NOT_ENROLLED = "not_enrolled"
    REVOKED = "revoked"
    SETUP_TIMEOUT = "setup_timeout"
    REQUEST_TIMEOUT = "request_timeout"
    PROTOCOL_ERROR = "protocol_error"
    OUTPUT_LIMIT = "output_limit"
    CHECK_BUDGET = "check_budget"
    KEEPALIVE = "keepalive"
    PING = "ping"
    DEPOSIT_CREATE = "deposit_create"
    DUPLICATE_REQUEST = "duplicate_request"
    SIGN_RESPONSE = "sign_response"
    PROXY = "proxy"
    LEDGER_BUSY = "ledger_busy"
    SESSIONS_PER_KEY = "sessions_per_key"


@dataclass(frozen=True)
class EdgeLimits:
    max_streams: int = 10000
    max_streams_per_source: int = 256
    max_handshakes_per_source: int = 32
    connect_rate: float = 20.0
    connect_burst: int = 40


@dataclass
class _Source:
    streams: int = 0
    handshakes: int = 0
    bucket: TokenBucket | None = None


#: Sources remembered at most (buckets of idle sources are forgotten first).
MAX_SOURCES = 65536


class Admission:
    """Counts streams and handshakes per source; ``admit`` says why a new one is refused."""

    def __init__(self, limits: EdgeLimits) -> None:
        self.limits = limits
        self.streams = 0
        self.handshakes = 0
        self._sources: dict[str, _Source] = {}

    def admit(self, source: str, now: float) -> Refusal | None:
        """Take a new connection from ``source`` (counted as a stream in handshake), or say
        which limit refuses it (nothing is counted then)."""
        limits = self.limits
        if self.streams >= limits.max_streams:
            return Refusal.STREAMS_TOTAL
        entry = self._sources.get(source)
        if entry is None:
            if len(self._sources) >= MAX_SOURCES:
                self._forget_idle(now)
                if len(self._sources) >= MAX_SOURCES:
                    return Refusal.STREAMS_TOTAL
            entry = self._sources[source] = _Source()
        if entry.bucket is None:
            entry.bucket = TokenBucket(limits.connect_rate, limits.connect_burst, now)
        if not entry.bucket.take(now):
            return Refusal.CONNECTION_RATE
        if entry.streams >= limits.max_streams_per_source:
            return Refusal.STREAMS_PER_SOURCE
        if entry.handshakes >= limits.max_handshakes_per_source:
            return Refusal.HANDSHAKES_PER_SOURCE
        entry.streams += 1
        entry.handshakes += 1
        self.streams += 1
        self.handshakes += 1
        return None

    def handshake_done(self, source: str) -> None:
        """The TLS handshake of an admitted connection finished."""
        entry = self._sources.get(source)
        if entry is not None and entry.handshakes > 0:
            entry.handshakes -= 1
            self.handshakes -= 1

    def closed(self, source: str, handshaking: bool) -> None:
        """An admitted connection ended (``handshaking``: before its handshake finished)."""
        if handshaking:
            self.handshake_done(source)
        entry = self._sources.get(source)
        if entry is not None and entry.streams > 0:
            entry.streams -= 1
            self.streams -= 1

    def _forget_idle(self, now: float) -> None:
        idle = [
            source
            for source, entry in self._sources.items()
            if entry.streams == 0 and (entry.bucket is None or entry.bucket.full(now))
        ]
        for source in idle:
            del self._sources[source]

    def sources(self) -> int:
        return len(self._sources)


class Refusals:
    """Counts by kind; one summary line per kind per ``interval`` seconds through ``say``."""

    def __init__(
        self, say: Callable[[Refusal, int, str], None], clock: Callable[[], float], interval: float
    ) -> None:
        self.counts: dict[str, int] = {}
        self._say = say
        self._clock = clock
        self.interval = interval
        self._said_at: dict[Refusal, float] = {}
        self._since: dict[Refusal, int] = {}

    def count(self, kind: Refusal, example: str) -> None:
        """One more ``kind``; ``example`` (who and why) is said if a line is due."""
        self.counts[kind.value] = self.counts.get(kind.value, 0) + 1
        self._since[kind] = self._since.get(kind, 0) + 1
        now = self._clock()
        if now - self._said_at.get(kind, float("-inf")) >= self.interval:
            self._said_at[kind] = now
            self._say(kind, self._since.pop(kind), example)

    def total(self) -> int:
        return sum(self.counts.values())


class LineBudget:
    """Lines about sessions that never got service, at most ``rate`` a second after a burst.

    Anyone who completes a TLS handshake gets a session, and each session says two lines
    (established, ended): a flood of handshakes would otherwise write the log at its own rate.
    Lines past the budget are counted and said as one line per ``interval`` through ``say``.
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        clock: Callable[[], float],
        interval: float,
        say: Callable[[int], None],
    ) -> None:
        self._bucket = TokenBucket(rate, burst, clock())
        self._clock = clock
        self.interval = interval
        self._say = say
        #: lines not written, in all and since the last summary
        self.skipped = 0
        self._since = 0
        self._said_at = float("-inf")

    def allow(self) -> bool:
        now = self._clock()
        if self._bucket.take(now):
            allowed = True
        else:
            allowed = False
            self.skipped += 1
            self._since += 1
        if self._since and now - self._said_at >= self.interval:
            self._said_at = now
            since, self._since = self._since, 0
            self._say(since)
        return allowed
