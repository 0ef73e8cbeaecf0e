"""Host network configuration through netlink, off the reactor thread."""

from cellvpn.net.clientroutes import ClientRoutes, RouteSet, plan_routes
from cellvpn.net.dns import DnsConfigurator
from cellvpn.net.journal import Journal, cleanup_leftovers
from cellvpn.net.netlink import NetConfigError, Netlink, Route, RouteInfo

__all__ = [
    "ClientRoutes",
    "DnsConfigurator",
    "Journal",
    "NetConfigError",
    "Netlink",
    "Route",
    "RouteInfo",
    "RouteSet",
    "cleanup_leftovers",
    "plan_routes",
]
