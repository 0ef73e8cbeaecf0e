"""The shipped example files: generated from the schema, complete, and loadable."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cellvpn.config import (
    ClientConfig,
    ServerConfig,
    describe_keys,
    load_client_config,
    load_server_config,
    render_example,
)
from cellvpn.config.fields import keys
from cellvpn.config.schema import KINDS, sections

TAP_CONFIGS = Path(__file__).resolve().parents[2] / "tap-configs"
KEY_LINE = re.compile(r"^#(?=[a-z_]+ =)", re.MULTILINE)


def uncomment(text: str) -> str:
    """Turn every commented-out key line into a set key; doc comments stay comments."""
    return KEY_LINE.sub("", text)


@pytest.mark.parametrize("kind", ["server", "client"])
def test_shipped_file_is_rendered_text(kind: str) -> None:
    """tap-configs/<kind>.cfg is exactly what render_example gives (python -m cellvpn.config)."""
    shipped = (TAP_CONFIGS / f"{kind}.cfg").read_text(encoding="utf-8")
    assert shipped == render_example(kind), f"regenerate: python -m cellvpn.config {kind}"


def documented(text: str) -> dict[tuple[str, str], tuple[str, str]]:
    """Each commented-out key of an example file: (section, key) -> (default, comment above)."""
    found = {}
    section, comment = "", list[str]()
    for line in text.splitlines():
        if m := re.fullmatch(r"\[(\w+)\]", line):
            section = m.group(1)
        elif m := re.fullmatch(r"#([a-z0-9_]+) =(?: (.*))?", line):
            found[section, m.group(1)] = (m.group(2) or "", " ".join(comment))
        if line.startswith("# "):
            comment.append(line[2:])
        else:
            comment = []
    return found


@pytest.mark.parametrize("kind", ["server", "client"])
def test_every_key_documented_with_default(kind: str) -> None:
    """Each key appears commented out with its default, its doc and expected value above it."""
    text = render_example(kind)
    found = documented(text)
    infos = describe_keys(kind)
    assert len(found) == len(infos)
    for info in infos:
        default, comment = found[info.section, info.key]
        assert default == info.default
        assert comment == f"{info.doc} Value: {info.expected}."
    assert all(len(line) <= 100 for line in text.splitlines())


def test_example_server_shows_pool() -> None:
    """The server example shows the address pool of the original node's template."""
    text = render_example("server")
    assert "#network_address = 10.11.12.0\n" in text
    assert "#network_mask = 255.255.255.0\n" in text


@pytest.mark.parametrize(
    ("kind", "load", "defaults"),
    [
        ("server", load_server_config, ServerConfig()),
        ("client", load_client_config, ClientConfig()),
    ],
)
def test_uncommented_example_loads_as_defaults(
    tmp_path: Path, kind: str, load: Callable[[Path], Any], defaults: object
) -> None:
    """With every key uncommented, the shipped file loads cleanly and equals the defaults."""
    text = uncomment((TAP_CONFIGS / f"{kind}.cfg").read_text(encoding="utf-8"))
    assert text.count("\n#") < render_example(kind).count("\n#")
    path = tmp_path / f"{kind}.cfg"
    path.write_text(text, encoding="utf-8")
    config = load(path)
    assert config.warnings == ()
    assert dataclasses.replace(config, source=None) == defaults


def test_describe_keys_matches_schema() -> None:
    """describe_keys lists every declared key of every section, in order."""
    for kind, config in KINDS.items():
        expected = [(s, k.name) for s, cls in sections(config).items() for k in keys(cls)]
        assert [(i.section, i.key) for i in describe_keys(kind)] == expected


def test_unknown_kind() -> None:
    """Asking for a kind that does not exist is a ValueError."""
    with pytest.raises(ValueError, match="unknown config kind"):
        render_example("relay")


@pytest.mark.parametrize("kind", ["server", "client"])
def test_defaults_round_trip(kind: str) -> None:
    """Every default, rendered as text, parses back to itself."""
    for cls in sections(KINDS[kind]).values():
        for key in keys(cls):
            assert key.spec.parser.parse(key.default_text, Path("/")) == key.default, key.name


def test_main_prints_example() -> None:
    """python -m cellvpn.config prints the example, and refuses unknown kinds."""
    run = subprocess.run(
        [sys.executable, "-m", "cellvpn.config", "client"], capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stdout == render_example("client") and run.stderr == ""
    run = subprocess.run([sys.executable, "-m", "cellvpn.config"], capture_output=True, text=True)
    assert run.returncode == 2
