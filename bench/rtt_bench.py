"""Round-trip time a tunnel adds when idle: cellvpn beside the peers, in one run.

    .venv/bin/python bench/rtt_bench.py [--count 200] [--interval 0.01] [--only ovpn-udp,cellvpn]

As root, from the checkout. It uses the peer harness (``../shared/bench``, or the folder in
CELLVPN_PEER_BENCH) to build the same two namespaces (vpnsrv, vpncli) and the same tunnels as
``run_baselines.sh``, and for each: ``ping -c COUNT -i INTERVAL`` over the bare underlay
(192.0.2.1) and through the tunnel to the server's overlay address. The added RTT is the
difference of the medians. It also reports the CPU time both tunnel processes spent per ping
(user and kernel, read from their process CPU clocks around the tunnel's pings): the work each
round trip costs, which the idle RTT multiplies when that work runs on a CPU just woken up.
Runs are exclusive with the harness (the same lock file).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
PEERS = Path(os.environ.get("CELLVPN_PEER_BENCH", TOP.parent / "shared" / "bench"))


def ping_median(ns: str, target: str, count: int, interval: str) -> float:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "ping", "-n", "-c", str(count), "-i", interval, target],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    times = [float(t) for t in re.findall(r"time=([\d.]+) ms", out)]
    if not times:
        raise RuntimeError(f"no answers from {target}: {out[-300:]}")
    return statistics.median(times)


def cpu_ns(pid: int) -> int:
    """CPU time (user + system, all threads) of process ``pid`` so far, in nanoseconds."""
    # the kernel's CPU-time clock of another process: clock id ((~pid) << 3) | CPUCLOCK_SCHED
    return time.clock_gettime_ns(((~pid) << 3) | 2)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--only", default="ovpn-udp,pytun-vnet,cellvpn")
    parser.add_argument(
        "--interval",
        default="0.01",
        help="seconds between pings (default 0.01; at 0.002 the CPUs hardly go idle)",
    )
    args = parser.parse_args()
    os.environ.setdefault("CELLVPN_CHECKOUT", str(TOP))
    sys.path.insert(0, str(PEERS))
    import bench as peers  # the harness: topology, tunnels, process handling

    lock = open(Path(tempfile.gettempdir()) / "cellvpn-bench.lock", "w")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)
    rows = []
    try:
        for name in args.only.split(","):
            desc, setup = peers.SCENARIOS[name]
            peers.sh(f"{peers.HERE}/topo.sh up")
            procs = peers.Procs()
            try:
                target = setup(procs)
                if not peers.wait_ping(target):
                    raise RuntimeError(f"{name}: no ping through the tunnel")
                bare = ping_median("vpncli", "192.0.2.1", args.count, args.interval)
                pids = [procs.pid(role) for role in ("tun_srv", "tun_cli")]
                before = sum(cpu_ns(pid) for pid in pids)
                tunnel = ping_median("vpncli", target, args.count, args.interval)
                cpu_us = (sum(cpu_ns(pid) for pid in pids) - before) / 1000 / args.count
                rows.append((desc, bare, tunnel, cpu_us))
            finally:
                procs.stop_all()
                peers.sh(f"{peers.HERE}/topo.sh down")
    finally:
        lock.close()
    print(f"median RTT over {args.count} pings, one every {args.interval} s (ms):")
    print(f"{'tunnel':<58} {'underlay':>9} {'tunnel':>8} {'added':>8} {'CPU us/ping':>12}")
    for desc, bare, tunnel, cpu_us in rows:
        print(f"{desc:<58} {bare:>9.3f} {tunnel:>8.3f} {tunnel - bare:>8.3f} {cpu_us:>12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
