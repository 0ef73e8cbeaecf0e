"""The server's side of billing on channel 'R': who pays, how much is left, when to ask again.

The flow keeps the original's shape (REQUEST -> SIGN_REQUEST <-> SIGN_RESPONSE -> SUCCESS, or
ERROR; NOTIFY_STOPPED at the end) on cellvpn's own ledger:

- REQUEST names a deposit and the server's order and proves the client's key (see
  :mod:`cellvpn.billing.proof`). A banned key is refused at once. A deposit the ledger does not
  know yet gets GRACE: service for ``grace_period`` seconds while the ledger is polled; a
  deposit that never shows up ends in ERROR and a ban of ``grace_period * 50`` seconds.
- A known deposit is checked (owner, service, unit, price, funds) and marked in use by this
  session (one usage per deposit: a newer session of the same client takes it over). Limits
  saved from an earlier session of this client are used first; otherwise the first receipt is
  asked for (``receipt_timeout`` seconds, ``receipt_attempts`` times), redeemed in the ledger,
  and only then is the service granted.
- Limits count seconds (SEC) or IP bytes both ways, L4 proxy bytes included (B). When half of
  the current receipt is left the next receipt is asked for; at zero without one, the session
  gets NOTIFY_STOPPED on 'R', not one more packet passes, and the stream is closed.
- Remaining limits are saved every ``save_interval`` seconds and when the session ends, so a
  killed server loses at most that much usage, always in the client's favour; receipts chain on
  the deposit's state hash, so nothing is ever charged twice.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from cellvpn.billing.asyncledger import AsyncLedger
from cellvpn.billing.interfaces import DepositRow, LedgerError, LedgerUnavailableError
from cellvpn.billing.keys import KeyPair, account_of, signed_by
from cellvpn.billing.meter import BillInput, BillState, Reading, decide, new_bill_machine
from cellvpn.billing.proof import proven_key
from cellvpn.billing.records import Order, SignedDeposit, SignedOrder, receipt_units_value_ok
from cellvpn.config.schema import BillingSection
from cellvpn.fsm import Machine
from cellvpn.server.edge import Refusal
from cellvpn.server.sourceprefix import source_prefix
from cellvpn.server.usage import UsageInput, UsageState
from cellvpn.wire.errors import DecodeError
from cellvpn.wire.receipt import Receipt, ReceiptInfo, Unit
from cellvpn.wire.service import SRV_UID_VPN, Error, ErrorCode, PacketType, Request, Success
from cellvpn.wire.setup import CloseCode

if TYPE_CHECKING:
    from cellvpn.server.service import VPNServerService
    from cellvpn.server.session import ServerSession

#: An allowance that is never used up (free service, grace).
UNMETERED = 1 << 62
#: Seconds between looks at the ledger for a deposit during grace.
GRACE_POLL = 1.0
#: Seconds between the NOTIFY_STOPPED and the close, so the client reads why.
STOP_LINGER = 2.0
#: How long an order the server publishes stays valid (it is renewed at every start).
ORDER_LIFETIME = 30 * 86400
#: Ledger answers that show a client cheating (a forged or foreign signature, a fork or
#: replay): the session stops and the key is banned. Others (the deposit ran dry or expired)
#: are an honest client's end: stopped at zero, no ban.
FRAUD = frozenset(
    {ErrorCode.RECEIPT_NO_SIGN, ErrorCode.RECEIPT_WRONG_PKEY_HASH, ErrorCode.WRONG_HASH}
)
#: Seconds between tries of a redemption while the ledger is unavailable.
REDEEM_RETRY = 1.0


@dataclass
class Bill:
    """One session's billing state."""

    client_public: bytes
    client: bytes
    deposit_id: bytes
    unit: int = Unit.SEC
    #: the order this session pays by: the one it was offered, kept when a reload changes it
    order: Order | None = None
    #: idle, grace, paid, stopped: the bill's life (``cellvpn.billing.meter``)
    life: Machine[BillState, BillInput] = field(default_factory=new_bill_machine)
    #: units left (bytes or seconds) of what was paid for
    limit: float = 0
    #: the allowance handed to the forwarder when it was last armed (B)
    armed: int = 0
    locked_left: int = 0
    #: the deposit's state hash: the prev hash of the next receipt
    state_hash: bytes = bytes(32)
    pending: Receipt | None = None
    pending_kind: str = ""
    attempts: int = 0
    timer: IDelayedCall | None = None
    next_failed: ErrorCode | None = None
    #: a signed receipt is in the ledger's hands: at zero, carry on (into debt) until it is done
    redeeming: bool = False
    #: fires once that receipt's outcome is booked on this bill (the session's end waits for it)
    redemption: defer.Deferred[None] | None = None
    marker: str = ""
    grace_timer: IDelayedCall | None = None
    poller: LoopingCall | None = None
    ticker: LoopingCall | None = None
    last_tick: float = 0.0
    paid_value: int = 0
    started: float = 0.0
    saved_bytes: int = 0
    saved_seconds: float = 0.0
    receipts: int = 0
    #: when NOTIFY_STOPPED went out (wall clock), for reports
    stopped_at: float | None = None
    #: traffic is held: the credit of a pending redemption, or the grace bytes, are used up
    held: bool = False
    #: the budgets this session's grace is booked against: its key and its source prefix
    subjects: tuple[str, ...] = ()
    #: grace: when it began (the reactor's clock), the bytes counter then, what it used
    grace_since: float | None = None
    grace_bytes_at: int = 0
    grace_seconds: float = 0.0
    grace_bytes: int = 0
    #: the session has traffic in grace (False: out of budget, it must pay first)
    grace_service: bool = False
    #: the service was granted on paid terms (a receipt, or saved limits) at some point
    metered: bool = False
    #: ``limit`` as the ledger's saved limits have it (what the last save or redemption left)
    synced: float = 0.0

    @property
    def mode(self) -> str:
        return self.life.state.value


