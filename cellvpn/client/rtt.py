"""Round-trip times to candidate servers: the time a TCP connection takes to be accepted.

A thin Twisted edge for :mod:`cellvpn.client.servers`: one connect per server, at once, each
closed as soon as it is made (no TLS, nothing sent), within ``timeout`` seconds. A server that
does not answer in time is left out of the answer, so it is not preferred.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol

from cellvpn.client.servers import Candidate


class _Close(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


async def _one(reactor: Any, candidate: Candidate, timeout: float) -> float | None:
    start = reactor.seconds()
    endpoint = HostnameEndpoint(reactor, candidate.host, candidate.port, timeout=timeout)
    d = endpoint.connect(Factory.forProtocol(_Close))
    d.addTimeout(timeout, reactor)
    try:
        await d
    except Exception:  # refused, unreachable, timed out: not measured
        return None
    elapsed: float = reactor.seconds() - start
    return elapsed


async def measure(
    reactor: Any, candidates: Sequence[Candidate], timeout: float = 2.0
) -> dict[str, float]:
    """Seconds to connect to each candidate that answered, by endpoint."""
    ds = [defer.Deferred.fromCoroutine(_one(reactor, c, timeout)) for c in candidates]
    results = await defer.gatherResults(ds)
    return {c.endpoint: t for c, t in zip(candidates, results, strict=True) if t is not None}
