"""What the two twistd plugins share: config overrides and a clean exit on bad input.

twistd prints its whole usage text before a UsageError, and a traceback for anything raised
while it builds or starts the service. cellvpn's users get one line per problem instead: config
errors and start-up errors are printed here and the process exits with status 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from twisted.application.service import IService, MultiService
from twisted.logger import Logger
from twisted.python import usage

from cellvpn.config import ConfigError
from cellvpn.errors import StartupError

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


class ExitOnStartupError(MultiService):
    """Root service for twistd: a StartupError becomes one log line and exit status 1."""

    log = Logger()

    def __init__(self, child: IService) -> None:
        super().__init__()
        self.child = child
        child.setServiceParent(self)
        if hasattr(child, "on_fatal"):
            child.on_fatal = self.fatal

    def fatal(self, why: str) -> None:
        """A failure after start (e.g. the TUN cannot be configured): log, stop, exit 1."""
        from twisted.internet import reactor

        self.log.critical("cellvpn cannot go on: {why}", why=why)
        # twistd has no exit status of its own after a clean reactor stop; leave with 1 once
        # the shutdown (services stopped, devices closed) is done.
        reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)  # type: ignore[attr-defined]
        if reactor.running:  # type: ignore[attr-defined]
            reactor.stop()  # type: ignore[attr-defined]

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except StartupError as e:
            self.log.critical("cellvpn cannot start: {why}", why=str(e))
            raise SystemExit(1) from None

    def startService(self) -> None:
        try:
            super().startService()
        except StartupError as e:
            self.log.critical("cellvpn cannot start: {why}", why=str(e))
            raise SystemExit(1) from None


def log_warnings(warnings: Any) -> None:
    for line in warnings:
        print(f"cellvpn: warning: {line}", file=sys.stderr)
