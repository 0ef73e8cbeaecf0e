"""Server sessions on memory transports: grant, leases, takeover, the data path, drops."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from cellvpn.config import load_server_config
from cellvpn.config.errors import ConfigError
from cellvpn.conn.protocol import StreamProtocol
from cellvpn.server.service import VPNServerService
from cellvpn.server.session import ServerSession
from cellvpn.stream.connection import Closed, Role, StreamConnection, StreamSettings
from cellvpn.wire import vpn
from cellvpn.wire.channel import CHANNEL_R, CHANNEL_S
from cellvpn.wire.service import Error, ErrorCode, PacketType, Request
from cellvpn.wire.setup import CloseCode


def ipv4(src: str, dst: str, payload: bytes = b"x" * 12, proto: int = 17) -> bytes:
    import socket

    total = 20 + len(payload)
    head = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0, total, 1, 0, 64, proto, 0, socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    return head + payload


class Client:
    """A client stream end wired to a server session through a StringTransport."""

    def __init__(
        self,
        server: VPNServerService,
        clock: MemoryReactorClock,
        token: bytes = b"",
        transport: StringTransport | None = None,
        caps: frozenset[str] = frozenset({"addr-options"}),
    ):
        self.conn = StreamConnection(Role.CLIENT, StreamSettings(caps=caps))
        self.r: list[tuple[int, bytes]] = []
        self.s: list[vpn.VpnPacket] = []
        self.events: list[Any] = []
        self.conn.register_channel(CHANNEL_R, lambda t, d: self.r.append((t, bytes(d))))
        self.conn.register_channel(CHANNEL_S, lambda t, d: self.s.append(vpn.VpnPacket.decode(d)))
        self.session = ServerSession(server)
        self.proto = StreamProtocol(
            StreamConnection(Role.SERVER, server.stream_settings, clock=clock.seconds),
            self.session,
            clock,
            bounds=server.config.edge,
        )
        self.transport = transport or StringTransport(
            peerAddress=IPv4Address("TCP", "192.0.2.2", 4000)
        )
        self.proto.makeConnection(self.transport)
        self.conn.start(token)
        self.pump()

    def pump(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.proto.dataReceived(data)
        out = self.transport.value()
        self.transport.clear()
        if out:
            self.events += self.conn.receive_data(out)

    def request(self) -> None:
        self.conn.send_channel(CHANNEL_R, PacketType.REQUEST, Request().encode())
        self.pump()

    def vpn(self, packet: vpn.VpnPacket) -> None:
        self.conn.send_channel(CHANNEL_S, 2, packet.encode())
        self.pump()

    def addr_request(self) -> None:
        self.vpn(vpn.VpnPacket(vpn.OpCode.VPN_ADDR_REQUEST))

    def send_ip(self, packet: bytes) -> None:
        self.vpn(vpn.VpnPacket(vpn.OpCode.VPN_SEND, packet))

    def lose(self) -> None:
        self.proto.connectionLost(Failure(ConnectionDone()))


def make_server(
    tmp_path: Path, **overrides: str
) -> tuple[VPNServerService, MemoryReactorClock, list[bytes]]:
    clock = MemoryReactorClock()
    config = load_server_config(
        None,
        {
            "control.socket": str(tmp_path / "s.sock"),
            "srv_vpn.network_address": "198.18.9.0",
            "edge.log_interval": "0",  # every refusal said, so a test can read its line
            **overrides,
        },
    )
    server = VPNServerService(config, reactor=clock)
    server.accepting = True
    server.tun_ready = True
    written: list[bytes] = []
    server.forwarder.tun_write = lambda p: written.append(bytes(p)) or True
    return server, clock, written


def test_free_grant_then_address_then_already_assigned(tmp_path: Path) -> None:
    """REQUEST -> SUCCESS; ADDR_REQUEST -> ADDR_REPLY with options; again -> ALREADY_ASSIGNED."""
    server, clock, _ = make_server(tmp_path)
    c = Client(server, clock)
    c.request()
    assert c.r[0][0] == PacketType.SUCCESS and len(c.r[0][1]) == 20
    c.addr_request()
    reply = vpn.AddrReply.decode(c.s[0].data)
    assert str(reply.client) == "198.18.9.2" and str(reply.gateway) == "198.18.9.1"
    assert str(reply.netmask) == "255.255.255.0" and reply.mtu == 1400
    c.addr_request()
    assert c.s[1].op_code == vpn.OpCode.PROBLEM
    assert c.s[1].code == vpn.ProblemCode.ALREADY_ASSIGNED_ADDR


def test_free_service_not_allowed_is_a_24_byte_error(tmp_path: Path) -> None:
    """allow_free_srv = false without billing: ERROR FREE_IS_NOT_ALLOWED, full body."""
    server, clock, _ = make_server(tmp_path, **{"srv_vpn.allow_free_srv": "false"})
    c = Client(server, clock)
    c.request()
    [(ptype, body)] = c.r
    assert ptype == PacketType.ERROR and len(body) == 24
    assert Error.decode(body).code == ErrorCode.FREE_IS_NOT_ALLOWED


def test_nothing_passes_before_the_grant(tmp_path: Path) -> None:
    """'S' traffic before SUCCESS is dropped and counted; no address is given."""
    server, clock, written = make_server(tmp_path)
    c = Client(server, clock)
    c.addr_request()
    c.send_ip(ipv4("198.18.9.2", "198.19.0.10"))
    assert c.s == [] and written == []
    assert c.session.counters.dropped_not_active == 2


def test_spoofed_and_malformed_packets_are_dropped_and_counted(tmp_path: Path) -> None:
    """Only packets from the leased address reach the TUN."""
    server, clock, written = make_server(tmp_path)
    c = Client(server, clock)
    c.request()
    c.addr_request()
    good = ipv4("198.18.9.2", "198.19.0.10")
    c.send_ip(good)
    c.send_ip(ipv4("198.18.9.77", "198.19.0.10"))
    c.send_ip(good[:-1])  # total length disagrees with the packet
    assert written == [good]
    counters = c.session.counters
    assert counters.dropped_spoofed == 1 and counters.dropped_malformed == 1
    assert counters.from_client_packets == 1 and counters.from_client_bytes == len(good)


def test_tun_packets_go_to_the_owner_of_the_destination(tmp_path: Path) -> None:
    """TUN -> VPN_RECV to the session that owns the destination; unknown ones counted."""
    server, clock, _ = make_server(tmp_path)
    a, b = Client(server, clock), Client(server, clock)
    for c in (a, b):
        c.request()
        c.addr_request()
    to_b = ipv4("198.19.0.10", "198.18.9.3")
    server.forwarder.from_tun([to_b, ipv4("198.19.0.10", "198.18.9.200")])
    b.pump()
    a.pump()
    assert [p.data for p in b.s if p.op_code == vpn.OpCode.VPN_RECV] == [to_b]
    assert not [p for p in a.s if p.op_code == vpn.OpCode.VPN_RECV]
    assert server.forwarder.dropped_no_route == 1
    assert b.session.counters.to_client_bytes == len(to_b)


def test_exhausted_pool_and_reuse_after_leaving(tmp_path: Path) -> None:
    """A /30 has one lease: the second client gets NO_FREE_ADDR; when the first leaves
    without an identity hold in the way, the next one gets that address."""
    server, clock, _ = make_server(
        tmp_path, **{"srv_vpn.network_mask": "255.255.255.252", "srv_vpn.lease_hold": "0"}
    )
    a, b = Client(server, clock), Client(server, clock)
    for c in (a, b):
        c.request()
        c.addr_request()
    assert vpn.AddrReply.decode(a.s[0].data).client == server.pool.gateway + 1
    assert b.s[0].op_code == vpn.OpCode.PROBLEM and b.s[0].code == vpn.ProblemCode.NO_FREE_ADDR
    a.lose()
    c = Client(server, clock)
    c.request()
    c.addr_request()
    assert vpn.AddrReply.decode(c.s[0].data).client == server.pool.gateway + 1


def test_returning_client_takes_over_its_address(tmp_path: Path) -> None:
    """Same resume token while the old session is still open: the new session gets the
    address, the old stream is closed with TAKEN_OVER, and its end releases nothing."""
    server, clock, written = make_server(tmp_path)
    old = Client(server, clock)
    token = old.events[0].welcome.resume_token
    assert len(token) == 16
    old.request()
    old.addr_request()
    new = Client(server, clock, token=token)
    new.request()
    new.addr_request()
    assert vpn.AddrReply.decode(new.s[0].data).client == vpn.AddrReply.decode(old.s[0].data).client
    old.pump()
    assert any(isinstance(e, Closed) and e.code == CloseCode.TAKEN_OVER for e in old.events)
    old.lose()
    assert server.pool.owner_of(vpn.AddrReply.decode(new.s[0].data).client) is new.session
    packet = ipv4("198.18.9.2", "198.19.0.10")
    new.send_ip(packet)
    assert written == [packet]


def test_returning_client_after_leaving_gets_the_same_address(tmp_path: Path) -> None:
    """Same resume token within lease_hold after the old session ended: same address."""
    server, clock, _ = make_server(tmp_path)
    first = Client(server, clock)
    token = first.events[0].welcome.resume_token
    first.request()
    first.addr_request()
    other = Client(server, clock)
    first.lose()
    other.request()
    other.addr_request()
    again = Client(server, clock, token=token)
    again.request()
    again.addr_request()
    assert (
        vpn.AddrReply.decode(again.s[0].data).client == vpn.AddrReply.decode(first.s[0].data).client
    )
    assert (
        vpn.AddrReply.decode(other.s[0].data).client != vpn.AddrReply.decode(first.s[0].data).client
    )


def test_ended_session_kept_for_vpn_stat(tmp_path: Path) -> None:
    """A session that ended keeps its final counters in vpn_stat -full."""
    server, clock, _ = make_server(tmp_path)
    c = Client(server, clock)
    c.request()
    c.addr_request()
    c.send_ip(ipv4("198.18.9.2", "198.19.0.10"))
    c.lose()
    stat = server.control_vpn_stat(full=True)
    assert stat["sessions"] == []
    [ended] = stat["ended"]
    assert ended["counters"]["from_client_packets"] == 1 and ended["ended_at"] is not None


def test_a_slow_client_gets_a_bounded_queue_and_counted_drops(tmp_path: Path) -> None:
    """While the client's transport is full, at most QUEUE_CAP bytes queue; the rest are
    dropped and counted; once it drains, packets flow again."""
    from cellvpn.server.session import QUEUE_CAP

    server, clock, _ = make_server(tmp_path)
    c = Client(server, clock)
    c.request()
    c.addr_request()
    c.proto.pauseProducing()  # what the transport does when its buffer is full
    packet = ipv4("198.19.0.10", "198.18.9.2", b"y" * 1000)
    count = 2 * QUEUE_CAP // len(packet)
    server.forwarder.from_tun([packet] * count)
    counters = c.session.counters
    assert counters.dropped_queue_full > 0
    assert counters.to_client_packets + counters.dropped_queue_full == count
    assert counters.to_client_bytes <= QUEUE_CAP + len(packet)
    c.proto.resumeProducing()
    server.forwarder.from_tun([packet])
    assert counters.to_client_packets + counters.dropped_queue_full == count + 1
    assert c.session.backlog == 0


def udp4(src: str, dst: str, data: bytes, sport: int = 40000) -> bytes:
    """An IPv4 UDP datagram (checksum 0: none, as IPv4 allows)."""
    return ipv4(src, dst, struct.pack("!HHHH", sport, 5201, 8 + len(data), 0) + data)


def test_one_read_reaches_the_tun_in_the_order_it_was_sent(tmp_path: Path) -> None:
    """VPN_SEND and VPN_SEND_GSO packets of one read are written in the order they were sent,
    each with its own checked header, and counted."""
    from cellvpn.device import vnet

    server, clock, written = make_server(tmp_path)
    writes: list[tuple[bytes, bytes]] = []
    server.forwarder.tun_writev = lambda h, p: writes.append((bytes(h), bytes(p))) or True
    c = Client(server, clock)
    c.request()
    c.addr_request()
    c.session.offload = True  # what the capability agreed at setup sets
    me, there = "198.18.9.2", "198.19.0.10"
    datagrams = [udp4(me, there, bytes([i]) * 64) for i in range(4)]
    partial = vnet.HEADER.pack(vnet.F_NEEDS_CSUM, vnet.GSO_NONE, 0, 0, 20, 6)
    icmp = ipv4(me, there, b"\x08\0" + bytes(10), proto=1)
    sends = [
        (vpn.OpCode.VPN_SEND, datagrams[0]),
        (vpn.OpCode.VPN_SEND_GSO, partial + datagrams[1]),
        (vpn.OpCode.VPN_SEND, datagrams[2]),
        (vpn.OpCode.VPN_SEND_GSO, partial + icmp),  # checksum offload for ICMP: refused
        (vpn.OpCode.VPN_SEND_GSO, partial + datagrams[3]),
    ]
    for op, data in sends:  # one read: every frame, then one pump
        c.conn.send_channel(CHANNEL_S, 2, vpn.VpnPacket(op, data).encode())
    c.pump()
    assert written == []
    assert writes == [
        (vnet.PLAIN, datagrams[0]),
        (partial, datagrams[1]),
        (vnet.PLAIN, datagrams[2]),
        (partial, datagrams[3]),
    ]
    counters = c.session.counters
    assert counters.from_client_packets == 4 and counters.dropped_bad_offload == 1
    assert counters.from_client_bytes == sum(len(d) for d in datagrams)


def test_packets_to_the_host_and_with_ip_options_are_dropped_and_counted(tmp_path: Path) -> None:
    """To the gateway only ICMP echo passes by default; a loose source route never does."""
    server, clock, written = make_server(tmp_path, **{"srv_vpn.allow_free_srv": "true"})
    c = Client(server, clock)
    c.request()
    c.addr_request()
    echo = ipv4("198.18.9.2", "198.18.9.1", struct.pack("!BBHHH", 8, 0, 0, 1, 1), proto=1)
    c.send_ip(echo)
    c.send_ip(ipv4("198.18.9.2", "198.18.9.1", struct.pack("!HH", 4000, 22) + bytes(16), 6))
    c.send_ip(ipv4("198.18.9.2", "198.18.9.255"))  # the pool's broadcast reaches the host too
    lsrr = bytearray(ipv4("198.18.9.2", "198.19.0.10", b"x" * 4 + bytes(8)))
    lsrr[0] = 0x46  # the first 4 payload bytes now read as an option
    c.send_ip(bytes(lsrr))
    assert written == [echo]
    counters = c.session.counters
    assert counters.dropped_to_host == 2 and counters.dropped_ip_options == 1


# --- per-session rate limits -------------------------------------------------------------------


def test_a_limited_session_carries_its_burst_then_its_rate_each_way(tmp_path: Path) -> None:
    """rate 80 kbit (10,000 bytes/s), burst 3,000 bytes: at first the burst passes, then the
    rate as the clock moves; what is over is dropped and counted, each way on its own, and
    each session has buckets of its own."""
    server, clock, written = make_server(
        tmp_path, **{"srv_vpn.rate_up": "80kbit", "srv_vpn.rate_down": "80kbit",
                     "srv_vpn.rate_burst": "3000"}
    )  # fmt: skip
    a, b = Client(server, clock), Client(server, clock)
    for c in (a, b):
        c.request()
        c.addr_request()
    up = ipv4("198.18.9.2", "198.19.0.10", b"u" * 980)  # 1,000 bytes
    for _ in range(5):
        a.send_ip(up)
    assert len(written) == 3  # the burst
    counters = a.session.counters
    assert (counters.dropped_rate_up, counters.from_client_lost_bytes) == (2, 2000)
    assert counters.from_client_dropped == 2
    b.send_ip(ipv4("198.18.9.3", "198.19.0.10", b"u" * 980))
    assert len(written) == 4  # b's bucket is its own
    clock.advance(0.2)  # 2,000 bytes of rate
    for _ in range(3):
        a.send_ip(up)
    assert len(written) == 6 and counters.dropped_rate_up == 3

    down = ipv4("198.19.0.10", "198.18.9.2", b"d" * 980)
    server.forwarder.from_tun([down] * 5)
    a.pump()
    received = [p for p in a.s if p.op_code == vpn.OpCode.VPN_RECV]
    assert len(received) == 3
    assert (counters.dropped_rate_down, counters.to_client_lost_bytes) == (2, 2000)
    assert counters.to_client_dropped == 2
    clock.advance(1.0)  # refilled to the burst, no further
    server.forwarder.from_tun([down] * 5)
    a.pump()
    assert len([p for p in a.s if p.op_code == vpn.OpCode.VPN_RECV]) == 6
    assert counters.dropped_rate_down == 4


def test_without_a_rate_nothing_is_limited(tmp_path: Path) -> None:
    """The default: no bucket at all, so the packet path does not even read the clock."""
    server, clock, written = make_server(tmp_path)
    c = Client(server, clock)
    c.request()
    c.addr_request()
    assert c.session.rate_up is None and c.session.rate_down is None
    packet = ipv4("198.18.9.2", "198.19.0.10", b"u" * 1372)
    for _ in range(1000):
        c.send_ip(packet)
    assert len(written) == 1000 and c.session.counters.dropped_rate_up == 0


@pytest.mark.parametrize(
    ("text", "bits"),
    [("0", 0), ("800kbit", 800_000), ("20mbit", 20_000_000), ("1.5mbit", 1_500_000),
     ("1gbit", 10**9), ("12345", 12345), ("20MBIT", 20_000_000)],
)  # fmt: skip
def test_rates_are_written_as_tc_writes_them(tmp_path: Path, text: str, bits: int) -> None:
    server, _, _ = make_server(tmp_path, **{"srv_vpn.rate_up": text})
    assert server.config.srv_vpn.rate_up == bits


@pytest.mark.parametrize("text", ["fast", "-1mbit", "20 mb", "1e9", "2000gbit"])
def test_a_bad_rate_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as e:
        make_server(tmp_path, **{"srv_vpn.rate_up": text})
    assert "[srv_vpn] rate_up" in str(e.value) and "bits per second" in str(e.value)


def test_a_reload_limits_the_next_session_and_leaves_the_live_one(tmp_path: Path) -> None:
    """SIGHUP with a rate: the session that was already there keeps no limit, the next one
    gets its buckets; a pushed route is offered from the next ADDR_REPLY on."""
    import dataclasses

    server, clock, _written = make_server(tmp_path)
    live = Client(server, clock)
    live.request()
    live.addr_request()
    v = server.config.srv_vpn
    new = dataclasses.replace(
        server.config,
        srv_vpn=dataclasses.replace(
            v, rate_down=8_000_000, routes=(ipaddress.IPv4Network("198.19.0.0/24"),)
        ),
    )
    assert server.reload(new).result == ["reload: applied [srv_vpn] rate_down, [srv_vpn] routes"]
    assert live.session.rate_down is None
    late = Client(server, clock)
    late.request()
    late.addr_request()
    assert late.session.rate_down is not None and late.session.rate_down.rate == 1_000_000
    reply = vpn.AddrReply.decode(late.s[0].data)
    assert [str(r) for r in reply.routes] == ["198.19.0.0/24"]
