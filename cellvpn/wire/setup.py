"""Session setup, cellvpn's replacement for the original's stream_ctl exchange.

The client's first frame is HELLO; the server answers WELCOME, or CLOSE with a reason. CLOSE
may also end an established stream. Each payload is a list of TLV items
``u8 tag || u16 length (little-endian) || value``; a reader skips tags it does not know, and a
tag it knows may appear once.

Items (value encodings in brackets):

==  ================  ==============================================================
 1  VERSION           [u16] protocol version the sender speaks
 2  CHANNELS          [ASCII] channel ids, e.g. "RS"
 3  CAPS              [ASCII, comma separated] capabilities offered (HELLO) or agreed
 4  REQUIRED_CAPS     [ASCII, comma separated] capabilities the client cannot do without
 5  SESSION_ID        [u32] chosen by the server
 6  REASON            [UTF-8] why a CLOSE was sent
 7  CLOSE_CODE        [u16] CloseCode
 8  MAX_FRAME         [u32] largest frame payload the sender accepts
 9  RESUME_TOKEN      [bytes] lets a returning client be recognised (sticky lease)
10  NODE_ADDR         [u64] the sender's node address
11  ORDER             [bytes] the server's signed order (billing)
==  ================  ==============================================================
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum

from cellvpn.wire.errors import DecodeError

PROTOCOL_VERSION = 1
_ITEM = struct.Struct("<BH")


class Tag(IntEnum):
    VERSION = 1
    CHANNELS = 2
    CAPS = 3
    REQUIRED_CAPS = 4
    SESSION_ID = 5
    REASON = 6
    CLOSE_CODE = 7
    MAX_FRAME = 8
    RESUME_TOKEN = 9
    NODE_ADDR = 10
    ORDER = 11


class CloseCode(IntEnum):
    """Why a stream was closed; sent in CLOSE so the peer can tell the user."""

    NORMAL = 0
    VERSION_MISMATCH = 1
    CAPABILITY_MISMATCH = 2
    CHANNEL_UNSUPPORTED = 3
    PROTOCOL_ERROR = 4
    IDLE_TIMEOUT = 5
    SHUTDOWN = 6
    TAKEN_OVER = 7
    SERVICE_STOPPED = 8
    REFUSED = 9


def encode_items(items: Iterable[tuple[int, bytes]]) -> bytes:
    out = bytearray()
    for tag, value in items:
        if len(value) > 0xFFFF:
            raise ValueError(f"setup item {tag} is too long ({len(value)} bytes)")
        out += _ITEM.pack(tag, len(value)) + value
    return bytes(out)


def decode_items(data: bytes | memoryview) -> dict[int, bytes]:
    data = bytes(data)
    items: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        if len(data) - pos < _ITEM.size:
            raise DecodeError("setup item header is cut short")
        tag, length = _ITEM.unpack_from(data, pos)
        pos += _ITEM.size
        value = data[pos : pos + length]
        if len(value) != length:
            raise DecodeError(f"setup item {tag} says {length} bytes, has {len(value)}")
        pos += length
        if tag in items:
            raise DecodeError(f"setup item {tag} appears twice")
        items[tag] = value
    return items


def _u(items: Mapping[int, bytes], tag: Tag, size: int, default: int | None = None) -> int:
    raw = items.get(tag)
    if raw is None:
        if default is None:
            raise DecodeError(f"setup item {tag.name} is missing")
        return default
    if len(raw) != size:
        raise DecodeError(f"setup item {tag.name} must be {size} bytes, got {len(raw)}")
    return int.from_bytes(raw, "little")


def _text(items: Mapping[int, bytes], tag: Tag, default: str = "") -> str:
    raw = items.get(tag)
    if raw is None:
        return default
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError(f"setup item {tag.name} is not UTF-8") from None


def _caps(items: Mapping[int, bytes], tag: Tag) -> frozenset[str]:
    text = _text(items, tag)
    if not text.isascii():
        raise DecodeError(f"setup item {tag.name} is not ASCII")
    return frozenset(c for c in text.split(",") if c)


def _caps_bytes(caps: Iterable[str]) -> bytes:
    return ",".join(sorted(caps)).encode("ascii")


_TAGS = frozenset(int(t) for t in Tag)


def _unknown(items: Mapping[int, bytes]) -> dict[int, bytes]:
    return {t: v for t, v in items.items() if t not in _TAGS}


@dataclass(frozen=True, slots=True)
class Hello:
    version: int = PROTOCOL_VERSION
    channels: str = "RS"
    caps: frozenset[str] = frozenset()
    required_caps: frozenset[str] = frozenset()
    max_frame: int = 0
    resume_token: bytes = b""
    node_addr: int = 0
    unknown: Mapping[int, bytes] = field(default_factory=dict)

    def encode(self) -> bytes:
        items: list[tuple[int, bytes]] = [
            (Tag.VERSION, self.version.to_bytes(2, "little")),
            (Tag.CHANNELS, self.channels.encode("ascii")),
            (Tag.CAPS, _caps_bytes(self.caps)),
        ]
        if self.required_caps:
            items.append((Tag.REQUIRED_CAPS, _caps_bytes(self.required_caps)))
        if self.max_frame:
            items.append((Tag.MAX_FRAME, self.max_frame.to_bytes(4, "little")))
        if self.resume_token:
            items.append((Tag.RESUME_TOKEN, self.resume_token))
        if self.node_addr:
            items.append((Tag.NODE_ADDR, self.node_addr.to_bytes(8, "little")))
        return encode_items(items)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Hello:
        items = decode_items(data)
        channels = _text(items, Tag.CHANNELS)
        if not channels.isascii():
            raise DecodeError("HELLO channels are not ASCII")
        return cls(
            version=_u(items, Tag.VERSION, 2),
            channels=channels,
            caps=_caps(items, Tag.CAPS),
            required_caps=_caps(items, Tag.REQUIRED_CAPS),
            max_frame=_u(items, Tag.MAX_FRAME, 4, 0),
            resume_token=items.get(Tag.RESUME_TOKEN, b""),
            node_addr=_u(items, Tag.NODE_ADDR, 8, 0),
            unknown=_unknown(items),
        )


@dataclass(frozen=True, slots=True)
class Welcome:
    session_id: int
    version: int = PROTOCOL_VERSION
    channels: str = "RS"
    caps: frozenset[str] = frozenset()
    max_frame: int = 0
    resume_token: bytes = b""
    node_addr: int = 0
    order: bytes = b""
    unknown: Mapping[int, bytes] = field(default_factory=dict)

    def encode(self) -> bytes:
        items: list[tuple[int, bytes]] = [
            (Tag.VERSION, self.version.to_bytes(2, "little")),
            (Tag.SESSION_ID, self.session_id.to_bytes(4, "little")),
            (Tag.CHANNELS, self.channels.encode("ascii")),
            (Tag.CAPS, _caps_bytes(self.caps)),
        ]
        if self.max_frame:
            items.append((Tag.MAX_FRAME, self.max_frame.to_bytes(4, "little")))
        if self.resume_token:
            items.append((Tag.RESUME_TOKEN, self.resume_token))
        if self.node_addr:
            items.append((Tag.NODE_ADDR, self.node_addr.to_bytes(8, "little")))
        if self.order:
            items.append((Tag.ORDER, self.order))
        return encode_items(items)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Welcome:
        items = decode_items(data)
        channels = _text(items, Tag.CHANNELS)
        if not channels.isascii():
            raise DecodeError("WELCOME channels are not ASCII")
        return cls(
            session_id=_u(items, Tag.SESSION_ID, 4),
            version=_u(items, Tag.VERSION, 2),
            channels=channels,
            caps=_caps(items, Tag.CAPS),
            max_frame=_u(items, Tag.MAX_FRAME, 4, 0),
            resume_token=items.get(Tag.RESUME_TOKEN, b""),
            node_addr=_u(items, Tag.NODE_ADDR, 8, 0),
            order=items.get(Tag.ORDER, b""),
            unknown=_unknown(items),
        )


@dataclass(frozen=True, slots=True)
class Close:
    code: int = CloseCode.NORMAL
    reason: str = ""

    def encode(self) -> bytes:
        return encode_items(
            [
                (Tag.CLOSE_CODE, self.code.to_bytes(2, "little")),
                (Tag.REASON, self.reason[:1000].encode("utf-8")),
            ]
        )

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Close:
        items = decode_items(data)
        return cls(_u(items, Tag.CLOSE_CODE, 2, 0), _text(items, Tag.REASON))

    @property
    def code_name(self) -> str:
        try:
            return CloseCode(self.code).name
        except ValueError:
            return str(self.code)
