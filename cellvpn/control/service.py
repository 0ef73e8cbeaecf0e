"""The service side of the control socket."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from cellvpn.conn.listen import listen_now
from cellvpn.control.commands import Call, ControlError, UnknownCommandError
from cellvpn.errors import StartupError


class ControlProtocol(amp.AMP):
    """Runs ``target.control_<command>(**args)`` for each Call; results may be Deferreds."""

    log = Logger()

    def __init__(self, target: Any) -> None:
        super().__init__()
        self.target = target

    def makeConnection(self, transport: Any) -> None:
        # AMP logs every connection; a status poll every second would flood the log.
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None

    @Call.responder
    def call(self, command: str, args: Any) -> Any:
        method = getattr(self.target, "control_" + command.replace("-", "_"), None)
        if method is None:
            raise UnknownCommandError(f"this service does not answer {command!r}")
        if not isinstance(args, dict):
            raise ControlError("arguments must be a JSON object")
        try:
            inspect.signature(method).bind(**args)
        except TypeError as e:
            raise ControlError(f"bad arguments for {command}: {e}") from None
        d = defer.maybeDeferred(method, **args)

        def unexpected(f: Any) -> Any:
            if f.check(ControlError, UnknownCommandError):
                return f
            self.log.failure("control command {command} failed", f, command=command)
            raise ControlError(f"{command} failed: {f.getErrorMessage()}")

        d.addCallbacks(lambda result: {"result": result}, unexpected)
        return d


class ControlService(Service):
    """Serves :class:`ControlProtocol` on a UNIX socket created with mode 0600."""

    log = Logger()

    def __init__(self, path: Path, target: Any, reactor: Any) -> None:
        self.path = Path(path)
        self.target = target
        self.reactor = reactor
        self.port: Any = None

    def privilegedStartService(self) -> None:
        try:
            self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as e:
            raise StartupError(f"cannot create the control socket folder: {e}") from None
        endpoint = UNIXServerEndpoint(self.reactor, str(self.path), mode=0o600, wantPID=True)
        factory = Factory.forProtocol(lambda: ControlProtocol(self.target))
        factory.noisy = False
        old_umask = os.umask(0o077)
        try:
            self.port = listen_now(endpoint, factory, f"control socket {self.path}")
        finally:
            os.umask(old_umask)
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        self.log.info("control socket {path}", path=str(self.path))

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None
