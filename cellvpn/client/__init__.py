"""The cellvpn client: connects, keeps the stream alive, reconnects, reports its status.

``VPNClientService(config)`` is an ordinary Twisted service; a node application can add it to
its own service tree without twistd.
"""

from cellvpn.client.service import VPNClientService

__all__ = ["VPNClientService"]
