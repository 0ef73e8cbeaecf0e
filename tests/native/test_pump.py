"""The server's pump (C) against the Python path it stands in for: twin servers, one with the
pump and one without, fed the same bytes by a client, must write the same packets to their
TUN and end with the same counters, allowance, stream state and TUN statistics."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellvpn.device import pump as pumping
from cellvpn.device.tohost import ToHost, ToHostRules
from cellvpn.tun.port import TunPort
from cellvpn.wire import vpn
from cellvpn.wire.channel import CHANNEL_R, CHANNEL_S
from tests.conftest import require_native
from tests.server.test_session import Client, make_server

LEASE = "198.18.9.2"
#: vnet headers a client may put before a VPN_SEND_GSO packet
PLAIN = bytes(10)
UDP_CSUM = bytes([1, 0, 0, 0, 0, 0, 20, 0, 6, 0])
TCP_GSO = bytes([1, 1, 40, 0, 0x88, 5, 20, 0, 16, 0])
#: a host address outside the pool (the TUN's peer sees it as the host's own)
HOST = "198.19.0.1"
DESTINATIONS = [
    "198.19.7.7", "198.19.7.8",  # the internet, for these tests
    "198.18.9.1",  # the gateway: a host address inside the pool
    "198.18.9.3",  # another client's address (leasable): Python routes it
    "198.18.9.255", "255.255.255.255", HOST,  # host addresses
]  # fmt: skip


def ip_packet(
    src: str, dst: str, proto: int, body: bytes, first: int = 0x45, frag: int = 0, lie: int = 0
) -> bytes:
    options = b"\x01" * 4 * (first - 0x45)
    total = 20 + len(options) + len(body) + lie
    head = struct.pack(
        "!BBHHHBBH4s4s", first, 0, total & 0xFFFF, 7, frag, 64, proto, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    return head + options + body


def udp_to(dst: str, port: int = 5201, size: int = 16) -> bytes:
    return ip_packet(LEASE, dst, 17, struct.pack("!HHHH", 4000, port, 8 + size, 0) + bytes(size))


@st.composite
def client_packets(draw: Any) -> bytes:
    """What a client, honest or not, puts in VPN_SEND: mostly packets the pump may carry,
    and each kind of packet it must leave to Python."""
    if draw(st.booleans()):  # the common case: a plain datagram to the internet
        return udp_to(draw(st.sampled_from(DESTINATIONS[:2])), size=draw(st.integers(0, 1400)))
    dst = draw(st.sampled_from(DESTINATIONS))
    src = LEASE if draw(st.integers(0, 5)) else draw(st.sampled_from(["198.18.9.3", "198.19.7.7"]))
    kind = draw(st.sampled_from(["udp", "udp", "echo", "reply", "tcp", "gre", "short", "v6"]))
    port = draw(st.sampled_from([5201, 53, 9, 7]))
    if kind == "short":
        return draw(st.binary(max_size=24))
    if kind == "v6":
        return bytes([0x60]) + draw(st.binary(min_size=39, max_size=60))
    if kind == "udp":
        proto, body = 17, struct.pack("!HHHH", 4000, port, 8 + 16, 0) + bytes(16)
    elif kind in ("echo", "reply"):
        proto, body = 1, bytes([8 if kind == "echo" else 0, 0, 0, 0, 0, 1, 0, 1]) + bytes(24)
    elif kind == "tcp":
        proto, body = 6, struct.pack("!HHIIBBHHH", 4000, port, 1, 0, 0x50, 0x10, 100, 0, 0)
    else:
        proto, body = 47, bytes(12)
    body = body[: draw(st.sampled_from([len(body), len(body), 3]))]
    first = draw(st.sampled_from([0x45] * 8 + [0x46, 0x44]))
    frag = draw(st.sampled_from([0] * 6 + [0x2000, 1]))
    lie = draw(st.sampled_from([0] * 8 + [1, -1]))
    return ip_packet(src, dst, proto, body, first, frag, lie)


@st.composite
def client_reads(draw: Any) -> list[tuple[str, Any]]:
    """A client's messages, each a VPN_SEND packet or another frame, to be written at once."""
    items: list[tuple[str, Any]] = []
    for _ in range(draw(st.integers(1, 12))):
        what = draw(
            st.sampled_from(["send"] * 16 + ["gso"] * 8 + ["ping", "other-op"] * 2 + ["service"])
        )
        packet = draw(client_packets())
        if what == "gso":  # a vnet header before it: plain, a UDP checksum to finish, or other
            packet = (
                draw(st.sampled_from([PLAIN, UDP_CSUM, TCP_GSO, bytes([4]) + bytes(9)])) + packet
            )
        items.append((what, packet))
    return items


