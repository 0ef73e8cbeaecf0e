"""The sections and keys of the server and client config files, with their defaults and docs.

One frozen dataclass per ``[section]``; the field name is the key. A section class's first
docstring line heads its section in the example files, and its ``checks`` are rules across keys.
"""

# option() is this package's dataclass field specifier, like dataclasses.field: calling it in a
# field default is the point, not a shared mutable default.
# ruff: noqa: RUF009

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import ClassVar, get_type_hints

from cellvpn.config.endpoints import endpoint
from cellvpn.config.fields import Check, ParseError, Parser, both_or_neither, option
from cellvpn.config.parsers import (
    BITRATE,
    BOOL,
    CONGESTION,
    EXECUTABLE,
    FINGERPRINT,
    HEX64,
    HOST_PORT,
    IFNAME,
    IPV4,
    NAME,
    NETWORK,
    PATH,
    PEM_SOURCE,
    HostPort,
    IPNetwork,
    PemSource,
    choice,
    integer,
    list_of,
    netmask,
    number,
    optional,
    seconds,
)
from cellvpn.device.tohost import RuleError, ToHostRules
from cellvpn.native import FastPathMode

_OPTIONAL_PATH = optional(PATH)
_HOOK = optional(EXECUTABLE)


def _ipv6_network(text: str, base: Path) -> IPv6Network:
    network = NETWORK.parse(text, base)
    if not isinstance(network, IPv6Network) or not 48 <= network.prefixlen <= 120:
        raise ParseError
    return network


#: The IPv6 network clients lease single addresses from.
_IPV6_POOL = optional(
    Parser(
        _ipv6_network, "an IPv6 network from /48 to /120 without host bits, such as 2001:db8:1::/64"
    )
)


def _ip_address(text: str, base: Path) -> IPv4Address | IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ParseError from None


_OPTIONAL_PEM = optional(PEM_SOURCE)
#: DNS servers: IPv4 ones always; IPv6 ones go to clients that can take IPv6.
_IP_LIST = list_of(
    Parser(_ip_address, "an IPv4 or IPv6 address such as 198.18.5.1 or 2001:db8:1::1"),
    "IPv4 or IPv6 addresses",
)


def _to_host_item(text: str, base: Path) -> str:
    try:
        ToHostRules.parse([text])
    except RuleError:
        raise ParseError from None
    return text.strip().lower()


_TO_HOST = list_of(
    Parser(_to_host_item, "icmp, dns, tcp:PORT, udp:PORT, all or none"),
    "rules (icmp, dns, tcp:PORT, udp:PORT, all, none)",
)
_NETWORK_LIST = list_of(NETWORK, "IPv4 or IPv6 networks such as 198.18.0.0/15 or 2001:db8::/32")
#: Prefixes for split tunnels and pushed routes (IPv6 ones only where the tunnel has IPv6).
_ROUTE_LIST = _NETWORK_LIST


def _one_trust(*given: object) -> str | None:
    if sum(value is not None for value in given) > 1:
        return "expected at most one of ca, server_key and fingerprint"
    return None


def _idle_after_keepalive(keepalive: float, idle_timeout: float) -> str | None:
    if idle_timeout <= keepalive:
        return "expected idle_timeout longer than keepalive, or idle streams are cut off"
    return None


class LogLevelName(StrEnum):
    """The least severe log events written."""

    DEBUG = "debug"
    INFO = "info"
    WARN = "warn"
    ERROR = "error"
    CRITICAL = "critical"


class LogFormat(StrEnum):
    """How log events are written: a line of text each, or one JSON object each."""

    TEXT = "text"
    JSON = "json"


_LOG_LEVEL_DOC = (
    "Least severe events logged: debug, info, warn, error or critical; SIGHUP applies a change."
)
_LOG_FORMAT_DOC = (
    "text = a line per event; json = one JSON object per event (twisted.logger's format, as"
    " eventsFromJSONLogFile reads it), for log shippers. Under twistd only (twist has"
    " --log-format)."
)


def _region(text: str, base: Path) -> str:
    if not (len(text) <= 32 and text.isascii() and all(c.isalnum() or c in "-_." for c in text)):
        raise ParseError
    return text


#: A region name, as offers carry it.
REGION: Parser[str] = Parser(_region, "up to 32 ASCII letters, digits, '-', '_' or '.'")


