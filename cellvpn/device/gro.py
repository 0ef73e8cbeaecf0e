"""Receive offload in userspace: consecutive TCP segments of one flow become one super-packet.

A client without offload sends MTU-sized packets. Written to the TUN one by one, each costs a
syscall and a trip through the kernel's stack. When the TUN takes vnet headers, the segments
a batch brings that continue one another (same flow, contiguous sequence numbers, same headers,
plain ACK segments) are joined into one TCPV4 super-packet with a ``virtio_net_hdr``, as the
kernel's own GRO does for a network card. Pure: no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from cellvpn.device import vnet

#: IPv4 fields a segment must share with the one before: tos, ttl, protocol, addresses ...
_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBH")
#: ACK and PSH only: anything else (SYN, FIN, RST, URG, ECE, CWR) ends a run
_PLAIN_FLAGS = 0x10
_FLAGS_ALLOWED = 0x18
MAX_SEGMENTS = 64
MAX_SIZE = 65535

Packet = bytes | memoryview


def _key(pkt: Packet) -> tuple[tuple[object, ...], int, int] | None:
    """(what the segments of one run share, seq, payload length); None: not a TCP segment
    that may be joined."""
    if len(pkt) < 40 or pkt[9] != 6 or pkt[0] != 0x45:  # TCP over IPv4 without options
        return None
    _vhl, tos, total, _id, frag, ttl, proto, _csum, src, dst = _IP.unpack_from(pkt)
    if proto != 6 or frag & 0x3FFF or total != len(pkt):
        return None
    sport, dport, seq, ack, off, flags, window = _TCP.unpack_from(pkt, 20)
    thl = (off >> 4) * 4
    if thl < 20 or flags & ~_FLAGS_ALLOWED or not flags & _PLAIN_FLAGS or len(pkt) < 20 + thl:
        return None
    payload = total - 20 - thl
    if payload <= 0:
        return None
    options = bytes(pkt[40 : 20 + thl])
    shared = (tos, ttl, frag & 0x4000, src, dst, sport, dport, ack, window, thl, options)
    return shared, seq, payload


def coalesce(packets: Sequence[Packet]) -> list[tuple[bytes, Packet, int]]:
    """Group ``packets`` (in order) into writes: (vnet header, packet, segments it stands for).

    Packets that cannot be joined come back alone with the plain header.
    """
    out: list[tuple[bytes, Packet, int]] = []
    run: list[Packet] = []
    shared: tuple[object, ...] = ()
    hdrs = next_seq = mss = size = 0
    last_payload = 0
    for pkt in packets:
        key = _key(pkt)
        if run and key is not None:
            k_shared, seq, payload = key
            if (
                k_shared == shared
                and seq == next_seq
                and last_payload == mss
                and payload <= mss
                and len(run) < MAX_SEGMENTS
                and size + payload <= MAX_SIZE
                and not run[-1][33] & 0x08  # nothing may follow a PSH
            ):
                run.append(pkt)
                size += payload
                last_payload = payload
                next_seq = (seq + payload) & 0xFFFFFFFF
                continue
        if run:
            out.append(_merge(run, hdrs, mss))
            run = []
        if key is None:
            out.append((vnet.PLAIN, pkt, 1))
            continue
        shared, seq, payload = key
        run = [pkt]
        hdrs = 20 + int(shared[9])  # type: ignore[call-overload]
        mss = last_payload = payload
        size = len(pkt)
        next_seq = (seq + payload) & 0xFFFFFFFF
    if run:
        out.append(_merge(run, hdrs, mss))
    return out


def _merge(run: list[Packet], hdrs: int, mss: int) -> tuple[bytes, Packet, int]:
    if len(run) == 1:
        return vnet.PLAIN, run[0], 1
    first = run[0]
    joined = bytearray(first[:hdrs])
    for pkt in run:
        joined += pkt[hdrs:]
    total = len(joined)
    struct.pack_into("!H", joined, 2, total)
    joined[10:12] = b"\0\0"
    struct.pack_into("!H", joined, 10, vnet.checksum(memoryview(joined)[:20]))
    joined[33] |= run[-1][33] & 0x08  # the last segment's PSH
    # CHECKSUM_PARTIAL: the field holds the pseudo-header sum; the stack completes or trusts it
    pseudo = (int.from_bytes(joined[12:20], "big") + 6 + total - 20) % 0xFFFF
    struct.pack_into("!H", joined, 36, pseudo or 0xFFFF)
    header = vnet.HEADER.pack(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, hdrs, mss, 20, 16)
    return header, bytes(joined), len(run)
