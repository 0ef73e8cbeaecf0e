"""A fleet: three twistd servers in three namespaces on one PostgreSQL ledger, paying clients.

::

    [srv1] 192.0.2.11 ─┐
    [srv2] 192.0.2.12 ─┼─ br0 [hub] ─ 192.0.2.20 [cli]   (payers, a full client)
    [srv3] 192.0.2.13 ─┘

The ledger is the throwaway PostgreSQL cluster of ``tests/billing/pgcluster.py``, reached over
its Unix socket (no TCP at all). The servers share the provider key and the fleet's CA (made
with ``cellvpn-ctl fleet ca init``, its key never in a server's state_dir); each has its own
certificate (``fleet server-cert``). Enrolled clients and revocations live in the ledger.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cellvpn.billing.interfaces import EnrolledRow
from cellvpn.billing.keys import create_key
from cellvpn.billing.offers import read_offer
from cellvpn.billing.records import SignedOrder
from cellvpn.billing.sqlite import open_ledger
from cellvpn.conn import pki
from cellvpn.lab import LAB_EDGE, VENV_BIN, Namespace, Twistd, ctl_json, wait_for
from tests.billing.pgcluster import PgCluster, pg_bin

HERE = Path(__file__).resolve().parent
PAYERS = str(HERE / "payers.py")
PROBE = str(HERE / "probe.py")
SERVERS = {1: "192.0.2.11", 2: "192.0.2.12", 3: "192.0.2.13"}
CLIENT_IP = "192.0.2.20"
PRICE, UNITS = 10, 4  # 10 datoshi per 4 seconds
PER_SERVER = 10

pytestmark = pytest.mark.timeout(240)


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CELLVPN_REQUIRE_NETNS") == "1":
        pytest.fail(reason + " (CELLVPN_REQUIRE_NETNS=1)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """The throwaway PostgreSQL cluster (its Unix socket), or CELLVPN_TEST_POSTGRES."""
    given = os.environ.get("CELLVPN_TEST_POSTGRES")
    if given:
        yield given
        return
    if os.geteuid() != 0:
        _skip_or_fail("needs root for namespaces and a throwaway PostgreSQL server")
    binaries = pg_bin()
    if binaries is None or shutil.which("runuser") is None:
        _skip_or_fail("needs the PostgreSQL server (apt install postgresql)")
        return
    cluster = PgCluster(binaries)
    try:
        yield cluster.url
    finally:
        cluster.stop()


def ctl(*args: str) -> Any:
    done = subprocess.run(
        [str(VENV_BIN / "cellvpn-ctl"), "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise AssertionError(f"cellvpn-ctl {' '.join(args[:3])}: {done.stderr.strip()}")
    return json.loads(done.stdout)


class Fleet:
    """The hub, three server hosts, one client host, the fleet's CA and ledger."""

    def __init__(self, make: Any, work: Path, url: str) -> None:
        self.work, self.url = work, url
        open_ledger(url).close()  # the fleet's ledger, made once by its operator
        self.hub: Namespace = make("fhub")
        self.hub.ip("link", "add", "br0", "type", "bridge")
        self.hub.ip("link", "set", "br0", "up")
        self.hosts: dict[int, Namespace] = {}
        for n, ip in SERVERS.items():
            self.hosts[n] = self._attach(make(f"fsrv{n}"), f"s{n}", ip)
        self.cli = self._attach(make("fcli"), "c", CLIENT_IP)
        self.ca = work / "fleet-ca"
        ctl("fleet", "ca", "init", str(self.ca))
        self.ca_pem = self.ca / "ca.pem"
        self.fleet = pki.spki_fingerprint(pki.load_certificates(self.ca_pem)[0])
        self.provider_key = work / "provider.key"
        self.provider = create_key(self.provider_key)
        self.servers: dict[int, Twistd] = {}

    def _attach(self, ns: Namespace, tag: str, ip: str) -> Namespace:
        self.hub.ip(
            "link", "add", f"{tag}h", "type", "veth", "peer", "name", "eth0", "netns", ns.name
        )
        self.hub.ip("link", "set", f"{tag}h", "master", "br0")
        self.hub.ip("link", "set", f"{tag}h", "up")
        ns.ip("addr", "add", f"{ip}/24", "dev", "eth0")
        ns.ip("link", "set", "eth0", "up")
        return ns

    def config(self, n: int) -> Path:
        ip, state = SERVERS[n], self.work / f"srv{n}-state"
        ctl("fleet", "server-cert", str(self.ca), "--state-dir", str(state), "--name", ip)
        cfg = self.work / f"srv{n}.cfg"
        cfg.write_text(
            "[server]\n"
            f"listen = tcp:8089:interface={ip}\n"
            f"state_dir = {state}\n"
            f"public = {ip}:8089\n"
            f"region = r{n}\n"
            "offer_interval = 1\n"
            "source_prefix_v4 = 32\n"
            f"[edge]\n{LAB_EDGE}"
            f"[tls]\nnames = {ip}\nclients = enrolled\nregistry = ledger\nregistry_refresh = 1\n"
            f"[srv_vpn]\nnetwork_address = 198.18.{10 + n}.0\nnetwork_mask = 255.255.255.0\n"
            "tun_name = cvpn-srv\nmtu = 1400\ngrace_period = 3\n"
            f"[billing]\nkey = {self.provider_key}\nprice = {PRICE}\nprice_unit = SEC\n"
            f"units = {UNITS}\nsave_interval = 1\nmark_ttl = 10\ngrace_budget_seconds = 2\n"
            f"[ledger]\nurl = {self.url}\n"
            f"[control]\nsocket = {self.work / f'srv{n}.sock'}\n"
        )
        return cfg

    def start(self, n: int) -> Twistd:
        server = Twistd(self.hosts[n], "cellvpn", self.config(n), self.work / f"srv{n}.log")
        self.servers[n] = server
        return server

    def enroll(self, name: str) -> tuple[Path, Path]:
        """A client certificate of the fleet's CA, recorded in the ledger as ``fleet client
        add`` records it; the certificate and key files."""
        authority = pki.load_fleet_ca(self.ca)
        request = pki.new_client_request(name)
        cert = pki.sign_client_request(authority, name, request.csr_pem, 30)
        cert_file, key_file = self.work / f"{name}.pem", self.work / f"{name}.key.pem"
        cert_file.write_bytes(pki.certificate_pem(cert))
        key_file.write_bytes(request.key_pem)
        led = open_ledger(self.url, create=False)
        led.enroll_client(
            EnrolledRow(
                self.fleet, name, pki.serial_text(cert), pki.fingerprint_of(cert),
                cert.not_valid_after_utc.timestamp(), time.time(),
            ),
            time.time(),
        )  # fmt: skip
        led.close()
        return cert_file, key_file

    def wallets(self, count: int, tag: str, value: int = 100_000) -> list[dict[str, str]]:
        """``count`` client keys with a deposit each, made in the ledger directly (fast)."""
        from tests.billing.helpers import deposit

        led = open_ledger(self.url, create=False)
        out = []
        try:
            for i in range(count):
                path = self.work / f"{tag}{i}.key"
                keypair = create_key(path)
                led.mint(keypair.account, value, keypair.public)
                expires = int(time.time()) + 86400
                signed = deposit(keypair, value // 2, max_unit_price=5, expires=expires, n=i)
                row = led.create_deposit(signed, time.time())
                out.append(
                    {
                        "key": str(path),
                        "deposit": row.id.hex(),
                        "state": str(self.work / f"{tag}{i}-state"),
                    }
                )
        finally:
            led.close()
        return out

    def payers(
        self,
        n: int,
        clients: list[dict[str, str]],
        duration: float,
        cert: tuple[Path, Path],
        tag: str,
    ) -> subprocess.Popen[bytes]:
        spec = self.work / f"{tag}.json"
        spec.write_text(
            json.dumps(
                {
                    "host": SERVERS[n], "port": 8089, "ca": str(self.ca_pem), "max_unit_price": 5,
                    "duration": duration, "clients": clients,
                    "certificate": str(cert[0]), "private_key": str(cert[1]),
                }
            )
        )  # fmt: skip
        return self.cli.popen(
            [sys.executable, PAYERS, str(spec), str(self.work / f"{tag}.result")],
            log=self.work / f"{tag}.log",
        )

    def grace(self, n: int, key: Path, cert: tuple[Path, Path]) -> bool:
        """Whether server ``n`` gives grace to ``key`` for a deposit no ledger knows; the
        session stays 2.5 s (inside grace_period) and leaves, its grace booked once it ends."""
        ended = self.servers[n].text().count(" ended: ")
        done = self.cli.exec(
            "env", f"PROBE_CERT={cert[0]}", f"PROBE_KEY={cert[1]}",
            sys.executable, PROBE, SERVERS[n], "8089", str(self.ca_pem),
            "grace-hold", str(key), os.urandom(32).hex(), "2.5",
        )  # fmt: skip
        events = [json.loads(line) for line in done.stdout.splitlines()]
        wait_for(
            lambda: self.servers[n].text().count(" ended: ") > ended,
            timeout=10,
            what=f"server {n} to end the grace session",
        )
        time.sleep(0.5)  # the booking is the session's last ledger write
        return bool(events[-1]["value"])

    def result(self, tag: str, proc: subprocess.Popen[bytes]) -> list[dict[str, Any]]:
        proc.wait(timeout=90)
        clients: list[dict[str, Any]] = json.loads((self.work / f"{tag}.result").read_text())[
            "clients"
        ]
        return clients


def _check_every_receipt_once(url: str, results: list[dict[str, Any]]) -> None:
    """No lost and no double redemption: what each payer saw confirmed is in the ledger,
    each receipt once, the chain of every deposit without a gap, and money adds up."""
    led = open_ledger(url, create=False)
    try:
        ok, figures = led.check_invariant()
        assert ok, figures
        for r in results:
            rows = led.receipts(deposit_id=bytes.fromhex(r["deposit"]))
            assert [row.seq for row in rows] == list(range(1, len(rows) + 1))
            assert len({row.hash for row in rows}) == len(rows)
            deposit = led.get_deposit(bytes.fromhex(r["deposit"]))
            assert deposit is not None
            assert deposit.initial - deposit.locked == sum(row.value for row in rows)
            assert len(r["confirmed"]) <= len(rows) <= len(r["signed"])
    finally:
        led.close()


def test_a_fleet_on_one_postgresql_ledger(netns: Any, tmp_path: Path, pg_url: str) -> None:
    fleet = Fleet(netns, tmp_path, pg_url)
    payer_cert = fleet.enroll("payers")
    for n in SERVERS:
        fleet.start(n)
    for n, server in fleet.servers.items():
        server.wait_log(r"offer published: ", timeout=60)
        assert "CA key is kept elsewhere" in server.text()
        assert not (tmp_path / f"srv{n}-state" / "tls" / "ca.key").exists()

    # --- the offers: each server publishes, each hands out all three --------------------
    led = open_ledger(pg_url, create=False)
    rows = led.offers(fleet.provider.account)
    led.close()
    offers = [read_offer(SignedOrder.decode(r.signed), fleet.provider.public) for r in rows]
    assert sorted(o.endpoint for o in offers) == [f"{ip}:8089" for ip in SERVERS.values()]
    assert sorted(o.region for o in offers) == ["r1", "r2", "r3"]

    # --- 30 payers at once, 10 on each server -------------------------------------------
    groups = {n: fleet.wallets(PER_SERVER, f"p{n}-") for n in SERVERS}
    procs = {n: fleet.payers(n, groups[n], 6.0, payer_cert, f"run{n}") for n in SERVERS}
    results = {n: fleet.result(f"run{n}", p) for n, p in procs.items()}
    everyone = [r for rs in results.values() for r in rs]
    assert len(everyone) == 3 * PER_SERVER
    assert all(r["granted_after"] is not None for r in everyone), everyone
    assert all(r["confirmed"] for r in everyone), "every payer paid at least one receipt"
    time.sleep(1.5)  # the last saves (save_interval 1 s) of the ended sessions
    _check_every_receipt_once(pg_url, everyone)

    # --- saved limits go from one server to another -------------------------------------
    movers = groups[1][:3]
    led = open_ledger(pg_url, create=False)
    saved = []
    for m in movers:
        row = led.get_deposit(bytes.fromhex(m["deposit"]))
        assert row is not None
        limits = led.load_limits(fleet.provider.account, row.owner, row.id)
        saved.append(limits.seconds_left if limits is not None else 0.0)
    led.close()
    assert any(s > 0 for s in saved), saved
    again = fleet.payers(2, movers, 1.0, payer_cert, "moved")
    moved = fleet.result("moved", again)
    assert all(r["granted_after"] is not None for r in moved)
    resumed = re.findall(r"resuming with (\d+) seconds saved", fleet.servers[2].text())
    assert len(resumed) == sum(s > 0 for s in saved), fleet.servers[2].text()[-3000:]
    time.sleep(1.5)
    _check_every_receipt_once(pg_url, [*everyone, *moved])

    # --- a revocation and a ban made once hold on every server --------------------------
    mallory = fleet.enroll("mallory")
    banned = fleet.wallets(1, "banned-")
    ctl("fleet", "client", "revoke", "mallory", "--ca", str(fleet.ca), "--ledger", pg_url)
    led = open_ledger(pg_url, create=False)
    banned_account = led.deposits()[-1].owner
    led.ban(fleet.provider.account, banned_account, time.time() + 600)
    led.close()
    time.sleep(2.5)  # registry_refresh is 1 s
    for n in (2, 3):
        tried = fleet.result(
            f"mallory{n}", fleet.payers(n, fleet.wallets(1, f"m{n}-"), 0.5, mallory, f"mallory{n}")
        )
        assert tried[0]["granted_after"] is None
        fleet.servers[n].wait_log(r"was revoked by the server's operator", timeout=10)
        tried = fleet.result(f"ban{n}", fleet.payers(n, banned, 0.5, payer_cert, f"ban{n}"))
        assert tried[0]["granted_after"] is None, tried
        assert "banned" in str(tried[0]["refused"]).lower(), tried

    # --- a grace budget spent on one server is spent on all -----------------------------
    grace_key = tmp_path / "grace.key"
    create_key(grace_key)
    granted = [fleet.grace(n, grace_key, payer_cert) for n in (1, 3)]
    assert granted == [True, False]
    fleet.servers[3].wait_log(r"no grace left for key:[0-9a-f]+", timeout=10)

    # --- a full client; its server killed with SIGKILL: it moves on, same deposit --------
    roamer_cfg = tmp_path / "roamer.cfg"
    ctl(
        "fleet", "client", "add", "roamer", "--ca", str(fleet.ca), "--ledger", pg_url,
        "--server", f"{SERVERS[1]}:8089", "--out", str(roamer_cfg),
    )  # fmt: skip
    [wallet] = fleet.wallets(1, "roamer-")
    with roamer_cfg.open("a") as f:
        f.write(
            f"vpn = false\nservers = {SERVERS[2]}:8089, {SERVERS[3]}:8089\nreconnect_budget = 2\n"
            f"keepalive = 0.5\nstate_dir = {tmp_path / 'roamer-state'}\n"
            f"[control]\nsocket = {tmp_path / 'roamer.sock'}\n"
            f"[wallet]\nkey = {wallet['key']}\ndeposit = {wallet['deposit']}\nmax_unit_price = 5\n"
        )
    roamer = Twistd(fleet.cli, "cellvpn-client", roamer_cfg, tmp_path / "roamer.log")
    up = roamer.wait_log(r"VPN up: session \S+ with (\S+),", timeout=30)
    first = up.group(1)
    roamer.wait_log(r"the provider offers 3 server\(s\)", timeout=10)
    victim = next(n for n, ip in SERVERS.items() if first.startswith(ip))
    fleet.servers[victim].wait_log(r"receipt \w+ redeemed", timeout=20)
    fleet.servers[victim].proc.send_signal(signal.SIGKILL)
    fleet.servers[victim].proc.wait(timeout=10)
    killed = time.monotonic()
    moved_to = roamer.wait_log(r"moving to server (\S+):", timeout=30).group(1)
    assert moved_to != first
    later = wait_for(
        lambda: re.findall(r"VPN up: session \S+ with (\S+),", roamer.text())[1:],
        timeout=40,
        what="the client up on another server",
    )
    assert later[-1] == moved_to
    took = time.monotonic() - killed
    assert took < 35, took  # reconnect budget, then at most mark_ttl (10 s) for the mark
    survivor = next(n for n, ip in SERVERS.items() if moved_to.startswith(ip))
    fleet.servers[survivor].wait_log(r"takes over deposit \w+ from a stale mark", timeout=5)

    def paid_twice() -> bool:
        led = open_ledger(pg_url, create=False)
        try:
            return len(led.receipts(deposit_id=bytes.fromhex(wallet["deposit"]))) >= 2
        finally:
            led.close()

    wait_for(paid_twice, timeout=20, interval=0.5, what="a receipt redeemed by the new server")
    status = ctl_json(fleet.cli, tmp_path / "roamer.sock", "status")
    assert status["billing"]["deposit"] == wallet["deposit"]
    # the killed server's offer is Not available: the others stop handing it out
    roamer.wait_log(r"the provider offers 2 server\(s\)", timeout=10)
    led = open_ledger(pg_url, create=False)
    stale = [
        read_offer(SignedOrder.decode(r.signed), fleet.provider.public)
        for r in led.offers(fleet.provider.account)
        if r.instance
    ]
    receipts = led.receipts(deposit_id=bytes.fromhex(wallet["deposit"]))
    led.close()
    now = time.time()
    assert [o.endpoint for o in stale if not o.available(now)] == [f"{SERVERS[victim]}:8089"]
    assert len({r.provider for r in receipts}) == 1 and len(receipts) >= 2
    assert [r.seq for r in receipts] == list(range(1, len(receipts) + 1))
    roamer.stop()
    for n, server in fleet.servers.items():
        if n != victim:
            server.stop()
    led = open_ledger(pg_url, create=False)
    left = [r.instance for r in led.offers(fleet.provider.account)]
    ok, figures = led.check_invariant()
    led.close()
    assert ok, figures
    assert len(left) == 1, "a clean stop withdraws the offer; the killed one's stays, stale"
