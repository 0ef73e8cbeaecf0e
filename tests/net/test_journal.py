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
from twisted.internet.defer import Deferred, fail, succeed

from cellvpn.net.dns import HEADER, DnsConfigurator
from cellvpn.net.journal import (
    DnsMethod,
    DnsRecord,
    Journal,
    JournalError,
    JournalState,
    cleanup_leftovers,
    foreign_tun,
)
from cellvpn.net.netlink import LinkInfo, NetConfigError, Netlink, Route

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


# --- the TUN: deleted only when its ifindex and mark are still the recorded ones ----------------

MARK = "cellvpn 0123456789abcdef"
INTO_TUN = Route("0.0.0.0/1", oif="cvpn0")
CARRIER = Route("198.19.9.9/32", gateway="192.0.2.254", oif="veth1")


class FakeNetlink(Netlink):
    """Links and routes as a dict and a list; records what the cleanup deletes."""

    def __init__(self, links: dict[str, LinkInfo], fail_lookup: bool = False) -> None:
        super().__init__()
        self.links = links
        self.fail_lookup = fail_lookup
        self.deleted: list[str] = []

    def link_info(self, name: str) -> Deferred[LinkInfo | None]:
        if self.fail_lookup:
            return fail(NetConfigError(f"cannot look up interface {name}: no"))
        return succeed(self.links.get(name))

    def delete_link(self, name: str, index: int | None = None) -> Deferred[bool]:
        link = self.links.get(name)
        if link is None or (index is not None and link.index != index):
            return succeed(False)
        del self.links[name]
        self.deleted.append(f"link {name}")
        return succeed(True)

    def delete_route(self, route: Route) -> Deferred[bool]:
        self.deleted.append(route.describe())
        return succeed(True)


def test_version_2_records_the_tun_by_index_and_mark(tmp_path: Path) -> None:
    path = tmp_path / "j.json"
    Journal(path).record_tun("cvpn0", 7, MARK)
    data = json.loads(path.read_text())
    assert (data["version"], data["tun"], data["tun_ifindex"], data["tun_marker"]) == (
        2,
        "cvpn0",
        7,
        MARK,
    )
    assert Journal(path).state() == JournalState("cvpn0", tun_index=7, tun_marker=MARK)
    Journal(path).forget_tun()
    assert not path.exists()


def test_a_version_1_journal_is_still_read(tmp_path: Path) -> None:
    path = tmp_path / "j.json"
    path.write_text(json.dumps({"version": 1, "tun": "tun0", "routes": [], "dns": None}))
    assert Journal(path).state() == JournalState("tun0")
    path.write_text(json.dumps({"version": 3, "tun": "tun0"}))
    with pytest.raises(JournalError, match="version 1 or 2"):
        Journal(path).state()


def test_the_mark_is_the_state_folders_own(tmp_path: Path) -> None:
    mark = Journal(tmp_path / "a" / "journal.json").marker
    assert mark == Journal(tmp_path / "a" / "other.json").marker
    assert mark != Journal(tmp_path / "b" / "journal.json").marker
    assert mark.startswith("cellvpn ") and len(mark) == len(MARK)


@pytest.mark.parametrize(
    ("state", "link", "why"),
    [
        (JournalState("cvpn0", tun_index=7, tun_marker=MARK), LinkInfo(7, "cvpn0", MARK), None),
        (
            JournalState("cvpn0", tun_index=7, tun_marker=MARK),
            LinkInfo(9, "cvpn0", MARK),
            "its ifindex is 9, not 7",
        ),
        (
            JournalState("cvpn0", tun_index=7, tun_marker=MARK),
            LinkInfo(7, "cvpn0", None),
            f"it has no alias, not cellvpn's mark {MARK!r}",
        ),
        (
            JournalState("cvpn0", tun_index=7, tun_marker=MARK),
            LinkInfo(7, "cvpn0", "office vpn"),
            f"it has alias 'office vpn', not cellvpn's mark {MARK!r}",
        ),
        # version 1 (or a crash before the index was written): the mark alone decides
        (JournalState("cvpn0"), LinkInfo(3, "cvpn0", "cellvpn mine"), None),
        (
            JournalState("cvpn0"),
            LinkInfo(3, "cvpn0", None),
            "it has no alias, not cellvpn's mark 'cellvpn mine'",
        ),
    ],
)
def test_whose_interface_has_the_tuns_name(
    state: JournalState, link: LinkInfo, why: str | None
) -> None:
    assert foreign_tun(state, link, "cellvpn mine") == why


