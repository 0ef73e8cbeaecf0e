"""The route policy on literal rows: (offer, host, server, widest) -> the exact verdict.

The host is a typical client: eth0 192.0.2.2/24 on the underlay with a default route, a
loopback, and a few routes of the user's own that a server must not take over.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from cellvpn.config.schema import ClientSection
from cellvpn.net.routepolicy import (
    DEFAULT_WIDEST_PREFIX,
    Accepted,
    HostRoute,
    HostView,
    Offer,
    OwnAddress,
    Reason,
    Refused,
    Verdict,
    check_offer,
    check_route,
    prefix_of,
)

A = IPv4Address
N = IPv4Network

#: The server the stream connects to, on the client's own underlay.
ON_LINK = A("192.0.2.1")
#: A server behind the default gateway.
BEHIND = A("198.19.0.10")

HOST = HostView(
    addresses=(
        OwnAddress(IPv4Interface("127.0.0.1/8"), "lo"),
        OwnAddress(IPv4Interface("192.0.2.2/24"), "eth0"),
    ),
    routes=(
        HostRoute(N("0.0.0.0/0"), "eth0", A("192.0.2.254")),
        HostRoute(N("192.0.2.0/24"), "eth0"),
        HostRoute(N("198.18.64.0/18"), "eth0", A("192.0.2.254")),
        HostRoute(N("198.18.200.0/24"), "eth0", A("192.0.2.254"), table=100),
        HostRoute(N("198.19.200.0/24"), kind="blackhole"),
    ),
)
#: The server runs on this host too (a node app with both services): its TUN holds the gateway.
WITH_SERVER = HostView(
    addresses=(
        OwnAddress(IPv4Interface("192.0.2.1/24"), "eth0"),
        OwnAddress(IPv4Interface("198.18.6.1/24"), "cvpn-srv"),
    ),
    routes=(HostRoute(N("198.18.6.0/24"), "cvpn-srv"), HostRoute(N("192.0.2.0/24"), "eth0")),
)
#: Only the underlay and a default route: nothing else to collide with.
BARE = HostView(
    addresses=(OwnAddress(IPv4Interface("192.0.2.2/24"), "eth0"),),
    routes=(HostRoute(N("0.0.0.0/0"), "eth0", A("192.0.2.254")),),
)

TOO_WIDE_16 = "is wider than /16, the widest accepted ([client] widest_overlay_prefix)"

# (address, netmask or None, gateway, host, server, widest, expected)
ROWS: list[tuple[str, str | None, str, HostView, IPv4Address, int, Verdict]] = [
    # benign: the address, its prefix and one route into the tunnel
    ("198.18.5.7", "255.255.255.0", "198.18.5.1", HOST, BEHIND, 16,
     Accepted(IPv4Interface("198.18.5.7/24"), None, N("198.18.5.0/24"))),
    ("198.18.5.7", "255.255.255.0", "198.18.5.1", HOST, ON_LINK, 16,
     Accepted(IPv4Interface("198.18.5.7/24"), None, N("198.18.5.0/24"))),
    ("198.18.5.7", "255.255.0.0", "198.18.0.1", BARE, BEHIND, 16,
     Accepted(IPv4Interface("198.18.5.7/16"), None, N("198.18.0.0/16"))),
    ("198.18.5.7", "255.254.0.0", "198.18.0.1", BARE, ON_LINK, 15,
     Accepted(IPv4Interface("198.18.5.7/15"), None, N("198.18.0.0/15"))),
    ("198.18.5.0", "255.255.255.254", "198.18.5.1", HOST, BEHIND, 16,
     Accepted(IPv4Interface("198.18.5.0/31"), None, N("198.18.5.0/31"))),
    # no netmask (an original server): a point-to-point /32 with the gateway as peer
    ("198.18.5.7", None, "198.18.5.1", HOST, BEHIND, 16,
     Accepted(IPv4Interface("198.18.5.7/32"), A("198.18.5.1"), N("198.18.5.1/32"))),
    # too wide
    ("198.18.5.7", "0.0.0.0", "198.18.5.1", HOST, BEHIND, 16,
     Refused(Reason.TOO_WIDE, f"netmask 0.0.0.0 (/0) {TOO_WIDE_16}")),
    ("198.18.5.7", "128.0.0.0", "198.18.5.1", HOST, BEHIND, 16,
     Refused(Reason.TOO_WIDE, f"netmask 128.0.0.0 (/1) {TOO_WIDE_16}")),
    ("198.18.5.7", "255.0.0.0", "198.18.5.1", HOST, BEHIND, 16,
     Refused(Reason.TOO_WIDE, f"netmask 255.0.0.0 (/8) {TOO_WIDE_16}")),
    ("198.18.5.7", "255.254.0.0", "198.18.0.1", BARE, BEHIND, 16,
     Refused(Reason.TOO_WIDE, f"netmask 255.254.0.0 (/15) {TOO_WIDE_16}")),
    ("198.18.5.7", "255.255.255.0", "198.18.5.1", HOST, BEHIND, 25,
     Refused(Reason.TOO_WIDE, "netmask 255.255.255.0 (/24) is wider than /25, the widest"
             " accepted ([client] widest_overlay_prefix)")),
    # not a netmask
    ("198.18.5.7", "255.0.255.0", "198.18.5.1", HOST, BEHIND, 16,
     Refused(Reason.NETMASK_NOT_CONTIGUOUS, "netmask 255.0.255.0 is not contiguous")),
    ("198.18.5.7", "255.255.255.1", "198.18.5.1", HOST, BEHIND, 16,
     Refused(Reason.NETMASK_NOT_CONTIGUOUS, "netmask 255.255.255.1 is not contiguous")),
    # addresses no tunnel has
    ("0.0.0.0", "255.255.255.0", "0.0.0.1", HOST, BEHIND, 16,
     Refused(Reason.SPECIAL_ADDRESS, "address 0.0.0.0 is unspecified")),
    ("127.0.0.5", "255.255.255.0", "127.0.0.1", HOST, BEHIND, 16,
     Refused(Reason.SPECIAL_ADDRESS, "address 127.0.0.5 is in loopback (127.0.0.0/8)")),
    ("224.0.0.5", "255.255.255.0", "224.0.0.1", HOST, BEHIND, 16,
     Refused(Reason.SPECIAL_ADDRESS, "address 224.0.0.5 is in multicast (224.0.0.0/4)")),
    ("169.254.169.254", "255.255.0.0", "169.254.0.1", HOST, BEHIND, 16,
     Refused(Reason.SPECIAL_ADDRESS,
             "address 169.254.169.254 is in link-local (169.254.0.0/16)")),
    ("255.255.255.255", None, "198.18.5.1", HOST, BEHIND, 16,
     Refused(Reason.SPECIAL_ADDRESS, "address 255.255.255.255 is the limited broadcast address")),
    ("198.18.5.0", "255.255.255.0", "198.18.5.1", HOST, BEHIND, 16,
     Refused(Reason.NETWORK_OR_BROADCAST,
             "address 198.18.5.0 is the network address of 198.18.5.0/24")),
    ("198.18.5.255", "255.255.255.0", "198.18.5.1", HOST, BEHIND, 16,
     Refused(Reason.NETWORK_OR_BROADCAST,
             "address 198.18.5.255 is the broadcast address of 198.18.5.0/24")),
    # gateways the address cannot reach as offered
    ("198.18.5.7", "255.255.255.0", "198.18.6.1", HOST, BEHIND, 16,
     Refused(Reason.BAD_GATEWAY, "gateway 198.18.6.1 is outside 198.18.5.0/24")),
    ("198.18.5.7", "255.255.255.255", "198.18.5.1", HOST, BEHIND, 16,
     Refused(Reason.BAD_GATEWAY, "gateway 198.18.5.1 is outside 198.18.5.7/32")),
    ("198.18.5.7", "255.255.255.0", "198.18.5.7", HOST, BEHIND, 16,
     Refused(Reason.BAD_GATEWAY, "gateway 198.18.5.7 is the offered address itself")),
    ("198.18.5.7", "255.255.255.0", "198.18.5.255", HOST, BEHIND, 16,
     Refused(Reason.BAD_GATEWAY,
             "gateway 198.18.5.255 is the network or broadcast address of 198.18.5.0/24")),
    ("198.18.5.7", None, "0.0.0.0", HOST, BEHIND, 16,
     Refused(Reason.BAD_GATEWAY, "gateway 0.0.0.0 is unspecified")),
    # the server's own address
    ("192.0.2.50", "255.255.255.0", "192.0.2.60", HOST, ON_LINK, 16,
     Refused(Reason.CONTAINS_SERVER, "192.0.2.0/24 contains the server's address 192.0.2.1")),
    ("198.19.0.5", "255.255.255.0", "198.19.0.1", HOST, BEHIND, 16,
     Refused(Reason.CONTAINS_SERVER, "198.19.0.0/24 contains the server's address 198.19.0.10")),
    ("198.18.5.7", None, "198.19.0.10", HOST, BEHIND, 16,
     Refused(Reason.CONTAINS_SERVER, "198.19.0.10/32 contains the server's address 198.19.0.10")),
    # the user's own networks
    ("192.0.2.50", "255.255.255.0", "192.0.2.60", HOST, BEHIND, 16,
     Refused(Reason.OVERLAPS_ADDRESS, "192.0.2.0/24 overlaps 192.0.2.2/24 on eth0")),
    ("192.0.2.130", "255.255.255.128", "192.0.2.129", HOST, ON_LINK, 16,
     Refused(Reason.OVERLAPS_ADDRESS, "192.0.2.128/25 overlaps 192.0.2.2/24 on eth0")),
    ("192.0.2.50", None, "198.18.5.1", HOST, BEHIND, 16,
     Refused(Reason.OVERLAPS_ADDRESS, "192.0.2.50/32 overlaps 192.0.2.2/24 on eth0")),
    # the user's own routes, in any table and of any kind
    ("198.18.70.5", "255.255.255.0", "198.18.70.1", HOST, BEHIND, 16,
     Refused(Reason.OVERLAPS_ROUTE,
             "198.18.70.0/24 overlaps the route 198.18.64.0/18 via 192.0.2.254 dev eth0")),
    ("198.18.5.7", "255.255.0.0", "198.18.0.1", HOST, BEHIND, 16,
     Refused(Reason.OVERLAPS_ROUTE,
             "198.18.0.0/16 overlaps the route 198.18.64.0/18 via 192.0.2.254 dev eth0")),
    ("198.18.200.9", "255.255.255.128", "198.18.200.1", HOST, BEHIND, 16,
     Refused(Reason.OVERLAPS_ROUTE, "198.18.200.0/25 overlaps the route 198.18.200.0/24"
             " via 192.0.2.254 dev eth0 table 100")),
    ("198.19.200.9", "255.255.255.0", "198.19.200.1", HOST, BEHIND, 16,
     Refused(Reason.OVERLAPS_ROUTE,
             "198.19.200.0/24 overlaps the route blackhole 198.19.200.0/24")),
    # the server's own TUN on this host is the other end of the tunnel (it routes the pool)
    ("198.18.6.2", "255.255.255.0", "198.18.6.1", WITH_SERVER, ON_LINK, 16,
     Accepted(IPv4Interface("198.18.6.2/24"), None, None)),
    # ...but only the interface holding the gateway is left out
    ("192.0.2.9", "255.255.255.0", "192.0.2.77", WITH_SERVER, BEHIND, 16,
     Refused(Reason.OVERLAPS_ADDRESS, "192.0.2.0/24 overlaps 192.0.2.1/24 on eth0")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("address", "netmask", "gateway", "host", "server", "widest", "expected"), ROWS
)
def test_offer(
    address: str,
    netmask: str | None,
    gateway: str,
    host: HostView,
    server: IPv4Address,
    widest: int,
    expected: Verdict,
) -> None:
    offer = Offer(A(address), A(gateway), None if netmask is None else A(netmask))
    assert check_offer(offer, host, server, widest) == expected


# pushed routes (later): (network, host, server, expected reason or None)
ROUTE_ROWS: list[tuple[str, HostView, IPv4Address, Reason | None]] = [
    ("198.18.9.0/24", HOST, BEHIND, None),
    ("198.19.1.0/24", BARE, ON_LINK, None),
    ("0.0.0.0/1", BARE, BEHIND, Reason.SPECIAL_RANGE),
    ("169.0.0.0/8", BARE, BEHIND, Reason.SPECIAL_RANGE),
    ("224.0.0.0/3", BARE, BEHIND, Reason.SPECIAL_RANGE),
    ("198.18.0.0/15", BARE, BEHIND, Reason.CONTAINS_SERVER),
    ("192.0.2.0/26", BARE, BEHIND, Reason.OVERLAPS_ADDRESS),
    ("198.18.128.0/17", HOST, BEHIND, Reason.OVERLAPS_ROUTE),
]


@pytest.mark.parametrize(("network", "host", "server", "expected"), ROUTE_ROWS)
def test_route(network: str, host: HostView, server: IPv4Address, expected: Reason | None) -> None:
    refused = check_route(N(network), host, server)
    assert (refused.reason if refused else None) == expected


@pytest.mark.parametrize(
    ("netmask", "prefix"),
    [
        ("0.0.0.0", 0),
        ("128.0.0.0", 1),
        ("255.255.0.0", 16),
        ("255.255.255.254", 31),
        ("255.255.255.255", 32),
        ("255.0.255.0", None),
        ("0.255.255.255", None),
        ("255.255.254.255", None),
    ],
)
def test_prefix_of(netmask: str, prefix: int | None) -> None:
    assert prefix_of(A(netmask)) == prefix


def test_default_is_the_config_default() -> None:
    """The key's default and the policy's agree: the tunnel's own default never differs."""
    assert ClientSection().widest_overlay_prefix == DEFAULT_WIDEST_PREFIX == 16


def test_refusal_text_is_the_message() -> None:
    refused = Refused(Reason.TOO_WIDE, "netmask 0.0.0.0 (/0) is too wide")
    assert str(refused) == "netmask 0.0.0.0 (/0) is too wide"
