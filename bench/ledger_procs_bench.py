"""Redemptions per second from 1, 3 and 6 processes on one ledger: SQLite beside PostgreSQL.

    .venv/bin/python bench/ledger_procs_bench.py [--per-process N] [--deposits D]
        [--procs 1,3,6] [--postgres URL] [--backends sqlite,postgres] [--batch N]

Not a test. Each process stands for one server: it opens the ledger's URL itself and redeems
its own receipts (``--deposits`` chains of its own, interleaved, one ``redeem()`` per receipt,
as a server under load with one receipt waiting at a time), all paying the same provider
account, so the processes contend for the ledger's lock (SQLite's file lock) or rows
(PostgreSQL's deposit and account rows) as servers sharing a ledger do. Receipts are signed
before the start, and the processes start together, so only the ledger is timed: the rate is
all receipts over the time from the start to the last process's end.

SQLite runs with ``synchronous=full`` (an fsync per commit). Without ``--postgres`` the bench
starts a throwaway, durable PostgreSQL server on a Unix socket in a temporary folder (as root,
with Debian's postgresql installed), with fsync and synchronous commits on, and removes it at
the end. Run it alone, never beside the tests or another benchmark.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cellvpn.billing.keys import KeyPair
from cellvpn.billing.sqlite import open_ledger
from cellvpn.wire.receipt import Receipt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from redeem_bench import prepare as prepare_receipts

NOW = time.time()


def prepare(url: str, provider: KeyPair, deposits: int, count: int) -> list[tuple[bytes, bytes]]:
    """``deposits`` funded deposits and ``count`` receipts over them, interleaved, encoded
    (the receipts ``redeem_bench.py`` makes, written into the ledger at ``url``)."""
    ledger = open_ledger(url)
    try:
        jobs = prepare_receipts(ledger, provider, deposits, count)
    finally:
        ledger.close()
    return [(receipt.encode(), dep_id) for receipt, dep_id in jobs]


def worker(
    url: str,
    provider_public: bytes,
    jobs: list[tuple[bytes, bytes]],
    ready: Any,
    go: Any,
    done: Any,
    batch: int,
) -> None:
    from cellvpn.billing.interfaces import LedgerUnavailableError, RedeemRequest

    ledger = open_ledger(url, create=False)
    receipts = [(Receipt.decode(encoded), dep_id) for encoded, dep_id in jobs]
    ready.put(True)
    go.wait()
    if batch <= 1:
        for r, dep_id in receipts:
            while True:
                try:
                    ledger.redeem(r, dep_id, provider_public, NOW)
                    break
                except LedgerUnavailableError:
                    continue  # locked longer than the timeout: nothing changed, again
    else:
        requests = [RedeemRequest(r, dep_id, provider_public, NOW) for r, dep_id in receipts]
        for at in range(0, len(requests), batch):
            while True:
                try:
                    results = ledger.redeem_many(requests[at : at + batch])
                    break
                except LedgerUnavailableError:
                    continue
            refused = [r for r in results if isinstance(r, Exception)]
            assert not refused, refused[0]
    done.put(time.perf_counter())
    ledger.close()


def run(url: str, procs: int, args: argparse.Namespace) -> float:
    provider = KeyPair.generate()
    jobs = [prepare(url, provider, args.deposits, args.per_process) for _ in range(procs)]
    ctx = multiprocessing.get_context("spawn")
    ready, done, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    workers = [
        ctx.Process(target=worker, args=(url, provider.public, j, ready, go, done, args.batch))
        for j in jobs
    ]
    for w in workers:
        w.start()
    for _ in workers:
        ready.get(timeout=120)
    start = time.perf_counter()
    go.set()
    end = max(done.get(timeout=600) for _ in workers)
    for w in workers:
        w.join()
    ledger = open_ledger(url, create=False)
    ok, figures = ledger.check_invariant()
    assert ok, figures
    assert ledger.balance(provider.account) == 600 * procs * args.per_process
    ledger.close()
    return procs * args.per_process / (end - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-process", type=int, default=2000, help="receipts per process")
    parser.add_argument("--deposits", type=int, default=20, help="deposits per process")
    parser.add_argument("--procs", default="1,3,6", help="process counts, comma separated")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        help="receipts per transaction: 1 = one redeem() each, N = redeem_many() of N (as a"
        " server's AsyncLedger batches what waits)",
    )
    parser.add_argument("--postgres", metavar="URL", help="a database to use (else a throwaway)")
    args = parser.parse_args()
    counts = [int(n) for n in args.procs.split(",")]
    backends = args.backends.split(",")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"{args.per_process} receipts per process over {args.deposits} deposits each,"
        f" {args.batch} per transaction"
    )
    cluster = None
    with tempfile.TemporaryDirectory(prefix="cellvpn-bench-") as tmp:
        try:
            pg_base = args.postgres
            if "postgres" in backends and pg_base is None:
                from tests.billing.pgcluster import PgCluster, pg_bin

                binaries = pg_bin()
                if binaries is None:
                    sys.exit("no PostgreSQL server binaries: apt install postgresql, or --postgres")
                cluster = PgCluster(binaries, durable=True)
                pg_base = cluster.url
            for backend in backends:
                for procs in counts:
                    if backend == "sqlite":
                        url = f"sqlite:///{tmp}/ledger-{procs}.db"
                    else:
                        url = _fresh_schema(pg_base, f"bench_{procs}")
                    rate = run(url, procs, args)
                    print(f"{backend:8} {procs} process(es): {rate:7.0f} redemptions/s")
        finally:
            if cluster is not None:
                cluster.stop()


def _fresh_schema(base: str, name: str) -> str:
    import psycopg

    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        conn.execute(f'CREATE SCHEMA "{name}"')
    return f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{name}"


if __name__ == "__main__":
    main()
