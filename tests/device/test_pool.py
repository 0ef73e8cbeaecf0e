"""The lease pool: bounds, LIFO reuse, sticky holds, takeover and its invariants."""

from __future__ import annotations

import tracemalloc
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from cellvpn.device.pool import Lease, LeasePool

NET24 = IPv4Network("198.18.7.0/24")
NET29 = IPv4Network("198.18.7.8/29")


class Owner:
    """A stand-in session; unhashable like a dataclass with eq, to prove owners need no hash."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Owner({self.name})"


def ip(text: str) -> IPv4Address:
    return IPv4Address(text)


def lease(pool: LeasePool, owner: object, identity: str | None = None, now: float = 0.0) -> Lease:
    got = pool.lease(owner, identity, now)
    assert got is not None
    return got


def test_slash24_gives_253_leases_without_network_gateway_broadcast() -> None:
    """A /24 leases .2 to .254 exactly once each, then reports exhaustion."""
    pool = LeasePool(NET24)
    assert pool.gateway == ip("198.18.7.1")
    assert pool.capacity == 253
    got = [lease(pool, Owner(str(i))).address for i in range(253)]
    assert got == [ip(f"198.18.7.{i}") for i in range(2, 255)]
    assert pool.lease(Owner("late")) is None
    assert len(pool) == 253 and pool.available == 0


def test_slash29_gives_5_leases() -> None:
    """A /29 has 8 addresses: network, gateway, broadcast and 5 leases."""
    pool = LeasePool(NET29)
    got = [lease(pool, Owner(str(i))).address for i in range(5)]
    assert got == [ip(f"198.18.7.{i}") for i in range(10, 15)]
    assert pool.lease(Owner("late")) is None


def test_slash30_has_one_lease_and_smaller_is_refused() -> None:
    """A /30 is the smallest pool (one lease); /31 and /32 are refused."""
    pool = LeasePool(IPv4Network("192.0.2.4/30"))
    assert lease(pool, Owner("a")).address == ip("192.0.2.6")
    assert pool.lease(Owner("b")) is None
    for net in ("192.0.2.4/31", "192.0.2.4/32"):
        with pytest.raises(ValueError, match="too small"):
            LeasePool(IPv4Network(net))


def test_released_addresses_are_reused_last_in_first_out() -> None:
    """Freed addresses come back newest first, before any never-leased one."""
    pool = LeasePool(NET24)
    owners = [Owner(str(i)) for i in range(5)]
    leases = [lease(pool, o).address for o in owners]
    assert pool.release(leases[1], owners[1])
    assert pool.release(leases[3], owners[3])
    assert lease(pool, Owner("x")).address == leases[3]
    assert lease(pool, Owner("y")).address == leases[1]
    assert lease(pool, Owner("z")).address == ip("198.18.7.7")
    assert pool.stats() == {
        "leased": 6,
        "held": 0,
        "free_stack": 0,
        "fresh_left": 253 - 6,
        "capacity": 253,
    }


def test_second_lease_by_same_owner_is_refused() -> None:
    """An owner holds at most one lease; asking again is the caller's bug."""
    pool = LeasePool(NET24)
    owner = Owner("a")
    address = lease(pool, owner).address
    with pytest.raises(ValueError, match="already leases"):
        pool.lease(owner)
    assert pool.address_of(owner) == address and len(pool) == 1


def test_sticky_hold_returns_the_same_address_within_lease_hold() -> None:
    """A client that reconnects within lease_hold gets its address back, marked reused."""
    pool = LeasePool(NET24, lease_hold=30.0)
    first = lease(pool, Owner("a"), identity="key-a", now=100.0)
    assert not first.reused
    assert pool.release(first.address, pool.owner_of(first.address), now=110.0)
    assert pool.held_for("key-a") == first.address
    assert not pool.is_leased(first.address)
    # Other clients do not get the held address while fresh ones are left.
    other = lease(pool, Owner("b"), now=111.0)
    assert other.address != first.address
    again = lease(pool, Owner("a2"), identity="key-a", now=139.9)
    assert again == Lease(first.address, taken_from=None, reused=True)
    assert pool.held_for("key-a") is None and pool.stats()["held"] == 0


