"""Loading config files and overrides: defaults, full files, paths, errors and warnings."""

from __future__ import annotations

import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from pathlib import Path

import pytest

from cellvpn.config import (
    ClientConfig,
    ConfigError,
    HostPort,
    Offload,
    ServerConfig,
    load_client_config,
    load_server_config,
)

FP = "0123456789abcdef" * 4

FULL_SERVER = """\
# A server config with every key set.
[server]
listen = tcp:9000:interface=192.0.2.10
state_dir = /srv/cellvpn
keepalive = 5
idle_timeout = 90.5
max_frame = 65536

[tls]
certificate = /etc/cellvpn/cert.pem
private_key = /etc/cellvpn/key.pem
client_ca = /etc/cellvpn/ca.pem
names = vpn.example.net, 192.0.2.10

[srv_vpn]
enabled = no
network_address = 198.19.0.0
network_mask = 255.255.0.0
tun_name = cvpn0
mtu = 1280
allow_free_srv = off
grace_period = 120
dns = 198.19.0.1, 198.19.0.53
isolate_clients = true
lease_hold = 0
proxy = on
proxy_allow = 0.0.0.0/0, ::/0
proxy_deny = 198.18.0.0/15
offload = OFF
workers = 1

[control]
socket = /tmp/cellvpn.sock

[metrics]
listen = tcp:9100:interface=127.0.0.1
"""

FULL_CLIENT = f"""\
[client]
server = vpn.example.net:9000
server_name = other.example.net
fingerprint = {FP.upper()}
certificate = /etc/cellvpn/client.pem
private_key = /etc/cellvpn/client.key
tun_name = cvpn1
default_route = false
kill_switch = true
reconnect = false
keepalive = 0.5
dns = 1.1.1.1
socks = tcp:1080:interface=127.0.0.1
state_dir = /srv/cellvpn-client

[control]
socket = /tmp/client.sock

[wallet]
key = /etc/cellvpn/wallet.key
deposit = {"AB" * 32}
deposit_value = 1000000000000000000000
max_unit_price = 25
"""


def write(tmp_path: Path, text: str, name: str = "cellvpn.cfg") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def errors_of(tmp_path: Path, text: str, kind: str = "server") -> list[str]:
    path = write(tmp_path, text)
    load = load_server_config if kind == "server" else load_client_config
    with pytest.raises(ConfigError) as info:
        load(path)
    return info.value.messages


def test_defaults_without_file() -> None:
    """With no file the built-in defaults are used, and they equal the dataclass defaults."""
    server = load_server_config(None)
    assert server == ServerConfig()
    assert server.source is None and server.warnings == ()
    assert server.server.listen == "tcp:8089"
    assert server.server.state_dir == Path("/var/lib/cellvpn")
    assert server.server.keepalive == 3 and server.server.idle_timeout == 60
    assert server.server.max_frame == 262144
    vpn = server.srv_vpn
    assert vpn.enabled and vpn.allow_free_srv and not vpn.proxy
    assert str(vpn.network) == "10.11.12.0/24"  # the default, never given to a device
    assert (vpn.mtu, vpn.grace_period, vpn.lease_hold, vpn.workers) == (1400, 60, 300, 1)
    assert vpn.offload is Offload.AUTO and vpn.tun_name is None and vpn.dns == ()
    assert server.control.socket == Path("/run/cellvpn/server.sock")
    assert server.metrics.listen is None
    assert server.tls.certificate is None and server.tls.names == ()

    client = load_client_config(None)
    assert client == ClientConfig()
    assert client.client.server is None and client.client.expected_name is None
    assert client.client.default_route and client.client.reconnect
    assert not client.client.kill_switch
    assert client.client.state_dir == Path("/var/lib/cellvpn-client")
    assert client.control.socket == Path("/run/cellvpn/client.sock")
    assert client.wallet.deposit_value == 0 and client.wallet.key is None


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    """A file without keys loads as the defaults, with its source recorded."""
    path = write(tmp_path, "# nothing set\n[srv_vpn]\n")
    config = load_server_config(path)
    assert config.srv_vpn == ServerConfig().srv_vpn
    assert config.source == path


