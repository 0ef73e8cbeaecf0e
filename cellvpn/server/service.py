"""``VPNServerService``: the cellvpn server as a Twisted service.

A node application can add it to its own service tree::

    from cellvpn.config import load_server_config
    from cellvpn.server import VPNServerService

    VPNServerService(load_server_config("/etc/cellvpn/server.cfg")).setServiceParent(app)

Work that needs privileges (TLS files in ``state_dir``, binding the port) happens in
``privilegedStartService``, which twistd runs before it drops to ``-u``/``-g``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import resource
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from cellvpn import native
from cellvpn.billing.asyncledger import AsyncLedger
from cellvpn.billing.interfaces import LedgerUnavailableError
from cellvpn.billing.keys import KeyFileError, KeyPair, load_or_create_key
from cellvpn.billing.sqlite import LedgerOpenError, open_ledger
from cellvpn.config import ServerConfig
from cellvpn.config.parsers import HostPort
from cellvpn.config.reload import describe, plan_reload
from cellvpn.config.schema import (
    BillingSection,
    ClientAccess,
    EdgeSection,
    Offload,
    RegistryPlace,
)
from cellvpn.conn import pki
from cellvpn.conn.listen import listen_now
from cellvpn.conn.pki import host_addresses
from cellvpn.conn.protocol import StreamProtocol
from cellvpn.conn.tls import TLSConfigError, replace_server_context, server_tls
from cellvpn.conn.tlsbulk import bulk_tls_factory
from cellvpn.control.commands import ControlError
from cellvpn.control.service import ControlService
from cellvpn.device.forwarder import Forwarder, Packet
from cellvpn.device.packet import mss_for_mtu
from cellvpn.device.pool import Lease, LeasePool
from cellvpn.device.tohost import ToHost, ToHostRules
from cellvpn.errors import StartupError
from cellvpn.histogram import RTT_SECONDS, SESSION_SECONDS, Buckets
from cellvpn.hooks import Callbacks, Facts, HookRunner, hook_environment, process_path, server_facts
from cellvpn.net.netlink import Netlink
from cellvpn.server.access import REGISTRY_FILE, AccessError, Enrollment
from cellvpn.server.billing import ServerBilling
from cellvpn.server.check import CheckCounters
from cellvpn.server.clients import ClientRegistry, RegistryError
from cellvpn.server.edge import Admission, EdgeLimits, LineBudget, Refusal, Refusals
from cellvpn.server.ended import EndedSessions
from cellvpn.server.fleetclients import FleetClients, to_record, to_row
from cellvpn.server.freeusage import FreeUsage
from cellvpn.server.hostaddresses import HostAddresses
from cellvpn.server.metrics import listen_metrics
from cellvpn.server.offers import OfferBoard, OfferFacts
from cellvpn.server.perclient import PerClient
from cellvpn.server.proxy import ProxyRelay
from cellvpn.server.registry import SessionRegistry
from cellvpn.server.renewal import Renewal
from cellvpn.server.session import ServerSession
from cellvpn.server.sourceprefix import source_prefix
from cellvpn.stream import caps
from cellvpn.stream.connection import Role, StreamConnection, StreamSettings
from cellvpn.tun.device import TunError, open_tun_offloaded
from cellvpn.tun.port import TunPort
from cellvpn.wire import vpn
from cellvpn.wire.setup import CloseCode
from cellvpn.wire.vpn import AddrReply

#: Ended sessions kept for ``vpn_stat``.
FINISHED_KEPT = 1000
#: Session hooks run at once, and waiting: a flood of sessions cannot fork-bomb the host.
HOOKS_RUNNING = 8
HOOKS_QUEUED = 256

#: What a reload applies while the server runs, by section.
SERVER_RELOADABLE: dict[str, frozenset[str]] = {
    "server": frozenset({"log_level"}),
    "edge": frozenset(
        f.name
        for f in fields(EdgeSection)
        # held by the ledger's queue and the proxy since start
        if f.name not in ("ledger_queue", "resolver_threads", "resolve_timeout", "proxy_early_data")
    ),
    "billing": frozenset(
        f.name for f in fields(BillingSection) if f.name not in ("key", "save_interval")
    ),
    # read when a session starts and when it asks for its address: new sessions get them
    "srv_vpn": frozenset(
        {
            "rate_up",
            "rate_down",
            "rate_burst",
            "routes",
            "session_up",
            "session_down",
            "hook_timeout",
            "sessions_per_key",
        }
    ),
}


class _StreamFactory(Factory):
    noisy = False

    def __init__(self, server: VPNServerService) -> None:
        self.server = server

    def buildProtocol(self, addr: Any) -> Protocol | None:
        """A protocol for a connection the edge admits; None closes it at once, before TLS."""
        server = self.server
        host = str(getattr(addr, "host", addr))
        source = server.source_of(host)
        refused = server.admission.admit(source, server.reactor.seconds())
        if refused is not None:
            server.refusal(refused, None, f"connection from {host} refused")
            return None
        conn = StreamConnection(Role.SERVER, server.stream_settings)
        conn.on_rtt = server.keepalive_rtts.observe
        section = server.config.server
        session = ServerSession(server)
        session.source = source
        return StreamProtocol(
            conn,
            session,
            server.reactor,
            section.congestion,
            section.congestion_lan_rtt,
            server.config.edge,
            log_closes=False,
        )


class VPNServerService(MultiService):
    """Accepts cellvpn streams over TLS and serves each as a :class:`ServerSession`."""

    log = Logger()

    def __init__(
        self, config: ServerConfig, reactor: Any = None, owner: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        #: (uid, gid) the process runs as after the privileged start (twistd -u/-g), or None
        self.owner = owner
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.setName("cellvpn-server")
        self.config = config
        self.reactor = reactor
        self.sessions: SessionRegistry[ServerSession] = SessionRegistry()
        self.accepting = False
        self.identity: pki.ServerIdentity | None = None
        #: SHA-256 of the server's public key: the pin that survives renewals
        self.spki: str | None = None
        #: renews the generated certificate while running (None: the operator's own)
        self.renewal: Renewal | None = None
        self.port: Any = None
        self.metrics_port: Any = None
        s = config.server
        edge = config.edge
        self.stream_settings = StreamSettings(
            max_payload=s.max_frame,
            keepalive_interval=s.keepalive,
            idle_timeout=s.idle_timeout,
            channels="RS",
            # offload is offered once the TUN can do it, ipv6 only with an IPv6 network
            caps=self._offered_caps(config, offload=False),
            alives_per_second=edge.alives_per_second,
            fastpath=s.fastpath.value,
        )
        #: the per-frame loops the sessions run (chosen at start)
        self.fastpath: native.FastPath | None = None
        self.admission = Admission(
            EdgeLimits(
                edge.max_streams,
                edge.max_streams_per_source,
                edge.max_handshakes_per_source,
                edge.connect_rate,
                edge.connect_burst,
            )
        )
        self.refusals = Refusals(self._say_refusal, reactor.seconds, edge.log_interval)
        self.session_lines = self._session_lines(edge)
        #: enrolled clients: who is refused at setup, and the client_* control commands
        self.enrollment = Enrollment(None, ClientRegistry(), self._save_registry, reactor.seconds)
        self._registry_lock = DeferredLock()
        self.control = ControlService(config.control.socket, self, reactor)
        self.control.setServiceParent(self)
        v = config.srv_vpn
        self.network = ipaddress.IPv4Network(f"{v.network_address}/{v.network_mask}")
        self.pool = LeasePool(self.network, v.lease_hold, v.network6)
        self.to_host = ToHost(ToHostRules.parse(v.to_host), self._fixed_host_addresses(), v.dns)
        self.forwarder = Forwarder(
            self._tun_write,
            mss_for_mtu(v.mtu),
            v.isolate_clients,
            to_host=self.to_host,
            clock=reactor.seconds,
            clients=(self.network,),
        )
        #: the host's own addresses, read again while running (to_host and the proxy use them)
        self.host_addresses = HostAddresses(reactor)
        self.host_addresses.setServiceParent(self)
        self.host_addresses.listen(self._host_addresses_changed)
        #: the TUN hands over super-packets with vnet headers (offload on)
        self.offload = False
        self.tun: TunPort | None = None
        self.tun_name: str | None = None
        self.tun_ready = False
        self.finished = EndedSessions(FINISHED_KEPT)
        #: CHECKs answered, and their data both ways
        self.checks = CheckCounters()
        #: histograms for /metrics: the length of each session at its end, each keepalive RTT
        self.session_lengths = Buckets(SESSION_SECONDS)
        self.keepalive_rtts = Buckets(RTT_SECONDS)
        #: traffic per client name, when [metrics] per_client asks for it
        m = config.metrics
        self.per_client = PerClient(m.per_client_limit) if m.per_client else None
        self.billing: ServerBilling | None = None
        self.ledger: AsyncLedger | None = None
        #: books free sessions' usage (a free server with [ledger] url), else None
        self.free_usage: FreeUsage | None = None
        #: the fleet's enrolled clients in the shared ledger ([tls] registry = ledger)
        self.fleet_clients: FleetClients | None = None
        #: this server's offer in the ledger and the provider's offers (with a price)
        self.offers: OfferBoard | None = None
        self.proxy: ProxyRelay | None = ProxyRelay.for_server(self)
        #: Called with a reason when the service cannot go on (twistd then exits with status 1).
        self.on_fatal: Callable[[str], None] = self._fatal
        #: runs [srv_vpn] session_up and session_down, bounded
        self.hooks = HookRunner(reactor, reactor, v.hook_timeout, HOOKS_RUNNING, HOOKS_QUEUED)
        #: called on the reactor thread with the facts, as the session hooks are run
        self.on_session_up = Callbacks("session_up")
        self.on_session_end = Callbacks("session_end")
        #: the sessions whose session_up ran, with its facts: each is owed a session_down
        self._up_sessions: dict[ServerSession, Facts] = {}

    # --- start and stop --------------------------------------------------------------------

    def _tls_files(self) -> tuple[Any, Any]:
        tls = self.config.tls
        if tls.certificate is not None and tls.private_key is not None:
            return tls.certificate, tls.private_key
        public = self.config.server.public
        names = list(tls.names) or pki.default_names(self.config.server.listen)
        if public is not None and not tls.names and public.host not in names:
            names.append(public.host)  # the name client files check the certificate against
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
        if public is not None and public.host not in identity.names:
            self.log.warn(
                "[server] public = {public}: {host} is not among [tls] names, so client files"
                " from cellvpn-ctl client add check the certificate against {name} instead",
                public=str(public),
                host=public.host,
                name=identity.names[0],
            )
        return identity.cert, identity.key

    def _client_trust(self) -> list[Path] | None:
        """The CA files whose client certificates are served (None: any client is)."""
        tls = self.config.tls
        state = self.config.server.state_dir
        if tls.clients is ClientAccess.ANY:
            if tls.client_ca is not None:
                self.log.warn(
                    "[tls] client_ca is not used: clients = any asks no client for a certificate"
                )
            return None
        if tls.registry is RegistryPlace.LEDGER:
            self._open_fleet_registry()
        else:
            try:
                authority = pki.load_authority(state)
            except (OSError, TLSConfigError) as e:
                raise StartupError(f"cannot prepare the CA that enrolls clients: {e}") from None
            path = state / REGISTRY_FILE
            registry = ClientRegistry()
            try:
                registry = ClientRegistry.from_json(path.read_text(), str(path))
            except FileNotFoundError:
                pass
            except (OSError, UnicodeDecodeError, RegistryError) as e:
                raise StartupError(f"cannot read the enrolled clients: {e}") from None
            self.enrollment.authority = authority
            self.enrollment.registry = registry
        registry = self.enrollment.registry
        revoked = sum(r.revoked for r in registry.records())
        self.log.info(
            "clients must be enrolled ([tls] clients = enrolled): {n} enrolled, {revoked} revoked"
            "{where}",
            n=len(registry.records()) - revoked,
            revoked=revoked,
            where=" (the fleet's, in the ledger)" if self.fleet_clients is not None else "",
        )
        cas = [state / pki.TLS_DIR / pki.CA_CERT]
        return cas + ([tls.client_ca] if tls.client_ca is not None else [])

    def _open_fleet_registry(self) -> None:
        """The fleet's clients from the shared ledger, read once now (before the reactor runs,
        so it may block), with the CA key only if this server holds one."""
        state = self.config.server.state_dir
        tls_dir = state / pki.TLS_DIR
        try:
            if (tls_dir / pki.CA_KEY).exists() or not (tls_dir / pki.CA_CERT).exists():
                authority: pki.CertificateAuthority | None = pki.load_authority(state)
                ca_cert = authority.cert if authority is not None else None
            else:
                authority = None
                ca_cert = pki.load_certificates(tls_dir / pki.CA_CERT, "CA certificate")[0]
        except (OSError, TLSConfigError) as e:
            raise StartupError(f"cannot prepare the CA that enrolls clients: {e}") from None
        assert ca_cert is not None
        fleet = pki.spki_fingerprint(ca_cert)
        ledger = self._open_ledger()
        sync = ledger.ledger
        path = state / REGISTRY_FILE
        try:
            if path.exists():
                # a server that joins a fleet brings the clients it enrolled on its own
                local = ClientRegistry.from_json(path.read_text(), str(path))
                for record in local.records():
                    sync.enroll_client(to_row(fleet, record))
            rows = sync.enrolled_clients(fleet)
        except (OSError, UnicodeDecodeError, RegistryError) as e:
            raise StartupError(f"cannot read the enrolled clients: {e}") from None
        except LedgerUnavailableError as e:
            raise StartupError(f"cannot read the fleet's enrolled clients: {e}") from None
        self.enrollment.authority = authority
        self.enrollment.registry = ClientRegistry(to_record(r) for r in rows)
        self.fleet_clients = FleetClients(
            ledger,
            fleet,
            self.enrollment,
            lambda: list(self.sessions),
            self.reactor,
            self.config.tls.registry_refresh,
        )
        self.enrollment.shared = self.fleet_clients
        self.log.info(
            "fleet {fleet}: enrolled clients and revocations are kept in the ledger, read every"
            " {every:g} s; {ca}",
            fleet=fleet[:16],
            every=self.config.tls.registry_refresh,
            ca="this server holds the CA key"
            if authority is not None
            else "the CA key is kept elsewhere (clients are enrolled with cellvpn-ctl fleet)",
        )

    def _open_ledger(self) -> AsyncLedger:
        """The ledger, opened once (billing and the fleet's registry share it)."""
        if self.ledger is not None:
            return self.ledger
        state = self.config.server.state_dir
        url = self.config.ledger.url or f"sqlite:///{(state / 'ledger.db').resolve()}"
        try:
            ledger = open_ledger(url)
        except LedgerOpenError as e:
            raise StartupError(str(e)) from None
        self.ledger = AsyncLedger(ledger, self.reactor, self.config.edge.ledger_queue)
        return self.ledger

    def _renewal(self, creator: Any, trust: list[Path] | None) -> Renewal:
        """Renew the generated certificate while running, for the same key and names."""
        state = self.config.server.state_dir
        assert self.identity is not None
        names = list(self.identity.names)

        def renew() -> Deferred[pki.ServerIdentity]:
            pool = self.reactor.getThreadPool()
            return deferToThreadPool(self.reactor, pool, pki.ensure_server_identity, state, names)

        def install(identity: pki.ServerIdentity) -> None:
            replace_server_context(creator, server_tls(identity.cert, identity.key, trust))
            self.identity = identity

        return Renewal(self.reactor, renew, install)

    def _warn_open_relay(self) -> None:
        c = self.config
        if c.tls.clients is ClientAccess.ANY and c.srv_vpn.allow_free_srv and c.billing.price == 0:
            self.log.warn(
                "this server is an open relay: anyone who reaches {listen} gets free VPN service"
                " ([tls] clients = any, [srv_vpn] allow_free_srv = true, no [billing] price);"
                " set clients = enrolled to serve only clients from cellvpn-ctl client add",
                listen=c.server.listen,
            )

    def privilegedStartService(self) -> None:
        self.fastpath = native.chosen(self.config.server.fastpath)
        self.log.info("frames are cut and packed in {how}", how=self.fastpath.why)
        raise_file_limit()
        _ensure_state_dir(self.config.server.state_dir)
        cert, key = self._tls_files()
        trust = self._client_trust()
        try:
            creator = server_tls(cert, key, trust)
        except TLSConfigError as e:
            raise StartupError(str(e)) from None
        if self.identity is not None:
            self.renewal = self._renewal(creator, trust)
        self._warn_open_relay()
        if self.identity is None:
            self.log.info(
                "TLS certificate {cert}, SHA-256 fingerprint {fp}",
                cert=str(cert),
                fp=pki.format_fingerprint(pki.fingerprint_of(cert.read_bytes())),
            )
        self.spki = pki.spki_fingerprint(cert.read_bytes())
        self.log.info(
            "TLS server key SHA-256 (SPKI) {spki}: clients pin it as [client] server_key ="
            " {spki}; it stays the same when the certificate is renewed",
            spki=self.spki,
        )
        if self.config.billing.price > 0:
            self._open_billing()
        elif self.config.ledger.url is not None:
            self._open_free_ledger()
        if self.config.srv_vpn.enabled:
            self._open_tun()
            # read once now (before the reactor runs, so it may block): the first packets and
            # CONNECTs are judged with the host's addresses already known
            self.host_addresses.learned(host_addresses())
        if self.proxy is not None:
            self.proxy.read_own_addresses()
        listen = self.config.server.listen
        factory = bulk_tls_factory(creator, False, _StreamFactory(self))
        factory.noisy = False
        self.port = listen_now(serverFromString(self.reactor, listen), factory, listen)
        self.metrics_port = listen_metrics(self)
        super().privilegedStartService()
        if self.owner is not None:
            hand_over(self.config.server.state_dir, *self.owner)
        self.accepting = True

    def _open_tun(self) -> None:
        v = self.config.srv_vpn
        try:
            handle, why_not = open_tun_offloaded(
                v.tun_name, offload=v.offload is not Offload.OFF, required=v.offload is Offload.ON
            )
        except TunError as e:
            if v.offload is Offload.ON:
                raise StartupError(f"offload = on, but the TUN cannot do it: {e}") from None
            raise StartupError(str(e)) from None
        if why_not:
            self.log.info("no large-packet offload on this TUN: {why}", why=why_not)
        if handle.vnet_hdr:
            self.offload = True
            self.stream_settings = replace(
                self.stream_settings, caps=self._offered_caps(self.config, offload=True)
            )
        self.tun_name = handle.name
        self.tun = TunPort(
            self.reactor, handle.detach(), self.forwarder.from_tun, on_lost=self._tun_lost
        )
        # the forwarder writes to the port directly: no extra call per packet
        self.forwarder.tun_write = self.tun.write
        if self.offload:
            self.forwarder.tun_writev = self.tun.writev
        self.forwarder.tun_port = self.tun
        # done now, not on the thread pool: after this, twistd -u may take root away
        netlink = Netlink(blocking=True)
        d = netlink.configure_tun(
            handle.name, self.pool.gateway, self.network.prefixlen, None, v.mtu
        )
        gateway6 = self.pool.gateway6
        if gateway6 is not None and v.network6 is not None:
            interface6 = ipaddress.IPv6Interface((gateway6, v.network6.prefixlen))
            d.addCallback(lambda _: netlink.add_address(handle.name, interface6))
        failed: list[Any] = []
        d.addCallbacks(self._tun_configured, failed.append)
        if failed:
            self.tun.close()
            self.tun = None
            self.forwarder.tun_port = None
            raise StartupError(f"cannot configure TUN {handle.name}: {failed[0].value}")

    @staticmethod
    def _offered_caps(config: ServerConfig, offload: bool) -> frozenset[str]:
        """What HELLO may agree to: offload once the TUN does it, ipv6 with an IPv6 network."""
        offered = set(caps.KNOWN)
        if not offload:
            offered.discard(caps.OFFLOAD)
        if config.srv_vpn.network6 is None:
            offered.discard(caps.IPV6)
        return frozenset(offered)

    def _fixed_host_addresses(self) -> list[str]:
        """Addresses that reach the host whatever its interfaces: the gateways, broadcasts."""
        net = self.network
        fixed = [str(self.pool.gateway), str(net.broadcast_address), "255.255.255.255"]
        if self.pool.gateway6 is not None:
            fixed.append(str(self.pool.gateway6))
        return fixed

    def _host_addresses_changed(self, addresses: list[str]) -> None:
        known = self._fixed_host_addresses() + addresses
        self.to_host = self.to_host.with_addresses(known, self.config.srv_vpn.dns)
        self.forwarder.to_host = self.to_host

    def _tun_configured(self, _: object) -> None:
        self.tun_ready = True
        network6 = self.config.srv_vpn.network6
        self.log.info(
            "TUN {name} up: {gw}/{prefix}{v6}, mtu {mtu}, offload {offload}; leasing {first} to"
            " {last}",
            name=self.tun_name,
            gw=str(self.pool.gateway),
            v6="" if network6 is None else f" and {self.pool.gateway6}/{network6.prefixlen}",
            prefix=self.network.prefixlen,
            mtu=self.config.srv_vpn.mtu,
            offload="on" if self.offload else "off",
            first=str(self.pool.gateway + 1),
            last=str(self.network.broadcast_address - 1),
        )

    def _tun_lost(self, why: str) -> None:
        """The TUN went away under us (deleted): tell every client, then stop with the reason.

        Without root the server cannot make it again; a supervisor that restarts the server
        (systemd ``Restart=on-failure``) brings it back as it was, leases and ledger intact.
        """
        self.tun_ready = False
        for session in self.sessions:
            if session.address is not None:
                session.send_problem(vpn.ProblemCode.TUNNEL_DOWN)
                session.flush()
        self.on_fatal(f"TUN {self.tun_name} is gone ({why}); every session was told TUNNEL_DOWN")

    def _fatal(self, why: str) -> None:
        self.log.critical("cellvpn server cannot go on: {why}", why=why)
        if self.reactor.running:
            self.reactor.stop()

    def _tun_write(self, packet: Packet) -> bool:
        tun = self.tun
        return tun is not None and tun.write(packet)

    def _provider_key(self) -> KeyPair:
        """The provider key (it names this server in the ledger), made at first start."""
        path = self.config.billing.key or self.config.server.state_dir / "provider.key"
        try:
            key, created = load_or_create_key(path)
        except KeyFileError as e:
            raise StartupError(str(e)) from None
        if created:
            self.log.info("created the provider key {path}", path=str(path))
        return key

    def _open_free_ledger(self) -> None:
        """Free service with a ledger configured: each free session's usage is booked."""
        key = self._provider_key()
        ledger = self._open_ledger()
        self.free_usage = FreeUsage(ledger, key.account, self.reactor)
        self.log.info(
            "free service: usage booked in the ledger as provider {account}",
            account=key.account_hex,
        )

    def _open_billing(self) -> None:
        """The provider key and the ledger: both needed before the first REQUEST."""
        b = self.config.billing
        key = self._provider_key()
        ledger = self._open_ledger()
        instance = _instance_id(self.config.server.state_dir)
        self.billing = ServerBilling(
            self, key, ledger, b, self.config.srv_vpn.grace_period, instance
        )
        self.offers = self._offer_board(key, instance)

    def _offer_board(self, key: Any, instance: str) -> OfferBoard | None:
        """The board that publishes this server's offer, if clients can be told where it is."""
        try:
            endpoint = str(self.public_address()["server"])
        except ControlError as e:
            self.log.info("no offer is published: {why}", why=str(e))
            return None
        s = self.config.server
        billing = self.billing
        assert billing is not None

        def facts() -> OfferFacts:
            return OfferFacts(
                endpoint,
                self.spki or "",
                s.region,
                s.capacity or self.pool.capacity,
                len(self.sessions),
            )

        assert self.ledger is not None
        return OfferBoard(
            self.ledger,
            key,
            instance,
            self.reactor,
            s.offer_interval,
            lambda: billing.order.order,
            facts,
        )

    def startService(self) -> None:
        super().startService()
        if self.renewal is not None:
            self.renewal.start()
        if self.fleet_clients is not None:
            self.fleet_clients.start()
        if self.billing is not None:
            d = Deferred.fromCoroutine(self.billing.start())
            d.addErrback(lambda f: self.on_fatal(f"cannot start billing: {f.getErrorMessage()}"))
        if self.offers is not None:
            self.offers.start()
        if self.tun is not None:
            self.tun.startReading()
        host = self.port.getHost()
        self.log.info(
            "cellvpn server listening on {host}:{port}",
            host=getattr(host, "host", "?"),
            port=getattr(host, "port", "?"),
        )

    async def _stop_billing(self, billing: ServerBilling) -> None:
        """The offer withdrawn first (no client is sent here any more), then the sessions
        ended and saved."""
        if self.offers is not None:
            await self.offers.withdraw()
        await billing.stop()

    def stopService(self) -> Any:
        self.accepting = False
        if self.renewal is not None:
            self.renewal.stop()
        if self.fleet_clients is not None:
            self.fleet_clients.stop()
        saving: Deferred[Any] | None = None
        if self.billing is not None:
            saving = Deferred.fromCoroutine(self._stop_billing(self.billing))
            saving.addErrback(lambda f: self.log.failure("saving billing state failed", f))
            saving.addBoth(lambda _: self.ledger.close() if self.ledger else None)
        elif self.free_usage is not None:
            saving = self.free_usage.stop(list(self.sessions))
            saving.addBoth(lambda _: self.ledger.close() if self.ledger else None)
        elif self.ledger is not None:
            saving = self.ledger.close()
        for session in self.sessions:
            if session.proto is not None:
                session.proto.close(CloseCode.SHUTDOWN, "server is shutting down")
        d = super().stopService()
        if self.tun is not None:
            tun, self.tun = self.tun, None
            self.tun_ready = False
            self.forwarder.tun_write = self._tun_write
            self.forwarder.tun_writev = None
            self.forwarder.tun_port = None
            tun.stopReading()
            tun.close()  # a non-persistent TUN disappears with its last fd
        if self.port is not None:
            port, self.port = self.port, None
            d.addCallback(lambda _: port.stopListening())
        if self.metrics_port is not None:
            metrics, self.metrics_port = self.metrics_port, None
            d.addCallback(lambda _: metrics.stopListening())
        if saving is not None:
            d.addCallback(lambda _: saving)
        return d

    # --- reload ------------------------------------------------------------------------------

    def reload(self, config: ServerConfig) -> Deferred[list[str]]:
        """Apply what can change of a config read again (SIGHUP), keeping every session.

        The edge's limits and deadlines hold for connections that come after it, [billing]
        for sessions that come after it (a live session keeps the order it was offered) and
        its other keys at once; the rest (ports, the TUN, the pool, TLS, ...) waits for a
        restart and is named in the log.
        """
        reloadable = dict(SERVER_RELOADABLE)
        if (self.config.billing.price > 0) != (config.billing.price > 0):
            del reloadable["billing"]  # billing on or off: the ledger opens only at start
        plan = plan_reload(self.config, config, reloadable)
        self.config = plan.config
        self.hooks.timeout = plan.config.srv_vpn.hook_timeout
        if plan.changed("edge"):
            edge = plan.config.edge
            self.admission.limits = EdgeLimits(
                edge.max_streams,
                edge.max_streams_per_source,
                edge.max_handshakes_per_source,
                edge.connect_rate,
                edge.connect_burst,
            )
            self.refusals.interval = edge.log_interval
            skipped = self.session_lines.skipped
            self.session_lines = self._session_lines(edge)
            self.session_lines.skipped = skipped
            self.stream_settings = replace(
                self.stream_settings, alives_per_second=edge.alives_per_second
            )
        lines = describe(plan)
        if self.billing is None or not plan.changed("billing"):
            return succeed(lines)
        d = Deferred.fromCoroutine(self.billing.reconfigure(plan.config.billing))
        return d.addCallback(lambda _: lines)

    # --- reporting -------------------------------------------------------------------------

    # --- leases and sessions ----------------------------------------------------------------

    def lease_for(self, session: ServerSession) -> Lease | None:
        """Lease an address; a takeover closes the session that held it before."""
        lease = self.pool.lease(session, session.identity, self.reactor.seconds())
        if lease is None:
            return None
        old = lease.taken_from
        if isinstance(old, ServerSession):
            self.forwarder.detach(old)
            old.address = None
            old.addr_key = b""
            old.address6 = None
            old.addr6_key = b""
            old.update_passing()
            self.log.info(
                "session {new} takes over {addr} from session {old}",
                new=f"{session.session_id or 0:#010x}",
                addr=str(lease.address),
                old=f"{old.session_id or 0:#010x}",
            )
            old.close(CloseCode.TAKEN_OVER, "a newer session of this client took over")
        return lease

    def key_limit(self, session: ServerSession) -> str | None:
        """Why ``session`` would pass ``[srv_vpn] sessions_per_key``, or None when it may.

        Counted: the live sessions of the same key that passed this check, except those with
        the newcomer's resume token (a reconnect that replaces its old session).
        """
        limit = self.config.srv_vpn.sessions_per_key
        key = session.key
        if not limit or key is None:
            return None
        held = sum(
            1
            for s in self.sessions
            if s is not session
            and s.counted
            and s.key == key
            and not s.ended
            and s.resume_token != session.resume_token
        )
        if held < limit:
            return None
        return (
            f"client key {key[:28]} holds {held} session(s) already, the most"
            f" [srv_vpn] sessions_per_key = {limit} allows"
        )

    def forwarder_detach(self, session: ServerSession) -> None:
        if session.addr_key:
            self.forwarder.detach(session)

    def source_of(self, host: str) -> str:
        """The source prefix ``host`` counts under, for the edge's and grace's limits."""
        s = self.config.server
        return source_prefix(host, s.source_prefix_v4, s.source_prefix_v6)

    def refusal(self, kind: Refusal, session: ServerSession | None, why: str) -> None:
        """Count one refused or cut-off thing; a line is logged only now and then per kind."""
        if session is not None:
            why = f"session {session.session_id or 0:#010x} with {session.peer}: {why}"
        self.refusals.count(kind, why)

    def _session_lines(self, edge: EdgeSection) -> LineBudget:
        return LineBudget(
            edge.session_lines_per_second,
            edge.session_lines_burst,
            self.reactor.seconds,
            edge.log_interval,
            self._say_skipped_lines,
        )

    def _say_skipped_lines(self, since: int) -> None:
        self.log.warn(
            "{since} line(s) about sessions that never got service not written (more than"
            " {rate:g} a second; {total} in all)",
            since=since,
            rate=self.config.edge.session_lines_per_second,
            total=self.session_lines.skipped,
        )

    def _say_refusal(self, kind: Refusal, since: int, example: str) -> None:
        self.log.warn(
            "refused ({kind}): {example}{more} ({total} in all)",
            kind=kind.value,
            example=example,
            more=f"; {since - 1} more like it since the last line" if since > 1 else "",
            total=self.refusals.counts.get(kind.value, 0),
        )

    def session_up(self, session: ServerSession) -> None:
        """The session has its address: the callbacks, then the session_up hook (not waited
        for: its failure is only logged)."""
        facts = server_facts(
            "session_up",
            session.session_id,
            session.address,
            session.peer,
            session.client_name,
            client_address6=session.address6,
        )
        self._up_sessions[session] = facts
        self.on_session_up(facts)
        path = self.config.srv_vpn.session_up
        if path is not None:
            self.hooks.run("session_up", path, hook_environment(facts, process_path()))

    def _session_down(self, session: ServerSession) -> None:
        """The end owed to a session whose session_up ran, with what it carried."""
        up = self._up_sessions.pop(session, None)
        if up is None:
            return
        counters = session.counters
        facts = server_facts(
            "session_down",
            session.session_id,
            None,
            session.peer,
            session.client_name,
            counters.from_client_bytes,
            counters.to_client_bytes,
        )
        facts["client_address"] = up["client_address"]  # taken over meanwhile: still its lease
        if "client_address6" in up:
            facts["client_address6"] = up["client_address6"]
        self.on_session_end(facts)
        path = self.config.srv_vpn.session_down
        if path is not None:
            self.hooks.run("session_down", path, hook_environment(facts, process_path()))

    def session_ended(self, session: ServerSession) -> None:
        """Release what the session held; keep its final counters for vpn_stat."""
        self._session_down(session)
        if session.session_id is not None:
            self.sessions.remove(session.session_id)
        if session.address is not None:
            self.forwarder.detach(session)
            self.pool.release(session.address, session, self.reactor.seconds())
        facts = session.describe()
        self.finished.append(facts)  # before billing lets go of its state
        if session.session_id is not None:
            self.session_lengths.observe(float(facts["length_seconds"]))
            if self.per_client is not None:
                self.per_client.session_ended(session.client_name, facts["counters"])
        if self.proxy is not None:
            self.proxy.session_ended(session)
        if self.billing is not None:
            self.billing.session_ended(session)
        elif self.free_usage is not None:
            self.free_usage.session_ended(session)

    def addr_reply(
        self,
        address: ipaddress.IPv4Address,
        with_options: bool,
        address6: ipaddress.IPv6Address | None = None,
    ) -> AddrReply:
        """The reply for a lease; the IPv6 options only with ``address6`` (ipv6 agreed), so an
        IPv4-only client gets the bytes it always got."""
        v = self.config.srv_vpn
        if not with_options:
            return AddrReply(address, self.pool.gateway)
        dns4 = tuple(a for a in v.dns if isinstance(a, ipaddress.IPv4Address))
        routes4 = tuple(n for n in v.routes if isinstance(n, ipaddress.IPv4Network))
        reply = AddrReply(address, self.pool.gateway, self.network.netmask, v.mtu, dns4, routes4)
        if address6 is None or v.network6 is None:
            return reply
        return replace(
            reply,
            client6=ipaddress.IPv6Interface((address6, v.network6.prefixlen)),
            gateway6=self.pool.gateway6,
            dns6=tuple(a for a in v.dns if isinstance(a, ipaddress.IPv6Address)),
            routes6=tuple(n for n in v.routes if isinstance(n, ipaddress.IPv6Network)),
        )

    # --- control -----------------------------------------------------------------------------

    def control_status(self) -> dict[str, Any]:
        return self.status()

    def control_vpn_stat(self, full: bool = False) -> dict[str, Any]:
        active = [s.describe() for s in self.sessions if s.session_id is not None]
        return {
            "sessions": active,
            "ended": list(self.finished) if full else [],
            "pool": self.pool.stats(),
            "dropped_no_route": self.forwarder.dropped_no_route,
            "dropped_malformed": self.forwarder.dropped_malformed,
            # client packets the C pump carried to the TUN (counted in the sessions too)
            "pumped_packets": self.forwarder.pumped_packets,
            "proxy": self.proxy.describe() if self.proxy is not None else None,
            "tun": self.tun_name,
            "tun_stats": _tun_stats(self.tun),
            "refused": dict(self.refusals.counts),
            "edge": self.edge_stats(),
            # session hooks running, waiting, started, failed and dropped (the queue was full)
            "hooks": self.hooks.describe(),
        }

    def edge_stats(self) -> dict[str, int]:
        admission = self.admission
        ledger = self.ledger
        return {
            "streams": admission.streams,
            "handshakes": admission.handshakes,
            "sources": admission.sources(),
            "ledger_queued": ledger.queued if ledger is not None else 0,
        }

    def _save_registry(self, text: str) -> Deferred[None]:
        """Write clients.json on a thread, one write at a time, in the order asked."""
        path = self.config.server.state_dir / REGISTRY_FILE

        def write() -> None:
            pki.write_state_file(path, text.encode(), 0o600)

        def run() -> Deferred[None]:
            return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), write)

        return self._registry_lock.run(run)

    def control_client_sign(self, name: str, csr: str, days: int) -> Deferred[dict[str, Any]]:
        """``cellvpn-ctl client add``: sign a client's request; what its config file needs."""

        async def sign() -> dict[str, Any]:
            self.enrollment.require_authority()
            public = self.public_address()
            signed = await self.enrollment.sign(name, csr, days)
            self.log.info(
                "enrolled client {name}: certificate {serial} until {until:%Y-%m-%d}",
                name=name,
                serial=signed["serial"],
                until=_utc(signed["not_after"]),
            )
            return {**signed, **public, "server_key": self.spki}

        return Deferred.fromCoroutine(_refusing(sign()))

    def public_address(self) -> dict[str, Any]:
        """Where clients reach this server, and the name to check in its certificate."""
        public = self.config.server.public
        if public is None:
            listen = self.config.server.listen
            host = pki.listen_interface(listen)
            port = _listen_port(listen)
            if host is None or port is None:
                raise ControlError(
                    f"set [server] public = host:port: clients cannot be told where {listen!r} is"
                )
            public = HostPort(host, port)
        names = self.identity.names if self.identity is not None else ()
        name = public.host if not names or public.host in names else names[0]
        return {"server": str(public), "server_name": name}

    def control_client_list(self) -> dict[str, Any]:
        return {
            "clients": self.enrollment.listing(self.sessions),
            "enrolled_only": self.config.tls.clients is ClientAccess.ENROLLED,
        }

    def control_client_revoke(self, name: str) -> Deferred[dict[str, Any]]:
        async def revoke() -> dict[str, Any]:
            done = await self.enrollment.revoke(name, self.sessions)
            self.log.info(
                "revoked client {name} (certificate {serials}); {n} live session(s) closed",
                name=name,
                serials=", ".join(r["serial"] for r in done["revoked"]),
                n=len(done["sessions_closed"]),
            )
            return done

        return Deferred.fromCoroutine(_refusing(revoke()))

    def control_session_kick(self, session_id: int) -> dict[str, Any]:
        """``cellvpn-ctl session kick ID``: close one live session now."""
        session = self.sessions.get(session_id) if isinstance(session_id, int) else None
        if session is None:
            raise ControlError(f"no live session {session_id!r} (cellvpn-ctl vpn_stat lists them)")
        described = session.describe()
        session.close(CloseCode.REFUSED, "closed by the server's operator")
        self.log.info(
            "session {sid} with {peer} closed by the operator",
            sid=f"{session_id:#010x}",
            peer=session.peer,
        )
        return {"closed": session_id, "client": described.get("client"), "peer": session.peer}

    def control_ledger(self, argv: list[str]) -> Deferred[dict[str, Any]]:
        """``cellvpn-ctl ledger --socket``: a ledger command on this server's own ledger.

        The ledger commands are the CLI's: loaded on the first such call, not at start.
        """
        from cellvpn.cli.viasocket import run_in_server

        return run_in_server(self.ledger, argv)

    def status(self) -> dict[str, Any]:
        return {
            "role": "server",
            "listen": self.config.server.listen,
            "fingerprint": self.identity.fingerprint if self.identity else None,
            "server_key": self.spki,
            "certificate_expires": self.identity.not_after.timestamp()
            if self.identity is not None and self.identity.not_after is not None
            else None,
            "clients": self.config.tls.clients.value,
            "sessions": [s.describe() for s in self.sessions],
            "tun": self.tun_name,
            "tun_ready": self.tun_ready,
            "network": str(self.network),
            "network6": None
            if self.config.srv_vpn.network6 is None
            else str(self.config.srv_vpn.network6),
            "pool": self.pool.stats(),
            "checks": self.checks.describe(),
            "fastpath": self.fastpath.why if self.fastpath is not None else None,
        }


