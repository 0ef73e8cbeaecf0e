"""``make demo``: cellvpn end to end on this machine, in network namespaces it makes itself.

Two hosts joined by a veth pair (underlay 192.0.2.0/24): the server in ``cvpn-demo-srv``, the
client in ``cvpn-demo-cli``, both as real ``twistd`` processes with the embedded defaults plus
the few keys a lab needs. Everything is torn down at the end, also after an error.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from cellvpn.lab import Namespace, Twistd, ctl, link, wait_for

SERVER_IP = "192.0.2.1"
CLIENT_IP = "192.0.2.2"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (network namespaces, TUN devices)", file=sys.stderr)
        return 1
    started = time.monotonic()
    spaces: list[Namespace] = []
    procs: list[Twistd] = []
    with tempfile.TemporaryDirectory(prefix="cellvpn-demo-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            say("network namespaces: cvpn-demo-srv <-> cvpn-demo-cli over 192.0.2.0/24")
            srv = Namespace("demo-srv", exact=True)
            spaces.append(srv)
            cli = Namespace("demo-cli", exact=True)
            spaces.append(cli)
            link(srv, f"{SERVER_IP}/24", cli, f"{CLIENT_IP}/24")

            say("server: twistd -n cellvpn")
            (tmp / "server.cfg").write_text(
                f"[server]\nlisten = tcp:8089:interface={SERVER_IP}\nstate_dir = state\n"
                "[srv_vpn]\nenabled = false\n"
                "[control]\nsocket = server.sock\n"
            )
            server = Twistd(srv, "cellvpn", tmp / "server.cfg", tmp / "server.log")
            procs.append(server)
            server.wait_log(r"cellvpn server listening on")
            fp = server.wait_log(r"SHA-256 fingerprint ([0-9A-F:]+)").group(1)
            print(f"server certificate fingerprint {fp}")

            say("client: twistd -n cellvpn-client, trusting the server's CA")
            (tmp / "client.cfg").write_text(
                f"[client]\nserver = {SERVER_IP}:8089\nca = state/tls/ca.pem\n"
                "keepalive = 60\n[control]\nsocket = client.sock\n"
            )
            client = Twistd(cli, "cellvpn-client", tmp / "client.cfg", tmp / "client.log")
            procs.append(client)
            line = client.wait_log(r"session (0x[0-9a-f]{8}) with \S+ established")
            print(f"session {line.group(1)} established over TLS 1.3")

            say("keepalives (every 3 s when idle) and their round-trip times")

            def answered() -> bool:
                out = ctl(cli, tmp / "client.sock", "--json", "status").stdout
                received: int = json.loads(out)["alives_received"]
                return received >= 2

            wait_for(answered, timeout=20, what="two answered keepalives")
            print("$ cellvpn-ctl status   (client)")
            print(ctl(cli, tmp / "client.sock", "status").stdout, end="")
            print("$ cellvpn-ctl status   (server)")
            print(ctl(srv, tmp / "server.sock", "status").stdout, end="")

            say("stopping")
            for proc in reversed(procs):
                proc.stop()
            print(f"demo finished in {time.monotonic() - started:.1f} s")
            return 0
        except Exception as e:
            print(f"demo failed: {e}", file=sys.stderr)
            for proc in procs:
                print(f"--- {proc.log.name}\n{proc.text()[-2000:]}", file=sys.stderr)
            return 1
        finally:
            for proc in procs:
                proc.kill()
            for ns in reversed(spaces):
                ns.close()


if __name__ == "__main__":
    sys.exit(main())
