"""Several processes on one ledger: every receipt is redeemed exactly once.

Three worker processes try the same receipt chains at the same time (two walk the deposits
forwards, one backwards, each chain in order). SQLite's write lock, or PostgreSQL's row lock
on the deposit, and the checks inside one transaction must let exactly one of them redeem each
receipt. A process killed with SIGKILL in the middle of redeeming leaves a consistent ledger
that another process continues. Both run on each backend.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cellvpn.billing.sqlite import open_ledger
from cellvpn.wire.receipt import Receipt

from .helpers import chain, deposit, key

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
PROVIDER = key("provider")
CLIENTS = [key(f"client-{n}") for n in range(4)]


def _setup(url: str, per_chain: int) -> tuple[str, dict[bytes, list[Receipt]]]:
    ledger = open_ledger(url)
    chains: dict[bytes, list[Receipt]] = {}
    for n, client in enumerate(CLIENTS):
        ledger.mint(client.account, 10**6)
        dep = ledger.create_deposit(deposit(client, value=10**6, n=n, expires=2**40), time.time())
        chains[dep.id] = chain(PROVIDER, client, dep.id, per_chain, value=7 + n)
    ledger.close()
    return url, chains


def _jobs(
    tmp_path: Path, name: str, chains: dict[bytes, list[Receipt]], order: list[bytes]
) -> Path:
    path = tmp_path / f"{name}.jobs"
    lines = [
        json.dumps(
            {"deposit": dep.hex(), "provider": PROVIDER.public.hex(), "receipt": r.encode().hex()}
        )
        for dep in order
        for r in chains[dep]
    ]
    path.write_text("\n".join(lines))
    return path


def _worker(ledger: str, jobs: Path, go: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.billing.redeem_worker", ledger, str(jobs), str(go)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _all_ready(folder: Path, workers: list[subprocess.Popen[str]]) -> None:
    """Wait until every worker has its jobs loaded and waits for the go (a loaded machine
    may take seconds to start one): only then do they overlap."""
    deadline = time.monotonic() + 60
    while len(list(folder.glob("go.ready-*"))) < len(workers):
        assert time.monotonic() < deadline, "the workers did not start"
        assert all(w.poll() is None for w in workers), "a worker ended before the go"
        time.sleep(0.01)


def test_processes_redeem_each_receipt_exactly_once(tmp_path: Path, ledger_url: str) -> None:
    url, chains = _setup(ledger_url, per_chain=60)
    deposits = list(chains)
    go = tmp_path / "go"
    forward = _jobs(tmp_path, "forward", chains, deposits)
    workers = [
        _worker(url, forward, go),  # two on the same receipts in the same order
        _worker(url, forward, go),
        _worker(url, _jobs(tmp_path, "backward", chains, deposits[::-1]), go),
    ]
    _all_ready(tmp_path, workers)
    go.touch()
    results = []
    for w in workers:
        out, err = w.communicate(timeout=100)
        assert w.returncode == 0, err
        results.append(json.loads(out))
    sets = [set(r["redeemed"]) for r in results]
    every = {r.hash.hex() for receipts in chains.values() for r in receipts}
    assert sum(1 for s in sets if s) >= 2, "the workers did not overlap"
    assert sum(len(s) for s in sets) == len(every), "a receipt was redeemed twice"
    assert set().union(*sets) == every, "a receipt was lost"
    for r in results:  # the only refusals are "redeemed already" and "not next in the chain"
        assert set(r["refused"]) <= {"WRONG_HASH"}
    ledger = open_ledger(url, create=False)
    ok, figures = ledger.check_invariant()
    assert ok, figures
    paid = sum(r.info.value for receipts in chains.values() for r in receipts)
    assert ledger.balance(PROVIDER.account) == paid == figures["redeemed"]
    for dep_id, receipts in chains.items():
        row = ledger.get_deposit(dep_id)
        assert row is not None and row.state_hash == receipts[-1].hash
        stored = ledger.receipts(deposit_id=dep_id)
        assert [s.hash for s in stored] == [r.hash for r in receipts]
        assert [s.seq for s in stored] == list(range(1, len(receipts) + 1))
    ledger.close()


def test_a_killed_process_leaves_a_consistent_ledger(tmp_path: Path, ledger_url: str) -> None:
    url, chains = _setup(ledger_url, per_chain=400)
    deposits = list(chains)
    go = tmp_path / "go"
    go.touch()
    worker = _worker(url, _jobs(tmp_path, "all", chains, deposits), go)
    assert worker.stderr is not None
    for _ in range(200):  # let it redeem a few, then kill it mid-stream
        if worker.stderr.readline().startswith("redeemed 2"):
            break
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(timeout=30)
    ledger = open_ledger(url, create=False)
    ok, figures = ledger.check_invariant()
    assert ok, figures
    done = ledger.receipts()
    assert 0 < len(done) < sum(len(c) for c in chains.values())
    assert ledger.balance(PROVIDER.account) == sum(r.value for r in done)
    # Whatever it did not finish, another process continues from the ledger's state.
    for dep_id, receipts in chains.items():
        row = ledger.get_deposit(dep_id)
        assert row is not None
        known = [r.hash for r in receipts]
        start = 0 if row.state_hash == dep_id else known.index(row.state_hash) + 1
        for r in receipts[start:]:
            ledger.redeem(r, dep_id, PROVIDER.public, time.time())
    ok, figures = ledger.check_invariant()
    assert ok, figures
    assert len(ledger.receipts()) == sum(len(c) for c in chains.values())
    ledger.close()


def _race_for_mark(ledger: Any, dep: bytes, only_if: str | None, at: float, tag: str) -> list[str]:
    """Eight threads (each its own connection) mark ``dep`` at once; the markers that won."""
    barrier = threading.Barrier(8)
    won: list[str] = []

    def mark(marker: str) -> None:
        barrier.wait()
        if ledger.set_active_usage(dep, marker, only_if=only_if, until=at + 300, now=at):
            won.append(marker)

    threads = [threading.Thread(target=mark, args=(f"{tag}-{n}",)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return won


def test_threads_racing_for_one_mark_leave_exactly_one_holder(ledger_url: str) -> None:
    """Marks are compare and set under concurrency too: of eight servers that mark a free
    deposit at once, one holds it; of eight that take over its stale mark at once, one does."""
    ledger = open_ledger(ledger_url)
    client = CLIENTS[0]
    ledger.mint(client.account, 1000)
    now = time.time()
    dep = ledger.create_deposit(deposit(client, value=600, expires=2**40), now).id
    [first] = _race_for_mark(ledger, dep, None, now, "a")
    row = ledger.get_deposit(dep)
    assert row is not None and row.active_usage == first
    # the holder's lease ran out (1000 s later): who takes it over?
    [second] = _race_for_mark(ledger, dep, first, now + 1000, "b")
    row = ledger.get_deposit(dep)
    assert row is not None and row.active_usage == second and row.active_until == now + 1300
    ok, figures = ledger.check_invariant()
    assert ok, figures
    ledger.close()
