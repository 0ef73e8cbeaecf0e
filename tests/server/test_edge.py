"""The edge before payment: what a client that has not paid (or never reads) can make us do.

Each test is one attack from the open internet, on memory transports and a memory clock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from zope.interface import directlyProvides

from cellvpn.billing.records import DepositRequest, SignedDeposit
from cellvpn.conn.flow import MIN_CHUNK, chunk_size
from cellvpn.ratelimit import TokenBucket
from cellvpn.server.edge import Admission, EdgeLimits, LineBudget, Refusal, Refusals
from cellvpn.server.service import _StreamFactory
from cellvpn.stream.connection import Closed, Role, StreamConnection, StreamSettings
from cellvpn.wire import vpn
from cellvpn.wire.channel import CHANNEL_R, CHANNEL_S
from cellvpn.wire.frame import FrameType, encode_frame
from cellvpn.wire.receipt import Unit
from cellvpn.wire.service import CheckPacket, PacketType
from cellvpn.wire.setup import CloseCode, Hello

from .test_session import Client, make_server

# --- the rules on their own ------------------------------------------------------------------


def test_token_bucket_rows() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    rows = [(t, bucket.take(t)) for t in (0.0, 0.0, 0.0, 0.0, 0.4, 0.5, 0.5, 10.0, 10.0)]
    assert rows == [
        (0.0, True),
        (0.0, True),
        (0.0, True),
        (0.0, False),  # burst spent
        (0.4, False),  # 0.8 tokens
        (0.5, True),  # 1.0 token
        (0.5, False),
        (10.0, True),  # refilled to the burst, not beyond
        (10.0, True),
    ]


def test_admission_rows() -> None:
    """Literal rows: which limit refuses which connection, and what closing gives back."""
    admission = Admission(EdgeLimits(4, 3, 2, connect_rate=1.0, connect_burst=5))
    got = [admission.admit("a", 0.0) for _ in range(3)]
    assert got == [None, None, Refusal.HANDSHAKES_PER_SOURCE]
    admission.handshake_done("a")
    assert admission.admit("a", 0.0) is None  # 3 streams, 2 handshaking
    admission.handshake_done("a")
    assert admission.admit("a", 0.0) is Refusal.STREAMS_PER_SOURCE
    assert admission.admit("b", 0.0) is None  # 4 streams in all
    assert admission.admit("c", 0.0) is Refusal.STREAMS_TOTAL
    admission.closed("b", handshaking=True)
    assert (admission.streams, admission.handshakes) == (3, 1)
    # "a" spent its burst of 5 (4 taken, 1 refused); one token a second after that
    admission.closed("a", handshaking=False)
    assert admission.admit("a", 0.5) is Refusal.CONNECTION_RATE
    assert admission.admit("a", 1.5) is None
    assert admission.admit("a", 1.6) is Refusal.CONNECTION_RATE


def test_refusals_are_counted_and_said_once_per_interval() -> None:
    lines: list[tuple[Refusal, int, str]] = []
    now = [0.0]
    refusals = Refusals(lambda k, n, e: lines.append((k, n, e)), lambda: now[0], 10.0)
    for i in range(1000):
        refusals.count(Refusal.CHECK_BUDGET, f"try {i}")
    now[0] = 10.0
    refusals.count(Refusal.CHECK_BUDGET, "later")
    refusals.count(Refusal.PING, "ping")
    assert lines == [
        (Refusal.CHECK_BUDGET, 1, "try 0"),
        (Refusal.CHECK_BUDGET, 1000, "later"),
        (Refusal.PING, 1, "ping"),
    ]
    assert refusals.counts == {"check_budget": 1001, "ping": 1}


def test_relay_chunks_are_never_small() -> None:
    """A HELLO's max_frame of 1 once made the relay cut each 64 KiB read into 1-byte RECVs."""
    assert chunk_size(0) == 60 * 1024
    assert chunk_size(262144) == 60 * 1024
    assert chunk_size(MIN_CHUNK + 36) == MIN_CHUNK
    assert chunk_size(MIN_CHUNK + 35) == 0  # no relay at all for such a client
    assert chunk_size(1) == 0


# --- the stream --------------------------------------------------------------------------------


def test_keepalive_before_hello_closes_the_stream() -> None:
    """It was answered with ALIVE before HELLO: 1:1 output for anyone who connects."""
    server = StreamConnection(Role.SERVER, StreamSettings())
    events = server.receive_data(encode_frame(FrameType.KEEPALIVE) * 50)
    assert (
        isinstance(events[0], Closed) and "KEEPALIVE before the session setup" in events[0].reason
    )
    out = server.data_to_send()
    assert out.count(encode_frame(FrameType.ALIVE)) == 0


