"""New sessions per second and memory per idle session, against a real ``twistd cellvpn``.

    .venv/bin/python bench/sessions_bench.py [--sessions 2000] [--concurrency 64]

As root. It makes one network namespace (``cvpn-sbench-<pid>``), starts the server there with a
/20 pool in free mode, and runs a load generator in the same namespace over its loopback: each
session is TCP + TLS 1.3 + HELLO/WELCOME + REQUEST/SUCCESS + ADDR_REQUEST/ADDR_REPLY (a lease).
It prints sessions per second while they are being opened, then the server's RSS with all of
them idle, per session, and tears everything down. Run it alone: nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cellvpn.lab import VENV_BIN, Namespace, Twistd  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    ns = Namespace("sbench")
    try:
        with tempfile.TemporaryDirectory(prefix="cellvpn-sbench-") as tmp_name:
            tmp = Path(tmp_name)
            cfg = tmp / "server.cfg"
            cfg.write_text(
                "[server]\nlisten = tcp:8089:interface=127.0.0.1:backlog=1024\n"
                "state_dir = state\nidle_timeout = 600\n"
                # the load comes from one address: lift the per-source limits, or this
                # would measure the edge instead of the server
                "[edge]\nmax_streams_per_source = 100000\nmax_handshakes_per_source = 100000\n"
                "connect_rate = 100000\nconnect_burst = 100000\n"
                "[tls]\nnames = 127.0.0.1\nclients = any\n"
                "[srv_vpn]\nnetwork_address = 198.18.16.0\nnetwork_mask = 255.255.240.0\n"
                "tun_name = cvpn-sb\n"
                "[control]\nsocket = server.sock\n"
            )
            server = Twistd(ns, "cellvpn", cfg, tmp / "server.log")
            server.wait_log(r"TUN cvpn-sb up")
            pid = server.proc.pid
            base = rss_kib(pid)
            out = tmp / "load.json"
            gen = ns.popen(
                [
                    str(VENV_BIN / "python"),
                    str(HERE / "sessions_load.py"),
                    str(tmp / "state" / "tls" / "ca.pem"),
                    str(args.sessions),
                    str(args.concurrency),
                    str(out),
                ],
                log=tmp / "load.log",
            )
            deadline = time.monotonic() + 300
            while not out.exists():
                if gen.poll() is not None or time.monotonic() > deadline:
                    print((tmp / "load.log").read_text()[-3000:], file=sys.stderr)
                    return 1
                time.sleep(0.2)
            result = json.loads(out.read_text())
            time.sleep(2)  # idle: keepalives only
            loaded = rss_kib(pid)
            gen.terminate()
            gen.wait(timeout=30)
            per = (loaded - base) / max(result["opened"], 1)
            print(f"sessions opened: {result['opened']} (failed {result['failed']})")
            print(
                f"new sessions per second (TLS + setup + grant + lease), "
                f"concurrency {args.concurrency}: {result['rate']:.0f}/s"
            )
            print(
                f"server RSS: {base} KiB before, {loaded} KiB with the sessions idle: "
                f"{per:.1f} KiB per idle session"
            )
            server.stop()
    finally:
        ns.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
