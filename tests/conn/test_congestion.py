"""Choosing the stream socket's congestion control, and restarting bbr after a quiet spell."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from cellvpn.conn import congestion
from cellvpn.conn.congestion import OuterCongestion, choose, handshake_rtt

BOTH = ("reno", "cubic", "bbr")
NO_BBR = ("reno", "cubic")


@pytest.mark.parametrize(
    ("setting", "rtt", "have", "lan_rtt", "expected"),
    [
        ("auto", 0.020, BOTH, 0.001, "bbr"),
        ("auto", 0.001, BOTH, 0.001, "bbr"),
        ("auto", 0.0002, BOTH, 0.001, "cubic"),
        ("auto", 0.00001, BOTH, 0.0, "bbr"),
        ("auto", None, BOTH, 0.001, "bbr"),
        ("auto", 0.020, NO_BBR, 0.001, None),
        ("auto", 0.0002, ("reno", "bbr"), 0.001, None),
        ("cubic", 0.050, BOTH, 0.001, "cubic"),
        ("bbr", 0.0001, BOTH, 0.001, "bbr"),
        ("nosuchcc", 0.020, BOTH, 0.001, "nosuchcc"),
        (None, 0.020, BOTH, 0.001, None),
    ],
)
def test_choose(
    setting: str | None, rtt: float | None, have: tuple[str, ...], lan_rtt: float, expected: str
) -> None:
    assert choose(setting, rtt, have, lan_rtt) == expected


@pytest.fixture
def fresh_said() -> Iterator[None]:
    """Each test sees the once-per-process warnings afresh."""
    saved = set(congestion._said)
    congestion._said.clear()
    yield
    congestion._said.clear()
    congestion._said.update(saved)


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected loopback TCP pair (the handshake has run, so TCP_INFO has an RTT)."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    yield client, server
    client.close()
    server.close()


def used(sock: socket.socket) -> str:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()


def test_the_handshake_rtt_of_a_real_socket(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """Loopback's handshake: an RTT the kernel measured, far below a LAN's millisecond."""
    for sock in tcp_pair:
        rtt = handshake_rtt(sock)
        assert rtt is not None and 0 < rtt < 0.001


def test_auto_on_loopback_sends_with_cubic(
    tcp_pair: tuple[socket.socket, socket.socket], fresh_said: None
) -> None:
    client, _ = tcp_pair
    outer = OuterCongestion(client, "auto", 0.001, Clock().seconds, have=lambda: BOTH)
    assert outer.name == "cubic" == used(client)


def test_auto_without_bbr_keeps_the_default_and_says_so_once(
    tcp_pair: tuple[socket.socket, socket.socket], fresh_said: None
) -> None:
    """A kernel without bbr: the kernel's default on every socket, one warning for all."""
    client, server = tcp_pair
    before = used(client)
    with capturedLogs() as events:
        for sock in (client, server, client):
            outer = OuterCongestion(sock, "auto", 0.0, Clock().seconds, have=lambda: NO_BBR)
            assert outer.name is None
    assert used(client) == before
    lines = [formatEvent(e) for e in events]
    assert len(lines) == 1, lines
    assert lines[0].startswith("TCP congestion control 'bbr' is not available; streams use ")


def test_a_refused_name_is_said_once_and_the_default_stays(
    tcp_pair: tuple[socket.socket, socket.socket], fresh_said: None
) -> None:
    client, server = tcp_pair
    before = used(client)
    with capturedLogs() as events:
        for sock in (client, server):
            assert OuterCongestion(sock, "nosuchcc", 0.001, Clock().seconds).name is None
    assert used(client) == before
    [line] = [formatEvent(e) for e in events]
    assert line.startswith("TCP congestion control 'nosuchcc' cannot be used (")


def bbr_or_skip() -> None:
    if "bbr" not in congestion.available():
        pytest.skip("this kernel has no bbr module loaded")


def test_bbr_restarts_when_bulk_sending_resumes_after_a_pause(
    tcp_pair: tuple[socket.socket, socket.socket], fresh_said: None
) -> None:
    """Bulk batches back to back: no restart; a bulk batch after half a second without one:
    one restart, and the socket still sends with bbr."""
    bbr_or_skip()
    client, _ = tcp_pair
    clock = Clock()
    outer = OuterCongestion(client, "auto", 0.0, clock.seconds)
    assert outer.name == "bbr" == used(client)
    bulk = [b"x" * 8192, memoryview(b"y" * 8192)]
    small = [b"z" * 100]
    outer.before_write(bulk)
    for _ in range(10):
        clock.advance(0.1)
        outer.before_write(bulk)
    assert outer.restarts == 0
    for _ in range(10):  # keepalives and ACKs only: not bulk
        clock.advance(0.1)
        outer.before_write(small)
    assert outer.restarts == 0
    outer.before_write(bulk)
    assert outer.restarts == 1 and used(client) == "bbr"
    clock.advance(0.4)
    outer.before_write(bulk)
    assert outer.restarts == 1


def test_only_bbr_is_restarted(
    tcp_pair: tuple[socket.socket, socket.socket], fresh_said: None
) -> None:
    client, server = tcp_pair
    clock = Clock()
    for outer in (
        OuterCongestion(client, "cubic", 0.001, clock.seconds),
        OuterCongestion(server, None, 0.001, clock.seconds),
    ):
        outer.before_write([b"x" * 65536])
        clock.advance(5)
        outer.before_write([b"x" * 65536])
        assert outer.restarts == 0


def test_bbr_streams_keep_little_unsent_data_in_the_kernel(
    tcp_pair: tuple[socket.socket, socket.socket], fresh_said: None
) -> None:
    bbr_or_skip()
    client, server = tcp_pair
    OuterCongestion(client, "bbr", 0.001, Clock().seconds)
    OuterCongestion(server, "cubic", 0.001, Clock().seconds)
    lowat = socket.TCP_NOTSENT_LOWAT if hasattr(socket, "TCP_NOTSENT_LOWAT") else 25
    assert client.getsockopt(socket.IPPROTO_TCP, lowat) == congestion.BBR_NOTSENT_LOWAT
    assert server.getsockopt(socket.IPPROTO_TCP, lowat) != congestion.BBR_NOTSENT_LOWAT
