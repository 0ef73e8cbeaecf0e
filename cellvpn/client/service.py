"""``VPNClientService``: the cellvpn client as a Twisted service.

``start(host, port)`` and ``stop()`` keep the original's return codes; ``status()`` its states.
With ``[client] server`` set, the service starts by itself and keeps trying until it is up.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory  # noqa: F401  (documents the layering)
from twisted.python.failure import Failure

from cellvpn.client.backoff import Backoff
from cellvpn.client.machine import STATUS_TEXT, ClientInput, ClientState, new_machine
from cellvpn.client.stream import ClientStream
from cellvpn.config import ClientConfig
from cellvpn.conn.protocol import StreamProtocol
from cellvpn.conn.tls import TLSConfigError, client_tls
from cellvpn.control.commands import ControlError
from cellvpn.control.service import ControlService
from cellvpn.errors import StartupError
from cellvpn.stream import caps
from cellvpn.stream.connection import Role, StreamConnection, StreamSettings
from cellvpn.wire.setup import CloseCode

# start() return codes of the original
STARTED_OK = 0
ALREADY_STARTED = 1
BAD_PARAMETERS = -1
CANNOT_CONNECT = -2
NO_ANSWER = -3

#: Seconds to wait for TCP, TLS and the session setup before ``start`` gives up.
CONNECT_TIMEOUT = 10.0


class _Factory(Factory):
    noisy = False

    def __init__(self, build: Any) -> None:
        self._build = build

    def buildProtocol(self, addr: Any) -> Protocol:
        proto: Protocol = self._build()
        return proto


class VPNClientService(MultiService):
    log = Logger()

    def __init__(self, config: ClientConfig, reactor: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.setName("cellvpn-client")
        self.config = config
        self.reactor = reactor
        self.machine = new_machine()
        self.backoff = Backoff()
        self.host: str | None = None
        self.port: int | None = None
        self.stream: ClientStream | None = None
        self.last_error: str | None = None
        self.sessions_established = 0
        self._retry: IDelayedCall | None = None
        self._start_waiters: list[defer.Deferred[int]] = []
        self._tls: Any = None
        c = config.client
        self.stream_settings = StreamSettings(
            keepalive_interval=3.0,
            channels="RS",
            caps=caps.KNOWN,
        )
        self.control = ControlService(config.control.socket, self, reactor)
        self.control.setServiceParent(self)
        self._auto = c.server

    # --- service ---------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        if self._auto is not None:
            host, port = self._auto
            self.start(host, port, keep_trying=True)

    def stopService(self) -> Any:
        self._teardown(ClientInput.STOP)
        return super().stopService()

    # --- the original's API ----------------------------------------------------------------

    @property
    def state(self) -> ClientState:
        return self.machine.state

    def start(self, host: str, port: int, keep_trying: bool = False) -> defer.Deferred[int]:
        """Connect; fires with 0 (started), 1 (already), -1, -2 (cannot connect), -3 (no answer)."""
        if self.state in (ClientState.STARTED, ClientState.STARTING, ClientState.CONN_LOST):
            return defer.succeed(ALREADY_STARTED)
        if not host or not isinstance(port, int) or not 0 < port < 65536:
            return defer.succeed(BAD_PARAMETERS)
        try:
            self._tls = self._client_tls(host)
        except (TLSConfigError, StartupError) as e:
            self.last_error = str(e)
            self.log.error("cannot start: {why}", why=str(e))
            return defer.succeed(BAD_PARAMETERS)
        self.host, self.port = host, port
        self.machine.fire(ClientInput.START)
        self.last_error = None
        self._keep_trying = keep_trying
        d: defer.Deferred[int] = defer.Deferred()
        self._start_waiters.append(d)
        self._connect()
        return d

    def stop(self) -> int:
        """Disconnect and undo everything; 0 if it was running, -1 if there was nothing to stop."""
        if self.state in (ClientState.NOT_STARTED, ClientState.STOPPED):
            return -1
        self._teardown(ClientInput.STOP)
        return 0

    def status(self) -> dict[str, Any]:
        stream = self.stream
        conn = stream.proto.conn if stream and stream.proto else None
        stats = conn.stats if conn else None
        return {
            "role": "client",
            "status": self.state.name,
            "status_code": int(self.state),
            "text": STATUS_TEXT[self.state],
            "server": f"{self.host}:{self.port}" if self.host else None,
            "session_id": stream.session_id
            if stream and self.state is ClientState.STARTED
            else None,
            "sessions_established": self.sessions_established,
            "last_error": self.last_error,
            "keepalives_sent": stats.keepalives_sent if stats else 0,
            "alives_received": stats.alives_received if stats else 0,
            "keepalive_rtt_ms": None
            if not stats or stats.last_rtt is None
            else stats.last_rtt * 1e3,
            "pings_sent": stream.pings_sent if stream else 0,
            "pongs_received": stream.pongs_received if stream else 0,
            "ping_rtt_ms": None if not stream or stream.ping_rtt is None else stream.ping_rtt * 1e3,
        }

    # --- control commands ------------------------------------------------------------------

    def control_status(self) -> dict[str, Any]:
        return self.status()

    # --- connecting ------------------------------------------------------------------------

    def _client_tls(self, host: str) -> Any:
        c = self.config.client
        name = c.server_name or host
        if c.ca is None and c.fingerprint is None:
            raise StartupError(
                "[client] needs ca (the server's CA certificate) or fingerprint "
                "(the server certificate's SHA-256) to trust the server"
            )
        return client_tls(name, c.ca, c.fingerprint, c.certificate, c.private_key)

    def _connect(self) -> None:
        assert self.host is not None and self.port is not None
        stream = ClientStream(
            self.reactor,
            self.config.client.keepalive,
            self._established,
            self._lost,
        )
        self.stream = stream
        conn_settings = self.stream_settings

        def build() -> Protocol:
            return StreamProtocol(
                StreamConnection(Role.CLIENT, conn_settings), stream, self.reactor
            )

        tcp = HostnameEndpoint(self.reactor, self.host, self.port, timeout=CONNECT_TIMEOUT)
        endpoint = wrapClientTLS(self._tls, tcp)
        d = endpoint.connect(_Factory(build))
        d.addErrback(self._connect_failed, stream)
        timeout = self.reactor.callLater(CONNECT_TIMEOUT, self._setup_timeout, stream)
        stream.setup_timeout = timeout  # type: ignore[attr-defined]

    def _connect_failed(self, failure: Failure, stream: ClientStream) -> None:
        self._lost(
            stream, f"cannot connect to {self.host}:{self.port}: {failure.getErrorMessage()}", False
        )

    def _setup_timeout(self, stream: ClientStream) -> None:
        if stream is self.stream and stream.session_id is None:
            stream.close(CloseCode.PROTOCOL_ERROR, "no answer to HELLO")
            self._lost(stream, f"no answer from {self.host}:{self.port}", False, NO_ANSWER)

    def _established(self, stream: ClientStream) -> None:
        if stream is not self.stream:
            return
        self._cancel(getattr(stream, "setup_timeout", None))
        self.backoff.reset()
        self.sessions_established += 1
        self.last_error = None
        self.machine.fire(ClientInput.UP)
        assert stream.proto is not None
        self.log.info(
            "session {sid} with {server} established",
            sid=f"{stream.session_id:#010x}",
            server=stream.proto.peer,
        )
        self._resolve_start(STARTED_OK)

    def _lost(
        self, stream: ClientStream, why: str, permanent: bool, code: int = CANNOT_CONNECT
    ) -> None:
        if stream is not self.stream:
            return
        self._cancel(getattr(stream, "setup_timeout", None))
        self.stream = None
        state = self.state
        self.last_error = why
        if state is ClientState.STARTING:
            self.log.error("cannot start: {why}", why=why)
            self.machine.fire(ClientInput.START_FAILED)
            self._resolve_start(code)
            if self._keep_trying and not permanent:
                self._schedule(lambda: self.start(self.host or "", self.port or 0, True))
        elif state in (ClientState.STARTED, ClientState.CONN_LOST):
            if state is ClientState.STARTED:
                self.machine.fire(ClientInput.LINK_LOST)
            self.log.warn("connection lost: {why}", why=why)
            if self.config.client.reconnect and not permanent:
                self._schedule(self._connect)
            else:
                self._teardown(ClientInput.STOP)

    def _schedule(self, what: Any) -> None:
        delay = self.backoff.next()
        self.log.info("next attempt in {delay:.1f} s", delay=delay)
        self._retry = self.reactor.callLater(delay, self._retry_now, what)

    def _retry_now(self, what: Any) -> None:
        self._retry = None
        what()

    def _resolve_start(self, code: int) -> None:
        waiters, self._start_waiters = self._start_waiters, []
        for d in waiters:
            d.callback(code)

    def _teardown(self, event: ClientInput) -> None:
        self._cancel(self._retry)
        self._retry = None
        stream, self.stream = self.stream, None
        if stream is not None:
            self._cancel(getattr(stream, "setup_timeout", None))
            stream.close()
        if self.machine.can(event):
            self.machine.fire(event)
        self._resolve_start(CANNOT_CONNECT)

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()


__all__ = ["ControlError", "VPNClientService"]