def test_full_server_file(tmp_path: Path) -> None:
    """Every server key set in a file comes back typed and without warnings."""
    config = load_server_config(write(tmp_path, FULL_SERVER))
    assert config.warnings == ()
    s = config.server
    assert (s.listen, s.state_dir) == ("tcp:9000:interface=192.0.2.10", Path("/srv/cellvpn"))
    assert (s.keepalive, s.idle_timeout, s.max_frame) == (5.0, 90.5, 65536)
    tls = config.tls
    assert tls.certificate == Path("/etc/cellvpn/cert.pem")
    assert tls.private_key == Path("/etc/cellvpn/key.pem")
    assert tls.client_ca == Path("/etc/cellvpn/ca.pem")
    assert tls.names == ("vpn.example.net", "192.0.2.10")
    v = config.srv_vpn
    assert not v.enabled and not v.allow_free_srv
    assert v.network == IPv4Network("198.19.0.0/16")
    assert (v.tun_name, v.mtu, v.grace_period, v.lease_hold, v.workers) == (
        "cvpn0",
        1280,
        120,
        0.0,
        1,
    )
    assert v.dns == (IPv4Address("198.19.0.1"), IPv4Address("198.19.0.53"))
    assert v.isolate_clients and v.proxy
    assert v.proxy_allow == (IPv4Network("0.0.0.0/0"), IPv6Network("::/0"))
    assert v.proxy_deny == (IPv4Network("198.18.0.0/15"),)
    assert v.offload is Offload.OFF
    assert config.control.socket == Path("/tmp/cellvpn.sock")
    assert config.metrics.listen == "tcp:9100:interface=127.0.0.1"


def test_full_client_file(tmp_path: Path) -> None:
    """Every client key set in a file comes back typed and without warnings."""
    config = load_client_config(write(tmp_path, FULL_CLIENT))
    assert config.warnings == ()
    c = config.client
    assert c.server == HostPort("vpn.example.net", 9000)
    assert c.server_name == c.expected_name == "other.example.net"
    assert c.ca is None and c.fingerprint == FP
    assert c.certificate == Path("/etc/cellvpn/client.pem")
    assert c.private_key == Path("/etc/cellvpn/client.key")
    assert c.tun_name == "cvpn1"
    assert not c.default_route and c.kill_switch and not c.reconnect
    assert c.keepalive == 0.5 and c.dns == (IPv4Address("1.1.1.1"),)
    assert c.socks == "tcp:1080:interface=127.0.0.1"
    assert c.state_dir == Path("/srv/cellvpn-client")
    assert config.control.socket == Path("/tmp/client.sock")
    w = config.wallet
    assert w.key == Path("/etc/cellvpn/wallet.key")
    assert w.deposit == "ab" * 32
    assert (w.deposit_value, w.max_unit_price) == (10**21, 25)


def test_expected_name_defaults_to_server_host(tmp_path: Path) -> None:
    """Without server_name the certificate is checked against the host part of server."""
    config = load_client_config(write(tmp_path, "[client]\nserver = [2001:db8::1]:8089\n"))
    assert config.client.expected_name == "2001:db8::1"