class ServerBilling:
    """Billing for every session of one server."""

    log = Logger()

    def __init__(
        self,
        server: VPNServerService,
        key: KeyPair,
        ledger: AsyncLedger,
        config: BillingSection,
        grace_period: float,
        instance: str = "",
    ) -> None:
        self.server = server
        self.key = key
        self.ledger = ledger
        self.config = config
        self.grace_period = grace_period
        #: the one clock of billing's timers and durations (tests drive it with task.Clock)
        self.clock = server.reactor
        #: grace refused for want of budget; keys banned for fraud
        self.grace_refused = 0
        self.banned = 0
        self.save_failures = 0
        self.order = self._sign(config)
        #: marks name the provider and this server instance (``instance``, kept in
        #: state_dir), so a restarted server knows its own and two servers never share them
        self.prefix = f"{key.account_hex}:{instance}:"
        self._saver: LoopingCall | None = None
        self.redeemed = 0
        self.refused = 0
        #: receipts the clients answered with an ERROR instead of a signature
        self.client_refusals = 0
        #: bytes the ended sessions of each deposit carried (``deposit_bytes``), this run
        self.deposit_carried: dict[bytes, int] = {}
        #: sessions stopped at ``deposit_bytes``
        self.deposit_capped = 0
        self._cap_loop: LoopingCall | None = None

    # --- start and stop -------------------------------------------------------------------

    async def start(self) -> None:
        cleared = await self.ledger.publish(self.order, self.prefix)
        if cleared:
            self.log.info("released {n} deposit(s) marked in use by an earlier run", n=cleared)
        saver = LoopingCall(self.save_all)
        saver.clock = self.server.reactor
        saver.start(self.config.save_interval, now=False)
        self._saver = saver
        self.log.info(
            "billing: order {order} = {price} {token} per {units} {unit}, provider {account}",
            order=self.order.hash.hex()[:16],
            price=self.config.price,
            token=self.config.token,
            units=self.config.units,
            unit=self.config.price_unit.value,
            account=self.key.account_hex,
        )

    def _sign(self, config: BillingSection) -> SignedOrder:
        unit = Unit.SEC if config.price_unit.value == "SEC" else Unit.B
        order = Order(
            unit=unit,
            units=config.units,
            price=config.price,
            token=config.token,
            provider=self.key.public,
            expires=int(time.time()) + ORDER_LIFETIME,
        )
        return SignedOrder.sign(order, self.key)

    async def reconfigure(self, config: BillingSection) -> bool:
        """A reload's [billing]: its other keys at once, a new order (price, units, unit,
        token) for the sessions that come after it. A session keeps the order it was offered,
        so what a client agreed to never changes under it. True when the order changed."""
        self.config = config
        order = self._sign(config)
        if _terms(order.order) == _terms(self.order.order):
            return False
        await self.ledger.put_order(order)  # in the ledger before any client is offered it
        self.order = order
        self.log.info(
            "billing: order {order} = {price} {token} per {units} {unit} for new sessions",
            order=order.hash.hex()[:16],
            price=config.price,
            token=config.token,
            units=config.units,
            unit=config.price_unit.value,
        )
        return True

    async def stop(self) -> None:
        if self._saver is not None and self._saver.running:
            self._saver.stop()
        for session in self.server.sessions:
            await self._finish(session)

    def welcome_order(self, session: ServerSession | None = None) -> bytes:
        """The order WELCOME offers; ``session`` is held to it (a reload changes only the
        order of sessions welcomed after it)."""
        if session is not None:
            session.order_offered = self.order
        return self.order.encode()

    def _order(self, bill: Bill) -> Order:
        return bill.order if bill.order is not None else self.order.order

    # --- REQUEST ------------------------------------------------------------------------------

    def request(self, session: ServerSession, request: Request) -> None:
        d = defer.Deferred.fromCoroutine(self._request(session, request))
        d.addErrback(self._failed, session, "handling REQUEST")

    def _failed(self, failure: Any, session: ServerSession, what: str) -> None:
        if failure.check(LedgerUnavailableError):
            self._refuse(session, ErrorCode.NO_LEDGER, f"ledger unavailable: {failure.value}")
            return
        self.log.failure("billing failed while {what}", failure, what=what)
        self._refuse(session, ErrorCode.REQUEST_INTERNAL_ERROR, f"internal error while {what}")

    async def _request(self, session: ServerSession, request: Request) -> None:
        if request.order_hash == bytes(32):
            self._refuse(session, ErrorCode.NO_ORDER_HASH, "REQUEST names no order")
            return
        if request.tx_cond == bytes(32):
            self._refuse(session, ErrorCode.NO_TX_HASH, "REQUEST names no deposit")
            return
        offered = session.order_offered or self.order
        if request.order_hash != offered.hash:
            self._refuse(session, ErrorCode.PRICE_ERROR, "REQUEST names another order")
            return
        if request.srv_uid != SRV_UID_VPN:
            self._refuse(session, ErrorCode.SERVICE_NOT_FOUND, "REQUEST is not for the VPN")
            return
        try:
            public = proven_key(request, session.session_id or 0)
        except DecodeError as e:
            self._refuse(session, ErrorCode.RECEIPT_WRONG_PKEY_HASH, str(e))
            return
        client = account_of(public)
        if session.identity is None or session.identity.startswith("token:"):
            session.identity = f"key:{client.hex()}"  # sticky leases follow the proven key
        session.key = f"key:{client.hex()}"
        why = self.server.key_limit(session)
        if why is not None:
            self.server.refusal(Refusal.SESSIONS_PER_KEY, session, why)
            self._refuse(session, ErrorCode.TOO_MANY_SESSIONS, why, close=True)
            return
        session.counted = True
        now = time.time()
        banned = await self.ledger.banned_until(self.key.account, client, now)
        if banned is not None:
            self._refuse(
                session,
                ErrorCode.RECEIPT_BANNED_PKEY_HASH,
                f"key {client.hex()[:16]} is banned for {banned - now:.0f} s more",
            )
            return
        section = self.server.config.server
        prefix = source_prefix(
            _host(session.peer), section.source_prefix_v4, section.source_prefix_v6
        )
        bill = Bill(
            client_public=public,
            client=client,
            deposit_id=request.tx_cond,
            order=offered.order,
            started=self.clock.seconds(),
            subjects=(f"key:{client.hex()}", f"net:{prefix}"),
        )
        session.bill = bill
        if self.config.deposit_bytes:
            why = self.over_deposit_cap(session)
            if why is not None:
                self._cap_reached(session, why)
                return
            self._watch_caps()
        deposit = await self.ledger.get_deposit(request.tx_cond)
        if session.ended:
            return
        if deposit is None:
            await self._grace(session, bill)
            return
        await self._pay(session, bill, deposit)

    # --- grace --------------------------------------------------------------------------------

    async def _grace(self, session: ServerSession, bill: Bill) -> None:
        host = _host(session.peer)
        in_grace = sum(
            1
            for s in self.server.sessions
            if s is not session
            and s.bill is not None
            and s.bill.mode == "grace"
            and _host(s.peer) == host
        )
        if in_grace >= self.config.grace_per_address:
            self._refuse(
                session,
                ErrorCode.TX_COND_NOT_FOUND,
                f"deposit not in the ledger and {host} already has {in_grace} grace session(s)",
            )
            return
        bill.life.fire(BillInput.GRACE)
        bill.grace_service = await self._grace_left(bill)
        if session.ended:
            return
        if bill.grace_service:
            bill.grace_since = self.clock.seconds()
            bill.grace_bytes_at = _carried(session)
            # grace traffic has a cap: at it, traffic waits for the first receipt
            session.allowance = max(1, self.config.grace_bytes)
            session.grant(UsageInput.GRANT_GRACE)
        else:
            self.grace_refused += 1
            self.log.info(
                "session {sid}: no grace left for {subjects}: nothing passes before the "
                "first receipt",
                sid=_sid(session),
                subjects=", ".join(bill.subjects),
            )
        clock = self.server.reactor
        bill.grace_timer = clock.callLater(self.grace_period, self._grace_over, session)
        poller = LoopingCall(self._poll, session)
        poller.clock = clock
        poller.start(GRACE_POLL, now=False).addErrback(self._failed, session, "polling")
        bill.poller = poller
        self.log.info(
            "session {sid}: deposit {dep} not in the ledger yet: grace for {grace:g} s",
            sid=_sid(session),
            dep=bill.deposit_id.hex()[:16],
            grace=self.grace_period,
        )

    async def _grace_left(self, bill: Bill) -> bool:
        """Whether every budget this grace counts against (key, source prefix) has room."""
        since = time.time() - self.config.grace_window
        for subject in bill.subjects:
            seconds, nbytes = await self.ledger.grace_used(self.key.account, subject, since)
            if (
                seconds >= self.config.grace_budget_seconds
                or nbytes >= self.config.grace_budget_bytes
            ):
                return False
        return True

    async def _end_grace(self, session: ServerSession, bill: Bill) -> None:
        """Grace is over (paid, failed, or the session ended): book what it used."""
        if bill.grace_since is None:
            return
        bill.grace_seconds = self.clock.seconds() - bill.grace_since
        bill.grace_bytes = _carried(session) - bill.grace_bytes_at
        bill.grace_since = None
        # what grace carried is booked as grace, not as paid, in the usage report
        bill.saved_seconds += bill.grace_seconds
        bill.saved_bytes += bill.grace_bytes
        await self.ledger.book_grace(
            self.key.account, bill.subjects, time.time(), bill.grace_seconds, bill.grace_bytes
        )
        await self.ledger.add_usage(
            self.key.account, bill.client, "grace", bill.grace_seconds, bill.grace_bytes, 0
        )

    async def _poll(self, session: ServerSession) -> None:
        bill = session.bill
        if bill is None or bill.mode != "grace" or session.ended:
            return
        deposit = await self.ledger.get_deposit(bill.deposit_id)
        if deposit is not None and bill.mode == "grace" and not session.ended:
            _stop_loop(bill.poller)
            _cancel(bill.grace_timer)
            self.log.info("session {sid}: deposit appeared in the ledger", sid=_sid(session))
            await self._pay(session, bill, deposit)

    def _grace_over(self, session: ServerSession) -> None:
        bill = session.bill
        if bill is None or bill.mode != "grace":
            return
        _stop_loop(bill.poller)
        self._ban(session, bill, self.grace_period * 50)
        self._refuse(
            session,
            ErrorCode.TX_COND_NOT_FOUND,
            f"deposit never appeared within {self.grace_period:g} s: key banned for "
            f"{self.grace_period * 50:g} s",
            close=True,
        )

    def _ban(self, session: ServerSession, bill: Bill, seconds: float) -> None:
        """Ban the session's key for ``seconds`` (grace ended unpaid, or fraud)."""
        self.banned += 1
        d = defer.Deferred.fromCoroutine(self._end_grace(session, bill))
        d.addCallback(
            lambda _: self.ledger.ban(self.key.account, bill.client, time.time() + seconds)
        )
        d.addErrback(self._failed, session, "banning")

    # --- paying -------------------------------------------------------------------------------

    def _check_deposit(self, bill: Bill, deposit: DepositRow) -> tuple[ErrorCode, str] | None:
        order = self._order(bill)
        if deposit.owner != bill.client:
            return ErrorCode.RECEIPT_WRONG_PKEY_HASH, "the deposit belongs to another key"
        if deposit.srv_uid != SRV_UID_VPN:
            return ErrorCode.TX_COND_WRONG_SRV_UID, "the deposit is for another service"
        if deposit.closed or deposit.expired(time.time()):
            return ErrorCode.TX_COND_NOT_FOUND, "the deposit is closed or expired"
        if deposit.unit != order.unit:
            return ErrorCode.UNIT_TYPE_ERROR, "the deposit pays for another unit"
        if not receipt_units_value_ok(order.price, order.units, deposit.max_unit_price):
            return ErrorCode.RECEIPT_UNITS_ERROR, "the price is above the deposit's maximum"
        return None

    async def _pay(self, session: ServerSession, bill: Bill, deposit: DepositRow) -> None:
        problem = self._check_deposit(bill, deposit)
        if problem is not None:
            if bill.mode == "grace":
                # grace ended unpaid (a deposit that cannot pay is no payment): as the original
                self._ban(session, bill, self.grace_period * 50)
            self._refuse(session, *problem, close=bill.mode == "grace")
            return
        if not await self._mark(session, bill, deposit):
            return
        if deposit.active_usage is not None:
            # taken over from an older session: it may have redeemed a receipt meanwhile
            deposit = await self.ledger.get_deposit(bill.deposit_id) or deposit
        bill.unit = deposit.unit
        bill.locked_left = deposit.locked
        bill.state_hash = deposit.state_hash
        limits = None
        if not any(
            s is not session and s.bill is not None and s.bill.deposit_id == bill.deposit_id
            for s in self.server.sessions
        ):
            limits = await self.ledger.load_limits(self.key.account, bill.client, bill.deposit_id)
        if session.ended:
            return
        left: float = 0
        if limits is not None:
            left = limits.bytes_left if bill.unit == Unit.B else limits.seconds_left
        if left > 0:
            bill.limit = bill.synced = left
            self.log.info(
                "session {sid}: resuming with {left} {unit} saved from an earlier session",
                sid=_sid(session),
                left=int(left),
                unit=_unit_name(bill.unit),
            )
            self._paid(session, bill)
            return
        if bill.locked_left < self._order(bill).price:
            if bill.mode == "grace":
                self._ban(session, bill, self.grace_period * 50)
            self._refuse(
                session,
                ErrorCode.TX_COND_NOT_ENOUGH,
                "the deposit cannot pay one receipt",
                close=bill.mode == "grace",
            )
            return
        self._ask(session, bill, "first", bill.state_hash)

    async def _mark(self, session: ServerSession, bill: Bill, deposit: DepositRow) -> bool:
        """One usage per deposit: take it, take it over from our own older session, or from
        a server that stopped renewing its mark (killed and gone)."""
        marker = f"{self.prefix}{session.session_id or 0:08x}"
        current = deposit.active_usage
        now = time.time()
        if current is not None and current != marker:
            if current.startswith(self.prefix):
                old = self.server.sessions.get(int(current[len(self.prefix) :], 16))
                if old is not None and old is not session:
                    self.log.info(
                        "session {sid} takes over deposit {dep} from session {old}",
                        sid=_sid(session),
                        dep=bill.deposit_id.hex()[:16],
                        old=_sid(old),
                    )
                    await self._finish(old)
                    old.close(CloseCode.TAKEN_OVER, "a newer session took over the deposit")
            elif deposit.stale(now):
                self.log.info(
                    "session {sid} takes over deposit {dep} from a stale mark ({mark})",
                    sid=_sid(session),
                    dep=bill.deposit_id.hex()[:16],
                    mark=current,
                )
            else:
                self._refuse(
                    session, ErrorCode.CANT_ADD_USAGE, "the deposit is in use on another server"
                )
                return False
        ok = await self.ledger.set_active_usage(
            bill.deposit_id, marker, only_if=current, until=now + self.config.mark_ttl, now=now
        )
        if not ok:
            self._refuse(session, ErrorCode.CANT_ADD_USAGE, "the deposit is in use")
            return False
        bill.marker = marker
        return True

    def _ask(self, session: ServerSession, bill: Bill, kind: str, prev: bytes) -> None:
        """Issue a receipt signed by the provider: SIGN_REQUEST."""
        order = self._order(bill)
        info = ReceiptInfo(
            srv_uid=SRV_UID_VPN,
            units_type=order.unit,
            units=order.units,
            value=order.price,
            prev_hash=prev,
            # a fresh number each time: a receipt asked for again (its signed answer lost on
            # the way) is a new receipt the client may sign; both name the same prev, so the
            # ledger redeems at most one of them
            addition=secrets.randbits(63),
        )
        receipt = Receipt(info, (self.key.signature(info.encode()),))
        bill.pending = receipt
        bill.pending_kind = kind
        bill.attempts = 0
        self._send_pending(session, bill)

    def _send_pending(self, session: ServerSession, bill: Bill) -> None:
        if bill.pending is None or session.ended:
            return
        bill.attempts += 1
        session.send_service(PacketType.SIGN_REQUEST, bill.pending.encode())
        session.flush()
        bill.timer = self.server.reactor.callLater(
            self.config.receipt_timeout, self._receipt_timeout, session
        )

    def _receipt_timeout(self, session: ServerSession) -> None:
        bill = session.bill
        if bill is None or bill.pending is None:
            return
        bill.timer = None
        if bill.attempts < self.config.receipt_attempts:
            self._send_pending(session, bill)
            return
        kind = bill.pending_kind
        bill.pending = None
        if kind == "first":
            self._refuse(
                session,
                ErrorCode.RECEIPT_NO_SIGN,
                f"no signed receipt after {bill.attempts} attempts",
                close=True,
            )
        else:
            # as the original: the client keeps what it paid for, then the service stops
            bill.next_failed = ErrorCode.RECEIPT_NO_SIGN
            self.log.info(
                "session {sid}: the next receipt was not signed; service ends with the limits",
                sid=_sid(session),
            )
            self._rearm(session, bill)

    def service_packet(self, session: ServerSession, ptype: int, data: memoryview) -> bool:
        if ptype == PacketType.SIGN_RESPONSE:
            bill = session.bill
            busy = bill is not None and bill.redeeming
            d = defer.Deferred.fromCoroutine(self._signed(session, Receipt.decode(data)))
            d.addErrback(self._failed, session, "redeeming a receipt")
            if bill is not None and bill.redeeming and not busy:
                bill.redemption = d  # this one went to the ledger
            return True
        if ptype == PacketType.ERROR:
            # the client refused to sign (asked too early by its meter): the receipt stays
            # pending and is asked for again after receipt_timeout
            self.client_refusals += 1
            self.server.refusal(
                Refusal.SIGN_RESPONSE,
                session,
                f"the client did not sign the receipt ({Error.decode(data).name})",
            )
            return True
        if ptype == PacketType.DEPOSIT_CREATE:
            signed = SignedDeposit.decode(data)
            if session.deposit_created or session.requested:
                # one is all a client needs, before its REQUEST; more would only queue
                # ledger work (and log lines) that nobody pays for
                self.server.refusal(
                    Refusal.DEPOSIT_CREATE,
                    session,
                    "more than one DEPOSIT_CREATE, or after REQUEST",
                )
                session.close(CloseCode.REFUSED, "one DEPOSIT_CREATE per session, before REQUEST")
                return True
            session.deposit_created = True
            d = defer.Deferred.fromCoroutine(self._create(session, signed))
            d.addErrback(self._failed, session, "creating a deposit")
            return True
        return False

    async def _signed(self, session: ServerSession, receipt: Receipt) -> None:
        bill = session.bill
        pending = bill.pending if bill is not None else None
        if bill is None or pending is None or receipt.info_bytes != pending.info_bytes:
            self.refused += 1
            self._error(session, ErrorCode.RECEIPT_CANT_FIND, "SIGN_RESPONSE for no receipt")
            return
        if receipt.info.version != 2:
            self._error(session, ErrorCode.RECEIPT_WRONG_VERSION, "receipt version")
            return
        if len(receipt.signatures) < 2 or receipt.signatures[1].public_key != bill.client_public:
            self._error(session, ErrorCode.RECEIPT_NO_SIGN, "the receipt lacks the client's sign")
            return
        forged = _forged(receipt, pending, bill.client_public)
        if forged is not None:
            # checked here, before the receipt buys any credit: a forged signature would
            # otherwise carry traffic until the ledger refused it
            self.refused += 1
            bill.pending = None
            _cancel(bill.timer)
            self._fraud(session, bill, ErrorCode.RECEIPT_NO_SIGN, forged)
            return
        bill.pending = None
        _cancel(bill.timer)
        kind = bill.pending_kind
        bill.redeeming = True
        try:
            result = await self._redeem(session, bill, receipt)
        except LedgerError as e:
            bill.redeeming = False
            self._release(session, bill)
            self.refused += 1
            self.log.info(
                "session {sid}: receipt refused by the ledger: {why}",
                sid=_sid(session),
                why=e.summary,
            )
            if e.code in FRAUD:
                self._fraud(session, bill, e.code, e.summary)
            elif kind == "first":
                self._refuse(session, e.code, e.summary, close=True)
            else:
                # the deposit ran dry or expired: an honest end, at zero, with no ban
                bill.next_failed = e.code
                self._rearm(session, bill)
            return
        bill.redeeming = False
        self.redeemed += 1
        bill.receipts += 1
        bill.locked_left = result.locked_left
        bill.state_hash = result.receipt_hash
        bill.paid_value += result.value
        bill.limit += receipt.info.units
        bill.synced += receipt.info.units  # the ledger added them in the redemption
        if bill.mode == "grace":
            # the first receipt pays for the grace actually used, as the original counts it
            await self._end_grace(session, bill)
            bill.limit -= bill.grace_seconds if bill.unit == Unit.SEC else bill.grace_bytes
        self.log.info(
            "session {sid}: receipt {hash} redeemed: {value} {token} for {units} {unit}, "
            "{left} left in the deposit",
            sid=_sid(session),
            hash=result.receipt_hash.hex()[:16],
            value=result.value,
            token=self.config.token,
            units=receipt.info.units,
            unit=_unit_name(bill.unit),
            left=result.locked_left,
        )
        if session.ended:
            return
        self._release(session, bill)
        if bill.mode in ("idle", "grace"):
            self._paid(session, bill)
        else:
            session.send_service(PacketType.SUCCESS, Success(session.usage_id).encode())
            session.flush()
            self._rearm(session, bill)

    async def _redeem(self, session: ServerSession, bill: Bill, receipt: Receipt) -> Any:
        """The ledger's answer; while it is unavailable, tried again each second for up to
        ``receipt_timeout`` (traffic waits at the credit meanwhile), then NO_LEDGER."""
        deadline = self.clock.seconds() + self.config.receipt_timeout
        while True:
            try:
                return await self.ledger.redeem(
                    receipt, bill.deposit_id, self.key.public, time.time()
                )
            except LedgerUnavailableError as e:
                if session.ended or self.clock.seconds() >= deadline:
                    raise LedgerError(ErrorCode.NO_LEDGER, f"ledger unavailable: {e}") from e
                await task.deferLater(self.clock, REDEEM_RETRY, lambda: None)

    def _fraud(self, session: ServerSession, bill: Bill, code: int, why: str) -> None:
        """A forged or foreign signature, a fork or a replay: stop at once and ban the key."""
        self._ban(session, bill, self.grace_period * 50)
        self.log.warn(
            "session {sid} with {peer}: {why}: stopped, key {key} banned for {ban:g} s",
            sid=_sid(session),
            peer=session.peer,
            why=why,
            key=bill.client.hex()[:16],
            ban=self.grace_period * 50,
        )
        self._refuse(session, code, why, close=True)

    def _release(self, session: ServerSession, bill: Bill) -> None:
        """Traffic held at the credit (or the grace cap) goes on."""
        if bill.held:
            bill.held = False
            session.hold(False)

    def _paid(self, session: ServerSession, bill: Bill) -> None:
        """The first payment (or saved limits): the service is granted, metering starts."""
        if bill.grace_since is not None:  # resumed from saved limits during grace
            d = defer.Deferred.fromCoroutine(self._end_grace(session, bill))
            d.addErrback(self._failed, session, "booking grace")
        bill.life.fire(BillInput.PAID)
        bill.metered = True
        if session.usage.state is UsageState.IDLE:
            session.grant(UsageInput.PAID)
        else:
            session.usage.fire(UsageInput.PAID)
            session.send_service(PacketType.SUCCESS, Success(session.usage_id).encode())
            session.flush()
        bill.last_tick = self.clock.seconds()
        bill.armed = session.allowance  # nothing of the metered kind has passed yet
        if bill.unit == Unit.SEC:
            session.allowance = UNMETERED
            ticker = LoopingCall(self._tick, session)
            ticker.clock = self.server.reactor
            ticker.start(1.0, now=False)
            bill.ticker = ticker
        self._rearm(session, bill)

    async def _create(self, session: ServerSession, signed: SignedDeposit) -> None:
        try:
            row = await self.ledger.create_deposit(signed, time.time())
        except LedgerError as e:
            self._error(session, e.code, f"deposit refused: {e.summary}", Refusal.DEPOSIT_CREATE)
            return
        self.log.info(
            "session {sid}: deposit {dep} created: {value} locked",
            sid=_sid(session),
            dep=row.id.hex()[:16],
            value=row.locked,
        )
        session.send_service(PacketType.DEPOSIT_CREATED, row.id)
        session.flush()

    # --- metering -----------------------------------------------------------------------------

    # --- the deposit cap ------------------------------------------------------------------

    def over_deposit_cap(self, session: ServerSession) -> str | None:
        """Why the session's deposit is at ``[billing] deposit_bytes``, or None."""
        cap = self.config.deposit_bytes
        bill = session.bill
        if not cap or bill is None:
            return None
        used = self.deposit_carried.get(bill.deposit_id, 0) + _carried(session)
        if used < cap:
            return None
        return (
            f"deposit {bill.deposit_id.hex()[:16]} carried {used} bytes, its cap"
            f" ([billing] deposit_bytes) is {cap}"
        )

    def _watch_caps(self) -> None:
        """Look at every billed session's deposit each second while a cap is set."""
        if self._cap_loop is None:
            loop = LoopingCall(self._check_caps)
            loop.clock = self.server.reactor
            loop.start(1.0, now=False)
            self._cap_loop = loop

    def _check_caps(self) -> None:
        if not self.config.deposit_bytes:
            return
        for session in self.server.sessions:
            if session.bill is not None and session.active:
                why = self.over_deposit_cap(session)
                if why is not None:
                    self._cap_reached(session, why)

    def _cap_reached(self, session: ServerSession, why: str) -> None:
        self.deposit_capped += 1
        self.log.info("session {sid}: stopped: {why}", sid=_sid(session), why=why)
        self._refuse(session, ErrorCode.DEPOSIT_BYTES_CAP, why, close=True)

    def allowance_used(self, session: ServerSession) -> None:
        """The forwarder used up the byte allowance: account for it and look again."""
        if self.config.deposit_bytes and session.active:
            why = self.over_deposit_cap(session)
            if why is not None:
                self._cap_reached(session, why)
                return
        bill = session.bill
        if bill is not None and bill.mode == "grace" and bill.grace_service:
            # the grace bytes are spent: traffic waits for the first receipt
            if not bill.held:
                bill.held = True
                session.hold(True)
            session.allowance = UNMETERED
            return
        if bill is None or bill.mode != "paid" or bill.unit != Unit.B:
            session.allowance = UNMETERED
            return
        self._rearm(session, bill)

    def _tick(self, session: ServerSession) -> None:
        bill = session.bill
        if bill is None or bill.mode != "paid":
            return
        now = self.clock.seconds()
        if not bill.held:  # held time is no service
            bill.limit -= now - bill.last_tick
        bill.last_tick = now
        self._rearm(session, bill)

    def _used_bytes_now(self, session: ServerSession, bill: Bill) -> None:
        if bill.unit == Unit.B and bill.mode == "paid":
            bill.limit -= bill.armed - session.allowance
            bill.armed = session.allowance

    def _rearm(self, session: ServerSession, bill: Bill) -> None:
        """Ask for the next receipt at half, stop at zero, and set the next allowance."""
        if bill.mode != "paid" or session.ended:
            return
        self._used_bytes_now(session, bill)  # what passed since the allowance was last set
        by_bytes = bill.unit == Unit.B
        order = self._order(bill)
        decision = decide(
            Reading(
                limit=bill.limit,
                units=order.units,
                price=order.price,
                locked_left=bill.locked_left,
                pending=bill.pending is not None,
                next_failed=bill.next_failed is not None,
                redeeming=bill.redeeming,
                credit=(
                    self.config.redeem_credit_bytes
                    if by_bytes
                    else self.config.redeem_credit_seconds
                ),
                held=bill.held,
                by_bytes=by_bytes,
            )
        )
        if decision.stop:
            self._stop(session, bill)
            return
        if decision.hold:
            bill.held = True
            session.hold(True)
            session.allowance = bill.armed = UNMETERED
            return
        if decision.ask_next:
            self.log.info(
                "session {sid}: {left} {unit} left of {units}: asking for the next receipt",
                sid=_sid(session),
                left=int(bill.limit),
                unit=_unit_name(bill.unit),
                units=order.units,
            )
            self._ask(session, bill, "next", bill.state_hash)
        if decision.cannot_pay:
            bill.next_failed = ErrorCode.TX_COND_NOT_ENOUGH
        if decision.allowance is not None:
            session.allowance = bill.armed = decision.allowance

    def _stop(self, session: ServerSession, bill: Bill) -> None:
        """Limits used up without a signed next receipt: NOTIFY_STOPPED, no more packets."""
        bill.life.fire(BillInput.USED_UP)
        bill.stopped_at = time.time()
        _stop_loop(bill.ticker)
        _cancel(bill.timer)
        unsigned = bill.pending is not None
        bill.pending = None
        code = bill.next_failed or (
            ErrorCode.RECEIPT_NO_SIGN if unsigned else ErrorCode.RECEIPT_CANT_FIND
        )
        session.allowance = UNMETERED
        if session.usage.can(UsageInput.STOP):
            session.usage.fire(UsageInput.STOP)
        self.server.forwarder_detach(session)
        if self.server.proxy is not None:
            self.server.proxy.usage_ended(session)
        error = Error(code, session.usage_id)
        session.send_service(PacketType.NOTIFY_STOPPED, error.encode())
        session.flush()
        self.log.info(
            "session {sid} with {peer}: service stopped, limits used up ({code})",
            sid=_sid(session),
            peer=session.peer,
            code=error.name,
        )
        self.server.reactor.callLater(
            STOP_LINGER, session.close, CloseCode.SERVICE_STOPPED, f"service stopped: {error.name}"
        )

    # --- refusals and the end -----------------------------------------------------------------

    def _error(
        self, session: ServerSession, code: int, why: str, kind: Refusal = Refusal.SIGN_RESPONSE
    ) -> None:
        """An ERROR for one packet that leaves the usage as it is (counted, not logged each)."""
        session.send_service(PacketType.ERROR, Error(code, session.usage_id).encode())
        session.flush()
        self.server.refusal(kind, session, f"{Error(code).name}: {why}")

    def _refuse(self, session: ServerSession, code: int, why: str, close: bool = False) -> None:
        if session.ended:
            return
        bill = session.bill
        if bill is not None:
            _stop_loop(bill.poller)
            _stop_loop(bill.ticker)
            _cancel(bill.timer)
            _cancel(bill.grace_timer)
            bill.life.fire(BillInput.REFUSED)
        session.refuse(code, why)
        session.flush()
        if close:
            self.server.reactor.callLater(
                STOP_LINGER, session.close, CloseCode.REFUSED, f"{Error(code).name}: {why}"
            )

    def session_ended(self, session: ServerSession) -> None:
        d = defer.Deferred.fromCoroutine(self._finish(session))
        d.addErrback(lambda f: self.log.failure("saving a session's billing failed", f))

    async def _finish(self, session: ServerSession) -> None:
        bill = session.bill
        if bill is None:
            return
        session.bill = None
        carried = self.deposit_carried
        carried[bill.deposit_id] = carried.get(bill.deposit_id, 0) + _carried(session)
        for loop in (bill.poller, bill.ticker):
            _stop_loop(loop)
        for call in (bill.timer, bill.grace_timer):
            _cancel(call)
        try:
            await self._end_grace(session, bill)  # a session that ends in grace uses up budget
            if bill.mode == "paid":
                if bill.unit == Unit.SEC:
                    now = self.clock.seconds()
                    bill.limit -= now - bill.last_tick
                    bill.last_tick = now
                self._used_bytes_now(session, bill)
            if bill.redemption is not None:
                # a receipt signed before the end is still being redeemed: what it pays for
                # belongs in the limits saved now (the client's, for its next session)
                await bill.redemption
            if bill.metered or bill.receipts:
                # only a bill that was paid has limits to save: a refused REQUEST (mode
                # "stopped" with nothing paid) must not overwrite what the client has saved
                await self._save(session, bill)
        finally:
            if bill.marker:
                # released whatever happened above: a mark left set would hold the deposit
                # until its lease runs out
                await self.ledger.set_active_usage(bill.deposit_id, None, only_if=bill.marker)

    def save_all(self) -> defer.Deferred[None]:
        async def run() -> None:
            try:
                await self.ledger.renew_marks(self.prefix, time.time() + self.config.mark_ttl)
            except Exception as e:  # the next save_interval tries again
                self.save_failures += 1
                self.log.warn("renewing the deposit marks failed: {why}", why=str(e))
            for session in list(self.server.sessions):
                bill = session.bill
                if bill is not None and bill.mode == "paid":
                    self._used_bytes_now(session, bill)
                    try:
                        await self._save(session, bill)
                    except Exception as e:  # a failed save must not stop the next ones
                        self.save_failures += 1
                        self.log.warn(
                            "saving the limits of session {sid} failed ({n} so far): {why}",
                            sid=_sid(session),
                            n=self.save_failures,
                            why=str(e) or type(e).__name__,
                        )

        return defer.Deferred.fromCoroutine(run())

    async def _save(self, session: ServerSession, bill: Bill) -> None:
        # the use since the last save, as a delta: the ledger added each receipt's units when
        # it redeemed it, so a save that overlaps a redemption takes nothing from it
        delta = bill.limit - bill.synced
        bill.synced = bill.limit
        await self.ledger.add_limits(
            self.key.account,
            bill.client,
            int(delta) if bill.unit == Unit.B else 0,
            float(delta) if bill.unit == Unit.SEC else 0.0,
            time.time(),
            bill.deposit_id,
        )
        carried = _carried(session)
        seconds = self.clock.seconds() - bill.started
        await self.ledger.add_usage(
            self.key.account,
            bill.client,
            "paid",
            seconds - bill.saved_seconds,
            carried - bill.saved_bytes,
            bill.paid_value,
        )
        bill.saved_seconds = seconds
        bill.saved_bytes = carried
        bill.paid_value = 0

    # --- reporting ----------------------------------------------------------------------------

    def describe(self, session: ServerSession) -> dict[str, Any] | None:
        bill = session.bill
        if bill is None:
            return None
        self._used_bytes_now(session, bill)
        return {
            "client": bill.client.hex(),
            "deposit": bill.deposit_id.hex(),
            "mode": bill.mode,
            "unit": _unit_name(bill.unit),
            "limit_left": bill.limit,
            "receipts": bill.receipts,
            "locked_left": str(bill.locked_left),
            "stopped_at": bill.stopped_at,
        }


