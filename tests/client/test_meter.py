"""The client's meter: seconds since the grant or bytes both ways, kept across sessions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cellvpn.client.meter import MeterStore, UsageMeter
from cellvpn.wire.receipt import Unit

PROVIDER = bytes(range(32))
DEPOSIT = bytes(range(32, 64))


def test_seconds_count_only_while_granted() -> None:
    meter = UsageMeter(Unit.SEC)
    assert meter.observe(100.0, 0) == 0  # not granted yet
    meter.start(100.0, 0)
    assert meter.observe(130.5, 0) == 30.5
    meter.stop(140.0, 0)
    assert meter.observe(500.0, 0) == 40.0  # between sessions nothing counts
    meter.start(500.0, 0)
    meter.start(510.0, 0)  # a second SUCCESS on the same session does not restart the count
    assert meter.observe(520.0, 0) == 60.0


def test_bytes_count_from_the_session_counter_at_the_grant() -> None:
    meter = UsageMeter(Unit.B, used=1000)
    meter.start(0.0, 5000)  # 5,000 bytes before the grant (grace, setup) are not counted
    assert meter.observe(1.0, 7500) == 3500
    meter.stop(2.0, 9000)
    meter.start(3.0, 0)  # the next session's counter starts at zero again
    assert meter.observe(4.0, 100) == 5100


def test_store_keeps_meters_per_provider_and_deposit(tmp_path: Path) -> None:
    path = tmp_path / "state" / "usage.json"
    store = MeterStore(path)
    meter = store.meter(PROVIDER, DEPOSIT, Unit.B)
    meter.used = 1234.0
    store.meter(PROVIDER, PROVIDER, Unit.SEC).used = 5.5
    store.save()
    again = MeterStore(path)
    assert again.meter(PROVIDER, DEPOSIT, Unit.B).used == 1234.0
    assert again.meter(PROVIDER, PROVIDER, Unit.SEC).used == 5.5
    assert again.meter(DEPOSIT, DEPOSIT, Unit.B).used == 0
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert json.loads(path.read_text())[f"{PROVIDER.hex()}:{DEPOSIT.hex()}"] == {
        "unit": Unit.B,
        "used": 1234.0,
    }


def test_a_damaged_store_says_so(tmp_path: Path) -> None:
    path = tmp_path / "usage.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"usage\.json is not readable JSON"):
        MeterStore(path)
