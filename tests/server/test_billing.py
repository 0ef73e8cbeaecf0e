"""The server's billing against dishonest and honest clients, on memory transports.

The server is cellvpn's own (``VPNServerService`` with ``ServerBilling``), its clock a
``MemoryReactorClock``; its ledger is a real SQLite file behind an adapter that answers at once
(the way ``AsyncLedger`` answers, as Deferreds) or, for a stalled ledger, holds a redemption
until the test lets it go.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer

from cellvpn.billing.interfaces import LedgerUnavailableError
from cellvpn.billing.keys import KeyPair
from cellvpn.billing.meter import Timer
from cellvpn.billing.proof import sign_request
from cellvpn.billing.records import DepositRequest, SignedDeposit, SignedOrder
from cellvpn.billing.sqlite import SqliteLedger
from cellvpn.server.billing import ServerBilling
from cellvpn.stream.connection import Established
from cellvpn.wire import vpn
from cellvpn.wire.channel import CHANNEL_R
from cellvpn.wire.receipt import Receipt, Signature, Unit
from cellvpn.wire.service import Error, ErrorCode, NotifyStopped, PacketType, Request
from tests.server.test_session import Client, ipv4, make_server

PROVIDER = KeyPair.generate()
UNITS = 1_000_000  # bytes per receipt
PRICE = 10
PAYLOAD = b"x" * 1372  # 1,400-byte IP packets


class Ledger:
    """A SqliteLedger whose calls answer as Deferreds; ``stall`` holds redemptions."""

    def __init__(self, path: Path) -> None:
        self.ledger = SqliteLedger(path)
        self.stall = False
        self.unavailable = 0
        self.held: list[tuple[defer.Deferred[Any], Callable[[], Any]]] = []
        #: calls made, by method name
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.ledger, name)

        def call(*args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            self.calls[name] = self.calls.get(name, 0) + 1
            if name == "redeem" and self.unavailable:
                self.unavailable -= 1
                return defer.fail(LedgerUnavailableError("database is locked"))
            if name == "redeem" and self.stall:
                d: defer.Deferred[Any] = defer.Deferred()
                self.held.append((d, lambda: method(*args, **kwargs)))
                return d
            try:
                return defer.succeed(method(*args, **kwargs))
            except Exception as e:  # handed on as a failed Deferred
                return defer.fail(e)

        return call

    def publish(self, order: Any, marker_prefix: str) -> defer.Deferred[int]:
        self.ledger.put_order(order)
        return defer.succeed(self.ledger.clear_active_usages(marker_prefix))

    def release(self) -> None:
        held, self.held = self.held, []
        for d, work in held:
            try:
                d.callback(work())
            except Exception as e:
                d.errback(e)


class Payer(Client):
    """A paying client: REQUEST with a key proof, then it signs what it is asked (or not)."""

    def __init__(self, server: Any, clock: Any, key: KeyPair, deposit: bytes) -> None:
        super().__init__(server, clock)
        self.key = key
        self.deposit = deposit
        self.signed: list[Receipt] = []

    @property
    def session_id(self) -> int:
        [est] = [e for e in self.events if isinstance(e, Established)]
        return est.welcome.session_id

    def paid_request(self) -> None:
        order = SignedOrder.decode(self.conn.welcome.order)  # type: ignore[union-attr]
        request = Request(tx_cond=self.deposit, order_hash=order.hash, token=b"CELL")
        body = sign_request(request, self.key, self.session_id).encode()
        self.conn.send_channel(CHANNEL_R, PacketType.REQUEST, body)
        self.pump()

    def asked(self) -> list[Receipt]:
        return [Receipt.decode(b) for t, b in self.r if t == PacketType.SIGN_REQUEST]

    def sign_last(self, forge: bool = False, then_request: bool = False) -> None:
        receipt = self.asked()[-1]
        sig = self.key.signature(receipt.info_bytes)
        if forge:
            sig = Signature(sig.public_key, bytes([sig.signature[0] ^ 1]) + sig.signature[1:])
        signed = receipt.with_signature(sig)
        self.signed.append(signed)
        self.conn.send_channel(CHANNEL_R, PacketType.SIGN_RESPONSE, signed.encode())
        if then_request:
            self.paid_request()  # in the same read
        self.pump()

    def types(self) -> list[int]:
        return [t for t, _ in self.r]

    def send_bytes(self, nbytes: int) -> None:
        """IP packets from the leased address, ``nbytes`` in all (1,400-byte packets)."""
        for _ in range(nbytes // 1400):
            self.send_ip(ipv4(self.address, "198.19.0.10", PAYLOAD))

    @property
    def address(self) -> str:
        reply = vpn.AddrReply.decode(self.s[0].data)
        return str(reply.client)

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


def paid_server(tmp_path: Path, **overrides: str) -> tuple[Any, Any, list[bytes], Ledger, KeyPair]:
    server, clock, written = make_server(
        tmp_path,
        **{
            "billing.price": str(PRICE),
            "billing.price_unit": "B",
            "billing.units": str(UNITS),
            **overrides,
        },
    )
    ledger = Ledger(tmp_path / "ledger.db")
    billing = ServerBilling(
        server,
        PROVIDER,
        ledger,
        server.config.billing,
        server.config.srv_vpn.grace_period,  # type: ignore[arg-type]
    )
    server.billing = billing
    ledger.put_order(billing.order)
    client = KeyPair.generate()
    return server, clock, written, ledger, client


def fund(ledger: Ledger, client: KeyPair, value: int) -> bytes:
    ledger.ledger.mint(client.account, value, client.public)
    request = DepositRequest(
        client.public, Unit.B, 1, value, int(time.time()) + 86400, secrets.token_bytes(16)
    )
    return ledger.ledger.create_deposit(SignedDeposit.sign(request, client), time.time()).id


def granted(tmp_path: Path, value: int = 100 * PRICE, **overrides: str) -> tuple[Any, ...]:
    server, clock, written, ledger, key = paid_server(tmp_path, **overrides)
    deposit = fund(ledger, key, value)
    c = Payer(server, clock, key, deposit)
    c.paid_request()
    assert c.types() == [PacketType.SIGN_REQUEST]
    c.sign_last()
    assert c.types()[-1] == PacketType.SUCCESS
    c.addr_request()
    return server, clock, written, ledger, key, deposit, c


def moved(ledger: Ledger, deposit: bytes, value: int = 100 * PRICE) -> int:
    row = ledger.ledger.get_deposit(deposit)
    assert row is not None
    return value - row.locked


def test_a_second_request_is_refused_and_closes_the_session(tmp_path: Path) -> None:
    """REQUEST right after SIGN_RESPONSE (the attack that turned metering off): ERROR, the
    session closed, counted; nothing passes; no timer of the bill is left behind."""
    server, clock, written, ledger, key = paid_server(tmp_path)
    deposit = fund(ledger, key, 100 * PRICE)
    c = Payer(server, clock, key, deposit)
    c.paid_request()
    c.sign_last(then_request=True)
    errors = [Error.decode(b).code for t, b in c.r if t == PacketType.ERROR]
    assert errors == [ErrorCode.CANT_ADD_USAGE]
    assert c.closed and server.refusals.counts["duplicate_request"] == 1
    c.lose()
    assert c.session.bill is None
    assert [call for call in clock.getDelayedCalls() if call.active()] == []
    assert written == [] and moved(ledger, deposit) <= PRICE


def test_a_second_request_in_grace_leaves_no_poller_behind(tmp_path: Path) -> None:
    """A REQUEST for a deposit the ledger does not know (grace: a poller and a grace timer
    run), then a second one: refused, closed, and once the session is gone none of the
    bill's timers is left; nothing was charged."""
    server, clock, _written, ledger, key = paid_server(tmp_path)
    c = Payer(server, clock, key, secrets.token_bytes(32))
    c.paid_request()
    bill = c.session.bill
    assert (
        bill is not None
        and bill.mode == "grace"
        and set(bill.timers)
        == {
            Timer.GRACE,
            Timer.POLL,
        }
    )
    c.paid_request()
    assert c.closed and server.refusals.counts["duplicate_request"] == 1
    c.lose()
    assert c.session.bill is None and bill.timers == {} and bill.meter.timers == ()
    assert [call for call in clock.getDelayedCalls() if call.active()] == []
    clock.advance(120)  # past grace_period: no timer fires for the gone bill
    assert ledger.calls.get("redeem", 0) == 0


