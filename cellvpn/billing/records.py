"""The signed billing records: orders, deposits and deposit closes (sans-IO codecs).

Each record has one canonical little-endian encoding; it is what its owner signs (Ed25519,
64 bytes) and its SHA3-256 is the record's ``hash``. The signature is not part of the hash, so a
record has one identity whoever re-sends it. The first two bytes, a kind and a format version,
keep a signature made for one kind of record from being accepted as another. uint256 fields use
dap-sdk's layout (:func:`cellvpn.wire.receipt.encode_uint256`: high 128 bits, then low, each
little-endian).

Order (112 bytes), the provider's price, signed by the provider::

      0  1 u8      kind            0x4f ('O')
      1  1 u8      version         1
      2  8 u64     srv_uid         1 = VPN
     10  4 u32     unit            Unit: SEC 0x02, B 0x11
     14  8 u64     units           units sold for ``price``, i.e. per receipt
     22 32 uint256 price           datoshi for ``units`` units
     54 10         token           ticker, printable ASCII, NUL padded
     64  8 u64     node_addr       the provider's node address
     72  8 u64     expires         unix seconds
     80 32         provider        the provider's Ed25519 public key

Version 2 of an order is the same 112 bytes (with version 2) followed by extensions, so later
options need no new layout::

    112  2 u16     length          bytes of extensions that follow (at most 1024)
    114  n         extensions      each: u8 type, u16 length, that many bytes of value

An order without extensions is always written as version 1, so its hash is the same as
before. A reader keeps extensions of types it does not know; what the types mean is
:mod:`cellvpn.billing.offers`' (a server's endpoint, key, region, capacity).

DepositRequest (134 bytes), the client's conditional lock, signed by the owner; its hash is the
deposit id and the deposit's first state hash (the ``prev`` of its first receipt)::

      0  1 u8      kind            0x44 ('D')
      1  1 u8      version         1
      2 32         owner           the owner's Ed25519 public key
     34  8 u64     srv_uid         1 = VPN
     42  4 u32     unit            Unit: SEC 0x02, B 0x11
     46 32 uint256 max_unit_price  the most the owner pays per unit, in datoshi
     78 32 uint256 value           datoshi locked from the owner's account
    110  8 u64     expires         unix seconds; after it the deposit can only be closed
    118 16         nonce           random, so equal deposits have different ids

DepositClose (82 bytes), the owner's order to end a deposit, signed by the owner::

      0  1 u8      kind            0x43 ('C')
      1  1 u8      version         1
      2 32         deposit         the deposit id
     34 32         owner           the owner's Ed25519 public key
     66 16         nonce           random

A signed record on the wire is the record's encoding followed by the 64-byte signature.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import ClassVar, Generic, Self, TypeVar

from cellvpn.billing.keys import SIGNATURE_SIZE, KeyPair, verify
from cellvpn.wire.errors import DecodeError
from cellvpn.wire.receipt import UINT256_MAX, Unit, decode_uint256, encode_uint256

RECORD_VERSION = 1
#: the order version that carries extensions
ORDER_VERSION_TLV = 2
#: the most extension bytes an order carries
MAX_EXTENSIONS = 1024
TOKEN_SIZE = 10
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1
#: The units a VPN deposit or order may be priced in.
VPN_UNITS = frozenset({Unit.SEC, Unit.B})

_ORDER = struct.Struct("<BBQIQ32s10sQQ32s")
ORDER_SIZE = _ORDER.size  # 112
_TLV = struct.Struct("<BH")
_U16 = struct.Struct("<H")
_DEPOSIT = struct.Struct("<BB32sQI32s32sQ16s")
DEPOSIT_SIZE = _DEPOSIT.size  # 134
_CLOSE = struct.Struct("<BB32s32s16s")
CLOSE_SIZE = _CLOSE.size  # 82

KIND_ORDER = ord("O")
KIND_DEPOSIT = ord("D")
KIND_CLOSE = ord("C")


def receipt_units_value_ok(value: int, units: int, max_unit_price: int) -> bool:
    """``value / units <= max_unit_price``, in integers (no division, so no rounding)."""
    return 0 <= value <= units * max_unit_price


def _u64(name: str, value: int) -> None:
    if not 0 <= value <= U64_MAX:
        raise ValueError(f"{name} {value} does not fit in a u64")


def _u32(name: str, value: int) -> None:
    if not 0 <= value <= U32_MAX:
        raise ValueError(f"{name} {value} does not fit in a u32")


def _u256(name: str, value: int) -> None:
    if not 0 <= value <= UINT256_MAX:
        raise ValueError(f"{name} {value} does not fit in a uint256")


def _bytes(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")


def token_ok(token: str) -> bool:
    """A ticker: 1 to 10 printable ASCII characters, no spaces."""
    return 1 <= len(token) <= TOKEN_SIZE and all(0x21 <= ord(c) <= 0x7E for c in token)


def _head(data: bytes | memoryview, name: str, size: int, kind: int) -> bytes:
    raw = bytes(data)
    if len(raw) != size:
        raise DecodeError(f"{name} must be {size} bytes, got {len(raw)}")
    if raw[0] != kind:
        raise DecodeError(f"{name} kind is 0x{raw[0]:02x}, expected 0x{kind:02x}")
    if raw[1] != RECORD_VERSION:
        raise DecodeError(f"{name} format version is {raw[1]}, expected {RECORD_VERSION}")
    return raw


@dataclass(frozen=True, slots=True)
class Order:
    """A provider's price: ``price`` datoshi for ``units`` units of ``unit``."""

    unit: int
    units: int
    price: int
    token: str
    provider: bytes
    expires: int
    node_addr: int = 0
    srv_uid: int = 1
    #: (type, value) pairs of a version 2 order, in order; empty: version 1
    extensions: tuple[tuple[int, bytes], ...] = ()

    name: ClassVar[str] = "order"

    def extension(self, kind: int) -> bytes | None:
        """The value of the first extension of this type, if any."""
        for t, value in self.extensions:
            if t == kind:
                return value
        return None

    @property
    def signer(self) -> bytes:
        return self.provider

    def encode(self) -> bytes:
        _u64("order srv_uid", self.srv_uid)
        _u32("order unit", self.unit)
        _u64("order units", self.units)
        _u256("order price", self.price)
        _u64("order node_addr", self.node_addr)
        _u64("order expires", self.expires)
        _bytes("order provider key", self.provider, 32)
        if not token_ok(self.token):
            raise ValueError(f"order token {self.token!r} is not 1-10 printable ASCII characters")
        tail = b""
        if self.extensions:
            for kind, value in self.extensions:
                if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
                    raise ValueError(f"order extension {kind} does not fit its layout")
            body = b"".join(_TLV.pack(k, len(v)) + bytes(v) for k, v in self.extensions)
            if len(body) > MAX_EXTENSIONS:
                raise ValueError(f"order extensions are {len(body)} bytes, at most 1024")
            tail = _U16.pack(len(body)) + body
        return (
            _ORDER.pack(
                KIND_ORDER,
                ORDER_VERSION_TLV if self.extensions else RECORD_VERSION,
                self.srv_uid,
                self.unit,
                self.units,
                encode_uint256(self.price),
                self.token.encode("ascii"),
                self.node_addr,
                self.expires,
                self.provider,
            )
            + tail
        )

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Order:
        raw = bytes(data)
        extensions: tuple[tuple[int, bytes], ...] = ()
        if len(raw) > ORDER_SIZE and raw[0] == KIND_ORDER and raw[1] == ORDER_VERSION_TLV:
            extensions = _decode_extensions(raw[ORDER_SIZE:])
            raw = raw[:ORDER_SIZE]
        else:
            raw = _head(raw, "order", ORDER_SIZE, KIND_ORDER)
        _, _, srv_uid, unit, units, price, token, node_addr, expires, provider = _ORDER.unpack(raw)
        text = _decode_token(token)
        return cls(
            unit,
            units,
            decode_uint256(price),
            text,
            provider,
            expires,
            node_addr,
            srv_uid,
            extensions,
        )

    @property
    def hash(self) -> bytes:
        return hashlib.sha3_256(self.encode()).digest()


