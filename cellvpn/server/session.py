"""One client's session on the server: the application on top of its stream.

It answers the setup, grants the service on 'R', leases an address and carries packets on 'S',
and keeps the per-session facts that ``vpn_stat`` reports.
"""

from __future__ import annotations

import ipaddress
import secrets
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from cellvpn.config.schema import ClientAccess
from cellvpn.conn.protocol import StreamApplication, StreamProtocol
from cellvpn.conn.tls import (
    client_certificate_problem,
    describe_tls_failure,
    peer_certificate,
    peer_fingerprint,
)
from cellvpn.device.counters import SessionCounters
from cellvpn.device.pump import UpPump
from cellvpn.ratelimit import TokenBucket
from cellvpn.server.billing import UNMETERED, Bill
from cellvpn.server.check import answer_check, check_data_limit
from cellvpn.server.edge import Refusal
from cellvpn.server.usage import ACTIVE, UsageInput, new_usage
from cellvpn.stream import caps
from cellvpn.stream.connection import Closed, Established, HelloReceived
from cellvpn.wire import vpn
from cellvpn.wire.channel import CHANNEL_R, CHANNEL_S
from cellvpn.wire.errors import DecodeError
from cellvpn.wire.service import (
    CheckPacket,
    Error,
    ErrorCode,
    OrderList,
    PacketType,
    Request,
    Success,
)
from cellvpn.wire.setup import CloseCode

if TYPE_CHECKING:
    from cellvpn.billing.records import SignedOrder
    from cellvpn.server.sessionhost import SessionHost

_PONG = vpn.VpnPacket(vpn.OpCode.PONG).encode()

_VPN_HEADER_FIELDS = struct.Struct("<iIII")
_OP_VPN_RECV = vpn.OpCode.VPN_RECV
_OP_VPN_SEND = vpn.OpCode.VPN_SEND
_OP_VPN_RECV_GSO = vpn.OpCode.VPN_RECV_GSO
_OP_VPN_SEND_GSO = vpn.OpCode.VPN_SEND_GSO
_PKT_DATA = vpn.PKT_TYPE_DATA
#: ORDERS requests one session may make (each answered from memory, never a ledger query)
ORDERS_PER_SESSION = 16


