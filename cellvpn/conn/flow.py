"""Back-pressure between one stream and the TCP sockets relayed over it, both ways.

The L4 proxy (server) and the SOCKS listener (client) both carry many TCP sockets over one
stream. Neither side may buffer without bound, so:

- while the stream's transport is full, every relayed socket stops reading;
- while any relayed socket's write buffer is full, the stream's transport stops reading.

The stream's fullness comes from :class:`~cellvpn.conn.protocol.StreamProtocol`'s ``on_pause`` /
``on_resume``; a socket's from a small producer registered on its transport.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from cellvpn.conn.protocol import StreamProtocol

#: Largest SEND/RECV payload: a 64 KiB TCP read makes two packets, each well inside a frame.
CHUNK = 60 * 1024
#: Smallest: a peer announcing tiny frames must not make one read into thousands of packets.
MIN_CHUNK = 16 * 1024
#: Frame payload taken by the channel header (16) and the VPN header (20).
_OVERHEAD = 36


def chunk_size(peer_max_frame: int) -> int:
    """The SEND/RECV payload size that fits the peer's announced frame limit (0 = none told),
    or 0 when that limit is below :data:`MIN_CHUNK`: such a peer gets no relay, since cutting
    each read into many small packets would make the output a multiple of the input."""
    if peer_max_frame <= 0:
        return CHUNK
    size = min(CHUNK, peer_max_frame - _OVERHEAD)
    return size if size >= MIN_CHUNK else 0


@implementer(IPushProducer)
class _WriteWatch:
    """Registered on a socket's transport only to hear when its write buffer fills and drains."""

    def __init__(self, flow: StreamFlow, transport: Any) -> None:
        self.flow = flow
        self.transport = transport

    def pauseProducing(self) -> None:
        self.flow.socket_full(self.transport)

    def resumeProducing(self) -> None:
        self.flow.socket_drained(self.transport)

    def stopProducing(self) -> None:
        self.flow.socket_drained(self.transport)


class StreamFlow:
    """Pauses relayed sockets while the stream is full, and the stream while a socket is full."""

    def __init__(self, proto: StreamProtocol) -> None:
        self.proto = proto
        self._sockets: dict[Any, _WriteWatch] = {}
        self._full: set[Any] = set()
        self.stream_paused_by_us = False
        #: the sockets are paused for a rate limit, whatever the stream says
        self.sockets_held = False
        proto.on_pause.append(self._stream_full)
        proto.on_resume.append(self._stream_drained)

    def attach(self, transport: Any) -> None:
        """Relay ``transport`` under this flow: paused now if the stream is full."""
        watch = _WriteWatch(self, transport)
        self._sockets[transport] = watch
        transport.registerProducer(watch, True)
        if self.proto.paused or self.sockets_held:
            transport.pauseProducing()

    def detach(self, transport: Any) -> None:
        """Forget ``transport`` (before closing it: a registered producer would hold it open)."""
        if self._sockets.pop(transport, None) is not None:
            transport.unregisterProducer()
        self.socket_drained(transport)

    def close(self) -> None:
        """Forget every socket and stop listening to the stream; let the stream read again."""
        for transport in list(self._sockets):
            self.detach(transport)
        self._full.clear()
        self._resume_stream()
        for listeners, listener in (
            (self.proto.on_pause, self._stream_full),
            (self.proto.on_resume, self._stream_drained),
        ):
            if listener in listeners:
                listeners.remove(listener)

    def socket_full(self, transport: Any) -> None:
        """``transport`` cannot take more: stop reading the stream until it drains."""
        if transport not in self._sockets:
            return
        self._full.add(transport)
        if not self.stream_paused_by_us:
            self.stream_paused_by_us = True
            self.proto.hold_reading("relay")

    def socket_drained(self, transport: Any) -> None:
        self._full.discard(transport)
        if not self._full:
            self._resume_stream()

    def _resume_stream(self) -> None:
        if self.stream_paused_by_us:
            self.stream_paused_by_us = False
            self.proto.release_reading("relay")

    def _stream_full(self) -> None:
        for transport in list(self._sockets):
            transport.pauseProducing()

    def _stream_drained(self) -> None:
        if self.sockets_held:
            return
        for transport in list(self._sockets):
            transport.resumeProducing()

    def hold_sockets(self) -> None:
        """Stop reading every relayed socket until ``release_sockets`` (a rate limit)."""
        if not self.sockets_held:
            self.sockets_held = True
            for transport in list(self._sockets):
                transport.pauseProducing()

    def release_sockets(self) -> None:
        if self.sockets_held:
            self.sockets_held = False
            if not self.proto.paused:
                self._stream_drained()
