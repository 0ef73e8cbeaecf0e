"""Golden bytes for every wire layout.

Each expected value is written out by hand from the layout tables (field, offset, value), never
produced by the codec under test. The tests then check that the codec writes exactly those bytes
and reads them back into the same field values.
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct

import pytest

from cellvpn.wire import channel, frame, receipt, service, setup, vpn
from cellvpn.wire.channel import ChannelHeader, decode_channel_packet, encode_channel_packet
from cellvpn.wire.errors import DecodeError
from cellvpn.wire.frame import FrameHeader, FrameType, decode_frame, encode_frame
from cellvpn.wire.receipt import (
    Receipt,
    ReceiptInfo,
    Signature,
    Unit,
    decode_uint256,
    encode_uint256,
)
from cellvpn.wire.service import (
    CheckPacket,
    Error,
    ErrorCode,
    NotifyStopped,
    PacketType,
    Request,
    Success,
)
from cellvpn.wire.setup import Close, CloseCode, Hello, Tag, Welcome, decode_items, encode_items
from cellvpn.wire.vpn import AddrReply, OpCode, ProblemCode, VpnPacket, peek_op

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network


def hx(text: str) -> bytes:
    """Hex digits to bytes; spaces are only there to group the digits by field."""
    return bytes.fromhex(text)


# --- stream frame header (37 bytes) -----------------------------------------------------------

SIG = hx("a0 95 96 a9 9e 5c fb fa")

FRAME_HEADER = (
    SIG  # @0  signature
    + hx("02 01 00 00")  # @8  u32 size = 0x0102
    + hx("88 77 66 55 44 33 22 11")  # @12 u64 timestamp = 0x1122334455667788
    + hx("00")  # @20 u8 type = DATA
    + hx("11 10 0f 0e 0d 0c 0b 0a")  # @21 u64 src_addr = 0x0a0b0c0d0e0f1011
    + hx("28 27 26 25 24 23 22 21")  # @29 u64 dst_addr = 0x2122232425262728
)


def test_frame_header_constants() -> None:
    """The frame header is 37 bytes and starts with the original's signature."""
    assert frame.HEADER_SIZE == 37
    assert frame.SIGNATURE == SIG
    assert len(FRAME_HEADER) == 37


def test_frame_header_encodes_to_golden_bytes() -> None:
    """FrameHeader writes each field at its offset, little-endian."""
    header = FrameHeader(
        size=0x0102,
        timestamp=0x1122334455667788,
        type=FrameType.DATA,
        src_addr=0x0A0B0C0D0E0F1011,
        dst_addr=0x2122232425262728,
    )
    assert header.encode() == FRAME_HEADER


def test_frame_header_decodes_golden_bytes() -> None:
    """FrameHeader reads each field from its offset."""
    header = FrameHeader.decode(FRAME_HEADER)
    assert header.size == 0x0102
    assert header.timestamp == 0x1122334455667788
    assert header.type == FrameType.DATA
    assert header.src_addr == 0x0A0B0C0D0E0F1011
    assert header.dst_addr == 0x2122232425262728


def test_frame_header_type_byte_is_at_offset_20() -> None:
    """The type byte sits at offset 20, between the timestamp and the source address."""
    data = SIG + hx("00000000") + hx("0000000000000000") + hx("ff") + bytes(16)
    assert FrameHeader.decode(data).type == FrameType.SERVICE
    assert FrameHeader(0, 0, FrameType.SERVICE).encode() == data


@pytest.mark.parametrize(
    ("ftype", "value"),
    [
        (FrameType.DATA, 0x00),
        (FrameType.FRAGMENT, 0x01),
        (FrameType.KEEPALIVE, 0x11),
        (FrameType.ALIVE, 0x12),
        (FrameType.HELLO, 0x20),
        (FrameType.WELCOME, 0x21),
        (FrameType.CLOSE, 0x22),
        (FrameType.SERVICE, 0xFF),
    ],
)
def test_frame_type_values(ftype: FrameType, value: int) -> None:
    """Each frame type has its documented value and lands in the type byte."""
    assert ftype == value
    assert FrameHeader(0, 0, ftype).encode()[20] == value


def test_keepalive_frame_is_header_only() -> None:
    """A KEEPALIVE frame is the 37-byte header with size 0 and every other field 0."""
    expected = (
        SIG  # @0  signature
        + hx("00000000")  # @8  size = 0
        + hx("0000000000000000")  # @12 timestamp = 0
        + hx("11")  # @20 type = KEEPALIVE
        + hx("0000000000000000")  # @21 src_addr
        + hx("0000000000000000")  # @29 dst_addr
    )
    assert encode_frame(FrameType.KEEPALIVE) == expected
    header, payload = decode_frame(expected)
    assert header == FrameHeader(0, 0, FrameType.KEEPALIVE, 0, 0)
    assert payload == b""


def test_whole_frame_with_payload() -> None:
    """encode_frame puts the payload length at offset 8 and the payload after byte 37."""
    expected = (
        SIG  # @0  signature
        + hx("03000000")  # @8  size = 3
        + hx("6745230100000000")  # @12 timestamp = 0x01234567
        + hx("00")  # @20 type = DATA
        + hx("0100000000000000")  # @21 src_addr = 1
        + hx("0200000000000000")  # @29 dst_addr = 2
        + hx("aa bb cc")  # @37 payload
    )
    got = encode_frame(FrameType.DATA, hx("aa bb cc"), timestamp=0x01234567, src_addr=1, dst_addr=2)
    assert got == expected
    header, payload = decode_frame(expected)
    assert header == FrameHeader(3, 0x01234567, FrameType.DATA, 1, 2)
    assert payload == hx("aa bb cc")


# --- channel header (16 bytes) ----------------------------------------------------------------

