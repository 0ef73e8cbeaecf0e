"""The stream between real ``twistd`` processes in two network namespaces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cellvpn.conn.congestion import available
from cellvpn.lab import Namespace, Twistd, ctl, ctl_json, link, wait_for

SERVER_IP = "192.0.2.1"
CLIENT_IP = "192.0.2.2"


def two_hosts(netns: Any) -> tuple[Namespace, Namespace]:
    srv, cli = netns("srv"), netns("cli")
    link(srv, f"{SERVER_IP}/24", cli, f"{CLIENT_IP}/24")
    return srv, cli


def start_server(
    srv: Namespace, tmp: Path, extra: str = "", server_extra: str = ""
) -> tuple[Twistd, Path]:
    cfg = tmp / "server.cfg"
    cfg.write_text(
        "[server]\n"
        f"listen = tcp:8089:interface={SERVER_IP}\n"
        "state_dir = state\n"
        f"{server_extra}"
        "[tls]\nclients = any\n"
        "[srv_vpn]\nnetwork_address = 198.18.5.0\ntun_name = cvpn-srv\n"
        "[control]\nsocket = server.sock\n" + extra
    )
    server = Twistd(srv, "cellvpn", cfg, tmp / "server.log")
    server.wait_log(r"cellvpn server listening on")
    return server, tmp / "server.sock"


def start_client(
    cli: Namespace, tmp: Path, trust: str, name: str = "client", extra: str = ""
) -> tuple[Twistd, Path]:
    cfg = tmp / f"{name}.cfg"
    cfg.write_text(
        "[client]\n"
        f"server = {SERVER_IP}:8089\n"
        f"{trust}\n"
        f"{extra}"
        "keepalive = 60\n"  # PINGs rarely, so the stream's own KEEPALIVEs show
        "default_route = false\n"
        f"state_dir = {name}-state\n"
        f"[control]\nsocket = {name}.sock\n"
    )
    return Twistd(cli, "cellvpn-client", cfg, tmp / f"{name}.log"), tmp / f"{name}.sock"


def test_session_comes_up_and_keepalives_flow(netns: Any, tmp_path: Path) -> None:
    """TLS up, session set up, KEEPALIVE/ALIVE seen at both ends (through cellvpn-ctl)."""
    srv, cli = two_hosts(netns)
    server, server_sock = start_server(srv, tmp_path)
    fp = server.wait_log(r"SHA-256 fingerprint ([0-9A-F:]{95})").group(1)
    ca = tmp_path / "state" / "tls" / "ca.pem"
    client, client_sock = start_client(cli, tmp_path, f"ca = {ca}")
    client.wait_log(r"session 0x[0-9a-f]{8} with 192\.0\.2\.1:8089 established")

    def keepalives_seen() -> Any:
        status = ctl_json(cli, client_sock, "status")
        return status if status["keepalives_sent"] >= 2 and status["alives_received"] >= 2 else None

    status = wait_for(keepalives_seen, timeout=20, what="two answered KEEPALIVEs")
    assert status["status"] == "STARTED" and status["status_code"] == 1
    assert status["keepalive_rtt_ms"] is not None
    server_status = ctl_json(srv, server_sock, "status")
    [session] = server_status["sessions"]
    assert session["session_id"] == status["session_id"]
    assert session["peer"].startswith(CLIENT_IP + ":")
    assert session["keepalives_received"] >= 2
    assert server_status["fingerprint"] == fp.replace(":", "").lower()
    text = ctl(cli, client_sock, "status").stdout
    assert text.startswith("VPN client started\n")
    assert client.stop() == 0
    server.wait_log(r"session 0x[0-9a-f]{8} with 192\.0\.2\.2:\d+ ended")
    assert server.stop() == 0


def test_wrong_ca_and_wrong_pin_are_refused_clearly(netns: Any, tmp_path: Path) -> None:
    """A client that does not trust the server says why, and does not come up."""
    srv, cli = two_hosts(netns)
    server, _ = start_server(srv, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    from cellvpn.conn.pki import ensure_server_identity

    other_ca = ensure_server_identity(other / "state", ["elsewhere.test"]).ca_cert
    bad_ca, bad_ca_sock = start_client(cli, tmp_path, f"ca = {other_ca}", "badca")
    bad_ca.wait_log(r"cannot start: .*not signed by the CA")
    bad_pin, bad_pin_sock = start_client(cli, tmp_path, "fingerprint = " + "ab" * 32, "badpin")
    bad_pin.wait_log(r"cannot start: .*fingerprint [0-9a-f]+ does not match the pinned abab")
    for sock in (bad_ca_sock, bad_pin_sock):
        status = ctl_json(cli, sock, "status")
        assert status["status"] == "STOPPED"
        assert status["last_error"]
    assert "ended before session setup" in server.wait_log(r"ended before session setup").group(0)
    bad_ca.stop()
    bad_pin.stop()
    server.stop()


def test_garbage_is_logged_and_closed_while_another_session_carries_on(
    netns: Any, tmp_path: Path
) -> None:
    """Random bytes to the port: one log line naming the peer; the good session stays up."""
    srv, cli = two_hosts(netns)
    server, server_sock = start_server(srv, tmp_path)
    ca = tmp_path / "state" / "tls" / "ca.pem"
    client, client_sock = start_client(cli, tmp_path, f"ca = {ca}")
    client.wait_log(r"session 0x[0-9a-f]{8} .* established")
    before = ctl_json(cli, client_sock, "status")
    cli.exec(
        str(Path(__file__).parents[2] / ".venv" / "bin" / "python"),
        "-c",
        "import os, socket\n"
        f"s = socket.create_connection(({SERVER_IP!r}, 8089), timeout=5)\n"
        "s.sendall(os.urandom(4096))\n"
        "s.settimeout(5)\n"
        "try:\n    s.recv(1000)\nexcept OSError:\n    pass\n",
    )
    line = server.wait_log(r"connection from 192\.0\.2\.2:(\d+) ended before session setup: (.*)")
    assert "TLS" in line.group(2)

    def keepalives(status: dict[str, Any]) -> int:
        # whichever end is idle first sends them; the other only answers
        return int(status["keepalives_sent"]) + int(status["keepalives_received"])

    wait_for(
        lambda: keepalives(ctl_json(cli, client_sock, "status")) > keepalives(before) + 1,
        timeout=15,
        what="keepalives after the garbage",
    )
    status = ctl_json(cli, client_sock, "status")
    assert status["status"] == "STARTED" and status["session_id"] == before["session_id"]
    assert len(ctl_json(srv, server_sock, "status")["sessions"]) == 1
    client.stop()
    server.stop()


def congestion_of(ns: Namespace, filter_: str) -> str:
    """The congestion control `ss` shows for the one TCP connection matching ``filter_``."""
    out = ns.exec("ss", "-tinH", "state", "established", filter_).stdout
    names = {"cubic", "bbr", "reno"} & set(out.split())
    assert len(names) == 1, out
    return names.pop()


def test_each_end_sends_with_its_congestion_control(netns: Any, tmp_path: Path) -> None:
    """The default (auto) takes cubic on a path as short as this veth, and a client's own
    choice (reno) is what its socket uses, whatever the namespace's default is."""
    srv, cli = two_hosts(netns)
    srv.exec("sysctl", "-qw", "net.ipv4.tcp_congestion_control=reno")
    server, _ = start_server(srv, tmp_path)
    ca = tmp_path / "state" / "tls" / "ca.pem"
    client, _ = start_client(cli, tmp_path, f"ca = {ca}", extra="congestion = reno\n")
    client.wait_log(r"session 0x[0-9a-f]{8} .* established")
    assert congestion_of(srv, "sport = :8089") == "cubic"
    assert congestion_of(cli, "dport = :8089") == "reno"
    assert "congestion control" not in server.text() + client.text()
    client.stop()
    server.stop()


