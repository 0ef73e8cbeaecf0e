"""The client's checks before it signs a receipt, its receipt book, and its order check."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from cellvpn.billing.keys import KeyPair, create_key
from cellvpn.billing.proof import proven_key
from cellvpn.billing.records import Order, SignedDeposit, SignedOrder
from cellvpn.client import receipts
from cellvpn.client.billing import ClientBilling
from cellvpn.client.receipts import ReceiptBook, check_receipt
from cellvpn.config.schema import WalletSection
from cellvpn.wire.receipt import Receipt, ReceiptInfo, Signature, Unit
from cellvpn.wire.service import Error, ErrorCode, NotifyStopped, PacketType, Request, Success
from cellvpn.wire.setup import CloseCode

PROVIDER = KeyPair.from_seed(hashlib.sha3_256(b"provider").digest())
OTHER = KeyPair.from_seed(hashlib.sha3_256(b"another provider").digest())
DEPOSIT = hashlib.sha3_256(b"deposit").digest()
#: 60 datoshi for 60 seconds: 1 per unit; the client accepts up to 2 per unit.
ORDER = Order(Unit.SEC, 60, 60, "CELL", PROVIDER.public, expires=4_000_000_000)
MAX_UNIT_PRICE = 2


def offer(
    value: int = 60,
    units: int = 60,
    unit: int = Unit.SEC,
    prev: bytes = DEPOSIT,
    srv_uid: int = 1,
    version: int = 2,
    addition: int = 0,
    signer: KeyPair | None = PROVIDER,
) -> Receipt:
    """A receipt as a server sends it in SIGN_REQUEST: signed by ``signer`` only."""
    info = ReceiptInfo(srv_uid, unit, units, value, prev, addition, version)
    receipt = Receipt(info)
    return receipt if signer is None else receipt.with_signature(signer.signature(info.encode()))


def why(receipt: Receipt, signed_before: set[bytes] | None = None) -> str | None:
    return check_receipt(receipt, ORDER, MAX_UNIT_PRICE, {DEPOSIT}, signed_before or set())


# --- check_receipt ----------------------------------------------------------------------------


def test_a_good_receipt_may_be_signed() -> None:
    """A receipt at the order's price, on the deposit's state, signed by the provider: None."""
    assert why(offer()) is None


def test_fewer_units_at_the_same_price_may_be_signed() -> None:
    """Half the units for half the value is within the order and the maximum."""
    assert why(offer(value=30, units=30)) is None


def test_above_max_unit_price_is_refused() -> None:
    """121 for 60 units is above 2 per unit: refused, naming max_unit_price."""
    reason = why(offer(value=121))
    assert reason is not None and "max_unit_price 2" in reason


def test_above_the_order_price_is_refused() -> None:
    """61 for 60 units is within the client's maximum but above the order's 60 for 60."""
    reason = why(offer(value=61))
    assert reason is not None and "above the order's price" in reason
    # the same ratio checked with integers, no rounding: 31 for 30 units is too much as well
    reason = why(offer(value=31, units=30))
    assert reason is not None and "above the order's price" in reason


def test_wrong_prev_hash_is_refused() -> None:
    """A receipt that does not follow a state the client knows is not signed."""
    reason = why(offer(prev=hashlib.sha3_256(b"elsewhere").digest()))
    assert reason is not None and "prev hash" in reason


def test_wrong_unit_is_refused() -> None:
    """Bytes when the order sells seconds."""
    reason = why(offer(unit=Unit.B))
    assert reason is not None and "unit differs" in reason


@pytest.mark.parametrize("units", [61, 10**6, 0])
def test_too_many_or_no_units_are_refused(units: int) -> None:
    """More units than the order sells at a time (even at a fair price), or none at all."""
    reason = why(offer(value=units, units=units))
    assert reason is not None and "the order sells 60 at a time" in reason


def test_wrong_srv_uid_is_refused() -> None:
    """A receipt for another service."""
    reason = why(offer(srv_uid=2))
    assert reason is not None and "service 2" in reason


@pytest.mark.parametrize("version", [0, 1, 3])
def test_wrong_version_is_refused(version: int) -> None:
    """Only receipt version 2."""
    reason = why(offer(version=version))
    assert reason is not None and f"version {version}" in reason


def test_an_info_signed_before_is_refused() -> None:
    """The same receipt_info is never signed twice, even with another provider signature."""
    receipt = offer()
    seen = {hashlib.sha3_256(receipt.info_bytes).digest()}
    reason = why(receipt, seen)
    assert reason is not None and "signed that receipt already" in reason
    # another addition makes another info: that one may be signed
    assert why(offer(addition=1), seen) is None


def test_missing_provider_signature_is_refused() -> None:
    """No signature at all."""
    reason = why(offer(signer=None))
    assert reason is not None and "not signed by the order's provider" in reason


def test_signature_by_another_key_is_refused() -> None:
    """Signature 0 by a key that is not the order's provider."""
    reason = why(offer(signer=OTHER))
    assert reason is not None and "not signed by the order's provider" in reason


