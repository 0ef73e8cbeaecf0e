"""Offload headers: validation, segmentation and checksum completion, checked from scratch."""

from __future__ import annotations

import os
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellvpn.device import vnet


def ones_sum(data: bytes) -> int:
    """The reference checksum: a plain loop over 16-bit words."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_packet(payload: bytes, flags: int = 0x18, seq: int = 1000, partial: bool = True) -> bytes:
    """IPv4/TCP with the TCP checksum field holding the pseudo-header sum (as a TSO read)."""
    src, dst = socket.inet_aton("198.18.5.2"), socket.inet_aton("198.19.0.10")
    options = b"\x01\x01\x08\x0a" + bytes(8)  # NOP NOP timestamps: a 32-byte TCP header
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 7, (8 << 4), flags, 500, 0, 0) + options
    total = 20 + len(tcp) + len(payload)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0x1234, 0x4000, 64, 6, 0, src, dst))
    struct.pack_into("!H", ip, 10, ones_sum(bytes(ip)))
    seg = bytearray(tcp + payload)
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(seg))
    if partial:
        # the kernel leaves the (uncomplemented) pseudo-header sum for the device
        total_sum = (~ones_sum(pseudo)) & 0xFFFF
        struct.pack_into("!H", seg, 16, total_sum)
    else:
        struct.pack_into("!H", seg, 16, ones_sum(pseudo + bytes(seg)))
    return bytes(ip) + bytes(seg)


def verifies(pkt: bytes) -> bool:
    ihl = (pkt[0] & 0xF) * 4
    if ones_sum(pkt[:ihl]) != 0:
        return False
    seg = pkt[ihl:]
    pseudo = pkt[12:20] + struct.pack("!BBH", 0, 6, len(seg))
    return ones_sum(pseudo + seg) == 0


def gso_header(gso_size: int) -> bytes:
    return vnet.HEADER.pack(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 52, gso_size, 20, 16)


def test_checksum_matches_the_reference() -> None:
    """The fast checksum equals a word-by-word loop, odd lengths and zero cases included."""
    for data in (b"", b"\0\0", b"\xff\xff", b"\x01", os.urandom(1401), os.urandom(64)):
        assert vnet.checksum(data) == ones_sum(data)


@given(st.binary(max_size=3000))
@settings(max_examples=300)
def test_checksum_property(data: bytes) -> None:
    """Any bytes: the same result as the reference loop."""
    assert vnet.checksum(data) == ones_sum(data)


def test_segmentation_gives_valid_segments_with_the_same_bytes() -> None:
    """A 64 KiB super-packet: segments with right lengths, ids, seq, flags, checksums."""
    payload = os.urandom(60000)
    pkt = tcp_packet(payload, flags=0x18 | 0x01)  # PSH FIN
    segs = vnet.segment(gso_header(1388), pkt)
    assert len(segs) == -(-60000 // 1388)
    assert b"".join(s[52:] for s in segs) == payload
    for i, s in enumerate(segs):
        assert verifies(s), i
        assert struct.unpack_from("!H", s, 2)[0] == len(s)
        assert struct.unpack_from("!H", s, 4)[0] == 0x1234 + i
        assert struct.unpack_from("!I", s, 24)[0] == 1000 + i * 1388
        last = i == len(segs) - 1
        assert bool(s[33] & 0x09) == last
    packets, size = vnet.ip_bytes(gso_header(1388), pkt)
    assert packets == len(segs) and size == sum(len(s) for s in segs)


def test_finishing_a_partial_checksum() -> None:
    """NEEDS_CSUM without GSO: the checksum is completed and verifies."""
    pkt = tcp_packet(b"hello")
    assert not verifies(pkt)
    header = vnet.HEADER.pack(vnet.F_NEEDS_CSUM, 0, 0, 0, 20, 16)
    [done] = vnet.segment(header, pkt)
    assert verifies(done) and done[52:] == b"hello"


def test_rebuild_accepts_good_headers_and_ignores_the_peers_offsets() -> None:
    """A super-packet's header is rebuilt from the packet: hdr_len, csum fields are ours."""
    pkt = tcp_packet(os.urandom(5000))
    lying = vnet.HEADER.pack(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 9999, 1388, 3, 7)
    rebuilt = vnet.rebuild_header(lying, pkt, 1400)
    assert vnet.HEADER.unpack(rebuilt) == (vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 52, 1388, 20, 16)
    assert vnet.rebuild_header(vnet.PLAIN, tcp_packet(b"x", partial=False), 1400) == vnet.PLAIN


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (vnet.HEADER.pack(0x10, 0, 0, 0, 0, 0), "unknown flags"),
        (vnet.HEADER.pack(vnet.F_NEEDS_CSUM, 4, 0, 1388, 20, 16), "TCPV6 on IPv4"),
        (vnet.HEADER.pack(vnet.F_NEEDS_CSUM, 3, 0, 1388, 20, 6), "UFO"),
        (vnet.HEADER.pack(0, vnet.GSO_TCPV4, 0, 1388, 20, 16), "GSO without NEEDS_CSUM"),
        (vnet.HEADER.pack(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 0, 0, 20, 16), "gso_size 0"),
        (vnet.HEADER.pack(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 0, 9000, 20, 16), "gso over MSS"),
        (vnet.HEADER.pack(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 0, 10, 20, 16), "too many"),
        (vnet.HEADER.pack(vnet.F_NEEDS_CSUM, 0, 0, 0, 24, 16), "csum_start wrong"),
        (vnet.HEADER.pack(vnet.F_NEEDS_CSUM, 0, 0, 0, 20, 40), "csum_offset wrong"),
    ],
)
def test_rebuild_refuses_bad_headers(header: bytes, why: str) -> None:
    """Headers that must never reach the kernel are refused."""
    with pytest.raises(vnet.OffloadError):
        vnet.rebuild_header(header, tcp_packet(os.urandom(5000)), 1400)


