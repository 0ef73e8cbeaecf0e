"""The sans-IO stream: setup, channels, keepalive, timeouts and protocol violations."""

from __future__ import annotations

import pytest

from cellvpn.fsm import InvalidTransitionError
from cellvpn.stream.connection import (
    TRANSITIONS,
    Closed,
    Established,
    HelloReceived,
    Role,
    StreamConnection,
    StreamInput,
    StreamSettings,
    StreamState,
)
from cellvpn.wire.channel import CHANNEL_R, CHANNEL_S, encode_channel_packet
from cellvpn.wire.frame import FrameType, encode_frame
from cellvpn.wire.setup import Close, CloseCode, Hello


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pair(
    client_settings: StreamSettings | None = None,
    server_settings: StreamSettings | None = None,
) -> tuple[StreamConnection, StreamConnection, FakeClock]:
    clock = FakeClock()
    client = StreamConnection(Role.CLIENT, client_settings, clock=clock, wallclock=lambda: 5.0)
    server = StreamConnection(Role.SERVER, server_settings, clock=clock, wallclock=lambda: 5.0)
    return client, server, clock


def establish(
    client: StreamConnection, server: StreamConnection, session_id: int = 7
) -> list[tuple[int, bytes]]:
    """Run the setup; return a list that collects what the server's 'S' handler receives."""
    got: list[tuple[int, bytes]] = []
    client.start()
    events = server.receive_data(client.data_to_send())
    assert isinstance(events[0], HelloReceived)
    server.register_channel(CHANNEL_S, lambda t, d: got.append((t, bytes(d))))
    server.register_channel(CHANNEL_R, lambda t, d: got.append((t, bytes(d))))
    server.accept(session_id)
    events = client.receive_data(server.data_to_send())
    assert isinstance(events[0], Established)
    return got


def test_setup_agrees_on_session_id_and_common_capabilities() -> None:
    """HELLO/WELCOME give both ends the server's session id and the shared capabilities."""
    client, server, _ = pair(
        StreamSettings(caps=frozenset({"a", "b"})), StreamSettings(caps=frozenset({"b", "c"}))
    )
    establish(client, server, session_id=0xDEADBEEF)
    assert client.session_id == server.session_id == 0xDEADBEEF
    assert client.caps == server.caps == frozenset({"b"})
    assert client.state is server.state is StreamState.ESTABLISHED


def test_channel_packets_reach_the_handler_of_their_channel() -> None:
    """Packets are delivered by channel id, in order, each with its type."""
    client, server, _ = pair()
    got = establish(client, server)
    client.send_channel(CHANNEL_S, 2, b"ab", b"cd")
    client.send_channel(CHANNEL_R, 0x50, b"check")
    server.receive_data(client.data_to_send())
    assert got == [(2, b"abcd"), (0x50, b"check")]


def test_byte_at_a_time_delivery_gives_the_same_packets() -> None:
    """The reader reassembles frames split anywhere."""
    client, server, _ = pair()
    got = establish(client, server)
    for i in range(3):
        client.send_channel(CHANNEL_S, 2, bytes([i]) * 100)
    data = client.data_to_send()
    for i in range(len(data)):
        server.receive_data(data[i : i + 1])
    assert [d for _, d in got] == [bytes([i]) * 100 for i in range(3)]


def test_version_mismatch_is_refused_with_a_reason() -> None:
    """A HELLO with another protocol version gets CLOSE(VERSION_MISMATCH) and a reason."""
    _, server, _ = pair()
    hello = Hello(version=99).encode()
    events = server.receive_data(encode_frame(FrameType.HELLO, hello))
    assert isinstance(events[0], Closed)
    assert events[0].code == CloseCode.VERSION_MISMATCH
    assert "99" in events[0].reason
    header_and_close = server.data_to_send()
    assert header_and_close[20] == FrameType.CLOSE
    assert Close.decode(header_and_close[37:]).code == CloseCode.VERSION_MISMATCH
    assert server.state is StreamState.CLOSED


