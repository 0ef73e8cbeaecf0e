"""The server's side of billing on channel 'R': the edge that carries out the meter's actions.

What a bill does is decided by :class:`cellvpn.billing.meter.Meter`, sans-IO; this module feeds
it events (a REQUEST judged, bytes carried, a tick, a receipt signed, redeemed or refused, a
timer gone off, the session's end) and carries out the actions it returns against the ledger
(through :class:`~cellvpn.billing.asyncledger.AsyncLedger`, off the reactor thread), the clock
(the service's ``IReactorTime``: every timer is the bill's and stops with it) and the stream.

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
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from cellvpn.billing.asyncledger import AsyncLedger
from cellvpn.billing.interfaces import DepositRow, LedgerError, LedgerUnavailableError
from cellvpn.billing.keys import KeyPair, account_of, signed_by
from cellvpn.billing.meter import (
    UNMETERED,
    Action,
    AskFirst,
    AskReceipt,
    Ban,
    BillInput,
    BillState,
    BookGrace,
    BookUsage,
    Carried,
    Ended,
    Event,
    Found,
    GraceBegun,
    Grant,
    Hold,
    Meter,
    Redeemed,
    Refuse,
    Refused,
    Restored,
    Save,
    SetAllowance,
    Signed,
    StartTimer,
    Stop,
    StopTimer,
    Terms,
    Tick,
    TimedOut,
    Timer,
    judge_deposit,
)
from cellvpn.billing.proof import proven_key
from cellvpn.billing.records import Order, SignedDeposit, SignedOrder
from cellvpn.config.schema import BillingSection
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

__all__ = ["UNMETERED", "Bill", "ServerBilling"]

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
    """One session's bill: its meter, and what the edge keeps for the ledger and the wire."""

    client_public: bytes
    client: bytes
    deposit_id: bytes
    meter: Meter
    #: the order this session pays by: the one it was offered, kept when a reload changes it
    order: Order
    #: the deposit's state hash: the prev hash of the next receipt
    state_hash: bytes = bytes(32)
    #: the receipt the meter asked for, as sent (signed by the provider)
    pending: Receipt | None = None
    pending_kind: str = ""
    #: fires once a receipt's outcome is booked on this bill (the session's end waits for it)
    redemption: defer.Deferred[None] | None = None
    marker: str = ""
    #: the budgets this session's grace is booked against: its key and its source prefix
    subjects: tuple[str, ...] = ()
    #: the grace budgets are being looked up (counted as grace for grace_per_address)
    judging_grace: bool = False
    #: when NOTIFY_STOPPED went out (wall clock), for reports
    stopped_at: float | None = None
    #: the bill's timers that run, by the meter's name for them
    timers: dict[Timer, IDelayedCall | LoopingCall] = field(default_factory=dict)
    #: the close that follows NOTIFY_STOPPED or a refusal
    closing: IDelayedCall | None = None

    @property
    def mode(self) -> str:
        return self.meter.mode

    @property
    def unit(self) -> int:
        return self.order.unit


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
        saver.clock = self.clock
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
        for session in self.server.sessions:
            if session.bill is not None:  # the credit, timeouts, grace bytes: at once
                session.bill.meter.terms = self._terms(session.bill.order)
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

    def _terms(self, order: Order) -> Terms:
        """What a bill on ``order`` is metered by, with this server's [billing] rules."""
        c = self.config
        by_bytes = order.unit == Unit.B
        return Terms(
            by_bytes=by_bytes,
            units=order.units,
            price=order.price,
            credit=c.redeem_credit_bytes if by_bytes else c.redeem_credit_seconds,
            receipt_timeout=c.receipt_timeout,
            receipt_attempts=c.receipt_attempts,
            grace_period=self.grace_period,
            grace_bytes=c.grace_bytes,
            ban_seconds=self.grace_period * 50,
        )

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
            meter=Meter(self._terms(offered.order), self.clock.seconds()),
            order=offered.order,
            subjects=(f"key:{client.hex()}", f"net:{prefix}"),
        )
        bill.meter.life.observe(lambda old, event, new: self._moved(session, event, new))
        session.bill = bill
        if self.config.deposit_bytes:
            why = self.over_deposit_cap(session)
            if why is not None:
                self._cap_reached(session, why)
                return
            self._watch_caps()
        deposit = await self.ledger.get_deposit(request.tx_cond)
        if session.ended or session.bill is not bill:
            return
        if deposit is None:
            await self._grace(session, bill)
            return
        await self._pay(session, bill, deposit)

    def _moved(self, session: ServerSession, event: BillInput, new: BillState) -> None:
        """Log lines for steps of a bill that no action says."""
        if event is BillInput.UNSIGNED and new is BillState.PAID:
            self.log.info(
                "session {sid}: the next receipt was not signed; service ends with the limits",
                sid=_sid(session),
            )

    # --- grace --------------------------------------------------------------------------------

    async def _grace(self, session: ServerSession, bill: Bill) -> None:
        host = _host(session.peer)
        in_grace = sum(
            1
            for s in self.server.sessions
            if s is not session
            and s.bill is not None
            and (s.bill.mode == "grace" or s.bill.judging_grace)
            and _host(s.peer) == host
        )
        if in_grace >= self.config.grace_per_address:
            self._refuse(
                session,
                ErrorCode.TX_COND_NOT_FOUND,
                f"deposit not in the ledger and {host} already has {in_grace} grace session(s)",
            )
            return
        bill.judging_grace = True
        try:
            service = await self._grace_left(bill)
        finally:
            bill.judging_grace = False
        if session.ended or session.bill is not bill:  # gone, or taken over meanwhile
            return
        if not service:
            self.grace_refused += 1
            self.log.info(
                "session {sid}: no grace left for {subjects}: nothing passes before the "
                "first receipt",
                sid=_sid(session),
                subjects=", ".join(bill.subjects),
            )
        self._feed(session, bill, GraceBegun(self.clock.seconds(), session.carried(), service))
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

    async def _poll(self, session: ServerSession, bill: Bill) -> None:
        if session.bill is not bill or bill.mode != "grace" or session.ended:
            return
        deposit = await self.ledger.get_deposit(bill.deposit_id)
        if deposit is None or Timer.POLL not in bill.meter.timers or session.ended:
            return
        self._feed(session, bill, Found())
        self.log.info("session {sid}: deposit appeared in the ledger", sid=_sid(session))
        await self._pay(session, bill, deposit)

    # --- paying -------------------------------------------------------------------------------

    async def _pay(self, session: ServerSession, bill: Bill, deposit: DepositRow) -> None:
        # in grace, a deposit that cannot pay is no payment: grace ended unpaid, as the original
        grace = bill.mode == "grace"
        problem = judge_deposit(bill.order, bill.client, deposit, time.time())
        if problem is not None:
            self._refuse(session, *problem, close=grace, ban=grace)
            return
        if not await self._mark(session, bill, deposit):
            return
        if deposit.active_usage is not None:
            # taken over from an older session: it may have redeemed a receipt meanwhile
            deposit = await self.ledger.get_deposit(bill.deposit_id) or deposit
        bill.state_hash = deposit.state_hash
        limits = None
        if not any(
            s is not session and s.bill is not None and s.bill.deposit_id == bill.deposit_id
            for s in self.server.sessions
        ):
            limits = await self.ledger.load_limits(self.key.account, bill.client, bill.deposit_id)
        if session.ended or session.bill is not bill:
            return
        left: float = 0
        if limits is not None:
            left = limits.bytes_left if bill.unit == Unit.B else limits.seconds_left
        if left > 0:
            self.log.info(
                "session {sid}: resuming with {left} {unit} saved from an earlier session",
                sid=_sid(session),
                left=int(left),
                unit=_unit_name(bill.unit),
            )
            now = self.clock.seconds()
            self._feed(session, bill, Restored(left, deposit.locked, now, session.carried()))
            return
        if deposit.locked < bill.order.price:
            self._refuse(
                session,
                ErrorCode.TX_COND_NOT_ENOUGH,
                "the deposit cannot pay one receipt",
                close=grace,
                ban=grace,
            )
            return
        self._feed(session, bill, AskFirst())

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

    def _receipt(self, bill: Bill) -> Receipt:
        """A receipt signed by the provider, for the next units of ``bill``."""
        order = bill.order
        info = ReceiptInfo(
            srv_uid=SRV_UID_VPN,
            units_type=order.unit,
            units=order.units,
            value=order.price,
            prev_hash=bill.state_hash,
            # a fresh number each time: a receipt asked for again (its signed answer lost on
            # the way) is a new receipt the client may sign; both name the same prev, so the
            # ledger redeems at most one of them
            addition=secrets.randbits(63),
        )
        return Receipt(info, (self.key.signature(info.encode()),))

    def service_packet(self, session: ServerSession, ptype: int, data: memoryview) -> bool:
        if ptype == PacketType.SIGN_RESPONSE:
            bill = session.bill
            busy = bill is not None and bill.meter.redeeming
            d = defer.Deferred.fromCoroutine(self._signed(session, Receipt.decode(data)))
            d.addErrback(self._failed, session, "redeeming a receipt")
            if bill is not None and bill.meter.redeeming and not busy:
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
        pending = bill.pending if bill is not None and bill.meter.pending else None
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
            self._fraud(session, bill, ErrorCode.RECEIPT_NO_SIGN, forged)
            return
        bill.pending = None
        kind = bill.pending_kind
        self._feed(session, bill, Signed())
        try:
            result = await self._redeem(session, bill, receipt)
        except LedgerError as e:
            self.refused += 1
            self.log.info(
                "session {sid}: receipt refused by the ledger: {why}",
                sid=_sid(session),
                why=e.summary,
            )
            if e.code in FRAUD:
                self._fraud(session, bill, e.code, e.summary)
            else:
                # the first receipt refused ends the REQUEST; a further one refused (the
                # deposit ran dry or expired) is an honest end, at zero, with no ban
                self._feed(
                    session,
                    bill,
                    Refused(e.code, e.summary, close=kind == "first", honest=kind != "first"),
                )
            return
        self.redeemed += 1
        bill.state_hash = result.receipt_hash
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
        redeemed = Redeemed(
            receipt.info.units,
            result.value,
            result.locked_left,
            self.clock.seconds(),
            session.carried(),
        )
        writes = self._feed(session, bill, redeemed)
        if writes is not None:
            await writes  # the grace it paid for is booked before the session's end saves

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
        self.log.warn(
            "session {sid} with {peer}: {why}: stopped, key {key} banned for {ban:g} s",
            sid=_sid(session),
            peer=session.peer,
            why=why,
            key=bill.client.hex()[:16],
            ban=self.grace_period * 50,
        )
        self._feed(
            session,
            bill,
            Refused(
                code,
                why,
                close=True,
                ban=True,
                now=self.clock.seconds(),
                carried=session.carried(),
            ),
        )

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

    # --- the meter's events and actions -------------------------------------------------------

    # --- the deposit cap ------------------------------------------------------------------

    def over_deposit_cap(self, session: ServerSession) -> str | None:
        """Why the session's deposit is at ``[billing] deposit_bytes``, or None."""
        cap = self.config.deposit_bytes
        bill = session.bill
        if not cap or bill is None:
            return None
        used = self.deposit_carried.get(bill.deposit_id, 0) + session.carried()
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
        """The forwarder used up the byte allowance: the meter accounts for it and looks."""
        if self.config.deposit_bytes and session.active:
            why = self.over_deposit_cap(session)
            if why is not None:
                self._cap_reached(session, why)
                return
        bill = session.bill
        if bill is None:
            session.allowance = UNMETERED
            return
        self._feed(session, bill, Carried(session.allowance))

    def _feed(
        self, session: ServerSession, bill: Bill, event: Event
    ) -> defer.Deferred[None] | None:
        """Hand ``event`` to the bill's meter and carry out its actions; the ledger writes
        they ask for, in order, as one Deferred (None: there are none)."""
        bill.meter.count(session.allowance)  # the bytes carried since the allowance was set
        return self._carry_out(session, bill, bill.meter.handle(event))

    def _carry_out(
        self, session: ServerSession, bill: Bill, actions: Iterable[Action]
    ) -> defer.Deferred[None] | None:
        writes: list[Callable[[], Awaitable[Any]]] = []
        for action in actions:
            match action:
                case SetAllowance(nbytes=n):
                    session.allowance = n
                case StartTimer():
                    self._start_timer(session, bill, action)
                case StopTimer(timer=timer):
                    _stop(bill.timers.pop(timer, None))
                case AskReceipt(kind=kind, again=again):
                    self._ask(session, bill, kind, again)
                case Hold(held=held):
                    session.hold(held)
                case Grant(grace=True):
                    session.grant(UsageInput.GRANT_GRACE)
                case Grant():
                    self._grant(session)
                case Stop(code=code):
                    self._stop(session, bill, code)
                case Refuse(code=code, why=why, close=close):
                    bill.pending = None
                    self._refusal(session, code, why, close)
                case Ban(seconds=seconds):
                    self.banned += 1
                    writes.append(self._ban_write(bill, seconds))
                case BookGrace():
                    writes.append(self._grace_write(bill, action))
                case BookUsage():
                    writes.append(self._usage_write(bill, action))
        if not writes:
            return None

        async def run() -> None:
            for write in writes:
                await write()

        return defer.Deferred.fromCoroutine(run())

    def _start_timer(self, session: ServerSession, bill: Bill, start: StartTimer) -> None:
        """A timer of the bill, on the service's clock; it feeds the meter when it goes off."""
        _stop(bill.timers.pop(start.timer, None))
        if start.repeat:
            step = self._poll if start.timer is Timer.POLL else self._tick
            loop = LoopingCall(step, session, bill)
            loop.clock = self.clock
            d = loop.start(start.seconds, now=False)
            d.addErrback(self._failed, session, f"the bill's {start.timer.value} timer")
            bill.timers[start.timer] = loop
        else:
            call = self.clock.callLater(start.seconds, self._timed_out, session, bill, start.timer)
            bill.timers[start.timer] = call

    def _timed_out(self, session: ServerSession, bill: Bill, timer: Timer) -> None:
        bill.timers.pop(timer, None)
        if session.bill is bill:
            now = self.clock.seconds()
            d = self._feed(session, bill, TimedOut(timer, now, session.carried()))
            _logged(d, self.log, "booking a timed-out bill")

    def _tick(self, session: ServerSession, bill: Bill) -> None:
        if session.bill is bill:
            self._feed(session, bill, Tick(self.clock.seconds()))

    def _ask(self, session: ServerSession, bill: Bill, kind: str, again: bool) -> None:
        """SIGN_REQUEST: a new receipt signed by the provider, or the pending one again."""
        if not again or bill.pending is None:
            if kind == "next":
                terms = bill.meter.terms
                self.log.info(
                    "session {sid}: {left} {unit} left of {units}: asking for the next receipt",
                    sid=_sid(session),
                    left=int(bill.meter.limit),
                    unit=_unit_name(bill.unit),
                    units=terms.units,
                )
            bill.pending = self._receipt(bill)
            bill.pending_kind = kind
        if session.ended:
            return
        session.send_service(PacketType.SIGN_REQUEST, bill.pending.encode())
        session.flush()

    def _grant(self, session: ServerSession) -> None:
        """SUCCESS for a payment: the service granted (or granted on) paid terms."""
        if session.usage.state is UsageState.IDLE:
            session.grant(UsageInput.PAID)
            return
        if session.usage.can(UsageInput.PAID):
            session.usage.fire(UsageInput.PAID)
        session.send_service(PacketType.SUCCESS, Success(session.usage_id).encode())
        session.flush()

    def _stop(self, session: ServerSession, bill: Bill, code: int) -> None:
        """Limits used up without a signed next receipt: NOTIFY_STOPPED, no more packets."""
        bill.stopped_at = time.time()
        bill.pending = None
        session.end_usage(UsageInput.STOP)
        error = Error(code, session.usage_id)
        session.send_service(PacketType.NOTIFY_STOPPED, error.encode())
        session.flush()
        self.log.info(
            "session {sid} with {peer}: service stopped, limits used up ({code})",
            sid=_sid(session),
            peer=session.peer,
            code=error.name,
        )
        bill.closing = self.clock.callLater(
            STOP_LINGER, session.close, CloseCode.SERVICE_STOPPED, f"service stopped: {error.name}"
        )

    def _ban_write(self, bill: Bill, seconds: float) -> Callable[[], Awaitable[Any]]:
        until = time.time() + seconds
        return lambda: self.ledger.ban(self.key.account, bill.client, until)

    def _grace_write(self, bill: Bill, book: BookGrace) -> Callable[[], Awaitable[Any]]:
        async def write() -> None:
            await self.ledger.book_grace(
                self.key.account, bill.subjects, time.time(), book.seconds, book.nbytes
            )
            await self.ledger.add_usage(
                self.key.account, bill.client, "grace", book.seconds, book.nbytes, 0
            )

        return write

    def _usage_write(self, bill: Bill, book: BookUsage) -> Callable[[], Awaitable[Any]]:
        async def write() -> None:
            await self.ledger.add_limits(
                self.key.account,
                bill.client,
                int(book.limits) if bill.unit == Unit.B else 0,
                float(book.limits) if bill.unit == Unit.SEC else 0.0,
                time.time(),
                bill.deposit_id,
            )
            await self.ledger.add_usage(
                self.key.account, bill.client, "paid", book.seconds, book.nbytes, book.value
            )

        return write

    # --- refusals and the end -----------------------------------------------------------------

    def _error(
        self, session: ServerSession, code: int, why: str, kind: Refusal = Refusal.SIGN_RESPONSE
    ) -> None:
        """An ERROR for one packet that leaves the usage as it is (counted, not logged each)."""
        session.send_service(PacketType.ERROR, Error(code, session.usage_id).encode())
        session.flush()
        self.server.refusal(kind, session, f"{Error(code).name}: {why}")

    def _refuse(
        self, session: ServerSession, code: int, why: str, close: bool = False, ban: bool = False
    ) -> None:
        """Refuse the REQUEST (or end the usage): through the bill's meter if it has one."""
        if session.ended:
            return
        bill = session.bill
        if bill is None:
            self._refusal(session, code, why, close)
            return
        now = self.clock.seconds()
        d = self._feed(
            session, bill, Refused(code, why, close, ban, now=now, carried=session.carried())
        )
        _logged(d, self.log, "booking a refused bill")

    def _refusal(self, session: ServerSession, code: int, why: str, close: bool) -> None:
        if session.ended:
            return
        session.refuse(code, why)
        session.flush()
        if close:
            call = self.clock.callLater(
                STOP_LINGER, session.close, CloseCode.REFUSED, f"{Error(code).name}: {why}"
            )
            if session.bill is not None:
                session.bill.closing = call

    def session_ended(self, session: ServerSession) -> None:
        d = defer.Deferred.fromCoroutine(self._finish(session))
        d.addErrback(lambda f: self.log.failure("saving a session's billing failed", f))

    async def _finish(self, session: ServerSession) -> None:
        bill = session.bill
        if bill is None:
            return
        session.bill = None
        carried = self.deposit_carried
        carried[bill.deposit_id] = carried.get(bill.deposit_id, 0) + session.carried()
        try:
            # every timer of the bill stops; a session that ends in grace uses up budget
            ended = self._feed(session, bill, Ended(self.clock.seconds(), session.carried()))
            for timer in list(bill.timers):  # none should be left: the meter stopped them
                _stop(bill.timers.pop(timer))
            _stop(bill.closing)  # the stream is gone already
            if ended is not None:
                await ended
            if bill.redemption is not None:
                # a receipt signed before the end is still being redeemed: what it pays for
                # belongs in the limits saved now (the client's, for its next session)
                await bill.redemption
            # only a bill that was paid has limits to save: the meter books nothing for a
            # refused REQUEST, which must not overwrite what the client has saved
            saved = self._feed(session, bill, Save(self.clock.seconds(), session.carried()))
            if saved is not None:
                await saved
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
                if bill is None or bill.mode != "paid":
                    continue
                try:
                    saved = self._feed(session, bill, Save(self.clock.seconds(), session.carried()))
                    if saved is not None:
                        await saved
                except Exception as e:  # a failed save must not stop the next ones
                    self.save_failures += 1
                    self.log.warn(
                        "saving the limits of session {sid} failed ({n} so far): {why}",
                        sid=_sid(session),
                        n=self.save_failures,
                        why=str(e) or type(e).__name__,
                    )

        return defer.Deferred.fromCoroutine(run())

    # --- reporting ----------------------------------------------------------------------------

    def describe(self, session: ServerSession) -> dict[str, Any] | None:
        bill = session.bill
        if bill is None:
            return None
        meter = bill.meter
        meter.count(session.allowance)
        return {
            "client": bill.client.hex(),
            "deposit": bill.deposit_id.hex(),
            "mode": bill.mode,
            "unit": _unit_name(bill.unit),
            "limit_left": meter.limit,
            "receipts": meter.receipts,
            "locked_left": str(meter.locked_left),
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


def _sid(session: ServerSession) -> str:
    return f"{session.session_id or 0:#010x}"


def _host(peer: str) -> str:
    return peer.rsplit(":", 1)[0]


def _stop(timer: IDelayedCall | LoopingCall | None) -> None:
    if isinstance(timer, LoopingCall):
        if timer.running:
            timer.stop()
    elif timer is not None and timer.active():
        timer.cancel()


def _logged(d: defer.Deferred[None] | None, log: Logger, what: str) -> None:
    if d is not None:
        d.addErrback(lambda f: log.failure("billing failed while {what}", f, what=what))