def fastpath_option() -> FastPathMode:
    """``fastpath``, the same key in ``[server]`` and ``[client]``."""
    return option(
        choice(FastPathMode),
        FastPathMode.AUTO,
        "The stream's per-frame loops: auto = in C when it was built at install (else in"
        " Python, and the log and the status say why), on = C or refuse to start, off ="
        " Python. Same bytes either way; figures: docs/performance.md.",
    )


@dataclass(frozen=True)
class ServerSection:
    """Where the server listens for client streams, and how it keeps them alive."""

    listen: str = option(
        endpoint(tls=False),
        "tcp:8089",
        "Twisted endpoint string to listen on for clients; cellvpn wraps it in TLS.",
    )
    state_dir: Path = option(
        PATH,
        Path("/var/lib/cellvpn"),
        "Folder for the server's state: ledger, saved usage limits, generated certificate.",
    )
    keepalive: float = option(
        seconds(0.1, 3600), 3.0, "Seconds without traffic before a KEEPALIVE frame is sent."
    )
    idle_timeout: float = option(
        seconds(1, 86400), 60.0, "Seconds with nothing received before a stream is closed."
    )
    max_frame: int = option(
        integer(1500, 16 * 1024 * 1024),
        262144,
        "Largest frame payload accepted, in bytes; a bigger frame closes the stream.",
    )
    congestion: str | None = option(
        CONGESTION,
        "auto",
        "TCP congestion control for what the server sends to clients; auto = bbr on paths"
        " whose handshake RTT is congestion_lan_rtt or more (it keeps its rate under random"
        " loss), cubic on shorter ones (it carries more on a clean LAN); system = the"
        " kernel's default. Figures: docs/performance.md.",
    )
    congestion_lan_rtt: float = option(
        seconds(0, 10),
        0.001,
        "Handshake RTT in seconds below which auto takes a path for a LAN (cubic); 0 = bbr on"
        " every path.",
    )
    fastpath: FastPathMode = fastpath_option()
    source_prefix_v4: int = option(
        integer(8, 32),
        24,
        "Prefix length that makes IPv4 client addresses one source, for budgets that keys "
        "alone cannot hold (grace); 32 = every address on its own.",
    )
    source_prefix_v6: int = option(
        integer(16, 128),
        64,
        "Prefix length that makes IPv6 client addresses one source (as source_prefix_v4).",
    )
    log_level: LogLevelName = option(choice(LogLevelName), LogLevelName.INFO, _LOG_LEVEL_DOC)
    log_format: LogFormat = option(choice(LogFormat), LogFormat.TEXT, _LOG_FORMAT_DOC)
    public: HostPort | None = option(
        optional(HOST_PORT),
        None,
        "host:port at which clients reach this server, written into the client files that"
        " cellvpn-ctl client add makes; empty = the listen address and port, if it names one."
        " With a price, the server also publishes it in its offer (docs/fleet.md).",
    )
    region: str = option(
        REGION,
        "",
        "Region this server's offer names (clients may prefer one); empty = none.",
    )
    capacity: int = option(
        integer(0),
        0,
        "Sessions this server's offer says it takes; 0 = the size of its address pool.",
    )
    offer_interval: float = option(
        seconds(1, 3600),
        30.0,
        "Seconds between renewals of this server's offer in the ledger; an offer not renewed"
        " for 3 intervals is Not available, and clients stop choosing it.",
    )

    checks: ClassVar[tuple[Check, ...]] = (
        Check(("keepalive", "idle_timeout"), _idle_after_keepalive),
    )


class ClientAccess(StrEnum):
    """Who may open a session: clients with a certificate of the server's CA, or anyone."""

    ENROLLED = "enrolled"
    ANY = "any"


class RegistryPlace(StrEnum):
    """Where the enrolled clients and their revocations are kept."""

    FILE = "file"
    LEDGER = "ledger"


