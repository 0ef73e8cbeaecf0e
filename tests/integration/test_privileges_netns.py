"""What runs with which privileges: the server gives up root after start, the client keeps it."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cellvpn.billing.sqlite import SqliteLedger
from cellvpn.lab import NET_HOST_IP, VpnLab, ctl_json, wait_for
from tests.integration.helpers import (
    background,
    billing_section,
    last_json,
    ping,
    wallet,
    wallet_section,
)

MB = 1024 * 1024
NOBODY = 65534
CAP_NET_ADMIN = 1 << 12


def credentials(pid: int) -> dict[str, int]:
    """Effective uid and gid, and the effective and permitted capability sets, from /proc."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {
        "uid": int(fields["Uid"].split()[1]),
        "gid": int(fields["Gid"].split()[1]),
        "cap_eff": int(fields["CapEff"], 16),
        "cap_prm": int(fields["CapPrm"], 16),
    }


def carried(lab: VpnLab) -> int:
    """IP bytes the server has taken from its one client so far."""
    sessions = ctl_json(lab.srv, lab.server_socket, "vpn_stat")["sessions"]
    return int(sessions[0]["counters"]["from_client_bytes"]) if sessions else 0


@contextmanager
def traversable(path: Path) -> Iterator[None]:
    """Let other users pass through ``path``'s parents (pytest keeps them 0700), for a server
    that runs as nobody in a folder below them; put the modes back afterwards."""
    parents = [p for p in [path, *path.parents] if p != Path("/") and p != Path("/tmp")]
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in parents}
    try:
        for p, mode in modes.items():
            os.chmod(p, mode | stat.S_IXOTH)
        yield
    finally:
        for p, mode in modes.items():
            os.chmod(p, mode)


def test_the_server_runs_without_root_and_still_serves_and_bills(
    netns: Any, tmp_path: Path
) -> None:
    with traversable(tmp_path):
        run_without_root(netns, tmp_path)


def run_without_root(netns: Any, tmp_path: Path) -> None:
    """``twistd -u 65534 -g 65534 cellvpn``: TUN, port and files are set up as root, then the
    process runs as nobody with no capability at all, while a paying client moves data and
    its receipts are redeemed in the ledger the server no longer owns as root."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    server = lab.start_server(
        extra=billing_section(1000, "B", 8 * MB), options=("-u", str(NOBODY), "-g", str(NOBODY))
    )
    key, _account = wallet(tmp_path, "client", 1_000_000)
    client = lab.start_client(
        cli, "client", section_extra="default_route = true\n", extra=wallet_section(key, 500_000)
    )
    assert ping(cli, "198.18.5.1")
    sink = background(lab.net, tmp_path / "sink.log", "sink", "5001", NET_HOST_IP)
    upload = background(cli, tmp_path / "send.log", "send", NET_HOST_IP, "5001", str(256 * MB))
    wait_for(lambda: carried(lab) > 4 * MB, timeout=30, what="the upload under way")
    # read while the transfer runs: what the processes are while they carry traffic
    server_creds = credentials(server.proc.pid)
    client_creds = credentials(client.proc.pid)
    still_sending = upload.poll() is None
    print("server:", server_creds, "client:", client_creds, f"sending: {still_sending}")
    sent = last_json(upload, tmp_path / "send.log")
    assert last_json(sink, tmp_path / "sink.log")["sha256"] == sent["sha256"]
    assert still_sending  # the upload was still running when they were read
    assert server_creds == {"uid": NOBODY, "gid": NOBODY, "cap_eff": 0, "cap_prm": 0}
    # the client changes addresses, routes and resolv.conf on every reconnect (docs/security.md)
    assert client_creds["uid"] == 0 and client_creds["cap_eff"] & CAP_NET_ADMIN
    [session] = ctl_json(lab.srv, lab.server_socket, "vpn_stat")["sessions"]
    assert session["billing"]["receipts"] >= 3
    assert lab.server is not None and lab.server.stop() == 0
    db = SqliteLedger(tmp_path / "state" / "ledger.db", create=False)
    ok, figures = db.check_invariant()
    assert ok, figures
    assert {p.stat().st_uid for p in (tmp_path / "state").rglob("*")} == {NOBODY}
