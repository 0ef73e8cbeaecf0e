"""Per-session traffic counters, in IP bytes (whole IPv4 packets, no stream overhead).

The L4 proxy's counts are TCP payload bytes instead: there are no IP packets on that path.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol


@dataclass(slots=True)
class SessionCounters:
    """What one session carried and dropped.

    ``from_client`` is the client-to-TUN direction (the original's ``bytes_sent``), ``to_client``
    the TUN-to-client one (the original's ``bytes_recv``). Drops are counted by reason.
    """

    from_client_packets: int = 0
    from_client_bytes: int = 0
    to_client_packets: int = 0
    to_client_bytes: int = 0
    from_client_lost_bytes: int = 0
    to_client_lost_bytes: int = 0
    dropped_spoofed: int = 0
    dropped_malformed: int = 0
    dropped_not_active: int = 0
    dropped_isolated: int = 0
    dropped_tun_write: int = 0
    dropped_bad_offload: int = 0
    dropped_queue_full: int = 0
    #: to an address of the server host that ``[srv_vpn] to_host`` does not let through
    dropped_to_host: int = 0
    #: IPv4 packets with header options (source routing and the like)
    dropped_ip_options: int = 0
    #: past the session's rate limit (``rate_up``, ``rate_down``): client to TUN, TUN to client
    dropped_rate_up: int = 0
    dropped_rate_down: int = 0
    #: times the L4 proxy paused a direction for the rate limit (TCP bytes are delayed, not
    #: dropped): reading the client's stream (up), reading the destinations (down)
    delayed_rate_up: int = 0
    delayed_rate_down: int = 0
    proxy_from_client_bytes: int = 0
    proxy_to_client_bytes: int = 0

    @property
    def from_client_dropped(self) -> int:
        return (
            self.dropped_spoofed
            + self.dropped_malformed
            + self.dropped_not_active
            + self.dropped_isolated
            + self.dropped_tun_write
            + self.dropped_bad_offload
            + self.dropped_to_host
            + self.dropped_ip_options
            + self.dropped_rate_up
        )

    @property
    def to_client_dropped(self) -> int:
        return self.dropped_queue_full + self.dropped_rate_down

    def as_dict(self) -> dict[str, int]:
        """Every counter by name (``dataclasses.asdict`` deep-copies each int: ten times
        slower, and status, metrics and every session's end read this)."""
        return {name: getattr(self, name) for name in _NAMES}


_NAMES = tuple(f.name for f in fields(SessionCounters))


class Charged(Protocol):
    """A session as counting and billing see it: every path that carries its packets (the
    forwarder, the server's pump) charges them here."""

    counters: SessionCounters
    #: IP bytes that may still pass before ``allowance_used`` must be called (billing)
    allowance: int

    def allowance_used(self) -> None:
        """The allowance reached zero: billing looks at the limits and sets a new one."""


def charge_to_client(peer: Charged, packets: int, size: int) -> None:
    """``packets`` (``size`` IP bytes) went towards the client: counted, and drawn from the
    allowance, whose end hands over to billing. Every path to a client ends here."""
    counters = peer.counters
    counters.to_client_packets += packets
    counters.to_client_bytes += size
    peer.allowance -= size
    if peer.allowance <= 0:
        peer.allowance_used()


def charge_from_client(peer: Charged, packets: int, size: int) -> None:
    """As :func:`charge_to_client`, for what the client sent and the server passed on."""
    counters = peer.counters
    counters.from_client_packets += packets
    counters.from_client_bytes += size
    peer.allowance -= size
    if peer.allowance <= 0:
        peer.allowance_used()
