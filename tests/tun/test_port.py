"""TunPort with an AF_UNIX SOCK_SEQPACKET pair standing in for the TUN fd.

A seqpacket socket keeps message boundaries like a TUN does: one read, one packet.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer, IReadDescriptor
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from cellvpn.tun.port import TunPort, TunStats


class FakeReactor:
    """Records addReader/removeReader calls (MemoryReactor's set would hide double adds)."""

    def __init__(self) -> None:
        self.readers: list[object] = []
        self.calls: list[str] = []

    def addReader(self, reader: object) -> None:
        self.calls.append("add")
        self.readers.append(reader)

    def removeReader(self, reader: object) -> None:
        self.calls.append("remove")
        self.readers.remove(reader)


class Pair:
    """Our end's fd (given to the ports made from it, which close it) and the peer socket."""

    def __init__(self) -> None:
        ours, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        self.peer.setblocking(False)
        self.fd = ours.detach()
        self.ports: list[TunPort] = []

    def port(self, reactor: Any, on_packets: Any, **kw: Any) -> TunPort:
        port = TunPort(reactor, self.fd, on_packets, **kw)
        self.ports.append(port)
        return port

    def close(self) -> None:
        self.peer.close()
        for port in self.ports:
            port.close()  # once only, whatever the test did
        if not self.ports:
            os.close(self.fd)


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    try:
        yield p
    finally:
        p.close()


def make_port(pair: Pair, **kw: Any) -> tuple[TunPort, list[list[bytes]], FakeReactor]:
    batches: list[list[bytes]] = []
    reactor = FakeReactor()
    return pair.port(reactor, batches.append, **kw), batches, reactor


def test_provides_its_interfaces(pair: Pair) -> None:
    port, _, _ = make_port(pair)
    assert verifyObject(IReadDescriptor, port)
    assert verifyObject(IPushProducer, port)
    assert port.fileno() == pair.fd and port.logPrefix() == "TunPort"
    port.close()


def test_one_wakeup_reads_every_ready_packet_into_one_call(
    pair: Pair,
) -> None:
    peer = pair.peer
    port, batches, _ = make_port(pair)
    packets = [bytes([i]) * (i + 1) for i in range(5)]
    for p in packets:
        peer.send(p)
    assert port.doRead() is None
    assert batches == [packets]
    assert port.stats == TunStats(wakeups=1, packets_read=5, bytes_read=15)
    assert port.doRead() is None  # nothing more: EAGAIN, no call
    assert len(batches) == 1 and port.stats.wakeups == 2
    port.close()


def test_max_batch_bounds_one_wakeup(pair: Pair) -> None:
    peer = pair.peer
    port, batches, _ = make_port(pair, max_batch=4)
    for i in range(10):
        peer.send(bytes([i]))
    for _ in range(3):
        port.doRead()
    assert [len(b) for b in batches] == [4, 4, 2]
    assert port.stats.packets_read == 10 and port.stats.wakeups == 3
    port.close()


def test_callback_exception_is_logged_once_and_reading_goes_on(
    pair: Pair,
) -> None:
    peer = pair.peer
    events: list[dict[str, Any]] = []
    calls: list[list[bytes]] = []

    def broken(batch: list[bytes]) -> None:
        calls.append(batch)
        raise RuntimeError("handler bug")

    port = pair.port(FakeReactor(), broken)
    port.log = Logger(observer=events.append)
    peer.send(b"a")
    peer.send(b"b")
    assert port.doRead() is None
    assert len(events) == 1 and events[0]["log_failure"].check(RuntimeError)
    peer.send(b"c")
    assert port.doRead() is None
    assert calls == [[b"a", b"b"], [b"c"]] and len(events) == 2
    port.close()


def test_write_is_one_packet_per_call_and_eagain_is_counted(
    pair: Pair,
) -> None:
    peer = pair.peer
    port, _, _ = make_port(pair)
    assert port.write(b"one") and port.write(memoryview(b"two"))
    assert port.write_many([b"x", b"yy"]) == 2
    assert [peer.recv(100) for _ in range(4)] == [b"one", b"two", b"x", b"yy"]
    assert port.stats.packets_written == 4 and port.stats.bytes_written == 9
    chunk = b"z" * 4096
    while port.write(chunk):  # fill the peer's receive queue
        pass
    assert port.stats.dropped_eagain == 1
    assert port.write_many([chunk, chunk, chunk]) == 0
    assert port.stats.dropped_eagain == 4  # the rest of a batch is dropped without trying
    port.close()


@pytest.mark.parametrize(
    ("err", "counter"),
    [
        (errno.EIO, "errors_eio"),
        (errno.EINVAL, "errors_invalid"),
        (errno.EMSGSIZE, "errors_other"),
    ],
)
def test_write_errors_are_counted_never_raised(
    pair: Pair, monkeypatch: pytest.MonkeyPatch, err: int, counter: str
) -> None:
    port, _, _ = make_port(pair)

    def failing_write(fd: int, data: bytes) -> int:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "write", failing_write)
    assert port.write(b"p") is False
    assert port.write_many([b"p", b"q"]) == 0
    assert getattr(port.stats, counter) == 3
    assert port.stats.packets_written == 0
    monkeypatch.undo()
    port.close()