def test_keepalives_are_answered_at_a_rate() -> None:
    now = [0.0]
    client = StreamConnection(Role.CLIENT, StreamSettings(), clock=lambda: now[0])
    server = StreamConnection(Role.SERVER, StreamSettings(), clock=lambda: now[0])
    client.start()
    server.receive_data(client.data_to_send())
    server.register_channel(CHANNEL_R, lambda t, d: None)
    server.register_channel(CHANNEL_S, lambda t, d: None)
    server.accept(1)
    server.data_to_send()
    alive = encode_frame(FrameType.ALIVE)
    keepalive = encode_frame(FrameType.KEEPALIVE)
    assert server.receive_data(keepalive * 40) == []
    assert server.data_to_send().count(alive) == 8  # the burst: twice 4 a second
    now[0] = 1.0
    assert server.receive_data(keepalive * 10) == []
    assert server.data_to_send().count(alive) == 4
    assert server.stats.keepalives_unanswered == 32 + 6 and server.established
    # a peer that goes on never gets more, and is cut off at 64 unanswered
    [closed] = server.receive_data(keepalive * 3000)
    assert isinstance(closed, Closed) and closed.cause == "keepalive"
    assert server.stats.keepalives_unanswered == 64


def test_a_hello_with_tiny_frames_is_refused() -> None:
    server = StreamConnection(Role.SERVER, StreamSettings())
    hello = Hello(version=2, channels="RS", max_frame=1)
    events = server.receive_data(encode_frame(FrameType.HELLO, hello.encode()))
    assert isinstance(events[0], Closed)
    assert events[0].reason == "HELLO announces frames of 1 bytes, below the least of 1500"


# --- sessions ----------------------------------------------------------------------------------


class BufferingTransport(StringTransport):
    """A TCP transport that holds what is written until ``drain``, as a peer that never
    reads leaves a real one."""

    offset = 0
    _tempDataLen = 0

    @property
    def dataBuffer(self) -> bytes:
        return self.value()

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True


def buffering() -> BufferingTransport:
    return BufferingTransport(peerAddress=IPv4Address("TCP", "192.0.2.2", 4000))


def test_check_flood_that_never_reads_is_bounded(tmp_path: Path) -> None:
    """3,000 CHECKs asking 10 KiB each left 29 MB in the write buffer; now the budget (1 MiB
    by default) closes the session, and nothing past it is answered."""
    server, clock, _ = make_server(tmp_path)
    c = Client(server, clock, transport=buffering())
    ask = CheckPacket(data_size_recv=10240).encode()
    for _ in range(3000):
        c.conn.send_channel(CHANNEL_R, PacketType.CHECK_REQUEST, ask)
    c.proto.dataReceived(c.conn.data_to_send())
    held = len(c.transport.value())
    assert held < 1024 * 1024 + 64 * 1024, held
    assert c.transport.disconnecting
    assert server.refusals.counts["check_budget"] == 1


def test_checks_within_the_budget_are_answered_and_keep_the_session(tmp_path: Path) -> None:
    server, clock, _ = make_server(tmp_path)
    c = Client(server, clock)
    for _ in range(5):
        clock.advance(20)  # the REQUEST deadline is 30 s; each CHECK starts it again
        c.conn.send_channel(
            CHANNEL_R, PacketType.CHECK_REQUEST, CheckPacket(data_size_recv=100).encode()
        )
        c.pump()
    assert [t for t, _ in c.r] == [PacketType.CHECK_RESPONSE] * 5
    assert not c.transport.disconnecting
    clock.advance(31)
    c.pump()
    assert c.transport.disconnecting
    assert server.refusals.counts == {"request_timeout": 1}
    assert any(isinstance(e, Closed) and e.code == CloseCode.REFUSED for e in c.events)


def test_a_session_that_never_asks_for_service_is_closed(tmp_path: Path) -> None:
    """Only KEEPALIVEs, never a REQUEST: it stayed up forever."""
    server, clock, _ = make_server(tmp_path)
    c = Client(server, clock)
    for _ in range(10):
        clock.advance(3)
        c.proto.dataReceived(encode_frame(FrameType.KEEPALIVE))
    assert c.transport.disconnecting
    assert server.refusals.counts == {"request_timeout": 1}


