"""``cellvpn-ctl vpn_client check`` against a real server, from within a running client."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cellvpn.lab import SERVER_IP, VpnLab, ctl
from tests.integration.helpers import background


def check(lab: VpnLab, cli: Any, *args: str) -> tuple[int, dict[str, Any], str]:
    done = ctl(cli, lab.socket("client"), "vpn_client", "check", *args, "--json", check=False)
    assert "Traceback" not in done.stderr
    answer = json.loads(done.stdout) if done.stdout.strip() else {}
    return done.returncode, answer, done.stderr


def test_check_measures_a_server_and_says_why_when_it_cannot(netns: Any, tmp_path: Path) -> None:
    """0 with the connect time, RTT and bytes both ways; -2 (254) for a port with nothing on
    it, -3 (253) for one that never answers, -1 (255) for bad parameters; the tunnel of the
    running client carries on meanwhile."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    lab.start_server()
    lab.start_client(cli, "client")

    code, answer, _ = check(lab, cli, "-addr", SERVER_IP, "-port", "8089")
    assert code == 0 and answer["code"] == 0, answer
    assert answer["sent_bytes"] == answer["received_bytes"] == 10240
    assert 0 < answer["connect_ms"] < 5000 and 0 < answer["rtt_ms"] < 5000
    assert answer["bytes_per_second"] > 0 and answer["seen_as"] == "192.0.2.2"
    assert answer["text"].startswith("VPN server checked successfully\nconnect ")
    text = ctl(cli, lab.socket("client"), "vpn_client", "check", "-addr", SERVER_IP,
               "-port", "8089").stdout  # fmt: skip
    print(text)  # the figures (-s shows them)
    assert text.startswith("VPN server checked successfully\nconnect ")
    assert "sent 10.00 KiB, received 10.00 KiB" in text
    small = ctl(cli, lab.socket("client"), "--json", "vpn_client", "check", "-addr", SERVER_IP,
                "-port", "8089", "-size", "100").stdout  # fmt: skip
    assert json.loads(small)["sent_bytes"] == json.loads(small)["received_bytes"] == 100

    code, answer, _ = check(lab, cli, "-addr", SERVER_IP, "-port", "8090", "-timeout", "5")
    assert (code, answer["code"]) == (254, -2) and "refused" in answer["reason"].lower()

    background(lab.srv, tmp_path / "mute.log", "sink", "8091", SERVER_IP)  # takes TCP, no TLS
    code, answer, _ = check(lab, cli, "-addr", SERVER_IP, "-port", "8091", "-timeout", "1.5")
    assert (code, answer["code"]) == (253, -3), answer
    assert answer["reason"] == "no session set up within 1.5 s"

    code, answer, _ = check(lab, cli, "-addr", SERVER_IP, "-port", "8089", "-size", "20000")
    assert (code, answer["code"]) == (255, -1)
    assert answer["reason"] == "check size must be 0 to 10240 bytes, not 20000"
    code, _, err = check(lab, cli, "-port", "8089")
    assert code == 255 and "VPN server address not defined" in err

    status = json.loads(ctl(cli, lab.socket("client"), "--json", "status").stdout)
    assert status["status"] == "STARTED" and status["sessions_established"] == 1
