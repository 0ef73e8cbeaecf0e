"""The cellvpn server: sessions over TLS, the lease pool, the TUN data path and billing.

``VPNServerService(config)`` is an ordinary Twisted service; a node application can add it to
its own service tree without twistd.
"""

from cellvpn.server.service import VPNServerService

__all__ = ["VPNServerService"]
