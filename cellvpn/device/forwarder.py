"""Moving IP packets between the server's TUN and its sessions, with no I/O of its own.

The forwarder owns the table from leased address to session: 4-byte keys for IPv4 and 16-byte
keys for IPv6 in one dict, so a packet of either family costs one lookup. It checks what
clients send (well-formed IPv4 without header options or well-formed IPv6, the source the
session's leased address of that family: for IPv6 the fixed header's source, whatever
extension headers follow; a sane offload header; and for the server host's own addresses only
what ``to_host`` lets through: :mod:`cellvpn.device.tohost`), clamps the MSS of TCP SYNs so
they fit the tunnel, delivers client-to-client packets directly (or drops
them when clients are isolated), and hands everything else to an injected TUN writer. Packets
read from the TUN go to the session that owns their destination. Every drop is counted, none is
logged.

With offload (a TUN opened with IFF_VNET_HDR) every TUN read and write carries a 10-byte
``virtio_net_hdr`` (:mod:`cellvpn.device.vnet`). A super-packet goes whole to a session that
agreed to the ``offload`` capability and is cut into real segments for one that did not;
counters count it as the packets it stands for, so a client pays the same either way.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Protocol

from cellvpn.device import vnet
from cellvpn.device.counters import SessionCounters
from cellvpn.device.gro import coalesce
from cellvpn.device.packet import clamp_mss
from cellvpn.device.tohost import ToHost
from cellvpn.ratelimit import TokenBucket

Packet = bytes | memoryview
_PLAIN = vnet.PLAIN
_SRC_DST = struct.Struct("4s4s")
_SRC_DST6 = struct.Struct("16s16s")


class Peer(Protocol):
    """What the forwarder needs of a session."""

    addr_key: bytes
    #: the leased IPv6 address as 16 bytes (b"": none, every IPv6 packet from it is spoofed)
    addr6_key: bytes
    counters: SessionCounters
    #: IP bytes that may still pass before ``allowance_used`` must be called (billing)
    allowance: int
    #: the session agreed to VPN_SEND_GSO / VPN_RECV_GSO
    offload: bool
    #: byte buckets of its rate limits, client to TUN and TUN to client (None: no limit)
    rate_up: TokenBucket | None
    rate_down: TokenBucket | None

    def deliver(self, packet: Packet) -> bool:
        """Queue one IPv4 packet towards the client (VPN_RECV), sent at the next flush;
        False (and counted by the peer) when its queue is full."""

    def deliver_gso(self, header_and_packet: Packet) -> bool:
        """Queue a vnet header and its packet (VPN_RECV_GSO), as ``deliver``."""

    def flush(self) -> None:
        """Write what ``deliver`` queued, as one transport write."""

    def allowance_used(self) -> None:
        """The allowance reached zero: billing looks at the limits and sets a new one."""


class Forwarder:
    """The server's routing between TUN and sessions.

    ``tun_write(packet)`` writes a plain packet; with ``tun_writev(header, packet)`` given, the
    TUN carries vnet headers and every packet read from it starts with one.
    """

    def __init__(
        self,
        tun_write: Callable[[Packet], bool],
        max_mss: int,
        isolate: bool = False,
        tun_writev: Callable[[Packet, Packet], bool] | None = None,
        to_host: ToHost | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.tun_write = tun_write
        #: the time for rate limits (the reactor's seconds); read only for a limited session
        self.clock = clock or (lambda: 0.0)
        #: what clients may reach on the host itself (None: no host addresses are known)
        self.to_host = to_host
        self.tun_writev = tun_writev
        self.max_mss = max_mss
        #: an IPv6 header is 20 bytes longer than an IPv4 one without options
        self.max_mss6 = max_mss - 20
        self.isolate = isolate
        self.routes: dict[bytes, Peer] = {}
        #: TUN packets whose destination no session owns.
        self.dropped_no_route = 0
        #: TUN packets too short or not IPv4.
        self.dropped_malformed = 0

    @property
    def vnet(self) -> bool:
        return self.tun_writev is not None

    def attach(self, peer: Peer) -> Peer | None:
        """Route ``peer.addr_key`` (and ``addr6_key``) to ``peer``; return the peer that had
        the IPv4 address before, if any."""
        old = self.routes.get(peer.addr_key)
        self.routes[peer.addr_key] = peer
        if peer.addr6_key:
            self.routes[peer.addr6_key] = peer
        return old if old is not peer else None

    def detach(self, peer: Peer) -> None:
        """Stop routing to ``peer`` (only the addresses that still route to it)."""
        if self.routes.get(peer.addr_key) is peer:
            del self.routes[peer.addr_key]
        if peer.addr6_key and self.routes.get(peer.addr6_key) is peer:
            del self.routes[peer.addr6_key]

    def _over_down(self, peer: Peer, size: int) -> bool:
        """Past the session's rate towards the client: counted; the caller drops it."""
        limit = peer.rate_down
        if limit is None or limit.take(self.clock(), size):
            return False
        peer.counters.dropped_rate_down += 1
        peer.counters.to_client_lost_bytes += size
        return True

    def _over_up(self, peer: Peer, packets: int, size: int) -> bool:
        """Past the session's rate from the client: counted; the caller drops it."""
        limit = peer.rate_up
        if limit is None or limit.take(self.clock(), size):
            return False
        peer.counters.dropped_rate_up += packets
        peer.counters.from_client_lost_bytes += size
        return True

    # --- TUN -> sessions -------------------------------------------------------------------

    def from_tun(self, batch: list[bytes]) -> None:
        """Route one wakeup's worth of TUN packets; each session is flushed once."""
        if self.tun_writev is not None:
            self._from_vnet_tun(batch)
            return
        routes = self.routes
        touched: dict[int, Peer] = {}
        max_mss = self.max_mss
        max_mss6 = self.max_mss6
        for pkt in batch:
            version = pkt[0] >> 4 if pkt else 0
            if version == 4 and len(pkt) >= 20:
                peer = routes.get(pkt[16:20])
                mss = max_mss if pkt[9] == 6 else 0
            elif version == 6 and len(pkt) >= 40:
                peer = routes.get(pkt[24:40])
                mss = max_mss6 if pkt[6] == 6 else 0
            else:
                self.dropped_malformed += 1
                continue
            if peer is None:
                self.dropped_no_route += 1
                continue
            if peer.rate_down is not None and self._over_down(peer, len(pkt)):
                continue
            if mss:
                clamped = clamp_mss(pkt, mss)
                if clamped is not None:
                    pkt = clamped
            if peer.deliver(pkt):
                counters = peer.counters
                counters.to_client_packets += 1
                counters.to_client_bytes += len(pkt)
                peer.allowance -= len(pkt)
                if peer.allowance <= 0:
                    peer.allowance_used()
                touched[id(peer)] = peer
        for peer in touched.values():
            peer.flush()

    def _from_vnet_tun(self, batch: list[bytes]) -> None:
        routes = self.routes
        touched: dict[int, Peer] = {}
        max_mss = self.max_mss
        max_mss6 = self.max_mss6
        for buf in batch:
            version = buf[10] >> 4 if len(buf) > 10 else 0
            if version == 4 and len(buf) >= 30:
                peer = routes.get(buf[26:30])
                tcp = buf[19] == 6
                mss = max_mss
            elif version == 6 and len(buf) >= 50:
                peer = routes.get(buf[34:50])
                tcp = buf[16] == 6
                mss = max_mss6
            else:
                self.dropped_malformed += 1
                continue
            if peer is None:
                self.dropped_no_route += 1
                continue
            view = memoryview(buf)
            pkt: Packet = view[10:]
            counters = peer.counters
            if buf[0] == 0 and buf[1] == 0:  # a plain, complete packet
                if peer.rate_down is not None and self._over_down(peer, len(pkt)):
                    continue
                if tcp:
                    clamped = clamp_mss(pkt, mss)
                    if clamped is not None:
                        pkt = clamped
                if peer.deliver(pkt):
                    counters.to_client_packets += 1
                    counters.to_client_bytes += len(pkt)
                    peer.allowance -= len(pkt)
                    if peer.allowance <= 0:
                        peer.allowance_used()
                    touched[id(peer)] = peer
                continue
            header = view[:10]
            if buf[1] == vnet.GSO_NONE and vnet.is_tcp_syn(pkt):
                if peer.rate_down is not None and self._over_down(peer, len(pkt)):
                    continue
                # finish the checksum first: clamping must not meet a partial checksum
                pkt = vnet.finish_checksum(header, pkt)
                clamped = clamp_mss(pkt, mss)
                if peer.deliver(clamped if clamped is not None else pkt):
                    counters.to_client_packets += 1
                    counters.to_client_bytes += len(pkt)
                    peer.allowance -= len(pkt)
                    if peer.allowance <= 0:
                        peer.allowance_used()
                    touched[id(peer)] = peer
                continue
            packets, size = vnet.ip_bytes(header, pkt)
            if peer.rate_down is not None and self._over_down(peer, size):
                continue
            if peer.offload:
                if not peer.deliver_gso(buf):
                    continue
            else:
                try:
                    segments = vnet.segment(header, pkt)
                except vnet.OffloadError:
                    self.dropped_malformed += 1
                    continue
                delivered = [peer.deliver(seg) for seg in segments]
                if not all(delivered):
                    packets -= delivered.count(False)
                    size = sum(len(s) for s, ok in zip(segments, delivered, strict=True) if ok)
            counters.to_client_packets += packets
            counters.to_client_bytes += size
            peer.allowance -= size
            if peer.allowance <= 0:
                peer.allowance_used()
            touched[id(peer)] = peer
        for peer in touched.values():
            peer.flush()

    # --- sessions -> TUN -------------------------------------------------------------------

    def _accept(self, peer: Peer, pkt: Packet) -> Packet | None:
        """A client's packet, checked (and its MSS clamped), if it is for the TUN; None when
        it was dropped (counted) or handed to another session."""
        counters = peer.counters
        size = len(pkt)
        if size >= 40 and pkt[0] >> 4 == 6:
            return self._accept6(peer, pkt)
        if size < 20 or pkt[0] >> 4 != 4 or (pkt[2] << 8 | pkt[3]) != size:
            counters.dropped_malformed += 1
            counters.from_client_lost_bytes += size
            return None
        src, dst = _SRC_DST.unpack_from(pkt, 12)
        if src != peer.addr_key:
            counters.dropped_spoofed += 1
            counters.from_client_lost_bytes += size
            return None
        if pkt[0] != 0x45:
            counters.dropped_ip_options += 1
            counters.from_client_lost_bytes += size
            return None
        if peer.rate_up is not None and self._over_up(peer, 1, size):
            return None
        to_host = self.to_host
        if to_host is not None and dst in to_host.addresses and not to_host.allows(pkt):
            counters.dropped_to_host += 1
            counters.from_client_lost_bytes += size
            return None
        if pkt[9] == 6:
            clamped = clamp_mss(pkt, self.max_mss)
            if clamped is not None:
                pkt = clamped
        other = self.routes.get(dst)
        if other is not None and other is not peer:
            self._to_other(peer, other, _PLAIN, pkt, 1, size)
            return None
        return pkt

    def _accept6(self, peer: Peer, pkt: Packet) -> Packet | None:
        """``_accept`` for IPv6. The source checked is the fixed header's, whatever extension
        headers follow: none of them can change who sent the packet."""
        counters = peer.counters
        size = len(pkt)
        if (pkt[4] << 8 | pkt[5]) + 40 != size:
            counters.dropped_malformed += 1
            counters.from_client_lost_bytes += size
            return None
        src, dst = _SRC_DST6.unpack_from(pkt, 8)
        if src != peer.addr6_key or not src:
            counters.dropped_spoofed += 1
            counters.from_client_lost_bytes += size
            return None
        if peer.rate_up is not None and self._over_up(peer, 1, size):
            return None
        to_host = self.to_host
        if to_host is not None and to_host.is_host6(dst) and not to_host.allows6(pkt):
            counters.dropped_to_host += 1
            counters.from_client_lost_bytes += size
            return None
        if pkt[6] == 6:
            clamped = clamp_mss(pkt, self.max_mss6)
            if clamped is not None:
                pkt = clamped
        other = self.routes.get(dst)
        if other is not None and other is not peer:
            self._to_other(peer, other, _PLAIN, pkt, 1, size)
            return None
        return pkt

    def from_client_batch(self, peer: Peer, packets: list[Packet]) -> None:
        """A batch of VPN_SEND packets from one session (what one read brought).

        With a vnet TUN, runs of segments of one TCP flow are joined into super-packets
        (:mod:`cellvpn.device.gro`): one write instead of dozens.
        """
        writev = self.tun_writev
        if writev is None or len(packets) < 2:
            for pkt in packets:
                self.from_client(peer, pkt)
            return
        accepted = [p for p in (self._accept(peer, pkt) for pkt in packets) if p is not None]
        counters = peer.counters
        for header, pkt, segments in coalesce(accepted):
            size = len(pkt) if segments == 1 else vnet.ip_bytes(header, pkt)[1]
            if writev(header, pkt):
                counters.from_client_packets += segments
                counters.from_client_bytes += size
                peer.allowance -= size
                if peer.allowance <= 0:
                    peer.allowance_used()
            else:
                counters.dropped_tun_write += segments
                counters.from_client_lost_bytes += size

    def from_client(self, peer: Peer, pkt: Packet) -> None:
        """One IPv4 packet a client sent (VPN_SEND): check it, then to the TUN or a session."""
        counters = peer.counters
        size = len(pkt)
        accepted = self._accept(peer, pkt)
        if accepted is None:
            return
        pkt = accepted
        writev = self.tun_writev
        ok = self.tun_write(pkt) if writev is None else writev(_PLAIN, pkt)
        if ok:
            counters.from_client_packets += 1
            counters.from_client_bytes += size
            peer.allowance -= size
            if peer.allowance <= 0:
                peer.allowance_used()
        else:
            counters.dropped_tun_write += 1
            counters.from_client_lost_bytes += size

    def from_client_gso(self, peer: Peer, data: Packet) -> None:
        """A vnet header and its packet (VPN_SEND_GSO): every field checked before the TUN."""
        counters = peer.counters
        header, pkt = data[:10], data[10:]
        try:
            header = vnet.rebuild_header(header, pkt, self.max_mss)
        except vnet.OffloadError:
            counters.dropped_bad_offload += 1
            counters.from_client_lost_bytes += len(pkt)
            return
        packets, size = vnet.ip_bytes(header, pkt)
        v6 = pkt[0] >> 4 == 6
        if v6:
            src, dst = _SRC_DST6.unpack_from(pkt, 8)
            own = peer.addr6_key
        else:
            src, dst = _SRC_DST.unpack_from(pkt, 12)
            own = peer.addr_key
        if src != own or not own:
            counters.dropped_spoofed += packets
            counters.from_client_lost_bytes += size
            return
        if not v6 and pkt[0] != 0x45:
            counters.dropped_ip_options += packets
            counters.from_client_lost_bytes += size
            return
        if peer.rate_up is not None and self._over_up(peer, packets, size):
            return
        to_host = self.to_host
        if to_host is not None and (
            (to_host.is_host6(dst) and not to_host.allows6(pkt))
            if v6
            else (dst in to_host.addresses and not to_host.allows(pkt))
        ):
            counters.dropped_to_host += packets
            counters.from_client_lost_bytes += size
            return
        if header[1] == vnet.GSO_NONE and vnet.is_tcp_syn(pkt):
            pkt = vnet.finish_checksum(header, pkt)
            header = _PLAIN
            clamped = clamp_mss(pkt, self.max_mss6 if v6 else self.max_mss)
            if clamped is not None:
                pkt = clamped
        other = self.routes.get(dst)
        if other is not None and other is not peer:
            self._to_other(peer, other, header, pkt, packets, size)
            return
        writev = self.tun_writev
        if writev is not None:
            ok = writev(header, pkt)
        else:
            ok = all([self.tun_write(seg) for seg in vnet.segment(header, pkt)])
        if ok:
            counters.from_client_packets += packets
            counters.from_client_bytes += size
            peer.allowance -= size
            if peer.allowance <= 0:
                peer.allowance_used()
        else:
            counters.dropped_tun_write += packets
            counters.from_client_lost_bytes += size

    def _to_other(
        self, peer: Peer, other: Peer, header: Packet, pkt: Packet, packets: int, size: int
    ) -> None:
        """Client to client, without a trip through the TUN."""
        counters = peer.counters
        if self.isolate:
            counters.dropped_isolated += packets
            counters.from_client_lost_bytes += size
            return
        counters.from_client_packets += packets
        counters.from_client_bytes += size
        peer.allowance -= size
        if peer.allowance <= 0:
            peer.allowance_used()
        if header is _PLAIN or (header[0] == 0 and header[1] == 0):
            ok = other.deliver(pkt)
        elif other.offload:
            ok = other.deliver_gso(bytes(header) + bytes(pkt))
        else:
            ok = all([other.deliver(seg) for seg in vnet.segment(header, pkt)])
        if ok:
            oc = other.counters
            oc.to_client_packets += packets
            oc.to_client_bytes += size
            other.allowance -= size
            if other.allowance <= 0:
                other.allowance_used()
            other.flush()