@dataclass(frozen=True)
class TLSServerSection:
    """The server's TLS identity, and whether clients must present certificates."""

    certificate: Path | None = option(
        _OPTIONAL_PATH,
        None,
        "PEM certificate (chain) of the server; empty = one generated in state_dir on first start.",
    )
    private_key: Path | None = option(
        _OPTIONAL_PATH, None, "PEM private key of certificate; set both or neither."
    )
    clients: ClientAccess = option(
        choice(ClientAccess),
        ClientAccess.ENROLLED,
        "Who may connect: enrolled = only clients with a certificate signed by the server's CA"
        " (cellvpn-ctl client add) or by client_ca, checked during the TLS handshake; any ="
        " anyone who reaches the port (then allow_free_srv and [billing] price decide who is"
        " served).",
    )
    client_ca: Path | None = option(
        _OPTIONAL_PATH,
        None,
        "PEM CA certificates whose client certificates are accepted too (clients = enrolled).",
    )
    names: tuple[str, ...] = option(
        list_of(NAME, "DNS names and IP addresses"),
        (),
        "Names for the generated certificate; empty = the host name plus the listen address"
        " when the endpoint names one, else every address of the host.",
    )
    registry: RegistryPlace = option(
        choice(RegistryPlace),
        RegistryPlace.FILE,
        "Where enrolled clients and revocations are kept: file = state_dir/clients.json; ledger"
        " = the [ledger] the servers of a fleet share, so an enrollment or a revocation made on"
        " one holds on all (docs/fleet.md).",
    )
    registry_refresh: float = option(
        seconds(1, 3600),
        10.0,
        "Seconds between reads of the fleet's clients from the ledger (registry = ledger): a"
        " revocation made on another server holds here at most this much later.",
    )

    checks: ClassVar[tuple[Check, ...]] = (both_or_neither("certificate", "private_key"),)


