"""Routes, DNS and the crash journal for real, inside the tests' own network namespaces.

The client namespace has a veth to a server namespace (192.0.2.0/24), a default route via
192.0.2.254 and a stand-in for the TUN. Everything the code under test changes is compared
byte for byte with the namespace's state before, after a clean stop and after a crash.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from cellvpn.lab import Namespace, link, wait_for
from cellvpn.net.clientroutes import ClientRoutes, RouteSet
from cellvpn.net.dns import HEADER, DnsConfigurator
from cellvpn.net.journal import Journal, cleanup_leftovers
from cellvpn.net.netlink import NetConfigError, Netlink, Route

pytestmark = [pytest.mark.netns, pytest.mark.timeout(30)]

_T = TypeVar("_T")
SERVER_ON_LINK = IPv4Address("192.0.2.1")
SERVER_BEHIND_GATEWAY = IPv4Address("198.19.9.9")
TUN_ADDRESS = IPv4Address("198.18.0.2")
TUNNEL_DNS = IPv4Address("198.18.0.1")


async def within(d: Deferred[_T], reactor: Any, seconds: float = 10) -> _T:
    """Await ``d``, failing instead of hanging when it does not fire in time."""
    d.addTimeout(seconds, reactor)
    return await d


def client_host(netns: Callable[[str], Namespace]) -> Namespace:
    """The client namespace, its IPv6 link-local address settled so the state is still."""
    srv, cli = netns("srv"), netns("cli", ipv6=True)
    cli.sysctl("net.ipv6.conf.default.accept_dad", "0")  # no tentative address to wait out
    link(srv, "192.0.2.1/24", cli, "192.0.2.2/24")
    cli.ip("route", "add", "default", "via", "192.0.2.254", "dev", "veth1")

    def settled() -> bool:
        local = cli.ip("-6", "route", "show", "table", "local", "dev", "veth1").stdout
        return "fe80::" in local and "tentative" not in cli.ip("-6", "addr").stdout

    wait_for(settled, timeout=10, interval=0.02, what="the link-local address of veth1")
    return cli


def make_tun_stand_in(ns: Namespace, name: str = "cvpn0") -> None:
    """A dummy interface where the kernel has them, else a persistent TUN nobody reads."""
    if ns.ip("link", "add", name, "type", "dummy", check=False).returncode != 0:
        ns.ip("tuntap", "add", "dev", name, "mode", "tun")


def snapshot(ns: Namespace) -> dict[str, Any]:
    return {
        "addresses": ns.ip("-4", "addr").stdout,
        "routes4": ns.ip("-4", "route", "show", "table", "all").stdout,
        "routes6": ns.ip("-6", "route", "show", "table", "all").stdout,
        "rules4": ns.ip("rule").stdout,
        "rules6": ns.ip("-6", "rule").stdout,
        "resolv.conf": ns.resolv_conf.read_bytes(),
    }


class Client:
    """What the client builds at start: a TUN, its routes and its DNS, all journaled."""

    def __init__(self, ns: Namespace, journal_path: Path) -> None:
        self.ns = ns
        self.journal = Journal(journal_path)
        self.netlink = Netlink(ns.name)
        self.routes = ClientRoutes(self.netlink, self.journal)
        self.dns = DnsConfigurator(ns.resolv_conf, ns.name, self.journal)

    async def start(
        self, reactor: Any, server: IPv4Address | IPv6Address, ipv6_guard: bool = True
    ) -> None:
        make_tun_stand_in(self.ns)
        marker = self.journal.marker
        index = await within(self.netlink.set_alias("cvpn0", marker), reactor)
        await within(deferToThread(self.journal.record_tun, "cvpn0", index, marker), reactor)
        await within(self.netlink.configure_tun("cvpn0", TUN_ADDRESS, 24, None, 1400), reactor)
        await within(self.routes.setup(server, "cvpn0", True, ipv6_guard), reactor)
        await within(self.dns.apply([TUNNEL_DNS], "cvpn0"), reactor)

    async def stop(self, reactor: Any) -> None:
        await within(self.dns.restore(), reactor)
        await within(self.routes.remove(), reactor)
        assert await within(self.netlink.delete_link("cvpn0"), reactor)
        await within(deferToThread(self.journal.forget_tun), reactor)


def from_disk(ns: Namespace, journal_path: Path) -> tuple[Journal, Netlink, DnsConfigurator]:
    """What a client's next start has: new objects, and only the journal from before."""
    journal = Journal(journal_path)
    return journal, Netlink(ns.name), DnsConfigurator(ns.resolv_conf, ns.name, journal)


