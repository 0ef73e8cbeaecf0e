"""The ledger for the reactor: every call on one worker thread, answered with a Deferred.

SQLite blocks (disk, and up to the busy timeout when another process holds the write lock),
so the reactor thread never calls it. One thread, not a pool: calls from this process run one
after another in the order they were made, so this process never contends with itself for the
write lock, and the SQLite connection stays on one thread.

Redemptions made one after another while the thread is busy are handed over together, as one
:meth:`ILedger.redeem_many` call: one commit (one fsync) for the group, each receipt still
checked and applied on its own. Every Deferred fires after the commit, so nothing is reported
redeemed before it is durable.

The queue is bounded: past ``max_queue`` waiting calls a new one fails at once with
:class:`LedgerBusyError` (a try-again error), so clients that only make the server ask the
ledger cannot pile up work. Redemptions are never refused and go before every other call
waiting: they are what pays, and a session's traffic waits on them. Other calls keep their
order among themselves.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from cellvpn.billing.interfaces import (
    DepositRow,
    EnrolledRow,
    ILedger,
    LedgerBusyError,
    LedgerError,
    LedgerUnavailableError,
    Limits,
    OfferRow,
    ReceiptRow,
    RedeemRequest,
    RedeemResult,
    UsageKind,
    UsageRow,
)
from cellvpn.billing.records import SignedClose, SignedDeposit, SignedOrder
from cellvpn.wire.receipt import Receipt

P = ParamSpec("P")
T = TypeVar("T")

#: The most redemptions committed together.
MAX_BATCH = 256
#: Calls that may wait for the ledger at once, by default.
MAX_QUEUE = 1024

_Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], "Deferred[Any]"]


class _Batch:
    """Redemptions waiting for the worker; it takes them all when it gets to them."""

    __slots__ = ("items", "taken")

    def __init__(self) -> None:
        self.items: list[tuple[RedeemRequest, Deferred[RedeemResult]]] = []
        self.taken = False


class AsyncLedger:
    """:class:`ILedger`'s methods, each returning a Deferred, run on the ledger's own thread.

    The thread starts with the reactor (at once if it is running) and is stopped, after the
    calls already queued, when the reactor shuts down or :meth:`stop` is called.
    """

    def __init__(self, ledger: ILedger, reactor: Any = None, max_queue: int = MAX_QUEUE) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.ledger = ledger
        self._reactor = reactor
        self._pool = ThreadPool(1, 1, name="cellvpn-ledger")
        self._stopped = False
        self._lock = threading.Lock()
        self._batch: _Batch | None = None
        self.max_queue = max_queue
        self._urgent: deque[_Call] = deque()
        self._normal: deque[_Call] = deque()
        #: calls queued or running, and calls refused as busy
        self.queued = 0
        self.refused_busy = 0
        self._trigger = reactor.addSystemEventTrigger("during", "shutdown", self._stop_pool)
        reactor.callWhenRunning(self._start_pool)

    def _start_pool(self) -> None:
        if not self._stopped:
            self._pool.start()

    def _stop_pool(self) -> None:
        self._stopped = True
        if self._pool.started:
            self._pool.stop()  # waits for the calls already queued: none is cut off

    def stop(self) -> None:
        """Finish the queued calls and stop the thread (the reactor's shutdown does this too)."""
        if self._trigger is not None:
            self._reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        self._stop_pool()

    def run(self, f: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        """Run ``f`` on the ledger's thread (for a sequence of calls that belong together),
        after the calls queued before it; redemptions queued later may still go first."""
        return self._submit(f, *args, **kwargs)

    def _submit(self, f: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        if self._stopped:
            return fail(LedgerUnavailableError("the ledger's thread has stopped"))
        if self.queued >= self.max_queue:
            self.refused_busy += 1
            return fail(LedgerBusyError(f"{self.queued} ledger calls are waiting already"))
        return self._enqueue(self._normal, f, args, kwargs)

    def _enqueue(
        self, queue: deque[_Call], f: Callable[..., T], args: Any, kwargs: Any
    ) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        with self._lock:
            queue.append((f, args, kwargs, d))
        self.queued += 1
        self._pool.callInThread(self._work_one)
        return d

    def _work_one(self) -> None:
        """On the worker: the next call, redemptions first (one job per queued call)."""
        with self._lock:
            f, args, kwargs, d = self._urgent.popleft() if self._urgent else self._normal.popleft()
        try:
            result = f(*args, **kwargs)
        except BaseException:
            self._reactor.callFromThread(self._answer, d, Failure())
        else:
            self._reactor.callFromThread(self._answer, d, result)

    def _answer(self, d: Deferred[Any], result: Any) -> None:
        self.queued -= 1
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)

    def close(self) -> Deferred[None]:
        """Close the ledger's connections, then stop the thread."""
        d = self.run(self.ledger.close)

        def stopped(result: Any) -> Any:
            self.stop()
            return result

        return d.addBoth(stopped)

    # --- ILedger, asynchronously -----------------------------------------------------------

    def mint(self, account: bytes, value: int, public: bytes | None = None) -> Deferred[int]:
        return self.run(self.ledger.mint, account, value, public)

    def balance(self, account: bytes) -> Deferred[int]:
        return self.run(self.ledger.balance, account)

    def put_order(self, signed_order: SignedOrder) -> Deferred[bytes]:
        return self.run(self.ledger.put_order, signed_order)

    def publish(self, signed_order: SignedOrder, marker_prefix: str) -> Deferred[int]:
        """A starting server's order stored and its earlier run's in-use marks cleared, as one
        job: a mark that a new session queues behind it is never cleared by it."""
        return self.run(_publish, self.ledger, signed_order, marker_prefix)

    def orders(self, provider: bytes | None = None) -> Deferred[list[SignedOrder]]:
        return self.run(self.ledger.orders, provider)

    def get_order(self, order_hash: bytes) -> Deferred[SignedOrder | None]:
        return self.run(self.ledger.get_order, order_hash)

    def create_deposit(self, signed_deposit: SignedDeposit, now: float) -> Deferred[DepositRow]:
        return self.run(self.ledger.create_deposit, signed_deposit, now)

    def get_deposit(self, deposit_id: bytes) -> Deferred[DepositRow | None]:
        return self.run(self.ledger.get_deposit, deposit_id)

    def deposits(self, owner: bytes | None = None) -> Deferred[list[DepositRow]]:
        return self.run(self.ledger.deposits, owner)

    def close_deposit(self, signed_close: SignedClose, now: float) -> Deferred[int]:
        return self.run(self.ledger.close_deposit, signed_close, now)

    def set_active_usage(
        self,
        deposit_id: bytes,
        marker: str | None,
        only_if: str | None = None,
        until: float | None = None,
        now: float | None = None,
    ) -> Deferred[bool]:
        return self.run(self.ledger.set_active_usage, deposit_id, marker, only_if, until, now)

    def renew_marks(self, marker_prefix: str, until: float) -> Deferred[int]:
        return self.run(self.ledger.renew_marks, marker_prefix, until)

    def clear_active_usages(self, marker_prefix: str) -> Deferred[int]:
        return self.run(self.ledger.clear_active_usages, marker_prefix)

    def redeem(
        self, receipt: Receipt, deposit_id: bytes, provider_public: bytes, now: float
    ) -> Deferred[RedeemResult]:
        """Redeem, joining the redemptions still waiting for the worker, if any."""
        if self._stopped:
            return fail(LedgerUnavailableError("the ledger's thread has stopped"))
        d: Deferred[RedeemResult] = Deferred()
        with self._lock:
            batch = self._batch
            fresh = batch is None or batch.taken or len(batch.items) >= MAX_BATCH
            if fresh:
                batch = self._batch = _Batch()
            assert batch is not None
            batch.items.append((RedeemRequest(receipt, deposit_id, provider_public, now), d))
        if fresh:
            self._enqueue(self._urgent, self._redeem_batch, (batch,), {}).addCallbacks(
                self._deliver, self._fail_batch, errbackArgs=(batch,)
            )
        return d

    def _redeem_batch(
        self, batch: _Batch
    ) -> list[tuple[Deferred[RedeemResult], RedeemResult | LedgerError]]:
        """On the worker: take the batch (no more joins) and redeem it in one commit."""
        with self._lock:
            batch.taken = True
            items = list(batch.items)
        results = self.ledger.redeem_many([request for request, _ in items])
        return [(d, result) for (_, d), result in zip(items, results, strict=True)]

    @staticmethod
    def _deliver(outcomes: list[tuple[Deferred[RedeemResult], RedeemResult | LedgerError]]) -> None:
        for d, result in outcomes:
            if isinstance(result, LedgerError):
                d.errback(Failure(result))
            else:
                d.callback(result)

    def _fail_batch(self, failure: Failure, batch: _Batch) -> None:
        """The whole commit failed (or the thread stopped): none of them was redeemed."""
        with self._lock:
            batch.taken = True
        for _, d in batch.items:
            d.errback(failure)

    def redeem_many(
        self, requests: list[RedeemRequest]
    ) -> Deferred[list[RedeemResult | LedgerError]]:
        return self.run(self.ledger.redeem_many, requests)

    def receipts(
        self,
        deposit_id: bytes | None = None,
        client: bytes | None = None,
        provider: bytes | None = None,
    ) -> Deferred[list[ReceiptRow]]:
        return self.run(self.ledger.receipts, deposit_id, client, provider)

    def save_limits(
        self,
        provider: bytes,
        client: bytes,
        bytes_left: int,
        seconds_left: float,
        now: float,
        deposit_id: bytes = b"",
    ) -> Deferred[None]:
        return self.run(
            self.ledger.save_limits, provider, client, bytes_left, seconds_left, now, deposit_id
        )

    def add_limits(
        self,
        provider: bytes,
        client: bytes,
        bytes_delta: int,
        seconds_delta: float,
        now: float,
        deposit_id: bytes = b"",
    ) -> Deferred[None]:
        return self.run(
            self.ledger.add_limits, provider, client, bytes_delta, seconds_delta, now, deposit_id
        )

    def load_limits(
        self, provider: bytes, client: bytes, deposit_id: bytes | None = None
    ) -> Deferred[Limits | None]:
        return self.run(self.ledger.load_limits, provider, client, deposit_id)

    def ban(self, provider: bytes, client: bytes, until: float) -> Deferred[None]:
        return self.run(self.ledger.ban, provider, client, until)

    def banned_until(self, provider: bytes, client: bytes, now: float) -> Deferred[float | None]:
        return self.run(self.ledger.banned_until, provider, client, now)

    def add_usage(
        self,
        provider: bytes,
        client: bytes,
        kind: UsageKind,
        seconds: float,
        bytes: int,
        value: int,
    ) -> Deferred[None]:
        return self.run(self.ledger.add_usage, provider, client, kind, seconds, bytes, value)

    def book_grace(
        self, provider: bytes, subjects: Sequence[str], at: float, seconds: float, bytes: int
    ) -> Deferred[None]:
        return self.run(self.ledger.book_grace, provider, subjects, at, seconds, bytes)

    def grace_used(
        self, provider: bytes, subject: str, since: float
    ) -> Deferred[tuple[float, int]]:
        return self.run(self.ledger.grace_used, provider, subject, since)

    def report(self, provider: bytes | None = None) -> Deferred[list[UsageRow]]:
        return self.run(self.ledger.report, provider)

    def total_supply(self) -> Deferred[int]:
        return self.run(self.ledger.total_supply)

    def check_invariant(self) -> Deferred[tuple[bool, dict[str, Any]]]:
        return self.run(self.ledger.check_invariant)

    def enroll_client(self, row: EnrolledRow, now: float | None = None) -> Deferred[bool]:
        return self.run(self.ledger.enroll_client, row, now)

    def revoke_client(self, fleet: str, name: str, now: float) -> Deferred[list[EnrolledRow]]:
        return self.run(self.ledger.revoke_client, fleet, name, now)

    def enrolled_clients(self, fleet: str) -> Deferred[list[EnrolledRow]]:
        return self.run(self.ledger.enrolled_clients, fleet)

    def publish_offer(
        self, provider: bytes, instance: str, signed: bytes, now: float
    ) -> Deferred[None]:
        return self.run(self.ledger.publish_offer, provider, instance, signed, now)

    def withdraw_offer(self, provider: bytes, instance: str) -> Deferred[bool]:
        return self.run(self.ledger.withdraw_offer, provider, instance)

    def offers(self, provider: bytes | None = None) -> Deferred[list[OfferRow]]:
        return self.run(self.ledger.offers, provider)


def _publish(ledger: ILedger, signed_order: SignedOrder, marker_prefix: str) -> int:
    ledger.put_order(signed_order)
    return ledger.clear_active_usages(marker_prefix)
