"""The stream's data path (``send_data_packets``) against ``send_channel``, byte for byte."""

from __future__ import annotations

import struct

import pytest

from cellvpn.stream.connection import StreamConnection
from cellvpn.wire.channel import CHANNEL_S
from tests.stream.test_connection import establish, pair

#: error, op, usage id, size, 4 bytes of padding: the VPN data header as the wire has it
VPN_DATA = struct.Struct("<iIIIxxxx")
OP, USAGE, PTYPE = 0x0C, 0x1234ABCD, 0x02


def streams() -> tuple[StreamConnection, StreamConnection]:
    a, server_a, _ = pair()
    b, server_b, _ = pair()
    establish(a, server_a)
    establish(b, server_b)
    return a, b


@pytest.mark.parametrize(
    "sizes", [[64], [0, 1, 1400], [8191, 8192, 64], [65000, 20, 65000], [1400] * 64, []]
)
def test_the_data_path_writes_what_send_channel_writes(sizes: list[int]) -> None:
    fast, plain = streams()
    packets = [bytes([n % 251]) * size for n, size in enumerate(sizes)]
    for pkt in packets:
        plain.send_channel(CHANNEL_S, PTYPE, VPN_DATA.pack(0, OP, USAGE, len(pkt)), pkt)
    total = fast.send_data_packets(CHANNEL_S, PTYPE, OP, USAGE, [memoryview(p) for p in packets])
    assert total == sum(sizes)
    assert fast.data_to_send() == plain.data_to_send()
    assert fast.stats.frames_out == plain.stats.frames_out
    # the sequence numbers go on from there alike
    fast.send_channel(CHANNEL_S, PTYPE, b"x")
    plain.send_channel(CHANNEL_S, PTYPE, b"x")
    assert fast.data_to_send() == plain.data_to_send()


def test_the_data_path_sends_large_packets_uncopied_and_nothing_once_closed() -> None:
    fast, _ = streams()
    big = memoryview(bytes(65000))
    fast.send_data_packets(CHANNEL_S, PTYPE, OP, USAGE, [big])
    pieces = fast.pieces_to_send()
    assert any(p is big for p in pieces)
    fast.close()
    assert fast.send_data_packets(CHANNEL_S, PTYPE, OP, USAGE, [b"late"]) == 0
