"""Fuzzing the client against a hostile server, free and paying, on memory transports.

The client is cellvpn's own (``ClientStream`` on ``StreamProtocol``; ``ClientBilling`` with a
state folder when it pays). The server is a stream end that welcomes it and then sends
scripts of 'R' and 'S' packets (structure-aware, in reads cut anywhere, sometimes damaged),
raw frames, receipts an honest server would ask for, and lets time pass while the client
sends traffic. Nothing may leave a handler (no exception, no traceback in the log), and:

- what the client writes is whole frames, nothing after its CLOSE;
- once the stream closed, the client hands no packet to its TUN and no address to its owner;
  it reports its loss once, and leaves no timer running;
- counters never go negative;
- it signs only receipts the server asked for, once each, that its rules allow (the order's
  service, unit and price, within ``max_unit_price``), with its own valid signature;
- a super-packet it would write to the TUN passes the offload check or is dropped.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from cellvpn.billing.keys import KeyPair, create_key, load_key, verify
from cellvpn.billing.records import Order, SignedOrder
from cellvpn.client.billing import ClientBilling
from cellvpn.client.stream import ClientStream
from cellvpn.config.schema import WalletSection
from cellvpn.conn.protocol import StreamProtocol
from cellvpn.device import vnet
from cellvpn.stream import caps
from cellvpn.stream.connection import HelloReceived, Role, StreamConnection, StreamSettings
from cellvpn.wire import vpn
from cellvpn.wire.channel import CHANNEL_R, CHANNEL_S
from cellvpn.wire.errors import DecodeError
from cellvpn.wire.frame import FrameReader, FrameType
from cellvpn.wire.receipt import Receipt, ReceiptInfo, Unit
from cellvpn.wire.service import SRV_UID_VPN, PacketType, Request, Success

from . import inputs
from .harness import LoggedFailures, counted, fuzz

_SHM = Path("/dev/shm")
TMP = Path(tempfile.mkdtemp(prefix="cellvpn-fuzz-", dir=_SHM if _SHM.is_dir() else None))
atexit.register(shutil.rmtree, TMP, True)
KEY_FILE = TMP / "keys" / "client.key"
create_key(KEY_FILE)
CLIENT_KEY = load_key(KEY_FILE)
PROVIDER = KeyPair.from_seed(hashlib.sha3_256(b"cellvpn fuzz provider").digest())
DEPOSIT = hashlib.sha3_256(b"cellvpn fuzz deposit").digest()
MAX_UNIT_PRICE = 2
ORDER = SignedOrder.sign(
    Order(Unit.B, 1_000_000, 60, "CELL", PROVIDER.public, expires=int(time.time()) + 30 * 86400),
    PROVIDER,
)
#: what WELCOME offers: the order, none, one signed by someone else, garbage
ORDERS = [
    ORDER.encode(),
    b"",
    SignedOrder(ORDER.order, bytes(64)).encode(),
    ORDER.encode()[:-1],
]
CLIENT = bytes([198, 18, 9, 2])
SOURCES = inputs.addresses([bytes([198, 19, 0, 10]), CLIENT, bytes([198, 18, 9, 1])])
DESTINATIONS = inputs.addresses([CLIENT, CLIENT, bytes([198, 19, 0, 10])])


class Owner:
    """The client service, as far as a stream sees it; it checks what the stream hands on."""

    def __init__(self, billing: ClientBilling | None) -> None:
        self.billing = billing
        self.stream: ClientStream | None = None
        self.packets = 0
        self.addresses: list[vpn.AddrReply] = []
        self.lost: list[str] = []
        self.refused: list[str] = []
        self.dropped_bad_offload = 0

    def _open(self) -> None:
        stream = self.stream
        assert stream is not None and stream.proto is not None
        assert stream.proto.conn.closed is None, "the stream handed something on after its close"
        assert not self.lost, "the stream handed something on after it was lost"

    def stream_established(self, stream: ClientStream) -> None:
        self._open()

    def stream_address(self, stream: ClientStream, reply: vpn.AddrReply) -> None:
        self._open()
        assert not self.addresses, "a second address on one stream"
        self.addresses.append(reply)

    def stream_granted(self, stream: ClientStream) -> None:
        self._open()

    def stream_refused(self, stream: ClientStream, why: str, permanent: bool) -> None:
        self.refused.append(why)
        stream.close()

    def stream_lost(self, stream: ClientStream, why: str, permanent: bool) -> None:
        assert not self.lost, "the loss of a stream is reported once"
        self.lost.append(why)
        if self.billing is not None:
            self.billing.session_ended(stream)

    def stream_packet(self, packet: memoryview) -> None:
        self._open()
        self.packets += 1

    def stream_packet_gso(self, header_and_packet: memoryview) -> None:
        """What the tunnel does with it (``write_gso``): checked, then cut into segments."""
        self._open()
        header, pkt = header_and_packet[:10], header_and_packet[10:]
        try:
            rebuilt = vnet.rebuild_header(header, pkt, 65535)
            segments = vnet.segment(rebuilt, pkt)
        except vnet.OffloadError:
            self.dropped_bad_offload += 1
            return
        assert all(len(seg) >= 20 and seg[12:20] == bytes(pkt[12:20]) for seg in segments)
        self.packets += len(segments)

    def make_request(self, stream: ClientStream) -> Request | None:
        self.stream = stream
        if self.billing is not None:
            return self.billing.make_request(stream)
        return Request()

    def service_packet(self, stream: ClientStream, ptype: int, data: memoryview) -> bool:
        if self.billing is not None:
            return self.billing.service_packet(stream, ptype, data)
        return False

    def proxy_packet(self, stream: ClientStream, packet: vpn.VpnPacket) -> None:
        self._open()


class Server:
    """The hostile server's end of the stream, and the client's on the other side of it."""

    def __init__(self, paying: bool, offered: frozenset[str], want_address: bool) -> None:
        self.dir = Path(tempfile.mkdtemp(dir=TMP))
        self.clock = Clock()
        self.clock.advance(1000)
        billing = None
        if paying:
            wallet = WalletSection(
                key=KEY_FILE, deposit=DEPOSIT.hex(), max_unit_price=MAX_UNIT_PRICE
            )
            billing = ClientBilling(wallet, self.dir / "state", self.clock)
        self.billing = billing
        self.owner = Owner(billing)
        self.stream = ClientStream(self.clock, 30.0, self.owner, want_address=want_address)
        self.owner.stream = self.stream
        settings = StreamSettings(caps=offered)
        self.proto = StreamProtocol(
            StreamConnection(Role.CLIENT, settings, clock=self.clock.seconds),
            self.stream,
            self.clock,
        )
        self.conn = StreamConnection(
            Role.SERVER, StreamSettings(caps=caps.KNOWN), clock=self.clock.seconds
        )
        self.r: list[tuple[int, bytes]] = []
        self.s: list[bytes] = []
        self.conn.register_channel(CHANNEL_R, lambda t, d: self.r.append((t, bytes(d))))
        self.conn.register_channel(CHANNEL_S, lambda t, d: self.s.append(bytes(d)))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 8089))
        self.reader = FrameReader()
        self.closed_frame = False
        self.after_close = 0
        #: the 'R' packets the client was handed
        self.received_r: list[tuple[int, bytes]] = []

    def welcome(self, session_id: int, order: bytes, agreed: frozenset[str]) -> None:
        self.proto.makeConnection(self.transport)
        # keep every 'R' packet the client is handed (the receipts it was asked to sign)
        handler = self.stream._on_service_packet

        def seen(ptype: int, data: memoryview) -> None:
            self.received_r.append((ptype, bytes(data)))
            handler(ptype, data)

        self.proto.conn.register_channel(CHANNEL_R, seen)
        for event in self.conn.receive_data(self.written()):
            if isinstance(event, HelloReceived) and self.conn.closed is None:
                self.conn.caps = event.caps & agreed
                self.conn.accept(session_id, order=order)
        self.deliver([self.conn.data_to_send()])

    def written(self) -> bytes:
        """What the client wrote since the last look, checked to be whole frames."""
        out = bytes(self.transport.value())
        self.transport.clear()
        try:
            frames = self.reader.feed(out)
        except DecodeError as e:
            raise AssertionError(f"the client wrote a bad frame: {e}") from e
        for ftype, _ in frames:
            if self.closed_frame:
                self.after_close += 1
            self.closed_frame = self.closed_frame or ftype == FrameType.CLOSE
        return out

    def deliver(self, chunks: list[bytes]) -> None:
        """Reads into the client, then what it answered back into the server's end."""
        for chunk in chunks:
            if chunk and not self.owner.lost:
                self.proto.dataReceived(chunk)
            answer = self.written()
            if answer and self.conn.closed is None:
                self.conn.receive_data(answer)

    def send(self, packets: list[tuple[int, int, bytes]], changes: Any, points: Any) -> None:
        if self.conn.closed is not None:
            return
        for cid, ptype, body in packets:
            self.conn.send_channel(cid, ptype, body)
        data = inputs.apply_edits(self.conn.data_to_send(), changes)
        self.deliver(inputs.split_at(data, points))

    # --- an honest server's part, for the paying client -----------------------------------

    def signed(self) -> list[Receipt]:
        """The receipts the client signed and sent back."""
        return [Receipt.decode(b) for t, b in self.r if t == PacketType.SIGN_RESPONSE]

    def ask(self, units: int, value: int, prev: str) -> None:
        """SIGN_REQUEST as an honest server would, after the deposit or the last receipt."""
        signed = self.signed()
        previous = signed[-1].hash if prev == "last" and signed else DEPOSIT
        if prev == "other":
            previous = hashlib.sha3_256(previous).digest()
        info = ReceiptInfo(SRV_UID_VPN, Unit.B, units, value, previous, addition=len(self.r))
        receipt = Receipt(info, (PROVIDER.signature(info.encode()),))
        self.send([(CHANNEL_R, PacketType.SIGN_REQUEST, receipt.encode())], [], [])

    def success(self) -> None:
        self.send([(CHANNEL_R, PacketType.SUCCESS, Success(7).encode())], [], [])

    def traffic(self, count: int, size: int) -> None:
        packet = inputs.ipv4(CLIENT, bytes([198, 19, 0, 10]), 17, bytes(size))
        self.stream.send_packets([packet] * count)
        self.deliver([b""])

    def vnet_reads(self, reads: list[tuple[bytes, bytes]]) -> None:
        self.stream.send_vnet_packets([h + p for h, p in reads])
        self.deliver([b""])

    # --- the checks --------------------------------------------------------------------------

    def check(self) -> None:
        stream = self.stream
        assert self.after_close == 0, "the client wrote frames after its CLOSE"
        numbers = (
            stream.received_packets,
            stream.received_bytes,
            stream.sent_packets,
            stream.sent_bytes,
            stream.proxy_bytes,
            stream.outstanding_pings,
            stream.pongs_received,
            self.owner.packets,
        )
        assert min(numbers) >= 0
        if self.billing is not None:
            self.check_receipts()
        self.proto.connectionLost(Failure(ConnectionDone()))
        assert len(self.owner.lost) == 1, "the loss of a stream is reported once"
        self.clock.advance(120)
        running = [call for call in self.clock.getDelayedCalls() if call.active()]
        assert running == [], f"timers left running after the stream ended: {running}"

    def check_receipts(self) -> None:
        """Every receipt the client signed was asked for, once, and is one its rules allow."""
        asked = set()
        for ptype, body in self.received_r:
            if ptype == PacketType.SIGN_REQUEST:
                with contextlib.suppress(DecodeError):
                    asked.add(Receipt.decode(body).info_bytes)
        seen: set[bytes] = set()
        signed = self.signed()
        for receipt in signed:
            info = receipt.info
            assert receipt.info_bytes in asked, "the client signed a receipt nobody asked for"
            assert receipt.info_bytes not in seen, "the client signed one receipt twice"
            seen.add(receipt.info_bytes)
            order = ORDER.order
            assert info.srv_uid == SRV_UID_VPN and info.units_type == order.unit
            assert 0 < info.units <= order.units
            assert info.value <= info.units * MAX_UNIT_PRICE
            assert info.value * order.units <= order.price * info.units
            assert info.prev_hash == DEPOSIT or info.prev_hash in {r.hash for r in signed}, (
                "the client signed a receipt off its chain"
            )
            mine = receipt.signatures[1]
            assert mine.public_key == CLIENT_KEY.public
            assert verify(CLIENT_KEY.public, mine.signature, receipt.info_bytes)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def steps(paying: bool) -> st.SearchStrategy[tuple[Any, ...]]:
    """Script steps: mostly reads of structure-aware packets, 'S' only or with 'R' ones;
    now and then raw frames, time passing, client traffic, and (paying) receipts asked and
    answered as an honest server would."""
    packets = inputs.session_packets(SOURCES, True, DESTINATIONS)
    vpn_only = inputs.s_packets(SOURCES, True, DESTINATIONS).map(lambda p: (CHANNEL_S, *p))
    batch = inputs.usually(inputs.sized_lists(vpn_only, 1, 10), inputs.sized_lists(packets, 1, 10))
    send = st.tuples(st.just("send"), batch, inputs.edits, inputs.cuts)
    raw = st.tuples(st.just("raw"), inputs.hostile_stream(packets))
    advance = st.tuples(st.just("advance"), st.sampled_from([0.5, 3.0, 10.0, 31.0, 95.0]))
    traffic = st.tuples(
        st.just("traffic"), st.sampled_from([1, 10, 100, 400]), st.sampled_from([100, 1372])
    )
    # the TUN's reads: a 10-byte header (the kernel's), then at least an IPv4 header
    tun_read = inputs.offloaded(SOURCES).filter(lambda r: len(r[0]) == 10 and len(r[1]) >= 20)
    reads = st.tuples(st.just("vnet"), st.lists(tun_read, min_size=1, max_size=4))
    fair = st.tuples(st.just("ask"), st.just(1_000_000), st.just(60), st.just("last"))
    unfair = st.tuples(
        st.just("ask"),
        st.sampled_from([1_000_000, 500_000, 2_000_000, 0]),
        st.sampled_from([60, 30, 61, 2_000_001, 0]),
        st.sampled_from(["deposit", "last", "other"]),
    )
    ask = inputs.usually(fair, unfair)
    success = st.tuples(st.just("success"))
    kinds: dict[int, st.SearchStrategy[tuple[Any, ...]]] = {
        7: raw,
        3: advance,
        5: traffic,
        12: reads,
    }
    if paying:
        kinds.update({1: ask, 9: ask, 11: success, 14: traffic, 10: traffic})
    else:
        kinds.update({11: success})
    return st.integers(0, 15).flatmap(lambda n: kinds.get(n, send))


