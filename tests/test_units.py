"""The systemd units in tap-configs: ``systemd-analyze verify`` finds nothing to say about them
(with their /opt/cellvpn paths pointed at this environment), and they ask for what the
services do: readiness by notification, reload by SIGHUP, restart on failure."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from cellvpn.lab import VENV_BIN

UNITS = Path(__file__).resolve().parent.parent / "tap-configs"
NAMES = ("cellvpn.service", "cellvpn-client.service")


def keys(name: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    for name in NAMES:
        text = (UNITS / name).read_text().replace("/opt/cellvpn/bin", str(VENV_BIN))
        (tmp_path / name).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / n) for n in NAMES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    ours = [line for line in (done.stdout + done.stderr).splitlines() if "cellvpn" in line]
    assert done.returncode == 0 and ours == [], done.stderr


@pytest.mark.parametrize("name", NAMES)
def test_notify_reload_and_restart(name: str) -> None:
    k = keys(name)
    assert k["Type"] == ["notify"] and k["Restart"] == ["on-failure"]
    assert k["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert "--nodaemon --pidfile=" in k["ExecStart"][0]
    assert k["ExecStartPre"][0].endswith(".cfg") and " config check " in k["ExecStartPre"][0]


def test_the_server_drops_root_and_the_client_keeps_net_admin() -> None:
    server, client = keys("cellvpn.service"), keys("cellvpn-client.service")
    assert " -u cellvpn -g cellvpn cellvpn " in server["ExecStart"][0]
    assert "AmbientCapabilities" not in server
    assert client["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