def test_five_requests_in_one_read_are_refused_without_a_traceback(tmp_path: Path) -> None:
    server, clock, _, ledger, key = paid_server(tmp_path)
    deposit = fund(ledger, key, 100 * PRICE)
    c = Payer(server, clock, key, deposit)
    order = SignedOrder.decode(c.conn.welcome.order)  # type: ignore[union-attr]
    body = sign_request(
        Request(tx_cond=deposit, order_hash=order.hash, token=b"CELL"), key, c.session_id
    ).encode()
    for _ in range(5):
        c.conn.send_channel(CHANNEL_R, PacketType.REQUEST, body)
    c.pump()
    # the first extra one closes the session; the stream reads nothing after its CLOSE
    assert server.refusals.counts["duplicate_request"] == 1 and c.closed
    assert c.types().count(PacketType.SIGN_REQUEST) <= 1


def test_a_stalled_redemption_carries_at_most_the_credit(tmp_path: Path) -> None:
    """The next receipt is signed while the ledger stalls: traffic goes on to the credit
    (1 MiB past the paid units, but never more than half a receipt: 500,000 bytes here),
    then waits; when the ledger answers it goes on again."""
    _server, _clock, written, ledger, _key, deposit, c = granted(tmp_path)
    c.send_bytes(UNITS // 2 + 14_000)  # past half: the next receipt is asked for
    assert len(c.asked()) == 2
    ledger.stall = True
    c.sign_last()
    c.send_bytes(3 * UNITS)
    carried = sum(len(p) for p in written)
    assert UNITS + UNITS // 2 - 1400 <= carried <= UNITS + UNITS // 2 + 1400
    assert c.session.held
    before = len(written)
    c.send_bytes(14_000)
    assert len(written) == before  # held: nothing passes
    ledger.release()
    assert not c.session.held
    c.send_bytes(14_000)
    assert len(written) == before + 10
    assert moved(ledger, deposit) == 2 * PRICE


def test_an_unavailable_ledger_is_tried_again(tmp_path: Path) -> None:
    """Two 'database is locked' answers, then the redemption goes through: no refusal."""
    _server, clock, _written, ledger, _key, deposit, c = granted(tmp_path)
    c.send_bytes(UNITS // 2 + 14_000)
    ledger.unavailable = 2
    c.sign_last()
    clock.advance(1.0)
    clock.advance(1.0)
    c.pump()
    assert c.types().count(PacketType.SUCCESS) == 2 and not c.closed
    assert moved(ledger, deposit) == 2 * PRICE


def test_a_forged_client_signature_stops_at_once_and_bans_the_key(tmp_path: Path) -> None:
    """The next receipt answered with a signature that does not verify: no credit, the
    session stopped and closed, the key banned; nothing more passes."""
    _server, clock, written, ledger, key, deposit, c = granted(tmp_path)
    c.send_bytes(UNITS // 2 + 14_000)
    c.sign_last(forge=True)
    errors = [Error.decode(b).code for t, b in c.r if t == PacketType.ERROR]
    assert errors == [ErrorCode.RECEIPT_NO_SIGN]
    before = len(written)
    c.send_bytes(14_000)
    assert len(written) == before
    assert ledger.ledger.banned_until(PROVIDER.account, key.account, time.time()) is not None
    clock.advance(3)
    assert c.closed
    assert moved(ledger, deposit) == PRICE


def test_an_honest_client_running_dry_is_stopped_not_banned(tmp_path: Path) -> None:
    """A deposit for two receipts: the third cannot be paid; at zero NOTIFY_STOPPED (0x402)
    and the stream closes, but the key is not banned."""
    _server, _clock, written, ledger, key, deposit, c = granted(tmp_path, value=2 * PRICE)
    c.send_bytes(UNITS // 2 + 14_000)
    c.sign_last()
    c.send_bytes(2 * UNITS)
    stops = [NotifyStopped.decode(b) for t, b in c.r if t == PacketType.NOTIFY_STOPPED]
    assert [s.error.code for s in stops if s.error] == [ErrorCode.TX_COND_NOT_ENOUGH]
    carried = sum(len(p) for p in written)
    assert carried <= 2 * UNITS + 1400
    assert ledger.ledger.banned_until(PROVIDER.account, key.account, time.time()) is None
    assert moved(ledger, deposit, 2 * PRICE) == 2 * PRICE


def test_a_refused_request_leaves_the_saved_limits_alone(tmp_path: Path) -> None:
    """A REQUEST refused after its bill began (a deposit of another key) must not overwrite
    what the client saved from an earlier, paid session."""
    server, clock, _, ledger, key = paid_server(tmp_path)
    other = KeyPair.generate()
    foreign = fund(ledger, other, 100 * PRICE)
    ledger.ledger.save_limits(PROVIDER.account, key.account, 500_000, 0.0, time.time())
    c = Payer(server, clock, key, foreign)
    c.paid_request()
    errors = [Error.decode(b).code for t, b in c.r if t == PacketType.ERROR]
    assert errors == [ErrorCode.RECEIPT_WRONG_PKEY_HASH]
    c.lose()
    limits = ledger.ledger.load_limits(PROVIDER.account, key.account)
    assert limits is not None and limits.bytes_left == 500_000


def test_a_failed_periodic_save_does_not_stop_the_next(tmp_path: Path) -> None:
    """The ledger fails one save: counted and said; the next save_interval saves again."""
    server, clock, _written, ledger, key, _deposit, c = granted(tmp_path)
    billing = server.billing
    defer.ensureDeferred(billing.start())
    real = ledger.ledger.add_limits
    calls = {"n": 0}

    def flaky(*args: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise LedgerUnavailableError("disk I/O error")
        real(*args)

    ledger.ledger.add_limits = flaky  # type: ignore[method-assign]
    interval = server.config.billing.save_interval
    clock.advance(interval)
    assert billing.save_failures == 1 and billing._saver.running
    c.send_bytes(14_000)
    clock.advance(interval)
    assert calls["n"] == 2
    limits = ledger.ledger.load_limits(PROVIDER.account, key.account)
    assert limits is not None and 0 < limits.bytes_left < UNITS


def test_a_failed_save_at_the_end_still_releases_the_mark(tmp_path: Path) -> None:
    """The ledger fails the last save of a session: the deposit's mark is released anyway."""
    _server, _clock, _written, ledger, _key, deposit, c = granted(tmp_path)
    row = ledger.ledger.get_deposit(deposit)
    assert row is not None and row.active_usage is not None and row.active_until is not None

    def broken(*args: Any) -> None:
        raise LedgerUnavailableError("disk I/O error")

    ledger.ledger.add_limits = broken  # type: ignore[method-assign]
    c.lose()
    row = ledger.ledger.get_deposit(deposit)
    assert row is not None and row.active_usage is None


def test_two_servers_on_one_ledger_keep_their_own_marks(tmp_path: Path) -> None:
    """Two servers, one provider key, one ledger: the second one's start clears only its own
    marks (each names its instance), never the first one's live session."""
    server, _clock, _written, ledger, _key, deposit, _c = granted(tmp_path)
    assert server.billing.prefix.endswith("::")  # this test server's instance is ""
    other, _, _ = make_server(tmp_path / "b")
    second = ServerBilling(
        other,
        PROVIDER,
        ledger,
        other.config.billing,
        60.0,
        instance="b2",  # type: ignore[arg-type]
    )
    defer.ensureDeferred(second.start())
    row = ledger.ledger.get_deposit(deposit)
    assert row is not None and row.active_usage is not None
    assert row.active_usage.startswith(server.billing.prefix)


def test_two_deposits_of_one_client_keep_their_own_limits(tmp_path: Path) -> None:
    """A session on another deposit of the same client pays for itself instead of resuming
    with what the first deposit bought, and the first deposit's units wait for it."""
    server, clock, _written, ledger, key, first, c = granted(tmp_path)
    c.send_bytes(14_000)
    c.lose()
    saved = ledger.ledger.load_limits(PROVIDER.account, key.account, first)
    assert saved is not None and 0 < saved.bytes_left < UNITS
    second = fund(ledger, key, 100 * PRICE)
    other = Payer(server, clock, key, second)
    other.paid_request()
    assert other.types() == [PacketType.SIGN_REQUEST]
    other.sign_last()
    assert other.types()[-1] == PacketType.SUCCESS
    other.lose()
    again = Payer(server, clock, key, first)
    again.paid_request()
    assert again.types() == [PacketType.SUCCESS]  # resumed: nothing to sign
    again.lose()
    left = ledger.ledger.load_limits(PROVIDER.account, key.account, first)
    assert left is not None and left.bytes_left == saved.bytes_left
    assert moved(ledger, first) == PRICE and moved(ledger, second) == PRICE


def test_a_reload_prices_new_sessions_and_keeps_live_ones_on_their_order(
    tmp_path: Path,
) -> None:
    """SIGHUP with a new price: the live session's next receipt is at the price it agreed to,
    a session welcomed before the reload may still REQUEST by the order it was offered, and a
    session welcomed after it is offered (and billed by) the new order, stored in the ledger."""
    import dataclasses

    server, clock, _written, ledger, key, _deposit, live = granted(tmp_path)
    early = Payer(server, clock, key, fund(ledger, key, 100 * PRICE))
    old_order = server.billing.order
    new = dataclasses.replace(
        server.config, billing=dataclasses.replace(server.config.billing, price=3 * PRICE)
    )
    lines = server.reload(new).result
    assert lines == ["reload: applied [billing] price"]
    order = server.billing.order
    assert order.order.price == 3 * PRICE and order.hash != old_order.hash
    assert ledger.ledger.get_order(order.hash) is not None
    # the live session: its next receipt is still at PRICE
    live.send_bytes(UNITS // 2 + 20 * 1400)
    assert [r.info.value for r in live.asked()] == [PRICE, PRICE]
    # welcomed before the reload, asking after it: by the order it was offered
    early.paid_request()
    assert [r.info.value for r in early.asked()] == [PRICE]
    # welcomed after it: the new order
    other = KeyPair.generate()
    late = Payer(server, clock, other, fund(ledger, other, 100 * PRICE))
    assert SignedOrder.decode(late.conn.welcome.order).hash == order.hash  # type: ignore[union-attr]
    late.paid_request()
    assert [r.info.value for r in late.asked()] == [3 * PRICE]


def test_a_reload_that_turns_billing_off_waits_for_a_restart(tmp_path: Path) -> None:
    import dataclasses

    server, *_ = paid_server(tmp_path)
    new = dataclasses.replace(
        server.config, billing=dataclasses.replace(server.config.billing, price=0)
    )
    assert server.reload(new).result == ["reload: not applied (needs a restart): [billing] price"]
    assert server.config.billing.price == PRICE and server.billing.order.order.price == PRICE


def test_a_deposit_is_stopped_at_its_byte_cap(tmp_path: Path) -> None:
    """[billing] deposit_bytes = 100,000: traffic passes below it; at the next check (a
    second later) the session gets ERROR DEPOSIT_BYTES_CAP and closes; a new session on the
    same deposit is refused at REQUEST, since the cap counts the ended sessions too."""
    server, clock, written, _ledger, key, deposit, c = granted(
        tmp_path, **{"billing.deposit_bytes": "100000"}
    )
    c.send_bytes(70_000)
    clock.advance(1)
    c.pump()
    assert not [t for t in c.types() if t == PacketType.ERROR]
    c.send_bytes(70_000)
    clock.advance(1)
    c.pump()
    errors = [Error.decode(b).code for t, b in c.r if t == PacketType.ERROR]
    assert errors == [ErrorCode.DEPOSIT_BYTES_CAP]
    before = len(written)
    c.send_bytes(14_000)
    assert len(written) == before
    clock.advance(3)
    assert c.closed
    c.lose()
    again = Payer(server, clock, key, deposit)
    again.paid_request()
    errors = [Error.decode(b).code for t, b in again.r if t == PacketType.ERROR]
    assert errors == [ErrorCode.DEPOSIT_BYTES_CAP]
    assert server.billing.deposit_capped == 2


def test_without_a_cap_a_deposit_carries_on(tmp_path: Path) -> None:
    _server, clock, written, _ledger, _key, _deposit, c = granted(tmp_path)
    c.send_bytes(140_000)
    clock.advance(2)
    c.pump()
    assert not [t for t in c.types() if t == PacketType.ERROR]
    assert len(written) == 100  # 100 packets of 1,392 bytes
