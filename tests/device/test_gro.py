"""Userspace receive offload: joined segments split back into exactly what was sent."""

from __future__ import annotations

import os
import socket
import struct

from cellvpn.device import vnet
from cellvpn.device.gro import coalesce


def ones(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def segment(
    seq: int, payload: bytes, ip_id: int, flags: int = 0x10, sport: int = 40000, opts: bytes = b""
) -> bytes:
    src, dst = socket.inet_aton("198.18.5.2"), socket.inet_aton("198.19.0.10")
    thl = 20 + len(opts)
    tcp = bytearray(
        struct.pack("!HHIIBBHHH", sport, 5201, seq, 99, (thl // 4) << 4, flags, 512, 0, 0)
    )
    tcp += opts + payload
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
    struct.pack_into("!H", tcp, 16, ones(pseudo + bytes(tcp)))
    ip = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), ip_id, 0x4000, 64, 6, 0, src, dst)
    )
    struct.pack_into("!H", ip, 10, ones(bytes(ip)))
    return bytes(ip) + bytes(tcp)


def flow(count: int, mss: int = 1388, last: int | None = None, opts: bytes = b"") -> list[bytes]:
    out = []
    seq = 1000
    for i in range(count):
        size = last if (last is not None and i == count - 1) else mss
        flags = 0x18 if i == count - 1 else 0x10
        out.append(segment(seq, os.urandom(size), 7 + i, flags, opts=opts))
        seq += size
    return out


def test_a_run_becomes_one_super_packet_that_splits_back_exactly() -> None:
    """Twenty contiguous segments: one write, and the kernel's split gives the same packets."""
    opts = b"\x01\x01\x08\x0a" + bytes(8)
    sent = flow(20, last=500, opts=opts)
    [(header, pkt, count)] = coalesce(sent)
    assert count == 20
    assert vnet.rebuild_header(header, pkt, 1400) == header
    assert vnet.ip_bytes(header, pkt) == (20, sum(len(p) for p in sent))
    assert vnet.segment(header, pkt) == sent


def test_unjoinable_packets_go_alone_and_in_order() -> None:
    """SYN, a gap, another flow, a short segment in the middle, differing options: separate."""
    a = flow(3)
    syn = segment(1, b"", 1, flags=0x02)
    gap = segment(999_999, os.urandom(1388), 50)
    other = segment(5000, os.urandom(1388), 60, sport=40001)
    # a short segment may end a run, never sit inside one
    short_inside = [
        segment(1, os.urandom(1388), 1),
        segment(1389, os.urandom(100), 2),
        segment(1489, os.urandom(1388), 3),
    ]
    writes = coalesce([*a, syn, gap, other, *short_inside])
    assert [n for _, _, n in writes] == [3, 1, 1, 1, 2, 1]
    assert [h for h, _, _ in writes][1:4] == [vnet.PLAIN] * 3
    assert writes[1][1] == syn and writes[2][1] == gap and writes[3][1] == other


def test_at_most_64_segments_and_64_kib() -> None:
    """A long run is cut to fit one IPv4 packet."""
    writes = coalesce(flow(120, mss=1000))
    assert all(n <= 64 for _, _, n in writes)
    assert all(len(pkt) <= 65535 for _, pkt, _ in writes)
    assert sum(n for _, _, n in writes) == 120


def test_non_tcp_passes_unchanged() -> None:
    """UDP and garbage are written as they came."""
    udp = bytes.fromhex("450000200001000040110000c6120502c613000a9c4000090008000000")
    assert coalesce([udp, b"\x00" * 10]) == [(vnet.PLAIN, udp, 1), (vnet.PLAIN, b"\x00" * 10, 1)]
