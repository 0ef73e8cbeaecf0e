"""Fuzzing the server's sessions on memory transports, free and paid, with a bystander.

A hostile client sets up a session (or does not), then sends scripts of 'R' and 'S' packets
(structure-aware, in reads cut anywhere, now and then damaged at the byte level), raw
frames, time passing and, with the L4 proxy on, destinations that connect, talk and hang
up. Nothing may leave a handler: not an exception, not a traceback in the log. And the
server stays consistent: every packet written to the TUN comes from the leased address of
a session that may send, the other client's session is untouched (its address, route,
usage, counters; it still carries a packet both before and after the hostile one leaves),
counters never go negative, the stream writes only whole frames and nothing once it closed,
and a session that ends leaves the registry, the routes and its lease.
"""

from __future__ import annotations

import atexit
import ipaddress
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from cellvpn.billing.keys import KeyPair
from cellvpn.billing.proof import sign_request
from cellvpn.billing.records import SignedOrder
from cellvpn.conn.protocol import StreamProtocol
from cellvpn.device import vnet
from cellvpn.device.packet import is_ipv4
from cellvpn.server.service import VPNServerService
from cellvpn.server.session import ServerSession
from cellvpn.stream import caps
from cellvpn.stream.connection import Role, StreamConnection, StreamSettings
from cellvpn.wire import vpn
from cellvpn.wire.channel import CHANNEL_R, CHANNEL_S
from cellvpn.wire.errors import DecodeError
from cellvpn.wire.frame import FrameReader, FrameType, encode_frame
from cellvpn.wire.receipt import Receipt, Signature
from cellvpn.wire.service import PacketType, Request
from tests.server.test_billing import fund, paid_server
from tests.server.test_session import ipv4, make_server

from . import inputs
from .harness import LoggedFailures, Reuse, counted, fuzz

_SHM = Path("/dev/shm")
#: Control sockets and ledgers of the servers under test (never bound: no service starts).
TMP = Path(tempfile.mkdtemp(prefix="cellvpn-fuzz-", dir=_SHM if _SHM.is_dir() else None))
atexit.register(shutil.rmtree, TMP, True)

GATEWAY = ipaddress.IPv4Address("198.18.9.1")
BYSTANDER = ipaddress.IPv4Address("198.18.9.2")
#: the hostile client's address, once it asks for one (the bystander took the first)
VICTIM = ipaddress.IPv4Address("198.18.9.3")
SOURCES = inputs.addresses(
    [
        *[VICTIM.packed] * 4,
        BYSTANDER.packed,
        GATEWAY.packed,
        bytes([198, 18, 9, 255]),
        bytes([198, 19, 0, 10]),
    ]
)
#: where the hostile client sends: the internet, the other client, the host, itself
DESTINATIONS = inputs.addresses(
    [
        bytes([198, 19, 0, 10]),
        bytes([93, 184, 215, 14]),
        BYSTANDER.packed,
        BYSTANDER.packed,
        GATEWAY.packed,
        VICTIM.packed,
        bytes([198, 18, 9, 255]),
    ]
)
#: what a proxy destination resolves to: a public address, nothing, a refused one, an error
RESOLVED: list[list[str] | None] = [["93.184.215.14"], [], ["10.1.2.3"], None]  # no traffic