CHANNEL_PACKET = (
    hx("53")  # @0  id = 'S'
    + hx("00")  # @1  enc_type = 0
    + hx("02")  # @2  type = 0x02 (VPN data)
    + hx("00")  # @3  padding
    + hx("08 07 06 05 04 03 02 01")  # @4  u64 seq_id = 0x0102030405060708
    + hx("04 00 00 00")  # @12 u32 data_size = 4
    + hx("de ad be ef")  # @16 data
)


def test_channel_constants() -> None:
    """The channel header is 16 bytes; the channel ids are 'R' and 'S'."""
    assert channel.HEADER_SIZE == 16
    assert channel.CHANNEL_R == 0x52
    assert channel.CHANNEL_S == 0x53


def test_channel_packet_encodes_to_golden_bytes() -> None:
    """encode_channel_packet and ChannelHeader.encode write each field at its offset."""
    data = hx("de ad be ef")
    assert encode_channel_packet(channel.CHANNEL_S, 0x02, 0x0102030405060708, data) == (
        CHANNEL_PACKET
    )
    header = ChannelHeader(id=0x53, type=0x02, seq_id=0x0102030405060708, data_size=4)
    assert header.encode() == CHANNEL_PACKET[:16]


def test_channel_packet_decodes_golden_bytes() -> None:
    """decode_channel_packet reads each field from its offset and returns the data."""
    header, data = decode_channel_packet(CHANNEL_PACKET)
    assert header == ChannelHeader(
        id=0x53, type=0x02, seq_id=0x0102030405060708, data_size=4, enc_type=0
    )
    assert data == hx("de ad be ef")


def test_channel_header_enc_type_at_offset_1() -> None:
    """enc_type is the byte at offset 1, before the type byte."""
    expected = hx("52 07 10 00") + hx("0100000000000000") + hx("00000000")
    header = ChannelHeader(id=0x52, type=0x10, seq_id=1, data_size=0, enc_type=7)
    assert header.encode() == expected
    assert decode_channel_packet(expected)[0] == header


# --- 'S' VPN packet (20-byte header) ----------------------------------------------------------

IPV4_PACKET = hx("45000014 00000000 40010000 0a0b0c02 08080808")  # 20-byte IPv4 header


def test_vpn_header_size() -> None:
    """The VPN packet header is 20 bytes."""
    assert vpn.HEADER_SIZE == 20


@pytest.mark.parametrize(("op", "op_hex"), [(OpCode.VPN_SEND, "bc"), (OpCode.VPN_RECV, "bd")])
def test_vpn_data_packet_golden(op: OpCode, op_hex: str) -> None:
    """VPN_SEND/VPN_RECV: data_size u32 at offset 12, 4 pad bytes, the IP packet at 20."""
    expected = (
        hx("ff ff ff ff")  # @0  i32 sock_id = -1
        + hx(f"{op_hex} 00 00 00")  # @4  u32 op_code
        + hx("44 33 22 11")  # @8  u32 usage_id = 0x11223344
        + hx("14 00 00 00")  # @12 u32 data_size = 20
        + hx("00 00 00 00")  # @16 pad
        + IPV4_PACKET  # @20 data
    )
    packet = VpnPacket(op, IPV4_PACKET, sock_id=-1, usage_id=0x11223344)
    assert packet.encode() == expected
    assert VpnPacket.decode(expected) == packet
    assert peek_op(expected) == op


@pytest.mark.parametrize(
    ("code", "value"),
    [
        (ProblemCode.NO_FREE_ADDR, 1),
        (ProblemCode.TUNNEL_DOWN, 2),
        (ProblemCode.PACKET_LOST, 3),
        (ProblemCode.ALREADY_ASSIGNED_ADDR, 4),
    ],
)
def test_vpn_problem_golden(code: ProblemCode, value: int) -> None:
    """PROBLEM: the problem code is a u32 at offset 12, then 4 pad bytes and no data."""
    assert code == value
    expected = (
        hx("00 00 00 00")  # @0  sock_id
        + hx("ae 00 00 00")  # @4  op_code = PROBLEM
        + hx("05 00 00 00")  # @8  usage_id = 5
        + bytes([value, 0, 0, 0])  # @12 u32 code
        + hx("00 00 00 00")  # @16 pad
    )
    packet = VpnPacket(OpCode.PROBLEM, usage_id=5, code=code)
    assert packet.encode() == expected
    decoded = VpnPacket.decode(expected)
    assert decoded == packet
    assert decoded.code == value
    assert decoded.data == b""


def test_vpn_connect_golden() -> None:
    """CONNECT: addr_size u32 at 12, port u16 at 16 in host (little-endian) order, 2 pad bytes."""
    addr = b"198.18.0.1"
    expected = (
        hx("03 00 00 00")  # @0  sock_id = 3
        + hx("aa 00 00 00")  # @4  op_code = CONNECT
        + hx("00 00 00 00")  # @8  usage_id
        + hx("0a 00 00 00")  # @12 u32 addr_size = 10
        + hx("8f 1f")  # @16 u16 port = 8079 (0x1f8f), little-endian
        + hx("00 00")  # @18 pad
        + hx("31 39 38 2e 31 38 2e 30 2e 31")  # @20 "198.18.0.1"
    )
    packet = VpnPacket(OpCode.CONNECT, addr, sock_id=3, port=8079)
    assert packet.encode() == expected
    decoded = VpnPacket.decode(expected)
    assert decoded == packet
    assert decoded.port == 8079


