"""The C module built with AddressSanitizer and UndefinedBehaviorSanitizer, loaded into Python
and fed random inputs beside the Python loops (``make fuzz-native``; a short run in the suite).

    python -m tests.native.sanitized MODULE.so [--inputs N] [--seed S]

Run it with the sanitizers' runtime preloaded (``LD_PRELOAD``, as the Makefile does): a read
past a buffer, a bad free or undefined behaviour in the wrapper (memoryview slices, the
bytearray's growth, the copies) aborts the run; a result that differs from the Python loop's is
a finding too. The pump writes to one end of a datagram socket pair, read back and compared
with ``reference_pump``, its contract written again in Python. The C loops alone are fuzzed
by ``cellvpn/native/fuzz_frames.c``.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import socket
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


PUMP_HEADERS = struct.Struct("<8sIQBQQ" + "BBBxQI" + "iIIIxxxx")
LEASES = [bytes([198, 18, 5, 2]), bytes([198, 18, 5, 3])]
HOSTS = [bytes([198, 18, 5, 1]), bytes([198, 19, 0, 1])]


def reference_pump(
    data: bytes, pos: int, max_payload: int, lease: bytes, keep: bytes, hosts: bytes,
    host_udp: bytes, flags: int, seq_next: int, allowance: int, channel: int, op: int,
    op_gso: int, vnet: bool,
) -> tuple[int, list[bytes]]:  # fmt: skip
    """What cvpn_pump_up must do, written again from its contract: the first byte not
    carried, and what was written (with its vnet header on a vnet TUN)."""
    end = len(data)
    at = pos
    while end - at >= fr.HEADER_SIZE:
        sig, size = struct.unpack_from("<8sI", data, at)
        if sig != fr.SIGNATURE or size > max_payload:
            return pos, []
        if at + fr.HEADER_SIZE + size > end:
            break
        at += fr.HEADER_SIZE + size
    keeps = [(keep[i : i + 4], keep[i + 4 : i + 8]) for i in range(0, len(keep), 8)]
    host_set = {hosts[i : i + 4] for i in range(0, len(hosts), 4)}
    ports = {int.from_bytes(host_udp[i : i + 2], "big") for i in range(0, len(host_udp), 2)}

    def masked(a: bytes, m: bytes) -> bytes:
        return bytes(x & y for x, y in zip(a, m, strict=True))

    def host_ok(pkt: bytes) -> bool:
        if flags & 2:
            return True
        if pkt[6] & 0x3F or pkt[7]:
            return False
        if pkt[9] == 1:
            return bool(flags & 1) and len(pkt) >= 28 and pkt[20] == 8
        return pkt[9] == 17 and len(pkt) >= 24 and int.from_bytes(pkt[22:24], "big") in ports

    def packet_ok(pkt: bytes) -> bool:
        if len(pkt) < 20 or pkt[0] != 0x45 or int.from_bytes(pkt[2:4], "big") != len(pkt):
            return False
        if pkt[9] == 6 or pkt[12:16] != lease:
            return False
        dst = pkt[16:20]
        if dst in host_set:
            return host_ok(pkt)
        return not any(masked(dst, m) == masked(a, m) for a, m in keeps)

    out: list[bytes] = []
    while end - pos >= fr.HEADER_SIZE:
        (size,) = struct.unpack_from("<I", data, pos + 8)
        stop = pos + fr.HEADER_SIZE + size
        if stop > end or data[pos + 20] != 0 or size < 36:
            break
        c = pos + fr.HEADER_SIZE
        cid, seq, csize = data[c], *struct.unpack_from("<QI", data, c + 4)
        vop, vsize = struct.unpack_from("<I4xI", data, c + 20)
        pkt = data[c + 36 : stop]
        if cid != channel or seq_next >= 2**64 - 1 or seq != seq_next or csize != size - 16:
            break
        if vsize != len(pkt):
            break
        header = bytes(10)
        if vop != op:
            if not op_gso or vop != op_gso or len(pkt) < 10:
                break
            vh, pkt = pkt[:10], pkt[10:]
            if vh[0] not in (0, 1, 2, 3) or vh[1] not in (0, 0x80):
                break
        if not packet_ok(pkt) or len(pkt) >= allowance:
            break
        if vop != op and vh[0] & 1:
            frag = pkt[6] & 0x3F or pkt[7]
            if not vnet or frag or pkt[9] != 17 or len(pkt) < 28 or vh[6:] != b"\x14\0\x06\0":
                break
            header = bytes([1, 0, 0, 0, 0, 0, 20, 0, 6, 0])
        out.append(header + pkt if vnet else pkt)
        allowance -= len(pkt)
        seq_next += 1
        pos = stop
    return pos, out


def pump_stream(rng: random.Random, seq: int, lease: bytes) -> bytes:
    """Data frames, mostly ones the pump carries, then bytes changed and the tail cut."""
    out = bytearray()
    for n in range(rng.randrange(10)):
        dst = rng.choice(HOSTS + LEASES + [bytes([198, 19, 7, 7])] * 4)
        proto = rng.choice([17, 17, 17, 1, 6, 47])
        body = bytearray(rng.randbytes(rng.choice([0, 4, 8, 16, 100, 1400])))
        if proto == 17 and len(body) >= 4:
            body[2:4] = rng.choice([5201, 53, 9]).to_bytes(2, "big")
        if proto == 1 and body:
            body[0] = rng.choice([8, 0])
        total = 20 + len(body) + (0 if rng.randrange(10) else rng.choice([1, -1]))
        pkt = struct.pack(
            "!BBHHHBBH4s4s", 0x45 if rng.randrange(10) else 0x46, 0, total & 0xFFFF, 1,
            0 if rng.randrange(6) else 0x2000, 64, proto, 0,
            lease if rng.randrange(8) else rng.choice(LEASES), dst,
        ) + body  # fmt: skip
        op = rng.choice([0xBC] * 8 + [0xC8] * 3 + [0])
        if op == 0xC8:  # a vnet header: plain, a UDP checksum, or anything
            vh = rng.choice([bytes(10), bytes([1, 0, 0, 0, 0, 0, 20, 0, 6, 0]), rng.randbytes(10)])
            pkt = vh + pkt
        out += PUMP_HEADERS.pack(
            fr.SIGNATURE, len(pkt) + 36, 5, 0, 0, 0, 0x53, 0, 2, (seq + n) % 2**64, len(pkt) + 20,
            0, op, 0, len(pkt),
        ) + pkt  # fmt: skip
    for _ in range(rng.randrange(3)):
        if out:
            out[rng.randrange(len(out))] = rng.randrange(256)
    if out and rng.randrange(3) == 0:
        del out[len(out) - rng.randrange(len(out) + 1) :]
    return bytes(out)


def check_pump(c: Any, rng: random.Random, ends: tuple[socket.socket, socket.socket]) -> None:
    lease = rng.choice(LEASES)
    seq = rng.choice([0, 7, 2**64 - 2, 2**64 - 1])
    data = pump_stream(rng, seq, lease)
    keep = b"".join(
        rng.choice([bytes([198, 18, 5, 0, 255, 255, 255, 0]), rng.randbytes(8)])
        for _ in range(rng.randrange(3))
    )
    hosts = b"".join(rng.sample(HOSTS, rng.randrange(3)))
    host_udp = b"".join(p.to_bytes(2, "big") for p in rng.sample([5201, 53, 7], rng.randrange(4)))
    flags = rng.randrange(4)
    allowance = rng.choice([1, 100, 2000, 2**62 - 1])
    max_payload = rng.choice([0, 100, 1500, 262144])
    vnet = rng.randrange(2) == 1
    args = (lease, keep, hosts, host_udp, flags, seq, allowance, 0x53, 0xBC, rng.choice([0, 0xC8]))
    tun, peer = ends
    got = c.pump_up(memoryview(data), 0, max_payload, tun.fileno(), vnet, *args)
    written = []
    while True:
        try:
            written.append(peer.recv(70000))
        except BlockingIOError:
            break
    want_pos, want = reference_pump(data, 0, max_payload, *args, vnet)
    assert got[0] == want_pos, (got, want_pos)
    assert written == want, "packets differ"
    ip = sum(len(p) - (10 if vnet else 0) for p in want)
    assert got[1:] == (len(want), ip, sum(map(len, want)))


def tun_stand_in() -> tuple[socket.socket, socket.socket]:
    ends = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for end in ends:
        end.setblocking(False)
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
        end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    return ends


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module")
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=20261204)
    args = parser.parse_args(argv)
    c = load(args.module)
    rng = random.Random(args.seed)
    ends = tun_stand_in()
    counts = {"scan": 0, "pack": 0, "pump": 0}
    for n in range(args.inputs):
        kind = ("scan", "pump", "scan", "pack")[n % 4]
        counts[kind] += 1
        try:
            if kind == "pump":
                check_pump(c, rng, ends)
            else:
                (check_pack if kind == "pack" else check_scan)(c, rng)
        except AssertionError as e:
            print(f"finding at input {n} (seed {args.seed}): {e}", file=sys.stderr)
            return 1
    for end in ends:
        end.close()
    print(
        f"sanitized module: {args.inputs:,} inputs (scan {counts['scan']:,},"
        f" pump {counts['pump']:,}, pack {counts['pack']:,}), 0 findings, seed {args.seed}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