def has_route(routes: list[Route], wanted: Route) -> bool:
    return any(r.matches(wanted) for r in routes)


@pytest_twisted.ensureDeferred
async def test_on_link_server_routes_and_dns_then_everything_back(
    netns: Any, reactor: Any, tmp_path: Path
) -> None:
    cli = client_host(netns)
    before = snapshot(cli)
    inode = os.stat(cli.resolv_conf).st_ino
    client = Client(cli, tmp_path / "net-journal.json")
    await client.start(reactor, SERVER_ON_LINK)

    routes4 = await within(client.netlink.dump_routes(4), reactor)
    assert has_route(routes4, Route("192.0.2.1/32", oif="veth1"))  # on the link, no gateway
    assert has_route(routes4, Route("0.0.0.0/1", oif="cvpn0"))
    assert has_route(routes4, Route("128.0.0.0/1", oif="cvpn0"))
    assert has_route(routes4, Route("0.0.0.0/0", gateway="192.0.2.254", oif="veth1"))
    routes6 = await within(client.netlink.dump_routes(6), reactor)
    assert has_route(routes6, Route("::/1", kind="unreachable", family=6))
    assert has_route(routes6, Route("8000::/1", kind="unreachable", family=6))
    to_server = await within(client.netlink.route_get(SERVER_ON_LINK), reactor)
    assert (to_server.gateway, to_server.ifname) == (None, "veth1")
    elsewhere = await within(client.netlink.route_get("198.19.200.1"), reactor)
    assert (elsewhere.ifname, elsewhere.prefsrc) == ("cvpn0", str(TUN_ADDRESS))
    assert "mtu 1400" in cli.ip("link", "show", "cvpn0").stdout

    conf = cli.resolv_conf.read_bytes()
    assert conf.startswith(HEADER)
    assert b"nameserver 198.18.0.1\n" in conf and b"192.0.2.53" not in conf
    assert os.stat(cli.resolv_conf).st_ino == inode  # rewritten in place
    assert client.dns.method == "file"
    state = client.journal.state()
    assert state.tun == "cvpn0" and len(state.routes) == 5 and state.dns is not None

    await client.stop(reactor)
    assert snapshot(cli) == before
    assert os.stat(cli.resolv_conf).st_ino == inode
    assert not (tmp_path / "net-journal.json").exists()


@pytest_twisted.ensureDeferred
async def test_server_behind_the_gateway_gets_a_host_route_through_it(
    netns: Any, reactor: Any, tmp_path: Path
) -> None:
    cli = client_host(netns)
    before = snapshot(cli)
    client = Client(cli, tmp_path / "net-journal.json")
    await client.start(reactor, SERVER_BEHIND_GATEWAY)
    shown = cli.ip("-4", "route", "show", "198.19.9.9/32").stdout
    assert shown.startswith("198.19.9.9 via 192.0.2.254 dev veth1"), shown
    to_server = await within(client.netlink.route_get(SERVER_BEHIND_GATEWAY), reactor)
    assert (to_server.gateway, to_server.ifname) == ("192.0.2.254", "veth1")

    # Connection lost without kill switch: only the tunnel routes go, and come back later.
    await within(client.routes.drop_tunnel(), reactor)
    routes4 = await within(client.netlink.dump_routes(4), reactor)
    assert not has_route(routes4, Route("0.0.0.0/1", oif="cvpn0"))
    assert has_route(routes4, Route("198.19.9.9/32", gateway="192.0.2.254", oif="veth1"))
    assert len(client.journal.state().routes) == 1
    await within(client.routes.restore_tunnel(), reactor)
    assert len(client.journal.state().routes) == 5

    await client.stop(reactor)
    assert snapshot(cli) == before


