"""The 'S' channel's VPN packet (``dap_stream_ch_vpn_pkt_t``): a 20-byte header, then data.

Layout (little-endian, packed)::

    off size field
      0    4 i32 sock_id    the sender's TUN fd in the original; the L4 proxy's socket id
      4    4 u32 op_code    OpCode
      8    4 u32 usage_id   set by the server from the 'R' negotiation
     12    8 union, read according to op_code:
               data ops:   u32 data_size @12, 4 pad bytes
               PROBLEM:    u32 code @12, 4 pad bytes
               CONNECT(ED): u32 addr_size @12, u16 port @16 (host order), 2 pad bytes
               raw:        u64 @12
     20    n data

The receiver dispatches on ``op_code`` only, never on the channel packet type.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, IntEnum

from cellvpn.wire.errors import DecodeError

HEADER = struct.Struct("<iIIQ")
HEADER_SIZE = HEADER.size  # 20
#: the header of a packet-carrying VPN packet (VPN_SEND, VPN_RECV and their GSO forms):
#: error (0), op, usage id, data size, and 4 bytes the original leaves as padding
DATA_HEADER = struct.Struct("<iIIIxxxx")
_DATA_HEADER = DATA_HEADER
_CONNECT_HEADER = struct.Struct("<iIIIHxx")

#: Channel packet types used on 'S'. The receiver ignores them; senders use DATA (and PONG
#: goes out with type 'd', as in the original).
PKT_TYPE_CLIENT = 0x01
PKT_TYPE_DATA = 0x02
PKT_TYPE_PONG = 0x64


class OpCode(IntEnum):
    """Every op code of the original, plus cellvpn's documented extensions (0xc8 and up)."""

    CONNECTED = 0xA9
    CONNECT = 0xAA
    DISCONNECT = 0xAB
    SEND = 0xAC
    RECV = 0xAD
    PROBLEM = 0xAE
    VPN_METADATA = 0xB0
    VPN_RESERVED = 0xB1
    VPN_ADDR_REQUEST = 0xB2
    VPN_ADDR_REPLY = 0xB3
    VPN_SEND = 0xBC
    VPN_RECV = 0xBD
    PING = 0xC0
    PONG = 0xC1
    VPN_SEND_GSO = 0xC8
    VPN_RECV_GSO = 0xC9


class ProblemCode(IntEnum):
    """PROBLEM codes: 1-4 are the original's, 5 and up cellvpn's."""

    NO_FREE_ADDR = 1
    TUNNEL_DOWN = 2
    PACKET_LOST = 3
    ALREADY_ASSIGNED_ADDR = 4
    PROXY_DENIED = 5
    PROXY_FAILED = 6


class Layout(Enum):
    """How the 8-byte union at offset 12 is read."""

    DATA = "data_size"
    PROBLEM = "code"
    CONNECT = "addr_size+port"
    EMPTY = "header only"
    RAW = "raw u64"


LAYOUTS: dict[int, Layout] = {
    OpCode.CONNECTED: Layout.CONNECT,
    OpCode.CONNECT: Layout.CONNECT,
    OpCode.DISCONNECT: Layout.EMPTY,
    OpCode.SEND: Layout.DATA,
    OpCode.RECV: Layout.DATA,
    OpCode.PROBLEM: Layout.PROBLEM,
    OpCode.VPN_METADATA: Layout.RAW,
    OpCode.VPN_RESERVED: Layout.RAW,
    OpCode.VPN_ADDR_REQUEST: Layout.DATA,
    OpCode.VPN_ADDR_REPLY: Layout.DATA,
    OpCode.VPN_SEND: Layout.DATA,
    OpCode.VPN_RECV: Layout.DATA,
    OpCode.PING: Layout.DATA,
    OpCode.PONG: Layout.DATA,
    OpCode.VPN_SEND_GSO: Layout.DATA,
    OpCode.VPN_RECV_GSO: Layout.DATA,
}


