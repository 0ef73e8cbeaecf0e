"""The proxy's resolver: its own threads, a bound on lookups, and a timeout."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task

from cellvpn.server import resolver as resolver_module
from cellvpn.server.resolver import ProxyResolver, ResolverBusyError

pytestmark = pytest.mark.timeout(30)


@pytest_twisted.ensureDeferred
async def test_hanging_lookups_time_out_and_cannot_pile_up(
    reactor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DNS server that never answers once held the reactor's shared threads with no end."""
    release = threading.Event()
    threads: set[str] = set()

    def hanging(host: str, port: int) -> list[str]:
        threads.add(threading.current_thread().name)
        if host == "hangs.test":
            release.wait(10)
        return ["198.18.0.1"]

    monkeypatch.setattr(resolver_module, "_lookup", hanging)
    resolver = ProxyResolver(reactor, threads=2, max_pending=2, timeout=0.2)
    try:
        first = resolver.resolve("hangs.test", 80)
        second = resolver.resolve("hangs.test", 80)
        with pytest.raises(ResolverBusyError):
            await resolver.resolve("fine.test", 80)
        for d in (first, second):
            with pytest.raises(TimeoutError):
                await d
        assert resolver.timeouts == 2 and resolver.busy == 1
        assert resolver.pending == 2  # timed out, but their threads are still out
        release.set()
        while resolver.pending:
            await _tick(reactor)
        assert await resolver.resolve("fine.test", 80) == ["198.18.0.1"]
        assert all("cellvpn-resolver" in name for name in threads), threads
    finally:
        release.set()
        resolver.stop()


async def _tick(reactor: Any) -> None:
    await task.deferLater(reactor, 0.01, lambda: None)
