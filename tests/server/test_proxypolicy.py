"""The proxy's destination rules: off, proxy_deny, proxy_allow, then the built-in denies.

Decisions only: nothing here connects or sends.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import capturedLogs, formatEvent

from cellvpn.server import proxy
from cellvpn.server.hostaddresses import INTERVAL
from cellvpn.server.proxypolicy import CLOUD_METADATA, EMBEDDING, SPECIAL_RANGES, ProxyPolicy
from tests.server.test_session import make_server

# Every address below is only decided on, never sent to; the lines that name a private range say
# so at their end, and the rows stay one per line for that.
# fmt: off
# ruff: noqa: E501


def net(*texts: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


OWN = ["192.0.2.1", "2001:db8::1", "198.18.9.1"]
#: as for_server builds it: the pool gateway is the server's own, the pool its clients'
POLICY = ProxyPolicy.build(True, (), (), OWN, net("198.18.9.0/24"))
ALLOW_IT = " (list it in proxy_allow to permit it)"

#: (address, None = allowed, else a part of the refusal)
VERDICTS: list[tuple[str, str | None]] = [
    # IPv4 special-purpose ranges, with the public addresses on either side of some
    ("0.1.2.3", "0.1.2.3 is in 0.0.0.0/8, This network, RFC 791"),
    ("0.0.0.0", "0.0.0.0 is in 0.0.0.0/32, This host on this network, RFC 1122"),
    ("10.0.0.1", "10.0.0.1 is in 10.0.0.0/8, Private-Use, RFC 1918"),  # no traffic
    ("10.255.255.255", "10.255.255.255 is in 10.0.0.0/8, Private-Use"),  # no traffic
    ("9.255.255.255", None),
    ("11.0.0.0", None),
    ("100.64.0.1", "100.64.0.1 is in 100.64.0.0/10, Shared Address Space, RFC 6598"),
    ("100.127.255.254", "100.127.255.254 is in 100.64.0.0/10, Shared Address Space"),
    ("100.63.255.255", None),
    ("100.128.0.0", None),
    ("127.0.0.1", "127.0.0.1 is in 127.0.0.0/8, Loopback, RFC 1122"),
    ("127.9.9.9", "127.9.9.9 is in 127.0.0.0/8, Loopback"),
    ("169.254.1.1", "169.254.1.1 is in 169.254.0.0/16, Link Local, RFC 3927"),
    ("169.255.0.0", None),
    ("172.16.0.1", "172.16.0.1 is in 172.16.0.0/12, Private-Use, RFC 1918"),  # no traffic
    ("172.31.255.255", "172.31.255.255 is in 172.16.0.0/12, Private-Use"),  # no traffic
    ("172.15.255.255", None),
    ("172.32.0.0", None),
    ("192.0.0.9", "192.0.0.9 is in 192.0.0.0/24, IETF Protocol Assignments, RFC 6890"),
    ("192.0.2.200", "192.0.2.200 is in 192.0.2.0/24, Documentation TEST-NET-1, RFC 5737"),
    ("192.0.3.0", None),
    ("192.88.99.1", "192.88.99.1 is in 192.88.99.0/24, Deprecated 6to4 Relay Anycast, RFC 7526"),
    ("192.168.1.1", "192.168.1.1 is in 192.168.0.0/16, Private-Use, RFC 1918"),  # no traffic
    ("192.169.0.0", None),
    ("198.18.0.1", "198.18.0.1 is in 198.18.0.0/15, Benchmarking, RFC 2544"),
    ("198.19.0.10", "198.19.0.10 is in 198.18.0.0/15, Benchmarking"),
    ("198.17.255.255", None),
    ("198.20.0.0", None),
    ("198.51.100.7", "198.51.100.7 is in 198.51.100.0/24, Documentation TEST-NET-2, RFC 5737"),
    ("203.0.113.7", "203.0.113.7 is in 203.0.113.0/24, Documentation TEST-NET-3, RFC 5737"),
    ("224.0.0.1", "224.0.0.1 is in 224.0.0.0/4, Multicast, RFC 5771"),
    ("239.255.255.250", "239.255.255.250 is in 224.0.0.0/4, Multicast"),
    ("223.255.255.255", None),
    ("240.0.0.1", "240.0.0.1 is in 240.0.0.0/4, Reserved, RFC 1112"),
    ("255.255.255.254", "255.255.255.254 is in 240.0.0.0/4, Reserved"),
    ("255.255.255.255", "255.255.255.255 is in 255.255.255.255/32, Limited Broadcast, RFC 919"),
    ("8.8.8.8", None),
    # IPv6 special-purpose ranges
    ("::", ":: is in ::/128, Unspecified Address, RFC 4291"),
    ("::1", "::1 is in ::1/128, Loopback Address, RFC 4291"),
    ("::7f00:1", "::7f00:1 is in ::/96, Deprecated IPv4-Compatible, RFC 4291"),
    ("100::1", "100::1 is in 100::/64, Discard-Only Address Block, RFC 6666"),
    ("2001::1", "2001::1 is in 2001::/23, IETF Protocol Assignments, RFC 2928"),
    ("2001:1::1", "2001:1::1 is in 2001::/23, IETF Protocol Assignments"),
    ("2001:1ff:ffff::1", "2001:1ff:ffff::1 is in 2001::/23, IETF Protocol Assignments"),
    ("2001:200::1", None),
    ("2001:db8::5", "2001:db8::5 is in 2001:db8::/32, Documentation, RFC 3849"),
    ("3fff::1", "3fff::1 is in 3fff::/20, Documentation, RFC 9637"),
    ("5f00::1", "5f00::1 is in 5f00::/16, Segment Routing SIDs, RFC 9602"),
    ("fc00::1", "fc00::1 is in fc00::/7, Unique-Local, RFC 4193"),
    ("fd12:3456::1", "fd12:3456::1 is in fc00::/7, Unique-Local"),
    ("fe80::1", "fe80::1 is in fe80::/10, Link-Local Unicast, RFC 4291"),
    ("febf::1", "febf::1 is in fe80::/10, Link-Local Unicast"),
    ("fe80::1%eth0", "fe80::1 is in fe80::/10, Link-Local Unicast"),
    ("fec0::1", "fec0::1 is in fec0::/10, Deprecated Site-Local, RFC 3879"),
    ("ff02::1", "ff02::1 is in ff00::/8, Multicast, RFC 4291"),
    ("ff0e::1", "ff0e::1 is in ff00::/8, Multicast"),
    ("2001:4860:4860::8888", None),
    # IPv4-mapped: the IPv4 address itself
    ("::ffff:127.0.0.1", "127.0.0.1 is in 127.0.0.0/8, Loopback"),
    ("::ffff:10.1.2.3", "10.1.2.3 is in 10.0.0.0/8, Private-Use"),  # no traffic
    ("::ffff:8.8.8.8", None),
    # NAT64 and 6to4: the IPv4 address they carry
    ("64:ff9b::7f00:1", "64:ff9b::7f00:1 is NAT64 64:ff9b::/96 for 127.0.0.1, and 127.0.0.1 is in"),
    ("64:ff9b::a00:1", "64:ff9b::a00:1 is NAT64 64:ff9b::/96 for 10.0.0.1, and 10.0.0.1 is in"),  # no traffic
    ("64:ff9b::a9fe:a9fe", "for 169.254.169.254, and 169.254.169.254 is a cloud metadata"),
    ("64:ff9b::808:808", None),
    ("64:ff9b:1::a00:1", "64:ff9b:1::a00:1 is local-use NAT64 64:ff9b:1::/48 for 10.0.0.1, and"),  # no traffic
    ("64:ff9b:1:ab::808:808", None),
    ("2002:7f00:1::1", "2002:7f00:1::1 is 6to4 2002::/16 for 127.0.0.1, and 127.0.0.1 is in"),
    ("2002:c0a8:101:5::9", "6to4 2002::/16 for 192.168.1.1, and 192.168.1.1 is in 192.168.0.0/16"),  # no traffic
    ("2002:808:808::1", None),
    # cloud metadata
    ("169.254.169.254", "169.254.169.254 is a cloud metadata address: instance metadata of AWS"),
    ("169.254.170.2", "169.254.170.2 is a cloud metadata address: AWS ECS task metadata"),
    ("fd00:ec2::254", "fd00:ec2::254 is a cloud metadata address: AWS EC2 instance metadata"),
    ("100.100.100.200", "100.100.100.200 is a cloud metadata address: Alibaba Cloud"),
    ("168.63.129.16", "168.63.129.16 is a cloud metadata address: Azure WireServer"),
    ("168.63.129.17", None),
    # the server's own addresses, in every form
    ("192.0.2.1", "192.0.2.1 is an address of this server"),
    ("2001:db8::1", "2001:db8::1 is an address of this server"),
    ("::ffff:192.0.2.1", "192.0.2.1 is an address of this server"),
    ("64:ff9b::c000:201", "for 192.0.2.1, and 192.0.2.1 is an address of this server"),
    # the VPN client network (the pool; its gateway is the server's own)
    ("198.18.9.1", "198.18.9.1 is an address of this server"),
    ("198.18.9.77", "198.18.9.77 is in the VPN client network 198.18.9.0/24"),
    ("::ffff:198.18.9.77", "198.18.9.77 is in the VPN client network 198.18.9.0/24"),
    ("64:ff9b::c612:94d", "for 198.18.9.77, and 198.18.9.77 is in the VPN client network"),
]


@pytest.mark.parametrize(("address", "expected"), VERDICTS)
def test_the_built_in_denies(address: str, expected: str | None) -> None:
    why = POLICY.check(address)
    if expected is None:
        assert why is None
    else:
        assert why is not None and why.endswith(ALLOW_IT), why
        assert expected in why, why


def _named(reason: str | None) -> Iterator[str]:
    yield from re.findall(r" is in (\S+), ", reason or "")


def test_the_table_covers_every_range_metadata_address_and_embedding() -> None:
    """A range, metadata address or prefix added to the module gets a row above too."""
    named = {n for _, why in VERDICTS for n in _named(why)}
    assert {n for n, _, _ in SPECIAL_RANGES} <= named
    addresses = {a for a, _ in VERDICTS}
    assert {a for a, _ in CLOUD_METADATA} <= addresses
    embeddings = " ".join(why or "" for _, why in VERDICTS)
    for prefix, what, _ in EMBEDDING:
        assert f"is {what} {prefix} for" in embeddings


def test_the_whole_reason_texts() -> None:
    assert POLICY.check("10.0.0.1") == (  # no traffic
        "10.0.0.1 is in 10.0.0.0/8, Private-Use, RFC 1918 (list it in proxy_allow to permit it)"  # no traffic
    )
    assert POLICY.check("64:ff9b::7f00:1") == (
        "64:ff9b::7f00:1 is NAT64 64:ff9b::/96 for 127.0.0.1, and 127.0.0.1 is in 127.0.0.0/8,"
        " Loopback, RFC 1122 (list it in proxy_allow to permit it)"
    )


def test_off_refuses_everything() -> None:
    policy = ProxyPolicy(False, net("0.0.0.0/0"))
    assert policy.check("8.8.8.8") == "proxy is off on this server"
    assert policy.check("not even an address") == "proxy is off on this server"


#: (proxy_allow, proxy_deny, address, None = allowed, else the refusal)
ORDER: list[tuple[str, str, str, str | None]] = [
    # proxy_allow overrides every built-in deny
    ("10.0.0.0/8", "", "10.1.2.3", None),  # no traffic
    ("192.0.2.1/32", "", "192.0.2.1", None),
    ("169.254.169.254/32", "", "169.254.169.254", None),
    ("198.18.9.0/24", "", "198.18.9.77", None),
    ("198.18.9.0/24", "", "198.18.9.1", None),
    ("::1/128", "", "::1", None),
    ("fe80::/10", "", "fe80::1%eth0", None),
    ("127.0.0.0/8", "", "::ffff:127.0.0.1", None),
    ("127.0.0.0/8", "", "64:ff9b::7f00:1", None),
    ("64:ff9b::/96", "", "64:ff9b::a00:1", None),
    ("198.19.0.0/24", "", "198.19.0.10", None),
    # a non-empty proxy_allow is the only way out; a built-in deny is named where one applies
    ("10.0.0.0/8", "", "8.8.8.8", "8.8.8.8 is not in proxy_allow"),  # no traffic
    ("10.0.0.0/8", "", "2001:4860::1", "2001:4860::1 is not in proxy_allow"),  # no traffic
    ("10.0.0.0/8", "", "64:ff9b::808:808", "64:ff9b::808:808 is not in proxy_allow"),  # no traffic
    ("10.0.0.0/8", "", "192.168.1.1", "192.168.1.1 is in 192.168.0.0/16, Private-Use, RFC 1918"),  # no traffic
    ("169.254.169.254/32", "", "169.254.1.1", "169.254.1.1 is in 169.254.0.0/16, Link Local"),
    ("198.19.0.0/24", "", "192.0.2.1", "192.0.2.1 is an address of this server"),
    ("::1/128", "", "::ffff:127.0.0.1", "127.0.0.1 is in 127.0.0.0/8, Loopback"),
    # proxy_deny beats proxy_allow, by either form of an embedding address
    ("0.0.0.0/0", "8.8.8.0/24", "8.8.8.8", "8.8.8.8 is in proxy_deny 8.8.8.0/24"),
    ("0.0.0.0/0", "8.8.8.0/24", "8.8.4.4", None),
    ("10.0.0.0/8", "10.0.0.0/24", "10.0.0.5", "10.0.0.5 is in proxy_deny 10.0.0.0/24"),  # no traffic
    ("198.19.0.0/16", "198.19.0.0/24", "198.19.1.10", None),
    ("192.0.2.0/24", "192.0.2.1/32", "::ffff:192.0.2.1", "192.0.2.1 is in proxy_deny 192.0.2.1/32"),
    (
        "::/0",
        "8.8.8.0/24",
        "64:ff9b::808:808",
        "64:ff9b::808:808 is NAT64 64:ff9b::/96 for 8.8.8.8, and 8.8.8.8 is in proxy_deny"
        " 8.8.8.0/24",
    ),
    ("::/0", "64:ff9b::/96", "64:ff9b::808:808", "64:ff9b::808:808 is in proxy_deny 64:ff9b::/96"),
    ("", "8.8.8.0/24", "8.8.8.8", "8.8.8.8 is in proxy_deny 8.8.8.0/24"),
    ("", "8.8.8.0/24", "8.8.4.4", None),
]


@pytest.mark.parametrize(("allow", "deny", "address", "expected"), ORDER)
def test_deny_then_allow_then_the_built_in_denies(
    allow: str, deny: str, address: str, expected: str | None
) -> None:
    lists = [net(*text.split(",")) if text else () for text in (allow, deny)]
    policy = ProxyPolicy.build(True, lists[0], lists[1], OWN, net("198.18.9.0/24"))
    why = policy.check(address)
    if expected is None:
        assert why is None
    else:
        assert why is not None and why.startswith(expected), why


def test_own_addresses_are_parsed_and_normalised() -> None:
    policy = ProxyPolicy.build(True, (), (), ["8.8.8.7", "::ffff:8.8.8.8", "garbage"])
    assert policy.own_addresses == frozenset(
        {ipaddress.ip_address("8.8.8.7"), ipaddress.ip_address("8.8.8.8")}
    )
    assert policy.check("8.8.8.8") == f"8.8.8.8 is an address of this server{ALLOW_IT}"
    assert policy.check("8.8.8.9") is None
    assert policy.with_own_addresses(["8.8.8.9"]).check("8.8.8.9") is not None
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


@given(address=ipv4)
def test_an_allow_all_list_allows_everything_not_denied(address: ipaddress.IPv4Address) -> None:
    assert ProxyPolicy.build(True, net("0.0.0.0/0"), (), OWN).check(address) is None


# --- the relay's policy: the pool network, and the host's addresses re-read ----------------


def test_the_relay_refuses_the_pool_network_and_gateway(tmp_path: Path) -> None:
    server, _, _ = make_server(tmp_path, **{"srv_vpn.proxy": "true"})
    assert server.proxy is not None
    policy = server.proxy.policy
    assert policy.client_networks == net("198.18.9.0/24")
    assert policy.check("198.18.9.1") == f"198.18.9.1 is an address of this server{ALLOW_IT}"
    assert policy.check("198.18.9.200") == (
        f"198.18.9.200 is in the VPN client network 198.18.9.0/24{ALLOW_IT}"
    )


def test_the_host_addresses_are_re_read_and_the_policy_swapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, clock, _ = make_server(tmp_path, **{"srv_vpn.proxy": "true"})
    relay = server.proxy
    assert relay is not None
    monkeypatch.setattr(proxy, "host_addresses", lambda: ["8.8.8.1", "2001:4860::1"])
    readings: list[Deferred[list[str]]] = [
        succeed(["8.8.8.2", "2001:4860::1"]),
        fail(OSError("netlink is gone")),
        succeed(["2001:4860::1", "8.8.8.2"]),
    ]
    server.host_addresses.read = lambda: readings.pop(0)
    with capturedLogs() as events:
        relay.read_own_addresses()
    assert "L4 proxy on: destinations anywhere public; this host's 3 own addresses, the VPN" in (
        formatEvent(events[0])
    )
    first = relay.policy
    assert first.check("8.8.8.1") is not None and first.check("8.8.8.2") is None
    watch = server.host_addresses
    with capturedLogs() as events:
        watch.startService()  # the first reading is at once
    second = relay.policy
    assert second is not first and first.check("8.8.8.1") is not None  # the old one unchanged
    assert second.check("8.8.8.1") is None and second.check("8.8.8.2") is not None
    assert second.check("198.18.9.1") is not None  # the pool gateway stays the server's own
    assert [formatEvent(e) for e in events] == [
        "L4 proxy: this host's addresses changed (+8.8.8.2, -8.8.8.1); 3 own addresses now"
    ]
    with capturedLogs() as events:
        clock.advance(INTERVAL)  # a failed reading keeps the last addresses
        clock.advance(INTERVAL)  # the same addresses again: no new policy
    assert relay.policy is second
    assert len(events) == 1 and "cannot read this host's addresses again" in formatEvent(events[0])
    watch.stopService()
    clock.advance(10 * INTERVAL)
    assert not readings and not clock.getDelayedCalls()


def test_with_the_proxy_off_nothing_is_read(tmp_path: Path) -> None:
    server, clock, _ = make_server(tmp_path)
    assert server.proxy is not None
    server.proxy.read_own_addresses()
    assert not server.proxy.watching and not clock.getDelayedCalls()
