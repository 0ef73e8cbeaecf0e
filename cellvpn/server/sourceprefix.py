"""Which network a client address belongs to, for limits a fresh key cannot dodge.

Keys cost nothing, so a budget kept per key alone is a budget per attempt. A budget kept per
source prefix (a /24 of IPv4, a /64 of IPv6 by default, ``[server] source_prefix_v4`` and
``source_prefix_v6``) holds against fresh keys from one network.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network


def source_prefix(host: str, v4: int = 24, v6: int = 64) -> str:
    """``host``'s network as text (``198.18.7.0/24``); an unparsable host stands for itself."""
    try:
        address = ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    length = v4 if isinstance(address, IPv4Address) else v6
    return str(ip_network(f"{address}/{length}", strict=False))
