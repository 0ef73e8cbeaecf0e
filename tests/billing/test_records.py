"""The signed records' encodings: field offsets, round trips, and decoders under fuzzing."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellvpn.billing.records import (
    CLOSE_SIZE,
    DEPOSIT_SIZE,
    ORDER_SIZE,
    DepositClose,
    DepositRequest,
    Order,
    SignedClose,
    SignedDeposit,
    SignedOrder,
    receipt_units_value_ok,
)
from cellvpn.wire.errors import DecodeError
from cellvpn.wire.receipt import UINT256_MAX, Unit

from .helpers import key

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
uint256 = st.integers(0, UINT256_MAX)
key32 = st.binary(min_size=32, max_size=32)
nonce16 = st.binary(min_size=16, max_size=16)
tokens = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=10)

orders = st.builds(
    Order,
    unit=u32,
    units=u64,
    price=uint256,
    token=tokens,
    provider=key32,
    expires=u64,
    node_addr=u64,
    srv_uid=u64,
)
deposits = st.builds(
    DepositRequest,
    owner=key32,
    unit=u32,
    max_unit_price=uint256,
    value=uint256,
    expires=u64,
    nonce=nonce16,
    srv_uid=u64,
)
closes = st.builds(DepositClose, deposit=key32, owner=key32, nonce=nonce16)
sig64 = st.binary(min_size=64, max_size=64)

# A value 1 in dap-sdk's uint256 layout: the high half (16 zero bytes), then 01 and 15 zeros.
ONE_256 = bytes(16) + b"\x01" + bytes(15)


def u256_bytes(value: int) -> bytes:
    return (value >> 128).to_bytes(16, "little") + (value & (2**128 - 1)).to_bytes(16, "little")


def test_order_field_offsets() -> None:
    provider = bytes(range(32))
    order = Order(Unit.SEC, 3600, 1, "KEL", provider, 0x1122334455667788, 0xA1A2A3A4A5A6A7A8, 1)
    raw = order.encode()
    assert len(raw) == ORDER_SIZE == 112
    assert raw[0:2] == b"O\x01"
    assert raw[2:10] == (1).to_bytes(8, "little")
    assert raw[10:14] == b"\x02\0\0\0"
    assert raw[14:22] == (3600).to_bytes(8, "little")
    assert raw[22:54] == ONE_256
    assert raw[54:64] == b"KEL" + bytes(7)
    assert raw[64:72] == bytes.fromhex("a8a7a6a5a4a3a2a1")
    assert raw[72:80] == bytes.fromhex("8877665544332211")
    assert raw[80:112] == provider
    assert order.hash == hashlib.sha3_256(raw).digest()


def test_deposit_field_offsets_and_id() -> None:
    owner = bytes(range(32, 64))
    big = 2**200 + 5
    d = DepositRequest(owner, Unit.B, 7, big, 1_800_000_000, bytes(range(16)), 1)
    raw = d.encode()
    assert len(raw) == DEPOSIT_SIZE == 134
    assert raw[0:2] == b"D\x01"
    assert raw[2:34] == owner
    assert raw[34:42] == (1).to_bytes(8, "little")
    assert raw[42:46] == b"\x11\0\0\0"
    assert raw[46:78] == u256_bytes(7)
    assert raw[78:110] == u256_bytes(big)
    assert raw[110:118] == (1_800_000_000).to_bytes(8, "little")
    assert raw[118:134] == bytes(range(16))
    assert d.hash == hashlib.sha3_256(raw).digest()


def test_close_field_offsets() -> None:
    c = DepositClose(b"\xaa" * 32, b"\xbb" * 32, b"\xcc" * 16)
    raw = c.encode()
    assert len(raw) == CLOSE_SIZE == 82
    assert raw == b"C\x01" + b"\xaa" * 32 + b"\xbb" * 32 + b"\xcc" * 16


def test_signed_records_verify_and_carry_the_signature_last() -> None:
    owner = key("owner")
    request = DepositRequest(owner.public, Unit.SEC, 2, 100, 10**10, bytes(16))
    signed = SignedDeposit.sign(request, owner)
    raw = signed.encode()
    assert raw[:DEPOSIT_SIZE] == request.encode() and len(raw) == DEPOSIT_SIZE + 64
    assert signed.verify() and signed.hash == request.hash
    assert SignedDeposit.decode(raw) == signed
    assert not SignedDeposit(request, bytes(64)).verify()
    with pytest.raises(ValueError, match="signed by the key it names"):
        SignedDeposit.sign(request, key("someone else"))
    # A signature made for one kind of record is no good for another.
    close = DepositClose(request.hash, owner.public, bytes(16))
    assert not SignedClose(close, signed.signature).verify()


def test_invalid_values_are_refused_on_encode() -> None:
    provider = bytes(32)
    with pytest.raises(ValueError, match="token"):
        Order(Unit.SEC, 1, 1, "TOO-LONG-TOKEN", provider, 0).encode()
    with pytest.raises(ValueError, match="token"):
        Order(Unit.SEC, 1, 1, "A B", provider, 0).encode()
    with pytest.raises(ValueError, match="uint256"):
        Order(Unit.SEC, 1, UINT256_MAX + 1, "KEL", provider, 0).encode()
    with pytest.raises(ValueError, match="u64"):
        DepositRequest(provider, Unit.SEC, 1, 1, 2**64, bytes(16)).encode()
    with pytest.raises(ValueError, match="16 bytes"):
        DepositRequest(provider, Unit.SEC, 1, 1, 1, bytes(15)).encode()


def test_decoders_refuse_wrong_kind_version_and_token() -> None:
    raw = Order(Unit.SEC, 1, 1, "KEL", bytes(32), 0).encode()
    with pytest.raises(DecodeError, match="kind"):
        Order.decode(b"D" + raw[1:])
    with pytest.raises(DecodeError, match="version"):
        Order.decode(raw[:1] + b"\x02" + raw[2:])
    with pytest.raises(DecodeError, match="112 bytes"):
        Order.decode(raw[:-1])
    with pytest.raises(DecodeError, match="token"):
        Order.decode(raw[:54] + b"K\0L" + bytes(7) + raw[64:])
    with pytest.raises(DecodeError, match="token"):
        Order.decode(raw[:54] + bytes(10) + raw[64:])
    with pytest.raises(DecodeError):
        SignedOrder.decode(b"")


def test_units_value_check_without_division() -> None:
    assert receipt_units_value_ok(120, 60, 2)
    assert not receipt_units_value_ok(121, 60, 2)
    assert receipt_units_value_ok(0, 0, 5)
    assert not receipt_units_value_ok(1, 0, 5)
    assert not receipt_units_value_ok(1, 60, 0)
    big = 2**250
    assert receipt_units_value_ok(big * 3, 3, big)
    assert not receipt_units_value_ok(big * 3 + 1, 3, big)


@settings(max_examples=200, deadline=None)
@given(order=orders, sig=sig64)
def test_order_round_trip(order: Order, sig: bytes) -> None:
    assert Order.decode(order.encode()) == order
    signed = SignedOrder(order, sig)
    assert SignedOrder.decode(signed.encode()) == signed


@settings(max_examples=200, deadline=None)
@given(request=deposits, sig=sig64)
def test_deposit_round_trip(request: DepositRequest, sig: bytes) -> None:
    assert DepositRequest.decode(request.encode()) == request
    signed = SignedDeposit(request, sig)
    assert SignedDeposit.decode(signed.encode()) == signed


@settings(max_examples=200, deadline=None)
@given(record=closes, sig=sig64)
def test_close_round_trip(record: DepositClose, sig: bytes) -> None:
    assert DepositClose.decode(record.encode()) == record
    signed = SignedClose(record, sig)
    assert SignedClose.decode(signed.encode()) == signed


DECODERS: dict[str, Callable[[bytes], Any]] = {
    "order": Order.decode,
    "deposit": DepositRequest.decode,
    "close": DepositClose.decode,
    "signed order": SignedOrder.decode,
    "signed deposit": SignedDeposit.decode,
    "signed close": SignedClose.decode,
}
VALID: dict[str, st.SearchStrategy[bytes]] = {
    "order": orders.map(lambda r: r.encode()),
    "deposit": deposits.map(lambda r: r.encode()),
    "close": closes.map(lambda r: r.encode()),
    "signed order": st.builds(SignedOrder, orders, sig64).map(lambda r: r.encode()),
    "signed deposit": st.builds(SignedDeposit, deposits, sig64).map(lambda r: r.encode()),
    "signed close": st.builds(SignedClose, closes, sig64).map(lambda r: r.encode()),
}


@st.composite
def damaged(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid encoding of some record, then a byte flipped, cut off, inserted or appended."""
    name = draw(st.sampled_from(sorted(VALID)))
    raw = bytearray(draw(VALID[name]))
    how = draw(st.sampled_from(["flip", "cut", "insert", "append", "none"]))
    at = draw(st.integers(0, len(raw) - 1))
    if how == "flip":
        raw[at] ^= draw(st.integers(1, 255))
    elif how == "cut":
        del raw[at:]
    elif how == "insert":
        raw[at:at] = draw(st.binary(min_size=1, max_size=4))
    elif how == "append":
        raw += draw(st.binary(min_size=1, max_size=4))
    return draw(st.sampled_from(sorted(DECODERS))), bytes(raw)


def _decode_or_decode_error(name: str, data: bytes) -> None:
    value = None
    with contextlib.suppress(DecodeError):
        value = DECODERS[name](data)
    if value is not None:  # whatever decodes encodes back to the same bytes: one encoding
        assert value.encode() == data


@settings(max_examples=500, deadline=None)
@given(case=damaged())
def test_damaged_encodings_raise_only_decode_error(case: tuple[str, bytes]) -> None:
    _decode_or_decode_error(*case)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(DECODERS)), data=st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_decode_error(name: str, data: bytes) -> None:
    _decode_or_decode_error(name, data)
