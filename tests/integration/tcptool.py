"""TCP ends for transfer tests, run inside namespaces; each prints one line of JSON.

sink PORT BIND            accept one connection, read to EOF, print the SHA-256
source PORT BIND N        accept one connection, send N random bytes, print their SHA-256
send HOST PORT N          connect, send N random bytes, print their SHA-256
recv HOST PORT            connect, read to EOF, print the SHA-256
echo PORT BIND            accept one connection, echo until EOF
hold HOST PORT TRIGGER    connect, echo-check once, wait for file TRIGGER, echo-check again
spoof SRC DST N           N UDP packets to DST:9 from the forged SRC (IPv4 or IPv6)
blast HOST PORT N         N bytes of 1,400-byte UDP datagrams to HOST:PORT, as fast as it can

BIND and HOST may be IPv4 or IPv6 addresses.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time

CHUNK = 256 * 1024


def listen(port: int, bind: str) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((bind, port))
    s.listen(1)
    print(json.dumps({"listening": port}), flush=True)
    conn, _ = s.accept()
    s.close()
    return conn


def read_all(conn: socket.socket) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    while chunk := conn.recv(CHUNK):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def write_n(conn: socket.socket, n: int) -> str:
    h = hashlib.sha256()
    left = n
    while left:
        chunk = os.urandom(min(CHUNK, left))
        conn.sendall(chunk)
        h.update(chunk)
        left -= len(chunk)
    conn.shutdown(socket.SHUT_WR)
    return h.hexdigest()


def exchange(conn: socket.socket, data: bytes) -> bool:
    conn.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = conn.recv(len(data) - len(got))
        if not chunk:
            return False
        got += chunk
    return got == data


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "sink":
        conn = listen(int(argv[1]), argv[2])
        digest, n = read_all(conn)
        print(json.dumps({"sha256": digest, "bytes": n}))
    elif mode == "source":
        conn = listen(int(argv[1]), argv[2])
        print(json.dumps({"sha256": write_n(conn, int(argv[3]))}))
        conn.recv(1)
    elif mode == "send":
        conn = socket.create_connection((argv[0 + 1], int(argv[2])), timeout=60)
        print(json.dumps({"sha256": write_n(conn, int(argv[3]))}))
        conn.recv(1)
    elif mode == "recv":
        conn = socket.create_connection((argv[1], int(argv[2])), timeout=60)
        digest, n = read_all(conn)
        print(json.dumps({"sha256": digest, "bytes": n}))
    elif mode == "echo":
        conn = listen(int(argv[1]), argv[2])
        while chunk := conn.recv(CHUNK):
            conn.sendall(chunk)
    elif mode == "hold":
        conn = socket.create_connection((argv[1], int(argv[2])), timeout=120)
        conn.settimeout(120)
        first = exchange(conn, b"before the cut")
        print(json.dumps({"first": first}), flush=True)
        while not os.path.exists(argv[3]):
            time.sleep(0.1)
        print(json.dumps({"second": exchange(conn, b"after the cut")}), flush=True)
    elif mode == "spoof":
        print(json.dumps({"sent": spoof(argv[1], argv[2], int(argv[3]))}))
    elif mode == "blast":
        print(json.dumps({"sent": blast(argv[1], int(argv[2]), int(argv[3]))}))
    else:
        raise SystemExit(f"unknown mode {mode}")


def blast(host: str, port: int, total: int) -> int:
    """UDP nobody acknowledges: a sender that does not slow down for a receiver that stopped."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    datagram = os.urandom(1400)
    sent = 0
    while sent < total:
        try:
            sent += s.sendto(datagram, (host, port))
        except OSError:  # ENOBUFS while the device queue is full: try again
            time.sleep(0.001)
    return sent


def spoof(src: str, dst: str, count: int) -> int:
    """UDP packets to DST:9 claiming to come from SRC; the kernel routes them as given."""
    import struct

    if ":" in dst:
        return spoof6(src, dst, count)

    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    payload = b"forged"
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0) + payload
    for i in range(count):
        total = 20 + len(udp)
        head = struct.pack(
            "!BBHHHBBH4s4s",
            0x45, 0, total, i, 0, 64, 17, 0,
            socket.inet_aton(src), socket.inet_aton(dst),
        )  # fmt: skip
        s.sendto(head + udp, (dst, 0))
        time.sleep(0.01)
    return count


def spoof6(src: str, dst: str, count: int) -> int:
    """``spoof`` for IPv6: a raw IPv6 header (IPV6_HDRINCL) with the forged source."""
    import struct

    ipv6_hdrincl = 36
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.setsockopt(socket.IPPROTO_IPV6, ipv6_hdrincl, 1)
    payload = b"forged"
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0xFFFF) + payload
    head = struct.pack(
        "!IHBB16s16s",
        0x60000000,
        len(udp),
        17,
        64,
        socket.inet_pton(socket.AF_INET6, src),
        socket.inet_pton(socket.AF_INET6, dst),
    )
    for _ in range(count):
        s.sendto(head + udp, (dst, 0))
        time.sleep(0.01)
    return count


if __name__ == "__main__":
    main(sys.argv[1:])