def test_hold_expires_after_lease_hold_and_goes_to_the_free_stack() -> None:
    """After lease_hold the address is free again and its identity gets a new one."""
    pool = LeasePool(NET24, lease_hold=30.0)
    owner = Owner("a")
    address = lease(pool, owner, identity="key-a", now=0.0).address
    lease(pool, Owner("b"), now=0.0)
    pool.release(address, owner, now=10.0)
    assert pool.stats()["held"] == 1
    # At exactly now == release + lease_hold the hold has lapsed; the freed address is on top
    # of the free stack, so the next client gets it, and key-a is not treated as reused.
    stranger = lease(pool, Owner("c"), now=40.0)
    assert stranger.address == address and not stranger.reused
    assert pool.stats()["held"] == 0
    back = lease(pool, Owner("a2"), identity="key-a", now=41.0)
    assert back.address != address and not back.reused


def test_a_taken_back_hold_does_not_expire_its_next_hold_early() -> None:
    """The first hold's expiry, still queued, must not end the second hold of the address."""
    pool = LeasePool(NET24, lease_hold=10.0)
    owner: object = Owner("a")
    address = lease(pool, owner, identity="key-a", now=0.0).address
    pool.release(address, owner, now=0.0)  # held until 10
    owner = Owner("a2")
    assert lease(pool, owner, identity="key-a", now=1.0).reused
    pool.release(address, owner, now=5.0)  # held until 15
    assert lease(pool, Owner("b"), now=12.0).address != address
    assert pool.held_for("key-a") == address
    assert lease(pool, Owner("a3"), identity="key-a", now=14.0) == Lease(address, None, True)


def test_expired_hold_is_noticed_on_release_too() -> None:
    """Holds lapse on any call, so a release also moves expired holds to the free stack."""
    pool = LeasePool(NET24, lease_hold=5.0)
    a, b = Owner("a"), Owner("b")
    addr_a = lease(pool, a, identity="key-a").address
    addr_b = lease(pool, b).address
    pool.release(addr_a, a, now=1.0)
    pool.release(addr_b, b, now=7.0)
    assert pool.stats() == {
        "leased": 0,
        "held": 0,
        "free_stack": 2,
        "fresh_left": 251,
        "capacity": 253,
    }
    assert lease(pool, Owner("c"), now=7.0).address == addr_b


def test_exhausted_pool_reclaims_the_oldest_hold() -> None:
    """With nothing free or fresh, a new client gets the oldest held address."""
    pool = LeasePool(NET29, lease_hold=300.0)
    owners = [Owner(str(i)) for i in range(5)]
    addrs = [lease(pool, o, identity=f"key-{i}").address for i, o in enumerate(owners)]
    pool.release(addrs[3], owners[3], now=1.0)
    pool.release(addrs[1], owners[1], now=2.0)
    assert pool.available == 2 and pool.stats()["held"] == 2
    newcomer = lease(pool, Owner("new"), now=3.0)
    assert newcomer.address == addrs[3] and not newcomer.reused
    assert pool.held_for("key-3") is None
    # key-3 comes back: its hold is gone, so it gets the last held address (key-1's).
    back3 = lease(pool, Owner("3b"), identity="key-3", now=4.0)
    assert back3.address == addrs[1] and not back3.reused
    assert pool.held_for("key-1") is None
    assert pool.lease(Owner("late"), identity="key-1", now=5.0) is None


def test_reclaim_order_ignores_a_taken_back_hold() -> None:
    """A hold taken back and made again later counts from its new release, not its first."""
    pool = LeasePool(NET29, lease_hold=300.0)
    owners = [Owner(str(i)) for i in range(5)]
    addrs = [lease(pool, o, identity=f"key-{i}").address for i, o in enumerate(owners)]
    pool.release(addrs[0], owners[0])  # all at the same time: order alone decides
    again = Owner("0b")
    assert lease(pool, again, identity="key-0").address == addrs[0]
    pool.release(addrs[1], owners[1])
    pool.release(addrs[0], again)
    assert lease(pool, Owner("new")).address == addrs[1]
    assert pool.held_for("key-0") == addrs[0]


