"""Round-trip properties: decode(encode(x)) == x for every codec with an encode/decode pair."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from cellvpn.wire.channel import ChannelHeader, decode_channel_packet, encode_channel_packet
from cellvpn.wire.frame import FrameHeader, FrameReader, decode_frame, encode_frame
from cellvpn.wire.receipt import Receipt, ReceiptInfo, decode_uint256, encode_uint256
from cellvpn.wire.service import CheckPacket, Error, NotifyStopped, Request, Success
from cellvpn.wire.setup import Close, Hello, Welcome, decode_items, encode_items
from cellvpn.wire.vpn import AddrReply, VpnPacket, peek_op

from . import strategies as s

EXAMPLES = settings(max_examples=150, deadline=None)


# --- frame ------------------------------------------------------------------------------------


@EXAMPLES
@given(
    st.builds(FrameHeader, size=s.u32, timestamp=s.u64, type=s.u8, src_addr=s.u64, dst_addr=s.u64)
)
def test_frame_header_roundtrip(header: FrameHeader) -> None:
    """FrameHeader survives encode then decode for every field value in range."""
    encoded = header.encode()
    assert len(encoded) == 37
    assert FrameHeader.decode(encoded, max_payload=2**32 - 1) == header


@EXAMPLES
@given(ftype=s.u8, data=s.payload, ts=s.u64, src=s.u64, dst=s.u64)
def test_frame_roundtrip(ftype: int, data: bytes, ts: int, src: int, dst: int) -> None:
    """decode_frame(encode_frame(...)) gives back the header fields and the payload."""
    header, got = decode_frame(encode_frame(ftype, data, ts, src, dst))
    assert header == FrameHeader(len(data), ts, ftype, src, dst)
    assert got == data


@EXAMPLES
@given(
    frames=st.lists(st.tuples(s.u8, st.binary(max_size=300)), max_size=8),
    cuts=st.lists(st.integers(0, 3000), max_size=6),
)
def test_frame_reader_roundtrip(frames: list[tuple[int, bytes]], cuts: list[int]) -> None:
    """FrameReader gives back every encoded frame however the stream is cut into chunks."""
    stream = b"".join(encode_frame(t, p) for t, p in frames)
    points = sorted({0, len(stream), *(c for c in cuts if c <= len(stream))})
    reader = FrameReader()
    got: list[tuple[int, bytes]] = []
    for start, stop in itertools.pairwise(points):
        got.extend((t, bytes(p)) for t, p in reader.feed(stream[start:stop]))
    assert got == frames
    assert reader.buffered == 0


# --- channel ----------------------------------------------------------------------------------


@EXAMPLES
@given(channel=s.u8, ptype=s.u8, seq=s.u64, data=s.payload)
def test_channel_packet_roundtrip(channel: int, ptype: int, seq: int, data: bytes) -> None:
    """decode_channel_packet(encode_channel_packet(...)) gives back every field and the data."""
    header, got = decode_channel_packet(encode_channel_packet(channel, ptype, seq, data))
    assert header == ChannelHeader(channel, ptype, seq, len(data), 0)
    assert got == data


@EXAMPLES
@given(cid=s.u8, ptype=s.u8, seq=s.u64, enc=s.u8, data=st.binary(max_size=300))
def test_channel_header_roundtrip(cid: int, ptype: int, seq: int, enc: int, data: bytes) -> None:
    """ChannelHeader.encode followed by its data decodes to the same header."""
    header = ChannelHeader(cid, ptype, seq, len(data), enc)
    assert decode_channel_packet(header.encode() + data) == (header, data)


# --- 'S' VPN packets --------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(s.vpn_packets)
def test_vpn_packet_roundtrip(packet: VpnPacket) -> None:
    """VpnPacket survives encode then decode for every op code's layout; peek_op agrees."""
    encoded = packet.encode()
    assert VpnPacket.decode(encoded) == packet
    assert peek_op(encoded) == packet.op_code


@EXAMPLES
@given(s.addr_replies())
def test_addr_reply_roundtrip(reply: AddrReply) -> None:
    """AddrReply survives encode then decode, with or without netmask and options."""
    assert AddrReply.decode(reply.encode()) == reply


# --- 'R' service packets ----------------------------------------------------------------------


@EXAMPLES
@given(s.requests)
def test_request_roundtrip(request: Request) -> None:
    """REQUEST survives encode then decode (the token without trailing NULs)."""
    assert Request.decode(request.encode()) == request


@EXAMPLES
@given(s.successes)
def test_success_roundtrip(success: Success) -> None:
    """SUCCESS survives encode then decode and is always 20 bytes."""
    encoded = success.encode()
    assert len(encoded) == 20
    assert Success.decode(encoded) == success


@EXAMPLES
@given(s.errors)
def test_error_roundtrip(error: Error) -> None:
    """ERROR survives encode then decode and is always 24 bytes."""
    encoded = error.encode()
    assert len(encoded) == 24
    assert Error.decode(encoded) == error


@EXAMPLES
@given(s.notifies)
def test_notify_stopped_roundtrip(notify: NotifyStopped) -> None:
    """NOTIFY_STOPPED survives encode then decode, empty or with an error body."""
    assert NotifyStopped.decode(notify.encode()) == notify


@EXAMPLES
@given(s.check_packets)
def test_check_packet_roundtrip(packet: CheckPacket) -> None:
    """CHECK packets survive encode then decode (host names without trailing NULs)."""
    encoded = packet.encode()
    assert len(encoded) == 628 + len(packet.data)
    assert CheckPacket.decode(encoded) == packet


# --- receipt ----------------------------------------------------------------------------------


@EXAMPLES
@given(s.uint256)
def test_uint256_roundtrip(value: int) -> None:
    """Every uint256 value survives encode then decode in 32 bytes."""
    encoded = encode_uint256(value)
    assert len(encoded) == 32
    assert decode_uint256(encoded) == value


@EXAMPLES
@given(s.infos)
def test_receipt_info_roundtrip(info: ReceiptInfo) -> None:
    """receipt_info survives encode then decode and is always 96 bytes."""
    encoded = info.encode()
    assert len(encoded) == 96
    assert ReceiptInfo.decode(encoded) == info


@EXAMPLES
@given(s.receipts)
def test_receipt_roundtrip(rec: Receipt) -> None:
    """A receipt with any exts and signatures survives encode then decode."""
    encoded = rec.encode()
    assert int.from_bytes(encoded[97:105], "little") == len(encoded)
    assert Receipt.decode(encoded) == rec


# --- session setup ----------------------------------------------------------------------------


@EXAMPLES
@given(s.items)
def test_items_roundtrip(items: dict[int, bytes]) -> None:
    """decode_items(encode_items(...)) gives back every item."""
    assert decode_items(encode_items(items.items())) == items


@EXAMPLES
@given(s.hellos)
def test_hello_roundtrip(hello: Hello) -> None:
    """HELLO survives encode then decode."""
    assert Hello.decode(hello.encode()) == hello


@EXAMPLES
@given(s.welcomes)
def test_welcome_roundtrip(welcome: Welcome) -> None:
    """WELCOME survives encode then decode."""
    assert Welcome.decode(welcome.encode()) == welcome


@EXAMPLES
@given(s.closes)
def test_close_roundtrip(close: Close) -> None:
    """CLOSE survives encode then decode for a reason of up to 1000 characters."""
    assert Close.decode(close.encode()) == close
