"""A hostile server's ADDR_REPLY changes nothing on the client's host; a benign one still works.

The hostile server is a double: a blocking TLS server (this module run as a script) that
speaks just enough of the protocol, answering HELLO with WELCOME, REQUEST with SUCCESS and
ADDR_REQUEST with a crafted ADDR_REPLY, and prints one JSON line per event::

    python -m tests.integration.test_hostile_server_netns HOST PORT CERT KEY ADDR MASK GATEWAY

The client is the real ``twistd cellvpn-client``. Every offered address is from the lab's own
ranges (192.0.2.0/24, 198.18.0.0/15), and the refused ones are never configured.
"""

from __future__ import annotations

import itertools
import json
import secrets
import socket
import ssl
import sys
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from cellvpn.conn.pki import ensure_server_identity
from cellvpn.lab import NET_HOST_IP, Twistd, VpnLab, ctl, ctl_json, link, wait_for
from cellvpn.stream.connection import Closed, HelloReceived, Role, StreamConnection, StreamSettings
from cellvpn.wire import vpn
from cellvpn.wire.channel import CHANNEL_R, CHANNEL_S
from cellvpn.wire.service import PacketType, Request, Success
from cellvpn.wire.setup import CloseCode
from tests.integration.helpers import host_snapshot, ping

pytestmark = [pytest.mark.netns, pytest.mark.timeout(40)]

ROOT = Path(__file__).resolve().parents[2]
SERVER_IP = "192.0.2.1"
CLIENT_IP = "192.0.2.2"
PORT = 8089
REFUSED = "refused the server's address offer: "
TOO_WIDE = "is wider than /16, the widest accepted ([client] widest_overlay_prefix)"


# --- the hostile server ---------------------------------------------------------------------


def emit(event: str, value: object) -> None:
    print(json.dumps({"event": event, "value": value}), flush=True)