class Peer:
    """A client stream end joined to one server session by a memory transport; it keeps
    what the server sends, undecoded, and checks that it is whole frames."""

    def __init__(
        self, server: VPNServerService, clock: MemoryReactorClock, offered: frozenset[str]
    ) -> None:
        self.conn = StreamConnection(Role.CLIENT, StreamSettings(caps=offered))
        self.r: list[tuple[int, bytes]] = []
        self.s: list[bytes] = []
        self.events: list[Any] = []
        self.conn.register_channel(CHANNEL_R, lambda t, d: self.r.append((t, bytes(d))))
        self.conn.register_channel(CHANNEL_S, lambda t, d: self.s.append(bytes(d)))
        self.session = ServerSession(server)
        self.proto = StreamProtocol(
            StreamConnection(Role.SERVER, server.stream_settings, clock=clock.seconds),
            self.session,
            clock,
            bounds=server.config.edge,
        )
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.2", 4000))
        self.reader = FrameReader()
        #: the server wrote its CLOSE; frames it wrote after that (must stay 0)
        self.closed_frame = False
        self.after_close = 0
        self.proto.makeConnection(self.transport)

    def start(self) -> None:
        self.conn.start()
        self.pump()

    def feed(self, chunks: list[bytes]) -> None:
        """Reads, as TLS delivers them; then what the server answered."""
        for chunk in chunks:
            self.proto.dataReceived(chunk)
            self.pump()

    def send(self, cid: int, ptype: int, body: bytes) -> None:
        self.conn.send_channel(cid, ptype, body)
        self.pump()

    def pump(self) -> None:
        """What this end queued to the server, then the server's answer back, checked."""
        data = self.conn.data_to_send()
        if data:
            self.proto.dataReceived(data)
        out = self.transport.value()
        self.transport.clear()
        if not out:
            return
        try:
            frames = self.reader.feed(out)
        except DecodeError as e:
            raise AssertionError(f"the server wrote a bad frame: {e}") from e
        for ftype, _ in frames:
            if self.closed_frame:
                self.after_close += 1
            self.closed_frame = self.closed_frame or ftype == FrameType.CLOSE
        self.events += self.conn.receive_data(out)

    def recv_packets(self) -> list[bytes]:
        """The IP packets the server sent this client (VPN_RECV), each checked to decode."""
        packets = []
        for body in self.s:
            try:
                packet = vpn.VpnPacket.decode(body)
            except DecodeError as e:
                raise AssertionError(f"the server sent an unreadable 'S' packet: {e}") from e
            if packet.op_code == vpn.OpCode.VPN_RECV:
                packets.append(packet.data)
        return packets

    def lose(self) -> None:
        self.proto.connectionLost(Failure(ConnectionDone()))


@dataclass(frozen=True)
class Variant:
    """How the server runs: offload (none, cut into segments, vnet TUN), the L4 proxy,
    clients isolated from one another."""

    offload: str = "off"
    proxy: bool = False
    isolate: bool = False


variants = st.builds(
    Variant,
    offload=st.sampled_from(["off", "segments", "writev"]),
    proxy=st.booleans(),
    isolate=st.booleans(),
)


