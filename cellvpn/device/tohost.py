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
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

ICMP, TCP, UDP = 1, 6, 17
_ECHO_REQUEST = 8
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
        if isinstance(address, ipaddress.IPv4Address):
            out.add(address.packed)
    return frozenset(out)
