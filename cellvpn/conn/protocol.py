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

from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
)
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


#: Bytes a peer may still send after our CLOSE (what was in flight) before we drop the
#: connection instead of waiting for its TLS close.
AFTER_CLOSE = 1 << 20


def transport_backlog(tcp: Any) -> int:
    """Bytes a Twisted TCP transport holds that the kernel has not taken yet."""
    buffer = getattr(tcp, "dataBuffer", b"")
    return len(buffer) - getattr(tcp, "offset", 0) + getattr(tcp, "_tempDataLen", 0)


class OutputBounds(TypingProtocol):
    """How much one stream may hold unsent: past ``output_high`` its peer is no longer read,
    past ``output_limit`` the stream is cut (what a peer that never reads would pile up)."""

    @property
    def output_high(self) -> int: ...

    @property
    def output_limit(self) -> int: ...


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

    # The hooks below have defaults: an application that subclasses this class explicitly
    # overrides only those it needs.

    def handshake_completed(self, proto: StreamProtocol) -> None:
        """TLS finished its handshake (the peer's certificate can be read now)."""
        return None

    def input_done(self) -> None:
        """One read was fed to the connection: whatever it brought can be written as a batch."""
        return None

    def output_overflow(self, proto: StreamProtocol, backlog: int) -> None:
        """The stream is about to be cut for holding ``backlog`` unsent bytes."""
        return None


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


@implementer(IPushProducer, IHandshakeListener)
class StreamProtocol(Protocol):
    """One TLS connection carrying one cellvpn stream.

    It is the streaming producer of its own transport, so whatever else feeds the stream (the
    L4 proxy's sockets) can pause while the transport's write buffer is full: ``on_pause`` and
    ``on_resume`` callbacks run as it fills and drains, and ``paused`` says where it is now.

    Whoever needs the peer not read for a while (a full relayed socket, our own output past
    its high mark) says so with :meth:`hold_reading` under a name of its own; reading goes on
    once every name let go.
    """

    log = Logger()

    def __init__(
        self,
        conn: StreamConnection,
        app: StreamApplication,
        clock: IReactorTime,
        congestion: str | None = None,
        lan_rtt: float = 0.001,
        bounds: OutputBounds | None = None,
        log_closes: bool = True,
    ) -> None:
        self.conn = conn
        #: log why the stream closed (a server counts refusals instead, see its edge)
        self.log_closes = log_closes
        self.bounds = bounds
        #: the TCP transport under TLS (or the transport itself), whose buffer is measured
        self._tcp: Any = None
        self._read_holds: set[str] = set()
        #: TLS is up (always true without TLS)
        self.handshake_done = False
        #: the stream was cut for holding more than ``bounds.limit``
        self.overflowed = False
        #: bytes the peer sent after we closed the stream
        self._after_close = 0
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
        #: the application's hook after each read (batches what the read brought)
        self._input_done: Callable[[], object] = app.input_done
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
            tcp = self._tcp = self.transport.transport
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
        else:
            self._tcp = self.transport
        # a TLS transport says when its handshake is done (handshakeCompleted); others have none
        self.handshake_done = not ISSLTransport.providedBy(self.transport)
        ticker = LoopingCall(self._tick)
        ticker.clock = self.clock
        ticker.start(self.conn.settings.keepalive_interval, now=False)
        self._ticker = ticker
        if self.transport is not None:
            self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
            self._producing = True
        self.app.stream_connected(self)
        self.flush()

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        self.app.handshake_completed(self)

    def dataReceived(self, data: bytes) -> None:
        if self._abort_call is not None:
            # we closed; reading goes on so that TLS sees the peer's close, but a peer that
            # keeps sending after our CLOSE is cut off once past what was in flight
            self._after_close += len(data)
            if self._after_close > AFTER_CLOSE:
                self.lost_cause()
            return
        events = self.conn.receive_data(data)
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
        bounds = self.bounds
        if bounds is not None:
            backlog = transport_backlog(self._tcp)
            if backlog > bounds.output_high:
                self._over_high(backlog, bounds)

    def _over_high(self, backlog: int, bounds: OutputBounds) -> None:
        if backlog > bounds.output_limit and not self.overflowed:
            self.overflowed = True
            self.app.output_overflow(self, backlog)
            self.lost_cause()
        elif "output" not in self._read_holds:
            # the transport paused us already (its buffer is past WRITE_BUFFER); it resumes
            # us once drained, and reading goes on then
            self.hold_reading("output")

    def hold_reading(self, why: str) -> None:
        """Stop reading the peer until ``release_reading(why)``."""
        if why in self._read_holds:
            return
        self._read_holds.add(why)
        if len(self._read_holds) == 1:
            transport = self._readable()
            if transport is not None:
                transport.pauseProducing()

    def release_reading(self, why: str) -> None:
        if why not in self._read_holds:
            return
        self._read_holds.discard(why)
        if not self._read_holds:
            transport = self._readable()
            if transport is not None:
                transport.resumeProducing()

    @property
    def reading_held(self) -> bool:
        return bool(self._read_holds)

    def _readable(self) -> Any:
        """The transport while it can still read; None once it is closing."""
        transport = self.transport
        if transport is None or self.lost or getattr(transport, "disconnecting", False):
            return None
        return transport

    def lost_cause(self) -> None:
        """Drop the connection now, with whatever it still holds (a peer that does not read)."""
        if self.lost or self.transport is None:
            return
        self.transport.abortConnection()  # type: ignore[attr-defined]

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
        self.release_reading("output")

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
        if not self.log_closes:
            pass
        elif event.by_peer:
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
