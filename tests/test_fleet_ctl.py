"""``cellvpn-ctl fleet``: the fleet's CA made offline, a server's certificate from it (no CA key
on the server), and clients enrolled and revoked in the shared ledger."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from cellvpn.billing.sqlite import open_ledger
from cellvpn.cli.main import main
from cellvpn.config import load_client_config
from cellvpn.conn import pki


def ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_ca_is_made_once_and_its_key_is_private(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = ctl(capsys, "--json", "fleet", "ca", "init", str(tmp_path / "ca"))
    assert code == 0
    fleet = json.loads(out)["fleet"]
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600
    cert = pki.load_certificates(tmp_path / "ca" / "ca.pem")[0]
    assert pki.spki_fingerprint(cert) == fleet
    code, _, err = ctl(capsys, "fleet", "ca", "init", str(tmp_path / "ca"))
    assert code == 2 and "holds a CA already" in err


def test_a_server_certificate_without_the_ca_key_is_used_as_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca, state = tmp_path / "ca", tmp_path / "state"
    ctl(capsys, "fleet", "ca", "init", str(ca))
    code, out, _ = ctl(
        capsys, "--json", "fleet", "server-cert", str(ca), "--state-dir", str(state),
        "--name", "vpn1.example", "--name", "192.0.2.1",
    )  # fmt: skip
    assert code == 0
    spki = json.loads(out)["server_key"]
    tls = state / "tls"
    assert sorted(p.name for p in tls.iterdir()) == ["ca.pem", "server.key", "server.pem"]
    assert (tls / "ca.pem").read_bytes() == (ca / "ca.pem").read_bytes()
    # the server's own start with the same names: nothing issued, nothing asked of a CA key
    same = pki.ensure_server_identity(state, ["vpn1.example", "192.0.2.1"])
    assert not same.created and same.spki == spki
    # other names would need the CA key: the certificate is kept (with a warning) instead
    other = pki.ensure_server_identity(state, ["vpn9.example"])
    assert not other.created and other.names == ("vpn9.example",) and other.spki == spki
    # issued again (new names) from the operator's side: the server's key, so its pin, stays
    ctl(
        capsys, "fleet", "server-cert", str(ca), "--state-dir", str(state), "--name", "vpn2.example"
    )
    again = pki.load_certificates(tls / "server.pem")[0]
    assert pki.spki_fingerprint(again) == spki
    assert pki.certificate_names(again) == ["vpn2.example"]


def test_clients_are_enrolled_listed_and_revoked_in_the_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca, url = tmp_path / "ca", f"sqlite:///{tmp_path / 'ledger.db'}"
    open_ledger(url).close()
    ctl(capsys, "fleet", "ca", "init", str(ca))
    out_file = tmp_path / "alice.cfg"
    code, out, err = ctl(
        capsys, "--json", "fleet", "client", "add", "alice", "--ca", str(ca), "--ledger", url,
        "--server", "192.0.2.1:8089", "--out", str(out_file),
    )  # fmt: skip
    assert code == 0, err
    serial = json.loads(out)["serial"]
    config = load_client_config(out_file)
    assert str(config.client.server) == "192.0.2.1:8089"
    assert f"# Certificate serial {serial}," in out_file.read_text()
    assert config.client.certificate is not None and config.client.private_key is not None
    code, _, err = ctl(
        capsys, "fleet", "client", "add", "alice", "--ca", str(ca), "--ledger", url,
        "--server", "192.0.2.1:8089", "--out", str(tmp_path / "again.cfg"),
    )  # fmt: skip
    assert code == 2 and "enrolled already" in err
    code, out, _ = ctl(
        capsys, "fleet", "client", "list", "--ca", str(ca / "ca.pem"), "--ledger", url
    )
    assert out.strip() == f"alice {serial} ok"
    code, out, _ = ctl(
        capsys, "fleet", "client", "revoke", "alice", "--ca", str(ca), "--ledger", url
    )
    assert code == 0 and f"revoked client alice (certificate {serial})" in out
    code, out, _ = ctl(capsys, "fleet", "client", "list", "--ca", str(ca), "--ledger", url)
    assert out.strip() == f"alice {serial} revoked"
    code, _, err = ctl(
        capsys, "fleet", "client", "revoke", "alice", "--ca", str(ca), "--ledger", url
    )
    assert code == 2 and "no certificate left" in err
