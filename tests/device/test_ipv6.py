"""IPv6 on the packet path: MSS clamping, offload headers and segmentation, from scratch."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from cellvpn.device import vnet
from cellvpn.device.packet import clamp_mss, ipv6_dst, ipv6_src, is_ipv6, mss6_for_mtu

SRC = ipaddress.IPv6Address("2001:db8:1::2").packed
DST = ipaddress.IPv6Address("2001:db8:5::10").packed


def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo(src: bytes, dst: bytes, length: int, nh: int = 6) -> bytes:
    return src + dst + struct.pack("!IxxxB", length, nh)


def tcp6(
    payload: bytes = b"",
    flags: int = 0x18,
    options: bytes = b"",
    seq: int = 1000,
    partial: bool = False,
    nh: int = 6,
) -> bytes:
    """IPv6/TCP; with ``partial`` the checksum field holds the pseudo-header sum (TSO)."""
    doff = (20 + len(options)) // 4
    tcp = bytearray(struct.pack("!HHIIBBHHH", 40000, 5201, seq, 7, doff << 4, flags, 500, 0, 0))
    seg = bytearray(tcp + options + payload)
    ph = pseudo(SRC, DST, len(seg))
    value = (~ones_sum(ph)) & 0xFFFF if partial else ones_sum(ph + bytes(seg))
    struct.pack_into("!H", seg, 16, value)
    ip = struct.pack("!IHBB16s16s", 0x60000000, len(seg), nh, 64, SRC, DST)
    return ip + bytes(seg)


def verifies6(pkt: bytes) -> bool:
    seg = pkt[40:]
    return ones_sum(pseudo(pkt[8:24], pkt[24:40], len(seg)) + seg) == 0


def mss_option(value: int) -> bytes:
    return struct.pack("!BBH", 2, 4, value)


def test_addresses_and_shape() -> None:
    """The fixed header's addresses are 16-byte keys; a packet is whole when its payload
    length says so."""
    pkt = tcp6(b"x" * 10)
    assert ipv6_src(pkt) == SRC and ipv6_dst(pkt) == DST
    assert is_ipv6(pkt)
    assert not is_ipv6(pkt + b"\0")
    assert not is_ipv6(pkt[:39])
    assert not is_ipv6(b"\x45" + pkt[1:])


@pytest.mark.parametrize(("mtu", "mss"), [(1280, 1220), (1400, 1340), (1500, 1440)])
def test_mss6_for_mtu(mtu: int, mss: int) -> None:
    assert mss6_for_mtu(mtu) == mss


def test_mss6_below_the_ipv6_minimum_mtu() -> None:
    with pytest.raises(ValueError, match="1280"):
        mss6_for_mtu(1279)


def test_ipv6_syn_mss_is_clamped_and_the_checksum_verifies() -> None:
    before = tcp6(flags=0x02, options=mss_option(1460))
    after = clamp_mss(before, 1340)
    assert after is not None
    assert struct.unpack_from("!H", after, 62)[0] == 1340
    assert verifies6(after)
    assert after[:40] == before[:40]


@pytest.mark.parametrize(
    ("pkt", "why"),
    [
        (tcp6(flags=0x10, options=mss_option(1460)), "not a SYN"),
        (tcp6(flags=0x02, options=mss_option(1200)), "MSS already small"),
        (tcp6(flags=0x02, options=mss_option(1460), nh=0), "an extension header first"),
        (tcp6(flags=0x02, options=mss_option(1460))[:-1], "cut short"),
    ],
)
def test_ipv6_packets_left_alone(pkt: bytes, why: str) -> None:
    assert clamp_mss(pkt, 1340) is None, why


def test_tcpv6_super_packet_is_cut_into_valid_segments() -> None:
    payload = bytes(range(256)) * 20  # 5120 bytes
    pkt = tcp6(payload, flags=0x19, partial=True)  # ACK PSH FIN
    header = vnet.HEADER.pack(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV6, 60, 1000, 40, 16)
    rebuilt = vnet.rebuild_header(header, pkt, 1340)
    assert rebuilt == vnet.HEADER.pack(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV6, 60, 1000, 40, 16)
    assert vnet.ip_bytes(rebuilt, pkt) == (6, len(pkt) + 5 * 60)
    segments = vnet.segment(rebuilt, pkt)
    assert [len(s) - 60 for s in segments] == [1000] * 5 + [120]
    assert all(verifies6(s) for s in segments)
    assert all(struct.unpack_from("!H", s, 4)[0] == len(s) - 40 for s in segments)
    assert b"".join(s[60:] for s in segments) == payload
    seqs = [struct.unpack_from("!I", s, 44)[0] for s in segments]
    assert seqs == [1000 + i * 1000 for i in range(6)]
    assert [s[53] for s in segments] == [0x10] * 5 + [0x19]


def test_ipv6_checksum_offload_is_finished() -> None:
    pkt = tcp6(b"hello", partial=True)
    header = vnet.HEADER.pack(vnet.F_NEEDS_CSUM, vnet.GSO_NONE, 0, 0, 40, 16)
    assert vnet.rebuild_header(header, pkt, 1340) == header
    assert verifies6(vnet.finish_checksum(header, pkt))


def _hdr(flags: int, gso: int, size: int = 1000, start: int = 40, offset: int = 16) -> bytes:
    return vnet.HEADER.pack(flags, gso, 0, size, start, offset)


@pytest.mark.parametrize(
    ("header", "pkt", "why"),
    [
        (_hdr(1, vnet.GSO_TCPV4), tcp6(b"x" * 3000, partial=True), "TCPV4 on an IPv6 packet"),
        (_hdr(0, vnet.GSO_TCPV6), tcp6(b"x" * 3000, partial=True), "no NEEDS_CSUM"),
        (_hdr(1, vnet.GSO_TCPV6, 2000), tcp6(b"x" * 3000, partial=True), "size above the MSS"),
        (_hdr(1, vnet.GSO_TCPV6), tcp6(b"x" * 3000, partial=True, nh=0), "extension header"),
        (_hdr(1, vnet.GSO_NONE, 0, 40, 6), tcp6(b"x", partial=True), "UDP offset on TCP"),
        (_hdr(1, vnet.GSO_NONE, 0, 20, 16), tcp6(b"x", partial=True), "IPv4 csum_start"),
        (_hdr(1, vnet.GSO_TCPV6), tcp6(b"x" * 3000, partial=True)[:-1], "length lies"),
    ],
)
def test_ipv6_offload_headers_refused(header: bytes, pkt: bytes, why: str) -> None:
    with pytest.raises(vnet.OffloadError):
        vnet.rebuild_header(header, pkt, 1340)


def test_ipv6_syn_is_seen() -> None:
    assert vnet.is_tcp_syn(tcp6(flags=0x02, options=mss_option(1460)))
    assert not vnet.is_tcp_syn(tcp6(flags=0x10, options=mss_option(1460)))
    assert not vnet.is_tcp_syn(tcp6(flags=0x02, options=mss_option(1460), nh=0))
