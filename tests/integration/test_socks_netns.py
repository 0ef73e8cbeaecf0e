"""The L4 proxy between real twistd processes: a SOCKS-only client (no TUN) and curl."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from cellvpn.lab import LAB_EDGE, NET_HOST_IP, SERVER_IP, Namespace, VpnLab, ctl_json
from tests.integration.helpers import HERE, background, last_json

SOCKSTOOL = str(HERE / "sockstool.py")
MB = 1024 * 1024

SOCKS = "127.0.0.1:1080"
SOCKS_ONLY = "vpn = false\nsocks = tcp:1080:interface=127.0.0.1\n"
PAGE = "hello from the cellvpn lab\n"


def curl(ns: Namespace, *args: str) -> Any:
    return ns.exec("curl", "-sS", "-m", "10", *args, check=False)


def test_socks_only_client_fetches_and_the_server_refuses_what_it_must(
    netns: Any, tmp_path: Path
) -> None:
    """No TUN on the client; curl through SOCKS5 gets the page (by address and by a name the
    server resolves); the server's own address and a proxy_deny network are refused, each with
    one log line naming the reason."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    lab.serve_http()
    # a name only the server can resolve (its namespace's /etc/hosts)
    (lab.srv.etc / "hosts").write_text(f"127.0.0.1 localhost\n{NET_HOST_IP} www.lab.test\n")
    server = lab.start_server(
        # the far host is in 198.18.0.0/15, which the proxy refuses unless allowed
        vpn_extra="proxy = true\nproxy_allow = 198.19.0.0/24\nproxy_deny = 198.18.0.0/16\n",
        edge=LAB_EDGE + "log_interval = 0\n",  # each refusal its own line, to be read here
    )
    server.wait_log(
        r"L4 proxy on: destinations in 198\.19\.0\.0/24 except 198\.18\.0\.0/16; this host's"
    )
    client = lab.start_client(cli, "client", section_extra=SOCKS_ONLY)
    assert "no tunnel (vpn = false)" in client.wait_log(r"VPN up: .*").group(0)
    client.wait_log(r"SOCKS5 proxy listening on 127\.0\.0\.1:1080")
    assert "cvpn-cli" not in cli.ip("link").stdout

    got = curl(cli, "--socks5", SOCKS, f"http://{NET_HOST_IP}/")
    assert got.returncode == 0 and got.stdout == PAGE, got.stderr
    got = curl(cli, "--socks5-hostname", SOCKS, "http://www.lab.test/")
    assert got.returncode == 0 and got.stdout == PAGE, got.stderr

    own = curl(cli, "--socks5", SOCKS, f"http://{SERVER_IP}:8089/")
    assert own.returncode != 0 and own.stdout == ""
    server.wait_log(
        rf"session 0x[0-9a-f]{{8}} with 192\.0\.2\.2:\d+: proxy to {re.escape(SERVER_IP)}:8089"
        rf" refused: {re.escape(SERVER_IP)} is an address of this server"
    )
    denied = curl(cli, "--socks5", SOCKS, "http://198.18.5.1/")
    assert denied.returncode != 0 and denied.stdout == ""
    server.wait_log(
        r"proxy to 198\.18\.5\.1:80 refused: 198\.18\.5\.1 is in proxy_deny 198\.18\.0\.0/16"
    )
    assert len(re.findall(r"proxy to 198\.18\.5\.1:80", server.text())) == 1

    stat = ctl_json(lab.srv, lab.server_socket, "vpn_stat")
    [session] = stat["sessions"]
    assert session["client_addr"] is None
    assert session["counters"]["proxy_from_client_bytes"] > 0
    assert session["counters"]["proxy_to_client_bytes"] > len(PAGE)
    assert stat["proxy"]["opened"] == 2 and stat["proxy"]["refused"] == 2
    status = ctl_json(cli, lab.socket("client"), "status")
    assert status["status"] == "STARTED" and status["tun"] is None
    assert client.stop() == 0
    assert server.stop() == 0


def test_a_server_with_the_proxy_off_refuses(netns: Any, tmp_path: Path) -> None:
    """proxy = false (the default): PROXY_DENIED, so curl's SOCKS CONNECT fails; one log line."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    lab.serve_http()
    server = lab.start_server()
    lab.start_client(cli, "client", section_extra=SOCKS_ONLY)
    got = curl(cli, "--socks5", SOCKS, f"http://{NET_HOST_IP}/")
    assert got.returncode != 0 and got.stdout == ""
    server.wait_log(rf"proxy to {re.escape(NET_HOST_IP)}:80 refused: proxy is off on this server")
    assert "L4 proxy on" not in server.text()


def test_100_mb_each_way_through_socks(netns: Any, tmp_path: Path) -> None:
    """Bulk both ways through the proxy: every byte arrives, in order (hashes equal), and the
    server counts the L4 bytes of the session."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    lab.start_server(vpn_extra="proxy = true\nproxy_allow = 198.19.0.0/24\n")
    lab.start_client(cli, "client", section_extra=SOCKS_ONLY)
    size = 100 * MB

    def through_socks(*args: str) -> dict[str, Any]:
        out = cli.exec(sys.executable, SOCKSTOOL, *args, timeout=120).stdout
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result

    sink = background(lab.net, tmp_path / "sink.log", "sink", "5001", NET_HOST_IP)
    sent = through_socks("send", SOCKS, NET_HOST_IP, "5001", str(size))
    got = last_json(sink, tmp_path / "sink.log")
    assert got["bytes"] == size and got["sha256"] == sent["sha256"]
    source = background(lab.net, tmp_path / "source.log", "source", "5002", NET_HOST_IP, str(size))
    received = through_socks("recv", SOCKS, NET_HOST_IP, "5002")
    assert received["bytes"] == size
    assert received["sha256"] == last_json(source, tmp_path / "source.log")["sha256"]
    [session] = ctl_json(lab.srv, lab.server_socket, "vpn_stat")["sessions"]
    assert session["counters"]["proxy_from_client_bytes"] == size
    assert session["counters"]["proxy_to_client_bytes"] == size
