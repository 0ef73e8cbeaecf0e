"""What every fuzz target shares: how many inputs to try, and the tally of what was tried.

The count comes from ``CELLVPN_FUZZ_EXAMPLES`` so that one suite serves both the quick run
inside ``make test`` and the long run of ``make fuzz`` (a million inputs per target): the
hypothesis profile that carries it is registered in this folder's ``conftest.py``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar, cast

from hypothesis import settings
from hypothesis.errors import InvalidArgument
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher

ENV = "CELLVPN_FUZZ_EXAMPLES"
#: Inputs per target when the variable is unset: enough to run every path once in a while,
#: small enough that all of ``tests/fuzz`` stays well under a minute.
DEFAULT_EXAMPLES = 100
#: From this many inputs per target on, a run is a long one and prints its tally at the end.
SUMMARY_FROM = 1000
#: Inputs per hypothesis run; a long run is made of as many runs as it takes (see ``fuzz``),
#: so its count is rounded up to whole rounds.
ROUND = 1000
PROFILE = "cellvpn-fuzz"


def examples_from_env() -> int:
    """Inputs per target: ``CELLVPN_FUZZ_EXAMPLES`` if set (a positive integer), else the
    default."""
    raw = os.environ.get(ENV, "").strip().replace("_", "").replace(",", "")
    if not raw:
        return DEFAULT_EXAMPLES
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{ENV}={raw!r} is not a whole number of inputs") from None
    if value < 1:
        raise ValueError(f"{ENV}={value}: at least one input per target is needed")
    return value


EXAMPLES = examples_from_env()


@dataclass
class Tally:
    """One target's inputs: how many ran, and how many let an exception out."""

    tried: int = 0
    escaped: int = 0


#: Every target's tally, by test name (filled as inputs run; read by the summary).
TALLIES: dict[str, Tally] = {}

P = ParamSpec("P")
R = TypeVar("R")


def _hypothesis_control(error: BaseException) -> bool:
    """Hypothesis steers a run with exceptions of its own (assumptions, draws past the end);
    those are not the target's."""
    return type(error).__module__.startswith("hypothesis")


def counted(test: Callable[P, R]) -> Callable[P, R]:
    """Count each input a target runs, and each that lets an exception (or a broken
    invariant) out; goes between ``@given`` and the test body."""
    tally = TALLIES.setdefault(test.__name__, Tally())

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return test(*args, **kwargs)
        except BaseException as e:
            if not _hypothesis_control(e):
                tally.escaped += 1
            raise
        finally:
            tally.tried += 1

    return run


def profile() -> settings:
    """The fuzz profile (registered by ``conftest.py``)."""
    try:
        return settings.get_profile(PROFILE)
    except InvalidArgument:  # imported outside pytest: the conftest registers it
        import tests.fuzz.conftest  # noqa: F401

        return settings.get_profile(PROFILE)


def fuzz(test: Callable[[], None]) -> Callable[[], None]:
    """A ``@given`` test under the fuzz profile, run in rounds of at most ``ROUND`` inputs.

    Hypothesis keeps what it drew for the whole of one run (a few hundred bytes to a few
    hundred kilobytes per input), so a million inputs in one run would not fit in memory; a
    fresh run per round keeps it bounded. A run of ``ROUND`` inputs or fewer is the plain
    hypothesis test.
    """
    test = profile()(test)
    rounds = -(-EXAMPLES // ROUND)
    if rounds == 1:
        return test

    def run() -> None:
        for _ in range(rounds):
            test()

    run.__name__, run.__qualname__ = test.__name__, test.__qualname__
    run.__module__, run.__doc__ = test.__module__, test.__doc__
    run.hypothesis = test.hypothesis  # type: ignore[attr-defined]  # the engine's way in
    return run


class Reuse:
    """How many inputs one server scene may serve before a fresh one is built (0: a fresh
    one per input, as under hypothesis; the long run's engine sets more, since building a
    server, its ledger and the other client costs more than most inputs)."""

    inputs = 0
    #: inputs that failed on a reused scene and then passed on a fresh one: an effect of
    #: earlier inputs on the server (counted and reported, not taken as this input's)
    only_after_reuse = 0


class LoggedFailures:
    """Tracebacks that code under test caught and logged (``log.failure``) while active.

    A handler that swallows an exception into the log has still met an input it did not
    expect: the fuzz targets count that as an exception that got out.
    """

    def __init__(self) -> None:
        self.failures: list[str] = []

    def _observe(self, event: LogEvent) -> None:
        failure = event.get("log_failure")
        if failure is not None:
            self.failures.append(f"{formatEvent(event)}\n{failure.getTraceback()}")

    def __enter__(self) -> LoggedFailures:
        globalLogPublisher.addObserver(cast(ILogObserver, self._observe))
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(cast(ILogObserver, self._observe))

    def check(self) -> None:
        assert not self.failures, "a handler logged a traceback:\n" + "\n".join(self.failures)
