"""The 'R' channel's service and billing packets.

Layouts (little-endian, packed), from ``dap_stream_ch_chain_net_srv_pkt.h``:

REQUEST (0x01), 122-byte header, then cellvpn's extension bytes::

      0  8 u64 net_id
      8 32     tx_cond            the deposit id in cellvpn
     40  8 u64 srv_uid            1 = VPN
     48 10     token              ticker, NUL padded
     58 32     client_pkey_hash
     90 32     order_hash
    122  n     extension          (cellvpn: key and signature, see docs/protocol.md)

SUCCESS (0xf0), exactly 20 bytes: ``u32 usage_id, u64 net_id, u64 srv_uid``.
ERROR (0xff), exactly 24 bytes: ``u64 net_id, u64 srv_uid, u32 usage_id, u32 code``.
NOTIFY_STOPPED (0x20): empty, or the 24-byte error body.
CHECK_REQUEST (0x50) / CHECK_RESPONSE (0x51): the 628-byte test header, then ``data_size`` bytes.
SIGN_REQUEST (0x10) / SIGN_RESPONSE (0x11): a receipt (:mod:`cellvpn.wire.receipt`).
ORDERS_REQUEST (0x60, cellvpn, C->S): empty. ORDERS (0x61, cellvpn, S->C): the provider's
available offers, ``u16 count`` then per offer ``u16 length`` and a signed order (at most
:data:`MAX_ORDERS` offers and :data:`MAX_ORDERS_BYTES` bytes in all).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum

from cellvpn.wire.errors import DecodeError

SRV_UID_VPN = 0x0000000000000001


class PacketType(IntEnum):
    REQUEST = 0x01
    SIGN_REQUEST = 0x10
    SIGN_RESPONSE = 0x11
    NOTIFY_STOPPED = 0x20
    DATA = 0x30
    RESPONSE_DATA = 0x31
    NEW_TX_COND_REQUEST = 0x40
    NEW_TX_COND_RESPONSE = 0x41
    DEPOSIT_CREATE = 0x42  # cellvpn: C->S, a signed deposit request
    DEPOSIT_CREATED = 0x43  # cellvpn: S->C, the new deposit's 32-byte id
    CHECK_REQUEST = 0x50
    CHECK_RESPONSE = 0x51
    ORDERS_REQUEST = 0x60  # cellvpn: C->S, empty: the provider's current offers, please
    ORDERS = 0x61  # cellvpn: S->C, the offers (OrderList)
    SUCCESS = 0xF0
    ERROR = 0xFF


class ErrorCode(IntEnum):
    """The original's error table; every value is hexadecimal."""

    UNDEFINED = 0x00000000
    SERVICE_NOT_FOUND = 0x00000100
    SERVICE_CH_NOT_FOUND = 0x00000101
    SERVICE_IN_CLIENT_MODE = 0x00000102
    NODE_ROLE_ERROR = 0x00000103
    FREE_IS_NOT_ALLOWED = 0x00000104
    REQUEST_INTERNAL_ERROR = 0x00000105
    NETWORK_NOT_FOUND = 0x00000200
    NO_LEDGER = 0x00000201
    NETWORK_IS_OFFLINE = 0x00000202
    CANT_ADD_USAGE = 0x00000300
    TX_COND_NOT_FOUND = 0x00000400
    TX_COND_NO_COND_OUT = 0x00000401
    TX_COND_NOT_ENOUGH = 0x00000402
    TX_COND_NOT_ACCEPT_TOKEN = 0x00000403
    TX_COND_WRONG_SRV_UID = 0x00000404
    TX_COND_NO_NEW_COND = 0x00000405
    TX_COND_WRONG_SIZE = 0x00000406
    TX_COND_BIG_SIZE = 0x00000407
    NEW_TX_COND_NOT_ENOUGH = 0x00000408
    TICKER_ERROR = 0x00000409
    UNIT_TYPE_ERROR = 0x00000410
    TX_CREATION_ERROR = 0x00000411
    RECEIPT_CANT_FIND = 0x00000500
    RECEIPT_NO_SIGN = 0x00000501
    RECEIPT_WRONG_PKEY_HASH = 0x00000502
    RECEIPT_BANNED_PKEY_HASH = 0x00000503
    RECEIPT_IS_NOT_PRESENT = 0x00000504
    RECEIPT_UNITS_ERROR = 0x00000505
    RECEIPT_CREATING_ERROR = 0x00000506
    RECEIPT_WRONG_VERSION = 0x00000507
    PRICE_ERROR = 0x00000600
    NO_ORDER_HASH = 0x00000601
    NO_TX_HASH = 0x00000602
    #: cellvpn's: the client's key has ``[srv_vpn] sessions_per_key`` sessions already
    TOO_MANY_SESSIONS = 0x00000700
    #: cellvpn's: the deposit carried ``[billing] deposit_bytes`` bytes, its cap
    DEPOSIT_BYTES_CAP = 0x00000701
    WRONG_HASH = 0x00000BAD
    ALLOC_MEMORY_ERROR = 0x00BADA55
    UNKNOWN = 0xFFFFFFFF