def test_ping_is_answered_only_with_a_granted_usage(tmp_path: Path) -> None:
    server, clock, _ = make_server(tmp_path, **{"srv_vpn.allow_free_srv": "true"})
    c = Client(server, clock)
    c.vpn(vpn.VpnPacket(vpn.OpCode.PING))
    assert c.s == [] and server.refusals.counts == {"ping": 1}
    c.request()
    c.vpn(vpn.VpnPacket(vpn.OpCode.PING))
    assert [p.op_code for p in c.s] == [vpn.OpCode.PONG]


def test_output_past_the_high_mark_stops_reading_and_past_the_limit_cuts(tmp_path: Path) -> None:
    server, clock, _ = make_server(
        tmp_path, **{"edge.output_high": str(2 << 20), "edge.output_limit": str(3 << 20)}
    )
    transport = buffering()
    c = Client(server, clock, transport=transport)
    transport.clear()
    session: Any = c.session
    c.proto.conn.send_channel(CHANNEL_S, 2, b"x" * (2 << 20) + b"y")
    c.proto.flush()
    assert transport.producerState == "paused" and c.proto.reading_held
    c.proto.resumeProducing()  # the kernel took it all: reading goes on
    transport.clear()
    assert transport.producerState == "producing" and not c.proto.reading_held
    for _ in range(4):
        c.proto.conn.send_channel(CHANNEL_S, 2, b"x" * (1 << 20))
        c.proto.flush()
    assert getattr(transport, "aborted", False) and c.proto.overflowed
    assert server.refusals.counts == {"output_limit": 1}
    assert session.close_reason.startswith("cut off with")


def test_second_deposit_create_closes_the_session_without_ledger_work(tmp_path: Path) -> None:
    """1 MB of DEPOSIT_CREATEs queued 4,000 ledger calls; one is all a client needs."""
    from .test_billing import paid_server

    server, clock, _, ledger, client = paid_server(tmp_path)
    ledger.ledger.mint(client.account, 10**6, client.public)
    c = Client(server, clock)
    for n in range(50):
        request = DepositRequest(client.public, Unit.B, 1, 1000 + n, 2**40, bytes(16))
        body = SignedDeposit.sign(request, client).encode()
        c.conn.send_channel(CHANNEL_R, PacketType.DEPOSIT_CREATE, body)
    c.pump()
    assert [t for t, _ in c.r] == [PacketType.DEPOSIT_CREATED]
    assert c.transport.disconnecting
    assert server.refusals.counts == {"deposit_create": 1}
    assert ledger.calls["create_deposit"] == 1


# --- admission at the port ---------------------------------------------------------------------


def test_connections_past_the_burst_are_refused_before_tls(tmp_path: Path) -> None:
    server, clock, _ = make_server(
        tmp_path, **{"edge.connect_burst": "5", "edge.connect_rate": "1"}
    )
    factory = _StreamFactory(server)
    addr = IPv4Address("TCP", "192.0.2.9", 5000)
    built = [factory.buildProtocol(addr) for _ in range(8)]
    assert [p is not None for p in built] == [True] * 5 + [False] * 3
    assert server.refusals.counts == {"connection_rate": 3}
    with capturedLogs() as events:
        clock.advance(1)
        assert factory.buildProtocol(addr) is not None
    assert events == []  # the refusals were said once, at the first
    other = IPv4Address("TCP", "198.18.7.1", 5000)
    assert factory.buildProtocol(other) is not None  # another source has its own bucket


def test_handshake_deadline_cuts_connections_that_never_finish_tls(tmp_path: Path) -> None:
    server, clock, _ = make_server(tmp_path)
    factory = _StreamFactory(server)
    proto: Any = factory.buildProtocol(IPv4Address("TCP", "192.0.2.9", 5000))
    transport = BufferingTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 5000))
    directlyProvides(transport, ISSLTransport)  # as TLS is, until handshakeCompleted
    proto.makeConnection(transport)
    assert server.admission.handshakes == 1
    with capturedLogs() as events:
        clock.advance(10)
    assert getattr(transport, "aborted", False)
    assert server.refusals.counts == {"handshake_timeout": 1}
    assert [formatEvent(e) for e in events] == [
        "refused (handshake_timeout): 192.0.2.9:5000: no TLS handshake within 10 s (1 in all)"
    ]
    proto.connectionLost(Failure(ConnectionLost()))
    assert (server.admission.streams, server.admission.handshakes) == (0, 0)


