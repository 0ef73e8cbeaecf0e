"""Fuzzing the offload path: vnet headers from peers, segmentation, receive coalescing, MSS.

A peer's ``virtio_net_hdr`` and super-packet reach the kernel only through
:func:`vnet.rebuild_header`, which may refuse with ``OffloadError`` and nothing else; what it
accepts must then segment, count and finish without raising at all (the forwarder calls
those unguarded), into whole IPv4 packets. :func:`gro.coalesce` and :func:`clamp_mss` are
documented never to raise.
"""

from __future__ import annotations

import contextlib
import struct

from hypothesis import given
from hypothesis import strategies as st

from cellvpn.device import vnet
from cellvpn.device.gro import coalesce
from cellvpn.device.packet import clamp_mss, is_ipv4

from . import inputs
from .harness import counted, fuzz

SOURCES = inputs.addresses([bytes([198, 18, 9, 2]), bytes([198, 18, 9, 3])])
MAX_MSS = st.sampled_from([1360, 1460, 8960, 65535])


def _views(pkt: bytes) -> st.SearchStrategy[bytes | memoryview]:
    """The packet as bytes, or as the memoryview slice a channel packet hands over."""
    return st.sampled_from([pkt, memoryview(b"\0" * 20 + pkt)[20:]])


def _payload(pkt: bytes | memoryview) -> bytes:
    ihl, doff = vnet.headers_of(pkt)
    return bytes(pkt[ihl + doff :])


def _tcp_checksum_ok(pkt: bytes) -> bool:
    ihl = (pkt[0] & 0x0F) * 4
    seg = pkt[ihl:]
    field: int = struct.unpack_from("!H", seg, 16)[0]
    return inputs.tcp_checksum(pkt[12:16], pkt[16:20], seg) == field


@fuzz
@given(case=inputs.offloaded(SOURCES), max_mss=MAX_MSS, view=st.booleans())
@counted
def test_peer_offload_header_then_segments(
    case: tuple[bytes, bytes], max_mss: int, view: bool
) -> None:
    """A peer's header and packet: rebuilt or OffloadError; what is rebuilt segments into
    whole IPv4 packets that carry the same bytes, as many as ``ip_bytes`` counts."""
    header, raw = case
    pkt: bytes | memoryview = memoryview(b"\0" + raw)[1:] if view else raw
    try:
        rebuilt = vnet.rebuild_header(header, pkt, max_mss)
    except vnet.OffloadError:
        return
    assert len(rebuilt) == vnet.SIZE
    assert vnet.rebuild_header(rebuilt, pkt, max_mss) == rebuilt, "a rebuilt header is stable"
    flags, gso_type, hdr_len, gso_size, _start, _offset = vnet.HEADER.unpack(rebuilt)
    if rebuilt != vnet.PLAIN:
        assert not vnet.is_fragment(pkt), "a fragment must travel as a plain packet"
    count, size = vnet.ip_bytes(rebuilt, pkt)
    segments = vnet.segment(rebuilt, pkt)
    assert segments and all(isinstance(seg, bytes) for seg in segments)
    for seg in segments:
        assert is_ipv4(seg), "every segment is one whole IPv4 packet"
        assert seg[12:20] == bytes(pkt[12:20]) and seg[9] == pkt[9]
        assert vnet.rebuild_header(vnet.PLAIN, seg, max_mss) == vnet.PLAIN
    if gso_type & ~vnet.GSO_ECN == vnet.GSO_TCPV4:
        assert flags == vnet.F_NEEDS_CSUM and 0 < gso_size <= max_mss
        assert len(segments) == count <= 64
        assert sum(len(seg) for seg in segments) == size
        assert b"".join(_payload(seg) for seg in segments) == _payload(pkt)
        assert all(len(seg) <= hdr_len + gso_size for seg in segments)
        if count > 1:
            assert all(_tcp_checksum_ok(seg) for seg in segments)
    else:
        assert count == 1 and len(segments) == 1 and len(segments[0]) == len(pkt)
    assert vnet.finish_checksum(rebuilt, pkt)[:20] == bytes(pkt[:20])


