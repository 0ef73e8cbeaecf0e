"""Small helpers shared by the namespace tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from cellvpn.lab import LAB_EDGE, NET_GW_IP, SERVER_IP, Namespace, Twistd, VpnLab, wait_for

HERE = Path(__file__).resolve().parent
TCPTOOL = str(HERE / "tcptool.py")
PROBE = str(HERE / "probe.py")


def background(ns: Namespace, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """Run tcptool in ``ns`` in the background; wait until it listens if it is a server."""
    proc = ns.popen([sys.executable, TCPTOOL, *args], log=log)
    if args[0] in ("sink", "source", "echo"):
        wait_for(lambda: "listening" in log.read_text(), timeout=10, what=f"tcptool {args[0]}")
    return proc


def tool(ns: Namespace, *args: str, timeout: float = 120) -> dict[str, Any]:
    out = ns.exec(sys.executable, TCPTOOL, *args, timeout=timeout).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def last_json(proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> dict[str, Any]:
    proc.wait(timeout=timeout)
    result: dict[str, Any] = json.loads(log.read_text().strip().splitlines()[-1])
    return result


def host_snapshot(ns: Namespace) -> dict[str, str]:
    """What a client may change on its host, as text to compare before and after."""
    return {
        "addr": ns.ip("-4", "addr").stdout,
        "links": ns.ip("-o", "link").stdout,
        "routes": ns.ip("-4", "route", "show", "table", "all").stdout,
        "routes6": ns.ip("-6", "route", "show", "table", "all").stdout,
        "rules": ns.ip("rule").stdout,
        "rules6": ns.ip("-6", "rule").stdout,
        "resolv.conf": ns.resolv_conf.read_text(),
    }


def ping(ns: Namespace, target: str, count: int = 3) -> bool:
    done = ns.exec("ping", "-c", str(count), "-i", "0.2", "-W", "2", target, check=False)
    return done.returncode == 0


# --- billing ----------------------------------------------------------------------------------


def ledger_url(work: Path) -> str:
    """The ledger a VpnLab server keeps in its state folder."""
    return f"sqlite:///{work / 'state' / 'ledger.db'}"


def ledger_ctl(work: Path, *args: str, check: bool = True) -> Any:
    """``cellvpn-ctl --json ledger ARGS --ledger <the lab server's ledger>``, as JSON."""
    from cellvpn.lab import VENV_BIN

    done = subprocess.run(
        [str(VENV_BIN / "cellvpn-ctl"), "--json", "ledger", *args, "--ledger", ledger_url(work)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"cellvpn-ctl ledger {args[0]} failed: {done.stderr.strip()}")
    return json.loads(done.stdout) if done.stdout.strip() else {"error": done.stderr.strip()}


def wallet(work: Path, name: str, mint: int) -> tuple[Path, str]:
    """A client key file with ``mint`` datoshi in its account; returns (key path, account)."""
    key = work / f"{name}.key"
    account: str = ledger_ctl(work, "keygen", str(key))["account"]
    if mint:
        ledger_ctl(work, "mint", account, str(mint))
    return key, account


def wallet_section(
    key: Path, deposit_value: int = 0, max_unit_price: int = 1, deposit: str = ""
) -> str:
    text = f"[wallet]\nkey = {key}\nmax_unit_price = {max_unit_price}\n"
    if deposit_value:
        text += f"deposit_value = {deposit_value}\n"
    if deposit:
        text += f"deposit = {deposit}\n"
    return text


def billing_section(price: int, unit: str, units: int, extra: str = "") -> str:
    return f"[billing]\nprice = {price}\nprice_unit = {unit}\nunits = {units}\n" + extra


# --- a second server beside the lab's -----------------------------------------------------------


def second_server(
    lab: VpnLab,
    port: int,
    pool: str,
    extra: str = "",
    vpn_extra: str = "",
    address: str = SERVER_IP,
) -> Twistd:
    """Another ``twistd cellvpn`` in the lab's server host, on ``port`` with the pool
    ``pool`` (a /24 of 198.18.0.0/15) and TUN cvpn-srv2, using the lab server's certificate
    (so lab clients trust it) and a state_dir of its own; the net host routes the pool back.
    ``extra`` is added at the end, ``vpn_extra`` into [srv_vpn]; it listens on ``address``."""
    work = lab.work
    state = work / "state"
    name = f"server{port}"
    cfg = work / f"{name}.cfg"
    network = pool.split("/")[0]
    cfg.write_text(
        "[server]\n"
        f"listen = tcp:{port}:interface={address}\n"
        f"state_dir = {work / (name + '-state')}\n"
        "source_prefix_v4 = 32\n"
        f"[edge]\n{LAB_EDGE}"
        f"[tls]\nclients = any\ncertificate = {state / 'tls' / 'server.pem'}\n"
        f"private_key = {state / 'tls' / 'server.key'}\n"
        f"[srv_vpn]\nnetwork_address = {network}\nnetwork_mask = 255.255.255.0\n"
        "tun_name = cvpn-srv2\nmtu = 1400\n"
        + vpn_extra
        + f"[control]\nsocket = {work / (name + '.sock')}\n"
        + extra
    )
    lab.net.ip("route", "add", pool, "via", NET_GW_IP)
    server = Twistd(lab.srv, "cellvpn", cfg, work / f"{name}.log")
    server.wait_log(r"TUN cvpn-srv2 up")
    return server
