"""The server's L4 proxy: a session on a memory transport, destinations on 127.0.0.1.

The session's stream is a StringTransport; the proxy's TCP connections are real, to a listener
this test opens on 127.0.0.1 (allowed in the policy). Refusals need no network at all.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from cellvpn.conn.flow import CHUNK
from cellvpn.server.proxy import MAX_SOCKETS, ProxyRelay
from cellvpn.server.service import VPNServerService
from cellvpn.wire.channel import CHANNEL_S
from cellvpn.wire.service import ErrorCode, PacketType
from cellvpn.wire.vpn import OpCode, ProblemCode, VpnPacket
from tests.server.test_session import Client, make_server

OWN = "192.0.2.1"
#: 198.19.0.10 (never connected to: a memory reactor) is a benchmarking address, denied by default
FAR_ALLOWED = {"srv_vpn.proxy": "true", "srv_vpn.proxy_allow": "198.19.0.0/24"}


class Far(Protocol):
    """The destination end: records what it gets; the test writes and closes through it."""

    def __init__(self, ends: list[Far], paused: bool) -> None:
        self.ends = ends
        self.paused = paused
        self.received = bytearray()
        self.gone = False

    def connectionMade(self) -> None:
        self.ends.append(self)
        if self.paused:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone = True


class FarHost:
    def __init__(self) -> None:
        self.ends: list[Far] = []
        self.paused = False
        self.port = 0


@pytest_twisted.async_yield_fixture()
async def far(reactor: Any) -> AsyncIterator[FarHost]:
    host = FarHost()
    factory = Factory.forProtocol(lambda: Far(host.ends, host.paused))
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    host.port = port.getHost().port
    yield host
    for end in host.ends:
        end.transport.abortConnection()  # type: ignore[union-attr]
    await port.stopListening()


def proxy_server(
    tmp_path: Path,
    reactor: Any,
    resolve: Callable[[str, int], Deferred[list[str]]] | None = None,
    **overrides: str,
) -> VPNServerService:
    settings = {"srv_vpn.proxy": "true", "srv_vpn.proxy_allow": "127.0.0.1/32", **overrides}
    server, _, _ = make_server(tmp_path, **settings)
    relay = ProxyRelay.for_server(server)
    relay.reactor = reactor
    relay.policy = relay.policy.with_own_addresses([OWN])
    if resolve is not None:
        relay.resolve = resolve
    server.proxy = relay
    return server


def granted(server: VPNServerService) -> Client:
    c = Client(server, server.reactor)
    c.request()
    return c


def packets(c: Client, op: int, sock_id: int) -> list[VpnPacket]:
    c.pump()
    return [p for p in c.s if p.op_code == op and p.sock_id == sock_id]


async def until(reactor: Any, predicate: Callable[[], Any], what: str, timeout: float = 5) -> Any:
    deadline = reactor.seconds() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


def received(c: Client, sock_id: int) -> bytes:
    return b"".join(p.data for p in packets(c, OpCode.RECV, sock_id))


@pytest_twisted.ensureDeferred
async def test_connect_carries_bytes_both_ways_and_closes_either_way(
    tmp_path: Path, reactor: Any, far: FarHost
) -> None:
    server = proxy_server(tmp_path, reactor)
    c = granted(server)
    c.vpn(VpnPacket(OpCode.CONNECT, b"127.0.0.1", 7, port=far.port))
    [connected] = await until(reactor, lambda: packets(c, OpCode.CONNECTED, 7), "CONNECTED")
    assert connected.data == b"127.0.0.1" and connected.port == far.port
    [end] = far.ends
    c.vpn(VpnPacket(OpCode.SEND, b"hello", 7))
    await until(reactor, lambda: end.received == b"hello", "the bytes at the destination")
    payload = bytes(range(256)) * 1000
    assert end.transport is not None
    end.transport.write(payload)
    await until(reactor, lambda: received(c, 7) == payload, "RECV of 256000 bytes")
    assert all(len(p.data) <= CHUNK for p in packets(c, OpCode.RECV, 7))
    counters = c.session.counters
    assert counters.proxy_from_client_bytes == 5
    assert counters.proxy_to_client_bytes == len(payload)
    # the destination closes: DISCONNECT to the client
    end.transport.loseConnection()
    await until(reactor, lambda: packets(c, OpCode.DISCONNECT, 7), "DISCONNECT from the server")
    # the client closes: the destination sees it
    c.vpn(VpnPacket(OpCode.CONNECT, b"127.0.0.1", 8, port=far.port))
    await until(reactor, lambda: packets(c, OpCode.CONNECTED, 8), "CONNECTED 8")
    c.vpn(VpnPacket(OpCode.DISCONNECT, sock_id=8))
    await until(reactor, lambda: far.ends[1].gone, "the destination to see the close")
    assert not packets(c, OpCode.DISCONNECT, 8)
    assert server.proxy is not None and server.proxy.stats.opened == 2


@pytest_twisted.ensureDeferred
async def test_bytes_sent_before_connected_arrive_after_it(
    tmp_path: Path, reactor: Any, far: FarHost
) -> None:
    server = proxy_server(tmp_path, reactor)
    c = granted(server)
    c.conn.send_channel(
        CHANNEL_S, 2, VpnPacket(OpCode.CONNECT, b"127.0.0.1", 3, port=far.port).encode()
    )
    c.conn.send_channel(CHANNEL_S, 2, VpnPacket(OpCode.SEND, b"early", 3).encode())
    c.pump()
    await until(reactor, lambda: far.ends and far.ends[0].received == b"early", "early bytes")
    assert packets(c, OpCode.CONNECTED, 3)


@pytest_twisted.ensureDeferred
async def test_names_are_resolved_then_judged(tmp_path: Path, reactor: Any, far: FarHost) -> None:
    names = {"far.test": ["127.0.0.1"], "outside.test": ["198.19.0.10"], "none.test": []}

    def resolve(host: str, port: int) -> Deferred[list[str]]:
        if host in names:
            return succeed(names[host])
        return fail(socket.gaierror(-2, "Name or service not known"))

    server = proxy_server(tmp_path, reactor, resolve)
    c = granted(server)
    with capturedLogs() as events:
        c.vpn(VpnPacket(OpCode.CONNECT, b"outside.test", 1, port=80))
        c.vpn(VpnPacket(OpCode.CONNECT, b"nx.test", 2, port=80))
        c.vpn(VpnPacket(OpCode.CONNECT, b"none.test", 3, port=80))
    assert [(p.sock_id, p.code) for p in c.s if p.op_code == OpCode.PROBLEM] == [
        (1, ProblemCode.PROXY_DENIED),
        (2, ProblemCode.PROXY_FAILED),
        (3, ProblemCode.PROXY_FAILED),
    ]
    lines = [formatEvent(e) for e in events]
    assert (
        "proxy to outside.test:80 refused: 198.19.0.10 is in 198.18.0.0/15, Benchmarking,"
        " RFC 2544 (list it in proxy_allow to permit it) (1"
    ) in lines[0]
    assert "proxy to nx.test:80 failed: cannot resolve nx.test:" in lines[1]
    assert "proxy to none.test:80 failed: none.test has no address (3 in all)" in lines[2]
    c.vpn(VpnPacket(OpCode.CONNECT, b"far.test", 4, port=far.port))
    [connected] = await until(reactor, lambda: packets(c, OpCode.CONNECTED, 4), "CONNECTED")
    assert connected.data == b"far.test"


def test_refusals_answer_at_once_with_one_log_line(tmp_path: Path) -> None:
    """Nothing here connects: the relay's reactor is a memory one."""
    server, clock, _ = make_server(
        tmp_path, **{"srv_vpn.proxy": "true", "srv_vpn.proxy_deny": "198.18.0.0/16"}
    )
    assert server.proxy is not None
    server.proxy.policy = server.proxy.policy.with_own_addresses([OWN])
    c = granted(server)
    asks = [
        (1, b"198.18.5.1", 80),
        (2, OWN.encode(), 8089),
        (3, b"127.0.0.1", 22),
        (4, b"198.18.9.1", 80),  # the pool gateway, denied by proxy_deny first
        (5, b"198.19.0.10", 0),
        (0, b"198.19.0.10", 80),
        (6, b"\xff\xfe", 80),
    ]
    with capturedLogs() as events:
        for sock_id, host, port in asks:
            c.vpn(VpnPacket(OpCode.CONNECT, host, sock_id, port=port))
    problems = [(p.sock_id, p.code) for p in c.s]
    assert problems == [
        (1, ProblemCode.PROXY_DENIED),
        (2, ProblemCode.PROXY_DENIED),
        (3, ProblemCode.PROXY_DENIED),
        (4, ProblemCode.PROXY_DENIED),
        (5, ProblemCode.PROXY_FAILED),
        (0, ProblemCode.PROXY_FAILED),
        (6, ProblemCode.PROXY_FAILED),
    ]
    lines = [formatEvent(e) for e in events]
    sid = f"{c.session.session_id:#010x}"
    assert lines[:4] == [
        f"refused (proxy): session {sid} with 192.0.2.2:4000: proxy to 198.18.5.1:80 refused:"
        " 198.18.5.1 is in proxy_deny 198.18.0.0/16 (1 in all)",
        f"refused (proxy): session {sid} with 192.0.2.2:4000: proxy to 192.0.2.1:8089 refused:"
        " 192.0.2.1 is an address of this server (list it in proxy_allow to permit it)"
        " (2 in all)",
        f"refused (proxy): session {sid} with 192.0.2.2:4000: proxy to 127.0.0.1:22 refused:"
        " 127.0.0.1 is in 127.0.0.0/8, Loopback, RFC 1122 (list it in proxy_allow to permit it)"
        " (3 in all)",
        f"refused (proxy): session {sid} with 192.0.2.2:4000: proxy to 198.18.9.1:80 refused:"
        " 198.18.9.1 is in proxy_deny 198.18.0.0/16 (4 in all)",
    ]
    assert len(lines) == len(asks)
    assert server.proxy.stats.refused == 4 and server.proxy.stats.failed == 3
    assert not clock.tcpClients


