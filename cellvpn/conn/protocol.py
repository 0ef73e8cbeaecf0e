"""The Twisted protocol that carries one stream: TLS bytes in and out of a StreamConnection.

It owns no protocol logic. It feeds received bytes to the sans-IO connection, writes what the
connection queues (once per batch of input), runs the keepalive tick, and hands setup events to
the application object (a server session or the client), which decides what they mean.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from cellvpn.conn.congestion import OuterCongestion
from cellvpn.stream.connection import (
    Closed,
    Established,
    Event,
    HelloReceived,
    StreamConnection,
)
from cellvpn.wire.setup import CloseCode

#: Bytes the TCP transport may hold before it pauses us. Twisted's 64 KiB is one super-packet:
#: every large write would pause the TUN reader and resume it only once all was sent.
WRITE_BUFFER = 1 << 20


class StreamApplication(TypingProtocol):
    """What sits on top of a stream: a server session or the client.

    ``stream_connected`` runs when TLS is up (a client calls ``proto.conn.start()`` there);
    ``hello_received`` must answer with ``conn.accept`` or ``proto.close``.
    """

    def stream_connected(self, proto: StreamProtocol) -> None: ...

    def hello_received(self, proto: StreamProtocol, event: HelloReceived) -> None: ...

    def established(self, proto: StreamProtocol, event: Established) -> None: ...

    def stream_closed(self, proto: StreamProtocol, event: Closed) -> None: ...

    def connection_lost(self, proto: StreamProtocol, reason: Failure) -> None: ...


def peer_name(transport: object) -> str:
    """``host:port`` of the remote end, for log lines."""
    try:
        peer = transport.getPeer()  # type: ignore[attr-defined]
    except Exception:
        return "unknown peer"
    host = getattr(peer, "host", None)
    port = getattr(peer, "port", None)
    if host is None:
        return str(peer)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@implementer(IPushProducer)
class StreamProtocol(Protocol):
    """One TLS connection carrying one cellvpn stream.

    It is the streaming producer of its own transport, so whatever else feeds the stream (the
    L4 proxy's sockets) can pause while the transport's write buffer is full: ``on_pause`` and
    ``on_resume`` callbacks run as it fills and drains, and ``paused`` says where it is now.
    """

    log = Logger()

    def __init__(
        self,
        conn: StreamConnection,
        app: StreamApplication,
        clock: IReactorTime,
        congestion: str | None = None,
        lan_rtt: float = 0.001,
    ) -> None:
        self.conn = conn
        #: TCP congestion control for what this end sends: a name, ``auto``, or None for the
        #: kernel's default; ``lan_rtt`` is where ``auto`` changes its choice
        self.congestion = congestion
        self.lan_rtt = lan_rtt
        self.outer = OuterCongestion(None, None, lan_rtt, clock.seconds)
        self.app = app
        self.clock = clock
        self.peer = "unknown peer"
        self._ticker: LoopingCall | None = None
        self._abort_call: IDelayedCall | None = None
        self.lost = False
        #: the application's hook after each read (batches what the read brought), if any
        self._input_done: Callable[[], object] | None = getattr(app, "input_done", None)
        self.paused = False
        #: how often the transport was full (for the status)
        self.pauses = 0
        self.on_pause: list[Callable[[], object]] = []
        self.on_resume: list[Callable[[], object]] = []
        self._producing = False
        #: TLS's own, unbuffered write (see connectionMade), or None
        self._tls_write: Callable[[Any], None] | None = None

    def connectionMade(self) -> None:
        self.peer = peer_name(self.transport)
        if isinstance(self.transport, TLSMemoryBIOProtocol):
            # Twisted's TLS transport gathers small writes and joins them at the next reactor
            # turn: a copy of every byte. The connection already hands over one run of small
            # frames per flush, and large payloads as views, so go straight to the encrypting
            # write, which takes any buffer and slices views into records without copying.
            self._tls_write = partial(TLSMemoryBIOProtocol.write, self.transport)
            tcp = self.transport.transport
            if hasattr(tcp, "bufferSize"):
                tcp.bufferSize = WRITE_BUFFER
            if self.congestion is not None and hasattr(tcp, "getHandle"):
                self.outer = OuterCongestion(
                    tcp.getHandle(), self.congestion, self.lan_rtt, self.clock.seconds
                )
            if hasattr(tcp, "setTcpNoDelay"):
                # frames are written as whole batches already; Nagle would only hold back the
                # small ones (the tunnel's TCP ACKs) for a round trip
                tcp.setTcpNoDelay(True)
        ticker = LoopingCall(self._tick)
        ticker.clock = self.clock
        ticker.start(self.conn.settings.keepalive_interval, now=False)
        self._ticker = ticker
        if self.transport is not None:
            self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
            self._producing = True
        self.app.stream_connected(self)
        self.flush()

    def dataReceived(self, data: bytes) -> None:
        events = self.conn.receive_data(data)
        if self._input_done is not None:
            self._input_done()
        if events:
            self._dispatch(events)
        self.flush()

    def flush(self) -> None:
        """Write what the connection queued: runs of small frames, and large payloads as they
        are (TLS takes any buffer, so nothing is joined or copied on the way)."""
        pieces = self.conn.pieces_to_send()
        if not pieces or self.transport is None or self.lost:
            return
        self.outer.before_write(pieces)
        direct = self._tls_write
        if direct is not None:
            for piece in pieces:
                direct(piece)
        else:
            self.transport.write(b"".join(pieces))

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.pauses += 1
            for listener in list(self.on_pause):
                listener()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            for listener in list(self.on_resume):
                listener()

    def stopProducing(self) -> None:
        """The transport is going away; ``connectionLost`` follows and does the work."""

    def _tick(self) -> None:
        events = self.conn.tick()
        if events:
            self._dispatch(events)
        self.flush()

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, HelloReceived):
                self.app.hello_received(self, event)
            elif isinstance(event, Established):
                self.app.established(self, event)
            elif isinstance(event, Closed):
                self._closed(event)

    def _closed(self, event: Closed) -> None:
        if event.by_peer:
            self.log.info(
                "{peer} closed the stream ({code}): {reason}",
                peer=self.peer,
                code=event.code_name,
                reason=event.reason or "no reason given",
            )
        elif event.code == CloseCode.PROTOCOL_ERROR:
            self.log.warn(
                "closing the stream with {peer}: protocol error: {reason}",
                peer=self.peer,
                reason=event.reason,
            )
        elif event.code not in (CloseCode.NORMAL, CloseCode.SHUTDOWN):
            self.log.info(
                "closing the stream with {peer} ({code}): {reason}",
                peer=self.peer,
                code=event.code_name,
                reason=event.reason,
            )
        self.app.stream_closed(self, event)
        self.flush()
        self.disconnect()

    def close(self, code: int, reason: str) -> None:
        """Send CLOSE with ``reason`` and disconnect (the application ends the stream)."""
        event = self.conn.close(code, reason)
        if event is not None:
            self._closed(event)
        else:
            self.disconnect()

    def disconnect(self) -> None:
        """Let queued bytes (the CLOSE frame) go out, and abort if the peer does not read them."""
        if self.lost or self.transport is None:
            return
        if self._producing:
            # TLS waits for a registered producer to go before it shuts down
            self._producing = False
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
        self.transport.loseConnection()
        if self._abort_call is None:
            self._abort_call = self.clock.callLater(5, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        if not self.lost and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self._producing = False
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        self.app.connection_lost(self, reason)
