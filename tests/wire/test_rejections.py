"""Inputs the wire codecs must refuse: wrong sizes, cut-short headers, bad signatures.

Every refusal is a DecodeError, the one error type of the wire package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from cellvpn.wire import frame
from cellvpn.wire.channel import decode_channel_packet
from cellvpn.wire.errors import DecodeError
from cellvpn.wire.frame import FrameHeader, decode_frame
from cellvpn.wire.receipt import Receipt, ReceiptInfo, decode_uint256
from cellvpn.wire.service import CheckPacket, Error, NotifyStopped, Request, Success
from cellvpn.wire.setup import Close, Hello, Welcome, decode_items
from cellvpn.wire.vpn import AddrReply, VpnPacket, peek_op


def hx(text: str) -> bytes:
    """Hex digits to bytes; spaces only group the digits."""
    return bytes.fromhex(text)


SIG = hx("a0 95 96 a9 9e 5c fb fa")


def frame_header(size: int, ftype: int = 0) -> bytes:
    """A hand-built 37-byte frame header with the given size and type, other fields zero."""
    return SIG + size.to_bytes(4, "little") + bytes(8) + bytes([ftype]) + bytes(16)


def vpn_header(op: int, low: int = 0, high: int = 0) -> bytes:
    """A hand-built 20-byte VPN header: sock_id 0, op, usage_id 0, then the 8-byte union."""
    return (
        bytes(4)
        + op.to_bytes(4, "little")
        + bytes(4)
        + low.to_bytes(4, "little")
        + high.to_bytes(4, "little")
    )


def rejects(decode: Callable[..., Any], data: bytes, *args: Any) -> None:
    with pytest.raises(DecodeError):
        decode(data, *args)


def test_decode_error_is_a_value_error() -> None:
    """DecodeError is a ValueError, so generic input checks also catch it."""
    assert issubclass(DecodeError, ValueError)


# --- frame ------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 8, 36])
def test_frame_header_cut_short(length: int) -> None:
    """A frame header shorter than 37 bytes is refused."""
    rejects(FrameHeader.decode, frame_header(0)[:length])
    rejects(decode_frame, frame_header(0)[:length])


@pytest.mark.parametrize("index", range(8))
def test_frame_bad_signature(index: int) -> None:
    """A change to any signature byte is refused."""
    data = bytearray(frame_header(0))
    data[index] ^= 0x01
    rejects(FrameHeader.decode, bytes(data))
    rejects(decode_frame, bytes(data))


def test_frame_size_above_maximum() -> None:
    """A size above the configured maximum is refused; the maximum itself is accepted."""
    assert FrameHeader.decode(frame_header(100), max_payload=100).size == 100
    rejects(FrameHeader.decode, frame_header(101), 100)
    rejects(decode_frame, frame_header(101) + bytes(101), 100)


def test_frame_default_maximum() -> None:
    """The default maximum is 256 KiB of payload."""
    assert frame.DEFAULT_MAX_PAYLOAD == 256 * 1024
    assert FrameHeader.decode(frame_header(256 * 1024)).size == 256 * 1024
    rejects(FrameHeader.decode, frame_header(256 * 1024 + 1))
    rejects(FrameHeader.decode, frame_header(0xFFFFFFFF))


def test_frame_payload_shorter_than_size() -> None:
    """decode_frame refuses a frame whose payload is shorter than its size."""
    rejects(decode_frame, frame_header(4) + hx("aa bb cc"))


def test_frame_payload_longer_than_size() -> None:
    """decode_frame refuses trailing bytes after the payload."""
    rejects(decode_frame, frame_header(3) + hx("aa bb cc dd"))
    rejects(decode_frame, frame_header(0) + hx("00"))


# --- channel ----------------------------------------------------------------------------------


def channel_packet(data_size: int, data: bytes) -> bytes:
    return hx("53 00 02 00") + bytes(8) + data_size.to_bytes(4, "little") + data


@pytest.mark.parametrize("length", [0, 1, 12, 15])
def test_channel_header_cut_short(length: int) -> None:
    """A channel header shorter than 16 bytes is refused."""
    rejects(decode_channel_packet, channel_packet(0, b"")[:length])


@pytest.mark.parametrize(("data_size", "real"), [(5, 4), (3, 4), (1, 0), (0, 1), (0xFFFFFFFF, 4)])
def test_channel_data_size_mismatch(data_size: int, real: int) -> None:
    """A channel data_size other than the real data length is refused."""
    rejects(decode_channel_packet, channel_packet(data_size, bytes(real)))


# --- 'S' VPN packets --------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 4, 8, 12, 19])
def test_vpn_header_cut_short(length: int) -> None:
    """A VPN packet shorter than its 20-byte header is refused, also by peek_op."""
    rejects(VpnPacket.decode, vpn_header(0xBC)[:length])
    rejects(peek_op, vpn_header(0xBC)[:length])


@pytest.mark.parametrize("op", [0xBC, 0xBD, 0xAC, 0xAD, 0xB3])
@pytest.mark.parametrize(
    ("data_size", "real"), [(21, 20), (19, 20), (0, 1), (1, 0), (2**32 - 1, 0)]
)
def test_vpn_data_size_mismatch(op: int, data_size: int, real: int) -> None:
    """A data op whose data_size is not the real payload length is refused."""
    rejects(VpnPacket.decode, vpn_header(op, data_size) + bytes(real))


@pytest.mark.parametrize("op", [0xB2, 0xC0, 0xC1])
def test_vpn_header_only_ops_with_wrong_size(op: int) -> None:
    """ADDR_REQUEST, PING and PONG with a data_size that does not match are refused."""
    rejects(VpnPacket.decode, vpn_header(op, 4))
    rejects(VpnPacket.decode, vpn_header(op, 0) + bytes(4))


@pytest.mark.parametrize("op", [0xAA, 0xA9])
def test_vpn_connect_addr_size_mismatch(op: int) -> None:
    """CONNECT(ED) whose addr_size is not the address length is refused."""
    rejects(VpnPacket.decode, vpn_header(op, 11, 8079) + b"198.18.0.1")
    rejects(VpnPacket.decode, vpn_header(op, 9, 8079) + b"198.18.0.1")


def test_vpn_problem_with_data() -> None:
    """PROBLEM carries no data; a PROBLEM with data is refused."""
    rejects(VpnPacket.decode, vpn_header(0xAE, 1) + b"x")


def test_vpn_disconnect_with_data() -> None:
    """DISCONNECT carries no data; a DISCONNECT with data is refused."""
    rejects(VpnPacket.decode, vpn_header(0xAB) + b"x")


@pytest.mark.parametrize("op", [0x00, 0x01, 0xA8, 0xAF, 0xB4, 0xBB, 0xBE, 0xC2, 0xFF, 0x1BC])
def test_vpn_unknown_op_code(op: int) -> None:
    """An op code outside the table is refused (all four bytes of it count)."""
    rejects(VpnPacket.decode, vpn_header(op))


@pytest.mark.parametrize("length", [0, 4, 7])
def test_addr_reply_too_short(length: int) -> None:
    """ADDR_REPLY needs at least the client and gateway addresses."""
    rejects(AddrReply.decode, hx("0a0b0c02 0a0b0c01")[:length])


@pytest.mark.parametrize("length", [9, 10, 11])
def test_addr_reply_netmask_cut_short(length: int) -> None:
    """ADDR_REPLY with part of a netmask is refused."""
    rejects(AddrReply.decode, hx("0a0b0c02 0a0b0c01 ffffff00")[:length])


ADDR_HEAD = hx("0a0b0c02 0a0b0c01 ffffff00")


@pytest.mark.parametrize(
    "options",
    [
        hx("01"),  # option header cut short
        hx("01 02 05"),  # MTU says 2 bytes, has 1
        hx("7f 05 aa"),  # unknown option says 5 bytes, has 1
        hx("01 03 00 05 dc"),  # MTU of 3 bytes
        hx("01 01 05"),  # MTU of 1 byte
        hx("02 03 0a0b0c"),  # DNS of 3 bytes
        hx("02 05 0a0b0c01 00"),  # DNS of 5 bytes
        hx("03 04 c0a80000"),  # ROUTE without a prefix length
        hx("03 06 c0a80000 10 00"),  # ROUTE of 6 bytes
        hx("03 05 c0a80000 21"),  # ROUTE prefix length 33
        hx("03 05 c0a80000 ff"),  # ROUTE prefix length 255
        hx("03 05 c6120001 0f"),  # ROUTE with host bits set: 198.18.0.1/15
        hx("01 02 05 dc") + hx("02"),  # a good option, then a cut-short one
    ],
)
def test_addr_reply_bad_options(options: bytes) -> None:
    """ADDR_REPLY options that are cut short or of the wrong size are refused."""
    rejects(AddrReply.decode, ADDR_HEAD + options)


# --- 'R' service packets ----------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 8, 121])
def test_request_cut_short(length: int) -> None:
    """REQUEST shorter than its 122-byte header is refused."""
    rejects(Request.decode, bytes(length))


@pytest.mark.parametrize("length", [0, 4, 19, 21, 24, 20 + 67])
def test_success_must_be_20_bytes(length: int) -> None:
    """SUCCESS is exactly 20 bytes: a tail (the original's 20 + 67 form) is refused."""
    rejects(Success.decode, bytes(length))


@pytest.mark.parametrize("length", [0, 4, 20, 23, 25, 28])
def test_error_must_be_24_bytes(length: int) -> None:
    """ERROR is exactly 24 bytes: the original's 4-byte form is refused."""
    rejects(Error.decode, bytes(length))


def test_error_4_byte_original_form() -> None:
    """The original's 4-byte ERROR (only the code) is refused."""
    rejects(Error.decode, hx("01 06 00 00"))


@pytest.mark.parametrize("length", [1, 4, 20, 23, 25])
def test_notify_stopped_sizes(length: int) -> None:
    """NOTIFY_STOPPED is empty or 24 bytes; anything else is refused."""
    rejects(NotifyStopped.decode, bytes(length))


def check_header(data_size: int) -> bytes:
    """A hand-built CHECK header, all zero except data_size at offset 588."""
    return bytes(588) + data_size.to_bytes(8, "little") + bytes(32)


@pytest.mark.parametrize("length", [0, 20, 596, 627])
def test_check_cut_short(length: int) -> None:
    """A CHECK packet shorter than its 628-byte header is refused."""
    rejects(CheckPacket.decode, check_header(0)[:length])


@pytest.mark.parametrize(("data_size", "real"), [(5, 4), (3, 4), (0, 1), (1, 0), (2**64 - 1, 0)])
def test_check_data_size_mismatch(data_size: int, real: int) -> None:
    """A CHECK packet whose data_size is not the real data length is refused."""
    assert len(check_header(0)) == 628
    assert CheckPacket.decode(check_header(4) + bytes(4)).data == bytes(4)
    rejects(CheckPacket.decode, check_header(data_size) + bytes(real))


# --- receipt ----------------------------------------------------------------------------------

INFO = (
    hx("0100000000000000")  # srv_uid
    + hx("0000000000000000")  # addition
    + hx("02000000")  # units_type SEC
    + hx("02 000000")  # version, pad
    + hx("100e000000000000")  # units
    + bytes(32)  # value
    + bytes(32)  # prev hash
)


@pytest.mark.parametrize("length", [0, 32, 95, 97])
def test_receipt_info_size(length: int) -> None:
    """receipt_info is exactly 96 bytes."""
    assert ReceiptInfo.decode(INFO).units == 3600
    rejects(ReceiptInfo.decode, (INFO + bytes(1))[:length])


@pytest.mark.parametrize("index", [21, 22, 23])
def test_receipt_info_padding_must_be_zero(index: int) -> None:
    """receipt_info with a non-zero padding byte is refused."""
    data = bytearray(INFO)
    data[index] = 1
    rejects(ReceiptInfo.decode, bytes(data))


@pytest.mark.parametrize("length", [0, 16, 31, 33])
def test_uint256_size(length: int) -> None:
    """decode_uint256 takes exactly 32 bytes."""
    rejects(decode_uint256, bytes(length))


def receipt_bytes(body: bytes, *, size: int | None = None, exts_size: int = 0) -> bytes:
    """A hand-built receipt: type, INFO, size (default: the real total), exts_size, body."""
    total = 113 + len(body) if size is None else size
    return hx("71") + INFO + total.to_bytes(8, "little") + exts_size.to_bytes(8, "little") + body


SIG_OK = hx("250e0000 00 00 02000000 01000000") + hx("aa") + hx("bbbb")


def test_receipt_hand_built_is_accepted() -> None:
    """The hand-built receipt with one signature is accepted, so the refusals below are real."""
    rec = Receipt.decode(receipt_bytes(hx("e1") + SIG_OK, exts_size=1))
    assert rec.exts == hx("e1")
    assert [(s.public_key, s.signature) for s in rec.signatures] == [(hx("aa"), hx("bbbb"))]


@pytest.mark.parametrize("length", [0, 1, 97, 112])
def test_receipt_cut_short(length: int) -> None:
    """A receipt shorter than its 113-byte header is refused."""
    rejects(Receipt.decode, receipt_bytes(b"")[:length])


def test_receipt_wrong_type() -> None:
    """A receipt whose type byte is not 0x71 is refused."""
    data = bytearray(receipt_bytes(b""))
    data[0] = 0x70
    rejects(Receipt.decode, bytes(data))


@pytest.mark.parametrize("size", [0, 112, 114, 2**64 - 1])
def test_receipt_size_mismatch(size: int) -> None:
    """A receipt whose size field is not its real length is refused."""
    rejects(Receipt.decode, receipt_bytes(b"", size=size))


@pytest.mark.parametrize("exts_size", [1, 5, 2**64 - 1])
def test_receipt_exts_overrun(exts_size: int) -> None:
    """Extensions longer than the bytes after the header are refused."""
    rejects(Receipt.decode, receipt_bytes(b"", exts_size=exts_size))


@pytest.mark.parametrize("cut", [1, 13])
def test_receipt_signature_header_cut_short(cut: int) -> None:
    """A signature header shorter than 14 bytes is refused."""
    rejects(Receipt.decode, receipt_bytes(SIG_OK[:cut]))


@pytest.mark.parametrize("cut", [14, 15, 16])
def test_receipt_signature_overrun(cut: int) -> None:
    """A signature whose key and signature sizes overrun the receipt is refused."""
    rejects(Receipt.decode, receipt_bytes(SIG_OK[:cut]))


def test_receipt_signature_huge_sizes() -> None:
    """Signature sizes near 2**32 are refused, not allocated."""
    rejects(Receipt.decode, receipt_bytes(hx("250e0000 00 00 ffffffff ffffffff")))


def test_receipt_bad_info_padding() -> None:
    """A receipt whose receipt_info padding is not zero is refused."""
    data = bytearray(receipt_bytes(b""))
    data[1 + 21] = 0xFF
    rejects(Receipt.decode, bytes(data))


# --- session setup ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        hx("01"),  # item header cut short
        hx("01 02"),  # item header cut short
        hx("01 0200 01"),  # value says 2 bytes, has 1
        hx("01 ffff"),  # value says 65535 bytes, has 0
        hx("01 0200 0100 01 0200 0100"),  # the same tag twice
        hx("7f 0000 7f 0000"),  # an unknown tag twice
    ],
)
def test_items_malformed(data: bytes) -> None:
    """Cut-short or repeated setup items are refused by every setup decoder."""
    rejects(decode_items, data)
    rejects(Hello.decode, data)
    rejects(Welcome.decode, data)
    rejects(Close.decode, data)


