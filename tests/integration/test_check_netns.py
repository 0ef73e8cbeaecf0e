"""``cellvpn-ctl vpn_client check`` against a real server, from within a running client."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from typing import Any

from cellvpn.lab import SERVER_IP, VENV_BIN, VpnLab, ctl, ctl_json
from tests.conftest import require_command
from tests.integration.helpers import background


def check(lab: VpnLab, cli: Any, *args: str) -> tuple[int, dict[str, Any], str]:
    done = ctl(cli, lab.socket("client"), "vpn_client", "check", *args, "--json", check=False)
    assert "Traceback" not in done.stderr
    answer = json.loads(done.stdout) if done.stdout.strip() else {}
    return done.returncode, answer, done.stderr


#: Each service's /metrics, on the loopback of its own namespace.
METRICS = "[metrics]\nlisten = tcp:9100:interface=127.0.0.1\n"


def scrape(ns: Any) -> str:
    return str(ns.exec("curl", "-sf", "http://127.0.0.1:9100/metrics").stdout)


def sample(text: str, name: str) -> float:
    """The value of the sample named exactly ``name`` (labels included, as written)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {name} in the metrics")


def server_checks(lab: VpnLab) -> dict[str, int]:
    counters: dict[str, int] = ctl_json(lab.srv, lab.server_socket, "status")["checks"]
    return counters