class Twin:
    """A server with a TUN that is one end of a datagram socket pair, and its client."""

    def __init__(self, tmp_path: Path, fastpath: str, vnet: bool, to_host: str) -> None:
        self.server, self.clock, _ = make_server(
            tmp_path, **{"server.fastpath": fastpath, "srv_vpn.to_host": to_host}
        )
        server = self.server
        server._host_addresses_changed([HOST])
        self.tun_end, self.peer_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for end in (self.tun_end, self.peer_end):
            end.setblocking(False)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        tun = TunPort(self.clock, os.dup(self.tun_end.fileno()), server.forwarder.from_tun)
        self.tun = tun
        server.tun = tun
        server.forwarder.tun_write = tun.write
        if vnet:
            server.forwarder.tun_writev = tun.writev
        server.forwarder.tun_port = tun
        self.client = Client(server, self.clock)
        self.client.request()
        self.client.addr_request()
        assert self.client.session.addr_key == socket.inet_aton(LEASE)

    def tun_packets(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.peer_end.recv(70000))
            except BlockingIOError:
                return out

    def state(self) -> Any:
        session = self.client.session
        conn = self.client.proto.conn
        seq = conn.seq
        tun = dataclasses.asdict(self.tun.stats)
        tun.pop("packets_read"), tun.pop("bytes_read"), tun.pop("wakeups")
        return (
            dataclasses.asdict(session.counters), session.allowance, tun,
            conn.stats.frames_in, conn.stats.bytes_in, (seq.last, seq.gaps, seq.replays),
            conn.closed is not None and conn.closed.reason, session.pings,
        )  # fmt: skip

    def close(self) -> None:
        """Idempotent: a test may close its pair early, the fixture closes every one."""
        self.tun.close()
        self.tun_end.close()
        self.peer_end.close()


@pytest.fixture
def twins(tmp_path: Path) -> Iterator[Any]:
    made: list[Twin] = []

    def make(
        vnet: bool = False, to_host: str = "icmp, dns", offload: bool = True
    ) -> tuple[Twin, Twin]:
        fast = Twin(tmp_path / f"c{len(made)}", "on", vnet, to_host)
        slow = Twin(tmp_path / f"p{len(made)}", "off", vnet, to_host)
        for twin in (fast, slow):  # as if HELLO had agreed to offload
            twin.client.session.offload = offload
        made.extend((fast, slow))
        return fast, slow

    yield make
    for twin in made:
        twin.close()


def encode(client: Client, items: list[tuple[str, Any]]) -> bytes:
    conn = client.conn
    for what, pkt in items:
        if what == "send":
            conn.send_channel(CHANNEL_S, 2, vpn.VpnPacket(vpn.OpCode.VPN_SEND, pkt).encode())
        elif what == "gso":
            conn.send_channel(CHANNEL_S, 2, vpn.VpnPacket(vpn.OpCode.VPN_SEND_GSO, pkt).encode())
        elif what == "ping":
            conn.send_channel(CHANNEL_S, 2, vpn.VpnPacket(vpn.OpCode.PING).encode())
        elif what == "service":
            conn.send_channel(CHANNEL_R, 0x7E, pkt[:8])
        else:
            conn.send_channel(CHANNEL_S, 2, vpn.VpnPacket(vpn.OpCode.VPN_RECV, pkt).encode())
    return conn.data_to_send()


