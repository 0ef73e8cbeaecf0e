"""The client's side of billing: it checks the offer, proves its key, and signs receipts.

Before it pays, the client checks the server's signed order (from WELCOME) against
``[wallet] max_unit_price``. Before it signs a receipt it checks service, unit, price (against
its maximum and the order), units and the prev hash (:func:`check_receipt`); a receipt that
fails is not signed, the reason goes into the status, and the client disconnects for good.

A receipt that passes is signed only when the client's own meter (:mod:`cellvpn.client.meter`)
shows that what it signed before is used down to where an honest server asks again
(:mod:`cellvpn.client.signrule`). One asked for too early is answered with an ERROR and
counted; ``[wallet] max_refusals`` of them in a row close the session (the client connects
again, with back-off, if reconnecting is on). Every receipt it signs is written to its own
record first.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from cellvpn.billing.keys import KeyPair, load_key
from cellvpn.billing.proof import sign_request
from cellvpn.billing.records import DepositRequest, Order, SignedDeposit, SignedOrder
from cellvpn.client.meter import METER_FILE, MeterStore, UsageMeter
from cellvpn.client.receipts import RECORD_FILE, ReceiptBook, check_receipt
from cellvpn.client.signrule import Tolerance, refusal
from cellvpn.config.schema import WalletSection
from cellvpn.wire.errors import DecodeError
from cellvpn.wire.receipt import Receipt
from cellvpn.wire.service import (
    TRANSIENT_ERRORS,
    Error,
    ErrorCode,
    NotifyStopped,
    PacketType,
    Request,
)
from cellvpn.wire.setup import CloseCode

if TYPE_CHECKING:
    from cellvpn.client.stream import ClientStream

#: How long a deposit the client creates stays locked.
DEPOSIT_LIFETIME = 30 * 86400
#: Seconds between saves of the meter while a paid session runs.
METER_SAVE_INTERVAL = 10.0


class ClientBilling:
    log = Logger()

    def __init__(self, wallet: WalletSection, state_dir: Path, clock: IReactorTime) -> None:
        assert wallet.key is not None
        self.wallet = wallet
        self.clock = clock
        self.key: KeyPair = load_key(wallet.key)
        self.state_dir = Path(state_dir)
        self.book = ReceiptBook(self.state_dir / RECORD_FILE)
        if self.book.torn is not None:
            self.log.warn(
                "receipt record {path}: cut off a torn last line of {n} bytes (a crash while "
                "it was written; that receipt was never sent), set aside as {aside}",
                path=str(self.book.path),
                n=len(self.book.torn),
                aside=str(self.book.torn_aside),
            )
        self.meters = MeterStore(self.state_dir / METER_FILE)
        self.tolerance = Tolerance(
            wallet.sign_tolerance_percent,
            wallet.sign_tolerance_bytes,
            wallet.sign_tolerance_seconds,
        )
        #: the meter of the session's (provider, deposit), once the service is granted
        self.meter: UsageMeter | None = None
        self._metered: ClientStream | None = None
        self._saver: LoopingCall | None = None
        #: a receipt signed on this session still waits for its SUCCESS
        self.unanswered = False
        #: receipts refused because they came too early: all, and in a row
        self.refusals = 0
        self.refusals_in_a_row = 0
        self.deposit: bytes | None = None
        if wallet.deposit:
            self.deposit = bytes.fromhex(wallet.deposit)
        else:
            self.deposit = self._saved_deposit()
        self.order: Order | None = None
        self.order_hash = b""
        #: why the client stopped paying (refused a receipt, the server stopped the service)
        self.stopped: str | None = None
        self.receipts_signed = 0
        self._last_signed: bytes | None = None

    # --- the deposit -------------------------------------------------------------------------

    def _deposit_file(self) -> Path:
        return self.state_dir / "deposit.json"

    def _saved_deposit(self) -> bytes | None:
        try:
            data = json.loads(self._deposit_file().read_text())
            return bytes.fromhex(data["deposit"])
        except (FileNotFoundError, KeyError, ValueError):
            return None

    def _save_deposit(self, deposit: bytes) -> None:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self._deposit_file().with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"deposit": deposit.hex(), "created": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._deposit_file())

    # --- REQUEST -------------------------------------------------------------------------------

    def make_request(self, stream: ClientStream) -> Request | None:
        """The signed REQUEST, or None when it must wait (deposit being created) or stop."""
        order = self._check_order(stream)
        if order is None:
            return None
        if self.deposit is None:
            if self.wallet.deposit_value <= 0:
                self._give_up(stream, "[wallet] names no deposit and deposit_value is 0")
                return None
            request = DepositRequest(
                owner=self.key.public,
                unit=order.unit,
                max_unit_price=self.wallet.max_unit_price,
                value=self.wallet.deposit_value,
                expires=int(time.time()) + DEPOSIT_LIFETIME,
                nonce=secrets.token_bytes(16),
            )
            self.log.info(
                "creating a deposit of {value} from account {account}",
                value=self.wallet.deposit_value,
                account=self.key.account_hex,
            )
            stream.send_service(
                PacketType.DEPOSIT_CREATE, SignedDeposit.sign(request, self.key).encode()
            )
            return None
        return self._request(stream)

    def _request(self, stream: ClientStream) -> Request:
        assert self.deposit is not None and self.order is not None
        token = self.order.token.encode("ascii")
        request = Request(tx_cond=self.deposit, order_hash=self.order_hash, token=token)
        return sign_request(request, self.key, stream.session_id or 0)

    def _check_order(self, stream: ClientStream) -> Order | None:
        proto = stream.proto
        welcome = proto.conn.welcome if proto is not None else None
        raw = welcome.order if welcome is not None else b""
        if not raw:
            self._give_up(stream, "the server offers no paid order (free service only there?)")
            return None
        try:
            signed = SignedOrder.decode(raw)
        except DecodeError as e:
            self._give_up(stream, f"the server's order is unreadable: {e}")
            return None
        order = signed.order
        if not signed.verify():
            self._give_up(stream, "the server's order is not signed by its provider")
            return None
        if order.expires < time.time():
            self._give_up(stream, "the server's order has expired")
            return None
        if order.price > order.units * self.wallet.max_unit_price:
            self._give_up(
                stream,
                f"the server asks {order.price} {order.token} per {order.units} units, above "
                f"max_unit_price {self.wallet.max_unit_price}",
            )
            return None
        self.order = order
        self.order_hash = signed.hash
        return order

    # --- packets -------------------------------------------------------------------------------

    def service_packet(self, stream: ClientStream, ptype: int, data: memoryview) -> bool:
        try:
            if ptype == PacketType.SIGN_REQUEST:
                self._sign(stream, Receipt.decode(data))
            elif ptype == PacketType.SUCCESS:
                if self._last_signed is not None and self.deposit is not None:
                    self.book.confirmed(self.deposit, self._last_signed)
                    self._last_signed = None
                self.unanswered = False
                self._start_meter(stream)
            elif ptype == PacketType.DEPOSIT_CREATED:
                if len(data) != 32:
                    raise DecodeError("DEPOSIT_CREATED must carry a 32-byte id")
                self.deposit = bytes(data)
                self._save_deposit(self.deposit)
                self.log.info("deposit {dep} created", dep=self.deposit.hex())
                stream.send_service(PacketType.REQUEST, self._request(stream).encode())
            elif ptype == PacketType.NOTIFY_STOPPED:
                stopped = NotifyStopped.decode(data)
                why = stopped.error.name if stopped.error else "no reason given"
                self.stopped = f"the server stopped the service: limits used up ({why})"
                self.log.warn("{why}", why=self.stopped)
            elif ptype == PacketType.ERROR:
                error = Error.decode(data)
                if error.code in TRANSIENT_ERRORS:
                    self.log.warn(
                        "the server cannot serve now ({code}); the client tries again later",
                        code=error.name,
                    )
                    stream.close(CloseCode.REFUSED, f"server answered {error.name}")
                else:
                    self.stopped = f"the server refused the service: {error.name}"
                    self.log.warn("{why}", why=self.stopped)
            else:
                return False
        except DecodeError as e:
            stream.close(CloseCode.PROTOCOL_ERROR, f"malformed 'R' packet 0x{ptype:02x}: {e}")
        return True

    def _sign(self, stream: ClientStream, receipt: Receipt) -> None:
        if self.order is None or self.deposit is None:
            self._give_up(stream, "a receipt arrived before any order was accepted")
            return
        why = check_receipt(
            receipt,
            self.order,
            self.wallet.max_unit_price,
            self.book.states(self.deposit),
            self.book.signed_infos,
        )
        if why is not None:
            self._give_up(stream, f"refused to sign a receipt: {why}")
            return
        provider = self.order.provider
        committed, last_units = self.book.chain(self.deposit, receipt.info.prev_hash, provider)
        meter = self._meter_of(stream)
        early = refusal(
            committed=committed,
            last_units=last_units,
            used=meter.observe(self.clock.seconds(), stream.metered_bytes),
            unit=self.order.unit,
            unanswered=self.unanswered,
            tolerance=self.tolerance,
        )
        if early is not None:
            self._refuse(stream, early)
            return
        self.refusals_in_a_row = 0
        self.meters.save()
        signed = receipt.with_signature(self.key.signature(receipt.info_bytes))
        self.book.signed(self.deposit, signed, provider)  # on disk before it leaves
        self._last_signed = signed.hash
        self.unanswered = True
        self.receipts_signed += 1
        stream.send_service(PacketType.SIGN_RESPONSE, signed.encode())

    def _refuse(self, stream: ClientStream, why: str) -> None:
        """A receipt asked for too early: ERROR, one line, counted; too many in a row end the
        session (not the client: it may connect again)."""
        self.refusals += 1
        self.refusals_in_a_row += 1
        self.log.warn(
            "billing: not signing a receipt ({n} in a row): {why}",
            n=self.refusals_in_a_row,
            why=why,
        )
        stream.send_service(
            PacketType.ERROR, Error(ErrorCode.RECEIPT_UNITS_ERROR, stream.usage_id).encode()
        )
        if self.refusals_in_a_row >= self.wallet.max_refusals:
            self.refusals_in_a_row = 0
            stream.close(
                CloseCode.REFUSED,
                f"{self.wallet.max_refusals} receipts in a row asked for before they were due",
            )

    # --- the meter ----------------------------------------------------------------------------

    def _meter_of(self, stream: ClientStream) -> UsageMeter:
        assert self.order is not None and self.deposit is not None
        if self.meter is None or self._metered is not stream:
            self.meter = self.meters.meter(self.order.provider, self.deposit, self.order.unit)
            self._metered = stream
        return self.meter

    def _start_meter(self, stream: ClientStream) -> None:
        """The service was granted: the meter counts from here, and is saved now and then."""
        if self.order is None or self.deposit is None:
            return
        self._meter_of(stream).start(self.clock.seconds(), stream.metered_bytes)
        if self._saver is None:
            saver = LoopingCall(self._save_meter, stream)
            saver.clock = self.clock
            saver.start(METER_SAVE_INTERVAL, now=False)
            self._saver = saver

    def _save_meter(self, stream: ClientStream) -> None:
        if self.meter is not None:
            self.meter.observe(self.clock.seconds(), stream.metered_bytes)
            self.meters.save()

    def session_ended(self, stream: ClientStream) -> None:
        """The stream is gone: what it used is counted and saved; a new session starts clean."""
        if self._saver is not None:
            if self._saver.running:
                self._saver.stop()
            self._saver = None
        if self.meter is not None and self._metered is stream:
            self.meter.stop(self.clock.seconds(), stream.metered_bytes)
            self.meters.save()
        self.meter = None
        self._metered = None
        self.unanswered = False
        self._last_signed = None
        self.refusals_in_a_row = 0

    def _give_up(self, stream: ClientStream, why: str) -> None:
        self.stopped = why
        self.log.warn("billing: {why}", why=why)
        stream.close(CloseCode.REFUSED, why)

    @property
    def permanent(self) -> bool:
        """A stop that reconnecting cannot fix."""
        return self.stopped is not None

    def describe(self) -> dict[str, Any]:
        return {
            "account": self.key.account_hex,
            "deposit": self.deposit.hex() if self.deposit else None,
            "order": self.order_hash.hex() if self.order_hash else None,
            "price": str(self.order.price) if self.order else None,
            "units": self.order.units if self.order else None,
            "receipts_signed": self.receipts_signed,
            "receipts_refused": self.refusals,
            "used": None if self.meter is None else round(self.meter.used, 3),
            "stopped": self.stopped,
        }
