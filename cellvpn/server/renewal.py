"""Renewing the generated server certificate while the server runs.

A server that runs for years would otherwise only renew at a restart. Every ``interval``
seconds :class:`Renewal` asks ``renew`` (which runs :func:`cellvpn.conn.pki.ensure_server_identity`
off the reactor thread) whether a new certificate was issued, and gives a new one to
``install``, which builds the TLS context new connections get; streams already open keep
theirs. The key is the same, so clients pinned by it or trusting the CA never notice.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from cellvpn.conn.pki import ServerIdentity

#: Seconds between checks; a certificate is renewed 30 days before it expires.
CHECK_INTERVAL = 12 * 3600.0


class Renewal:
    """A periodic check; a failed one is logged and the next one tries again."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        renew: Callable[[], Awaitable[ServerIdentity]],
        install: Callable[[ServerIdentity], None],
        interval: float = CHECK_INTERVAL,
    ) -> None:
        self._renew = renew
        self._install = install
        self._loop = LoopingCall(self._check)
        self._loop.clock = clock
        self._interval = interval
        self.checks = 0
        self.renewals = 0

    def start(self) -> None:
        if not self._loop.running:
            self._loop.start(self._interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _check(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.check())

    async def check(self) -> None:
        """One check now: install a newly issued certificate, log a failure."""
        self.checks += 1
        try:
            identity = await self._renew()
            if identity.created:
                self._install(identity)
                self.renewals += 1
                self.log.info(
                    "renewed the TLS server certificate while running: SHA-256 fingerprint "
                    "{fp}, same key (SPKI {spki}); new connections get it",
                    fp=identity.fingerprint,
                    spki=identity.spki,
                )
        except Exception as e:
            self.log.warn(
                "cannot renew the TLS server certificate now ({why}); trying again later",
                why=str(e) or e.__class__.__name__,
            )