@pytest.mark.parametrize(
    ("op", "op_hex"),
    [(OpCode.VPN_ADDR_REQUEST, "b2"), (OpCode.PING, "c0"), (OpCode.PONG, "c1")],
)
def test_vpn_header_only_packets_golden(op: OpCode, op_hex: str) -> None:
    """ADDR_REQUEST, PING and PONG are 20 bytes, all zero except the op code."""
    expected = (
        hx("00000000")  # @0  sock_id
        + hx(f"{op_hex}000000")  # @4  op_code
        + hx("00000000")  # @8  usage_id
        + hx("00000000")  # @12 data_size = 0
        + hx("00000000")  # @16 pad
    )
    assert VpnPacket(op).encode() == expected
    assert VpnPacket.decode(expected) == VpnPacket(op)


def test_vpn_addr_reply_packet_golden() -> None:
    """ADDR_REPLY in the original's 8-byte form: client and gateway, network order."""
    expected = (
        hx("00000000")  # @0  sock_id
        + hx("b3000000")  # @4  op_code = VPN_ADDR_REPLY
        + hx("2a000000")  # @8  usage_id = 42
        + hx("08000000")  # @12 data_size = 8
        + hx("00000000")  # @16 pad
        + hx("c6 12 05 02")  # @20 client 198.18.5.2
        + hx("c6 12 05 01")  # @24 gateway 198.18.5.1
    )
    reply = AddrReply(IP("198.18.5.2"), IP("198.18.5.1"))
    packet = VpnPacket(OpCode.VPN_ADDR_REPLY, reply.encode(), usage_id=42)
    assert packet.encode() == expected
    decoded = VpnPacket.decode(expected)
    assert decoded.op_code == OpCode.VPN_ADDR_REPLY
    assert AddrReply.decode(decoded.data) == reply


ADDR_REPLY_FULL = (
    hx("c6 12 05 02")  # @0  client 198.18.5.2
    + hx("c6 12 05 01")  # @4  gateway 198.18.5.1
    + hx("ff ff ff 00")  # @8  netmask 255.255.255.0
    + hx("01 02 05 78")  # @12 MTU, 2 bytes: 1400 (0x0578), network order
    + hx("02 04 c6 12 05 01")  # @16 DNS, 4 bytes: 198.18.5.1
    + hx("02 04 c6 12 05 35")  # @22 DNS, 4 bytes: 198.18.5.53
    + hx("03 05 c6 13 00 00 10")  # @28 ROUTE, 5 bytes: 198.19.0.0/16
)


def test_addr_reply_full_golden() -> None:
    """ADDR_REPLY with netmask and the MTU, DNS and ROUTE option TLVs."""
    reply = AddrReply(
        client=IP("198.18.5.2"),
        gateway=IP("198.18.5.1"),
        netmask=IP("255.255.255.0"),
        mtu=1400,
        dns=(IP("198.18.5.1"), IP("198.18.5.53")),
        routes=(NET("198.19.0.0/16"),),
    )
    assert reply.encode() == ADDR_REPLY_FULL
    assert AddrReply.decode(ADDR_REPLY_FULL) == reply


def test_addr_reply_netmask_only_golden() -> None:
    """ADDR_REPLY with the netmask as a third address and no options."""
    expected = hx("c6120002") + hx("c6120001") + hx("ffff0000")
    reply = AddrReply(IP("198.18.0.2"), IP("198.18.0.1"), IP("255.255.0.0"))
    assert reply.encode() == expected
    assert AddrReply.decode(expected) == reply


def test_addr_reply_option_tags() -> None:
    """The option tags are MTU 1, DNS 2, ROUTE 3."""
    assert vpn.AddrOption.MTU.value == 1
    assert vpn.AddrOption.DNS.value == 2
    assert vpn.AddrOption.ROUTE.value == 3


def test_addr_reply_skips_unknown_options() -> None:
    """A reader keeps an unknown option aside and still reads the known ones after it."""
    data = (
        hx("0a0b0c02 0a0b0c01 ffffff00")  # client, gateway, netmask
        + hx("7f 03 aa bb cc")  # tag 0x7f, 3 bytes
        + hx("01 02 05 dc")  # MTU 1500
    )
    reply = AddrReply.decode(data)
    assert reply.mtu == 1500
    assert dict(reply.unknown) == {0x7F: hx("aa bb cc")}


@pytest.mark.parametrize(
    ("op", "value"),
    [
        (OpCode.CONNECTED, 0xA9),
        (OpCode.CONNECT, 0xAA),
        (OpCode.DISCONNECT, 0xAB),
        (OpCode.SEND, 0xAC),
        (OpCode.RECV, 0xAD),
        (OpCode.PROBLEM, 0xAE),
        (OpCode.VPN_METADATA, 0xB0),
        (OpCode.VPN_RESERVED, 0xB1),
        (OpCode.VPN_ADDR_REQUEST, 0xB2),
        (OpCode.VPN_ADDR_REPLY, 0xB3),
        (OpCode.VPN_SEND, 0xBC),
        (OpCode.VPN_RECV, 0xBD),
        (OpCode.PING, 0xC0),
        (OpCode.PONG, 0xC1),
    ],
)
def test_op_code_values(op: OpCode, value: int) -> None:
    """Each op code has the original's value and is written as a u32 at offset 4."""
    assert op == value
    encoded = VpnPacket(op).encode()
    assert encoded[4:8] == bytes([value, 0, 0, 0])
    header = hx("00000000") + bytes([value, 0, 0, 0]) + bytes(12)
    assert peek_op(header) == value
    assert VpnPacket.decode(encoded).op_code == value


