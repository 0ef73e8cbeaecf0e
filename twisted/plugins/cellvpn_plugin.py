"""twistd plugins ``cellvpn`` (server) and ``cellvpn-client``.

twistd imports every dropin on every run, even for ``--help``, so this file imports nothing of
cellvpn: :class:`ServiceMaker` loads ``cellvpn.tap`` / ``cellvpn.client.tap`` only when the
command is used. There must be no ``__init__.py`` in ``twisted/`` or ``twisted/plugins/``.
"""

from twisted.application.service import ServiceMaker

cellvpnServer = ServiceMaker(
    "cellvpn server", "cellvpn.server.tap", "cellvpn VPN server.", "cellvpn"
)
cellvpnClient = ServiceMaker(
    "cellvpn client", "cellvpn.client.tap", "cellvpn VPN client.", "cellvpn-client"
)