def killed_run(tmp_path: Path, index: int | None, marker: str | None, dns: str) -> Journal:
    """The journal a killed client leaves: its TUN, a carrier route, one into the TUN, DNS."""
    journal = Journal(tmp_path / "state" / "journal.json")
    journal.record_tun("cvpn0", index, marker)
    journal.record_route(CARRIER)
    journal.record_route(INTO_TUN)
    journal.record_route(GUARD)
    method: DnsMethod = "resolved" if dns == "resolved" else "resolvconf"
    journal.record_dns(DnsRecord(method, "cvpn0", "/etc/resolv.conf"))
    return journal


@pytest_twisted.ensureDeferred
async def test_cleanup_deletes_its_own_tun_by_index(tmp_path: Path) -> None:
    journal = killed_run(tmp_path, 7, MARK, "resolvconf")
    netlink = FakeNetlink({"cvpn0": LinkInfo(7, "cvpn0", MARK)})
    dns = RecordingDns("resolvconf", journal)
    lines = await cleanup_leftovers(Journal(journal.path), netlink, dns)
    assert netlink.deleted == [
        GUARD.describe(),
        INTO_TUN.describe(),
        CARRIER.describe(),
        "link cvpn0",
    ]
    assert lines[-1] == "removed leftover interface cvpn0"
    assert not journal.path.exists()


@pytest_twisted.ensureDeferred
async def test_cleanup_leaves_a_foreign_tun_its_routes_and_its_dns(tmp_path: Path) -> None:
    """Another device has the name now: only what does not name it is undone."""
    journal = killed_run(tmp_path, 7, MARK, "resolved")
    netlink = FakeNetlink({"cvpn0": LinkInfo(12, "cvpn0", None)})
    dns = RecordingDns("resolved", journal)
    lines = await cleanup_leftovers(Journal(journal.path), netlink, dns)
    assert netlink.deleted == [GUARD.describe(), CARRIER.describe()]
    assert dns.commands == []
    assert lines == [
        "left the DNS settings of cvpn0 alone: cvpn0 is not cellvpn's",
        "removed leftover route unreachable ::/1",
        "left route 0.0.0.0/1 dev cvpn0 alone: cvpn0 is not cellvpn's",
        f"removed leftover route {CARRIER.describe()}",
        f"left interface cvpn0 alone: it has no alias, not cellvpn's mark {MARK!r}",
    ]
    assert netlink.links["cvpn0"].index == 12
    assert not journal.path.exists()


@pytest_twisted.ensureDeferred
async def test_a_version_1_journal_deletes_only_a_marked_tun(tmp_path: Path) -> None:
    journal = killed_run(tmp_path, None, None, "resolvconf")
    unmarked = FakeNetlink({"cvpn0": LinkInfo(4, "cvpn0", None)})
    lines = await cleanup_leftovers(
        Journal(journal.path), unmarked, RecordingDns("resolvconf", journal)
    )
    assert "link cvpn0" not in unmarked.deleted
    assert lines[-1].startswith("left interface cvpn0 alone: it has no alias")

    journal = killed_run(tmp_path, None, None, "resolvconf")
    marked = FakeNetlink({"cvpn0": LinkInfo(4, "cvpn0", journal.marker)})
    lines = await cleanup_leftovers(
        Journal(journal.path), marked, RecordingDns("resolvconf", journal)
    )
    assert marked.deleted[-1] == "link cvpn0"


@pytest_twisted.ensureDeferred
async def test_a_tun_that_went_with_its_process_is_simply_forgotten(tmp_path: Path) -> None:
    journal = killed_run(tmp_path, 7, MARK, "resolvconf")
    netlink = FakeNetlink({})
    lines = await cleanup_leftovers(
        Journal(journal.path), netlink, RecordingDns("resolvconf", journal)
    )
    assert not any("interface" in line for line in lines)
    assert not journal.path.exists()


@pytest_twisted.ensureDeferred
async def test_when_the_tun_cannot_be_looked_up_nothing_naming_it_is_touched(
    tmp_path: Path,
) -> None:
    journal = killed_run(tmp_path, 7, MARK, "resolved")
    netlink = FakeNetlink({"cvpn0": LinkInfo(7, "cvpn0", MARK)}, fail_lookup=True)
    dns = RecordingDns("resolved", journal)
    lines = await cleanup_leftovers(Journal(journal.path), netlink, dns)
    assert (
        lines[0] == "could not look up leftover interface cvpn0: cannot look up interface cvpn0: no"
    )
    assert netlink.deleted == [GUARD.describe(), CARRIER.describe()]
    assert dns.commands == []
    kept = Journal(journal.path).state()
    assert (kept.tun, kept.tun_index, kept.routes) == ("cvpn0", 7, (INTO_TUN,))
    assert kept.dns is not None
