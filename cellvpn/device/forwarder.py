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

import ipaddress
from collections.abc import Callable, Iterable
from typing import Protocol

from cellvpn.device import vnet
from cellvpn.device.counters import SessionCounters, charge_from_client, charge_to_client
from cellvpn.device.gro import coalesce
from cellvpn.device.packet import clamp_mss
from cellvpn.device.pump import PumpRules, PumpTun, pump_rules
from cellvpn.device.tohost import ToHost
from cellvpn.ratelimit import TokenBucket
from cellvpn.wire import ip
from cellvpn.wire.ip import (
    IPV4_ADDRESSES,
    IPV4_DST,
    IPV4_HEADER,
    IPV4_PLAIN_FIRST_BYTE,
    IPV4_PROTOCOL,
    IPV4_TOTAL_LENGTH,
    IPV6_ADDRESSES,
    IPV6_DST,
    IPV6_HEADER,
    IPV6_NEXT_HEADER,
    IPV6_PAYLOAD_LENGTH,
    TCP,
)

Packet = bytes | memoryview
_PLAIN = vnet.PLAIN
_SRC_DST = ip.IPV4_SRC_DST
_SRC_DST6 = ip.IPV6_SRC_DST
#: the same fields in a TUN read that starts with a vnet header
_V = vnet.SIZE
_VNET_V4_DST = ip.shifted(IPV4_DST, _V)
_VNET_V6_DST = ip.shifted(IPV6_DST, _V)
_VNET_V4_PROTOCOL = IPV4_PROTOCOL + _V
_VNET_V6_NEXT_HEADER = IPV6_NEXT_HEADER + _V


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
        clients: Iterable[ipaddress.IPv4Network] = (),
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
        #: the pools clients hold addresses from: the server's pump leaves them to Python
        self.clients = tuple(clients)
        #: the open TUN for the server's pump (:mod:`cellvpn.device.pump`); None: no pump
        self.tun_port: PumpTun | None = None
        #: client packets the pump carried to the TUN
        self.pumped_packets = 0
        self._pump_rules: tuple[ToHost | None, PumpRules] | None = None

    @property
    def vnet(self) -> bool:
        return self.tun_writev is not None

    def pump_rules(self) -> PumpRules:
        """What the pump must leave to Python, made again when ``to_host`` is replaced."""
        cached = self._pump_rules
        if cached is None or cached[0] is not self.to_host:
            cached = self._pump_rules = (self.to_host, pump_rules(self.clients, self.to_host))
        return cached[1]

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
            if version == 4 and len(pkt) >= IPV4_HEADER:
                peer = routes.get(pkt[IPV4_DST])
                mss = max_mss if pkt[IPV4_PROTOCOL] == TCP else 0
            elif version == 6 and len(pkt) >= IPV6_HEADER:
                peer = routes.get(pkt[IPV6_DST])
                mss = max_mss6 if pkt[IPV6_NEXT_HEADER] == TCP else 0
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
                charge_to_client(peer, 1, len(pkt))
                touched[id(peer)] = peer
        for peer in touched.values():
            peer.flush()

    def _from_vnet_tun(self, batch: list[bytes]) -> None:
        routes = self.routes
        touched: dict[int, Peer] = {}
        max_mss = self.max_mss
        max_mss6 = self.max_mss6
        for buf in batch:
            version = buf[_V] >> 4 if len(buf) > _V else 0
            if version == 4 and len(buf) >= _V + IPV4_HEADER:
                peer = routes.get(buf[_VNET_V4_DST])
                tcp = buf[_VNET_V4_PROTOCOL] == TCP
                mss = max_mss
            elif version == 6 and len(buf) >= _V + IPV6_HEADER:
                peer = routes.get(buf[_VNET_V6_DST])
                tcp = buf[_VNET_V6_NEXT_HEADER] == TCP
                mss = max_mss6
            else:
                self.dropped_malformed += 1
                continue
            if peer is None:
                self.dropped_no_route += 1
                continue
            view = memoryview(buf)
            pkt: Packet = view[_V:]
            if buf[0] == 0 and buf[1] == 0:  # a plain, complete packet
                if peer.rate_down is not None and self._over_down(peer, len(pkt)):
                    continue
                if tcp:
                    clamped = clamp_mss(pkt, mss)
                    if clamped is not None:
                        pkt = clamped
                if peer.deliver(pkt):
                    charge_to_client(peer, 1, len(pkt))
                    touched[id(peer)] = peer
                continue
            header = view[:_V]
            if buf[1] == vnet.GSO_NONE and vnet.is_tcp_syn(pkt):
                if peer.rate_down is not None and self._over_down(peer, len(pkt)):
                    continue
                # finish the checksum first: clamping must not meet a partial checksum
                pkt = vnet.finish_checksum(header, pkt)
                clamped = clamp_mss(pkt, mss)
                if peer.deliver(clamped if clamped is not None else pkt):
                    charge_to_client(peer, 1, len(pkt))
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
            charge_to_client(peer, packets, size)
            touched[id(peer)] = peer
        for peer in touched.values():
            peer.flush()

    # --- sessions -> TUN -------------------------------------------------------------------

    def _accept(self, peer: Peer, pkt: Packet) -> Packet | None:
        """A client's packet, checked (and its MSS clamped), if it is for the TUN; None when
        it was dropped (counted) or handed to another session."""
        counters = peer.counters
        size = len(pkt)
        if size >= IPV6_HEADER and pkt[0] >> 4 == 6:
            return self._accept6(peer, pkt)
        if (
            size < IPV4_HEADER
            or pkt[0] >> 4 != 4
            or (pkt[IPV4_TOTAL_LENGTH] << 8 | pkt[IPV4_TOTAL_LENGTH + 1]) != size
        ):
            counters.dropped_malformed += 1
            counters.from_client_lost_bytes += size
            return None
        src, dst = _SRC_DST.unpack_from(pkt, IPV4_ADDRESSES)
        if src != peer.addr_key:
            counters.dropped_spoofed += 1
            counters.from_client_lost_bytes += size
            return None
        if pkt[0] != IPV4_PLAIN_FIRST_BYTE:
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
        if pkt[IPV4_PROTOCOL] == TCP:
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
        if (pkt[IPV6_PAYLOAD_LENGTH] << 8 | pkt[IPV6_PAYLOAD_LENGTH + 1]) + IPV6_HEADER != size:
            counters.dropped_malformed += 1
            counters.from_client_lost_bytes += size
            return None
        src, dst = _SRC_DST6.unpack_from(pkt, IPV6_ADDRESSES)
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
        if pkt[IPV6_NEXT_HEADER] == TCP:
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
                charge_from_client(peer, segments, size)
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
            charge_from_client(peer, 1, size)
        else:
            counters.dropped_tun_write += 1
            counters.from_client_lost_bytes += size

    def from_client_gso(self, peer: Peer, data: Packet) -> None:
        """A vnet header and its packet (VPN_SEND_GSO): every field checked before the TUN."""
        counters = peer.counters
        header, pkt = data[:_V], data[_V:]
        try:
            header = vnet.rebuild_header(header, pkt, self.max_mss)
        except vnet.OffloadError:
            counters.dropped_bad_offload += 1
            counters.from_client_lost_bytes += len(pkt)
            return
        packets, size = vnet.ip_bytes(header, pkt)
        v6 = pkt[0] >> 4 == 6
        if v6:
            src, dst = _SRC_DST6.unpack_from(pkt, IPV6_ADDRESSES)
            own = peer.addr6_key
        else:
            src, dst = _SRC_DST.unpack_from(pkt, IPV4_ADDRESSES)
            own = peer.addr_key
        if src != own or not own:
            counters.dropped_spoofed += packets
            counters.from_client_lost_bytes += size
            return
        if not v6 and pkt[0] != IPV4_PLAIN_FIRST_BYTE:
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
            charge_from_client(peer, packets, size)
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
        charge_from_client(peer, packets, size)
        if header is _PLAIN or (header[0] == 0 and header[1] == 0):
            ok = other.deliver(pkt)
        elif other.offload:
            ok = other.deliver_gso(bytes(header) + bytes(pkt))
        else:
            ok = all([other.deliver(seg) for seg in vnet.segment(header, pkt)])
        if ok:
            charge_to_client(other, packets, size)
            other.flush()