@pytest_twisted.ensureDeferred
async def test_a_killed_client_is_cleaned_up_from_its_journal(
    netns: Any, reactor: Any, tmp_path: Path
) -> None:
    cli = client_host(netns)
    before = snapshot(cli)
    journal_path = tmp_path / "net-journal.json"
    client = Client(cli, journal_path)
    await client.start(reactor, SERVER_BEHIND_GATEWAY)
    del client  # kill -9: nothing is undone, only the journal on disk remains

    lines = await within(cleanup_leftovers(*from_disk(cli, journal_path)), reactor)
    assert snapshot(cli) == before
    assert lines == [
        f"restored {cli.resolv_conf}",
        "removed leftover route unreachable 8000::/1",
        "removed leftover route unreachable ::/1",
        "removed leftover route 128.0.0.0/1 dev cvpn0",
        "removed leftover route 0.0.0.0/1 dev cvpn0",
        "removed leftover route 198.19.9.9/32 via 192.0.2.254 dev veth1",
        "removed leftover interface cvpn0",
    ]
    assert not journal_path.exists()
    assert await within(cleanup_leftovers(*from_disk(cli, journal_path)), reactor) == []


@pytest_twisted.ensureDeferred
async def test_an_interface_that_took_the_tuns_name_is_left_alone_with_its_routes(
    netns: Any, reactor: Any, tmp_path: Path
) -> None:
    """A killed client's TUN went with it; another VPN made a device of that name since, with
    a route like the client's: the cleanup removes neither, and still its other leftovers."""
    cli = client_host(netns)
    journal_path = tmp_path / "net-journal.json"
    client = Client(cli, journal_path)
    await client.start(reactor, SERVER_BEHIND_GATEWAY)
    del client  # kill -9
    cli.ip("link", "del", "cvpn0")  # the kernel takes a dead process's TUN, and its routes
    make_tun_stand_in(cli)
    cli.ip("link", "set", "cvpn0", "up")
    cli.ip("route", "add", "0.0.0.0/1", "dev", "cvpn0")
    foreign = cli.ip("-o", "link", "show", "cvpn0").stdout.split(":")[0]

    lines = await within(cleanup_leftovers(*from_disk(cli, journal_path)), reactor)
    assert cli.ip("-o", "link", "show", "cvpn0").stdout.split(":")[0] == foreign
    assert "0.0.0.0/1 dev cvpn0" in cli.ip("-4", "route").stdout
    assert "198.19.9.9" not in cli.ip("-4", "route").stdout
    assert "unreachable" not in cli.ip("-6", "route").stdout
    assert lines[1:3] == [
        "removed leftover route unreachable 8000::/1",
        "removed leftover route unreachable ::/1",
    ]
    assert "left route 0.0.0.0/1 dev cvpn0 alone: cvpn0 is not cellvpn's" in lines
    assert lines[-1] == "left interface cvpn0 alone: it has no alias, not cellvpn's mark " + repr(
        Journal(journal_path).marker
    )
    assert not journal_path.exists()


@pytest_twisted.ensureDeferred
async def test_an_ipv6_server_gets_a_host_route_the_guard_does_not_cover(
    netns: Any, reactor: Any, tmp_path: Path
) -> None:
    cli = client_host(netns)
    cli.ip("addr", "add", "2001:db8::2/64", "dev", "veth1", "nodad")
    server = IPv6Address("2001:db8::1")
    client = Client(cli, tmp_path / "net-journal.json")
    before = snapshot(cli)
    await client.start(reactor, server)
    routes6 = cli.ip("-6", "route").stdout
    assert "2001:db8::1 dev veth1" in routes6
    assert "unreachable ::/1" in routes6 and "unreachable 8000::/1" in routes6
    got = await within(client.netlink.route_get(server), reactor)
    assert got.ifname == "veth1"
    await client.stop(reactor)
    assert snapshot(cli) == before


@pytest_twisted.ensureDeferred
async def test_a_resolv_conf_changed_by_the_user_is_left_alone(
    netns: Any, reactor: Any, tmp_path: Path
) -> None:
    cli = client_host(netns)
    journal_path = tmp_path / "net-journal.json"
    dns = DnsConfigurator(cli.resolv_conf, cli.name, Journal(journal_path))
    await within(dns.apply([TUNNEL_DNS], "cvpn0"), reactor)
    users = b"# the user's own\nnameserver 192.0.2.99\n"
    with open(cli.resolv_conf, "r+b") as f:
        f.write(users)
        f.truncate()
    del dns

    lines = await within(cleanup_leftovers(*from_disk(cli, journal_path)), reactor)
    assert cli.resolv_conf.read_bytes() == users
    assert lines == [f"left {cli.resolv_conf} as it is: it was changed since cellvpn wrote it"]
    assert not journal_path.exists()


