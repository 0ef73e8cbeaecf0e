"""The steps a start (or a reconnect) goes through, kept so that ``vpn_client start`` can say
what it is waiting for while it waits, and ``status`` how the last attempt went.

Plain data and a clock from outside: the service records a step as it happens, the control
socket reads :meth:`StartSteps.describe`.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any


class StartStep(Enum):
    """What an attempt is waiting for, in order; the value is what the user reads."""

    CONNECTING = "connecting (TCP)"
    TLS = "TLS handshake"
    SESSION = "session setup (HELLO, WELCOME)"
    GRANT = "waiting for the service grant (REQUEST)"
    ADDRESS = "waiting for the address (ADDR_REQUEST)"
    TUNNEL = "setting up the TUN, routes and DNS"
    UP_HOOK = "running the up hook"
    UP = "up"
    FAILED = "failed"
    RETRY = "waiting to try again"


#: Steps after which the attempt waits for nothing more.
FINAL = frozenset({StartStep.UP, StartStep.FAILED, StartStep.RETRY})


class StartSteps:
    """The steps of the latest attempt, each with the milliseconds since it began."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.attempt = 0
        self.began = 0.0
        self.steps: list[tuple[StartStep, str, float]] = []

    def begin(self, server: str) -> None:
        """A new attempt, to ``server``: it starts by connecting."""
        self.attempt += 1
        self.began = self.clock()
        self.steps = []
        self.step(StartStep.CONNECTING, f"connecting to {server} (TCP)")

    def step(self, step: StartStep, text: str = "") -> None:
        """The attempt reached ``step`` (a repeat of the last step is not kept)."""
        if not self.steps and step is not StartStep.CONNECTING:
            return  # no attempt begun: nothing to add to
        if self.steps and self.steps[-1][0] is step:
            return
        self.steps.append((step, text or step.value, self.clock() - self.began))

    @property
    def current(self) -> StartStep | None:
        return self.steps[-1][0] if self.steps else None

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"step": step.name.lower(), "text": text, "after_ms": round(after * 1000, 1)}
            for step, text, after in self.steps
        ]