class Scene:
    """One server, a bystander with an address, and the hostile client (``victim``)."""

    def __init__(self, variant: Variant, overrides: dict[str, str] | None = None) -> None:
        settings = {
            "srv_vpn.proxy": "true" if variant.proxy else "false",
            "srv_vpn.isolate_clients": "true" if variant.isolate else "false",
            **(overrides or {}),
        }
        self.dir = Path(tempfile.mkdtemp(dir=TMP))
        self.server, self.clock, _ = self.make(self.dir, settings)
        self.setup(variant)

    def make(
        self, folder: Path, settings: dict[str, str]
    ) -> tuple[VPNServerService, MemoryReactorClock, Any]:
        return make_server(folder, **settings)

    def setup(self, variant: Variant) -> None:
        server = self.server
        self.uses = 0
        self.tun: list[tuple[bytes, bytes]] = []
        #: the source the TUN may see now: the victim's lease (the bystander's when it sends)
        self.may_send: ServerSession | None = None
        server.forwarder.tun_write = lambda p: self._tun(vnet.PLAIN, p)
        if variant.offload != "off":
            server.stream_settings = replace(server.stream_settings, caps=caps.KNOWN)
        if variant.offload == "writev":
            server.forwarder.tun_writev = self._tun
        if server.proxy is not None:
            server.proxy.resolve = self._resolve
        self.resolved = 0
        #: the proxy's destinations that connected
        self.connected: list[Any] = []
        self.bystander = Peer(server, self.clock, frozenset({caps.ADDR_OPTIONS}))
        self.bystander.start()
        self.bystander_up()
        self.victim = Peer(server, self.clock, caps.KNOWN)

    def next_victim(self) -> None:
        """Ready for another hostile client, the server and the bystander kept."""
        self.tun.clear()
        self.may_send = None
        self.connected.clear()
        self.clock.tcpClients.clear()
        self.bystander.r.clear()
        self.bystander.s.clear()
        self.victim = Peer(self.server, self.clock, caps.KNOWN)

    def healthy(self) -> bool:
        """The bystander still up with its address, nobody else registered, nothing queued:
        the scene is as a fresh one would be for the next input."""
        b, server = self.bystander, self.server
        session = b.session
        return (
            not session.ended
            and b.proto.conn.closed is None
            and not b.transport.disconnecting
            and session.session_id is not None
            and len(server.sessions) == 1
            and server.pool.owner_of(BYSTANDER) is session
            and server.forwarder.routes.get(BYSTANDER.packed) is session
        )

    def bystander_up(self) -> None:
        b = self.bystander
        b.send(CHANNEL_R, PacketType.REQUEST, Request().encode())
        b.send(CHANNEL_S, vpn.PKT_TYPE_DATA, vpn.VpnPacket(vpn.OpCode.VPN_ADDR_REQUEST).encode())
        assert b.session.address == BYSTANDER

    def _resolve(self, host: str, port: int) -> defer.Deferred[list[str]]:
        answer = RESOLVED[self.resolved % len(RESOLVED)]
        self.resolved += 1
        if answer is None:
            return defer.fail(OSError("no such name"))
        return defer.succeed(answer)

    def _tun(self, header: bytes | memoryview, pkt: bytes | memoryview) -> bool:
        """The TUN: only a whole packet from the leased address of a session that passes."""
        header, pkt = bytes(header), bytes(pkt)
        sender = self.may_send if self.may_send is not None else self.victim.session
        assert sender.passing, "a packet reached the TUN from a session that may not send"
        assert pkt[12:16] == sender.addr_key and sender.addr_key, "a spoofed source"
        assert pkt[0] == 0x45, "a packet with IP options reached the TUN"
        if header == vnet.PLAIN:
            assert is_ipv4(pkt), "a packet that is not one whole IPv4 packet reached the TUN"
        else:
            assert vnet.rebuild_header(header, pkt, 65535) == header
            assert not vnet.is_fragment(pkt)
        self.tun.append((header, pkt))
        return True

    # --- the script ------------------------------------------------------------------------

    def step(self, step: tuple[Any, ...]) -> None:
        kind = step[0]
        victim = self.victim
        if kind == "send":
            _, packets, changes, points = step
            for cid, ptype, body in packets:
                victim.conn.send_channel(cid, ptype, body)
            data = inputs.apply_edits(victim.conn.data_to_send(), changes)
            victim.feed(inputs.split_at(data, points))
        elif kind == "raw":
            victim.feed(step[1])
            # go on numbering after what the raw frames used, or every packet is a replay
            seen = victim.proto.conn.seq.last + 1
            victim.conn._next_seq = max(victim.conn._next_seq, min(seen, 2**63))
        elif kind == "advance":
            self.clock.advance(step[1])
            victim.pump()
            self.bystander.pump()
        elif kind == "request":
            victim.send(CHANNEL_R, PacketType.REQUEST, Request().encode())
        elif kind == "address":
            body = vpn.VpnPacket(vpn.OpCode.VPN_ADDR_REQUEST).encode()
            victim.send(CHANNEL_S, vpn.PKT_TYPE_DATA, body)
        elif kind.startswith("target"):
            self.targets(kind, step[1])

    def targets(self, kind: str, data: bytes) -> None:
        """The proxy's destinations: connect the pending ones, talk, or hang up."""
        if kind == "target-connect":
            while self.clock.tcpClients:
                host, port, factory, _timeout, _bind = self.clock.tcpClients.pop(0)
                attempt = getattr(factory, "_onConnection", None)
                if attempt is not None and attempt.called:
                    continue  # given up (cancelled): a real reactor would not connect it
                proto = factory.buildProtocol(IPv4Address("TCP", host, port))
                assert proto is not None
                proto.makeConnection(StringTransport())
                self.connected.append(proto)
        for proto in list(self.connected):
            if kind == "target-data" and not proto.transport.disconnecting:
                proto.dataReceived(data)
            elif kind == "target-lost":
                self.connected.remove(proto)
                proto.connectionLost(Failure(ConnectionDone()))
        self.victim.pump()

    # --- the checks --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        s = self.bystander.session
        counters = s.counters.as_dict()
        return {
            "state": s.usage.state,
            "address": s.address,
            "from_client": {k: v for k, v in counters.items() if not k.startswith("to_client")},
            "to_client_packets": counters["to_client_packets"],
        }

    def check_bystander(self, before: dict[str, Any]) -> None:
        b, server = self.bystander, self.server
        session = b.session
        b.pump()
        assert not session.ended and session.proto is not None
        assert b.proto.conn.closed is None and not b.transport.disconnecting
        assert session.session_id is not None
        assert server.sessions.get(session.session_id) is session
        assert server.forwarder.routes.get(BYSTANDER.packed) is session
        assert server.pool.owner_of(BYSTANDER) is session
        now = self.snapshot()
        assert {k: now[k] for k in ("state", "address", "from_client")} == {
            k: before[k] for k in ("state", "address", "from_client")
        }, "the hostile client changed the other session"
        got = b.recv_packets()
        assert now["to_client_packets"] - before["to_client_packets"] == len(got)
        for pkt in got:
            assert pkt[12:16] == VICTIM.packed and is_ipv4(pkt), "the other client got a stray"
        b.s.clear()
        # and it still carries a packet out
        self.may_send = session
        packet = ipv4(str(BYSTANDER), "198.19.0.10")
        written = len(self.tun)
        b.send(CHANNEL_S, vpn.PKT_TYPE_DATA, vpn.VpnPacket(vpn.OpCode.VPN_SEND, packet).encode())
        self.may_send = None
        assert len(self.tun) == written + 1 and self.tun[-1][1] == packet
        self.tun.pop()

    def check_victim(self) -> None:
        v, server = self.victim, self.server
        session = v.session
        assert v.after_close == 0, "the server wrote frames after its CLOSE"
        if v.closed_frame:
            assert v.proto.conn.closed is not None
        assert min(session.counters.as_dict().values()) >= 0
        assert session.check_left >= 0 and session.backlog >= 0 and session.pings >= 0
        assert server.forwarder.dropped_malformed >= 0 and server.forwarder.dropped_no_route >= 0
        assert min(server.refusals.counts.values(), default=0) >= 0
        if v.proto.conn.closed is not None:
            assert v.transport.disconnecting or v.proto.lost, "a closed stream disconnects"
        v.lose()
        assert session.ended
        if session.session_id is not None:
            assert server.sessions.get(session.session_id) is None
        assert all(peer is not session for peer in server.forwarder.routes.values())
        assert server.pool.owner_of(VICTIM) is not session
        self.clock.advance(30)  # every timer of the one that left runs out
        self.bystander.pump()

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


