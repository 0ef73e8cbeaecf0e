"""The client against servers that ask for more than was used, on the real protocol.

The client is cellvpn's own: ``ClientStream`` on ``StreamProtocol`` and ``StreamConnection``,
paying through ``ClientBilling`` with its receipt record and meter in a state folder. The
server is a double that speaks the same stream (a server-side ``StreamConnection``, over a
memory transport) and redeems what the client signs in a real SQLite ledger, so the deposit's
balance is the measure of what a dishonest server could take.
"""

from __future__ import annotations

import secrets
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from cellvpn.billing.interfaces import LedgerError
from cellvpn.billing.keys import KeyPair, create_key, load_key
from cellvpn.billing.records import DepositRequest, Order, SignedDeposit, SignedOrder
from cellvpn.billing.sqlite import SqliteLedger
from cellvpn.client.billing import ClientBilling
from cellvpn.client.stream import ClientStream
from cellvpn.config.schema import WalletSection
from cellvpn.conn.protocol import StreamProtocol
from cellvpn.stream.connection import HelloReceived, Role, StreamConnection, StreamSettings
from cellvpn.wire import vpn
from cellvpn.wire.channel import CHANNEL_R, CHANNEL_S
from cellvpn.wire.receipt import Receipt, ReceiptInfo, Unit
from cellvpn.wire.service import SRV_UID_VPN, Error, PacketType, Request, Success

PROVIDER = KeyPair.generate()
PRICE = 60
DEPOSIT_VALUE = 6000
BYTES_UNITS = 1_000_000
#: traffic per step of the ahead test: the server asks at most this late
STEP = 28_000
SECONDS_UNITS = 60


class DishonestServer:
    """One server stream end: grants, asks for receipts when ``due()`` says so, redeems them.

    ``ahead`` is what its counter claims beyond what it carried (bytes, or seconds of clock);
    ``greedy`` asks again at once after every answer, whatever was used; ``drop_after_receipt``
    closes the stream as soon as a receipt is redeemed.
    """

    def __init__(
        self,
        ledger: SqliteLedger,
        deposit: bytes,
        order: SignedOrder,
        clock: Clock,
        greedy: bool = False,
        drop_after_receipt: bool = False,
        ahead: float = 0.0,
    ) -> None:
        self.ledger = ledger
        self.deposit = deposit
        self.order = order
        self.clock = clock
        self.greedy = greedy
        self.drop_after_receipt = drop_after_receipt
        self.ahead = ahead
        self.conn = StreamConnection(Role.SERVER, StreamSettings(), clock=clock.seconds)
        self.conn.register_channel(CHANNEL_R, self._on_r)
        self.conn.register_channel(CHANNEL_S, self._on_s)
        self.pending: Receipt | None = None
        self.limit = 0.0
        self.granted_at: float | None = None
        self.carried = 0
        self.asked = 0
        self.refusals = 0
        self.redeemed = 0
        self.closed = False

    # --- the client's packets --------------------------------------------------------------

    def _on_r(self, ptype: int, data: memoryview) -> None:
        if ptype == PacketType.REQUEST:
            Request.decode(data)
            self._ask()
        elif ptype == PacketType.SIGN_RESPONSE:
            self._redeem(Receipt.decode(data))
        elif ptype == PacketType.ERROR:
            Error.decode(data)
            self.refusals += 1
            self.pending = None
            if self.greedy:
                self._ask()

    def _on_s(self, ptype: int, data: memoryview) -> None:
        if len(data) < 20:
            return
        op = struct.unpack_from("<I", data, 4)[0]
        if op == vpn.OpCode.VPN_SEND:
            self.carried += len(data) - 20
        elif op == vpn.OpCode.PING:
            pong = vpn.VpnPacket(vpn.OpCode.PONG).encode()
            self.conn.send_channel(CHANNEL_S, vpn.PKT_TYPE_PONG, pong)

    # --- billing -------------------------------------------------------------------------------

    def _ask(self) -> None:
        state = self.ledger.get_deposit(self.deposit)
        assert state is not None
        order = self.order.order
        info = ReceiptInfo(
            SRV_UID_VPN, order.unit, order.units, order.price, state.state_hash,
            addition=secrets.randbits(63),
        )  # fmt: skip
        self.pending = Receipt(info, (PROVIDER.signature(info.encode()),))
        self.asked += 1
        self.conn.send_channel(CHANNEL_R, PacketType.SIGN_REQUEST, self.pending.encode())

    def _redeem(self, receipt: Receipt) -> None:
        assert self.pending is not None and receipt.info_bytes == self.pending.info_bytes
        self.pending = None
        try:
            self.ledger.redeem(receipt, self.deposit, PROVIDER.public, time.time())
        except LedgerError:
            return
        self.redeemed += 1
        self.limit += receipt.info.units
        if self.granted_at is None:
            self.granted_at = self.clock.seconds()
        self.conn.send_channel(CHANNEL_R, PacketType.SUCCESS, Success(7).encode())
        if self.drop_after_receipt:
            self.conn.close(reason="dropped after the receipt")
            self.closed = True
        elif self.greedy:
            self._ask()

    def used(self) -> float:
        """What this server claims was used: what it carried (or the clock), plus ``ahead``."""
        if self.granted_at is None:
            return 0.0
        if self.order.order.unit == Unit.SEC:
            return self.clock.seconds() - self.granted_at + self.ahead
        return self.carried + self.ahead

    def tick(self) -> None:
        """An honest server's rule (half left: ask), on its own count."""
        idle = self.pending is None and self.granted_at is not None and not self.closed
        if idle and self.limit - self.used() <= self.order.order.units / 2:
            self._ask()