def test_check_measures_a_server_and_says_why_when_it_cannot(netns: Any, tmp_path: Path) -> None:
    """0 with connect, TLS and setup times, RTT min/avg/max, upload and download that agree
    with the server's own counters; -2 (254) for a port with nothing on it, -3 (253) for one
    that never answers, -1 (255) for bad parameters; ``check result`` then lists the servers
    as Available / Not available from the state folder; the running tunnel carries on."""
    lab = VpnLab(netns, tmp_path)
    cli = lab.add_client_host()
    lab.start_server(extra=METRICS + "per_client = true\n")
    lab.start_client(cli, "client", extra=METRICS)

    before = server_checks(lab)
    code, answer, _ = check(lab, cli, "-addr", SERVER_IP, "-port", "8089")
    after = server_checks(lab)
    assert code == 0 and answer["code"] == 0, answer
    print(json.dumps(answer, indent=2, sort_keys=True))  # the figures as --json gives them
    assert answer["sent_bytes"] == answer["received_bytes"] == 262144
    assert answer["requests"] == 5 + 2 + 2 and answer["chunk_bytes"] == 261500
    assert {k: after[k] - before[k] for k in after} == {
        "requests": answer["requests"],
        "from_client_bytes": answer["sent_bytes"],
        "to_client_bytes": answer["received_bytes"],
    }
    metrics = scrape(lab.srv)
    assert sample(metrics, "cellvpn_check_requests_total") == after["requests"]
    assert (
        sample(metrics, 'cellvpn_check_bytes_total{direction="to_client"}')
        == (after["to_client_bytes"])
    )
    for key in ("connect_ms", "tls_ms", "setup_ms", "upload_ms", "download_ms"):
        assert 0 < answer[key] < 5000, (key, answer)
    assert 0 < answer["rtt_min_ms"] <= answer["rtt_avg_ms"] <= answer["rtt_max_ms"] < 5000
    assert answer["probes"] == 5 and answer["seen_as"] == "192.0.2.2"
    assert answer["upload_bytes_per_second"] > 0 and answer["download_bytes_per_second"] > 0
    assert answer["text"].startswith("VPN server checked successfully\nconnect ")
    text = ctl(cli, lab.socket("client"), "vpn_client", "check", "-addr", SERVER_IP,
               "-port", "8089", "--send", "1000000", "--recv", "48000").stdout  # fmt: skip
    print(text)  # the figures (-s shows them)
    lines = text.splitlines()
    assert lines[0] == "VPN server checked successfully" and lines[1].startswith("connect ")
    assert lines[2].startswith("rtt min/avg/max ") and lines[2].endswith(" ms (5 probes)")
    assert lines[3].startswith("upload 976.56 KiB in ") and "Mbit/s)" in lines[3]
    assert lines[4].startswith("download 46.88 KiB in ")
    assert "\r" not in text and "[" not in text  # no progress bar without a terminal
    older = ctl_json(cli, lab.socket("client"), "vpn_client", "check", "-addr", SERVER_IP,
                     "-port", "8089", "-size", "100", "-timeout", "5")  # fmt: skip
    assert older["sent_bytes"] == older["received_bytes"] == 100 and older["requests"] == 7

    code, answer, _ = check(lab, cli, "-addr", SERVER_IP, "-port", "8090", "--timeout", "5000")
    assert (code, answer["code"]) == (254, -2) and "refused" in answer["reason"].lower()

    background(lab.srv, tmp_path / "mute.log", "sink", "8091", SERVER_IP)  # takes TCP, no TLS
    code, answer, _ = check(lab, cli, "-addr", SERVER_IP, "-port", "8091", "--timeout", "1500")
    assert (code, answer["code"]) == (253, -3), answer
    assert answer["reason"] == "no session set up (TLS handshake) within 1.5 s"
    assert answer["connect_ms"] > 0 and answer["tls_ms"] is None

    # on a terminal, a bar while it waits (here for the TLS that never comes), then the result
    background(lab.srv, tmp_path / "mute2.log", "sink", "8092", SERVER_IP)
    cmd = [str(VENV_BIN / "cellvpn-ctl"), "--socket", str(lab.socket("client")), "vpn_client",
           "check", "-addr", SERVER_IP, "-port", "8092", "--timeout", "800"]  # fmt: skip
    shown = cli.exec("script", "-qec", shlex.join(cmd), "/dev/null", check=False).stdout
    assert "\x1b[K[" in shown and "]   0% TLS handshake 0 bytes of 512.00 KiB" in shown, shown
    assert shown.rstrip().endswith("no session set up (TLS handshake) within 0.8 s")

    code, answer, _ = check(lab, cli, "-addr", SERVER_IP, "-port", "8089", "--send", "2000000")
    assert (code, answer["code"]) == (255, -1)
    assert answer["reason"] == "--send must be 0 to 1048576 bytes, not 2000000"
    code, _, err = check(lab, cli, "-port", "8089")
    assert code == 255 and "VPN server address not defined" in err

    result = ctl_json(cli, lab.socket("client"), "vpn_client", "check", "result")
    print(json.dumps(result["servers"][:2], indent=2, sort_keys=True))
    rows = {r["server"]: r for r in result["servers"]}
    assert result["servers"][0]["server"] == f"{SERVER_IP}:8089"
    assert {s: (r["state"], r["configured"], r["code"]) for s, r in rows.items()} == {
        f"{SERVER_IP}:8089": ("Available", True, 0),
        f"{SERVER_IP}:8090": ("Not available", False, -2),
        f"{SERVER_IP}:8091": ("Not available", False, -3),
        f"{SERVER_IP}:8092": ("Not available", False, -3),
    }
    assert rows[f"{SERVER_IP}:8089"]["sent_bytes"] == 100  # the last check of it
    words = ctl(cli, lab.socket("client"), "vpn_client", "check", "result").stdout
    print(words)
    assert words.splitlines()[0].startswith(f"{SERVER_IP}:8089: State Available, checked ")
    assert f"{SERVER_IP}:8091: State Not available, checked " in words
    saved = json.loads((tmp_path / "client-state" / "checks.json").read_text())
    assert set(saved["servers"]) == set(rows)

    status = ctl_json(cli, lab.socket("client"), "status")
    assert status["status"] == "STARTED" and status["sessions_established"] == 1

    # a start says each step it waits for (stderr), then the result; --json the final state
    ctl(cli, lab.socket("client"), "vpn_client", "stop")
    start = ["vpn_client", "start", "-addr", SERVER_IP, "-port", "8089"]
    done = ctl(cli, lab.socket("client"), *start)
    print(done.stderr)
    assert done.stdout.strip() == "VPN client started successfully"
    said = [line.split("  ", 2)[2] for line in done.stderr.splitlines()]
    assert said[:5] == [
        f"connecting to {SERVER_IP}:8089 (TCP)",
        "TLS handshake",
        "session setup (HELLO, WELCOME)",
        "waiting for the service grant (REQUEST)",
        "waiting for the address (ADDR_REQUEST)",
    ]
    assert said[5].startswith("setting up 198.18.5.") and said[5].endswith(
        " on the TUN, routes and DNS"
    )
    assert said[6].startswith("up: address 198.18.5.") and len(said) == 7
    ctl(cli, lab.socket("client"), "vpn_client", "stop")
    final = ctl_json(cli, lab.socket("client"), *start)
    assert (final["code"], final["state"]) == (0, "STARTED")
    assert [s["step"] for s in final["status"]["start_steps"]] == [
        "connecting", "tls", "session", "grant", "address", "tunnel", "up"
    ]  # fmt: skip
    ctl(cli, lab.socket("client"), "vpn_client", "stop")
    refused = ctl(cli, lab.socket("client"), "vpn_client", "start", "-addr", SERVER_IP,
                  "-port", "8090", check=False)  # fmt: skip
    assert refused.returncode == 254
    assert (
        refused.stderr.splitlines()[-1]
        .split("  ", 2)[2]
        .startswith(f"failed: cannot connect to {SERVER_IP}:8090: ")
    )

    # both /metrics by the book, with the histograms and the per-client series
    server_text, client_text = scrape(lab.srv), scrape(cli)
    for text in (server_text, client_text):
        done = subprocess.run(
            [require_command("promtool", "prometheus"), "check", "metrics"],
            input=text, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert (done.returncode, done.stdout + done.stderr) == (0, ""), text
    # three checks, and three tunnel sessions (the first, and two starts after stops)
    assert sample(server_text, "cellvpn_session_duration_seconds_count") == 6
    assert 'cellvpn_sessions_active_by_client{client="(anonymous)"}' in server_text
    assert "cellvpn_client_keepalive_rtt_seconds_bucket" in client_text
    assert sample(client_text, "cellvpn_client_reconnects_total") == 0
    assert sample(client_text, "cellvpn_client_state") == 2  # STOPPED, after the refused start