def test_fatal_read_error_returns_a_failure(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    port, batches, _ = make_port(pair)

    def gone(fd: int, n: int) -> bytes:
        raise OSError(errno.EBADFD, "File descriptor in bad state")

    monkeypatch.setattr(os, "read", gone)
    why = port.doRead()
    monkeypatch.undo()
    assert isinstance(why, Failure) and why.check(OSError)
    assert port.stats.read_errors == 1 and batches == []
    port.connectionLost(why)  # what the reactor does next
    assert port.closed and port.fileno() == -1


def test_other_read_error_stops_the_wakeup_only(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = pair.peer
    port, batches, _ = make_port(pair)
    peer.send(b"first")
    real_read = os.read
    results: list[Any] = [None, OSError(errno.EIO, "Input/output error")]

    def flaky(fd: int, n: int) -> bytes:
        step = results.pop(0) if results else None
        if isinstance(step, OSError):
            raise step
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", flaky)
    assert port.doRead() is None
    assert batches == [[b"first"]] and port.stats.read_errors == 1
    assert not port.closed
    monkeypatch.undo()
    port.close()


def test_eof_delivers_what_was_read_then_ends(pair: Pair) -> None:
    peer = pair.peer
    port, batches, _ = make_port(pair)
    peer.send(b"last")
    peer.shutdown(socket.SHUT_WR)
    why = port.doRead()
    assert batches == [[b"last"]]
    assert isinstance(why, Failure) and why.check(ConnectionDone)
    port.close()


def test_pause_and_resume_add_and_remove_the_reader_once(
    pair: Pair,
) -> None:
    port, _, reactor = make_port(pair)
    port.startReading()
    port.startReading()
    assert reactor.readers == [port]
    port.pauseProducing()
    port.pauseProducing()
    assert reactor.readers == []
    port.resumeProducing()
    assert reactor.readers == [port]
    port.stopProducing()  # closes
    assert reactor.readers == [] and port.closed
    port.resumeProducing()  # a closed port never comes back
    assert reactor.readers == []
    assert reactor.calls == ["add", "remove", "add", "remove"]


def test_close_closes_the_fd_exactly_once(pair: Pair) -> None:
    peer = pair.peer
    port, _, reactor = make_port(pair)
    port.startReading()
    port.close()
    assert port.closed and reactor.readers == []
    assert peer.recv(10) == b""  # the peer sees our end closed
    # The number is free again; whoever gets it next must not lose it to a second close.
    r, w = os.pipe()
    try:
        port.close()
        port.loseConnection()
        port.connectionLost(Failure(ConnectionDone()))
        os.fstat(r)
        os.fstat(w)
    finally:
        os.close(r)
        os.close(w)
    assert port.doRead() is None and port.stats.wakeups == 0
    assert port.write(b"late") is False and port.stats.errors_other == 1


@pytest_twisted.ensureDeferred
async def test_on_the_real_reactor(reactor: Any, pair: Pair) -> None:
    """Added with addReader, it gets the packets, and the reactor drops it at end of file."""
    peer = pair.peer
    got: Deferred[list[bytes]] = Deferred()
    port = pair.port(reactor, lambda batch: got.callback(batch) if not got.called else None)
    port.startReading()
    try:
        peer.send(b"p1")
        got.addTimeout(10, reactor)
        assert await got == [b"p1"]
        assert port in reactor.getReaders()
        peer.shutdown(socket.SHUT_WR)
        for _ in range(100):
            if port.closed:
                break
            await deferLater(reactor, 0.05)
        assert port.closed and port not in reactor.getReaders()
    finally:
        port.close()
