"""A small table-driven state machine.

cellvpn's machines (stream setup, client life, session usage) are each a table of
``(state, input) -> state`` plus the code that reacts to the new state. The table is data, so
every transition can be listed in the docs and tested one by one, and an input that has no
row in the table is a bug that raises at once instead of drifting into an odd state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import Enum
from typing import Generic, TypeVar

S = TypeVar("S", bound=Enum)
I = TypeVar("I", bound=Enum)  # noqa: E741


class InvalidTransitionError(RuntimeError):
    """An input arrived in a state that has no row for it."""


class Machine(Generic[S, I]):
    """The current state of one instance of a transition table."""

    __slots__ = ("_observers", "_state", "name", "table")

    def __init__(self, name: str, initial: S, table: Mapping[tuple[S, I], S]) -> None:
        self.name = name
        self.table = table
        self._state = initial
        self._observers: list[Callable[[S, I, S], None]] = []

    @property
    def state(self) -> S:
        return self._state

    def can(self, event: I) -> bool:
        return (self._state, event) in self.table

    def fire(self, event: I) -> S:
        """Move along the row for ``event``; raise InvalidTransitionError if there is none."""
        old = self._state
        try:
            new = self.table[(old, event)]
        except KeyError:
            raise InvalidTransitionError(
                f"{self.name}: no transition from {old.name} on {event.name}"
            ) from None
        self._state = new
        for observer in self._observers:
            observer(old, event, new)
        return new

    def observe(self, observer: Callable[[S, I, S], None]) -> None:
        """Call ``observer(old, input, new)`` after every transition."""
        self._observers.append(observer)