@fuzz
@given(header=st.binary(min_size=10, max_size=10), pkt=st.binary(min_size=20, max_size=300))
@counted
def test_tun_read_segments_or_offload_error(header: bytes, pkt: bytes) -> None:
    """A TUN read of at least 20 packet bytes (what the forwarder lets through to
    ``segment``): segments or OffloadError; ``ip_bytes`` never raises."""
    count, size = vnet.ip_bytes(header, pkt)
    assert count >= 1 and size >= len(pkt)
    with contextlib.suppress(vnet.OffloadError):
        vnet.segment(header, pkt)


def _split(pkt: bytes | memoryview) -> tuple[bytes, bytes]:
    """(IP and TCP headers, payload) of a packet that coalesce may join."""
    hdrs = 20 + (pkt[32] >> 4) * 4
    return bytes(pkt[:hdrs]), bytes(pkt[hdrs:])


@fuzz
@given(batch=inputs.tcp_flows(SOURCES), views=st.booleans())
@counted
def test_coalesce_joins_only_what_splits_back(batch: list[bytes], views: bool) -> None:
    """Any batch: each packet is written once, in order; a super-packet stands for exactly
    the segments it joined, passes the offload check, and carries their bytes in order."""
    packets: list[bytes | memoryview] = list(batch)
    if views:
        packets = [memoryview(b"\0" * 20 + p)[20:] for p in batch]
    out = coalesce(packets)
    assert sum(n for _h, _p, n in out) == len(batch)
    at = 0
    for header, pkt, n in out:
        joined = batch[at : at + n]
        at += n
        if n == 1:
            assert header == vnet.PLAIN and bytes(pkt) == joined[0]
            continue
        assert len(pkt) <= 65535 and n <= 64
        assert vnet.rebuild_header(header, pkt, 65535) == header
        assert vnet.ip_bytes(header, pkt) == (n, sum(len(p) for p in joined))
        assert bytes(pkt[12:20]) == joined[0][12:20]
        heads = [_split(p)[0] for p in joined]
        assert b"".join(_split(p)[1] for p in joined) == _split(pkt)[1]
        assert all(h[12:20] == heads[0][12:20] for h in heads)
        assert sum(len(seg) for seg in vnet.segment(header, pkt)) == sum(len(p) for p in joined)
    assert at == len(batch)


def _mss_values(pkt: bytes | bytearray | memoryview) -> list[int]:
    """The MSS options of a well-formed TCP header (empty when malformed)."""
    ihl = (pkt[0] & 0x0F) * 4
    end = ihl + (pkt[ihl + 12] >> 4) * 4
    i, found = ihl + 20, []
    while i < min(end, len(pkt)):
        kind = pkt[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end or pkt[i + 1] < 2:
            return []
        if kind == 2 and pkt[i + 1] == 4 and i + 4 <= end:
            found.append(pkt[i + 2] << 8 | pkt[i + 3])
        i += pkt[i + 1]
    return found


@fuzz
@given(
    pkt=inputs.ip_packets(SOURCES),
    trailer=st.binary(max_size=6),
    kind=st.sampled_from(["bytes", "bytearray", "memoryview"]),
    limit=st.one_of(st.integers(0, 0xFFFF), MAX_MSS),
)
@counted
def test_clamp_mss_changes_only_the_mss(pkt: bytes, trailer: bytes, kind: str, limit: int) -> None:
    """Any packet, in any buffer type, with bytes past its total length: None, or a copy of
    the same length differing only in MSS options (now at most ``limit``) and the checksum,
    which stays valid if it was."""
    data = pkt + trailer
    buf: bytes | bytearray | memoryview = data
    if kind == "bytearray":
        buf = bytearray(data)
    elif kind == "memoryview":
        buf = memoryview(b"\0" + data)[1:]
    out = clamp_mss(buf, limit)
    assert bytes(buf) == data, "the input is never changed"
    if out is None:
        return
    assert isinstance(out, bytes) and len(out) == len(data)
    ihl = (data[0] & 0x0F) * 4
    changed = [i for i in range(len(data)) if out[i] != data[i]]
    assert changed, "a copy is returned only when something changed"
    options = range(ihl + 20, ihl + (data[ihl + 12] >> 4) * 4)
    assert all(i in options or i in (ihl + 16, ihl + 17) for i in changed)
    assert data[ihl + 13] & 0x02, "only SYN segments are clamped"
    assert all(v <= limit for v in _mss_values(out))
    total = struct.unpack_from("!H", data, 2)[0]
    if total == len(pkt) == len(data) and _tcp_checksum_ok(data):
        assert _tcp_checksum_ok(out)
