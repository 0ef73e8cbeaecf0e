"""Large-packet offload: the ``virtio_net_hdr`` that a TUN opened with IFF_VNET_HDR uses.

With ``TUNSETOFFLOAD(CSUM | TSO4 | TSO6)`` one read returns a 10-byte header and a TCP
"super-packet" of up to 64 KiB that stands for many MSS-sized segments, and a packet whose TCP
checksum is left for the device to finish. cellvpn carries such a packet whole to a peer that
agreed to the ``offload`` capability, and cuts it into real segments (lengths, ids and
checksums right) for a peer that did not. Everything here is pure: bytes in, bytes out.

Header (host byte order, little-endian here)::

    u8 flags        NEEDS_CSUM 1, DATA_VALID 2
    u8 gso_type     NONE 0, TCPV4 1, UDP 3, TCPV6 4, UDP_L4 5; ECN 0x80
    u16 hdr_len     bytes of headers in each segment
    u16 gso_size    payload bytes per segment (the MSS)
    u16 csum_start  where the checksum's coverage starts
    u16 csum_offset where the checksum sits, from csum_start

A header that comes from a peer is never passed on as it is: :func:`rebuild_header` checks the
packet and writes a header of its own, taking only ``gso_size`` from the peer (within bounds).
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("<BBHHHH")
SIZE = HEADER.size  # 10

F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
GSO_ECN = 0x80

#: A header for a plain, complete packet.
PLAIN = HEADER.pack(0, GSO_NONE, 0, 0, 0, 0)

_IP_ID = struct.Struct("!H")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class OffloadError(ValueError):
    """A header or packet that must not reach the kernel."""


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum (RFC 1071) of ``data``.

    A big integer in base 2**16 is congruent to the sum of its digits modulo 0xFFFF, which is
    the one's complement sum: one C-speed conversion instead of a Python loop over words.
    """
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = int.from_bytes(data, "big") % 0xFFFF + initial % 0xFFFF
    total %= 0xFFFF
    if total == 0 and (initial or any(data)):
        total = 0xFFFF
    return ~total & 0xFFFF


def _pseudo_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    return (int.from_bytes(src + dst, "big") + proto + length) % 0xFFFF


def headers_of(pkt: bytes | memoryview) -> tuple[int, int]:
    """(IP header length, TCP header length) of an IPv4 TCP packet, or of an IPv6 one whose
    TCP header follows the fixed header (no extension headers); OffloadError otherwise."""
    if len(pkt) >= 40 and pkt[0] >> 4 == 6:
        if pkt[6] != 6 or len(pkt) < 60:
            raise OffloadError("not an IPv6 TCP packet without extension headers")
        doff = (pkt[52] >> 4) * 4
        if doff < 20 or len(pkt) < 40 + doff:
            raise OffloadError("bad TCP header length")
        return 40, doff
    if len(pkt) < 20 or pkt[0] >> 4 != 4:
        raise OffloadError("not an IPv4 packet")
    ihl = (pkt[0] & 0x0F) * 4
    if ihl < 20 or pkt[9] != 6 or len(pkt) < ihl + 20:
        raise OffloadError("not an IPv4 TCP packet")
    doff = (pkt[ihl + 12] >> 4) * 4
    if doff < 20 or len(pkt) < ihl + doff:
        raise OffloadError("bad TCP header length")
    return ihl, doff