def feed_both(pair: tuple[Twin, Twin], data: bytes, cuts: list[int]) -> None:
    pieces, at = [], 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        pieces.append(data[at:cut])
        at = cut
    pieces.append(data[at:])
    for twin in pair:
        for piece in pieces:
            if piece:
                twin.client.proto.dataReceived(piece)


def run_pair(pair: tuple[Twin, Twin], data: bytes, cuts: list[int]) -> None:
    feed_both(pair, data, cuts)
    fast, slow = pair
    assert fast.tun_packets() == slow.tun_packets()
    assert fast.state() == slow.state()


@settings(
    max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    reads=st.lists(
        st.tuples(
            client_reads(),
            st.lists(st.integers(0, 10**6), max_size=3),
            st.one_of(
                st.just([]),
                st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=2),
            ),
        ),
        min_size=1,
        max_size=4,
    ),
    vnet=st.booleans(),
    to_host=st.sampled_from(["icmp, dns", "icmp, udp:5201, udp:7", "all", "none"]),
    allowance=st.sampled_from([None, None, 1, 60, 200, 10**6]),
    offload=st.booleans(),
)
def test_the_pump_does_what_the_python_path_does(
    twins: Any,
    reads: list[tuple[list[tuple[str, Any]], list[int], list[tuple[int, int]]]],
    vnet: bool,
    to_host: str,
    allowance: int | None,
    offload: bool,
) -> None:
    require_native()
    pair = twins(vnet, to_host, offload)
    if allowance is not None:
        for twin in pair:
            twin.client.session.allowance = allowance
    for items, cuts, flips in reads:
        data = bytearray(encode(pair[0].client, items))
        for at, value in flips:  # a header (or a packet) byte changed on the way
            data[at % len(data)] = value
        run_pair(pair, bytes(data), cuts)
        if pair[1].client.proto.conn.closed is not None:
            break
    for twin in pair:  # hundreds of examples: their sockets are not kept to the end
        twin.close()


def test_the_pump_carries_a_passing_sessions_packets(twins: Any) -> None:
    require_native()
    pair = twins(vnet=False, to_host="icmp, udp:5201")
    items = [("send", udp_to("198.19.7.7"))] * 40 + [("send", udp_to("198.18.9.1"))] * 10
    run_pair(pair, encode(pair[0].client, items), [])
    fast, slow = pair
    assert fast.server.forwarder.pumped_packets == 50
    assert slow.server.forwarder.pumped_packets == 0
    assert fast.client.session.counters.from_client_packets == 50
    assert fast.server.control_vpn_stat()["pumped_packets"] == 50


def test_the_packet_that_ends_the_allowance_goes_to_billing(twins: Any) -> None:
    require_native()
    pair = twins()
    packet = udp_to("198.19.7.7", size=72)  # 100 IP bytes
    for twin in pair:
        twin.client.session.allowance = 201
    run_pair(pair, encode(pair[0].client, [("send", packet)] * 6), [])
    fast = pair[0]
    # two pass in C (201 -> 1); the third would end it: Python carries it and the rest of
    # the read, and asks billing (none here: unmetered from then on)
    assert fast.server.forwarder.pumped_packets == 2
    assert fast.client.session.counters.from_client_packets == 6
    run_pair(pair, encode(pair[0].client, [("send", packet)] * 4), [])
    assert fast.server.forwarder.pumped_packets == 2 + 4


