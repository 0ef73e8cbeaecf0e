"""A token bucket: the one rate limit every edge rule uses, with the time passed in."""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; each event takes one or is refused."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False

    def spend(self, now: float, cost: float) -> float:
        """Take ``cost`` even past empty (what a TCP stream sent cannot be dropped); the
        seconds until the debt is paid back, 0 when there is none. ``take`` refuses meanwhile,
        so the IP packets of the session wait for the same budget."""
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now
        self.tokens -= cost
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def full(self, now: float) -> bool:
        """Refilled to the brim: it remembers nothing and may be forgotten."""
        return self.tokens + (now - self.stamp) * self.rate >= self.burst