def test_invalid_provider_signature_is_refused() -> None:
    """The provider's public key with a signature that does not verify: refused."""
    good = offer()
    sig = good.signatures[0]
    flipped = bytes([sig.signature[0] ^ 1]) + sig.signature[1:]
    forged = replace(good, signatures=(Signature(PROVIDER.public, flipped),))
    reason = why(forged)
    assert reason is not None and "not valid" in reason
    # a genuine provider signature over another receipt_info, moved onto this one
    other = offer(value=30, units=30).signatures[0]
    reason = why(replace(good, signatures=(other,)))
    assert reason is not None and "not valid" in reason
    # a truncated signature
    short = replace(good, signatures=(Signature(PROVIDER.public, sig.signature[:32]),))
    assert why(short) is not None


# --- ReceiptBook ------------------------------------------------------------------------------


def client_signed(receipt: Receipt, client: KeyPair) -> Receipt:
    return receipt.with_signature(client.signature(receipt.info_bytes))


def test_book_states_follow_signed_and_confirmed(tmp_path: Path) -> None:
    """States: the deposit, then also the signed receipt, then only the confirmed one."""
    client = KeyPair.generate()
    book = ReceiptBook(tmp_path / "receipts.jsonl")
    assert book.states(DEPOSIT) == {DEPOSIT}
    r1 = client_signed(offer(), client)
    book.signed(DEPOSIT, r1, PROVIDER.public)
    assert book.states(DEPOSIT) == {DEPOSIT, r1.hash}
    book.confirmed(DEPOSIT, r1.hash)
    assert book.states(DEPOSIT) == {r1.hash}
    r2 = client_signed(offer(prev=r1.hash), client)
    book.signed(DEPOSIT, r2, PROVIDER.public)
    assert book.states(DEPOSIT) == {r1.hash, r2.hash}
    other = hashlib.sha3_256(b"another deposit").digest()
    assert book.states(other) == {other}
    assert [(e["receipt"], e["confirmed"]) for e in book.receipts()] == [
        (r1.hash.hex(), True),
        (r2.hash.hex(), False),
    ]
    mode = stat.S_IMODE((tmp_path / "receipts.jsonl").stat().st_mode)
    assert mode == 0o600


