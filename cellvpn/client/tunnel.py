"""The client's side of the host: its TUN device, its routes and its DNS.

Every change is written to the crash journal before it is made, so a client killed with -9
cleans up after itself on its next start. Netlink, file and journal work runs off the reactor
thread; opening the TUN is one quick ioctl and stays on it.

The server's ADDR_REPLY is checked against the host's addresses and routes
(:mod:`cellvpn.net.routepolicy`) before anything is touched: a refused offer changes nothing.
An accepted address goes on the TUN without its automatic prefix route, and the client adds
the one overlay route the policy names, journaled like its other routes.

With the ``ipv6`` capability the reply may carry an IPv6 address too (dual stack). It is
checked by its own policy (:func:`cellvpn.net.routepolicy.check_offer6`); taken, it goes on the
TUN beside the IPv4 one, its prefix is routed into the TUN, and the default route takes IPv6
into the tunnel (``::/1`` and ``8000::/1``) instead of the guard that blackholes it. Refused,
or with IPv6 off on this host, the tunnel is IPv4-only as before and the guard stays.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from cellvpn.device import vnet
from cellvpn.net.clientroutes import ClientRoutes, RouteSet
from cellvpn.net.dns import DnsConfigurator
from cellvpn.net.journal import Journal, cleanup_leftovers
from cellvpn.net.netlink import Netlink, Route
from cellvpn.net.routepolicy import (
    DEFAULT_WIDEST_PREFIX,
    Accepted,
    Accepted6,
    HostRoute,
    HostView,
    Offer,
    OwnAddress,
    Refused,
    check_offer,
    check_offer6,
    check_route,
)
from cellvpn.tun.device import (
    get_iff,
    open_tun_offloaded,
)
from cellvpn.tun.port import TunPort
from cellvpn.wire.vpn import AddrReply

#: MTU used when the server does not say (an original server sends no options).
DEFAULT_MTU = 1400

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Route types that say where traffic goes (unicast, blackhole, unreachable, prohibit, throw);
#: local, broadcast, anycast and multicast routes belong to addresses, seen as such.
_ROUTE_KINDS = {1: "unicast", 6: "blackhole", 7: "unreachable", 8: "prohibit", 9: "throw"}
_LOCAL_TABLE = 255
#: TUNGETIFF's flag of a device that outlives its fds: made by someone else, not by this open.
_IFF_PERSIST = 0x0800


class AddressRefusedError(Exception):
    """The server's ADDR_REPLY failed the route policy; nothing on the host was changed."""

    def __init__(self, offer: Offer, refusal: Refused) -> None:
        super().__init__(str(refusal))
        self.offer = offer
        self.refusal = refusal


