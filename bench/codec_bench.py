"""Frames encoded and decoded per second by the sans-IO stream (no I/O, one core), with the
C loops and with the Python ones, in one run.

    .venv/bin/python bench/codec_bench.py [--seconds 2] [--reps 3]

Encode: ``send_data_packets`` of 64 packets at a time and ``pieces_to_send``, as the client's
TUN path and the server's deliveries do. Decode: ``receive_data`` of those bytes in 16 KiB
chunks (TLS record sized) into an 'S' handler that counts, as the server's does. The figure
is the best of ``--reps`` alternating runs per mode (the machine's noise only ever slows).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cellvpn import native
from cellvpn.stream.connection import Role, StreamConnection, StreamSettings
from cellvpn.wire.channel import CHANNEL_S

OP, USAGE, PTYPE = 0xBC, 7, 2
BATCH = 64


def pair(mode: str) -> tuple[StreamConnection, StreamConnection, list[int]]:
    settings = StreamSettings(fastpath=mode)
    client = StreamConnection(Role.CLIENT, settings)
    server = StreamConnection(Role.SERVER, settings)
    client.start()
    server.receive_data(client.data_to_send())
    got = [0]

    def handler(ptype: int, data: memoryview) -> None:
        got[0] += 1

    server.register_channel(CHANNEL_S, handler)
    server.accept(1)
    client.receive_data(server.data_to_send())
    return client, server, got


def bench(mode: str, size: int, seconds: float) -> tuple[float, float]:
    client, server, got = pair(mode)
    batch = [bytes(size)] * BATCH
    encoded = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        client.send_data_packets(CHANNEL_S, PTYPE, OP, USAGE, batch)
        client.pieces_to_send()
        encoded += BATCH
    enc_rate = encoded / (time.perf_counter() - start)
    # a fresh stream to decode (seq ids must grow: a replayed stream would be dropped)
    client, server, got = pair(mode)
    count = min(int(enc_rate * seconds), 150_000_000 // (size + 73)) // BATCH * BATCH
    for _ in range(count // BATCH):
        client.send_data_packets(CHANNEL_S, PTYPE, OP, USAGE, batch)
    stream = client.data_to_send()
    pieces = [stream[i : i + 16384] for i in range(0, len(stream), 16384)]
    start = time.perf_counter()
    for piece in pieces:
        server.receive_data(piece)
    dec_rate = got[0] / (time.perf_counter() - start)
    assert got[0] == count, (got[0], count)
    return enc_rate, dec_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    modes = ["on", "off"] if native.load("auto").native else ["off"]
    if modes == ["off"]:
        print("the C module is not built: Python loops only")
    for size in (64, 1400, 65000):
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.reps):
            for mode in modes:
                enc, dec = bench(mode, size, args.seconds)
                old = best.get(mode, (0.0, 0.0))
                best[mode] = (max(old[0], enc), max(old[1], dec))
        for mode in modes:
            enc, dec = best[mode]
            loops = "C" if mode == "on" else "Python"
            print(
                f"{size:>6}-byte packets, {loops:>6} loops: {enc:>10,.0f} frames/s encoded,"
                f" {dec:>10,.0f} decoded"
            )


if __name__ == "__main__":
    main()