def test_book_reload_keeps_states_and_never_signs_an_info_twice(tmp_path: Path) -> None:
    """A reloaded book keeps its states and refuses an info it signed before the reload."""
    client = KeyPair.generate()
    path = tmp_path / "state" / "receipts.jsonl"
    book = ReceiptBook(path)
    r1 = client_signed(offer(), client)
    book.signed(DEPOSIT, r1, PROVIDER.public)
    book.confirmed(DEPOSIT, r1.hash)
    r2 = client_signed(offer(prev=r1.hash), client)
    book.signed(DEPOSIT, r2, PROVIDER.public)  # its confirmation never came

    again = ReceiptBook(path)
    assert again.entries == book.entries
    assert again.states(DEPOSIT) == {r1.hash, r2.hash}
    assert (
        again.signed_infos
        == book.signed_infos
        == {hashlib.sha3_256(r.info_bytes).digest() for r in (r1, r2)}
    )
    states = again.states(DEPOSIT)
    reason = check_receipt(offer(prev=r1.hash), ORDER, 2, states, again.signed_infos)
    assert reason is not None and "signed that receipt already" in reason
    # the first receipt again: its prev is no longer a state, and its info was signed
    assert check_receipt(offer(), ORDER, 2, states, again.signed_infos) is not None
    assert check_receipt(offer(prev=r2.hash), ORDER, 2, states, again.signed_infos) is None
    lines = path.read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["signed", "confirmed", "signed"]


# --- ClientBilling without a network ----------------------------------------------------------


class FakeStream:
    """What ClientBilling uses of a ClientStream: the WELCOME's order, sending and closing."""

    def __init__(self, order: bytes, session_id: int = 0x1234ABCD) -> None:
        welcome = type("Welcome", (), {"order": order})()
        conn = type("Conn", (), {"welcome": welcome})()
        self.proto = type("Proto", (), {"conn": conn})()
        self.session_id = session_id
        self.usage_id = 7
        #: what the client's meter reads in bytes (IP both ways plus proxy payload)
        self.metered_bytes = 0
        self.sent: list[tuple[int, bytes]] = []
        self.closed: tuple[int, str] | None = None

    def send_service(self, ptype: int, body: bytes) -> None:
        self.sent.append((ptype, body))

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        self.closed = (code, reason)


def signed_order(order: Order = ORDER, key: KeyPair = PROVIDER) -> bytes:
    return SignedOrder.sign(order, key).encode()


def billing(
    tmp_path: Path,
    deposit: bytes | None = DEPOSIT,
    max_unit_price: int = MAX_UNIT_PRICE,
    deposit_value: int = 0,
    key: Path | None = None,
) -> ClientBilling:
    if key is None:
        key = tmp_path / "client.key"
        if not key.exists():
            create_key(key)
    wallet = WalletSection(
        key=key,
        deposit=deposit.hex() if deposit else None,
        deposit_value=deposit_value,
        max_unit_price=max_unit_price,
    )
    return ClientBilling(wallet, tmp_path / "state", Clock())


def request_of(cb: ClientBilling, stream: FakeStream) -> Request | None:
    return cb.make_request(stream)  # type: ignore[arg-type]


def packet(cb: ClientBilling, stream: FakeStream, ptype: int, body: bytes) -> bool:
    return cb.service_packet(stream, ptype, memoryview(body))  # type: ignore[arg-type]


def test_order_above_max_unit_price_is_refused(tmp_path: Path) -> None:
    """An order above max_unit_price: no REQUEST, the stream closed REFUSED, a permanent stop."""
    cb = billing(tmp_path)
    stream = FakeStream(signed_order(replace(ORDER, units=30, price=61)))
    assert request_of(cb, stream) is None
    assert stream.sent == []
    assert stream.closed is not None and stream.closed[0] == CloseCode.REFUSED
    assert cb.stopped is not None and "above max_unit_price 2" in cb.stopped
    assert cb.permanent
    # exactly at the maximum is accepted
    ok = FakeStream(signed_order(replace(ORDER, units=30, price=60)))
    assert request_of(billing(tmp_path), ok) is not None


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"", "offers no paid order"),
        (b"\x4f\x01junk", "unreadable"),
        (signed_order()[:-1] + bytes([signed_order()[-1] ^ 1]), "not signed by its provider"),
        (signed_order(replace(ORDER, expires=int(time.time()) - 10)), "expired"),
    ],
    ids=["none", "unreadable", "bad-signature", "expired"],
)
def test_unusable_orders_are_refused(tmp_path: Path, raw: bytes, words: str) -> None:
    """No order, a malformed one, a forged signature or an expired order: no REQUEST."""
    cb = billing(tmp_path)
    stream = FakeStream(raw)
    assert request_of(cb, stream) is None
    assert stream.sent == [] and stream.closed is not None
    assert cb.stopped is not None and words in cb.stopped


