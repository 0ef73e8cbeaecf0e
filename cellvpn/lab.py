"""A lab on one machine: network namespaces, veth links and twistd processes.

The tests, ``make demo`` and the benchmarks build their hosts with it.

Everything here stays inside namespaces it creates itself (named ``cvpn-...``), uses only
192.0.2.0/24 (and, in an IPv6 lab, 2001:db8::/64) for underlays and 198.18.0.0/15 for overlays,
and is torn down by PID and by name in ``close()``, also when a test fails.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: The bin folder of the environment running this code, where twistd and cellvpn-ctl live.
VENV_BIN = Path(sys.executable).parent
_counter = itertools.count()


def run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)


class Namespace:
    """One network namespace with its own resolv.conf; ``close()`` removes all of it.

    IPv6 is off unless ``ipv6=True`` (then only link-local and 2001:db8::/32 are used).
    """

    def __init__(self, tag: str, exact: bool = False, ipv6: bool = False) -> None:
        self.name = f"cvpn-{tag}" if exact else f"cvpn-{tag}-{os.getpid()}-{next(_counter)}"
        if exact:
            run("ip", "netns", "del", self.name, check=False)  # a leftover of a killed run
        self.etc = Path("/etc/netns") / self.name
        run("ip", "netns", "add", self.name)
        self.etc.mkdir(parents=True, exist_ok=True)
        self.resolv_conf = self.etc / "resolv.conf"
        self.resolv_conf.write_text("# cellvpn test namespace\nnameserver 192.0.2.53\n")
        if not ipv6:
            # no IPv6 at all unless a test asks: nothing but the allowed IPv4 ranges is sent
            for key in ("all", "default"):
                self.sysctl(f"net.ipv6.conf.{key}.disable_ipv6", "1")
        self.ip("link", "set", "lo", "up")
        self.processes: list[subprocess.Popen[bytes]] = []

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "-n", self.name, *args, check=check)

    def exec(
        self, *cmd: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.name, *cmd, check=check, timeout=timeout)

    def popen(
        self, cmd: Sequence[str], log: Path | None = None, **kw: Any
    ) -> subprocess.Popen[bytes]:
        out: Any = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kw,
        )
        if log:
            out.close()
        self.processes.append(proc)
        return proc

    def sysctl(self, key: str, value: str) -> None:
        self.exec("sysctl", "-qw", f"{key}={value}")

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        pids = run("ip", "netns", "pids", self.name, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        run("ip", "netns", "del", self.name, check=False)
        shutil.rmtree(self.etc, ignore_errors=True)


def link(a: Namespace, a_addr: str, b: Namespace, b_addr: str, name: str = "veth") -> None:
    """A veth pair between two namespaces, created inside them (the host is never touched)."""
    a.ip("link", "add", f"{name}0", "type", "veth", "peer", "name", f"{name}1", "netns", b.name)
    a.ip("addr", "add", a_addr, "dev", f"{name}0")
    b.ip("addr", "add", b_addr, "dev", f"{name}1")
    a.ip("link", "set", f"{name}0", "up")
    b.ip("link", "set", f"{name}1", "up")


def wait_for(
    predicate: Callable[[], Any], timeout: float = 20, interval: float = 0.1, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)


class Twistd:
    """A ``twistd -n --pidfile= <plugin> --config FILE`` process in a namespace, with its log."""

    def __init__(
        self,
        ns: Namespace,
        plugin: str,
        config: Path,
        log: Path,
        *extra: str,
        options: tuple[str, ...] = (),
    ) -> None:
        """``options`` go to twistd itself (before the plugin), e.g. ``("-u", "65534")``."""
        self.ns = ns
        self.log = log
        cmd = [str(VENV_BIN / "twistd"), "-n", "--pidfile=", *options, plugin]
        cmd += ["--config", str(config)]
        self.proc = ns.popen([*cmd, *extra], log=log)

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            if self.proc.poll() is not None and not re.search(pattern, self.text()):
                raise AssertionError(
                    f"twistd exited ({self.proc.returncode}) before logging {pattern!r}:\n"
                    + self.text()[-3000:]
                )
            return re.search(pattern, self.text())

        try:
            match: re.Match[str] = wait_for(found, timeout, what=f"log line {pattern!r}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- log {self.log}:\n{self.text()[-3000:]}") from None
        return match

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, then wait. twistd re-raises SIGTERM as it exits: -15 is a clean stop too."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        code = self.proc.returncode
        return 0 if code == -signal.SIGTERM else code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def ctl(
    ns: Namespace | None, socket: Path, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``cellvpn-ctl --socket S ARGS`` (inside ``ns`` when given)."""
    cmd = [str(VENV_BIN / "cellvpn-ctl"), "--socket", str(socket), *args]
    if ns is not None:
        return ns.exec(*cmd, check=check)
    return run(*cmd, check=check)


