"""Free service's usage, booked in the ledger as totals when each free session ends.

A server that gives free service keeps no bill, so nothing paid is ever booked; with a ledger
configured (``[ledger] url``) it still books what each free session carried, so ``cellvpn-ctl
ledger report`` shows paid, grace and free side by side. One write per session at its end,
added to the client's total of kind "free" (never a row per packet), off the reactor thread
like every ledger write.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import TYPE_CHECKING, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from cellvpn.billing.interfaces import UsageKind
from cellvpn.server.usage import UsageState

if TYPE_CHECKING:
    from cellvpn.server.session import ServerSession


class UsageBook(Protocol):
    """The part of the ledger (``AsyncLedger``) free usage is booked in."""

    def add_usage(
        self,
        provider: bytes,
        client: bytes,
        kind: UsageKind,
        seconds: float,
        bytes: int,
        value: int,
    ) -> defer.Deferred[None]: ...


class Clock(Protocol):
    def seconds(self) -> float: ...


def free_client(session: ServerSession) -> bytes:
    """Who a free client is in the report: its TLS certificate's SHA-256 if it presented one,
    else the SHA3-256 of what identifies it (its resume token)."""
    identity = session.identity or session.peer
    kind, _, value = identity.partition(":")
    if kind == "tls":
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    return hashlib.sha3_256(identity.encode()).digest()


class FreeUsage:
    """Books each free session's seconds and bytes once, when it ends."""

    log = Logger()

    def __init__(self, ledger: UsageBook, provider: bytes, clock: Clock) -> None:
        self.ledger = ledger
        self.provider = provider
        self.clock = clock
        self._booked: weakref.WeakSet[ServerSession] = weakref.WeakSet()
        self._writing: set[defer.Deferred[None]] = set()
        #: bookings the ledger failed (each said once)
        self.failures = 0

    def session_ended(self, session: ServerSession) -> None:
        """Book a free session's usage (once; sessions that were not free book nothing)."""
        if session.usage.state is not UsageState.FREE or session in self._booked:
            return
        self._booked.add(session)
        granted = session.granted_at
        seconds = 0.0 if granted is None else max(0.0, self.clock.seconds() - granted)
        d = self.ledger.add_usage(
            self.provider, free_client(session), "free", seconds, session.carried(), 0
        )
        self._writing.add(d)

        def failed(failure: object) -> None:
            self.failures += 1
            self.log.warn(
                "booking the free usage of session {sid} failed: {why}",
                sid=f"{session.session_id or 0:#010x}",
                why=getattr(failure, "getErrorMessage", lambda: str(failure))(),
            )

        d.addErrback(failed)
        d.addBoth(lambda _: self._writing.discard(d))

    def stop(self, sessions: list[ServerSession]) -> defer.Deferred[None]:
        """The server stops: book the free sessions still live, and wait for every booking."""
        for session in sessions:
            self.session_ended(session)
        waiting = list(self._writing)
        return defer.DeferredList(waiting, consumeErrors=True).addCallback(lambda _: None)
