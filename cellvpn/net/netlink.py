"""A small typed adapter over pyroute2's netlink, every call in a worker thread.

Each call opens its own ``IPRoute`` inside the worker thread and closes it there: pyroute2 0.9
keeps an asyncio loop and a socket per thread, so one object must never cross threads, and a
netlink dump can take milliseconds the reactor should not wait for. ``netns`` points every call
at one network namespace (the tests' own); in production it is None and the calls act on the
namespace the process runs in.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, IPv6Interface
from typing import Any, Literal, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

_T = TypeVar("_T")

Family = Literal[4, 6]
RouteKind = Literal["unicast", "unreachable"]

#: The main routing table, where ``ip route`` works without ``table``.
MAIN_TABLE = 254

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_RTN = {"unicast": 1, "unreachable": 7}
_RTN_KIND: dict[int, RouteKind] = {1: "unicast", 7: "unreachable"}
_SCOPE_UNIVERSE = 0
_SCOPE_LINK = 253
_ESRCH = 3
_ENODEV = 19
_EEXIST = 17
#: ``ip addr add ... noprefixroute``: no automatic route for the address's prefix.
_IFA_F_NOPREFIXROUTE = 0x200
#: No duplicate address detection: a TUN has no neighbours, and DAD would hold the address
#: back (tentative) for a second or more.
_IFA_F_NODAD = 0x02
#: What the kernel stores when a route is added without a metric.
_DEFAULT_METRIC = {4: 0, 6: 1024}


class NetConfigError(Exception):
    """A host network change failed; the message is one line naming what and why.

    ``errno`` is the kernel's error number when there is one (17 for "File exists", ...).
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass(frozen=True)
class Route:
    """One route as cellvpn adds it; ``oif`` is an interface name, so it survives a restart."""

    dst: str
    gateway: str | None = None
    oif: str | None = None
    kind: RouteKind = "unicast"
    family: Family = 4
    table: int = MAIN_TABLE
    metric: int | None = None

    def __post_init__(self) -> None:
        network = ipaddress.ip_network(self.dst)  # ValueError for host bits or garbage
        if network.version != self.family:
            raise ValueError(f"route {self.dst} is not IPv{self.family}")
        if self.kind == "unreachable" and (self.gateway or self.oif):
            raise ValueError(f"unreachable route {self.dst} takes no gateway or device")
        if self.kind == "unicast" and not (self.gateway or self.oif):
            raise ValueError(f"route {self.dst} needs a gateway or a device")
        if self.gateway and ipaddress.ip_address(self.gateway).version != self.family:
            raise ValueError(f"gateway {self.gateway} of {self.dst} is not IPv{self.family}")

    def describe(self) -> str:
        """The route as ``ip route`` would print it, for logs and cleanup reports."""
        parts = [self.dst] if self.kind == "unicast" else [self.kind, self.dst]
        if self.gateway:
            parts += ["via", self.gateway]
        if self.oif:
            parts += ["dev", self.oif]
        if self.table != MAIN_TABLE:
            parts += ["table", str(self.table)]
        if self.metric is not None:
            parts += ["metric", str(self.metric)]
        return " ".join(parts)

    def same_slot(self, other: Route) -> bool:
        """True when the kernel would refuse to add one while the other exists (EEXIST)."""
        return (
            self.family == other.family
            and ipaddress.ip_network(self.dst) == ipaddress.ip_network(other.dst)
            and self.table == other.table
            and self.effective_metric == other.effective_metric
        )

    @property
    def effective_metric(self) -> int:
        """The metric the kernel stores (an unset one is 0 for IPv4, 1024 for IPv6)."""
        return _DEFAULT_METRIC[self.family] if self.metric is None else self.metric

    def matches(self, other: Route) -> bool:
        """The same route, with an unset metric meaning the kernel's default."""
        return (
            self.same_slot(other)
            and self.kind == other.kind
            and self.oif == other.oif
            and _same_address(self.gateway, other.gateway)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "dst": self.dst,
            "gateway": self.gateway,
            "oif": self.oif,
            "kind": self.kind,
            "family": self.family,
            "table": self.table,
            "metric": self.metric,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Route:
        family = data.get("family", 4)
        kind = data.get("kind", "unicast")
        if family not in (4, 6) or kind not in ("unicast", "unreachable"):
            raise ValueError(f"bad route record {data!r}")
        return cls(
            dst=str(data["dst"]),
            gateway=_opt_str(data.get("gateway")),
            oif=_opt_str(data.get("oif")),
            kind=kind,
            family=family,
            table=int(data.get("table", MAIN_TABLE)),
            metric=None if data.get("metric") is None else int(data["metric"]),
        )


@dataclass(frozen=True)
class LinkInfo:
    """One interface as it is now: its index and its alias (``ip link set ... alias``)."""

    index: int
    name: str
    alias: str | None


@dataclass(frozen=True)
class RouteInfo:
    """What the kernel would use now to reach one address (``ip route get``)."""

    gateway: str | None
    oif: int
    ifname: str
    prefsrc: str | None


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _same_address(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    return ipaddress.ip_address(a) == ipaddress.ip_address(b)


def _strerror(code: int) -> str:
    try:
        return os.strerror(code)
    except ValueError:
        return f"error {code}"


def _run_now(work: Callable[[], _T]) -> Deferred[_T]:
    """``work()`` in a short-lived thread (pyroute2 keeps per-thread state), waited for."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(succeed(work()))
        except Exception:
            outcome.append(fail(Failure()))

    worker = threading.Thread(target=run, name="cellvpn-netlink-start", daemon=True)
    worker.start()
    worker.join()
    return outcome[0]  # type: ignore[no-any-return]


class Netlink:
    """Links, addresses and routes of one network namespace (None: the process's own).

    Every method runs in the reactor's thread pool and returns a Deferred; failures arrive as
    ``NetConfigError``.
    """

    def __init__(self, netns: str | None = None, blocking: bool = False) -> None:
        self.netns = netns
        #: run each call at once, in a thread of its own that the caller waits for, and answer
        #: with a fired Deferred: for start-up work that must be done before the process gives
        #: up root (twistd ``-u``), while the reactor and its thread pool are not running yet
        self.blocking = blocking

    # -- plumbing ---------------------------------------------------------------------------

    def _call(self, what: str, work: Callable[[Any], _T]) -> Deferred[_T]:
        """Run ``work(ipr)`` in a worker thread with a fresh IPRoute, closed afterwards."""

        def run() -> _T:
            from pyroute2 import IPRoute
            from pyroute2.netlink.exceptions import NetlinkError

            try:
                with IPRoute(netns=self.netns, flags=0) as ipr:
                    return work(ipr)
            except NetlinkError as e:
                raise NetConfigError(f"{what}: {_strerror(e.code)}", e.code) from e
            except FileNotFoundError as e:
                if self.netns is not None:
                    raise NetConfigError(f"{what}: no network namespace {self.netns}") from e
                raise NetConfigError(f"{what}: {e}") from e

        if self.blocking:
            return _run_now(run)
        return deferToThread(run)

    @staticmethod
    def _index(ipr: Any, name: str) -> int | None:
        found = ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None

    def _require_index(self, ipr: Any, name: str, what: str) -> int:
        index = self._index(ipr, name)
        if index is None:
            raise NetConfigError(f"{what}: no interface {name}", _ENODEV)
        return index

    def _route_args(self, ipr: Any, route: Route, what: str) -> dict[str, Any]:
        args: dict[str, Any] = {
            "dst": route.dst,
            "family": _AF[route.family],
            "table": route.table,
            "type": _RTN[route.kind],
        }
        if route.kind == "unicast":
            if route.gateway:
                args["gateway"] = route.gateway
            if route.oif:
                args["oif"] = self._require_index(ipr, route.oif, what)
            # Like ``ip route add``: a route without a gateway is on the link.
            args["scope"] = _SCOPE_UNIVERSE if route.gateway else _SCOPE_LINK
        if route.metric is not None:
            args["priority"] = route.metric
        return args

    # -- links ------------------------------------------------------------------------------

    def link_index(self, name: str) -> Deferred[int | None]:
        """The interface's index, or None when there is no such interface."""
        return self._call(f"cannot look up interface {name}", lambda ipr: self._index(ipr, name))

    def configure_tun(
        self,
        name: str,
        address: IPv4Address,
        prefixlen: int | None,
        peer: IPv4Address | None,
        mtu: int,
        noprefixroute: bool = False,
    ) -> Deferred[None]:
        """Set the MTU, the address (``address/prefixlen``, or ``address peer PEER``), up.

        An address that is already there is fine: a reconnect may set the same lease again.
        With ``noprefixroute`` the kernel adds no route for the address's prefix (or peer), so
        the caller decides which routes go into the device.
        """
        if peer is None and prefixlen is None:
            raise ValueError("configure_tun needs a prefix length or a peer address")
        what = f"cannot configure {name} with {address}"

        def work(ipr: Any) -> None:
            from pyroute2.netlink.exceptions import NetlinkError

            index = self._require_index(ipr, name, what)
            ipr.link("set", index=index, mtu=mtu)
            if peer is not None:
                addr: dict[str, Any] = {
                    "local": str(address),
                    "address": str(peer),
                    "prefixlen": 32 if prefixlen is None else prefixlen,
                }
            else:
                addr = {"local": str(address), "address": str(address), "prefixlen": prefixlen}
            if noprefixroute:
                addr["flags"] = _IFA_F_NOPREFIXROUTE  # sent as IFA_FLAGS (it needs 32 bits)
            try:
                ipr.addr("add", index=index, **addr)
            except NetlinkError as e:
                if e.code != _EEXIST:
                    raise
            ipr.link("set", index=index, state="up")

        return self._call(what, work)

    def add_address(
        self, name: str, interface: IPv6Interface, noprefixroute: bool = False
    ) -> Deferred[None]:
        """Add an IPv6 address to an interface that is up, without DAD; one already there is
        fine (a reconnect sets the same lease again). IPv6 must be enabled on the interface."""
        what = f"cannot add {interface} to {name}"

        def work(ipr: Any) -> None:
            from pyroute2.netlink.exceptions import NetlinkError

            index = self._require_index(ipr, name, what)
            flags = _IFA_F_NODAD | (_IFA_F_NOPREFIXROUTE if noprefixroute else 0)
            try:
                ipr.addr(
                    "add",
                    index=index,
                    family=socket.AF_INET6,
                    address=str(interface.ip),
                    prefixlen=interface.network.prefixlen,
                    flags=flags,
                )
            except NetlinkError as e:
                if e.code != _EEXIST:
                    raise
            ipr.link("set", index=index, state="up")

        return self._call(what, work)

    def link_info(self, name: str) -> Deferred[LinkInfo | None]:
        """The interface's index and alias, or None when there is no such interface."""

        def work(ipr: Any) -> LinkInfo | None:
            index = self._index(ipr, name)
            if index is None:
                return None
            alias = ipr.link("get", index=index)[0].get("ifalias")
            return LinkInfo(index, name, _opt_str(alias))

        return self._call(f"cannot look up interface {name}", work)

    def set_alias(self, name: str, alias: str) -> Deferred[int]:
        """Set the interface's alias (a mark of who made it); fires with its index."""
        what = f"cannot mark interface {name}"

        def work(ipr: Any) -> int:
            index = self._require_index(ipr, name, what)
            ipr.link("set", index=index, ifalias=alias)
            return index

        return self._call(what, work)

    def delete_link(self, name: str, index: int | None = None) -> Deferred[bool]:
        """Delete the interface; False (no error) when it is not there.

        With ``index``, only the interface of that name and index: one that took the name
        since (another index) is someone else's and stays.
        """

        def work(ipr: Any) -> bool:
            from pyroute2.netlink.exceptions import NetlinkError

            found = self._index(ipr, name)
            if found is None or (index is not None and found != index):
                return False
            try:
                ipr.link("del", index=found)
            except NetlinkError as e:
                if e.code == _ENODEV:  # gone in between
                    return False
                raise
            return True

        return self._call(f"cannot delete interface {name}", work)

    # -- routes -----------------------------------------------------------------------------

    def route_get(self, dst: str | IPv4Address | IPv6Address) -> Deferred[RouteInfo]:
        """The gateway and interface the kernel would use now to reach ``dst``."""
        address = ipaddress.ip_address(str(dst))

        def work(ipr: Any) -> RouteInfo:
            answer = ipr.route("get", dst=str(address), family=_AF[address.version])
            if not answer or answer[0].get("oif") is None:
                raise NetConfigError(f"cannot find a route to {address}: no device in the answer")
            msg = answer[0]
            oif = int(msg.get("oif"))
            return RouteInfo(
                gateway=_opt_str(msg.get("gateway")),
                oif=oif,
                ifname=str(ipr.link("get", index=oif)[0].get("ifname")),
                prefsrc=_opt_str(msg.get("prefsrc")),
            )

        return self._call(f"cannot find a route to {address}", work)

    def add_route(self, route: Route) -> Deferred[None]:
        what = f"cannot add route {route.describe()}"

        def work(ipr: Any) -> None:
            ipr.route("add", **self._route_args(ipr, route, what))

        return self._call(what, work)

    def delete_route(self, route: Route) -> Deferred[bool]:
        """Delete exactly this route; False (no error) when it is not there.

        The gateway, device and kind are part of the request, so a route of someone else with
        the same destination is never taken instead.
        """
        what = f"cannot delete route {route.describe()}"

        def work(ipr: Any) -> bool:
            from pyroute2.netlink.exceptions import NetlinkError

            if route.oif and self._index(ipr, route.oif) is None:
                return False  # its device is gone, and the kernel took the route with it
            try:
                ipr.route("del", **self._route_args(ipr, route, what))
            except NetlinkError as e:
                if e.code in (_ESRCH, _ENODEV):
                    return False
                raise
            return True

        return self._call(what, work)

    def dump_routes(self, family: Family, table: int = MAIN_TABLE) -> Deferred[list[Route]]:
        """The unicast and unreachable routes of one table.

        Other kinds (local, broadcast, multicast) and multipath routes are left out: cellvpn
        never makes them, and ``Route`` cannot say them.
        """

        def work(ipr: Any) -> list[Route]:
            names = {int(link["index"]): str(link.get("ifname")) for link in ipr.link("dump")}
            routes: list[Route] = []
            for msg in ipr.route("dump", family=_AF[family], table=table):
                kind = _RTN_KIND.get(int(msg["type"]))
                if kind is None:
                    continue
                msg_table = int(msg.get("table"))
                if msg_table != table:
                    continue
                default = "0.0.0.0" if family == 4 else "::"
                oif = msg.get("oif") if kind == "unicast" else None
                try:
                    routes.append(
                        Route(
                            dst=f"{msg.get('dst') or default}/{msg['dst_len']}",
                            gateway=_opt_str(msg.get("gateway")),
                            oif=None if oif is None else names.get(int(oif), str(oif)),
                            kind=kind,
                            family=family,
                            table=msg_table,
                            metric=msg.get("priority"),
                        )
                    )
                except ValueError:
                    continue  # multipath: neither gateway nor device at the top level
            return routes

        return self._call(f"cannot list IPv{family} routes", work)

    # -- IPv6 -------------------------------------------------------------------------------

    def ipv6_enabled(self) -> Deferred[bool]:
        """Whether IPv6 works in the namespace (``net.ipv6.conf.all.disable_ipv6`` is 0).

        /proc/sys/net shows the namespace of the thread that opens it, so with ``netns`` set the
        worker thread enters the namespace for the read and always returns to its own.
        """

        def read() -> bool:
            try:
                with open("/proc/sys/net/ipv6/conf/all/disable_ipv6") as f:
                    return f.read().strip() == "0"
            except FileNotFoundError:
                return False  # a kernel without IPv6 (ipv6.disable=1)

        def run() -> bool:
            if self.netns is None:
                return read()
            from pyroute2 import netns as pyroute2_netns

            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                try:
                    pyroute2_netns.setns(self.netns, flags=0)
                except OSError as e:
                    raise NetConfigError(
                        f"cannot enter network namespace {self.netns}: {e.strerror or e}"
                    ) from e
                try:
                    return read()
                finally:
                    pyroute2_netns.setns(own, flags=0)
            finally:
                os.close(own)

        return deferToThread(run)
