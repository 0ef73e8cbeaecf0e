"""``make demo``: cellvpn end to end on this machine, in network namespaces it makes itself.

Three hosts: the server in ``cvpn-demo-srv``, a client in ``cvpn-demo-cli`` (underlay
192.0.2.0/24) and an "internet" host ``cvpn-demo-net`` behind the server with an HTTP server at
198.19.0.10. The server leases from 198.18.5.0/24 in free mode; the client sends everything
through the tunnel (``default_route``) and has its own resolv.conf. Server and client are real
``twistd`` processes with the embedded defaults plus the few keys a lab needs. Everything is
torn down at the end, also after an error.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from cellvpn.lab import NET_HOST_IP, Namespace, Twistd, VpnLab, ctl


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show(ns: Namespace, *cmd: str) -> None:
    print("$ " + " ".join(cmd), flush=True)
    done = ns.exec(*cmd, check=False)
    print((done.stdout + done.stderr).rstrip(), flush=True)


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (network namespaces, TUN devices)", file=sys.stderr)
        return 1
    started = time.monotonic()
    spaces: list[Namespace] = []

    def make(tag: str, ipv6: bool = False) -> Namespace:
        ns = Namespace(tag, exact=True, ipv6=ipv6)
        spaces.append(ns)
        return ns

    procs: list[Twistd] = []
    with tempfile.TemporaryDirectory(prefix="cellvpn-demo-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            say("hosts: cvpn-demo-cli -- 192.0.2.0/24 -- cvpn-demo-srv -- cvpn-demo-net")
            lab = VpnLab(make, tmp, pool="198.18.5.0/24", exact=True)
            cli = lab.add_client_host()
            lab.serve_http(b"<h1>Hello through cellvpn</h1>\n")
            print(f"HTTP server on {NET_HOST_IP} in cvpn-demo-net")

            say("server: twistd -n --pidfile= cellvpn  (pool 198.18.5.0/24, free service)")
            procs.append(lab.start_server(vpn_extra="dns = 198.18.5.1\n"))
            fp = lab.server.wait_log(r"SHA-256 fingerprint ([0-9A-F:]+)").group(1)  # type: ignore[union-attr]
            print(f"server certificate fingerprint {fp}")

            say("client: twistd -n --pidfile= cellvpn-client  (default_route = true)")
            client = lab.start_client(cli, "client", section_extra="default_route = true\n")
            procs.append(client)
            print(client.wait_log(r"VPN up: .*").group(0))

            say("the client's routes and resolver while the VPN is up")
            show(cli, "ip", "-4", "route")
            show(cli, "cat", "/etc/resolv.conf")

            say("ping the server's tunnel address (the gateway)")
            show(cli, "ping", "-c", "3", "-i", "0.3", "198.18.5.1")

            say(f"fetch a page from {NET_HOST_IP} through the tunnel")
            show(cli, "curl", "-sS", "-m", "10", f"http://{NET_HOST_IP}/")
            seen = [ln for ln in (tmp / "http.log").read_text().splitlines() if "GET" in ln]
            print(f"the HTTP server saw: {seen[-1] if seen else 'nothing'}")

            say("cellvpn-ctl vpn_client status")
            print(ctl(cli, lab.socket("client"), "vpn_client", "status").stdout.rstrip())
            say("cellvpn-ctl vpn_stat")
            print(ctl(lab.srv, lab.server_socket, "vpn_stat").stdout.rstrip())

            say("stopping: cellvpn-ctl vpn_client stop, then both services")
            print(ctl(cli, lab.socket("client"), "vpn_client", "stop").stdout.rstrip())
            show(cli, "ip", "-4", "route")
            for proc in reversed(procs):
                proc.stop()
            print(f"\ndemo finished in {time.monotonic() - started:.1f} s")
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
