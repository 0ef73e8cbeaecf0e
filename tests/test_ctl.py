"""cellvpn-ctl as a user runs it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cellvpn import __version__
from cellvpn.lab import VENV_BIN


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "cellvpn-ctl"), *args], capture_output=True, text=True, timeout=60
    )


def test_version() -> None:
    """--version prints the package version."""
    done = ctl("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"cellvpn {__version__}"


def test_missing_socket_is_one_clear_line(tmp_path: Path) -> None:
    """No service behind the socket: one line naming it, exit status 2, no traceback."""
    done = ctl("--socket", str(tmp_path / "none.sock"), "status")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"cellvpn-ctl: cannot reach the cellvpn service at {tmp_path}/none.sock: no such socket "
        "(is it running? --socket names another socket)"
    ]


def test_dead_socket_is_one_clear_line(tmp_path: Path) -> None:
    """A socket file with nobody listening: one line, exit status 2."""
    import socket

    path = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    done = ctl("--socket", str(path), "status")
    assert done.returncode == 2
    assert "nothing is listening there" in done.stderr
    assert "Traceback" not in done.stderr
