"""A scripted client for tests: speaks the protocol step by step over a blocking TLS socket.

    python probe.py HOST PORT CA addr-twice

prints one JSON line per event, so a test can see exactly what the server answered.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import sys

from cellvpn.stream.connection import Established, Role, StreamConnection, StreamSettings
from cellvpn.wire import vpn
from cellvpn.wire.channel import CHANNEL_R, CHANNEL_S
from cellvpn.wire.service import Error, PacketType, Request, Success

BAD_HEADERS = [
    struct.pack("<BBHHHH", 0x10, 0, 0, 0, 0, 0),  # unknown flag
    struct.pack("<BBHHHH", 1, 3, 28, 1400, 20, 6),  # UDP fragmentation offload
    struct.pack("<BBHHHH", 1, 1, 28, 1400, 20, 16),  # TCP super-packet that is UDP
    struct.pack("<BBHHHH", 1, 0, 0, 0, 20, 40),  # checksum offset outside the header
    struct.pack("<BBHHHH", 1, 4, 28, 1400, 20, 16),  # TCPV6 on IPv4
]


def udp_packet(src: str, dst: str) -> bytes:
    payload = b"offload"
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0) + payload
    total = 20 + len(udp)
    head = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, 7, 0, 64, 17, 0, socket.inet_aton(src),
        socket.inet_aton(dst),
    )  # fmt: skip
    return head + udp


def main(host: str, port: int, ca: str, script: str) -> None:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    raw = socket.create_connection((host, port), timeout=10)
    sock = ctx.wrap_socket(raw, server_hostname=host)
    caps = frozenset({"addr-options", "offload"} if script == "bad-gso" else {"addr-options"})
    conn = StreamConnection(Role.CLIENT, StreamSettings(caps=caps))
    seen: list[tuple[str, object]] = []

    def on_r(ptype: int, data: memoryview) -> None:
        if ptype == PacketType.SUCCESS:
            seen.append(("success", Success.decode(data).usage_id))
        elif ptype == PacketType.ERROR:
            seen.append(("error", Error.decode(data).name))
        else:
            seen.append(("r", ptype))

    def on_s(ptype: int, data: memoryview) -> None:
        p = vpn.VpnPacket.decode(data)
        if p.op_code == vpn.OpCode.VPN_ADDR_REPLY:
            seen.append(("addr", str(vpn.AddrReply.decode(p.data).client)))
        elif p.op_code == vpn.OpCode.PROBLEM:
            seen.append(("problem", vpn.ProblemCode(p.code).name))
        else:
            seen.append(("s", p.op_code))

    conn.register_channel(CHANNEL_R, on_r)
    conn.register_channel(CHANNEL_S, on_s)
    conn.start()

    def pump(until: int) -> None:
        sock.sendall(conn.data_to_send())
        while len(seen) < until:
            data = sock.recv(65536)
            if not data:
                raise SystemExit("server closed the connection")
            for event in conn.receive_data(data):
                if isinstance(event, Established):
                    seen.append(("established", event.welcome.session_id))
            sock.sendall(conn.data_to_send())

    pump(1)
    conn.send_channel(CHANNEL_R, PacketType.REQUEST, Request().encode())
    pump(2)
    if script == "addr-twice":
        request = vpn.VpnPacket(vpn.OpCode.VPN_ADDR_REQUEST).encode()
        conn.send_channel(CHANNEL_S, 2, request)
        pump(3)
        conn.send_channel(CHANNEL_S, 2, request)
        pump(4)
    if script == "bad-gso":
        request = vpn.VpnPacket(vpn.OpCode.VPN_ADDR_REQUEST).encode()
        conn.send_channel(CHANNEL_S, 2, request)
        pump(3)
        address = str(seen[2][1])
        for header in BAD_HEADERS:
            packet = udp_packet(address, "198.19.0.10")
            gso = vpn.VpnPacket(vpn.OpCode.VPN_SEND_GSO, header + packet).encode()
            conn.send_channel(CHANNEL_S, 2, gso)
        # then one PING, so the answer shows the server read everything before it
        conn.send_channel(CHANNEL_S, 2, vpn.VpnPacket(vpn.OpCode.PING).encode())
        pump(4)
    for name, value in seen:
        print(json.dumps({"event": name, "value": value}), flush=True)
    sock.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
