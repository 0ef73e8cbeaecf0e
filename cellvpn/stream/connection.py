"""One stream, either end, with no I/O: bytes in, events and bytes out.

The Twisted adapter (:mod:`cellvpn.conn.protocol`) feeds it what TLS delivers
(:meth:`StreamConnection.receive_data`), writes what :meth:`StreamConnection.data_to_send`
returns, and calls :meth:`StreamConnection.tick` every ``keepalive_interval`` seconds. Channel
packets go straight to the handler registered for their channel id, so the packet path makes no
event objects; everything else comes back as events.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from cellvpn import native
from cellvpn.fsm import Machine
from cellvpn.ratelimit import TokenBucket
from cellvpn.wire import channel as chan
from cellvpn.wire import frame as fr
from cellvpn.wire import vpn
from cellvpn.wire.errors import DecodeError
from cellvpn.wire.frame import FrameType
from cellvpn.wire.setup import PROTOCOL_VERSION, Close, CloseCode, Hello, Welcome

#: A channel's packet handler: ``handler(channel_packet_type, data)``. ``data`` is a view of
#: immutable bytes, so a handler may keep it.
ChannelHandler = Callable[[int, memoryview], None]
#: ``pump(view, seq_next) -> (pos, taken)``: carries the data frames at the start of ``view``
#: that need no decision, numbered from ``seq_next``, and says where the rest begins
DataPump = Callable[[memoryview, int], tuple[int, int]]

# frame header + channel header in one pack: 37 + 16 bytes
_FRAME_AND_CHANNEL = struct.Struct("<" + fr.HEADER.format[1:] + chan.HEADER.format[1:])
# ... and the VPN data header after them (20 more): one pack per packet on the data path
_FRAME_CHANNEL_DATA = struct.Struct(_FRAME_AND_CHANNEL.format + vpn.DATA_HEADER.format[1:])
_DATA_HEADERS = _FRAME_CHANNEL_DATA.size - _FRAME_AND_CHANNEL.size + chan.HEADER.size
_CHANNEL_HEADER = chan.HEADER
_SIG = fr.SIGNATURE
_DATA = FrameType.DATA
_KEEPALIVE_FRAME = fr.encode_frame(FrameType.KEEPALIVE)
_ALIVE_FRAME = fr.encode_frame(FrameType.ALIVE)


#: Closed.cause: the setup did not finish in time; the peer sent KEEPALIVEs far past the rate.
SETUP_TIMEOUT = "setup_timeout"
KEEPALIVE_FLOOD = "keepalive"
#: KEEPALIVEs left unanswered (past ``alives_per_second``) before the stream is closed: an
#: honest peer sends one per keepalive interval, and each costs us a frame to parse.
KEEPALIVE_FLOOD_AT = 64

#: Payloads at least this long are queued as they are instead of copied next to their header.
LARGE_PAYLOAD = 8192
#: The smallest frame limit a peer may announce: a full-size IP packet must fit, and a lower
#: one would make every relayed read into many tiny frames (output many times the input).
MIN_PEER_FRAME = 1500


class Role(Enum):
    CLIENT = "client"
    SERVER = "server"


class StreamState(Enum):
    NEW = "new"
    AWAIT_HELLO = "await-hello"
    DECIDING = "deciding"
    AWAIT_WELCOME = "await-welcome"
    ESTABLISHED = "established"
    CLOSED = "closed"


class StreamInput(Enum):
    SEND_HELLO = "send-hello"
    HELLO = "hello"
    ACCEPT = "accept"
    REJECT = "reject"
    WELCOME = "welcome"
    CLOSE = "close"


_S, _I = StreamState, StreamInput
TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    (_S.NEW, _I.SEND_HELLO): _S.AWAIT_WELCOME,
    (_S.AWAIT_WELCOME, _I.WELCOME): _S.ESTABLISHED,
    (_S.AWAIT_HELLO, _I.HELLO): _S.DECIDING,
    (_S.DECIDING, _I.ACCEPT): _S.ESTABLISHED,
    (_S.DECIDING, _I.REJECT): _S.CLOSED,
    **{(s, _I.CLOSE): _S.CLOSED for s in _S if s is not _S.CLOSED},
}
del _S, _I


@dataclass(frozen=True)
class StreamSettings:
    max_payload: int = fr.DEFAULT_MAX_PAYLOAD
    keepalive_interval: float = 3.0
    idle_timeout: float = 60.0
    setup_timeout: float = 10.0
    channels: str = "RS"
    caps: frozenset[str] = frozenset()
    required_caps: frozenset[str] = frozenset()
    node_addr: int = 0
    #: KEEPALIVEs answered per second at most (a burst of twice that); the rest go unanswered,
    #: so a peer that sends them and never reads cannot make us queue one ALIVE for each
    alives_per_second: float = 4.0
    #: the per-frame loops: ``auto``, ``on`` or ``off`` (:mod:`cellvpn.native`)
    fastpath: str = "auto"


@dataclass(frozen=True)
class HelloReceived:
    """Server side: a valid HELLO arrived; answer with ``accept`` or ``reject``."""

    hello: Hello
    caps: frozenset[str]


@dataclass(frozen=True)
class Established:
    """Client side: the server's WELCOME was accepted."""

    welcome: Welcome


