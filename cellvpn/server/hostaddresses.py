"""The host's own addresses, read again while the server runs, for the rules that need them.

Both the L4 proxy's policy and the TUN's ``to_host`` rules refuse the host's own addresses, and
those change: a DHCP lease, an interface added after start. One watcher reads them (a netlink
dump off the reactor, ~4 ms, but it may fall back to waiting for DNS) every
:data:`INTERVAL` seconds and tells its listeners when the set changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from cellvpn.conn.pki import host_addresses

#: Seconds between two readings.
INTERVAL = 30.0

#: Reads the host's addresses without blocking the reactor.
AddressReader = Callable[[], "Deferred[list[str]]"]
Listener = Callable[[list[str]], None]


class HostAddresses(Service):
    """Started and stopped with the server (a child service); ``listen(f)`` to hear of them."""

    log = Logger()

    def __init__(self, reactor: Any, read: AddressReader | None = None) -> None:
        self.reactor = reactor
        self.read = read or self._read_on_thread
        self.current: list[str] | None = None
        self._listeners: list[Listener] = []
        self.loop = LoopingCall(self.reread)
        self.loop.clock = reactor

    def listen(self, listener: Listener) -> None:
        """Call ``listener(addresses)`` now if they are known, and whenever they change."""
        self._listeners.append(listener)
        if self.current is not None:
            listener(self.current)

    def startService(self) -> None:
        super().startService()
        # a reading still under way delays the next: they never overlap
        done = self.loop.start(INTERVAL, now=True)
        done.addErrback(lambda f: self.log.failure("reading the host's addresses failed", f))

    def stopService(self) -> None:
        if self.loop.running:
            self.loop.stop()
        super().stopService()

    def reread(self) -> Deferred[None]:
        d: Deferred[list[str]] = maybeDeferred(self.read)
        return d.addCallbacks(self.learned, self._unread)

    def learned(self, addresses: list[str]) -> None:
        if self.current is not None and set(addresses) == set(self.current):
            return
        self.current = list(addresses)
        for listener in list(self._listeners):
            listener(self.current)

    def _unread(self, failure: Failure) -> None:
        self.log.warn(
            "cannot read this host's addresses again ({why}); the last ones are kept",
            why=failure.getErrorMessage(),
        )

    def _read_on_thread(self) -> Deferred[list[str]]:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), host_addresses)