class ServerSession(StreamApplication):
    """The server side of one stream."""

    log = Logger()

    def __init__(self, server: SessionHost) -> None:
        self.server = server
        self.proto: StreamProtocol | None = None
        self.peer = "unknown peer"
        self.session_id: int | None = None
        self.identity: str | None = None
        #: the enrolled client's name and certificate serial (None: it presented none)
        self.client_name: str | None = None
        self.client_serial: str | None = None
        #: the client key that ``sessions_per_key`` counts: the wallet key once billing proved
        #: it, else the client certificate (None: an anonymous client, not counted)
        self.key: str | None = None
        #: this session counts towards its key's sessions (it passed the check)
        self.counted = False
        self.resume_token = b""
        self.started_at = time.time()
        self.established_at: float | None = None
        self.ended_at: float | None = None
        self.close_reason: str | None = None
        self.usage = new_usage()
        self.usage.observe(lambda old, event, new: self.update_passing())
        #: 'S' carries this session's packets: it has an address and an active usage (kept
        #: up to date here so the packet path reads one attribute)
        self.passing = False
        #: a REQUEST came on this session (there is one per session)
        self.requested = False
        #: the service was granted at some point: its end is always logged
        self.served = False
        #: when it was granted (the service's clock), for the usage report
        self.granted_at: float | None = None
        #: traffic waits (both ways) for the ledger: credit used up, or grace bytes spent
        self.held = False
        #: VPN_SEND packets of the current read, forwarded together at its end
        self._inbox: list[memoryview] = []
        self.usage_id = 0
        self.address: ipaddress.IPv4Address | None = None
        self.addr_key = b""
        #: the paired IPv6 address, when the pool has one and the client agreed to ipv6
        self.address6: ipaddress.IPv6Address | None = None
        self.addr6_key = b""
        self.counters = SessionCounters()
        #: both ends agreed to carry super-packets (VPN_SEND_GSO / VPN_RECV_GSO)
        self.offload = False
        #: the rate limits of [srv_vpn] as byte buckets (None: no limit that way)
        v = server.config.srv_vpn
        now = server.reactor.seconds()
        self.rate_up = TokenBucket(v.rate_up / 8, v.rate_burst, now) if v.rate_up else None
        self.rate_down = TokenBucket(v.rate_down / 8, v.rate_burst, now) if v.rate_down else None
        #: bytes queued towards the client while its transport was full
        self.backlog = 0
        #: the session's billing state (None: free service or no REQUEST yet)
        self.bill: Bill | None = None
        #: the order WELCOME offered (billing on): REQUEST must name it
        self.order_offered: SignedOrder | None = None
        #: IP bytes the forwarder may still carry before billing must look (B units)
        self.allowance = UNMETERED
        self.pings = 0
        self.proxy: Any = None
        #: the source prefix the edge counts this connection under (None: not admitted there)
        self.source: str | None = None
        self._handshaking = True
        #: the TLS handshake deadline, then the REQUEST deadline
        self._deadline: Any = None
        #: CHECK bytes (asked and answered) this session may still use, and their rate
        edge = server.config.edge
        self.check_left = edge.check_budget
        #: ORDERS requests this session may still make
        self.orders_left = ORDERS_PER_SESSION
        self._checks = TokenBucket(
            edge.check_rate, max(1.0, edge.check_rate), server.reactor.seconds()
        )
        #: a DEPOSIT_CREATE came before REQUEST (one is all a client needs)
        self.deposit_created = False
        #: StreamConnection.send_channel, bound once the stream is set up
        self._send: Callable[..., None] | None = None
        #: the stream's data path (``StreamConnection.send_data_packets``)
        self._send_data: Callable[..., int] | None = None

    # --- StreamApplication -----------------------------------------------------------------

    def stream_connected(self, proto: StreamProtocol) -> None:
        self.proto = proto
        self.peer = proto.peer
        proto.on_resume.append(self._drained)
        if proto.handshake_done:
            self.handshake_completed(proto)
        else:
            timeout = self.server.config.edge.handshake_timeout
            self._deadline = self.server.reactor.callLater(timeout, self._no_handshake, timeout)

    def handshake_completed(self, proto: StreamProtocol) -> None:
        self._cancel_deadline()
        self._handshake_over()

    def _handshake_over(self) -> None:
        if self._handshaking:
            self._handshaking = False
            if self.source is not None:
                self.server.admission.handshake_done(self.source)

    def _no_handshake(self, timeout: float) -> None:
        self._deadline = None
        self.server.refusal(
            Refusal.HANDSHAKE_TIMEOUT, None, f"{self.peer}: no TLS handshake within {timeout:g} s"
        )
        self.close_reason = "TLS handshake timed out"
        if self.proto is not None:
            self.proto.lost_cause()

    def _no_request(self, timeout: float) -> None:
        self._deadline = None
        if self.requested:
            return
        self.server.refusal(Refusal.REQUEST_TIMEOUT, self, f"no REQUEST within {timeout:g} s")
        self.close(CloseCode.REFUSED, f"no REQUEST within {timeout:g} s of WELCOME")

    def _request_deadline(self) -> None:
        """(Re)start the wait for REQUEST: at WELCOME, and after each CHECK answered."""
        self._cancel_deadline()
        timeout = self.server.config.edge.request_timeout
        self._deadline = self.server.reactor.callLater(timeout, self._no_request, timeout)

    def _cancel_deadline(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def output_overflow(self, proto: StreamProtocol, backlog: int) -> None:
        self.server.refusal(
            Refusal.OUTPUT_LIMIT, self, f"{backlog} bytes unsent: the client does not read"
        )
        self.close_reason = f"cut off with {backlog} bytes unsent (the client does not read)"

    def hello_received(self, proto: StreamProtocol, event: HelloReceived) -> None:
        if proto.conn.closed is not None:
            return  # what came after HELLO in the same read ended the stream already
        server = self.server
        if not server.accepting:
            proto.close(CloseCode.SHUTDOWN, "server is shutting down")
            return
        verdict = server.enrollment.judge(peer_certificate(proto.transport))
        if verdict.refused is not None:
            server.refusal(Refusal.REVOKED, None, f"{self.peer} refused: {verdict.refused}")
            self.close_reason = verdict.refused
            proto.close(CloseCode.REFUSED, verdict.refused)
            return
        self.client_name, self.client_serial = verdict.name, verdict.serial
        self.identity, self.resume_token = self._identify(proto, event.hello.resume_token)
        if self.identity.startswith("tls:"):
            self.key = self.identity
        sid = server.sessions.new_id()
        self.session_id = sid
        conn = proto.conn
        conn.register_channel(CHANNEL_R, self._on_service_packet)
        conn.register_channel(CHANNEL_S, self._on_vpn_packet)
        order = server.billing.welcome_order(self) if server.billing is not None else b""
        conn.accept(sid, resume_token=self.resume_token, order=order)
        self.offload = caps.OFFLOAD in conn.caps
        self._send = conn.send_channel
        self._send_data = conn.send_data_packets
        pump_up = conn.fastpath.pump_up
        if pump_up is not None:
            conn.pump = UpPump(
                self, server.forwarder, pump_up, CHANNEL_S, _OP_VPN_SEND, _OP_VPN_SEND_GSO,
                conn.settings.max_payload,
            )  # fmt: skip
        server.sessions.add(sid, self)
        self.established_at = time.time()
        self._request_deadline()
        if not server.session_lines.allow():
            return
        self.log.info(
            "session {sid} with {peer}{client} established (channels {channels}, "
            "capabilities {caps})",
            sid=f"{sid:#010x}",
            peer=self.peer,
            client=f" (client {self.client_name})" if self.client_name else "",
            channels=event.hello.channels,
            caps=",".join(sorted(event.caps)) or "none",
        )

    def _identify(self, proto: StreamProtocol, token: bytes) -> tuple[str, bytes]:
        """Who the client is, for sticky leases: its certificate, else its resume token."""
        fingerprint = peer_fingerprint(proto.transport)
        if not token or len(token) != 16:
            token = secrets.token_bytes(16)
        if fingerprint is not None:
            return f"tls:{fingerprint}", token
        return f"token:{token.hex()}", token

    def established(self, proto: StreamProtocol, event: Established) -> None:
        raise AssertionError("a server stream is never established by a WELCOME")

    def stream_closed(self, proto: StreamProtocol, event: Closed) -> None:
        if not event.by_peer and event.code == CloseCode.PROTOCOL_ERROR:
            kind = Refusal(event.cause) if event.cause else Refusal.PROTOCOL_ERROR
            if self.session_id is None:
                self.server.refusal(kind, None, f"{self.peer}: {event.reason}")
            else:
                self.server.refusal(kind, self, event.reason)
        who = "client" if event.by_peer else "server"
        reason = f": {event.reason}" if event.reason else ""
        self.close_reason = f"{who} closed the stream ({event.code_name}){reason}"

    def connection_lost(self, proto: StreamProtocol, reason: Failure) -> None:
        self.ended_at = time.time()
        self._cancel_deadline()
        if self.source is not None:
            self.server.admission.closed(self.source, self._handshaking)
            self.source = None
        if self.session_id is None:
            if self.close_reason is None:
                # counted, not logged each: anyone can open connections that go nowhere
                why = describe_tls_failure(reason)
                kind = Refusal.TLS_FAILED if not proto.handshake_done else Refusal.PROTOCOL_ERROR
                text = f"connection from {self.peer} ended before session setup: {why}"
                enrolled = not_enrolled(why, client_certificate_problem(proto.transport))
                if enrolled is not None:
                    kind, text = Refusal.NOT_ENROLLED, f"connection from {self.peer} {enrolled}"
                self.server.refusal(kind, None, text)
            return
        self.server.session_ended(self)
        if not self.served and not self.server.session_lines.allow():
            return
        self.log.info(
            "session {sid} with {peer} ended: {why}",
            sid=f"{self.session_id:#010x}",
            peer=self.peer,
            why=self.close_reason or describe_tls_failure(reason),
        )

    def update_passing(self) -> None:
        self.passing = bool(self.addr_key) and self.usage.state in ACTIVE and not self.held

    def hold(self, held: bool) -> None:
        """Stop (or let go again) every packet both ways while billing waits."""
        self.held = held
        self.update_passing()

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    def allowance_used(self) -> None:
        """The forwarder carried the allowance: billing accounts for it and sets the next."""
        billing = self.server.billing
        if billing is not None:
            billing.allowance_used(self)
        else:
            self.allowance = UNMETERED

    def carried(self) -> int:
        """Bytes the session carried both ways, IP and L4 proxy, as usage counts them."""
        c = self.counters
        return (
            c.from_client_bytes
            + c.to_client_bytes
            + c.proxy_from_client_bytes
            + c.proxy_to_client_bytes
        )

    def charge(self, size: int) -> None:
        """Bytes carried outside the forwarder (the L4 proxy), billed like IP bytes."""
        self.allowance -= size
        if self.allowance <= 0:
            self.allowance_used()

    def close(self, code: int, reason: str) -> None:
        if self.proto is not None:
            self.proto.close(code, reason)

    def input_done(self) -> None:
        """The stream processed one read: forward the packets it brought, as one batch."""
        inbox = self._inbox
        if inbox:
            self._inbox = []
            if self.passing:
                self.server.forwarder.from_client_batch(self, list(inbox))

    # --- the forwarder's Peer ---------------------------------------------------------------

    def deliver(self, packet: bytes | memoryview) -> bool:
        return self._queue(_OP_VPN_RECV, packet)

    def deliver_gso(self, header_and_packet: bytes | memoryview) -> bool:
        return self._queue(_OP_VPN_RECV_GSO, header_and_packet)

    def _queue(self, op: int, packet: bytes | memoryview) -> bool:
        send = self._send
        if send is None or self.held:
            return False
        proto = self.proto
        if proto is not None and proto.paused:
            # the client reads slower than the TUN fills: queue a little, then drop (as a
            # full NIC queue would), so one slow client cannot make the server buffer forever
            self.backlog += len(packet)
            if self.backlog > QUEUE_CAP:
                self.counters.dropped_queue_full += 1
                self.counters.to_client_lost_bytes += len(packet)
                return False
        send_data = self._send_data
        assert send_data is not None  # set with _send
        send_data(CHANNEL_S, _PKT_DATA, op, self.usage_id, (packet,))
        return True

    def _drained(self) -> None:
        self.backlog = 0

    def flush(self) -> None:
        if self.proto is not None:
            self.proto.flush()

    # --- 'R': service ----------------------------------------------------------------------

    def send_service(self, ptype: int, body: bytes) -> None:
        """One 'R' packet, written at once: billing answers from ledger callbacks, outside
        any dataReceived that would flush it."""
        if self.proto is not None:
            self.proto.conn.send_channel(CHANNEL_R, ptype, body)
            self.proto.flush()

    def _on_service_packet(self, ptype: int, data: memoryview) -> None:
        assert self.proto is not None
        try:
            if ptype == PacketType.REQUEST:
                self._on_request(Request.decode(data))
            elif ptype == PacketType.CHECK_REQUEST:
                self._on_check(CheckPacket.decode(data))
            elif ptype == PacketType.ORDERS_REQUEST:
                self._on_orders(data)
            else:
                billing = self.server.billing
                if billing is None or not billing.service_packet(self, ptype, data):
                    self.proto.close(
                        CloseCode.PROTOCOL_ERROR, f"unexpected 'R' packet type 0x{ptype:02x}"
                    )
        except DecodeError as e:
            self.proto.close(CloseCode.PROTOCOL_ERROR, f"malformed 'R' packet 0x{ptype:02x}: {e}")

    def _on_check(self, request: CheckPacket) -> None:
        """Answer a CHECK within the session's budget and rate; past either, close."""
        assert self.proto is not None
        cost = len(request.data) + request.data_size_recv
        if cost > self.check_left or not self._checks.take(self.server.reactor.seconds()):
            why = "CHECK budget spent" if cost > self.check_left else "CHECKs too fast"
            self.server.refusal(Refusal.CHECK_BUDGET, self, why)
            self.close(CloseCode.REFUSED, why)
            return
        self.check_left -= cost
        host = getattr(self.proto.transport.getPeer(), "host", "")  # type: ignore[union-attr]
        conn = self.proto.conn
        hello = conn.peer_hello
        limit = check_data_limit(hello.max_frame if hello else 0, conn.settings.max_payload)
        answer = answer_check(request, host, time.time_ns(), limit)
        self.server.checks.answered(request, answer)
        self.send_service(PacketType.CHECK_RESPONSE, answer.encode())
        if not self.requested:
            self._request_deadline()  # a check in progress is activity

    def _on_orders(self, data: memoryview) -> None:
        """The provider's available offers, from memory, to an authenticated client: one with
        an enrolled certificate, or one whose key its REQUEST proved; a few times a session."""
        if len(data) != 0:
            raise DecodeError(f"ORDERS_REQUEST is empty, got {len(data)} bytes")
        enrolled = self.server.config.tls.clients is ClientAccess.ENROLLED
        if not (enrolled or self.served):
            self.close(CloseCode.REFUSED, "orders are for authenticated clients")
            return
        if self.orders_left <= 0:
            self.close(CloseCode.REFUSED, "too many ORDERS requests on one session")
            return
        self.orders_left -= 1
        board = self.server.offers
        orders = board.available(self.server.reactor.seconds()) if board is not None else []
        self.send_service(PacketType.ORDERS, OrderList.fitting(orders).encode())

    def _on_request(self, request: Request) -> None:
        if self.requested:
            # one bill per session: a second REQUEST would replace the paid bill with an
            # unpaid one (and leave the first one's timers running)
            self.server.refusal(Refusal.DUPLICATE_REQUEST, self, "a second REQUEST on one session")
            self.refuse(ErrorCode.CANT_ADD_USAGE, "a second REQUEST on this session")
            self.close(CloseCode.REFUSED, "a second REQUEST on one session")
            return
        self.requested = True
        self._cancel_deadline()
        self.usage_id = secrets.randbits(32) or 1
        if not self.server.config.srv_vpn.enabled:
            self.refuse(ErrorCode.SERVICE_NOT_FOUND, "the VPN service is not enabled here")
            return
        billing = self.server.billing
        if billing is not None:
            billing.request(self, request)
            return
        if not self.server.config.srv_vpn.allow_free_srv:
            self.refuse(ErrorCode.FREE_IS_NOT_ALLOWED, "free service is not allowed here")
            return
        if not self.admit_key():
            return
        self.grant(UsageInput.GRANT_FREE)

    def admit_key(self) -> bool:
        """Count this session for its key, or refuse it (ERROR, then close) past
        ``sessions_per_key``; True when it may go on."""
        why = self.server.key_limit(self)
        if why is None:
            self.counted = True
            return True
        self.server.refusal(Refusal.SESSIONS_PER_KEY, self, why)
        self.refuse(ErrorCode.TOO_MANY_SESSIONS, why)
        self.flush()
        self.server.reactor.callLater(
            0.5, self.close, CloseCode.REFUSED, f"TOO_MANY_SESSIONS: {why}"
        )
        return False

    def grant(self, how: UsageInput) -> None:
        """Activate the usage and tell the client (SUCCESS)."""
        self.usage.fire(how)
        self.served = True
        if self.granted_at is None:
            self.granted_at = self.server.reactor.seconds()
        self.send_service(PacketType.SUCCESS, Success(self.usage_id).encode())
        self.log.info(
            "session {sid}: service granted ({state}), usage {usage}",
            sid=f"{self.session_id or 0:#010x}",
            state=self.usage.state.name,
            usage=f"{self.usage_id:#010x}",
        )

    def end_usage(self, how: UsageInput) -> None:
        """The usage ends (refused, or stopped at zero): not one more packet either way, and
        the proxy lets go of the session's connections. The one place a usage ends."""
        if self.usage.can(how):
            self.usage.fire(how)
        self.server.forwarder_detach(self)
        if self.server.proxy is not None:
            self.server.proxy.usage_ended(self)

    def refuse(self, code: int, why: str) -> None:
        """Refuse or end the usage with ERROR (always the 24-byte body)."""
        self.end_usage(UsageInput.REFUSE)
        self.send_service(PacketType.ERROR, Error(code, self.usage_id).encode())
        self.log.info(
            "session {sid} with {peer}: service refused ({code}): {why}",
            sid=f"{self.session_id or 0:#010x}",
            peer=self.peer,
            code=Error(code).name,
            why=why,
        )

    @property
    def active(self) -> bool:
        return self.usage.state in ACTIVE

    # --- 'S': VPN ----------------------------------------------------------------------------

    def _on_vpn_packet(self, ptype: int, data: memoryview) -> None:
        if len(data) < 20:
            self.counters.dropped_malformed += 1
            return
        _sock, op, _usage, size = _VPN_HEADER_FIELDS.unpack_from(data)
        if op == _OP_VPN_SEND:
            if size != len(data) - 20:
                self.counters.dropped_malformed += 1
                self.counters.from_client_lost_bytes += len(data) - 20
            elif self.passing:
                self._inbox.append(data[20:])  # written by input_done, with its neighbours
            else:
                self.counters.dropped_not_active += 1
                self.counters.from_client_lost_bytes += size
            return
        if op == _OP_VPN_SEND_GSO:
            if size != len(data) - 20 or not self.offload:
                self.counters.dropped_bad_offload += 1
                self.counters.from_client_lost_bytes += len(data) - 20
            elif self.passing:
                if self._inbox:
                    self.input_done()  # what came before it goes first: order is kept
                self.server.forwarder.from_client_gso(self, data[20:])
            else:
                self.counters.dropped_not_active += 1
                self.counters.from_client_lost_bytes += size
            return
        try:
            packet = vpn.VpnPacket.decode(data)
        except DecodeError:
            self.counters.dropped_malformed += 1
            return
        if op == vpn.OpCode.PING:
            if not self.active:
                # a PONG for anyone who asks would be an echo service before payment
                self.counters.dropped_not_active += 1
                self.server.refusal(Refusal.PING, self, "PING without a granted usage")
                return
            self.pings += 1
            if self._send is not None:
                self._send(CHANNEL_S, vpn.PKT_TYPE_PONG, _PONG)
        elif op == vpn.OpCode.PONG:
            pass
        elif not self.active:
            self.counters.dropped_not_active += 1
        elif op == vpn.OpCode.VPN_ADDR_REQUEST:
            self._on_addr_request()
        elif op in _PROXY_OPS and self.server.proxy is not None:
            self.server.proxy.packet(self, packet)
        else:
            self.counters.dropped_malformed += 1

    def send_problem(self, code: int, sock_id: int = 0) -> None:
        if self._send is not None:
            problem = vpn.VpnPacket(
                vpn.OpCode.PROBLEM, code=code, usage_id=self.usage_id, sock_id=sock_id
            )
            self._send(CHANNEL_S, _PKT_DATA, problem.encode())

    def send_vpn(self, packet: vpn.VpnPacket) -> None:
        if self._send is not None:
            self._send(CHANNEL_S, _PKT_DATA, packet.encode())

    def _on_addr_request(self) -> None:
        server = self.server
        if self.address is not None:
            self.send_problem(vpn.ProblemCode.ALREADY_ASSIGNED_ADDR)
            return
        if not server.tun_ready:
            self.send_problem(vpn.ProblemCode.TUNNEL_DOWN)
            return
        lease = server.lease_for(self)
        if lease is None:
            self.send_problem(vpn.ProblemCode.NO_FREE_ADDR)
            self.log.warn(
                "session {sid} with {peer}: no free address in {pool}",
                sid=f"{self.session_id or 0:#010x}",
                peer=self.peer,
                pool=str(server.network),
            )
            return
        self.address = lease.address
        self.addr_key = lease.address.packed
        agreed = self._caps()
        if lease.address6 is not None and caps.IPV6 in agreed and caps.ADDR_OPTIONS in agreed:
            self.address6 = lease.address6
            self.addr6_key = lease.address6.packed
        self.update_passing()
        reply = server.addr_reply(self.address, caps.ADDR_OPTIONS in agreed, self.address6)
        self.send_vpn(
            vpn.VpnPacket(vpn.OpCode.VPN_ADDR_REPLY, reply.encode(), usage_id=self.usage_id)
        )
        server.forwarder.attach(self)
        self.log.info(
            "session {sid} with {peer}: leased {addr}{how}",
            sid=f"{self.session_id or 0:#010x}",
            peer=self.peer,
            addr=str(self.address) + ("" if self.address6 is None else f" and {self.address6}"),
            how=" (again)" if lease.reused else "",
        )
        server.session_up(self)

    def _caps(self) -> frozenset[str]:
        return self.proto.conn.caps if self.proto is not None else frozenset()

    # --- reporting -------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        conn = self.proto.conn if self.proto else None
        stats = conn.stats if conn else None
        start = self.established_at or self.started_at
        end = self.ended_at or time.time()
        return {
            "session_id": self.session_id,
            "peer": self.peer,
            "identity": self.identity,
            "client": self.client_name,
            "client_serial": self.client_serial,
            "started_at": start,
            "length_seconds": end - start,
            "ended_at": self.ended_at,
            "client_addr": str(self.address) if self.address else None,
            "client_addr6": str(self.address6) if self.address6 else None,
            "usage_state": self.usage.state.name,
            "usage_id": self.usage_id,
            "counters": self.counters.as_dict(),
            "keepalives_sent": stats.keepalives_sent if stats else 0,
            "keepalives_received": stats.keepalives_received if stats else 0,
            "alives_received": stats.alives_received if stats else 0,
            "rtt_ms": None if not stats or stats.last_rtt is None else stats.last_rtt * 1000,
            "seq_replays": conn.seq.replays if conn else 0,
            "seq_gaps": conn.seq.gaps if conn else 0,
            "pings": self.pings,
            "billing": self.server.billing.describe(self) if self.server.billing else None,
        }


_ENROLL = "([tls] clients = enrolled; enroll it with cellvpn-ctl client add)"


def not_enrolled(why: str, problem: str | None = None) -> str | None:
    """The words for a handshake that failed because the client is not enrolled, or None.

    ``why`` is the handshake's failure, ``problem`` what the certificate check said of the
    client's certificate, if anything.
    """
    if problem is not None:
        return f"refused: {problem} {_ENROLL}"
    if "peer did not return a certificate" in why:
        return f"refused: it presented no client certificate {_ENROLL}"
    if "certificate verify failed" in why:
        return f"refused: its client certificate does not verify {_ENROLL}"
    return None


#: Bytes a session may queue beyond its transport's own buffer before packets are dropped.
QUEUE_CAP = 1024 * 1024

_PROXY_OPS = frozenset(
    {vpn.OpCode.CONNECT, vpn.OpCode.SEND, vpn.OpCode.DISCONNECT, vpn.OpCode.CONNECTED}
)