def test_relative_paths_start_at_file_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative paths in a file are taken from the file's folder, not the working directory."""
    etc = tmp_path / "etc"
    etc.mkdir()
    monkeypatch.chdir(tmp_path)
    text = (
        "[server]\nstate_dir = state\n[tls]\ncertificate = pki/cert.pem\nprivate_key = ../k.pem\n"
    )
    write(etc, text, "server.cfg")
    config = load_server_config("etc/server.cfg")
    assert config.source == etc / "server.cfg"
    assert config.server.state_dir == etc / "state"
    assert config.tls.certificate == etc / "pki/cert.pem"
    assert config.tls.private_key == etc / "../k.pem"


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A path starting with ~ is in the user's home, whatever the file's folder."""
    monkeypatch.setenv("HOME", "/home/someone")
    config = load_client_config(write(tmp_path, "[wallet]\nkey = ~/.cellvpn/wallet.key\n"))
    assert config.wallet.key == Path("/home/someone/.cellvpn/wallet.key")


def test_keys_are_case_insensitive(tmp_path: Path) -> None:
    """Keys match whatever their case, as configparser does; section names do not."""
    config = load_server_config(write(tmp_path, "[srv_vpn]\nMTU = 1300\n"))
    assert config.srv_vpn.mtu == 1300


def test_inline_comments(tmp_path: Path) -> None:
    """A '#' after a value starts a comment."""
    config = load_server_config(write(tmp_path, "[srv_vpn]\nmtu = 1300  # smaller for PPPoE\n"))
    assert config.srv_vpn.mtu == 1300


def test_many_bad_keys_reported_together(tmp_path: Path) -> None:
    """Every bad value is reported at once, each naming file, section, key, value and want."""
    text = (
        "[server]\nlisten = tcp:99999\nkeepalive = 0\n"
        "[srv_vpn]\nmtu = 70000\nenabled = perhaps\nnetwork_mask = 255.0.255.0\ndns = 1.1.1.1, x\n"
        "offload = sometimes\ntun_name = much-too-long-name\n"
        "[tls]\nnames = bad_name\n"
        "[metrics]\nlisten = nope:1\n"
    )
    path = write(tmp_path, text)
    messages = errors_of(tmp_path, text)
    p = str(path)
    assert messages == [
        f"{p}: [server] listen = tcp:99999: expected a Twisted server endpoint string such as "
        "tcp:PORT, tcp6:PORT, unix:PATH or systemd:domain=INET:index=N "
        "(port '99999' is not a number from 0 to 65535)",
        f"{p}: [server] keepalive = 0: expected a number of seconds from 0.1 to 3600",
        f"{p}: [tls] names = bad_name: expected a comma-separated list of DNS names and IP "
        "addresses ('bad_name' is not one)",
        f"{p}: [srv_vpn] enabled = perhaps: expected a boolean: true/false, yes/no, on/off or 1/0",
        f"{p}: [srv_vpn] network_mask = 255.0.255.0: expected a contiguous dotted IPv4 netmask "
        "from 255.0.0.0 (/8) to 255.255.255.252 (/30) (its one bits are not contiguous)",
        f"{p}: [srv_vpn] tun_name = much-too-long-name: expected a network interface name: "
        "1 to 15 characters, without '/', ':' or spaces",
        f"{p}: [srv_vpn] mtu = 70000: expected an integer from 576 to 65535",
        f"{p}: [srv_vpn] dns = 1.1.1.1, x: expected a comma-separated list of IPv4 or IPv6 "
        "addresses ('x' is not one)",
        f"{p}: [srv_vpn] offload = sometimes: expected one of auto, on, off",
        f"{p}: [metrics] listen = nope:1: expected a Twisted server endpoint string such as "
        "tcp:PORT, tcp6:PORT, unix:PATH, systemd:domain=INET:index=N or ssl:PORT:privateKey=KEY "
        "(unknown endpoint type 'nope')",
    ]
    assert all("\n" not in m for m in messages)


def test_error_string_has_one_line_per_problem(tmp_path: Path) -> None:
    """str(ConfigError) is the messages, one per line, ready to print."""
    path = write(tmp_path, "[srv_vpn]\nmtu = 1\nworkers = 0\n")
    with pytest.raises(ConfigError) as info:
        load_server_config(path)
    assert str(info.value).splitlines() == info.value.messages
    assert len(info.value.messages) == 2


def test_empty_and_odd_values_are_quoted(tmp_path: Path) -> None:
    """Empty or multi-line bad values are shown quoted, so the message stays one clear line."""
    messages = errors_of(tmp_path, "[server]\nstate_dir =\nmax_frame = 1\n  2\n")
    assert messages[0].endswith(
        "[server] state_dir = '': expected a path (relative paths "
        "start at the config file's folder)"
    )
    assert "[server] max_frame = '1\\n2': expected an integer" in messages[1]


def test_network_with_host_bits(tmp_path: Path) -> None:
    """network_address with host bits for network_mask is an error naming both keys."""
    path = write(tmp_path, "[srv_vpn]\nnetwork_address = 198.18.5.5\n")
    with pytest.raises(ConfigError) as info:
        load_server_config(path)
    assert info.value.messages == [
        f"{path}: [srv_vpn] network_address = 198.18.5.5, network_mask = 255.255.255.0: "
        "expected network_address to be the network of network_mask (198.18.5.0): "
        "it has host bits set"
    ]


def test_cross_checks_skip_bad_keys(tmp_path: Path) -> None:
    """A rule across keys stays quiet when one of its keys is already reported as bad."""
    messages = errors_of(tmp_path, "[srv_vpn]\nnetwork_address = 198.18.5.5\nnetwork_mask = 1\n")
    assert len(messages) == 1 and "network_mask = 1" in messages[0]


def test_certificate_without_key(tmp_path: Path) -> None:
    """A certificate without its private key, or the reverse, is an error in [tls] and [client]."""
    messages = errors_of(tmp_path, "[tls]\ncertificate = cert.pem\n")
    assert messages == [
        f"{tmp_path / 'cellvpn.cfg'}: [tls] certificate = cert.pem, private_key = '': "
        "expected both certificate and private_key, or neither"
    ]
    messages = errors_of(tmp_path, "[client]\nprivate_key = key.pem\n", kind="client")
    assert len(messages) == 1
    assert "[client] certificate = '', private_key = key.pem: expected both" in messages[0]


def test_ca_and_fingerprint_exclusive(tmp_path: Path) -> None:
    """ca, server_key and fingerprint are alternatives: setting two is an error naming them."""
    messages = errors_of(tmp_path, f"[client]\nca = ca.pem\nfingerprint = {FP}\n", kind="client")
    assert messages == [
        f"{tmp_path / 'cellvpn.cfg'}: [client] ca = ca.pem, server_key = '', fingerprint = {FP}: "
        "expected at most one of ca, server_key and fingerprint"
    ]
    messages = errors_of(
        tmp_path, f"[client]\nserver_key = {FP}\nfingerprint = {FP}\n", kind="client"
    )
    assert len(messages) == 1 and "expected at most one of ca, server_key" in messages[0]


def test_idle_timeout_longer_than_keepalive(tmp_path: Path) -> None:
    """An idle timeout not longer than the keepalive interval would cut idle streams."""
    messages = errors_of(tmp_path, "[server]\nkeepalive = 60\nidle_timeout = 30\n")
    assert len(messages) == 1 and "keepalive = 60, idle_timeout = 30" in messages[0]


def test_unknown_key_and_section_warn(tmp_path: Path) -> None:
    """Unknown keys and sections load with warnings that suggest the closest known name."""
    path = write(
        tmp_path,
        "[srv_vpn]\nmtuu = 1300\nkeepalive = 5\nzzz = 1\n[srv_vpnn]\nmtu = 1\n[DEFAULT]\nx = 1\n",
    )
    config = load_server_config(path)
    assert config.srv_vpn.mtu == 1400
    assert config.warnings == (
        f"{path}: [srv_vpn] unknown key 'mtuu' (did you mean 'mtu'?)",
        f"{path}: [srv_vpn] unknown key 'keepalive' (did you mean [server] keepalive?)",
        f"{path}: [srv_vpn] unknown key 'zzz'",
        f"{path}: unknown section [srv_vpnn] (did you mean [srv_vpn]?)",
        f"{path}: unknown section [DEFAULT]",
    )


def test_section_names_are_case_sensitive(tmp_path: Path) -> None:
    """A section in the wrong case is unknown, and the warning points to the right one."""
    config = load_server_config(write(tmp_path, "[SRV_VPN]\nmtu = 1300\n"))
    assert config.srv_vpn.mtu == 1400
    assert config.warnings[0].endswith("unknown section [SRV_VPN] (did you mean [srv_vpn]?)")


def test_overrides_apply_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Overrides replace file values, are parsed like them, and their paths start at the cwd."""
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "[srv_vpn]\nmtu = 1300\n")
    config = load_server_config(
        path,
        {"srv_vpn.mtu": " 1280 ", "srv_vpn.DNS": "198.19.0.53", "server.state_dir": "here"},
    )
    assert config.srv_vpn.mtu == 1280
    assert config.srv_vpn.dns == (IPv4Address("198.19.0.53"),)
    assert config.server.state_dir == tmp_path / "here"