def test_request_proves_the_key_for_this_session(tmp_path: Path) -> None:
    """The REQUEST names deposit and order and proves the key for this session id only."""
    cb = billing(tmp_path)
    stream = FakeStream(signed_order())
    request = request_of(cb, stream)
    assert request is not None
    assert request.tx_cond == DEPOSIT
    assert request.order_hash == SignedOrder.sign(ORDER, PROVIDER).hash
    assert request.token == b"CELL"
    assert proven_key(Request.decode(request.encode()), stream.session_id) == cb.key.public
    with pytest.raises(Exception, match="not valid for this session"):
        proven_key(request, stream.session_id + 1)


def test_deposit_is_created_when_none_is_named(tmp_path: Path) -> None:
    """No deposit but a deposit_value: DEPOSIT_CREATE, then the id kept and the REQUEST sent."""
    cb = billing(tmp_path, deposit=None, deposit_value=600)
    stream = FakeStream(signed_order())
    assert request_of(cb, stream) is None
    [(ptype, body)] = stream.sent
    assert ptype == PacketType.DEPOSIT_CREATE
    signed = SignedDeposit.decode(body)
    assert signed.verify() and signed.deposit.owner == cb.key.public
    assert (signed.deposit.value, signed.deposit.max_unit_price) == (600, MAX_UNIT_PRICE)
    assert signed.deposit.unit == Unit.SEC
    assert packet(cb, stream, PacketType.DEPOSIT_CREATED, signed.hash)
    assert stream.sent[-1][0] == PacketType.REQUEST
    assert Request.decode(stream.sent[-1][1]).tx_cond == signed.hash
    # a restart without [wallet] deposit finds it again
    again = billing(tmp_path, deposit=None, deposit_value=600)
    assert again.deposit == signed.hash


def test_no_deposit_and_no_value_gives_up(tmp_path: Path) -> None:
    """Nothing to pay from: the client says so and sends nothing."""
    cb = billing(tmp_path, deposit=None)
    stream = FakeStream(signed_order())
    assert request_of(cb, stream) is None
    assert stream.sent == [] and cb.stopped is not None and "deposit_value is 0" in cb.stopped


def test_sign_confirm_and_chain(tmp_path: Path) -> None:
    """A good receipt is signed and recorded, SUCCESS confirms it, the next one on it is signed."""
    cb = billing(tmp_path)
    stream = FakeStream(signed_order())
    assert request_of(cb, stream) is not None
    r1 = offer()
    assert packet(cb, stream, PacketType.SIGN_REQUEST, r1.encode())
    ptype, body = stream.sent[-1]
    assert ptype == PacketType.SIGN_RESPONSE
    answer = Receipt.decode(body)
    assert answer.info == r1.info
    assert [s.public_key for s in answer.signatures] == [PROVIDER.public, cb.key.public]
    assert cb.book.states(DEPOSIT) == {DEPOSIT, answer.hash}
    assert packet(cb, stream, PacketType.SUCCESS, Success(7).encode())
    assert cb.book.states(DEPOSIT) == {answer.hash}
    cb.clock.advance(30)  # type: ignore[attr-defined]  # half of the 60 s receipt used
    r2 = offer(prev=answer.hash)
    assert packet(cb, stream, PacketType.SIGN_REQUEST, r2.encode())
    assert stream.sent[-1][0] == PacketType.SIGN_RESPONSE
    assert cb.receipts_signed == 2 and cb.stopped is None and stream.closed is None


