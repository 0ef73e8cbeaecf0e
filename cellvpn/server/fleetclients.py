"""A fleet's enrolled clients and revocations in the shared ledger, cached by each server.

Why a cache refreshed on a timer and not a ledger read at each handshake: the verdict on a
client certificate is given inside session setup, on the reactor thread, for every
connection; a database round trip there would add its latency to every connect, put one
query per connection attempt on the shared database (a flood of handshakes would become a
flood of queries), and refuse every client while the database is away. So each server keeps
the fleet's registry in memory, reads it again every ``[tls] registry_refresh`` seconds off
the reactor thread (:class:`~cellvpn.billing.asyncledger.AsyncLedger`), and closes the live
sessions of certificates revoked elsewhere. A revocation holds at once on the server that made
it and within one refresh on the others; while the database is unreachable a server goes on
with the last registry it read (and says so once in its log).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from cellvpn.billing.interfaces import EnrolledRow, LedgerUnavailableError
from cellvpn.server.access import Enrollment, LiveSession
from cellvpn.server.clients import ClientRecord


class FleetLedger(Protocol):
    """What the fleet's registry needs of the shared ledger (an ``AsyncLedger``)."""

    def enroll_client(self, row: EnrolledRow, now: float | None = None) -> Deferred[bool]: ...

    def revoke_client(self, fleet: str, name: str, now: float) -> Deferred[list[EnrolledRow]]: ...

    def enrolled_clients(self, fleet: str) -> Deferred[list[EnrolledRow]]: ...


def to_record(row: EnrolledRow) -> ClientRecord:
    return ClientRecord(
        row.name, row.serial, row.fingerprint, row.not_after, row.enrolled_at, row.revoked_at
    )


def to_row(fleet: str, record: ClientRecord) -> EnrolledRow:
    return EnrolledRow(
        fleet,
        record.name,
        record.serial,
        record.fingerprint,
        record.not_after,
        record.enrolled_at,
        record.revoked_at,
    )


class FleetClients:
    """The :class:`~cellvpn.server.access.SharedClients` of one fleet (its CA), and the timer
    that keeps the server's :class:`Enrollment` up to date with it."""

    log = Logger()

    def __init__(
        self,
        ledger: FleetLedger,
        fleet: str,
        enrollment: Enrollment,
        sessions: Callable[[], Iterable[LiveSession]],
        clock: Any,
        interval: float,
    ) -> None:
        self.ledger = ledger
        self.fleet = fleet
        self.enrollment = enrollment
        self.sessions = sessions
        self.clock = clock
        self.interval = interval
        self._loop: LoopingCall | None = None
        #: the ledger was unreachable at the last refresh (said once, until it is back)
        self.stale = False
        self.refreshes = 0

    async def add(self, record: ClientRecord, now: float) -> bool:
        return await self.ledger.enroll_client(to_row(self.fleet, record), now)

    async def revoke(self, name: str, now: float) -> list[ClientRecord]:
        return [to_record(r) for r in await self.ledger.revoke_client(self.fleet, name, now)]

    def start(self) -> None:
        loop = LoopingCall(self._refresh)
        loop.clock = self.clock
        loop.start(self.interval, now=False).addErrback(
            lambda f: self.log.failure("the fleet's registry stopped refreshing", f)
        )
        self._loop = loop

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _refresh(self) -> Deferred[list[int]]:
        return Deferred.fromCoroutine(self.refresh())

    async def refresh(self) -> list[int]:
        """Read the fleet's registry again; the sessions closed for revocations made since."""
        try:
            rows = await self.ledger.enrolled_clients(self.fleet)
        except LedgerUnavailableError as e:
            if not self.stale:
                self.log.warn(
                    "cannot read the fleet's enrolled clients ({why}); serving with the "
                    "registry read last",
                    why=str(e),
                )
            self.stale = True
            return []
        if self.stale:
            self.log.info("the fleet's enrolled clients can be read again")
        self.stale = False
        self.refreshes += 1
        closed = self.enrollment.refreshed([to_record(r) for r in rows], self.sessions())
        if closed:
            self.log.info(
                "closed {n} session(s) of clients revoked on another server of the fleet",
                n=len(closed),
            )
        return closed
