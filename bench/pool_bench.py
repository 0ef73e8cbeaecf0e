"""Lease pool benchmark: 1,000,000 leases and releases in a pool over 100.64.0.0/10.

    .venv/bin/python bench/pool_bench.py [--count N] [--seed S]

Not a test: it shows how fast the pool is and how much memory it takes, to check the promise of
O(1) operations and memory that grows with use, not with the size of the network. In-memory only:
no device, no traffic. The timed pass runs without tracemalloc (it slows allocation several
times) and reports the RSS growth; a second pass under tracemalloc, with every harness object
allocated before tracing starts, measures what the pool itself allocates.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
import tracemalloc
from ipaddress import IPv4Network
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cellvpn.device.pool import LeasePool

NETWORK = IPv4Network("100.64.0.0/10")
HOLD = 300.0


def rss_kib() -> int:
    """Resident set size from /proc/self/status, in KiB (0 where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Owner:
    """A stand-in session, as small as an object gets."""

    __slots__ = ()


def timed_pass(count: int, rng: random.Random) -> None:
    """Lease ``count`` addresses, release them all (both APIs), then churn; print the rates."""
    owners = [Owner() for _ in range(count)]
    order = list(range(count))
    rng.shuffle(order)
    # The churn's random choices, drawn up front so only the pool is timed (with the loop).
    identities = [f"key-{n}" for n in range(count // 4)]
    releasing = rng.choices((False, True), k=count)
    picks = [rng.random() for _ in range(count)]
    who = [rng.choice(identities) if rng.random() < 1 / 3 else None for _ in range(count)]
    fresh = [Owner() for _ in range(count)]
    # Keep the collector from rescanning the harness's millions of inputs; it still sees
    # everything the pool and the loops allocate.
    gc.collect()
    gc.freeze()
    rss_start = rss_kib()
    print(f"  (RSS {rss_start / 1024:.1f} MiB with the inputs built; growth from there)")

    def rate(name: str, n: int, seconds: float) -> None:
        grown = (rss_kib() - rss_start) / 1024
        print(f"  {name:<32} {n:>9,} ops {seconds:6.3f} s {n / seconds:>10,.0f} ops/s", end="")
        print(f"   RSS {grown:+7.1f} MiB")

    pool = LeasePool(NETWORK, lease_hold=HOLD)
    lease, release = pool.lease, pool.release
    start = time.perf_counter()
    leases = [lease(o) for o in owners]
    rate("lease (IPv4Address API)", count, time.perf_counter() - start)
    print("  (the RSS above includes the harness's list of the 1M Lease results)")
    pairs = [(leases[i].address, owners[i]) for i in order]  # type: ignore[union-attr]
    del leases
    start = time.perf_counter()
    for address, owner in pairs:
        release(address, owner)
    rate("release (random order)", count, time.perf_counter() - start)
    del pairs

    # The int variants, on the free stack the first round left behind.
    lease_int, release_int = pool.lease_int, pool.release_int
    start = time.perf_counter()
    ints = [lease_int(o)[0] for o in owners]  # type: ignore[index]
    rate("lease_int (from the free stack)", count, time.perf_counter() - start)
    start = time.perf_counter()
    for address_int, owner in zip(ints, owners, strict=True):
        release_int(address_int, owner)
    rate("release_int", count, time.perf_counter() - start)
    del ints

    # Churn: users come and go at random, a third of them with one of count/4 identities (so
    # released leases are held and reconnects take their address back), while the clock moves
    # on 1 ms per operation. A lease for an identity still active is a takeover; the old
    # session's release later is a no-op, as in the server.
    active: list[tuple[int, Owner]] = []
    now = 0.0
    reused = takeovers = 0
    start = time.perf_counter()
    for step in range(count):
        now += 0.001
        if releasing[step] and active:
            j = int(picks[step] * len(active))
            active[j], active[-1] = active[-1], active[j]
            address_int, owner = active.pop()
            release_int(address_int, owner, now)
        else:
            got = lease_int(fresh[step], who[step], now)
            if got is not None:
                active.append((got[0], fresh[step]))
                reused += got[2]
                takeovers += got[1] is not None
    rate("mixed churn (lease + release)", count, time.perf_counter() - start)
    print(f"  churn: {reused:,} leases reused an address, {takeovers:,} were takeovers")
    print(f"  pool after churn: {pool.stats()}")
    gc.unfreeze()


def memory_pass(count: int) -> None:
    """Trace what the pool allocates: all harness objects exist before tracing starts.

    One round with identities, the costliest kind of lease: four dict entries each, then a
    hold (two dict entries and a queue entry) on release.
    """
    owners = [Owner() for _ in range(count)]
    ints = [0] * count
    ident = [f"key-{n}" for n in range(count)]
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]

    def show(what: str) -> None:
        current, peak = tracemalloc.get_traced_memory()
        print(
            f"  {what:<46} current {(current - base) / 2**20:6.1f} MiB,"
            f" peak {(peak - base) / 2**20:6.1f} MiB"
        )

    pool = LeasePool(NETWORK, lease_hold=HOLD)
    show("empty pool over the /10")
    lease_int, release_int = pool.lease_int, pool.release_int
    for i, owner in enumerate(owners):
        ints[i] = lease_int(owner, ident[i])[0]  # type: ignore[index]
    show(f"{count:,} leases with identities")
    for i, owner in enumerate(owners):
        release_int(ints[i], owner, 1.0)
    show("all released, held for their identities")
    lease_int(Owner(), None, 1.0 + HOLD)
    show("holds lapsed, all on the free stack")
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    print(f"  tracemalloc peak {peak / 2**20:.1f} MiB = {peak / count:.0f} bytes per lease")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    count: int = args.count
    began = time.perf_counter()
    print(f"cellvpn lease pool: {NETWORK}, {NETWORK.num_addresses - 3:,} leasable addresses;")
    print(f"{count:,} leases per round, Python {sys.version.split()[0]}")
    print()
    print("Speed (no tracemalloc):")
    timed_pass(count, random.Random(args.seed))
    print()
    print("Memory (tracemalloc, pool allocations only):")
    memory_pass(count)
    print()
    print(f"total run time {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
