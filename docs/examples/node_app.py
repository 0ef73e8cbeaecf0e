"""A Twisted node application that runs a cellvpn server and a cellvpn client in its own
service tree, without twistd.

    python docs/examples/node_app.py SERVER_CFG CLIENT_CFG

It starts both, waits until the client's VPN is up, prints the client's status as JSON, and
stops. Run it in a network namespace of its own (it creates TUN devices and routes).
"""

from __future__ import annotations

import json
import sys

from twisted.application.service import MultiService
from twisted.internet import defer, task

from cellvpn.client import VPNClientService
from cellvpn.config import load_client_config, load_server_config
from cellvpn.server import VPNServerService


async def main(reactor: object, server_cfg: str, client_cfg: str) -> None:
    node = MultiService()  # the node application's own service tree
    server = VPNServerService(load_server_config(server_cfg))
    server.setServiceParent(node)
    client = VPNClientService(load_client_config(client_cfg))
    client.setServiceParent(node)
    node.privilegedStartService()
    node.startService()
    try:
        host = server.port.getHost()
        code = await client.start(host.host, host.port)
        print(json.dumps({"start": code, "status": client.status()}), flush=True)
    finally:
        await defer.maybeDeferred(node.stopService)


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, *sys.argv[1:3])))