class Offload(StrEnum):
    """Whether a stream carries large packets (offload) instead of MTU-sized ones."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


def _network_of_mask(address: IPv4Address, mask: IPv4Address) -> str | None:
    network = IPv4Network(f"{address}/{mask}", strict=False)
    if network.network_address != address:
        return (
            f"expected network_address to be the network of network_mask"
            f" ({network.network_address}): it has host bits set"
        )
    return None


def _network6_fits(mask: IPv4Address, network6: IPv6Network | None) -> str | None:
    if network6 is None:
        return None
    pool = IPv4Network(f"0.0.0.0/{mask}")
    if network6.num_addresses < pool.num_addresses:
        return (
            f"expected network6 to have as many addresses as the IPv4 pool (/{pool.prefixlen}):"
            f" at most /{128 - (32 - pool.prefixlen)}"
        )
    return None


@dataclass(frozen=True)
class SrvVpnSection:
    """The VPN service: address pool, TUN device, payment and the optional proxy."""

    enabled: bool = option(BOOL, True, "Run the VPN service.")
    network_address: IPv4Address = option(
        IPV4,
        IPv4Address("10.11.12.0"),
        "Network of the client address pool; the server's TUN takes its first address.",
    )
    network_mask: IPv4Address = option(
        netmask(8, 30), IPv4Address("255.255.255.0"), "Netmask of the client address pool."
    )
    tun_name: str | None = option(
        optional(IFNAME), None, "Name of the TUN device; empty = the kernel chooses."
    )
    mtu: int = option(
        integer(576, 65535), 1400, "MTU of the TUN device; TCP MSS is clamped to fit it."
    )
    allow_free_srv: bool = option(BOOL, True, "Serve clients free of charge when no price applies.")
    grace_period: int = option(
        integer(1, 86400),
        60,
        "Seconds of service before a payment must show up; a client that never pays is banned"
        " for 50 times this.",
    )
    dns: tuple[IPv4Address | IPv6Address, ...] = option(
        _IP_LIST,
        (),
        "DNS servers offered to clients; IPv6 ones only to clients that get an IPv6 address;"
        " empty = none offered.",
    )
    isolate_clients: bool = option(BOOL, False, "Drop packets from one client to another.")
    rate_up: int = option(
        BITRATE,
        0,
        "Most a session may send through the tunnel (client to server), in bits per second; 0 ="
        " no limit. Packets past it (and its burst) are dropped and counted.",
    )
    rate_down: int = option(
        BITRATE,
        0,
        "Most the tunnel carries to one session (server to client), in bits per second; 0 = no"
        " limit.",
    )
    rate_burst: int = option(
        integer(1500, 1 << 30),
        262144,
        "Bytes a limited session may send at once above its rate (the token bucket's size).",
    )
    routes: tuple[IPv4Network | IPv6Network, ...] = option(
        _ROUTE_LIST,
        (),
        "Networks behind this server offered to clients in ADDR_REPLY (a client takes them"
        " only with [client] accept_routes and when its route policy agrees; IPv6 ones only"
        " to clients that get an IPv6 address); empty = none.",
    )
    network6: IPv6Network | None = option(
        _IPV6_POOL,
        None,
        "IPv6 network beside the IPv4 pool (dual stack): each client also leases one address"
        " of it, the one at its IPv4 address's offset, and the TUN takes network6 + 1; empty ="
        " IPv4 only.",
    )
    to_host: tuple[str, ...] = option(
        _TO_HOST,
        ("icmp", "dns"),
        "What clients may reach on this host itself through the TUN (the gateway and every other"
        " address of the host): icmp (echo), dns (port 53 on the addresses in dns), tcp:PORT,"
        " udp:PORT, all, none. The rest is dropped and counted.",
    )
    sessions_per_key: int = option(
        integer(0, 1 << 20),
        0,
        "Most sessions one client key may hold at once (the wallet key with billing, else the"
        " enrolled client certificate); the next is refused with ERROR TOO_MANY_SESSIONS"
        " (0x700). A reconnect with its resume token replaces its old session and is not"
        " counted. 0 = unlimited; SIGHUP applies a change to the next sessions.",
    )
    lease_hold: float = option(
        seconds(0, 86400),
        300.0,
        "Seconds a released address stays reserved for the same client to reconnect.",
    )
    proxy: bool = option(
        BOOL, False, "Let clients open TCP connections through the server (CONNECT/SEND)."
    )
    proxy_allow: tuple[IPNetwork, ...] = option(
        _NETWORK_LIST,
        (),
        "Networks the proxy may connect to, even private, special-purpose or this host's own;"
        " empty = any public address not denied.",
    )
    proxy_deny: tuple[IPNetwork, ...] = option(
        _NETWORK_LIST, (), "Networks the proxy never connects to, even when allowed."
    )
    offload: Offload = option(
        choice(Offload),
        Offload.AUTO,
        "Large-packet offload: auto = when the host and the client support it, on = require it,"
        " off = never.",
    )
    workers: int = option(
        integer(1, 1),
        1,
        "Packet-forwarding processes; one process serves every session here (see"
        " docs/performance.md for why), so 1 is the only value.",
    )
    session_up: Path | None = option(
        _HOOK,
        None,
        "Executable run when a session gets its address (CELLVPN_* variables, see Hooks in"
        " docs/operations.md); its failure is only logged. Empty = none; SIGHUP applies a change.",
    )
    session_down: Path | None = option(
        _HOOK,
        None,
        "Executable run when a session that had an address ends (with its byte counts); its"
        " failure is only logged. Empty = none; SIGHUP applies a change.",
    )
    hook_timeout: float = option(
        seconds(0.1, 3600), 10.0, "Seconds a session hook may run before it is killed."
    )

    checks: ClassVar[tuple[Check, ...]] = (
        Check(("network_address", "network_mask"), _network_of_mask),
        Check(("network_mask", "network6"), _network6_fits),
    )

    @property
    def network(self) -> IPv4Network:
        """The client address pool as a network."""
        return IPv4Network(f"{self.network_address}/{self.network_mask}")


@dataclass(frozen=True)
class ControlSection:
    """The local control socket that cellvpn-ctl talks to."""

    socket: Path = option(PATH, Path("/run/cellvpn/server.sock"), "Unix socket for cellvpn-ctl.")


@dataclass(frozen=True)
class ClientControlSection(ControlSection):
    """The local control socket that cellvpn-ctl talks to (the client's own)."""

    socket: Path = option(PATH, Path("/run/cellvpn/client.sock"), "Unix socket for cellvpn-ctl.")


@dataclass(frozen=True)
class MetricsSection:
    """The Prometheus metrics listener."""

    listen: str | None = option(
        optional(endpoint(tls=True)),
        None,
        "Twisted endpoint string to serve metrics on over HTTP; empty = off.",
    )


@dataclass(frozen=True)
class ServerMetricsSection(MetricsSection):
    """The Prometheus metrics listener, and which series it has."""

    per_client: bool = option(
        BOOL,
        False,
        "Series per client too (traffic and live sessions, labelled client = the enrolled name"
        " or (anonymous)); off: only totals, whatever the number of clients.",
    )
    per_client_limit: int = option(
        integer(1, 10000),
        100,
        "Most client names with series of their own (per_client); sessions of clients past it"
        " are counted under client = (other).",
    )


@dataclass(frozen=True)
class ClientSection:
    """Which server to use, how to trust it, and what the tunnel does on this host."""

    server: HostPort | None = option(
        optional(HOST_PORT),
        None,
        "Server to connect to, as host:port (an IPv6 address in brackets: [2001:db8::1]:8089).",
    )
    server_name: str | None = option(
        optional(NAME),
        None,
        "Name or IP address to check in the server's certificate; empty = the host of server.",
    )
    servers: tuple[HostPort, ...] = option(
        list_of(HOST_PORT, "host:port addresses"),
        (),
        "More servers of the same provider (a fleet), as host:port, comma-separated: with"
        " server, the client picks by round-trip time and price and moves to the next when one"
        " is lost (reconnect_budget). The same trust (ca, server_key) must hold for each.",
    )
    learn_servers: bool = option(
        BOOL,
        True,
        "Also choose among the servers the provider's signed offers name (asked for over 'R'"
        " once served, kept in state_dir/orders.json; never taken from anyone but the provider).",
    )
    reconnect_budget: int = option(
        integer(1, 1000),
        3,
        "Failed reconnects to one server before the client moves to the next server it knows"
        " (servers, learned offers); its deposit, meter and paid limits go with it.",
    )
    ca: PemSource | None = option(
        _OPTIONAL_PEM,
        None,
        "PEM CA certificates to verify the server with (a file, or the PEM text itself; the"
        " server's state_dir/tls/ca.pem). The client needs this, server_key or fingerprint: it"
        " never falls back to the system's CAs.",
    )
    server_key: str | None = option(
        optional(FINGERPRINT),
        None,
        "SHA-256 of the server's public key (SPKI), pinned instead of a CA; it survives the"
        " server's certificate renewals (the server logs it at start).",
    )
    fingerprint: str | None = option(
        optional(FINGERPRINT),
        None,
        "SHA-256 fingerprint of the server's certificate, pinned instead of a CA; it stops"
        " matching when the server renews its certificate (prefer server_key).",
    )
    certificate: PemSource | None = option(
        _OPTIONAL_PEM,
        None,
        "PEM client certificate for servers that require one (a file, or the PEM text itself);"
        " set with private_key.",
    )
    private_key: PemSource | None = option(
        _OPTIONAL_PEM,
        None,
        "PEM private key of certificate (a file, or the PEM text itself); set both or neither.",
    )
    vpn: bool = option(
        BOOL,
        True,
        "Create the TUN and routes; false for a SOCKS-only client that needs no root or TUN.",
    )
    tun_name: str | None = option(
        optional(IFNAME), None, "Name of the TUN device; empty = the kernel chooses."
    )
    offload: Offload = option(
        choice(Offload),
        Offload.AUTO,
        "Large-packet offload: auto = offer it and use it when the server agrees and the TUN"
        " supports it, on = the same, off = never offer it.",
    )
    default_route: bool = option(
        BOOL, True, "Send all traffic through the tunnel (the server stays reachable directly)."
    )
    ipv6: bool = option(
        BOOL,
        True,
        "Take an IPv6 address into the tunnel when the server offers one (dual stack); false ="
        " IPv4 only, with IPv6 blackholed while default_route sends all traffic through the"
        " tunnel.",
    )
    routes: tuple[IPv4Network | IPv6Network, ...] = option(
        _ROUTE_LIST,
        (),
        "Networks that go through the tunnel besides the overlay (a split tunnel with"
        " default_route = false); a route that holds the server gets a host route around it."
        " IPv6 ones only when the server gives an IPv6 address.",
    )
    exclude: tuple[IPv4Network | IPv6Network, ...] = option(
        _ROUTE_LIST,
        (),
        "Networks that never go through the tunnel: routed the way the host routes them before"
        " the tunnel is up, more specific than default_route's halves and than wider routes.",
    )
    accept_routes: bool = option(
        BOOL,
        False,
        "Take the networks the server offers (its [srv_vpn] routes) into the tunnel; each is"
        " checked like the overlay (no own network, no route of this host, not the server).",
    )
    widest_overlay_prefix: int = option(
        integer(8, 30),
        16,
        "Widest overlay network the client accepts from the server, as a prefix length: 16 ="
        " netmasks 255.255.0.0 and narrower. A wider netmask is refused (so is an address that"
        " overlaps this host's own networks or routes, or whose network holds the server), the"
        " reason shown in the status, and the client tries again later.",
    )
    kill_switch: bool = option(
        BOOL, False, "Block traffic outside the tunnel while the tunnel is down."
    )
    reconnect: bool = option(
        BOOL, True, "Reconnect with back-off when the connection is lost, keeping the address."
    )
    keepalive: float = option(seconds(0.1, 3600), 3.0, "Seconds between PINGs to the server.")
    congestion: str | None = option(
        CONGESTION,
        "auto",
        "TCP congestion control for what the client sends to the server; auto = bbr on paths"
        " whose handshake RTT is congestion_lan_rtt or more, cubic on shorter ones; system ="
        " the kernel's default. Figures: docs/performance.md.",
    )
    congestion_lan_rtt: float = option(
        seconds(0, 10),
        0.001,
        "Handshake RTT in seconds below which auto takes a path for a LAN (cubic); 0 = bbr on"
        " every path.",
    )
    fastpath: FastPathMode = fastpath_option()
    dns: tuple[IPv4Address | IPv6Address, ...] = option(
        _IP_LIST, (), "DNS servers to use while connected; empty = the ones the server offers."
    )
    socks: str | None = option(
        optional(endpoint(tls=False)),
        None,
        "Twisted endpoint string for a local SOCKS proxy into the tunnel; empty = off.",
    )
    state_dir: Path = option(
        PATH, Path("/var/lib/cellvpn-client"), "Folder for the client's state."
    )
    log_level: LogLevelName = option(choice(LogLevelName), LogLevelName.INFO, _LOG_LEVEL_DOC)
    up: Path | None = option(
        _HOOK,
        None,
        "Executable run each time the tunnel is configured (address, routes, DNS), with the"
        " session's facts in CELLVPN_* variables (see Hooks in docs/operations.md); empty ="
        " none. SIGHUP applies a change.",
    )
    down: Path | None = option(
        _HOOK,
        None,
        "Executable run when the tunnel that up saw goes down (stop, giving up, a lost link"
        " that takes the tunnel routes down, a new address); empty = none. SIGHUP applies a"
        " change.",
    )
    up_required: bool = option(
        BOOL,
        False,
        "A failing or timed-out up hook stops the client (tunnel taken down, STOPPED, no"
        " retry); false = its failure is only logged.",
    )
    hook_timeout: float = option(
        seconds(0.1, 3600), 10.0, "Seconds an up or down hook may run before it is killed."
    )
    log_format: LogFormat = option(choice(LogFormat), LogFormat.TEXT, _LOG_FORMAT_DOC)

    checks: ClassVar[tuple[Check, ...]] = (
        Check(("ca", "server_key", "fingerprint"), _one_trust),
        both_or_neither("certificate", "private_key"),
    )

    @property
    def expected_name(self) -> str | None:
        """The name the server's certificate must match: server_name, else the server's host."""
        if self.server_name is not None:
            return self.server_name
        return None if self.server is None else self.server.host


@dataclass(frozen=True)
class WalletSection:
    """The client's billing account and the deposit it pays from."""

    key: Path | None = option(
        _OPTIONAL_PATH, None, "Ed25519 private key of the account; empty = free service only."
    )
    deposit: str | None = option(
        optional(HEX64), None, "Id of the deposit to pay from (64 hex digits); empty = none."
    )
    deposit_value: int = option(
        integer(0), 0, "Value to lock when creating a deposit; 0 = do not create one."
    )
    max_unit_price: int = option(
        integer(0), 0, "Highest price per unit the client accepts; 0 = free service only."
    )
    sign_tolerance_percent: int = option(
        integer(0, 100),
        10,
        "How far (percent of a receipt's units) the server's count may run ahead of the "
        "client's before the client refuses to sign the next receipt.",
    )
    sign_tolerance_bytes: int = option(
        integer(0),
        65536,
        "Bytes the server's count may run ahead of the client's, on top of the percentage.",
    )
    sign_tolerance_seconds: float = option(
        seconds(0, 3600),
        2.0,
        "Seconds the server's clock may run ahead of the client's, on top of the percentage.",
    )
    max_refusals: int = option(
        integer(1, 100),
        3,
        "Receipts refused in a row (asked for too early) before the client drops the session "
        "and connects again.",
    )


def _token(text: str, base: Path) -> str:
    if not (1 <= len(text) <= 10 and text.isascii() and text.isalnum()):
        raise ParseError
    return text


#: A token ticker, as orders carry it.
TOKEN: Parser[str] = Parser(_token, "a ticker of 1 to 10 ASCII letters or digits")


def _ledger_url(text: str, base: Path) -> str:
    if text.startswith(("sqlite:////", "postgresql://", "postgres://")):
        return text
    if text.startswith("sqlite:") and not text.startswith("sqlite:/") and len(text) > 7:
        return "sqlite:///" + str((base / text[7:]).resolve())
    raise ParseError


#: Where the ledger is; a relative sqlite path starts at the config file's folder; a
#: postgresql:// URL names a PostgreSQL database (libpq's URI syntax).
LEDGER_URL: Parser[str] = Parser(
    _ledger_url,
    "sqlite:////absolute/path, sqlite:path/relative/to/this/file or postgresql://user@host/db",
)


class PriceUnit(StrEnum):
    """What a receipt pays for: seconds of service or bytes carried."""

    SEC = "SEC"
    B = "B"


@dataclass(frozen=True)
class BillingSection:
    """The provider's key and price; without a price the service is free (allow_free_srv)."""

    key: Path | None = option(
        _OPTIONAL_PATH,
        None,
        "Ed25519 provider key that signs orders and receipts; empty = state_dir/provider.key,"
        " created on first start.",
    )
    price: int = option(integer(0), 0, "Price in datoshi for `units` units; 0 = no paid service.")
    price_unit: PriceUnit = option(choice(PriceUnit), PriceUnit.SEC, "Unit of the price: SEC or B.")
    units: int = option(
        integer(1), 3600, "Units one receipt pays for (seconds, or bytes of IP traffic)."
    )
    token: str = option(TOKEN, "CELL", "Token ticker of the price.")
    grace_per_address: int = option(
        integer(0, 1000),
        2,
        "Concurrent grace sessions allowed per client IP address (unknown deposits).",
    )
    receipt_timeout: float = option(
        seconds(0.5, 600), 10.0, "Seconds to wait for a signed receipt before asking again."
    )
    receipt_attempts: int = option(integer(1, 100), 3, "Times a receipt is asked for.")
    save_interval: float = option(
        seconds(1, 3600), 60.0, "Seconds between saves of the remaining limits."
    )
    mark_ttl: float = option(
        seconds(10, 86400),
        300.0,
        "Seconds a deposit's in-use mark holds without renewal (renewed every save_interval): "
        "after it, another server may take the deposit over and its owner may close it.",
    )
    redeem_credit_bytes: int = option(
        integer(0),
        1048576,
        "Bytes a session may carry beyond its paid units while its next receipt is being "
        "redeemed; then traffic waits for the ledger (B).",
    )
    redeem_credit_seconds: float = option(
        seconds(0, 60),
        2.0,
        "Seconds of service beyond the paid units while the next receipt is being redeemed (SEC).",
    )
    grace_budget_seconds: float = option(
        seconds(0, 86400),
        120.0,
        "Seconds of grace one client key, and one source prefix, may use per grace_window.",
    )
    grace_budget_bytes: int = option(
        integer(0),
        64 * 1048576,
        "Bytes of grace one client key, and one source prefix, may use per grace_window.",
    )
    grace_window: float = option(
        seconds(60, 7 * 86400), 86400.0, "Seconds over which the grace budget is counted."
    )
    grace_bytes: int = option(
        integer(0),
        16 * 1048576,
        "Bytes one grace session may carry before traffic waits for the first receipt.",
    )
    deposit_bytes: int = option(
        integer(0),
        0,
        "Most bytes (IP both ways and L4 proxy) one deposit may carry on this server, over all"
        " its sessions since the server started; at it the session is stopped with ERROR"
        " DEPOSIT_BYTES_CAP (0x701), checked every second and at each receipt. 0 = no cap.",
    )


@dataclass(frozen=True)
class EdgeSection:
    """Limits on what anyone who can reach the port may make the server do before paying."""

    handshake_timeout: float = option(
        seconds(1, 600), 10.0, "Seconds a new connection has to finish its TLS handshake."
    )
    request_timeout: float = option(
        seconds(1, 3600),
        30.0,
        "Seconds after WELCOME within which a session must send REQUEST (a CHECK in progress "
        "counts as activity); sessions that never ask for service are closed.",
    )
    max_streams: int = option(integer(1), 10000, "Streams (TCP connections) at once, in total.")
    max_streams_per_source: int = option(
        integer(1),
        256,
        "Streams at once from one source prefix ([server] source_prefix_v4 / _v6).",
    )
    max_handshakes_per_source: int = option(
        integer(1), 32, "TLS handshakes in flight at once from one source prefix."
    )
    connect_rate: float = option(
        number(0.01, 1000000),
        20.0,
        "New connections per second from one source prefix (a token bucket of connect_burst).",
    )
    connect_burst: int = option(
        integer(1), 40, "New connections one source prefix may open at once before the rate holds."
    )
    output_high: int = option(
        integer(2 * 1048576),
        4 * 1048576,
        "Bytes a stream may hold unsent before the server stops reading from that client.",
    )
    output_limit: int = option(
        integer(2 * 1048576),
        16 * 1048576,
        "Bytes a stream may hold unsent before the server closes it.",
    )
    check_budget: int = option(
        integer(0),
        1048576,
        "Bytes of CHECK traffic (asked and answered) one session may use; past it, it is closed.",
    )
    check_rate: float = option(
        number(0.01, 1000000), 20.0, "CHECK_REQUESTs per second one session may send."
    )
    alives_per_second: float = option(
        number(0.01, 1000), 4.0, "KEEPALIVEs answered per second per stream; the rest are not."
    )
    ledger_queue: int = option(
        integer(16),
        1024,
        "Ledger calls waiting at once; past it new ones are refused as busy (redemptions "
        "always go in, and before the others).",
    )
    proxy_early_data: int = option(
        integer(0),
        1048576,
        "Bytes one session may send to all its still-connecting proxy sockets together.",
    )
    resolver_threads: int = option(integer(1, 64), 4, "Threads for the L4 proxy's name lookups.")
    resolve_timeout: float = option(
        seconds(0.1, 60), 5.0, "Seconds the L4 proxy waits for a name lookup."
    )
    log_interval: float = option(
        seconds(0, 3600),
        10.0,
        "Seconds between log lines about one kind of refusal (the rest are counted).",
    )
    session_lines_per_second: float = option(
        number(0.1, 10000),
        2.0,
        "Log lines a second about sessions that never got service (established, ended), after"
        " a burst of session_lines_burst; the rest are counted and said once per log_interval.",
    )
    session_lines_burst: int = option(
        integer(1, 1_000_000),
        100,
        "Lines about sessions without service that may be written at once.",
    )

    checks: ClassVar[tuple[Check, ...]] = (
        Check(
            ("output_high", "output_limit"),
            lambda high, limit: (
                "expected output_limit at least output_high" if limit < high else None
            ),
        ),
    )


@dataclass(frozen=True)
class LedgerSection:
    """Where accounts, deposits and receipts are kept."""

    url: str | None = option(
        optional(LEDGER_URL),
        None,
        "The ledger's location; empty = state_dir/ledger.db. A free server (no [billing]"
        " price) opens a ledger only when this is set, and books there each free session's"
        " seconds and bytes as usage of kind free when it ends.",
    )


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server reads from its config file, validated."""

    source: Path | None = None
    server: ServerSection = field(default_factory=ServerSection)
    edge: EdgeSection = field(default_factory=EdgeSection)
    tls: TLSServerSection = field(default_factory=TLSServerSection)
    srv_vpn: SrvVpnSection = field(default_factory=SrvVpnSection)
    control: ControlSection = field(default_factory=ControlSection)
    metrics: ServerMetricsSection = field(default_factory=ServerMetricsSection)
    billing: BillingSection = field(default_factory=BillingSection)
    ledger: LedgerSection = field(default_factory=LedgerSection)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClientConfig:
    """Everything the client reads from its config file, validated."""

    source: Path | None = None
    client: ClientSection = field(default_factory=ClientSection)
    control: ClientControlSection = field(default_factory=ClientControlSection)
    wallet: WalletSection = field(default_factory=WalletSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    warnings: tuple[str, ...] = ()


#: The config kinds by the name the example files and the tools use.
KINDS: Mapping[str, type[ServerConfig] | type[ClientConfig]] = {
    "server": ServerConfig,
    "client": ClientConfig,
}

_NOT_SECTIONS = ("source", "warnings")


def sections(config: type[ServerConfig] | type[ClientConfig]) -> dict[str, type]:
    """The ``[section]`` names of a config class and their section classes, in file order."""
    hints = get_type_hints(config)
    return {name: hints[name] for name in config.__dataclass_fields__ if name not in _NOT_SECTIONS}