def segment_count(pkt_len: int, hdr_len: int, gso_size: int) -> int:
    payload = pkt_len - hdr_len
    return max(1, -(-payload // gso_size)) if gso_size else 1


def ip_bytes(header: bytes | memoryview, pkt: bytes | memoryview) -> tuple[int, int]:
    """(packets, IP bytes) a packet stands for: a super-packet counts as its segments."""
    _flags, gso_type, _hdr_len, gso_size, _cs, _co = HEADER.unpack_from(header)
    if gso_type & ~GSO_ECN == GSO_NONE or gso_size == 0:
        return 1, len(pkt)
    try:
        ihl, doff = headers_of(pkt)
    except OffloadError:
        return 1, len(pkt)
    hdrs = ihl + doff
    n = segment_count(len(pkt), hdrs, gso_size)
    return n, len(pkt) + (n - 1) * hdrs


def rebuild_header(header: bytes | memoryview, pkt: bytes | memoryview, max_mss: int) -> bytes:
    """A safe header for ``pkt`` from a peer's ``header``; OffloadError if it cannot be one.

    Accepted: a plain packet (no flags), a packet whose TCP or UDP checksum is left to finish
    (NEEDS_CSUM), and a TCP super-packet: TCPV4 for IPv4, TCPV6 for IPv6 (TCP right after the
    fixed header). The IP length must match the packet, and a super-packet's segment size must
    lie in 1..max_mss and cut it into at most 64 segments.
    """
    if len(header) != SIZE:
        raise OffloadError(f"vnet header of {len(header)} bytes")
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = HEADER.unpack(header)
    if flags & ~(F_NEEDS_CSUM | F_DATA_VALID):
        raise OffloadError(f"unknown vnet flags {flags:#x}")
    size = len(pkt)
    if size >= 40 and pkt[0] >> 4 == 6:
        return _rebuild6(flags, gso_type, gso_size, csum_start, csum_offset, pkt, max_mss)
    if size < 20 or pkt[0] >> 4 != 4 or (pkt[2] << 8 | pkt[3]) != size:
        raise OffloadError("not a whole IPv4 or IPv6 packet")
    ihl = (pkt[0] & 0x0F) * 4
    if ihl < 20 or size < ihl:
        raise OffloadError("bad IPv4 header length")
    kind = gso_type & ~GSO_ECN
    if kind == GSO_NONE and not flags & F_NEEDS_CSUM:
        return PLAIN
    if is_fragment(pkt):
        # one rule on every path: a fragment travels as a plain packet only (its L4 checksum
        # spans the whole datagram, and cutting it into segments would repeat MF on each)
        raise OffloadError("a fragment cannot carry an offload header")
    if kind == GSO_NONE:
        proto = pkt[9]
        if proto == 6:
            offset, need = 16, 20
        elif proto == 17:
            offset, need = 6, 8
        else:
            raise OffloadError(f"checksum offload for protocol {proto}")
        if csum_start != ihl or csum_offset != offset or size < ihl + need:
            raise OffloadError("checksum offload fields do not match the packet")
        return HEADER.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, ihl, offset)
    if kind != GSO_TCPV4:
        raise OffloadError(f"GSO type {gso_type:#x} is not carried")
    if not flags & F_NEEDS_CSUM:
        raise OffloadError("a TCP super-packet must leave its checksum to the device")
    ihl, doff = headers_of(pkt)
    hdrs = ihl + doff
    if not 0 < gso_size <= max_mss:
        raise OffloadError(f"segment size {gso_size} outside 1..{max_mss}")
    if segment_count(size, hdrs, gso_size) > 64:
        raise OffloadError("super-packet of more than 64 segments")
    return HEADER.pack(F_NEEDS_CSUM, gso_type, hdrs, gso_size, ihl, 16)


def _rebuild6(
    flags: int,
    gso_type: int,
    gso_size: int,
    csum_start: int,
    csum_offset: int,
    pkt: bytes | memoryview,
    max_mss: int,
) -> bytes:
    """``rebuild_header`` for an IPv6 packet: offload only with TCP or UDP right after the
    fixed header, so no extension header (a fragment header among them) rides on it."""
    size = len(pkt)
    if (pkt[4] << 8 | pkt[5]) + 40 != size:
        raise OffloadError("not a whole IPv6 packet")
    kind = gso_type & ~GSO_ECN
    if kind == GSO_NONE and not flags & F_NEEDS_CSUM:
        return PLAIN
    if kind == GSO_NONE:
        proto = pkt[6]
        if proto == 6:
            offset, need = 16, 20
        elif proto == 17:
            offset, need = 6, 8
        else:
            raise OffloadError(f"checksum offload for IPv6 next header {proto}")
        if csum_start != 40 or csum_offset != offset or size < 40 + need:
            raise OffloadError("checksum offload fields do not match the packet")
        return HEADER.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, 40, offset)
    if kind != GSO_TCPV6:
        raise OffloadError(f"GSO type {gso_type:#x} is not carried for IPv6")
    if not flags & F_NEEDS_CSUM:
        raise OffloadError("a TCP super-packet must leave its checksum to the device")
    ihl, doff = headers_of(pkt)
    hdrs = ihl + doff
    if not 0 < gso_size <= max_mss:
        raise OffloadError(f"segment size {gso_size} outside 1..{max_mss}")
    if segment_count(size, hdrs, gso_size) > 64:
        raise OffloadError("super-packet of more than 64 segments")
    return HEADER.pack(F_NEEDS_CSUM, gso_type, hdrs, gso_size, 40, 16)


def finish_checksum(header: bytes | memoryview, pkt: bytes | memoryview) -> bytes:
    """A plain packet whose NEEDS_CSUM checksum is complete (for a peer without offload)."""
    flags, _g, _h, _s, start, offset = HEADER.unpack_from(header)
    if not flags & F_NEEDS_CSUM:
        return bytes(pkt)
    out = bytearray(pkt)
    where = start + offset
    # the device adds the partial sum already in the field (the pseudo-header) to the rest
    out[where : where + 2] = b"\0\0"
    partial = int.from_bytes(pkt[where : where + 2], "big")
    value = checksum(memoryview(out)[start:], partial)
    if value == 0 and (out[6] if out[0] >> 4 == 6 else out[9]) == 17:
        value = 0xFFFF
    out[where : where + 2] = _U16.pack(value)
    return bytes(out)