@pytest_twisted.ensureDeferred
async def test_no_ipv6_guard_where_ipv6_is_disabled(
    netns: Any, reactor: Any, tmp_path: Path
) -> None:
    cli = client_host(netns)
    netlink = Netlink(cli.name)
    assert await within(netlink.ipv6_enabled(), reactor) is True
    cli.sysctl("net.ipv6.conf.all.disable_ipv6", "1")
    assert await within(netlink.ipv6_enabled(), reactor) is False
    # The worker thread went back: the process's own namespace reads as before.
    with open("/proc/sys/net/ipv6/conf/all/disable_ipv6") as f:
        own = f.read().strip() == "0"
    assert await within(Netlink().ipv6_enabled(), reactor) is own

    client = Client(cli, tmp_path / "net-journal.json")
    await client.start(reactor, SERVER_ON_LINK, ipv6_guard=True)
    assert "unreachable" not in cli.ip("-6", "route", "show", "table", "all").stdout
    assert len(client.journal.state().routes) == 3
    await client.stop(reactor)


@pytest_twisted.ensureDeferred
async def test_a_failed_add_names_the_route_and_takes_back_the_others(
    netns: Any, reactor: Any, tmp_path: Path
) -> None:
    cli = client_host(netns)
    make_tun_stand_in(cli)
    cli.ip("link", "set", "cvpn0", "up")
    cli.ip("route", "add", "0.0.0.0/1", "dev", "veth1")  # someone else's
    before = snapshot(cli)
    journal = Journal(tmp_path / "net-journal.json")
    routes = RouteSet(Netlink(cli.name), journal)
    plan = [Route("198.18.7.0/24", oif="cvpn0"), Route("0.0.0.0/1", oif="cvpn0")]
    with pytest.raises(NetConfigError) as failed:
        await within(routes.apply(plan), reactor)
    assert str(failed.value) == "cannot add route 0.0.0.0/1 dev cvpn0: File exists"
    assert failed.value.errno == 17
    assert snapshot(cli) == before
    assert routes.routes == () and journal.state().empty

    with pytest.raises(NetConfigError, match="no interface nope0"):
        await within(routes.apply([Route("198.18.8.0/24", oif="nope0")]), reactor)


@pytest_twisted.ensureDeferred
async def test_a_route_that_is_there_already_is_not_cellvpns(
    netns: Any, reactor: Any, tmp_path: Path
) -> None:
    cli = client_host(netns)
    cli.ip("route", "add", "198.18.7.0/24", "dev", "veth1")
    journal = Journal(tmp_path / "net-journal.json")
    netlink = Netlink(cli.name)
    routes = RouteSet(netlink, journal)
    await within(routes.apply([Route("198.18.7.0/24", oif="veth1")]), reactor)
    assert routes.routes == () and journal.state().empty
    await within(routes.remove(), reactor)
    assert "198.18.7.0/24 dev veth1" in cli.ip("route").stdout
    # Deleting what is not there is no error.
    assert await within(netlink.delete_route(Route("198.18.9.0/24", oif="veth1")), reactor) is False
    assert await within(netlink.delete_link("cvpn9"), reactor) is False
    assert await within(netlink.link_index("cvpn9"), reactor) is None
    index = await within(netlink.link_index("veth1"), reactor)
    assert isinstance(index, int)


@pytest_twisted.ensureDeferred
async def test_a_missing_namespace_is_an_error_and_is_never_created(
    netns: Any, reactor: Any
) -> None:
    name = f"cvpn-absent-{os.getpid()}"
    with pytest.raises(NetConfigError, match=f"no network namespace {name}"):
        await within(Netlink(name).link_index("lo"), reactor)
    with pytest.raises(NetConfigError, match=f"cannot enter network namespace {name}"):
        await within(Netlink(name).ipv6_enabled(), reactor)
    assert not Path("/run/netns", name).exists()