def test_required_capability_missing_is_refused() -> None:
    """A client requiring a capability the server lacks gets CAPABILITY_MISMATCH."""
    client, server, _ = pair(StreamSettings(caps=frozenset({"x"}), required_caps=frozenset({"x"})))
    client.start()
    events = server.receive_data(client.data_to_send())
    assert isinstance(events[0], Closed) and events[0].code == CloseCode.CAPABILITY_MISMATCH
    assert "x" in events[0].reason
    events = client.receive_data(server.data_to_send())
    assert isinstance(events[0], Closed) and events[0].by_peer
    assert events[0].code == CloseCode.CAPABILITY_MISMATCH


def test_unknown_channel_in_hello_is_refused() -> None:
    """Channels are checked by id: asking for 'X' is refused."""
    _, server, _ = pair()
    events = server.receive_data(encode_frame(FrameType.HELLO, Hello(channels="RX").encode()))
    assert isinstance(events[0], Closed) and events[0].code == CloseCode.CHANNEL_UNSUPPORTED


def test_channel_order_does_not_matter() -> None:
    """'SR' is as good as 'RS': channels are found by id, never by position."""
    client, server, _ = pair(StreamSettings(channels="SR"))
    establish(client, server)
    assert server.welcome is not None and server.welcome.channels == "SR"


def test_data_before_setup_is_a_protocol_error() -> None:
    """A DATA frame before WELCOME closes the stream with PROTOCOL_ERROR."""
    _, server, _ = pair()
    events = server.receive_data(encode_frame(FrameType.DATA, encode_channel_packet(83, 2, 0)))
    assert isinstance(events[0], Closed) and events[0].code == CloseCode.PROTOCOL_ERROR


def test_bad_signature_closes_the_stream_without_resynchronising() -> None:
    """Garbage after setup: PROTOCOL_ERROR naming the bad signature, nothing else delivered."""
    client, server, _ = pair()
    got = establish(client, server)
    events = server.receive_data(b"\x00" * 64)
    assert isinstance(events[0], Closed)
    assert "signature" in events[0].reason
    assert server.receive_data(b"more") == []
    assert got == []


def test_oversized_frame_is_refused() -> None:
    """A frame larger than max_payload closes the stream before its payload is read."""
    client, server, _ = pair(server_settings=StreamSettings(max_payload=1500))
    establish(client, server)
    client.send_channel(CHANNEL_S, 2, b"x" * 3000)
    events = server.receive_data(client.data_to_send()[:40])
    assert isinstance(events[0], Closed) and "exceeds" in events[0].reason


def test_replayed_sequence_number_is_dropped_and_counted() -> None:
    """A repeated seq_id is dropped and counted; a gap is accepted and counted."""
    client, server, _ = pair()
    got = establish(client, server)

    def frame(seq: int, data: bytes) -> bytes:
        return encode_frame(FrameType.DATA, encode_channel_packet(CHANNEL_S, 2, seq, data))

    server.receive_data(frame(0, b"a") + frame(0, b"replay") + frame(3, b"b") + frame(2, b"old"))
    assert [d for _, d in got] == [b"a", b"b"]
    assert server.seq.replays == 2
    assert server.seq.gaps == 1 and server.seq.missing == 2


def test_packet_for_an_unopened_channel_is_a_protocol_error() -> None:
    """A channel id the stream did not open closes the stream."""
    client, server, _ = pair()
    establish(client, server)
    events = server.receive_data(
        encode_frame(FrameType.DATA, encode_channel_packet(ord("Z"), 2, 0, b""))
    )
    assert isinstance(events[0], Closed) and "channel" in events[0].reason


def test_channel_size_mismatch_is_a_protocol_error() -> None:
    """A channel header whose data_size disagrees with the frame closes the stream."""
    client, server, _ = pair()
    establish(client, server)
    bad = encode_channel_packet(CHANNEL_S, 2, 0, b"abc")[:-1]
    events = server.receive_data(encode_frame(FrameType.DATA, bad))
    assert isinstance(events[0], Closed) and "data bytes" in events[0].reason