def _decode_extensions(raw: bytes) -> tuple[tuple[int, bytes], ...]:
    """A version 2 order's extensions: exactly the bytes its length says, each TLV whole."""
    if len(raw) < _U16.size:
        raise DecodeError("order extensions have no length")
    (size,) = _U16.unpack_from(raw)
    body = raw[_U16.size :]
    if size != len(body) or size > MAX_EXTENSIONS or size == 0:
        raise DecodeError(f"order extensions say {size} bytes, {len(body)} follow (1 to 1024)")
    out = []
    at = 0
    while at < size:
        if size - at < _TLV.size:
            raise DecodeError("order extension cut short")
        kind, length = _TLV.unpack_from(body, at)
        at += _TLV.size
        if length > size - at:
            raise DecodeError(f"order extension {kind} says {length} bytes, {size - at} follow")
        out.append((kind, body[at : at + length]))
        at += length
    return tuple(out)


def _decode_token(raw: bytes) -> str:
    token = raw.rstrip(b"\0")
    try:
        text = token.decode("ascii")
    except UnicodeDecodeError:
        raise DecodeError("order token is not ASCII") from None
    if not token_ok(text):
        raise DecodeError(f"order token {text!r} is not 1-10 printable ASCII characters")
    return text


@dataclass(frozen=True, slots=True)
class DepositRequest:
    """A client's lock of ``value`` datoshi for service ``srv_uid``, paid per ``unit``."""

    owner: bytes
    unit: int
    max_unit_price: int
    value: int
    expires: int
    nonce: bytes
    srv_uid: int = 1

    name: ClassVar[str] = "deposit"

    @property
    def signer(self) -> bytes:
        return self.owner

    def encode(self) -> bytes:
        _bytes("deposit owner key", self.owner, 32)
        _u64("deposit srv_uid", self.srv_uid)
        _u32("deposit unit", self.unit)
        _u256("deposit max_unit_price", self.max_unit_price)
        _u256("deposit value", self.value)
        _u64("deposit expires", self.expires)
        _bytes("deposit nonce", self.nonce, 16)
        return _DEPOSIT.pack(
            KIND_DEPOSIT,
            RECORD_VERSION,
            self.owner,
            self.srv_uid,
            self.unit,
            encode_uint256(self.max_unit_price),
            encode_uint256(self.value),
            self.expires,
            self.nonce,
        )

    @classmethod
    def decode(cls, data: bytes | memoryview) -> DepositRequest:
        raw = _head(data, "deposit", DEPOSIT_SIZE, KIND_DEPOSIT)
        _, _, owner, srv_uid, unit, max_price, value, expires, nonce = _DEPOSIT.unpack(raw)
        return cls(
            owner, unit, decode_uint256(max_price), decode_uint256(value), expires, nonce, srv_uid
        )

    @property
    def hash(self) -> bytes:
        """The deposit id, and its state hash until the first receipt is redeemed."""
        return hashlib.sha3_256(self.encode()).digest()