def test_overrides_without_file() -> None:
    """Overrides work on top of the built-in defaults too."""
    config = load_client_config(None, {"client.server": "vpn.example.net:8089"})
    assert config.client.server == HostPort("vpn.example.net", 8089)


def test_bad_overrides_name_command_line(tmp_path: Path) -> None:
    """Bad override values are errors that name the command line instead of a file."""
    path = write(tmp_path, "[srv_vpn]\nmtu = 10\n")
    with pytest.raises(ConfigError) as info:
        load_server_config(path, {"srv_vpn.workers": "0", "mtu": "1400", "tls.certificate": "c"})
    assert info.value.messages == [
        "command line: option 'mtu' is not of the form section.key",
        "command line: [tls] certificate = c, private_key = '': "
        "expected both certificate and private_key, or neither",
        f"{path}: [srv_vpn] mtu = 10: expected an integer from 576 to 65535",
        "command line: [srv_vpn] workers = 0: expected an integer from 1 to 1",
    ]


def test_cross_check_names_both_origins(tmp_path: Path) -> None:
    """A rule broken by a file value and an override names both sources."""
    path = write(tmp_path, "[client]\nca = ca.pem\n")
    with pytest.raises(ConfigError) as info:
        load_client_config(path, {"client.fingerprint": FP})
    assert info.value.messages[0].startswith(f"{path} and command line: [client] ca = ca.pem, ")


