"""``VPNClientService``: the cellvpn client as a Twisted service.

``start(host, port)`` and ``stop()`` keep the original's return codes; ``status()`` its states.
With ``[client] server`` set, the service starts by itself and keeps trying until it is up.

A start goes: TLS, session setup, REQUEST -> SUCCESS on 'R', ADDR_REQUEST -> ADDR_REPLY on
'S', then the TUN, routes and DNS; only then is the client STARTED. A lost link (the stream
ends, or 3 PINGs go unanswered) is CONN_LOST: the client reconnects by itself, presenting its
resume token so the server gives it the same address, and keeps or drops the tunnel routes
meanwhile as ``kill_switch`` says.
"""

from __future__ import annotations

import contextlib
import ipaddress
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from cellvpn import native
from cellvpn.billing.keys import KeyFileError
from cellvpn.client.backoff import Backoff
from cellvpn.client.billing import ClientBilling
from cellvpn.client.check import (
    CHECK_BAD_PARAMETERS,
    CHECK_TIMEOUT,
    DEFAULT_PROBES,
    DEFAULT_RECV,
    DEFAULT_SEND,
    CheckStream,
    check_parameters,
)
from cellvpn.client.checkbook import CheckBook, configured_servers, result_rows, server_text
from cellvpn.client.machine import STATUS_TEXT, ClientInput, ClientState, new_machine
from cellvpn.client.metrics import listen_client_metrics
from cellvpn.client.receipts import RECORD_FILE, ReceiptBook
from cellvpn.client.rtt import measure
from cellvpn.client.servers import Candidate, ServerList
from cellvpn.client.socks import SocksService
from cellvpn.client.steps import StartStep, StartSteps
from cellvpn.client.stream import ClientStream
from cellvpn.client.tunnel import AddressRefusedError, ClientTunnel
from cellvpn.config import ClientConfig
from cellvpn.config.reload import describe, plan_reload
from cellvpn.config.schema import Offload
from cellvpn.conn.protocol import StreamProtocol
from cellvpn.conn.tls import TLSConfigError, client_tls
from cellvpn.conn.tlsbulk import bulk_tls_factory
from cellvpn.control.service import ControlService
from cellvpn.control.text import CHECK_TEXT
from cellvpn.errors import StartupError
from cellvpn.histogram import RTT_SECONDS, Buckets
from cellvpn.hooks import (
    Callbacks,
    Facts,
    HookResult,
    HookRunner,
    client_facts,
    hook_environment,
    process_path,
)
from cellvpn.net.netlink import NetConfigError
from cellvpn.stream import caps
from cellvpn.stream.connection import Role, StreamConnection, StreamSettings
from cellvpn.tun.device import TunError
from cellvpn.wire import vpn
from cellvpn.wire.errors import DecodeError
from cellvpn.wire.service import OrderList, PacketType, Request
from cellvpn.wire.setup import CloseCode

# start() return codes of the original
STARTED_OK = 0
ALREADY_STARTED = 1
BAD_PARAMETERS = -1
CANNOT_CONNECT = -2
NO_ANSWER = -3

#: Seconds to wait for TCP, TLS, the session setup, the grant and the address.
CONNECT_TIMEOUT = 15.0

#: What a reload applies while the client runs, by section.
CLIENT_RELOADABLE: dict[str, frozenset[str]] = {
    "client": frozenset(
        {
            "kill_switch",
            "reconnect",
            "keepalive",
            "congestion",
            "congestion_lan_rtt",
            "log_level",
            # read each time a hook runs
            "up",
            "down",
            "up_required",
            "hook_timeout",
        }
    ),
}


class HookFailedError(Exception):
    """The ``up`` hook failed and ``up_required`` is set: the start is given up for good."""

    def __init__(self, result: HookResult) -> None:
        super().__init__(f"the up hook {result.executable} failed: {result.describe()}")
        self.result = result


class _Factory(Factory):
    noisy = False

    def __init__(self, build: Any) -> None:
        self._build = build

    def buildProtocol(self, addr: Any) -> Protocol:
        proto: Protocol = self._build()
        return proto


