"""``VPNServerService``: the cellvpn server as a Twisted service.

A node application can add it to its own service tree::

    from cellvpn.config import load_server_config
    from cellvpn.server import VPNServerService

    VPNServerService(load_server_config("/etc/cellvpn/server.cfg")).setServiceParent(app)

Work that needs privileges (TLS files in ``state_dir``, binding the port) happens in
``privilegedStartService``, which twistd runs before it drops to ``-u``/``-g``.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from cellvpn.config import ServerConfig
from cellvpn.conn import pki
from cellvpn.conn.listen import listen_now
from cellvpn.conn.protocol import StreamProtocol
from cellvpn.conn.tls import TLSConfigError, server_tls
from cellvpn.control.service import ControlService
from cellvpn.errors import StartupError
from cellvpn.server.registry import SessionRegistry
from cellvpn.server.session import ServerSession
from cellvpn.stream import caps
from cellvpn.stream.connection import Role, StreamConnection, StreamSettings
from cellvpn.wire.setup import CloseCode


class _StreamFactory(Factory):
    noisy = False

    def __init__(self, server: VPNServerService) -> None:
        self.server = server

    def buildProtocol(self, addr: Any) -> Protocol:
        server = self.server
        conn = StreamConnection(Role.SERVER, server.stream_settings)
        return StreamProtocol(conn, ServerSession(server), server.reactor)


class VPNServerService(MultiService):
    """Accepts cellvpn streams over TLS and serves each as a :class:`ServerSession`."""

    log = Logger()

    def __init__(self, config: ServerConfig, reactor: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.setName("cellvpn-server")
        self.config = config
        self.reactor = reactor
        self.sessions: SessionRegistry[ServerSession] = SessionRegistry()
        self.accepting = False
        self.identity: pki.ServerIdentity | None = None
        self.port: Any = None
        s = config.server
        self.stream_settings = StreamSettings(
            max_payload=s.max_frame,
            keepalive_interval=s.keepalive,
            idle_timeout=s.idle_timeout,
            channels="RS",
            caps=caps.KNOWN,
        )
        self.control = ControlService(config.control.socket, self, reactor)
        self.control.setServiceParent(self)

    # --- start and stop --------------------------------------------------------------------

    def _tls_files(self) -> tuple[Any, Any]:
        tls = self.config.tls
        if tls.certificate is not None and tls.private_key is not None:
            return tls.certificate, tls.private_key
        names = list(tls.names) or pki.default_names(self.config.server.listen)
        try:
            identity = pki.ensure_server_identity(self.config.server.state_dir, names)
        except (OSError, TLSConfigError) as e:
            raise StartupError(f"cannot prepare the TLS identity: {e}") from None
        self.identity = identity
        self.log.info(
            "TLS certificate {cert} for {names}, SHA-256 fingerprint {fp}",
            cert=str(identity.cert),
            names=", ".join(identity.names),
            fp=pki.format_fingerprint(identity.fingerprint),
        )
        self.log.info("clients can trust the CA {ca}", ca=str(identity.ca_cert))
        return identity.cert, identity.key

    def privilegedStartService(self) -> None:
        cert, key = self._tls_files()
        try:
            creator = server_tls(cert, key, self.config.tls.client_ca)
        except TLSConfigError as e:
            raise StartupError(str(e)) from None
        if self.identity is None:
            self.log.info(
                "TLS certificate {cert}, SHA-256 fingerprint {fp}",
                cert=str(cert),
                fp=pki.format_fingerprint(pki.fingerprint_of(cert.read_bytes())),
            )
        listen = self.config.server.listen
        factory = TLSMemoryBIOFactory(creator, False, _StreamFactory(self))
        factory.noisy = False
        self.port = listen_now(serverFromString(self.reactor, listen), factory, listen)
        super().privilegedStartService()
        self.accepting = True

    def startService(self) -> None:
        super().startService()
        host = self.port.getHost()
        self.log.info(
            "cellvpn server listening on {host}:{port}",
            host=getattr(host, "host", "?"),
            port=getattr(host, "port", "?"),
        )

    def stopService(self) -> Any:
        self.accepting = False
        for session in self.sessions:
            if session.proto is not None:
                session.proto.close(CloseCode.SHUTDOWN, "server is shutting down")
        d = super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            d.addCallback(lambda _: port.stopListening())
        return d

    # --- reporting -------------------------------------------------------------------------

    def control_status(self) -> dict[str, Any]:
        return self.status()

    def status(self) -> dict[str, Any]:
        return {
            "role": "server",
            "listen": self.config.server.listen,
            "fingerprint": self.identity.fingerprint if self.identity else None,
            "sessions": [s.describe() for s in self.sessions],
        }
