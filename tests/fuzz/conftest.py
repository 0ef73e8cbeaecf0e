"""The fuzz profile (inputs per target from ``CELLVPN_FUZZ_EXAMPLES``), and the long run's tally.

The profile is applied per test (``@harness.fuzz``), never loaded globally, so the rest of
the suite keeps its own hypothesis settings. Random inputs every run (no derandomize) and
no example database: a long run explores, it does not replay; a failure prints its
reproduction blob.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from pytest import TerminalReporter

from tests.fuzz.harness import EXAMPLES, PROFILE, ROUND, SUMMARY_FROM, TALLIES

settings.register_profile(
    PROFILE,
    max_examples=min(EXAMPLES, ROUND),  # per round: harness.fuzz runs as many as it takes
    deadline=None,
    derandomize=False,
    database=None,
    print_blob=True,
    # structure-aware inputs are large and slow to build on purpose
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def pytest_terminal_summary(terminalreporter: TerminalReporter) -> None:
    """After a long run only: each target's inputs, the exceptions that left it, its pace."""
    if EXAMPLES < SUMMARY_FROM or not any(t.tried for t in TALLIES.values()):
        return
    outcome: dict[str, tuple[str, float]] = {}
    for kind in ("passed", "failed"):
        for report in terminalreporter.stats.get(kind, []):
            if getattr(report, "when", "call") == "call":
                outcome[report.nodeid.rsplit("::", 1)[-1]] = (kind, report.duration)
    terminalreporter.section(f"cellvpn fuzz: up to {EXAMPLES:,} inputs per target")
    width = max(len(name) for name in TALLIES)
    total = escaped = 0
    for name, tally in sorted(TALLIES.items()):
        if not tally.tried:
            continue
        total += tally.tried
        escaped += tally.escaped
        kind, seconds = outcome.get(name, ("?", 0.0))
        verdict = "FAILED" if kind == "failed" or tally.escaped else "ok"
        terminalreporter.write_line(
            f"{name:<{width}}  {tally.tried:>11,} inputs  {tally.escaped:>3} exceptions"
            f"  {seconds:>8.1f} s  {verdict}"
        )
    terminalreporter.write_line(
        f"{'all targets':<{width}}  {total:>11,} inputs  {escaped:>3} exceptions"
    )