def test_auto_sends_with_bbr_on_paths_it_does_not_take_for_a_lan(
    netns: Any, tmp_path: Path
) -> None:
    """Both ends on the default ``auto``, told that no path is a LAN (``congestion_lan_rtt =
    0``, as a WAN's RTT would): bbr on both sockets although the namespaces default to reno."""
    if "bbr" not in available():
        pytest.skip("this kernel has no bbr module loaded")
    srv, cli = two_hosts(netns)
    for ns in (srv, cli):
        ns.exec("sysctl", "-qw", "net.ipv4.tcp_congestion_control=reno")
    server, _ = start_server(srv, tmp_path, server_extra="congestion_lan_rtt = 0\n")
    ca = tmp_path / "state" / "tls" / "ca.pem"
    client, _ = start_client(cli, tmp_path, f"ca = {ca}", extra="congestion_lan_rtt = 0\n")
    client.wait_log(r"session 0x[0-9a-f]{8} .* established")
    assert congestion_of(srv, "sport = :8089") == "bbr"
    assert congestion_of(cli, "dport = :8089") == "bbr"
    assert "congestion control" not in server.text() + client.text()
    client.stop()
    server.stop()


def test_an_unusable_congestion_control_is_said_once_and_sessions_go_on(
    netns: Any, tmp_path: Path
) -> None:
    """A name the kernel does not know: one warning however many sessions, the kernel's
    default on their sockets, and the sessions work."""
    srv, cli = two_hosts(netns)
    server, server_sock = start_server(srv, tmp_path, server_extra="congestion = nosuchcc\n")
    ca = tmp_path / "state" / "tls" / "ca.pem"
    first, _ = start_client(cli, tmp_path, f"ca = {ca}", "first")
    # one host, one tunnel into a pool: the second client's address would overlap the first's
    # TUN, which its route policy refuses; without a TUN it still holds a session
    second, _ = start_client(cli, tmp_path, f"ca = {ca}", "second", extra="vpn = false\n")
    for client in (first, second):
        client.wait_log(r"session 0x[0-9a-f]{8} .* established")
    warning = server.wait_log(r"TCP congestion control 'nosuchcc' cannot be used \((.*)\);")
    assert warning.group(1)  # the kernel's reason, in words
    assert server.text().count("cannot be used") == 1
    default = srv.exec("cat", "/proc/sys/net/ipv4/tcp_congestion_control").stdout.strip()
    out = srv.exec("ss", "-tinH", "state", "established", "sport = :8089").stdout
    assert out.count(default) >= 2 and "nosuchcc" not in out
    assert len(ctl_json(srv, server_sock, "status")["sessions"]) == 2
    first.stop()
    second.stop()
    server.stop()
