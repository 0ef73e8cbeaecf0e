"""A scripted client for tests: speaks the protocol step by step over a blocking TLS socket.

    python probe.py HOST PORT CA addr-twice
    python probe.py HOST PORT CA bad-gso|to-host
    python probe.py HOST PORT CA wrong-key|wrong-session KEY DEPOSIT
    python probe.py HOST PORT CA pay-replay KEY DEPOSIT GO1 GO2
    python probe.py HOST PORT CA pay-and-leave KEY DEPOSIT GO1
    python probe.py HOST PORT CA grace-hold KEY DEPOSIT SECONDS

prints one JSON line per event, so a test can see exactly what the server answered.

The billing scripts read the order from WELCOME and send a paid REQUEST for DEPOSIT with a key
proof: ``wrong-key`` signs the proof with another key than KEY (whose account the REQUEST
names), ``wrong-session`` signs it for another session id. ``pay-replay`` pays properly (signs
the first receipt with KEY), waits for the file GO1, sends the same SIGN_RESPONSE again, and
keeps the session open until the file GO2 exists. ``pay-and-leave`` waits for the file GO1
when the first receipt is asked for, then sends its SIGN_RESPONSE and CLOSE together and
disconnects at once. ``grace-hold`` names a DEPOSIT the ledger does not know, stays SECONDS
(answering keepalives), prints whether grace was granted, and leaves. These print their events
as they happen.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import struct
import sys
import time
from dataclasses import replace

from cellvpn.billing.keys import KeyPair, load_key
from cellvpn.billing.proof import proof_message, sign_request
from cellvpn.billing.records import SignedOrder
from cellvpn.client.receipts import check_receipt
from cellvpn.stream.connection import Established, Role, StreamConnection, StreamSettings
from cellvpn.wire import vpn
from cellvpn.wire.channel import CHANNEL_R, CHANNEL_S
from cellvpn.wire.receipt import Receipt
from cellvpn.wire.service import Error, NotifyStopped, PacketType, Request, Success
from cellvpn.wire.setup import CloseCode

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


def tcp_fragment_gso(src: str, dst: str) -> bytes:
    """A TCPV4 super-packet whose IPv4 header has More Fragments set, with its vnet header."""
    payload = b"f" * 3000
    tcp = struct.pack("!HHIIBBHHH", 40000, 9, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
    total = 20 + len(tcp) + len(payload)
    head = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, 8, 0x2000, 64, 6, 0, socket.inet_aton(src),
        socket.inet_aton(dst),
    )  # fmt: skip
    header = struct.pack("<BBHHHH", 1, 1, 40, 1400, 20, 16)
    return header + head + tcp + payload


def udp_fragment_csum(src: str, dst: str) -> bytes:
    """A UDP packet with More Fragments set that leaves its checksum to the device."""
    packet = bytearray(udp_packet(src, dst))
    packet[6] = 0x20
    return struct.pack("<BBHHHH", 1, 0, 0, 0, 20, 6) + bytes(packet)


def with_options(src: str, dst: str) -> bytes:
    """A UDP packet with an IPv4 option (loose source route to the far host)."""
    payload = b"options"
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0) + payload
    option = bytes([131, 7, 4]) + socket.inet_aton("198.19.0.10") + b"\x00"  # LSRR + EOL
    total = 28 + len(udp)
    head = struct.pack(
        "!BBHHHBBH4s4s", 0x47, 0, total, 9, 0, 64, 17, 0, socket.inet_aton(src),
        socket.inet_aton(dst),
    )  # fmt: skip
    return head + option + udp


def connect(host: str, port: int, ca: str) -> ssl.SSLSocket:
    """TLS to the server; with a client certificate when PROBE_CERT and PROBE_KEY name one
    (a server that serves enrolled clients only)."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if os.environ.get("PROBE_CERT"):
        ctx.load_cert_chain(os.environ["PROBE_CERT"], os.environ["PROBE_KEY"])
    raw = socket.create_connection((host, port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname=host)


def main(host: str, port: int, ca: str, script: str, *args: str) -> None:
    if script in BILLING_SCRIPTS:
        billing(connect(host, port, ca), script, *args)
        return
    sock = connect(host, port, ca)
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
        for data in (
            tcp_fragment_gso(address, "198.19.0.10"),
            udp_fragment_csum(address, "198.19.0.10"),
        ):
            gso = vpn.VpnPacket(vpn.OpCode.VPN_SEND_GSO, data).encode()
            conn.send_channel(CHANNEL_S, 2, gso)
        # then one PING, so the answer shows the server read everything before it
        conn.send_channel(CHANNEL_S, 2, vpn.VpnPacket(vpn.OpCode.PING).encode())
        pump(4)
    if script == "to-host":
        request = vpn.VpnPacket(vpn.OpCode.VPN_ADDR_REQUEST).encode()
        conn.send_channel(CHANNEL_S, 2, request)
        pump(3)
        address = str(seen[2][1])
        # the host's underlay address and its gateway: not in the default to_host
        for packet in (
            udp_packet(address, "192.0.2.1"),
            udp_packet(address, "198.19.0.1"),
            udp_packet(address, "198.18.5.1"),
            with_options(address, "198.19.0.10"),
        ):
            conn.send_channel(CHANNEL_S, 2, vpn.VpnPacket(vpn.OpCode.VPN_SEND, packet).encode())
        conn.send_channel(CHANNEL_S, 2, vpn.VpnPacket(vpn.OpCode.PING).encode())
        pump(4)
    for name, value in seen:
        print(json.dumps({"event": name, "value": value}), flush=True)
    sock.close()


# --- billing scripts ------------------------------------------------------------------------

BILLING_SCRIPTS = ("wrong-key", "wrong-session", "pay-replay", "pay-and-leave", "grace-hold")


def emit(event: str, value: object) -> None:
    print(json.dumps({"event": event, "value": value}), flush=True)


def billing(sock: ssl.SSLSocket, script: str, key_file: str, deposit_hex: str, *go: str) -> None:
    key = load_key(key_file)
    deposit = bytes.fromhex(deposit_hex)
    conn = StreamConnection(Role.CLIENT, StreamSettings(caps=frozenset({"addr-options"})))
    seen: list[tuple[str, object]] = []

    def on_r(ptype: int, data: memoryview) -> None:
        if ptype == PacketType.SUCCESS:
            event: tuple[str, object] = ("success", Success.decode(data).usage_id)
        elif ptype == PacketType.ERROR:
            event = ("error", Error.decode(data).name)
        elif ptype == PacketType.SIGN_REQUEST:
            event = ("sign_request", bytes(data).hex())
        elif ptype == PacketType.NOTIFY_STOPPED:
            stopped = NotifyStopped.decode(data).error
            event = ("notify_stopped", stopped.name if stopped else None)
        else:
            event = ("r", ptype)
        seen.append(event)
        if event[0] != "sign_request":
            emit(*event)

    conn.register_channel(CHANNEL_R, on_r)
    conn.register_channel(CHANNEL_S, lambda ptype, data: None)
    conn.start()

    def receive() -> None:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return
        if not data:
            emit("closed", None)
            raise SystemExit(0)
        for event in conn.receive_data(data):
            if isinstance(event, Established):
                emit("established", event.welcome.session_id)
                seen.append(("established", event.welcome.session_id))
        sock.sendall(conn.data_to_send())

    def wait(kind: str, after: int = 0) -> tuple[str, object]:
        """Read until an event of ``kind`` or an ERROR comes (after the first ``after``)."""
        sock.sendall(conn.data_to_send())
        sock.settimeout(1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for name, value in seen[after:]:
                if name in (kind, "error"):
                    return name, value
            receive()
        emit("timeout", kind)
        raise SystemExit(1)

    def hold(path: str) -> None:
        """Keep the session alive (answering keepalives) until the file ``path`` exists."""
        sock.sendall(conn.data_to_send())
        sock.settimeout(0.2)
        deadline = time.monotonic() + 60
        while not os.path.exists(path) and time.monotonic() < deadline:
            receive()

    _, session_id = wait("established")
    assert isinstance(session_id, int) and conn.welcome is not None
    signed_order = SignedOrder.decode(conn.welcome.order)
    order = signed_order.order
    emit("order", {"hash": signed_order.hash.hex(), "provider": order.provider.hex()})
    request = Request(tx_cond=deposit, order_hash=signed_order.hash, token=order.token.encode())
    if script == "wrong-key":
        other = KeyPair.generate()
        message = proof_message(session_id, request.tx_cond, request.order_hash)
        request = replace(
            request, client_pkey_hash=key.account, extension=key.public + other.sign(message)
        )
    elif script == "wrong-session":
        request = sign_request(request, key, session_id ^ 0x5A5A5A5A)
    else:
        request = sign_request(request, key, session_id)
    conn.send_channel(CHANNEL_R, PacketType.REQUEST, request.encode())
    if script in ("wrong-key", "wrong-session"):
        wait("error")
        return
    if script == "grace-hold":
        sock.sendall(conn.data_to_send())
        sock.settimeout(0.2)
        deadline = time.monotonic() + float(go[0])
        while time.monotonic() < deadline:
            receive()
        emit("grace", any(name == "success" for name, _ in seen))
        conn.close(CloseCode.NORMAL, "grace tried")
        sock.sendall(conn.data_to_send())
        sock.close()
        return
    name, value = wait("sign_request")
    if name == "error":
        return
    receipt = Receipt.decode(bytes.fromhex(str(value)))
    why = check_receipt(receipt, order, order.price // order.units + 1, {deposit}, set())
    if why is not None:
        emit("refused", why)
        return
    signed = receipt.with_signature(key.signature(receipt.info_bytes))
    response = signed.encode()
    if script == "pay-and-leave":
        emit("asked", signed.hash.hex())
        hold(go[0])
        conn.send_channel(CHANNEL_R, PacketType.SIGN_RESPONSE, response)
        conn.close(CloseCode.NORMAL, "paid and gone")
        sock.sendall(conn.data_to_send())
        sock.close()
        emit("left", None)
        return
    mark = len(seen)
    conn.send_channel(CHANNEL_R, PacketType.SIGN_RESPONSE, response)
    if wait("success", mark)[0] == "error":
        return
    emit("paid", signed.hash.hex())
    hold(go[0])
    mark = len(seen)
    conn.send_channel(CHANNEL_R, PacketType.SIGN_RESPONSE, response)  # the same, again
    wait("success", mark)  # an ERROR (expected) ends the wait too
    hold(go[1])
    emit("done", None)
    sock.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], *sys.argv[5:])
