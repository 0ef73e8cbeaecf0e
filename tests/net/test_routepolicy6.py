"""The IPv6 offer: which addresses and prefixes a client takes into its tunnel (literal rows)."""

from __future__ import annotations

from ipaddress import IPv6Address, IPv6Interface, IPv6Network

import pytest

from cellvpn.net.routepolicy import (
    Accepted6,
    HostRoute,
    HostView,
    OwnAddress,
    Reason,
    Refused,
    check_offer6,
    check_route,
)

HOST6 = HostView(
    addresses=(
        OwnAddress(IPv6Interface("::1/128"), "lo"),
        OwnAddress(IPv6Interface("2001:db8::2/64"), "eth0"),
    ),
    routes=(
        HostRoute(IPv6Network("2001:db8::/64"), "eth0"),
        HostRoute(IPv6Network("2001:db8:77::/48"), "eth0", IPv6Address("2001:db8::fe")),
    ),
)
SERVER6 = IPv6Address("2001:db8::1")


@pytest.mark.parametrize(
    ("address", "gateway", "reason"),
    [
        ("2001:db8:1::2/64", "2001:db8:1::1", None),
        ("2001:db8:1::2/120", "2001:db8:1::1", None),
        ("fd00:1::2/64", "fd00:1::1", None),
        ("2001:db8:1::2/32", "2001:db8:1::1", Reason.TOO_WIDE),
        ("fe80::2/64", "fe80::1", Reason.SPECIAL_ADDRESS),
        ("ff02::2/64", "ff02::1", Reason.SPECIAL_ADDRESS),
        ("::ffff:c612:502/120", "::ffff:c612:501", Reason.SPECIAL_ADDRESS),
        ("2001:db8:1::/64", "2001:db8:1::1", Reason.NETWORK_OR_BROADCAST),
        ("2001:db8:1::2/64", "2001:db8:2::1", Reason.BAD_GATEWAY),
        ("2001:db8:1::2/64", "2001:db8:1::2", Reason.BAD_GATEWAY),
        ("2001:db8::5/64", "2001:db8::1", Reason.CONTAINS_SERVER),
        ("2001:db8:77:1::2/64", "2001:db8:77:1::1", Reason.OVERLAPS_ROUTE),
    ],
)
def test_ipv6_offers(address: str, gateway: str, reason: Reason | None) -> None:
    verdict = check_offer6(IPv6Interface(address), IPv6Address(gateway), HOST6, SERVER6)
    if reason is None:
        assert verdict == Accepted6(IPv6Interface(address), IPv6Interface(address).network)
    else:
        assert isinstance(verdict, Refused) and verdict.reason is reason, verdict


def test_an_ipv6_offer_that_overlaps_an_own_address() -> None:
    host = HostView((OwnAddress(IPv6Interface("2001:db8:1::99/64"), "eth1"),))
    verdict = check_offer6(
        IPv6Interface("2001:db8:1::2/64"), IPv6Address("2001:db8:1::1"), host, None
    )
    assert verdict == Refused(
        Reason.OVERLAPS_ADDRESS, "2001:db8:1::/64 overlaps 2001:db8:1::99/64 on eth1"
    )


@pytest.mark.parametrize(
    ("network", "reason"),
    [
        ("2001:db8:5::/48", None),
        ("2001:db8:77::/64", Reason.OVERLAPS_ROUTE),
        ("fe80::/64", Reason.SPECIAL_RANGE),
        ("2001:db8::/32", Reason.CONTAINS_SERVER),
    ],
)
def test_pushed_ipv6_routes(network: str, reason: Reason | None) -> None:
    refused = check_route(IPv6Network(network), HOST6, SERVER6)
    assert (refused and refused.reason) == reason


def test_an_ipv4_host_does_not_refuse_an_ipv6_route() -> None:
    from ipaddress import IPv4Address, IPv4Interface

    host = HostView((OwnAddress(IPv4Interface("0.0.0.0/0"), "x"),))
    assert check_route(IPv6Network("2001:db8:5::/48"), host, IPv4Address("192.0.2.1")) is None