def test_takeover_moves_the_lease_and_the_stale_release_is_a_no_op() -> None:
    """A new session of a live identity takes the address; the old session's teardown is inert."""
    pool = LeasePool(NET24)
    old, new = Owner("old"), Owner("new")
    first = lease(pool, old, identity="key-a", now=0.0)
    moved = lease(pool, new, identity="key-a", now=5.0)
    assert moved == Lease(first.address, taken_from=old, reused=True)
    assert pool.owner_of(first.address) is new
    assert pool.address_of(old) is None
    assert not pool.release(first.address, old, now=6.0)
    assert pool.owner_of(first.address) is new and len(pool) == 1
    # The old owner may lease again (it is no longer an owner here); it gets a new address.
    assert lease(pool, old, now=7.0).address != first.address
    assert pool.release(first.address, new, now=8.0)
    assert pool.held_for("key-a") == first.address


def test_release_by_a_stranger_or_of_a_free_address_is_refused() -> None:
    """Only the current owner releases; unknown or unleased addresses are a no-op."""
    pool = LeasePool(NET24)
    owner = Owner("a")
    address = lease(pool, owner).address
    assert not pool.release(address, Owner("b"))
    assert not pool.release(address, None)
    assert not pool.release(ip("198.18.7.200"), owner)
    assert not pool.release(ip("192.0.2.1"), owner)
    assert pool.owner_of(address) is owner
    assert pool.release(address, owner)
    assert not pool.release(address, owner)


def test_lease_hold_zero_means_no_holds() -> None:
    """With lease_hold=0 a released address is free at once, identity or not."""
    pool = LeasePool(NET24, lease_hold=0.0)
    owner = Owner("a")
    address = lease(pool, owner, identity="key-a").address
    pool.release(address, owner, now=1.0)
    assert pool.stats()["held"] == 0 and pool.stats()["free_stack"] == 1
    assert lease(pool, Owner("b"), now=1.0).address == address


def test_many_reconnects_keep_the_hold_queue_small() -> None:
    """Holds taken back leave stale queue entries; they are compacted, not accumulated."""
    pool = LeasePool(NET24, lease_hold=1e9)
    owner: object = Owner("0")
    address = lease(pool, owner, identity="key").address
    for i in range(10_000):
        pool.release(address, owner, now=float(i))
        owner = Owner(str(i + 1))
        assert lease(pool, owner, identity="key", now=float(i)).address == address
    assert len(pool._holds) < 100


def test_mass_release_and_expiry_keep_every_lease_and_hold() -> None:
    """Thousands of releases and expiries (which rebuild the dicts) lose nothing."""
    pool = LeasePool(IPv4Network("198.19.0.0/16"), lease_hold=10.0)
    n = 20_000
    owners = [Owner(str(i)) for i in range(n)]
    addrs = [lease(pool, o, identity=f"key-{i}").address for i, o in enumerate(owners)]
    for i in range(0, n, 2):
        assert pool.release(addrs[i], owners[i], now=1.0)
    for i in range(0, n - 1000, 2):
        assert pool.release(addrs[i + 1], owners[i + 1], now=5.0)
    assert pool.stats()["leased"] == 500 and pool.stats()["held"] == n - 500
    for i in range(n - 1000, n, 2):
        assert pool.owner_of(addrs[i + 1]) is owners[i + 1]
        assert pool.held_for(f"key-{i}") == addrs[i]
    # The holds made at 1.0 lapse at 11.0; those made at 5.0 are still there.
    assert pool.release(addrs[n - 1], owners[n - 1], now=12.0)
    assert pool.stats() == {
        "leased": 499,
        "held": n // 2 - 500 + 1,
        "free_stack": n // 2,
        "fresh_left": 2**16 - 3 - n,
        "capacity": 2**16 - 3,
    }
    back_owner = Owner("back")
    assert lease(pool, back_owner, identity="key-1", now=13.0) == Lease(addrs[1], None, True)
    # key-0's hold lapsed; the free stack gives the last address freed at 11.0 instead.
    assert lease(pool, Owner("b"), identity="key-0", now=13.0).address == addrs[n - 2]
    # Every other hold lapses at 100.0; key-1's new one starts then.
    assert pool.release(addrs[1], back_owner, now=100.0)
    assert pool.stats()["held"] == 1 and pool.held_for("key-1") == addrs[1]
    assert pool.stats()["free_stack"] == n - 500 - 1
    assert lease(pool, Owner("c"), identity="key-1", now=101.0) == Lease(addrs[1], None, True)


