"""A paid session's meter, sans-IO: events in, actions out, one table of the bill's life.

The server's billing edge (``cellvpn/server/billing.py``) does the I/O: it asks the ledger,
runs the timers on its reactor's clock, and talks to the stream. Everything it decides comes
from here, so every rule can be walked with no reactor and no ledger:

- :class:`Meter` takes events (:class:`GraceBegun`, :class:`Carried`, :class:`Tick`,
  :class:`Signed`, :class:`Redeemed`, :class:`Refused`, :class:`TimedOut`, :class:`Ended` ...)
  and returns actions (:class:`AskReceipt`, :class:`SetAllowance`, :class:`Grant`,
  :class:`Stop`, :class:`Refuse`, :class:`Ban`, :class:`BookGrace`, :class:`BookUsage`,
  :class:`StartTimer`, :class:`StopTimer` ...). Each event becomes one input of
  :data:`TRANSITIONS` (some, by the metering rule, two: a look at the meter that finds zero
  is USED_UP); an input without a row is a bug that raises.
- The bill is IDLE until its REQUEST is judged, in GRACE while its deposit is not in the
  ledger yet, PAID once a receipt was redeemed (or saved limits restored), and STOPPED when
  its limits ran out, it was refused, or its session ended. Nothing leaves STOPPED.
- :func:`decide`: with the limits left, ask for the next receipt at half use, let at most the
  credit pass while a signed receipt is being redeemed (then hold traffic), stop at zero, and
  say how many bytes may pass before the meter must look again.
- Every timer a bill starts is its own and is stopped by the action list that leaves the
  state it belongs to; the end of the session stops whatever still runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from cellvpn.billing.interfaces import DepositRow
from cellvpn.billing.records import Order, receipt_units_value_ok
from cellvpn.fsm import Machine
from cellvpn.wire.service import SRV_UID_VPN, ErrorCode

#: An allowance that is never used up (free service, grace, billed by seconds).
UNMETERED = 1 << 62
#: Seconds between looks at the ledger for a deposit during grace.
GRACE_POLL = 1.0
#: Seconds between ticks of a bill by seconds.
TICK = 1.0


class BillState(Enum):
    IDLE = "idle"
    GRACE = "grace"
    PAID = "paid"
    STOPPED = "stopped"


class BillInput(Enum):
    GRACE = "grace"  # a paid REQUEST whose deposit is not in the ledger yet
    PAID = "paid"  # the first receipt redeemed, or saved limits restored
    USED_UP = "used-up"  # the limits reached zero with no next receipt redeemed
    REFUSED = "refused"  # the REQUEST refused, a fraud found, the first receipt refused
    FOUND = "found"  # the deposit appeared in the ledger during grace
    ASK = "ask"  # the deposit can pay: the first receipt is asked for
    RESEND = "resend"  # no answer to SIGN_REQUEST in time: asked again
    UNSIGNED = "unsigned"  # no answer after every attempt
    SIGNED = "signed"  # a genuine signature: the receipt goes to the ledger
    REDEEMED = "redeemed"  # a further receipt redeemed (or one that was late)
    DRY = "dry"  # the ledger refused a further receipt honestly (the deposit ran dry)
    CARRIED = "carried"  # the byte allowance was used up
    TICK = "tick"  # a second went by (billed by seconds)
    GRACE_OVER = "grace-over"  # grace_period went by without the deposit
    SAVE = "save"  # the limits and usage are booked (every save_interval, and at the end)
    ENDED = "ended"  # the session ended


_S, _I = BillState, BillInput
TRANSITIONS: dict[tuple[BillState, BillInput], BillState] = {
    (_S.IDLE, _I.GRACE): _S.GRACE,
    (_S.IDLE, _I.ASK): _S.IDLE,
    (_S.IDLE, _I.RESEND): _S.IDLE,
    (_S.IDLE, _I.UNSIGNED): _S.STOPPED,
    (_S.IDLE, _I.SIGNED): _S.IDLE,
    (_S.IDLE, _I.PAID): _S.PAID,
    (_S.IDLE, _I.REFUSED): _S.STOPPED,
    (_S.IDLE, _I.CARRIED): _S.IDLE,
    (_S.IDLE, _I.ENDED): _S.STOPPED,
    (_S.GRACE, _I.FOUND): _S.GRACE,
    (_S.GRACE, _I.ASK): _S.GRACE,
    (_S.GRACE, _I.RESEND): _S.GRACE,
    (_S.GRACE, _I.UNSIGNED): _S.STOPPED,
    (_S.GRACE, _I.SIGNED): _S.GRACE,
    (_S.GRACE, _I.PAID): _S.PAID,
    (_S.GRACE, _I.REFUSED): _S.STOPPED,
    (_S.GRACE, _I.CARRIED): _S.GRACE,
    (_S.GRACE, _I.GRACE_OVER): _S.STOPPED,
    (_S.GRACE, _I.ENDED): _S.STOPPED,
    (_S.PAID, _I.CARRIED): _S.PAID,
    (_S.PAID, _I.TICK): _S.PAID,
    (_S.PAID, _I.USED_UP): _S.STOPPED,
    (_S.PAID, _I.RESEND): _S.PAID,
    (_S.PAID, _I.UNSIGNED): _S.PAID,
    (_S.PAID, _I.SIGNED): _S.PAID,
    (_S.PAID, _I.REDEEMED): _S.PAID,
    (_S.PAID, _I.DRY): _S.PAID,
    (_S.PAID, _I.REFUSED): _S.STOPPED,
    (_S.PAID, _I.SAVE): _S.PAID,
    (_S.PAID, _I.ENDED): _S.STOPPED,
    # the end: late answers of the ledger are counted, nothing starts again
    (_S.STOPPED, _I.REFUSED): _S.STOPPED,
    (_S.STOPPED, _I.REDEEMED): _S.STOPPED,
    (_S.STOPPED, _I.CARRIED): _S.STOPPED,
    (_S.STOPPED, _I.SAVE): _S.STOPPED,
    (_S.STOPPED, _I.ENDED): _S.STOPPED,
}
del _S, _I


def new_bill_machine() -> Machine[BillState, BillInput]:
    return Machine("bill", BillState.IDLE, TRANSITIONS)


class Timer(Enum):
    """A bill's timers; each belongs to the bill and is stopped when it ends."""

    RECEIPT = "receipt"  # the SIGN_REQUEST's answer is due
    GRACE = "grace"  # grace_period is over
    POLL = "poll"  # look for the deposit in the ledger (repeats)
    TICK = "tick"  # a second of service billed by seconds (repeats)


