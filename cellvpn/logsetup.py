"""cellvpn's log under twistd: text or JSON lines, filtered by level, to twistd's log file.

twistd takes the application's ``ILogObserver`` component instead of making its own, so the
plugin hands it one built here from ``log_format`` and ``log_level``, writing where twistd
would have (``-l FILE``, stdout with ``-n``, ``twistd.log`` for a daemon). With ``--syslog``
or ``--logger`` twistd keeps its own. The level can change while running (a reload).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Mapping
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    LogLevel,
    PredicateResult,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile
from zope.interface import implementer

from cellvpn.config.schema import LogFormat, LogLevelName

LEVELS: Mapping[LogLevelName, LogLevel] = {
    LogLevelName.DEBUG: LogLevel.debug,
    LogLevelName.INFO: LogLevel.info,
    LogLevelName.WARN: LogLevel.warn,
    LogLevelName.ERROR: LogLevel.error,
    LogLevelName.CRITICAL: LogLevel.critical,
}


@implementer(ILogFilterPredicate)
class AtLeast:
    """Drops events below ``level``; an event without a level (print to stdout under twistd
    has one, some legacy ones may not) is kept, unlike LogLevelFilterPredicate."""

    def __init__(self, level: LogLevel) -> None:
        self.level = level

    def __call__(self, event: LogEvent) -> Any:
        level = event.get("log_level")
        if level is not None and level < self.level:
            return PredicateResult.no
        return PredicateResult.maybe


class ServiceLog:
    """The observer twistd uses, and the knobs a reload turns."""

    def __init__(
        self, out: IO[Any], fmt: LogFormat, level: LogLevelName, logfile: LogFile | None = None
    ) -> None:
        self.format = fmt
        self.logfile = logfile
        self.predicate = AtLeast(LEVELS[level])
        inner = jsonFileLogObserver(out) if fmt is LogFormat.JSON else textFileLogObserver(out)
        self.observer: ILogObserver = FilteringLogObserver(inner, [self.predicate])

    def set_level(self, level: LogLevelName) -> None:
        self.predicate.level = LEVELS[level]

    def reopen(self) -> None:
        """Open the log file again by its name (after logrotate moved it)."""
        if self.logfile is not None:
            self.logfile.reopen()


def twistd_log(parent: Any, fmt: LogFormat, level: LogLevelName) -> ServiceLog | None:
    """The log for a service run by twistd with these (twistd's own) options; None when twistd
    should keep its own (syslog, a ``--logger``, or not twistd at all)."""
    from twisted.application.app import ServerOptions

    if not isinstance(parent, ServerOptions):
        return None
    if parent.get("syslog") or parent.get("logger"):
        return None
    name = parent.get("logfile")
    if name == "-" or (parent.get("nodaemon") and not name):
        return ServiceLog(sys.stdout, fmt, level)
    logfile = LogFile.fromFullPath(name or "twistd.log")
    _rotate_on_usr1(logfile)
    return ServiceLog(logfile, fmt, level, logfile)


def _rotate_on_usr1(logfile: LogFile) -> None:
    """What twistd does for its own log file: SIGUSR1 rotates it."""
    if signal.getsignal(signal.SIGUSR1) not in (None, signal.SIG_DFL):
        return

    def rotate(signum: int, frame: Any) -> None:
        from twisted.internet import reactor

        reactor.callFromThread(logfile.rotate)  # type: ignore[attr-defined]

    signal.signal(signal.SIGUSR1, rotate)
