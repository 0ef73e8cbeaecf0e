"""``to_host``: what a client may reach on the server host itself, rule by rule."""

from __future__ import annotations

import socket
import struct

import pytest

from cellvpn.device.tohost import RuleError, ToHost, ToHostRules

GW, UNDERLAY, DNS_HOST = "198.18.5.1", "192.0.2.1", "198.18.5.1"


def packet(proto: int, dst: str, port: int = 0, icmp_type: int = 8, frag: int = 0) -> bytes:
    if proto == 1:
        body = struct.pack("!BBHHH", icmp_type, 0, 0, 1, 1)
    else:
        body = struct.pack("!HH", 40000, port) + bytes(16)
    total = 20 + len(body)
    head = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, 1, frag, 64, proto, 0,
        socket.inet_aton("198.18.5.7"), socket.inet_aton(dst),
    )  # fmt: skip
    return head + body


DEFAULT = ToHost(ToHostRules.parse(["icmp", "dns"]), [GW, UNDERLAY], [DNS_HOST])
IPERF = ToHost(ToHostRules.parse(["icmp", "tcp:5201", "udp:5201"]), [GW, UNDERLAY])


@pytest.mark.parametrize(
    ("guard", "pkt", "allowed"),
    [
        (DEFAULT, packet(1, GW), True),  # ping the gateway
        (DEFAULT, packet(1, GW, icmp_type=13), False),  # timestamp request
        (DEFAULT, packet(1, UNDERLAY), True),
        (DEFAULT, packet(17, DNS_HOST, 53), True),
        (DEFAULT, packet(6, DNS_HOST, 53), True),
        (DEFAULT, packet(17, UNDERLAY, 53), False),  # not offered as DNS
        (DEFAULT, packet(6, GW, 22), False),
        (DEFAULT, packet(6, UNDERLAY, 8089), False),  # the server's own port, from inside
        (DEFAULT, packet(17, GW, 9), False),
        (DEFAULT, packet(47, GW), False),  # GRE
        (DEFAULT, packet(17, DNS_HOST, 53, frag=0x2000), False),  # a fragment names no port
        (IPERF, packet(6, GW, 5201), True),
        (IPERF, packet(17, GW, 5201), True),
        (IPERF, packet(17, GW, 53), False),  # dns not listed
        (IPERF, packet(6, GW, 5202), False),
    ],
)
def test_rules(guard: ToHost, pkt: bytes, allowed: bool) -> None:
    assert guard.allows(pkt) is allowed


def test_only_host_addresses_are_keys_and_dns_must_be_one() -> None:
    guard = ToHost(ToHostRules.parse(["dns"]), [GW, "2001:db8::1", "bad"], ["198.18.9.9", GW])
    assert guard.addresses == {
        socket.inet_aton(GW),
        socket.inet_pton(socket.AF_INET6, "2001:db8::1"),
    }
    assert guard.dns == {socket.inet_aton(GW)}


@pytest.mark.parametrize(
    ("items", "rendered"),
    [
        (["none"], ["none"]),
        (["ICMP", " dns "], ["icmp", "dns"]),
        (["udp:5201", "tcp:5201", "all"], ["tcp:5201", "udp:5201", "all"]),
    ],
)
def test_parse_and_render(items: list[str], rendered: list[str]) -> None:
    assert ToHostRules.parse(items).render() == rendered
    assert ToHost(ToHostRules.parse(["all"])).allows(packet(6, GW, 22))


@pytest.mark.parametrize("item", ["tcp:0", "tcp:65536", "udp:x", "ssh", "tcp"])
def test_bad_rules_are_refused(item: str) -> None:
    with pytest.raises(RuleError):
        ToHostRules.parse([item])
