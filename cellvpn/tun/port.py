"""A TUN fd on the reactor: batched reads out, one write per packet in.

Per-packet Python work is what limits a userspace tunnel, so a wakeup reads every packet that
is ready and hands them over in ONE call (the consumer then does one transport write per batch),
and nothing on the packet path logs or allocates beyond ``os.read``'s bytes. Back-pressure comes
from :class:`~twisted.internet.interfaces.IPushProducer`: a full transport pauses the reads.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer, IReactorFDSet, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

#: Read errors after which the fd is useless: the reactor drops the reader.
_FATAL_READ = frozenset({errno.EBADF, errno.EBADFD, errno.ENODEV})

Packet = bytes | memoryview


@dataclass(slots=True)
class TunStats:
    """Plain counters, cheap to bump on the packet path; read them for status and tests."""

    wakeups: int = 0
    packets_read: int = 0
    bytes_read: int = 0
    packets_written: int = 0
    bytes_written: int = 0
    dropped_eagain: int = 0
    errors_eio: int = 0
    errors_invalid: int = 0
    errors_other: int = 0
    read_errors: int = 0


@implementer(IReadDescriptor, IPushProducer)
class TunPort:
    """Reads every ready packet per wakeup into ``on_packets(batch)``; writes one packet a call.

    The port owns ``fd`` and closes it once (``close``, ``stopProducing`` or a fatal read
    error). ``max_packet`` covers a 64 KiB packet plus a vnet header; ``max_batch`` bounds the
    work per wakeup so other connections get their turn.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorFDSet,
        fd: int,
        on_packets: Callable[[list[bytes]], None],
        max_packet: int = 65535 + 10,
        max_batch: int = 512,
        on_lost: Callable[[str], object] | None = None,
    ) -> None:
        if max_packet < 1 or max_batch < 1:
            raise ValueError("max_packet and max_batch must be positive")
        self._reactor = reactor
        self._fd = fd
        self._on_packets = on_packets
        self.max_packet = max_packet
        self.max_batch = max_batch
        self.stats = TunStats()
        self._reading = False
        #: told why when the device is gone (deleted under us): the owner decides what now
        self.on_lost = on_lost

    # -- the reactor side ---------------------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "TunPort"

    def doRead(self) -> Failure | None:
        fd = self._fd
        if fd < 0:
            return None
        stats = self.stats
        stats.wakeups += 1
        read = os.read
        size = self.max_packet
        limit = self.max_batch
        batch: list[bytes] = []
        append = batch.append
        nbytes = 0
        result: Failure | None = None
        while len(batch) < limit:
            try:
                data = read(fd, size)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as e:
                stats.read_errors += 1
                if e.errno in _FATAL_READ:
                    result = Failure()
                break
            if not data:  # end of file: only a stand-in fd (a pipe) does this, a TUN never does
                result = Failure(ConnectionDone("end of file"))
                break
            append(data)
            nbytes += len(data)
        if batch:
            stats.packets_read += len(batch)
            stats.bytes_read += nbytes
            try:
                self._on_packets(batch)
            except Exception:
                self.log.failure("the TUN packet handler failed; the reader goes on")
        return result

    def connectionLost(self, reason: Failure) -> None:
        """The reactor dropped us (fatal read error, device deleted): say so once, close the fd."""
        lost = self._fd >= 0
        if lost:
            self.log.warn("TUN reader stopped: {why}", why=reason.getErrorMessage())
        self._reading = False
        self._close_fd()
        if lost and self.on_lost is not None:
            self.on_lost(reason.getErrorMessage())

    # -- reading control / IPushProducer ------------------------------------------------------

    def startReading(self) -> None:
        if self._fd >= 0 and not self._reading:
            self._reading = True
            self._reactor.addReader(self)

    def stopReading(self) -> None:
        if self._reading:
            self._reading = False
            self._reactor.removeReader(self)

    def pauseProducing(self) -> None:
        """The consumer is full: stop reading; the kernel queue (then drops) absorbs the rest."""
        self.stopReading()

    def resumeProducing(self) -> None:
        self.startReading()

    def stopProducing(self) -> None:
        self.close()

    def loseConnection(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop reading and close the fd; later calls do nothing."""
        self.stopReading()
        self._close_fd()

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    # -- writing ------------------------------------------------------------------------------

    def _count_write_error(self, e: OSError) -> None:
        stats = self.stats
        if e.errno == errno.EIO:
            stats.errors_eio += 1  # the device is down
        elif e.errno == errno.EINVAL:
            stats.errors_invalid += 1  # the kernel refused the packet (bad header, say)
        else:
            stats.errors_other += 1

    def write(self, packet: Packet) -> bool:
        """One packet, one ``os.write``. False if it was dropped; never raises, never logs."""
        try:
            n = os.write(self._fd, packet)
        except BlockingIOError:
            self.stats.dropped_eagain += 1
            return False
        except OSError as e:
            self._count_write_error(e)
            return False
        self.stats.packets_written += 1
        self.stats.bytes_written += n
        return True

    def writev(self, header: Packet, packet: Packet) -> bool:
        """A vnet header and its packet in one ``os.writev`` (no joining copy)."""
        try:
            n = os.writev(self._fd, (header, packet))
        except BlockingIOError:
            self.stats.dropped_eagain += 1
            return False
        except OSError as e:
            self._count_write_error(e)
            return False
        self.stats.packets_written += 1
        self.stats.bytes_written += n
        return True

    def write_many(self, packets: Sequence[Packet]) -> int:
        """Write each packet with its own ``os.write``; the number written.

        On EAGAIN the queue is full, so the rest of ``packets`` is dropped (and counted) without
        trying: a TUN does not drain while we are still in this call.
        """
        fd = self._fd
        write = os.write
        written = 0
        nbytes = 0
        for i, packet in enumerate(packets):
            try:
                nbytes += write(fd, packet)
            except BlockingIOError:
                self.stats.dropped_eagain += len(packets) - i
                break
            except OSError as e:
                self._count_write_error(e)
                continue
            written += 1
        self.stats.packets_written += written
        self.stats.bytes_written += nbytes
        return written
