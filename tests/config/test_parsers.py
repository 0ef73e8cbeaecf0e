"""Each value parser: what it accepts (and makes of it), what it rejects."""

from __future__ import annotations

from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from cellvpn.config.fields import ParseError, Parser
from cellvpn.config.parsers import (
    BOOL,
    CONGESTION,
    FINGERPRINT,
    HEX64,
    HOST_PORT,
    IFNAME,
    IPV4,
    NAME,
    NETWORK,
    PATH,
    HostPort,
    choice,
    integer,
    is_dns_name,
    list_of,
    netmask,
    optional,
    prefix_of_netmask,
    seconds,
)

BASE = Path("/etc/cellvpn")
FP = "ab" * 32


class Unit(StrEnum):
    SEC = "SEC"
    B = "B"


ACCEPTED: list[tuple[Parser[Any], str, Any]] = [
    (BOOL, "true", True),
    (BOOL, "Yes", True),
    (BOOL, "ON", True),
    (BOOL, "1", True),
    (BOOL, "false", False),
    (BOOL, "no", False),
    (BOOL, "off", False),
    (BOOL, "0", False),
    (integer(576, 65535), "576", 576),
    (integer(576, 65535), "65535", 65535),
    (integer(576, 65535), "+1400", 1400),
    (integer(0), "0", 0),
    (integer(0), "1" + "0" * 40, 10**40),
    (seconds(0.1, 3600), "0.1", 0.1),
    (seconds(0.1, 3600), "3", 3.0),
    (seconds(0.1, 3600), "2.5", 2.5),
    (seconds(0.1, 3600), ".5", 0.5),
    (seconds(0, 10), "0", 0.0),
    (PATH, "/abs/file.pem", Path("/abs/file.pem")),
    (PATH, "rel/file.pem", BASE / "rel/file.pem"),
    (PATH, "~/key.pem", Path("~/key.pem").expanduser()),
    (optional(PATH), "", None),
    (IPV4, "198.18.12.0", IPv4Address("198.18.12.0")),
    (netmask(8, 30), "255.255.255.0", IPv4Address("255.255.255.0")),
    (netmask(8, 30), "255.0.0.0", IPv4Address("255.0.0.0")),
    (netmask(8, 30), "255.255.255.252", IPv4Address("255.255.255.252")),
    (NAME, "vpn.example.net", "vpn.example.net"),
    (NAME, "localhost", "localhost"),
    (NAME, "198.18.0.1", "198.18.0.1"),
    (NAME, "2001:db8::1", "2001:db8::1"),
    (NETWORK, "198.18.0.0/15", IPv4Network("198.18.0.0/15")),
    (NETWORK, "2001:db8::/32", IPv6Network("2001:db8::/32")),
    (NETWORK, "192.0.2.7", IPv4Network("192.0.2.7/32")),
    (list_of(IPV4, "x"), "", ()),
    (list_of(IPV4, "x"), "198.18.0.53", (IPv4Address("198.18.0.53"),)),
    (
        list_of(IPV4, "x"),
        "198.18.0.53, 198.19.0.53",
        (IPv4Address("198.18.0.53"), IPv4Address("198.19.0.53")),
    ),
    (
        list_of(IPV4, "x"),
        "[198.18.0.53,198.19.0.53]",
        (IPv4Address("198.18.0.53"), IPv4Address("198.19.0.53")),
    ),
    (list_of(IPV4, "x"), "[]", ()),
    (
        list_of(NAME, "x"),
        "vpn.example.net, 192.0.2.1, ::1",
        ("vpn.example.net", "192.0.2.1", "::1"),
    ),
    (
        list_of(NETWORK, "x"),
        "198.18.0.0/15,\n2001:db8::/32",
        (IPv4Network("198.18.0.0/15"), IPv6Network("2001:db8::/32")),
    ),
    (IFNAME, "tun0", "tun0"),
    (CONGESTION, "cubic", "cubic"),
    (CONGESTION, "bbr", "bbr"),
    (CONGESTION, "system", None),
    (IFNAME, "cellvpn-server1", "cellvpn-server1"),
    (IFNAME, "tun%d", "tun%d"),
    (HOST_PORT, "vpn.example.net:8089", HostPort("vpn.example.net", 8089)),
    (HOST_PORT, "192.0.2.1:1", HostPort("192.0.2.1", 1)),
    (HOST_PORT, "[2001:db8::1]:65535", HostPort("2001:db8::1", 65535)),
    (FINGERPRINT, FP, FP),
    (FINGERPRINT, FP.upper(), FP),
    (FINGERPRINT, ":".join(["AB"] * 32), FP),
    (HEX64, FP.upper(), FP),
    (choice(Unit), "SEC", Unit.SEC),
    (choice(Unit), "b", Unit.B),
]

