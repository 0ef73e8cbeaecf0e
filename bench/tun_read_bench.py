"""Reading a TUN: a fresh ``os.read`` per packet against ``readv`` into one reused buffer.

    .venv/bin/python bench/tun_read_bench.py [--size 36] [--rounds 5] [--cold]

As root. In a namespace of its own (``cvpn-tunread-...``, removed at the end) it opens a TUN
with the vnet header, as the server does, routes 198.18.7.0/24 to it, and sends bursts of UDP
datagrams there from a socket in the same namespace; the kernel queues them on the TUN. Each
burst is then read until EAGAIN by one of two loops, timed per packet:

- ``os.read``: what TunPort does; every packet is a new ``bytes`` the size of the packet.
- ``readv`` into one reused buffer, then ``bytes(view[:n])``: the packet must be copied out,
  because it outlives the read (it waits in the session's queue or TLS's while the transport
  is full), so reuse saves the allocation but adds a copy.

By default the process first frees one 1 MiB buffer, as every tunnel process does after its
first 1 MiB socket read: glibc then raises its trim threshold and keeps freed heap for the next
burst. ``--cold`` skips that, and shows what allocation costs when each burst's memory goes
back to the kernel and is faulted in again. The two loops alternate in each round.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))

BURST = 900
BURSTS = 100
READ_SIZE = 65545  # the vnet header and the largest packet, as TunPort reads
#: the one buffer the second loop reads into
REUSED = bytearray(READ_SIZE)


def read_fresh(fd: int) -> int:
    packets = []
    append = packets.append
    read = os.read
    while True:
        try:
            append(read(fd, READ_SIZE))
        except BlockingIOError:
            return len(packets)


def read_reused(fd: int) -> int:
    packets = []
    append = packets.append
    readv = os.readv
    view = memoryview(REUSED)
    bufs = (REUSED,)
    while True:
        try:
            n = readv(fd, bufs)
        except BlockingIOError:
            return len(packets)
        append(bytes(view[:n]))


def inside(size: int, rounds: int, warm: bool) -> int:
    from cellvpn.tun.device import open_tun

    tun = open_tun("cvtr0", vnet_hdr=True)
    for cmd in (
        "ip addr add 198.18.7.1/24 dev cvtr0",
        "ip link set cvtr0 up txqueuelen 1000 mtu 65535",
    ):
        subprocess.run(cmd.split(), check=True)
    if warm:
        # what every tunnel process does early (a 1 MiB socket read freed): glibc then keeps
        # up to 2 MiB of freed heap instead of giving it back to the kernel at 128 KiB
        big = os.urandom(1 << 20)
        del big
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = b"x" * size
    time.sleep(0.3)
    read_fresh(tun.fd)  # whatever the link sent when it came up
    results: dict[str, list[float]] = {"os.read": [], "readv + copy": []}
    loops = {"os.read": read_fresh, "readv + copy": read_reused}
    count = 0
    for _ in range(rounds):
        for name, loop in loops.items():
            elapsed = 0.0
            count = 0
            for _ in range(BURSTS):
                for _ in range(BURST):
                    sender.sendto(payload, ("198.18.7.2", 9))
                start = time.perf_counter()
                count += loop(tun.fd)
                elapsed += time.perf_counter() - start
            results[name].append(elapsed / count * 1e9)
    tun.close()
    print(f"{size + 28}-byte IPv4 packets, {count} per loop and round, {rounds} rounds")
    for name, per_packet in results.items():
        print(
            f"  {name:<14} median {statistics.median(per_packet):7.0f} ns/packet"
            f"   (rounds: {', '.join(f'{x:.0f}' for x in per_packet)})"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=36, help="UDP payload bytes (default 36)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--cold", action="store_true", help="leave glibc's malloc thresholds at their start values"
    )
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        return inside(args.size, args.rounds, not args.cold)
    if os.geteuid() != 0:
        print("tun_read_bench.py needs root (a namespace and a TUN device)", file=sys.stderr)
        return 2
    from cellvpn.lab import Namespace

    ns = Namespace("tunread")
    try:
        me = [sys.executable, __file__, "--inside", "--size", str(args.size)]
        if args.cold:
            me.append("--cold")
        return subprocess.run(
            ["ip", "netns", "exec", ns.name, *me, "--rounds", str(args.rounds)], check=False
        ).returncode
    finally:
        ns.close()


if __name__ == "__main__":
    sys.exit(main())