# --- the terms ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Terms:
    """What a bill is metered by: its order and the server's [billing] rules."""

    by_bytes: bool
    #: units (bytes or seconds) one receipt buys, and its price
    units: int
    price: int
    #: what may pass on credit while a redemption is pending (bytes or seconds)
    credit: float
    receipt_timeout: float
    receipt_attempts: int
    grace_period: float
    #: bytes grace may carry before traffic waits for the first receipt
    grace_bytes: int
    #: how long a key is banned for a grace that ended unpaid, or for fraud
    ban_seconds: float


# --- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GraceBegun:
    """The deposit is not in the ledger: grace, with traffic if ``service`` (budget left)."""

    now: float
    carried: int
    service: bool


@dataclass(frozen=True, slots=True)
class Found:
    """The deposit appeared in the ledger during grace."""


@dataclass(frozen=True, slots=True)
class AskFirst:
    """The deposit can pay: ask for the first receipt."""


@dataclass(frozen=True, slots=True)
class Restored:
    """Limits saved by an earlier session of this client are used first."""

    limit: float
    locked_left: int
    now: float
    carried: int


@dataclass(frozen=True, slots=True)
class Carried:
    """The forwarder's allowance is used up (it stood at ``left``)."""

    left: int


@dataclass(frozen=True, slots=True)
class Tick:
    """A tick of the clock, for a bill by seconds."""

    now: float