REJECTED: list[tuple[Parser[Any], str]] = [
    (BOOL, ""),
    (BOOL, "maybe"),
    (BOOL, "2"),
    (BOOL, "truee"),
    (integer(576, 65535), "575"),
    (integer(576, 65535), "65536"),
    (integer(576, 65535), "1400.0"),
    (integer(576, 65535), "0x578"),
    (integer(576, 65535), "1_400"),
    (integer(576, 65535), ""),
    (integer(0), "-1"),
    (integer(0), "9" * 5000),
    (seconds(0.1, 3600), "0.05"),
    (seconds(0.1, 3600), "3601"),
    (seconds(0.1, 3600), "-1"),
    (seconds(0.1, 3600), "nan"),
    (seconds(0.1, 3600), "inf"),
    (seconds(0.1, 3600), "1e2"),
    (seconds(0.1, 3600), "3s"),
    (seconds(0.1, 3600), "."),
    (PATH, ""),
    (PATH, "a\0b"),
    (IPV4, "10.11.12"),
    (IPV4, "198.18.12.256"),
    (IPV4, "010.11.12.0"),
    (IPV4, "::1"),
    (IPV4, "vpn.example.net"),
    (netmask(8, 30), "255.0.255.0"),
    (netmask(8, 30), "0.0.0.255"),
    (netmask(8, 30), "255.255.255.254"),
    (netmask(8, 30), "255.255.255.255"),
    (netmask(8, 30), "254.0.0.0"),
    (netmask(8, 30), "24"),
    (NAME, ""),
    (NAME, "-bad.example"),
    (NAME, "bad-.example"),
    (NAME, "under_score.example"),
    (NAME, "999.1.1.1"),
    (NAME, "1.2.3"),
    (NAME, "a" * 64 + ".example"),
    (NAME, "two..dots"),
    (NETWORK, "198.18.0.1/15"),
    (NETWORK, "198.18.0.0/33"),
    (NETWORK, "2001:db8::1/32"),
    (NETWORK, "example.net"),
    (list_of(IPV4, "x"), "198.18.0.53,,198.19.0.53"),
    (list_of(IPV4, "x"), "198.18.0.53,"),
    (list_of(IPV4, "x"), "198.18.0.53 198.19.0.53"),
    (list_of(IPV4, "x"), "198.18.0.53, ::1"),
    (list_of(NAME, "x"), "good.example, bad_name"),
    (list_of(NETWORK, "x"), "198.18.0.1/15"),
    (IFNAME, "a" * 16),
    (CONGESTION, "Cubic"),
    (CONGESTION, "cu bic"),
    (CONGESTION, ""),
    (CONGESTION, "a" * 16),
    (IFNAME, "tun/0"),
    (IFNAME, "tun:0"),
    (IFNAME, "tun 0"),
    (IFNAME, "."),
    (IFNAME, ".."),
    (HOST_PORT, "vpn.example.net"),
    (HOST_PORT, "vpn.example.net:"),
    (HOST_PORT, ":8089"),
    (HOST_PORT, "vpn.example.net:0"),
    (HOST_PORT, "vpn.example.net:65536"),
    (HOST_PORT, "vpn.example.net:http"),
    (HOST_PORT, "2001:db8::1:8089"),
    (HOST_PORT, "[vpn.example.net]:8089"),
    (HOST_PORT, "[2001:db8::1]"),
    (HOST_PORT, "bad_host:8089"),
    (HOST_PORT, "1.2.3:8089"),
    (FINGERPRINT, "ab" * 31),
    (FINGERPRINT, "ab" * 33),
    (FINGERPRINT, "zz" * 32),
    (FINGERPRINT, "abc:" + "ab" * 30 + "a"),
    (FINGERPRINT, ":".join(["ab"] * 32) + ":"),
    (HEX64, ":".join(["ab"] * 32)),
    (HEX64, "ab" * 31),
    (choice(Unit), "seconds"),
    (choice(Unit), ""),
]


