"""The pure parts: the client's route plan, routes, the DNS method choice and the file render."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address

import pytest

from cellvpn.net.clientroutes import plan_carrier, plan_routes, route_around, split_routes
from cellvpn.net.dns import HEADER, choose_method, render
from cellvpn.net.netlink import Route, RouteInfo

SERVER = IPv4Address("198.19.9.9")
VIA_GATEWAY = RouteInfo(gateway="192.0.2.254", oif=3, ifname="veth1", prefsrc="192.0.2.2")
ON_LINK = RouteInfo(gateway=None, oif=3, ifname="veth1", prefsrc="192.0.2.2")
TUNNEL = [Route("0.0.0.0/1", oif="cvpn0"), Route("128.0.0.0/1", oif="cvpn0")]
GUARD = [
    Route("::/1", kind="unreachable", family=6),
    Route("8000::/1", kind="unreachable", family=6),
]


def test_server_behind_a_gateway_keeps_its_way_out() -> None:
    routes = plan_routes(SERVER, VIA_GATEWAY, "cvpn0", default_route=True, ipv6_guard=False)
    assert routes == [Route("198.19.9.9/32", gateway="192.0.2.254", oif="veth1"), *TUNNEL]
    assert routes[0].describe() == "198.19.9.9/32 via 192.0.2.254 dev veth1"


def test_server_on_the_link_gets_a_device_route() -> None:
    routes = plan_routes(SERVER, ON_LINK, "cvpn0", default_route=True, ipv6_guard=False)
    assert routes == [Route("198.19.9.9/32", oif="veth1"), *TUNNEL]


def test_without_default_route_nothing_is_added() -> None:
    assert plan_routes(SERVER, VIA_GATEWAY, "cvpn0", default_route=False, ipv6_guard=True) == []


def test_ipv6_guard_makes_all_of_ipv6_unreachable() -> None:
    routes = plan_routes(SERVER, VIA_GATEWAY, "cvpn0", default_route=True, ipv6_guard=True)
    assert routes[-2:] == GUARD
    assert [r.describe() for r in GUARD] == ["unreachable ::/1", "unreachable 8000::/1"]


def test_split_separates_the_carrier_from_the_tunnel() -> None:
    routes = plan_routes(SERVER, VIA_GATEWAY, "cvpn0", default_route=True, ipv6_guard=True)
    carrier, tunnel = split_routes(routes, "cvpn0")
    assert carrier == routes[:1]
    assert tunnel == [*TUNNEL, *GUARD]


def test_an_ipv6_server_gets_a_128_in_its_own_family_before_the_guard() -> None:
    """The guard's ::/1 covers 2001:db8::/32; the /128 is more specific and keeps the stream."""
    server = IPv6Address("2001:db8::1")
    via = RouteInfo(gateway="fe80::1", oif=3, ifname="veth1", prefsrc="2001:db8::2")
    routes = plan_routes(server, via, "cvpn0", default_route=True, ipv6_guard=True)
    host = Route("2001:db8::1/128", gateway="fe80::1", oif="veth1", family=6)
    assert routes == [host, *TUNNEL, *GUARD]
    assert host.describe() == "2001:db8::1/128 via fe80::1 dev veth1"
    assert split_routes(routes, "cvpn0") == ([host], [*TUNNEL, *GUARD])
    on_link = RouteInfo(gateway=None, oif=3, ifname="veth1", prefsrc=None)
    assert plan_routes(server, on_link, "cvpn0", True, False)[0] == Route(
        "2001:db8::1/128", oif="veth1", family=6
    )


def test_a_server_routed_into_the_tunnel_is_refused() -> None:
    into_tun = RouteInfo(gateway=None, oif=9, ifname="cvpn0", prefsrc=None)
    with pytest.raises(ValueError, match="leftover"):
        plan_routes(SERVER, into_tun, "cvpn0", default_route=True, ipv6_guard=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dst": "0.0.0.1/1", "oif": "cvpn0"},  # host bits set
        {"dst": "::/1", "oif": "cvpn0"},  # family 4 by default
        {"dst": "0.0.0.0/1"},  # neither gateway nor device
        {"dst": "::/1", "family": 6, "kind": "unreachable", "oif": "cvpn0"},
        {"dst": "0.0.0.0/1", "gateway": "2001:db8::1"},
    ],
)
def test_bad_routes_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Route(**kwargs)  # type: ignore[arg-type]


