"""The C loops against the Python ones: the same input gives the same frames, bytes, events,
counters and errors (hypothesis draws the inputs; a sanitizer build fuzzes the C alone:
``make fuzz-native``)."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellvpn.stream.connection import LARGE_PAYLOAD, StreamConnection, StreamSettings
from cellvpn.wire import frame as fr
from cellvpn.wire.channel import CHANNEL_R, CHANNEL_S
from tests.conftest import require_native
from tests.stream.test_connection import establish, pair

HEADER = fr.HEADER


@st.composite
def frame_streams(draw: Any) -> tuple[bytes, int]:
    """Frames end to end (sizes around the limits, any type), some bytes then changed, the
    tail perhaps cut: what a hostile or broken peer writes; and where to start, usually at
    the start of a frame."""
    parts, starts, at = [], [], 0
    for _ in range(draw(st.integers(0, 12))):
        payload = draw(st.binary(max_size=80))
        size = draw(st.one_of(st.just(len(payload)), st.integers(0, 2**32 - 1)))
        ftype = draw(st.integers(0, 255))
        parts.append(HEADER.pack(fr.SIGNATURE, size, 5, ftype, 0, 0) + payload)
        starts.append(at)
        at += len(parts[-1])
    data = bytearray(b"".join(parts))
    for _ in range(draw(st.integers(0, 3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if starts and draw(st.booleans()):  # a header byte (signature, size, type) changed
        where = draw(st.sampled_from(starts)) + draw(st.integers(0, 20))
        data[where] ^= 1 << draw(st.integers(0, 7))
    cut = draw(st.integers(0, len(data)))
    data = data[: len(data) - cut] if draw(st.booleans()) else data
    pos = draw(st.sampled_from(starts) if starts and draw(st.booleans()) else st.integers(0, 200))
    return bytes(data), min(pos, len(data))


def frames_as_bytes(result: tuple[list[tuple[int, memoryview]], int, int, int]) -> Any:
    frames, pos, need, bad = result
    return [(t, bytes(p)) for t, p in frames], pos, need, bad


@settings(max_examples=400, deadline=None)
@given(
    stream=frame_streams(),
    max_payload=st.sampled_from([0, 3, 40, 80, 256 * 1024, 2**32 - 1, 2**40]),
)
def test_the_c_scan_cuts_what_the_python_scan_cuts(
    stream: tuple[bytes, int], max_payload: int
) -> None:
    c = require_native()
    data, pos = stream
    view = memoryview(data)
    native = c.scan_frames(view, pos, max_payload)
    assert frames_as_bytes(native) == frames_as_bytes(fr.scan_frames(view, pos, max_payload))
    for _, payload in native[0]:
        assert payload.obj is data and payload.readonly  # views of the bytes, no copies


def test_the_c_scan_refuses_a_start_outside_the_buffer() -> None:
    c = require_native()
    with pytest.raises(ValueError, match="pos outside the buffer"):
        c.scan_frames(memoryview(b"abc"), 4, 100)


def twins(**kw: Any) -> tuple[tuple[StreamConnection, StreamConnection], list[list[Any]]]:
    """Two established servers alike but for their loops (C, Python), each recording what
    its channels were handed; and two clients."""
    require_native()
    servers, clients, got = [], [], []
    for mode in ("on", "off"):
        client, server, _ = pair(StreamSettings(**kw), StreamSettings(fastpath=mode, **kw))
        seen = establish(client, server)
        servers.append(server)
        clients.append(client)
        got.append(seen)
    assert servers[0].fastpath.native and not servers[1].fastpath.native
    return (servers[0], servers[1]), got


def state(conn: StreamConnection) -> Any:
    seq = conn.seq
    return (
        conn.state,
        conn.closed,
        conn.stats,
        (seq.last, seq.replays, seq.gaps, seq.missing),
        conn._reader.buffered,
        conn.data_to_send(),
    )


channel_packets = st.tuples(
    st.sampled_from([CHANNEL_S, CHANNEL_R, 0x41]), st.integers(0, 255), st.binary(max_size=60)
)


@st.composite
def wire(draw: Any) -> list[bytes]:
    """What a peer sends once the stream is set up, cut into reads anywhere: data frames with
    sequence numbers that go on, repeat or jump, control frames, and garbage."""
    out = bytearray()
    seq = 0
    for _ in range(draw(st.integers(0, 10))):
        kind = draw(st.integers(0, 9))
        if kind < 6:
            cid, ptype, body = draw(channel_packets)
            seq = max(0, seq + draw(st.sampled_from([1, 1, 1, 0, -1, 3])))
            size = len(body) if draw(st.integers(0, 9)) else draw(st.integers(0, 100))
            chan = struct.pack("<BBBxQI", cid, 0, ptype, seq, size) + body
            if draw(st.integers(0, 12)) == 0:
                chan = chan[: draw(st.integers(0, 15))]  # shorter than its header
            out += fr.encode_frame(0, chan, 5)
        elif kind == 6:
            out += fr.encode_frame(draw(st.sampled_from([0x11, 0x12, 0x22, 0x20, 0x33])), b"", 5)
        else:
            out += draw(st.binary(max_size=50))
    data = bytes(out)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None)
@given(reads=wire(), max_payload=st.sampled_from([1500, 64 * 1024]))
def test_a_server_receives_alike_with_either_loop(reads: list[bytes], max_payload: int) -> None:
    (fast, plain), (got_fast, got_plain) = twins(max_payload=max_payload)
    for chunk in reads:
        assert repr(fast.receive_data(chunk)) == repr(plain.receive_data(chunk))
        assert got_fast == got_plain
    assert state(fast) == state(plain)


packets = st.lists(
    st.tuples(
        st.one_of(
            st.integers(0, 100),
            st.integers(LARGE_PAYLOAD - 2, LARGE_PAYLOAD + 2),
            st.just(65000),
        ),
        st.sampled_from(["bytes", "bytearray", "memoryview"]),
    ),
    max_size=8,
)


def make_packet(size: int, kind: str, n: int) -> bytes | bytearray | memoryview:
    raw = bytes([n % 251]) * size
    return {"bytes": raw, "bytearray": bytearray(raw), "memoryview": memoryview(raw)}[kind]


@settings(max_examples=300, deadline=None)
@given(
    batches=st.lists(packets, max_size=4),
    op=st.integers(0, 2**32 - 1),
    usage=st.integers(0, 2**32 - 1),
    ptype=st.integers(0, 255),
    node=st.sampled_from([0, 2**64 - 1]),
    as_tuple=st.booleans(),
)
def test_a_client_sends_alike_with_either_loop(
    batches: list[list[tuple[int, str]]],
    op: int,
    usage: int,
    ptype: int,
    node: int,
    as_tuple: bool,
) -> None:
    require_native()
    ends = []
    for mode in ("on", "off"):
        client, server, _ = pair(StreamSettings(fastpath=mode, node_addr=node))
        establish(client, server)
        client.data_to_send()
        ends.append(client)
    fast, plain = ends
    for batch in batches:
        pkts = [make_packet(size, kind, n) for n, (size, kind) in enumerate(batch)]
        a = fast.send_data_packets(CHANNEL_S, ptype, op, usage, tuple(pkts) if as_tuple else pkts)
        b = plain.send_data_packets(CHANNEL_S, ptype, op, usage, iter(pkts))
        assert a == b
        fp, pp = fast.pieces_to_send(), plain.pieces_to_send()
        assert [bytes(p) for p in fp] == [bytes(p) for p in pp]  # the same runs and pieces
        # a large payload goes as the object it came as, in both
        assert [type(p) for p in fp] == [type(p) for p in pp]
    assert (fast._next_seq, fast.stats) == (plain._next_seq, plain.stats)


def test_the_c_pack_refuses_fields_out_of_their_range() -> None:
    c = require_native()
    out = bytearray()
    with pytest.raises(OverflowError):
        c.pack_data(out, [b"x"], 0, 0, 0, 256, 0, 0, 0, 0, LARGE_PAYLOAD)
    with pytest.raises(OverflowError):
        c.pack_data(out, [b"x"], 0, 0, 0, 0, 0, 0, 2**32, 0, LARGE_PAYLOAD)
    with pytest.raises(TypeError):
        c.pack_data(out, [object()], 0, 0, 0, 0, 0, 0, 0, 0, LARGE_PAYLOAD)
    assert out == b""  # nothing half-written