@dataclass(frozen=True, slots=True)
class Signed:
    """The client signed the pending receipt, genuinely: the edge redeems it."""


@dataclass(frozen=True, slots=True)
class Redeemed:
    """The ledger redeemed a receipt of ``units`` for ``value``."""

    units: int
    value: int
    locked_left: int
    now: float
    carried: int


@dataclass(frozen=True, slots=True)
class Refused:
    """Refused: the REQUEST, a receipt, a forged signature, a ledger's fraud verdict.

    ``honest``: the ledger refused a further receipt for want of funds (the deposit ran dry
    or expired): no refusal, the service ends at zero with the limits paid for."""

    code: int
    why: str
    close: bool = False
    ban: bool = False
    honest: bool = False
    now: float = 0.0
    carried: int = 0


@dataclass(frozen=True, slots=True)
class TimedOut:
    """One of the bill's one-shot timers went off (RECEIPT or GRACE)."""

    timer: Timer
    now: float = 0.0
    carried: int = 0


@dataclass(frozen=True, slots=True)
class Save:
    """Book the use since the last save (every save_interval, and at the end)."""

    now: float
    carried: int


@dataclass(frozen=True, slots=True)
class Ended:
    """The session ended."""

    now: float
    carried: int


Event = (
    GraceBegun
    | Found
    | AskFirst
    | Restored
    | Carried
    | Tick
    | Signed
    | Redeemed
    | Refused
    | TimedOut
    | Save
    | Ended
)


# --- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AskReceipt:
    """Send SIGN_REQUEST: a new receipt (``again`` False) or the pending one again."""

    kind: str  # "first" or "next"
    again: bool = False


@dataclass(frozen=True, slots=True)
class SetAllowance:
    """The bytes the forwarder may carry before the meter looks again."""

    nbytes: int


@dataclass(frozen=True, slots=True)
class Hold:
    """Hold the session's traffic both ways (or let it go again)."""

    held: bool


@dataclass(frozen=True, slots=True)
class Grant:
    """SUCCESS: the service granted in grace, paid, or the next receipt redeemed."""

    grace: bool = False


@dataclass(frozen=True, slots=True)
class Stop:
    """NOTIFY_STOPPED with ``code``, no more packets, then close the stream."""

    code: int


@dataclass(frozen=True, slots=True)
class Refuse:
    """ERROR with ``code``; close the stream after a moment if ``close``."""

    code: int
    why: str
    close: bool = False


@dataclass(frozen=True, slots=True)
class Ban:
    """Ban the client's key for ``seconds``."""

    seconds: float


@dataclass(frozen=True, slots=True)
class BookGrace:
    """Book what grace used against the key's and the source's budgets, and as grace usage."""

    seconds: float
    nbytes: int


@dataclass(frozen=True, slots=True)
class BookUsage:
    """Book the limits' change (``limits``, bytes or seconds) and the paid usage since the
    last booking."""

    limits: float
    seconds: float
    nbytes: int
    value: int


@dataclass(frozen=True, slots=True)
class StartTimer:
    timer: Timer
    seconds: float
    #: a repeating timer (POLL, TICK) runs until stopped
    repeat: bool = False


@dataclass(frozen=True, slots=True)
class StopTimer:
    timer: Timer


Action = (
    AskReceipt
    | SetAllowance
    | Hold
    | Grant
    | Stop
    | Refuse
    | Ban
    | BookGrace
    | BookUsage
    | StartTimer
    | StopTimer
)


# --- the metering rule -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reading:
    """What the metering rule reads of a paid bill."""

    #: units (bytes or seconds) left of what was paid for; below zero while in debt
    limit: float
    #: units one receipt buys, and its price
    units: int
    price: int
    #: what the deposit still holds
    locked_left: int
    #: a receipt was asked for and is not signed yet
    pending: bool
    #: the next receipt cannot come (the deposit ran dry, the client refused)
    next_failed: bool
    #: a signed receipt is in the ledger's hands
    redeeming: bool
    #: what may pass on credit while a redemption is pending
    credit: float
    #: traffic is held already
    held: bool
    #: billed by bytes (True) or seconds
    by_bytes: bool