def serve(cert: str, key: str, go: Path, replies: list[bytes], listener: socket.socket) -> None:
    """One session after another (the client retries), the n-th answered with reply n (the
    last one again after that). A session whose reply is not the last is closed as soon as the
    file ``go`` exists, so the client reconnects and gets the next one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    for n in itertools.count():
        reply = replies[min(n, len(replies) - 1)]
        droppable = n < len(replies) - 1
        raw, _ = listener.accept()
        try:
            sock = ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError) as e:
            emit("tls-failed", str(e))
            raw.close()
            continue
        conn = StreamConnection(Role.SERVER, StreamSettings(caps=frozenset({"addr-options"})))

        def on_r(ptype: int, data: memoryview, conn: StreamConnection = conn) -> None:
            if ptype == PacketType.REQUEST:
                Request.decode(data)
                conn.send_channel(CHANNEL_R, PacketType.SUCCESS, Success(7).encode())

        def on_s(
            ptype: int, data: memoryview, conn: StreamConnection = conn, reply: bytes = reply
        ) -> None:
            packet = vpn.VpnPacket.decode(data)
            if packet.op_code == vpn.OpCode.VPN_ADDR_REQUEST:
                answer = vpn.VpnPacket(vpn.OpCode.VPN_ADDR_REPLY, reply, usage_id=7)
                conn.send_channel(CHANNEL_S, vpn.PKT_TYPE_DATA, answer.encode())
                emit("addr-reply", reply.hex())
            elif packet.op_code == vpn.OpCode.PING:
                pong = vpn.VpnPacket(vpn.OpCode.PONG).encode()
                conn.send_channel(CHANNEL_S, vpn.PKT_TYPE_PONG, pong)

        conn.register_channel(CHANNEL_R, on_r)
        conn.register_channel(CHANNEL_S, on_s)
        sock.settimeout(0.2)
        with sock:
            while conn.closed is None:
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    if droppable and go.exists():
                        conn.close(CloseCode.SHUTDOWN, "going away")
                        sock.sendall(conn.data_to_send())
                        emit("dropped", None)
                    continue
                except (OSError, ssl.SSLError):
                    data = b""
                if not data:
                    emit("gone", None)
                    break
                for event in conn.receive_data(data):
                    if isinstance(event, HelloReceived):
                        conn.accept(secrets.randbits(32) | 1)
                    elif isinstance(event, Closed):
                        emit("closed", {"code": event.code_name, "reason": event.reason})
                out = conn.data_to_send()
                if out:
                    sock.sendall(out)


def main(host: str, port: str, cert: str, key: str, go: str, *replies: str) -> None:
    """Each reply is ADDRESS/NETMASK/GATEWAY."""
    encoded = []
    for text in replies:
        address, mask, gateway = (IPv4Address(part) for part in text.split("/"))
        encoded.append(vpn.AddrReply(address, gateway, mask, 1400).encode())
    listener = socket.create_server((host, int(port)))
    emit("listening", f"{host}:{port}")
    serve(cert, key, Path(go), encoded, listener)


# --- the tests ---------------------------------------------------------------------------------


class HostileLab:
    """The client host (eth0 192.0.2.2) and the hostile server's host (eth1 192.0.2.1, the
    double on port 8089) on one veth; the namespaces go with the ``netns`` fixture."""

    def __init__(self, netns: Any, work: Path, *replies: str) -> None:
        self.work = work
        self.cli, self.srv = netns("hcli"), netns("hsrv")
        link(self.cli, f"{CLIENT_IP}/24", self.srv, f"{SERVER_IP}/24", name="eth")
        self.cli.ip("route", "add", "default", "via", SERVER_IP)
        self.tls = ensure_server_identity(work / "hostile", [SERVER_IP])
        self.log = work / "hostile.log"
        self.go = work / "go"
        self.srv.popen(
            [sys.executable, "-m", "tests.integration.test_hostile_server_netns", SERVER_IP,
             str(PORT), str(self.tls.cert), str(self.tls.key), str(self.go), *replies],
            log=self.log,
            cwd=ROOT,
        )  # fmt: skip
        wait_for(lambda: self.events("listening"), 10, what="the hostile server")
        self.sock = work / "client.sock"

    def events(self, kind: str) -> list[Any]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        found = [json.loads(line) for line in lines if line.startswith("{")]
        return [e["value"] for e in found if e["event"] == kind]

    def start_client(self, section_extra: str) -> Twistd:
        cfg = self.work / "client.cfg"
        cfg.write_text(
            "[client]\n"
            f"server = {SERVER_IP}:{PORT}\n"
            f"ca = {self.tls.ca_cert}\n"
            f"state_dir = {self.work / 'client-state'}\n"
            "tun_name = cvpn-cli\n" + section_extra + f"[control]\nsocket = {self.sock}\n"
        )
        return Twistd(self.cli, "cellvpn-client", cfg, self.work / "client.log")

    def status(self) -> dict[str, Any] | None:
        """The client's status, or None while its control socket is not there yet."""
        if not self.sock.exists():
            return None
        result: dict[str, Any] = ctl_json(self.cli, self.sock, "vpn_client", "status")
        return result

    def wait_refused(self, why: str) -> dict[str, Any]:
        """The status (JSON and text) names the refusal; a retry clears it while it runs."""

        def refused() -> dict[str, Any] | None:
            st = self.status()
            return st if st and st["last_error"] == REFUSED + why else None

        st: dict[str, Any] = wait_for(refused, 10, what="the refusal in the status")
        wait_for(
            lambda: (
                f"reason: {REFUSED}{why}" in ctl(self.cli, self.sock, "vpn_client", "status").stdout
            ),
            10,
            what="the refusal in the text status",
        )
        return st


