"""An attacker for the flood test: one kind of abuse of a cellvpn server's port, for a while.

    python flood.py HOST PORT CA KIND SECONDS [COUNT]

runs KIND against HOST:PORT for SECONDS and prints one JSON line at the end with what it did
(connections opened and failed, bytes and packets sent, errors by kind), so a test can show
what the server withstood. COUNT (default 1000) is how many connections are held at once by
the kinds that hold them. Kinds:

random           TCP connections that send random bytes (no TLS) and close, one after another
silent           connections that never start TLS, held open
tls-stall        connections that send the first bytes of a real ClientHello and stall
hello-only       TLS and HELLO, then nothing, held open
check-flood      TLS, HELLO, WELCOME, then CHECK_REQUESTs asking for the largest answer and
                 KEEPALIVEs, as fast as the server takes them, never reading
keepalive-flood  TLS, then KEEPALIVE frames before HELLO, right behind it, or on the session
                 once the server has answered it; never reading
deposit-flood    TLS, HELLO, WELCOME, then DEPOSIT_CREATE packets (signed by keys with no
                 funds, badly signed, or garbage) and never a REQUEST, never reading

A connection the server ends is opened again (after a short pause, so this tool does not spin)
until SECONDS have passed. Whether the server ended a connection is read from the kernel's TCP
state, so no kind ever has to read what the server sends.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import resource
import secrets
import socket
import ssl
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cellvpn.billing.keys import KeyPair
from cellvpn.billing.records import DEPOSIT_SIZE, DepositRequest, SignedDeposit
from cellvpn.server.check import MAX_CHECK_DATA
from cellvpn.stream.connection import Established, Role, StreamConnection, StreamSettings
from cellvpn.wire.channel import CHANNEL_R, CHANNEL_S
from cellvpn.wire.frame import FrameType, encode_frame
from cellvpn.wire.receipt import Unit
from cellvpn.wire.service import CheckPacket, PacketType

#: Seconds a TCP connect or a TLS handshake may take before it counts as failed.
CONNECT_TIMEOUT = 5.0
#: Seconds a write may block before the connection counts as stalled (the server stopped
#: reading it); a stalled connection is never written to again.
SEND_TIMEOUT = 0.5
#: Pause between rounds of opening connections, and after each short-lived one.
PAUSE = 0.05
#: Connections opened per round at most.
PER_ROUND = 20
#: tcpi_state of a connection both ends still hold (CLOSE_WAIT, CLOSE: the server ended it).
TCP_ESTABLISHED = 1
KEEPALIVE = encode_frame(FrameType.KEEPALIVE)


@dataclass
class Tally:
    """What the tool did, printed as the last line."""

    kind: str
    seconds: float
    connects: int = 0
    connect_failed: int = 0
    tls_ok: int = 0
    tls_failed: int = 0
    welcomed: int = 0
    closed_by_server: int = 0
    held_peak: int = 0
    stalled: int = 0
    bytes_sent: int = 0
    packets_sent: int = 0
    #: how long the connections the server ended had lived
    lifetimes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)

    def error(self, where: str, e: BaseException) -> None:
        self.errors[f"{where}:{_name(e)}"] += 1

    def ended(self, lived: float) -> None:
        self.closed_by_server += 1
        self.lifetimes["<1s" if lived < 1 else "<10s" if lived < 10 else ">=10s"] += 1

    def as_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["lifetimes"] = dict(self.lifetimes)
        out["errors"] = dict(self.errors)
        return out


def _name(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, ssl.SSLError):
        return e.reason or type(e).__name__
    if isinstance(e, OSError) and e.errno in errno.errorcode:
        return errno.errorcode[e.errno]
    return type(e).__name__


class Target:
    """The server's address and TLS settings, and how to open connections to it."""

    def __init__(self, host: str, port: int, ca: str, tally: Tally) -> None:
        self.addr = (host, port)
        self.host = host
        self.tally = tally
        self.ctx = ssl.create_default_context(cafile=ca)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3

    def tcp(self) -> socket.socket | None:
        try:
            sock = socket.create_connection(self.addr, timeout=CONNECT_TIMEOUT)
        except OSError as e:
            self.tally.connect_failed += 1
            self.tally.error("connect", e)
            return None
        self.tally.connects += 1
        return sock

    def tls(self) -> ssl.SSLSocket | None:
        raw = self.tcp()
        if raw is None:
            return None
        try:
            sock = self.ctx.wrap_socket(raw, server_hostname=self.host)
        except OSError as e:  # ssl.SSLError and timeouts are OSErrors too
            raw.close()
            self.tally.tls_failed += 1
            self.tally.error("tls", e)
            return None
        self.tally.tls_ok += 1
        return sock

    def client_hello(self) -> bytes:
        """The first flight of a real handshake with this server, made in memory."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.ctx.wrap_bio(incoming, outgoing, server_hostname=self.host)
        with contextlib.suppress(ssl.SSLWantReadError):  # it waits for the server's answer
            tls.do_handshake()
        return outgoing.read()


def stream() -> StreamConnection:
    conn = StreamConnection(Role.CLIENT, StreamSettings(caps=frozenset({"addr-options"})))
    conn.register_channel(CHANNEL_R, lambda ptype, data: None)
    conn.register_channel(CHANNEL_S, lambda ptype, data: None)
    return conn


def hello(conn: StreamConnection) -> bytes:
    conn.start()
    return conn.data_to_send()


def alive(sock: socket.socket) -> bool:
    """Whether the server still holds the connection, without reading from it."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError:
        return False
    return info[0] == TCP_ESTABLISHED


