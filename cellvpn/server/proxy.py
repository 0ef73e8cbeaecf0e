"""The server's L4 proxy: TCP connections a client opens with CONNECT and carries on 'S'.

Per socket id (the packet's ``sock_id``): CONNECT names a host (ASCII: an address or a DNS
name) and a port; the server resolves a name off the reactor thread, checks the address
against :class:`~cellvpn.server.proxypolicy.ProxyPolicy`, connects, and answers CONNECTED (the
same host and port) or PROBLEM(PROXY_DENIED / PROXY_FAILED) with that ``sock_id``; refusals
and failures are counted, with a log line now and then (``[edge] log_interval``). A client
may send ahead to sockets still connecting, within ``[edge] proxy_early_data`` in all. SEND
carries bytes to the destination, RECV bytes back; DISCONNECT from either side closes the other.
A session has at most :data:`MAX_SOCKETS`.

No side buffers without bound: see :mod:`cellvpn.conn.flow`.

The session's rate limits (``[srv_vpn] rate_up``/``rate_down``) hold here too, from the same
token buckets as its IP packets. TCP bytes are delayed, not dropped: past the rate, the
proxy stops reading the client's stream (up) or its destinations (down) until the bucket has
paid back what was carried; each pause is counted (``delayed_rate_up``/``delayed_rate_down``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from cellvpn.conn.flow import StreamFlow, chunk_size
from cellvpn.conn.pki import host_addresses
from cellvpn.server.edge import Refusal
from cellvpn.server.proxypolicy import IPAddress, ProxyPolicy
from cellvpn.server.resolver import ProxyResolver
from cellvpn.wire.vpn import OpCode, ProblemCode, VpnPacket

if TYPE_CHECKING:
    from cellvpn.server.service import VPNServerService
    from cellvpn.server.session import ServerSession

#: Sockets one session may have open or opening at once.
MAX_SOCKETS = 256
#: Seconds a TCP connect to a destination may take.
CONNECT_TIMEOUT = 10.0
#: Bytes a client may SEND to a socket that is still connecting (beyond: the socket is closed).
EARLY_DATA_LIMIT = 256 * 1024

#: Resolves ``(host, port)`` to addresses, in preference order.
Resolver = Callable[[str, int], "Deferred[list[str]]"]


@dataclass
class ProxyStats:
    """Server-wide proxy counts, for vpn_stat."""

    opened: int = 0
    refused: int = 0
    failed: int = 0
    unknown_socket: int = 0
    unexpected: int = 0


class _RefusedError(Exception):
    """Why a CONNECT gets no connection, with the PROBLEM code to answer."""

    def __init__(self, code: ProblemCode, why: str) -> None:
        super().__init__(why)
        self.code = code
        self.why = why


class _Socket:
    """One client socket id: connecting first, then joined to its destination."""

    def __init__(self, sock_id: int, host: str, port: int) -> None:
        self.sock_id = sock_id
        self.host = host
        self.port = port
        self.pending: Deferred[None] | None = None
        self.target: _Target | None = None
        self.early: list[bytes] = []
        self.early_size = 0

    @property
    def destination(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class _Target(Protocol):
    """The TCP connection to a destination."""

    def __init__(self, link: _Link, sock: _Socket) -> None:
        self.link = link
        self.sock = sock

    def dataReceived(self, data: bytes) -> None:
        self.link.from_target(self.sock, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.link.target_lost(self.sock)


class _TargetFactory(Factory):
    noisy = False

    def __init__(self, link: _Link, sock: _Socket) -> None:
        self.link = link
        self.sock = sock

    def buildProtocol(self, addr: Any) -> Protocol:
        return _Target(self.link, self.sock)


class _Link:
    """One session's sockets, and the flow control between them and its stream."""

    def __init__(self, session: ServerSession) -> None:
        assert session.proto is not None, "proxy packets arrive on an established stream"
        self.session = session
        self.sockets: dict[int, _Socket] = {}
        self.flow = StreamFlow(session.proto)
        hello = session.proto.conn.peer_hello
        self.chunk = chunk_size(hello.max_frame if hello is not None else 0)
        #: early data held for all still-connecting sockets together
        self.early_size = 0
        #: the pauses of a rate limit: until the bucket paid back (None: not paused)
        self._up_wait: Any = None
        self._down_wait: Any = None

    def _rate_up(self, size: int) -> None:
        """Past ``rate_up``: stop reading the client's stream until the debt is paid."""
        session = self.session
        bucket = session.rate_up
        if bucket is None or self._up_wait is not None or session.proto is None:
            return
        reactor = session.server.reactor
        wait = bucket.spend(reactor.seconds(), size)
        if wait > 0:
            session.counters.delayed_rate_up += 1
            session.proto.hold_reading("rate")
            self._up_wait = reactor.callLater(wait, self._up_paid)

    def _up_paid(self) -> None:
        self._up_wait = None
        if self.session.proto is not None:
            self.session.proto.release_reading("rate")

    def _rate_down(self, size: int) -> None:
        """Past ``rate_down``: stop reading the destinations until the debt is paid."""
        session = self.session
        bucket = session.rate_down
        if bucket is None:
            return
        reactor = session.server.reactor
        wait = bucket.spend(reactor.seconds(), size)
        if wait > 0 and self._down_wait is None:
            session.counters.delayed_rate_down += 1
            self.flow.hold_sockets()
            self._down_wait = reactor.callLater(wait, self._down_paid)

    def _down_paid(self) -> None:
        self._down_wait = None
        self.flow.release_sockets()

    def _stop_waits(self) -> None:
        for name in ("_up_wait", "_down_wait"):
            call = getattr(self, name)
            setattr(self, name, None)
            if call is not None and call.active():
                call.cancel()
        if self.session.proto is not None:
            self.session.proto.release_reading("rate")

    def send(self, op: int, sock_id: int, data: bytes = b"", port: int = 0) -> None:
        session = self.session
        session.send_vpn(VpnPacket(op, data, sock_id, session.usage_id, port=port))

    def from_target(self, sock: _Socket, data: bytes) -> None:
        session = self.session
        if self.sockets.get(sock.sock_id) is not sock:
            return
        if not session.active:
            # the usage ended (not paid, stopped): the proxy carries nothing more for it
            self.close(sock)
            self.send(OpCode.DISCONNECT, sock.sock_id)
            session.flush()
            return
        size = self.chunk
        if len(data) <= size:
            self.send(OpCode.RECV, sock.sock_id, data)
        else:
            view = memoryview(data)
            for offset in range(0, len(data), size):
                self.send(OpCode.RECV, sock.sock_id, bytes(view[offset : offset + size]))
        session.counters.proxy_to_client_bytes += len(data)
        session.charge(len(data))
        session.flush()
        if session.rate_down is not None:
            self._rate_down(len(data))

    def target_lost(self, sock: _Socket) -> None:
        """The destination closed (or the connection broke): tell the client."""
        if self.sockets.get(sock.sock_id) is not sock:
            return
        self.close(sock)
        self.send(OpCode.DISCONNECT, sock.sock_id)
        self.session.flush()

    def to_target(self, sock: _Socket, data: bytes) -> None:
        target = sock.target
        if target is None:
            sock.early.append(data)
            sock.early_size += len(data)
            self.early_size += len(data)
            budget = self.session.server.proxy.early_data_budget  # type: ignore[union-attr]
            if sock.early_size > EARLY_DATA_LIMIT or self.early_size > budget:
                self.close(sock)
                self.send(OpCode.DISCONNECT, sock.sock_id)
                self.session.flush()
            return
        assert target.transport is not None
        target.transport.write(data)
        self.session.counters.proxy_from_client_bytes += len(data)
        self.session.charge(len(data))
        if self.session.rate_up is not None:
            self._rate_up(len(data))

    def close(self, sock: _Socket) -> None:
        """Forget ``sock`` and close its connection (what is written still goes out)."""
        if self.sockets.get(sock.sock_id) is sock:
            del self.sockets[sock.sock_id]
        pending, sock.pending = sock.pending, None
        if pending is not None:
            pending.cancel()
        self.early_size -= sock.early_size
        sock.early, sock.early_size = [], 0
        target, sock.target = sock.target, None
        if target is not None and target.transport is not None:
            self.flow.detach(target.transport)
            target.transport.loseConnection()

    def close_all(self, tell_client: bool) -> None:
        for sock in list(self.sockets.values()):
            self.close(sock)
            if tell_client:
                self.send(OpCode.DISCONNECT, sock.sock_id)
        self._stop_waits()
        self.flow.close()
        if tell_client:
            self.session.flush()