#: how far the server goes honestly first: the grant (after the first receipt), or not
free_stages = inputs.usually(st.just((("success",),)), st.just(()))
paid_stages = inputs.usually(
    st.just((("ask", 1_000_000, 60, "deposit"), ("success",))),
    st.sampled_from([(), (("ask", 1_000_000, 60, "deposit"),)]),
)


def run(
    server: Server,
    welcome: tuple[int, int, frozenset[str]],
    stage: tuple[tuple[Any, ...], ...],
    script: list[Any],
) -> None:
    session_id, order, agreed = welcome
    with LoggedFailures() as logged:
        server.welcome(session_id, ORDERS[order], agreed)
        for step in (*stage, *script):
            kind = step[0]
            if kind == "send":
                server.send(step[1], step[2], step[3])
            elif kind == "raw":
                server.deliver(step[1])
                # go on numbering after what the raw frames used
                seen = server.proto.conn.seq.last + 1
                server.conn._next_seq = max(server.conn._next_seq, min(seen, 2**63))
            elif kind == "advance":
                server.clock.advance(step[1])
                server.deliver([server.conn.data_to_send()])
            elif kind == "traffic":
                server.traffic(step[1], step[2])
            elif kind == "vnet":
                server.vnet_reads(step[1])
            elif kind == "ask":
                server.ask(step[1], step[2], step[3])
            elif kind == "success":
                server.success()
        server.check()
    logged.check()


