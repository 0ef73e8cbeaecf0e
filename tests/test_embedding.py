"""A node application can run cellvpn's services in its own service tree, without twistd."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.application.service import MultiService
from twisted.internet import defer, task

from cellvpn.client import VPNClientService
from cellvpn.config import load_client_config, load_server_config
from cellvpn.server import VPNServerService


@pytest_twisted.ensureDeferred
async def test_server_and_client_services_in_one_node_app(reactor: Any, tmp_path: Path) -> None:
    """Both services under one MultiService: the client gets a session from the server."""
    node = MultiService()
    server = VPNServerService(
        load_server_config(
            None,
            {
                "server.listen": "tcp:0:interface=127.0.0.1",
                "server.state_dir": str(tmp_path / "state"),
                "srv_vpn.enabled": "false",
                "control.socket": str(tmp_path / "server.sock"),
            },
        )
    )
    server.setServiceParent(node)
    node.privilegedStartService()
    node.startService()
    try:
        assert server.identity is not None
        port = server.port.getHost().port
        client = VPNClientService(
            load_client_config(
                None,
                {
                    "client.fingerprint": server.identity.fingerprint,
                    "control.socket": str(tmp_path / "client.sock"),
                },
            )
        )
        client.setServiceParent(node)
        code = await client.start("127.0.0.1", port).addTimeout(10, reactor)
        assert code == 0
        assert client.status()["status"] == "STARTED"
        assert await client.start("127.0.0.1", port) == 1
        await task.deferLater(reactor, 0.2, lambda: None)
        [session] = server.status()["sessions"]
        assert session["session_id"] == client.status()["session_id"]
        assert client.stop() == 0
        assert client.status()["status"] == "STOPPED"
        assert client.stop() == -1
    finally:
        await defer.maybeDeferred(node.stopService)
