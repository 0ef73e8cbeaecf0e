"""Reading a config file and command-line overrides into a validated, typed config.

Every value is parsed at load and every problem is collected, so a bad file fails at start with
one line per bad key instead of one restart per typo, or a misread value later. Unknown sections
and keys only warn, with the closest known name, so a config written for a newer cellvpn still
loads.
"""

from __future__ import annotations

import configparser
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from cellvpn.config.errors import ConfigError
from cellvpn.config.fields import ParseError, keys
from cellvpn.config.schema import ClientConfig, ServerConfig, sections

C = TypeVar("C", ServerConfig, ClientConfig)

COMMAND_LINE = "command line"
_NO_OVERRIDES: Mapping[str, str] = MappingProxyType({})
# configparser copies its default section into every other one; no header can name "" so
# [DEFAULT] is an ordinary (unknown) section here.
_NO_DEFAULT_SECTION = ""


def load_server_config(
    path: str | Path | None, overrides: Mapping[str, str] = _NO_OVERRIDES
) -> ServerConfig:
    """Load the server's config file (None: the built-in defaults), then apply overrides.

    ``overrides`` maps ``"section.key"`` to text, as given on the command line; it is validated
    like the file. Raises :class:`ConfigError` listing every problem.
    """
    return _load(ServerConfig, path, overrides)


def load_client_config(
    path: str | Path | None, overrides: Mapping[str, str] = _NO_OVERRIDES
) -> ClientConfig:
    """Load the client's config file (None: the built-in defaults), then apply overrides.

    ``overrides`` maps ``"section.key"`` to text, as given on the command line; it is validated
    like the file. Raises :class:`ConfigError` listing every problem.
    """
    return _load(ClientConfig, path, overrides)


@dataclass(frozen=True)
class _Given:
    """A value as written: its text, who gave it, and where its relative paths start."""

    text: str
    origin: str
    base: Path


def _load(kind: type[C], path: str | Path | None, overrides: Mapping[str, str]) -> C:
    schema = sections(kind)
    known = {name: {key.name for key in keys(cls)} for name, cls in schema.items()}
    given: dict[tuple[str, str], _Given] = {}
    warnings: list[str] = []
    errors: list[str] = []
    source = None
    if path is not None:
        source = Path(path).absolute()
        label = str(path)
        for section, items in _read_file(Path(path), label).items():
            for key, text in _known_items(label, section, items, known, warnings):
                given[section, key] = _Given(text, label, source.parent)
    cwd = Path.cwd()
    for name, text in overrides.items():
        section, _, option = name.partition(".")
        if not (section and option):
            errors.append(f"{COMMAND_LINE}: option {name!r} is not of the form section.key")
            continue
        items = {option.lower(): text.strip()}
        for key, value in _known_items(COMMAND_LINE, section, items, known, warnings):
            given[section, key] = _Given(value, COMMAND_LINE, cwd)

    values = {name: _section_values(name, cls, given, errors) for name, cls in schema.items()}
    if errors:
        raise ConfigError(errors, warnings)
    built = {name: cls(**values[name]) for name, cls in schema.items()}
    return kind(source=source, warnings=tuple(warnings), **built)


def _read_file(path: Path, label: str) -> dict[str, dict[str, str]]:
    """The sections and keys of an INI file, or a ConfigError saying why it is not one."""
    parser = configparser.ConfigParser(
        interpolation=None,
        delimiters=("=",),
        inline_comment_prefixes=("#",),
        empty_lines_in_values=False,
        default_section=_NO_DEFAULT_SECTION,
        strict=True,
    )
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte order mark is not a key
    except OSError as e:
        raise ConfigError([f"{label}: cannot read the file: {e.strerror or e}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{label}: not a UTF-8 text file"]) from None
    lines = text.split("\n")  # as configparser counts them
    try:
        parser.read_string(text, source=label)
    except configparser.MissingSectionHeaderError as e:
        message = f"{label}, line {e.lineno}: expected a [section] line before {e.line.strip()!r}"
        raise ConfigError([message]) from None
    except configparser.ParsingError as e:
        raise ConfigError(
            f"{label}, line {lineno}: expected 'key = value', found {lines[lineno - 1].strip()!r}"
            for lineno, _ in e.errors
        ) from None
    except configparser.DuplicateSectionError as e:
        message = f"{label}, line {e.lineno}: section [{e.section}] appears twice"
        raise ConfigError([message]) from None
    except configparser.DuplicateOptionError as e:
        message = f"{label}, line {e.lineno}: [{e.section}] {e.option} appears twice"
        raise ConfigError([message]) from None
    except configparser.Error as e:
        raise ConfigError([f"{label}: not a valid INI file: {e.message}"]) from None
    return {s: dict(parser.items(s, raw=True)) for s in parser.sections()}


def _known_items(
    origin: str,
    section: str,
    items: Mapping[str, str],
    known: Mapping[str, set[str]],
    warnings: list[str],
) -> list[tuple[str, str]]:
    """The items of a section that the schema knows; a warning for each one it does not."""
    if section not in known:
        match = difflib.get_close_matches(section.lower(), list(known), n=1)
        hint = f" (did you mean [{match[0]}]?)" if match else ""
        warnings.append(f"{origin}: unknown section [{section}]{hint}")
        return []
    out = []
    for key, text in items.items():
        if key in known[section]:
            out.append((key, text))
            continue
        elsewhere = [s for s, names in known.items() if key in names]
        if elsewhere:
            hint = f" (did you mean [{elsewhere[0]}] {key}?)"
        else:
            match = difflib.get_close_matches(key, sorted(known[section]), n=1)
            hint = f" (did you mean {match[0]!r}?)" if match else ""
        warnings.append(f"{origin}: [{section}] unknown key {key!r}{hint}")
    return out


def _show(text: str) -> str:
    """A value as it appears in a message: quoted only when it would be invisible or ambiguous."""
    if text == "" or text != text.strip() or not text.isprintable():
        return repr(text)
    return text


def _section_values(
    section: str, cls: type, given: Mapping[tuple[str, str], _Given], errors: list[str]
) -> dict[str, Any]:
    """Parse one section's given values over its defaults; append a message per problem."""
    values: dict[str, Any] = {}
    shown: dict[str, str] = {}
    origins: dict[str, str] = {}
    bad = set()
    for key in keys(cls):
        g = given.get((section, key.name))
        if g is None:
            values[key.name] = key.default
            shown[key.name] = key.default_text
            continue
        shown[key.name] = g.text
        origins[key.name] = g.origin
        parser = key.spec.parser
        try:
            values[key.name] = parser.parse(g.text, g.base)
        except ParseError as e:
            detail = f" ({e})" if str(e) else ""
            errors.append(
                f"{g.origin}: [{section}] {key.name} = {_show(g.text)}: "
                f"expected {parser.expected}{detail}"
            )
            bad.add(key.name)
    for check in getattr(cls, "checks", ()):
        if bad.intersection(check.keys):
            continue
        problem = check.test(*(values[k] for k in check.keys))
        if problem:
            where = " and ".join(dict.fromkeys(origins[k] for k in check.keys if k in origins))
            pairs = ", ".join(f"{k} = {_show(shown[k])}" for k in check.keys)
            errors.append(f"{where or 'defaults'}: [{section}] {pairs}: {problem}")
    return values
