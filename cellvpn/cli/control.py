"""The control-socket client of ``cellvpn-ctl``: one AMP call to a running service.

Kept apart from the commands so that every command module (ledger, receipts) can use it
without importing the entry point that registers them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class CtlError(Exception):
    """One line for the user; the exit status is ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Watch:
    """A second command asked every ``interval`` seconds on the same connection while the
    first runs (what a long command is doing now); ``seen`` gets each answer."""

    command: str
    args: dict[str, Any]
    seen: Callable[[Any], None]
    interval: float = 0.1


def call(
    socket_path: str,
    command: str,
    args: dict[str, Any],
    timeout: float = 30.0,
    watch: Watch | None = None,
) -> Any:
    """Run one control command and return its result (blocking; this is a CLI)."""
    from twisted.internet import defer, task
    from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
    from twisted.protocols import amp

    from cellvpn.control.commands import Call

    outcome: dict[str, Any] = {}

    async def run(reactor: Any) -> None:
        endpoint = UNIXClientEndpoint(reactor, socket_path, timeout=5)
        try:
            proto = await connectProtocol(endpoint, amp.AMP())
        except Exception as e:
            outcome["error"] = CtlError(
                f"cannot reach the cellvpn service at {socket_path}: {_reason(e)} "
                "(is it running? --socket names another socket)"
            )
            return
        poller = None
        try:
            d = proto.callRemote(Call, command=command, args=args)
            d.addTimeout(timeout, reactor)
            if watch is not None:
                poller = _poll(reactor, proto, watch)
            response = await d
            outcome["result"] = response["result"]
        except defer.TimeoutError:
            outcome["error"] = CtlError(f"no answer from {socket_path} within {timeout:g} s")
        except Exception as e:
            outcome["error"] = CtlError(_reason(e))
        finally:
            if poller is not None and poller.running:
                poller.stop()
            proto.transport.loseConnection()

    def main(reactor: Any) -> defer.Deferred[None]:
        return defer.ensureDeferred(run(reactor))

    try:
        task.react(main)
    except SystemExit as e:
        if e.code not in (0, None):
            raise CtlError(f"control call failed (status {e.code})") from None
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")


def _poll(reactor: Any, proto: Any, watch: Watch) -> Any:
    """Ask ``watch.command`` every ``watch.interval`` s, one question at a time; a failed
    answer is skipped (the main command's answer is what counts)."""
    from twisted.internet import task

    from cellvpn.control.commands import Call

    asking: list[bool] = []

    def ask() -> None:
        if asking:
            return
        asking.append(True)
        d = proto.callRemote(Call, command=watch.command, args=watch.args)
        d.addCallback(lambda response: watch.seen(response["result"]))
        d.addErrback(lambda _: None)
        d.addBoth(lambda _: asking.clear())

    loop = task.LoopingCall(ask)
    loop.clock = reactor
    loop.start(watch.interval, now=False)
    return loop


def _reason(e: BaseException) -> str:
    from twisted.protocols.amp import RemoteAmpError

    if isinstance(e, RemoteAmpError):
        return str(e.description) if getattr(e, "description", None) else str(e)
    text = str(e) or type(e).__name__
    if "No such file" in text or "ENOENT" in text:
        return "no such socket"
    if "Connection refused" in text:
        return "nothing is listening there"
    return text
