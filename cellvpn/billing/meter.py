"""A paid session's meter, sans-IO: the bill's life as a table, and the metering rule.

The server's billing edge (``cellvpn/server/billing.py``) keeps the timers, the ledger calls
and the packets; what it decides is here, as plain data in and a decision out, so every rule
can be tested without a reactor:

- :data:`TRANSITIONS`: a bill is IDLE until its REQUEST is judged, in GRACE while its deposit
  is not in the ledger yet, PAID once a receipt was redeemed (or saved limits restored), and
  STOPPED when its limits ran out or it was refused. STOPPED is the end: nothing leaves it.
- :func:`decide`: with the limits left, ask for the next receipt at half use, let at most the
  credit pass while a signed receipt is being redeemed (then hold traffic), stop at zero, and
  say how many bytes may pass before the meter must look again.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from cellvpn.fsm import Machine


class BillState(Enum):
    IDLE = "idle"
    GRACE = "grace"
    PAID = "paid"
    STOPPED = "stopped"


class BillInput(Enum):
    GRACE = "grace"  # a paid REQUEST whose deposit is not in the ledger yet
    PAID = "paid"  # the first receipt redeemed, or saved limits restored
    USED_UP = "used-up"  # the limits reached zero with no next receipt redeemed
    REFUSED = "refused"  # the REQUEST refused, a fraud found, grace over unpaid


_S, _I = BillState, BillInput
TRANSITIONS: dict[tuple[BillState, BillInput], BillState] = {
    (_S.IDLE, _I.GRACE): _S.GRACE,
    (_S.IDLE, _I.PAID): _S.PAID,
    (_S.IDLE, _I.REFUSED): _S.STOPPED,
    (_S.GRACE, _I.PAID): _S.PAID,
    (_S.GRACE, _I.REFUSED): _S.STOPPED,
    (_S.PAID, _I.USED_UP): _S.STOPPED,
    (_S.PAID, _I.REFUSED): _S.STOPPED,
    # a refusal of a bill already stopped (a late ledger answer) changes nothing
    (_S.STOPPED, _I.REFUSED): _S.STOPPED,
}
del _S, _I


def new_bill_machine() -> Machine[BillState, BillInput]:
    return Machine("bill", BillState.IDLE, TRANSITIONS)


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
