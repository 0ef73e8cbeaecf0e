"""Where the L4 proxy may connect: the ``[srv_vpn]`` proxy, proxy_allow and proxy_deny rules.

A proxy that connects wherever a client asks would hand every client the server's own view of
the network: its loopback services, its private networks, the cloud's metadata service (and
the instance's credentials), the other clients of the VPN. So by default it reaches only
public addresses. The rules, in order:

1. the proxy is off: nothing is allowed;
2. an address in a ``proxy_deny`` network is refused (deny wins over everything);
3. an address in a ``proxy_allow`` network is allowed, even one of the built-in denies below;
4. when ``proxy_allow`` is not empty, every other address is refused;
5. otherwise the built-in denies refuse: the server's own addresses (the pool gateway and every
   address of the host, re-read while it runs), the VPN client network (the pool: another
   client's address), the cloud metadata addresses of :data:`CLOUD_METADATA`, and the
   special-purpose ranges of :data:`SPECIAL_RANGES` (RFC 6890 and the IANA IPv4 and IPv6
   special-purpose registries, each range whole, even the few of their blocks the registries
   call globally reachable: ``proxy_allow`` lists one that is wanted). The rest is allowed.

An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) is the IPv4 address it maps. An address of
a prefix in :data:`EMBEDDING` (NAT64, 6to4) reaches the IPv4 address it carries, so it is judged
as that address: ``proxy_deny`` and ``proxy_allow`` match it by either form, and the built-in
denies look at the IPv4 one (and at the server's own addresses in both). A zone
(``fe80::1%eth0``) is ignored. Refusals name the rule and the range, for the log; when a
built-in deny and a non-empty ``proxy_allow`` both refuse, the built-in one is named.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: The IPv4 address a NAT64 or 6to4 address carries, and its prefix (``NAT64 64:ff9b::/96``).
Embedded = tuple[ipaddress.IPv4Address, str]

#: The ranges no proxy reaches by default: (network, IANA name, reference). Where two hold an
#: address, the longer prefix names it. The last four IPv6 ones are more than RFC 6890 lists:
#: the deprecated IPv4-compatible and site-local blocks, and two newer registry entries.
SPECIAL_RANGES: tuple[tuple[str, str, str], ...] = (
    ("0.0.0.0/8", "This network", "RFC 791"),
    ("0.0.0.0/32", "This host on this network", "RFC 1122"),
    ("10.0.0.0/8", "Private-Use", "RFC 1918"),
    ("100.64.0.0/10", "Shared Address Space", "RFC 6598"),
    ("127.0.0.0/8", "Loopback", "RFC 1122"),
    ("169.254.0.0/16", "Link Local", "RFC 3927"),
    ("172.16.0.0/12", "Private-Use", "RFC 1918"),
    ("192.0.0.0/24", "IETF Protocol Assignments", "RFC 6890"),
    ("192.0.2.0/24", "Documentation TEST-NET-1", "RFC 5737"),
    ("192.88.99.0/24", "Deprecated 6to4 Relay Anycast", "RFC 7526"),
    ("192.168.0.0/16", "Private-Use", "RFC 1918"),
    ("198.18.0.0/15", "Benchmarking", "RFC 2544"),
    ("198.51.100.0/24", "Documentation TEST-NET-2", "RFC 5737"),
    ("203.0.113.0/24", "Documentation TEST-NET-3", "RFC 5737"),
    ("224.0.0.0/4", "Multicast", "RFC 5771"),
    ("240.0.0.0/4", "Reserved", "RFC 1112"),
    ("255.255.255.255/32", "Limited Broadcast", "RFC 919"),
    ("::/128", "Unspecified Address", "RFC 4291"),
    ("::1/128", "Loopback Address", "RFC 4291"),
    ("100::/64", "Discard-Only Address Block", "RFC 6666"),
    ("2001::/23", "IETF Protocol Assignments", "RFC 2928"),
    ("2001:db8::/32", "Documentation", "RFC 3849"),
    ("fc00::/7", "Unique-Local", "RFC 4193"),
    ("fe80::/10", "Link-Local Unicast", "RFC 4291"),
    ("ff00::/8", "Multicast", "RFC 4291"),
    ("::/96", "Deprecated IPv4-Compatible", "RFC 4291"),
    ("fec0::/10", "Deprecated Site-Local", "RFC 3879"),
    ("3fff::/20", "Documentation", "RFC 9637"),
    ("5f00::/16", "Segment Routing SIDs", "RFC 9602"),
)

#: Where clouds serve instance metadata and credentials: (address, whose).
CLOUD_METADATA: tuple[tuple[str, str], ...] = (
    ("169.254.169.254", "instance metadata of AWS, Google Cloud, Azure, OpenStack and others"),
    ("169.254.170.2", "AWS ECS task metadata and credentials"),
    ("fd00:ec2::254", "AWS EC2 instance metadata over IPv6"),
    ("100.100.100.200", "Alibaba Cloud instance metadata"),
    ("168.63.129.16", "Azure WireServer"),
)

#: IPv6 prefixes that carry an IPv4 address: (network, what, reference). NAT64 takes the last
#: 32 bits (in 64:ff9b:1::/48 too: a /96 of it, the usual use), 6to4 bits 16 to 47.
EMBEDDING: tuple[tuple[str, str, str], ...] = (
    ("64:ff9b::/96", "NAT64", "RFC 6052"),
    ("64:ff9b:1::/48", "local-use NAT64", "RFC 8215"),
    ("2002::/16", "6to4", "RFC 3056"),
)


def _last_32_bits(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)


def _sixtofour(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF)


_SPECIAL = sorted(
    ((ipaddress.ip_network(n), f"{n}, {name}, {ref}") for n, name, ref in SPECIAL_RANGES),
    key=lambda item: -item[0].prefixlen,
)
_METADATA = {ipaddress.ip_address(a): whose for a, whose in CLOUD_METADATA}
_EXTRACT: dict[str, Callable[[ipaddress.IPv6Address], ipaddress.IPv4Address]] = {
    "NAT64": _last_32_bits,
    "local-use NAT64": _last_32_bits,
    "6to4": _sixtofour,
}
_EMBEDDING = [(ipaddress.IPv6Network(n), f"{what} {n}", _EXTRACT[what]) for n, what, _ in EMBEDDING]


def _plain(address: IPAddress) -> IPAddress:
    """The IPv4 address behind an IPv4-mapped IPv6 one, else the address without its zone."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id:
            return ipaddress.IPv6Address(address.compressed.split("%", 1)[0])
    return address


