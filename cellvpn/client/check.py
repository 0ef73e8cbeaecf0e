"""``vpn_client check``: how well a VPN server answers, measured from within the client.

A stream of its own to the server (TLS and session setup as for the tunnel, but no REQUEST and
no address), then CHECK_REQUEST / CHECK_RESPONSE on channel 'R' with the original's 628-byte
test header and the SHA3-256 of its data:

1. round trips: ``probes`` empty requests, one after the other (min / avg / max);
2. upload: ``send`` bytes in requests of at most one frame each, all sent at once, timed
   from the first request out to the last answer in;
3. download: ``recv`` bytes asked for the same way.

Connect (TCP), TLS and the session setup are timed apart. The server spends its per-session
CHECK budget ([edge] check_budget, the bytes asked and answered) and rate ([edge] check_rate)
on these, so the client asks for no more than the default budget in all and keeps to the
default rate. The tunnel, if up, is not touched.

Return codes are the original's: 0 checked, -1 bad parameters, -2 no connection, -3 no answer
in time. :class:`CheckPlan` is the sans-IO core (what to send, what the answers measured);
:class:`CheckStream` is the thin Twisted edge.
"""

from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from cellvpn.conn.protocol import StreamApplication, StreamProtocol
from cellvpn.ratelimit import TokenBucket
from cellvpn.server.check import check_data_limit
from cellvpn.stream.connection import Closed, Established, HelloReceived
from cellvpn.wire.channel import CHANNEL_R
from cellvpn.wire.errors import DecodeError
from cellvpn.wire.service import CheckPacket, PacketType
from cellvpn.wire.setup import CloseCode

CHECK_OK = 0
CHECK_BAD_PARAMETERS = -1
CHECK_NO_CONNECTION = -2
CHECK_NO_ANSWER = -3

#: The server's default per-session CHECK budget ([edge] check_budget): send + recv at most.
CHECK_BUDGET = 1048576
#: The server's default CHECK_REQUEST rate ([edge] check_rate), as a bucket of that burst.
CHECK_RATE = 20.0
#: Bytes sent and asked for unless the caller says otherwise.
DEFAULT_SEND = 262144
DEFAULT_RECV = 262144
#: Empty round trips timed unless the caller says otherwise.
DEFAULT_PROBES = 5
MAX_PROBES = 20
#: Seconds a check may take in all, unless the caller says otherwise.
CHECK_TIMEOUT = 10.0


class CheckPhase(Enum):
    """Where a check is, in order; the value is what the progress line says."""

    CONNECTING = "connecting (TCP)"
    TLS = "TLS handshake"
    SESSION = "session setup"
    RTT = "round trips"
    UPLOAD = "upload"
    DOWNLOAD = "download"
    DONE = "done"


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_parameters(
    addr: object, port: object, send: object, recv: object, timeout: object, probes: object = 5
) -> str | None:
    """Why these parameters cannot be checked (None: they can)."""
    if not isinstance(addr, str) or not addr.strip():
        return "VPN server address not defined, use -addr <server_address>"
    if not _count(port) or not 0 < port < 65536:  # type: ignore[operator]
        return f"VPN server port must be 1 to 65535, not {port!r}"
    for name, size in (("--send", send), ("--recv", recv)):
        if not _count(size) or not 0 <= size <= CHECK_BUDGET:  # type: ignore[operator]
            return f"{name} must be 0 to {CHECK_BUDGET} bytes, not {size!r}"
    if send + recv > CHECK_BUDGET:  # type: ignore[operator]
        return (
            f"--send and --recv together must be at most {CHECK_BUDGET} bytes (the server's "
            f"CHECK budget per session), not {send + recv}"  # type: ignore[operator]
        )
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not 0 < timeout <= 300:
        return f"check timeout must be above 0 and at most 300 seconds, not {timeout!r}"
    if not _count(probes) or not 1 <= probes <= MAX_PROBES:  # type: ignore[operator]
        return f"--probes must be 1 to {MAX_PROBES}, not {probes!r}"
    return None