welcomes = st.tuples(
    st.integers(1, 2**32 - 1),
    inputs.usually(st.just(0), st.integers(0, len(ORDERS) - 1)),
    st.frozensets(st.sampled_from(sorted(caps.KNOWN))),
)


@fuzz
@given(
    offered=st.frozensets(st.sampled_from(sorted(caps.KNOWN))),
    want_address=st.booleans(),
    welcome=welcomes,
    stage=free_stages,
    script=inputs.sized_lists(steps(False), 1, 10),
)
@counted
def test_free_client_stream(
    offered: frozenset[str], want_address: bool, welcome: Any, stage: Any, script: list[Any]
) -> None:
    """A client that does not pay, against a hostile server."""
    server = Server(False, offered, want_address)
    try:
        run(server, welcome, stage, script)
    finally:
        server.close()


@fuzz
@given(
    offered=st.frozensets(st.sampled_from(sorted(caps.KNOWN))),
    want_address=st.booleans(),
    welcome=welcomes,
    stage=paid_stages,
    script=inputs.sized_lists(steps(True), 1, 10),
)
@counted
def test_paying_client_stream(
    offered: frozenset[str], want_address: bool, welcome: Any, stage: Any, script: list[Any]
) -> None:
    """A client that pays (a receipt record and meter in its state folder), against a
    server that asks for receipts honestly, early, twice, off the chain, or forged."""
    server = Server(True, offered, want_address)
    try:
        run(server, welcome, stage, script)
    finally:
        server.close()
