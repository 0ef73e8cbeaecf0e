"""When the client signs the next receipt: only once what it signed is used down to the point
where an honest server asks again.

The server asks for the next receipt when half of the last one's units are left. The client
compares that claim with its own meter: of what it has signed (and what can still be
redeemed: the receipts on the chain the new one follows), no more than half the last
receipt, plus a tolerance for a server whose counter or clock runs a little ahead, may be
unused. Pure: numbers in, a reason (or None) out.
"""

from __future__ import annotations

from dataclasses import dataclass

from cellvpn.wire.receipt import Unit


@dataclass(frozen=True)
class Tolerance:
    """How far the server's count may run ahead: a share of the receipt plus a fixed part."""

    percent: int = 10
    bytes: int = 65536
    seconds: float = 2.0

    def slack(self, units: int, unit: int) -> float:
        fixed = self.seconds if unit == Unit.SEC else self.bytes
        return units * self.percent / 100 + fixed


def unit_name(unit: int) -> str:
    return "s" if unit == Unit.SEC else "B"


def refusal(
    *,
    committed: int,
    last_units: int,
    used: float,
    unit: int,
    unanswered: bool,
    tolerance: Tolerance,
) -> str | None:
    """Why the client must not sign the next receipt now (None: it may).

    ``committed``: units of the receipts this client signed that the new one would follow;
    ``last_units``: the units of the last of them; ``used``: the client's own meter;
    ``unanswered``: a receipt signed on this session has had no SUCCESS yet.
    """
    if unanswered:
        return "an earlier receipt is not answered yet"
    if committed <= 0:
        return None  # the first receipt: nothing signed is waiting to be used
    left = committed - used
    due = last_units / 2 + tolerance.slack(last_units, unit)
    if left <= due:
        return None
    name = unit_name(unit)
    return (
        f"asked too early: {left:.0f} {name} of what this client signed are unused "
        f"(the next receipt is due at {last_units / 2:.0f} {name} left, "
        f"{due:.0f} with the tolerance)"
    )
