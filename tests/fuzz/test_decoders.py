"""Fuzzing decoders past "raises only DecodeError": what they accept must be usable.

``tests/wire/test_fuzz.py`` and ``tests/billing/test_records.py`` show that every decoder
returns a value or raises ``DecodeError``. These targets take the values that do decode and
use them as the code behind the decoders does: encode them again (the same value comes back),
verify signed records (a bool, never an exception; true only for the bytes that were signed),
check receipts as the client does, prove a REQUEST's key as the server does, and answer a
CHECK; each may refuse only in the way it documents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from cellvpn.billing.keys import KeyPair, account_of
from cellvpn.billing.proof import proven_key, sign_request
from cellvpn.billing.records import (
    DepositClose,
    DepositRequest,
    Order,
    SignedClose,
    SignedDeposit,
    SignedOrder,
)
from cellvpn.client.receipts import check_receipt
from cellvpn.server.check import MAX_CHECK_DATA, answer_check
from cellvpn.wire.errors import DecodeError
from cellvpn.wire.frame import FrameHeader
from cellvpn.wire.receipt import Receipt, ReceiptInfo, Unit
from cellvpn.wire.service import SRV_UID_VPN, CheckPacket, Error, NotifyStopped, Request, Success
from cellvpn.wire.setup import Close, Hello, Welcome
from cellvpn.wire.vpn import AddrReply, VpnPacket
from tests.wire import strategies as s
from tests.wire.test_fuzz import ENCODINGS, mutated
from tests.wire.test_fuzz import inputs as wire_inputs

from . import inputs
from .harness import counted, fuzz

KEY = KeyPair.from_seed(hashlib.sha3_256(b"cellvpn fuzz record key").digest())
OTHER = KeyPair.from_seed(hashlib.sha3_256(b"cellvpn fuzz other key").digest())


def _same_again(value: Any) -> Any:
    """What a decoded value looks like after encode and decode: what is not carried on
    (unknown items and options) dropped, a CLOSE reason cut to its 1000 characters."""
    if isinstance(value, Hello | Welcome | AddrReply):
        return dataclasses.replace(value, unknown={})
    if isinstance(value, Close):
        return Close(value.code, value.reason[:1000])
    return value


#: layout name (as the wire fuzzer's) -> decoder
WIRE: dict[str, Callable[[Any], Any]] = {
    "request": Request.decode,
    "success": Success.decode,
    "error": Error.decode,
    "check": CheckPacket.decode,
    "info": ReceiptInfo.decode,
    "receipt": Receipt.decode,
    "vpn": VpnPacket.decode,
    "addr": AddrReply.decode,
    "hello": Hello.decode,
    "welcome": Welcome.decode,
    "close": Close.decode,
    "frame": FrameHeader.decode,
}


def _tagged(kind: str) -> st.SearchStrategy[tuple[str, bytes | memoryview]]:
    """The wire fuzzer's inputs for ``kind``, named."""
    return st.tuples(st.just(kind), wire_inputs(kind))


wire_cases = st.one_of(
    *(_tagged(kind) for kind in WIRE),
    st.tuples(st.just("notify"), wire_inputs("error")),
)


@fuzz
@given(case=wire_cases)
@counted
def test_decoded_wire_values_encode_to_themselves(case: tuple[str, bytes | memoryview]) -> None:
    """Whatever a wire decoder accepts encodes without error, and decodes back to itself."""
    kind, data = case
    decode = NotifyStopped.decode if kind == "notify" else WIRE[kind]
    try:
        value = decode(data)
    except DecodeError:
        return
    again = decode(value.encode())
    assert _same_again(again) == _same_again(value), f"{kind} changed on its way around"


PROVIDER_ORDER = Order(Unit.B, 1_000_000, 60, "CELL", KEY.public, expires=2**40)
signed_records = st.one_of(
    st.builds(
        lambda units, price, token: SignedOrder.sign(
            Order(Unit.B, units, price, token, KEY.public, expires=2**40), KEY
        ),
        st.integers(1, 2**64 - 1),
        st.integers(0, 2**70),
        st.sampled_from(["CELL", "mCELL", "X"]),
    ),
    st.builds(
        lambda value, nonce: SignedDeposit.sign(
            DepositRequest(KEY.public, Unit.B, 2, value, 2**40, nonce), KEY
        ),
        st.integers(0, 2**80),
        st.binary(min_size=16, max_size=16),
    ),
    st.builds(
        lambda deposit, nonce: SignedClose.sign(DepositClose(deposit, KEY.public, nonce), KEY),
        st.binary(min_size=32, max_size=32),
        st.binary(min_size=16, max_size=16),
    ),
)
DECODERS: dict[type[Any], Callable[[Any], Any]] = {
    SignedOrder: SignedOrder.decode,
    SignedDeposit: SignedDeposit.decode,
    SignedClose: SignedClose.decode,
}


@fuzz
@given(
    record=signed_records,
    edits=st.lists(inputs.edits, max_size=3),
    decoder=st.sampled_from(sorted(DECODERS, key=lambda t: t.__name__)),
    view=st.booleans(),
)
@counted
def test_signed_records_verify_only_what_was_signed(
    record: Any, edits: list[list[inputs.Edit]], decoder: type[Any], view: bool
) -> None:
    """A signed record, damaged or not, read by any record decoder from bytes or a view:
    DecodeError, or a record whose ``verify`` answers (never raises), true only for the
    very bytes that were signed, and whose ``hash`` and encoding are its own."""
    raw = record.encode()
    data = raw
    for change in edits:
        data = inputs.apply_edits(data, change)
    source: bytes | memoryview = memoryview(b"\0" + data)[1:] if view else data
    try:
        decoded = DECODERS[decoder](source)
    except DecodeError:
        return
    assert decoded.encode() == data
    ok = decoded.verify()
    assert isinstance(ok, bool)
    assert ok == (data == raw), "a signature verified for bytes nobody signed"
    assert decoded.hash == hashlib.sha3_256(data[:-64]).digest()