class Owner:
    """The StreamOwner a paying client needs: billing only (no TUN)."""

    def __init__(self, billing: ClientBilling) -> None:
        self.billing = billing
        self.lost: str | None = None

    def stream_established(self, stream: ClientStream) -> None: ...

    def stream_address(self, stream: ClientStream, reply: vpn.AddrReply) -> None: ...

    def stream_granted(self, stream: ClientStream) -> None: ...

    def stream_refused(self, stream: ClientStream, why: str, permanent: bool) -> None:
        stream.close()

    def stream_lost(self, stream: ClientStream, why: str, permanent: bool) -> None:
        self.lost = why
        self.billing.session_ended(stream)

    def stream_packet(self, packet: memoryview) -> None: ...

    def stream_packet_gso(self, header_and_packet: memoryview) -> None: ...

    def make_request(self, stream: ClientStream) -> Request | None:
        return self.billing.make_request(stream)

    def service_packet(self, stream: ClientStream, ptype: int, data: memoryview) -> bool:
        return self.billing.service_packet(stream, ptype, data)

    def proxy_packet(self, stream: ClientStream, packet: vpn.VpnPacket) -> None: ...


class Link:
    """One client stream and one server stream, joined by a memory transport."""

    def __init__(self, owner: Owner, server: DishonestServer, clock: Clock) -> None:
        self.server = server
        self.owner = owner
        self.stream = ClientStream(clock, 30.0, owner, want_address=False)
        self.proto = StreamProtocol(
            StreamConnection(Role.CLIENT, StreamSettings(), clock=clock.seconds), self.stream, clock
        )
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 8089))
        self.proto.makeConnection(self.transport)
        self.gone = False
        self.pump()

    def pump(self) -> None:
        for _ in range(100):
            out = self.transport.value()
            self.transport.clear()
            moved = bool(out)
            if out:
                for event in self.server.conn.receive_data(out):
                    if isinstance(event, HelloReceived):
                        self.server.conn.accept(0x5E55, order=self.server.order.encode())
            back = self.server.conn.data_to_send()
            if back:
                moved = True
                self.proto.dataReceived(back)
            if (self.server.closed or self.transport.disconnecting) and not self.gone:
                last = self.transport.value()  # what the client wrote before it closed
                self.transport.clear()
                if last:
                    self.server.conn.receive_data(last)
                self.gone = True
                self.proto.connectionLost(Failure(ConnectionError("stream closed")))
                return
            if not moved:
                return

    def send_traffic(self, nbytes: int, size: int = 1400) -> None:
        """IP packets from the client's TUN to the server, ``nbytes`` in all."""
        packet = bytes([0x45]) + bytes(size - 1)
        for _ in range(nbytes // size):
            self.stream.send_packets([packet])
        self.pump()


def setup(
    tmp_path: Path, unit: int, **wallet: Any
) -> tuple[SqliteLedger, bytes, SignedOrder, Path]:
    key_file = tmp_path / "client.key"
    create_key(key_file)
    client = load_key(key_file)
    ledger = SqliteLedger(tmp_path / "ledger.db")
    units = SECONDS_UNITS if unit == Unit.SEC else BYTES_UNITS
    order = SignedOrder.sign(
        Order(unit, units, PRICE, "CELL", PROVIDER.public, expires=int(time.time()) + 86400),
        PROVIDER,
    )
    ledger.put_order(order)
    ledger.mint(client.account, DEPOSIT_VALUE, client.public)
    request = DepositRequest(
        client.public, unit, 2, DEPOSIT_VALUE, int(time.time()) + 86400, secrets.token_bytes(16)
    )
    row = ledger.create_deposit(SignedDeposit.sign(request, client), time.time())
    return ledger, row.id, order, key_file


def client_billing(
    tmp_path: Path, key_file: Path, deposit: bytes, clock: Clock, **wallet: Any
) -> ClientBilling:
    section = WalletSection(key=key_file, deposit=deposit.hex(), max_unit_price=2, **wallet)
    return ClientBilling(section, tmp_path / "state", clock)


def moved(ledger: SqliteLedger, deposit: bytes) -> int:
    row = ledger.get_deposit(deposit)
    assert row is not None
    return DEPOSIT_VALUE - row.locked


@pytest.mark.parametrize("unit", [Unit.B, Unit.SEC], ids=["bytes", "seconds"])
def test_back_to_back_receipts_without_traffic_get_one_signature(tmp_path: Path, unit: int) -> None:
    """A server that asks again after every answer, with nothing used: the client signs the
    first receipt, refuses the rest (ERROR each), and drops the session after three in a row;
    the deposit moves by one receipt."""
    ledger, deposit, order, key_file = setup(tmp_path, unit)
    clock = Clock()
    billing = client_billing(tmp_path, key_file, deposit, clock)
    server = DishonestServer(ledger, deposit, order, clock, greedy=True)
    link = Link(Owner(billing), server, clock)
    assert server.redeemed == 1
    assert server.refusals == 3
    assert link.gone and billing.stopped is None  # not a permanent stop: it may reconnect
    assert billing.receipts_signed == 1 and billing.refusals == 3
    assert moved(ledger, deposit) == PRICE


def test_dropping_the_stream_after_every_receipt_gains_nothing(tmp_path: Path) -> None:
    """The server closes after each redeemed receipt; the client reconnects ten times (and
    restarts once, from its state folder): one receipt in all, because the meter and what was
    signed are carried across sessions."""
    ledger, deposit, order, key_file = setup(tmp_path, Unit.B)
    clock = Clock()
    billing = client_billing(tmp_path, key_file, deposit, clock)
    signed = 0
    for attempt in range(10):
        if attempt == 5:
            billing = client_billing(tmp_path, key_file, deposit, clock)  # a client restart
        server = DishonestServer(ledger, deposit, order, clock, drop_after_receipt=True)
        link = Link(Owner(billing), server, clock)
        if not link.gone:
            link.stream.close()
            link.pump()
        signed += server.redeemed
    assert signed == 1
    assert moved(ledger, deposit) == PRICE
    assert len(billing.book.receipts()) == 1


def test_receipts_follow_use_across_reconnects(tmp_path: Path) -> None:
    """Use carried over: a session that used 60% of the receipt ends; on the next session the
    client signs the next receipt (its meter says half is used), and no further one."""
    ledger, deposit, order, key_file = setup(tmp_path, Unit.B)
    clock = Clock()
    billing = client_billing(tmp_path, key_file, deposit, clock)
    link = Link(Owner(billing), DishonestServer(ledger, deposit, order, clock), clock)
    link.send_traffic(600_000)
    link.stream.close()
    link.pump()
    assert moved(ledger, deposit) == PRICE
    again = client_billing(tmp_path, key_file, deposit, clock)  # restarted, too
    server = DishonestServer(ledger, deposit, order, clock, greedy=True)
    Link(Owner(again), server, clock)
    assert server.redeemed == 1 and server.refusals == 3
    assert moved(ledger, deposit) == 2 * PRICE


@pytest.mark.parametrize(
    ("unit", "ahead", "refused"),
    [
        (Unit.B, 0.0, False),
        (Unit.B, 0.10 * BYTES_UNITS + 65536 - 1400, False),  # just inside the tolerance
        (Unit.B, 0.10 * BYTES_UNITS + 65536 + STEP + 1400, True),  # beyond it
        (Unit.SEC, 0.0, False),
        (Unit.SEC, 0.10 * SECONDS_UNITS + 2 - 1, False),
        (Unit.SEC, 0.10 * SECONDS_UNITS + 2 + 2, True),
    ],
    ids=["bytes-level", "bytes-ahead-within", "bytes-ahead-beyond",
         "seconds-level", "seconds-ahead-within", "seconds-ahead-beyond"],
)  # fmt: skip
def test_a_server_running_ahead_within_the_tolerance_is_paid(
    tmp_path: Path, unit: int, ahead: float, refused: bool
) -> None:
    """An honest server's rule on a counter that runs ahead of the client's: within the
    tolerance every receipt is signed (ten in a row, no refusal); beyond it, refused."""
    ledger, deposit, order, key_file = setup(tmp_path, unit)
    clock = Clock()
    billing = client_billing(tmp_path, key_file, deposit, clock)
    server = DishonestServer(ledger, deposit, order, clock, ahead=ahead)
    link = Link(Owner(billing), server, clock)
    assert server.redeemed == 1
    for _ in range(1000):
        if server.redeemed >= 10 or server.refusals:
            break
        if unit == Unit.SEC:
            clock.advance(1.0)
        else:
            link.send_traffic(STEP)
        server.tick()
        link.pump()
    if refused:
        assert server.refusals >= 1 and server.redeemed == 1
    else:
        assert server.refusals == 0 and server.redeemed == 10
        assert billing.refusals == 0
        assert moved(ledger, deposit) == 10 * PRICE
