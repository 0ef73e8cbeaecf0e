"""TunPort on a real TUN in a test namespace, on the real reactor: pings answered, batching."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from cellvpn.lab import Namespace
from cellvpn.tun.device import open_tun
from cellvpn.tun.port import TunPort

from .helpers import PEER_ADDR, EchoResponder, configure, echo_reply, inside

pytestmark = pytest.mark.netns


async def responder_on_tun(reactor: Any, ns: Namespace) -> tuple[TunPort, EchoResponder]:
    with inside(ns.name):
        handle = open_tun("cvpn0")
    echo = EchoResponder()
    echo.port = port = TunPort(reactor, handle.detach(), echo)
    try:
        await deferToThread(configure, ns.name, handle.name)
    except BaseException:
        port.close()
        raise
    port.startReading()
    return port, echo


async def ping(reactor: Any, ns: Namespace, *args: str) -> subprocess.CompletedProcess[str]:
    """ping in a thread, so the reactor keeps serving the TUN while it runs."""
    d = deferToThread(ns.exec, "ping", *args, PEER_ADDR, check=False, timeout=10)
    d.addTimeout(12, reactor)
    result: subprocess.CompletedProcess[str] = await d
    return result


@pytest_twisted.ensureDeferred
async def test_pings_are_answered(reactor: Any, netns: Any) -> None:
    ns = netns("tun")
    port, echo = await responder_on_tun(reactor, ns)
    try:
        result = await ping(reactor, ns, "-c", "3", "-i", "0.2", "-W", "2")
    finally:
        port.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"3 packets transmitted, 3 received", result.stdout), result.stdout
    assert echo.replies >= 3
    assert port.stats.packets_written == echo.replies
    assert port.stats.packets_read >= 3 and port.stats.wakeups >= 1
    assert port.closed


@pytest_twisted.ensureDeferred
async def test_flood_is_read_in_batches(reactor: Any, netns: Any) -> None:
    """Many packets per wakeup under load: the point of the batching.

    ``-l 32`` keeps 32 requests in flight; plain ``-f`` or ``-i 0`` waits for each reply, so an
    answer as quick as ours leaves one packet per wakeup.
    """
    ns = netns("tun")
    port, echo = await responder_on_tun(reactor, ns)
    try:
        result = await ping(reactor, ns, "-f", "-l", "32", "-c", "2000", "-W", "1", "-q")
    finally:
        port.close()
    stats = port.stats
    got = re.search(r"2000 packets transmitted, (\d+) received", result.stdout)
    assert got, result.stdout + result.stderr
    assert int(got.group(1)) >= 1900, result.stdout
    assert stats.packets_read >= 2000
    assert stats.packets_read / stats.wakeups > 1.0, stats
    assert max(echo.batches) > 1
    assert len(echo.batches) <= stats.wakeups  # one call per wakeup, never one per packet


@pytest_twisted.ensureDeferred
async def test_write_errors_are_counted_not_raised(reactor: Any, netns: Any) -> None:
    ns = netns("tun")
    port, _ = await responder_on_tun(reactor, ns)
    request = bytes.fromhex("4500001c0001000040010000c6124d01c6124d020800f7fe00010000")
    reply = echo_reply(request)
    assert reply is not None
    try:
        assert port.write(reply)
        assert not port.write(b"\x00" * 20)  # not IPv4/IPv6: the kernel refuses it
        assert port.stats.errors_invalid == 1
        ns.ip("link", "set", "cvpn0", "down")
        assert not port.write(reply)  # the device is down
        assert port.stats.errors_eio == 1
        assert port.write_many([reply, reply]) == 0
        assert port.stats.errors_eio == 3
        assert port.stats.packets_written == 1
    finally:
        port.close()


@pytest_twisted.ensureDeferred
async def test_deleted_device_drops_the_reader(reactor: Any, netns: Any) -> None:
    ns = netns("tun")
    port, _ = await responder_on_tun(reactor, ns)
    try:
        ns.ip("link", "del", "cvpn0")
        for _ in range(50):
            if port.closed:
                break
            await deferLater(reactor, 0.05)
        assert port.closed, "the reactor did not drop the reader of a deleted device"
        assert port not in reactor.getReaders()
        assert not port.write(b"\x45" + b"\0" * 27)
        assert port.stats.errors_other == 1
    finally:
        port.close()
