"""The stream protocol on memory transports: setup, violations, keepalive ticks, shutdown."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent

from cellvpn.config import load_server_config
from cellvpn.conn.protocol import StreamProtocol
from cellvpn.server.service import VPNServerService
from cellvpn.server.session import ServerSession
from cellvpn.stream.connection import Role, StreamConnection, StreamSettings
from cellvpn.wire.frame import FrameType, encode_frame
from cellvpn.wire.setup import Close, CloseCode


def make_server(tmp_path: Path) -> tuple[VPNServerService, MemoryReactorClock]:
    clock = MemoryReactorClock()
    config = load_server_config(
        None, {"control.socket": str(tmp_path / "s.sock"), "srv_vpn.enabled": "false"}
    )
    server = VPNServerService(config, reactor=clock)
    server.accepting = True
    return server, clock


def connect(
    server: VPNServerService, clock: MemoryReactorClock, port: int
) -> tuple[StreamProtocol, StringTransport]:
    proto = StreamProtocol(
        StreamConnection(Role.SERVER, server.stream_settings, clock=clock.seconds),
        ServerSession(server),
        clock,
        log_closes=False,
    )
    transport = StringTransport(peerAddress=IPv4Address("TCP", "198.18.0.7", port))
    proto.makeConnection(transport)
    return proto, transport


def client_bytes() -> tuple[StreamConnection, bytes]:
    client = StreamConnection(Role.CLIENT, StreamSettings())
    client.start()
    return client, client.data_to_send()


def test_a_broken_peer_is_closed_with_one_line_and_others_carry_on(tmp_path: Path) -> None:
    """Garbage on one stream: CLOSE sent, that connection dropped, one log line; the other lives."""
    server, clock = make_server(tmp_path)
    good, good_t = connect(server, clock, 1000)
    client, hello = client_bytes()
    good.dataReceived(hello)
    client.receive_data(good_t.value())
    assert client.established and len(server.sessions) == 1
    bad, bad_t = connect(server, clock, 2000)
    with capturedLogs() as events:
        bad.dataReceived(b"\x17" * 100)
    lines = [formatEvent(e) for e in events]
    assert lines == [
        "refused (protocol_error): 198.18.0.7:2000: bad frame signature " + "17" * 8 + " (1 in all)"
    ]
    assert bad_t.disconnecting
    out = bad_t.value()
    assert out[20] == FrameType.CLOSE and Close.decode(out[37:]).code == CloseCode.PROTOCOL_ERROR
    # the good stream still answers KEEPALIVE
    good_t.clear()
    good.dataReceived(encode_frame(FrameType.KEEPALIVE))
    assert good_t.value()[20] == FrameType.ALIVE
    assert not good_t.disconnecting


def test_keepalive_tick_runs_on_the_reactor_clock(tmp_path: Path) -> None:
    """The protocol ticks every keepalive interval: an idle established stream sends KEEPALIVE."""
    server, clock = make_server(tmp_path)
    proto, transport = connect(server, clock, 1000)
    client, hello = client_bytes()
    proto.dataReceived(hello)
    client.receive_data(transport.value())
    transport.clear()
    clock.advance(3)
    clock.advance(3)
    assert transport.value()[20] == FrameType.KEEPALIVE
    assert proto.conn.stats.keepalives_sent == 1


def test_silent_connection_is_closed_after_the_setup_timeout(tmp_path: Path) -> None:
    """No HELLO: the server closes the stream when the setup timeout passes."""
    server, clock = make_server(tmp_path)
    _proto, transport = connect(server, clock, 1000)
    for _ in range(4):
        clock.advance(3)
    assert transport.disconnecting
    assert Close.decode(transport.value()[37:]).reason.startswith("session setup not finished")


def test_shutdown_refuses_new_sessions(tmp_path: Path) -> None:
    """A HELLO while the server stops gets CLOSE(SHUTDOWN)."""
    server, clock = make_server(tmp_path)
    server.accepting = False
    proto, transport = connect(server, clock, 1000)
    _, hello = client_bytes()
    proto.dataReceived(hello)
    assert Close.decode(transport.value()[37:]).code == CloseCode.SHUTDOWN
    assert len(server.sessions) == 0


def test_lost_connection_removes_the_session(tmp_path: Path) -> None:
    """connectionLost takes the session out of the registry and stops the ticker."""
    server, clock = make_server(tmp_path)
    proto, _transport = connect(server, clock, 1000)
    _, hello = client_bytes()
    proto.dataReceived(hello)
    assert len(server.sessions) == 1
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    with capturedLogs() as events:
        proto.connectionLost(Failure(ConnectionDone()))
    assert len(server.sessions) == 0
    assert "ended" in formatEvent(events[0])
    assert not clock.getDelayedCalls() or all(not c.active() for c in clock.getDelayedCalls())