def test_without_deny_the_pool_gateway_is_still_the_servers_own(tmp_path: Path) -> None:
    server, _, _ = make_server(tmp_path, **{"srv_vpn.proxy": "true"})
    c = granted(server)
    with capturedLogs() as events:
        c.vpn(VpnPacket(OpCode.CONNECT, b"198.18.9.1", 1, port=80))
    assert (c.s[0].op_code, c.s[0].code) == (OpCode.PROBLEM, ProblemCode.PROXY_DENIED)
    assert "198.18.9.1 is an address of this server" in formatEvent(events[0])


def test_proxy_off_refuses_with_proxy_denied(tmp_path: Path) -> None:
    server, clock, _ = make_server(tmp_path)
    c = granted(server)
    with capturedLogs() as events:
        c.vpn(VpnPacket(OpCode.CONNECT, b"198.19.0.10", 9, port=80))
    [problem] = c.s
    assert (problem.op_code, problem.sock_id, problem.code) == (
        OpCode.PROBLEM,
        9,
        ProblemCode.PROXY_DENIED,
    )
    assert formatEvent(events[0]).endswith(
        "proxy to 198.19.0.10:80 refused: proxy is off on this server (1 in all)"
    )
    assert not clock.tcpClients


def test_socket_limit_and_session_end_cancel_what_is_pending(tmp_path: Path) -> None:
    """256 connecting sockets (never answered: a memory reactor), the 257th fails."""
    server, clock, _ = make_server(tmp_path, **FAR_ALLOWED)
    c = granted(server)
    for sock_id in range(1, MAX_SOCKETS + 1):
        c.conn.send_channel(
            CHANNEL_S, 2, VpnPacket(OpCode.CONNECT, b"198.19.0.10", sock_id, port=80).encode()
        )
    c.pump()
    assert len(clock.tcpClients) == MAX_SOCKETS and not c.s
    with capturedLogs() as events:
        c.vpn(VpnPacket(OpCode.CONNECT, b"198.19.0.10", 999, port=80))
        c.vpn(VpnPacket(OpCode.CONNECT, b"198.19.0.10", 5, port=80))
    assert [(p.sock_id, p.code) for p in c.s] == [
        (999, ProblemCode.PROXY_FAILED),
        (5, ProblemCode.PROXY_FAILED),
    ]
    assert "the session has 256 proxy sockets already" in formatEvent(events[0])
    assert "sock_id 5 is in use" in formatEvent(events[1])
    c.vpn(VpnPacket(OpCode.DISCONNECT, sock_id=1))
    c.vpn(VpnPacket(OpCode.CONNECT, b"198.19.0.10", 1000, port=80))
    assert len(c.s) == 2  # room again, and no answer yet
    link = c.session.proxy
    c.lose()
    assert c.session.proxy is None and not link.sockets


