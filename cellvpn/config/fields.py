"""The field helper: every config key declares its parser, default and doc in one place.

A section is a frozen dataclass whose fields are made with :func:`option`. The loader, the
defaults and the documented example file all read the same declaration, so they cannot disagree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_META = "cellvpn.config"


class ParseError(ValueError):
    """Raised by a parser for text it rejects; its message, if any, adds detail to "expected"."""


@dataclass(frozen=True)
class Parser(Generic[T]):
    """Turns the text of one key into a typed value, and a typed value back into text.

    ``parse(text, base)`` gets the stripped text and the folder relative paths start from;
    ``expected`` completes the sentence "expected ..." in error messages and the example file.
    """

    parse: Callable[[str, Path], T]
    expected: str
    render: Callable[[T], str] = str


@dataclass(frozen=True)
class Spec(Generic[T]):
    """What the schema knows about one key besides its name and default."""

    parser: Parser[T]
    doc: str


def option(parser: Parser[T], default: T, doc: str) -> T:
    """Declare a key: how to parse it, its default and its one-line doc."""
    return dataclasses.field(default=default, metadata={_META: Spec(parser, doc)})


@dataclass(frozen=True)
class Key:
    """One declared key of a section class."""

    name: str
    default: Any
    spec: Spec[Any]

    @property
    def default_text(self) -> str:
        """The default as it is written in a config file."""
        return self.spec.parser.render(self.default)


def keys(section: type) -> list[Key]:
    """The declared keys of a section class, in declaration order."""
    out = []
    for f in dataclasses.fields(section):
        spec = f.metadata.get(_META)
        if not isinstance(spec, Spec):
            raise TypeError(f"{section.__name__}.{f.name} is not declared with option()")
        out.append(Key(f.name, f.default, spec))
    return out


@dataclass(frozen=True)
class Check:
    """A rule across several keys of one section.

    ``test`` gets the parsed values of ``keys`` in order and returns what is wrong, or None. It
    only runs when each of those keys parsed, so it never sees a bad value.
    """

    keys: tuple[str, ...]
    test: Callable[..., str | None]


def both_or_neither(a: str, b: str) -> Check:
    """Two keys that only make sense together, like a certificate and its private key."""

    def test(x: object, y: object) -> str | None:
        if (x is None) != (y is None):
            return f"expected both {a} and {b}, or neither"
        return None

    return Check((a, b), test)


def at_most_one(a: str, b: str) -> Check:
    """Two keys that are alternatives, like a CA and a certificate pin."""

    def test(x: object, y: object) -> str | None:
        if x is not None and y is not None:
            return f"expected at most one of {a} and {b}"
        return None

    return Check((a, b), test)
