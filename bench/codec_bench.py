"""Frames encoded and decoded per second by the sans-IO stream (no I/O, one core).

    .venv/bin/python bench/codec_bench.py

Encode: ``send_channel`` of a VPN_SEND (20-byte VPN header + IPv4 packet) and ``data_to_send``
in batches of 64, as the client's TUN path does. Decode: ``receive_data`` of those bytes in
16 KiB chunks (TLS record sized) into the 'S' handler, as the server does.
"""

from __future__ import annotations

import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cellvpn.stream.connection import Role, StreamConnection, StreamSettings
from cellvpn.wire.channel import CHANNEL_S

_VPN = struct.Struct("<iIIIxxxx")


def pair() -> tuple[StreamConnection, StreamConnection, list[int]]:
    client = StreamConnection(Role.CLIENT, StreamSettings())
    server = StreamConnection(Role.SERVER, StreamSettings())
    client.start()
    server.receive_data(client.data_to_send())
    got = [0]

    def handler(ptype: int, data: memoryview) -> None:
        got[0] += 1

    server.register_channel(CHANNEL_S, handler)
    server.accept(1)
    client.receive_data(server.data_to_send())
    return client, server, got


def bench(size: int, seconds: float = 2.0) -> tuple[float, float]:
    client, server, got = pair()
    packet = bytes(size)
    header = _VPN.pack(0, 0xBC, 0, size)
    batch = 64
    encoded = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(batch):
            client.send_channel(CHANNEL_S, 2, header, packet)
        client.data_to_send()
        encoded += batch
    enc_rate = encoded / (time.perf_counter() - start)
    # a fresh stream to decode (seq ids must grow: a replayed stream would be dropped)
    client, server, got = pair()
    count = min(int(enc_rate), 150_000_000 // (size + 73))
    for _ in range(count):
        client.send_channel(CHANNEL_S, 2, header, packet)
    stream = client.data_to_send()
    pieces = [stream[i : i + 16384] for i in range(0, len(stream), 16384)]
    start = time.perf_counter()
    for piece in pieces:
        server.receive_data(piece)
    dec_rate = got[0] / (time.perf_counter() - start)
    assert got[0] == count, (got[0], count)
    return enc_rate, dec_rate


def main() -> None:
    for size in (64, 1400, 65000):
        enc, dec = bench(size)
        print(f"{size:>6}-byte packets: {enc:>10,.0f} frames/s encoded, {dec:>10,.0f} decoded")


if __name__ == "__main__":
    main()
