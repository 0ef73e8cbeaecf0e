"""IP packet helpers for the forwarding hot path: plain functions on bytes, no objects per packet.

They take ``bytes``, ``bytearray`` or a byte ``memoryview`` and never copy unless they change
something: the common case (any packet that is not a TCP SYN) costs a few index operations.
"""

from __future__ import annotations

from struct import unpack_from

__all__ = [
    "clamp_mss",
    "ipv4_dst",
    "ipv4_src",
    "ipv6_dst",
    "ipv6_src",
    "is_ipv4",
    "is_ipv6",
    "mss6_for_mtu",
    "mss_for_mtu",
]

Packet = bytes | bytearray | memoryview

_TCP = 6
_SYN = 0x02
_MSS_KIND = 2
_IPV4_MIN_MTU = 68
_IPV6_MIN_MTU = 1280


def ipv4_src(pkt: Packet) -> bytes:
    """The source address, as the 4 bytes the route and lease tables are keyed by."""
    return bytes(pkt[12:16])


def ipv4_dst(pkt: Packet) -> bytes:
    """The destination address, as 4 bytes."""
    return bytes(pkt[16:20])


def is_ipv4(pkt: Packet) -> bool:
    """Whether ``pkt`` is exactly one IPv4 packet: a TUN read or a VPN_SEND carries no more."""
    size = len(pkt)
    if size < 20:
        return False
    b0 = pkt[0]
    if b0 >> 4 != 4:
        return False
    ihl = (b0 & 0x0F) << 2
    total: int = unpack_from("!H", pkt, 2)[0]
    return 20 <= ihl <= total == size


def ipv6_src(pkt: Packet) -> bytes:
    """The fixed header's source address, as the 16 bytes the lease table is keyed by."""
    return bytes(pkt[8:24])


def ipv6_dst(pkt: Packet) -> bytes:
    """The fixed header's destination address, as 16 bytes."""
    return bytes(pkt[24:40])


def is_ipv6(pkt: Packet) -> bool:
    """Whether ``pkt`` is exactly one IPv6 packet (its payload length matches; no jumbogram)."""
    size = len(pkt)
    if size < 40 or pkt[0] >> 4 != 6:
        return False
    return (pkt[4] << 8 | pkt[5]) + 40 == size


def mss6_for_mtu(mtu: int) -> int:
    """The largest TCP MSS that fits ``mtu`` over IPv6: 40 bytes of IPv6, 20 of TCP header."""
    if mtu < _IPV6_MIN_MTU:
        raise ValueError(f"MTU {mtu} is below the IPv6 minimum of {_IPV6_MIN_MTU}")
    return mtu - 60


def mss_for_mtu(mtu: int) -> int:
    """The largest TCP MSS that fits ``mtu``: 20 bytes of IPv4 and 20 of TCP header."""
    if mtu < _IPV4_MIN_MTU:
        raise ValueError(f"MTU {mtu} is below the IPv4 minimum of {_IPV4_MIN_MTU}")
    return mtu - 40


def clamp_mss(pkt: Packet, max_mss: int) -> bytes | None:
    """A copy of ``pkt`` with its TCP MSS option lowered to ``max_mss``, or None to keep ``pkt``.

    Only TCP segments with SYN set (SYN and SYN-ACK) whose MSS exceeds ``max_mss`` are changed,
    so peers on both sides of the tunnel pick segments that fit its MTU. IPv4 and IPv6 (TCP
    right after the fixed header) alike; the caller passes the MSS of the packet's family. The
    checksum is updated incrementally (RFC 1624): a valid one stays valid without summing the
    segment again. Anything malformed, non-first fragments and IPv6 packets with extension
    headers are left alone: the receiver judges them.
    """
    size = len(pkt)
    if size < 40:
        return None
    b0 = pkt[0]
    if b0 >> 4 == 6:
        if size < 60 or pkt[6] != _TCP or not pkt[53] & _SYN:
            return None
        ihl = 40
        total = (pkt[4] << 8 | pkt[5]) + 40
        if total > size:
            return None
    else:
        # The cheap test first: protocol, then the TCP flags byte.
        if pkt[9] != _TCP:
            return None
        ihl = (b0 & 0x0F) << 2
        if ihl + 20 > size or not pkt[ihl + 13] & _SYN:
            return None
        if b0 >> 4 != 4 or ihl < 20:
            return None
        total, frag = unpack_from("!H2xH", pkt, 2)  # total length; skip the id; flags+offset
        if frag & 0x1FFF or total > size:
            return None
    tcp_len = ((pkt[ihl + 12] >> 4) << 2) if ihl + 20 <= total else 0
    if tcp_len < 20 or ihl + tcp_len > total:
        return None
    # Walk the options; any malformed length means we leave the whole packet alone.
    i = ihl + 20
    end = ihl + tcp_len
    found: list[int] = []
    while i < end:
        kind = pkt[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end:
            return None
        length = pkt[i + 1]
        if length < 2 or i + length > end:
            return None
        if kind == _MSS_KIND:
            if length != 4:
                return None
            if (pkt[i + 2] << 8 | pkt[i + 3]) > max_mss:
                found.append(i + 2)
        i += length
    if not found:
        return None
    out = bytearray(pkt)
    csum_at = ihl + 16
    csum: int = unpack_from("!H", out, csum_at)[0]
    new = max_mss
    for at in found:
        old = out[at] << 8 | out[at + 1]
        out[at] = new >> 8
        out[at + 1] = new & 0xFF
        if (at - ihl) & 1:
            # An MSS at an odd offset straddles two checksum words: its bytes count swapped.
            old, new_word = _swap(old), _swap(new)
        else:
            new_word = new
        csum = _update(csum, old, new_word)
    out[csum_at] = csum >> 8
    out[csum_at + 1] = csum & 0xFF
    return bytes(out)


def _update(csum: int, old: int, new: int) -> int:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), so a valid checksum stays valid."""
    s = (~csum & 0xFFFF) + (~old & 0xFFFF) + new
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _swap(word: int) -> int:
    return (word >> 8) | ((word & 0xFF) << 8)
