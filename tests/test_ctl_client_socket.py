"""``cellvpn-ctl client`` and ``session`` against a live server's control socket: what a
bad request says (one line, never a traceback), the file ``client add`` writes, and a server
that serves any client.

The server runs in this process on the real reactor (no TUN, its port on 127.0.0.1);
cellvpn-ctl runs as a subprocess of the reactor, as in test_ctl_ledger_socket.py.
"""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from cellvpn.config import load_client_config, load_server_config
from cellvpn.config.parsers import InlinePem
from cellvpn.server.service import VPNServerService
from tests.test_ctl_ledger_socket import Ctl

pytestmark = pytest.mark.timeout(120)


async def running(tmp_path: Path, reactor: Any, **keys: str) -> VPNServerService:
    config = load_server_config(
        None,
        {
            "server.listen": "tcp:0:interface=127.0.0.1",
            "server.state_dir": str(tmp_path / "state"),
            "control.socket": str(tmp_path / "server.sock"),
            "srv_vpn.enabled": "false",
            **keys,
        },
    )
    service = VPNServerService(config, reactor)
    service.privilegedStartService()
    service.startService()
    return service


@pytest_twisted.async_yield_fixture()
async def enrolling(tmp_path: Path, reactor: Any) -> AsyncIterator[Ctl]:
    service = await running(tmp_path, reactor, **{"server.public": "vpn.test:8089"})
    try:
        yield Ctl(tmp_path)
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_client_add_writes_a_private_file_that_loads(enrolling: Ctl, tmp_path: Path) -> None:
    ctl = enrolling
    out = await ctl.ok("--socket", "server.sock", "client", "add", "alice", "--out", "alice.cfg")
    assert out.startswith("enrolled client alice: certificate ")
    path = tmp_path / "alice.cfg"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    c = load_client_config(path).client
    assert str(c.server) == "vpn.test:8089" and c.server_name == "vpn.test"
    assert isinstance(c.ca, InlinePem) and isinstance(c.private_key, InlinePem)
    listed = await ctl.json("--socket", "server.sock", "client", "list")
    [alice] = listed["clients"]
    assert alice["name"] == "alice" and alice["state"] == "ok" and alice["last_seen"] is None
    assert listed["enrolled_only"] is True
    qr = await ctl.ok("--socket", "server.sock", "client", "add", "bob", "--qr")
    assert "enrolled client bob" in qr and "█" in qr
    status = await ctl.ok("--socket", "server.sock", "status")
    assert "clients: enrolled" in status and "pin as server_key" in status


@pytest_twisted.ensureDeferred
async def test_bad_requests_say_why_in_one_line(enrolling: Ctl, tmp_path: Path) -> None:
    ctl = enrolling
    s = ("--socket", "server.sock")
    await ctl.ok(*s, "client", "add", "alice", "--out", "alice.cfg")
    cases = [
        (("client", "add", "no good", "--out", "x.cfg"), "cannot name a client"),
        (("client", "add", "carol", "--days", "0", "--out", "x.cfg"), "lifetime of 1 to 3650"),
        (("client", "add", "alice", "--out", "other.cfg"), "enrolled already; revoke it first"),
        (("client", "add", "carol", "--out", "alice.cfg"), "alice.cfg exists already"),
        (("client", "add", "carol"), "needs --out FILE"),
        (("client", "add", "carol", "--out", "no/such/x.cfg"), "no/such is not a folder"),
        (("client", "add"), "needs the client's NAME"),
        (("client", "revoke", "nobody"), "no client is named 'nobody'"),
        (("session", "kick", "0x1234"), "no live session 4660"),
        (("session", "kick", "twelve"), "'twelve' is not a session id"),
    ]
    for args, said in cases:
        line = await ctl.refused(*s, *args)
        assert said in line, (args, line)
    assert not (tmp_path / "x.cfg").exists() and not (tmp_path / "other.cfg").exists()
    out = await ctl.ok(*s, "client", "revoke", "alice")
    assert out.startswith("revoked client alice (certificate ") and "no live session" in out
    assert "revoked already" in await ctl.refused(*s, "client", "revoke", "alice")


@pytest_twisted.ensureDeferred
async def test_a_server_for_any_client_enrolls_nobody(tmp_path: Path, reactor: Any) -> None:
    service = await running(tmp_path, reactor, **{"tls.clients": "any"})
    try:
        line = await Ctl(tmp_path).refused(
            "--socket", "server.sock", "client", "add", "alice", "--out", "a.cfg"
        )
        assert "does not enroll clients" in line and "clients = any" in line
        assert not (tmp_path / "a.cfg").exists()
    finally:
        await service.stopService()