#: scenes kept for the next input, by kind and variant (only while ``Reuse.inputs``)
_SCENES: dict[tuple[type[Scene], Variant], Scene] = {}


def on_scene(kind: type[Scene], variant: Variant, body: Callable[[Scene], None]) -> None:
    """``body`` on a scene of ``kind``: a fresh one, or (``Reuse.inputs``) one kept from
    earlier inputs while it is healthy. What fails on a kept scene runs again on a fresh
    one, and only a failure there is the input's own."""
    if not Reuse.inputs:
        scene = kind(variant)
        try:
            body(scene)
        finally:
            scene.close()
        return
    kept = _SCENES.pop((kind, variant), None)
    if kept is not None and (kept.uses >= Reuse.inputs or not kept.healthy()):
        kept.close()
        kept = None
    scene = kept or kind(variant)
    if kept is not None:
        scene.next_victim()
    try:
        body(scene)
    except BaseException:
        scene.close()
        if kept is None:
            raise
        fresh = kind(variant)
        try:
            body(fresh)
        finally:
            fresh.close()
        Reuse.only_after_reuse += 1
        return
    scene.uses += 1
    _SCENES[(kind, variant)] = scene


def free_steps() -> st.SearchStrategy[tuple[Any, ...]]:
    """Script steps: mostly reads of structure-aware packets; now and then raw frames (which
    often end the session), time passing, an honest REQUEST or address request, or the proxy's
    destinations at work."""
    packets = inputs.session_packets(SOURCES, False, DESTINATIONS)
    vpn_only = inputs.s_packets(SOURCES, False, DESTINATIONS).map(lambda p: (CHANNEL_S, *p))
    # most reads carry 'S' packets only, so that a session lives long enough to get far
    batch = inputs.usually(inputs.sized_lists(vpn_only, 1, 12), inputs.sized_lists(packets, 1, 12))
    send = st.tuples(st.just("send"), batch, inputs.edits, inputs.cuts)
    raw = st.tuples(st.just("raw"), inputs.hostile_stream(packets))
    advance = st.tuples(st.just("advance"), st.sampled_from([0.5, 1.0, 3.0, 11.0]))
    honest = st.tuples(st.sampled_from(["address", "address", "request"]))
    targets = st.tuples(
        st.sampled_from(["target-connect", "target-data", "target-lost"]),
        st.binary(min_size=1, max_size=3000),
    )
    kinds = {7: raw, 3: advance, 9: honest, 5: targets, 12: targets, 14: targets}
    return st.integers(0, 15).flatmap(lambda n: kinds.get(n, send))


