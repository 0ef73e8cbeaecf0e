"""The client's side of one stream: the service request, the address, packets, PING/PONG.

Its owner (the client service) hears about each step through :class:`StreamOwner`; this object
only speaks the protocol.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from cellvpn.client.steps import StartStep
from cellvpn.conn.protocol import StreamApplication, StreamProtocol
from cellvpn.conn.tls import TLSVerificationError, describe_tls_failure
from cellvpn.device import vnet
from cellvpn.stream import caps
from cellvpn.stream.connection import Closed, Established, HelloReceived
from cellvpn.wire import vpn
from cellvpn.wire.channel import CHANNEL_R, CHANNEL_S
from cellvpn.wire.errors import DecodeError
from cellvpn.wire.service import TRANSIENT_ERRORS, Error, PacketType, Request, Success
from cellvpn.wire.setup import CloseCode

_PING = vpn.VpnPacket(vpn.OpCode.PING).encode()
_PONG = vpn.VpnPacket(vpn.OpCode.PONG).encode()
_ADDR_REQUEST = vpn.VpnPacket(vpn.OpCode.VPN_ADDR_REQUEST).encode()
_HEADER = struct.Struct("<iIII")
_DATA_HEADER = vpn.DATA_HEADER
_OP_RECV = vpn.OpCode.VPN_RECV
_OP_RECV_GSO = vpn.OpCode.VPN_RECV_GSO
_OP_SEND_GSO = vpn.OpCode.VPN_SEND_GSO
_OP_SEND = vpn.OpCode.VPN_SEND
_PKT_DATA = vpn.PKT_TYPE_DATA

#: The smallest segment size a super-packet from the server is counted as segments for: the
#: meter counts IP bytes, one header per segment, and a server that sent 1-byte segments would
#: make 100 bytes on the wire count as 2,500. Below it a super-packet counts as what came.
MIN_COUNTED_GSO = 536


def gso_counted(header: memoryview, packet: memoryview) -> tuple[int, int] | None:
    """(packets, IP bytes) the client's meter counts for a server's super-packet, or None when
    its header is not one the tunnel would write (checked before anything is counted)."""
    try:
        rebuilt = vnet.rebuild_header(header, packet, 65535)
    except vnet.OffloadError:
        return None
    if vnet.HEADER.unpack_from(rebuilt)[3] < MIN_COUNTED_GSO:
        return 1, len(packet)
    return vnet.ip_bytes(rebuilt, packet)


#: PINGs that may go unanswered before the link counts as lost (the original's 3).
MISSED_PONGS = 3
#: Seconds before ADDR_REQUEST is asked again after PROBLEM TUNNEL_DOWN.
ADDR_RETRY = 1.0

_PROXY_OPS = frozenset(
    {vpn.OpCode.CONNECTED, vpn.OpCode.RECV, vpn.OpCode.DISCONNECT, vpn.OpCode.PROBLEM}
)


class StreamOwner(Protocol):
    """What a ClientStream tells its owner."""

    def stream_established(self, stream: ClientStream) -> None: ...

    def stream_address(self, stream: ClientStream, reply: vpn.AddrReply) -> None: ...

    def stream_granted(self, stream: ClientStream) -> None:
        """The service is granted and no address was wanted (a SOCKS-only client)."""

    def stream_refused(self, stream: ClientStream, why: str, permanent: bool) -> None: ...

    def stream_lost(self, stream: ClientStream, why: str, permanent: bool) -> None: ...

    def stream_packet(self, packet: memoryview) -> None: ...

    def stream_packet_gso(self, header_and_packet: memoryview) -> None: ...

    def make_request(self, stream: ClientStream) -> Request | None: ...

    def service_packet(self, stream: ClientStream, ptype: int, data: memoryview) -> bool: ...

    def proxy_packet(self, stream: ClientStream, packet: vpn.VpnPacket) -> None: ...


class ClientStream(StreamApplication):
    """The application on one client stream."""

    log = Logger()

    def __init__(
        self,
        clock: Any,
        ping_interval: float,
        owner: StreamOwner,
        resume_token: bytes = b"",
        want_address: bool = True,
    ) -> None:
        self.clock = clock
        self.ping_interval = ping_interval
        self.owner = owner
        self.resume_token = resume_token
        #: Ask for an address (and a TUN) after the grant; False for a SOCKS-only client.
        self.want_address = want_address
        self.proto: StreamProtocol | None = None
        self.session_id: int | None = None
        self.usage_id = 0
        self.granted = False
        #: the server agreed to VPN_SEND_GSO / VPN_RECV_GSO
        self.offload = False
        self.addressed = False
        self.outstanding_pings = 0
        #: VPN_RECV_GSO refused before it was counted (offload not agreed, a bad header)
        self.dropped_bad_offload = 0
        self.pings_sent = 0
        self.pongs_received = 0
        self.ping_sent_at: float | None = None
        self.ping_rtt: float | None = None
        self.close_event: Closed | None = None
        self.setup_timer: IDelayedCall | None = None
        self.sent_packets = 0
        self.sent_bytes = 0
        self.received_packets = 0
        self.received_bytes = 0
        #: L4 proxy payload both ways (SEND and RECV), billed like IP bytes
        self.proxy_bytes = 0
        self._pinger: LoopingCall | None = None
        self._addr_retry: IDelayedCall | None = None
        self._lost_reported = False
        self._send: Any = None
        #: the stream's data path (``StreamConnection.send_data_packets``) while established
        self._send_data: Any = None
        #: told each step of the setup (TCP up, TLS up, WELCOME, SUCCESS), if set
        self.on_step: Callable[[StartStep], object] | None = None

    def _step(self, step: StartStep) -> None:
        if self.on_step is not None:
            self.on_step(step)

    # --- StreamApplication -----------------------------------------------------------------

    def stream_connected(self, proto: StreamProtocol) -> None:
        self.proto = proto
        self._step(StartStep.TLS)
        if proto.handshake_done:
            self.handshake_completed(proto)
        proto.conn.register_channel(CHANNEL_R, self._on_service_packet)
        proto.conn.register_channel(CHANNEL_S, self._on_vpn_packet)
        proto.conn.start(self.resume_token)

    def handshake_completed(self, proto: StreamProtocol) -> None:
        self._step(StartStep.SESSION)

    def hello_received(self, proto: StreamProtocol, event: HelloReceived) -> None:
        raise AssertionError("a client never receives HELLO")

    def established(self, proto: StreamProtocol, event: Established) -> None:
        self.session_id = event.welcome.session_id
        self.offload = caps.OFFLOAD in event.welcome.caps
        if event.welcome.resume_token:
            self.resume_token = event.welcome.resume_token
        self._send = proto.conn.send_channel
        self._send_data = proto.conn.send_data_packets
        pinger = LoopingCall(self._ping)
        pinger.clock = self.clock
        pinger.start(self.ping_interval, now=False)
        self._pinger = pinger
        self._step(StartStep.GRANT)
        self.owner.stream_established(self)
        request = self.owner.make_request(self)
        if request is not None:  # None: billing sends it later (a deposit is being made)
            self.send_service(PacketType.REQUEST, request.encode())

    def stream_closed(self, proto: StreamProtocol, event: Closed) -> None:
        self.close_event = event

    def connection_lost(self, proto: StreamProtocol, reason: Failure) -> None:
        self._stop_timers()
        self._send = None
        self._send_data = None
        if self._lost_reported:
            return
        self._lost_reported = True
        ev = self.close_event
        if ev is not None and (ev.by_peer or ev.code != CloseCode.NORMAL):
            who = "server" if ev.by_peer else "client"
            why = f"{who} closed the stream ({ev.code_name}): {ev.reason or 'no reason given'}"
        else:
            why = describe_tls_failure(reason)
        permanent = reason.check(TLSVerificationError) is not None or (
            ev is not None
            and ev.by_peer
            and ev.code
            in (
                CloseCode.VERSION_MISMATCH,
                CloseCode.CAPABILITY_MISMATCH,
                CloseCode.CHANNEL_UNSUPPORTED,
            )
        )
        self.owner.stream_lost(self, why, permanent)

    def _stop_timers(self) -> None:
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        for call in (self._addr_retry, self.setup_timer):
            if call is not None and call.active():
                call.cancel()

    # --- sending -----------------------------------------------------------------------------

    def send_service(self, ptype: int, body: bytes) -> None:
        if self._send is not None:
            self._send(CHANNEL_R, ptype, body)
            self.flush()

    @property
    def metered_bytes(self) -> int:
        """What the server bills in bytes: IP bytes both ways plus the proxy's payload."""
        return self.sent_bytes + self.received_bytes + self.proxy_bytes

    def send_vpn(self, packet: vpn.VpnPacket, flush: bool = True) -> None:
        if self._send is not None:
            if packet.op_code == vpn.OpCode.SEND:
                self.proxy_bytes += len(packet.data)
            self._send(CHANNEL_S, _PKT_DATA, packet.encode())
            if flush:
                self.flush()

    def send_packets(self, batch: list[bytes]) -> None:
        """TUN packets to the server as VPN_SEND, one transport write for the batch."""
        send_data = self._send_data
        if send_data is None:
            return
        size = send_data(CHANNEL_S, _PKT_DATA, _OP_SEND, self.usage_id, batch)
        self.sent_packets += len(batch)
        self.sent_bytes += size
        self.flush()

    def send_vnet_packets(self, batch: list[bytes]) -> None:
        """TUN reads that start with a vnet header: plain ones as VPN_SEND, super-packets as
        VPN_SEND_GSO when offload was agreed, else cut into segments here."""
        send = self._send
        if send is None:
            return
        usage = self.usage_id
        pack = _DATA_HEADER.pack
        offload = self.offload
        packets = size = 0
        for buf in batch:
            if buf[0] == 0 and buf[1] == 0:
                pkt = memoryview(buf)[10:]
                send(CHANNEL_S, _PKT_DATA, pack(0, _OP_SEND, usage, len(pkt)), pkt)
                packets += 1
                size += len(pkt)
                continue
            view = memoryview(buf)
            n, nbytes = vnet.ip_bytes(view[:10], view[10:])
            packets += n
            size += nbytes
            if offload:
                send(CHANNEL_S, _PKT_DATA, pack(0, _OP_SEND_GSO, usage, len(buf)), buf)
                continue
            try:
                segments = vnet.segment(view[:10], view[10:])
            except vnet.OffloadError:
                continue
            for seg in segments:
                send(CHANNEL_S, _PKT_DATA, pack(0, _OP_SEND, usage, len(seg)), seg)
        self.sent_packets += packets
        self.sent_bytes += size
        self.flush()

    def flush(self) -> None:
        if self.proto is not None:
            self.proto.flush()

    def request_address(self) -> None:
        self._addr_retry = None
        if self._send is not None:
            self._send(CHANNEL_S, _PKT_DATA, _ADDR_REQUEST)
            self.flush()

    # --- receiving ---------------------------------------------------------------------------

    def _on_service_packet(self, ptype: int, data: memoryview) -> None:
        try:
            if ptype == PacketType.SUCCESS and not self.granted:
                self.usage_id = Success.decode(data).usage_id
                self.granted = True
                self.owner.service_packet(self, ptype, data)
                if self.want_address:
                    self._step(StartStep.ADDRESS)
                    self.request_address()
                else:
                    self.owner.stream_granted(self)
            elif ptype == PacketType.ERROR and not self.granted:
                error = Error.decode(data)
                self.owner.stream_refused(
                    self, f"server refused the service: {error.name}", _permanent(error.code)
                )
            elif not self.owner.service_packet(self, ptype, data):
                self.log.info("ignored 'R' packet 0x{ptype:02x} from the server", ptype=ptype)
        except DecodeError as e:
            self.close(CloseCode.PROTOCOL_ERROR, f"malformed 'R' packet 0x{ptype:02x}: {e}")

    def _on_vpn_packet(self, ptype: int, data: memoryview) -> None:
        if len(data) < 20:
            return
        _sock, op, _usage, size = _HEADER.unpack_from(data)
        if op == _OP_RECV:
            if size == len(data) - 20:
                self.received_packets += 1
                self.received_bytes += size
                self.owner.stream_packet(data[20:])
            return
        if op == _OP_RECV_GSO:
            if size != len(data) - 20 or size <= 10 or not self.offload:
                self.dropped_bad_offload += 1
                return
            counted = gso_counted(data[20:30], data[30:])
            if counted is None:
                self.dropped_bad_offload += 1
                return
            self.received_packets += counted[0]
            self.received_bytes += counted[1]
            self.owner.stream_packet_gso(data[20:])
            return
        try:
            packet = vpn.VpnPacket.decode(data)
        except DecodeError:
            return
        if op == vpn.OpCode.PONG:
            self.pongs_received += 1
            self.outstanding_pings = 0
            if self.ping_sent_at is not None:
                self.ping_rtt = self.clock.seconds() - self.ping_sent_at
                self.ping_sent_at = None
        elif op == vpn.OpCode.PING and self._send is not None:
            self._send(CHANNEL_S, vpn.PKT_TYPE_PONG, _PONG)
        elif op == vpn.OpCode.VPN_ADDR_REPLY and not self.addressed:
            try:
                reply = vpn.AddrReply.decode(packet.data)
            except DecodeError as e:
                self.close(CloseCode.PROTOCOL_ERROR, f"malformed ADDR_REPLY: {e}")
                return
            self.addressed = True
            self.owner.stream_address(self, reply)
        elif op == vpn.OpCode.PROBLEM and packet.sock_id == 0:
            self._on_problem(packet.code)
        elif op in _PROXY_OPS:
            if op == vpn.OpCode.RECV:
                self.proxy_bytes += len(packet.data)
            self.owner.proxy_packet(self, packet)

    def _on_problem(self, code: int) -> None:
        if code == vpn.ProblemCode.TUNNEL_DOWN and not self.addressed:
            self._addr_retry = self.clock.callLater(ADDR_RETRY, self.request_address)
        elif code == vpn.ProblemCode.NO_FREE_ADDR and not self.addressed:
            self.owner.stream_refused(self, "server has no free address (NO_FREE_ADDR)", False)
        elif code == vpn.ProblemCode.ALREADY_ASSIGNED_ADDR:
            self.log.info("server says an address is already assigned to this session")
        else:
            self.log.info("server reported problem {code}", code=code)

    def _ping(self) -> None:
        proto = self.proto
        if proto is None or not proto.conn.established or not self.granted:
            # the server answers PING only with a granted usage (before it, the stream's own
            # keepalives watch the link)
            return
        if self.outstanding_pings >= MISSED_PONGS:
            self.log.warn(
                "no PONG from {peer} for {n} PINGs: the link is lost",
                peer=proto.peer,
                n=self.outstanding_pings,
            )
            self.close(CloseCode.IDLE_TIMEOUT, f"{self.outstanding_pings} PINGs unanswered")
            return
        self.outstanding_pings += 1
        self.pings_sent += 1
        if self.ping_sent_at is None:
            self.ping_sent_at = self.clock.seconds()
        proto.conn.send_channel(CHANNEL_S, _PKT_DATA, _PING)
        proto.flush()

    def close(self, code: int = CloseCode.NORMAL, reason: str = "client stopped") -> None:
        if self.proto is not None:
            self.proto.close(code, reason)


def _permanent(code: int) -> bool:
    """Refusals that another attempt cannot fix without a change of config or funds."""
    return code not in TRANSIENT_ERRORS
