"""What a per-session rate limit costs the forwarder, and how exact its bucket is.

    .venv/bin/python bench/ratelimit_bench.py [--packets N] [--rounds R]

Three runs of the same packets through ``Forwarder.from_tun`` and ``Forwarder.from_client``
(no sockets, no TUN: the forwarder's own work): sessions without a limit (the default), with
a limit so high it never drops (the bucket's bookkeeping alone), and with a limit that drops.
Then the bucket's accuracy: offered twice its rate for 10 simulated seconds, what it passed
against rate x time + burst. Prints one line per figure.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import time

from cellvpn.device.counters import SessionCounters
from cellvpn.device.forwarder import Forwarder
from cellvpn.ratelimit import TokenBucket

CLIENT = bytes([198, 18, 9, 2])
REMOTE = bytes([198, 19, 0, 10])


def packet(src: bytes, dst: bytes, size: int) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 0, 0, 64, 17, 0, src, dst)
    return header + bytes(size - 20)


class Peer:
    """The forwarder's view of a session, with nothing behind it."""

    def __init__(self, rate_bits: int | None, now: float) -> None:
        self.addr_key = CLIENT
        self.addr6_key = b""
        self.counters = SessionCounters()
        self.allowance = 1 << 62
        self.offload = False
        bucket = (lambda: TokenBucket(rate_bits / 8, 262144, now)) if rate_bits else None
        self.rate_up = bucket() if bucket else None
        self.rate_down = bucket() if bucket else None

    def deliver(self, packet: bytes | memoryview) -> bool:
        return True

    def deliver_gso(self, header_and_packet: bytes | memoryview) -> bool:
        return True

    def flush(self) -> None:
        pass

    def allowance_used(self) -> None:
        self.allowance = 1 << 62


def run(rate_bits: int | None, packets: int) -> float:
    """Nanoseconds per packet, both directions together."""
    clock = [0.0]
    fwd = Forwarder(lambda p: True, 1360, clock=lambda: clock[0])
    peer = Peer(rate_bits, 0.0)
    fwd.attach(peer)  # type: ignore[arg-type]
    down = [packet(REMOTE, CLIENT, 1400)] * 64
    up = packet(CLIENT, REMOTE, 1400)
    started = time.perf_counter_ns()
    for _ in range(packets // 128):
        clock[0] += 0.0001
        fwd.from_tun(down)
        for _ in range(64):
            fwd.from_client(peer, up)  # type: ignore[arg-type]
    return (time.perf_counter_ns() - started) / packets


def accuracy(rate_bits: int, burst: int, seconds: float = 10.0) -> tuple[int, float]:
    """(bytes passed, rate x time + burst) when twice the rate is offered in 1400-byte packets."""
    bucket = TokenBucket(rate_bits / 8, burst, 0.0)
    step = 1400 / (2 * rate_bits / 8)
    passed, now = 0, 0.0
    while now < seconds:
        if bucket.take(now, 1400):
            passed += 1400
        now += step
    return passed, rate_bits / 8 * seconds + burst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=256_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cases = {"no limit": None, "limit never reached": 10**12, "limit 100 Mbit/s": 100_000_000}
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):  # interleaved, so the machine's load falls on every case
        for name, rate in cases.items():
            results[name].append(run(rate, args.packets))
    base = statistics.median(results["no limit"])
    for name, runs in results.items():
        median = statistics.median(runs)
        print(
            f"{name:>20}: {median:7.1f} ns/packet (median of {args.rounds}), {median / base:.3f}x"
        )
    for rate in (8_000_000, 100_000_000):
        passed, bound = accuracy(rate, 262144)
        print(
            f"bucket at {rate // 1_000_000} Mbit/s, twice that offered for 10 s: passed "
            f"{passed:,} bytes of a bound of {bound:,.0f} ({passed / bound:.4f})"
        )


if __name__ == "__main__":
    main()
