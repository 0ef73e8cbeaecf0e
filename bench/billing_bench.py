"""Tunnel throughput with byte billing against free service, in the same run.

    .venv/bin/python bench/billing_bench.py [--reps 7]

As root, from the checkout. It uses the peer harness (``../shared/bench``, or the folder in
CELLVPN_PEER_BENCH) for the namespaces and iperf3, and runs the harness's cellvpn scenario
twice per repetition, alternating: free (``bench/server.cfg`` as it is) and paid by the byte
(the same plus ``[billing]`` at 1000 per 256 MiB, and a client paying from a deposit it creates
from a funded account). It prints each TCP 1-stream figure, the medians, and their ratio.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
PEERS = Path(os.environ.get("CELLVPN_PEER_BENCH", TOP.parent / "shared" / "bench"))
sys.path.insert(0, str(TOP))

from cellvpn.billing.keys import create_key  # noqa: E402
from cellvpn.billing.sqlite import SqliteLedger  # noqa: E402

BILLING = "[billing]\nprice = 1000\nprice_unit = B\nunits = 268435456\n"


def overlay(root: Path, paid: bool) -> Path:
    """A checkout-shaped folder: the real .venv, and bench/*.cfg for this mode."""
    if root.exists():
        shutil.rmtree(root)
    (root / "bench").mkdir(parents=True)
    (root / ".venv").symlink_to(TOP / ".venv")
    server = (TOP / "bench" / "server.cfg").read_text()
    client = (TOP / "bench" / "client.cfg").read_text()
    if paid:
        state = root / "bench" / "state"
        state.mkdir(mode=0o700)
        key = create_key(root / "bench" / "client.key")
        ledger = SqliteLedger(state / "ledger.db")
        ledger.mint(key.account, 10**12)
        ledger.close()
        server += BILLING
        client += "[wallet]\nkey = client.key\ndeposit_value = 1000000000\nmax_unit_price = 1\n"
    (root / "bench" / "server.cfg").write_text(server)
    (root / "bench" / "client.cfg").write_text(client)
    return root


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    sys.path.insert(0, str(PEERS))
    import bench as peers  # the harness: topology, tunnels, iperf3, process handling

    lock = open(Path(tempfile.gettempdir()) / "cellvpn-bench.lock", "w")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)
    results: dict[str, list[float]] = {"free": [], "paid": []}
    work = Path(tempfile.mkdtemp(prefix="cellvpn-billbench-"))
    try:
        for rep in range(args.reps):
            for mode in ("free", "paid"):
                os.environ["CELLVPN_CHECKOUT"] = str(overlay(work / mode, mode == "paid"))
                peers.sh(f"{peers.HERE}/topo.sh up")
                procs = peers.Procs()
                try:
                    target = peers.setup_cellvpn(procs)
                    if not peers.wait_ping(target):
                        raise RuntimeError(f"{mode}: no ping through the tunnel")
                    peers.start_iperf_server(procs)
                    peers.wait_quiet()
                    res = peers.run_iperf(target, "tcp1", args.seconds, procs)
                    if "error" in res:
                        raise RuntimeError(f"{mode}: {res['error']}")
                    results[mode].append(res["mbps"])
                    print(f"rep {rep} {mode}: {res['mbps']:,.0f} Mbit/s", flush=True)
                finally:
                    procs.stop_all()
                    peers.sh(f"{peers.HERE}/topo.sh down")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        lock.close()
    free = statistics.median(results["free"])
    paid = statistics.median(results["paid"])
    print(
        f"TCP 1 stream, medians of {args.reps}: free {free:,.0f} Mbit/s, paid by the byte "
        f"{paid:,.0f} Mbit/s, ratio {paid / free:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
