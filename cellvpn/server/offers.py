"""This server's offer in the shared ledger, and the fleet's offers it hands to its clients.

The server signs its order with its endpoint, key, region and capacity (an offer,
:mod:`cellvpn.billing.offers`), stores it in the ledger at start, renews it every
``[server] offer_interval`` seconds and withdraws it when it stops. Each renewal also reads the
provider's offers back, so an ORDERS request is answered from memory: a client never makes
the server query the database, however often it asks. An offer whose ``expires`` passed (its
server stopped renewing it: killed, cut off) is Not available and is not handed out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from cellvpn.billing.interfaces import LedgerError, LedgerUnavailableError, OfferRow
from cellvpn.billing.keys import KeyPair
from cellvpn.billing.offers import OFFER_STALE_INTERVALS, make_offer
from cellvpn.billing.records import Order, SignedOrder
from cellvpn.wire.errors import DecodeError


class OfferLedger(Protocol):
    """What offers need of the shared ledger (an ``AsyncLedger``)."""

    def publish_offer(
        self, provider: bytes, instance: str, signed: bytes, now: float
    ) -> Deferred[None]: ...

    def withdraw_offer(self, provider: bytes, instance: str) -> Deferred[bool]: ...

    def offers(self, provider: bytes | None = None) -> Deferred[list[OfferRow]]: ...


@dataclass(frozen=True, slots=True)
class OfferFacts:
    """What this server's offer says of it, read at each renewal."""

    endpoint: str
    spki: str
    region: str
    capacity: int
    sessions: int


class OfferBoard:
    """Publish, renew and withdraw this server's offer; keep the provider's fresh offers."""

    log = Logger()

    def __init__(
        self,
        ledger: OfferLedger,
        key: KeyPair,
        instance: str,
        clock: Any,
        interval: float,
        order: Callable[[], Order],
        facts: Callable[[], OfferFacts],
    ) -> None:
        self.ledger = ledger
        self.key = key
        self.instance = instance
        self.clock = clock
        self.interval = interval
        self._order = order
        self._facts = facts
        self._loop: LoopingCall | None = None
        #: the provider's offers as last read, signed (this server's own among them)
        self.known: list[SignedOrder] = []
        self.published: SignedOrder | None = None
        self.failing = False

    def start(self) -> None:
        loop = LoopingCall(self._renew)
        loop.clock = self.clock
        loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("this server's offer stopped being renewed", f)
        )
        self._loop = loop

    def _renew(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.renew())

    async def renew(self) -> None:
        """Sign the offer anew (valid for OFFER_STALE_INTERVALS intervals), store it, read the
        provider's offers back. A ledger away is said once; the last offers read stay."""
        now = self.clock.seconds()
        f = self._facts()
        signed = make_offer(
            self.key,
            self._order(),
            endpoint=f.endpoint,
            spki=f.spki,
            region=f.region,
            capacity=f.capacity,
            sessions=f.sessions,
            instance=self.instance,
            expires=int(now + OFFER_STALE_INTERVALS * self.interval),
        )
        try:
            await self.ledger.publish_offer(self.key.account, self.instance, signed.encode(), now)
            rows = await self.ledger.offers(self.key.account)
        except (LedgerUnavailableError, LedgerError) as e:
            if not self.failing:
                self.log.warn("cannot renew this server's offer: {why}", why=str(e))
            self.failing = True
            return
        if self.failing:
            self.log.info("this server's offer is renewed again")
        self.failing = False
        if self.published is None:
            self.log.info(
                "offer published: {endpoint}, region {region}, capacity {capacity}, renewed "
                "every {every:g} s",
                endpoint=f.endpoint,
                region=f.region or "none",
                capacity=f.capacity,
                every=self.interval,
            )
        self.published = signed
        known = []
        for row in rows:
            try:
                known.append(SignedOrder.decode(row.signed))
            except DecodeError:
                continue  # a row no offer: it is not handed out
        self.known = known

    def available(self, now: float) -> list[bytes]:
        """The provider's offers that are not stale at ``now``, encoded, freshest first."""
        fresh = [o for o in self.known if o.order.expires > now]
        fresh.sort(key=lambda o: -o.order.expires)
        return [o.encode() for o in fresh]

    async def withdraw(self) -> None:
        """Stop renewing and take the offer out of the ledger (a server that stops)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self.published is None:
            return
        try:
            await self.ledger.withdraw_offer(self.key.account, self.instance)
        except (LedgerUnavailableError, LedgerError) as e:
            self.log.warn("cannot withdraw this server's offer: {why}", why=str(e))
            return
        self.log.info("offer withdrawn")
        self.published = None
