"""What a client may reach on the server host itself through the TUN.

A packet a client sends to the pool gateway, or to any other address of the server host, is
delivered by the kernel to the host's own sockets: its SSH, its databases, its control ports,
the very services the L4 proxy refuses to reach. ``[srv_vpn] to_host`` lists what may pass:

- ``icmp``: ICMP echo requests (ping the gateway);
- ``dns``: UDP and TCP port 53, to the host addresses offered as DNS (``[srv_vpn] dns``);
- ``tcp:PORT`` / ``udp:PORT``: that port on any host address;
- ``all``: everything (as before); ``none``: nothing.

Everything else to a host address is dropped and counted (``dropped_to_host``). Fragments to
the host are dropped unless ``all``: a later fragment names no port to judge. Plain Python: the
forwarder asks :meth:`ToHost.allows` only for packets whose destination is a host address.

IPv6 follows the same rules (ICMPv6 echo for ``icmp``). Link-local and multicast destinations
always reach the host, so they count as host addresses; a packet whose fixed header is
followed by an extension header names no port and is dropped unless ``all``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

ICMP, TCP, UDP, ICMPV6 = 1, 6, 17, 58
_ECHO_REQUEST = 8
_ECHO_REQUEST6 = 128
DNS_PORT = 53


class RuleError(ValueError):
    """A ``to_host`` item that is not a rule."""


@dataclass(frozen=True)
class ToHostRules:
    """The parsed ``to_host`` list."""

    icmp: bool = False
    dns: bool = False
    everything: bool = False
    tcp: frozenset[int] = frozenset()
    udp: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, items: Iterable[str]) -> ToHostRules:
        icmp = dns = everything = False
        tcp: set[int] = set()
        udp: set[int] = set()
        for raw in items:
            item = raw.strip().lower()
            if item == "icmp":
                icmp = True
            elif item == "dns":
                dns = True
            elif item == "all":
                everything = True
            elif item == "none":
                continue
            elif item.startswith(("tcp:", "udp:")):
                kind, _, port_text = item.partition(":")
                if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                    raise RuleError(f"{raw!r}: expected a port from 1 to 65535 after {kind}:")
                (tcp if kind == "tcp" else udp).add(int(port_text))
            else:
                raise RuleError(f"{raw!r}: expected icmp, dns, tcp:PORT, udp:PORT, all or none")
        return cls(icmp, dns, everything, frozenset(tcp), frozenset(udp))

    def render(self) -> list[str]:
        items = [name for name, on in (("icmp", self.icmp), ("dns", self.dns)) if on]
        items += [f"tcp:{p}" for p in sorted(self.tcp)] + [f"udp:{p}" for p in sorted(self.udp)]
        if self.everything:
            items.append("all")
        return items or ["none"]


class ToHost:
    """The rules, with the host's addresses (as 4-byte keys) they apply to."""

    def __init__(
        self,
        rules: ToHostRules,
        addresses: Iterable[object] = (),
        dns: Iterable[object] = (),
    ) -> None:
        self.rules = rules
        self.addresses = _keys(addresses)
        #: host addresses offered to clients as DNS servers
        self.dns = _keys(dns) & self.addresses

    def with_addresses(self, addresses: Iterable[object], dns: Iterable[object]) -> ToHost:
        return ToHost(self.rules, addresses, dns)

    def is_host6(self, dst: bytes) -> bool:
        """Whether an IPv6 destination reaches the host: one of its addresses, link-local
        (fe80::/10) or multicast (ff00::/8)."""
        return dst in self.addresses or dst[0] == 0xFF or (dst[0] == 0xFE and dst[1] & 0xC0 == 0x80)

    def allows6(self, pkt: bytes | memoryview) -> bool:
        """``allows`` for a client's IPv6 packet to the host (a whole IPv6 packet)."""
        rules = self.rules
        if rules.everything:
            return True
        proto = pkt[6]
        if proto == ICMPV6:
            return rules.icmp and len(pkt) >= 48 and pkt[40] == _ECHO_REQUEST6
        if proto != TCP and proto != UDP:
            return False  # an extension header (a fragment one too): no port to judge
        if len(pkt) < 44:
            return False
        port = pkt[42] << 8 | pkt[43]
        if port == DNS_PORT and rules.dns and bytes(pkt[24:40]) in self.dns:
            return True
        return port in (rules.tcp if proto == TCP else rules.udp)

    def allows(self, pkt: bytes | memoryview) -> bool:
        """Whether a client's IPv4 packet to a host address may pass (header checked already:
        a whole IPv4 packet without options)."""
        rules = self.rules
        if rules.everything:
            return True
        if pkt[6] & 0x3F or pkt[7]:  # a fragment
            return False
        proto = pkt[9]
        if proto == ICMP:
            return rules.icmp and len(pkt) >= 28 and pkt[20] == _ECHO_REQUEST
        if proto != TCP and proto != UDP:
            return False
        if len(pkt) < 24:
            return False
        port = pkt[22] << 8 | pkt[23]
        if port == DNS_PORT and rules.dns and bytes(pkt[16:20]) in self.dns:
            return True
        return port in (rules.tcp if proto == TCP else rules.udp)


def _keys(addresses: Iterable[object]) -> frozenset[bytes]:
    out = set()
    for text in addresses:
        try:
            address = ipaddress.ip_address(str(text).split("%", 1)[0])
        except ValueError:
            continue
        out.add(address.packed)  # 4 bytes for IPv4, 16 for IPv6: the forwarder's keys
    return frozenset(out)
