"""The client's side of one stream: setup, the 'S' keepalive PING/PONG, and loss detection."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from cellvpn.conn.protocol import StreamProtocol
from cellvpn.conn.tls import TLSVerificationError, describe_tls_failure
from cellvpn.stream.connection import Closed, Established, HelloReceived
from cellvpn.wire import vpn
from cellvpn.wire.channel import CHANNEL_R, CHANNEL_S
from cellvpn.wire.errors import DecodeError
from cellvpn.wire.setup import CloseCode

_PING = vpn.VpnPacket(vpn.OpCode.PING).encode()
_PONG = vpn.VpnPacket(vpn.OpCode.PONG).encode()

#: PINGs that may go unanswered before the link counts as lost (the original's 3).
MISSED_PONGS = 3


class ClientStream:
    """The application on one client stream; reports to its owner through callbacks."""

    log = Logger()

    def __init__(
        self,
        clock: Any,
        ping_interval: float,
        on_established: Callable[[ClientStream], None],
        on_lost: Callable[[ClientStream, str, bool], None],
        resume_token: bytes = b"",
    ) -> None:
        self.clock = clock
        self.ping_interval = ping_interval
        self.on_established = on_established
        self.on_lost = on_lost
        self.resume_token = resume_token
        self.proto: StreamProtocol | None = None
        self.session_id: int | None = None
        self.outstanding_pings = 0
        self.pings_sent = 0
        self.pongs_received = 0
        self.ping_sent_at: float | None = None
        self.ping_rtt: float | None = None
        self.close_event: Closed | None = None
        self._pinger: LoopingCall | None = None
        self._lost_reported = False

    # --- StreamApplication -----------------------------------------------------------------

    def stream_connected(self, proto: StreamProtocol) -> None:
        self.proto = proto
        proto.conn.register_channel(CHANNEL_R, self._on_service_packet)
        proto.conn.register_channel(CHANNEL_S, self._on_vpn_packet)
        proto.conn.start(self.resume_token)

    def hello_received(self, proto: StreamProtocol, event: HelloReceived) -> None:
        raise AssertionError("a client never receives HELLO")

    def established(self, proto: StreamProtocol, event: Established) -> None:
        self.session_id = event.welcome.session_id
        pinger = LoopingCall(self._ping)
        pinger.clock = self.clock
        pinger.start(self.ping_interval, now=False)
        self._pinger = pinger
        self.on_established(self)

    def stream_closed(self, proto: StreamProtocol, event: Closed) -> None:
        self.close_event = event

    def connection_lost(self, proto: StreamProtocol, reason: Failure) -> None:
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
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
            and ev.code in (CloseCode.VERSION_MISMATCH, CloseCode.CAPABILITY_MISMATCH)
        )
        self.on_lost(self, why, permanent)

    # --- channels --------------------------------------------------------------------------

    def _on_service_packet(self, ptype: int, data: memoryview) -> None:
        pass

    def _on_vpn_packet(self, ptype: int, data: memoryview) -> None:
        try:
            op = vpn.peek_op(data)
        except DecodeError:
            return
        if op == vpn.OpCode.PONG:
            self.pongs_received += 1
            self.outstanding_pings = 0
            if self.ping_sent_at is not None:
                self.ping_rtt = self.clock.seconds() - self.ping_sent_at
                self.ping_sent_at = None
        elif op == vpn.OpCode.PING and self.proto is not None:
            self.proto.conn.send_channel(CHANNEL_S, vpn.PKT_TYPE_PONG, _PONG)

    def _ping(self) -> None:
        proto = self.proto
        if proto is None or not proto.conn.established:
            return
        if self.outstanding_pings >= MISSED_PONGS:
            self.log.warn(
                "no PONG from {peer} for {n} PINGs: the link is lost",
                peer=proto.peer,
                n=self.outstanding_pings,
            )
            proto.close(CloseCode.IDLE_TIMEOUT, f"{self.outstanding_pings} PINGs unanswered")
            proto.disconnect()
            return
        self.outstanding_pings += 1
        self.pings_sent += 1
        if self.ping_sent_at is None:
            self.ping_sent_at = self.clock.seconds()
        proto.conn.send_channel(CHANNEL_S, vpn.PKT_TYPE_DATA, _PING)
        proto.flush()

    def close(self, code: int = CloseCode.NORMAL, reason: str = "client stopped") -> None:
        if self.proto is not None:
            self.proto.close(code, reason)
