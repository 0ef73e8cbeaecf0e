"""What a server session needs of the service that runs it, and nothing more.

:class:`~cellvpn.server.session.ServerSession` is written against :class:`SessionHost`, not
against ``VPNServerService``: the service's many other duties (TUN, control, reloads, hooks)
stay out of its reach, and a test may run a session on anything that has these few parts.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Protocol

from cellvpn.device.pump import PumpRoutes

if TYPE_CHECKING:
    from cryptography import x509
    from twisted.internet.interfaces import IDelayedCall

    from cellvpn.config.schema import ServerConfig
    from cellvpn.device.forwarder import Packet
    from cellvpn.device.pool import Lease
    from cellvpn.server.access import Verdict
    from cellvpn.server.edge import Refusal
    from cellvpn.server.session import ServerSession
    from cellvpn.wire.service import CheckPacket, Request
    from cellvpn.wire.vpn import AddrReply, VpnPacket


class Clock(Protocol):
    """The service's reactor, as a clock (``IReactorTime``)."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, f: object, *args: object) -> IDelayedCall: ...


class SessionBilling(Protocol):
    """Billing, as a session hands it the 'R' packets it does not answer itself."""

    def welcome_order(self, session: ServerSession | None = None) -> bytes: ...

    def request(self, session: ServerSession, request: Request) -> None: ...

    def service_packet(self, session: ServerSession, ptype: int, data: memoryview) -> bool: ...

    def allowance_used(self, session: ServerSession) -> None: ...

    def describe(self, session: ServerSession) -> dict[str, object] | None: ...


class SessionProxy(Protocol):
    """The L4 proxy: its packets, and the end of a session's usage."""

    def packet(self, session: ServerSession, pkt: VpnPacket) -> None: ...

    def usage_ended(self, session: ServerSession) -> None: ...


class SessionForwarder(PumpRoutes, Protocol):
    """The packet path between sessions and the TUN (and the pump's view of it)."""

    def attach(self, peer: ServerSession) -> object: ...

    def from_client_batch(self, peer: ServerSession, packets: list[Packet]) -> None: ...

    def from_client_gso(self, peer: ServerSession, data: Packet) -> None: ...


class SessionAdmission(Protocol):
    """The edge's count of connections per source."""

    def handshake_done(self, source: str) -> None: ...

    def closed(self, source: str, handshaking: bool) -> None: ...


class SessionIds(Protocol):
    """The live sessions, by id."""

    def new_id(self) -> int: ...

    def add(self, session_id: int, session: ServerSession) -> None: ...


class CheckCount(Protocol):
    def answered(self, request: CheckPacket, answer: CheckPacket) -> None: ...


class OfferList(Protocol):
    def available(self, now: float) -> list[bytes]: ...


class Judge(Protocol):
    def judge(self, cert: x509.Certificate | None) -> Verdict: ...


class LineBudget(Protocol):
    def allow(self) -> bool: ...


class SessionHost(Protocol):
    """The service, as a session sees it."""

    @property
    def config(self) -> ServerConfig: ...

    @property
    def reactor(self) -> Clock: ...

    @property
    def accepting(self) -> bool: ...

    @property
    def tun_ready(self) -> bool: ...

    @property
    def network(self) -> ipaddress.IPv4Network: ...

    @property
    def billing(self) -> SessionBilling | None: ...

    @property
    def proxy(self) -> SessionProxy | None: ...

    @property
    def forwarder(self) -> SessionForwarder: ...

    @property
    def admission(self) -> SessionAdmission: ...

    @property
    def enrollment(self) -> Judge: ...

    @property
    def sessions(self) -> SessionIds: ...

    @property
    def session_lines(self) -> LineBudget: ...

    @property
    def checks(self) -> CheckCount: ...

    @property
    def offers(self) -> OfferList | None: ...

    def refusal(self, kind: Refusal, session: ServerSession | None, why: str) -> None: ...

    def lease_for(self, session: ServerSession) -> Lease | None:
        """An address for ``session`` (a takeover closes the session that held it)."""

    def addr_reply(
        self,
        address: ipaddress.IPv4Address,
        with_options: bool,
        address6: ipaddress.IPv6Address | None = None,
    ) -> AddrReply: ...

    def key_limit(self, session: ServerSession) -> str | None:
        """Why ``session`` would pass ``[srv_vpn] sessions_per_key``, or None when it may."""

    def forwarder_detach(self, session: ServerSession) -> None:
        """The session's address carries no more packets."""

    def session_up(self, session: ServerSession) -> None:
        """The session has its address."""

    def session_ended(self, session: ServerSession) -> None:
        """Release what the session held: its id, its lease, its bill."""