def test_route_matching_reads_an_unset_metric_as_the_kernels_default() -> None:
    assert Route("::/1", kind="unreachable", family=6).matches(
        Route("::/1", kind="unreachable", family=6, metric=1024)
    )
    assert Route("0.0.0.0/1", oif="cvpn0").matches(Route("0.0.0.0/1", oif="cvpn0", metric=0))
    assert not Route("0.0.0.0/1", oif="cvpn0").matches(Route("0.0.0.0/1", oif="eth0"))
    assert Route("0.0.0.0/1", oif="cvpn0", table=7, metric=5).describe() == (
        "0.0.0.0/1 dev cvpn0 table 7 metric 5"
    )


def test_route_json_round_trip() -> None:
    for route in [Route("198.19.9.9/32", gateway="192.0.2.254", oif="veth1", metric=10), *GUARD]:
        assert Route.from_json(route.to_json()) == route


RESOLVED_CONF = b"# stub\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n"


def test_systemd_resolved_is_chosen_only_when_it_really_serves_the_host() -> None:
    facts = {"have_resolvectl": True, "have_resolvconf": False, "resolvconf_dir": False}
    assert choose_method(RESOLVED_CONF, resolved_running=True, **facts) == "resolved"
    assert choose_method(RESOLVED_CONF, resolved_running=False, **facts) == "file"
    other = b"nameserver 192.0.2.53\n"
    assert choose_method(other, resolved_running=True, **facts) == "file"
    facts["have_resolvectl"] = False
    assert choose_method(RESOLVED_CONF, resolved_running=True, **facts) == "file"


def test_resolvconf_needs_the_command_and_its_directory() -> None:
    conf = b"nameserver 192.0.2.53\n"
    assert choose_method(conf, False, False, True, True) == "resolvconf"
    assert choose_method(conf, False, False, True, False) == "file"
    assert choose_method(conf, False, False, False, True) == "file"


def test_render_writes_the_header_the_servers_and_keeps_search_and_options() -> None:
    old = b"# managed\nnameserver 192.0.2.53\nsearch lab.test\noptions ndots:2\n"
    text = render([IPv4Address("198.18.0.1"), IPv4Address("198.18.0.2")], "cvpn0", old)
    assert text.startswith(HEADER)
    lines = text.splitlines()
    assert lines[2:] == [
        b"nameserver 198.18.0.1",
        b"nameserver 198.18.0.2",
        b"search lab.test",
        b"options ndots:2",
    ]


# --- the way around the tunnel, after a roam ----------------------------------------------------

AROUND_TABLE = [
    Route("0.0.0.0/1", oif="cvpn0"),
    Route("128.0.0.0/1", oif="cvpn0"),
    Route("0.0.0.0/0", gateway="192.0.2.254", oif="eth0", metric=100),
    Route("0.0.0.0/0", gateway="198.18.200.1", oif="wlan0", metric=600),
    Route("192.0.2.0/24", oif="eth0"),
    Route("198.19.0.0/16", gateway="192.0.2.253", oif="eth0"),
    Route("198.19.9.0/24", kind="unreachable"),
]


@pytest.mark.parametrize(
    ("server", "table", "expected"),
    [
        # the default route with the lowest metric, never the tunnel's more specific /1
        ("198.18.3.3", AROUND_TABLE, "198.18.3.3/32 via 192.0.2.254 dev eth0"),
        # a longer prefix wins over the default routes
        ("198.19.1.1", AROUND_TABLE, "198.19.1.1/32 via 192.0.2.253 dev eth0"),
        # on the link: a device route
        ("192.0.2.1", AROUND_TABLE, "192.0.2.1/32 dev eth0"),
        # an unreachable route is no way out: the next one is
        ("198.19.9.9", AROUND_TABLE, "198.19.9.9/32 via 192.0.2.253 dev eth0"),
        # nothing but the tunnel: no way
        ("198.18.3.3", AROUND_TABLE[:2], None),
    ],
)
def test_the_way_to_the_server_around_the_tunnel(
    server: str, table: list[Route], expected: str | None
) -> None:
    found = route_around(table, IPv4Address(server), "cvpn0")
    assert (found.describe() if found else None) == expected


