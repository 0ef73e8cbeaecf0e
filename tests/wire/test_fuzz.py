"""Fuzzing: every wire decoder either returns a value or raises DecodeError, nothing else.

Inputs are arbitrary bytes, and valid encodings of every layout with bytes flipped, cut off,
inserted or appended, so the decoders are driven past their first size checks.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from typing import Any, Protocol

from hypothesis import given, settings
from hypothesis import strategies as st

from cellvpn.wire.channel import decode_channel_packet, encode_channel_packet
from cellvpn.wire.errors import DecodeError
from cellvpn.wire.frame import FrameHeader, FrameReader, decode_frame, encode_frame
from cellvpn.wire.receipt import Receipt, ReceiptInfo, decode_uint256, encode_uint256
from cellvpn.wire.service import CheckPacket, Error, NotifyStopped, Request, Success
from cellvpn.wire.setup import Close, Hello, Welcome, decode_items, encode_items
from cellvpn.wire.vpn import AddrReply, VpnPacket, peek_op

from . import strategies as s

FUZZ = settings(max_examples=300, deadline=None)


class _Encodable(Protocol):
    def encode(self) -> bytes: ...


def _encoded(values: st.SearchStrategy[_Encodable]) -> st.SearchStrategy[bytes]:
    return values.map(lambda v: v.encode())


def _encodings() -> dict[str, st.SearchStrategy[bytes]]:
    """Valid encodings of each layout, drawn from the round-trip strategies."""
    small = st.binary(max_size=64)
    return {
        "frame": st.builds(encode_frame, s.u8, small, s.u64, s.u64, s.u64),
        "channel": st.builds(encode_channel_packet, s.u8, s.u8, s.u64, small),
        "vpn": _encoded(s.vpn_packets),
        "addr": _encoded(s.addr_replies()),
        "request": _encoded(s.requests),
        "success": _encoded(s.successes),
        "error": _encoded(s.errors),
        "check": _encoded(s.check_packets),
        "info": _encoded(s.infos),
        "uint256": s.uint256.map(encode_uint256),
        "receipt": _encoded(s.receipts),
        # Tags 0-12 cover every known tag and repeat often enough to hit the duplicate check.
        "items": st.lists(st.tuples(st.integers(0, 12), st.binary(max_size=12)), max_size=6).map(
            encode_items
        ),
        "hello": _encoded(s.hellos),
        "welcome": _encoded(s.welcomes),
        "close": _encoded(s.closes),
    }


ENCODINGS = _encodings()
ANY_ENCODING = st.one_of(*ENCODINGS.values())


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """A valid encoding with a few bytes flipped, cut, inserted or appended."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "append", "truncate"]))
        pos = draw(st.integers(0, len(data)))
        if kind == "flip" and pos < len(data):
            data[pos] = draw(s.u8)
        elif kind == "cut":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "append":
            data += draw(st.binary(min_size=1, max_size=8))
        else:
            del data[pos:]
    return bytes(data)


def inputs(kind: str) -> st.SearchStrategy[bytes | memoryview]:
    """Arbitrary bytes, or a mutated encoding of this layout or of any layout."""
    raw = st.one_of(
        st.binary(max_size=1000),
        mutated(ENCODINGS[kind]),
        mutated(ENCODINGS[kind]),
        mutated(ANY_ENCODING),
    )
    return st.one_of(raw, raw.map(lambda b: memoryview(b)))


def only_decode_error(decode: Callable[[Any], object], data: bytes | memoryview) -> None:
    """Call decode; a DecodeError is fine, any other exception fails the test."""
    with contextlib.suppress(DecodeError):
        decode(data)


# One test function per decoder: pytest-twisted rewraps a hypothesis test's inner function on
# every call, so a parametrized @given test breaks after its first parameter.


@FUZZ
@given(inputs("frame"))
def test_frame_header_decode(data: bytes | memoryview) -> None:
    """FrameHeader.decode returns a header or raises DecodeError for any input."""
    only_decode_error(FrameHeader.decode, data)
    only_decode_error(lambda d: FrameHeader.decode(d, max_payload=64), data)


@FUZZ
@given(inputs("frame"))
def test_decode_frame(data: bytes | memoryview) -> None:
    """decode_frame returns a frame or raises DecodeError for any input."""
    only_decode_error(decode_frame, data)
    only_decode_error(lambda d: decode_frame(d, max_payload=32), data)


@FUZZ
@given(inputs("frame"))
def test_frame_reader_feed(data: bytes | memoryview) -> None:
    """FrameReader.feed returns frames or raises DecodeError for any input."""
    only_decode_error(FrameReader().feed, bytes(data))
    only_decode_error(FrameReader(max_payload=16).feed, bytes(data))


@FUZZ
@given(inputs("channel"))
def test_decode_channel_packet(data: bytes | memoryview) -> None:
    """decode_channel_packet returns a packet or raises DecodeError for any input."""
    only_decode_error(decode_channel_packet, data)