def test_same_receipt_offered_again_is_not_signed(tmp_path: Path) -> None:
    """The same receipt offered again, also after a restart, is refused and nothing is sent."""
    cb = billing(tmp_path)
    stream = FakeStream(signed_order())
    request_of(cb, stream)
    r1 = offer()
    packet(cb, stream, PacketType.SIGN_REQUEST, r1.encode())
    sent = len(stream.sent)
    packet(cb, stream, PacketType.SIGN_REQUEST, r1.encode())
    assert len(stream.sent) == sent
    assert stream.closed is not None and stream.closed[0] == CloseCode.REFUSED
    assert cb.stopped is not None and "signed that receipt already" in cb.stopped

    restarted = billing(tmp_path)
    stream = FakeStream(signed_order())
    request_of(restarted, stream)
    packet(restarted, stream, PacketType.SIGN_REQUEST, r1.encode())
    assert stream.sent == []  # make_request returns the REQUEST; the stream would send it
    assert restarted.stopped is not None and "signed that receipt already" in restarted.stopped
    assert len(restarted.book.receipts()) == 1


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (offer(value=200), "max_unit_price"),
        (offer(prev=bytes(32)), "prev hash"),
        (offer(signer=OTHER), "provider"),
    ],
    ids=["overpriced", "wrong-prev", "wrong-signer"],
)
def test_a_bad_receipt_is_not_signed_and_not_recorded(
    tmp_path: Path, bad: Receipt, words: str
) -> None:
    """ClientBilling refuses what check_receipt refuses: nothing sent, nothing in the book."""
    cb = billing(tmp_path)
    stream = FakeStream(signed_order())
    request_of(cb, stream)
    packet(cb, stream, PacketType.SIGN_REQUEST, bad.encode())
    assert all(p != PacketType.SIGN_RESPONSE for p, _ in stream.sent)
    assert cb.book.entries == [] and cb.receipts_signed == 0
    assert cb.stopped is not None and words in cb.stopped and cb.permanent


def test_receipt_before_any_order_is_not_signed(tmp_path: Path) -> None:
    """A SIGN_REQUEST on a stream whose order was never accepted."""
    cb = billing(tmp_path)
    stream = FakeStream(b"")
    packet(cb, stream, PacketType.SIGN_REQUEST, offer().encode())
    assert stream.sent == [] and cb.stopped is not None and "before any order" in cb.stopped


def test_stop_and_error_packets_are_kept_as_the_reason(tmp_path: Path) -> None:
    """NOTIFY_STOPPED and a late ERROR name their code in ``stopped``."""
    cb = billing(tmp_path)
    stream = FakeStream(signed_order())
    body = NotifyStopped(Error(ErrorCode.RECEIPT_NO_SIGN)).encode()
    assert packet(cb, stream, PacketType.NOTIFY_STOPPED, body)
    assert cb.stopped is not None and "RECEIPT_NO_SIGN" in cb.stopped
    assert packet(cb, stream, PacketType.ERROR, Error(ErrorCode.TX_COND_NOT_FOUND).encode())
    assert cb.stopped is not None and "TX_COND_NOT_FOUND" in cb.stopped
    assert not packet(cb, stream, PacketType.CHECK_RESPONSE, b"")


def test_describe(tmp_path: Path) -> None:
    """The status block names account, deposit, order and price."""
    cb = billing(tmp_path)
    stream = FakeStream(signed_order())
    request_of(cb, stream)
    info: dict[str, Any] = cb.describe()
    assert info["deposit"] == DEPOSIT.hex()
    assert info["order"] == SignedOrder.sign(ORDER, PROVIDER).hash.hex()
    assert (info["price"], info["units"], info["receipts_signed"]) == ("60", 60, 0)


# --- what the client signs: only what it used ------------------------------------------------