@dataclass(frozen=True)
class Closed:
    """The stream is over. ``by_peer``: the peer sent CLOSE; otherwise we queued one."""

    code: int
    reason: str
    by_peer: bool
    #: why we closed, for counting: "" (a protocol error or our own close), or one of
    #: ``SETUP_TIMEOUT`` and ``KEEPALIVE_FLOOD``
    cause: str = ""

    @property
    def code_name(self) -> str:
        return Close(self.code).code_name


Event = HelloReceived | Established | Closed


@dataclass
class StreamStats:
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    keepalives_sent: int = 0
    keepalives_received: int = 0
    alives_received: int = 0
    #: KEEPALIVEs beyond ``alives_per_second``, left unanswered
    keepalives_unanswered: int = 0
    last_rtt: float | None = None


class StreamConnection:
    """One end of a cellvpn stream."""

    def __init__(
        self,
        role: Role,
        settings: StreamSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        self.role = role
        self.settings = settings or StreamSettings()
        self._clock = clock
        self._wallclock = wallclock
        initial = StreamState.NEW if role is Role.CLIENT else StreamState.AWAIT_HELLO
        self.machine: Machine[StreamState, StreamInput] = Machine(
            f"stream-{role.value}", initial, TRANSITIONS
        )
        #: the loops this stream runs: C or Python (:mod:`cellvpn.native`)
        self.fastpath = fast = native.load(self.settings.fastpath)
        self._pack = fast.pack
        self._reader = fr.FrameReader(self.settings.max_payload, fast.scan)
        self._seq = chan.SeqTracker()
        self._next_seq = 0
        #: small frames, coalesced into one write
        self._out = bytearray()
        #: what is ready to go, in order: sealed runs of small frames and large payloads as
        #: they came (never copied)
        self._pieces: list[bytes | bytearray | memoryview] = []
        self._pieces_size = 0
        #: the frames' timestamp (whole seconds): read once per flush, not once per frame
        self._stamp = int(wallclock())
        self._handlers: dict[int, ChannelHandler] = {}
        self._started = clock()
        self._last_rx = self._started
        self._rx_since_tick = False
        self._tx_since_tick = False
        self._keepalive_sent_at: float | None = None
        rate = self.settings.alives_per_second
        self._alives = TokenBucket(rate, max(1.0, 2 * rate), self._started)
        self.stats = StreamStats()
        #: told each keepalive round trip, in seconds, as it is measured (a histogram's observe)
        self.on_rtt: Callable[[float], object] | None = None
        self.session_id: int | None = None
        self.caps: frozenset[str] = frozenset()
        self.peer_hello: Hello | None = None
        self.welcome: Welcome | None = None
        self.closed: Closed | None = None
        #: carries data frames before they reach a handler (the server's pump), or None
        self.pump: DataPump | None = None

    # --- state ---------------------------------------------------------------------------

    @property
    def state(self) -> StreamState:
        return self.machine.state

    @property
    def established(self) -> bool:
        return self.machine.state is StreamState.ESTABLISHED

    @property
    def seq(self) -> chan.SeqTracker:
        return self._seq

    def _ended(self) -> bool:
        return self.machine.state is StreamState.CLOSED

    def register_channel(self, channel_id: int, handler: ChannelHandler) -> None:
        """Deliver the packets of ``channel_id`` to ``handler`` (register before they arrive)."""
        self._handlers[channel_id] = handler

    # --- output ----------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything queued since the last call, as one write."""
        return b"".join(self.pieces_to_send())

    def pieces_to_send(self) -> list[bytes | bytearray | memoryview]:
        """Everything queued since the last call, in order, with large payloads uncopied.

        A transport that encrypts each write (TLS) takes the pieces one by one: a run of small
        frames is one piece, and a large payload is handed over as the object it was given as,
        so a 64 KiB super-packet is never copied on its way into TLS.
        """
        self._seal()
        self._stamp = int(self._wallclock())
        pieces = self._pieces
        if pieces:
            self._pieces = []
            self._pieces_size = 0
        return pieces

    def _seal(self) -> None:
        out = self._out
        if out:
            # handed over whole (a fresh buffer takes its place), as a view: TLS slices what it
            # is given into records, and slicing a view copies nothing
            self._pieces.append(memoryview(out))
            self._pieces_size += len(out)
            self._out = bytearray()

    @property
    def pending_output(self) -> int:
        return self._pieces_size + len(self._out)

    def _frame(self, ftype: int, payload: bytes = b"") -> None:
        self._out += fr.encode_frame(
            ftype, payload, int(self._wallclock()), self.settings.node_addr
        )
        self.stats.frames_out += 1
        self._tx_since_tick = True

    def send_channel(self, channel_id: int, ptype: int, data: bytes, more: bytes = b"") -> None:
        """Queue one channel packet whose data is ``data + more`` (no join needed).

        Ignored once the stream is closed; before setup it is a programming error.
        """
        state = self.machine.state
        if state is not StreamState.ESTABLISHED:
            if state is StreamState.CLOSED:
                return
            raise RuntimeError(f"channel packet sent in stream state {state.name}")
        size = len(data) + len(more)
        seq = self._next_seq
        self._next_seq = seq + 1
        out = self._out
        out += _FRAME_AND_CHANNEL.pack(
            _SIG,
            size + 16,
            self._stamp,
            _DATA,
            self.settings.node_addr,
            0,
            channel_id,
            0,
            ptype,
            seq,
            size,
        )
        out += data
        if more:
            if len(more) >= LARGE_PAYLOAD:
                self._seal()
                self._pieces.append(memoryview(more))
                self._pieces_size += len(more)
            else:
                out += more
        self.stats.frames_out += 1
        self._tx_since_tick = True

    def send_data_packets(
        self,
        channel_id: int,
        ptype: int,
        op: int,
        usage_id: int,
        packets: Iterable[bytes | bytearray | memoryview],
    ) -> int:
        """Queue one channel packet per packet of ``packets``, each the VPN data header
        (``op``, ``usage_id``, its size) and the packet: the data path's own ``send_channel``,
        with the three headers in one pack and no call per packet. Returns the packets' bytes.

        Ignored once the stream is closed (0); before setup it is a programming error.
        """
        state = self.machine.state
        if state is not StreamState.ESTABLISHED:
            if state is StreamState.CLOSED:
                return 0
            raise RuntimeError(f"channel packet sent in stream state {state.name}")
        if self._pack is not None:
            batch = packets if isinstance(packets, list | tuple) else list(packets)
            if len(batch) > 1:  # one packet costs less in the Python loop than in the call
                return self._send_data_native(channel_id, ptype, op, usage_id, batch)
            packets = batch
        pack = _FRAME_CHANNEL_DATA.pack
        stamp, node = self._stamp, self.settings.node_addr
        seq = self._next_seq
        out = self._out
        total = count = 0
        for pkt in packets:
            size = len(pkt)
            out += pack(
                _SIG, size + _DATA_HEADERS, stamp, _DATA, node, 0,
                channel_id, 0, ptype, seq + count, size + vpn.HEADER_SIZE,
                0, op, usage_id, size,
            )  # fmt: skip
            if size >= LARGE_PAYLOAD:
                self._seal()
                out = self._out
                self._pieces.append(pkt if isinstance(pkt, memoryview) else memoryview(pkt))
                self._pieces_size += size
            else:
                out += pkt
            count += 1
            total += size
        self._next_seq = seq + count
        self.stats.frames_out += count
        if count:
            self._tx_since_tick = True
        return total

    def _send_data_native(
        self,
        channel_id: int,
        ptype: int,
        op: int,
        usage_id: int,
        batch: list[bytes | bytearray | memoryview] | tuple[bytes | bytearray | memoryview, ...],
    ) -> int:
        """``send_data_packets`` with the C loop: it packs up to each large payload, which goes
        into the pieces as it is, as in the Python loop."""
        pack = self._pack
        assert pack is not None
        stamp, node = self._stamp, self.settings.node_addr
        seq = self._next_seq
        end = len(batch)
        start = total = count = 0
        while start < end:
            stop, headed, size = pack(
                self._out, batch, start, stamp, node, channel_id, ptype, seq + count, op,
                usage_id, LARGE_PAYLOAD,
            )  # fmt: skip
            count += headed
            total += size
            if stop == end:
                break
            # batch[stop] is large: its headers are queued, its bytes go as they are
            self._seal()
            pkt = batch[stop]
            self._pieces.append(pkt if isinstance(pkt, memoryview) else memoryview(pkt))
            self._pieces_size += len(pkt)
            start = stop + 1
        self._next_seq = seq + count
        self.stats.frames_out += count
        if count:
            self._tx_since_tick = True
        return total

    # --- setup -----------------------------------------------------------------------------

    def start(self, resume_token: bytes = b"") -> None:
        """Client: queue HELLO."""
        self.machine.fire(StreamInput.SEND_HELLO)
        s = self.settings
        hello = Hello(
            version=PROTOCOL_VERSION,
            channels=s.channels,
            caps=s.caps,
            required_caps=s.required_caps,
            max_frame=s.max_payload,
            resume_token=resume_token,
            node_addr=s.node_addr,
        )
        self._frame(FrameType.HELLO, hello.encode())

    def accept(self, session_id: int, resume_token: bytes = b"", order: bytes = b"") -> None:
        """Server: answer the HELLO with WELCOME."""
        hello = self.peer_hello
        assert hello is not None
        self.machine.fire(StreamInput.ACCEPT)
        self.session_id = session_id
        welcome = Welcome(
            session_id=session_id,
            version=PROTOCOL_VERSION,
            channels=hello.channels,
            caps=self.caps,
            max_frame=self.settings.max_payload,
            resume_token=resume_token,
            node_addr=self.settings.node_addr,
            order=order,
        )
        self.welcome = welcome
        self._frame(FrameType.WELCOME, welcome.encode())

    def reject(self, code: int, reason: str) -> Closed:
        """Server: refuse the HELLO with CLOSE."""
        self.machine.fire(StreamInput.REJECT)
        return self._closing(code, reason)

    def close(
        self, code: int = CloseCode.NORMAL, reason: str = "", cause: str = ""
    ) -> Closed | None:
        """Queue CLOSE and end the stream (nothing happens if it already ended)."""
        if self.machine.state is StreamState.CLOSED:
            return None
        self.machine.fire(StreamInput.CLOSE)
        return self._closing(code, reason, cause)

    def _closing(self, code: int, reason: str, cause: str = "") -> Closed:
        self._frame(FrameType.CLOSE, Close(code, reason).encode())
        self.closed = Closed(code, reason, by_peer=False, cause=cause)
        return self.closed

    def _end(self, code: int, reason: str) -> Closed:
        closed = self.close(code, reason)
        assert closed is not None, "a stream that already ended cannot end again"
        return closed

    def _violation(self, reason: str) -> Closed:
        return self._end(CloseCode.PROTOCOL_ERROR, reason)

    def _on_hello(self, payload: memoryview) -> Event:
        if self.role is not Role.SERVER or self.machine.state is not StreamState.AWAIT_HELLO:
            return self._violation("unexpected HELLO")
        hello = Hello.decode(payload)
        self.peer_hello = hello
        s = self.settings
        if hello.max_frame and hello.max_frame < MIN_PEER_FRAME:
            return self._violation(
                f"HELLO announces frames of {hello.max_frame} bytes, "
                f"below the least of {MIN_PEER_FRAME}"
            )
        if hello.version != PROTOCOL_VERSION:
            return self._end(
                CloseCode.VERSION_MISMATCH,
                f"client speaks protocol version {hello.version}, "
                f"this server speaks {PROTOCOL_VERSION}",
            )
        unknown = [c for c in hello.channels if c not in s.channels]
        if unknown or not hello.channels or len(set(hello.channels)) != len(hello.channels):
            return self._end(
                CloseCode.CHANNEL_UNSUPPORTED,
                f"channel list {hello.channels!r} is not a list of distinct channels "
                f"among {s.channels!r}",
            )
        missing = hello.required_caps - s.caps
        if missing:
            return self._end(
                CloseCode.CAPABILITY_MISMATCH,
                "server lacks required capability " + ", ".join(sorted(missing)),
            )
        self.caps = hello.caps & s.caps
        self.machine.fire(StreamInput.HELLO)
        return HelloReceived(hello, self.caps)

    def _on_welcome(self, payload: memoryview) -> Event:
        if self.role is not Role.CLIENT or self.machine.state is not StreamState.AWAIT_WELCOME:
            return self._violation("unexpected WELCOME")
        welcome = Welcome.decode(payload)
        s = self.settings
        if welcome.max_frame and welcome.max_frame < MIN_PEER_FRAME:
            return self._violation(
                f"WELCOME announces frames of {welcome.max_frame} bytes, "
                f"below the least of {MIN_PEER_FRAME}"
            )
        if welcome.version != PROTOCOL_VERSION:
            return self._end(
                CloseCode.VERSION_MISMATCH,
                f"server speaks protocol version {welcome.version}, "
                f"this client speaks {PROTOCOL_VERSION}",
            )
        if welcome.channels != s.channels:
            return self._end(
                CloseCode.CHANNEL_UNSUPPORTED,
                f"server opened channels {welcome.channels!r}, asked for {s.channels!r}",
            )
        if not welcome.caps <= s.caps or not s.required_caps <= welcome.caps:
            return self._end(
                CloseCode.CAPABILITY_MISMATCH,
                f"server agreed to capabilities {sorted(welcome.caps)}, "
                f"offered {sorted(s.caps)}, required {sorted(s.required_caps)}",
            )
        self.machine.fire(StreamInput.WELCOME)
        self.session_id = welcome.session_id
        self.caps = welcome.caps
        self.welcome = welcome
        return Established(welcome)

    # --- input -----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Process bytes from the peer. Channel packets go to their handlers as they come."""
        if self.machine.state is StreamState.CLOSED:
            return []
        self._rx_since_tick = True
        self.stats.bytes_in += len(data)
        pump = self.pump
        try:
            if pump is not None and self.machine.state is StreamState.ESTABLISHED:
                frames = self._reader.feed(data, self._run_pump)
            else:
                frames = self._reader.feed(data)
        except DecodeError as e:
            return [self._violation(str(e))]
        if not frames:
            return []
        self.stats.frames_in += len(frames)
        events: list[Event] = []
        handlers = self._handlers
        unpack = _CHANNEL_HEADER.unpack_from
        accept = self._seq.accept
        established = self.machine.state is StreamState.ESTABLISHED
        for ftype, payload in frames:
            if ftype == 0 and established:  # DATA
                if len(payload) < 16:
                    events.append(self._violation("channel packet shorter than its header"))
                    break
                cid, _enc, ptype, seq, size = unpack(payload)
                if size != len(payload) - 16:
                    events.append(
                        self._violation(
                            f"channel packet says {size} data bytes, "
                            f"{len(payload) - 16} are present"
                        )
                    )
                    break
                if not accept(seq):
                    continue
                handler = handlers.get(cid)
                if handler is None:
                    events.append(self._violation(f"packet for channel {cid:#04x} not opened"))
                    break
                handler(ptype, payload[16:])
                if self.closed is not None:  # the handler ended the stream
                    break
                continue
            try:
                event = self._control_frame(ftype, payload)
            except DecodeError as e:
                event = self._violation(str(e))
            if event is not None:
                events.append(event)
            if self._ended():
                break
            established = self.machine.state is StreamState.ESTABLISHED
        return events

    def _run_pump(self, view: memoryview) -> int:
        """The pump's turn at the start of a read: the data frames it carried count as
        received and accepted, as if their handler had seen them."""
        assert self.pump is not None
        pos, taken = self.pump(view, self._seq.last + 1)
        if taken:
            self._seq.last += taken
            self.stats.frames_in += taken
        return pos

    def _control_frame(self, ftype: int, payload: memoryview) -> Event | None:
        if (
            ftype == FrameType.KEEPALIVE or ftype == FrameType.ALIVE
        ) and self.machine.state is not StreamState.ESTABLISHED:
            # nothing is kept alive before the setup: answering would let a peer that never
            # says HELLO make us write as much as it sends
            return self._violation(f"{FrameType(ftype).name} before the session setup")
        if ftype == FrameType.KEEPALIVE:
            self.stats.keepalives_received += 1
            if self._alives.take(self._clock()):
                self._out += _ALIVE_FRAME
                self.stats.frames_out += 1
                return None
            self.stats.keepalives_unanswered += 1
            if self.stats.keepalives_unanswered >= KEEPALIVE_FLOOD_AT:
                return self.close(
                    CloseCode.PROTOCOL_ERROR,
                    f"{KEEPALIVE_FLOOD_AT} KEEPALIVEs beyond "
                    f"{self.settings.alives_per_second:g} a second",
                    KEEPALIVE_FLOOD,
                )
            return None
        if ftype == FrameType.ALIVE:
            self.stats.alives_received += 1
            if self._keepalive_sent_at is not None:
                rtt = self.stats.last_rtt = self._clock() - self._keepalive_sent_at
                self._keepalive_sent_at = None
                if self.on_rtt is not None:
                    self.on_rtt(rtt)
            return None
        if ftype == FrameType.HELLO:
            return self._on_hello(payload)
        if ftype == FrameType.WELCOME:
            return self._on_welcome(payload)
        if ftype == FrameType.CLOSE:
            try:
                close = Close.decode(payload)
            except DecodeError:
                close = Close(CloseCode.PROTOCOL_ERROR, "unreadable CLOSE")
            self.machine.fire(StreamInput.CLOSE)
            self.closed = Closed(close.code, close.reason, by_peer=True)
            return self.closed
        if ftype == FrameType.DATA:
            return self._violation("DATA frame before the session setup finished")
        try:
            name = FrameType(ftype).name
        except ValueError:
            name = f"{ftype:#04x}"
        return self._violation(f"unsupported frame type {name}")

    # --- time ------------------------------------------------------------------------------

    def tick(self) -> list[Event]:
        """Call every ``keepalive_interval``: sends KEEPALIVE, enforces the timeouts."""
        state = self.machine.state
        if state is StreamState.CLOSED:
            return []
        now = self._clock()
        s = self.settings
        if state is not StreamState.ESTABLISHED and now - self._started >= s.setup_timeout:
            closed = self.close(
                CloseCode.PROTOCOL_ERROR,
                f"session setup not finished within {s.setup_timeout:g} s",
                SETUP_TIMEOUT,
            )
            return [closed] if closed else []
        if self._rx_since_tick:
            self._last_rx = now
        if now - self._last_rx >= s.idle_timeout:
            closed = self.close(
                CloseCode.IDLE_TIMEOUT, f"nothing received for {s.idle_timeout:g} s"
            )
            return [closed] if closed else []
        if state is StreamState.ESTABLISHED and not (self._rx_since_tick or self._tx_since_tick):
            self._out += _KEEPALIVE_FRAME
            self.stats.frames_out += 1
            self.stats.keepalives_sent += 1
            if self._keepalive_sent_at is None:
                self._keepalive_sent_at = now
        self._rx_since_tick = False
        self._tx_since_tick = False
        return []
