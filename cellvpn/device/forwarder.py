"""Moving IPv4 packets between the server's TUN and its sessions, with no I/O of its own.

The forwarder owns the table from leased address to session. It checks what clients send
(well-formed IPv4, source = the session's leased address), clamps the MSS of TCP SYNs so they
fit the tunnel, delivers client-to-client packets directly (or drops them when clients are
isolated), and hands everything else to an injected ``tun_write``. Packets read from the TUN go
to the session that owns their destination. Every drop is counted, none is logged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from cellvpn.device.counters import SessionCounters
from cellvpn.device.packet import clamp_mss

Packet = bytes | memoryview


class Peer(Protocol):
    """What the forwarder needs of a session."""

    addr_key: bytes
    counters: SessionCounters

    def deliver(self, packet: Packet) -> bool:
        """Queue one IPv4 packet towards the client (VPN_RECV), sent at the next flush;
        False (and counted by the peer) when its queue is full."""

    def flush(self) -> None:
        """Write what ``deliver`` queued, as one transport write."""


class Forwarder:
    def __init__(self, tun_write: Callable[[Packet], bool], max_mss: int, isolate: bool = False):
        self.tun_write = tun_write
        self.max_mss = max_mss
        self.isolate = isolate
        self.routes: dict[bytes, Peer] = {}
        #: TUN packets whose destination no session owns.
        self.dropped_no_route = 0
        #: TUN packets too short or not IPv4.
        self.dropped_malformed = 0

    def attach(self, peer: Peer) -> Peer | None:
        """Route ``peer.addr_key`` to ``peer``; return the peer that had it before, if any."""
        old = self.routes.get(peer.addr_key)
        self.routes[peer.addr_key] = peer
        return old if old is not peer else None

    def detach(self, peer: Peer) -> None:
        """Stop routing to ``peer`` (only if the address still routes to it)."""
        if self.routes.get(peer.addr_key) is peer:
            del self.routes[peer.addr_key]

    def from_tun(self, batch: list[bytes]) -> None:
        """Route one wakeup's worth of TUN packets; each session is flushed once."""
        routes = self.routes
        touched: dict[int, Peer] = {}
        max_mss = self.max_mss
        for pkt in batch:
            if len(pkt) < 20 or pkt[0] >> 4 != 4:
                self.dropped_malformed += 1
                continue
            peer = routes.get(pkt[16:20])
            if peer is None:
                self.dropped_no_route += 1
                continue
            if pkt[9] == 6:
                clamped = clamp_mss(pkt, max_mss)
                if clamped is not None:
                    pkt = clamped
            if peer.deliver(pkt):
                counters = peer.counters
                counters.to_client_packets += 1
                counters.to_client_bytes += len(pkt)
                touched[id(peer)] = peer
        for peer in touched.values():
            peer.flush()

    def from_client(self, peer: Peer, pkt: Packet) -> None:
        """One IPv4 packet a client sent (VPN_SEND): check it, then to the TUN or a session."""
        counters = peer.counters
        size = len(pkt)
        if size < 20 or pkt[0] >> 4 != 4 or (pkt[2] << 8 | pkt[3]) != size:
            counters.dropped_malformed += 1
            counters.from_client_lost_bytes += size
            return
        if pkt[12:16] != peer.addr_key:
            counters.dropped_spoofed += 1
            counters.from_client_lost_bytes += size
            return
        if pkt[9] == 6:
            clamped = clamp_mss(pkt, self.max_mss)
            if clamped is not None:
                pkt = clamped
        other = self.routes.get(bytes(pkt[16:20]))
        if other is not None and other is not peer:
            if self.isolate:
                counters.dropped_isolated += 1
                counters.from_client_lost_bytes += size
                return
            counters.from_client_packets += 1
            counters.from_client_bytes += size
            if other.deliver(pkt):
                oc = other.counters
                oc.to_client_packets += 1
                oc.to_client_bytes += size
                other.flush()
            return
        if self.tun_write(pkt):
            counters.from_client_packets += 1
            counters.from_client_bytes += size
        else:
            counters.dropped_tun_write += 1
            counters.from_client_lost_bytes += size
