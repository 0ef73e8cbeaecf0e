"""Where the L4 proxy may connect: the ``[srv_vpn]`` proxy, proxy_allow and proxy_deny rules.

A proxy that connects wherever a client asks would hand every client the server's own view of
the network: its loopback services, its link-local neighbours, its own listening ports. So the
rules, in order:

1. the proxy is off: nothing is allowed;
2. an address in a ``proxy_deny`` network is refused (deny wins over allow);
3. loopback, link-local, multicast, unspecified and broadcast addresses, and the server's own
   addresses, are refused unless a ``proxy_allow`` network holds them;
4. when ``proxy_allow`` is not empty, the address must be in one of its networks.

An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) is judged as the IPv4 address it maps.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def _plain(address: IPAddress) -> IPAddress:
    """The IPv4 address behind an IPv4-mapped IPv6 one, else the address itself."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id:
            return ipaddress.IPv6Address(address.compressed.split("%", 1)[0])
    return address


@dataclass(frozen=True)
class ProxyPolicy:
    """The proxy's destination rules; ``check`` says why an address is refused, or None."""

    enabled: bool
    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    own_addresses: frozenset[IPAddress] = frozenset()

    @classmethod
    def build(
        cls,
        enabled: bool,
        allow: Iterable[IPNetwork],
        deny: Iterable[IPNetwork],
        own_addresses: Iterable[IPAddress | str],
    ) -> ProxyPolicy:
        """A policy with the own addresses parsed and normalised (unparsable ones skipped)."""
        own: set[IPAddress] = set()
        for text in own_addresses:
            try:
                own.add(_plain(ipaddress.ip_address(text)))
            except ValueError:
                continue
        return cls(enabled, tuple(allow), tuple(deny), frozenset(own))

    def with_own_addresses(self, addresses: Iterable[IPAddress | str]) -> ProxyPolicy:
        """The same rules, with ``addresses`` added to the server's own."""
        return ProxyPolicy.build(
            self.enabled, self.allow, self.deny, [*self.own_addresses, *addresses]
        )

    def check(self, address: IPAddress | str) -> str | None:
        """None if the proxy may connect to ``address``, else why not (for the log)."""
        if not self.enabled:
            return "proxy is off on this server"
        try:
            ip = _plain(ipaddress.ip_address(address))
        except ValueError:
            return f"{address!r} is not an IP address"
        for net in self.deny:
            if ip in net:
                return f"{ip} is in proxy_deny {net}"
        if any(ip in net for net in self.allow):
            return None
        special = _special(ip)
        if special is None and ip in self.own_addresses:
            special = "an address of this server"
        if special is not None:
            return f"{ip} is {special} (list it in proxy_allow to permit it)"
        if self.allow:
            return f"{ip} is not in proxy_allow"
        return None


def _special(ip: IPAddress) -> str | None:
    """What makes ``ip`` an address no proxy should reach by default, if anything."""
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip == _BROADCAST:
        return "the broadcast address"
    return None