@dataclass(frozen=True, slots=True)
class DepositClose:
    """The owner's order to end deposit ``deposit`` and take back what is still locked."""

    deposit: bytes
    owner: bytes
    nonce: bytes

    name: ClassVar[str] = "deposit close"

    @property
    def signer(self) -> bytes:
        return self.owner

    def encode(self) -> bytes:
        _bytes("close deposit id", self.deposit, 32)
        _bytes("close owner key", self.owner, 32)
        _bytes("close nonce", self.nonce, 16)
        return _CLOSE.pack(KIND_CLOSE, RECORD_VERSION, self.deposit, self.owner, self.nonce)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> DepositClose:
        raw = _head(data, "deposit close", CLOSE_SIZE, KIND_CLOSE)
        _, _, deposit, owner, nonce = _CLOSE.unpack(raw)
        return cls(deposit, owner, nonce)

    @property
    def hash(self) -> bytes:
        return hashlib.sha3_256(self.encode()).digest()


R = TypeVar("R", Order, DepositRequest, DepositClose)


@dataclass(frozen=True, slots=True)
class _Signed(Generic[R]):
    """A record and its signer's Ed25519 signature over the record's encoding."""

    record: R
    signature: bytes

    record_type: ClassVar[type[Order] | type[DepositRequest] | type[DepositClose]]

    @classmethod
    def sign(cls, record: R, key: KeyPair) -> Self:
        if key.public != record.signer:
            raise ValueError(f"this {record.name} must be signed by the key it names")
        return cls(record, key.sign(record.encode()))

    @property
    def hash(self) -> bytes:
        return self.record.hash

    def verify(self) -> bool:
        """Whether the signature is the named signer's, over the record; never raises."""
        try:
            encoded = self.record.encode()
        except ValueError:
            return False
        return verify(self.record.signer, self.signature, encoded)

    def encode(self) -> bytes:
        _bytes(f"{self.record.name} signature", self.signature, SIGNATURE_SIZE)
        return self.record.encode() + self.signature

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        raw = bytes(data)
        size = len(raw) - SIGNATURE_SIZE
        record = cls.record_type.decode(raw[: max(size, 0)])
        return cls(record, raw[size:])  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class SignedOrder(_Signed[Order]):
    record_type = Order

    @property
    def order(self) -> Order:
        return self.record


@dataclass(frozen=True, slots=True)
class SignedDeposit(_Signed[DepositRequest]):
    record_type = DepositRequest

    @property
    def deposit(self) -> DepositRequest:
        return self.record


@dataclass(frozen=True, slots=True)
class SignedClose(_Signed[DepositClose]):
    record_type = DepositClose

    @property
    def close(self) -> DepositClose:
        return self.record