#: how far the hostile client goes honestly first: the setup, REQUEST, an address
stages = inputs.usually(
    st.just(("request", "address")), st.sampled_from([(), ("request",), ("request", "address")])
)


def run_script(scene: Scene, stage: tuple[str, ...], script: list[tuple[Any, ...]]) -> None:
    with LoggedFailures() as logged:
        before = scene.snapshot()
        scene.victim.start()
        for kind in stage:
            scene.step((kind,))
        elapsed = 0.0
        for step in script:
            if step[0] == "advance":
                if elapsed + step[1] > 50:  # stay inside the bystander's idle timeout
                    continue
                elapsed += step[1]
            scene.step(step)
        scene.check_bystander(before)
        before = scene.snapshot()
        scene.check_victim()
        scene.check_bystander(before)
    logged.check()


@fuzz
@given(
    variant=variants,
    stage=stages,
    script=inputs.sized_lists(free_steps(), 1, 10),
)
@counted
def test_free_server_session(
    variant: Variant, stage: tuple[str, ...], script: list[tuple[Any, ...]]
) -> None:
    """A free server: hostile 'R' and 'S' packets after the setup (and a REQUEST and an
    address, or not)."""
    on_scene(Scene, variant, lambda scene: run_script(scene, stage, script))


class PaidScene(Scene):
    """The same, with billing on a fresh SQLite ledger; both clients funded, the bystander
    paid up before the hostile client starts."""

    def make(
        self, folder: Path, settings: dict[str, str]
    ) -> tuple[VPNServerService, MemoryReactorClock, Any]:
        server, clock, written, ledger, key = paid_server(folder, **settings)
        self.key, self.deposit = key, fund(ledger, key, 1000)
        self.bystander_key = KeyPair.generate()
        self.bystander_deposit = fund(ledger, self.bystander_key, 1000)
        return server, clock, written

    def bystander_up(self) -> None:
        b = self.bystander
        paid_request(b, self.bystander_key, self.bystander_deposit)
        sign_last(b, self.bystander_key)
        b.send(CHANNEL_S, vpn.PKT_TYPE_DATA, vpn.VpnPacket(vpn.OpCode.VPN_ADDR_REQUEST).encode())
        assert b.session.address == BYSTANDER

    def next_victim(self) -> None:
        """As for a free server; the bystander signs what it was asked since, as it would."""
        b = self.bystander
        if any(ptype == PacketType.SIGN_REQUEST for ptype, _ in b.r):
            sign_last(b, self.bystander_key)
        super().next_victim()

    def step(self, step: tuple[Any, ...]) -> None:
        kind = step[0]
        if kind == "paid-request":
            paid_request(self.victim, self.key, self.deposit)
        elif kind in ("sign", "forge"):
            sign_last(self.victim, self.key, forge=kind == "forge")
        elif kind == "request":
            paid_request(self.victim, self.key, self.deposit)
            sign_last(self.victim, self.key)
        else:
            super().step(step)

    def check_bystander(self, before: dict[str, Any]) -> None:
        super().check_bystander(before)
        bill = self.bystander.session.bill
        assert bill is not None and bill.mode == "paid", "the other client's bill changed"