def test_a_connect_flood_with_the_proxy_off_gives_one_log_line(tmp_path: Path) -> None:
    """740 KB of CONNECTs once gave 10,000 log lines."""
    server, clock, _ = make_server(
        tmp_path, **{"edge.log_interval": "10", "srv_vpn.allow_free_srv": "true"}
    )
    c = Client(server, clock)
    c.request()
    with capturedLogs() as events:
        for sock_id in range(1, 2001):
            packet = vpn.VpnPacket(vpn.OpCode.CONNECT, b"198.19.0.10", sock_id, port=80)
            c.conn.send_channel(CHANNEL_S, 2, packet.encode())
        c.pump()
    assert server.refusals.counts == {"proxy": 2000}
    assert len(events) == 1
    assert formatEvent(events[0]).endswith("refused: proxy is off on this server (1 in all)")


def test_hello_and_keepalive_in_one_read_close_without_a_traceback(tmp_path: Path) -> None:
    """The KEEPALIVE ended the stream before the HELLO was answered: accept then raised."""
    server, _, _ = make_server(tmp_path)
    proto: Any = _StreamFactory(server).buildProtocol(IPv4Address("TCP", "192.0.2.9", 5000))
    transport = buffering()
    proto.makeConnection(transport)
    client = StreamConnection(Role.CLIENT, StreamSettings())
    client.start()
    with capturedLogs() as events:
        proto.dataReceived(client.data_to_send() + encode_frame(FrameType.KEEPALIVE))
    assert [formatEvent(e) for e in events] == [
        "refused (protocol_error): 192.0.2.2:4000: KEEPALIVE before the session setup (1 in all)"
    ]
    assert len(server.sessions) == 0 and transport.disconnecting


def test_a_peer_that_goes_on_sending_after_our_close_is_cut_off(tmp_path: Path) -> None:
    """A refused client went on being parsed until the abort 5 s later (800 MB in a flood).
    Reading goes on after CLOSE, so that TLS sees the peer's own close at once, but past 1 MiB
    of what was in flight the connection is dropped."""
    server, clock, _ = make_server(tmp_path)
    transport = buffering()
    c = Client(server, clock, transport=transport)
    c.conn.send_channel(CHANNEL_R, PacketType.DEPOSIT_CREATE, b"\x00")  # not even decodable
    c.pump()
    assert transport.disconnecting and transport.producerState == "producing"
    c.proto.dataReceived(b"x" * 65536)
    assert not getattr(transport, "aborted", False)
    for _ in range(16):
        c.proto.dataReceived(b"x" * 65536)
    assert getattr(transport, "aborted", False)


def test_the_line_budget_writes_a_burst_then_its_rate_and_says_what_it_skipped() -> None:
    """2 lines a second after a burst of 3; what is over is counted and said once per 10 s."""
    now = [0.0]
    said: list[tuple[float, int]] = []
    budget = LineBudget(2.0, 3, lambda: now[0], 10.0, lambda n: said.append((now[0], n)))
    assert [budget.allow() for _ in range(5)] == [True, True, True, False, False]
    assert said == [(0.0, 1)] and budget.skipped == 2  # the first skip is said at once
    now[0] = 1.0  # two more lines of rate
    assert [budget.allow() for _ in range(3)] == [True, True, False]
    assert said == [(0.0, 1)] and budget.skipped == 3
    now[0] = 10.0
    assert budget.allow() is True
    assert said == [(0.0, 1), (10.0, 2)]  # the two skipped since the last summary
    now[0] = 30.0
    assert budget.allow() is True and said == [(0.0, 1), (10.0, 2)]  # nothing new to say


def test_sessions_without_service_write_lines_within_the_budget(tmp_path: Path) -> None:
    """Forty sessions that never ask for service: the burst (5) of lines and one summary,
    not eighty lines; a session that got service still says that it ended."""
    server, clock, _written = make_server(
        tmp_path, **{"edge.session_lines_per_second": "0.1", "edge.session_lines_burst": "5"}
    )
    with capturedLogs() as events:
        for _ in range(40):
            Client(server, clock).lose()
        served = Client(server, clock)
        served.request()
        served.lose()
    lines = [formatEvent(e) for e in events]
    session_lines = [ln for ln in lines if " established " in ln or " ended: " in ln]
    assert len([ln for ln in session_lines if " ended: " in ln]) >= 1
    assert len(session_lines) == 5 + 1, session_lines  # the burst, and the served one's end
    assert server.session_lines.skipped == 40 * 2 + 1 - 5
    assert any("not written (more than 0.1 a second" in ln for ln in lines)