def test_a_large_pool_builds_nothing_per_address() -> None:
    """A /15 pool is created and used with a few KiB, not one entry per address."""
    tracemalloc.start()
    try:
        pool = LeasePool(IPv4Network("198.18.0.0/15"))
        owner = Owner("a")
        got = lease(pool, owner)
        used = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert pool.capacity == 2**17 - 3
    assert got.address == ip("198.18.0.2")
    assert pool.stats()["fresh_left"] == 2**17 - 4
    assert used < 16_384


# --- invariants under random operation sequences ----------------------------------------------

IDENTITIES = st.one_of(st.none(), st.sampled_from([f"key-{i}" for i in range(8)]))
HOLD = 10.0


class PoolMachine(RuleBasedStateMachine):
    """Random leases, releases, stale releases and clock steps on a small pool."""

    owners = Bundle("owners")

    network = IPv4Network("198.18.9.16/29")  # 5 leases: exhaustion and reclaims are common

    def __init__(self) -> None:
        super().__init__()
        self.pool = LeasePool(self.network, lease_hold=HOLD)
        self.now = 0.0
        self.count = 0
        self.leased: dict[IPv4Address, Owner] = {}  # model of active leases
        self.identity: dict[IPv4Address, str] = {}  # identity of an active lease
        # identity -> (address, expiry), in release order (the oldest first)
        self.holds: dict[str, tuple[IPv4Address, float]] = {}
        self.stale: list[tuple[IPv4Address, Owner]] = []

    def _live_holds(self) -> list[tuple[str, IPv4Address]]:
        return [(k, a) for k, (a, exp) in self.holds.items() if exp > self.now]

    @rule(target=owners, identity=IDENTITIES)
    def lease(self, identity: str | None) -> Owner:
        self.count += 1
        owner = Owner(str(self.count))
        active = {v: k for k, v in self.identity.items()}
        got = self.pool.lease(owner, identity, self.now)
        if got is None:
            assert len(self.leased) == self.pool.capacity
            return owner
        addr = got.address
        if identity is not None and identity in active:
            old_addr = active[identity]
            assert got == Lease(old_addr, self.leased[old_addr], True)
            self.stale.append((addr, self.leased[addr]))
            self.leased[addr] = owner
            return owner
        assert got.taken_from is None
        assert addr not in self.leased
        hold = self.holds.get(identity) if identity is not None else None
        if hold is not None and hold[1] > self.now:
            assert addr == hold[0] and got.reused
        else:
            assert not got.reused
        live = self._live_holds()
        for key, held_addr in live:
            if held_addr == addr and key != identity:
                # Reclaimed from an absent client: only when nothing else was left, and then
                # the oldest hold goes first.
                assert len(self.leased) + len(live) == self.pool.capacity
                assert live[0][1] == addr
        self.holds = {k: v for k, v in self.holds.items() if v[0] != addr}
        self.leased[addr] = owner
        if identity is not None:
            self.identity[addr] = identity
        return owner

    @rule(owner=consumes(owners))
    def release(self, owner: Owner) -> None:
        addr = next((a for a, o in self.leased.items() if o is owner), None)
        if addr is None:
            return
        assert self.pool.release(addr, owner, self.now)
        del self.leased[addr]
        identity = self.identity.pop(addr, None)
        if identity is not None:
            self.holds.pop(identity, None)
            self.holds[identity] = (addr, self.now + HOLD)

    @precondition(lambda self: bool(self.stale))
    @rule(data=st.data())
    def stale_release(self, data: st.DataObject) -> None:
        addr, owner = data.draw(st.sampled_from(self.stale))
        assert not self.pool.release(addr, owner, self.now)

    @rule(dt=st.sampled_from([0.0, 0.5, 3.0, HOLD - 0.1, HOLD, HOLD * 2]))
    def tick(self, dt: float) -> None:
        self.now += dt

    @invariant()
    def counts_add_up(self) -> None:
        stats = self.pool.stats()
        assert (
            stats["leased"] + stats["held"] + stats["free_stack"] + stats["fresh_left"]
            == stats["capacity"]
            == self.pool.capacity
        )
        assert stats["leased"] == len(self.pool) == len(self.leased)
        assert self.pool.available == self.pool.capacity - len(self.leased)

    @invariant()
    def leases_match_the_model(self) -> None:
        net = self.pool.network
        forbidden = {net.network_address, net.network_address + 1, net.broadcast_address}
        for addr, owner in self.leased.items():
            assert addr in net and addr not in forbidden
            assert self.pool.owner_of(addr) is owner
            assert self.pool.address_of(owner) == addr

    @invariant()
    def no_address_is_in_two_places(self) -> None:
        # Peeks at the internals: every address is leased, held, free or fresh, exactly once.
        pool = self.pool
        leased = set(pool._owner)
        held = set(pool._held)
        free = pool._free
        assert len(set(free)) == len(free)
        assert not (leased & held) and not (leased & set(free)) and not (held & set(free))
        everything = leased | held | set(free)
        assert all(pool._first <= a < pool._next for a in everything)


