"""The proxy's destination rules: off, deny over allow, special and own addresses, allow lists."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellvpn.server.proxypolicy import ProxyPolicy


def net(*texts: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


OPEN = ProxyPolicy.build(True, (), net("198.18.0.0/16"), ["192.0.2.1", "2001:db8::1"])


def test_off_refuses_everything() -> None:
    policy = ProxyPolicy(False, net("0.0.0.0/0"))
    assert policy.check("198.19.0.10") == "proxy is off on this server"
    assert policy.check("not even an address") == "proxy is off on this server"


def test_an_open_proxy_allows_ordinary_addresses_of_both_families() -> None:
    assert OPEN.check("198.19.0.10") is None
    assert OPEN.check(ipaddress.ip_address("2001:db8:5::7")) is None


def test_deny_wins_over_allow() -> None:
    policy = ProxyPolicy(True, net("198.19.0.0/16"), net("198.19.0.0/24"))
    assert policy.check("198.19.0.10") == "198.19.0.10 is in proxy_deny 198.19.0.0/24"
    assert policy.check("198.19.1.10") is None


@pytest.mark.parametrize(
    ("address", "what"),
    [
        ("127.0.0.1", "a loopback address"),
        ("127.9.9.9", "a loopback address"),
        ("::1", "a loopback address"),
        ("0.0.0.0", "the unspecified address"),
        ("::", "the unspecified address"),
        ("169.254.1.1", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("fe80::1%eth0", "a link-local address"),
        ("224.0.0.1", "a multicast address"),
        ("ff02::1", "a multicast address"),
        ("255.255.255.255", "the broadcast address"),
        ("192.0.2.1", "an address of this server"),
        ("2001:db8::1", "an address of this server"),
    ],
)
def test_special_and_own_addresses_need_an_explicit_allow(address: str, what: str) -> None:
    shown = address.split("%")[0]
    assert OPEN.check(address) == f"{shown} is {what} (list it in proxy_allow to permit it)"
    exact = f"{shown}/128" if ":" in shown else f"{shown}/32"
    allowed = ProxyPolicy.build(True, net(exact), (), ["192.0.2.1", "2001:db8::1"])
    assert allowed.check(address) is None


def test_the_reason_texts() -> None:
    policy = ProxyPolicy(True, (), net("198.19.0.0/24"))
    assert policy.check("198.19.0.10") == "198.19.0.10 is in proxy_deny 198.19.0.0/24"
    assert policy.check("127.0.0.1") == (
        "127.0.0.1 is a loopback address (list it in proxy_allow to permit it)"
    )


def test_ipv4_mapped_ipv6_is_judged_as_ipv4() -> None:
    assert OPEN.check("::ffff:127.0.0.1") == (
        "127.0.0.1 is a loopback address (list it in proxy_allow to permit it)"
    )
    assert OPEN.check("::ffff:198.18.3.4") == "198.18.3.4 is in proxy_deny 198.18.0.0/16"
    assert OPEN.check("::ffff:192.0.2.1") is not None
    assert OPEN.check("::ffff:198.19.0.10") is None


def test_a_non_empty_allow_list_is_the_only_way_out() -> None:
    policy = ProxyPolicy(True, net("198.19.0.0/24", "2001:db8:1::/48"))
    assert policy.check("198.19.0.10") is None
    assert policy.check("2001:db8:1::5") is None
    assert policy.check("198.19.1.10") == "198.19.1.10 is not in proxy_allow"
    assert policy.check("2001:db8:2::5") == "2001:db8:2::5 is not in proxy_allow"


def test_own_addresses_are_parsed_and_normalised() -> None:
    policy = ProxyPolicy.build(True, (), (), ["192.0.2.7", "::ffff:192.0.2.8", "garbage"])
    assert policy.own_addresses == frozenset(
        {ipaddress.ip_address("192.0.2.7"), ipaddress.ip_address("192.0.2.8")}
    )
    assert policy.check("192.0.2.8") is not None
    assert policy.with_own_addresses(["192.0.2.9"]).check("192.0.2.9") is not None
    assert policy.check("not an address") == "'not an address' is not an IP address"


ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)


@given(address=ipv4, prefix=st.integers(0, 32), allow_all=st.booleans())
def test_anything_in_deny_is_refused_whatever_allow_says(
    address: ipaddress.IPv4Address, prefix: int, allow_all: bool
) -> None:
    deny = ipaddress.IPv4Network(f"{address}/{prefix}", strict=False)
    allow = net("0.0.0.0/0") if allow_all else ()
    why = ProxyPolicy(True, allow, (deny,)).check(address)
    assert why == f"{address} is in proxy_deny {deny}"
