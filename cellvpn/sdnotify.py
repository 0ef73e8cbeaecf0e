"""systemd's readiness protocol (``Type=notify``): a datagram to ``$NOTIFY_SOCKET``.

The whole protocol is ``KEY=value`` lines in one datagram to a UNIX socket (a path, or an
abstract name written with a leading ``@``), so it is done here rather than with a
dependency. Outside systemd there is no ``NOTIFY_SOCKET`` and nothing is sent.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping


def message(**fields: str | int) -> bytes:
    """``KEY=value`` lines: ``message(READY=1, STATUS="up")`` -> ``b"READY=1\\nSTATUS=up"``."""
    lines = []
    for key, value in fields.items():
        text = str(value)
        if "\n" in text:
            raise ValueError(f"{key}: a notify value is one line")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode()


def address_of(value: str) -> str | bytes:
    """The socket address of a ``NOTIFY_SOCKET`` value: ``@name`` is an abstract name."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def reloading_fields(monotonic_ns: Callable[[], int] = time.monotonic_ns) -> dict[str, str | int]:
    """``RELOADING=1`` with the ``MONOTONIC_USEC`` that ``Type=notify-reload`` wants."""
    return {"RELOADING": 1, "MONOTONIC_USEC": monotonic_ns() // 1000}


class Notifier:
    """Sends to ``$NOTIFY_SOCKET``, if set; never blocks and never raises (a datagram to a
    local socket, dropped with one error kept for the caller when it cannot go)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET", "")
        self.address = address_of(value) if value else None
        self.last_error: str | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one message; False when there is no socket or it could not be sent."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.setblocking(False)
                s.sendto(message(**fields), self.address)
        except OSError as e:
            self.last_error = f"cannot notify systemd at {self.address!r}: {e.strerror or e}"
            return False
        return True