def granted(tmp_path: Path) -> tuple[ClientBilling, FakeStream, Receipt]:
    """A client that signed its first receipt and got SUCCESS for it."""
    cb = billing(tmp_path)
    stream = FakeStream(signed_order())
    request_of(cb, stream)
    packet(cb, stream, PacketType.SIGN_REQUEST, offer().encode())
    answer = Receipt.decode(stream.sent[-1][1])
    packet(cb, stream, PacketType.SUCCESS, Success(7).encode())
    return cb, stream, answer


def test_a_receipt_asked_for_too_early_gets_an_error_and_is_counted(tmp_path: Path) -> None:
    """Nothing used: ERROR (not a signature), counted in the status, the session kept; the
    third in a row closes the session but is no permanent stop."""
    cb, stream, first = granted(tmp_path)
    for n in (1, 2):
        packet(cb, stream, PacketType.SIGN_REQUEST, offer(prev=first.hash, addition=n).encode())
        ptype, body = stream.sent[-1]
        assert ptype == PacketType.ERROR
        assert Error.decode(body).code == ErrorCode.RECEIPT_UNITS_ERROR
        assert stream.closed is None
    assert cb.describe()["receipts_refused"] == 2 and cb.receipts_signed == 1
    packet(cb, stream, PacketType.SIGN_REQUEST, offer(prev=first.hash, addition=3).encode())
    assert stream.closed is not None and stream.closed[0] == CloseCode.REFUSED
    assert "3 receipts in a row" in stream.closed[1]
    assert not cb.permanent and len(cb.book.receipts()) == 1
    # the use comes; the next session signs
    cb.session_ended(stream)  # type: ignore[arg-type]
    again = FakeStream(signed_order())
    request_of(cb, again)
    packet(cb, again, PacketType.SUCCESS, Success(7).encode())
    cb.clock.advance(31)  # type: ignore[attr-defined]
    packet(cb, again, PacketType.SIGN_REQUEST, offer(prev=first.hash, addition=4).encode())
    assert again.sent[-1][0] == PacketType.SIGN_RESPONSE


def test_nothing_is_signed_while_a_receipt_waits_for_its_success(tmp_path: Path) -> None:
    """Before the first SUCCESS only the first receipt: a second one, however cheap, waits."""
    cb = billing(tmp_path)
    stream = FakeStream(signed_order())
    request_of(cb, stream)
    packet(cb, stream, PacketType.SIGN_REQUEST, offer().encode())
    first = Receipt.decode(stream.sent[-1][1])
    packet(cb, stream, PacketType.SIGN_REQUEST, offer(prev=first.hash, addition=1).encode())
    assert stream.sent[-1][0] == PacketType.ERROR and cb.receipts_signed == 1


def test_the_meter_is_carried_to_the_next_client_process(tmp_path: Path) -> None:
    """40 s used in one process, saved when the session ends; the next process signs at once."""
    cb, stream, first = granted(tmp_path)
    cb.clock.advance(40)  # type: ignore[attr-defined]
    cb.session_ended(stream)  # type: ignore[arg-type]
    restarted = billing(tmp_path)
    stream = FakeStream(signed_order())
    request_of(restarted, stream)
    packet(restarted, stream, PacketType.SIGN_REQUEST, offer(prev=first.hash, addition=9).encode())
    assert stream.sent[-1][0] == PacketType.SIGN_RESPONSE


@pytest.mark.parametrize(
    "code", [ErrorCode.NO_LEDGER, ErrorCode.CANT_ADD_USAGE, ErrorCode.NETWORK_IS_OFFLINE]
)
def test_transient_errors_are_not_a_permanent_stop(tmp_path: Path, code: int) -> None:
    """ "Try again" ERRORs close the session for a retry; a refusal for good stays permanent."""
    cb, stream, _ = granted(tmp_path)
    packet(cb, stream, PacketType.ERROR, Error(code, 7).encode())
    assert not cb.permanent and stream.closed is not None
    cb, stream, _ = granted(tmp_path / "other")
    packet(cb, stream, PacketType.ERROR, Error(ErrorCode.TX_COND_NOT_ENOUGH, 7).encode())
    assert cb.permanent


