"""The C module built with AddressSanitizer and UndefinedBehaviorSanitizer, loaded into Python
and fed random inputs beside the Python loops (``make fuzz-native``; a short run in the suite).

    python -m tests.native.sanitized MODULE.so [--inputs N] [--seed S]

Run it with the sanitizers' runtime preloaded (``LD_PRELOAD``, as the Makefile does): a read
past a buffer, a bad free or undefined behaviour in the wrapper (memoryview slices, the
bytearray's growth, the copies) aborts the run; a result that differs from the Python loop's is
a finding too. The C loops alone are fuzzed by ``cellvpn/native/fuzz_frames.c``.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import struct
import sys
from typing import Any

from cellvpn.wire import frame as fr

#: frame + channel + VPN data header, as the wire has them
DATA_HEADERS = struct.Struct("<8sIQBQQ" + "BBBxQI" + "iIIIxxxx")
LIMITS = [0, 1, 36, 37, 200, 4096, 262144, 2**32 - 1, 2**64 - 1]


def load(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("_fastpath", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def frame_stream(rng: random.Random) -> bytes:
    out = bytearray()
    cap = rng.randrange(1, 3000)
    while len(out) < cap:
        if rng.randrange(8) == 0:
            out += rng.randbytes(rng.randrange(1, 64))
            continue
        payload = rng.randrange(200) if rng.randrange(4) else rng.randrange(5000)
        size = payload if rng.randrange(6) else rng.getrandbits(32)
        out += fr.HEADER.pack(fr.SIGNATURE, size, rng.getrandbits(64), rng.randrange(256), 0, 0)
        out += rng.randbytes(payload)
    del out[cap:]
    for _ in range(rng.randrange(4)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    if rng.randrange(2):
        del out[len(out) - rng.randrange(len(out) + 1) :]
    return bytes(out)


def check_scan(c: Any, rng: random.Random) -> None:
    data = frame_stream(rng)
    view = memoryview(data)
    pos = 0 if rng.randrange(3) else rng.randrange(len(data) + 1)
    limit = rng.choice(LIMITS)
    got = c.scan_frames(view, pos, limit)
    want = fr.scan_frames(view, pos, limit)
    assert got[1:] == want[1:], (got[1:], want[1:])
    assert [(t, bytes(p)) for t, p in got[0]] == [(t, bytes(p)) for t, p in want[0]]


def reference_pack(out: bytearray, packets: list[Any], start: int, *f: int) -> tuple[int, ...]:
    stamp, node, channel, ptype, seq, op, usage, large = f
    count = total = 0
    for i in range(start, len(packets)):
        pkt = packets[i]
        size = len(pkt)
        out += DATA_HEADERS.pack(
            fr.SIGNATURE, size + 36, stamp, 0, node, 0, channel, 0, ptype, seq + count,
            size + 20, 0, op, usage, size,
        )  # fmt: skip
        count += 1
        total += size
        if size >= large:
            return i, count, total
        out += pkt
    return len(packets), count, total


def check_pack(c: Any, rng: random.Random) -> None:
    kinds = (bytes, bytearray, memoryview)
    packets = [
        rng.choice(kinds)(rng.randbytes(rng.choice([0, 1, 64, 1400, 8191, 8192, 9000])))
        for _ in range(rng.randrange(12))
    ]
    start = rng.randrange(len(packets) + 1)
    fields = (
        rng.getrandbits(63), rng.getrandbits(64), rng.randrange(256), rng.randrange(256),
        rng.getrandbits(40), rng.getrandbits(32), rng.getrandbits(32),
        rng.choice([1, 64, 8192, 2**40]),
    )  # fmt: skip
    prefix = rng.randbytes(rng.randrange(100))
    got, want = bytearray(prefix), bytearray(prefix)
    assert c.pack_data(got, packets, start, *fields) == reference_pack(
        want, packets, start, *fields
    )
    assert got == want


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module")
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=20261204)
    args = parser.parse_args(argv)
    c = load(args.module)
    rng = random.Random(args.seed)
    for n in range(args.inputs):
        try:
            (check_pack if n % 4 == 3 else check_scan)(c, rng)
        except AssertionError as e:
            print(f"finding at input {n} (seed {args.seed}): {e}", file=sys.stderr)
            return 1
    print(
        f"sanitized module: {args.inputs:,} inputs (scan {args.inputs - args.inputs // 4:,},"
        f" pack {args.inputs // 4:,}), 0 findings, seed {args.seed}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
