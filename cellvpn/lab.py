"""A lab on one machine: network namespaces, veth links and twistd processes.

The tests, ``make demo`` and the benchmarks build their hosts with it.

Everything here stays inside namespaces it creates itself (named ``cvpn-...``), uses only
192.0.2.0/24 for underlays and 198.18.0.0/15 for overlays, and is torn down by PID and by name
in ``close()``, also when a test fails.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: The bin folder of the environment running this code, where twistd and cellvpn-ctl live.
VENV_BIN = Path(sys.executable).parent
_counter = itertools.count()


def run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)


class Namespace:
    """One network namespace with its own resolv.conf; ``close()`` removes all of it."""

    def __init__(self, tag: str, exact: bool = False) -> None:
        self.name = f"cvpn-{tag}" if exact else f"cvpn-{tag}-{os.getpid()}-{next(_counter)}"
        if exact:
            run("ip", "netns", "del", self.name, check=False)  # a leftover of a killed run
        self.etc = Path("/etc/netns") / self.name
        run("ip", "netns", "add", self.name)
        self.etc.mkdir(parents=True, exist_ok=True)
        self.resolv_conf = self.etc / "resolv.conf"
        self.resolv_conf.write_text("# cellvpn test namespace\nnameserver 192.0.2.53\n")
        self.ip("link", "set", "lo", "up")
        self.processes: list[subprocess.Popen[bytes]] = []

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "-n", self.name, *args, check=check)

    def exec(
        self, *cmd: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.name, *cmd, check=check, timeout=timeout)

    def popen(
        self, cmd: Sequence[str], log: Path | None = None, **kw: Any
    ) -> subprocess.Popen[bytes]:
        out: Any = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kw,
        )
        if log:
            out.close()
        self.processes.append(proc)
        return proc

    def sysctl(self, key: str, value: str) -> None:
        self.exec("sysctl", "-qw", f"{key}={value}")

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        pids = run("ip", "netns", "pids", self.name, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        run("ip", "netns", "del", self.name, check=False)
        shutil.rmtree(self.etc, ignore_errors=True)


def link(a: Namespace, a_addr: str, b: Namespace, b_addr: str, name: str = "veth") -> None:
    """A veth pair between two namespaces, created inside them (the host is never touched)."""
    a.ip("link", "add", f"{name}0", "type", "veth", "peer", "name", f"{name}1", "netns", b.name)
    a.ip("addr", "add", a_addr, "dev", f"{name}0")
    b.ip("addr", "add", b_addr, "dev", f"{name}1")
    a.ip("link", "set", f"{name}0", "up")
    b.ip("link", "set", f"{name}1", "up")


def wait_for(
    predicate: Callable[[], Any], timeout: float = 20, interval: float = 0.1, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)


class Twistd:
    """A ``twistd -n --pidfile= <plugin> --config FILE`` process in a namespace, with its log."""

    def __init__(self, ns: Namespace, plugin: str, config: Path, log: Path, *extra: str) -> None:
        self.ns = ns
        self.log = log
        cmd = [str(VENV_BIN / "twistd"), "-n", "--pidfile=", plugin, "--config", str(config)]
        self.proc = ns.popen([*cmd, *extra], log=log)

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            if self.proc.poll() is not None and not re.search(pattern, self.text()):
                raise AssertionError(
                    f"twistd exited ({self.proc.returncode}) before logging {pattern!r}:\n"
                    + self.text()[-3000:]
                )
            return re.search(pattern, self.text())

        try:
            match: re.Match[str] = wait_for(found, timeout, what=f"log line {pattern!r}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- log {self.log}:\n{self.text()[-3000:]}") from None
        return match

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, then wait. twistd re-raises SIGTERM as it exits: -15 is a clean stop too."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        code = self.proc.returncode
        return 0 if code == -signal.SIGTERM else code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def ctl(
    ns: Namespace | None, socket: Path, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``cellvpn-ctl --socket S ARGS`` (inside ``ns`` when given)."""
    cmd = [str(VENV_BIN / "cellvpn-ctl"), "--socket", str(socket), *args]
    if ns is not None:
        return ns.exec(*cmd, check=check)
    return run(*cmd, check=check)


def ctl_json(ns: Namespace | None, socket: Path, *args: str) -> Any:
    return json.loads(ctl(ns, socket, "--json", *args).stdout)
