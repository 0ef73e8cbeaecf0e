"""cellvpn: the Cellframe VPN service, reimplemented on Twisted."""

__version__ = "0.1.0"