# (case, address, netmask, gateway, default_route, the status's last_error after REFUSED)
HOSTILE = [
    ("all-of-ipv4", "198.18.5.7", "0.0.0.0", "198.18.5.1", "false",
     f"netmask 0.0.0.0 (/0) {TOO_WIDE}"),
    ("half-of-ipv4", "198.18.5.7", "128.0.0.0", "198.18.5.1", "true",
     f"netmask 128.0.0.0 (/1) {TOO_WIDE}"),
    ("client-lan", "192.0.2.130", "255.255.255.128", "192.0.2.129", "true",
     "192.0.2.128/25 overlaps 192.0.2.2/24 on eth0"),
    ("server-lan", "192.0.2.50", "255.255.255.0", "192.0.2.60", "false",
     "192.0.2.0/24 contains the server's address 192.0.2.1"),
    ("holes", "198.18.5.7", "255.0.255.0", "198.18.5.1", "false",
     "netmask 255.0.255.0 is not contiguous"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("address", "netmask", "gateway", "default_route", "why"),
    [row[1:] for row in HOSTILE],
    ids=[row[0] for row in HOSTILE],
)
def test_hostile_addr_reply_is_refused_and_changes_nothing(
    netns: Any,
    tmp_path: Path,
    address: str,
    netmask: str,
    gateway: str,
    default_route: str,
    why: str,
) -> None:
    """The client closes the stream with the reason, says it in its status and log, leaves
    its addresses, links, routes (v4 and v6, every table) and resolv.conf as they were, and
    logs no traceback; after its stop too."""
    lab = HostileLab(netns, tmp_path, f"{address}/{netmask}/{gateway}")
    before = host_snapshot(lab.cli)
    client = lab.start_client(f"default_route = {default_route}\n")
    client.wait_log(r"refused ADDR_REPLY from ")
    st = lab.wait_refused(why)
    assert st["status"] != "STARTED" and st["tun"] is None and st["routes"] == []
    assert host_snapshot(lab.cli) == before
    assert lab.events("closed")[0] == {"code": "REFUSED", "reason": REFUSED + why}
    log = client.text()
    assert f"refused ADDR_REPLY from {SERVER_IP}:{PORT} (address {address} netmask {netmask}" in log
    assert "Traceback" not in log

    assert client.stop() == 0
    assert host_snapshot(lab.cli) == before
    assert "Traceback" not in client.text()


def test_hostile_reply_on_reconnect_keeps_the_tunnel_as_it_was(netns: Any, tmp_path: Path) -> None:
    """First a benign /24, then the server drops the stream and answers the reconnect with a
    /1 for the same address: refused, CONN_LOST, and the kill switch's tunnel stays exactly as
    it was; a stop then leaves the host as before the start."""
    lab = HostileLab(
        netns, tmp_path, "198.18.5.7/255.255.255.0/198.18.5.1", "198.18.5.7/128.0.0.0/198.18.5.1"
    )
    before = host_snapshot(lab.cli)
    client = lab.start_client("default_route = true\nkill_switch = true\n")
    client.wait_log(r"VPN up: ")
    up = host_snapshot(lab.cli)
    assert "198.18.5.0/24 dev cvpn-cli" in up["routes"] and "0.0.0.0/1 dev cvpn-cli" in up["routes"]
    lab.go.write_text("go")
    st = lab.wait_refused(f"netmask 128.0.0.0 (/1) {TOO_WIDE}")
    assert st["status"] == "CONN_LOST" and st["address"] == "198.18.5.7"
    assert host_snapshot(lab.cli) == up
    assert "Traceback" not in client.text()
    ctl(lab.cli, lab.sock, "vpn_client", "stop")
    assert host_snapshot(lab.cli) == before
    assert client.stop() == 0
    assert "Traceback" not in client.text()


def test_benign_reply_reaches_gateway_pool_and_beyond(netns: Any, tmp_path: Path) -> None:
    """The real server's /24: the address has no prefix route of its own, the client adds the
    overlay route, and the gateway, the other client and (with default_route) the host behind
    the server answer; a stop leaves each host as it was."""
    lab = VpnLab(netns, tmp_path)
    a, b = lab.add_client_host(), lab.add_client_host()
    lab.start_server()
    before = {"a": host_snapshot(a), "b": host_snapshot(b)}
    lab.start_client(a, "a", section_extra="default_route = false\n")
    lab.start_client(b, "b", section_extra="default_route = true\n")
    addr_a = ctl_json(a, lab.socket("a"), "vpn_client", "status")["address"]
    addr_b = ctl_json(b, lab.socket("b"), "vpn_client", "status")["address"]
    for ns, name in ((a, "a"), (b, "b")):
        assert "noprefixroute" in ns.ip("-4", "addr", "show", "dev", "cvpn-cli").stdout
        routes = ns.ip("-4", "route").stdout
        assert "198.18.5.0/24 dev cvpn-cli proto static scope link" in routes
        assert "proto kernel" not in ns.ip("-4", "route", "show", "dev", "cvpn-cli").stdout
        st = ctl_json(ns, lab.socket(name), "vpn_client", "status")
        assert st["routes"][0] == "198.18.5.0/24 dev cvpn-cli"
    assert "0.0.0.0/1" not in a.ip("-4", "route").stdout
    assert ping(a, "198.18.5.1") and ping(a, addr_b)
    assert ping(b, "198.18.5.1") and ping(b, addr_a) and ping(b, NET_HOST_IP)
    for ns, name in ((a, "a"), (b, "b")):
        ctl(ns, lab.socket(name), "vpn_client", "stop")
        assert host_snapshot(ns) == before[name]


if __name__ == "__main__":
    main(*sys.argv[1:])
