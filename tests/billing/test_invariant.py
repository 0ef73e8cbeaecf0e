"""Random sequences of ledger operations: money is never created, lost or counted twice.

A model of balances and deposits runs beside the ledger (SQLite, and PostgreSQL on a real
server, with fewer examples: each step is a few round trips); after every step the ledger must
agree with the model and pass its own invariant check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from cellvpn.billing.interfaces import LedgerError
from cellvpn.wire.receipt import Receipt, Unit
from cellvpn.wire.service import ErrorCode

from .helpers import NOW, close, deposit, key, receipt

#: The marks' lease in the model (the server's mark_ttl).
TTL = 300.0

CLIENTS = [key(f"client-{n}") for n in range(3)]
PROVIDERS = [key(f"provider-{n}") for n in range(2)]
#: Mostly small amounts (so deposits and receipts succeed), sometimes far beyond 64 bits.
amounts = st.one_of(st.integers(0, 10**5), st.integers(0, 10**30))


@dataclass
class ModelDeposit:
    owner: int
    locked: int
    max_unit_price: int
    unit: int
    expires: int
    state: bytes
    closed: bool = False
    usage: str | None = None
    #: the mark's lease: it holds the deposit until then
    until: float = 0.0
    redeemed: list[Receipt] = field(default_factory=list)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self, new_ledger: Callable[[], Any]) -> None:
        super().__init__()
        self.ledger = new_ledger()
        self.now = NOW
        self.minted = 0
        self.balances: dict[bytes, int] = {}
        self.deposits: dict[bytes, ModelDeposit] = {}
        self.order: list[bytes] = []
        self.nonce = 0
        #: what each (provider, client, deposit) has left: bytes, seconds
        self.limits: dict[tuple[bytes, bytes, bytes], tuple[int, float]] = {}

    def teardown(self) -> None:
        self.ledger.close()

    def _pick(self, data: st.DataObject, open_first: bool = False) -> tuple[bytes, ModelDeposit]:
        """A deposit; mostly an open one when ``open_first`` (closed ones refuse everything)."""
        choices = self.order
        if open_first and data.draw(st.integers(0, 9)) > 0:
            choices = [d for d in self.order if not self.deposits[d].closed] or self.order
        dep_id = data.draw(st.sampled_from(choices))
        return dep_id, self.deposits[dep_id]

    @initialize(value=st.integers(10**5, 10**6))
    def start(self, value: int) -> None:
        for who in range(len(CLIENTS)):
            self.mint(who, value)

    @rule(who=st.integers(0, 2), value=st.integers(1, 10**30))
    def mint(self, who: int, value: int) -> None:
        account = CLIENTS[who].account
        assert self.ledger.mint(account, value) == self.balances.get(account, 0) + value
        self.balances[account] = self.balances.get(account, 0) + value
        self.minted += value

    @rule(
        who=st.integers(0, 2),
        value=amounts,
        max_price=st.integers(0, 100),
        lifetime=st.integers(-10, 10**4),
        unit=st.sampled_from([Unit.SEC, Unit.B, Unit.SEC, Unit.B, Unit.PCS]),
    )
    def create_deposit(
        self, who: int, value: int, max_price: int, lifetime: int, unit: int
    ) -> None:
        owner = CLIENTS[who]
        self.nonce += 1
        signed = deposit(owner, value, max_price, unit, int(self.now) + lifetime, self.nonce)
        balance = self.balances.get(owner.account)
        expected: ErrorCode | None = None
        if unit not in (Unit.SEC, Unit.B):
            expected = ErrorCode.UNIT_TYPE_ERROR
        elif int(self.now) + lifetime <= self.now or value == 0:
            expected = ErrorCode.TX_CREATION_ERROR
        elif max_price == 0:
            expected = ErrorCode.PRICE_ERROR
        elif balance is None or balance < value:
            expected = ErrorCode.TX_COND_NOT_ENOUGH
        try:
            row = self.ledger.create_deposit(signed, self.now)
        except LedgerError as e:
            assert e.code == expected, e.summary
            return
        assert expected is None
        assert balance is not None
        self.balances[owner.account] = balance - value
        self.deposits[row.id] = ModelDeposit(who, value, max_price, unit, row.expires, row.id)
        self.order.append(row.id)

    @precondition(lambda self: self.order)
    @rule(
        data=st.data(),
        provider=st.integers(0, 1),
        units=st.integers(0, 50),
        kind=st.sampled_from(
            ["good"] * 6 + ["greedy", "overdraw", "replay", "fork", "wrong-client", "wrong-unit"]
        ),
    )
    def redeem(self, data: st.DataObject, provider: int, units: int, kind: str) -> None:
        dep_id, dep = self._pick(data, open_first=True)
        prov = PROVIDERS[provider]
        client = CLIENTS[dep.owner]
        per_unit = data.draw(st.integers(0, dep.max_unit_price))
        value = min(units * per_unit, dep.locked)
        if kind == "greedy":
            value = units * dep.max_unit_price + 1
        elif kind == "overdraw":
            value = dep.locked + 1
            units = min(-(-value // max(dep.max_unit_price, 1)), 2**64 - 1)  # a u64 field
        unit = dep.unit
        if kind == "replay" and dep.redeemed:
            r = dep.redeemed[-1]
        else:
            prev = dep.state
            if kind == "fork" and dep.redeemed:
                prev = dep.redeemed[-1].info.prev_hash
            signer = CLIENTS[(dep.owner + 1) % 3] if kind == "wrong-client" else client
            if kind == "wrong-unit":
                unit = Unit.B if unit == Unit.SEC else Unit.SEC
            r = receipt(
                prov, signer, prev, value=value, units=units, unit=unit, addition=self.nonce
            )
            self.nonce += 1
        before = self.ledger.dump()
        try:
            result = self.ledger.redeem(r, dep_id, prov.public, self.now)
        except LedgerError as e:
            assert self.ledger.dump() == before
            assert e.code in (
                ErrorCode.TX_COND_NOT_FOUND,
                ErrorCode.RECEIPT_WRONG_PKEY_HASH,
                ErrorCode.UNIT_TYPE_ERROR,
                ErrorCode.RECEIPT_UNITS_ERROR,
                ErrorCode.WRONG_HASH,
                ErrorCode.TX_COND_NOT_ENOUGH,
            ), e.summary
            return
        # Accepted: it must have been acceptable, and it pays exactly its value.
        assert not dep.closed and self.now < dep.expires
        assert r.info.prev_hash == dep.state and r.signatures[1].public_key == client.public
        assert r.info.units_type == dep.unit and r.info.units > 0
        assert r.info.value <= r.info.units * dep.max_unit_price and r.info.value <= dep.locked
        dep.locked -= r.info.value
        dep.state = r.hash
        dep.redeemed.append(r)
        self.balances[prov.account] = self.balances.get(prov.account, 0) + r.info.value
        assert result.locked_left == dep.locked
        assert result.provider_balance == self.balances[prov.account]
        # the units bought are the deposit's limits from this commit on
        slot = (prov.account, client.account, dep_id)
        old_bytes, old_seconds = self.limits.get(slot, (0, 0.0))
        by_bytes = r.info.units_type == Unit.B
        self.limits[slot] = (
            old_bytes + (r.info.units if by_bytes else 0),
            old_seconds + (0.0 if by_bytes else float(r.info.units)),
        )

    @precondition(lambda self: self.limits)
    @rule(data=st.data(), used=st.integers(0, 100))
    def save(self, data: st.DataObject, used: int) -> None:
        """A server's save: the use since the last one, as a negative delta, never below 0."""
        slot = data.draw(st.sampled_from(sorted(self.limits)))
        provider, client, dep_id = slot
        by_bytes = self.deposits[dep_id].unit == Unit.B
        self.ledger.add_limits(
            provider,
            client,
            -used if by_bytes else 0,
            0.0 if by_bytes else -float(used),
            self.now,
            dep_id,
        )
        left_bytes, left_seconds = self.limits[slot]
        self.limits[slot] = (
            max(0, left_bytes - (used if by_bytes else 0)),
            max(0.0, left_seconds - (0.0 if by_bytes else used)),
        )

    @precondition(lambda self: self.order)
    @rule(data=st.data(), by_owner=st.booleans())
    def close(self, data: st.DataObject, by_owner: bool) -> None:
        dep_id, dep = self._pick(data)
        owner = CLIENTS[dep.owner] if by_owner else CLIENTS[(dep.owner + 1) % 3]
        self.nonce += 1
        # a mark holds the deposit only under a live lease, and never past its expiry
        held = dep.usage is not None and self.now < dep.expires and dep.until >= self.now
        try:
            returned = self.ledger.close_deposit(close(owner, dep_id, self.nonce), self.now)
        except LedgerError:
            assert dep.closed or held or not by_owner
            return
        assert by_owner and not dep.closed and not held
        assert returned == dep.locked
        account = CLIENTS[dep.owner].account
        self.balances[account] = self.balances.get(account, 0) + returned
        dep.locked = 0
        dep.closed = True
        dep.usage = None

    @precondition(lambda self: self.order)
    @rule(data=st.data(), marker=st.sampled_from(["a:1", "a:2", "b:1", None]))
    def usage(self, data: st.DataObject, marker: str | None) -> None:
        dep_id, dep = self._pick(data)
        ok = self.ledger.set_active_usage(dep_id, marker, until=self.now + TTL, now=self.now)
        if marker is None:
            assert ok
            dep.usage = None
        elif dep.closed or dep.usage not in (None, marker):
            assert not ok  # another mark, live or stale, is taken over only by naming it
        else:
            assert ok
            dep.usage = marker
            dep.until = self.now + TTL

    @rule()
    def renew(self) -> None:
        """Server "a" renews its marks' leases."""
        self.ledger.renew_marks("a:", self.now + TTL)
        for dep in self.deposits.values():
            if dep.usage is not None and dep.usage.startswith("a:"):
                dep.until = self.now + TTL

    @rule()
    def restart(self) -> None:
        """A server restart clears its own markers."""
        self.ledger.clear_active_usages("a:")
        for dep in self.deposits.values():
            if dep.usage is not None and dep.usage.startswith("a:"):
                dep.usage = None

    @rule(seconds=st.integers(1, 600))
    def wait(self, seconds: int) -> None:
        self.now += seconds

    @invariant()
    def limits_are_per_deposit(self) -> None:
        for (provider, client, dep_id), (left_bytes, left_seconds) in self.limits.items():
            got = self.ledger.load_limits(provider, client, dep_id)
            assert got is not None
            assert (got.bytes_left, got.seconds_left) == (left_bytes, left_seconds)

    @invariant()
    def money_adds_up(self) -> None:
        ok, figures = self.ledger.check_invariant()
        assert ok, figures
        assert figures["minted"] == self.minted == self.ledger.total_supply()
        locked = sum(d.locked for d in self.deposits.values())
        assert figures["locked"] == locked
        assert figures["balances"] == sum(self.balances.values())
        for account, balance in self.balances.items():
            assert self.ledger.balance(account) == balance


#: examples per backend: a PostgreSQL step costs round trips to the server
EXAMPLES = {"sqlite": 100, "postgres": 50}


def test_money_is_never_created_lost_or_counted_twice(
    backend: str, fresh_ledgers: Callable[[], Any]
) -> None:
    run_state_machine_as_test(
        lambda: LedgerMachine(fresh_ledgers),
        settings=settings(max_examples=EXAMPLES[backend], stateful_step_count=50, deadline=None),
    )