def test_a_bad_header_later_in_the_read_stops_the_pump_before_it_starts(twins: Any) -> None:
    require_native()
    pair = twins()
    data = bytearray(encode(pair[0].client, [("send", udp_to("198.19.7.7"))] * 5))
    frame = len(data) // 5
    data[3 * frame] ^= 0xFF  # the fourth frame's signature
    run_pair(pair, bytes(data), [])
    fast = pair[0]
    assert fast.server.forwarder.pumped_packets == 0 and fast.tun_packets() == []
    assert fast.client.proto.conn.closed is not None


#: what the pump leaves to Python, each with the reason (from the client's lease, passing)
LEFT_TO_PYTHON = [
    ("tcp", ip_packet(LEASE, "198.19.7.7", 6, bytes(20))),
    ("ip options", ip_packet(LEASE, "198.19.7.7", 17, bytes(8), first=0x46)),
    ("total length lies", ip_packet(LEASE, "198.19.7.7", 17, bytes(8), lie=1)),
    ("spoofed", ip_packet("198.18.9.3", "198.19.7.7", 17, bytes(8))),
    ("another client", udp_to("198.18.9.3")),
    ("host, port not listed", udp_to(HOST, port=22)),
    ("host, dns", udp_to(HOST, port=53)),
    ("host, echo reply", ip_packet(LEASE, HOST, 1, bytes(28))),
    ("host, fragment", ip_packet(LEASE, HOST, 17, udp_to(HOST)[20:], frag=1)),
    ("host, first fragment", ip_packet(LEASE, HOST, 17, udp_to(HOST)[20:], frag=0x2000)),
    ("host, gre with a listed port's bytes", ip_packet(LEASE, HOST, 47, udp_to(HOST)[20:])),
    ("host, timestamp request", ip_packet(LEASE, HOST, 1, bytes([13]) + bytes(27))),
    ("19 bytes", ip_packet(LEASE, "198.19.7.7", 17, b"", lie=-1)[:19]),
    ("ipv6", bytes([0x60]) + bytes(39)),
    ("too short", b"\x45" + bytes(10)),
]


@pytest.mark.parametrize(("why", "packet"), LEFT_TO_PYTHON, ids=[w for w, _ in LEFT_TO_PYTHON])
def test_what_the_pump_leaves_to_python(twins: Any, why: str, packet: bytes) -> None:
    require_native()
    pair = twins(to_host="icmp, udp:5201")
    run_pair(pair, encode(pair[0].client, [("send", packet), ("send", udp_to("198.19.7.7"))]), [])
    assert pair[0].server.forwarder.pumped_packets == 0, why


#: what the pump carries itself, with the to_host it runs under
CARRIED_BY_C = [
    ("udp", "none", udp_to("198.19.7.7")),
    ("20 bytes", "none", ip_packet(LEASE, "198.19.7.7", 17, b"")),
    ("gre", "none", ip_packet(LEASE, "198.19.7.7", 47, bytes(12))),
    ("echo reply out", "none", ip_packet(LEASE, "198.19.7.7", 1, bytes(28))),
    ("fragment out", "none", ip_packet(LEASE, "198.19.7.7", 17, bytes(8), frag=1)),
    ("gateway echo", "icmp", ip_packet(LEASE, "198.18.9.1", 1, bytes([8]) + bytes(27))),
    ("host echo", "icmp", ip_packet(LEASE, HOST, 1, bytes([8]) + bytes(27))),
    ("host listed port", "udp:5201", udp_to(HOST)),
    (
        "host, don't fragment",
        "udp:5201",
        ip_packet(LEASE, HOST, 17, udp_to(HOST)[20:], frag=0x4000),
    ),
    ("host, all", "all", udp_to(HOST, port=22)),
    ("host fragment, all", "all", ip_packet(LEASE, HOST, 17, bytes(8), frag=1)),
    ("broadcast, all", "all", udp_to("255.255.255.255", port=22)),
]


