"""Helpers for the real-TUN tests: entering a test namespace, configuring, answering pings."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager

from pyroute2 import IPRoute
from pyroute2 import netns as pyr_netns

from cellvpn.tun.port import TunPort

TUN_ADDR = "198.18.77.1"
PEER_ADDR = "198.18.77.2"  # on the TUN's /24: the kernel routes echo requests into the TUN


@contextmanager
def inside(ns_name: str) -> Iterator[None]:
    """Run the block in ``ns_name`` (this thread only), then come back, also on errors.

    The current namespace is saved first and ``setns`` gets ``flags=0``, so a missing namespace
    is an error instead of being created, and the way back is restored whatever fails.
    """
    pyr_netns.pushns()
    try:
        pyr_netns.setns(ns_name, flags=0)
        yield
    finally:
        pyr_netns.popns()


def configure(ns_name: str, ifname: str, mtu: int = 1400) -> None:
    """Address, MTU and up, through netlink in the namespace (run it in a thread)."""
    with IPRoute(netns=ns_name, flags=0) as ipr:
        (idx,) = ipr.link_lookup(ifname=ifname)
        ipr.link("set", index=idx, mtu=mtu)
        ipr.addr("add", index=idx, address=TUN_ADDR, prefixlen=24)
        ipr.link("set", index=idx, state="up")


def inet_checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_reply(packet: bytes) -> bytes | None:
    """The echo reply to an IPv4 ICMP echo request, or None for any other packet."""
    if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != 1:
        return None
    ihl = (packet[0] & 0x0F) * 4
    total = struct.unpack_from("!H", packet, 2)[0]
    if packet[ihl] != 8 or total > len(packet) or total < ihl + 8:
        return None
    out = bytearray(packet[:total])
    out[12:16], out[16:20] = packet[16:20], packet[12:16]
    out[ihl] = 0  # echo reply
    out[ihl + 2 : ihl + 4] = b"\0\0"
    struct.pack_into("!H", out, ihl + 2, inet_checksum(out[ihl:]))
    out[10:12] = b"\0\0"
    struct.pack_into("!H", out, 10, inet_checksum(out[:ihl]))
    return bytes(out)


class EchoResponder:
    """An ``on_packets`` callback that answers pings through its port, one write per batch."""

    def __init__(self) -> None:
        self.port: TunPort | None = None
        self.batches: list[int] = []
        self.replies = 0

    def __call__(self, batch: list[bytes]) -> None:
        self.batches.append(len(batch))
        replies = [r for r in map(echo_reply, batch) if r is not None]
        assert self.port is not None
        self.replies += self.port.write_many(replies)