def test_the_usage_ending_closes_the_sockets_and_tells_the_client(tmp_path: Path) -> None:
    server, _, _ = make_server(tmp_path, **FAR_ALLOWED)
    c = granted(server)
    c.vpn(VpnPacket(OpCode.CONNECT, b"198.19.0.10", 4, port=80))
    c.vpn(VpnPacket(OpCode.CONNECT, b"198.19.0.10", 5, port=80))
    c.session.refuse(ErrorCode.TX_COND_NOT_ENOUGH, "the deposit is empty")
    c.session.flush()
    c.pump()
    assert [(p.op_code, p.sock_id) for p in c.s] == [
        (OpCode.DISCONNECT, 4),
        (OpCode.DISCONNECT, 5),
    ]
    assert c.session.proxy is None and c.r[-1][0] == PacketType.ERROR


def test_unknown_sockets_get_disconnect_for_data_and_nothing_for_disconnect(
    tmp_path: Path,
) -> None:
    server, _, _ = make_server(tmp_path, **{"srv_vpn.proxy": "true"})
    c = granted(server)
    c.vpn(VpnPacket(OpCode.SEND, b"stray", 41))
    c.vpn(VpnPacket(OpCode.DISCONNECT, sock_id=42))
    c.vpn(VpnPacket(OpCode.CONNECTED, b"x", 43, port=1))
    assert [(p.op_code, p.sock_id) for p in c.s] == [(OpCode.DISCONNECT, 41)]
    assert server.proxy is not None
    assert server.proxy.stats.unknown_socket == 2 and server.proxy.stats.unexpected == 1