@pytest.mark.parametrize(
    ("why", "to_host", "packet"), CARRIED_BY_C, ids=[w for w, _, _ in CARRIED_BY_C]
)
def test_what_the_pump_carries(twins: Any, why: str, to_host: str, packet: bytes) -> None:
    require_native()
    pair = twins(to_host=to_host)
    run_pair(pair, encode(pair[0].client, [("send", packet)] * 2), [])
    assert pair[0].server.forwarder.pumped_packets == 2, why


#: VPN_SEND_GSO packets: (why, vnet TUN, the session agreed to offload, vnet header, packet,
#: carried by C)
OUT = udp_to("198.19.7.7")
CSUM_AT = bytes([1, 0, 0, 0, 0, 0])  # NEEDS_CSUM, GSO_NONE, then csum_start, csum_offset
# fmt: off
GSO_CASES = [
    ("plain", False, True, PLAIN, OUT, True),
    ("data valid", False, True, bytes([2]) + bytes(9), OUT, True),
    ("udp checksum, vnet TUN", True, True, UDP_CSUM, OUT, True),
    ("udp checksum, ECN bit", True, True, bytes([1, 0x80]) + UDP_CSUM[2:], OUT, True),
    ("udp checksum to the host", True, True, UDP_CSUM, udp_to(HOST), True),
    ("udp checksum, plain TUN", False, True, UDP_CSUM, OUT, False),
    ("udp checksum offset wrong", True, True, CSUM_AT + bytes([20, 0, 16, 0]), OUT, False),
    ("udp checksum start wrong", True, True, CSUM_AT + bytes([24, 0, 6, 0]), OUT, False),
    ("udp checksum, fragment", True, True, UDP_CSUM,
     ip_packet(LEASE, "198.19.7.7", 17, OUT[20:], frag=1), False),
    ("checksum for gre", True, True, UDP_CSUM,
     ip_packet(LEASE, "198.19.7.7", 47, bytes(16)), False),
    ("a tcp super-packet", True, True, TCP_GSO,
     ip_packet(LEASE, "198.19.7.7", 6, bytes(40)), False),
    ("udp gso type", True, True, bytes([1, 5]) + UDP_CSUM[2:], OUT, False),
    ("unknown flag", True, True, bytes([4]) + bytes(9), OUT, False),
    ("no offload agreed", True, False, PLAIN, OUT, False),
    ("spoofed", True, True, PLAIN, ip_packet("198.18.9.3", "198.19.7.7", 17, bytes(8)), False),
]
# fmt: on


@pytest.mark.parametrize(
    ("why", "vnet", "offload", "header", "packet", "carried"),
    GSO_CASES,
    ids=[c[0] for c in GSO_CASES],
)
def test_vpn_send_gso_in_the_pump(
    twins: Any, why: str, vnet: bool, offload: bool, header: bytes, packet: bytes, carried: bool
) -> None:
    require_native()
    pair = twins(vnet=vnet, to_host="icmp, udp:5201", offload=offload)
    run_pair(pair, encode(pair[0].client, [("gso", header + packet)] * 2), [])
    assert pair[0].server.forwarder.pumped_packets == (2 if carried else 0), why


#: header fields of the first of two data frames, each changed: the pump carries neither
#: (offset in the frame, value): frame type, channel, channel size, seq, op, VPN size
FRAMING = [
    ("frame type KEEPALIVE", 20, 0x11),
    ("channel R", 37, 0x52),
    ("channel size", 49, 1),
    ("seq ahead", 41, 5),
    ("op VPN_SEND_GSO", 57, vpn.OpCode.VPN_SEND_GSO),
    ("op PING", 57, vpn.OpCode.PING),
    ("vpn size", 65, 1),
]


@pytest.mark.parametrize(("why", "offset", "value"), FRAMING, ids=[w for w, _, _ in FRAMING])
def test_a_frame_the_pump_may_not_carry(twins: Any, why: str, offset: int, value: int) -> None:
    require_native()
    pair = twins()
    data = bytearray(encode(pair[0].client, [("send", udp_to("198.19.7.7"))] * 2))
    if offset in (49, 65):  # a size: add to it, so it lies by that much
        data[offset] = (data[offset] + value) & 0xFF
    elif offset == 41:
        data[offset] += value
    else:
        data[offset] = value
    run_pair(pair, bytes(data), [])
    assert pair[0].server.forwarder.pumped_packets == 0, why


