"""The load generator of sessions_bench.py: opens sessions as fast as the server takes them.

    python sessions_load.py CA_PEM SESSIONS CONCURRENCY OUT_JSON

Each session: TCP, TLS 1.3 (the server's CA and address checked), HELLO/WELCOME, REQUEST
(free) -> SUCCESS, ADDR_REQUEST -> ADDR_REPLY. Sessions stay open (idle) until the process is
terminated; the figures go to OUT_JSON once all are open.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS

from cellvpn.conn.protocol import StreamApplication, StreamProtocol
from cellvpn.conn.tls import client_tls
from cellvpn.stream.connection import Role, StreamConnection, StreamSettings
from cellvpn.wire import vpn
from cellvpn.wire.channel import CHANNEL_R, CHANNEL_S
from cellvpn.wire.service import PacketType, Request


class Session(StreamApplication):
    """A minimal client application: grant, then one address."""

    def __init__(self) -> None:
        self.done: defer.Deferred[None] = defer.Deferred()
        self.proto: StreamProtocol | None = None

    def stream_connected(self, proto: StreamProtocol) -> None:
        self.proto = proto
        proto.conn.register_channel(CHANNEL_R, self.on_r)
        proto.conn.register_channel(CHANNEL_S, self.on_s)
        proto.conn.start()

    def established(self, proto: StreamProtocol, event: Any) -> None:
        proto.conn.send_channel(CHANNEL_R, PacketType.REQUEST, Request().encode())

    def on_r(self, ptype: int, data: memoryview) -> None:
        assert self.proto is not None
        if ptype == PacketType.SUCCESS:
            request = vpn.VpnPacket(vpn.OpCode.VPN_ADDR_REQUEST).encode()
            self.proto.conn.send_channel(CHANNEL_S, 2, request)
        elif not self.done.called:
            self.done.errback(RuntimeError(f"refused: 'R' 0x{ptype:02x}"))

    def on_s(self, ptype: int, data: memoryview) -> None:
        op = vpn.peek_op(data)
        if self.done.called:
            return
        if op == vpn.OpCode.VPN_ADDR_REPLY:
            self.done.callback(None)
        elif op == vpn.OpCode.PROBLEM:
            self.done.errback(RuntimeError("PROBLEM"))

    def hello_received(self, proto: StreamProtocol, event: Any) -> None:
        raise AssertionError

    def stream_closed(self, proto: StreamProtocol, event: Any) -> None:
        pass

    def connection_lost(self, proto: StreamProtocol, reason: Any) -> None:
        if not self.done.called:
            self.done.errback(reason)


async def run(reactor: Any, ca: str, total: int, concurrency: int, out: str) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    creator = client_tls("127.0.0.1", Path(ca), None, None, None)
    settings = StreamSettings(caps=frozenset({"addr-options"}), idle_timeout=600)
    opened = failed = 0
    keep: list[StreamProtocol] = []

    async def one() -> None:
        nonlocal opened, failed
        app = Session()
        proto = StreamProtocol(StreamConnection(Role.CLIENT, settings), app, reactor)
        endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", 8089))
        try:
            await connectProtocol(endpoint, proto)
            await app.done
            opened += 1
            keep.append(proto)
        except Exception:
            failed += 1

    start = time.monotonic()
    sem = defer.DeferredSemaphore(concurrency)
    await defer.gatherResults([sem.run(lambda: defer.ensureDeferred(one())) for _ in range(total)])
    elapsed = time.monotonic() - start
    Path(out).write_text(json.dumps({"opened": opened, "failed": failed, "rate": opened / elapsed}))
    await defer.Deferred()  # stay open until terminated


if __name__ == "__main__":
    ca, total, conc, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, ca, total, conc, out)))
