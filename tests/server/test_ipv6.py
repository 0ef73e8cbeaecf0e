"""Dual stack on the server: the IPv6 lease in ADDR_REPLY, and the forwarder's IPv6 rules."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

from cellvpn.server.service import VPNServerService
from cellvpn.wire import vpn
from tests.server.test_session import Client, ipv4, make_server

DUAL = frozenset({"addr-options", "ipv6"})
V6 = {"srv_vpn.network6": "2001:db8:1::/64"}


def ipv6(src: str, dst: str, payload: bytes = b"x" * 12, nh: int = 17, ext: bytes = b"") -> bytes:
    """An IPv6 packet; ``ext`` (extension headers) goes between the fixed header and the
    payload, and ``nh`` names the first of them."""
    body = ext + payload
    head = struct.pack(
        "!IHBB16s16s",
        0x60000000,
        len(body),
        nh,
        64,
        ipaddress.IPv6Address(src).packed,
        ipaddress.IPv6Address(dst).packed,
    )
    return head + body


def hop_by_hop(next_header: int) -> bytes:
    """An 8-byte hop-by-hop options header (PadN only)."""
    return bytes((next_header, 0, 1, 4, 0, 0, 0, 0))


def syn6(src: str, dst: str, mss: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 6 << 4, 0x02, 500, 0, 0)
    return ipv6(src, dst, tcp + struct.pack("!BBH", 2, 4, mss), nh=6)


def granted(server: VPNServerService, clock: object, caps: frozenset[str] = DUAL) -> Client:
    client = Client(server, clock, caps=caps)  # type: ignore[arg-type]
    client.request()
    client.addr_request()
    return client


def test_a_dual_stack_client_gets_both_addresses(tmp_path: Path) -> None:
    """With network6 and ipv6 agreed: ADDR6 and GATEWAY6 follow the IPv4 options, and IPv6
    DNS servers and routes go with them."""
    server, clock, _ = make_server(
        tmp_path,
        **V6,
        **{"srv_vpn.dns": "198.18.9.1, 2001:db8:1::1", "srv_vpn.routes": "2001:db8:5::/48"},
    )
    client = granted(server, clock)
    reply = vpn.AddrReply.decode(client.s[0].data)
    assert (str(reply.client), str(reply.client6), str(reply.gateway6)) == (
        "198.18.9.2",
        "2001:db8:1::2/64",
        "2001:db8:1::1",
    )
    assert [str(a) for a in reply.dns] == ["198.18.9.1"]
    assert [str(a) for a in reply.dns6] == ["2001:db8:1::1"]
    assert [str(n) for n in reply.routes6] == ["2001:db8:5::/48"]
    assert reply.routes == ()
    assert "ipv6" in client.conn.caps


def test_an_ipv4_only_client_gets_the_same_bytes_as_before(tmp_path: Path) -> None:
    """The same dual-stack server: a client without the ipv6 capability sees no IPv6 option,
    byte for byte what an IPv4-only server sends, and its IPv6 packets are all spoofed."""
    dual, clock, _ = make_server(tmp_path, **V6, **{"srv_vpn.dns": "198.18.9.1, 2001:db8:1::1"})
    plain, clock2, _ = make_server(tmp_path / "p", **{"srv_vpn.dns": "198.18.9.1"})
    a = granted(dual, clock, frozenset({"addr-options"}))
    b = granted(plain, clock2, frozenset({"addr-options"}))
    assert a.s[0].data == b.s[0].data
    assert a.s[0].data == bytes.fromhex("c6120902 c6120901 ffffff00 01020578 0204c6120901")
    assert "ipv6" not in a.conn.caps
    a.send_ip(ipv6("2001:db8:1::2", "2001:db8:5::10"))
    assert a.session.counters.dropped_spoofed == 1


def test_a_server_without_network6_offers_no_ipv6(tmp_path: Path) -> None:
    server, clock, _ = make_server(tmp_path)
    client = granted(server, clock)
    assert "ipv6" not in client.conn.caps
    assert vpn.AddrReply.decode(client.s[0].data).client6 is None


def test_ipv6_source_rules(tmp_path: Path) -> None:
    """Literal rows: the fixed header's source must be the lease, whatever follows it."""
    server, clock, written = make_server(tmp_path, **V6)
    client = granted(server, clock)
    me, other, out, gw = "2001:db8:1::2", "2001:db8:1::3", "2001:db8:5::10", "2001:db8:1::1"
    echo = bytes((128, 0, 0, 0)) + bytes(4)
    hbh_udp, hbh_icmp = hop_by_hop(17), hop_by_hop(58)
    rows = [
        # (packet, reaches the TUN, counter that grows)
        (ipv6(me, out), True, "from_client_packets"),
        (ipv6(other, out), False, "dropped_spoofed"),
        (ipv6("fe80::2", out), False, "dropped_spoofed"),
        (ipv6(other, out, nh=0, ext=hbh_udp), False, "dropped_spoofed"),
        (ipv6(me, out, nh=0, ext=hbh_udp), True, "from_client_packets"),
        (ipv6(me, out)[:-1], False, "dropped_malformed"),
        (ipv6(me, gw), False, "dropped_to_host"),
        (ipv6(me, "ff02::1"), False, "dropped_to_host"),
        (ipv6(me, "fe80::1"), False, "dropped_to_host"),
        (ipv6(me, gw, echo, nh=58), True, "from_client_packets"),
        (ipv6(me, gw, echo, nh=0, ext=hbh_icmp), False, "dropped_to_host"),
    ]
    for pkt, passes, counter in rows:
        before = getattr(client.session.counters, counter)
        count = len(written)
        client.send_ip(pkt)
        assert getattr(client.session.counters, counter) == before + 1, pkt.hex()
        assert (len(written) == count + 1) is passes, pkt.hex()


