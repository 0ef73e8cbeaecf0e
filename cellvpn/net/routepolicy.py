"""What a server may put into the client's routing: a pure check, no I/O.

A server answers ADDR_REQUEST with an address, a netmask and a gateway; taken as they come, a
netmask of 0.0.0.0 would route all of IPv4 into the tunnel and an address of the user's own
LAN would capture it. So the client takes an offer only when it is a plain, narrow overlay
that touches nothing the host already has: no own address, no connected or more specific
route, not the server it talks to. The verdict says exactly why an offer is refused, so the
user can tell a hostile server from a misconfigured one.

The address is then configured without its automatic prefix route (``noprefixroute``); the
client adds the one route the verdict names. Routes a server pushes later are checked with
:func:`check_route` against the same view of the host.

An IPv6 offer (the ``ipv6`` capability) is checked the same way by :func:`check_offer6`: a
global or unique-local address inside its prefix, the gateway beside it, the prefix no wider
than a /48 and touching no IPv6 address or route of the host. A refused IPv6 offer leaves the
client IPv4-only (with the IPv6 guard), it does not refuse the IPv4 lease.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

#: The widest overlay accepted by default: a /16 (netmask 255.255.0.0) or anything narrower.
DEFAULT_WIDEST_PREFIX = 16
#: The config key that sets the widest overlay, named in refusals so the user knows the knob.
WIDEST_KEY = "[client] widest_overlay_prefix"

#: Addresses a tunnel address never is, and ranges no overlay may touch.
SPECIAL_RANGES: tuple[tuple[IPv4Network, str], ...] = (
    (IPv4Network("0.0.0.0/8"), "'this network' (0.0.0.0/8)"),
    (IPv4Network("127.0.0.0/8"), "loopback (127.0.0.0/8)"),
    (IPv4Network("169.254.0.0/16"), "link-local (169.254.0.0/16)"),
    (IPv4Network("224.0.0.0/4"), "multicast (224.0.0.0/4)"),
    (IPv4Network("240.0.0.0/4"), "reserved (240.0.0.0/4)"),
)


#: The widest IPv6 prefix a client takes its address from.
WIDEST_PREFIX6 = 48

#: IPv6 ranges no tunnel address or route may touch.
SPECIAL_RANGES6: tuple[tuple[IPv6Network, str], ...] = (
    (IPv6Network("::/8"), "the reserved ::/8 (unspecified, loopback, IPv4-mapped)"),
    (IPv6Network("fe80::/10"), "link-local (fe80::/10)"),
    (IPv6Network("ff00::/8"), "multicast (ff00::/8)"),
)


class Reason(StrEnum):
    """Why an offer or route is refused; the message says the details."""

    NETMASK_NOT_CONTIGUOUS = "netmask-not-contiguous"
    TOO_WIDE = "too-wide"
    SPECIAL_ADDRESS = "special-address"
    NETWORK_OR_BROADCAST = "network-or-broadcast"
    BAD_GATEWAY = "bad-gateway"
    SPECIAL_RANGE = "special-range"
    CONTAINS_SERVER = "contains-server"
    OVERLAPS_ADDRESS = "overlaps-address"
    OVERLAPS_ROUTE = "overlaps-route"


@dataclass(frozen=True)
class Refused:
    """The offer (or route) is not taken; ``message`` is one line for the status and the log."""

    reason: Reason
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Accepted:
    """Configure ``interface`` (without a prefix route) and add ``route`` into the tunnel.

    ``peer`` is set for a reply without a netmask (an original server): the address is then a
    point-to-point /32 with the gateway as its peer, and ``route`` is the gateway's /32.
    ``route`` is None when the server runs on this host: its own TUN routes the network already.
    """

    interface: IPv4Interface
    peer: IPv4Address | None
    route: IPv4Network | None


Verdict = Accepted | Refused


@dataclass(frozen=True)
class Offer:
    """What ADDR_REPLY offers: ``netmask`` is None when an original server sends none."""

    address: IPv4Address
    gateway: IPv4Address
    netmask: IPv4Address | None = None


@dataclass(frozen=True)
class OwnAddress:
    """An address of the host (on an interface other than the tunnel's), with its prefix."""

    interface: IPv4Interface | IPv6Interface
    device: str

    def describe(self) -> str:
        return f"{self.interface} on {self.device}"


@dataclass(frozen=True)
class HostRoute:
    """A route of the host that is not a default route, in any table but ``local``."""

    network: IPv4Network | IPv6Network
    device: str | None = None
    gateway: IPv4Address | IPv6Address | None = None
    kind: str = "unicast"
    table: int = 254

    def describe(self) -> str:
        """Like ``ip route``: ``connected`` when the route is on the link (no gateway)."""
        parts = [] if self.kind == "unicast" else [self.kind]
        parts.append(str(self.network))
        if self.gateway is not None:
            parts += ["via", str(self.gateway)]
        if self.device is not None:
            parts += ["dev", self.device]
        if self.table != 254:
            parts += ["table", str(self.table)]
        text = " ".join(parts)
        if self.kind == "unicast" and self.gateway is None:
            return f"the connected route {text}"
        return f"the route {text}"


@dataclass(frozen=True)
class HostView:
    """What the host has now, apart from the tunnel's own TUN and the routes into it."""

    addresses: tuple[OwnAddress, ...] = ()
    routes: tuple[HostRoute, ...] = ()


def prefix_of(netmask: IPv4Address) -> int | None:
    """The prefix length of a contiguous netmask; None when its one bits have holes."""
    host_bits = ~int(netmask) & 0xFFFFFFFF
    if host_bits & (host_bits + 1):
        return None
    return 32 - host_bits.bit_length()


def special_kind(address: IPv4Address) -> str | None:
    """What makes ``address`` unusable as a tunnel address or gateway, or None."""
    if address == IPv4Address("0.0.0.0"):
        return "unspecified"
    if address == IPv4Address("255.255.255.255"):
        return "the limited broadcast address"
    for network, name in SPECIAL_RANGES:
        if address in network:
            return f"in {name}"
    return None


def check_offer(
    offer: Offer,
    host: HostView,
    server: IPv4Address | None,
    widest_prefix: int = DEFAULT_WIDEST_PREFIX,
) -> Verdict:
    """Accept the offer as an address and one route into the tunnel, or say why not.

    ``server`` is the underlay address the stream connects to: no route into the tunnel may
    cover it, or the tunnel would carry itself.
    """
    local = without_local_server(host, offer.gateway)
    verdict = _check_offer(offer, local, server, widest_prefix)
    if local is not host and isinstance(verdict, Accepted):
        return Accepted(verdict.interface, verdict.peer, None)
    return verdict


def _check_offer(
    offer: Offer, host: HostView, server: IPv4Address | None, widest_prefix: int
) -> Verdict:
    address, gateway = offer.address, offer.gateway
    kind = special_kind(address)
    if kind is not None:
        return Refused(Reason.SPECIAL_ADDRESS, f"address {address} is {kind}")
    if offer.netmask is None:
        return _check_peer(address, gateway, host, server)
    prefix = prefix_of(offer.netmask)
    if prefix is None:
        return Refused(Reason.NETMASK_NOT_CONTIGUOUS, f"netmask {offer.netmask} is not contiguous")
    if prefix < widest_prefix:
        return Refused(
            Reason.TOO_WIDE,
            f"netmask {offer.netmask} (/{prefix}) is wider than /{widest_prefix},"
            f" the widest accepted ({WIDEST_KEY})",
        )
    interface = IPv4Interface((address, prefix))
    network = interface.network
    if prefix <= 30:  # a /31 or /32 has neither a network nor a broadcast address
        if address == network.network_address:
            return Refused(
                Reason.NETWORK_OR_BROADCAST,
                f"address {address} is the network address of {network}",
            )
        if address == network.broadcast_address:
            return Refused(
                Reason.NETWORK_OR_BROADCAST,
                f"address {address} is the broadcast address of {network}",
            )
    if gateway not in network:
        return Refused(Reason.BAD_GATEWAY, f"gateway {gateway} is outside {network}")
    if gateway == address:
        return Refused(Reason.BAD_GATEWAY, f"gateway {gateway} is the offered address itself")
    if prefix <= 30 and gateway in (network.network_address, network.broadcast_address):
        return Refused(
            Reason.BAD_GATEWAY,
            f"gateway {gateway} is the network or broadcast address of {network}",
        )
    refused = check_route(network, host, server)
    if refused is not None:
        return refused
    return Accepted(interface, None, network)


def _check_peer(
    address: IPv4Address, gateway: IPv4Address, host: HostView, server: IPv4Address | None
) -> Verdict:
    """A reply without a netmask: ``address/32`` with the gateway as its point-to-point peer."""
    kind = special_kind(gateway)
    if kind is not None:
        return Refused(Reason.BAD_GATEWAY, f"gateway {gateway} is {kind}")
    if gateway == address:
        return Refused(Reason.BAD_GATEWAY, f"gateway {gateway} is the offered address itself")
    for network in (IPv4Network(address), IPv4Network(gateway)):
        refused = check_route(network, host, server)
        if refused is not None:
            return refused
    return Accepted(IPv4Interface(address), gateway, IPv4Network(gateway))


def without_local_server(host: HostView, gateway: IPAddress) -> HostView:
    """The host without the server's own TUN when the server runs on this very host (a node
    app with both services): the gateway is then an address of ours, and the interface that
    holds it is the other end of this tunnel, not something of the user's to protect."""
    devices = {own.device for own in host.addresses if own.interface.ip == gateway}
    if not devices:
        return host
    return HostView(
        tuple(own for own in host.addresses if own.device not in devices),
        tuple(route for route in host.routes if route.device not in devices),
    )


def check_route(network: IPNetwork, host: HostView, server: IPAddress | None) -> Refused | None:
    """None when ``network`` may be routed into the tunnel; else why not.

    Refused: a network that touches a special range, covers the server, or overlaps any own
    address or any route of the host other than a default route. A default route is the one
    thing a tunnel route may be more specific than: that is how traffic enters the tunnel.
    IPv4 and IPv6 alike; a network never overlaps one of the other family.
    """
    specials: tuple[tuple[IPNetwork, str], ...] = (
        SPECIAL_RANGES6 if isinstance(network, IPv6Network) else SPECIAL_RANGES
    )
    for special, name in specials:
        if network.overlaps(special):  # type: ignore[arg-type]
            return Refused(Reason.SPECIAL_RANGE, f"{network} overlaps {name}")
    if server is not None and server in network:
        return Refused(Reason.CONTAINS_SERVER, f"{network} contains the server's address {server}")
    for own in host.addresses:
        if network.overlaps(own.interface.network):  # type: ignore[arg-type]
            return Refused(Reason.OVERLAPS_ADDRESS, f"{network} overlaps {own.describe()}")
    for route in host.routes:
        if route.network.prefixlen > 0 and network.overlaps(route.network):  # type: ignore[arg-type]
            return Refused(Reason.OVERLAPS_ROUTE, f"{network} overlaps {route.describe()}")
    return None


@dataclass(frozen=True)
class Accepted6:
    """Configure ``interface`` (without a prefix route) and add ``route`` into the tunnel
    (None when the server runs on this host)."""

    interface: IPv6Interface
    route: IPv6Network | None


def check_offer6(
    interface: IPv6Interface,
    gateway: IPv6Address,
    host: HostView,
    server: IPv6Address | None,
) -> Accepted6 | Refused:
    """Accept the IPv6 address and its prefix's route into the tunnel, or say why not."""
    local = without_local_server(host, gateway)
    network = interface.network
    address = interface.ip
    if network.prefixlen < WIDEST_PREFIX6:
        return Refused(
            Reason.TOO_WIDE,
            f"IPv6 prefix {network} is wider than /{WIDEST_PREFIX6}, the widest accepted",
        )
    for special, name in SPECIAL_RANGES6:
        if address in special:
            return Refused(Reason.SPECIAL_ADDRESS, f"address {address} is in {name}")
    if address == network.network_address:
        return Refused(
            Reason.NETWORK_OR_BROADCAST, f"address {address} is the router anycast of {network}"
        )
    if gateway not in network:
        return Refused(Reason.BAD_GATEWAY, f"gateway {gateway} is outside {network}")
    if gateway == address:
        return Refused(Reason.BAD_GATEWAY, f"gateway {gateway} is the offered address itself")
    refused = check_route(network, local, server)
    if refused is not None:
        return refused
    return Accepted6(interface, None if local is not host else network)
