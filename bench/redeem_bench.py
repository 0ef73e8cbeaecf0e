"""Redemption benchmark: receipts redeemed per second on an SQLite ledger in a temp folder.

    .venv/bin/python bench/redeem_bench.py [--count N] [--deposits D] [--synchronous full|normal]

Not a test: it shows what one server's ledger can redeem, through the synchronous ledger (one
redeem() per receipt, and redeem_many() of 64 per commit) and through AsyncLedger (the
reactor's way: one worker thread, a Deferred per call, waiting calls committed together).
Each redemption checks two Ed25519 signatures and the deposit, moves the value and stores the
receipt; ``synchronous=full`` (the default) fsyncs every commit. Receipts are signed before
timing starts, so only the ledger is timed. The aim is at least 2,000 redemptions per second.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cellvpn.billing.interfaces import ILedger, RedeemRequest
from cellvpn.billing.keys import KeyPair
from cellvpn.billing.records import DepositRequest, SignedDeposit
from cellvpn.billing.sqlite import SqliteLedger
from cellvpn.wire.receipt import Receipt, ReceiptInfo, Unit

NOW = time.time()


def prepare(
    ledger: ILedger, provider: KeyPair, deposits: int, count: int
) -> list[tuple[Receipt, bytes]]:
    """``deposits`` funded deposits and ``count`` receipts over them, in redeemable order."""
    chains: list[list[tuple[Receipt, bytes]]] = []
    per_chain = -(-count // deposits)
    for _ in range(deposits):
        client = KeyPair.generate()
        ledger.mint(client.account, 10**12)
        request = DepositRequest(client.public, Unit.SEC, 10, 10**12, int(NOW) + 86400, bytes(16))
        dep_id = ledger.create_deposit(SignedDeposit.sign(request, client), NOW).id
        prev, chain = dep_id, []
        for i in range(per_chain):
            info = ReceiptInfo(1, Unit.SEC, 60, 600, prev, addition=i)
            data = info.encode()
            r = Receipt(info, (provider.signature(data), client.signature(data)))
            chain.append((r, dep_id))
            prev = r.hash
        chains.append(chain)
    # Interleave the chains, as many sessions' receipts arrive.
    mixed = [job for group in zip(*chains, strict=True) for job in group]
    return mixed[:count]


def bench_sync(path: Path, args: argparse.Namespace, batch: int = 0) -> float:
    """One redeem() per receipt, or redeem_many() of ``batch`` receipts per commit."""
    ledger = SqliteLedger(path, synchronous=args.synchronous)
    provider = KeyPair.generate()
    jobs = prepare(ledger, provider, args.deposits, args.count)
    start = time.perf_counter()
    if batch:
        requests = [RedeemRequest(r, dep_id, provider.public, NOW) for r, dep_id in jobs]
        for i in range(0, len(requests), batch):
            for result in ledger.redeem_many(requests[i : i + batch]):
                assert not isinstance(result, Exception), result
    else:
        for r, dep_id in jobs:
            ledger.redeem(r, dep_id, provider.public, NOW)
    elapsed = time.perf_counter() - start
    ok, figures = ledger.check_invariant()
    assert ok, figures
    ledger.close()
    return len(jobs) / elapsed


def bench_async(path: Path, args: argparse.Namespace) -> float:
    from twisted.internet import defer, task

    from cellvpn.billing.asyncledger import AsyncLedger

    ledger = SqliteLedger(path, synchronous=args.synchronous)
    provider = KeyPair.generate()
    jobs = prepare(ledger, provider, args.deposits, args.count)
    rate: list[float] = []

    async def run(reactor: Any) -> None:
        aledger = AsyncLedger(ledger, reactor)
        # A window of calls in flight, as a busy server has: the worker never waits for the
        # reactor, the reactor never waits for SQLite.
        window = 64
        start = time.perf_counter()
        pending: list[defer.Deferred[Any]] = []
        for r, dep_id in jobs:
            pending.append(aledger.redeem(r, dep_id, provider.public, NOW))
            if len(pending) >= window:
                await pending.pop(0)
        for d in pending:
            await d
        rate.append(len(jobs) / (time.perf_counter() - start))
        ok, figures = await aledger.check_invariant()
        assert ok, figures
        await aledger.close()

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit as e:  # react() always exits; a failure shows as a non-zero code
        if e.code not in (0, None):
            raise
    return rate[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10000, help="receipts to redeem")
    parser.add_argument("--deposits", type=int, default=50, help="deposits they pay from")
    parser.add_argument("--synchronous", choices=["full", "normal"], default="full")
    args = parser.parse_args()
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"{args.count} receipts over {args.deposits} deposits, synchronous={args.synchronous}")
    with tempfile.TemporaryDirectory(prefix="cellvpn-bench-") as tmp:
        rate = bench_sync(Path(tmp) / "sync.db", args)
        print(f"sync ledger, redeem() each:            {rate:7.0f} redemptions/s")
        rate = bench_sync(Path(tmp) / "many.db", args, batch=64)
        print(f"sync ledger, redeem_many() of 64:      {rate:7.0f} redemptions/s")
        rate = bench_async(Path(tmp) / "async.db", args)
        print(f"AsyncLedger, 64 calls in flight:       {rate:7.0f} redemptions/s")


if __name__ == "__main__":
    main()
