"""``make demo``: cellvpn end to end on this machine, in network namespaces it makes itself.

Three hosts: the server in ``cvpn-demo-srv``, a client in ``cvpn-demo-cli`` (underlay
192.0.2.0/24) and an "internet" host ``cvpn-demo-net`` behind the server with an HTTP server at
198.19.0.10. The server leases from 198.18.5.0/24 in free mode to enrolled clients: the client
is enrolled with ``cellvpn-ctl client add`` and runs on the file it writes; it sends everything
through the tunnel (``default_route``) and has its own resolv.conf. Then the same server sells
its service to any client that pays (``[tls] clients = any``). Server and client are real
``twistd`` processes with the embedded defaults plus the few keys a lab needs. Everything is
torn down at the end, also after an error.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cellvpn.lab import NET_HOST_IP, Namespace, Twistd, VpnLab, ctl


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show(ns: Namespace, *cmd: str) -> None:
    print("$ " + " ".join(cmd), flush=True)
    done = ns.exec(*cmd, check=False)
    print((done.stdout + done.stderr).rstrip(), flush=True)


def paid_session(lab: VpnLab, cli: Namespace, procs: list[Twistd], tmp: Path) -> None:
    """The same VPN, paid: 1000 datoshi per 64 MiB of IP traffic, from a prepaid deposit.

    This server serves any client (``[tls] clients = any``): whoever pays is served, with no
    enrollment."""
    say("a paid session for any client: the server sells 64 MiB of traffic for 1000 CELL")
    procs.append(
        lab.start_server(
            extra="[billing]\nprice = 1000\nprice_unit = B\nunits = 67108864\n",
            vpn_extra="dns = 198.18.5.1\n",
        )
    )
    key = tmp / "client.key"
    account = lab.ledger("keygen", str(key))["account"]
    provider = lab.ledger("order", "list")
    print(f"client account {account}")
    lab.ledger("mint", account, "100000")
    print("$ cellvpn-ctl ledger mint <client> 100000")
    balances = {"client": account, "provider": provider_account(provider)}

    def show_balances(when: str) -> None:
        parts = [
            f"{who} {lab.ledger('balance', acct)['balance']}" for who, acct in balances.items()
        ]
        print(f"balances {when}: " + ", ".join(parts))

    show_balances("before")
    wallet = f"[wallet]\nkey = {key}\ndeposit_value = 20000\nmax_unit_price = 1\n"
    client = lab.start_client(cli, "client", section_extra="default_route = true\n", extra=wallet)
    procs.append(client)
    print(client.wait_log(r"deposit \w+ created").group(0))
    print(client.wait_log(r"VPN up: .*").group(0))
    size = 200 * 1024 * 1024
    root = tmp / "www"
    with open(root / "big.bin", "wb") as f:
        f.truncate(size)
    show(cli, "curl", "-sS", "-m", "60", "-o", "/dev/null", "-w",
         "fetched %{size_download} bytes at %{speed_download} bytes/s",
         f"http://{NET_HOST_IP}/big.bin")  # fmt: skip
    say("receipts redeemed in the ledger")
    for r in lab.ledger("receipts")["receipts"]:
        print(
            f"  #{r['seq']} {r['hash'][:16]}: {r['units']} {r['unit']} for {r['value']} "
            f"(prev {r['prev_hash'][:16]})"
        )
    say("the client's own record of what it signed")
    book = (tmp / "client-state" / "receipts.jsonl").read_text().splitlines()
    print(f"  {sum(1 for line in book if 'signed' in line)} receipts signed, written down first")
    status = ctl(cli, lab.socket("client"), "--json", "vpn_client", "status").stdout
    deposit = json.loads(status)["billing"]["deposit"]
    shown = lab.ledger("deposit", "show", deposit)
    print(f"deposit {deposit[:16]}: {shown.get('locked')} of {shown.get('initial')} still locked")
    ctl(cli, lab.socket("client"), "vpn_client", "stop")
    show_balances("after")
    for proc in reversed(procs):
        proc.stop()
    procs.clear()


def provider_account(orders: Any) -> str:
    listed = orders.get("orders", []) if isinstance(orders, dict) else orders
    return str(listed[-1]["provider"]) if listed else "?"


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
            procs.append(lab.start_server(vpn_extra="dns = 198.18.5.1\n", clients="enrolled"))
            fp = lab.server.wait_log(r"SHA-256 fingerprint ([0-9A-F:]+)").group(1)  # type: ignore[union-attr]
            print(f"server certificate fingerprint {fp}")
            spki = lab.server.wait_log(r"\(SPKI\) ([0-9a-f]{64})").group(1)  # type: ignore[union-attr]
            print(f"server key SHA-256 (the pin that survives renewals) {spki}")

            say("enroll the client: cellvpn-ctl client add client --out client.cfg")
            enrolled = lab.enroll("client")
            print(f"wrote {enrolled.name}: server, CA, client certificate and key in one file")
            print(ctl(lab.srv, lab.server_socket, "client", "list").stdout.rstrip())

            say("client: twistd -n --pidfile= cellvpn-client --config client.cfg")
            client = lab.start_enrolled_client(cli, "client", enrolled)
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
            procs.clear()

            paid_session(lab, cli, procs, tmp)
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
