"""Small helpers shared by the namespace tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from cellvpn.lab import Namespace, wait_for

HERE = Path(__file__).resolve().parent
TCPTOOL = str(HERE / "tcptool.py")
PROBE = str(HERE / "probe.py")


def background(ns: Namespace, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """Run tcptool in ``ns`` in the background; wait until it listens if it is a server."""
    proc = ns.popen([sys.executable, TCPTOOL, *args], log=log)
    if args[0] in ("sink", "source", "echo"):
        wait_for(lambda: "listening" in log.read_text(), timeout=10, what=f"tcptool {args[0]}")
    return proc


def tool(ns: Namespace, *args: str, timeout: float = 120) -> dict[str, Any]:
    out = ns.exec(sys.executable, TCPTOOL, *args, timeout=timeout).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def last_json(proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> dict[str, Any]:
    proc.wait(timeout=timeout)
    result: dict[str, Any] = json.loads(log.read_text().strip().splitlines()[-1])
    return result


def ping(ns: Namespace, target: str, count: int = 3) -> bool:
    done = ns.exec("ping", "-c", str(count), "-i", "0.2", "-W", "2", target, check=False)
    return done.returncode == 0
