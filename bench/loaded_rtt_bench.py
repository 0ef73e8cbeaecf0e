"""Ping RTT through a tunnel while a bulk TCP transfer fills it: cellvpn beside the peers.

    BENCH_WAN="delay=10ms,loss=0.5%" .venv/bin/python bench/loaded_rtt_bench.py \
        [--only ovpn-udp,cellvpn] [--reps 3] [--duration 15] [--interval 0.05]

As root, from the checkout, alone on the machine. It uses the peer harness (``../shared/bench``,
or the folder in CELLVPN_PEER_BENCH) to build the same namespaces and tunnels as
``run_baselines.sh``, including its emulated WAN when BENCH_WAN is set. For each tunnel and
repetition: the idle ping RTT through the tunnel, then ``iperf3`` (one TCP stream, client to
server) for DURATION seconds and, from 2 s in until 1 s before its end, a ping every INTERVAL
through the same tunnel: the second flow's RTT under load (median, 90th percentile, lost
pings) beside the bulk flow's rate. A send buffer that queues shows up here as added RTT.
Runs are exclusive with the harness (the same lock file).
"""

from __future__ import annotations

import argparse
import fcntl
import json
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


def ping(ns: str, target: str, count: int, interval: float) -> tuple[list[float], int]:
    """RTTs (ms) of ``count`` pings from ``ns`` to ``target``, and how many got no answer."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "ping", "-n", "-c", str(count), "-i", str(interval), target],
        capture_output=True,
        text=True,
        timeout=count * interval + 60,
    ).stdout
    times = [float(t) for t in re.findall(r"time=([\d.]+) ms", out)]
    return times, count - len(times)


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]


def measure(target: str, duration: int, interval: float) -> dict[str, float]:
    idle, _ = ping("vpncli", target, 40, interval)
    iperf = subprocess.Popen(
        ["ip", "netns", "exec", "vpncli", "iperf3", "-c", target, "-t", str(duration), "-J"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2)
    count = int((duration - 3) / interval)
    loaded, lost = ping("vpncli", target, count, interval)
    out, _ = iperf.communicate(timeout=duration + 60)
    mbps = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6
    if not loaded:
        raise RuntimeError(f"no ping answered through {target} under load")
    return {
        "idle": statistics.median(idle),
        "median": statistics.median(loaded),
        "p90": p90(loaded),
        "lost_pct": 100.0 * lost / count,
        "mbps": mbps,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="ovpn-udp,cellvpn")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--interval", type=float, default=0.05)
    args = parser.parse_args()
    os.environ.setdefault("CELLVPN_CHECKOUT", str(TOP))
    sys.path.insert(0, str(PEERS))
    import bench as peers  # the harness: topology, WAN relay, tunnels, process handling

    lock = open(Path(tempfile.gettempdir()) / "cellvpn-bench.lock", "w")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)
    rows: list[tuple[str, dict[str, float]]] = []
    try:
        for name in args.only.split(","):
            desc, setup = peers.SCENARIOS[name]
            peers.sh(f"{peers.HERE}/topo.sh up")
            procs = peers.Procs()
            try:
                if peers.WAN:
                    peers.wan_start(procs)
                target = setup(procs)
                if not peers.wait_ping(target):
                    raise RuntimeError(f"{name}: no ping through the tunnel")
                peers.start_iperf_server(procs)
                runs = []
                for rep in range(args.reps):
                    run = measure(target, args.duration, args.interval)
                    print(f"{name} rep{rep}: " + ", ".join(f"{k}={v:.1f}" for k, v in run.items()))
                    runs.append(run)
                    time.sleep(1)
                rows.append((desc, {k: statistics.median(r[k] for r in runs) for k in runs[0]}))
            finally:
                procs.stop_all()
                peers.sh(f"{peers.HERE}/topo.sh down")
    finally:
        lock.close()
    path = os.environ.get("BENCH_WAN") or "no WAN emulation (veth)"
    print(f"\nping every {args.interval} s during one TCP stream, {path}, medians of {args.reps}:")
    print(
        f"{'tunnel':<58} {'idle ms':>8} {'loaded ms':>10} {'p90 ms':>8} {'lost %':>7} {'Mbit/s':>7}"
    )
    for desc, m in rows:
        print(
            f"{desc:<58} {m['idle']:>8.2f} {m['median']:>10.2f} {m['p90']:>8.1f}"
            f" {m['lost_pct']:>7.1f} {m['mbps']:>7.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
