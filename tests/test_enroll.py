"""The client file that cellvpn-ctl client add writes: loadable as it is, private, QR-able."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cellvpn.config import ConfigError, load_client_config
from cellvpn.config.parsers import InlinePem
from cellvpn.conn import pki
from cellvpn.conn.tls import client_tls
from cellvpn.control.text import client_list
from cellvpn.enroll import EnrollFileError, client_file, qr_text, write_private


def answer(tmp_path: Path) -> tuple[dict[str, object], bytes]:
    identity = pki.ensure_server_identity(tmp_path / "srv", ["vpn.test"])
    authority = pki.load_authority(tmp_path / "srv")
    request = pki.new_client_request("alice")
    cert = pki.sign_client_request(authority, "alice", request.csr_pem, 30)
    return {
        "serial": pki.serial_text(cert),
        "not_after": cert.not_valid_after_utc.timestamp(),
        "server": "vpn.test:8089",
        "server_name": "vpn.test",
        "server_key": identity.spki,
        "ca": authority.pem.decode(),
        "certificate": pki.certificate_pem(cert).decode(),
    }, request.key_pem


def test_the_file_loads_as_it_is_and_makes_a_tls_client(tmp_path: Path) -> None:
    got, key = answer(tmp_path)
    path = tmp_path / "alice.cfg"
    write_private(path, client_file("alice", got, key))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config = load_client_config(path)
    c = config.client
    assert config.warnings == ()
    assert str(c.server) == "vpn.test:8089" and c.server_name == "vpn.test"
    assert isinstance(c.ca, InlinePem) and isinstance(c.private_key, InlinePem)
    assert isinstance(c.certificate, InlinePem)
    assert pki.load_certificates(c.ca)[0] == pki.load_authority(tmp_path / "srv").cert
    client_tls("vpn.test", c.ca, None, c.certificate, c.private_key)  # OpenSSL takes them
    assert f"# server_key = {got['server_key']}" in path.read_text()


def test_an_existing_file_is_kept_unless_replaced(tmp_path: Path) -> None:
    path = tmp_path / "x.cfg"
    path.write_text("mine\n")
    with pytest.raises(EnrollFileError, match="exists already"):
        write_private(path, "new\n")
    assert path.read_text() == "mine\n"
    write_private(path, "new\n", replace=True)
    assert path.read_text() == "new\n" and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_broken_inline_pem_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.cfg"
    path.write_text("[client]\nca =\n    -----BEGIN CERTIFICATE-----\n    ***\n")
    with pytest.raises(ConfigError) as e:
        load_client_config(path)
    assert "[client] ca" in str(e.value) and "whole BEGIN ... END blocks" in str(e.value)


def test_the_file_fits_a_qr_code(tmp_path: Path) -> None:
    got, key = answer(tmp_path)
    picture = qr_text(client_file("alice", got, key))
    lines = picture.splitlines()
    assert len(lines) > 40 and all(set(line) <= set(" \xa0█▀▄") for line in lines)
    with pytest.raises(EnrollFileError, match="too large for one QR code"):
        qr_text("x" * 5000)


def test_client_list_text() -> None:
    assert client_list([]) == "No enrolled clients"
    text = client_list(
        [
            {
                "name": "alice",
                "serial": "ab12",
                "not_after": 0,
                "state": "ok",
                "last_seen": None,
                "sessions": [42],
            },
            {
                "name": "bob",
                "serial": "cd",
                "not_after": 0,
                "state": "revoked",
                "last_seen": 60,
                "sessions": [],
            },
        ]
    )
    head, alice, bob = text.splitlines()
    assert head.split() == ["NAME", "SERIAL", "EXPIRES", "STATE", "LAST", "SEEN", "SESSIONS"]
    assert alice.split()[-3:] == ["ok", "never", "0x0000002a"]
    assert "1970-01-01 00:01 UTC" in bob and bob.endswith("-")
