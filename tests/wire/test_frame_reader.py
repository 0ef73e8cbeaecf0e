"""FrameReader: cutting a byte stream into frames, however the bytes arrive."""

from __future__ import annotations

import pytest

from cellvpn.wire.errors import DecodeError
from cellvpn.wire.frame import FrameReader, FrameType, encode_frame

SIG = bytes.fromhex("a09596a99e5cfbfa")

FRAMES: list[tuple[int, bytes]] = [
    (FrameType.HELLO, b"hello"),
    (FrameType.KEEPALIVE, b""),
    (FrameType.DATA, bytes(range(50))),
    (FrameType.ALIVE, b""),
    (FrameType.DATA, b"\xa0"),
]
STREAM = b"".join(encode_frame(t, p, timestamp=7, src_addr=1, dst_addr=2) for t, p in FRAMES)


def frame_header(size: int, ftype: int = 0) -> bytes:
    """A hand-built frame header with the given size and type."""
    return SIG + size.to_bytes(4, "little") + bytes(8) + bytes([ftype]) + bytes(16)


def collect(reader: FrameReader, *chunks: bytes) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    for chunk in chunks:
        out.extend((t, bytes(p)) for t, p in reader.feed(chunk))
    return out


def test_whole_stream_in_one_chunk() -> None:
    """Several frames in one chunk come out in order, with nothing left buffered."""
    reader = FrameReader()
    assert collect(reader, STREAM) == FRAMES
    assert reader.buffered == 0


def test_split_at_every_boundary() -> None:
    """Splitting the stream at any single byte boundary gives the same frames."""
    for cut in range(len(STREAM) + 1):
        reader = FrameReader()
        assert collect(reader, STREAM[:cut], STREAM[cut:]) == FRAMES, cut
        assert reader.buffered == 0


def test_split_at_every_pair_of_boundaries() -> None:
    """Splitting the stream at any two byte boundaries gives the same frames."""
    n = len(STREAM)
    for first in range(n + 1):
        for second in range(first, n + 1):
            reader = FrameReader()
            got = collect(reader, STREAM[:first], STREAM[first:second], STREAM[second:])
            assert got == FRAMES, (first, second)
            assert reader.buffered == 0


def test_byte_by_byte() -> None:
    """Feeding one byte at a time gives the same frames; buffered counts what is held."""
    reader = FrameReader()
    got: list[tuple[int, bytes]] = []
    held = 0
    for i in range(len(STREAM)):
        frames = reader.feed(STREAM[i : i + 1])
        got.extend((t, bytes(p)) for t, p in frames)
        held = 0 if frames else held + 1
        assert reader.buffered == held
    assert got == FRAMES
    assert reader.buffered == 0


def test_many_frames_in_one_chunk() -> None:
    """A thousand frames in one chunk all come out."""
    frames = [(FrameType.DATA, i.to_bytes(2, "little") * (i % 7)) for i in range(1000)]
    chunk = b"".join(encode_frame(t, p) for t, p in frames)
    reader = FrameReader()
    assert collect(reader, chunk) == frames
    assert reader.buffered == 0


def test_empty_feed() -> None:
    """Feeding nothing returns nothing and keeps what is buffered."""
    reader = FrameReader()
    assert reader.feed(b"") == []
    assert reader.buffered == 0
    assert reader.feed(STREAM[:10]) == []
    assert reader.feed(b"") == []
    assert reader.buffered == 10
    assert collect(reader, STREAM[10:]) == FRAMES


def test_buffered_counts_partial_frames() -> None:
    """buffered is the number of bytes received but not yet returned as a frame."""
    reader = FrameReader()
    first = encode_frame(FrameType.DATA, b"x" * 20)
    assert reader.feed(first[:30]) == []
    assert reader.buffered == 30
    assert reader.feed(first[30:45]) == []
    assert reader.buffered == 45
    frames = reader.feed(first[45:] + STREAM[:5])
    assert [(t, bytes(p)) for t, p in frames] == [(FrameType.DATA, b"x" * 20)]
    assert reader.buffered == 5


def test_payload_views_stay_valid() -> None:
    """Payloads returned earlier keep their content after later feeds."""
    reader = FrameReader()
    frames = reader.feed(STREAM[:60])
    kept = [(t, p) for t, p in frames]
    rest = reader.feed(STREAM[60:])
    assert [(t, bytes(p)) for t, p in kept + rest] == FRAMES
    assert all(isinstance(p, memoryview) for _, p in kept + rest)


def test_bad_signature_in_the_middle() -> None:
    """A bad signature after good frames raises DecodeError."""
    bad = bytearray(frame_header(0))
    bad[3] = 0
    reader = FrameReader()
    with pytest.raises(DecodeError):
        reader.feed(STREAM + bytes(bad) + STREAM)


def test_bad_signature_in_a_later_feed() -> None:
    """A bad signature arriving in a later feed raises DecodeError once its header is whole."""
    reader = FrameReader()
    assert collect(reader, STREAM) == FRAMES
    junk = bytes(37)
    assert reader.feed(junk[:20]) == []
    with pytest.raises(DecodeError):
        reader.feed(junk[20:])


def test_bad_signature_after_split_frame() -> None:
    """A bad signature right after a frame completed across feeds raises DecodeError."""
    reader = FrameReader()
    assert reader.feed(STREAM[:30]) == []
    with pytest.raises(DecodeError):
        reader.feed(STREAM[30:] + b"\x00" * 37)


def test_max_payload_enforced() -> None:
    """A frame above the reader's maximum raises as soon as its header is whole."""
    reader = FrameReader(max_payload=10)
    ok = collect(reader, frame_header(10, FrameType.DATA) + bytes(10))
    assert ok == [(FrameType.DATA, bytes(10))]
    with pytest.raises(DecodeError):
        reader.feed(frame_header(11, FrameType.DATA))


def test_max_payload_across_feeds() -> None:
    """An oversized header split across feeds still raises."""
    reader = FrameReader(max_payload=10)
    header = frame_header(11)
    assert reader.feed(header[:36]) == []
    with pytest.raises(DecodeError):
        reader.feed(header[36:])


def test_max_payload_default_and_attribute() -> None:
    """The default maximum is 256 KiB and can be changed on the reader."""
    reader = FrameReader()
    assert reader.max_payload == 256 * 1024
    reader.max_payload = 4
    with pytest.raises(DecodeError):
        reader.feed(frame_header(5))


def test_large_frame_in_many_chunks() -> None:
    """A frame of 200 KiB sent in 1000-byte chunks comes out once, whole."""
    payload = bytes(i % 251 for i in range(200 * 1024))
    data = encode_frame(FrameType.DATA, payload)
    reader = FrameReader()
    got: list[tuple[int, bytes]] = []
    for pos in range(0, len(data), 1000):
        got.extend((t, bytes(p)) for t, p in reader.feed(data[pos : pos + 1000]))
    assert got == [(FrameType.DATA, payload)]
    assert reader.buffered == 0