def segment(header: bytes | memoryview, pkt: bytes | memoryview) -> list[bytes]:
    """Cut a TCPV4 or TCPV6 super-packet into complete segments; other packets come back
    finished."""
    _flags, gso_type, _h, gso_size, _cs, _co = HEADER.unpack_from(header)
    if gso_type & ~GSO_ECN not in (GSO_TCPV4, GSO_TCPV6) or gso_size == 0:
        return [finish_checksum(header, pkt)]
    ihl, doff = headers_of(pkt)
    if pkt[0] >> 4 == 6:
        return _segment6(gso_size, doff, bytes(pkt))
    hdrs = ihl + doff
    pkt = bytes(pkt)
    payload = memoryview(pkt)[hdrs:]
    if len(payload) <= gso_size:
        return [finish_checksum(HEADER.pack(F_NEEDS_CSUM, 0, 0, 0, ihl, 16), pkt)]
    ip_head = bytearray(pkt[:ihl])
    tcp_head = bytearray(pkt[ihl:hdrs])
    src, dst = pkt[12:16], pkt[16:20]
    ip_id = _IP_ID.unpack_from(pkt, 4)[0]
    seq = _U32.unpack_from(pkt, ihl + 4)[0]
    tcp_flags = tcp_head[13]
    out: list[bytes] = []
    count = segment_count(len(pkt), hdrs, gso_size)
    for i in range(count):
        chunk = payload[i * gso_size : (i + 1) * gso_size]
        total = hdrs + len(chunk)
        last = i == count - 1
        ip = ip_head.copy()
        _U16.pack_into(ip, 2, total)
        _IP_ID.pack_into(ip, 4, (ip_id + i) & 0xFFFF)
        ip[10:12] = b"\0\0"
        _U16.pack_into(ip, 10, checksum(ip))
        tcp = tcp_head.copy()
        _U32.pack_into(tcp, 4, (seq + i * gso_size) & 0xFFFFFFFF)
        flags_i = tcp_flags
        if not last:
            flags_i &= ~0x09  # FIN and PSH only on the last segment
        if i:
            flags_i &= ~0x80  # CWR only on the first
        tcp[13] = flags_i
        tcp[16:18] = b"\0\0"
        length = doff + len(chunk)
        pseudo = _pseudo_sum(src, dst, 6, length)
        body = bytes(tcp) + chunk
        _U16.pack_into(tcp, 16, checksum(body, pseudo))
        out.append(bytes(ip) + bytes(tcp) + bytes(chunk))
    return out


def _segment6(gso_size: int, doff: int, pkt: bytes) -> list[bytes]:
    """``segment`` for IPv6: the payload length per segment, and no header checksum or id."""
    hdrs = 40 + doff
    payload = memoryview(pkt)[hdrs:]
    if len(payload) <= gso_size:
        return [finish_checksum(HEADER.pack(F_NEEDS_CSUM, 0, 0, 0, 40, 16), pkt)]
    ip_head = bytearray(pkt[:40])
    tcp_head = bytearray(pkt[40:hdrs])
    addresses = pkt[8:40]
    seq = _U32.unpack_from(pkt, 44)[0]
    tcp_flags = tcp_head[13]
    out: list[bytes] = []
    count = segment_count(len(pkt), hdrs, gso_size)
    for i in range(count):
        chunk = payload[i * gso_size : (i + 1) * gso_size]
        length = doff + len(chunk)
        ip = ip_head.copy()
        _U16.pack_into(ip, 4, length)
        tcp = tcp_head.copy()
        _U32.pack_into(tcp, 4, (seq + i * gso_size) & 0xFFFFFFFF)
        flags_i = tcp_flags
        if i != count - 1:
            flags_i &= ~0x09  # FIN and PSH only on the last segment
        if i:
            flags_i &= ~0x80  # CWR only on the first
        tcp[13] = flags_i
        tcp[16:18] = b"\0\0"
        pseudo = _pseudo_sum(addresses[:16], addresses[16:], 6, length)
        _U16.pack_into(tcp, 16, checksum(bytes(tcp) + chunk, pseudo))
        out.append(bytes(ip) + bytes(tcp) + bytes(chunk))
    return out


def is_fragment(pkt: bytes | memoryview) -> bool:
    """An IPv4 fragment: More Fragments set, or a fragment offset (the first fragment too)."""
    return bool(pkt[6] & 0x3F or pkt[7])


def is_tcp_syn(pkt: bytes | memoryview) -> bool:
    """A TCP segment with SYN set (whose MSS may need clamping), over IPv4 or right after an
    IPv6 fixed header."""
    if len(pkt) >= 60 and pkt[0] >> 4 == 6:
        return pkt[6] == 6 and bool(pkt[53] & 0x02)
    if len(pkt) < 40 or pkt[9] != 6:
        return False
    ihl = (pkt[0] & 0x0F) * 4
    return len(pkt) > ihl + 13 and bool(pkt[ihl + 13] & 0x02)
