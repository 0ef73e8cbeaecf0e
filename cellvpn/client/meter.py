"""The client's own count of what it used, the way the server bills it.

A server that asks for the next receipt claims that half of what the client signed is used;
the client believes its own count, not the server's. The count is kept per (provider,
deposit) and carried across reconnects, restarts and the provider's other servers, because
the limits a server resumes with were paid by receipts this client signed: they are
counted from this record, not from the server's word.

Units follow the server's metering (:mod:`cellvpn.server.billing`): seconds since the
service was granted (SEC), or IP bytes both ways, offload super-packets counted as their
segments, plus the L4 proxy's payload (B). Plain Python: the caller passes the clock's time
and the session's byte counter; no reactor, no files (:class:`MeterStore` is the file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cellvpn.wire.receipt import Unit

#: The meters' file name in the client's state folder, beside the receipt record.
METER_FILE = "usage.json"


class UsageMeter:
    """Use of one (provider, deposit): ``used`` units so far, all sessions together."""

    def __init__(self, unit: int, used: float = 0.0) -> None:
        self.unit = unit
        self.used = float(used)
        #: the clock (SEC) or the session's byte counter (B) when last folded in; None = idle
        self._mark: float | None = None

    @property
    def running(self) -> bool:
        return self._mark is not None

    def _reading(self, now: float, session_bytes: int) -> float:
        return now if self.unit == Unit.SEC else float(session_bytes)

    def start(self, now: float, session_bytes: int) -> None:
        """The service was granted on a session: count from here (again, after a pause)."""
        if self._mark is None:
            self._mark = self._reading(now, session_bytes)

    def observe(self, now: float, session_bytes: int) -> float:
        """Fold in what was used since the last look; the total so far."""
        if self._mark is not None:
            reading = self._reading(now, session_bytes)
            self.used += max(0.0, reading - self._mark)
            self._mark = reading
        return self.used

    def stop(self, now: float, session_bytes: int) -> None:
        """The session ended: what it used is counted, nothing more until the next grant."""
        self.observe(now, session_bytes)
        self._mark = None


def meter_key(provider: bytes, deposit: bytes) -> str:
    return f"{provider.hex()}:{deposit.hex()}"


class MeterStore:
    """The meters of every (provider, deposit), in one small JSON file written atomically.

    A save that a crash loses only undercounts the client's use, which makes the client
    stricter, never more generous.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.meters: dict[str, UsageMeter] = {}
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            data = {}
        except ValueError as e:
            raise ValueError(
                f"{path} is not readable JSON ({e}); move it away to start over"
            ) from e
        for key, entry in data.items():
            self.meters[key] = UsageMeter(int(entry["unit"]), float(entry["used"]))

    def meter(self, provider: bytes, deposit: bytes, unit: int) -> UsageMeter:
        key = meter_key(provider, deposit)
        meter = self.meters.get(key)
        if meter is None or meter.unit != unit:
            meter = self.meters[key] = UsageMeter(unit)
        return meter

    def save(self) -> None:
        data = {k: {"unit": m.unit, "used": m.used} for k, m in self.meters.items()}
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
