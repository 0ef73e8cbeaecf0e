"""Who may use a server: enrolled clients, revocation, kicks, pins across a renewal, and paid
service for anonymous clients. Real twistd processes, driven by cellvpn-ctl only."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import Any

from cellvpn.lab import Twistd, VpnLab, ctl, ctl_json, wait_for
from tests.integration.helpers import billing_section, ping, wallet, wallet_section


def add(lab: VpnLab, name: str) -> Path:
    out = lab.work / f"{name}.cfg"
    done = ctl(lab.srv, lab.server_socket, "client", "add", name, "--out", str(out))
    assert f"enrolled client {name}: certificate " in done.stdout
    assert f"wrote {out} (mode 0600" in done.stdout
    return out


def sessions_by_client(lab: VpnLab) -> dict[str, dict[str, Any]]:
    stat_ = ctl_json(lab.srv, lab.server_socket, "vpn_stat")
    return {s["client"]: s for s in stat_["sessions"] if s.get("client")}


def test_enrolled_clients_kicks_and_revocation(netns: Any, tmp_path: Path) -> None:
    """Default settings refuse a client without a certificate (a line on both sides); a file
    from ``client add`` brings a fresh client up; ``session kick`` closes one session;
    ``client revoke`` closes the live one and refuses the next handshake, also after a
    restart; ``client list`` and ``vpn_stat`` name them."""
    lab = VpnLab(netns, tmp_path)
    one, two = lab.add_client_host(), lab.add_client_host()
    server = lab.start_server(clients=None)  # [tls] clients left at its default
    server.wait_log(r"clients must be enrolled \(\[tls\] clients = enrolled\)")
    assert "open relay" not in server.text()

    anon = lab.start_client(one, "anon", wait=False)
    anon.wait_log(r"cannot start: .*certificate required \(the server requires a client cert")
    server.wait_log(
        r"refused \(not_enrolled\): connection from 192\.0\.2\.2:\d+ refused: it presented no "
        r"client certificate"
    )
    status = ctl_json(one, lab.socket("anon"), "vpn_client", "status")
    assert "requires a client certificate" in status["last_error"]
    anon.stop()

    alice_cfg, bob_cfg = add(lab, "alice"), add(lab, "bob")
    assert stat.S_IMODE(alice_cfg.stat().st_mode) == 0o600
    assert "-----BEGIN PRIVATE KEY-----" in alice_cfg.read_text()
    again = ctl(
        lab.srv, lab.server_socket, "client", "add", "alice", "--out", str(tmp_path / "x"),
        check=False,
    )  # fmt: skip
    assert again.returncode != 0 and "enrolled already" in again.stderr
    alice = lab.start_enrolled_client(one, "alice", alice_cfg)
    bob = lab.start_enrolled_client(two, "bob", bob_cfg)
    assert ping(one, "198.18.5.1") and ping(two, "198.18.5.1")
    server.wait_log(r"session 0x[0-9a-f]{8} with 192\.0\.2\.2:\d+ \(client alice\) established")
    live = sessions_by_client(lab)
    assert set(live) == {"alice", "bob"}
    listed = {
        c["name"]: c for c in ctl_json(lab.srv, lab.server_socket, "client", "list")["clients"]
    }
    assert listed["alice"]["sessions"] == [live["alice"]["session_id"]]
    assert listed["bob"]["state"] == "ok" and listed["bob"]["last_seen"] is not None
    table = ctl(lab.srv, lab.server_socket, "client", "list").stdout
    assert re.search(r"^alice\s+[0-9a-f]+\s+\S+ \S+ UTC\s+ok\s+", table, re.MULTILINE)
    assert "client.............alice" in ctl(lab.srv, lab.server_socket, "vpn_stat").stdout

    kicked = live["bob"]["session_id"]
    done = ctl(lab.srv, lab.server_socket, "session", "kick", f"{kicked:#x}")
    assert done.stdout.startswith(f"closed session {kicked:#010x} with 192.0.2.3:")
    bob.wait_log(r"server closed the stream \(REFUSED\): closed by the server's operator")
    assert sessions_by_client(lab)["alice"]["session_id"] == live["alice"]["session_id"]

    done = ctl(lab.srv, lab.server_socket, "client", "revoke", "alice")
    assert f"closed 1 live session(s): {live['alice']['session_id']:#010x}" in done.stdout
    alice.wait_log(r"server closed the stream \(REFUSED\): client 'alice' was revoked")
    alice.wait_log(r"reconnect failed: .*client 'alice' \(certificate [0-9a-f]+\) was revoked")
    server.wait_log(r"refused \(revoked\): 192\.0\.2\.2:\d+ refused: client 'alice'")
    status = ctl_json(one, lab.socket("alice"), "vpn_client", "status")
    assert status["status"] == "CONN_LOST" and "was revoked" in status["last_error"]
    wait_for(lambda: "bob" in sessions_by_client(lab), timeout=20, what="bob back after the kick")
    assert "alice" not in sessions_by_client(lab)
    listed = {
        c["name"]: c for c in ctl_json(lab.srv, lab.server_socket, "client", "list")["clients"]
    }
    assert listed["alice"]["state"] == "revoked" and listed["alice"]["sessions"] == []
    saved = json.loads((tmp_path / "state" / "clients.json").read_text())
    assert [c["revoked_at"] is not None for c in saved["clients"]] == [True, False]

    alice.stop()
    bob.stop()
    server.stop()
    server = lab.start_server(clients=None)
    server.wait_log(r"1 enrolled, 1 revoked")
    fresh = lab.start_enrolled_client(one, "alice2", alice_cfg, wait=False)
    fresh.wait_log(r"cannot start: .*client 'alice' \(certificate [0-9a-f]+\) was revoked")
    fresh.stop()
    server.stop()


def test_pins_of_the_key_and_the_ca_survive_a_renewal(netns: Any, tmp_path: Path) -> None:
    """A changed [tls] names renews the certificate with the same key: clients pinned by the
    server key (SPKI) or trusting the CA still connect; the old certificate pin, which warned
    while it matched, is refused with the reason."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    server = lab.start_server()
    spki = server.wait_log(r"TLS server key SHA-256 \(SPKI\) ([0-9a-f]{64})").group(1)
    leaf = server.wait_log(r"SHA-256 fingerprint ([0-9A-F:]{95})").group(1)
    assert "this server is an open relay" in server.text()
    status = ctl_json(lab.srv, lab.server_socket, "status")
    assert status["server_key"] == spki and status["clients"] == "any"

    trust = {
        "leaf": f"fingerprint = {leaf}\n",
        "key": f"server_key = {spki}\n",
        "ca": "",  # the lab's client config trusts the CA file
    }

    def client(name: str, how: str) -> Twistd:
        extra = trust[how]
        cfg = lab.client_config(name, section_extra="default_route = false\n" + extra)
        if how != "ca":
            cfg.write_text(re.sub(r"^ca = .*\n", "", cfg.read_text(), flags=re.MULTILINE))
        return Twistd(cli, "cellvpn-client", cfg, tmp_path / f"{name}.log")

    pinned = client("leaf1", "leaf")
    pinned.wait_log(r"VPN up: ")
    pinned.wait_log(r"pinned by its fingerprint .* stops matching when the server renews it")
    assert f"server_key = {spki}" in pinned.text()
    status = ctl_json(cli, lab.socket("leaf1"), "vpn_client", "status")
    assert "stops matching when the server renews it" in status["warning"]
    assert (
        "warning: the server certificate is pinned by its fingerprint"
        in ctl(cli, lab.socket("leaf1"), "vpn_client", "status").stdout
    )
    pinned.stop()

    server.stop()
    server = lab.start_server(tls_extra="")  # same names: no renewal
    assert "issued a new TLS server certificate" not in server.text()
    server.stop()
    cfg = tmp_path / "server.cfg"
    cfg.write_text(cfg.read_text().replace("names = 192.0.2.1\n", "names = 192.0.2.1, vpn.test\n"))
    server = Twistd(lab.srv, "cellvpn", cfg, tmp_path / "server2.log")
    server.wait_log(r"TUN cvpn-srv up")
    server.wait_log(r"issued a new TLS server certificate .*names changed\), same key")
    assert server.wait_log(r"SHA-256 \(SPKI\) ([0-9a-f]{64})").group(1) == spki
    assert server.wait_log(r"SHA-256 fingerprint ([0-9A-F:]{95})").group(1) != leaf

    for name, how in (("key1", "key"), ("ca1", "ca")):
        up = client(name, how)
        up.wait_log(r"VPN up: ")
        up.stop()
    stale = client("leaf2", "leaf")
    stale.wait_log(r"cannot start: server certificate fingerprint [0-9a-f]{64} does not match")
    assert "pin the server's key instead" in stale.text()
    stale.stop()
    server.stop()


def test_paid_service_for_anonymous_clients(netns: Any, tmp_path: Path) -> None:
    """clients = any, a price and no free service: a client without a certificate pays and
    is served; the server does not call itself an open relay."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    server = lab.start_server(
        extra=billing_section(1000, "B", 8 * 1024 * 1024), vpn_extra="allow_free_srv = false\n"
    )
    assert "open relay" not in server.text()
    key, _ = wallet(tmp_path, "client", 100_000)
    lab.start_client(
        cli,
        "client",
        section_extra="default_route = false\n",
        extra=wallet_section(key, deposit_value=50_000),
    )
    assert ping(cli, "198.18.5.1")
    [session] = ctl_json(lab.srv, lab.server_socket, "vpn_stat")["sessions"]
    assert session["client"] is None and session["billing"] is not None
    server.stop()