@pytest.mark.parametrize(("parser", "text", "value"), ACCEPTED)
def test_accepted(parser: Parser[Any], text: str, value: Any) -> None:
    """Valid text parses to the expected typed value."""
    assert parser.parse(text, BASE) == value


@pytest.mark.parametrize(("parser", "text"), REJECTED)
def test_rejected(parser: Parser[Any], text: str) -> None:
    """Invalid text raises ParseError, never another exception or a wrong value."""
    with pytest.raises(ParseError):
        parser.parse(text, BASE)


@pytest.mark.parametrize(("parser", "text", "value"), ACCEPTED)
def test_render_round_trip(parser: Parser[Any], text: str, value: Any) -> None:
    """Rendering a parsed value gives text that parses back to the same value."""
    assert parser.parse(parser.render(value), BASE) == value


def test_fingerprint_normalised() -> None:
    """Fingerprints in any accepted form become 64 lowercase hex digits without colons."""
    pairs = "AB:cd:" * 16
    assert FINGERPRINT.parse(pairs[:-1], BASE) == "abcd" * 16
    assert FINGERPRINT.parse(("AbCd" * 16), BASE) == "abcd" * 16


def test_bool_renders_canonical_words() -> None:
    """Booleans are written as true/false in example files."""
    assert BOOL.render(True) == "true"
    assert BOOL.render(False) == "false"


def test_seconds_render_whole_numbers_plainly() -> None:
    """Whole seconds render without a fraction, others keep it."""
    assert seconds(0, 10).render(3.0) == "3"
    assert seconds(0, 10).render(0.25) == "0.25"


def test_expected_texts_name_bounds() -> None:
    """The expectation text of bounded parsers names the bounds users must stay in."""
    assert integer(576, 65535).expected == "an integer from 576 to 65535"
    assert integer(0).expected == "a non-negative integer"
    assert integer(5).expected == "an integer of at least 5"
    assert seconds(0.1, 3600).expected == "a number of seconds from 0.1 to 3600"
    assert "255.255.255.252 (/30)" in netmask(8, 30).expected
    assert choice(Unit).expected == "one of SEC, B"


def test_netmask_details() -> None:
    """A mask with holes and an out-of-range prefix are told apart in the detail."""
    with pytest.raises(ParseError, match="not contiguous"):
        netmask(8, 30).parse("255.0.255.0", BASE)
    with pytest.raises(ParseError, match="/32 is out of range"):
        netmask(8, 30).parse("255.255.255.255", BASE)


def test_prefix_of_netmask() -> None:
    """Contiguous masks give their prefix length, others None."""
    assert prefix_of_netmask(IPv4Address("255.255.255.0")) == 24
    assert prefix_of_netmask(IPv4Address("0.0.0.0")) == 0
    assert prefix_of_netmask(IPv4Address("255.255.255.255")) == 32
    assert prefix_of_netmask(IPv4Address("255.0.0.255")) is None


def test_list_detail_names_bad_item() -> None:
    """A bad list item is named in the error detail, so a long list is easy to fix."""
    with pytest.raises(ParseError, match="'bogus' is not one"):
        list_of(IPV4, "IPv4 addresses").parse("198.18.0.53, bogus", BASE)


def test_host_port_str_brackets_ipv6() -> None:
    """HostPort prints back in host:port form, with IPv6 hosts in brackets, and unpacks."""
    assert str(HostPort("vpn.example.net", 8089)) == "vpn.example.net:8089"
    assert str(HostPort("2001:db8::1", 8089)) == "[2001:db8::1]:8089"
    host, port = HostPort("h", 1)
    assert (host, port) == ("h", 1)


def test_dns_name_trailing_dot_and_length() -> None:
    """A fully qualified name may end in a dot; names over 253 characters are refused."""
    assert is_dns_name("vpn.example.net.")
    assert not is_dns_name(".")
    assert not is_dns_name(".".join(["a" * 63] * 4))
