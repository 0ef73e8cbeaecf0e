"""The channel packet: a 16-byte header, then the channel's data.

Layout (little-endian, packed), as in dap-sdk's ``dap_stream_ch_pkt_hdr_t``::

    off size field
      0    1 id         channel id: ord('R') service and billing, ord('S') VPN
      1    1 enc_type   unused, 0
      2    1 type       channel packet type (the 'S' receiver dispatches on op_code instead)
      3    1 padding
      4    8 seq_id     per stream, +1 for every channel packet sent, whatever its channel
     12    4 data_size  bytes of data that follow
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cellvpn.wire.errors import DecodeError

HEADER = struct.Struct("<BBBxQI")
HEADER_SIZE = HEADER.size  # 16

CHANNEL_R = ord("R")
CHANNEL_S = ord("S")


@dataclass(frozen=True, slots=True)
class ChannelHeader:
    id: int
    type: int
    seq_id: int
    data_size: int
    enc_type: int = 0

    def encode(self) -> bytes:
        return HEADER.pack(self.id, self.enc_type, self.type, self.seq_id, self.data_size)


def encode_channel_packet(channel: int, ptype: int, seq_id: int, data: bytes = b"") -> bytes:
    return HEADER.pack(channel, 0, ptype, seq_id, len(data)) + data


def decode_channel_packet(data: bytes | memoryview) -> tuple[ChannelHeader, bytes]:
    """A whole channel packet; its ``data_size`` must equal the bytes that follow the header."""
    if len(data) < HEADER_SIZE:
        raise DecodeError(f"channel header needs {HEADER_SIZE} bytes, got {len(data)}")
    cid, enc, ptype, seq, size = HEADER.unpack_from(data)
    if size != len(data) - HEADER_SIZE:
        raise DecodeError(
            f"channel packet says {size} data bytes, {len(data) - HEADER_SIZE} are present"
        )
    return ChannelHeader(cid, ptype, seq, size, enc), bytes(data[HEADER_SIZE:])


class SeqTracker:
    """The receiver's check of a stream's ``seq_id``.

    A value at or below the last accepted one is a replay: ``accept`` returns False and the
    packet must be dropped. A value that skips ahead is accepted and counted as a gap.
    """

    __slots__ = ("gaps", "last", "missing", "replays")

    def __init__(self) -> None:
        self.last = -1
        self.replays = 0
        self.gaps = 0
        self.missing = 0

    def accept(self, seq_id: int) -> bool:
        last = self.last
        if seq_id == last + 1:
            self.last = seq_id
            return True
        if seq_id <= last:
            self.replays += 1
            return False
        self.gaps += 1
        self.missing += seq_id - last - 1
        self.last = seq_id
        return True