def test_the_way_around_keeps_to_the_servers_family() -> None:
    table = [Route("::/0", gateway="2001:db8::fe", oif="eth0", family=6), *AROUND_TABLE]
    found = route_around(table, IPv6Address("2001:db8:5::1"), "cvpn0")
    assert found == Route("2001:db8:5::1/128", gateway="2001:db8::fe", oif="eth0", family=6)


# --- the carrier route before a reconnect: a roam, or a fail-over to another server ----------

HOST_A = Route("198.18.3.3/32", gateway="192.0.2.254", oif="eth0")
SPLIT = [Route("198.19.0.0/16", oif="cvpn0")]


def _move(
    hosts: list[Route], present: list[Route], plan: list[Route], server: str | None
) -> tuple[str | None, str | None, str] | None:
    move = plan_carrier(hosts, present, plan, IPv4Address(server) if server else None, "cvpn0")
    if move is None:
        return None
    return (
        move.add.describe() if move.add else None,
        move.drop.describe() if move.drop else None,
        move.why,
    )


@pytest.mark.parametrize(
    ("hosts", "present", "plan", "server", "expected"),
    [
        # the same server, its route still in the table: nothing to do
        ([HOST_A], [HOST_A, *AROUND_TABLE], TUNNEL, None, None),
        ([HOST_A], [HOST_A, *AROUND_TABLE], TUNNEL, "198.18.3.3", None),
        # a roam took it with its gateway: planned again on what is left
        ([HOST_A], AROUND_TABLE[:2] + AROUND_TABLE[3:], TUNNEL, None,
         ("198.18.3.3/32 via 198.18.200.1 dev wlan0", "198.18.3.3/32 via 192.0.2.254 dev eth0",
          "the route to the server is gone")),
        # a fail-over: a route to the next server, the old one to go
        ([HOST_A], [HOST_A, *AROUND_TABLE], TUNNEL, "198.19.1.1",
         ("198.19.1.1/32 via 192.0.2.253 dev eth0", "198.18.3.3/32 via 192.0.2.254 dev eth0",
          "the client moves to another server")),
        # the next server has no way but the tunnel: said, nothing added
        ([HOST_A], AROUND_TABLE[:2], TUNNEL, "198.19.1.1",
         (None, "198.18.3.3/32 via 192.0.2.254 dev eth0", "the client moves to another server")),
        # a split tunnel without a host route: the next server inside it gets one
        ([], AROUND_TABLE, SPLIT, "198.19.1.1",
         ("198.19.1.1/32 via 192.0.2.253 dev eth0", None,
          "the next server is inside the tunnel's routes")),
        # ... and one outside it needs none
        ([], AROUND_TABLE, SPLIT, "198.18.3.3", None),
        # no routes of the client's at all, no server named: nothing
        ([], AROUND_TABLE, [], None, None),
    ],
)  # fmt: skip
def test_the_carrier_route_before_a_reconnect(
    hosts: list[Route],
    present: list[Route],
    plan: list[Route],
    server: str | None,
    expected: tuple[str | None, str | None, str] | None,
) -> None:
    assert _move(hosts, present, plan, server) == expected


# --- split tunnels: routes in, networks out -----------------------------------------------------

NETS = {name: IPv4Network(name) for name in ("198.19.0.0/16", "198.19.9.0/24", "198.18.7.0/24")}


def test_a_split_tunnel_routes_only_its_networks_and_no_host_route_it_does_not_need() -> None:
    routes = plan_routes(
        SERVER, VIA_GATEWAY, "cvpn0", default_route=False, ipv6_guard=True,
        include=[NETS["198.18.7.0/24"]],
    )  # fmt: skip
    assert [r.describe() for r in routes] == ["198.18.7.0/24 dev cvpn0"]