def chunk_for(peer_max_frame: int, own_max_frame: int) -> int:
    """Data per CHECK packet: the largest both ends' frames carry (see the server's limit)."""
    return check_data_limit(peer_max_frame, own_max_frame)


def _rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds if seconds > 0 else 0.0


@dataclass(frozen=True)
class _Sent:
    """One request in flight: what it was, when it went, and which phase it serves."""

    request: CheckPacket
    at: float
    phase: CheckPhase


class CheckPlan:
    """The sans-IO core of one check: ``to_send(now)`` says which requests go now,
    ``answered(packet, now)`` takes each answer (in order: one stream keeps it), and
    ``facts()`` gives the figures once ``done``. ``wait(now)`` is how long until the rate
    lets the next request go (None: nothing is held back by it)."""

    def __init__(
        self,
        send: int,
        recv: int,
        probes: int,
        chunk: int,
        now: float,
        rate: float = CHECK_RATE,
    ) -> None:
        self.send, self.recv, self.chunk = send, recv, chunk
        self.todo: deque[tuple[CheckPhase, int, int]] = deque()
        self.todo.extend((CheckPhase.RTT, 0, 0) for _ in range(probes))
        self.todo.extend((CheckPhase.UPLOAD, n, 0) for n in _pieces(send, chunk))
        self.todo.extend((CheckPhase.DOWNLOAD, 0, n) for n in _pieces(recv, chunk))
        self.phase = CheckPhase.RTT
        # a tenth below the server's rate: requests bunched up on the way still fit it
        self.bucket = TokenBucket(rate * 0.9, max(1.0, rate * 0.9), now)
        #: the connect time the requests carry (``time_connect_ms``, as the original's)
        self.connect_ms = 0
        self.in_flight: deque[_Sent] = deque()
        self.requests = 0
        self.rtts: list[float] = []
        self.uploaded = 0
        self.downloaded = 0
        #: (first request out, last answer in) per timed phase
        self.spans: dict[CheckPhase, list[float]] = {}
        self.seen_as = ""
        self._seq = 0

    @property
    def done(self) -> bool:
        return not self.todo and not self.in_flight

    def to_send(self, now: float) -> list[CheckPacket]:
        """The requests to send now: a probe once the last is answered; upload and download
        requests all at once, each phase once the one before is answered, within the rate."""
        out: list[CheckPacket] = []
        while self.todo:
            phase, send, recv = self.todo[0]
            if self.in_flight and (phase is CheckPhase.RTT or self.in_flight[-1].phase != phase):
                break  # a probe alone on the path; a phase timed on its own
            if not self.bucket.take(now):
                break
            self.todo.popleft()
            self.phase = phase
            data = os.urandom(send) if send else b""
            self._seq += 1
            request = CheckPacket(
                time_connect_ms=self.connect_ms,
                send_time1=int(now * 1e9) + self._seq,
                data_size_send=send,
                data_size_recv=recv,
                data_hash=CheckPacket.hash_of(data),
                data=data,
            )
            self.in_flight.append(_Sent(request, now, phase))
            self.spans.setdefault(phase, [now, now])
            self.requests += 1
            out.append(request)
        return out

    def wait(self, now: float) -> float | None:
        """Seconds until the rate lets the next request go, when only the rate holds it."""
        if not self.todo:
            return None
        phase = self.todo[0][0]
        if self.in_flight and (phase is CheckPhase.RTT or self.in_flight[-1].phase != phase):
            return None
        b = self.bucket
        tokens = min(b.burst, b.tokens + (now - b.stamp) * b.rate)
        return max(0.0, (1.0 - tokens) / b.rate)

    def answered(self, answer: CheckPacket, now: float) -> str | None:
        """Take the answer to the oldest request in flight; why it does not count, if not."""
        if not self.in_flight:
            return "an answer to no request"
        sent = self.in_flight.popleft()
        request = sent.request
        if answer.err_code:
            return f"the server answered with error 0x{answer.err_code:x}"
        if not answer.hash_ok:
            return "the data of the answer does not match its hash"
        if len(answer.data) != request.data_size_recv:
            return f"asked for {request.data_size_recv} bytes, got {len(answer.data)}"
        if answer.send_time1 != request.send_time1:
            return "the answer is not for this request"
        self.seen_as = answer.host_send.decode("ascii", "replace")
        self.spans[sent.phase][1] = now
        if sent.phase is CheckPhase.RTT:
            self.rtts.append(now - sent.at)
        self.uploaded += len(request.data)
        self.downloaded += len(answer.data)
        if self.done:
            self.phase = CheckPhase.DONE
        return None

    def _span(self, phase: CheckPhase) -> float:
        first, last = self.spans.get(phase, (0.0, 0.0))
        return last - first

    def progress(self) -> dict[str, Any]:
        return {
            "phase": self.phase.name.lower(),
            "text": self.phase.value,
            "done_bytes": self.uploaded + self.downloaded,
            "total_bytes": self.send + self.recv,
        }

    def facts(self) -> dict[str, Any]:
        """The figures: round trips, upload and download, in ms and bytes per second."""
        rtts = [r * 1000 for r in self.rtts]
        up, down = self._span(CheckPhase.UPLOAD), self._span(CheckPhase.DOWNLOAD)
        return {
            "rtt_min_ms": round(min(rtts), 3) if rtts else None,
            "rtt_avg_ms": round(sum(rtts) / len(rtts), 3) if rtts else None,
            "rtt_max_ms": round(max(rtts), 3) if rtts else None,
            "probes": len(rtts),
            "sent_bytes": self.uploaded,
            "received_bytes": self.downloaded,
            "upload_ms": round(up * 1000, 3),
            "download_ms": round(down * 1000, 3),
            "upload_bytes_per_second": round(_rate(self.uploaded, up), 1),
            "download_bytes_per_second": round(_rate(self.downloaded, down), 1),
            "requests": self.requests,
            "chunk_bytes": self.chunk,
            "seen_as": self.seen_as,
        }


