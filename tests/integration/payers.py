"""Many paying clients in one process, for the billing load test.

    python payers.py SPEC RESULT

SPEC is a JSON file: ``{"host", "port", "ca", "max_unit_price", "duration", "clients": [{"key",
"deposit", "state"}, ...]}``, and, for a server that serves enrolled clients only, the
``certificate`` and ``private_key`` files all its clients present. Each client is built from
cellvpn's own client pieces: a ``ClientStream`` (no address, no TUN: ``vpn = false``) on
``StreamProtocol`` + ``StreamConnection`` over TLS, with ``ClientBilling`` as its billing, so
it checks the order, proves its key, checks and signs every receipt and keeps its own receipt
book in its ``state`` folder, exactly as the client does.

All clients connect (a few milliseconds apart), stay ``duration`` seconds after the last one
was granted, then close. RESULT gets one JSON object: per client what it signed and what the
server confirmed (from its receipt book), whether and when it was granted, and why it stopped
if it did.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogBeginner, textFileLogObserver

from cellvpn.client.billing import ClientBilling
from cellvpn.client.stream import ClientStream
from cellvpn.config.schema import WalletSection
from cellvpn.conn.protocol import StreamProtocol
from cellvpn.conn.tls import client_tls
from cellvpn.stream import caps
from cellvpn.stream.connection import Role, StreamConnection, StreamSettings
from cellvpn.wire import vpn
from cellvpn.wire.service import Request

#: Seconds between two clients' connects, so 50 TLS handshakes do not all land at once.
STAGGER = 0.02
#: The most seconds to wait for every client to be granted, and for every stream to end.
SETTLE = 30.0

SETTINGS = StreamSettings(channels="RS", caps=caps.KNOWN - {caps.OFFLOAD})


class Payer:
    """One client: the StreamOwner of one ClientStream, paying through ClientBilling."""

    def __init__(self, reactor: Any, index: int, entry: dict[str, Any], max_price: int) -> None:
        self.reactor = reactor
        self.index = index
        wallet = WalletSection(
            key=Path(entry["key"]), deposit=entry["deposit"], max_unit_price=max_price
        )
        self.billing = ClientBilling(wallet, Path(entry["state"]), reactor)
        self.stream = ClientStream(reactor, 3.0, self, want_address=False)
        self.granted_at: float | None = None
        self.refused: str | None = None
        self.lost: str | None = None
        self.ended: defer.Deferred[None] = defer.Deferred()

    def connect(self, host: str, port: int, tls: Any) -> None:
        stream = self.stream
        reactor = self.reactor

        class _Factory(Factory):
            noisy = False

            def buildProtocol(self, addr: Any) -> Protocol:
                return StreamProtocol(StreamConnection(Role.CLIENT, SETTINGS), stream, reactor)

        endpoint = wrapClientTLS(tls, HostnameEndpoint(reactor, host, port, timeout=15))
        endpoint.connect(_Factory()).addErrback(self._cannot_connect)

    def _cannot_connect(self, failure: Any) -> None:
        self._end(f"cannot connect: {failure.getErrorMessage()}")

    def _end(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
        if not self.ended.called:
            self.ended.callback(None)

    def close(self) -> None:
        self.stream.close()

    # --- StreamOwner --------------------------------------------------------------------------

    def stream_established(self, stream: ClientStream) -> None:
        pass

    def stream_address(self, stream: ClientStream, reply: vpn.AddrReply) -> None:
        pass

    def stream_granted(self, stream: ClientStream) -> None:
        self.granted_at = time.monotonic()

    def stream_refused(self, stream: ClientStream, why: str, permanent: bool) -> None:
        self.refused = why
        stream.close()

    def stream_lost(self, stream: ClientStream, why: str, permanent: bool) -> None:
        self.billing.session_ended(stream)
        self._end(why)

    def stream_packet(self, packet: memoryview) -> None:
        pass

    def stream_packet_gso(self, header_and_packet: memoryview) -> None:
        pass

    def make_request(self, stream: ClientStream) -> Request | None:
        return self.billing.make_request(stream)

    def service_packet(self, stream: ClientStream, ptype: int, data: memoryview) -> bool:
        return self.billing.service_packet(stream, ptype, data)

    def proxy_packet(self, stream: ClientStream, packet: vpn.VpnPacket) -> None:
        pass

    # --- the result ---------------------------------------------------------------------------

    def result(self, started: float) -> dict[str, Any]:
        receipts = self.billing.book.receipts()
        return {
            "index": self.index,
            "account": self.billing.key.account_hex,
            "deposit": self.billing.deposit.hex() if self.billing.deposit else None,
            "granted_after": None if self.granted_at is None else self.granted_at - started,
            "signed": [r["receipt"] for r in receipts],
            "confirmed": [r["receipt"] for r in receipts if r["confirmed"]],
            "stopped": self.billing.stopped,
            "refused": self.refused,
            "lost": self.lost,
        }


async def run(reactor: Any, spec: dict[str, Any], result_file: Path) -> None:
    cert, key = spec.get("certificate"), spec.get("private_key")
    tls = client_tls(
        spec["host"],
        Path(spec["ca"]),
        None,
        Path(cert) if cert else None,
        Path(key) if key else None,
    )
    payers = [
        Payer(reactor, n, entry, spec["max_unit_price"]) for n, entry in enumerate(spec["clients"])
    ]
    started = time.monotonic()
    for payer in payers:
        payer.connect(spec["host"], spec["port"], tls)
        await task.deferLater(reactor, STAGGER, lambda: None)
    deadline = time.monotonic() + SETTLE
    while time.monotonic() < deadline and not all(
        p.granted_at is not None or p.ended.called for p in payers
    ):
        await task.deferLater(reactor, 0.1, lambda: None)
    granted = sum(p.granted_at is not None for p in payers)
    print(f"{granted} of {len(payers)} granted after {time.monotonic() - started:.1f} s")
    await task.deferLater(reactor, spec["duration"], lambda: None)
    for payer in payers:
        payer.close()
    ending = defer.DeferredList([p.ended for p in payers])
    timeout = reactor.callLater(SETTLE, ending.cancel)
    try:
        await ending
    except defer.CancelledError:
        print("some streams did not end in time")
    if timeout.active():
        timeout.cancel()
    results = [p.result(started) for p in payers]
    result_file.write_text(json.dumps({"clients": results}))
    confirmed = sum(len(r["confirmed"]) for r in results)
    print(f"done: {confirmed} receipts confirmed", flush=True)


def main(reactor: Any, spec_file: str, result_file: str) -> defer.Deferred[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))  # a few fds per client
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    spec = json.loads(Path(spec_file).read_text())
    return defer.Deferred.fromCoroutine(run(reactor, spec, Path(result_file)))


if __name__ == "__main__":
    task.react(main, sys.argv[1:3])
