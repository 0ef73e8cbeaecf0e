"""Fuzzing the sans-IO stream, both ends: a valid setup, then anything, in any slicing.

``StreamConnection.receive_data`` never raises: a hostile peer gets a ``Closed`` event and a
CLOSE frame. Beyond that the stream stays consistent: once closed it yields no event and
hands no packet on, at most one ``Closed`` ever comes (last in its list), a server never
sees WELCOME's event nor a client HELLO's, counters stay non-negative, the sequence numbers
handed on only grow, and what the stream writes back is always well-formed frames that end
with its CLOSE.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

from cellvpn.stream import caps
from cellvpn.stream.connection import (
    Closed,
    Established,
    Event,
    HelloReceived,
    Role,
    StreamConnection,
    StreamSettings,
    StreamState,
)
from cellvpn.wire.channel import CHANNEL_R, CHANNEL_S
from cellvpn.wire.errors import DecodeError
from cellvpn.wire.frame import FrameReader, FrameType, encode_frame
from cellvpn.wire.setup import Hello, Welcome

from . import inputs
from .harness import counted, fuzz


class Clock:
    """The stream's monotonic clock, moved on by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


#: mostly what a server and a client run with; now and then small frames, one channel,
#: fewer capabilities, a different keepalive rate
stream_settings = st.one_of(
    st.just(StreamSettings(caps=caps.KNOWN)),
    st.just(StreamSettings(caps=frozenset({caps.ADDR_OPTIONS}))),
    st.builds(
        StreamSettings,
        max_payload=st.sampled_from([256 * 1024, 2000, 64]),
        channels=st.sampled_from(["RS", "R", "S"]),
        caps=st.frozensets(st.sampled_from(sorted(caps.KNOWN))),
        alives_per_second=st.sampled_from([4.0, 0.5, 1000.0]),
    ),
)
#: (seconds to move the clock, then tick?) after each slice
pauses = st.lists(st.tuples(st.sampled_from([0.0, 0.0, 1.0, 3.0, 61.0]), st.booleans()))


@dataclass
class Watch:
    """What the stream did: events, packets handed on, bytes written."""

    conn: StreamConnection
    events: list[Event] = field(default_factory=list)
    delivered: list[tuple[int, int, bytes]] = field(default_factory=list)
    written: bytearray = field(default_factory=bytearray)
    last_seq: int = -1

    def handler(self, cid: int) -> object:
        def on_packet(ptype: int, data: memoryview) -> None:
            assert self.conn.closed is None, "no packet is handed on after the close"
            seq = self.conn.seq.last
            assert seq > self.last_seq, "sequence numbers handed on only grow"
            self.last_seq = seq
            self.delivered.append((cid, ptype, bytes(data)))

        return on_packet

    def open_channels(self) -> None:
        for cid in (CHANNEL_R, CHANNEL_S):
            self.conn.register_channel(cid, self.handler(cid))  # type: ignore[arg-type]

    def feed(self, chunk: bytes) -> list[Event]:
        """One read: the stream's events, checked."""
        conn = self.conn
        was_closed = conn.closed is not None
        before = len(self.delivered)
        events = conn.receive_data(chunk)
        if was_closed:
            assert events == [] and len(self.delivered) == before
        self._check(events)
        return events

    def tick(self) -> None:
        was_closed = self.conn.closed is not None
        events = self.conn.tick()
        if was_closed:
            assert events == []
        self._check(events)

    def _check(self, events: list[Event]) -> None:
        conn = self.conn
        for i, event in enumerate(events):
            if isinstance(event, Closed):
                assert i == len(events) - 1, "a Closed event is the last of its list"
                assert not any(isinstance(e, Closed) for e in self.events), "one Closed only"
                assert conn.state is StreamState.CLOSED and conn.closed is event
            elif isinstance(event, HelloReceived):
                assert conn.role is Role.SERVER
                assert not any(isinstance(e, HelloReceived) for e in self.events)
            else:
                assert isinstance(event, Established) and conn.role is Role.CLIENT
                assert not any(isinstance(e, Established) for e in self.events)
            self.events.append(event)
        stats, seq = conn.stats, conn.seq
        assert min(stats.frames_in, stats.frames_out, stats.bytes_in) >= 0
        assert min(stats.keepalives_received, stats.keepalives_unanswered) >= 0
        assert min(seq.replays, seq.gaps, seq.missing) >= 0
        assert conn.pending_output >= 0
        self.written += conn.data_to_send()
        assert conn.pending_output == 0

    def check_output(self) -> None:
        """What the stream wrote: whole, valid frames; nothing after its CLOSE."""
        reader = FrameReader()
        try:
            frames = reader.feed(bytes(self.written))
        except DecodeError as e:
            raise AssertionError(f"the stream wrote a bad frame: {e}") from e
        assert reader.buffered == 0, "the stream wrote part of a frame"
        types = [ftype for ftype, _ in frames]
        closed = self.conn.closed
        if FrameType.CLOSE in types:
            assert types.index(FrameType.CLOSE) == len(types) - 1, "nothing after CLOSE"
            assert closed is not None and not closed.by_peer
        elif closed is not None:
            assert closed.by_peer, "a stream that closed itself wrote its CLOSE"