class VPNClientService(MultiService):
    log = Logger()

    def __init__(
        self, config: ClientConfig, reactor: Any = None, resolv_conf: Path | None = None
    ) -> None:
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
        #: the server's address as the stream's transport has it (IPv4 or IPv6)
        self.server_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        self.stream: ClientStream | None = None
        self.last_error: str | None = None
        #: what the last connection warned of (a certificate pin that renewal will break)
        self.trust_warning: str | None = None
        self.sessions_established = 0
        #: sessions established again after a lost link
        self.reconnects = 0
        #: every keepalive round trip, for /metrics
        self.keepalive_rtts = Buckets(RTT_SECONDS)
        self.resume_token = b""
        self.dropped_not_connected = 0
        self._keep_trying = False
        self._retry: IDelayedCall | None = None
        #: ``[metrics] listen``, when it names an endpoint
        self.metrics_port: IListeningPort | None = None
        self._start_waiters: list[defer.Deferred[int]] = []
        #: the steps of the latest attempt to connect (``vpn_client start`` shows them)
        self.steps = StartSteps(reactor.seconds)
        self._tls: Any = None
        self._busy: defer.Deferred[Any] | None = None
        c = config.client
        offered = caps.KNOWN if c.offload is not Offload.OFF else caps.KNOWN - {caps.OFFLOAD}
        if not c.ipv6 or not c.vpn:
            offered -= {caps.IPV6}  # no IPv6 address asked for: the guard keeps IPv6 out
        self.stream_settings = StreamSettings(
            channels="RS", caps=offered, fastpath=c.fastpath.value
        )
        #: the per-frame loops the streams run (chosen at start)
        self.fastpath: native.FastPath | None = None
        self.tunnel = ClientTunnel(
            reactor,
            c.tun_name,
            c.state_dir,
            self._tun_packets,
            resolv_conf or Path("/etc/resolv.conf"),
        )
        self.billing: ClientBilling | None = None
        self._billing_error: str | None = None
        if config.wallet.key is not None:
            try:
                self.billing = ClientBilling(config.wallet, c.state_dir, reactor)
            except (KeyFileError, ValueError) as e:  # a bad key, a damaged record or meter
                self._billing_error = str(e)
        self.socks: SocksService | None = None
        if c.socks is not None:
            self.socks = SocksService(c.socks, self, reactor)
            self.socks.setServiceParent(self)
        self.control = ControlService(config.control.socket, self, reactor)
        #: the checks running, by the token their caller polls them with
        self.checks_running: dict[str, CheckStream] = {}
        #: the last check of each server, kept in state_dir
        self.check_book = CheckBook(c.state_dir, reactor)
        self.control.setServiceParent(self)
        #: runs the up and down hooks, one at a time and in order
        self.hooks = HookRunner(reactor, reactor, c.hook_timeout, max_running=1, max_queued=16)
        #: called on the reactor thread with the facts, as the up and down hooks are run
        self.on_up = Callbacks("up")
        self.on_down = Callbacks("down")
        #: the facts of the last up not yet followed by a down (None: the tunnel is not up)
        self.up_facts: Facts | None = None
        #: the servers this client may use, and the round-trip times measured to them
        self.servers = ServerList(
            ([c.server] if c.server is not None else []) + list(c.servers), c.state_dir
        )
        self.rtts: dict[str, float] = {}
        #: failed reconnects to the server now lost; server_key of a server learned from offers
        self._lost_attempts = 0
        self._server_key: str | None = None
        self.fail_overs = 0

    # --- service ---------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        if self._billing_error is not None:
            raise StartupError(f"[wallet]: {self._billing_error}")
        self.fastpath = native.chosen(self.config.client.fastpath)
        self.log.info("frames are cut and packed in {how}", how=self.fastpath.why)
        self.metrics_port = listen_client_metrics(self.reactor, self.config.metrics.listen, self)
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        d = defer.Deferred.fromCoroutine(self._cleanup_then_start())
        d.addErrback(self._unexpected, "start")

    async def _cleanup_then_start(self) -> None:
        try:
            for line in await self.tunnel.cleanup_leftovers():
                self.log.info("cleaned up after an earlier run: {line}", line=line)
        except (NetConfigError, OSError) as e:
            self.log.error("could not clean up after an earlier run: {why}", why=str(e))
        c = self.config.client
        if c.learn_servers:
            problem = self.servers.load()
            if problem is not None:
                self.log.warn("offers of an earlier run not used: {why}", why=problem)
        if c.server is None and not c.servers:
            return
        pool = self._candidates()
        if len(pool) > 1:
            self.rtts = await measure(self.reactor, pool)
            self.log.info(
                "round-trip times: {rtts}",
                rtts=", ".join(f"{e} {t * 1000:.1f} ms" for e, t in self.rtts.items()) or "none",
            )
        best = self._ranked()[0]
        self._server_key = best.server_key
        self.start(best.host, best.port, keep_trying=True)

    def stopService(self) -> Any:
        d = defer.maybeDeferred(super().stopService)
        d.addBoth(lambda _: self._shutdown())
        if self.metrics_port is not None:
            port, self.metrics_port = self.metrics_port, None
            d.addBoth(lambda _: port.stopListening())
        return d

    def _unexpected(self, failure: Failure, what: str) -> None:
        self.log.failure("unexpected failure during {what}", failure, what=what)

    def reload(self, config: ClientConfig) -> defer.Deferred[list[str]]:
        """Apply what can change of a config read again (SIGHUP), keeping the tunnel.

        ``kill_switch`` and ``reconnect`` hold from the next lost link, ``keepalive`` and the
        congestion keys from the next connection, ``log_level`` at once; the rest (the
        server, trust, the TUN, routes, DNS, the wallet) waits for a restart and is named.
        """
        plan = plan_reload(self.config, config, CLIENT_RELOADABLE)
        self.config = plan.config
        self.hooks.timeout = plan.config.client.hook_timeout
        return defer.succeed(describe(plan))

    # --- the original's API ----------------------------------------------------------------

    @property
    def state(self) -> ClientState:
        return self.machine.state

    def start(self, host: str, port: int, keep_trying: bool = False) -> defer.Deferred[int]:
        """Connect; fires with 0 (started), 1 (already), -1, -2 (cannot connect), -3 (no answer)."""
        if self.state in (ClientState.STARTED, ClientState.STARTING, ClientState.CONN_LOST):
            return defer.succeed(ALREADY_STARTED)
        if isinstance(host, str) and host.startswith("[") and host.endswith("]"):
            host = host[1:-1]  # an IPv6 literal as a URL writes it: dialled without brackets
        if not host or not isinstance(port, int) or not 0 < port < 65536:
            return defer.succeed(BAD_PARAMETERS)
        try:
            self._tls = self._client_tls(host, self._server_key)
        except (TLSConfigError, StartupError) as e:
            self.last_error = str(e)
            self.log.error("cannot start: {why}", why=str(e))
            return defer.succeed(BAD_PARAMETERS)
        self.host, self.port = host, port
        if self.billing is not None:
            self.billing.stopped = None  # a new start: a new chance
        self.machine.fire(ClientInput.START)
        if not keep_trying:
            # a new start by the user; a retry keeps the reason it is retrying for in the status
            self.last_error = None
        self._keep_trying = keep_trying
        d: defer.Deferred[int] = defer.Deferred()
        self._start_waiters.append(d)
        self._connect()
        return d

    def stop(self) -> defer.Deferred[int]:
        """Disconnect and undo everything; 0 if it was running, -1 if there was nothing to stop."""
        if self.state in (ClientState.NOT_STARTED, ClientState.STOPPED):
            return defer.succeed(-1)
        self.machine.fire(ClientInput.STOP)
        self.log.info("stopping")
        return self._shutdown().addCallback(_code, 0)

    def _shutdown(self) -> defer.Deferred[None]:
        """Close the stream, cancel retries, take the tunnel down."""
        self._cancel(self._retry)
        self._retry = None
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.close()
        if self.socks is not None:
            self.socks.link_lost()
        self._resolve_start(CANNOT_CONNECT)
        if self.machine.can(ClientInput.STOP):
            self.machine.fire(ClientInput.STOP)
        d = self._serial(lambda: self._teardown("stopped"))
        d.addErrback(self._teardown_failed)
        return d

    async def _teardown(self, reason: str) -> None:
        """Take the tunnel down, then tell the down hook (also when the teardown failed)."""
        try:
            await self.tunnel.teardown()
        finally:
            await self._tunnel_down(reason)

    async def _link_lost(self, kill_switch: bool, why: str) -> None:
        """Without the kill switch the tunnel routes go: for the hooks the tunnel is down."""
        await self.tunnel.link_lost(kill_switch)
        if not self.tunnel.tunnel_routes_up:
            await self._tunnel_down(f"connection lost: {why}")

    # --- hooks and callbacks -----------------------------------------------------------------

    def _tunnel_facts(self, stream: ClientStream) -> Facts | None:
        """What the up hook is told of the tunnel just configured (None: no lease, no tunnel)."""
        lease = self.tunnel.lease
        if lease is None:
            return None
        ip = self.server_ip
        server = (f"[{ip}]:{self.port}" if ip.version == 6 else f"{ip}:{self.port}") if ip else ""
        return client_facts(
            "up",
            self.tunnel.name,
            lease.interface,
            self.tunnel.gateway,
            server,
            stream.session_id,
            self.tunnel.mtu,
            self.tunnel.dns_servers if self.tunnel.dns.method else [],
            interface6=None if self.tunnel.lease6 is None else self.tunnel.lease6.interface,
            gateway6=self.tunnel.gateway6,
        )

    async def _tunnel_up(self, facts: Facts) -> HookResult | None:
        """The callbacks, then the up hook (waited for); a down is owed from now on."""
        self.up_facts = facts
        self.on_up(facts)
        path = self.config.client.up
        if path is None:
            return None
        env = hook_environment(facts, process_path())
        result: HookResult = await self.hooks.run("up", path, env)
        return result

    async def _tunnel_down(self, reason: str) -> None:
        """The down owed for the last up, if any: the callbacks, then the down hook."""
        facts, self.up_facts = self.up_facts, None
        if facts is None:
            return
        facts = {**facts, "event": "down", "reason": reason}
        self.on_down(facts)
        path = self.config.client.down
        if path is not None:
            await self.hooks.run("down", path, hook_environment(facts, process_path()))

    def _teardown_failed(self, failure: Failure) -> None:
        self.log.error(
            "could not undo every change (the journal keeps the rest for the next start): {why}",
            why=failure.getErrorMessage(),
        )

    def status(self) -> dict[str, Any]:
        stream = self.stream
        conn = stream.proto.conn if stream and stream.proto else None
        stats = conn.stats if conn else None
        up = self.state is ClientState.STARTED and stream is not None
        tunnel = self.tunnel.describe()
        port_stats = self.tunnel.port.stats if self.tunnel.port else None
        return {
            "role": "client",
            "status": self.state.name,
            "status_code": int(self.state),
            "text": STATUS_TEXT[self.state],
            "server": self._server_text() if self.host else None,
            "session_id": stream.session_id if up and stream else None,
            "usage_id": stream.usage_id if up and stream else None,
            "sessions_established": self.sessions_established,
            "reconnects": self.reconnects,
            "start_attempt": self.steps.attempt,
            "start_step": self.steps.current.name.lower() if self.steps.current else None,
            "start_steps": self.steps.describe(),
            "last_error": self.last_error,
            # a STOPPED client with a retry due is still trying: seconds until the next attempt
            "retrying_in": self._retry_in(),
            "warning": self.trust_warning,
            **tunnel,
            "kill_switch": self.config.client.kill_switch,
            "fastpath": self.fastpath.why if self.fastpath is not None else None,
            "tun_stats": {k: getattr(port_stats, k) for k in port_stats.__slots__}
            if port_stats
            else None,
            "stream_paused": bool(stream and stream.proto and stream.proto.paused),
            "pauses": stream.proto.pauses if stream and stream.proto else 0,
            "billing": self.billing.describe() if self.billing is not None else None,
            "hooks": self.hooks.describe(),
            "counters": {
                "sent_packets": stream.sent_packets if stream else 0,
                "sent_bytes": stream.sent_bytes if stream else 0,
                "received_packets": stream.received_packets if stream else 0,
                "received_bytes": stream.received_bytes if stream else 0,
                "dropped_not_connected": self.dropped_not_connected,
                "dropped_tun_write": port_stats.dropped_eagain + port_stats.errors_eio
                if port_stats
                else 0,
            },
            "keepalives_sent": stats.keepalives_sent if stats else 0,
            "keepalives_received": stats.keepalives_received if stats else 0,
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

    def control_vpn_client_start(self, addr: str, port: int) -> defer.Deferred[dict[str, Any]]:
        return self.start(addr, port).addCallback(self._answer)

    def control_vpn_client_stop(self) -> defer.Deferred[dict[str, Any]]:
        return self.stop().addCallback(self._answer)

    def control_vpn_client_check(
        self,
        addr: str,
        port: int,
        send: int = DEFAULT_SEND,
        recv: int = DEFAULT_RECV,
        timeout: float = CHECK_TIMEOUT,
        probes: int = DEFAULT_PROBES,
        token: str | None = None,
    ) -> defer.Deferred[dict[str, Any]]:
        """``vpn_client check``: round trips, upload and download to ``addr:port`` on a stream
        of its own (the tunnel, if up, is not touched); ``code`` as the original's. ``token``
        names the check for ``vpn_client_check_progress`` while it runs."""
        why = check_parameters(addr, port, send, recv, timeout, probes)
        tls = None
        if why is None:
            try:
                tls = self._client_tls(addr.strip())
            except (StartupError, TLSConfigError) as e:
                why = str(e)
        if why is not None or tls is None:
            return defer.succeed({"code": CHECK_BAD_PARAMETERS, "reason": why})
        host = addr.strip()
        check = CheckStream(self.reactor, send, recv, float(timeout), probes)
        c = self.config.client

        def build() -> Protocol:
            return StreamProtocol(
                StreamConnection(Role.CLIENT, self.stream_settings),
                check,
                self.reactor,
                c.congestion,
                c.congestion_lan_rtt,
            )

        tcp = HostnameEndpoint(self.reactor, host, port, timeout=min(timeout, CONNECT_TIMEOUT))
        d = tcp.connect(bulk_tls_factory(tls, True, _Factory(build)))
        d.addErrback(lambda f: check.failed_to_connect(f.getErrorMessage()))
        server = server_text(host, port)
        if token is not None:
            self.checks_running[str(token)] = check

        async def answer(outcome: tuple[int, dict[str, Any]]) -> dict[str, Any]:
            code, facts = outcome
            if token is not None:
                self.checks_running.pop(str(token), None)
            self.log.info(
                "check of {server}: {text}{why}",
                server=server,
                text=CHECK_TEXT[code],
                why=f" ({facts['reason']})" if facts.get("reason") else "",
            )
            at = self.reactor.seconds()
            result = {"code": code, "server": server, "checked_at": at, **facts}
            try:
                await self.check_book.record(server, result, at)
            except OSError as e:
                self.log.warn("cannot keep the check of {server}: {why}", server=server, why=e)
            return result

        return check.done.addCallback(lambda o: defer.Deferred.fromCoroutine(answer(o)))

    def control_vpn_client_check_progress(self, token: str) -> dict[str, Any] | None:
        """Where the check named ``token`` is (None: it is not running)."""
        check = self.checks_running.get(str(token))
        return check.progress() if check is not None else None

    def control_vpn_client_check_result(self) -> defer.Deferred[dict[str, Any]]:
        """``vpn_client check result``: the servers known and their last check."""

        async def rows() -> dict[str, Any]:
            checked = await self.check_book.results()
            return {"servers": result_rows(configured_servers(self.config), checked)}

        return defer.Deferred.fromCoroutine(rows())

    def control_local_receipts(self) -> list[dict[str, Any]]:
        """``cellvpn-ctl ledger receipts --local --socket``: every receipt this client signed."""
        if self.billing is not None:
            return self.billing.book.receipts()
        return ReceiptBook(self.config.client.state_dir / RECORD_FILE).receipts()

    def _answer(self, code: int) -> dict[str, Any]:
        return {"code": code, "status": self.status()}

    # --- connecting ------------------------------------------------------------------------

    def _server_text(self) -> str:
        """``host:port``, an IPv6 literal in brackets."""
        host = self.host or ""
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def _client_tls(self, host: str, learned_key: str | None = None) -> Any:
        """Trust for ``host``: the configured CA or pins; a server learned from the provider's
        offers is checked by its own name, and pinned by its offer's key where the config
        pins a key rather than trusting a CA."""
        c = self.config.client
        others = {hp.host for hp in c.servers} | {x.host for x in self.servers.learned}
        main = c.server is not None and host == c.server.host
        name = host if host in others and not main else (c.server_name or host)
        if c.ca is None and c.fingerprint is None and c.server_key is None:
            raise StartupError(
                "[client] needs ca (the server's CA certificate), server_key (the SHA-256 of "
                "the server's key) or fingerprint (the server certificate's SHA-256) to trust "
                "the server"
            )
        return client_tls(
            name,
            c.ca,
            c.fingerprint,
            c.certificate,
            c.private_key,
            server_key=learned_key if learned_key and c.ca is None else c.server_key,
            warn=self._trust_warned,
        )

    def _trust_warned(self, warning: str) -> None:
        self.trust_warning = warning

    def _connect(self) -> None:
        assert self.host is not None and self.port is not None
        c = self.config.client
        stream = ClientStream(self.reactor, c.keepalive, self, self.resume_token, c.vpn)
        self.stream = stream
        self.steps.begin(self._server_text())
        stream.on_step = lambda step: self._step(stream, step)
        settings = self.stream_settings

        def build() -> Protocol:
            conn = StreamConnection(Role.CLIENT, settings)
            conn.on_rtt = self.keepalive_rtts.observe
            return StreamProtocol(
                conn,
                stream,
                self.reactor,
                c.congestion,
                c.congestion_lan_rtt,
            )

        tcp = HostnameEndpoint(self.reactor, self.host, self.port, timeout=CONNECT_TIMEOUT)
        d = tcp.connect(bulk_tls_factory(self._tls, True, _Factory(build)))
        d.addErrback(self._connect_failed, stream)
        stream.setup_timer = self.reactor.callLater(CONNECT_TIMEOUT, self._setup_timeout, stream)

    def _step(self, stream: ClientStream, step: StartStep, text: str = "") -> None:
        if stream is self.stream:
            self.steps.step(step, text)

    def _connect_failed(self, failure: Failure, stream: ClientStream) -> None:
        why = f"cannot connect to {self._server_text()}: {failure.getErrorMessage()}"
        self.stream_lost(stream, why, False)

    def _setup_timeout(self, stream: ClientStream) -> None:
        if stream is self.stream and self.state is not ClientState.STARTED:
            stream.setup_timer = None
            self._failed(stream, f"no answer from {self._server_text()}", False, NO_ANSWER)
            stream.close()

    # --- StreamOwner -------------------------------------------------------------------------

    def stream_established(self, stream: ClientStream) -> None:
        if stream is not self.stream:
            return
        self.resume_token = stream.resume_token
        assert stream.proto is not None
        self.log.info(
            "session {sid} with {server} established",
            sid=f"{stream.session_id or 0:#010x}",
            server=stream.proto.peer,
        )
        peer = stream.proto.transport.getPeer() if stream.proto.transport else None
        self.server_ip = peer_address(peer)
        # back-pressure: while the stream's transport is full, stop reading the TUN
        stream.proto.on_pause.append(self.tunnel.pause_reading)
        stream.proto.on_resume.append(self.tunnel.resume_reading)

    # --- choosing among servers -------------------------------------------------------------

    def _max_unit_price(self) -> int | None:
        return self.config.wallet.max_unit_price if self.billing is not None else None

    def _candidates(self) -> list[Candidate]:
        pool = self.servers.candidates(self.reactor.seconds(), self._max_unit_price())
        if not self.config.client.learn_servers:
            pool = [c for c in pool if c.expires is None]
        return pool

    def _ranked(self, lost: str | None = None) -> list[Candidate]:
        ranked = self.servers.choose(
            self.reactor.seconds(), self._max_unit_price(), self.rtts, lost
        )
        if not self.config.client.learn_servers:
            ranked = [c for c in ranked if c.expires is None]
        return ranked

    def _fail_over(self) -> bool:
        """The reconnect budget is spent: switch to the next server, if there is one.

        The reconnect that follows first routes the new server around the tunnel (its routes
        stay while the link is lost with the kill switch, and come back once the new server
        answers). That route needs the server's address: with the kill switch, a server named
        by a host name is skipped, since looking it up would go into the tunnel."""
        lost = self._server_text()
        ranked = self._ranked(lost)
        if self.config.client.kill_switch:
            ranked = [c for c in ranked if _ip_literal(c.host) is not None]
        if not ranked or ranked[0].endpoint == lost:
            return False
        nxt = ranked[0]
        try:
            tls = self._client_tls(nxt.host, nxt.server_key)
        except (TLSConfigError, StartupError) as e:
            self.log.warn("cannot move to {server}: {why}", server=nxt.endpoint, why=str(e))
            return False
        if self.machine.can(ClientInput.FAIL_OVER):
            self.machine.fire(ClientInput.FAIL_OVER)
        self.fail_overs += 1
        self.log.warn(
            "moving to server {server}: {lost} did not answer {n} reconnect(s)",
            server=nxt.endpoint,
            lost=lost,
            n=self._lost_attempts,
        )
        self.host, self.port, self._tls = nxt.host, nxt.port, tls
        self._server_key = nxt.server_key
        self.resume_token = b""  # the lost server's: the next one has never seen it
        self._lost_attempts = 0
        self.backoff.reset()
        return True

    def _ask_orders(self, stream: ClientStream) -> None:
        if (
            self.config.client.learn_servers
            and self.billing is not None
            and self.billing.order is not None
        ):
            stream.send_service(PacketType.ORDERS_REQUEST, b"")

    def _orders(self, data: memoryview) -> None:
        if self.billing is None or self.billing.order is None:
            return
        try:
            orders = OrderList.decode(data).orders
        except DecodeError as e:
            self.log.warn("unreadable ORDERS from the server: {why}", why=str(e))
            return
        dropped = self.servers.learn(self.billing.order.provider, orders)
        for why in dropped:
            self.log.warn("an offer from the server was not taken: {why}", why=why)
        try:
            self.servers.save()
        except OSError as e:
            self.log.warn("cannot keep the offers in state_dir: {why}", why=str(e))
        self.log.info(
            "the provider offers {n} server(s): {servers}",
            n=len(self.servers.learned),
            servers=", ".join(c.endpoint for c in self.servers.learned) or "none",
        )

    def make_request(self, stream: ClientStream) -> Request | None:
        if self.billing is not None:
            return self.billing.make_request(stream)
        return Request()

    def service_packet(self, stream: ClientStream, ptype: int, data: memoryview) -> bool:
        if ptype == PacketType.ORDERS:
            self._orders(data)
            return True
        return self.billing is not None and bool(self.billing.service_packet(stream, ptype, data))

    def proxy_packet(self, stream: ClientStream, packet: vpn.VpnPacket) -> None:
        if self.socks is not None:
            self.socks.packet(packet)

    def stream_address(self, stream: ClientStream, reply: vpn.AddrReply) -> None:
        if stream is not self.stream:
            return
        self._step(
            stream, StartStep.TUNNEL, f"setting up {reply.client} on the TUN, routes and DNS"
        )
        d = self._serial(lambda: self._bring_up(stream, reply))
        d.addErrback(self._bring_up_failed, stream)

    async def _bring_up(self, stream: ClientStream, reply: vpn.AddrReply) -> None:
        if self.server_ip is None:
            # the routes must keep the server reachable, and only the connection knows which
            # address it reached (a name may have several); a lookup here would block
            raise NetConfigError(
                f"the stream to {self._server_text()} has no IP address as its peer, so no "
                "route can keep the server reachable"
            )
        c = self.config.client
        await self.tunnel.setup(
            reply,
            self.server_ip,
            c.default_route,
            list(c.dns),
            offload=stream.offload,
            widest_prefix=c.widest_overlay_prefix,
            include=c.routes,
            exclude=c.exclude,
            accept_routes=c.accept_routes,
        )
        facts = self._tunnel_facts(stream)
        if facts is not None:
            if self.up_facts is not None and self.up_facts["address"] != facts["address"]:
                await self._tunnel_down("a new address")
            if self.up_facts is None:
                # the server has answered; the hook has a deadline of its own
                self._cancel(stream.setup_timer)
                stream.setup_timer = None
                if self.config.client.up is not None:
                    self._step(
                        stream, StartStep.UP_HOOK, f"running the up hook {self.config.client.up}"
                    )
                result = await self._tunnel_up(facts)
                if result is not None and not result.ok and self.config.client.up_required:
                    raise HookFailedError(result)
        self._up(stream, f"address {reply.client} on {self.tunnel.name}")

    def stream_granted(self, stream: ClientStream) -> None:
        """``vpn = false``: the grant alone is enough, there is no address and no TUN."""
        self._up(stream, "no tunnel (vpn = false)")

    def _up(self, stream: ClientStream, what: str) -> None:
        """The stream carries the service: STARTED, and start() answers 0."""
        if stream is not self.stream or self.state not in (
            ClientState.STARTING,
            ClientState.CONN_LOST,
        ):
            return
        self._cancel(stream.setup_timer)
        stream.setup_timer = None
        self.backoff.reset()
        self._step(stream, StartStep.UP, f"up: {what}")
        if self.state is ClientState.CONN_LOST:
            self.reconnects += 1
        self._lost_attempts = 0
        self.sessions_established += 1
        self.last_error = None
        self.machine.fire(ClientInput.UP)
        self._ask_orders(stream)
        self.log.info(
            "VPN up: session {sid} with {server}, {what}",
            sid=f"{stream.session_id or 0:#010x}",
            server=self._server_text(),
            what=what,
        )
        self._resolve_start(STARTED_OK)

    def _bring_up_failed(self, failure: Failure, stream: ClientStream) -> None:
        if failure.check(AddressRefusedError):
            # a refusal like the server's own: the host is untouched, retry with back-off
            refused = failure.value
            assert isinstance(refused, AddressRefusedError)
            offer = refused.offer
            why = f"refused the server's address offer: {refused.refusal}"
            self.log.warn(
                "refused ADDR_REPLY from {server} (address {address} netmask {netmask}"
                " gateway {gateway}): {reason}",
                server=self._server_text(),
                address=str(offer.address),
                netmask=str(offer.netmask) if offer.netmask is not None else "none",
                gateway=str(offer.gateway),
                reason=str(refused.refusal),
            )
            self._failed(stream, why, False, CANNOT_CONNECT)
            stream.close(CloseCode.REFUSED, why)
            return
        if failure.check(HookFailedError):
            # up_required: an operator's check said no; trying again would say the same
            why = failure.getErrorMessage()
        elif failure.check(NetConfigError, TunError, OSError):
            why = f"cannot set up the tunnel: {failure.getErrorMessage()}"
        else:
            self.log.failure("setting up the tunnel failed", failure)
            why = f"cannot set up the tunnel: {failure.getErrorMessage()}"
        self._failed(stream, why, True, BAD_PARAMETERS)
        stream.close()

    def stream_packet(self, packet: memoryview) -> None:
        self.tunnel.write(packet)

    def stream_packet_gso(self, header_and_packet: memoryview) -> None:
        self.tunnel.write_gso(header_and_packet)

    def _tun_packets(self, batch: list[bytes]) -> None:
        stream = self.stream
        if stream is None or self.state is not ClientState.STARTED:
            self.dropped_not_connected += len(batch)
            return
        if self.tunnel.vnet:
            stream.send_vnet_packets(batch)
        else:
            stream.send_packets(batch)

    def stream_refused(self, stream: ClientStream, why: str, permanent: bool) -> None:
        if stream is not self.stream:
            return
        # a server that answers and refuses (for now) is not a lost one: no move for it
        self._failed(stream, why, permanent, CANNOT_CONNECT, lost=False)
        stream.close()

    def stream_lost(self, stream: ClientStream, why: str, permanent: bool) -> None:
        if stream is not self.stream:
            return
        self._failed(stream, why, permanent, CANNOT_CONNECT)

    def _failed(
        self, stream: ClientStream, why: str, permanent: bool, code: int, lost: bool = True
    ) -> None:
        """This stream will not (or no longer) carry the VPN: retry, wait, move to the next
        server (``lost``: the server did not answer, and the reconnect budget is spent), or
        give up."""
        if stream is not self.stream:
            return
        self._cancel(stream.setup_timer)
        stream.setup_timer = None
        self._step(stream, StartStep.FAILED, f"failed: {why}")
        self.stream = None
        if self.billing is not None:
            self.billing.session_ended(stream)
        if self.billing is not None and self.billing.permanent:
            why, permanent = str(self.billing.stopped), True
        self.last_error = why
        self.tunnel.resume_reading()  # nothing to wait for: packets are counted and dropped
        if self.socks is not None:
            self.socks.link_lost()
        state = self.state
        if state is ClientState.STARTING:
            self.log.error("cannot start: {why}", why=why)
            self.machine.fire(ClientInput.START_FAILED)
            self._resolve_start(code)
            if self._keep_trying and not permanent:
                self._lost_attempts += lost
                if self._lost_attempts >= self.config.client.reconnect_budget:
                    self._fail_over()  # the first server never answered: the next one
                self._schedule(self._restart)
            else:
                self._serial(lambda: self._teardown(f"cannot start: {why}")).addErrback(
                    self._teardown_failed
                )
        elif state in (ClientState.STARTED, ClientState.CONN_LOST):
            if state is ClientState.STARTED:
                self.machine.fire(ClientInput.LINK_LOST)
                self.log.warn("connection lost: {why}", why=why)
                kill = self.config.client.kill_switch
                self._serial(lambda: self._link_lost(kill, why)).addErrback(self._teardown_failed)
            else:
                self.log.info("reconnect failed: {why}", why=why)
                self._lost_attempts += lost
            if self.config.client.reconnect and not permanent:
                if self._lost_attempts >= self.config.client.reconnect_budget:
                    self._fail_over()
                self._schedule(self._reconnect)
            else:
                self.log.error("giving up: {why}", why=why)
                self.machine.fire(ClientInput.STOP)
                self._serial(lambda: self._teardown(f"giving up: {why}")).addErrback(
                    self._teardown_failed
                )

    def _reconnect(self) -> None:
        """Connect again, after the host route to the server is checked: a roam may have
        taken it with its gateway, and with the kill switch the tunnel's routes would then
        carry the connection to the server into the client's own TUN."""

        def connect(_: object) -> None:
            if self.state is ClientState.CONN_LOST and self.stream is None:
                self._connect()

        target = _ip_literal(self.host) if self.host else None
        d = self._serial(lambda: self.tunnel.refresh_carrier(target))
        d.addErrback(
            lambda f: self.log.warn(
                "cannot plan the route to the server again: {why}", why=f.getErrorMessage()
            )
        )
        d.addCallback(connect)

    def _restart(self) -> None:
        if self.state is ClientState.STOPPED and self.host and self.port:
            self.start(self.host, self.port, keep_trying=True)

    def _schedule(self, what: Any) -> None:
        delay = self.backoff.next()
        self.log.info("next attempt in {delay:.1f} s", delay=delay)
        self.steps.step(StartStep.RETRY, f"next attempt in {delay:.1f} s")
        self._retry = self.reactor.callLater(delay, self._retry_now, what)

    def _retry_in(self) -> float | None:
        retry = self._retry
        if retry is None or not retry.active():
            return None
        left: float = retry.getTime() - self.reactor.seconds()
        return round(max(0.0, left), 1)

    def _retry_now(self, what: Any) -> None:
        self._retry = None
        what()

    def _resolve_start(self, code: int) -> None:
        waiters, self._start_waiters = self._start_waiters, []
        for d in waiters:
            d.callback(code)

    def _serial(self, work: Any) -> defer.Deferred[Any]:
        """Run tunnel changes one after another, never two at once."""
        previous = self._busy

        async def run() -> Any:
            if previous is not None:
                with contextlib.suppress(Exception):
                    await previous
            return await work()

        d: defer.Deferred[Any] = defer.Deferred.fromCoroutine(run())
        self._busy = d
        return d

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()


def _code(_: object, code: int) -> int:
    return code


def peer_address(peer: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address of a transport's peer (an IPv4-mapped one as IPv4, without a zone),
    or None when the peer has none."""
    host = getattr(peer, "host", None)
    if not isinstance(host, str):
        return None
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an IP address, or None for a host name."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
