"""What a long ``cellvpn-ctl`` command shows while it waits: a progress bar on a terminal, and
the steps a start goes through.

The lines are built by plain functions from the answers the service gives; only
:class:`TerminalBar` writes, and only to a terminal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TextIO

from cellvpn.control.text import human_bytes

BAR_WIDTH = 30


def bar_line(progress: Mapping[str, Any], width: int = BAR_WIDTH) -> str:
    """``[#####.....]  50% upload 128.00 KiB of 256.00 KiB`` from a check's progress."""
    total = int(progress.get("total_bytes") or 0)
    done = min(int(progress.get("done_bytes") or 0), total)
    share = done / total if total else (1.0 if progress.get("phase") == "done" else 0.0)
    filled = int(share * width)
    what = str(progress.get("text") or "")
    amount = f" {human_bytes(done)} of {human_bytes(total)}" if total else ""
    return f"[{'#' * filled}{'.' * (width - filled)}] {share * 100:3.0f}% {what}{amount}"


class TerminalBar:
    """Draws :func:`bar_line` in place on a terminal; ``clear`` leaves the line empty."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.drawn = False

    def draw(self, progress: Any) -> None:
        if not isinstance(progress, Mapping):
            return
        self.out.write("\r\x1b[K" + bar_line(progress))
        self.out.flush()
        self.drawn = True

    def clear(self) -> None:
        if self.drawn:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self.drawn = False


class StepPrinter:
    """Prints each step of a start once, in order, as ``waiting: <step>`` lines."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.said = 0
        self.attempt: object = None

    def seen(self, status: Any) -> None:
        if not isinstance(status, Mapping):
            return
        if status.get("start_attempt") != self.attempt:
            self.attempt = status.get("start_attempt")  # a new attempt: its steps from the first
            self.said = 0
        steps = status.get("start_steps") or []
        for step in steps[self.said :]:
            self.out.write(f"{step_line(step)}\n")
        self.said = max(self.said, len(steps))
        self.out.flush()


def step_line(step: Mapping[str, Any]) -> str:
    """``  +12.3 ms  waiting for the address`` from one step of a start."""
    return f"  +{float(step.get('after_ms') or 0):.1f} ms  {step.get('text')}"