@dataclass(frozen=True, slots=True)
class Decision:
    """What the edge does after a look at the meter."""

    #: NOTIFY_STOPPED: the limits are used up and no receipt is coming
    stop: bool = False
    #: hold the session's traffic until the pending redemption is answered
    hold: bool = False
    #: send SIGN_REQUEST for the next receipt
    ask_next: bool = False
    #: the deposit cannot pay the next receipt: the session ends at zero
    cannot_pay: bool = False
    #: bytes that may pass before the meter looks again (None: leave it, billed by seconds)
    allowance: int | None = None


def decide(m: Reading) -> Decision:
    """The metering rule for a paid bill (see the module's docstring)."""
    half = m.units / 2
    if m.limit <= 0:
        if not m.redeeming:
            return Decision(stop=True)
        # what passes meanwhile is paid from the receipt being redeemed, up to the credit
        # and never more than half a receipt, so the debt is covered by that receipt
        room = min(m.credit, half) + m.limit
        if room > 0:
            return Decision(allowance=max(1, int(room)) if m.by_bytes else None)
        return Decision(hold=not m.held)
    ask = cannot = False
    if m.limit <= half and not m.pending and not m.next_failed:
        if m.locked_left >= m.price:
            ask = True
        else:
            cannot = True
    if not m.by_bytes:
        return Decision(ask_next=ask, cannot_pay=cannot)
    # look again at half use while no receipt is asked for, else at zero
    waiting = m.pending or ask
    mark = m.limit - half if m.limit > half and not waiting else m.limit
    return Decision(ask_next=ask, cannot_pay=cannot, allowance=max(1, int(mark)))


def judge_deposit(
    order: Order, client: bytes, deposit: DepositRow, now: float
) -> tuple[ErrorCode, str] | None:
    """Why ``deposit`` cannot pay ``client``'s bill on ``order`` (None: it can), in the
    order the checks are made: owner, service, open, unit, price."""
    if deposit.owner != client:
        return ErrorCode.RECEIPT_WRONG_PKEY_HASH, "the deposit belongs to another key"
    if deposit.srv_uid != SRV_UID_VPN:
        return ErrorCode.TX_COND_WRONG_SRV_UID, "the deposit is for another service"
    if deposit.closed or deposit.expired(now):
        return ErrorCode.TX_COND_NOT_FOUND, "the deposit is closed or expired"
    if deposit.unit != order.unit:
        return ErrorCode.UNIT_TYPE_ERROR, "the deposit pays for another unit"
    if not receipt_units_value_ok(order.price, order.units, deposit.max_unit_price):
        return ErrorCode.RECEIPT_UNITS_ERROR, "the price is above the deposit's maximum"
    return None


# --- the meter ---------------------------------------------------------------------------------