def run(watch: Watch, chunks: list[bytes], clock: Clock, steps: list[tuple[float, bool]]) -> None:
    for i, chunk in enumerate(chunks):
        for event in watch.feed(chunk):
            if isinstance(event, HelloReceived) and watch.conn.state is StreamState.DECIDING:
                watch.open_channels()
                watch.conn.accept(0x5E55)
                watch.written += watch.conn.data_to_send()
        if i < len(steps):
            clock.now += steps[i][0]
            if steps[i][1]:
                watch.tick()
    watch.check_output()


@fuzz
@given(
    settings=stream_settings,
    hello=inputs.hellos_for_server(),
    early=st.sampled_from([0, 1, 2]),
    chunks=inputs.hostile_stream(inputs.any_channel_packets()),
    steps=pauses,
)
@counted
def test_server_stream_after_hello(
    settings: StreamSettings,
    hello: Hello,
    early: int,
    chunks: list[bytes],
    steps: list[tuple[float, bool]],
) -> None:
    """A server stream: HELLO (mostly one it accepts), then hostile bytes. The HELLO comes
    alone, or in the first slice with what follows (``early``: before the server answers)."""
    clock = Clock()
    conn = StreamConnection(Role.SERVER, settings, clock=clock, wallclock=lambda: 1.7e9)
    watch = Watch(conn)
    prefix = encode_frame(FrameType.HELLO, hello.encode())
    if early == 1 and chunks:
        chunks = [prefix + chunks[0], *chunks[1:]]
    elif early == 2:
        chunks = [prefix[:20], prefix[20:], *chunks]
    else:
        chunks = [prefix, *chunks]
    run(watch, chunks, clock, steps)


#: client settings, and a WELCOME (mostly one that they accept): drawn together, so that an
#: input is plain values (the long run's engine mutates those)
client_setups = stream_settings.flatmap(
    lambda settings: st.tuples(
        st.just(settings), inputs.welcomes_for_client(settings.channels, settings.caps)
    )
)


@fuzz
@given(
    setup=client_setups,
    chunks=inputs.hostile_stream(inputs.any_channel_packets()),
    steps=pauses,
)
@counted
def test_client_stream_after_welcome(
    setup: tuple[StreamSettings, Welcome],
    chunks: list[bytes],
    steps: list[tuple[float, bool]],
) -> None:
    """A client stream: HELLO out, WELCOME (mostly one it accepts) in, then hostile bytes."""
    settings, welcome = setup
    clock = Clock()
    conn = StreamConnection(Role.CLIENT, settings, clock=clock, wallclock=lambda: 1.7e9)
    watch = Watch(conn)
    watch.open_channels()
    conn.start()
    watch.written += conn.data_to_send()
    prefix = encode_frame(FrameType.WELCOME, welcome.encode())
    run(watch, [prefix, *chunks], clock, steps)


@fuzz
@given(
    role=st.sampled_from([Role.SERVER, Role.CLIENT]),
    settings=stream_settings,
    chunks=st.lists(st.binary(max_size=300), max_size=8),
    steps=pauses,
)
@counted
def test_stream_before_setup(
    role: Role, settings: StreamSettings, chunks: list[bytes], steps: list[tuple[float, bool]]
) -> None:
    """Either end, anything before the setup finished (no valid HELLO or WELCOME first)."""
    clock = Clock()
    conn = StreamConnection(role, settings, clock=clock, wallclock=lambda: 1.7e9)
    watch = Watch(conn)
    if role is Role.CLIENT:
        watch.open_channels()
        conn.start()
        watch.written += conn.data_to_send()
    run(watch, chunks, clock, steps)
