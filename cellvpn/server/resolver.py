"""Name resolution for the L4 proxy on threads of its own, bounded, with a timeout.

``getaddrinfo`` blocks for as long as the DNS server makes it, so it runs off the reactor;
but on the reactor's shared pool a client naming hosts whose DNS hangs would take every
thread that the ledger-free rest of the server uses too. Here lookups run on their own few
threads, at most ``max_pending`` are queued or running (a lookup that timed out still counts
until its thread comes back), and each answer is awaited at most ``timeout`` seconds.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool


class ResolverBusyError(Exception):
    """Too many lookups are queued or running already."""


class ProxyResolver:
    """``resolve(host, port)`` gives a Deferred list of addresses, in preference order."""

    def __init__(
        self, reactor: Any, threads: int = 4, max_pending: int = 64, timeout: float = 5.0
    ) -> None:
        self.reactor = reactor
        self.max_pending = max_pending
        self.timeout = timeout
        self.pending = 0
        self.busy = 0
        self.timeouts = 0
        self._pool = ThreadPool(1, threads, name="cellvpn-resolver")
        self._started = False

    def _start(self) -> None:
        if not self._started:
            self._started = True
            self._pool.start()
            self.reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def stop(self) -> None:
        if self._started:
            self._started = False
            self._pool.stop()

    def resolve(self, host: str, port: int) -> Deferred[list[str]]:
        if self.pending >= self.max_pending:
            self.busy += 1
            return fail(ResolverBusyError(f"{self.pending} name lookups are under way already"))
        self._start()
        self.pending += 1
        looked_up = deferToThreadPool(self.reactor, self._pool, _lookup, host, port)
        answer: Deferred[list[str]] = Deferred()

        def back(result: Any) -> None:
            self.pending -= 1
            if answer.called:
                return None  # timed out: the answer went without it
            if isinstance(result, Failure):
                answer.errback(result)
            else:
                answer.callback(result)
            return None

        looked_up.addBoth(back)

        def too_late() -> None:
            if not answer.called:
                self.timeouts += 1
                answer.errback(TimeoutError(f"no answer within {self.timeout:g} s"))

        call = self.reactor.callLater(self.timeout, too_late)
        answer.addBoth(_cancelling(call))
        return answer


def _lookup(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _cancelling(call: Any) -> Any:
    def cancel(result: Any) -> Any:
        if call.active():
            call.cancel()
        return result

    return cancel
