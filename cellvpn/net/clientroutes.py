"""The client's routes: a pure plan, and an executor that can always take back what it added.

The plan keeps the tunnel's own carrier reachable (a host route to the server, ``/32`` or
``/128`` in its own family, through the way the kernel uses now), then covers all of IPv4
with ``0.0.0.0/1`` and ``128.0.0.0/1`` into the TUN. Two /1 routes are more specific than any
default route, so the user's default route stays untouched and comes back into use by itself
when they are removed. IPv6 would bypass an IPv4-only tunnel, so the guard makes all of it
unreachable instead while the tunnel is up; an IPv6 server stays reachable through its
``/128``, more specific than the guard's halves. When the server gives an IPv6 address too
(dual stack), ``::/1`` and ``8000::/1`` go into the TUN instead of the guard.

The carrier and the tunnel routes are separate ``RouteSet``s: on a lost connection the client
drops only the tunnel routes (traffic flows outside again), or keeps them as a kill switch.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from cellvpn.net.journal import Journal
from cellvpn.net.netlink import MAIN_TABLE, Family, NetConfigError, Netlink, Route, RouteInfo

#: Together all of IPv4, and each more specific than a default route.
IPV4_HALVES = ("0.0.0.0/1", "128.0.0.0/1")
#: Together all of IPv6.
IPV6_HALVES = ("::/1", "8000::/1")


#: The server the stream connects to, as its transport's peer says.
ServerAddress = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


def plan_routes(
    server: ServerAddress,
    to_server: RouteInfo,
    tun: str,
    default_route: bool,
    ipv6_guard: bool,
    include: Sequence[Network] = (),
    exclude: Sequence[tuple[Network, RouteInfo]] = (),
    ipv6_tunnel: bool = False,
) -> list[Route]:
    """The routes to add, in order: the ways around the tunnel first (the server's host
    route, the excluded networks), then the tunnel's.

    ``to_server`` is what the kernel uses now to reach the server (``Netlink.route_get``).
    Without ``default_route`` only ``include`` (a split tunnel) goes into the tunnel: the
    overlay route that the route policy accepted (:mod:`cellvpn.net.routepolicy`) carries the
    overlay. Each of ``exclude`` goes the way the kernel routes its first address now; a
    network both included and excluded is excluded. With ``ipv6_tunnel`` (the tunnel has an
    IPv6 address) the default route takes IPv6 into the tunnel too, and no guard is needed.
    """
    excluded = {str(net) for net, _ in exclude}
    into_tunnel: list[tuple[str, Family]] = [(d, 4) for d in IPV4_HALVES] if default_route else []
    if default_route and ipv6_tunnel:
        into_tunnel += [(d, 6) for d in IPV6_HALVES]
    for net in include:
        item: tuple[str, Family] = (str(net), 6 if isinstance(net, IPv6Network) else 4)
        if item not in into_tunnel and item[0] not in excluded:
            into_tunnel.append(item)
    if not into_tunnel:
        return []
    if to_server.ifname == tun:
        raise ValueError(
            f"the server {server} is routed through {tun} itself; "
            "remove the leftover routes into the tunnel first"
        )
    routes: list[Route] = []
    if default_route or any(server in net for net in include):
        routes.append(host_route(server, to_server))
    for net, way in exclude:
        if way.ifname == tun:
            raise ValueError(f"the excluded {net} is routed through {tun} itself")
        family: Family = 6 if isinstance(net, IPv6Network) else 4
        routes.append(Route(str(net), gateway=way.gateway, oif=way.ifname, family=family))
    routes += [Route(dst, oif=tun, family=fam) for dst, fam in into_tunnel]
    if ipv6_guard and default_route and not ipv6_tunnel:
        routes += [Route(dst, kind="unreachable", family=6) for dst in IPV6_HALVES]
    return routes


def host_route(server: ServerAddress, to_server: RouteInfo) -> Route:
    """``server/32`` (``/128``) via the current gateway and its device, or on the link when
    there is none."""
    family: Family = 6 if isinstance(server, IPv6Address) else 4
    return Route(_host_dst(server), gateway=to_server.gateway, oif=to_server.ifname, family=family)


def route_around(routes: Sequence[Route], server: ServerAddress, tun: str) -> Route | None:
    """The host route to the server through what the routing table holds besides the tunnel.

    After a roam the kernel drops the old host route with its gateway, and asking it the way
    (``route get``) answers the tunnel's own ``/1`` route while the kill switch keeps it; so
    the way is looked up here in the table without the tunnel: the longest prefix that holds
    the server, then the lowest metric. None when no way is left (the link is down).
    """
    best: tuple[int, int, Route] | None = None
    for route in routes:
        if route.kind != "unicast" or route.oif == tun or route.family != _family(server):
            continue
        network = ipaddress.ip_network(route.dst)
        if server not in network:
            continue
        rank = (network.prefixlen, -(route.metric or 0))
        if best is None or rank > best[:2]:
            best = (*rank, route)
    if best is None:
        return None
    way = best[2]
    return Route(_host_dst(server), gateway=way.gateway, oif=way.oif, family=way.family)


@dataclass(frozen=True)
class CarrierMove:
    """What keeps the server the client connects to next reachable around the tunnel."""

    add: Route | None
    drop: Route | None
    why: str


def plan_carrier(
    hosts: Sequence[Route],
    present: Sequence[Route],
    tunnel_plan: Sequence[Route],
    server: ServerAddress | None,
    tun: str,
) -> CarrierMove | None:
    """The host route to ``server`` (None: the server the carrier route leads to now), given
    the client's carrier host routes, the kernel's table of the server's family and the tunnel
    routes planned; None when nothing is to change.

    Two reasons to change it: a roam took the route with its gateway, or the client moves to
    another server (fail-over) while its tunnel routes stay (the kill switch), or come back
    when the new server answers; without a route around them the connection to the new server
    would go into the client's own TUN.
    """
    if len(hosts) > 1:
        return None
    old = hosts[0] if hosts else None
    if server is None:
        if old is None:
            return None
        server = ipaddress.ip_network(old.dst).network_address
    dst = _host_dst(server)
    if old is not None and old.dst == dst:
        if any(p.matches(old) for p in present):
            return None
        why = "the route to the server is gone"
    elif old is None:
        family = _family(server)
        covered = any(
            r.family == family and server in ipaddress.ip_network(r.dst) for r in tunnel_plan
        )
        if not covered:
            return None  # a split tunnel that does not hold the server: the table's own way
        why = "the next server is inside the tunnel's routes"
    else:
        why = "the client moves to another server"
    return CarrierMove(route_around(present, server, tun), old, why)


def _family(server: ServerAddress) -> Family:
    return 6 if isinstance(server, IPv6Address) else 4


def _host_dst(server: ServerAddress) -> str:
    return f"{server}/{server.max_prefixlen}"


def split_routes(routes: Sequence[Route], tun: str) -> tuple[list[Route], list[Route]]:
    """(the ways around the tunnel, the tunnel routes) of a plan."""
    around = [r for r in routes if r.kind == "unicast" and r.oif != tun]
    return around, [r for r in routes if r not in around]


class RouteSet:
    """Routes this set added, so it can remove exactly those.

    Each route goes into the journal before it is added, and out after it is removed. A route
    that is already there exactly as planned is someone else's: it is used, not recorded, and
    never removed.
    """

    log = Logger()

    def __init__(self, netlink: Netlink, journal: Journal | None = None) -> None:
        self.netlink = netlink
        self.journal = journal
        self._routes: list[Route] = []

    @property
    def routes(self) -> tuple[Route, ...]:
        """What this set added and has not removed, oldest first."""
        return tuple(self._routes)

    def apply(self, routes: Sequence[Route]) -> Deferred[None]:
        """Add the routes in order; on a failure the ones this call added are taken back."""
        return Deferred.fromCoroutine(self._apply(list(routes)))

    async def _apply(self, routes: list[Route]) -> None:
        present: dict[tuple[Family, int], list[Route]] = {}
        added: list[Route] = []
        try:
            for route in routes:
                if route in self._routes:
                    continue
                key = (route.family, route.table)
                if key not in present:
                    present[key] = await self.netlink.dump_routes(route.family, route.table)
                if any(p.matches(route) for p in present[key]):
                    self.log.info("route {route} is there already", route=route.describe())
                    continue
                await self._record(route)
                try:
                    await self.netlink.add_route(route)
                except Exception:
                    await self._forget(route)
                    raise
                self._routes.append(route)
                added.append(route)
                self.log.info("added route {route}", route=route.describe())
        except Exception:
            for route in reversed(added):
                try:
                    await self._delete(route)
                except NetConfigError as e:
                    self.log.warn("{error}", error=str(e))
            raise

    def remove(self) -> Deferred[None]:
        """Delete the routes newest first; a route already gone is fine.

        Every route is tried; the first failure is raised after the others were removed.
        """
        return Deferred.fromCoroutine(self._remove())

    async def _remove(self) -> None:
        errors: list[NetConfigError] = []
        for route in reversed(list(self._routes)):
            try:
                await self._delete(route)
            except NetConfigError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def discard(self, route: Route) -> Deferred[None]:
        """Delete one route of this set (fine when the kernel dropped it already)."""
        return Deferred.fromCoroutine(self._delete(route))

    async def _delete(self, route: Route) -> None:
        if await self.netlink.delete_route(route):
            self.log.info("removed route {route}", route=route.describe())
        await self._forget(route)
        self._routes.remove(route)

    async def _record(self, route: Route) -> None:
        if self.journal is not None:
            await deferToThread(self.journal.record_route, route)

    async def _forget(self, route: Route) -> None:
        if self.journal is not None:
            await deferToThread(self.journal.forget_route, route)


class ClientRoutes:
    """The client's whole plan: the carrier route and the tunnel routes as two sets."""

    log = Logger()

    def __init__(self, netlink: Netlink, journal: Journal | None = None) -> None:
        self.netlink = netlink
        self.carrier = RouteSet(netlink, journal)
        self.tunnel = RouteSet(netlink, journal)
        self._tunnel_plan: list[Route] = []

    def setup(
        self,
        server: ServerAddress,
        tun: str,
        default_route: bool,
        ipv6_guard: bool,
        include: Sequence[Network] = (),
        exclude: Sequence[Network] = (),
        ipv6_tunnel: bool = False,
    ) -> Deferred[list[Route]]:
        """Look at the routes now, plan, and add; fires with the plan.

        The IPv6 guard is only planned where IPv6 is enabled: elsewhere nothing can leak.
        """
        if self.carrier.routes or self.tunnel.routes:
            raise RuntimeError("the client's routes are set up already; remove() them first")
        return Deferred.fromCoroutine(
            self._setup(server, tun, default_route, ipv6_guard, include, exclude, ipv6_tunnel)
        )

    async def _setup(
        self,
        server: ServerAddress,
        tun: str,
        default_route: bool,
        ipv6_guard: bool,
        include: Sequence[Network],
        exclude: Sequence[Network],
        ipv6_tunnel: bool = False,
    ) -> list[Route]:
        if not default_route and not include:
            return []
        to_server = await self.netlink.route_get(server)
        ways = [(net, await self.netlink.route_get(net.network_address)) for net in exclude]
        guard = ipv6_guard and await self.netlink.ipv6_enabled()
        routes = plan_routes(
            server, to_server, tun, default_route, guard, include, ways, ipv6_tunnel
        )
        carrier, tunnel = split_routes(routes, tun)
        await self.carrier.apply(carrier)
        self._tunnel_plan = tunnel
        try:
            await self.tunnel.apply(tunnel)
        except Exception:
            await self.carrier.remove()
            raise
        return routes

    def refresh_carrier(
        self, tun: str, server: ServerAddress | None = None
    ) -> Deferred[Route | None]:
        """Before a reconnect: the host route around the tunnel to ``server`` (None: the
        server it leads to now), planned again if a roam took it with its gateway, or made
        for the server a fail-over moves to (the old one removed after the new one is in);
        fires with the new route, or None when nothing changed or no way is left."""
        return Deferred.fromCoroutine(self._refresh_carrier(tun, server))

    async def _refresh_carrier(self, tun: str, server: ServerAddress | None) -> Route | None:
        hosts = [r for r in self.carrier.routes if ipaddress.ip_network(r.dst).num_addresses == 1]
        family = _family(server) if server is not None else (hosts[0].family if hosts else 4)
        table = hosts[0].table if hosts else MAIN_TABLE
        present = await self.netlink.dump_routes(family, table)
        move = plan_carrier(hosts, present, self._tunnel_plan, server, tun)
        if move is None:
            return None
        if move.add is None:
            self.log.warn(
                "{why} and no way around the tunnel is left for it",
                why=move.why,
            )
            return None
        if move.drop is not None and move.drop.dst == move.add.dst:
            await self.carrier.discard(move.drop)  # gone with its gateway: forget it first
            await self.carrier.apply([move.add])
        else:
            await self.carrier.apply([move.add])  # the new way first: no gap
            if move.drop is not None:
                await self.carrier.discard(move.drop)
        self.log.info(
            "{why}: {new}{instead}",
            why=move.why,
            new=move.add.describe(),
            instead=f" instead of {move.drop.describe()}" if move.drop is not None else "",
        )
        return move.add

    def drop_tunnel(self) -> Deferred[None]:
        """Remove the tunnel routes only (connection lost, no kill switch)."""
        return self.tunnel.remove()

    def restore_tunnel(self) -> Deferred[None]:
        """Add the tunnel routes of the plan again (the connection is back)."""
        return self.tunnel.apply(self._tunnel_plan)

    def remove(self) -> Deferred[None]:
        """Remove everything: the tunnel routes first, then the carrier."""
        return Deferred.fromCoroutine(self._remove_all())

    async def _remove_all(self) -> None:
        try:
            await self.tunnel.remove()
        finally:
            await self.carrier.remove()
        self._tunnel_plan = []
