"""The lease pool: which client holds which address. Plain Python: no reactor, no I/O.

With an IPv6 network beside the IPv4 one, each lease is a pair: the IPv6 address sits at the
same offset in the IPv6 network as the IPv4 address in the IPv4 one (198.18.5.7 in
198.18.5.0/24 pairs with 2001:db8:1::7 in 2001:db8:1::/64). The pair is one lease, taken,
held and given back together, so a client that gets its IPv4 address back gets its IPv6
address back too, and nothing more is stored for IPv6.

Unlike the original's pool, the network and broadcast addresses are never leased, every
operation is O(1) (amortised) and memory grows with the leases, holds and freed addresses only,
never with the size of the network: a pool over a /10 costs nothing until it is used.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

__all__ = ["Lease", "LeasePool"]

_NOBODY = object()  # no owner: distinct from every owner, None included


@dataclass(frozen=True, slots=True)
class Lease:
    """The answer to a lease request.

    ``taken_from`` is the session that held this client's address until now (a takeover); the
    caller closes it. ``reused`` says the client got back the address it had before, from a hold
    or a takeover; the caller records the lease the same way either way.
    """

    address: IPv4Address
    taken_from: object | None
    reused: bool
    #: the IPv6 address paired with ``address`` (None: the pool has no IPv6 network)
    address6: IPv6Address | None = None


class LeasePool:
    """Addresses network + 2 .. broadcast - 1; network + 1 is the server's own (the gateway).

    Fresh addresses come from a counter, released ones from a LIFO stack, so nothing is built
    per address up front. A lease with an ``identity`` (the client's proven key) is sticky: when
    it is released, its address is held for that identity for ``lease_hold`` seconds, and the
    same identity leasing again in that time gets it back. Holds are given up in release order
    when they expire, checked lazily on every call. When nothing else is left, the oldest hold is
    reclaimed for the new client: a client that is here is served before one that is absent.

    ``now`` is the caller's monotonic clock in seconds; the pool never reads a clock itself.
    Owners are compared by identity (``is``), never by equality, and need not be hashable.
    The pool is one owner's state, not locked: call it from one thread (the reactor's).
    """

    def __init__(
        self,
        network: IPv4Network,
        lease_hold: float = 300.0,
        network6: IPv6Network | None = None,
    ) -> None:
        if network.prefixlen > 30:
            raise ValueError(f"lease pool {network} is too small: a /30 is the smallest")
        if lease_hold < 0:
            raise ValueError(f"lease_hold must not be negative, got {lease_hold}")
        if network6 is not None and network6.num_addresses < network.num_addresses:
            raise ValueError(
                f"IPv6 network {network6} is smaller than the IPv4 pool {network}: each IPv4"
                " address needs an IPv6 partner"
            )
        self.network = network
        self.network6 = network6
        #: the server's own IPv6 address, network6 + 1, the partner of the IPv4 gateway
        self.gateway6 = None if network6 is None else network6.network_address + 1
        self._hold = float(lease_hold)  # fixed: the hold queue relies on it being constant
        base = int(network.network_address)
        self.gateway = IPv4Address(base + 1)
        self._first = base + 2
        self._last = int(network.broadcast_address) - 1
        self.capacity = self._last - self._first + 1
        self._next = self._first  # the next never-leased address
        self._free: list[int] = []  # released addresses, reused last-in first-out
        self._owner: dict[int, object] = {}  # address -> owner, for active leases
        self._by_owner: dict[int, int] = {}  # id(owner) -> address; _owner keeps it alive
        self._identity: dict[int, str] = {}  # address -> identity, for active leases
        self._active: dict[str, int] = {}  # identity -> address, for active leases
        self._held: dict[int, int] = {}  # held address -> its hold's token
        self._held_for: dict[str, int] = {}  # identity -> held address
        # (expiry, token, address, identity) in release order. An entry whose token is not
        # its address's in _held is stale (that hold was taken back) and is skipped.
        self._holds: deque[tuple[float, int, int, str]] = deque()
        self._token = 0
        # Deletions from the lease dicts and the hold dicts since each was last rebuilt.
        self._removed_leases = 0
        self._removed_holds = 0

    # --- leasing ------------------------------------------------------------------------------

    def lease(self, owner: object, identity: str | None = None, now: float = 0.0) -> Lease | None:
        """Lease an address to ``owner``; None when the pool is exhausted.

        Raises ValueError if ``owner`` already holds a lease here: the server answers
        ALREADY_ASSIGNED_ADDR before it gets this far, so reaching it is a bug.
        """
        got = self.lease_int(owner, identity, now)
        if got is None:
            return None
        address, taken_from, reused = got
        return Lease(IPv4Address(address), taken_from, reused, self.partner(address))

    def partner(self, address: int | IPv4Address) -> IPv6Address | None:
        """The IPv6 address paired with an IPv4 address of the pool (None: no IPv6 network)."""
        if self.network6 is None:
            return None
        offset = int(address) - int(self.network.network_address)
        return self.network6.network_address + offset

    def lease_int(
        self, owner: object, identity: str | None = None, now: float = 0.0
    ) -> tuple[int, object | None, bool] | None:
        """``lease`` with the address as an int: (address, taken_from, reused)."""
        key = id(owner)
        if key in self._by_owner:
            raise ValueError(
                f"owner already leases {IPv4Address(self._by_owner[key])} from this pool"
            )
        self._expire(now)
        if identity is not None:
            address = self._active.get(identity)
            if address is not None:
                # The identity's old session is still here (its death not yet noticed): the
                # new one takes the address over and the caller closes the old one.
                previous = self._owner[address]
                del self._by_owner[id(previous)]
                self._owner[address] = owner
                self._by_owner[key] = address
                return address, previous, True
            address = self._held_for.pop(identity, None)
            if address is not None:
                del self._held[address]  # its deque entry is now stale
                self._removed_holds += 1
                self._assign(address, owner, key, identity)
                self._compact()
                return address, None, True
        if self._free:
            address = self._free.pop()
        elif self._next <= self._last:
            address = self._next
            self._next += 1
        else:
            reclaimed = self._reclaim_oldest_hold()
            if reclaimed is None:
                return None
            address = reclaimed
        self._assign(address, owner, key, identity)
        return address, None, False

    def _assign(self, address: int, owner: object, key: int, identity: str | None) -> None:
        self._owner[address] = owner
        self._by_owner[key] = address
        if identity is not None:
            self._identity[address] = identity
            self._active[identity] = address

    # --- releasing ----------------------------------------------------------------------------

    def release(self, address: IPv4Address, owner: object, now: float = 0.0) -> bool:
        """Give ``address`` back; only its current owner can, anyone else is a no-op (False).

        After a takeover the old session's teardown calls this too; it must not free the
        address the new session now holds.
        """
        return self.release_int(int(address), owner, now)

    def release_int(self, address: int, owner: object, now: float = 0.0) -> bool:
        """``release`` with the address as an int."""
        self._expire(now)
        if self._owner.get(address, _NOBODY) is not owner:
            return False
        del self._owner[address]
        del self._by_owner[id(owner)]
        identity = self._identity.pop(address, None)
        if identity is not None:
            del self._active[identity]
        if identity is None or self._hold <= 0:
            self._free.append(address)
        else:
            self._token = token = self._token + 1
            self._held[address] = token
            self._held_for[identity] = address
            self._holds.append((now + self._hold, token, address, identity))
        self._removed_leases += 1
        if self._removed_leases > 4 * len(self._owner) + 4096:
            self._shrink_leases()
        return True

    # --- holds --------------------------------------------------------------------------------

    def _expire(self, now: float) -> None:
        """Free the holds whose time is up; O(1) amortised, each entry is popped once."""
        holds = self._holds
        held = self._held
        while holds and holds[0][0] <= now:
            _, token, address, identity = holds.popleft()
            if held.get(address) == token:
                del held[address]
                del self._held_for[identity]
                self._free.append(address)
                self._removed_holds += 1
        if self._removed_holds > 4 * len(held) + 4096:
            self._shrink_holds()

    def _reclaim_oldest_hold(self) -> int | None:
        holds = self._holds
        held = self._held
        while holds:
            _, token, address, identity = holds.popleft()
            if held.get(address) == token:
                del held[address]
                del self._held_for[identity]
                self._removed_holds += 1
                return address
        return None

    # CPython never shrinks a dict on deletion, so after a mass release the dicts would keep the
    # size of their busiest moment. They are rebuilt after four times their size in deletions,
    # which pays for the rebuild: O(1) amortised.

    def _shrink_leases(self) -> None:
        self._removed_leases = 0
        self._owner = dict(self._owner)
        self._by_owner = dict(self._by_owner)
        self._identity = dict(self._identity)
        self._active = dict(self._active)

    def _shrink_holds(self) -> None:
        self._removed_holds = 0
        self._held = dict(self._held)
        self._held_for = dict(self._held_for)

    def _compact(self) -> None:
        """Drop stale deque entries once they outnumber the live holds: keeps memory O(held)."""
        if len(self._holds) > 2 * len(self._held) + 64:
            held = self._held
            self._holds = deque(e for e in self._holds if held.get(e[2]) == e[1])

    # --- queries ------------------------------------------------------------------------------

    def owner_of(self, address: IPv4Address) -> object | None:
        """The session holding ``address``, or None."""
        return self._owner.get(int(address))

    def owner_of_int(self, address: int) -> object | None:
        """``owner_of`` with the address as an int."""
        return self._owner.get(address)

    def address_of(self, owner: object) -> IPv4Address | None:
        """The address ``owner`` leases from this pool, or None."""
        address = self._by_owner.get(id(owner))
        return None if address is None else IPv4Address(address)

    def is_leased(self, address: IPv4Address) -> bool:
        """Whether ``address`` has an active lease (a held address is not leased)."""
        return int(address) in self._owner

    def held_for(self, identity: str) -> IPv4Address | None:
        """The address held for ``identity`` after its release, if the hold has not lapsed.

        Lapsed holds are only noticed on the next lease or release call.
        """
        address = self._held_for.get(identity)
        return None if address is None else IPv4Address(address)

    @property
    def lease_hold(self) -> float:
        """Seconds a released address stays held for its identity (0: no holds)."""
        return self._hold

    def __len__(self) -> int:
        """The number of active leases."""
        return len(self._owner)

    @property
    def available(self) -> int:
        """Addresses a new client could get now: free, never leased, or held (reclaimable)."""
        return self.capacity - len(self._owner)

    def stats(self) -> dict[str, int]:
        """Counts for status output; leased + held + free_stack + fresh_left == capacity."""
        return {
            "leased": len(self._owner),
            "held": len(self._held),
            "free_stack": len(self._free),
            "fresh_left": self._last - self._next + 1,
            "capacity": self.capacity,
        }

    def __repr__(self) -> str:
        return (
            f"<LeasePool {self.network} leased={len(self._owner)} held={len(self._held)}"
            f" available={self.available}>"
        )
