"""The server's pump: an established session's VPN_SEND packets from the stream to the TUN in C.

Once a session passes traffic, most of what its client sends is VPN_SEND frames with ordinary
IPv4 packets in them, and the Python path spends more on each of them (the frame scan, the
channel and VPN headers, the forwarder's checks, the write) than the kernel does. The pump runs
at the start of every read, before the frame reader: C (``cvpn_pump_up`` in
``cellvpn/native/frames.h``) writes to the TUN the frames it is sure of and stops at the first
one it is not, which goes to Python with everything after it. C carries a packet only when
Python would write it unchanged:

- a whole DATA frame on the VPN channel, its seq the next one, every size field right, op
  VPN_SEND, or VPN_SEND_GSO from a session that agreed to offload with a vnet header that
  ``rebuild_header`` keeps as it is or rebuilds the same way each time: no flags (a plain
  packet), or a UDP checksum for the device to finish (only to a TUN that takes vnet headers;
  super-packets are Python's);
- plain IPv4 (no options, the total length its size) from the session's lease, and not TCP
  (Python clamps the MSS of SYNs and joins segments for the offload TUN);
- not to another client or to a host address a client could hold (``keep``: Python routes
  those), and to a host address only what ``to_host`` lets through and C can judge (echo
  requests, listed UDP ports, or everything);
- within the allowance: the packet that would use it up goes to Python, which calls billing.

The session must be passing, without ``rate_up``, with a TUN open; else the pump takes
nothing. Counters, the allowance and the TUN's statistics move as the Python path moves them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple, Protocol

from cellvpn.device.counters import Charged, charge_from_client

if TYPE_CHECKING:
    from cellvpn.device.tohost import ToHost
    from cellvpn.native import PumpUp
    from cellvpn.ratelimit import TokenBucket
    from cellvpn.tun.port import TunStats

#: the C pump's room for destinations left to Python and for host addresses
MAX_KEEP = 16
MAX_HOSTS = 16
HOST_ICMP = 1
HOST_ALL = 2
#: an allowance the C side's signed 64-bit field holds (unmetered sessions have more)
_MAX_ALLOWANCE = 2**62 - 1
_LAST_SEQ = 2**64 - 1


class PumpRules(NamedTuple):
    """What the C pump leaves to Python, as the bytes ``pump_up`` takes."""

    #: (address, mask) pairs of 4 bytes each: destinations Python routes
    keep: bytes
    #: host addresses (4 bytes each) and what to_host lets reach them
    hosts: bytes
    host_udp: bytes
    host_flags: int


#: every destination to Python: the pump carries nothing
KEEP_ALL = PumpRules(bytes(8), b"", b"", 0)


def leasable(clients: Iterable[ipaddress.IPv4Network], key: bytes) -> bool:
    """Whether a client could hold the IPv4 address ``key``: network + 2 .. broadcast - 1 of a
    pool (:class:`cellvpn.device.pool.LeasePool`)."""
    address = ipaddress.IPv4Address(key)
    return any(n.network_address + 1 < address < n.broadcast_address for n in clients)


def pump_rules(clients: Iterable[ipaddress.IPv4Network], to_host: ToHost | None) -> PumpRules:
    """The rules for the C pump: the pools (``clients``) are kept for Python, host addresses
    outside them are judged in C, and a host address a client could hold is kept too (Python
    judges it, then routes it to that client)."""
    clients = list(clients)
    keep = b"".join(n.network_address.packed + n.netmask.packed for n in clients)
    if to_host is None:
        hosts: list[bytes] = []
    else:
        hosts = sorted(a for a in to_host.addresses if len(a) == 4 and not leasable(clients, a))
    if len(keep) > 8 * MAX_KEEP or len(hosts) > MAX_HOSTS:
        return KEEP_ALL  # more than C has room for: Python decides everything
    if to_host is None:
        return PumpRules(keep, b"", b"", 0)
    rules = to_host.rules
    ports = sorted(rules.udp)[:MAX_HOSTS]  # a port left out goes to Python, which allows it
    flags = (HOST_ICMP if rules.icmp else 0) | (HOST_ALL if rules.everything else 0)
    return PumpRules(keep, b"".join(hosts), b"".join(p.to_bytes(2, "big") for p in ports), flags)


class PumpPeer(Charged, Protocol):
    """What the pump needs of a session."""

    addr_key: bytes
    passing: bool
    rate_up: TokenBucket | None
    #: the session agreed to VPN_SEND_GSO
    offload: bool


class PumpTun(Protocol):
    """The server's TUN, as the pump writes to it."""

    stats: TunStats

    def fileno(self) -> int: ...


class PumpRoutes(Protocol):
    """The forwarder, as the pump needs it: the TUN and what C must leave to Python."""

    #: the open TUN (None: none open, the pump takes nothing)
    tun_port: PumpTun | None
    #: packets the pump carried, for every session
    pumped_packets: int

    @property
    def vnet(self) -> bool: ...

    def pump_rules(self) -> PumpRules: ...


class UpPump:
    """One session's pump, the stream's ``DataPump``: ``(view, seq_next) -> (pos, taken)``."""

    __slots__ = ("channel", "max_payload", "op", "op_gso", "peer", "pump_up", "routes")

    def __init__(
        self,
        peer: PumpPeer,
        routes: PumpRoutes,
        pump_up: PumpUp,
        channel: int,
        op: int,
        op_gso: int,
        max_payload: int,
    ) -> None:
        self.peer = peer
        self.routes = routes
        self.pump_up = pump_up
        self.channel = channel
        self.op = op
        self.op_gso = op_gso
        self.max_payload = max_payload

    def __call__(self, view: memoryview, seq_next: int) -> tuple[int, int]:
        peer = self.peer
        routes = self.routes
        tun = routes.tun_port
        if tun is None or not peer.passing or peer.rate_up is not None:
            return 0, 0
        fd = tun.fileno()
        if fd < 0 or peer.allowance <= 0 or seq_next >= _LAST_SEQ:
            return 0, 0
        keep, hosts, host_udp, host_flags = routes.pump_rules()
        pos, packets, ip_bytes, written = self.pump_up(
            view, 0, self.max_payload, fd, routes.vnet, peer.addr_key, keep, hosts, host_udp,
            host_flags, seq_next, min(peer.allowance, _MAX_ALLOWANCE), self.channel, self.op,
            self.op_gso if peer.offload else 0,
        )  # fmt: skip
        if packets:
            charge_from_client(peer, packets, ip_bytes)  # C stopped before the allowance's end
            stats = tun.stats
            stats.packets_written += packets
            stats.bytes_written += written
            routes.pumped_packets += packets
        return pos, packets
