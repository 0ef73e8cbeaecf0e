"""The crash journal on disk, and the DNS methods without touching the host.

The DNS tests here point the configurator at a file of their own (the file method) or replace
the command runner (the daemon methods), so nothing of the host's resolver is changed.
"""

from __future__ import annotations

import json
import os
import stat
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import pytest_twisted

from cellvpn.net.dns import HEADER, DnsConfigurator
from cellvpn.net.journal import DnsMethod, DnsRecord, Journal, JournalState, cleanup_leftovers
from cellvpn.net.netlink import NetConfigError, Netlink, Route

pytestmark = pytest.mark.timeout(20)

ROUTE = Route("0.0.0.0/1", oif="cvpn0")
GUARD = Route("::/1", kind="unreachable", family=6)
ODD_BYTES = b"# not utf-8: \xff\xfe\nnameserver 192.0.2.53\n"


def test_journal_is_private_and_survives_a_new_object(tmp_path: Path) -> None:
    path = tmp_path / "state" / "net-journal.json"
    journal = Journal(path)
    journal.record_tun("cvpn0")
    journal.record_route(ROUTE)
    journal.record_route(GUARD)
    journal.record_dns(DnsRecord("file", "cvpn0", "/etc/resolv.conf", ODD_BYTES))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not list(path.parent.glob("*.tmp"))
    again = Journal(path).state()
    assert again == JournalState("cvpn0", (ROUTE, GUARD), journal.state().dns)
    assert again.dns is not None and again.dns.saved == ODD_BYTES
    assert json.loads(path.read_text())["routes"][0]["dst"] == "0.0.0.0/1"


def test_forgetting_everything_removes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "j.json"
    journal = Journal(path)
    journal.record_route(ROUTE)
    journal.record_route(ROUTE)
    journal.forget_route(ROUTE)
    assert Journal(path).state().routes == (ROUTE,)
    journal.forget_route(ROUTE)
    assert not path.exists()
    assert journal.state().empty


@pytest_twisted.ensureDeferred
async def test_an_unreadable_journal_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "j.json"
    path.write_text("{half")
    journal = Journal(path)
    dns = DnsConfigurator(tmp_path / "resolv.conf")
    lines = await cleanup_leftovers(journal, Netlink(), dns)
    assert "set aside" in lines[0]
    assert (tmp_path / "j.json.bad").read_text() == "{half"
    assert journal.state().empty


@pytest_twisted.ensureDeferred
async def test_file_method_rewrites_in_place_and_restores_every_byte(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_bytes(ODD_BYTES)
    inode = os.stat(conf).st_ino
    journal = Journal(tmp_path / "j.json")
    dns = DnsConfigurator(conf, journal=journal)
    assert await dns.apply([IPv4Address("198.18.0.1")], "cvpn0") == "file"
    assert conf.read_bytes().startswith(HEADER)
    assert b"nameserver 198.18.0.1\n" in conf.read_bytes()
    recorded = journal.state().dns
    assert recorded is not None and recorded.saved == ODD_BYTES
    # A second apply (new servers after a reconnect) keeps the content from before the first.
    await dns.apply([IPv4Address("198.18.0.2")], "cvpn0")
    assert b"nameserver 198.18.0.2\n" in conf.read_bytes()
    assert "restored" in await dns.restore()
    assert conf.read_bytes() == ODD_BYTES
    assert os.stat(conf).st_ino == inode
    assert journal.state().empty
    assert dns.method is None


class RecordingDns(DnsConfigurator):
    """A configurator that believes a daemon serves the host and only records its commands."""

    def __init__(self, method: DnsMethod, journal: Journal, fail: str = "") -> None:
        super().__init__(Path("/nonexistent/resolv.conf"), journal=journal)
        self.chosen: DnsMethod = method
        self.fail = fail
        self.commands: list[tuple[list[str], bytes | None]] = []

    def _choose(self) -> DnsMethod:
        return self.chosen

    def _run(self, argv: list[str], stdin: bytes | None = None) -> None:
        self.commands.append((argv, stdin))
        if self.fail and self.fail in argv:
            raise NetConfigError(f"{' '.join(argv)} failed: no")


@pytest_twisted.ensureDeferred
async def test_systemd_resolved_gets_per_link_servers_and_the_catch_all_domain(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "j.json")
    dns = RecordingDns("resolved", journal)
    await dns.apply([IPv4Address("198.18.0.1"), IPv4Address("198.18.0.2")], "lo")
    assert dns.method == "resolved"
    assert [c[0] for c in dns.commands] == [
        ["resolvectl", "dns", "lo", "198.18.0.1", "198.18.0.2"],
        ["resolvectl", "domain", "lo", "~."],
    ]
    state = journal.state()
    assert state.dns is not None and state.dns.method == "resolved"
    await dns.restore()  # "lo" exists, so it is reverted
    assert dns.commands[-1][0] == ["resolvectl", "revert", "lo"]
    assert journal.state().empty


@pytest_twisted.ensureDeferred
async def test_resolvconf_gets_a_record_of_its_own(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.json")
    dns = RecordingDns("resolvconf", journal)
    await dns.apply([IPv4Address("198.18.0.1")], "cvpn0")
    assert dns.commands == [(["resolvconf", "-a", "cvpn0.cellvpn"], b"nameserver 198.18.0.1\n")]
    await dns.restore()
    assert dns.commands[-1][0] == ["resolvconf", "-d", "cvpn0.cellvpn"]


@pytest_twisted.ensureDeferred
async def test_a_failed_daemon_change_is_undone_and_not_left_in_the_journal(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "j.json")
    dns = RecordingDns("resolvconf", journal, fail="-a")
    with pytest.raises(NetConfigError, match=r"resolvconf -a cvpn0\.cellvpn failed"):
        await dns.apply([IPv4Address("198.18.0.1")], "cvpn0")
    assert dns.commands[-1][0] == ["resolvconf", "-d", "cvpn0.cellvpn"]
    assert journal.state().empty
    assert dns.method is None


def test_records_keep_what_they_need(tmp_path: Path) -> None:
    record = DnsRecord("resolved", "cvpn0", "/etc/resolv.conf")
    assert DnsRecord.from_json(record.to_json()) == record
    with pytest.raises(ValueError):
        DnsRecord.from_json({"method": "nmcli", "interface": "x", "resolv_conf": "/x"})
