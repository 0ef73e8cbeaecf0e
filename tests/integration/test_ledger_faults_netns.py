"""The ledger's disk full under a running paid server, and a read-only ledger at start
(real processes).

The server's state_dir, with the ledger in it, is a small tmpfs the test mounts (and always
unmounts), filled to the last byte while one client is paying. A file system cannot be made
read-only under files open for writing (the kernel refuses the remount), so the read-only
ledger is one on a tmpfs remounted read-only before the server starts.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cellvpn.billing.sqlite import SqliteLedger
from cellvpn.lab import NET_HOST_IP, VENV_BIN, VpnLab, ctl_json, wait_for
from tests.conftest import require_root
from tests.integration.helpers import billing_section, ping, wallet, wallet_section

MB = 1024 * 1024
BILLING = billing_section(1000, "B", 4 * MB, "receipt_timeout = 3\nsave_interval = 1\n")


@contextmanager
def small_disk(path: Path, size: str = "16m") -> Iterator[Path]:
    """A tmpfs at ``path`` for the test's life, unmounted also when the test fails."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "cvpn-ledger", str(path)],
        check=True,
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Write zeros into ``path/filler`` until the disk says it is full."""
    filler = path / "filler"
    block = bytes(64 * 1024)
    with open(filler, "wb", buffering=0) as f:
        while True:
            try:
                f.write(block)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                break
    # the last partial block too: nothing is left for the ledger's journal
    with open(path / "filler-tail", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0")
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return filler


def status(lab: VpnLab, ns: Any, name: str) -> dict[str, Any]:
    result: dict[str, Any] = ctl_json(ns, lab.socket(name), "status")
    return result


def test_a_full_disk_refuses_new_payers_and_keeps_running_ones(netns: Any, tmp_path: Path) -> None:
    """While the ledger's disk is full: a new paying client is refused with NO_LEDGER (a
    clear line on both sides) and retries; the client already paying keeps its tunnel. Once
    there is room again the new client pays and is served; nothing is half-written."""
    with small_disk(tmp_path / "state") as state:
        lab = VpnLab(netns, tmp_path)
        first_host = lab.add_client_host()
        second_host = lab.add_client_host()
        lab.start_server(extra=BILLING)
        assert lab.server is not None
        key1, _ = wallet(tmp_path, "client", 1_000_000)
        key2, _ = wallet(tmp_path, "client2", 1_000_000)
        lab.start_client(first_host, "client", extra=wallet_section(key1, 500_000))
        assert status(lab, first_host, "client")["billing"]["receipts_signed"] >= 1

        fill(state)
        lab.start_client(
            second_host,
            "client2",
            section_extra="default_route = false\n",
            extra=wallet_section(key2, 500_000),
            wait=False,
        )
        lab.server.wait_log(r"service refused \(NO_LEDGER\): .*ledger unavailable", timeout=30)
        seen = wait_for(
            lambda: (s := status(lab, second_host, "client2"))["last_error"] and s,
            timeout=30,
            what="the second client's error",
        )
        assert "NO_LEDGER" in seen["last_error"], seen
        retrying = wait_for(
            lambda: status(lab, second_host, "client2")["retrying_in"] is not None,
            timeout=10,
            what="the second client to say it tries again",
        )
        assert retrying
        # the paying client's tunnel carries on meanwhile
        assert ping(first_host, NET_HOST_IP)
        assert status(lab, first_host, "client")["status"] == "STARTED"

        os.unlink(state / "filler")
        os.unlink(state / "filler-tail")
        cleared = time.monotonic()
        wait_for(
            lambda: status(lab, second_host, "client2")["status"] == "STARTED",
            timeout=90,
            what="the second client to pay once the ledger can be written",
        )
        print(f"disk full: second client served {time.monotonic() - cleared:.1f} s after the fix")
        assert status(lab, second_host, "client2")["billing"]["receipts_signed"] >= 1
        assert ping(first_host, NET_HOST_IP)
        assert "Traceback" not in lab.server.text()
        led = SqliteLedger(state / "ledger.db", create=False)
        try:
            ok, figures = led.check_invariant()
            assert ok, figures
            # every redeemed receipt is whole: one row per receipt counted on its deposit
            for dep in {r.deposit_id for r in led.receipts()}:
                row = led.get_deposit(dep)
                assert row is not None
                assert row.receipts == len(led.receipts(deposit_id=dep))
        finally:
            led.close()


def test_a_read_only_ledger_stops_the_start_with_one_line(tmp_path: Path) -> None:
    """A ledger on a read-only file system: the server does not start, and says why in one
    line (no traceback)."""
    require_root("mounting a file system")
    with small_disk(tmp_path / "ro", "4m") as ro:
        SqliteLedger(ro / "ledger.db").close()
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        cfg = tmp_path / "s.cfg"
        cfg.write_text(
            "[server]\nlisten = tcp:0:interface=127.0.0.1\nstate_dir = st\n"
            "[srv_vpn]\nenabled = false\n[control]\nsocket = c.sock\n"
            + billing_section(1000, "B", 4 * MB)
            + f"[ledger]\nurl = sqlite:///{ro / 'ledger.db'}\n"
        )
        done = subprocess.run(
            [str(VENV_BIN / "twistd"), "-n", "--pidfile=", "cellvpn", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        out = done.stdout + done.stderr
        assert done.returncode == 1, out
        assert "Traceback" not in out
        [line] = [ln for ln in out.splitlines() if "cannot start" in ln]
        assert line.endswith(
            f"cellvpn cannot start: cannot open ledger {ro / 'ledger.db'}: unable to open "
            "database file (the file system is read-only; the ledger must be written)"
        ), line