#: ERRORs that mean "try again later" (the ledger or network away, a deposit still marked by a
#: session that is ending, an internal error), not "never".
TRANSIENT_ERRORS = frozenset(
    {
        ErrorCode.NO_LEDGER,
        ErrorCode.NETWORK_IS_OFFLINE,
        ErrorCode.CANT_ADD_USAGE,
        ErrorCode.REQUEST_INTERNAL_ERROR,
        ErrorCode.TOO_MANY_SESSIONS,  # another device of the key may leave
    }
)


def _exact(name: str, data: bytes | memoryview, size: int) -> None:
    if len(data) != size:
        raise DecodeError(f"{name} must be exactly {size} bytes, got {len(data)}")


_REQUEST = struct.Struct("<Q32sQ10s32s32s")
REQUEST_SIZE = _REQUEST.size  # 122


@dataclass(frozen=True, slots=True)
class Request:
    net_id: int = 0
    tx_cond: bytes = bytes(32)
    srv_uid: int = SRV_UID_VPN
    token: bytes = b""
    client_pkey_hash: bytes = bytes(32)
    order_hash: bytes = bytes(32)
    extension: bytes = b""

    def encode(self) -> bytes:
        for name in ("tx_cond", "client_pkey_hash", "order_hash"):
            if len(getattr(self, name)) != 32:
                raise ValueError(f"REQUEST {name} must be 32 bytes")
        if len(self.token) > 10:
            raise ValueError("REQUEST token must be at most 10 bytes")
        head = _REQUEST.pack(
            self.net_id,
            self.tx_cond,
            self.srv_uid,
            self.token,
            self.client_pkey_hash,
            self.order_hash,
        )
        return head + self.extension

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Request:
        if len(data) < REQUEST_SIZE:
            raise DecodeError(f"REQUEST needs {REQUEST_SIZE} bytes, got {len(data)}")
        net_id, tx_cond, srv_uid, token, pkey_hash, order_hash = _REQUEST.unpack_from(data)
        return cls(
            net_id,
            tx_cond,
            srv_uid,
            token.rstrip(b"\0"),
            pkey_hash,
            order_hash,
            bytes(data[REQUEST_SIZE:]),
        )


_SUCCESS = struct.Struct("<IQQ")
SUCCESS_SIZE = _SUCCESS.size  # 20


@dataclass(frozen=True, slots=True)
class Success:
    usage_id: int
    net_id: int = 0
    srv_uid: int = SRV_UID_VPN

    def encode(self) -> bytes:
        return _SUCCESS.pack(self.usage_id, self.net_id, self.srv_uid)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Success:
        _exact("SUCCESS", data, SUCCESS_SIZE)
        return cls(*_SUCCESS.unpack(data))


_ERROR = struct.Struct("<QQII")
ERROR_SIZE = _ERROR.size  # 24


@dataclass(frozen=True, slots=True)
class Error:
    code: int
    usage_id: int = 0
    net_id: int = 0
    srv_uid: int = SRV_UID_VPN

    def encode(self) -> bytes:
        return _ERROR.pack(self.net_id, self.srv_uid, self.usage_id, self.code)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Error:
        _exact("ERROR", data, ERROR_SIZE)
        net_id, srv_uid, usage_id, code = _ERROR.unpack(data)
        return cls(code, usage_id, net_id, srv_uid)

    @property
    def name(self) -> str:
        try:
            return ErrorCode(self.code).name
        except ValueError:
            return f"0x{self.code:x}"


@dataclass(frozen=True, slots=True)
class NotifyStopped:
    error: Error | None = None

    def encode(self) -> bytes:
        return b"" if self.error is None else self.error.encode()

    @classmethod
    def decode(cls, data: bytes | memoryview) -> NotifyStopped:
        if len(data) == 0:
            return cls()
        if len(data) != ERROR_SIZE:
            raise DecodeError(f"NOTIFY_STOPPED is empty or {ERROR_SIZE} bytes, got {len(data)}")
        return cls(Error.decode(data))


_TEST = struct.Struct("<IQQiQQQQ256s256siQQQ32s")
TEST_HEADER_SIZE = _TEST.size  # 628


