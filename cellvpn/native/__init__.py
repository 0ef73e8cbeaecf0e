"""The native fast path: the stream's per-frame loops in C, chosen by ``fastpath``.

``fastpath = auto`` (the default) uses the C module when pip could build it and the pure
Python loops when it could not; ``on`` refuses to start without it; ``off`` never uses it.
``CELLVPN_FASTPATH`` in the environment overrides ``auto`` only, so an operator (or a test) can
run a whole process on the Python path without editing its configuration. The C loops give the
same results as the Python ones byte for byte (``tests/native``); so does the server's pump,
which carries an established session's VPN_SEND packets to the TUN (:mod:`cellvpn.device.pump`).
Everything else stays Python.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cache

from cellvpn.wire.frame import Scan


class FastPathMode(StrEnum):
    """``fastpath`` in ``[server]`` and ``[client]``."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


MODES = tuple(m.value for m in FastPathMode)
ENV = "CELLVPN_FASTPATH"

#: ``pack(out, packets, start, stamp, node, channel, ptype, seq, op, usage_id, large)
#: -> (stop, count, size)``
Pack = Callable[
    [bytearray, Sequence[bytes | bytearray | memoryview], int, int, int, int, int, int, int, int,
     int],
    tuple[int, int, int],
]  # fmt: skip


#: ``pump_up(view, pos, max_payload, fd, vnet, lease, keep, hosts, host_udp, host_flags,
#: seq_next, allowance, channel, op, op_gso) -> (pos, packets, ip_bytes, written)``: the
#: server's pump from the stream to the TUN (``cellvpn/device/pump.py``)
PumpUp = Callable[
    [memoryview, int, int, int, bool, bytes, bytes, bytes, bytes, int, int, int, int, int, int],
    tuple[int, int, int, int],
]


class FastPathUnavailableError(RuntimeError):
    """``fastpath = on`` and the C module is not there (or does not load)."""


@dataclass(frozen=True)
class FastPath:
    """The loops a stream uses: the C ones, or None for the Python ones; ``why`` says which
    and, for Python, the reason (the status and the start's log line show it)."""

    scan: Scan | None
    pack: Pack | None
    why: str
    #: None on the Python path: every frame goes through the stream and the session
    pump_up: PumpUp | None = None

    @property
    def native(self) -> bool:
        return self.scan is not None


@cache
def load(mode: str = "auto") -> FastPath:
    """The fast path for ``mode`` (one of ``MODES``); raises FastPathUnavailableError for ``on``
    without the module, ValueError for an unknown mode."""
    if mode not in MODES:
        raise ValueError(f"fastpath = {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "auto":
        override = os.environ.get(ENV, "").strip().lower()
        if override:
            if override not in MODES:
                raise ValueError(f"{ENV}={override!r}: expected one of {', '.join(MODES)}")
            mode = override
    if mode == "off":
        return FastPath(None, None, "Python (fastpath = off)")
    try:
        from cellvpn.native import _fastpath  # type: ignore[attr-defined]
    except ImportError as e:
        if mode == "on":
            raise FastPathUnavailableError(
                f"fastpath = on, but the C module cannot be loaded: {e} "
                "(reinstall with a C compiler and the Python headers present)"
            ) from None
        return FastPath(None, None, f"Python (the C module is not built: {e})")
    return FastPath(
        _fastpath.scan_frames,
        _fastpath.pack_data,
        "C (cellvpn.native._fastpath)",
        _fastpath.pump_up,
    )


def chosen(mode: FastPathMode) -> FastPath:
    """``load`` at a service's start: a choice that cannot run is a StartupError (one log
    line and exit status 1, as for any configuration the machine cannot carry out)."""
    from cellvpn.errors import StartupError

    try:
        return load(mode.value)
    except (FastPathUnavailableError, ValueError) as e:
        raise StartupError(str(e)) from None
