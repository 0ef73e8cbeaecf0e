"""The receipt: what provider and client both sign for each slice of service.

``receipt_info`` (96 bytes, the signed part; little-endian, packed)::

      0  8 u64     srv_uid
      8  8 u64     addition
     16  4 u32     units_type      Unit (SEC 0x02, B 0x11)
     20  1 u8      version         2
     21  3         padding (zero)
     24  8 u64     units
     32 32 uint256 value_datoshi   dap-sdk layout: bytes 0-15 the high 128 bits, bytes 16-31 the
                                   low 128 bits, each half little-endian
     64 32         prev_tx_cond_hash

The whole receipt: ``u8 type (0x71) || receipt_info || u64 size || u64 exts_size || exts ||
signatures``, ``size`` counting every byte, signatures included. Signatures follow the shape of
dap-sdk's ``dap_sign_t`` (``u32 type, u8 hash_type, u8 pad, u32 sign_size, u32 pkey_size``, then
the public key, then the signature); cellvpn signs with Ed25519 (type :data:`SIG_TYPE_ED25519`).
Signature 0 is the provider's, signature 1 the client's; both cover ``receipt_info`` only.

Since nothing signs ``exts`` or a signature's ``hash_type`` while the receipt's hash covers them,
cellvpn accepts only receipts where those carry nothing (:meth:`Receipt.unsigned_bytes`): no
extensions, ``hash_type`` 0. Then a receipt's hash is a function of what both parties signed,
and the client's record and the ledger name every receipt by the same hash.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, replace
from enum import IntEnum

from cellvpn.wire.errors import DecodeError

RECEIPT_TYPE = 0x71
RECEIPT_VERSION = 2
UINT256_MAX = (1 << 256) - 1
_LOW128 = (1 << 128) - 1

_INFO = struct.Struct("<QQIB3xQ32s32s")
INFO_SIZE = _INFO.size  # 96
_HEAD = struct.Struct("<B96sQQ")
HEAD_SIZE = _HEAD.size  # 113
_SIGN = struct.Struct("<IBxII")
SIGN_HEADER_SIZE = _SIGN.size  # 14

#: cellvpn's signature type for Ed25519 (dap-sdk has none; this value is cellvpn's own).
SIG_TYPE_ED25519 = 0x0E25


class Unit(IntEnum):
    UNDEFINED = 0x00
    SEC = 0x02
    B = 0x11
    PCS = 0x22


def encode_uint256(value: int) -> bytes:
    """dap-sdk's ``uint256_t``: the high 128 bits, then the low, each little-endian."""
    if not 0 <= value <= UINT256_MAX:
        raise ValueError(f"{value} does not fit in a uint256")
    return (value >> 128).to_bytes(16, "little") + (value & _LOW128).to_bytes(16, "little")


def decode_uint256(data: bytes | memoryview) -> int:
    if len(data) != 32:
        raise DecodeError(f"uint256 needs 32 bytes, got {len(data)}")
    raw = bytes(data)
    return (int.from_bytes(raw[:16], "little") << 128) | int.from_bytes(raw[16:], "little")


@dataclass(frozen=True, slots=True)
class ReceiptInfo:
    srv_uid: int
    units_type: int
    units: int
    value: int
    prev_hash: bytes = bytes(32)
    addition: int = 0
    version: int = RECEIPT_VERSION

    def encode(self) -> bytes:
        if len(self.prev_hash) != 32:
            raise ValueError("receipt prev hash must be 32 bytes")
        return _INFO.pack(
            self.srv_uid,
            self.addition,
            self.units_type,
            self.version,
            self.units,
            encode_uint256(self.value),
            self.prev_hash,
        )

    @classmethod
    def decode(cls, data: bytes | memoryview) -> ReceiptInfo:
        if len(data) != INFO_SIZE:
            raise DecodeError(f"receipt_info must be {INFO_SIZE} bytes, got {len(data)}")
        srv_uid, addition, units_type, version, units, value, prev = _INFO.unpack(data)
        if bytes(data[21:24]) != b"\0\0\0":
            raise DecodeError("receipt_info padding must be zero")
        return cls(srv_uid, units_type, units, decode_uint256(value), prev, addition, version)


@dataclass(frozen=True, slots=True)
class Signature:
    public_key: bytes
    signature: bytes
    sig_type: int = SIG_TYPE_ED25519
    hash_type: int = 0

    def encode(self) -> bytes:
        head = _SIGN.pack(self.sig_type, self.hash_type, len(self.signature), len(self.public_key))
        return head + self.public_key + self.signature


@dataclass(frozen=True, slots=True)
class Receipt:
    info: ReceiptInfo
    signatures: tuple[Signature, ...] = ()
    exts: bytes = b""

    @property
    def info_bytes(self) -> bytes:
        return self.info.encode()

    def with_signature(self, sig: Signature) -> Receipt:
        return replace(self, signatures=(*self.signatures, sig))

    def encode(self) -> bytes:
        signs = b"".join(s.encode() for s in self.signatures)
        size = HEAD_SIZE + len(self.exts) + len(signs)
        head = _HEAD.pack(RECEIPT_TYPE, self.info.encode(), size, len(self.exts))
        return head + self.exts + signs

    def unsigned_bytes(self) -> str | None:
        """What this receipt carries that no signature covers (None: nothing). Such bytes
        would change the receipt's hash without anyone's signature, so they are refused."""
        if self.exts:
            return f"receipt carries {len(self.exts)} bytes of extensions, which nobody signs"
        for i, sig in enumerate(self.signatures):
            if sig.hash_type != 0:
                return (
                    f"signature {i} has hash_type {sig.hash_type}, which nobody signs (must be 0)"
                )
        return None

    @property
    def hash(self) -> bytes:
        """The receipt's identity: SHA3-256 of its whole encoding, signatures included."""
        return hashlib.sha3_256(self.encode()).digest()

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Receipt:
        data = bytes(data)
        if len(data) < HEAD_SIZE:
            raise DecodeError(f"receipt needs {HEAD_SIZE} header bytes, got {len(data)}")
        rtype, info, size, exts_size = _HEAD.unpack_from(data)
        if rtype != RECEIPT_TYPE:
            raise DecodeError(f"receipt type is 0x{rtype:02x}, expected 0x{RECEIPT_TYPE:02x}")
        if size != len(data):
            raise DecodeError(f"receipt says {size} bytes, {len(data)} are present")
        if exts_size > size - HEAD_SIZE:
            raise DecodeError(f"receipt extensions of {exts_size} bytes overrun the receipt")
        pos = HEAD_SIZE + exts_size
        exts = data[HEAD_SIZE:pos]
        signs: list[Signature] = []
        while pos < size:
            if size - pos < SIGN_HEADER_SIZE:
                raise DecodeError("receipt signature header is cut short")
            sig_type, hash_type, sig_size, pkey_size = _SIGN.unpack_from(data, pos)
            pos += SIGN_HEADER_SIZE
            if pkey_size + sig_size > size - pos:
                raise DecodeError("receipt signature overruns the receipt")
            pkey = data[pos : pos + pkey_size]
            sig = data[pos + pkey_size : pos + pkey_size + sig_size]
            pos += pkey_size + sig_size
            signs.append(Signature(pkey, sig, sig_type, hash_type))
        return cls(ReceiptInfo.decode(info), tuple(signs), exts)