def paid_request(peer: Peer, key: KeyPair, deposit: bytes) -> None:
    """A REQUEST for the server's order from ``deposit``, with the key proof."""
    welcome = peer.conn.welcome
    if welcome is None or peer.conn.closed is not None:
        return
    order = SignedOrder.decode(welcome.order)
    request = Request(tx_cond=deposit, order_hash=order.hash, token=b"CELL")
    peer.send(
        CHANNEL_R, PacketType.REQUEST, sign_request(request, key, welcome.session_id).encode()
    )


def sign_last(peer: Peer, key: KeyPair, forge: bool = False) -> None:
    """Sign the last receipt the server asked for (or forge the signature)."""
    asked = [body for ptype, body in peer.r if ptype == PacketType.SIGN_REQUEST]
    if not asked or peer.conn.closed is not None:
        return
    try:
        receipt = Receipt.decode(asked[-1])
    except DecodeError as e:
        raise AssertionError(f"the server asked to sign an unreadable receipt: {e}") from e
    sig = key.signature(receipt.info_bytes)
    if forge:
        sig = Signature(sig.public_key, bytes([sig.signature[0] ^ 1]) + sig.signature[1:])
    peer.send(CHANNEL_R, PacketType.SIGN_RESPONSE, receipt.with_signature(sig).encode())


def paid_steps() -> st.SearchStrategy[tuple[Any, ...]]:
    """The free server's steps, and now and then a paid REQUEST, or the last receipt asked
    signed (or its signature forged)."""
    billing = st.tuples(st.sampled_from(["paid-request", "sign", "sign", "forge"]))
    return inputs.usually(free_steps(), billing)


@fuzz
@given(
    variant=variants,
    stage=stages,
    script=inputs.sized_lists(paid_steps(), 1, 10),
)
@counted
def test_paid_server_session(
    variant: Variant, stage: tuple[str, ...], script: list[tuple[Any, ...]]
) -> None:
    """A paid server: the same, with receipts asked, signed, forged, replayed and damaged."""
    on_scene(PaidScene, variant, lambda scene: run_script(scene, stage, script))


@fuzz
@given(
    variant=variants,
    chunks=st.one_of(
        st.lists(st.binary(max_size=300), max_size=8),
        st.just([b""]),
        st.tuples(
            inputs.hellos_for_server(), inputs.edits, inputs.cuts, st.binary(max_size=80)
        ).map(
            lambda t: inputs.split_at(
                inputs.apply_edits(encode_frame(FrameType.HELLO, t[0].encode()), t[1]) + t[3], t[2]
            )
        ),
    ),
)
@counted
def test_server_session_before_setup(variant: Variant, chunks: list[bytes]) -> None:
    """Raw bytes, or a damaged HELLO and anything after it, as a connection's first reads:
    the session is registered only after a HELLO it accepted, and leaves when it ends."""

    def body(scene: Scene) -> None:
        with LoggedFailures() as logged:
            before = scene.snapshot()
            v = scene.victim
            v.feed(chunks)
            session = v.session
            if session.session_id is None:
                assert len(scene.server.sessions) == 1
            else:
                assert scene.server.sessions.get(session.session_id) is session
            scene.check_victim()
            scene.check_bystander(before)
        logged.check()

    on_scene(Scene, variant, body)
