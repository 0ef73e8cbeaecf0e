"""The meter's rules: its table, every row walked with its actions (task.Clock, no reactor),
the pairs without a row, and the metering decision, each against literal rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
from twisted.internet.task import Clock

from cellvpn.billing.interfaces import DepositRow
from cellvpn.billing.meter import (
    TRANSITIONS,
    UNMETERED,
    AskFirst,
    AskReceipt,
    Ban,
    BillInput,
    BillState,
    BookGrace,
    BookUsage,
    Carried,
    Decision,
    Ended,
    Event,
    Found,
    GraceBegun,
    Grant,
    Hold,
    Meter,
    Reading,
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
    decide,
    judge_deposit,
    new_bill_machine,
)
from cellvpn.billing.records import Order
from cellvpn.fsm import InvalidTransitionError
from cellvpn.wire.receipt import Unit
from cellvpn.wire.service import ErrorCode

IDLE, GRACE, PAID, STOPPED = "idle", "grace", "paid", "stopped"

#: every (state, input) -> state a bill may take, written out here, not read from the table
LIFE = [
    ([], "grace", GRACE),
    ([], "paid", PAID),
    ([], "refused", STOPPED),
    (["grace"], "paid", PAID),
    (["grace"], "refused", STOPPED),
    (["paid"], "used-up", STOPPED),
    (["paid"], "refused", STOPPED),
    (["paid", "refused"], "refused", STOPPED),
    (["grace", "paid"], "used-up", STOPPED),
]

#: and the inputs that have no row: each a bug that raises
NO_ROW = [
    ([], "used-up"),
    (["grace"], "grace"),
    (["grace"], "used-up"),
    (["paid"], "paid"),
    (["paid"], "grace"),
    (["refused"], "paid"),
    (["refused"], "grace"),
    (["paid", "used-up"], "used-up"),
]


@pytest.mark.parametrize(("before", "event", "after"), LIFE)
def test_each_step_of_a_bills_life(before: list[str], event: str, after: str) -> None:
    life = new_bill_machine()
    for step in before:
        life.fire(BillInput(step))
    assert life.fire(BillInput(event)).value == after


@pytest.mark.parametrize(("before", "event"), NO_ROW)
def test_an_input_without_a_row_raises(before: list[str], event: str) -> None:
    life = new_bill_machine()
    for step in before:
        life.fire(BillInput(step))
    state = life.state
    with pytest.raises(InvalidTransitionError):
        life.fire(BillInput(event))
    assert life.state is state


def test_a_bill_starts_idle() -> None:
    assert new_bill_machine().state is BillState.IDLE


# --- the metering decision ---------------------------------------------------------------------

#: a byte-billed bill: receipts of 1000 bytes for 10, 100 left in the deposit, 200 of credit
BASE = Reading(
    limit=1000,
    units=1000,
    price=10,
    locked_left=100,
    pending=False,
    next_failed=False,
    redeeming=False,
    credit=200,
    held=False,
    by_bytes=True,
)


@pytest.mark.parametrize(
    ("what", "changes", "expected"),
    [
        ("a full receipt: look again at half", {}, Decision(allowance=500)),
        ("just above half", {"limit": 501}, Decision(allowance=1)),
        (
            "at half: ask, look again at zero",
            {"limit": 500},
            Decision(ask_next=True, allowance=500),
        ),
        ("below half, asked already", {"limit": 300, "pending": True}, Decision(allowance=300)),
        (
            "below half, the deposit cannot pay",
            {"limit": 300, "locked_left": 9},
            Decision(cannot_pay=True, allowance=300),
        ),
        (
            "below half, next known to fail",
            {"limit": 300, "next_failed": True},
            Decision(allowance=300),
        ),
        (
            "above half, asked already: look at zero",
            {"limit": 800, "pending": True},
            Decision(allowance=800),
        ),
        ("a fraction of a byte left", {"limit": 0.5, "pending": True}, Decision(allowance=1)),
        ("zero, nothing coming: stop", {"limit": 0}, Decision(stop=True)),
        ("in debt, nothing coming: stop", {"limit": -5}, Decision(stop=True)),
        (
            "zero while redeeming: the credit",
            {"limit": 0, "redeeming": True},
            Decision(allowance=200),
        ),
        (
            "in debt while redeeming: the credit left",
            {"limit": -150, "redeeming": True},
            Decision(allowance=50),
        ),
        (
            "credit past half a receipt is cut to half",
            {"limit": 0, "redeeming": True, "credit": 5000},
            Decision(allowance=500),
        ),
        ("credit used up: hold", {"limit": -200, "redeeming": True}, Decision(hold=True)),
        (
            "held already: nothing more",
            {"limit": -250, "redeeming": True, "held": True},
            Decision(),
        ),
    ],
)
def test_the_metering_decision_by_bytes(
    what: str, changes: dict[str, object], expected: Decision
) -> None:
    assert decide(replace(BASE, **changes)) == expected, what  # type: ignore[arg-type]


SECONDS = replace(BASE, units=60, price=10, credit=2, by_bytes=False, limit=60)


@pytest.mark.parametrize(
    ("what", "changes", "expected"),
    [
        ("a full receipt: nothing to set", {}, Decision()),
        ("at half: ask", {"limit": 30}, Decision(ask_next=True)),
        ("asked already", {"limit": 10, "pending": True}, Decision()),
        ("the deposit cannot pay", {"limit": 10, "locked_left": 0}, Decision(cannot_pay=True)),
        ("zero, nothing coming: stop", {"limit": 0}, Decision(stop=True)),
        (
            "a second in debt while redeeming: on credit",
            {"limit": -1, "redeeming": True},
            Decision(),
        ),
        ("the credit used up: hold", {"limit": -2, "redeeming": True}, Decision(hold=True)),
    ],
)
def test_the_metering_decision_by_seconds(
    what: str, changes: dict[str, object], expected: Decision
) -> None:
    assert decide(replace(SECONDS, **changes)) == expected, what  # type: ignore[arg-type]


# --- the meter: events in, actions out, walked row by row with task.Clock ----------------------


#: receipts of 1000 bytes for 10; 200 bytes of credit; three tries of 10 s; 60 s of grace
#: with 5000 bytes; bans of 3000 s
BYTES = Terms(
    by_bytes=True,
    units=1000,
    price=10,
    credit=200,
    receipt_timeout=10,
    receipt_attempts=3,
    grace_period=60,
    grace_bytes=5000,
    ban_seconds=3000,
)
#: the same by seconds: receipts of 60 s, 2 s of credit
SECS = replace(BYTES, by_bytes=False, units=60, credit=2)

_M = BillState
_B = BillInput

#: every row of the bill's table, written out: (state, input) -> next state
ROWS = {
    (_M.IDLE, _B.GRACE): _M.GRACE,
    (_M.IDLE, _B.ASK): _M.IDLE,
    (_M.IDLE, _B.RESEND): _M.IDLE,
    (_M.IDLE, _B.UNSIGNED): _M.STOPPED,
    (_M.IDLE, _B.SIGNED): _M.IDLE,
    (_M.IDLE, _B.PAID): _M.PAID,
    (_M.IDLE, _B.REFUSED): _M.STOPPED,
    (_M.IDLE, _B.CARRIED): _M.IDLE,
    (_M.IDLE, _B.ENDED): _M.STOPPED,
    (_M.GRACE, _B.FOUND): _M.GRACE,
    (_M.GRACE, _B.ASK): _M.GRACE,
    (_M.GRACE, _B.RESEND): _M.GRACE,
    (_M.GRACE, _B.UNSIGNED): _M.STOPPED,
    (_M.GRACE, _B.SIGNED): _M.GRACE,
    (_M.GRACE, _B.PAID): _M.PAID,
    (_M.GRACE, _B.REFUSED): _M.STOPPED,
    (_M.GRACE, _B.CARRIED): _M.GRACE,
    (_M.GRACE, _B.GRACE_OVER): _M.STOPPED,
    (_M.GRACE, _B.ENDED): _M.STOPPED,
    (_M.PAID, _B.CARRIED): _M.PAID,
    (_M.PAID, _B.TICK): _M.PAID,
    (_M.PAID, _B.USED_UP): _M.STOPPED,
    (_M.PAID, _B.RESEND): _M.PAID,
    (_M.PAID, _B.UNSIGNED): _M.PAID,
    (_M.PAID, _B.SIGNED): _M.PAID,
    (_M.PAID, _B.REDEEMED): _M.PAID,
    (_M.PAID, _B.DRY): _M.PAID,
    (_M.PAID, _B.REFUSED): _M.STOPPED,
    (_M.PAID, _B.SAVE): _M.PAID,
    (_M.PAID, _B.ENDED): _M.STOPPED,
    (_M.STOPPED, _B.REFUSED): _M.STOPPED,
    (_M.STOPPED, _B.REDEEMED): _M.STOPPED,
    (_M.STOPPED, _B.CARRIED): _M.STOPPED,
    (_M.STOPPED, _B.SAVE): _M.STOPPED,
    (_M.STOPPED, _B.ENDED): _M.STOPPED,
}


def test_the_table_is_the_rows_written_here() -> None:
    assert TRANSITIONS == ROWS


#: how a meter gets to where a row starts; each step an event made with the clock's time
Step = Callable[[Clock], Event]
PATHS: dict[str, tuple[Terms, list[Step]]] = {
    "idle": (BYTES, []),
    "idle-asked": (BYTES, [lambda c: AskFirst()]),
    "grace": (BYTES, [lambda c: GraceBegun(c.seconds(), 0, True)]),
    "grace-unfunded": (BYTES, [lambda c: GraceBegun(c.seconds(), 0, False)]),
    "grace-asked": (
        BYTES,
        [lambda c: GraceBegun(c.seconds(), 0, True), lambda c: Found(), lambda c: AskFirst()],
    ),
    # paid at t=0 with 1000 bytes: the allowance is 500 (half)
    "paid": (
        BYTES,
        [
            lambda c: AskFirst(),
            lambda c: Signed(),
            lambda c: Redeemed(1000, 10, 90, c.seconds(), 0),
        ],
    ),
    "paid-seconds": (
        SECS,
        [
            lambda c: AskFirst(),
            lambda c: Signed(),
            lambda c: Redeemed(60, 10, 90, c.seconds(), 0),
        ],
    ),
}
#: and further: half used, the next receipt asked; then signed, in the ledger's hands
PATHS["paid-asked"] = (BYTES, [*PATHS["paid"][1], lambda c: Carried(0)])
PATHS["paid-redeeming"] = (BYTES, [*PATHS["paid-asked"][1], lambda c: Signed()])
PATHS["stopped"] = (BYTES, [lambda c: Refused(ErrorCode.PRICE_ERROR, "another order")])
PATHS["ended-redeeming"] = (BYTES, [*PATHS["paid-redeeming"][1], lambda c: Ended(0, 500)])
PATHS["ended-paid"] = (BYTES, [*PATHS["paid-asked"][1], lambda c: Ended(0, 500)])

_R = Timer.RECEIPT
NO_SIGN, DRY = ErrorCode.RECEIPT_NO_SIGN, ErrorCode.TX_COND_NOT_ENOUGH
GRACE_OVER_WHY = "deposit never appeared within 60 s: key banned for 3000 s"

#: (start, seconds the clock moves, the events, the transitions the last one makes, its actions)
WALK: list[tuple[str, float, list[Step], list[tuple[str, str, str]], list[object]]] = [
    # IDLE
    (
        "idle",
        0,
        [lambda c: GraceBegun(c.seconds(), 0, True)],
        [(IDLE, "grace", GRACE)],
        [
            SetAllowance(5000),
            Grant(grace=True),
            StartTimer(Timer.GRACE, 60),
            StartTimer(Timer.POLL, 1.0, repeat=True),
        ],
    ),
    (
        "idle",
        0,
        [lambda c: GraceBegun(c.seconds(), 0, False)],
        [(IDLE, "grace", GRACE)],
        [StartTimer(Timer.GRACE, 60), StartTimer(Timer.POLL, 1.0, repeat=True)],
    ),
    (
        "idle",
        0,
        [lambda c: AskFirst()],
        [(IDLE, "ask", IDLE)],
        [AskReceipt("first"), StartTimer(_R, 10)],
    ),
    (
        "idle-asked",
        10,
        [lambda c: TimedOut(_R)],
        [(IDLE, "resend", IDLE)],
        [AskReceipt("first", again=True), StartTimer(_R, 10)],
    ),
    (
        "idle-asked",
        10,
        [lambda c: TimedOut(_R), lambda c: TimedOut(_R), lambda c: TimedOut(_R)],
        [(IDLE, "unsigned", STOPPED)],
        [Refuse(NO_SIGN, "no signed receipt after 3 attempts", close=True)],
    ),
    ("idle-asked", 0, [lambda c: Signed()], [(IDLE, "signed", IDLE)], [StopTimer(_R)]),
    (
        "idle-asked",
        0,
        [lambda c: Signed(), lambda c: Redeemed(1000, 10, 90, c.seconds(), 0)],
        [(IDLE, "paid", PAID)],
        [Grant(), SetAllowance(500)],
    ),
    (
        "idle",
        0,
        [lambda c: Restored(700, 90, c.seconds(), 0)],
        [(IDLE, "paid", PAID)],
        [Grant(), SetAllowance(200)],
    ),
    (
        "idle-asked",
        0,
        [lambda c: Refused(ErrorCode.TX_COND_NOT_FOUND, "closed", close=True)],
        [(IDLE, "refused", STOPPED)],
        [StopTimer(_R), Refuse(ErrorCode.TX_COND_NOT_FOUND, "closed", close=True)],
    ),
    ("idle", 0, [lambda c: Carried(0)], [(IDLE, "carried", IDLE)], [SetAllowance(UNMETERED)]),
    (
        "idle-asked",
        0,
        [lambda c: Ended(c.seconds(), 0)],
        [(IDLE, "ended", STOPPED)],
        [StopTimer(_R)],
    ),
    # GRACE
    (
        "grace",
        3,
        [lambda c: Found()],
        [(GRACE, "found", GRACE)],
        [StopTimer(Timer.POLL), StopTimer(Timer.GRACE)],
    ),
    (
        "grace",
        3,
        [lambda c: Found(), lambda c: AskFirst()],
        [(GRACE, "ask", GRACE)],
        [AskReceipt("first"), StartTimer(_R, 10)],
    ),
    (
        "grace-asked",
        10,
        [lambda c: TimedOut(_R)],
        [(GRACE, "resend", GRACE)],
        [AskReceipt("first", again=True), StartTimer(_R, 10)],
    ),
    (
        "grace-asked",
        10,
        [lambda c: TimedOut(_R), lambda c: TimedOut(_R), lambda c: TimedOut(_R)],
        [(GRACE, "unsigned", STOPPED)],
        [Refuse(NO_SIGN, "no signed receipt after 3 attempts", close=True)],
    ),
    ("grace-asked", 0, [lambda c: Signed()], [(GRACE, "signed", GRACE)], [StopTimer(_R)]),
    (
        # paid 5 s into grace, 300 bytes carried: booked as grace, and paid for
        "grace-asked",
        5,
        [lambda c: Signed(), lambda c: Redeemed(1000, 10, 90, c.seconds(), 300)],
        [(GRACE, "paid", PAID)],
        [BookGrace(5.0, 300), Grant(), SetAllowance(200)],
    ),
    (
        "grace",
        2,
        [
            lambda c: Refused(
                ErrorCode.UNIT_TYPE_ERROR, "unit", True, True, now=c.seconds(), carried=100
            )
        ],
        [(GRACE, "refused", STOPPED)],
        [
            StopTimer(Timer.GRACE),
            StopTimer(Timer.POLL),
            BookGrace(2.0, 100),
            Ban(3000),
            Refuse(ErrorCode.UNIT_TYPE_ERROR, "unit", close=True),
        ],
    ),
    (
        "grace",
        0,
        [lambda c: Carried(0)],
        [(GRACE, "carried", GRACE)],
        [Hold(True), SetAllowance(UNMETERED)],
    ),
    (
        "grace",
        0,
        [lambda c: Carried(0), lambda c: Carried(0)],
        [(GRACE, "carried", GRACE)],
        [SetAllowance(UNMETERED)],
    ),
    (
        "grace-unfunded",
        0,
        [lambda c: Carried(0)],
        [(GRACE, "carried", GRACE)],
        [SetAllowance(UNMETERED)],
    ),
    (
        "grace",
        60,
        [lambda c: TimedOut(Timer.GRACE, c.seconds(), 4000)],
        [(GRACE, "grace-over", STOPPED)],
        [
            StopTimer(Timer.POLL),
            BookGrace(60.0, 4000),
            Ban(3000),
            Refuse(ErrorCode.TX_COND_NOT_FOUND, GRACE_OVER_WHY, close=True),
        ],
    ),
    (
        "grace",
        3,
        [lambda c: Ended(c.seconds(), 50)],
        [(GRACE, "ended", STOPPED)],
        [StopTimer(Timer.GRACE), StopTimer(Timer.POLL), BookGrace(3.0, 50)],
    ),
    # PAID
    (
        "paid",
        0,
        [lambda c: Carried(0)],
        [(PAID, "carried", PAID)],
        [AskReceipt("next"), StartTimer(_R, 10), SetAllowance(500)],
    ),
    ("paid-seconds", 1, [lambda c: Tick(c.seconds())], [(PAID, "tick", PAID)], []),
    (
        "paid-seconds",
        30,
        [lambda c: Tick(c.seconds())],
        [(PAID, "tick", PAID)],
        [AskReceipt("next"), StartTimer(_R, 10)],
    ),
    (
        "paid-asked",
        0,
        [lambda c: Carried(0)],
        [(PAID, "carried", PAID), (PAID, "used-up", STOPPED)],
        [StopTimer(_R), SetAllowance(UNMETERED), Stop(NO_SIGN)],
    ),
    (
        "paid-asked",
        10,
        [lambda c: TimedOut(_R)],
        [(PAID, "resend", PAID)],
        [AskReceipt("next", again=True), StartTimer(_R, 10)],
    ),
    (
        # the client never signs: it keeps the 500 bytes it paid for
        "paid-asked",
        10,
        [lambda c: TimedOut(_R), lambda c: TimedOut(_R), lambda c: TimedOut(_R)],
        [(PAID, "unsigned", PAID)],
        [SetAllowance(500)],
    ),
    ("paid-asked", 0, [lambda c: Signed()], [(PAID, "signed", PAID)], [StopTimer(_R)]),
    (
        "paid-redeeming",
        0,
        [lambda c: Redeemed(1000, 10, 80, c.seconds(), 500)],
        [(PAID, "redeemed", PAID)],
        [Grant(), SetAllowance(1000)],
    ),
    (
        # the credit (200) used up while the ledger stalls: held; redeemed: let go
        "paid-redeeming",
        0,
        [lambda c: Carried(0), lambda c: Carried(0)],
        [(PAID, "carried", PAID)],
        [Hold(True), SetAllowance(UNMETERED)],
    ),
    (
        "paid-redeeming",
        0,
        [
            lambda c: Carried(0),
            lambda c: Carried(0),
            lambda c: Redeemed(1000, 10, 80, c.seconds(), 700),
        ],
        [(PAID, "redeemed", PAID)],
        [Hold(False), Grant(), SetAllowance(300)],
    ),
    (
        "paid-redeeming",
        0,
        [lambda c: Refused(DRY, "the deposit ran dry", honest=True)],
        [(PAID, "dry", PAID)],
        [SetAllowance(500)],
    ),
    (
        "paid-asked",
        0,
        [lambda c: Refused(NO_SIGN, "forged", close=True, ban=True)],
        [(PAID, "refused", STOPPED)],
        [StopTimer(_R), Ban(3000), Refuse(NO_SIGN, "forged", close=True)],
    ),
    (
        "paid-asked",
        30,
        [lambda c: Save(c.seconds(), 500)],
        [(PAID, "save", PAID)],
        [BookUsage(-500.0, 30.0, 500, 10)],
    ),
    (
        "paid-asked",
        0,
        [lambda c: Ended(c.seconds(), 500)],
        [(PAID, "ended", STOPPED)],
        [StopTimer(_R)],
    ),
    (
        "paid-seconds",
        2.5,
        [lambda c: Ended(c.seconds(), 0)],
        [(PAID, "ended", STOPPED)],
        [StopTimer(Timer.TICK)],
    ),
    # STOPPED
    (
        "stopped",
        0,
        [lambda c: Refused(ErrorCode.NO_LEDGER, "late")],
        [(STOPPED, "refused", STOPPED)],
        [],
    ),
    (
        "stopped",
        0,
        [lambda c: Refused(NO_SIGN, "a late fraud verdict", ban=True)],
        [(STOPPED, "refused", STOPPED)],
        [Ban(3000)],
    ),
    (
        "ended-redeeming",
        0,
        [lambda c: Redeemed(1000, 10, 80, c.seconds(), 500)],
        [(STOPPED, "redeemed", STOPPED)],
        [],
    ),
    (
        "stopped",
        0,
        [lambda c: Carried(0)],
        [(STOPPED, "carried", STOPPED)],
        [SetAllowance(UNMETERED)],
    ),
    ("stopped", 0, [lambda c: Save(c.seconds(), 0)], [(STOPPED, "save", STOPPED)], []),
    (
        "ended-paid",
        20,
        [lambda c: Save(c.seconds(), 600)],
        [(STOPPED, "save", STOPPED)],
        [BookUsage(-500.0, 20.0, 600, 10)],
    ),
    ("stopped", 0, [lambda c: Ended(c.seconds(), 0)], [(STOPPED, "ended", STOPPED)], []),
]


def _meter(start: str, clock: Clock) -> Meter:
    terms, steps = PATHS[start]
    meter = Meter(terms, clock.seconds())
    for step in steps:
        meter.handle(step(clock))
    return meter


@pytest.mark.parametrize(
    ("start", "advance", "events", "moves", "actions"),
    WALK,
    ids=[f"{w[0]}-{'-'.join(m[1] for m in w[3])}-{i}" for i, w in enumerate(WALK)],
)
def test_each_row_with_its_actions(
    start: str,
    advance: float,
    events: list[Step],
    moves: list[tuple[str, str, str]],
    actions: list[object],
) -> None:
    clock = Clock()
    meter = _meter(start, clock)
    clock.advance(advance)
    *before, last = events
    for step in before:
        meter.handle(step(clock))
    seen: list[tuple[str, str, str]] = []
    meter.life.observe(lambda old, event, new: seen.append((old.value, event.value, new.value)))
    assert meter.handle(last(clock)) == actions
    assert seen == moves


def test_every_row_is_walked() -> None:
    walked = {(BillState(m[0]), BillInput(m[1])) for w in WALK for m in w[3]}
    assert walked == set(ROWS)


#: every (state, input) pair that has no row: each must raise
MISSING = [(s, i) for s in BillState for i in BillInput if (s, i) not in ROWS]
#: inputs that take a fresh bill to each state
TO = {IDLE: [], GRACE: ["grace"], PAID: ["paid"], STOPPED: ["refused"]}


@pytest.mark.parametrize(
    ("state", "event"), MISSING, ids=[f"{s.value}-{i.value}" for s, i in MISSING]
)
def test_a_pair_without_a_row_raises(state: BillState, event: BillInput) -> None:
    life = new_bill_machine()
    for step in TO[state.value]:
        life.fire(BillInput(step))
    with pytest.raises(InvalidTransitionError):
        life.fire(event)
    assert life.state is state


@pytest.mark.parametrize(
    ("start", "event"),
    [
        ("idle", Tick(1)),  # no ticks before the service is paid
        ("grace", GraceBegun(0, 0, True)),  # one grace per bill
        ("paid", Found()),
        ("paid", AskFirst()),  # the next receipt is the meter's to ask for
        ("grace", Save(0, 0)),  # grace is booked as grace, not saved as limits
        ("stopped", Signed()),
        ("stopped", Tick(1)),
        ("stopped", Restored(100, 10, 0, 0)),
    ],
)
def test_an_event_without_a_row_raises_and_changes_nothing(start: str, event: Event) -> None:
    meter = _meter(start, Clock())
    state = meter.state
    with pytest.raises(InvalidTransitionError):
        meter.handle(event)
    assert meter.state is state


def test_a_timeout_for_no_receipt_or_of_a_repeating_timer_is_a_bug() -> None:
    with pytest.raises(ValueError):
        _meter("paid", Clock()).handle(TimedOut(Timer.RECEIPT))
    with pytest.raises(ValueError):
        _meter("grace", Clock()).handle(TimedOut(Timer.POLL))


def test_the_timers_that_run_belong_to_the_bill_and_stop_at_its_end() -> None:
    clock = Clock()
    meter = _meter("grace", clock)
    assert meter.timers == (Timer.GRACE, Timer.POLL)
    meter.handle(Found())
    meter.handle(AskFirst())
    assert meter.timers == (Timer.RECEIPT,)
    meter.handle(Ended(clock.seconds(), 0))
    assert meter.timers == ()


def test_bytes_are_counted_from_the_allowance_left() -> None:
    meter = _meter("paid", Clock())
    meter.count(300)  # 200 of the 500 carried
    assert meter.limit == 800
    meter.count(300)  # nothing more
    assert meter.limit == 800


def test_seconds_held_are_not_billed() -> None:
    clock = Clock()
    meter = _meter("paid-seconds", clock)
    meter.held = True
    clock.advance(5)
    meter.handle(Tick(clock.seconds()))
    assert meter.limit == 60


# --- the deposit a REQUEST names ----------------------------------------------------------------

CLIENT = b"c" * 32
ORDER = Order(unit=Unit.B, units=1000, price=10, token="CELL", provider=b"p" * 32, expires=2000)
DEPOSIT = DepositRow(
    id=b"d" * 32,
    owner=CLIENT,
    owner_public=b"k" * 32,
    srv_uid=1,
    unit=Unit.B,
    max_unit_price=1,
    locked=100,
    initial=100,
    expires=2000,
    state_hash=b"d" * 32,
    closed=False,
    active_usage=None,
)


@pytest.mark.parametrize(
    ("what", "changes", "now", "expected"),
    [
        ("a deposit that can pay", {}, 1000, None),
        (
            "another owner",
            {"owner": b"o" * 32},
            1000,
            (ErrorCode.RECEIPT_WRONG_PKEY_HASH, "the deposit belongs to another key"),
        ),
        (
            "another service",
            {"srv_uid": 2},
            1000,
            (ErrorCode.TX_COND_WRONG_SRV_UID, "the deposit is for another service"),
        ),
        (
            "closed",
            {"closed": True},
            1000,
            (ErrorCode.TX_COND_NOT_FOUND, "the deposit is closed or expired"),
        ),
        ("expired", {}, 2000, (ErrorCode.TX_COND_NOT_FOUND, "the deposit is closed or expired")),
        (
            "another unit",
            {"unit": Unit.SEC},
            1000,
            (ErrorCode.UNIT_TYPE_ERROR, "the deposit pays for another unit"),
        ),
        (
            "a price above its maximum",
            {"max_unit_price": 0},
            1000,
            (ErrorCode.RECEIPT_UNITS_ERROR, "the price is above the deposit's maximum"),
        ),
        (
            "the owner is checked first",
            {"owner": b"o" * 32, "closed": True, "unit": Unit.SEC},
            3000,
            (ErrorCode.RECEIPT_WRONG_PKEY_HASH, "the deposit belongs to another key"),
        ),
    ],
)
def test_the_deposit_a_request_names(
    what: str, changes: dict[str, object], now: float, expected: object
) -> None:
    deposit = replace(DEPOSIT, **changes)  # type: ignore[arg-type]
    assert judge_deposit(ORDER, CLIENT, deposit, now) == expected, what