def test_unknown_overrides_warn() -> None:
    """Unknown override keys warn like unknown file keys, naming the command line."""
    config = load_server_config(None, {"srv_vpn.mtuu": "1", "srvvpn.mtu": "1"})
    assert config.warnings == (
        "command line: [srv_vpn] unknown key 'mtuu' (did you mean 'mtu'?)",
        "command line: unknown section [srvvpn] (did you mean [srv_vpn]?)",
    )


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is a ConfigError with one clear line."""
    path = tmp_path / "absent.cfg"
    with pytest.raises(ConfigError) as info:
        load_server_config(path)
    assert info.value.messages == [f"{path}: cannot read the file: No such file or directory"]


def test_folder_instead_of_file(tmp_path: Path) -> None:
    """A folder given as the config file is a ConfigError, not a traceback."""
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_server_config(tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mtu = 1400\n", "line 1: expected a [section] line before 'mtu = 1400'"),
        ("[srv_vpn]\nmtu\n", "line 2: expected 'key = value', found 'mtu'"),
        ("[srv_vpn]\nmtu = 1\nmtu = 2\n", "line 3: [srv_vpn] mtu appears twice"),
        ("[srv_vpn]\n[srv_vpn]\n", "line 2: section [srv_vpn] appears twice"),
    ],
)
def test_not_ini(tmp_path: Path, text: str, message: str) -> None:
    """A file that is not valid INI is a ConfigError saying where and why."""
    path = write(tmp_path, text)
    assert errors_of(tmp_path, text) == [f"{path}, {message}"]


def test_not_utf8(tmp_path: Path) -> None:
    """A binary file is a ConfigError, not a UnicodeDecodeError."""
    path = tmp_path / "bin.cfg"
    path.write_bytes(b"[srv_vpn]\nmtu = \xff\xfe\n")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_server_config(path)


def test_no_reactor_import() -> None:
    """Loading config imports no reactor, so tools can use it before twistd picks one."""
    code = (
        "import sys, cellvpn.config as c; c.load_server_config(None); c.load_client_config(None);"
        " c.render_example('server'); assert 'twisted.internet.reactor' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_byte_order_mark(tmp_path: Path) -> None:
    """A file saved with a UTF-8 byte order mark loads; the mark is not part of a section."""
    path = tmp_path / "bom.cfg"
    path.write_bytes(b"\xef\xbb\xbf[srv_vpn]\nmtu = 1300\n")
    assert load_server_config(path).srv_vpn.mtu == 1300
