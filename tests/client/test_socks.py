"""The client's SOCKS5 listener on memory transports, and the SOCKS-only (vpn = false) start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from cellvpn.client.machine import ClientInput, ClientState
from cellvpn.client.service import VPNClientService
from cellvpn.client.socks import SocksConnection, SocksService
from cellvpn.client.socks5 import Reply, reply
from cellvpn.client.stream import ClientStream
from cellvpn.config import load_client_config
from cellvpn.conn.flow import CHUNK
from cellvpn.conn.protocol import StreamApplication, StreamProtocol
from cellvpn.stream.connection import HelloReceived, Role, StreamConnection, StreamSettings
from cellvpn.wire.channel import CHANNEL_R, CHANNEL_S
from cellvpn.wire.service import PacketType, Success
from cellvpn.wire.vpn import OpCode, ProblemCode, VpnPacket

GREETING = b"\x05\x01\x00"
CONNECT_NET_HOST = b"\x05\x01\x00\x01\xc6\x13\x00\x0a\x00\x50"  # 198.19.0.10:80
CONNECT_NAME = b"\x05\x01\x00\x03\x08far.test\x01\xbb"  # far.test:443


class _NoApp(StreamApplication):
    def stream_connected(self, proto: Any) -> None: ...


class FakeStream:
    """What SocksService uses of a ClientStream: send_vpn, usage_id and its StreamProtocol."""

    def __init__(self, clock: MemoryReactorClock) -> None:
        self.usage_id = 5
        self.sent: list[VpnPacket] = []
        conn = StreamConnection(Role.CLIENT, StreamSettings())
        self.proto = StreamProtocol(conn, _NoApp(), clock)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def send_vpn(self, packet: VpnPacket, flush: bool = True) -> None:
        self.sent.append(packet)

    def flush(self) -> None: ...


class FakeClient:
    def __init__(self, clock: MemoryReactorClock) -> None:
        self.state = ClientState.STARTED
        self.stream: FakeStream | None = FakeStream(clock)


def setup() -> tuple[SocksService, FakeClient, FakeStream]:
    clock = MemoryReactorClock()
    client = FakeClient(clock)
    service = SocksService("tcp:0:interface=127.0.0.1", client, clock)  # type: ignore[arg-type]
    assert client.stream is not None
    return service, client, client.stream


def socks_client(service: SocksService, request: bytes = CONNECT_NET_HOST) -> tuple[Any, Any]:
    conn = SocksConnection(service)
    transport = StringTransport()
    conn.makeConnection(transport)
    conn.dataReceived(GREETING + request)
    return conn, transport


def test_connect_then_relay_both_ways() -> None:
    service, _, stream = setup()
    conn, t = socks_client(service)
    assert t.value() == b"\x05\x00"  # method chosen, no reply before the server answers
    [connect] = stream.sent
    assert (connect.op_code, connect.sock_id, connect.data, connect.port) == (
        OpCode.CONNECT,
        1,
        b"198.19.0.10",
        80,
    )
    assert connect.usage_id == 5
    service.packet(VpnPacket(OpCode.CONNECTED, b"198.19.0.10", 1, port=80))
    assert t.value() == b"\x05\x00" + reply(Reply.SUCCEEDED)
    conn.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
    assert stream.sent[-1] == VpnPacket(OpCode.SEND, b"GET / HTTP/1.0\r\n\r\n", 1, 5)
    service.packet(VpnPacket(OpCode.RECV, b"HTTP/1.0 200 OK\r\n", 1))
    assert t.value().endswith(b"HTTP/1.0 200 OK\r\n")
    big = b"b" * (2 * CHUNK + 10)
    conn.dataReceived(big)
    sends = [p for p in stream.sent if p.op_code == OpCode.SEND][1:]
    assert [len(p.data) for p in sends] == [CHUNK, CHUNK, 10]
    # the server closes: the SOCKS client is closed, nothing goes back
    service.packet(VpnPacket(OpCode.DISCONNECT, sock_id=1))
    assert t.disconnecting and not service.connections
    conn.connectionLost(Failure(ConnectionDone()))
    assert stream.sent[-1].op_code == OpCode.SEND


def test_domain_names_go_to_the_server_as_they_are() -> None:
    service, _, stream = setup()
    socks_client(service, CONNECT_NAME)
    assert (stream.sent[0].data, stream.sent[0].port) == (b"far.test", 443)


def test_the_socks_client_closing_sends_disconnect() -> None:
    service, _, stream = setup()
    conn, _ = socks_client(service)
    service.packet(VpnPacket(OpCode.CONNECTED, b"198.19.0.10", 1, port=80))
    conn.connectionLost(Failure(ConnectionDone()))
    assert stream.sent[-1] == VpnPacket(OpCode.DISCONNECT, b"", 1, 5)
    assert not service.connections


def test_problem_codes_become_socks_replies() -> None:
    service, _, _ = setup()
    _, t1 = socks_client(service)
    _, t2 = socks_client(service)
    _, t3 = socks_client(service)
    service.packet(VpnPacket(OpCode.PROBLEM, sock_id=1, code=ProblemCode.PROXY_DENIED))
    service.packet(VpnPacket(OpCode.PROBLEM, sock_id=2, code=ProblemCode.PROXY_FAILED))
    service.packet(VpnPacket(OpCode.PROBLEM, sock_id=3, code=99))
    assert t1.value()[2:] == reply(Reply.NOT_ALLOWED) and t1.disconnecting
    assert t2.value()[2:] == reply(Reply.CONNECTION_REFUSED) and t2.disconnecting
    assert t3.value()[2:] == reply(Reply.GENERAL_FAILURE) and t3.disconnecting
    assert not service.connections


def test_not_started_answers_network_unreachable_at_once() -> None:
    service, client, stream = setup()
    client.state = ClientState.CONN_LOST
    _, t = socks_client(service)
    assert t.value() == b"\x05\x00" + reply(Reply.NETWORK_UNREACHABLE) and t.disconnecting
    assert not stream.sent and not service.connections


def test_link_lost_ends_every_socks_connection() -> None:
    service, _, _ = setup()
    _, waiting = socks_client(service)
    _, relaying = socks_client(service)
    service.packet(VpnPacket(OpCode.CONNECTED, b"198.19.0.10", 2, port=80))
    service.link_lost()
    assert waiting.value().endswith(reply(Reply.NETWORK_UNREACHABLE)) and waiting.disconnecting
    assert relaying.value().endswith(reply(Reply.SUCCEEDED)) and relaying.disconnecting
    assert not service.connections


def test_sock_ids_are_positive_unique_and_wrap() -> None:
    service, _, stream = setup()
    socks_client(service)
    service._next_id = 2**31 - 1
    socks_client(service)
    socks_client(service)  # wraps past the largest, skips 1 (in use)
    assert [p.sock_id for p in stream.sent] == [1, 2**31 - 1, 2]


def test_bytes_sent_early_go_after_connected() -> None:
    service, _, stream = setup()
    conn, _ = socks_client(service, CONNECT_NET_HOST + b"early")
    conn.dataReceived(b" and more")
    assert [p.op_code for p in stream.sent] == [OpCode.CONNECT]
    service.packet(VpnPacket(OpCode.CONNECTED, b"198.19.0.10", 1, port=80))
    assert [p.data for p in stream.sent[1:]] == [b"early", b" and more"]


def test_unknown_sockets() -> None:
    """Data for a closed socket gets DISCONNECT back; a DISCONNECT for one gets nothing."""
    service, _, stream = setup()
    service.packet(VpnPacket(OpCode.RECV, b"late", 9))
    service.packet(VpnPacket(OpCode.DISCONNECT, sock_id=10))
    assert stream.sent == [VpnPacket(OpCode.DISCONNECT, b"", 9, 5)]


def test_malformed_socks_input_closes_without_a_word() -> None:
    service, _, stream = setup()
    conn = SocksConnection(service)
    t = StringTransport()
    conn.makeConnection(t)
    conn.dataReceived(b"GET / HTTP/1.1\r\n")
    assert t.value() == b"" and t.disconnecting and not stream.sent


def test_flow_control_both_ways() -> None:
    """A full stream pauses the SOCKS sockets; a full SOCKS socket pauses the stream."""
    service, _, stream = setup()
    _, t = socks_client(service)
    service.packet(VpnPacket(OpCode.CONNECTED, b"198.19.0.10", 1, port=80))
    stream.proto.pauseProducing()
    assert t.producerState == "paused"
    _, t2 = socks_client(service)  # opened while the stream is full: paused at once
    assert t2.producerState == "paused"
    stream.proto.resumeProducing()
    assert t.producerState == "producing" and t2.producerState == "producing"
    t.producer.pauseProducing()  # its write buffer is full
    assert stream.transport.producerState == "paused"
    t.producer.resumeProducing()
    assert stream.transport.producerState == "producing"


def client_service(tmp_path: Path, clock: MemoryReactorClock) -> VPNClientService:
    config = load_client_config(
        None,
        {
            "client.vpn": "false",
            "client.socks": "tcp:0:interface=127.0.0.1",
            "client.state_dir": str(tmp_path / "state"),
            "control.socket": str(tmp_path / "c.sock"),
        },
    )
    return VPNClientService(config, reactor=clock)


def test_vpn_false_comes_up_on_the_grant_without_an_address(tmp_path: Path) -> None:
    """No ADDR_REQUEST, no TUN: SUCCESS alone makes the client STARTED and start() answer 0."""
    clock = MemoryReactorClock()
    service = client_service(tmp_path, clock)
    assert isinstance(service.socks, SocksService) and service.socks.parent is service
    service.machine.fire(ClientInput.START)
    service.host, service.port = "192.0.2.1", 8089
    started: Deferred[int] = Deferred()
    service._start_waiters.append(started)
    stream = ClientStream(clock, 3.0, service, want_address=False)
    service.stream = stream
    proto = StreamProtocol(StreamConnection(Role.CLIENT, StreamSettings()), stream, clock)
    t = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 8089))
    proto.makeConnection(t)
    server = StreamConnection(Role.SERVER, StreamSettings())
    s_packets: list[bytes] = []
    r_packets: list[int] = []
    server.register_channel(CHANNEL_S, lambda _t, d: s_packets.append(bytes(d)))
    server.register_channel(CHANNEL_R, lambda ptype, _d: r_packets.append(ptype))
    [hello] = server.receive_data(t.value())
    t.clear()
    assert isinstance(hello, HelloReceived)
    server.accept(0x1234)
    proto.dataReceived(server.data_to_send())
    server.receive_data(t.value())
    t.clear()
    assert r_packets == [PacketType.REQUEST]
    server.send_channel(CHANNEL_R, PacketType.SUCCESS, Success(77).encode())
    with capturedLogs() as events:
        proto.dataReceived(server.data_to_send())
    server.receive_data(t.value())
    assert service.state is ClientState.STARTED
    assert started.called and started.result == 0
    assert s_packets == []  # no ADDR_REQUEST
    assert service.tunnel.port is None
    lines = [formatEvent(e) for e in events]
    assert "VPN up: session 0x00001234 with 192.0.2.1:8089, no tunnel (vpn = false)" in lines