@dataclass(frozen=True, slots=True)
class VpnPacket:
    """A decoded 'S' packet. Only the union members of its op code's layout are meaningful."""

    op_code: int
    data: bytes = b""
    sock_id: int = 0
    usage_id: int = 0
    code: int = 0
    port: int = 0
    raw: int = 0

    def encode(self) -> bytes:
        layout = LAYOUTS.get(self.op_code)
        if layout is None:
            raise ValueError(f"unknown op code 0x{self.op_code:02x}")
        if layout is Layout.DATA:
            return _DATA_HEADER.pack(self.sock_id, self.op_code, self.usage_id, len(self.data)) + (
                self.data
            )
        if layout is Layout.PROBLEM:
            return _DATA_HEADER.pack(self.sock_id, self.op_code, self.usage_id, self.code)
        if layout is Layout.CONNECT:
            head = _CONNECT_HEADER.pack(
                self.sock_id, self.op_code, self.usage_id, len(self.data), self.port
            )
            return head + self.data
        if layout is Layout.EMPTY:
            return HEADER.pack(self.sock_id, self.op_code, self.usage_id, 0)
        return HEADER.pack(self.sock_id, self.op_code, self.usage_id, self.raw) + self.data

    @classmethod
    def decode(cls, data: bytes | memoryview) -> VpnPacket:
        if len(data) < HEADER_SIZE:
            raise DecodeError(f"VPN packet needs {HEADER_SIZE} header bytes, got {len(data)}")
        sock_id, op, usage, raw = HEADER.unpack_from(data)
        layout = LAYOUTS.get(op)
        if layout is None:
            raise DecodeError(f"unknown VPN op code 0x{op:02x}")
        payload = bytes(data[HEADER_SIZE:])
        low = raw & 0xFFFFFFFF
        if layout is Layout.DATA:
            if low != len(payload):
                raise DecodeError(
                    f"{OpCode(op).name} says {low} data bytes, {len(payload)} are present"
                )
            return cls(op, payload, sock_id, usage)
        if layout is Layout.CONNECT:
            if low != len(payload):
                raise DecodeError(
                    f"{OpCode(op).name} says an address of {low} bytes, {len(payload)} are present"
                )
            return cls(op, payload, sock_id, usage, port=(raw >> 32) & 0xFFFF)
        if payload and layout in (Layout.PROBLEM, Layout.EMPTY):
            raise DecodeError(f"{OpCode(op).name} carries no data, got {len(payload)} bytes")
        if layout is Layout.PROBLEM:
            return cls(op, b"", sock_id, usage, code=low)
        if layout is Layout.EMPTY:
            return cls(op, b"", sock_id, usage)
        return cls(op, payload, sock_id, usage, raw=raw)


def peek_op(data: bytes | memoryview) -> int:
    """The op code of an encoded packet without decoding it (the hot path dispatches on it)."""
    if len(data) < HEADER_SIZE:
        raise DecodeError(f"VPN packet needs {HEADER_SIZE} header bytes, got {len(data)}")
    op: int = _DATA_HEADER.unpack_from(data)[1]
    return op


# --- ADDR_REPLY ------------------------------------------------------------------------------
#
# data = client_addr[4] || gateway_addr[4] || netmask[4] || options
# The first 8 bytes are the original's; the netmask is the third address the original node
# client already reads. Options are TLVs {u8 tag, u8 length, value}; a reader skips tags it
# does not know. Tags 4-7 (IPv6) are sent only once the ``ipv6`` capability is agreed, so an
# IPv4-only peer gets the same bytes as before.


class AddrOption(IntEnum):
    MTU = 1  # u16, network order
    DNS = 2  # one IPv4 address per option, network order
    ROUTE = 3  # IPv4 prefix: 4-byte network + 1-byte prefix length
    ADDR6 = 4  # the client's IPv6 address (16 bytes) + the prefix length it is leased from
    GATEWAY6 = 5  # the server's IPv6 address in that prefix (16 bytes)
    DNS6 = 6  # one IPv6 DNS server per option (16 bytes)
    ROUTE6 = 7  # IPv6 prefix: 16-byte network + 1-byte prefix length