def test_tun_ipv6_packets_go_to_the_session_holding_the_destination(tmp_path: Path) -> None:
    server, clock, _ = make_server(tmp_path, **V6)
    a, b = granted(server, clock), granted(server, clock)
    a.s.clear()
    b.s.clear()
    server.forwarder.from_tun(
        [
            ipv6("2001:db8:5::10", "2001:db8:1::3"),
            ipv6("2001:db8:5::10", "2001:db8:1::9"),
            ipv4("198.19.0.10", "198.18.9.2"),
        ]
    )
    a.pump()
    b.pump()
    assert [p.data[24:40] for p in b.s] == [ipaddress.IPv6Address("2001:db8:1::3").packed]
    assert [p.data[16:20] for p in a.s] == [ipaddress.IPv4Address("198.18.9.2").packed]
    assert server.forwarder.dropped_no_route == 1


def test_client_to_client_over_ipv6_skips_the_tun(tmp_path: Path) -> None:
    server, clock, written = make_server(tmp_path, **V6)
    a, b = granted(server, clock), granted(server, clock)
    b.s.clear()
    a.send_ip(ipv6("2001:db8:1::2", "2001:db8:1::3"))
    b.pump()
    assert written == [] and len(b.s) == 1


def test_ipv6_syn_mss_is_clamped_both_ways(tmp_path: Path) -> None:
    """MTU 1400: an IPv6 SYN's MSS is lowered to 1340 from the client and from the TUN."""
    server, clock, written = make_server(tmp_path, **V6)
    client = granted(server, clock)
    client.send_ip(syn6("2001:db8:1::2", "2001:db8:5::10", 1440))
    assert struct.unpack_from("!H", written[-1], 62)[0] == 1340
    client.s.clear()
    server.forwarder.from_tun([syn6("2001:db8:5::10", "2001:db8:1::2", 1440)])
    client.pump()
    assert struct.unpack_from("!H", client.s[0].data, 62)[0] == 1340


def test_a_taken_over_session_loses_its_ipv6_route_too(tmp_path: Path) -> None:
    server, clock, _ = make_server(tmp_path, **V6)
    old = Client(server, clock, token=b"t" * 16, caps=DUAL)
    old.request()
    old.addr_request()
    new = Client(server, clock, token=b"t" * 16, caps=DUAL)
    new.request()
    new.addr_request()
    key = ipaddress.IPv6Address("2001:db8:1::2").packed
    assert server.forwarder.routes[key] is new.session
    assert old.session.addr6_key == b""
    new.lose()
    assert key not in server.forwarder.routes


def test_tcpv6_super_packets_from_a_client(tmp_path: Path) -> None:
    """VPN_SEND_GSO with GSO_TCPV6: cut into segments for a plain TUN; a forged source is
    dropped as the segments it stands for."""
    from cellvpn.device import vnet
    from tests.device.test_ipv6 import DST, SRC, tcp6

    server, clock, written = make_server(tmp_path, **V6)
    client = granted(server, clock)
    assert ipaddress.IPv6Address("2001:db8:1::2").packed == SRC
    assert ipaddress.IPv6Address("2001:db8:5::10").packed == DST
    pkt = tcp6(b"y" * 3000, partial=True)
    header = vnet.HEADER.pack(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV6, 60, 1000, 40, 16)
    server.forwarder.from_client_gso(client.session, header + pkt)
    assert [len(p) for p in written] == [1060, 1060, 1060]
    assert client.session.counters.from_client_packets == 3
    forged = pkt[:8] + ipaddress.IPv6Address("2001:db8:1::9").packed + pkt[24:]
    server.forwarder.from_client_gso(client.session, header + forged)
    assert client.session.counters.dropped_spoofed == 3
    assert len(written) == 3
