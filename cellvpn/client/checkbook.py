"""``vpn_client check result``: the servers a client knows, and what their last check said.

The last check of each server is kept in ``state_dir/checks.json`` (written whole to a new
file and renamed over the old one, on a worker thread, one write at a time), so the answer
outlives a restart. Which servers are listed comes from :func:`configured_servers`: today the
``[client] server``; a list of servers or of orders plugs in there.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from cellvpn.config import ClientConfig

RESULTS_FILE = "checks.json"

AVAILABLE = "Available"
NOT_AVAILABLE = "Not available"
UNKNOWN = "Unknown"

#: Figures kept of each check (the rest of its answer is not needed to judge a server again).
KEPT = (
    "code",
    "reason",
    "connect_ms",
    "tls_ms",
    "setup_ms",
    "rtt_min_ms",
    "rtt_avg_ms",
    "rtt_max_ms",
    "sent_bytes",
    "received_bytes",
    "upload_bytes_per_second",
    "download_bytes_per_second",
)
#: Servers whose last check is kept; past it the oldest checks are forgotten.
MAX_KEPT = 64


def server_text(host: str, port: int) -> str:
    """``host:port``, an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def configured_servers(config: ClientConfig) -> list[str]:
    """The servers this client is set up to use, as ``host:port``."""
    server = config.client.server
    return [server_text(server.host, server.port)] if server is not None else []


def availability(entry: Mapping[str, Any] | None) -> str:
    """A server's state from its last check: answered, not reached or silent, never checked."""
    if entry is None:
        return UNKNOWN
    return AVAILABLE if entry.get("code") == 0 else NOT_AVAILABLE


def result_rows(
    configured: list[str], checked: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The configured servers first, in their order, then the others checked, newest first."""
    others = sorted(
        (s for s in checked if s not in configured),
        key=lambda s: -float(checked[s].get("checked_at", 0)),
    )
    rows = []
    for server in [*configured, *others]:
        entry = checked.get(server)
        rows.append(
            {
                "server": server,
                "configured": server in configured,
                "state": availability(entry),
                **({k: entry.get(k) for k in ("checked_at", *KEPT)} if entry else {}),
            }
        )
    return rows


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with suppress(FileNotFoundError):
            os.unlink(tmp)


def _read(path: Path) -> dict[str, dict[str, Any]]:
    """The results saved; a missing or damaged file is no results (they are only figures)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    servers = value.get("servers") if isinstance(value, dict) else None
    if not isinstance(servers, dict):
        return {}
    return {k: v for k, v in servers.items() if isinstance(k, str) and isinstance(v, dict)}


class CheckBook:
    """The last check of each server, in memory and in ``state_dir/checks.json``."""

    def __init__(self, state_dir: Path, reactor: Any) -> None:
        self.path = state_dir / RESULTS_FILE
        self.reactor = reactor
        self._results: dict[str, dict[str, Any]] | None = None
        self._lock = defer.DeferredLock()

    def _thread(self, work: Any, *args: Any) -> defer.Deferred[Any]:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), work, *args)

    async def results(self) -> dict[str, dict[str, Any]]:
        if self._results is None:
            loaded = await self._thread(_read, self.path)
            if self._results is None:
                self._results = loaded
        return self._results

    async def record(self, server: str, facts: Mapping[str, Any], at: float) -> None:
        """Keep the figures of a check just made (a bad-parameter one says nothing: skip it)."""
        results = await self.results()
        results[server] = {"checked_at": at, **{k: facts.get(k) for k in KEPT}}
        others = sorted(results, key=lambda s: -float(results[s].get("checked_at", 0)))
        for stale in others[MAX_KEPT:]:
            del results[stale]
        data = json.dumps({"servers": results}, indent=1, sort_keys=True).encode()
        state_dir = self.path.parent

        def write() -> None:
            state_dir.mkdir(parents=True, exist_ok=True)
            _write(self.path, data)

        await self._lock.run(self._thread, write)