@dataclass(frozen=True, slots=True)
class AddrReply:
    client: ipaddress.IPv4Address
    gateway: ipaddress.IPv4Address
    netmask: ipaddress.IPv4Address | None = None
    mtu: int | None = None
    dns: tuple[ipaddress.IPv4Address, ...] = ()
    routes: tuple[ipaddress.IPv4Network, ...] = ()
    unknown: Mapping[int, bytes] = field(default_factory=dict)
    #: the client's IPv6 address with the prefix length of the server's IPv6 network
    client6: ipaddress.IPv6Interface | None = None
    gateway6: ipaddress.IPv6Address | None = None
    dns6: tuple[ipaddress.IPv6Address, ...] = ()
    routes6: tuple[ipaddress.IPv6Network, ...] = ()

    @property
    def has_options(self) -> bool:
        return bool(
            self.mtu is not None
            or self.dns
            or self.routes
            or self.client6
            or self.gateway6
            or self.dns6
            or self.routes6
        )

    def encode(self) -> bytes:
        out = bytearray(self.client.packed + self.gateway.packed)
        if self.netmask is None:
            if self.has_options:
                raise ValueError("ADDR_REPLY options need the netmask before them")
            return bytes(out)
        if (self.client6 is None) != (self.gateway6 is None):
            raise ValueError("ADDR_REPLY carries an IPv6 address and its gateway, or neither")
        out += self.netmask.packed
        if self.mtu is not None:
            out += bytes((AddrOption.MTU, 2)) + self.mtu.to_bytes(2, "big")
        for server in self.dns:
            out += bytes((AddrOption.DNS, 4)) + server.packed
        for route in self.routes:
            out += bytes((AddrOption.ROUTE, 5)) + route.network_address.packed
            out.append(route.prefixlen)
        if self.client6 is not None and self.gateway6 is not None:
            out += bytes((AddrOption.ADDR6, 17)) + self.client6.ip.packed
            out.append(self.client6.network.prefixlen)
            out += bytes((AddrOption.GATEWAY6, 16)) + self.gateway6.packed
        for server6 in self.dns6:
            out += bytes((AddrOption.DNS6, 16)) + server6.packed
        for route6 in self.routes6:
            out += bytes((AddrOption.ROUTE6, 17)) + route6.network_address.packed
            out.append(route6.prefixlen)
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> AddrReply:
        data = bytes(data)
        if len(data) < 8:
            raise DecodeError(f"ADDR_REPLY needs at least 8 bytes, got {len(data)}")
        client = ipaddress.IPv4Address(data[0:4])
        gateway = ipaddress.IPv4Address(data[4:8])
        if len(data) == 8:
            return cls(client, gateway)
        if len(data) < 12:
            raise DecodeError(f"ADDR_REPLY netmask is cut short ({len(data)} bytes)")
        netmask = ipaddress.IPv4Address(data[8:12])
        mtu: int | None = None
        dns: list[ipaddress.IPv4Address] = []
        routes: list[ipaddress.IPv4Network] = []
        unknown: dict[int, bytes] = {}
        client6: ipaddress.IPv6Interface | None = None
        gateway6: ipaddress.IPv6Address | None = None
        dns6: list[ipaddress.IPv6Address] = []
        routes6: list[ipaddress.IPv6Network] = []
        pos = 12
        while pos < len(data):
            if len(data) - pos < 2:
                raise DecodeError("ADDR_REPLY option header is cut short")
            tag, length = data[pos], data[pos + 1]
            value = data[pos + 2 : pos + 2 + length]
            if len(value) != length:
                raise DecodeError(f"ADDR_REPLY option {tag} says {length} bytes, has {len(value)}")
            pos += 2 + length
            if tag == AddrOption.MTU:
                if length != 2:
                    raise DecodeError(f"ADDR_REPLY MTU option has {length} bytes, expected 2")
                mtu = int.from_bytes(value, "big")
            elif tag == AddrOption.DNS:
                if length != 4:
                    raise DecodeError(f"ADDR_REPLY DNS option has {length} bytes, expected 4")
                dns.append(ipaddress.IPv4Address(value))
            elif tag == AddrOption.ROUTE:
                if length != 5 or value[4] > 32:
                    raise DecodeError("ADDR_REPLY route option is not a 4-byte network + length")
                try:
                    routes.append(ipaddress.IPv4Network((value[:4], value[4])))
                except ValueError as e:
                    raise DecodeError(f"ADDR_REPLY route option: {e}") from None
            elif tag == AddrOption.ADDR6:
                if length != 17 or value[16] > 128:
                    raise DecodeError("ADDR_REPLY IPv6 address option is not 16 bytes + length")
                if client6 is not None:
                    raise DecodeError("ADDR_REPLY carries two IPv6 addresses")
                client6 = ipaddress.IPv6Interface((value[:16], value[16]))
            elif tag == AddrOption.GATEWAY6:
                if length != 16:
                    raise DecodeError(f"ADDR_REPLY IPv6 gateway option has {length} bytes")
                if gateway6 is not None:
                    raise DecodeError("ADDR_REPLY carries two IPv6 gateways")
                gateway6 = ipaddress.IPv6Address(value)
            elif tag == AddrOption.DNS6:
                if length != 16:
                    raise DecodeError(f"ADDR_REPLY IPv6 DNS option has {length} bytes")
                dns6.append(ipaddress.IPv6Address(value))
            elif tag == AddrOption.ROUTE6:
                if length != 17 or value[16] > 128:
                    raise DecodeError("ADDR_REPLY IPv6 route option is not 16 bytes + length")
                try:
                    routes6.append(ipaddress.IPv6Network((value[:16], value[16])))
                except ValueError as e:
                    raise DecodeError(f"ADDR_REPLY IPv6 route option: {e}") from None
            else:
                unknown[tag] = value
        if (client6 is None) != (gateway6 is None):
            raise DecodeError("ADDR_REPLY carries an IPv6 address without its gateway or back")
        return cls(
            client,
            gateway,
            netmask,
            mtu,
            tuple(dns),
            tuple(routes),
            unknown,
            client6,
            gateway6,
            tuple(dns6),
            tuple(routes6),
        )