def send(sock: socket.socket, data: bytes, tally: Tally) -> bool:
    """Write ``data``; False if the connection failed (it is closed then)."""
    try:
        sock.sendall(data)
    except OSError as e:
        tally.error("send", e)
        sock.close()
        return False
    tally.bytes_sent += len(data)
    return True


@dataclass
class Held:
    sock: socket.socket
    opened: float
    conn: StreamConnection | None = None
    #: 0, 1, 2...: which connection of the run this is (kinds vary what they send by it)
    n: int = 0
    stalled: bool = False
    #: not written to before this time
    quiet_until: float = 0.0


class Pool:
    """The connections a kind holds: those the server ended are dropped and replaced."""

    def __init__(self, open_one: Callable[[int], Held | None], count: int, tally: Tally) -> None:
        self.open_one = open_one
        self.count = count
        self.tally = tally
        self.held: list[Held] = []
        self.opened = 0

    def refresh(self, deadline: float) -> list[Held]:
        """Drop what the server ended; open up to PER_ROUND more, up to ``count`` in all."""
        now = time.monotonic()
        kept = []
        for h in self.held:
            if alive(h.sock):
                kept.append(h)
            else:
                h.sock.close()
                self.tally.ended(now - h.opened)
        for _ in range(min(PER_ROUND, self.count - len(kept))):
            if time.monotonic() >= deadline:
                break
            h = self.open_one(self.opened)
            self.opened += 1
            if h is not None:
                kept.append(h)
        self.held = kept
        self.tally.held_peak = max(self.tally.held_peak, len(kept))
        return kept


def hold(
    target: Target, open_one: Callable[[int], Held | None], deadline: float, count: int
) -> list[Held]:
    """Keep up to ``count`` connections open until ``deadline``; reopen what the server ends."""
    pool = Pool(open_one, count, target.tally)
    while time.monotonic() < deadline:
        pool.refresh(deadline)
        time.sleep(PAUSE)
    return pool.held


def write(
    target: Target,
    open_one: Callable[[int], Held | None],
    more: Callable[[Held], bytes],
    deadline: float,
    count: int,
) -> list[Held]:
    """Up to ``count`` connections, each written ``more(h)`` until the server stops reading
    it (a write blocks for SEND_TIMEOUT) or ends it; ended ones are replaced."""
    tally = target.tally
    pool = Pool(open_one, count, tally)
    while time.monotonic() < deadline:
        held = pool.refresh(deadline)
        wrote = False
        for h in held:
            now = time.monotonic()
            if h.stalled or now < h.quiet_until or now >= deadline:
                continue
            data = more(h)
            h.sock.settimeout(SEND_TIMEOUT)
            try:
                h.sock.sendall(data)
            except TimeoutError:
                h.stalled = True
                tally.stalled += 1
                continue
            except OSError as e:
                tally.error("send", e)
                h.stalled = True  # refresh() closes it once the kernel sees the end
                continue
            tally.bytes_sent += len(data)
            wrote = True
        if not wrote:
            time.sleep(PAUSE)
    return pool.held