def test_disconnect_and_raw_layouts_golden() -> None:
    """DISCONNECT is header only; VPN_METADATA carries a raw u64 at offset 12 and data."""
    disconnect = hx("09000000") + hx("ab000000") + hx("00000000") + hx("0000000000000000")
    assert VpnPacket(OpCode.DISCONNECT, sock_id=9).encode() == disconnect
    assert VpnPacket.decode(disconnect) == VpnPacket(OpCode.DISCONNECT, sock_id=9)
    metadata = (
        hx("00000000")  # @0  sock_id
        + hx("b0000000")  # @4  op_code = VPN_METADATA
        + hx("00000000")  # @8  usage_id
        + hx("0807060504030201")  # @12 raw u64 = 0x0102030405060708
        + hx("cafe")  # @20 data
    )
    packet = VpnPacket(OpCode.VPN_METADATA, hx("cafe"), raw=0x0102030405060708)
    assert packet.encode() == metadata
    assert VpnPacket.decode(metadata) == packet


def test_vpn_channel_packet_types() -> None:
    """'S' channel packet types: CLIENT 0x01, DATA 0x02, PONG 'd'."""
    assert vpn.PKT_TYPE_CLIENT == 0x01
    assert vpn.PKT_TYPE_DATA == 0x02
    assert vpn.PKT_TYPE_PONG == ord("d") == 0x64


# --- 'R' service packets ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ptype", "value"),
    [
        (PacketType.REQUEST, 0x01),
        (PacketType.SIGN_REQUEST, 0x10),
        (PacketType.SIGN_RESPONSE, 0x11),
        (PacketType.NOTIFY_STOPPED, 0x20),
        (PacketType.CHECK_REQUEST, 0x50),
        (PacketType.CHECK_RESPONSE, 0x51),
        (PacketType.SUCCESS, 0xF0),
        (PacketType.ERROR, 0xFF),
    ],
)
def test_r_packet_type_values(ptype: PacketType, value: int) -> None:
    """Each 'R' packet type has the original's value."""
    assert ptype == value


def test_service_uid() -> None:
    """The VPN service UID is 1."""
    assert service.SRV_UID_VPN == 0x0000000000000001


REQUEST = (
    hx("0807060504030201")  # @0   u64 net_id = 0x0102030405060708
    + hx("11" * 32)  # @8   tx_cond[32]
    + hx("0100000000000000")  # @40  u64 srv_uid = 1
    + hx("4b454c 00000000000000")  # @48  token[10] = "KEL", NUL padded
    + hx("22" * 32)  # @58  client_pkey_hash[32]
    + hx("33" * 32)  # @90  order_hash[32]
)


def test_request_golden() -> None:
    """REQUEST: the 122-byte header with each field at its offset."""
    assert len(REQUEST) == service.REQUEST_SIZE == 122
    request = Request(
        net_id=0x0102030405060708,
        tx_cond=b"\x11" * 32,
        srv_uid=1,
        token=b"KEL",
        client_pkey_hash=b"\x22" * 32,
        order_hash=b"\x33" * 32,
    )
    assert request.encode() == REQUEST
    assert Request.decode(REQUEST) == request


def test_request_extension_follows_header() -> None:
    """Bytes after the 122-byte header are cellvpn's extension, kept as they are."""
    data = REQUEST + hx("e1 e2 e3")
    request = Request.decode(data)
    assert request.extension == hx("e1 e2 e3")
    assert request.token == b"KEL"
    assert request.encode() == data


def test_request_full_token() -> None:
    """A 10-byte token fills offsets 48-57 with no NUL."""
    data = REQUEST[:48] + b"ABCDEFGHIJ" + REQUEST[58:]
    request = Request.decode(data)
    assert request.token == b"ABCDEFGHIJ"
    assert request.client_pkey_hash == b"\x22" * 32
    assert request.encode() == data


SUCCESS = (
    hx("efbeadde")  # @0  u32 usage_id = 0xdeadbeef
    + hx("0807060504030201")  # @4  u64 net_id = 0x0102030405060708
    + hx("0100000000000000")  # @12 u64 srv_uid = 1
)


def test_success_golden() -> None:
    """SUCCESS is exactly 20 bytes: usage_id, net_id, srv_uid."""
    assert len(SUCCESS) == service.SUCCESS_SIZE == 20
    success = Success(usage_id=0xDEADBEEF, net_id=0x0102030405060708, srv_uid=1)
    assert success.encode() == SUCCESS
    assert Success.decode(SUCCESS) == success


ERROR = (
    hx("0807060504030201")  # @0  u64 net_id = 0x0102030405060708
    + hx("0100000000000000")  # @8  u64 srv_uid = 1
    + hx("2a000000")  # @16 u32 usage_id = 42
    + hx("01060000")  # @20 u32 code = 0x601 NO_ORDER_HASH
)


def test_error_golden() -> None:
    """ERROR is exactly 24 bytes: net_id, srv_uid, usage_id, code."""
    assert len(ERROR) == service.ERROR_SIZE == 24
    error = Error(code=0x601, usage_id=42, net_id=0x0102030405060708, srv_uid=1)
    assert error.encode() == ERROR
    decoded = Error.decode(ERROR)
    assert decoded == error
    assert decoded.name == "NO_ORDER_HASH"


def test_error_name_of_unknown_code() -> None:
    """An error code outside the table is named by its hexadecimal value."""
    assert Error(code=0x777).name == "0x777"


def test_notify_stopped_golden() -> None:
    """NOTIFY_STOPPED is empty, or the 24-byte error body."""
    assert NotifyStopped().encode() == b""
    assert NotifyStopped.decode(b"") == NotifyStopped(None)
    error = Error(code=0x601, usage_id=42, net_id=0x0102030405060708, srv_uid=1)
    assert NotifyStopped(error).encode() == ERROR
    assert NotifyStopped.decode(ERROR) == NotifyStopped(error)


