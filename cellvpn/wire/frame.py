"""The stream frame: a 37-byte header, then its payload.

Layout (little-endian, packed), as in dap-sdk's ``dap_stream_pkt_hdr_t``::

    off size field
      0    8 signature  a0 95 96 a9 9e 5c fb fa
      8    4 size       payload bytes that follow the header
     12    8 timestamp  seconds since the epoch
     20    1 type       FrameType
     21    8 src_addr   node address of the sender
     29    8 dst_addr   node address of the receiver

cellvpn carries the stream inside TLS, so the payload is the channel packet in clear (no
Salsa20 layer) and a wrong signature or size can only come from a broken or hostile peer: the
reader raises and the session is closed, it never scans forward to resynchronise.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from cellvpn.wire.errors import DecodeError

SIGNATURE = bytes.fromhex("a09596a99e5cfbfa")
HEADER = struct.Struct("<8sIQBQQ")
HEADER_SIZE = HEADER.size  # 37

#: The default largest payload a reader accepts; a 64 KiB offload super-packet with its
#: headers fits well inside it.
DEFAULT_MAX_PAYLOAD = 256 * 1024


class FrameType(IntEnum):
    """Frame types. 0x00-0x12 and 0xff are the original's; 0x20-0x22 are cellvpn's setup."""

    DATA = 0x00
    FRAGMENT = 0x01
    KEEPALIVE = 0x11
    ALIVE = 0x12
    HELLO = 0x20
    WELCOME = 0x21
    CLOSE = 0x22
    SERVICE = 0xFF


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """A decoded frame header."""

    size: int
    timestamp: int
    type: int
    src_addr: int = 0
    dst_addr: int = 0

    def encode(self) -> bytes:
        return HEADER.pack(
            SIGNATURE, self.size, self.timestamp, self.type, self.src_addr, self.dst_addr
        )

    @classmethod
    def decode(
        cls, data: bytes | memoryview, max_payload: int = DEFAULT_MAX_PAYLOAD
    ) -> FrameHeader:
        if len(data) < HEADER_SIZE:
            raise DecodeError(f"frame header needs {HEADER_SIZE} bytes, got {len(data)}")
        sig, size, ts, ftype, src, dst = HEADER.unpack_from(data)
        _check(sig, size, max_payload)
        return cls(size, ts, ftype, src, dst)


def _check(sig: bytes, size: int, max_payload: int) -> None:
    if sig != SIGNATURE:
        raise DecodeError(f"bad frame signature {sig.hex()}")
    if size > max_payload:
        raise DecodeError(f"frame payload of {size} bytes exceeds the maximum of {max_payload}")


def encode_frame(
    ftype: int, payload: bytes = b"", timestamp: int = 0, src_addr: int = 0, dst_addr: int = 0
) -> bytes:
    """One whole frame: header and payload."""
    return HEADER.pack(SIGNATURE, len(payload), timestamp, ftype, src_addr, dst_addr) + payload


def decode_frame(
    data: bytes | memoryview, max_payload: int = DEFAULT_MAX_PAYLOAD
) -> tuple[FrameHeader, bytes]:
    """Exactly one whole frame (no trailing bytes)."""
    header = FrameHeader.decode(data, max_payload)
    if len(data) != HEADER_SIZE + header.size:
        raise DecodeError(
            f"frame says {header.size} payload bytes, {len(data) - HEADER_SIZE} are present"
        )
    return header, bytes(data[HEADER_SIZE:])


def scan_frames(
    view: memoryview, pos: int, max_payload: int
) -> tuple[list[tuple[int, memoryview]], int, int, int]:
    """The whole frames in ``view[pos:]`` as ``(type, payload view)`` pairs; the first byte
    not consumed; the bytes from there the next frame needs; and 1 if the header there is
    wrong (0 if not). The Python twin of the C loop in ``cellvpn/native/frames.h``."""
    frames: list[tuple[int, memoryview]] = []
    end = len(view)
    unpack = HEADER.unpack_from
    while end - pos >= HEADER_SIZE:
        sig, size, _ts, ftype, _src, _dst = unpack(view, pos)
        if sig != SIGNATURE or size > max_payload:
            return frames, pos, HEADER_SIZE, 1
        stop = pos + HEADER_SIZE + size
        if stop > end:
            return frames, pos, stop - pos, 0
        frames.append((ftype, view[pos + HEADER_SIZE : stop]))
        pos = stop
    return frames, pos, HEADER_SIZE, 0


#: ``scan(view, pos, max_payload) -> (frames, pos, need, bad)``: :func:`scan_frames` or its C
#: twin (``cellvpn/native/frames.h``)
Scan = Callable[[memoryview, int, int], tuple[list[tuple[int, memoryview]], int, int, int]]

#: ``pump(view) -> pos``: carries the frames at the start of ``view`` that need no decision
#: (the server's pump, :mod:`cellvpn.device.pump`) and returns where the rest begins
Pump = Callable[[memoryview], int]


class FrameReader:
    """Cuts a byte stream into frames, checking every header.

    ``feed`` returns ``(type, payload)`` pairs; the payload is a memoryview of immutable bytes,
    so a consumer may keep it. Partial input is held as a list of chunks and joined only once a
    whole frame is present, so a large frame arriving in many TLS records is copied once.
    ``scan`` is the loop that cuts (:func:`scan_frames`, or its C twin from
    :mod:`cellvpn.native`).
    """

    __slots__ = ("_chunks", "_held", "_need", "_scan", "max_payload")

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD, scan: Scan | None = None) -> None:
        self.max_payload = max_payload
        self._scan: Scan = scan or scan_frames
        self._chunks: list[bytes] = []
        self._held = 0
        self._need = HEADER_SIZE

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return self._held

    def feed(self, data: bytes, pump: Pump | None = None) -> list[tuple[int, memoryview]]:
        """Add ``data``; return every frame it completes. Raises DecodeError on a bad header.

        ``pump`` first takes the frames at the start that it can carry itself; the frames
        returned are the ones after them."""
        if self._chunks:
            self._chunks.append(data)
            self._held += len(data)
            if self._held < self._need:
                return []
            data = b"".join(self._chunks)
            self._chunks.clear()
        view = memoryview(data)
        frames, pos, self._need, bad = self._scan(
            view, 0 if pump is None else pump(view), self.max_payload
        )
        if bad:
            self._held = 0
            sig, size = HEADER.unpack_from(view, pos)[:2]
            _check(sig, size, self.max_payload)
        end = len(data)
        if pos < end:
            rest = bytes(view[pos:]) if pos else data
            self._chunks.append(rest)
            self._held = end - pos
        else:
            self._held = 0
        return frames