class RoomyPoolMachine(PoolMachine):
    """The same on a /28, where holds live longer before a reclaim takes them."""

    network = IPv4Network("198.18.9.32/28")


MACHINE_SETTINGS = settings(max_examples=200, stateful_step_count=60, deadline=None)
PoolMachine.TestCase.settings = MACHINE_SETTINGS
RoomyPoolMachine.TestCase.settings = MACHINE_SETTINGS
test_pool_machine = PoolMachine.TestCase
test_roomy_pool_machine = RoomyPoolMachine.TestCase


def test_dual_stack_leases_pair_each_ipv4_address_with_one_ipv6_address() -> None:
    """The IPv6 partner sits at the IPv4 address's offset; the gateways pair up too."""
    from ipaddress import IPv6Address, IPv6Network

    pool = LeasePool(IPv4Network("198.18.5.0/24"), 300, IPv6Network("2001:db8:1::/64"))
    a, b = object(), object()
    assert pool.gateway6 == IPv6Address("2001:db8:1::1")
    assert pool.lease(a, "a") == Lease(
        IPv4Address("198.18.5.2"), None, False, IPv6Address("2001:db8:1::2")
    )
    assert pool.lease(b, "b") == Lease(
        IPv4Address("198.18.5.3"), None, False, IPv6Address("2001:db8:1::3")
    )
    assert pool.partner(IPv4Address("198.18.5.254")) == IPv6Address("2001:db8:1::fe")


def test_dual_stack_lease_is_sticky_as_a_pair() -> None:
    """A client that comes back within lease_hold gets the same IPv4 and IPv6 addresses."""
    from ipaddress import IPv6Address, IPv6Network

    pool = LeasePool(IPv4Network("198.18.5.0/24"), 300, IPv6Network("2001:db8:1::/64"))
    first, other, again = object(), object(), object()
    lease = pool.lease(first, "tls:aa", now=0)
    assert lease is not None
    pool.release(lease.address, first, now=1)
    assert pool.lease(other, "tls:bb", now=2) == Lease(
        IPv4Address("198.18.5.3"), None, False, IPv6Address("2001:db8:1::3")
    )
    assert pool.lease(again, "tls:aa", now=3) == Lease(
        IPv4Address("198.18.5.2"), None, True, IPv6Address("2001:db8:1::2")
    )


def test_ipv4_only_pool_leases_no_ipv6() -> None:
    pool = LeasePool(IPv4Network("198.18.5.0/24"))
    assert pool.gateway6 is None
    assert pool.lease(object()) == Lease(IPv4Address("198.18.5.2"), None, False, None)


def test_an_ipv6_network_smaller_than_the_ipv4_pool_is_refused() -> None:
    from ipaddress import IPv6Network

    with pytest.raises(ValueError, match="smaller than the IPv4 pool"):
        LeasePool(IPv4Network("198.18.5.0/24"), 300, IPv6Network("2001:db8:1::/121"))