def test_an_op_of_zero_is_not_vpn_send_gso_without_offload(twins: Any) -> None:
    """0 stands for "no VPN_SEND_GSO" in the pump's arguments: a frame with op 0 is not one."""
    require_native()
    pair = twins(offload=False)
    packet = PLAIN + OUT
    header = struct.pack("<iIII4x", 0, 0, 0, len(packet))
    for _ in range(2):
        pair[0].client.conn.send_channel(CHANNEL_S, 2, header + packet)
    run_pair(pair, pair[0].client.conn.data_to_send(), [])
    assert pair[0].server.forwarder.pumped_packets == 0


def test_the_rules_the_pump_gets() -> None:
    pool = ipaddress.IPv4Network("198.18.5.0/24")
    rules = ToHostRules.parse(["icmp", "udp:5201", "udp:53", "tcp:22"])
    to_host = ToHost(
        rules, ["198.18.5.1", "198.18.5.255", "198.18.5.7", "198.19.0.1", "2001:db8::1"]
    )
    got = pumping.pump_rules([pool], to_host)
    assert got.keep == bytes([198, 18, 5, 0, 255, 255, 255, 0])
    # 198.18.5.7 could be a client's: kept for Python; IPv6 is Python's anyway
    assert got.hosts == bytes([198, 18, 5, 1, 198, 18, 5, 255, 198, 19, 0, 1])
    assert got.host_udp == bytes([0, 53, 0x14, 0x51])
    assert got.host_flags == pumping.HOST_ICMP
    assert pumping.pump_rules([pool], None) == (got.keep, b"", b"", 0)
    everything = ToHost(ToHostRules.parse(["all"]), ["198.19.0.1"])
    assert pumping.pump_rules([pool], everything).host_flags == pumping.HOST_ALL
    crowded = ToHost(rules, [f"198.19.1.{i}" for i in range(17)])
    assert pumping.pump_rules([pool], crowded) == pumping.KEEP_ALL


def test_the_pump_refuses_arguments_out_of_their_range() -> None:
    c = require_native()
    view = memoryview(b"")
    good: list[Any] = [view, 0, 1000, 0, False, bytes(4), b"", b"", b"", 0, 0, 100, 2, 1, 0]

    def call(**changed: Any) -> None:
        args = list(good)
        for index, value in changed.items():
            args[int(index[1:])] = value
        c.pump_up(*args)

    call()
    for change, match in [
        ({"a1": 1}, "pos outside"),
        ({"a3": -1}, "fd or channel"),
        ({"a12": 256}, "fd or channel"),
        ({"a5": bytes(3)}, "lease must be 4 bytes"),
        ({"a6": bytes(8 * 17)}, "keep at most 16"),
        ({"a6": bytes(7)}, "keep at most 16"),
        ({"a7": bytes(4 * 17)}, "hosts at most 16"),
        ({"a8": bytes(3)}, "host_udp at most 16"),
        ({"a9": 4}, "host_flags 0 to 3"),
    ]:
        with pytest.raises(ValueError, match=match):
            call(**change)


def test_without_a_tun_or_while_billing_holds_the_pump_takes_nothing(twins: Any) -> None:
    require_native()
    fast, slow = twins()
    packets = [("send", udp_to("198.19.7.7"))] * 3
    for twin in (fast, slow):
        twin.client.session.hold(True)
    run_pair((fast, slow), encode(fast.client, packets), [])
    for twin in (fast, slow):
        twin.client.session.hold(False)
        twin.server.forwarder.tun_port = None
    run_pair((fast, slow), encode(fast.client, packets), [])
    assert fast.server.forwarder.pumped_packets == 0
