"""A scripted client for tests: speaks the protocol step by step over a blocking TLS socket.

    python probe.py HOST PORT CA addr-twice

prints one JSON line per event, so a test can see exactly what the server answered.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys

from cellvpn.stream.connection import Established, Role, StreamConnection, StreamSettings
from cellvpn.wire import vpn
from cellvpn.wire.channel import CHANNEL_R, CHANNEL_S
from cellvpn.wire.service import Error, PacketType, Request, Success


def main(host: str, port: int, ca: str, script: str) -> None:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    raw = socket.create_connection((host, port), timeout=10)
    sock = ctx.wrap_socket(raw, server_hostname=host)
    conn = StreamConnection(Role.CLIENT, StreamSettings(caps=frozenset({"addr-options"})))
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
    for name, value in seen:
        print(json.dumps({"event": name, "value": value}), flush=True)
    sock.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