ERROR_TABLE = [
    ("UNDEFINED", 0x000),
    ("SERVICE_NOT_FOUND", 0x100),
    ("SERVICE_CH_NOT_FOUND", 0x101),
    ("SERVICE_IN_CLIENT_MODE", 0x102),
    ("NODE_ROLE_ERROR", 0x103),
    ("FREE_IS_NOT_ALLOWED", 0x104),
    ("REQUEST_INTERNAL_ERROR", 0x105),
    ("NETWORK_NOT_FOUND", 0x200),
    ("NO_LEDGER", 0x201),
    ("NETWORK_IS_OFFLINE", 0x202),
    ("CANT_ADD_USAGE", 0x300),
    ("TX_COND_NOT_FOUND", 0x400),
    ("TX_COND_NO_COND_OUT", 0x401),
    ("TX_COND_NOT_ENOUGH", 0x402),
    ("TX_COND_NOT_ACCEPT_TOKEN", 0x403),
    ("TX_COND_WRONG_SRV_UID", 0x404),
    ("TX_COND_NO_NEW_COND", 0x405),
    ("TX_COND_WRONG_SIZE", 0x406),
    ("TX_COND_BIG_SIZE", 0x407),
    ("NEW_TX_COND_NOT_ENOUGH", 0x408),
    ("TICKER_ERROR", 0x409),
    ("UNIT_TYPE_ERROR", 0x410),
    ("TX_CREATION_ERROR", 0x411),
    ("RECEIPT_CANT_FIND", 0x500),
    ("RECEIPT_NO_SIGN", 0x501),
    ("RECEIPT_WRONG_PKEY_HASH", 0x502),
    ("RECEIPT_BANNED_PKEY_HASH", 0x503),
    ("RECEIPT_IS_NOT_PRESENT", 0x504),
    ("RECEIPT_UNITS_ERROR", 0x505),
    ("RECEIPT_CREATING_ERROR", 0x506),
    ("RECEIPT_WRONG_VERSION", 0x507),
    ("PRICE_ERROR", 0x600),
    ("NO_ORDER_HASH", 0x601),
    ("NO_TX_HASH", 0x602),
    ("TOO_MANY_SESSIONS", 0x700),  # cellvpn's
    ("DEPOSIT_BYTES_CAP", 0x701),  # cellvpn's
    ("WRONG_HASH", 0xBAD),
    ("ALLOC_MEMORY_ERROR", 0xBADA55),
    ("UNKNOWN", 0xFFFFFFFF),
]


@pytest.mark.parametrize(("name", "value"), ERROR_TABLE)
def test_error_code_values(name: str, value: int) -> None:
    """Each error code has its hexadecimal value and goes into ERROR as a u32 at offset 20."""
    assert ErrorCode[name] == value
    body = bytes(20) + value.to_bytes(4, "little")
    error = Error.decode(body)
    assert error.code == value
    assert error.name == name
    assert Error(code=ErrorCode[name], srv_uid=0).encode() == body


def test_error_code_table_is_complete() -> None:
    """The codec's error table holds exactly the documented codes."""
    assert {(c.name, c.value) for c in ErrorCode} == set(ERROR_TABLE)


def test_error_code_special_values_bytes() -> None:
    """The special codes are written little-endian at offset 20."""
    head = bytes(20)
    assert Error.decode(head + hx("ad 0b 00 00")).code == ErrorCode.WRONG_HASH
    assert Error.decode(head + hx("55 da ba 00")).code == ErrorCode.ALLOC_MEMORY_ERROR
    assert Error.decode(head + hx("ff ff ff ff")).code == ErrorCode.UNKNOWN


# --- CHECK test packet (628-byte header) -------------------------------------------------------

HELLO_SHA3 = hx("3338be694f50c5f338814986cdf0686453a888b84f424d792af4b9202398f392")

CHECK_HEADER = (
    hx("04030201")  # @0   u32 usage_id = 0x01020304
    + hx("1817161514131211")  # @4   u64 net_id = 0x1112131415161718
    + hx("0100000000000000")  # @12  u64 srv_uid = 1
    + hx("feffffff")  # @20  i32 time_connect_ms = -2
    + hx("2827262524232221")  # @24  u64 recv_time1
    + hx("3837363534333231")  # @32  u64 recv_time2
    + hx("4847464544434241")  # @40  u64 send_time1
    + hx("5857565554535251")  # @48  u64 send_time2
    + (b"198.18.0.2" + bytes(246))  # @56  host_send[256] = "198.18.0.2", NUL padded
    + (b"203.0.113.7" + bytes(245))  # @312 host_recv[256] = "203.0.113.7", NUL padded
    + hx("ffffffff")  # @568 i32 err_code = -1
    + hx("0028000000000000")  # @572 u64 data_size_send = 10240
    + hx("0004000000000000")  # @580 u64 data_size_recv = 1024
    + hx("0500000000000000")  # @588 u64 data_size = 5
    + HELLO_SHA3  # @596 data_hash[32] = SHA3-256(b"hello")
)


def _golden_check() -> CheckPacket:
    return CheckPacket(
        usage_id=0x01020304,
        net_id=0x1112131415161718,
        srv_uid=1,
        time_connect_ms=-2,
        recv_time1=0x2122232425262728,
        recv_time2=0x3132333435363738,
        send_time1=0x4142434445464748,
        send_time2=0x5152535455565758,
        host_send=b"198.18.0.2",
        host_recv=b"203.0.113.7",
        err_code=-1,
        data_size_send=10240,
        data_size_recv=1024,
        data_hash=HELLO_SHA3,
        data=b"hello",
    )


