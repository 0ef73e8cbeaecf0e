"""``cellvpn-ctl config check FILE``: validate a config file without starting anything.

Like ``sshd -t``: an operator checks an edited file before a restart or a SIGHUP, so a typo
never takes a running service down. The file is loaded exactly as the service loads it (every
bad key is one line), and the files it names that the service reads at start must be there.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from cellvpn.cli.control import CtlError
from cellvpn.config import ClientConfig, ConfigError, ServerConfig
from cellvpn.config.loader import load_client_config, load_server_config

_CLIENT_SECTION = re.compile(r"^\s*\[\s*client\s*\]", re.MULTILINE)


def kind_of(path: Path) -> str:
    """``client`` for a file with a ``[client]`` section, else ``server``."""
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as e:
        raise CtlError(f"{path}: cannot read the file: {e.strerror or e}", 1) from None
    return "client" if _CLIENT_SECTION.search(text) else "server"


def files_read_at_start(config: ServerConfig | ClientConfig) -> list[tuple[str, Path]]:
    """The ``[section] key`` and path of every file the service opens at start."""
    named: list[tuple[str, object]] = []
    if isinstance(config, ServerConfig):
        tls = config.tls
        named += [("[tls] certificate", tls.certificate), ("[tls] private_key", tls.private_key)]
        named += [("[tls] client_ca", tls.client_ca)]
    else:
        c = config.client
        named += [("[client] ca", c.ca), ("[client] certificate", c.certificate)]
        named += [("[client] private_key", c.private_key)]
    # PEM text written into the file itself is no file to look for
    return [(what, path) for what, path in named if isinstance(path, Path)]


def check(path: Path, kind: str | None) -> tuple[str, list[str], list[str]]:
    """The kind checked, its warnings and its errors (no errors: the service would start)."""
    kind = kind or kind_of(path)
    loader = load_client_config if kind == "client" else load_server_config
    try:
        config: ServerConfig | ClientConfig = loader(path)
    except ConfigError as e:
        return kind, list(e.warnings), list(e.messages)
    errors = []
    c = config.client if isinstance(config, ClientConfig) else None
    if c is not None and c.ca is None and c.fingerprint is None and c.server_key is None:
        errors.append(
            f"{path}: [client] needs ca (the server's CA certificate), server_key (its key's"
            " SHA-256) or fingerprint (its certificate's SHA-256) to trust the server"
        )
    for what, named in files_read_at_start(config):
        if not named.is_file():
            errors.append(f"{path}: {what} = {named}: no such file")
    return kind, list(config.warnings), errors


def _config_check(ns: argparse.Namespace) -> int:
    path = Path(ns.file)
    kind, warnings, errors = check(path, ns.kind)
    if getattr(ns, "json", False):
        result: dict[str, Any] = {
            "file": str(path),
            "kind": kind,
            "ok": not errors,
            "errors": errors,
            "warnings": warnings,
        }
        print(json.dumps(result, indent=2, sort_keys=True))
        return 1 if errors else 0
    for line in warnings:
        print(f"cellvpn-ctl: warning: {line}", file=sys.stderr)
    if errors:
        for line in errors:
            print(f"cellvpn-ctl: {line}", file=sys.stderr)
        return 1
    print(f"config OK: {path} ({kind})")
    return 0


def add_config_commands(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Register ``config check`` on cellvpn-ctl's sub-command parsers."""
    p = subparsers.add_parser("config", help="check a config file", parents=[common])
    actions = p.add_subparsers(dest="config_action", metavar="ACTION", required=True)
    c = actions.add_parser(
        "check",
        help="validate a config file without starting anything (exit 0: it would load)",
        parents=[common],
    )
    c.add_argument("file", metavar="FILE", help="the server's or the client's config file")
    c.add_argument(
        "--kind",
        choices=["server", "client"],
        help="whose config it is; default: client if it has a [client] section, else server",
    )
    c.set_defaults(handler=_config_check)
