"""The signing rule, row by row: when the client signs the next receipt."""

from __future__ import annotations

import pytest

from cellvpn.client.signrule import Tolerance, refusal
from cellvpn.wire.receipt import Unit

TOLERANCE = Tolerance(percent=10, bytes=65536, seconds=2.0)


@pytest.mark.parametrize(
    ("committed", "last_units", "used", "unit", "unanswered", "signs"),
    [
        # the first receipt: nothing signed waits to be used
        (0, 0, 0, Unit.B, False, True),
        (0, 0, 0, Unit.SEC, False, True),
        # 1 MB receipts: due at 500,000 left, 665,536 with the tolerance
        (1_000_000, 1_000_000, 0, Unit.B, False, False),
        (1_000_000, 1_000_000, 334_463, Unit.B, False, False),
        (1_000_000, 1_000_000, 334_464, Unit.B, False, True),
        (1_000_000, 1_000_000, 500_000, Unit.B, False, True),
        (2_000_000, 1_000_000, 1_334_464, Unit.B, False, True),
        (2_000_000, 1_000_000, 1_000_000, Unit.B, False, False),
        # 60 s receipts: due at 30 s left, 38 with the tolerance
        (60, 60, 21.9, Unit.SEC, False, False),
        (60, 60, 22, Unit.SEC, False, True),
        (120, 60, 82, Unit.SEC, False, True),
        # an unanswered receipt blocks everything, even when use is due
        (60, 60, 59, Unit.SEC, True, False),
        (0, 0, 0, Unit.B, True, False),
    ],
)  # fmt: skip
def test_signing_rule(
    committed: int, last_units: int, used: float, unit: int, unanswered: bool, signs: bool
) -> None:
    why = refusal(
        committed=committed,
        last_units=last_units,
        used=used,
        unit=unit,
        unanswered=unanswered,
        tolerance=TOLERANCE,
    )
    assert (why is None) == signs


def test_the_reason_says_how_much_is_unused() -> None:
    why = refusal(
        committed=1_000_000, last_units=1_000_000, used=0, unit=Unit.B, unanswered=False,
        tolerance=TOLERANCE,
    )  # fmt: skip
    assert why == (
        "asked too early: 1000000 B of what this client signed are unused "
        "(the next receipt is due at 500000 B left, 665536 with the tolerance)"
    )
    assert (
        refusal(
            committed=60, last_units=60, used=0, unit=Unit.SEC, unanswered=True, tolerance=TOLERANCE
        )
        == "an earlier receipt is not answered yet"
    )


def test_no_tolerance_means_exactly_half() -> None:
    strict = Tolerance(percent=0, bytes=0, seconds=0)
    kw = dict(committed=100, last_units=100, unit=Unit.B, unanswered=False, tolerance=strict)
    assert refusal(used=50, **kw) is None  # type: ignore[arg-type]
    assert refusal(used=49, **kw) is not None  # type: ignore[arg-type]