@FUZZ
@given(inputs("vpn"))
def test_vpn_packet_decode(data: bytes | memoryview) -> None:
    """VpnPacket.decode returns a packet or raises DecodeError for any input."""
    only_decode_error(VpnPacket.decode, data)


@FUZZ
@given(inputs("vpn"))
def test_peek_op(data: bytes | memoryview) -> None:
    """peek_op returns an op code or raises DecodeError for any input."""
    only_decode_error(peek_op, data)


@FUZZ
@given(inputs("addr"))
def test_addr_reply_decode(data: bytes | memoryview) -> None:
    """AddrReply.decode returns a reply or raises DecodeError for any input."""
    only_decode_error(AddrReply.decode, data)


@FUZZ
@given(inputs("request"))
def test_request_decode(data: bytes | memoryview) -> None:
    """Request.decode returns a request or raises DecodeError for any input."""
    only_decode_error(Request.decode, data)


@FUZZ
@given(inputs("success"))
def test_success_decode(data: bytes | memoryview) -> None:
    """Success.decode returns a value or raises DecodeError for any input."""
    only_decode_error(Success.decode, data)


@FUZZ
@given(inputs("error"))
def test_error_decode(data: bytes | memoryview) -> None:
    """Error.decode returns a value or raises DecodeError for any input."""
    only_decode_error(Error.decode, data)


@FUZZ
@given(inputs("error"))
def test_notify_stopped_decode(data: bytes | memoryview) -> None:
    """NotifyStopped.decode returns a value or raises DecodeError for any input."""
    only_decode_error(NotifyStopped.decode, data)


@FUZZ
@given(inputs("check"))
def test_check_packet_decode(data: bytes | memoryview) -> None:
    """CheckPacket.decode returns a packet or raises DecodeError for any input."""
    only_decode_error(CheckPacket.decode, data)


@FUZZ
@given(inputs("info"))
def test_receipt_info_decode(data: bytes | memoryview) -> None:
    """ReceiptInfo.decode returns a value or raises DecodeError for any input."""
    only_decode_error(ReceiptInfo.decode, data)


@FUZZ
@given(inputs("uint256"))
def test_decode_uint256(data: bytes | memoryview) -> None:
    """decode_uint256 returns an integer or raises DecodeError for any input."""
    only_decode_error(decode_uint256, data)


@FUZZ
@given(inputs("receipt"))
def test_receipt_decode(data: bytes | memoryview) -> None:
    """Receipt.decode returns a receipt or raises DecodeError for any input."""
    only_decode_error(Receipt.decode, data)


@FUZZ
@given(inputs("items"))
def test_decode_items(data: bytes | memoryview) -> None:
    """decode_items returns items or raises DecodeError for any input."""
    only_decode_error(decode_items, data)


@FUZZ
@given(inputs("hello"))
def test_hello_decode(data: bytes | memoryview) -> None:
    """Hello.decode returns a HELLO or raises DecodeError for any input."""
    only_decode_error(Hello.decode, data)


@FUZZ
@given(inputs("welcome"))
def test_welcome_decode(data: bytes | memoryview) -> None:
    """Welcome.decode returns a WELCOME or raises DecodeError for any input."""
    only_decode_error(Welcome.decode, data)


@FUZZ
@given(inputs("close"))
def test_close_decode(data: bytes | memoryview) -> None:
    """Close.decode returns a CLOSE or raises DecodeError for any input."""
    only_decode_error(Close.decode, data)


@st.composite
def chunked_streams(draw: st.DrawFn) -> list[bytes]:
    """A byte stream (arbitrary, or frames, some mutated) cut into chunks."""
    parts = draw(
        st.lists(
            st.one_of(ENCODINGS["frame"], mutated(ENCODINGS["frame"]), st.binary(max_size=50)),
            max_size=6,
        )
    )
    stream = b"".join(parts)
    cuts = sorted(set(draw(st.lists(st.integers(0, len(stream)), max_size=8))))
    points = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(points)]


def _feed_all(reader: FrameReader, chunks: list[bytes]) -> tuple[bool, list[tuple[int, bytes]]]:
    frames: list[tuple[int, bytes]] = []
    try:
        for chunk in chunks:
            frames.extend((t, bytes(p)) for t, p in reader.feed(chunk))
    except DecodeError:
        return True, frames
    return False, frames


@settings(max_examples=500, deadline=None)
@given(chunks=chunked_streams(), max_payload=st.sampled_from([0, 16, 64, 256 * 1024]))
def test_frame_reader_across_feeds(chunks: list[bytes], max_payload: int) -> None:
    """Fed in chunks, FrameReader raises only DecodeError, exactly when fed in one piece does."""
    chunked = FrameReader(max_payload)
    failed, frames = _feed_all(chunked, chunks)
    whole = FrameReader(max_payload)
    whole_failed, whole_frames = _feed_all(whole, [b"".join(chunks)])
    assert failed == whole_failed
    if not failed:
        assert frames == whole_frames
        assert chunked.buffered == whole.buffered
    # After an error the reader may be fed again; it still raises nothing but DecodeError.
    _feed_all(chunked, chunks)
