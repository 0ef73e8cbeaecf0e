"""Per-session traffic counters, in IP bytes (whole IPv4 packets, no stream overhead).

The L4 proxy's counts are TCP payload bytes instead: there are no IP packets on that path.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


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
