"""What a reload (SIGHUP) can change in a running service, decided without touching it.

A service lists the keys it can apply while running; :func:`plan_reload` compares the running
config with the one just read and gives the config to run with (the running one, with every
changed key that can be applied taken from the new one) and the changed keys on each side, so
the service logs what it applied and what waits for a restart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cellvpn.config.schema import ClientConfig, ServerConfig, sections

C = TypeVar("C", ServerConfig, ClientConfig)


@dataclass(frozen=True)
class ReloadPlan(Generic[C]):
    """The config to run with, and the changed keys (``[section] key``) on each side."""

    config: C
    applied: tuple[str, ...]
    needs_restart: tuple[str, ...]

    def changed(self, section: str) -> bool:
        """Whether a key of ``section`` is among those applied."""
        return any(key.startswith(f"[{section}] ") for key in self.applied)


def plan_reload(running: C, new: C, reloadable: Mapping[str, Collection[str]]) -> ReloadPlan[C]:
    """Compare ``running`` with ``new`` key by key; ``reloadable`` maps a section to the keys
    that may change while running."""
    applied: list[str] = []
    needs_restart: list[str] = []
    merged: dict[str, Any] = {}
    for name in sections(type(running)):
        old_section = getattr(running, name)
        new_section = getattr(new, name)
        take: dict[str, Any] = {}
        for f in dataclasses.fields(old_section):
            before, after = getattr(old_section, f.name), getattr(new_section, f.name)
            if before == after:
                continue
            key = f"[{name}] {f.name}"
            if f.name in reloadable.get(name, ()):
                take[f.name] = after
                applied.append(key)
            else:
                needs_restart.append(key)
        if take:
            merged[name] = dataclasses.replace(old_section, **take)
    config = dataclasses.replace(running, warnings=new.warnings, **merged)
    return ReloadPlan(config, tuple(applied), tuple(needs_restart))


def describe(plan: ReloadPlan[Any]) -> list[str]:
    """The lines a service logs after a reload."""
    if not plan.applied and not plan.needs_restart:
        return ["reload: nothing changed"]
    lines = []
    if plan.applied:
        lines.append("reload: applied " + ", ".join(plan.applied))
    if plan.needs_restart:
        lines.append("reload: not applied (needs a restart): " + ", ".join(plan.needs_restart))
    return lines