def test_proxy_packets_before_the_grant_are_dropped(tmp_path: Path) -> None:
    server, clock, _ = make_server(tmp_path, **{"srv_vpn.proxy": "true"})
    c = Client(server, clock)
    c.vpn(VpnPacket(OpCode.CONNECT, b"198.19.0.10", 1, port=80))
    assert not c.s and not clock.tcpClients and c.session.counters.dropped_not_active == 1


@pytest_twisted.ensureDeferred
async def test_a_full_stream_pauses_the_destinations(
    tmp_path: Path, reactor: Any, far: FarHost
) -> None:
    server = proxy_server(tmp_path, reactor)
    c = granted(server)
    c.vpn(VpnPacket(OpCode.CONNECT, b"127.0.0.1", 1, port=far.port))
    await until(reactor, lambda: packets(c, OpCode.CONNECTED, 1), "CONNECTED")
    c.proto.pauseProducing()  # as the TLS transport does when its buffer is full
    assert far.ends[0].transport is not None
    far.ends[0].transport.write(b"held back")
    await deferLater(reactor, 0.2, lambda: None)
    assert received(c, 1) == b""
    c.proto.resumeProducing()
    await until(reactor, lambda: received(c, 1) == b"held back", "the bytes after resume")
    # a socket opened while the stream is full starts paused too
    c.proto.pauseProducing()
    c.vpn(VpnPacket(OpCode.CONNECT, b"127.0.0.1", 2, port=far.port))
    await until(reactor, lambda: packets(c, OpCode.CONNECTED, 2), "CONNECTED 2")
    assert far.ends[1].transport is not None
    far.ends[1].transport.write(b"later")
    await deferLater(reactor, 0.2, lambda: None)
    assert received(c, 2) == b""
    c.proto.resumeProducing()
    await until(reactor, lambda: received(c, 2) == b"later", "the second socket's bytes")


@pytest_twisted.ensureDeferred
async def test_a_full_destination_pauses_the_stream(
    tmp_path: Path, reactor: Any, far: FarHost
) -> None:
    far.paused = True  # the destination reads nothing until told
    server = proxy_server(tmp_path, reactor)
    c = granted(server)
    c.vpn(VpnPacket(OpCode.CONNECT, b"127.0.0.1", 1, port=far.port))
    await until(reactor, lambda: packets(c, OpCode.CONNECTED, 1), "CONNECTED")
    assert c.transport.producerState == "producing"
    chunk = b"z" * CHUNK
    total = 0
    while c.transport.producerState == "producing" and total < 64 * 1024 * 1024:
        for _ in range(8):
            c.conn.send_channel(CHANNEL_S, 2, VpnPacket(OpCode.SEND, chunk, 1).encode())
            total += len(chunk)
        c.pump()
        await deferLater(reactor, 0, lambda: None)
    assert c.transport.producerState == "paused", "the stream was never paused"
    end = far.ends[0]
    assert end.transport is not None
    end.transport.resumeProducing()
    await until(reactor, lambda: len(end.received) == total, "every byte at the destination")
    await until(reactor, lambda: c.transport.producerState == "producing", "the stream resumed")
    assert c.session.counters.proxy_from_client_bytes == total


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
@pytest_twisted.ensureDeferred
async def test_ipv6_destinations(tmp_path: Path, reactor: Any) -> None:
    ends: list[Far] = []
    factory = Factory.forProtocol(lambda: Far(ends, False))
    port = await TCP6ServerEndpoint(reactor, 0, interface="::1").listen(factory)
    try:
        server = proxy_server(tmp_path, reactor, **{"srv_vpn.proxy_allow": "::1/128"})
        c = granted(server)
        c.vpn(VpnPacket(OpCode.CONNECT, b"::1", 1, port=port.getHost().port))
        [connected] = await until(reactor, lambda: packets(c, OpCode.CONNECTED, 1), "CONNECTED")
        assert connected.data == b"::1"
        c.vpn(VpnPacket(OpCode.SEND, b"six", 1))
        await until(reactor, lambda: ends and ends[0].received == b"six", "bytes over IPv6")
        c.lose()
        await until(reactor, lambda: ends[0].gone, "the close")
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_session_end_closes_the_destinations(
    tmp_path: Path, reactor: Any, far: FarHost
) -> None:
    server = proxy_server(tmp_path, reactor)
    c = granted(server)
    c.vpn(VpnPacket(OpCode.CONNECT, b"127.0.0.1", 1, port=far.port))
    await until(reactor, lambda: packets(c, OpCode.CONNECTED, 1), "CONNECTED")
    c.lose()
    await until(reactor, lambda: far.ends[0].gone, "the destination to be closed")


