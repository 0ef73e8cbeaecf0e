"""cellvpn-ctl as a user runs it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cellvpn import __version__
from cellvpn.cli.main import build_parser
from cellvpn.lab import VENV_BIN


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "cellvpn-ctl"), *args], capture_output=True, text=True, timeout=60
    )


def test_version() -> None:
    """--version prints the package version."""
    done = ctl("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"cellvpn {__version__}"


def test_missing_socket_is_one_clear_line(tmp_path: Path) -> None:
    """No service behind the socket: one line naming it, exit status 2, no traceback."""
    done = ctl("--socket", str(tmp_path / "none.sock"), "status")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"cellvpn-ctl: cannot reach the cellvpn service at {tmp_path}/none.sock: no such socket "
        "(is it running? --socket names another socket)"
    ]


def test_dead_socket_is_one_clear_line(tmp_path: Path) -> None:
    """A socket file with nobody listening: one line, exit status 2."""
    import socket

    path = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    done = ctl("--socket", str(path), "status")
    assert done.returncode == 2
    assert "nothing is listening there" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--json", "vpn_stat"],
        ["vpn_stat", "--json"],
        ["vpn_stat", "-full", "--json"],
        ["--socket", "s", "vpn_stat", "--json", "-full"],
        ["vpn_client", "status", "--json"],
        ["status", "--json"],
        ["ledger", "balance", "ab" * 32, "--json"],
    ],
)
def test_json_is_taken_before_and_after_the_command(argv: list[str]) -> None:
    """``--json`` anywhere on the line, as docs/operations.md writes it."""
    ns = build_parser().parse_args(argv)
    assert ns.json is True


def test_without_json_the_answer_is_text() -> None:
    assert build_parser().parse_args(["vpn_stat"]).json is False
    ns = build_parser().parse_args(["vpn_stat", "--socket", "here.sock"])
    assert ns.socket == "here.sock" and ns.json is False


def test_vpn_stat_json_after_the_command_reaches_the_service(tmp_path: Path) -> None:
    """The form the docs show parses: the only complaint is the missing service."""
    done = ctl("vpn_stat", "--json", "--socket", str(tmp_path / "none.sock"))
    assert done.returncode == 2
    assert done.stderr.startswith("cellvpn-ctl: cannot reach the cellvpn service at ")
    assert "unrecognized arguments" not in done.stderr


def test_config_check_passes_a_good_server_file(tmp_path: Path) -> None:
    cfg = tmp_path / "server.cfg"
    cfg.write_text("[server]\nlisten = tcp:8089\n[srv_vpn]\nnetwork_address = 198.18.5.0\n")
    done = ctl("config", "check", str(cfg))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"config OK: {cfg} (server)\n"
    assert done.stderr == ""


def test_config_check_of_the_shipped_files() -> None:
    """The example server file is good as it is; the client's names no way to trust a server
    (all commented out), which would stop the client: the check says so."""
    root = Path(__file__).parent.parent / "tap-configs"
    done = ctl("config", "check", str(root / "server.cfg"))
    assert done.returncode == 0, done.stderr
    done = ctl("config", "check", str(root / "client.cfg"))
    assert done.returncode == 1
    assert done.stderr == (
        f"cellvpn-ctl: {root / 'client.cfg'}: [client] needs ca (the server's CA certificate),"
        " server_key (its key's SHA-256) or fingerprint (its certificate's SHA-256) to trust"
        " the server\n"
    )


def test_config_check_passes_a_client_with_a_pin(tmp_path: Path) -> None:
    cfg = tmp_path / "client.cfg"
    cfg.write_text("[client]\nserver = 192.0.2.1:8089\nfingerprint = " + "ab" * 32 + "\n")
    done = ctl("config", "check", str(cfg))
    assert (done.returncode, done.stdout) == (0, f"config OK: {cfg} (client)\n"), done.stderr


def test_config_check_names_each_bad_key_and_fails(tmp_path: Path) -> None:
    """One line per problem, exit status 1, nothing started, no traceback."""
    cfg = tmp_path / "server.cfg"
    cfg.write_text("[server]\nkeepalive = soon\n[srv_vpn]\nmtu = 9\n[srv_vpm]\n")
    done = ctl("config", "check", str(cfg))
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines[0].startswith(f"cellvpn-ctl: warning: {cfg}: unknown section [srv_vpm]")
    assert lines[1].startswith(f"cellvpn-ctl: {cfg}: [server] keepalive = soon: expected ")
    assert lines[2].startswith(f"cellvpn-ctl: {cfg}: [srv_vpn] mtu = 9: expected ")
    assert len(lines) == 3 and done.stdout == ""


def test_config_check_wants_the_files_the_service_reads(tmp_path: Path) -> None:
    """A client whose CA file is missing would not start: the check says so."""
    cfg = tmp_path / "client.cfg"
    cfg.write_text("[client]\nserver = 192.0.2.1:8089\nca = nowhere/ca.pem\n")
    done = ctl("config", "check", str(cfg))
    assert done.returncode == 1
    assert done.stderr == (
        f"cellvpn-ctl: {cfg}: [client] ca = {tmp_path}/nowhere/ca.pem: no such file\n"
    )


def test_config_check_of_a_missing_file_or_kind(tmp_path: Path) -> None:
    done = ctl("config", "check", str(tmp_path / "none.cfg"))
    assert done.returncode == 1
    assert done.stderr.startswith(f"cellvpn-ctl: {tmp_path}/none.cfg: cannot read the file")
    cfg = tmp_path / "c.cfg"
    cfg.write_text("[client]\nserver = 192.0.2.1:8089\n")
    done = ctl("--json", "config", "check", "--kind", "server", str(cfg))
    assert done.returncode == 0
    answer = json.loads(done.stdout)
    assert answer["kind"] == "server" and answer["ok"] is True
    assert answer["warnings"] == [f"{cfg}: unknown section [client]"]
