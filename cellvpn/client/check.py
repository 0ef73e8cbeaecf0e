"""``vpn_client check``: the original's reachability and speed probe of a VPN server.

From within the client process, a stream of its own to the server (TLS and session setup, as
for the tunnel, but no REQUEST and no address), one CHECK_REQUEST on channel 'R' with data to
send and data to ask for, and the CHECK_RESPONSE timed: connect time (TCP, TLS and the session
setup), round trip and the bytes both ways over it. The tunnel, if up, is not touched.

Return codes are the original's: 0 checked, -1 bad parameters, -2 no connection, -3 no answer
in time. The arithmetic is plain functions; :class:`CheckStream` is the thin Twisted edge.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from cellvpn.conn.protocol import StreamApplication, StreamProtocol
from cellvpn.server.check import MAX_CHECK_DATA
from cellvpn.stream.connection import Closed, Established, HelloReceived
from cellvpn.wire.channel import CHANNEL_R
from cellvpn.wire.errors import DecodeError
from cellvpn.wire.service import CheckPacket, PacketType
from cellvpn.wire.setup import CloseCode

CHECK_OK = 0
CHECK_BAD_PARAMETERS = -1
CHECK_NO_CONNECTION = -2
CHECK_NO_ANSWER = -3


#: Seconds a check may take in all, unless the caller says otherwise.
CHECK_TIMEOUT = 10.0


def check_parameters(addr: object, port: object, size: object, timeout: object) -> str | None:
    """Why these parameters cannot be checked (None: they can)."""
    if not isinstance(addr, str) or not addr.strip():
        return "VPN server address not defined, use -addr <server_address>"
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        return f"VPN server port must be 1 to 65535, not {port!r}"
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_CHECK_DATA:
        return f"check size must be 0 to {MAX_CHECK_DATA} bytes, not {size!r}"
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not 0 < timeout <= 300:
        return f"check timeout must be above 0 and at most 300 seconds, not {timeout!r}"
    return None


def check_request(size: int, connect_ms: int, now_ns: int) -> CheckPacket:
    """CHECK_REQUEST with ``size`` random bytes to send, asking for ``size`` back."""
    data = os.urandom(size)
    return CheckPacket(
        time_connect_ms=connect_ms,
        send_time1=now_ns,
        data_size_send=size,
        data_size_recv=size,
        data_hash=CheckPacket.hash_of(data),
        data=data,
    )


@dataclass(frozen=True)
class CheckFigures:
    """What a check measured; ``problem`` says why an answer did not count (None: it did)."""

    connect_ms: float
    rtt_ms: float
    sent_bytes: int
    received_bytes: int
    #: the address the server saw this client connect from
    seen_as: str
    err_code: int
    problem: str | None = None

    @property
    def bytes_per_second(self) -> float:
        """Bytes both ways over the round trip."""
        if self.rtt_ms <= 0:
            return 0.0
        return (self.sent_bytes + self.received_bytes) / (self.rtt_ms / 1000)

    def facts(self) -> dict[str, Any]:
        return {
            "connect_ms": round(self.connect_ms, 3),
            "rtt_ms": round(self.rtt_ms, 3),
            "sent_bytes": self.sent_bytes,
            "received_bytes": self.received_bytes,
            "bytes_per_second": round(self.bytes_per_second, 1),
            "seen_as": self.seen_as,
            "err_code": self.err_code,
            "problem": self.problem,
        }


def figures(
    request: CheckPacket, answer: CheckPacket, connect_s: float, sent_s: float, answered_s: float
) -> CheckFigures:
    """Judge an answer to ``request`` and time it (seconds on one clock)."""
    problem = None
    if answer.err_code:
        problem = f"the server answered with error 0x{answer.err_code:x}"
    elif not answer.hash_ok:
        problem = "the data of the answer does not match its hash"
    elif len(answer.data) != request.data_size_recv:
        problem = f"asked for {request.data_size_recv} bytes, got {len(answer.data)}"
    elif answer.send_time1 != request.send_time1:
        problem = "the answer is not for this request"
    return CheckFigures(
        connect_ms=connect_s * 1000,
        rtt_ms=(answered_s - sent_s) * 1000,
        sent_bytes=len(request.data),
        received_bytes=len(answer.data),
        seen_as=answer.host_send.decode("ascii", "replace"),
        err_code=answer.err_code,
        problem=problem,
    )


class CheckStream(StreamApplication):
    """The stream application of one check: start the session, send CHECK_REQUEST once it is
    established, fire ``done`` with ``(code, facts)`` at the answer, the loss, or the deadline."""

    def __init__(self, clock: IReactorTime, size: int, timeout: float) -> None:
        self.clock = clock
        self.size = size
        self.started = clock.seconds()
        self.done: defer.Deferred[tuple[int, dict[str, Any]]] = defer.Deferred()
        self.proto: StreamProtocol | None = None
        self.request: CheckPacket | None = None
        self.connected_at: float | None = None
        self.sent_at = 0.0
        self.close_event: Closed | None = None
        self._deadline: IDelayedCall | None = clock.callLater(timeout, self._timed_out, timeout)

    # --- the outcome -----------------------------------------------------------------------

    def _finish(self, code: int, facts: dict[str, Any]) -> None:
        if self.done.called:
            return
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self.done.callback((code, facts))
        if self.proto is not None and not self.proto.lost:
            self.proto.close(CloseCode.NORMAL, "check done")

    def failed_to_connect(self, why: str) -> None:
        self._finish(CHECK_NO_CONNECTION, {"reason": why})

    def _timed_out(self, timeout: float) -> None:
        self._deadline = None
        stage = "no answer to CHECK_REQUEST" if self.request else "no session set up"
        self._finish(CHECK_NO_ANSWER, {"reason": f"{stage} within {timeout:g} s"})
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.abortConnection()  # type: ignore[attr-defined]

    # --- StreamApplication -----------------------------------------------------------------

    def stream_connected(self, proto: StreamProtocol) -> None:
        self.proto = proto
        proto.conn.register_channel(CHANNEL_R, self._on_service_packet)
        proto.conn.start(b"")

    def hello_received(self, proto: StreamProtocol, event: HelloReceived) -> None:
        raise AssertionError("a client never receives HELLO")

    def established(self, proto: StreamProtocol, event: Established) -> None:
        now = self.clock.seconds()
        self.connected_at = now
        connect_ms = int((now - self.started) * 1000)
        self.request = check_request(self.size, connect_ms, int(now * 1e9))
        self.sent_at = now
        proto.conn.send_channel(CHANNEL_R, PacketType.CHECK_REQUEST, self.request.encode())
        proto.flush()

    def _on_service_packet(self, ptype: int, data: memoryview) -> None:
        if ptype != PacketType.CHECK_RESPONSE or self.request is None:
            return  # nothing else is asked on this stream; the server sends nothing else
        answered = self.clock.seconds()
        try:
            answer = CheckPacket.decode(data)
        except DecodeError as e:
            self._finish(CHECK_NO_ANSWER, {"reason": f"malformed CHECK_RESPONSE: {e}"})
            return
        assert self.connected_at is not None
        result = figures(
            self.request, answer, self.connected_at - self.started, self.sent_at, answered
        )
        code = CHECK_OK if result.problem is None else CHECK_NO_ANSWER
        self._finish(code, result.facts())

    def stream_closed(self, proto: StreamProtocol, event: Closed) -> None:
        self.close_event = event

    def connection_lost(self, proto: StreamProtocol, reason: Failure) -> None:
        ev = self.close_event
        if ev is not None and ev.by_peer:
            why = f"server closed the stream ({ev.code_name}): {ev.reason or 'no reason given'}"
        else:
            why = f"the connection ended: {reason.getErrorMessage()}"
        self._finish(CHECK_NO_CONNECTION, {"reason": why})