fair_infos = st.builds(
    lambda units, share, addition: ReceiptInfo(
        SRV_UID_VPN,
        Unit.B,
        units,
        units * 60 // 1_000_000 * share // 4,
        hashlib.sha3_256(b"deposit").digest(),
        addition,
    ),
    st.integers(1, 1_000_000),
    st.integers(0, 4),
    s.u64,
)
odd_infos = st.builds(
    ReceiptInfo,
    srv_uid=st.sampled_from([SRV_UID_VPN, 0, 2]),
    units_type=st.sampled_from([Unit.B, Unit.SEC, 0]),
    units=st.sampled_from([1_000_000, 1, 0, 2_000_000, 2**64 - 1]),
    value=st.sampled_from([60, 0, 61, 2_000_000, 2**200]),
    prev_hash=st.sampled_from([bytes(32), hashlib.sha3_256(b"deposit").digest()]),
    addition=s.u64,
    version=st.sampled_from([2, 1, 255]),
)


@st.composite
def receipts_to_sign(draw: st.DrawFn) -> bytes:
    """SIGN_REQUEST bodies: receipts signed by the order's provider (or not), fair or with
    fields an honest server would not ask for, damaged now and then."""
    info = draw(inputs.usually(fair_infos, odd_infos))
    signer = draw(st.sampled_from([KEY, KEY, OTHER]))
    sig = signer.signature(info.encode())
    if draw(st.integers(0, 5)) == 0:
        sig = dataclasses.replace(sig, hash_type=draw(s.u8))
    receipt = Receipt(info, (sig,), exts=draw(st.sampled_from([b"", b"x"])))
    data = receipt.encode()
    return inputs.damage(draw, data) if draw(st.integers(0, 3)) == 0 else data


@fuzz
@given(
    data=st.one_of(receipts_to_sign(), mutated(ENCODINGS["receipt"])),
    max_unit_price=st.sampled_from([0, 1, 2, 2**64]),
)
@counted
def test_client_receipt_check(data: bytes, max_unit_price: int) -> None:
    """The client's check of a receipt it is asked to sign: a reason or None, never an
    exception; None only for a receipt within the order, its price and its chain."""
    try:
        receipt = Receipt.decode(data)
    except DecodeError:
        return
    deposit = hashlib.sha3_256(b"deposit").digest()
    why = check_receipt(receipt, PROVIDER_ORDER, max_unit_price, {deposit}, set())
    if why is not None:
        assert isinstance(why, str) and why
        return
    info = receipt.info
    assert info.srv_uid == SRV_UID_VPN and info.units_type == PROVIDER_ORDER.unit
    assert 0 < info.units <= PROVIDER_ORDER.units and info.prev_hash == deposit
    assert info.value <= info.units * max_unit_price
    assert info.value * PROVIDER_ORDER.units <= PROVIDER_ORDER.price * info.units
    assert receipt.signatures[0].public_key == KEY.public and not receipt.exts


@st.composite
def proven_requests(draw: st.DrawFn) -> tuple[bytes, int]:
    """(REQUEST body, session id): signed by the client for this session or another, with
    its hash or another's, or damaged."""
    session = draw(s.u32)
    base = Request(tx_cond=draw(s.hash32), order_hash=draw(s.hash32))
    signer = draw(st.sampled_from([KEY, OTHER]))
    request = sign_request(base, signer, draw(st.sampled_from([session, session, session ^ 1])))
    if draw(st.booleans()):
        request = dataclasses.replace(request, client_pkey_hash=KEY.account)
    data = request.encode()
    return (inputs.damage(draw, data) if draw(st.integers(0, 3)) == 0 else data), session


@fuzz
@given(case=st.one_of(proven_requests(), st.tuples(ENCODINGS["request"], s.u32)))
@counted
def test_server_request_proof(case: tuple[bytes, int]) -> None:
    """The server's proof of a REQUEST's key: the key, or DecodeError (nothing else); a key
    it returns is the one the REQUEST names and signed for this session."""
    data, session = case
    try:
        request = Request.decode(data)
        key = proven_key(request, session)
    except DecodeError:
        return
    assert account_of(key) == request.client_pkey_hash
    assert key in (KEY.public, OTHER.public)


@st.composite
def check_requests(draw: st.DrawFn) -> bytes:
    data = draw(inputs.check_requests())
    return inputs.damage(draw, data) if draw(st.integers(0, 3)) == 0 else data


@fuzz
@given(
    data=st.one_of(check_requests(), ENCODINGS["check"]),
    host=st.sampled_from(["192.0.2.2", "2001:db8::1", "é" * 300, ""]),
)
@counted
def test_server_check_answer(data: bytes, host: str) -> None:
    """The server's answer to any CHECK_REQUEST it can read encodes, stays within the
    check's data limit, and carries the hash of the data it sends."""
    try:
        request = CheckPacket.decode(data)
    except DecodeError:
        return
    answer = answer_check(request, host, time.time_ns())
    body = answer.encode()
    assert len(answer.data) <= MAX_CHECK_DATA and len(answer.host_send) <= 256
    assert CheckPacket.decode(body).data == answer.data
    if answer.err_code == 0:
        assert answer.hash_ok