@dataclass(frozen=True, slots=True)
class CheckPacket:
    """CHECK_REQUEST / CHECK_RESPONSE: ``dap_stream_ch_chain_net_srv_pkt_test_t`` + data."""

    usage_id: int = 0
    net_id: int = 0
    srv_uid: int = SRV_UID_VPN
    time_connect_ms: int = 0
    recv_time1: int = 0
    recv_time2: int = 0
    send_time1: int = 0
    send_time2: int = 0
    host_send: bytes = b""
    host_recv: bytes = b""
    err_code: int = 0
    data_size_send: int = 0
    data_size_recv: int = 0
    data_hash: bytes = bytes(32)
    data: bytes = b""

    @staticmethod
    def hash_of(data: bytes) -> bytes:
        return hashlib.sha3_256(data).digest()

    @property
    def hash_ok(self) -> bool:
        return self.data_hash == self.hash_of(self.data)

    def encode(self) -> bytes:
        if len(self.host_send) > 256 or len(self.host_recv) > 256:
            raise ValueError("CHECK host_send and host_recv hold at most 256 bytes")
        head = _TEST.pack(
            self.usage_id,
            self.net_id,
            self.srv_uid,
            self.time_connect_ms,
            self.recv_time1,
            self.recv_time2,
            self.send_time1,
            self.send_time2,
            self.host_send,
            self.host_recv,
            self.err_code,
            self.data_size_send,
            self.data_size_recv,
            len(self.data),
            self.data_hash,
        )
        return head + self.data

    @classmethod
    def decode(cls, data: bytes | memoryview) -> CheckPacket:
        if len(data) < TEST_HEADER_SIZE:
            raise DecodeError(f"CHECK packet needs {TEST_HEADER_SIZE} bytes, got {len(data)}")
        f = _TEST.unpack_from(data)
        size = f[13]
        payload = bytes(data[TEST_HEADER_SIZE:])
        if size != len(payload):
            raise DecodeError(f"CHECK packet says {size} data bytes, {len(payload)} are present")
        return cls(
            f[0],
            f[1],
            f[2],
            f[3],
            f[4],
            f[5],
            f[6],
            f[7],
            f[8].rstrip(b"\0"),
            f[9].rstrip(b"\0"),
            f[10],
            f[11],
            f[12],
            f[14],
            payload,
        )


#: the most offers one ORDERS packet carries, and its most bytes
MAX_ORDERS = 64
MAX_ORDERS_BYTES = 32768
_U16 = struct.Struct("<H")


@dataclass(frozen=True, slots=True)
class OrderList:
    """ORDERS: signed orders (offers) as bytes; what they say is the billing layer's."""

    orders: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        if len(self.orders) > MAX_ORDERS:
            raise ValueError(f"ORDERS carries at most {MAX_ORDERS} orders")
        out = _U16.pack(len(self.orders)) + b"".join(_U16.pack(len(o)) + o for o in self.orders)
        if len(out) > MAX_ORDERS_BYTES:
            raise ValueError(f"ORDERS is at most {MAX_ORDERS_BYTES} bytes")
        return out

    @classmethod
    def fitting(cls, orders: list[bytes]) -> OrderList:
        """As many of ``orders`` as fit one packet, in their order."""
        kept: list[bytes] = []
        size = _U16.size
        for order in orders[:MAX_ORDERS]:
            if size + _U16.size + len(order) > MAX_ORDERS_BYTES:
                break
            kept.append(order)
            size += _U16.size + len(order)
        return cls(tuple(kept))

    @classmethod
    def decode(cls, data: bytes | memoryview) -> OrderList:
        raw = bytes(data)
        if len(raw) > MAX_ORDERS_BYTES:
            raise DecodeError(f"ORDERS is {len(raw)} bytes, at most {MAX_ORDERS_BYTES}")
        if len(raw) < _U16.size:
            raise DecodeError("ORDERS has no count")
        (count,) = _U16.unpack_from(raw)
        if count > MAX_ORDERS:
            raise DecodeError(f"ORDERS says {count} orders, at most {MAX_ORDERS}")
        at = _U16.size
        orders = []
        for _ in range(count):
            if len(raw) - at < _U16.size:
                raise DecodeError("ORDERS cut short")
            (size,) = _U16.unpack_from(raw, at)
            at += _U16.size
            if size > len(raw) - at:
                raise DecodeError(f"ORDERS order says {size} bytes, {len(raw) - at} follow")
            orders.append(raw[at : at + size])
            at += size
        if at != len(raw):
            raise DecodeError(f"ORDERS has {len(raw) - at} bytes after its orders")
        return cls(tuple(orders))
