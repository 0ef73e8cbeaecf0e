"""TCP through a SOCKS5 proxy for the namespace tests; prints one line of JSON.

send PROXY HOST PORT N    connect to HOST:PORT through PROXY (host:port), send N random
                          bytes, half-close, wait for the close; print their SHA-256
recv PROXY HOST PORT      connect to HOST:PORT through PROXY, read to EOF, print the SHA-256
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import socket
import struct
import sys

CHUNK = 256 * 1024


def socks_connect(proxy: str, host: str, port: int) -> socket.socket:
    phost, pport = proxy.rsplit(":", 1)
    conn = socket.create_connection((phost, int(pport)), timeout=60)
    conn.sendall(b"\x05\x01\x00")
    if recv_exact(conn, 2) != b"\x05\x00":
        raise SystemExit("the proxy refused the no-authentication method")
    address = ipaddress.IPv4Address(host)
    conn.sendall(b"\x05\x01\x00\x01" + address.packed + struct.pack("!H", port))
    answer = recv_exact(conn, 10)
    if answer[1] != 0:
        print(json.dumps({"reply": answer[1]}))
        raise SystemExit(1)
    return conn


def recv_exact(conn: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = conn.recv(n - len(got))
        if not chunk:
            raise SystemExit("the proxy closed the connection")
        got += chunk
    return got


def main(argv: list[str]) -> None:
    mode, proxy, host, port = argv[0], argv[1], argv[2], int(argv[3])
    conn = socks_connect(proxy, host, port)
    h = hashlib.sha256()
    n = 0
    if mode == "send":
        left = int(argv[4])
        while left:
            chunk = os.urandom(min(CHUNK, left))
            conn.sendall(chunk)
            h.update(chunk)
            left -= len(chunk)
            n += len(chunk)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)
    else:
        while chunk := conn.recv(CHUNK):
            h.update(chunk)
            n += len(chunk)
    print(json.dumps({"sha256": h.hexdigest(), "bytes": n}))


if __name__ == "__main__":
    main(sys.argv[1:])
