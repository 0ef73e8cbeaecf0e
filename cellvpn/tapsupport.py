"""What the two twistd plugins share: config overrides and a clean exit on bad input.

twistd prints its whole usage text before a UsageError, and a traceback for anything raised
while it builds or starts the service. cellvpn's users get one line per problem instead: config
errors and start-up errors are printed here and the process exits with status 1. The root
service also owns what only a whole process has: SIGHUP (reload), the log and systemd's
notifications.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, TypeVar, cast

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized

from cellvpn.config import ConfigError
from cellvpn.config.schema import LogLevelName
from cellvpn.errors import StartupError
from cellvpn.logsetup import ServiceLog
from cellvpn.sdnotify import Notifier, reloading_fields

T = TypeVar("T")


class BaseOptions(usage.Options):
    """``--config FILE``, ``--set section.key=value`` and per-plugin shortcuts for common keys.

    A subclass lists its shortcuts as ``(long option, "section.key", help)`` and passes them
    through :func:`shortcut_parameters` into its own ``optParameters``.
    """

    optParameters: ClassVar[list[list[Any]]] = [
        ["config", "c", None, "Config file (INI). Without one, the built-in defaults."],
    ]
    shortcuts: ClassVar[list[tuple[str, str, str]]] = []

    def __init__(self) -> None:
        super().__init__()
        self.overrides: dict[str, str] = {}

    def opt_set(self, value: str) -> None:
        """Override any config key: --set section.key=value (may be repeated)."""
        key, sep, val = value.partition("=")
        if not sep or "." not in key:
            raise usage.UsageError(f"--set expects section.key=value, got {value!r}")
        self.overrides[key.strip().lower()] = val.strip()

    def postOptions(self) -> None:
        for name, key, _doc in self.shortcuts:
            if self[name] is not None:
                self.overrides[key] = self[name]


def shortcut_parameters(shortcuts: list[tuple[str, str, str]]) -> list[list[Any]]:
    """usage.Options parameters for shortcuts: ``--name VALUE`` sets ``section.key``."""
    params: list[list[Any]] = []
    for name, key, doc in shortcuts:
        section, _, option = key.partition(".")
        params.append([name, None, None, f"{doc} ([{section}] {option})."])
    return params


def load_or_exit(loader: Callable[..., T], options: BaseOptions) -> T:
    """Load the config; on errors print one line per problem and exit 1."""
    try:
        return loader(options["config"], options.overrides)
    except ConfigError as e:
        log_warnings(e.warnings)
        for line in e.messages:
            print(f"cellvpn: {line}", file=sys.stderr)
        raise SystemExit(1) from None


class Reloadable(Protocol):
    """A service that applies a config read again while it runs; the lines say what it did."""

    def reload(self, config: Any) -> Deferred[list[str]]: ...


class ExitOnStartupError(MultiService):
    """Root service for twistd and twist: a StartupError becomes one log line and exit status
    1; SIGHUP reads the config again (``load``) and hands it to the service; systemd hears of
    readiness, reloads and the stop when it runs the service with ``Type=notify``.

    ``twist`` never calls ``privilegedStartService``: it is run here, first thing in
    ``startService``, so the TUN, the ports and the control socket are made all the same
    (twist has no ``-u``/``-g``: the service keeps the user it was started as).
    """

    log = Logger()

    def __init__(
        self,
        child: IService,
        load: Callable[[], Any] | None = None,
        service_log: ServiceLog | None = None,
        level_of: Callable[[Any], LogLevelName] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        super().__init__()
        self.child = child
        child.setServiceParent(self)
        if hasattr(child, "on_fatal"):
            child.on_fatal = self.fatal
        self.load = load
        self.service_log = service_log
        self.level_of = level_of
        self.notifier = notifier if notifier is not None else Notifier()
        self._privileged = False
        self._old_hup: Any = None
        self.reloading: Deferred[None] | None = None

    def setServiceParent(self, parent: Any) -> None:
        """Under twistd ``parent`` is the application: it takes our log observer, if any."""
        if self.service_log is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.service_log.observer)
        super().setServiceParent(parent)

    def fatal(self, why: str) -> None:
        """A failure after start (e.g. the TUN cannot be configured): log, stop, exit 1."""
        from twisted.internet import reactor

        self.log.critical("cellvpn cannot go on: {why}", why=why)
        # twistd has no exit status of its own after a clean reactor stop; leave with 1 once
        # the shutdown (services stopped, devices closed) is done.
        reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)  # type: ignore[attr-defined]
        if reactor.running:  # type: ignore[attr-defined]
            reactor.stop()  # type: ignore[attr-defined]
        else:  # twist starts the service before it runs the reactor
            reactor.callWhenRunning(reactor.stop)  # type: ignore[attr-defined]

    def privilegedStartService(self) -> None:
        self._privileged = True
        try:
            super().privilegedStartService()
        except StartupError as e:
            self.log.critical("cellvpn cannot start: {why}", why=str(e))
            raise SystemExit(1) from None

    def startService(self) -> None:
        if not self._privileged:  # twist: a failure ends the process through fatal()
            self._privileged = True
            try:
                MultiService.privilegedStartService(self)
            except StartupError as e:
                self.fatal(f"cannot start: {e}")
                return
        try:
            super().startService()
        except StartupError as e:
            self.log.critical("cellvpn cannot start: {why}", why=str(e))
            raise SystemExit(1) from None
        if self.load is not None:
            self._old_hup = signal.signal(signal.SIGHUP, self._on_hup)
        self._notify(READY=1, STATUS="running")

    def stopService(self) -> Any:
        self._notify(STOPPING=1)
        if self._old_hup is not None:
            signal.signal(signal.SIGHUP, self._old_hup)
            self._old_hup = None
        return super().stopService()

    def _on_hup(self, signum: int, frame: Any) -> None:
        from twisted.internet import reactor

        reactor.callFromThread(self.reload)  # type: ignore[attr-defined]

    def reload(self) -> Deferred[None]:
        """Read the config again and apply what can change; a bad file changes nothing."""
        if self.reloading is not None:
            self.log.warn("reload: one is under way already; this one is skipped")
            return self.reloading
        self._notify(**reloading_fields())
        assert self.load is not None
        try:
            config = self.load()
        except ConfigError as e:
            for line in e.messages:
                self.log.error("reload refused, the running config stays: {line}", line=line)
            self._notify(READY=1, STATUS="running (the last reload was refused)")
            return succeed(None)
        for line in config.warnings:
            self.log.warn("reload: warning: {line}", line=line)
        if self.service_log is not None:
            self.service_log.reopen()
            if self.level_of is not None:
                self.service_log.set_level(self.level_of(config))
        child = cast(Reloadable, self.child)
        d: Deferred[Any] = maybeDeferred(child.reload, config)

        def said(lines: list[str]) -> None:
            for line in lines:
                self.log.info("{line}", line=line)

        def done(_: object) -> None:
            self.reloading = None
            self._notify(READY=1, STATUS="running")

        d.addCallback(said)
        d.addErrback(lambda f: self.log.failure("reload failed", f))
        d.addBoth(done)
        if d.called:
            return succeed(None)
        self.reloading = d
        return d

    def _notify(self, **fields: str | int) -> None:
        if not self.notifier.notify(**fields) and self.notifier.last_error:
            self.log.warn("{why}", why=self.notifier.last_error)
            self.notifier.last_error = None


def log_warnings(warnings: Any) -> None:
    for line in warnings:
        print(f"cellvpn: warning: {line}", file=sys.stderr)