def test_check_header_layout() -> None:
    """The CHECK header is 628 bytes with every field at its documented offset."""
    assert len(CHECK_HEADER) == service.TEST_HEADER_SIZE == 628
    offsets = {
        "usage_id": (0, "<I", 0x01020304),
        "net_id": (4, "<Q", 0x1112131415161718),
        "srv_uid": (12, "<Q", 1),
        "time_connect_ms": (20, "<i", -2),
        "recv_time1": (24, "<Q", 0x2122232425262728),
        "recv_time2": (32, "<Q", 0x3132333435363738),
        "send_time1": (40, "<Q", 0x4142434445464748),
        "send_time2": (48, "<Q", 0x5152535455565758),
        "err_code": (568, "<i", -1),
        "data_size_send": (572, "<Q", 10240),
        "data_size_recv": (580, "<Q", 1024),
        "data_size": (588, "<Q", 5),
    }
    for name, (off, fmt, value) in offsets.items():
        assert struct.unpack_from(fmt, CHECK_HEADER, off)[0] == value, name
    assert CHECK_HEADER[56:66] == b"198.18.0.2"
    assert CHECK_HEADER[312:323] == b"203.0.113.7"
    assert CHECK_HEADER[596:628] == HELLO_SHA3


def test_check_packet_golden() -> None:
    """CheckPacket writes the 628-byte header and the data, and reads them back."""
    expected = CHECK_HEADER + b"hello"
    packet = _golden_check()
    assert packet.encode() == expected
    assert CheckPacket.decode(expected) == packet


def test_check_packet_hash_is_sha3_256() -> None:
    """The data hash is SHA3-256 of the data; hash_ok compares it."""
    assert hashlib.sha3_256(b"hello").digest() == HELLO_SHA3
    assert CheckPacket.hash_of(b"hello") == HELLO_SHA3
    assert CheckPacket.hash_of(b"") == hx(
        "a7ffc6f8bf1ed76651c14756a061d662f580ff4de43b49fa82d80a4b80f8434a"
    )
    packet = CheckPacket.decode(CHECK_HEADER + b"hello")
    assert packet.hash_ok
    assert not CheckPacket.decode(CHECK_HEADER + b"hellO").hash_ok


# --- receipt ----------------------------------------------------------------------------------

RECEIPT_INFO = (
    hx("0100000000000000")  # @0  u64 srv_uid = 1
    + hx("0807060504030201")  # @8  u64 addition = 0x0102030405060708
    + hx("02000000")  # @16 u32 units_type = SEC
    + hx("02")  # @20 u8 version = 2
    + hx("000000")  # @21 pad[3]
    + hx("100e000000000000")  # @24 u64 units = 3600
    + hx("00" * 16 + "01" + "00" * 15)  # @32 uint256 value = 1 (high half 0, low half 1)
    + hx("aa" * 32)  # @64 prev hash
)


def _golden_info() -> ReceiptInfo:
    return ReceiptInfo(
        srv_uid=1,
        units_type=Unit.SEC,
        units=3600,
        value=1,
        prev_hash=b"\xaa" * 32,
        addition=0x0102030405060708,
    )


def test_receipt_info_golden() -> None:
    """receipt_info is 96 bytes with every field at its offset."""
    assert len(RECEIPT_INFO) == receipt.INFO_SIZE == 96
    info = _golden_info()
    assert info.encode() == RECEIPT_INFO
    decoded = ReceiptInfo.decode(RECEIPT_INFO)
    assert decoded == info
    assert decoded.version == receipt.RECEIPT_VERSION == 2


def test_units_values() -> None:
    """Units: SEC 0x02, B 0x11 (PCS 0x22, UNDEFINED 0)."""
    assert Unit.SEC.value == 0x02
    assert Unit.B.value == 0x11
    assert Unit.PCS.value == 0x22
    assert Unit.UNDEFINED.value == 0


def test_receipt_info_bytes_unit() -> None:
    """units_type B (0x11) lands at offset 16."""
    data = RECEIPT_INFO[:16] + hx("11000000") + RECEIPT_INFO[20:]
    info = ReceiptInfo.decode(data)
    assert info.units_type == Unit.B
    assert ReceiptInfo(1, Unit.B, 3600, 1, b"\xaa" * 32, 0x0102030405060708).encode() == data


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, hx("00" * 32)),
        (1, hx("00" * 16) + hx("01") + hx("00" * 15)),
        # high half = 1 (byte 0), low half = 5 (byte 16)
        (2**128 + 5, hx("01") + hx("00" * 15) + hx("05") + hx("00" * 15)),
        (0x0102, hx("00" * 16) + hx("02 01") + hx("00" * 14)),
        (2**255, hx("00" * 15) + hx("80") + hx("00" * 16)),
        (2**256 - 1, hx("ff" * 32)),
    ],
)
def test_uint256_layout(value: int, expected: bytes) -> None:
    """uint256: bytes 0-15 the high 128 bits, bytes 16-31 the low, each little-endian."""
    assert encode_uint256(value) == expected
    assert decode_uint256(expected) == value


def test_receipt_info_value_above_128_bits() -> None:
    """A value of 2**128 + 5 in receipt_info has 01 at offset 32 and 05 at offset 48."""
    info = ReceiptInfo(1, Unit.B, 1, 2**128 + 5)
    encoded = info.encode()
    assert encoded[32:64] == hx("01") + hx("00" * 15) + hx("05") + hx("00" * 15)
    assert ReceiptInfo.decode(encoded).value == 2**128 + 5


PROVIDER_SIG = (
    hx("250e0000")  # u32 sig type = 0x0e25 (Ed25519)
    + hx("00")  # u8 hash_type
    + hx("00")  # pad
    + hx("40000000")  # u32 sign_size = 64
    + hx("20000000")  # u32 pkey_size = 32
    + hx("b1" * 32)  # public key
    + hx("b2" * 64)  # signature
)
CLIENT_SIG = (
    hx("250e0000")  # u32 sig type = 0x0e25 (Ed25519)
    + hx("01")  # u8 hash_type = 1
    + hx("00")  # pad
    + hx("40000000")  # u32 sign_size = 64
    + hx("20000000")  # u32 pkey_size = 32
    + hx("c1" * 32)  # public key
    + hx("c2" * 64)  # signature
)