def welcomed(target: Target, sock: ssl.SSLSocket, conn: StreamConnection) -> bool:
    """Read until WELCOME: the only reading the writers do."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    try:
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                target.tally.error("welcome", EOFError())
                return False
            for event in conn.receive_data(data):
                if isinstance(event, Established):
                    target.tally.welcomed += 1
                    return True
                target.tally.errors[f"welcome:{type(event).__name__}"] += 1
                return False
    except OSError as e:
        target.tally.error("welcome", e)
        return False
    target.tally.error("welcome", TimeoutError())
    return False


def session(target: Target, n: int) -> Held | None:
    """TLS, HELLO and WELCOME: an established session that has sent nothing else."""
    sock = target.tls()
    if sock is None:
        return None
    conn = stream()
    if not send(sock, hello(conn), target.tally) or not welcomed(target, sock, conn):
        sock.close()
        return None
    return Held(sock, time.monotonic(), conn, n)


# --- the kinds --------------------------------------------------------------------------


def flood_random(target: Target, deadline: float, count: int) -> list[Held]:
    tally = target.tally
    while time.monotonic() < deadline:
        sock = target.tcp()
        if sock is not None:
            size = random.randint(1, 16384)
            if send(sock, os.urandom(size), tally):
                if random.random() < 0.5:  # half end with a reset instead of a FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
        time.sleep(PAUSE / 10)
    return []


def flood_silent(target: Target, deadline: float, count: int) -> list[Held]:
    def open_one(n: int) -> Held | None:
        sock = target.tcp()
        return Held(sock, time.monotonic(), n=n) if sock is not None else None

    return hold(target, open_one, deadline, count)


def flood_tls_stall(target: Target, deadline: float, count: int) -> list[Held]:
    first = target.client_hello()

    def open_one(n: int) -> Held | None:
        sock = target.tcp()
        if sock is None:
            return None
        cut = random.randint(1, len(first) - 1)
        return Held(sock, time.monotonic(), n=n) if send(sock, first[:cut], target.tally) else None

    return hold(target, open_one, deadline, count)


def flood_hello_only(target: Target, deadline: float, count: int) -> list[Held]:
    def open_one(n: int) -> Held | None:
        sock = target.tls()
        if sock is None:
            return None
        conn = stream()
        if not send(sock, hello(conn), target.tally):
            return None
        return Held(sock, time.monotonic(), conn, n)

    return hold(target, open_one, deadline, count)


def flood_check(target: Target, deadline: float, count: int) -> list[Held]:
    # the largest answer there is, for the least asked: 10 KiB back per 681 bytes sent
    body = CheckPacket(
        data_size_recv=MAX_CHECK_DATA, data_hash=CheckPacket.hash_of(b""), send_time1=1
    ).encode()

    def more(h: Held) -> bytes:
        assert h.conn is not None
        for _ in range(32):
            h.conn.send_channel(CHANNEL_R, PacketType.CHECK_REQUEST, body)
        target.tally.packets_sent += 32
        return h.conn.data_to_send() + KEEPALIVE * 4

    return write(target, lambda n: session(target, n), more, deadline, count)


def flood_keepalive(target: Target, deadline: float, count: int) -> list[Held]:
    burst = KEEPALIVE * 256

    def open_one(n: int) -> Held | None:
        sock = target.tls()
        if sock is None:
            return None
        conn = stream()
        setup = hello(conn)
        # KEEPALIVEs before HELLO; right behind it, in the same write; or once the server
        # has had time to answer it (a session then)
        first = [KEEPALIVE * 16 + setup, setup + KEEPALIVE * 16, setup][n % 3]
        if not send(sock, first, target.tally):
            return None
        quiet = time.monotonic() + (0.5 if n % 3 == 2 else 0)
        return Held(sock, time.monotonic(), conn, n, quiet_until=quiet)

    def more(h: Held) -> bytes:
        target.tally.packets_sent += 256
        return burst

    return write(target, open_one, more, deadline, count)


def flood_deposit(target: Target, deadline: float, count: int) -> list[Held]:
    keys = [KeyPair.generate() for _ in range(4)]
    bad_signature = secrets.token_bytes(64)

    def body(n: int) -> bytes:
        mode = n % 4
        if mode == 3:  # garbage
            return os.urandom(DEPOSIT_SIZE + 64)
        key = keys[n % len(keys)]
        request = DepositRequest(
            owner=key.public,
            unit=Unit.SEC,
            max_unit_price=1,
            value=random.randint(1, 10**9),
            expires=int(time.time()) + 86400,
            nonce=secrets.token_bytes(16),
        )
        if mode == 2:  # well formed, but signed by no one
            return request.encode() + bad_signature
        return SignedDeposit.sign(request, key).encode()  # a key with no funds

    def more(h: Held) -> bytes:
        assert h.conn is not None
        for _ in range(16):
            h.conn.send_channel(CHANNEL_R, PacketType.DEPOSIT_CREATE, body(h.n))
        target.tally.packets_sent += 16
        return h.conn.data_to_send()

    return write(target, lambda n: session(target, n), more, deadline, count)


KINDS: dict[str, Callable[[Target, float, int], list[Held]]] = {
    "random": flood_random,
    "silent": flood_silent,
    "tls-stall": flood_tls_stall,
    "hello-only": flood_hello_only,
    "check-flood": flood_check,
    "keepalive-flood": flood_keepalive,
    "deposit-flood": flood_deposit,
}


def raise_file_limit() -> None:
    """Held connections are sockets: lift the soft RLIMIT_NOFILE to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str]) -> None:
    if len(argv) not in (5, 6) or argv[3] not in KINDS:
        raise SystemExit(__doc__)
    host, port, ca, kind, seconds = argv[0], int(argv[1]), argv[2], argv[3], float(argv[4])
    count = int(argv[5]) if len(argv) == 6 else 1000
    raise_file_limit()
    tally = Tally(kind, seconds)
    target = Target(host, port, ca, tally)
    held = KINDS[kind](target, time.monotonic() + seconds, count)
    tally.held_peak = max(tally.held_peak, len(held))
    for h in held:
        h.sock.close()
    print(json.dumps(tally.as_json(), sort_keys=True), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