def test_bytes_nobody_signed_are_refused() -> None:
    """Extensions or a hash_type would change the receipt's hash under both signatures."""
    good = offer()
    reason = why(replace(good, exts=b"\x01\x02"))
    assert reason is not None and "2 bytes of extensions" in reason
    sig = good.signatures[0]
    odd = replace(good, signatures=(replace(sig, hash_type=1),))
    reason = why(odd)
    assert reason is not None and "hash_type 1" in reason


def test_a_torn_last_line_is_cut_off(tmp_path: Path) -> None:
    """A crash while a line was written: the torn tail (never sent) goes, the rest stays, and
    the next record starts on a line of its own."""
    client = KeyPair.generate()
    path = tmp_path / "receipts.jsonl"
    book = ReceiptBook(path)
    r1 = client_signed(offer(), client)
    book.signed(DEPOSIT, r1, PROVIDER.public)
    with open(path, "a") as f:
        f.write('{"event": "signed", "deposit": "ab')
    again = ReceiptBook(path)
    assert again.torn == b'{"event": "signed", "deposit": "ab'
    assert again.entries == book.entries
    # set aside next to the record, private, before the record was cut
    aside = again.torn_aside
    assert aside is not None and aside.parent == tmp_path
    assert aside.name.startswith("receipts.jsonl.torn-") and aside.name[20:].isdigit()
    assert aside.read_bytes() == b'{"event": "signed", "deposit": "ab'
    assert stat.S_IMODE(os.stat(aside).st_mode) == 0o600
    again.confirmed(DEPOSIT, r1.hash)
    lines = path.read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["signed", "confirmed"]


def test_a_second_torn_tail_in_the_same_second_gets_a_file_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Set-aside tails are never overwritten, even when two are cut within one second."""
    monkeypatch.setattr(receipts, "time", SimpleNamespace(time=lambda: 1700000000.5))
    path = tmp_path / "receipts.jsonl"
    path.write_bytes(b'{"event": "confirmed"}\n{"torn": 1')
    assert ReceiptBook(path).torn_aside == tmp_path / "receipts.jsonl.torn-1700000000"
    with open(path, "ab") as f:
        f.write(b'{"torn": 2')
    second = ReceiptBook(path).torn_aside
    assert second == tmp_path / "receipts.jsonl.torn-1700000000.1"
    assert (tmp_path / "receipts.jsonl.torn-1700000000").read_bytes() == b'{"torn": 1'
    assert second.read_bytes() == b'{"torn": 2'
    assert path.read_bytes() == b'{"event": "confirmed"}\n'


def test_the_client_says_where_a_torn_tail_was_set_aside(tmp_path: Path) -> None:
    record = tmp_path / "state" / "receipts.jsonl"
    record.parent.mkdir()
    record.write_bytes(b'{"event": "confirmed"}\n{"event": "sig')
    with capturedLogs() as events:
        cb = billing(tmp_path)
    aside = cb.book.torn_aside
    assert aside is not None and aside.read_bytes() == b'{"event": "sig'
    [line] = [formatEvent(e) for e in events if "torn" in formatEvent(e)]
    assert f"receipt record {record}: cut off a torn last line of 14 bytes" in line
    assert line.endswith(f"set aside as {aside}")


def test_an_intact_record_sets_nothing_aside(tmp_path: Path) -> None:
    path = tmp_path / "receipts.jsonl"
    path.write_bytes(b'{"event": "confirmed"}\n')
    book = ReceiptBook(path)
    assert book.torn is None and book.torn_aside is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["receipts.jsonl"]


def test_a_damaged_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "receipts.jsonl"
    path.write_text('{"event": "confirmed"}\nnot json\n{"event": "confirmed"}\n')
    with pytest.raises(ValueError, match=r"receipts\.jsonl line 2 is unreadable"):
        ReceiptBook(path)