def test_receipt_constants() -> None:
    """Receipt type 0x71; header 113 bytes; signature header 14 bytes."""
    assert receipt.RECEIPT_TYPE == 0x71
    assert receipt.HEAD_SIZE == 113
    assert receipt.SIGN_HEADER_SIZE == 14
    assert receipt.SIG_TYPE_ED25519 == 0x0E25


def test_receipt_unsigned_golden() -> None:
    """An unsigned receipt is the 113-byte header: type, info, size, exts_size."""
    expected = (
        hx("71")  # @0   type
        + RECEIPT_INFO  # @1   receipt_info
        + hx("7100000000000000")  # @97  u64 size = 113
        + hx("0000000000000000")  # @105 u64 exts_size = 0
    )
    rec = Receipt(_golden_info())
    assert rec.encode() == expected
    assert Receipt.decode(expected) == rec


def test_receipt_signed_golden() -> None:
    """A receipt with exts and provider and client signatures, size counting every byte."""
    expected = (
        hx("71")  # @0   type
        + RECEIPT_INFO  # @1   receipt_info
        + hx("5001000000000000")  # @97  u64 size = 113 + 3 + 110 + 110 = 336
        + hx("0300000000000000")  # @105 u64 exts_size = 3
        + hx("e1 e2 e3")  # @113 exts
        + PROVIDER_SIG  # @116 signature 0
        + CLIENT_SIG  # @226 signature 1
    )
    assert len(expected) == 336
    rec = Receipt(
        _golden_info(),
        (
            Signature(b"\xb1" * 32, b"\xb2" * 64),
            Signature(b"\xc1" * 32, b"\xc2" * 64, hash_type=1),
        ),
        exts=hx("e1 e2 e3"),
    )
    assert rec.encode() == expected
    assert Receipt.decode(expected) == rec
    assert rec.info_bytes == RECEIPT_INFO
    assert rec.hash == hashlib.sha3_256(expected).digest()


def test_receipt_with_signature_appends() -> None:
    """with_signature adds the next signature after the existing ones."""
    rec = Receipt(_golden_info()).with_signature(Signature(b"\xb1" * 32, b"\xb2" * 64))
    rec = rec.with_signature(Signature(b"\xc1" * 32, b"\xc2" * 64, hash_type=1))
    expected = (
        hx("71") + RECEIPT_INFO + hx("4d01000000000000") + hx("0000000000000000")  # size 333
    )
    assert rec.encode() == expected + PROVIDER_SIG + CLIENT_SIG


# --- session setup TLVs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "value"),
    [
        (Tag.VERSION, 1),
        (Tag.CHANNELS, 2),
        (Tag.CAPS, 3),
        (Tag.REQUIRED_CAPS, 4),
        (Tag.SESSION_ID, 5),
        (Tag.REASON, 6),
        (Tag.CLOSE_CODE, 7),
        (Tag.MAX_FRAME, 8),
        (Tag.RESUME_TOKEN, 9),
        (Tag.NODE_ADDR, 10),
        (Tag.ORDER, 11),
    ],
)
def test_setup_tag_values(tag: Tag, value: int) -> None:
    """Each setup item tag has its documented value."""
    assert tag == value


def test_close_code_values() -> None:
    """The close codes are numbered 0-9 in their documented order."""
    assert [(c.name, c.value) for c in CloseCode] == [
        ("NORMAL", 0),
        ("VERSION_MISMATCH", 1),
        ("CAPABILITY_MISMATCH", 2),
        ("CHANNEL_UNSUPPORTED", 3),
        ("PROTOCOL_ERROR", 4),
        ("IDLE_TIMEOUT", 5),
        ("SHUTDOWN", 6),
        ("TAKEN_OVER", 7),
        ("SERVICE_STOPPED", 8),
        ("REFUSED", 9),
    ]
    assert setup.PROTOCOL_VERSION == 1


def test_items_golden() -> None:
    """A setup item is u8 tag, u16 length (little-endian), value."""
    expected = hx("01 0200 0100") + hx("09 0001") + hx("5a" * 256) + hx("7f 0000")
    items = [(1, hx("0100")), (9, b"\x5a" * 256), (0x7F, b"")]
    assert encode_items(items) == expected
    assert decode_items(expected) == dict(items)


def test_hello_minimal_golden() -> None:
    """The default HELLO carries VERSION, CHANNELS "RS" and an empty CAPS."""
    expected = (
        hx("01 0200 0100")  # VERSION, 2 bytes: 1
        + hx("02 0200 5253")  # CHANNELS, 2 bytes: "RS"
        + hx("03 0000")  # CAPS, empty
    )
    assert Hello().encode() == expected
    assert Hello.decode(expected) == Hello()


def test_hello_full_golden() -> None:
    """HELLO with every optional item, caps sorted and comma separated."""
    expected = (
        hx("01 0200 0100")  # VERSION = 1
        + hx("02 0200 5253")  # CHANNELS = "RS"
        + hx("03 0500 67736f2c78")  # CAPS = "gso,x"
        + hx("04 0300 67736f")  # REQUIRED_CAPS = "gso"
        + hx("08 0400 00000400")  # MAX_FRAME = 0x40000
        + hx("09 0200 0102")  # RESUME_TOKEN
        + hx("0a 0800 0807060504030201")  # NODE_ADDR = 0x0102030405060708
    )
    hello = Hello(
        version=1,
        channels="RS",
        caps=frozenset({"x", "gso"}),
        required_caps=frozenset({"gso"}),
        max_frame=0x40000,
        resume_token=hx("0102"),
        node_addr=0x0102030405060708,
    )
    assert hello.encode() == expected
    assert Hello.decode(expected) == hello