def _pieces(total: int, chunk: int) -> list[int]:
    """``total`` bytes as requests of at most ``chunk`` each."""
    if total <= 0:
        return []
    n = math.ceil(total / chunk)
    return [chunk] * (n - 1) + [total - chunk * (n - 1)]


class CheckStream(StreamApplication):
    """The stream application of one check: times TCP, TLS and the session setup, then runs
    a :class:`CheckPlan` and fires ``done`` with ``(code, facts)`` at the end, the loss, or
    the deadline."""

    def __init__(
        self,
        clock: IReactorTime,
        send: int,
        recv: int,
        timeout: float,
        probes: int = DEFAULT_PROBES,
        rate: float = CHECK_RATE,
    ) -> None:
        self.clock = clock
        self.send, self.recv, self.probes, self.rate = send, recv, probes, rate
        self.started = clock.seconds()
        self.done: defer.Deferred[tuple[int, dict[str, Any]]] = defer.Deferred()
        self.proto: StreamProtocol | None = None
        self.plan: CheckPlan | None = None
        self.phase = CheckPhase.CONNECTING
        #: seconds from the start: TCP up, TLS up, session set up
        self.marks: dict[str, float] = {}
        self.close_event: Closed | None = None
        self._deadline: IDelayedCall | None = clock.callLater(timeout, self._timed_out, timeout)
        self._paced: IDelayedCall | None = None

    # --- the outcome -----------------------------------------------------------------------

    def progress(self) -> dict[str, Any]:
        if self.plan is not None:
            return self.plan.progress()
        return {
            "phase": self.phase.name.lower(),
            "text": self.phase.value,
            "done_bytes": 0,
            "total_bytes": self.send + self.recv,
        }

    def _times(self) -> dict[str, Any]:
        m = self.marks

        def ms(a: str | None, b: str) -> float | None:
            if b not in m:
                return None
            return round((m[b] - (m[a] if a else 0.0)) * 1000, 3)

        return {
            "connect_ms": ms(None, "tcp"),
            "tls_ms": ms("tcp", "tls"),
            "setup_ms": ms("tls", "session"),
        }

    def _finish(self, code: int, facts: dict[str, Any]) -> None:
        if self.done.called:
            return
        for call in (self._deadline, self._paced):
            if call is not None and call.active():
                call.cancel()
        self._deadline = self._paced = None
        self.phase = CheckPhase.DONE
        self.done.callback((code, {**self._times(), **facts}))
        if self.proto is not None and not self.proto.lost:
            self.proto.close(CloseCode.NORMAL, "check done")

    def failed_to_connect(self, why: str) -> None:
        self._finish(CHECK_NO_CONNECTION, {"reason": why})

    def _timed_out(self, timeout: float) -> None:
        self._deadline = None
        if self.plan is None:
            stage = f"no session set up ({self.phase.value})"
        else:
            stage = f"no answer to CHECK_REQUEST ({self.plan.phase.value})"
        self._finish(CHECK_NO_ANSWER, {"reason": f"{stage} within {timeout:g} s"})
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.abortConnection()  # type: ignore[attr-defined]

    def _mark(self, name: str, phase: CheckPhase) -> None:
        self.marks[name] = self.clock.seconds() - self.started
        self.phase = phase

    # --- StreamApplication -----------------------------------------------------------------

    def stream_connected(self, proto: StreamProtocol) -> None:
        self.proto = proto
        self._mark("tcp", CheckPhase.TLS)
        if proto.handshake_done:
            self.handshake_completed(proto)
        proto.conn.register_channel(CHANNEL_R, self._on_service_packet)
        proto.conn.start(b"")

    def handshake_completed(self, proto: StreamProtocol) -> None:
        self._mark("tls", CheckPhase.SESSION)

    def hello_received(self, proto: StreamProtocol, event: HelloReceived) -> None:
        raise AssertionError("a client never receives HELLO")

    def established(self, proto: StreamProtocol, event: Established) -> None:
        self._mark("session", CheckPhase.RTT)
        chunk = chunk_for(event.welcome.max_frame, proto.conn.settings.max_payload)
        self.plan = CheckPlan(
            self.send, self.recv, self.probes, chunk, self.clock.seconds(), self.rate
        )
        self.plan.connect_ms = int(self.marks["session"] * 1000)
        self._pump()

    def _pump(self) -> None:
        """Send what the plan lets go now; come back when the rate allows the next."""
        self._paced = None
        plan, proto = self.plan, self.proto
        if plan is None or proto is None or self.done.called:
            return
        for request in plan.to_send(self.clock.seconds()):
            proto.conn.send_channel(CHANNEL_R, PacketType.CHECK_REQUEST, request.encode())
        proto.flush()
        wait = plan.wait(self.clock.seconds())
        if wait is not None:
            self._paced = self.clock.callLater(wait, self._pump)

    def _on_service_packet(self, ptype: int, data: memoryview) -> None:
        plan = self.plan
        if ptype != PacketType.CHECK_RESPONSE or plan is None:
            return  # nothing else is asked on this stream; the server sends nothing else
        now = self.clock.seconds()
        try:
            answer = CheckPacket.decode(data)
        except DecodeError as e:
            self._finish(CHECK_NO_ANSWER, {"reason": f"malformed CHECK_RESPONSE: {e}"})
            return
        problem = plan.answered(answer, now)
        if problem is not None:
            self._finish(CHECK_NO_ANSWER, {"reason": problem, **plan.facts()})
        elif plan.done:
            self._finish(CHECK_OK, plan.facts())
        elif self._paced is None:
            self._pump()

    def stream_closed(self, proto: StreamProtocol, event: Closed) -> None:
        self.close_event = event

    def connection_lost(self, proto: StreamProtocol, reason: Failure) -> None:
        ev = self.close_event
        if ev is not None and ev.by_peer:
            why = f"server closed the stream ({ev.code_name}): {ev.reason or 'no reason given'}"
        else:
            why = f"the connection ended: {reason.getErrorMessage()}"
        self._finish(CHECK_NO_CONNECTION, {"reason": why})
