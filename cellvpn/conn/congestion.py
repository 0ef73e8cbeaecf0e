"""Which TCP congestion control the stream's socket sends with, and keeping bbr's rate honest.

The stream is one TCP connection that carries every inner flow, so its loss response is the
tunnel's: under random loss cubic halves its window at each lost segment and the inner flows see
the whole WAN as a few packets per round trip, while bbr paces at the bandwidth it measures and
does not read loss as congestion. On a clean local link (veth, a LAN) cubic carries more, because
bbr keeps its window near two bandwidth-delay products, and at a few microseconds of RTT that is
too small for a receiver that reads in bursts. ``auto`` therefore chooses per connection from the
handshake's RTT: bbr where the path is longer than ``lan_rtt``, cubic below it. The figures are in
docs/performance.md.

The decision is a plain function; the socket options are thin wrappers around it.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from twisted.logger import Logger

_log = Logger()

AUTO = "auto"
#: what ``auto`` takes on paths longer than ``lan_rtt``, and on shorter ones
FOR_WAN = "bbr"
FOR_LAN = "cubic"

#: offset and format of ``tcpi_min_rtt`` (microseconds) in Linux's ``struct tcp_info``
_TCPI_MIN_RTT = struct.Struct("=I")
_TCPI_MIN_RTT_OFFSET = 148

#: bbr's bulk sends after a quiet spell: a write at least this large ...
RESTART_BYTES = 16 * 1024
#: ... after at least this many seconds without one restarts bbr's startup (see OuterCongestion)
RESTART_IDLE = 0.5

#: bbr's unsent bytes in the kernel beyond which the socket stops being writable: the rest
#: waits in the transport's buffer, where it still pauses the TUN reader, instead of lengthening
#: the queue the inner flows see behind a bbr window that is already two round trips deep
BBR_NOTSENT_LOWAT = 128 * 1024

_AVAILABLE = Path("/proc/sys/net/ipv4/tcp_available_congestion_control")
_DEFAULT = Path("/proc/sys/net/ipv4/tcp_congestion_control")

#: names already said to be missing or refused (said once per process, not per connection)
_said: set[str] = set()


def choose(
    setting: str | None, handshake_rtt: float | None, have: Iterable[str], lan_rtt: float
) -> str | None:
    """The congestion control for one connection; None keeps the kernel's default.

    ``setting`` is the config value (a name, ``auto``, or None for ``system``), ``handshake_rtt``
    the connection's RTT so far in seconds (None if unknown), ``have`` what the kernel offers.
    """
    if setting != AUTO:
        return setting
    wan = handshake_rtt is None or handshake_rtt >= lan_rtt
    wanted = FOR_WAN if wan else FOR_LAN
    return wanted if wanted in set(have) else None


def available() -> frozenset[str]:
    """The congestion controls this kernel has loaded (empty if it cannot say)."""
    try:
        return frozenset(_AVAILABLE.read_text().split())
    except OSError:
        return frozenset()


def kernel_default() -> str:
    try:
        return _DEFAULT.read_text().strip() or "the kernel's default"
    except OSError:
        return "the kernel's default"


def handshake_rtt(sock: socket.socket) -> float | None:
    """The lowest RTT the kernel has measured on ``sock`` (the handshake's, just after it),
    in seconds; None where TCP_INFO does not say."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None
    if len(info) < _TCPI_MIN_RTT_OFFSET + _TCPI_MIN_RTT.size:
        return None
    (micros,) = _TCPI_MIN_RTT.unpack_from(info, _TCPI_MIN_RTT_OFFSET)
    return micros / 1e6 if micros else None


def say_once(key: str, message: str, **fields: object) -> None:
    if key not in _said:
        _said.add(key)
        _log.warn(message, **fields)


def set_congestion(sock: socket.socket, name: str) -> bool:
    """Use ``name`` for what ``sock`` sends; False if the kernel refuses (said once per name,
    and the kernel's default stays)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode("ascii"))
    except OSError as e:
        say_once(
            name,
            "TCP congestion control {name!r} cannot be used ({error}); streams keep the "
            "kernel's default (see /proc/sys/net/ipv4/tcp_available_congestion_control)",
            name=name,
            error=e.strerror or str(e),
        )
        return False
    return True


def restart(sock: socket.socket, name: str) -> None:
    """Re-initialise ``name`` on ``sock`` (by switching away and back): bbr starts from its
    startup phase again instead of from a bandwidth estimate it no longer trusts."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"reno")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode("ascii"))


class OuterCongestion:
    """The congestion control of one stream socket: chosen at connect, and for bbr, restarted
    when bulk sending resumes after a quiet spell.

    Linux's bbr (v1) keeps a windowed maximum of the delivery rate over ten round trips; while
    the tunnel carries only keepalives and ACKs, that window fills with small rates, and the
    next bulk transfer starts from them and grows 25% per eight round trips (seconds, on a
    50 ms path). Restarting puts bbr back in startup, which doubles per round trip.
    """

    def __init__(
        self,
        sock: socket.socket | None,
        setting: str | None,
        lan_rtt: float,
        now: Callable[[], float],
        have: Callable[[], Iterable[str]] = available,
    ) -> None:
        self._sock = sock
        self._now = now
        self.name: str | None = None
        #: how often bbr was put back into startup
        self.restarts = 0
        self._last_bulk = float("-inf")
        if sock is None or setting is None:
            return
        offered = have()
        if setting == AUTO and FOR_WAN not in set(offered):
            say_once(
                AUTO,
                "TCP congestion control {name!r} is not available; streams use {default}",
                name=FOR_WAN,
                default=kernel_default(),
            )
        name = choose(setting, handshake_rtt(sock), offered, lan_rtt)
        if name is not None and set_congestion(sock, name):
            self.name = name
            if name == FOR_WAN:
                _set_notsent_lowat(sock, BBR_NOTSENT_LOWAT)

    def before_write(self, pieces: Sequence[bytes | bytearray | memoryview]) -> None:
        """Called with each batch the stream writes (cheap: a length sum and a compare)."""
        if self.name != FOR_WAN or self._sock is None:
            return
        size = 0
        for piece in pieces:
            size += len(piece)
        if size < RESTART_BYTES:
            return
        now = self._now()
        if now - self._last_bulk >= RESTART_IDLE and self._last_bulk != float("-inf"):
            restart(self._sock, self.name)
            self.restarts += 1
        self._last_bulk = now


def _set_notsent_lowat(sock: socket.socket, size: int) -> None:
    option = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, option, size)