@pytest.mark.parametrize(
    "data",
    [
        hx("02 0200 5253"),  # no VERSION
        hx("01 0100 01"),  # VERSION of 1 byte
        hx("01 0300 010000"),  # VERSION of 3 bytes
        hx("01 0200 0100 02 0200 52c9"),  # CHANNELS not UTF-8
        hx("01 0200 0100 02 0300 52c3a9"),  # CHANNELS UTF-8 but not ASCII
        hx("01 0200 0100 03 0100 ff"),  # CAPS not UTF-8
        hx("01 0200 0100 03 0200 c3a9"),  # CAPS UTF-8 but not ASCII
        hx("01 0200 0100 04 0200 c3a9"),  # REQUIRED_CAPS not ASCII
        hx("01 0200 0100 08 0200 0000"),  # MAX_FRAME of 2 bytes
        hx("01 0200 0100 0a 0400 00000000"),  # NODE_ADDR of 4 bytes
    ],
)
def test_hello_malformed(data: bytes) -> None:
    """HELLO without a version, or with an item of the wrong size or encoding, is refused."""
    rejects(Hello.decode, data)


@pytest.mark.parametrize(
    "data",
    [
        hx("01 0200 0100"),  # no SESSION_ID
        hx("01 0200 0100 05 0200 0100"),  # SESSION_ID of 2 bytes
        hx("05 0400 01000000"),  # no VERSION
        hx("01 0200 0100 05 0400 01000000 02 0100 ff"),  # CHANNELS not UTF-8
        hx("01 0200 0100 05 0400 01000000 02 0200 c3a9"),  # CHANNELS not ASCII
        hx("01 0200 0100 05 0400 01000000 03 0200 c3a9"),  # CAPS not ASCII
        hx("01 0200 0100 05 0400 01000000 08 0800 0000000000000000"),  # MAX_FRAME of 8
    ],
)
def test_welcome_malformed(data: bytes) -> None:
    """WELCOME without a session id or version, or with a malformed item, is refused."""
    rejects(Welcome.decode, data)


@pytest.mark.parametrize(
    "data",
    [
        hx("07 0100 01"),  # CLOSE_CODE of 1 byte
        hx("07 0400 01000000"),  # CLOSE_CODE of 4 bytes
        hx("06 0200 c328"),  # REASON not UTF-8
    ],
)
def test_close_malformed(data: bytes) -> None:
    """CLOSE with a code of the wrong size or a reason that is not UTF-8 is refused."""
    rejects(Close.decode, data)
