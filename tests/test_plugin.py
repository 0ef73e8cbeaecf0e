"""The twistd plugins: listed after an editable and after a normal install, bad configs refused."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from cellvpn.lab import VENV_BIN

TOP = Path(__file__).resolve().parent.parent


def twistd_help(python: str, env: dict[str, str] | None = None) -> str:
    code = (
        "import sys; sys.argv = ['twistd', '--help']; from twisted.scripts.twistd import run; run()"
    )
    done = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd="/"
    )
    return done.stdout


def test_twistd_lists_both_plugins_in_the_editable_install() -> None:
    """The checkout's own .venv (an editable install) offers cellvpn and cellvpn-client."""
    out = subprocess.run(
        [str(VENV_BIN / "twistd"), "--help"], capture_output=True, text=True, cwd="/", timeout=60
    ).stdout
    assert "cellvpn-client" in out and "cellvpn VPN server." in out
    assert "cellvpn VPN client." in out


def test_wheel_ships_the_dropin_and_twistd_lists_both_plugins(tmp_path: Path) -> None:
    """A wheel holds cellvpn/ and the dropin only; installed alone, twistd lists both plugins."""
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(tmp_path / "dist")],
        cwd=TOP,
        check=True,
        capture_output=True,
        timeout=120,
    )
    [wheel] = (tmp_path / "dist").glob("cellvpn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/cellvpn_plugin.py" in names
    assert not any(n.startswith("twisted/") and n.endswith("__init__.py") for n in names)
    assert not any(n.endswith("dropin.cache") for n in names)
    assert all(n.startswith(("cellvpn/", "twisted/plugins/", "cellvpn-")) for n in names)
    # A fresh environment: the wheel in its own site folder, the dependencies from .venv, but
    # not the checkout (the .venv's editable .pth is not processed from a plain path entry).
    site = tmp_path / "site"
    subprocess.run(
        [str(VENV_BIN / "pip"), "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    deps = sysconfig.get_paths()["purelib"]
    env = {"PYTHONPATH": f"{site}:{deps}", "PATH": "/usr/bin:/bin"}
    probe = subprocess.run(
        [sys.executable, "-S", "-c", "import cellvpn; print(cellvpn.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=60,
    )
    assert probe.stdout.startswith(str(site)), probe.stderr
    code = (
        "import sys; sys.argv = ['twistd', '--help']\nfrom twisted.scripts.twistd import run; run()"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, cwd="/"
    ).stdout
    assert "cellvpn-client" in out and "cellvpn VPN server." in out


def test_bad_config_prints_one_line_per_bad_key_and_exits_non_zero(tmp_path: Path) -> None:
    """twistd cellvpn --config bad.cfg: a clear line per bad key, no traceback, status 1."""
    bad = tmp_path / "bad.cfg"
    bad.write_text(
        "[server]\nlisten = tcp:notaport\nmax_frame = lots\n"
        "[srv_vpn]\nmtu = 70000\nnetwork_mask = 255.0.255.0\nmtuu = 3\n"
    )
    done = subprocess.run(
        [str(VENV_BIN / "twistd"), "-n", "--pidfile=", "cellvpn", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode != 0
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in done.stderr + done.stdout
    errors = [ln for ln in lines if "warning" not in ln]
    assert len(errors) == 4, lines
    assert any(f"{bad}: [srv_vpn] mtu = 70000: expected an integer" in ln for ln in errors)
    assert any("[server] listen = tcp:notaport" in ln for ln in errors)
    assert any("[server] max_frame = lots" in ln for ln in errors)
    assert any("[srv_vpn] network_mask = 255.0.255.0" in ln for ln in errors)
    assert any("unknown key 'mtuu' (did you mean 'mtu'?)" in ln for ln in lines)


def start_server_once(cfg: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``twistd -n cellvpn --config CFG`` in ``cwd``, until it exits."""
    return subprocess.run(
        [str(VENV_BIN / "twistd"), "-n", "--pidfile=", "cellvpn", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_unreadable_tls_file_is_one_line_and_exit_status_1(tmp_path: Path) -> None:
    """A start-up problem (missing certificate) is one line, not a traceback."""
    cfg = tmp_path / "s.cfg"
    cfg.write_text(
        "[server]\nlisten = tcp:0:interface=127.0.0.1\nstate_dir = st\n"
        "[tls]\ncertificate = nope.pem\nprivate_key = nope.key\n"
        "[srv_vpn]\nenabled = false\n[control]\nsocket = c.sock\n"
    )
    done = start_server_once(cfg, tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    out = done.stdout + done.stderr
    [line] = [ln for ln in out.splitlines() if "cannot start" in ln]
    assert line.endswith(
        f"cellvpn cannot start: certificate file {tmp_path}/nope.pem does not exist"
    )


def test_a_state_dir_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    """A state_dir where a file stands: one line that names it, not a traceback."""
    (tmp_path / "st").write_text("not a folder\n")
    cfg = tmp_path / "s.cfg"
    cfg.write_text(
        "[server]\nlisten = tcp:0:interface=127.0.0.1\nstate_dir = st/inner\n"
        "[srv_vpn]\nenabled = false\n[control]\nsocket = c.sock\n"
    )
    done = start_server_once(cfg, tmp_path)
    assert done.returncode == 1
    out = done.stdout + done.stderr
    assert "Traceback" not in out
    [line] = [ln for ln in out.splitlines() if "cannot start" in ln]
    assert line.endswith(
        f"cellvpn cannot start: cannot make the state_dir {tmp_path}/st/inner: Not a directory"
    )


@pytest.mark.parametrize("plugin", ["cellvpn", "cellvpn-client"])
def test_help_of_each_plugin_names_config(plugin: str) -> None:
    """Each plugin documents --config and --set."""
    out = subprocess.run(
        [str(VENV_BIN / "twistd"), plugin, "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert "--config=" in out and "--set=" in out