class ProxyRelay:
    """Serves CONNECT/SEND/DISCONNECT for every session of one server."""

    log = Logger()

    def __init__(
        self,
        server: VPNServerService,
        policy: ProxyPolicy,
        reactor: Any = None,
        resolve: Resolver | None = None,
    ) -> None:
        self.server = server
        self.policy = policy
        self.reactor = reactor if reactor is not None else server.reactor
        self.resolver: ProxyResolver | None = None
        edge = server.config.edge
        self.early_data_budget = edge.proxy_early_data
        if resolve is None:
            self.resolver = ProxyResolver(
                self.reactor, edge.resolver_threads, timeout=edge.resolve_timeout
            )
            resolve = self.resolver.resolve
        self.resolve = resolve
        self.stats = ProxyStats()
        #: the policy without the host's addresses: each reading of them starts from it again
        self.fixed_policy = policy
        #: the server's watch of the host's addresses tells this relay of changes
        self.watching = False

    @classmethod
    def for_server(cls, server: VPNServerService) -> ProxyRelay:
        """The relay with ``[srv_vpn]``'s rules; the pool gateway is the server's own address,
        the pool (the VPN client network) is no destination either."""
        v = server.config.srv_vpn
        policy = ProxyPolicy.build(
            v.proxy, v.proxy_allow, v.proxy_deny, [server.pool.gateway], [server.network]
        )
        return cls(server, policy)

    def read_own_addresses(self) -> None:
        """Learn the host's addresses at start, then from the server's watch of them
        (:mod:`cellvpn.server.hostaddresses`): the proxy never reaches them by default."""
        if not self.policy.enabled or self.watching:
            return
        self.fixed_policy = self.policy
        known = self.server.host_addresses.current
        # synchronous: at start, before the reactor runs and before any client is accepted
        self.policy = self.fixed_policy.with_own_addresses(
            known if known is not None else host_addresses()
        )
        p = self.policy
        self.log.info(
            "L4 proxy on: destinations {allow}{deny}; this host's {n} own addresses, the VPN"
            " client network {pool}, special-purpose and cloud metadata addresses are refused"
            " unless proxy_allow lists them",
            allow=f"in {', '.join(map(str, p.allow))}" if p.allow else "anywhere public",
            deny=f" except {', '.join(map(str, p.deny))}" if p.deny else "",
            n=len(p.own_addresses),
            pool=", ".join(map(str, p.client_networks)) or "(none)",
        )
        self.watching = True
        self.server.host_addresses.listen(self._addresses_read)

    def _addresses_read(self, addresses: list[str]) -> None:
        policy = self.fixed_policy.with_own_addresses(addresses)
        old, new = self.policy.own_addresses, policy.own_addresses
        if new == old:
            return
        self.policy = policy
        self.log.info(
            "L4 proxy: this host's addresses changed ({change}); {n} own addresses now",
            change=", ".join(
                [f"+{a}" for a in sorted(new - old, key=str)]
                + [f"-{a}" for a in sorted(old - new, key=str)]
            ),
            n=len(new),
        )

    def describe(self) -> dict[str, int]:
        stats = asdict(self.stats)
        if self.resolver is not None:
            stats["lookups_pending"] = self.resolver.pending
            stats["lookups_refused_busy"] = self.resolver.busy
            stats["lookups_timed_out"] = self.resolver.timeouts
        return stats

    # --- packets from the session ----------------------------------------------------------

    def packet(self, session: ServerSession, pkt: VpnPacket) -> None:
        op = pkt.op_code
        if op == OpCode.SEND:
            link = session.proxy
            sock = link.sockets.get(pkt.sock_id) if link is not None else None
            if sock is None:
                self._unknown(session, pkt.sock_id)
            elif pkt.data:
                link.to_target(sock, pkt.data)
        elif op == OpCode.CONNECT:
            self._connect(self._link(session), pkt)
        elif op == OpCode.DISCONNECT:
            link = session.proxy
            sock = link.sockets.get(pkt.sock_id) if link is not None else None
            if sock is None:
                # never answered: both ends may close the same socket at once
                self.stats.unknown_socket += 1
            else:
                link.close(sock)
        else:
            self.stats.unexpected += 1

    def session_ended(self, session: ServerSession) -> None:
        """The stream is gone: close the session's connections."""
        link, session.proxy = session.proxy, None
        if link is not None:
            link.close_all(tell_client=False)

    def usage_ended(self, session: ServerSession) -> None:
        """The service was refused or ended on a live stream: close and tell the client."""
        link, session.proxy = session.proxy, None
        if link is not None:
            link.close_all(tell_client=True)

    def _link(self, session: ServerSession) -> _Link:
        link: _Link | None = session.proxy
        if link is None:
            link = _Link(session)
            session.proxy = link
        return link

    def _unknown(self, session: ServerSession, sock_id: int) -> None:
        """Data for a socket that is not open: tell the client it is closed."""
        self.stats.unknown_socket += 1
        session.send_vpn(VpnPacket(OpCode.DISCONNECT, sock_id=sock_id, usage_id=session.usage_id))
        session.flush()

    # --- opening ---------------------------------------------------------------------------

    def _connect(self, link: _Link, pkt: VpnPacket) -> None:
        sock_id = pkt.sock_id
        try:
            host = pkt.data.decode("ascii").strip()
        except UnicodeDecodeError:
            host = ""
        sock = _Socket(sock_id, host or repr(pkt.data), pkt.port)
        if not self.policy.enabled:
            self._refuse(link, sock, ProblemCode.PROXY_DENIED, "proxy is off on this server")
        elif sock_id == 0:
            self._refuse(link, sock, ProblemCode.PROXY_FAILED, "sock_id 0 is no socket")
        elif sock_id in link.sockets:
            self._refuse(link, sock, ProblemCode.PROXY_FAILED, f"sock_id {sock_id} is in use")
        elif link.chunk == 0:
            why = "the client's frames are too small to carry relayed data"
            self._refuse(link, sock, ProblemCode.PROXY_FAILED, why)
        elif len(link.sockets) >= MAX_SOCKETS:
            why = f"the session has {MAX_SOCKETS} proxy sockets already"
            self._refuse(link, sock, ProblemCode.PROXY_FAILED, why)
        elif not host or len(host) > 255 or not 0 < pkt.port < 65536:
            self._refuse(link, sock, ProblemCode.PROXY_FAILED, "not a host and port")
        else:
            link.sockets[sock_id] = sock
            opening = Deferred.fromCoroutine(self._open(link, sock))
            if not opening.called:
                sock.pending = opening
            opening.addErrback(self._crashed, sock)

    def _crashed(self, failure: Failure, sock: _Socket) -> None:
        self.log.failure("proxy to {dest} failed unexpectedly", failure, dest=sock.destination)

    async def _open(self, link: _Link, sock: _Socket) -> None:
        address: IPAddress | None = None
        try:
            address = await self._address(sock)
            endpoint = self._endpoint(address, sock.port)
            target = await endpoint.connect(_TargetFactory(link, sock))
        except (CancelledError, ConnectingCancelledError):
            return  # the client closed the socket meanwhile
        except _RefusedError as e:
            self._fail(link, sock, e.code, e.why)
        except Exception as e:
            self._fail(link, sock, ProblemCode.PROXY_FAILED, f"{address}: {_why(e)}")
        else:
            self._joined(link, sock, target)

    def _endpoint(self, address: IPAddress, port: int) -> Any:
        if isinstance(address, ipaddress.IPv4Address):
            return TCP4ClientEndpoint(self.reactor, str(address), port, timeout=CONNECT_TIMEOUT)
        return TCP6ClientEndpoint(self.reactor, str(address), port, timeout=CONNECT_TIMEOUT)

    async def _address(self, sock: _Socket) -> IPAddress:
        """The address to connect to: the first the policy allows."""
        host = sock.host
        try:
            candidates = [str(ipaddress.ip_address(host.removeprefix("[").removesuffix("]")))]
        except ValueError:
            try:
                candidates = await self.resolve(host, sock.port)
            except CancelledError:
                raise
            except Exception as e:
                raise _RefusedError(
                    ProblemCode.PROXY_FAILED, f"cannot resolve {host}: {e}"
                ) from None
        refusals: list[str] = []
        for text in candidates:
            why = self.policy.check(text)
            if why is None:
                return ipaddress.ip_address(text.split("%", 1)[0])
            refusals.append(why)
        if not refusals:
            raise _RefusedError(ProblemCode.PROXY_FAILED, f"{host} has no address")
        raise _RefusedError(ProblemCode.PROXY_DENIED, refusals[0])

    def _joined(self, link: _Link, sock: _Socket, target: _Target) -> None:
        transport = target.transport
        assert transport is not None
        if link.sockets.get(sock.sock_id) is not sock:
            transport.loseConnection()  # the client gave up meanwhile
            return
        sock.pending = None
        sock.target = target
        self.stats.opened += 1
        link.flow.attach(transport)
        link.send(OpCode.CONNECTED, sock.sock_id, sock.host.encode("ascii"), sock.port)
        early, sock.early = sock.early, []
        link.early_size -= sock.early_size
        sock.early_size = 0
        for data in early:
            link.to_target(sock, data)
        link.session.flush()

    def _fail(self, link: _Link, sock: _Socket, code: ProblemCode, why: str) -> None:
        if link.sockets.get(sock.sock_id) is not sock:
            return
        sock.pending = None
        link.close(sock)
        self._refuse(link, sock, code, why)

    def _refuse(self, link: _Link, sock: _Socket, code: ProblemCode, why: str) -> None:
        session = link.session
        if code is ProblemCode.PROXY_DENIED:
            self.stats.refused += 1
        else:
            self.stats.failed += 1
        session.send_problem(code, sock.sock_id)
        session.flush()
        what = "refused" if code is ProblemCode.PROXY_DENIED else "failed"
        self.server.refusal(Refusal.PROXY, session, f"proxy to {sock.destination} {what}: {why}")


def _why(error: Exception) -> str:
    """A connect error without Twisted's class-name prefix."""
    text = str(error).strip()
    return text.rstrip(".") or type(error).__name__