def test_keepalive_only_when_idle_and_answered_with_alive() -> None:
    """A tick with no traffic sends KEEPALIVE; the peer answers ALIVE; the RTT is measured."""
    client, server, clock = pair()
    establish(client, server)
    observed: list[float] = []
    client.on_rtt = observed.append
    client.tick()  # traffic happened during setup: no keepalive yet
    assert client.data_to_send() == b""
    clock.now += 3
    client.tick()
    ka = client.data_to_send()
    assert ka[20] == FrameType.KEEPALIVE and len(ka) == 37
    server.receive_data(ka)
    alive = server.data_to_send()
    assert alive[20] == FrameType.ALIVE
    clock.now += 0.25
    client.receive_data(alive)
    assert client.stats.keepalives_sent == 1 and client.stats.alives_received == 1
    assert server.stats.keepalives_received == 1
    assert client.stats.last_rtt == pytest.approx(0.25)
    assert observed == [client.stats.last_rtt]  # the histogram hears of it, once
    client.receive_data(alive)  # an ALIVE nobody asked for measures nothing
    assert len(observed) == 1


def test_no_keepalive_while_traffic_flows() -> None:
    """Sending data in the interval suppresses KEEPALIVE."""
    client, server, clock = pair()
    establish(client, server)
    client.tick()
    clock.now += 3
    client.send_channel(CHANNEL_S, 2, b"x")
    client.data_to_send()
    client.tick()
    assert client.data_to_send() == b""


def test_idle_timeout_closes_the_stream() -> None:
    """Nothing received for idle_timeout: CLOSE(IDLE_TIMEOUT)."""
    client, server, clock = pair(StreamSettings(idle_timeout=10))
    establish(client, server)
    events: list[object] = []
    for _ in range(5):
        clock.now += 3
        events += client.tick()
    assert any(isinstance(e, Closed) and e.code == CloseCode.IDLE_TIMEOUT for e in events)
    assert client.state is StreamState.CLOSED


def test_setup_timeout_closes_a_silent_connection() -> None:
    """A server that never gets HELLO closes after setup_timeout."""
    _, server, clock = pair(server_settings=StreamSettings(setup_timeout=5))
    clock.now += 6
    events = server.tick()
    assert isinstance(events[0], Closed) and "setup" in events[0].reason


def test_peer_close_is_reported_with_its_reason() -> None:
    """CLOSE from the peer ends the stream and carries the peer's code and reason."""
    client, server, _ = pair()
    establish(client, server)
    server.close(CloseCode.SHUTDOWN, "bye")
    events = client.receive_data(server.data_to_send())
    assert events == [Closed(CloseCode.SHUTDOWN, "bye", by_peer=True)]


def test_send_after_close_is_ignored_and_before_setup_is_an_error() -> None:
    """Late sends after the end are dropped; sends before setup are a programming error."""
    client, server, _ = pair()
    with pytest.raises(RuntimeError):
        client.send_channel(CHANNEL_S, 2, b"x")
    establish(client, server)
    client.close()
    client.data_to_send()
    client.send_channel(CHANNEL_S, 2, b"x")
    assert client.data_to_send() == b""


@pytest.mark.parametrize("row", sorted(TRANSITIONS.items(), key=str), ids=str)
def test_every_transition_of_the_setup_table(
    row: tuple[tuple[StreamState, StreamInput], StreamState],
) -> None:
    """Each row of the table moves the machine from its state to its target."""
    (state, event), target = row
    conn = StreamConnection(Role.SERVER)
    conn.machine._state = state
    assert conn.machine.fire(event) is target


def test_inputs_without_a_row_raise() -> None:
    """An input with no row for the current state is refused loudly."""
    conn = StreamConnection(Role.CLIENT)
    with pytest.raises(InvalidTransitionError):
        conn.machine.fire(StreamInput.WELCOME)
    conn.close()
    with pytest.raises(InvalidTransitionError):
        conn.machine.fire(StreamInput.CLOSE)
