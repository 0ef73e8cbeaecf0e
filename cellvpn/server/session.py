"""One client's session on the server: the application on top of its stream.

It answers the setup, serves the 'R' and 'S' channels, and keeps the per-session facts that
``vpn_stat`` and the control socket report.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from twisted.logger import Logger
from twisted.python.failure import Failure

from cellvpn.conn.protocol import StreamProtocol
from cellvpn.conn.tls import describe_tls_failure
from cellvpn.server.check import answer_check
from cellvpn.stream.connection import Closed, Established, HelloReceived
from cellvpn.wire import vpn
from cellvpn.wire.channel import CHANNEL_R, CHANNEL_S
from cellvpn.wire.errors import DecodeError
from cellvpn.wire.service import CheckPacket, PacketType
from cellvpn.wire.setup import CloseCode

if TYPE_CHECKING:
    from cellvpn.server.service import VPNServerService

_PONG = vpn.VpnPacket(vpn.OpCode.PONG).encode()


class ServerSession:
    """The server side of one stream."""

    log = Logger()

    def __init__(self, server: VPNServerService) -> None:
        self.server = server
        self.proto: StreamProtocol | None = None
        self.peer = "unknown peer"
        self.session_id: int | None = None
        self.started_at = time.time()
        self.established_at: float | None = None
        self.close_reason: str | None = None
        self.pings = 0
        self.s_dropped = 0

    # --- StreamApplication -----------------------------------------------------------------

    def stream_connected(self, proto: StreamProtocol) -> None:
        self.proto = proto
        self.peer = proto.peer

    def hello_received(self, proto: StreamProtocol, event: HelloReceived) -> None:
        server = self.server
        if not server.accepting:
            proto.close(CloseCode.SHUTDOWN, "server is shutting down")
            return
        sid = server.sessions.new_id()
        self.session_id = sid
        conn = proto.conn
        conn.register_channel(CHANNEL_R, self._on_service_packet)
        conn.register_channel(CHANNEL_S, self._on_vpn_packet)
        conn.accept(sid)
        server.sessions.add(sid, self)
        self.established_at = time.time()
        self.log.info(
            "session {sid} with {peer} established (channels {channels}, capabilities {caps})",
            sid=f"{sid:#010x}",
            peer=self.peer,
            channels=event.hello.channels,
            caps=",".join(sorted(event.caps)) or "none",
        )

    def established(self, proto: StreamProtocol, event: Established) -> None:
        raise AssertionError("a server stream is never established by a WELCOME")

    def stream_closed(self, proto: StreamProtocol, event: Closed) -> None:
        self.close_reason = (
            f"{event.code_name}: {event.reason}" if event.reason else event.code_name
        )

    def connection_lost(self, proto: StreamProtocol, reason: Failure) -> None:
        if self.session_id is None:
            if self.close_reason is None:
                self.log.info(
                    "connection from {peer} ended before session setup: {why}",
                    peer=self.peer,
                    why=describe_tls_failure(reason),
                )
            return
        self.server.sessions.remove(self.session_id)
        self.log.info(
            "session {sid} with {peer} ended: {why}",
            sid=f"{self.session_id:#010x}",
            peer=self.peer,
            why=self.close_reason or describe_tls_failure(reason),
        )

    # --- channels --------------------------------------------------------------------------

    def _on_service_packet(self, ptype: int, data: memoryview) -> None:
        assert self.proto is not None
        try:
            if ptype == PacketType.CHECK_REQUEST:
                request = CheckPacket.decode(data)
                host = getattr(self.proto.transport.getPeer(), "host", "")  # type: ignore[union-attr]
                answer = answer_check(request, host, time.time_ns())
                self.proto.conn.send_channel(CHANNEL_R, PacketType.CHECK_RESPONSE, answer.encode())
                return
        except DecodeError as e:
            self.proto.close(CloseCode.PROTOCOL_ERROR, f"malformed 'R' packet 0x{ptype:02x}: {e}")
            return
        self.proto.close(CloseCode.PROTOCOL_ERROR, f"unexpected 'R' packet type 0x{ptype:02x}")

    def _on_vpn_packet(self, ptype: int, data: memoryview) -> None:
        assert self.proto is not None
        try:
            op = vpn.peek_op(data)
        except DecodeError:
            self.s_dropped += 1
            return
        if op == vpn.OpCode.PING:
            self.pings += 1
            self.proto.conn.send_channel(CHANNEL_S, vpn.PKT_TYPE_PONG, _PONG)
        elif op == vpn.OpCode.PONG:
            pass
        else:
            self.s_dropped += 1

    # --- reporting -------------------------------------------------------------------------

    def describe(self) -> dict[str, object]:
        conn = self.proto.conn if self.proto else None
        stats = conn.stats if conn else None
        return {
            "session_id": self.session_id,
            "peer": self.peer,
            "started_at": self.established_at,
            "keepalives_sent": stats.keepalives_sent if stats else 0,
            "keepalives_received": stats.keepalives_received if stats else 0,
            "alives_received": stats.alives_received if stats else 0,
            "rtt_ms": None if not stats or stats.last_rtt is None else stats.last_rtt * 1000,
            "frames_in": stats.frames_in if stats else 0,
            "frames_out": stats.frames_out if stats else 0,
            "seq_replays": conn.seq.replays if conn else 0,
            "seq_gaps": conn.seq.gaps if conn else 0,
            "pings": self.pings,
        }
