"""The meter's rules: the bill's life row by row, and the metering decision on literal rows."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cellvpn.billing.meter import (
    BillInput,
    BillState,
    Decision,
    Reading,
    decide,
    new_bill_machine,
)
from cellvpn.fsm import InvalidTransitionError

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