def _embedded(ip: IPAddress) -> Embedded | None:
    """The IPv4 address a NAT64 or 6to4 address reaches, and which prefix it is; else None."""
    if isinstance(ip, ipaddress.IPv6Address):
        for net, what, extract in _EMBEDDING:
            if ip in net:
                return extract(ip), what
    return None


@dataclass(frozen=True)
class ProxyPolicy:
    """The proxy's destination rules; ``check`` says why an address is refused, or None.

    Immutable: when the host's addresses change the relay builds a new one and swaps it.
    """

    enabled: bool
    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    own_addresses: frozenset[IPAddress] = frozenset()
    #: the VPN client network(s): the pool the server leases its clients' addresses from
    client_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def build(
        cls,
        enabled: bool,
        allow: Iterable[IPNetwork],
        deny: Iterable[IPNetwork],
        own_addresses: Iterable[IPAddress | str],
        client_networks: Iterable[IPNetwork] = (),
    ) -> ProxyPolicy:
        """A policy with the own addresses parsed and normalised (unparsable ones skipped)."""
        own: set[IPAddress] = set()
        for text in own_addresses:
            try:
                own.add(_plain(ipaddress.ip_address(text)))
            except ValueError:
                continue
        return cls(enabled, tuple(allow), tuple(deny), frozenset(own), tuple(client_networks))

    def with_own_addresses(self, addresses: Iterable[IPAddress | str]) -> ProxyPolicy:
        """The same rules, with ``addresses`` added to the server's own."""
        return ProxyPolicy.build(
            self.enabled,
            self.allow,
            self.deny,
            [*self.own_addresses, *addresses],
            self.client_networks,
        )

    def check(self, address: IPAddress | str) -> str | None:
        """None if the proxy may connect to ``address``, else why not (for the log)."""
        if not self.enabled:
            return "proxy is off on this server"
        try:
            ip = _plain(ipaddress.ip_address(address))
        except ValueError:
            return f"{address!r} is not an IP address"
        inner = _embedded(ip)
        forms: tuple[IPAddress, ...] = (ip,) if inner is None else (ip, inner[0])
        for form in forms:
            for net in self.deny:
                if form in net:
                    return _said(ip, inner, form, f"in proxy_deny {net}")
        if any(form in net for form in forms for net in self.allow):
            return None
        why = self._built_in(ip, inner)
        if why is not None:
            return f"{why} (list it in proxy_allow to permit it)"
        if self.allow:
            return f"{ip} is not in proxy_allow"
        return None

    def _built_in(self, ip: IPAddress, inner: Embedded | None) -> str | None:
        """Which built-in deny refuses ``ip``, said as a sentence; None if none does."""
        if ip in self.own_addresses:
            return f"{ip} is an address of this server"
        if inner is not None:
            what = self._denied(inner[0])
            return None if what is None else _said(ip, inner, inner[0], what)
        what = self._denied(ip)
        return None if what is None else f"{ip} is {what}"

    def _denied(self, ip: IPAddress) -> str | None:
        """What makes ``ip`` an address the proxy does not reach by default, if anything."""
        if ip in self.own_addresses:
            return "an address of this server"
        for net in self.client_networks:
            if ip in net:
                return f"in the VPN client network {net}"
        whose = _METADATA.get(ip)
        if whose is not None:
            return f"a cloud metadata address: {whose}"
        for special, name in _SPECIAL:
            if ip in special:
                return f"in {name}"
        return None


def _said(ip: IPAddress, inner: Embedded | None, form: IPAddress, what: str) -> str:
    """``ip is what``, or, when ``what`` is about the IPv4 address ``ip`` embeds, both."""
    if inner is None or form == ip:
        return f"{ip} is {what}"
    return f"{ip} is {inner[1]} for {form}, and {form} is {what}"
