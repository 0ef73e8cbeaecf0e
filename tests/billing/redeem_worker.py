"""A process that redeems receipts against a shared ledger (run by test_concurrency).

    python -m tests.billing.redeem_worker LEDGER_URL JOBS GO_FILE

JOBS holds one JSON object per line: ``{"deposit", "provider", "receipt"}`` in hex. The worker
says it is ready by creating GO_FILE.ready-PID, waits for GO_FILE to exist (so the workers
start together, however long each took to start), tries every job in order and
prints ``{"redeemed": [receipt hashes], "refused": {code name: count}}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from cellvpn.billing.interfaces import LedgerError, LedgerUnavailableError
from cellvpn.billing.sqlite import open_ledger
from cellvpn.wire.receipt import Receipt


def main(ledger_url: str, jobs_path: str, go_path: str) -> None:
    ledger = open_ledger(ledger_url, create=False)
    jobs = [json.loads(line) for line in Path(jobs_path).read_text().splitlines()]
    go = Path(go_path)
    Path(f"{go_path}.ready-{os.getpid()}").touch()
    while not go.exists():
        time.sleep(0.001)
    redeemed: list[str] = []
    refused: dict[str, int] = {}
    for job in jobs:
        r = Receipt.decode(bytes.fromhex(job["receipt"]))
        while True:
            try:
                result = ledger.redeem(
                    r, bytes.fromhex(job["deposit"]), bytes.fromhex(job["provider"]), time.time()
                )
            except LedgerUnavailableError:
                continue  # the lock was busy longer than the timeout: nothing changed, again
            except LedgerError as e:
                refused[e.code.name] = refused.get(e.code.name, 0) + 1
                result = None
            break
        if result is None:
            continue
        redeemed.append(result.receipt_hash.hex())
        print("redeemed", len(redeemed), file=sys.stderr, flush=True)
    ledger.close()
    print(json.dumps({"redeemed": redeemed, "refused": refused}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