def test_rebuild_refuses_a_packet_whose_length_lies() -> None:
    """The IPv4 total length must equal the packet's."""
    pkt = tcp_packet(b"abc")
    with pytest.raises(vnet.OffloadError):
        vnet.rebuild_header(vnet.PLAIN, pkt + b"x", 1400)


@given(st.binary(min_size=10, max_size=10), st.binary(max_size=200))
@settings(max_examples=500)
def test_rebuild_never_raises_anything_else(header: bytes, pkt: bytes) -> None:
    """Arbitrary header and packet: a header or OffloadError, nothing else."""
    try:
        out = vnet.rebuild_header(header, pkt, 1400)
    except vnet.OffloadError:
        return
    assert len(out) == vnet.SIZE


@pytest.mark.parametrize(
    ("frag", "name"),
    [(0x2000, "MF"), (0x0001, "offset"), (0x2001, "MF and offset")],
)
def test_a_fragment_carries_no_offload_header(frag: int, name: str) -> None:
    """A TCPV4 super-packet with MF set was cut into segments that each said MF; a checksum
    offload on a fragment skipped the check. Fragments travel as plain packets only."""
    pkt = bytearray(tcp_packet(os.urandom(3000)))
    struct.pack_into("!H", pkt, 6, frag)
    with pytest.raises(vnet.OffloadError, match="fragment"):
        vnet.rebuild_header(gso_header(1400), bytes(pkt), 1400)
    csum_only = vnet.HEADER.pack(vnet.F_NEEDS_CSUM, 0, 0, 0, 20, 16)
    with pytest.raises(vnet.OffloadError, match="fragment"):
        vnet.rebuild_header(csum_only, bytes(pkt), 1400)
    assert vnet.rebuild_header(vnet.PLAIN, bytes(pkt), 1400) == vnet.PLAIN