def ctl_json(ns: Namespace | None, socket: Path, *args: str) -> Any:
    return json.loads(ctl(ns, socket, "--json", *args).stdout)


SERVER_IP = "192.0.2.1"
#: The server's underlay address in a dual-stack lab (``VpnLab(..., ipv6=True)``).
SERVER_IP6 = "2001:db8::1"
NET_HOST_IP = "198.19.0.10"
NET_GW_IP = "198.19.0.1"
#: In a lab with ``overlay6``: the net host's and the server's IPv6 addresses on their link,
#: and the IPv6 network the server leases from.
NET_HOST_IP6 = "2001:db8:5::10"
NET_GW_IP6 = "2001:db8:5::1"
POOL6 = "2001:db8:1::/64"


#: The lab's [edge] keys: the load tests open dozens of sessions from one client host at once.
LAB_EDGE = "connect_rate = 100\nconnect_burst = 200\n"


class VpnLab:
    """A server host, an "internet" host behind it and any number of client hosts.

    ::

        [cli-N] 192.0.2.(N+1) --veth-- 192.0.2.1 [srv] 198.19.0.1 --veth-- 198.19.0.10 [net]

    The clients share one underlay: each client namespace has a veth to the server namespace,
    and the server's side of each is enslaved to one bridge (192.0.2.1/24). The server forwards
    (ip_forward=1) between its TUN and the net host, which routes the pool back through it.

    With ``ipv6=True`` the underlay is dual-stack: the bridge also has 2001:db8::1/64, client N
    also 2001:db8::(N+1)/64, and the server listens on both families (``[::]:8089``) with a
    certificate that names both addresses. The net host and the overlay stay IPv4.

    With ``overlay6=True`` (which implies ``ipv6``) the overlay is dual-stack too: the server
    leases from ``[srv_vpn] network6 = 2001:db8:1::/64`` beside the IPv4 pool, forwards IPv6,
    and the net host has 2001:db8:5::10/64 with the pool routed back through the server.
    """

    def __init__(
        self,
        make: Callable[..., Namespace],
        workdir: Path,
        pool: str = "198.18.5.0/24",
        exact: bool = False,
        ipv6: bool = False,
        overlay6: bool = False,
    ) -> None:
        self.make = make
        self.work = workdir
        self.pool = pool
        self.ipv6 = ipv6 or overlay6
        self.overlay6 = overlay6
        self.srv = self._make("srv" if not exact else "demo-srv")
        if overlay6:
            self.net = self._make("net" if not exact else "demo-net")
        else:
            self.net = make("net") if not exact else make("demo-net")
        self.clients: list[Namespace] = []
        self.exact = exact
        self.srv.ip("link", "add", "br0", "type", "bridge")
        self.srv.ip("addr", "add", f"{SERVER_IP}/24", "dev", "br0")
        if ipv6:
            self.srv.ip("addr", "add", f"{SERVER_IP6}/64", "dev", "br0", "nodad")
        self.srv.ip("link", "set", "br0", "up")
        link(self.srv, f"{NET_GW_IP}/24", self.net, f"{NET_HOST_IP}/24", name="up")
        self.net.ip("route", "add", pool, "via", NET_GW_IP)
        self.srv.sysctl("net.ipv4.ip_forward", "1")
        if overlay6:
            self.srv.ip("addr", "add", f"{NET_GW_IP6}/64", "dev", "up0", "nodad")
            self.net.ip("addr", "add", f"{NET_HOST_IP6}/64", "dev", "up1", "nodad")
            self.net.ip("route", "add", POOL6, "via", NET_GW_IP6)
            self.srv.sysctl("net.ipv6.conf.all.forwarding", "1")
        self.server: Twistd | None = None
        self.http: subprocess.Popen[bytes] | None = None
        self.server_socket = workdir / "server.sock"

    def _make(self, tag: str) -> Namespace:
        """A namespace; in an IPv6 lab with IPv6 on and no duplicate address detection to
        wait out (every address here is the lab's own)."""
        if not self.ipv6:
            return self.make(tag)
        ns = self.make(tag, ipv6=True)
        for key in ("all", "default"):
            ns.sysctl(f"net.ipv6.conf.{key}.accept_dad", "0")
        return ns

    def add_client_host(self) -> Namespace:
        n = len(self.clients) + 1
        ns = self._make(f"cli{n}") if not self.exact else self._make("demo-cli")
        v = f"c{n}"
        self.srv.ip(
            "link", "add", f"{v}s", "type", "veth", "peer", "name", "eth0", "netns", ns.name
        )
        self.srv.ip("link", "set", f"{v}s", "master", "br0")
        self.srv.ip("link", "set", f"{v}s", "up")
        ns.ip("addr", "add", f"192.0.2.{n + 1}/24", "dev", "eth0")
        if self.ipv6:
            ns.ip("addr", "add", f"2001:db8::{n + 1:x}/64", "dev", "eth0", "nodad")
        ns.ip("link", "set", "eth0", "up")
        ns.ip("route", "add", "default", "via", SERVER_IP)
        self.clients.append(ns)
        return ns

    def cut(self, ns: Namespace) -> None:
        """Take a client's underlay down (its veth), as if the cable were pulled."""
        ns.ip("link", "set", "eth0", "down")

    def mend(self, ns: Namespace) -> None:
        ns.ip("link", "set", "eth0", "up")
        ns.ip("route", "replace", "default", "via", SERVER_IP)

    def start_server(
        self,
        extra: str = "",
        vpn_extra: str = "",
        edge: str = LAB_EDGE,
        options: tuple[str, ...] = (),
        clients: str | None = "any",
        tls_extra: str = "",
        server_extra: str = "",
        names: str = "",
    ) -> Twistd:
        """Start ``twistd cellvpn``; ``vpn_extra`` goes into [srv_vpn], ``edge`` into [edge],
        ``tls_extra`` into [tls], ``server_extra`` into [server], ``extra`` at the end;
        ``names`` are the certificate's names (default the server's addresses).

        ``clients`` is ``[tls] clients``: the lab's clients have no certificates, so it serves
        ``any`` client unless a test enrolls them (``None`` leaves the key out: the default,
        ``enrolled``).

        Every lab client is one address of 192.0.2.0/24, so each is its own source (/32), and
        the lab's edge lets one client host open many sessions at once (the load tests do).
        """
        cfg = self.work / "server.cfg"
        listen = "tcp6:8089:interface=\\:\\:" if self.ipv6 else f"tcp:8089:interface={SERVER_IP}"
        names = names or (f"{SERVER_IP}, {SERVER_IP6}" if self.ipv6 else SERVER_IP)
        cfg.write_text(
            "[server]\n"
            f"listen = {listen}\n"
            "state_dir = state\n"
            "source_prefix_v4 = 32\n" + server_extra + "[edge]\n" + edge + "[tls]\n"
            f"names = {names}\n"
            + (f"clients = {clients}\n" if clients is not None else "")
            + tls_extra
            + "[srv_vpn]\n"
            f"network_address = {self.pool.split('/')[0]}\n"
            f"network_mask = {_mask(self.pool)}\n"
            "tun_name = cvpn-srv\n"
            + (f"network6 = {POOL6}\n" if self.overlay6 else "")
            + "mtu = 1400\n"
            + vpn_extra
            + "[control]\n"
            f"socket = {self.server_socket}\n" + extra
        )
        self.server = Twistd(self.srv, "cellvpn", cfg, self.work / "server.log", options=options)
        self.server.wait_log(r"TUN cvpn-srv up")
        if "price" in extra:  # its order is in the ledger before a test reads the ledger
            self.server.wait_log(r"billing: order [0-9a-f]{16}")
        return self.server

    def ledger(self, *args: str, check: bool = True) -> Any:
        """``cellvpn-ctl --json ledger ARGS`` on the server's ledger file, as JSON."""
        url = f"sqlite:///{self.work / 'state' / 'ledger.db'}"
        done = subprocess.run(
            [str(VENV_BIN / "cellvpn-ctl"), "--json", "ledger", *args, "--ledger", url],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"cellvpn-ctl ledger {args[0]}: {done.stderr.strip()}")
        return json.loads(done.stdout) if done.stdout.strip() else {"error": done.stderr.strip()}

    @property
    def ca(self) -> Path:
        return self.work / "state" / "tls" / "ca.pem"

    def client_config(
        self, name: str, extra: str = "", section_extra: str = "", server: str = ""
    ) -> Path:
        """``server`` is ``[client] server`` (default the IPv4 ``192.0.2.1:8089``)."""
        cfg = self.work / f"{name}.cfg"
        cfg.write_text(
            "[client]\n"
            f"server = {server or f'{SERVER_IP}:8089'}\n"
            f"ca = {self.ca}\n"
            f"state_dir = {self.work / name}-state\n"
            "tun_name = cvpn-cli\n"
            + section_extra
            + f"[control]\nsocket = {self.socket(name)}\n"
            + extra
        )
        return cfg

    def socket(self, name: str) -> Path:
        return self.work / f"{name}.sock"

    def start_client(
        self,
        ns: Namespace,
        name: str,
        section_extra: str = "",
        wait: bool = True,
        extra: str = "",
        server: str = "",
    ) -> Twistd:
        """Start ``twistd cellvpn-client``; ``section_extra`` goes into [client], ``extra``
        (other sections) at the end; ``server`` as in :meth:`client_config`."""
        cfg = self.client_config(name, extra=extra, section_extra=section_extra, server=server)
        client = Twistd(ns, "cellvpn-client", cfg, self.work / f"{name}.log")
        if wait:
            client.wait_log(r"VPN up: ")
        return client

    def enroll(self, name: str, days: int = 30) -> Path:
        """``cellvpn-ctl client add NAME --out FILE`` on the server's control socket: the
        client file it writes (a server started with ``clients="enrolled"`` or ``None``)."""
        out = self.work / f"{name}.cfg"
        ctl(
            self.srv,
            self.server_socket,
            "client",
            "add",
            name,
            "--days",
            str(days),
            "--out",
            str(out),
        )
        return out

    def start_enrolled_client(
        self, ns: Namespace, name: str, cfg: Path, *sets: str, wait: bool = True
    ) -> Twistd:
        """``twistd cellvpn-client --config FILE`` with a file from :meth:`enroll`, as it is;
        only what belongs to this host (state folder, control socket, TUN name, and ``sets``,
        each ``section.key=value``) is given on the command line, as a second client on one
        machine needs."""
        extra = [
            "--set",
            f"client.state_dir={self.work / name}-state",
            "--control-socket",
            str(self.socket(name)),
            "--tun-name",
            "cvpn-cli",
        ]
        for item in sets:
            extra += ["--set", item]
        client = Twistd(ns, "cellvpn-client", cfg, self.work / f"{name}.log", *extra)
        if wait:
            client.wait_log(r"VPN up: ")
        return client

    def serve_http(self, page: bytes = b"hello from the cellvpn lab\n") -> None:
        root = self.work / "www"
        root.mkdir(exist_ok=True)
        (root / "index.html").write_bytes(page)
        self.net.popen(
            [
                sys.executable,
                "-m",
                "http.server",
                "--bind",
                NET_HOST_IP,
                "--directory",
                str(root),
                "80",
            ],
            log=self.work / "http.log",
        )
        wait_for(
            lambda: self.net.exec("ss", "-ltn", check=False).stdout.count(f"{NET_HOST_IP}:80") > 0,
            timeout=10,
            what="the HTTP server",
        )


def _mask(cidr: str) -> str:
    import ipaddress

    return str(ipaddress.IPv4Network(cidr).netmask)
