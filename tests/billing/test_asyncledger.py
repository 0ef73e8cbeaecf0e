"""AsyncLedger: every call on one worker thread, never on the reactor's, on either backend."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task

from cellvpn.billing.asyncledger import AsyncLedger
from cellvpn.billing.interfaces import LedgerBusyError, LedgerError, LedgerUnavailableError
from cellvpn.billing.records import Order, SignedOrder
from cellvpn.billing.sqlite import SqliteLedger, open_ledger
from cellvpn.wire.receipt import Unit
from cellvpn.wire.service import ErrorCode

from .helpers import DAY, NOW, chain, deposit, key

pytestmark = pytest.mark.timeout(30)

PROVIDER = key("provider")
CLIENT = key("client")


def _open(url: str, mixin: type | None = None) -> Any:
    """The ledger at ``url``, of its backend's class with ``mixin``'s behaviour added."""
    probe = open_ledger(url)
    if mixin is None:
        return probe
    probe.close()
    base = type(probe)
    cls = type(f"{mixin.__name__}On{base.__name__}", (mixin, base), {})
    return cls(probe.path if isinstance(probe, SqliteLedger) else url)


class ThreadRecordingLedger:
    """Notes the thread of every ledger call."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.threads: list[threading.Thread] = []

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if callable(attr) and not name.startswith("_") and name != "threads":

            def recorded(*args: Any, **kwargs: Any) -> Any:
                super(ThreadRecordingLedger, self).__getattribute__("threads").append(
                    threading.current_thread()
                )
                return attr(*args, **kwargs)

            return recorded
        return attr


@pytest_twisted.ensureDeferred
async def test_calls_run_in_order_on_one_thread_that_is_not_the_reactors(
    ledger_url: str, reactor: Any
) -> None:
    ledger = _open(ledger_url, ThreadRecordingLedger)
    aledger = AsyncLedger(ledger, reactor)
    assert await aledger.mint(CLIENT.account, 1000) == 1000
    row = await aledger.create_deposit(deposit(CLIENT, value=600), NOW)
    # Queued together, they still run one after another, in order.
    receipts = chain(PROVIDER, CLIENT, row.id, 5, value=10)
    ds = [aledger.redeem(r, row.id, PROVIDER.public, NOW) for r in receipts]
    results = [await d for d in ds]
    assert [r.locked_left for r in results] == [590, 580, 570, 560, 550]
    assert await aledger.balance(PROVIDER.account) == 50
    ok, figures = await aledger.check_invariant()
    assert ok, figures
    worker = await aledger.run(threading.current_thread)
    assert worker is not threading.main_thread()
    assert worker is not threading.current_thread()
    assert ledger.threads and set(ledger.threads) == {worker}
    # The reactor thread never opened a connection of its own.
    assert getattr(ledger._local, "conn", None) is None
    aledger.stop()


@pytest_twisted.ensureDeferred
async def test_refusals_arrive_as_failures_and_a_stopped_ledger_says_so(
    ledger_url: str, reactor: Any
) -> None:
    aledger = AsyncLedger(_open(ledger_url), reactor)
    with pytest.raises(LedgerError) as info:
        await aledger.create_deposit(deposit(CLIENT), NOW)
    assert info.value.code == ErrorCode.TX_COND_NOT_ENOUGH
    await aledger.close()
    with pytest.raises(LedgerUnavailableError):
        await aledger.balance(CLIENT.account)