def _terms(order: Order) -> tuple[int, int, int, str]:
    return order.unit, order.units, order.price, order.token


def _unit_name(unit: int) -> str:
    return "seconds" if unit == Unit.SEC else "bytes"


def _forged(receipt: Receipt, pending: Receipt, client_public: bytes) -> str | None:
    """Why the client's answer is not a genuine signature of the receipt asked for."""
    unsigned = receipt.unsigned_bytes()
    if unsigned is not None:
        return unsigned
    if len(receipt.signatures) != 2 or receipt.signatures[0] != pending.signatures[0]:
        return "the answer does not carry exactly the provider's and the client's signature"
    sig = receipt.signatures[1]
    if not signed_by(sig, client_public, receipt.info_bytes):
        return "the client's signature on the receipt is not valid"
    return None


def _carried(session: ServerSession) -> int:
    """Bytes the session carried both ways, IP and L4 proxy, as billing counts them."""
    c = session.counters
    return (
        c.from_client_bytes
        + c.to_client_bytes
        + c.proxy_from_client_bytes
        + c.proxy_to_client_bytes
    )


def _sid(session: ServerSession) -> str:
    return f"{session.session_id or 0:#010x}"


def _host(peer: str) -> str:
    return peer.rsplit(":", 1)[0]


def _cancel(call: IDelayedCall | None) -> None:
    if call is not None and call.active():
        call.cancel()


def _stop_loop(loop: LoopingCall | None) -> None:
    if loop is not None and loop.running:
        loop.stop()