class Meter:
    """One session's bill: its state, what is left, and the actions each event asks for."""

    def __init__(self, terms: Terms, started: float) -> None:
        self.terms = terms
        self.life = new_bill_machine()
        #: units left (bytes or seconds) of what was paid for; below zero while in debt
        self.limit: float = 0.0
        #: the allowance handed to the forwarder when it was last set (by bytes)
        self.armed = 0
        self.locked_left = 0
        #: the receipt asked for and not signed yet: "first", "next", or None
        self.pending: str | None = None
        self.attempts = 0
        #: why the next receipt cannot come (None: it can)
        self.next_failed: int | None = None
        #: a signed receipt is in the ledger's hands: at zero, carry on (into debt) to the credit
        self.redeeming = False
        #: traffic is held: the credit of a pending redemption, or the grace bytes, are used up
        self.held = False
        self.receipts = 0
        #: the service was granted on paid terms (a receipt, or saved limits) at some point
        self.metered = False
        #: grace: when it began, the bytes counter then, and what it used once over
        self.grace_since: float | None = None
        self.grace_bytes_at = 0
        self.grace_seconds = 0.0
        self.grace_bytes = 0
        #: the session has traffic in grace (False: out of budget, it must pay first)
        self.grace_service = False
        self.last_tick = 0.0
        self.started = started
        #: ``limit`` as the ledger's saved limits have it (what the last save or redemption left)
        self.synced: float = 0.0
        #: the use already booked: seconds and bytes since ``started``, and value since the last
        self.saved_seconds = 0.0
        self.saved_bytes = 0
        self.paid_value = 0
        #: the code NOTIFY_STOPPED went out with (None: not stopped at zero)
        self.stop_code: int | None = None
        self._timers: list[Timer] = []

    @property
    def state(self) -> BillState:
        return self.life.state

    @property
    def mode(self) -> str:
        return self.life.state.value

    @property
    def timers(self) -> tuple[Timer, ...]:
        """The bill's timers that run."""
        return tuple(self._timers)

    def count(self, left: int) -> None:
        """Account for the bytes carried since the allowance was last set (it stands at
        ``left`` now). No decision: the edge calls it before every event, and to report."""
        if self.terms.by_bytes and self.life.state is BillState.PAID:
            self.limit -= self.armed - left
            self.armed = left

    def handle(self, event: Event) -> list[Action]:
        """The actions ``event`` asks for; raises InvalidTransitionError where it has no row."""
        out: list[Action] = []
        match event:
            case GraceBegun():
                self._fire(BillInput.GRACE)
                self.grace_service = event.service
                if event.service:
                    self.grace_since = event.now
                    self.grace_bytes_at = event.carried
                    # grace traffic has a cap: at it, traffic waits for the first receipt
                    out += [SetAllowance(max(1, self.terms.grace_bytes)), Grant(grace=True)]
                out.append(self._start(Timer.GRACE, self.terms.grace_period))
                out.append(self._start(Timer.POLL, GRACE_POLL, repeat=True))
            case Found():
                self._fire(BillInput.FOUND)
                out += self._stop_timers(Timer.POLL, Timer.GRACE)
            case AskFirst():
                self._fire(BillInput.ASK)
                out += self._ask("first")
            case Restored():
                self._fire(BillInput.PAID)
                self.limit = self.synced = event.limit
                self.locked_left = event.locked_left
                out += self._end_grace(event.now, event.carried)
                out += self._paid(event.now)
            case Carried():
                self.count(event.left)
                self._fire(BillInput.CARRIED)
                out += self._carried()
            case Tick():
                self._fire(BillInput.TICK)
                if not self.held:  # held time is no service
                    self.limit -= event.now - self.last_tick
                self.last_tick = event.now
                out += self._look()
            case Signed():
                self._fire(BillInput.SIGNED)
                self.pending = None
                self.redeeming = True
                out += self._stop_timers(Timer.RECEIPT)
            case Redeemed():
                out += self._redeemed(event)
            case Refused():
                out += self._refused(event)
            case TimedOut(timer=Timer.RECEIPT):
                out += self._receipt_timeout()
            case TimedOut(timer=Timer.GRACE):
                self._fire(BillInput.GRACE_OVER)
                self._fired(Timer.GRACE)
                out += self._stop_timers(*self._timers)
                out += self._end_grace(event.now, event.carried)
                out.append(Ban(self.terms.ban_seconds))
                why = (
                    f"deposit never appeared within {self.terms.grace_period:g} s: key banned "
                    f"for {self.terms.ban_seconds:g} s"
                )
                out.append(Refuse(ErrorCode.TX_COND_NOT_FOUND, why, close=True))
            case TimedOut():
                raise ValueError(f"{event.timer.value} is a repeating timer, not a timeout")
            case Save():
                self._fire(BillInput.SAVE)
                out += self._save(event.now, event.carried)
            case Ended():
                paid = self.life.state is BillState.PAID
                self._fire(BillInput.ENDED)
                out += self._stop_timers(*self._timers)
                # a session that ends in grace uses up budget
                out += self._end_grace(event.now, event.carried)
                if paid and not self.terms.by_bytes:
                    self.limit -= event.now - self.last_tick
                    self.last_tick = event.now
        return out

    # --- the rows' work ---------------------------------------------------------------------

    def _fire(self, event: BillInput) -> None:
        self.life.fire(event)

    def _start(self, timer: Timer, seconds: float, repeat: bool = False) -> StartTimer:
        if timer not in self._timers:
            self._timers.append(timer)
        return StartTimer(timer, seconds, repeat)

    def _stop_timers(self, *timers: Timer) -> list[Action]:
        out: list[Action] = []
        for timer in list(timers):
            if timer in self._timers:
                self._timers.remove(timer)
                out.append(StopTimer(timer))
        return out

    def _ask(self, kind: str) -> list[Action]:
        self.pending = kind
        self.attempts = 1
        return [AskReceipt(kind), self._start(Timer.RECEIPT, self.terms.receipt_timeout)]

    def _paid(self, now: float) -> list[Action]:
        """The first payment (or saved limits): the service is granted, metering starts."""
        self.metered = True
        self.last_tick = now
        out: list[Action] = [Grant()]
        if self.terms.by_bytes:
            self.armed = UNMETERED  # nothing of the metered kind has passed yet
        else:
            out.append(SetAllowance(UNMETERED))
            out.append(self._start(Timer.TICK, TICK, repeat=True))
        return out + self._look()

    def _release(self) -> list[Action]:
        """Traffic held at the credit (or the grace cap) goes on."""
        if not self.held:
            return []
        self.held = False
        return [Hold(False)]

    def _end_grace(self, now: float, carried: int) -> list[Action]:
        """Grace is over (paid, failed, or the session ended): book what it used."""
        if self.grace_since is None:
            return []
        self.grace_seconds = now - self.grace_since
        self.grace_bytes = carried - self.grace_bytes_at
        self.grace_since = None
        # what grace carried is booked as grace, not as paid, in the usage report
        self.saved_seconds += self.grace_seconds
        self.saved_bytes += self.grace_bytes
        return [BookGrace(self.grace_seconds, self.grace_bytes)]

    def _carried(self) -> list[Action]:
        state = self.life.state
        if state is BillState.GRACE and self.grace_service:
            # the grace bytes are spent: traffic waits for the first receipt
            out: list[Action] = [] if self.held else [Hold(True)]
            self.held = True
            return [*out, SetAllowance(UNMETERED)]
        if state is not BillState.PAID or not self.terms.by_bytes:
            return [SetAllowance(UNMETERED)]
        return self._look()

    def _look(self) -> list[Action]:
        """Ask for the next receipt at half, stop at zero, and set the next allowance."""
        t = self.terms
        decision = decide(
            Reading(
                limit=self.limit,
                units=t.units,
                price=t.price,
                locked_left=self.locked_left,
                pending=self.pending is not None,
                next_failed=self.next_failed is not None,
                redeeming=self.redeeming,
                credit=t.credit,
                held=self.held,
                by_bytes=t.by_bytes,
            )
        )
        if decision.stop:
            return self._used_up()
        if decision.hold:
            self.held = True
            self.armed = UNMETERED
            return [Hold(True), SetAllowance(UNMETERED)]
        out: list[Action] = []
        if decision.ask_next:
            out += self._ask("next")
        if decision.cannot_pay:
            self.next_failed = ErrorCode.TX_COND_NOT_ENOUGH
        if decision.allowance is not None:
            self.armed = decision.allowance
            out.append(SetAllowance(decision.allowance))
        return out

    def _used_up(self) -> list[Action]:
        """Limits used up without a signed next receipt: NOTIFY_STOPPED, no more packets."""
        self._fire(BillInput.USED_UP)
        unsigned = self.pending is not None
        self.pending = None
        code = self.next_failed or (
            ErrorCode.RECEIPT_NO_SIGN if unsigned else ErrorCode.RECEIPT_CANT_FIND
        )
        self.stop_code = code
        return [*self._stop_timers(*self._timers), SetAllowance(UNMETERED), Stop(code)]

    def _redeemed(self, event: Redeemed) -> list[Action]:
        first = self.life.state in (BillState.IDLE, BillState.GRACE)
        self._fire(BillInput.PAID if first else BillInput.REDEEMED)
        self.redeeming = False
        self.receipts += 1
        self.locked_left = event.locked_left
        self.paid_value += event.value
        self.limit += event.units
        self.synced += event.units  # the ledger added them in the redemption
        out = self._end_grace(event.now, event.carried)
        if out:
            # the first receipt pays for the grace actually used, as the original counts it
            self.limit -= self.grace_bytes if self.terms.by_bytes else self.grace_seconds
        if self.life.state is BillState.STOPPED:
            return out  # late: booked on the bill for its last save, nothing else
        out += self._release()
        if first:
            return out + self._paid(event.now)
        return [*out, Grant(), *self._look()]

    def _refused(self, event: Refused) -> list[Action]:
        if event.honest and self.life.state is BillState.PAID:
            # the deposit ran dry or expired: an honest end, at zero, with no ban
            self._fire(BillInput.DRY)
            self.redeeming = False
            self.next_failed = event.code
            return self._release() + self._look()
        stopped = self.life.state is BillState.STOPPED
        self._fire(BillInput.REFUSED)
        self.redeeming = False
        self.pending = None
        if stopped:
            # a late verdict: the session is gone, but a fraud still costs the key
            return [Ban(self.terms.ban_seconds)] if event.ban else []
        out = self._stop_timers(*self._timers)
        if event.ban:
            out += self._end_grace(event.now, event.carried)
            out.append(Ban(self.terms.ban_seconds))
        out.append(Refuse(event.code, event.why, event.close))
        return out

    def _fired(self, timer: Timer) -> None:
        """A one-shot timer went off: it runs no more."""
        if timer in self._timers:
            self._timers.remove(timer)

    def _receipt_timeout(self) -> list[Action]:
        kind = self.pending
        if kind is None:
            raise ValueError("a receipt's timeout with no receipt pending")
        if self.attempts < self.terms.receipt_attempts:
            self._fire(BillInput.RESEND)
            self._fired(Timer.RECEIPT)
            self.attempts += 1
            again = self._start(Timer.RECEIPT, self.terms.receipt_timeout)
            return [AskReceipt(kind, again=True), again]
        self._fire(BillInput.UNSIGNED)
        self._fired(Timer.RECEIPT)
        self.pending = None
        if kind == "first":
            why = f"no signed receipt after {self.attempts} attempts"
            return [
                *self._stop_timers(*self._timers),
                Refuse(ErrorCode.RECEIPT_NO_SIGN, why, close=True),
            ]
        # as the original: the client keeps what it paid for, then the service stops
        self.next_failed = ErrorCode.RECEIPT_NO_SIGN
        return self._look()

    def _save(self, now: float, carried: int) -> list[Action]:
        if not (self.metered or self.receipts):
            # only a bill that was paid has limits to save: a refused REQUEST must not
            # overwrite what the client has saved
            return []
        # the use since the last save, as a delta: the ledger added each receipt's units when
        # it redeemed it, so a save that overlaps a redemption takes nothing from it
        delta = self.limit - self.synced
        self.synced = self.limit
        seconds = now - self.started
        action = BookUsage(
            delta, seconds - self.saved_seconds, carried - self.saved_bytes, self.paid_value
        )
        self.saved_seconds = seconds
        self.saved_bytes = carried
        self.paid_value = 0
        return [action]