async def _refusing(work: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """A control answer, with the access layer's refusals as the user's one line."""
    try:
        return await work
    except AccessError as e:
        raise ControlError(str(e)) from None


def _utc(timestamp: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC)


def _listen_port(listen: str) -> int | None:
    """The port of a ``tcp:PORT:...`` or ``tcp6:PORT:...`` endpoint string, or None."""
    parts = listen.split(":")
    if len(parts) >= 2 and parts[0] in ("tcp", "tcp6") and parts[1].isdigit():
        port = int(parts[1])
        return port if 0 < port < 65536 else None
    return None


def hand_over(state: Path, uid: int, gid: int) -> None:
    """Give the state folder and what is in it (ledger, keys, certificates) to the user the
    server runs as after start, so it can go on writing them without root."""
    for folder, dirs, files in os.walk(state):
        os.chown(folder, uid, gid)
        for name in dirs + files:
            os.chown(os.path.join(folder, name), uid, gid, follow_symlinks=False)


def raise_file_limit() -> None:
    """Every session is a socket: lift the soft RLIMIT_NOFILE (often 1024) to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _tun_stats(tun: TunPort | None) -> dict[str, int] | None:
    if tun is None:
        return None
    return {k: getattr(tun.stats, k) for k in tun.stats.__slots__}


def _ensure_state_dir(state: Path) -> None:
    """The state folder exists before anything is kept in it (with its own certificate,
    nothing else would make it); a clear line when it cannot be made."""
    try:
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise StartupError(f"cannot make the state_dir {state}: {e.strerror or e}") from None
    if not state.is_dir():
        raise StartupError(f"the state_dir {state} is not a folder")


def _instance_id(state: Path) -> str:
    """This server's own name in deposit marks, kept in ``state_dir/instance-id`` so that it
    recognises its marks after a restart (even after SIGKILL) and no other server shares it."""
    path = state / "instance-id"
    try:
        text = path.read_text().strip()
        if len(text) == 16 and all(c in "0123456789abcdef" for c in text):
            return text
    except FileNotFoundError:
        pass
    text = secrets.token_hex(8)
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(text + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise StartupError(f"cannot write {path}: {e.strerror or e}") from None
    return text
