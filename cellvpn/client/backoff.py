"""Reconnect delays: exponential back-off with jitter, capped."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """``next()`` gives the delay before the next attempt; ``reset()`` after a success.

    Each delay is half the current ceiling plus a random share of the other half: never near
    zero, yet the reconnects of many clients after a server restart spread out instead of
    arriving together.
    """

    def __init__(
        self,
        initial: float = 1.0,
        maximum: float = 60.0,
        factor: float = 2.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._rand = rand
        self.attempts = 0

    def ceiling(self) -> float:
        return min(self.maximum, self.initial * self.factor**self.attempts)

    def next(self) -> float:
        ceiling = self.ceiling()
        self.attempts += 1
        return ceiling / 2 + self._rand() * ceiling / 2

    def reset(self) -> None:
        self.attempts = 0