class CountingLedger:
    """Counts the commits of redemptions."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.batches: list[int] = []

    def redeem_many(self, requests: Any) -> Any:
        self.batches.append(len(requests))
        return super().redeem_many(requests)


@pytest_twisted.ensureDeferred
async def test_redemptions_waiting_together_share_a_commit_and_keep_their_order(
    ledger_url: str, reactor: Any
) -> None:
    ledger = _open(ledger_url, CountingLedger)
    aledger = AsyncLedger(ledger, reactor)
    await aledger.mint(CLIENT.account, 10**6)
    row = await aledger.create_deposit(deposit(CLIENT, value=10**6), NOW)
    receipts = chain(PROVIDER, CLIENT, row.id, 40, value=10)
    # Called in one go: the first goes alone, the rest wait together behind it.
    ds = [aledger.redeem(r, row.id, PROVIDER.public, NOW) for r in receipts[:20]]
    # A read in between goes after every redemption waiting: they pay, and traffic waits
    # on them...
    middle = aledger.balance(PROVIDER.account)
    replay = aledger.redeem(receipts[0], row.id, PROVIDER.public, NOW)
    ds += [aledger.redeem(r, row.id, PROVIDER.public, NOW) for r in receipts[20:]]
    results = [await d for d in ds]
    assert [r.locked_left for r in results] == [10**6 - 10 * n for n in range(1, 41)]
    assert await middle == 400
    # ...and a refusal in a group fails its own Deferred only.
    with pytest.raises(LedgerError) as info:
        await replay
    assert info.value.code == ErrorCode.WRONG_HASH
    assert sum(ledger.batches) == 41
    assert len(ledger.batches) < 41
    ok, figures = await aledger.check_invariant()
    assert ok, figures
    await aledger.close()


class GatedLedger:
    """Holds the worker in its first ``balance`` call until ``gate`` is set; notes call order."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.gate = threading.Event()
        self.order: list[str] = []

    def balance(self, account: bytes) -> int:
        self.order.append("balance")
        self.gate.wait(10)
        return super().balance(account)

    def redeem_many(self, requests: Any) -> Any:
        self.order.append(f"redeem x{len(requests)}")
        return super().redeem_many(requests)


@pytest_twisted.ensureDeferred
async def test_a_full_queue_refuses_at_once_but_redemptions_go_in_and_go_first(
    ledger_url: str, reactor: Any
) -> None:
    """1 MB of DEPOSIT_CREATEs once queued 4,000 ledger calls that real REQUESTs waited behind.
    Now calls past ``max_queue`` fail at once (a try-again error), and a redemption is never
    refused and overtakes the calls waiting."""
    ledger = _open(ledger_url, GatedLedger)
    aledger = AsyncLedger(ledger, reactor, max_queue=16)
    await aledger.mint(CLIENT.account, 10**6)
    row = await aledger.create_deposit(deposit(CLIENT, value=10**6), NOW)
    [receipt] = chain(PROVIDER, CLIENT, row.id, 1, value=10)
    ledger.order.clear()
    waiting = [aledger.balance(PROVIDER.account) for _ in range(16)]
    with pytest.raises(LedgerBusyError):
        await aledger.balance(PROVIDER.account)
    assert aledger.refused_busy == 1
    while not ledger.order:  # the worker is in the first balance, held at the gate
        await task.deferLater(reactor, 0.01, lambda: None)
    redeemed = aledger.redeem(receipt, row.id, PROVIDER.public, NOW)
    ledger.gate.set()
    assert (await redeemed).locked_left == 10**6 - 10
    balances = [await d for d in waiting]
    # the first balance was running already; the redemption went before the other 15
    assert ledger.order[:3] == ["balance", "redeem x1", "balance"]
    assert balances[0] == 0 and balances[1:] == [10] * 15
    assert aledger.queued == 0
    await aledger.close()


@pytest_twisted.ensureDeferred
async def test_a_mark_queued_behind_a_starting_servers_publish_survives_it(
    ledger_url: str, reactor: Any
) -> None:
    """A session that arrives while the server is still starting keeps its in-use mark: the
    release of the earlier run's marks and the order go in as one job, before it."""
    ledger = _open(ledger_url)
    ledger.mint(CLIENT.account, 2000)
    stale = ledger.create_deposit(deposit(CLIENT, value=600), NOW).id
    fresh = ledger.create_deposit(deposit(CLIENT, value=600, n=1), NOW).id
    assert ledger.set_active_usage(stale, "prov:inst:s0", until=NOW + 300, now=NOW)
    aledger = AsyncLedger(ledger, reactor)
    order = Order(Unit.SEC, 3600, 36, "KEL", PROVIDER.public, int(NOW) + DAY, 0x1234)
    started = aledger.publish(SignedOrder.sign(order, PROVIDER), "prov:inst:")
    marked = aledger.set_active_usage(fresh, "prov:inst:s1", until=NOW + 300, now=NOW)
    assert await started == 1
    assert await marked is True
    stale_row, fresh_row = ledger.get_deposit(stale), ledger.get_deposit(fresh)
    assert stale_row is not None and stale_row.active_usage is None
    assert fresh_row is not None and fresh_row.active_usage == "prov:inst:s1"
    assert [o.order.hash for o in ledger.orders()] == [order.hash]
    aledger.stop()
