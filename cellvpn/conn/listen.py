"""Listening that fails loudly at start, with one clear line."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.python.failure import Failure

from cellvpn.errors import StartupError


def listen_now(
    endpoint: IStreamServerEndpoint, factory: IProtocolFactory, what: str
) -> IListeningPort:
    """Listen, and raise StartupError at once if the port cannot be had.

    TCP and UNIX endpoints listen synchronously, so a service can refuse to start (and twistd
    exit non-zero) instead of logging the failure later while it runs without its port.
    """
    result: list[Any] = []
    endpoint.listen(factory).addBoth(result.append)
    if not result:
        raise StartupError(f"cannot listen on {what}: the endpoint did not listen at once")
    if isinstance(result[0], Failure):
        raise StartupError(f"cannot listen on {what}: {result[0].getErrorMessage()}")
    port: IListeningPort = result[0]
    return port