class ClientTunnel:
    """One TUN device with the leased address, and what routes traffic into it."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        tun_name: str | None,
        state_dir: Path,
        on_packets: Callable[[list[bytes]], None],
        resolv_conf: Path = Path("/etc/resolv.conf"),
    ) -> None:
        self.reactor = reactor
        self.wanted_name = tun_name
        self.on_packets = on_packets
        self.journal = Journal(Path(state_dir) / "journal.json")
        self.netlink = Netlink()
        self.routes = ClientRoutes(self.netlink, self.journal)
        #: the overlay route the policy accepted (the address has no prefix route of its own)
        self.overlay = RouteSet(self.netlink, self.journal)
        self.lease: Accepted | None = None
        #: the IPv6 address the policy accepted (None: IPv4 only)
        self.lease6: Accepted6 | None = None
        self.dns = DnsConfigurator(resolv_conf, journal=self.journal)
        self.port: TunPort | None = None
        self.name: str | None = None
        self.address: ipaddress.IPv4Address | None = None
        self.gateway: ipaddress.IPv4Address | None = None
        self.address6: ipaddress.IPv6Address | None = None
        self.gateway6: ipaddress.IPv6Address | None = None
        self.mtu = DEFAULT_MTU
        self.dns_servers: list[IPAddress] = []
        self.tunnel_routes_up = False
        #: the TUN carries vnet headers (offload)
        self.vnet = False
        self.dropped_bad_offload = 0

    async def cleanup_leftovers(self) -> list[str]:
        """Undo what a killed earlier run left behind (routes, TUN, resolv.conf)."""
        Path(self.journal.path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return await cleanup_leftovers(self.journal, self.netlink, self.dns)

    async def setup(
        self,
        reply: AddrReply,
        server: ipaddress.IPv4Address | ipaddress.IPv6Address,
        default_route: bool,
        dns: Sequence[IPAddress],
        offload: bool = False,
        widest_prefix: int = DEFAULT_WIDEST_PREFIX,
        include: Sequence[IPNetwork] = (),
        exclude: Sequence[IPNetwork] = (),
        accept_routes: bool = False,
    ) -> None:
        """Bring the tunnel up for ``reply``'s address (again, after a reconnect).

        The offer is checked first: a refused one raises ``AddressRefusedError`` with the host
        as it was. With ``offload`` (agreed with the server) the TUN is opened with vnet headers
        and TCP segmentation offload, if the kernel allows; a TUN opened either way stays so
        across reconnects (packets are cut or completed in userspace when the server differs).
        ``server`` is the stream's peer, IPv4 or IPv6: the host route that keeps it reachable
        is of its family, and only an IPv4 server can collide with the IPv4 overlay.
        """
        offer = Offer(reply.client, reply.gateway, reply.netmask)
        v4_server = server if isinstance(server, ipaddress.IPv4Address) else None
        host = await self.host_view()
        verdict = check_offer(offer, host, v4_server, widest_prefix)
        if isinstance(verdict, Refused):
            raise AddressRefusedError(offer, verdict)
        v6_server = server if isinstance(server, ipaddress.IPv6Address) else None
        verdict6 = await self._offer6(reply, host, v6_server)
        if self.port is None:
            await self._open(offload)
        assert self.name is not None
        if self.lease is not None and (self.lease != verdict or self.lease6 != verdict6):
            # a new lease after a reconnect: routes and DNS are planned afresh
            await self.teardown_network()
            await self._close()
            await self._open(offload)
        self.address = reply.client
        self.gateway = reply.gateway
        self.mtu = reply.mtu or DEFAULT_MTU
        address = verdict.interface
        prefix = address.network.prefixlen if verdict.peer is None else None
        await self.netlink.configure_tun(
            self.name, address.ip, prefix, verdict.peer, self.mtu, noprefixroute=True
        )
        self.lease = verdict
        if verdict.route is not None:
            await self.overlay.apply([Route(str(verdict.route), oif=self.name)])
        ipv6 = verdict6 is not None
        if verdict6 is not None:
            await self.netlink.add_address(self.name, verdict6.interface, noprefixroute=True)
            self.lease6 = verdict6
            self.address6 = verdict6.interface.ip
            self.gateway6 = reply.gateway6
            if verdict6.route is not None:
                route6 = Route(str(verdict6.route), oif=self.name, family=6)
                await self.overlay.apply([route6])
        if not (self.routes.carrier.routes or self.routes.tunnel.routes):
            pushed = self._pushed_routes(reply, host, server, ipv6) if accept_routes else []
            await self.routes.setup(
                server,
                self.name,
                default_route,
                ipv6_guard=True,
                include=self._of_families([*include, *pushed], ipv6, "route"),
                exclude=self._of_families(exclude, ipv6, "exclude"),
                ipv6_tunnel=ipv6,
            )
        elif not self.tunnel_routes_up:
            await self.routes.restore_tunnel()
        self.tunnel_routes_up = True
        offered: list[IPAddress] = [*reply.dns, *(reply.dns6 if ipv6 else ())]
        servers = [a for a in dns if ipv6 or a.version == 4] if dns else offered
        if servers and self.dns.method is None:
            await self.dns.apply(servers, self.name)
            self.dns_servers = servers

    async def _offer6(
        self, reply: AddrReply, host: HostView, server: ipaddress.IPv6Address | None
    ) -> Accepted6 | None:
        """The IPv6 part of the offer, if there is one and it may be taken; why not, logged."""
        if reply.client6 is None or reply.gateway6 is None:
            return None
        if not await self.netlink.ipv6_enabled():
            self.log.info(
                "the server offers {address}, but IPv6 is disabled here: IPv4 only",
                address=str(reply.client6),
            )
            return None
        verdict = check_offer6(reply.client6, reply.gateway6, host, server)
        if isinstance(verdict, Refused):
            self.log.warn(
                "refused the server's IPv6 address {address}: {why}; IPv4 only",
                address=str(reply.client6),
                why=str(verdict),
            )
            return None
        return verdict

    def _of_families(self, networks: Sequence[IPNetwork], ipv6: bool, key: str) -> list[IPNetwork]:
        """``networks`` without the IPv6 ones when the tunnel has no IPv6 address (said once)."""
        kept = [n for n in networks if ipv6 or n.version == 4]
        for network in networks:
            if network not in kept:
                self.log.warn(
                    "{key} {network} left out: the tunnel has no IPv6 address",
                    key=key,
                    network=str(network),
                )
        return kept

    def _pushed_routes(
        self,
        reply: AddrReply,
        host: HostView,
        server: ipaddress.IPv4Address | ipaddress.IPv6Address,
        ipv6: bool,
    ) -> list[IPNetwork]:
        """The networks the server offers that the route policy lets into the tunnel; each
        refusal said once, with its reason."""
        taken: list[IPNetwork] = []
        offered: list[IPNetwork] = [*reply.routes, *(reply.routes6 if ipv6 else ())]
        for network in offered:
            refused = check_route(network, host, server)
            if refused is None:
                taken.append(network)
            else:
                self.log.warn(
                    "refused the server's route {route}: {why}", route=str(network), why=refused
                )
        return taken

    def host_view(self) -> Deferred[HostView]:
        """The host's IPv4 addresses and non-default routes, leaving out the TUN's own.

        Read in one netlink call off the reactor thread, as every netlink call is.
        """
        tun = self.name
        own = {r.dst for r in (*self.routes.carrier.routes, *self.routes.tunnel.routes)}
        return self.netlink._call(
            "cannot read the host's addresses and routes",
            lambda ipr: _read_host_view(ipr, tun, own),
        )

    async def _open(self, offload: bool) -> None:
        handle, why_not = open_tun_offloaded(self.wanted_name, offload=offload)
        if why_not:
            self.log.info("no large-packet offload on this TUN: {why}", why=why_not)
        self.vnet = handle.vnet_hdr
        try:
            created = not get_iff(handle.fd)[1] & _IFF_PERSIST
            if created:
                # marked and recorded by ifindex: a later cleanup deletes this device, no other
                marker = self.journal.marker
                index = await self.netlink.set_alias(handle.name, marker)
                await deferToThread(self.journal.record_tun, handle.name, index, marker)
        except Exception:
            handle.close()
            raise
        self.name = handle.name
        self.port = TunPort(self.reactor, handle.detach(), self.on_packets)
        self.port.startReading()
        if created:
            self.log.info("TUN {name} created", name=handle.name)
        else:
            # someone's persistent device (``ip tuntap add``): used, and never deleted
            self.log.info("TUN {name} exists already (persistent): using it", name=handle.name)

    async def _close(self) -> None:
        if self.port is not None:
            port, self.port = self.port, None
            port.stopReading()
            port.close()
            await deferToThread(self.journal.forget_tun)
        self.address = None
        self.lease = None
        self.address6 = None
        self.gateway6 = None
        self.lease6 = None

    def pause_reading(self) -> None:
        if self.port is not None:
            self.port.pauseProducing()

    def resume_reading(self) -> None:
        if self.port is not None:
            self.port.resumeProducing()

    def write(self, packet: bytes | memoryview) -> bool:
        port = self.port
        if port is None:
            return False
        if self.vnet:
            return port.writev(vnet.PLAIN, packet)
        return port.write(packet)

    def write_gso(self, data: bytes | memoryview) -> bool:
        """A super-packet from the server: checked like one from a client, then written."""
        port = self.port
        if port is None:
            return False
        header, pkt = data[:10], data[10:]
        try:
            header = vnet.rebuild_header(header, pkt, 65535)
            if self.vnet:
                return port.writev(header, pkt)
            return port.write_many(vnet.segment(header, pkt)) > 0
        except vnet.OffloadError:
            self.dropped_bad_offload += 1
            return False

    async def link_lost(self, kill_switch: bool) -> None:
        """The server is gone for now: without the kill switch, traffic goes around the tunnel."""
        if kill_switch or not self.tunnel_routes_up:
            return
        self.tunnel_routes_up = False
        await self.routes.drop_tunnel()
        if self.dns.method is not None:
            await self.dns.restore()

    async def refresh_carrier(
        self, server: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    ) -> None:
        """Before a reconnect: the host route to the server planned again if a roam took it,
        or made for ``server``, the one a fail-over moves to."""
        if self.name is not None:
            await self.routes.refresh_carrier(self.name, server)

    async def teardown_network(self) -> None:
        """Routes and DNS back as they were (the TUN stays)."""
        try:
            if self.dns.method is not None:
                await self.dns.restore()
        finally:
            try:
                await self.routes.remove()
            finally:
                self.tunnel_routes_up = False
                await self.overlay.remove()

    async def teardown(self) -> None:
        """Everything the client added, removed; the journal emptied."""
        try:
            await self.teardown_network()
        finally:
            await self._close()
            await deferToThread(self.journal.clear)

    @property
    def state(self) -> str:
        """What the TUN is now, for the status: absent, open (no address yet), up, or up with
        the tunnel routes removed (the link is lost and there is no kill switch)."""
        if self.port is None:
            return "absent"
        if self.address is None:
            return "open"
        return "up" if self.tunnel_routes_up else "up, tunnel routes removed"

    def describe(self) -> dict[str, Any]:
        return {
            "tun": self.name,
            "tun_state": self.state,
            "address": str(self.address) if self.address else None,
            "gateway": str(self.gateway) if self.gateway else None,
            "address6": str(self.address6) if self.address6 else None,
            "gateway6": str(self.gateway6) if self.gateway6 else None,
            "mtu": self.mtu,
            "offload": self.vnet,
            "routes": [
                r.describe()
                for r in (
                    *self.overlay.routes,
                    *self.routes.carrier.routes,
                    *self.routes.tunnel.routes,
                )
            ],
            "dns": [str(s) for s in self.dns_servers] if self.dns.method else [],
            "dns_method": self.dns.method,
        }


def _read_host_view(
    ipr: Any, tun: str | None, own: frozenset[str] | set[str] = frozenset()
) -> HostView:
    """Addresses and routes (IPv4 and IPv6) from one open ``IPRoute`` (in a worker thread);
    ``own`` are the destinations of routes this client added (its IPv6 guard among them)."""
    names = {int(link["index"]): str(link.get("ifname")) for link in ipr.link("dump")}
    addresses: list[OwnAddress] = []
    routes: list[HostRoute] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.addr("dump", family=family):
            device = names.get(int(msg["index"]), str(msg["index"]))
            if device == tun:
                continue
            prefix = int(msg["prefixlen"])
            seen = {msg.get("local"), msg.get("address")} - {None}
            for text in sorted(str(a) for a in seen):
                addresses.append(OwnAddress(ipaddress.ip_interface(f"{text}/{prefix}"), device))
        for msg in ipr.route("dump", family=family):
            kind = _ROUTE_KINDS.get(int(msg["type"]))
            table = int(msg.get("table"))
            if kind is None or table == _LOCAL_TABLE or not msg["dst_len"]:
                continue
            oif = msg.get("oif")
            via = None if oif is None else names.get(int(oif), str(oif))
            if tun is not None and via == tun:
                continue  # the tunnel's own routes, from before a reconnect
            dst = f"{msg.get('dst')}/{msg['dst_len']}"
            if dst in own:
                continue
            gateway = msg.get("gateway")
            routes.append(
                HostRoute(
                    ipaddress.ip_network(dst),
                    via,
                    None if gateway is None else ipaddress.ip_address(gateway),
                    kind,
                    table,
                )
            )
    return HostView(tuple(addresses), tuple(routes))