def test_early_data_is_bounded_per_session_not_only_per_socket(tmp_path: Path) -> None:
    """256 sockets x 256 KiB of early data while nothing connects held 63 MB for one session;
    now the session's budget (1 MiB by default) closes the socket that would pass it."""
    server, _, _ = make_server(tmp_path, **FAR_ALLOWED)
    c = granted(server)
    for sock_id in range(1, 9):
        c.vpn(VpnPacket(OpCode.CONNECT, b"198.19.0.10", sock_id, port=80))
    chunk = b"e" * (60 * 1024)
    for sock_id in range(1, 9):
        for _ in range(4):  # 240 KiB each, under the per-socket 256 KiB
            c.conn.send_channel(CHANNEL_S, 2, VpnPacket(OpCode.SEND, chunk, sock_id).encode())
        c.pump()
    link = c.session.proxy
    assert link.early_size <= 1024 * 1024
    closed = [p.sock_id for p in c.s if p.op_code == OpCode.DISCONNECT]
    assert sorted(set(closed)) == [5, 6, 7, 8]  # four sockets' worth fit in 1 MiB
    assert sorted(link.sockets) == [1, 2, 3, 4]


@pytest_twisted.ensureDeferred
async def test_the_rate_limit_delays_proxy_bytes_both_ways(
    tmp_path: Path, reactor: Any, far: FarHost
) -> None:
    """rate_up and rate_down of 80 kbit (10,000 bytes a second), burst 1,500: past the burst
    the proxy stops reading the stream (up) or the destination (down) until the bucket paid
    back; nothing is dropped, each pause is counted, and the bytes all arrive."""
    server = proxy_server(
        tmp_path,
        reactor,
        **{
            "srv_vpn.rate_up": "80kbit",
            "srv_vpn.rate_down": "80kbit",
            "srv_vpn.rate_burst": "1500",
        },
    )
    clock = server.reactor
    c = granted(server)
    c.vpn(VpnPacket(OpCode.CONNECT, b"127.0.0.1", 7, port=far.port))
    await until(reactor, lambda: packets(c, OpCode.CONNECTED, 7), "CONNECTED")
    [end] = far.ends
    c.vpn(VpnPacket(OpCode.SEND, b"u" * 20_000, 7))
    await until(reactor, lambda: len(end.received) == 20_000, "the bytes at the destination")
    proto = c.session.proto
    assert proto is not None and "rate" in proto._read_holds
    assert c.session.counters.delayed_rate_up == 1
    clock.advance(1.85)  # 18,500 bytes of debt at 10,000 a second
    assert "rate" not in proto._read_holds
    payload = b"d" * 200_000
    assert end.transport is not None
    end.transport.write(payload)
    await until(reactor, lambda: received(c, 7), "the first RECV")
    await deferLater(reactor, 0.1, lambda: None)
    assert len(received(c, 7)) < len(payload)  # held: the rest waits in the socket
    while len(received(c, 7)) < len(payload):
        clock.advance(10)
        await deferLater(reactor, 0.02, lambda: None)
    assert received(c, 7) == payload
    counters = c.session.counters
    assert counters.delayed_rate_down >= 1
    assert counters.dropped_rate_down == counters.dropped_rate_up == 0