def test_hello_keeps_unknown_items() -> None:
    """HELLO keeps items with unknown tags aside; their order does not matter."""
    data = hx("63 0100 ff") + hx("02 0100 52") + hx("01 0200 0200")
    hello = Hello.decode(data)
    assert hello.version == 2
    assert hello.channels == "R"
    assert hello.caps == frozenset()
    assert dict(hello.unknown) == {0x63: hx("ff")}


def test_welcome_golden() -> None:
    """WELCOME: VERSION, SESSION_ID, CHANNELS, CAPS, then the optional items."""
    expected = (
        hx("01 0200 0100")  # VERSION = 1
        + hx("05 0400 bebafeca")  # SESSION_ID = 0xcafebabe
        + hx("02 0200 5253")  # CHANNELS = "RS"
        + hx("03 0300 67736f")  # CAPS = "gso"
        + hx("08 0400 00000100")  # MAX_FRAME = 0x10000
        + hx("09 0100 07")  # RESUME_TOKEN
        + hx("0a 0800 0100000000000000")  # NODE_ADDR = 1
        + hx("0b 0300 4f5244")  # ORDER = "ORD"
    )
    welcome = Welcome(
        session_id=0xCAFEBABE,
        caps=frozenset({"gso"}),
        max_frame=0x10000,
        resume_token=hx("07"),
        node_addr=1,
        order=b"ORD",
    )
    assert welcome.encode() == expected
    assert Welcome.decode(expected) == welcome


def test_close_golden() -> None:
    """CLOSE: CLOSE_CODE u16, then REASON in UTF-8."""
    expected = hx("07 0200 0100") + hx("06 0500 6279c3a921")  # code 1, reason "byé!"
    close = Close(CloseCode.VERSION_MISMATCH, "byé!")
    assert close.encode() == expected
    decoded = Close.decode(expected)
    assert decoded == close
    assert decoded.code_name == "VERSION_MISMATCH"


def test_close_defaults() -> None:
    """An empty CLOSE reads as NORMAL with no reason; an unknown code is named by number."""
    assert Close.decode(b"") == Close(CloseCode.NORMAL, "")
    assert Close(code=77).code_name == "77"


def test_close_reason_is_capped() -> None:
    """CLOSE sends at most 1000 characters of reason."""
    encoded = Close(reason="x" * 1500).encode()
    assert encoded == hx("07 0200 0000") + hx("06 e803") + b"x" * 1000


IP6 = ipaddress.IPv6Address
NET6 = ipaddress.IPv6Network

ADDR_REPLY_DUAL = (
    ADDR_REPLY_FULL
    + hx("04 11 20010db8000100000000000000000002 40")  # @35 ADDR6: 2001:db8:1::2, /64
    + hx("05 10 20010db8000100000000000000000001")  # @54 GATEWAY6: 2001:db8:1::1
    + hx("06 10 20010db8000100000000000000000035")  # @72 DNS6: 2001:db8:1::35
    + hx("07 11 20010db8000200000000000000000000 30")  # @90 ROUTE6: 2001:db8:2::/48
)


def test_addr_reply_ipv6_golden() -> None:
    """With the ipv6 capability: ADDR6, GATEWAY6, DNS6 and ROUTE6 follow the IPv4 options."""
    reply = AddrReply(
        client=IP("198.18.5.2"),
        gateway=IP("198.18.5.1"),
        netmask=IP("255.255.255.0"),
        mtu=1400,
        dns=(IP("198.18.5.1"), IP("198.18.5.53")),
        routes=(NET("198.19.0.0/16"),),
        client6=ipaddress.IPv6Interface("2001:db8:1::2/64"),
        gateway6=IP6("2001:db8:1::1"),
        dns6=(IP6("2001:db8:1::35"),),
        routes6=(NET6("2001:db8:2::/48"),),
    )
    assert reply.encode() == ADDR_REPLY_DUAL
    assert AddrReply.decode(ADDR_REPLY_DUAL) == reply


def test_addr_reply_ipv6_option_tags() -> None:
    """The IPv6 option tags are ADDR6 4, GATEWAY6 5, DNS6 6, ROUTE6 7."""
    assert [vpn.AddrOption.ADDR6, vpn.AddrOption.GATEWAY6] == [4, 5]
    assert [vpn.AddrOption.DNS6, vpn.AddrOption.ROUTE6] == [6, 7]


def test_addr_reply_without_ipv6_is_unchanged() -> None:
    """No IPv6 fields: exactly the bytes an IPv4-only peer always got."""
    reply = AddrReply(
        IP("198.18.5.2"),
        IP("198.18.5.1"),
        IP("255.255.255.0"),
        1400,
        (IP("198.18.5.1"), IP("198.18.5.53")),
        (NET("198.19.0.0/16"),),
    )
    assert reply.encode() == ADDR_REPLY_FULL


@pytest.mark.parametrize(
    "options",
    [
        hx("04 10") + bytes(16),  # ADDR6 without its prefix length
        hx("04 11") + bytes(16) + hx("81"),  # prefix length 129
        hx("05 04 01020304"),  # GATEWAY6 of 4 bytes
        hx("06 04 01020304"),  # DNS6 of 4 bytes
        hx("07 11") + hx("20010db8000200000000000000000001") + hx("30"),  # host bits set
        hx("04 11") + bytes(15) + hx("02 40"),  # an address without a gateway
        hx("05 10") + bytes(15) + hx("01"),  # a gateway without an address
    ],
)
def test_addr_reply_ipv6_options_rejected(options: bytes) -> None:
    """A malformed IPv6 option, or half of the address pair, is a decode error."""
    with pytest.raises(DecodeError):
        AddrReply.decode(hx("c6120502 c6120501 ffffff00") + options)