def test_a_split_tunnel_network_that_holds_the_server_keeps_the_server_around_it() -> None:
    routes = plan_routes(
        SERVER, VIA_GATEWAY, "cvpn0", default_route=False, ipv6_guard=True,
        include=[NETS["198.19.0.0/16"]],
    )  # fmt: skip
    assert [r.describe() for r in routes] == [
        "198.19.9.9/32 via 192.0.2.254 dev veth1",
        "198.19.0.0/16 dev cvpn0",
    ]
    assert split_routes(routes, "cvpn0") == (routes[:1], routes[1:])


def test_excluded_networks_go_the_way_they_went_before_the_tunnel() -> None:
    routes = plan_routes(
        SERVER, VIA_GATEWAY, "cvpn0", default_route=True, ipv6_guard=False,
        include=[NETS["198.18.7.0/24"]],
        exclude=[(NETS["198.19.9.0/24"], ON_LINK), (NETS["198.18.7.0/24"], VIA_GATEWAY)],
    )  # fmt: skip
    assert [r.describe() for r in routes] == [
        "198.19.9.9/32 via 192.0.2.254 dev veth1",
        "198.19.9.0/24 dev veth1",
        "198.18.7.0/24 via 192.0.2.254 dev veth1",
        "0.0.0.0/1 dev cvpn0",
        "128.0.0.0/1 dev cvpn0",
    ]  # excluded and included: excluded
    around, tunnel = split_routes(routes, "cvpn0")
    assert len(around) == 3 and len(tunnel) == 2


def test_an_excluded_network_already_in_the_tunnel_is_refused() -> None:
    into_tun = RouteInfo(gateway=None, oif=9, ifname="cvpn0", prefsrc=None)
    with pytest.raises(ValueError, match=r"the excluded 198\.19\.9\.0/24 is routed through"):
        plan_routes(
            SERVER, VIA_GATEWAY, "cvpn0", default_route=True, ipv6_guard=False,
            exclude=[(NETS["198.19.9.0/24"], into_tun)],
        )  # fmt: skip


TUNNEL6 = [Route("::/1", oif="cvpn0", family=6), Route("8000::/1", oif="cvpn0", family=6)]


def test_a_dual_stack_tunnel_takes_ipv6_instead_of_the_guard() -> None:
    """With an IPv6 address on the tunnel, ::/1 and 8000::/1 go into the TUN; no guard."""
    routes = plan_routes(
        SERVER, VIA_GATEWAY, "cvpn0", default_route=True, ipv6_guard=True, ipv6_tunnel=True
    )
    assert routes == [
        Route("198.19.9.9/32", gateway="192.0.2.254", oif="veth1"),
        *TUNNEL,
        *TUNNEL6,
    ]


def test_an_ipv6_server_stays_reachable_beside_a_dual_stack_tunnel() -> None:
    server = IPv6Address("2001:db8::1")
    via = RouteInfo(gateway="fe80::1", oif=3, ifname="veth1", prefsrc="2001:db8::2")
    routes = plan_routes(server, via, "cvpn0", True, True, ipv6_tunnel=True)
    host = Route("2001:db8::1/128", gateway="fe80::1", oif="veth1", family=6)
    assert routes == [host, *TUNNEL, *TUNNEL6]


def test_ipv6_prefixes_in_a_split_tunnel() -> None:
    """routes and exclude take IPv6 prefixes: each a route of its own family."""
    from ipaddress import IPv6Network

    v6_way = RouteInfo(gateway="2001:db8::fe", oif=3, ifname="veth1", prefsrc=None)
    routes = plan_routes(
        SERVER,
        VIA_GATEWAY,
        "cvpn0",
        default_route=False,
        ipv6_guard=True,
        include=[IPv4Network("198.19.0.0/16"), IPv6Network("2001:db8:5::/48")],
        exclude=[(IPv6Network("2001:db8:5:1::/64"), v6_way)],
        ipv6_tunnel=True,
    )
    assert routes == [
        Route("198.19.9.9/32", gateway="192.0.2.254", oif="veth1"),
        Route("2001:db8:5:1::/64", gateway="2001:db8::fe", oif="veth1", family=6),
        Route("198.19.0.0/16", oif="cvpn0"),
        Route("2001:db8:5::/48", oif="cvpn0", family=6),
    ]
