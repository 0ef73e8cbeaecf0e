"""Opening TUN devices: name checks without root, the real thing in a test namespace."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest

from cellvpn.tun.device import (
    IFF_MULTI_QUEUE,
    IFF_NO_PI,
    IFF_TUN,
    IFF_VNET_HDR,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TunError,
    TunHandle,
    check_name,
    get_iff,
    open_queue,
    open_tun,
    open_tun_offloaded,
    set_offload,
    set_queue_enabled,
)

from .helpers import inside


def test_ioctl_numbers_follow_the_kernel_encoding() -> None:
    """_IOW('T', nr, int) = 1 << 30 | 4 << 16 | ord('T') << 8 | nr; _IOR has 2 << 30."""
    from cellvpn.tun import device as d

    def iow(nr: int) -> int:
        return 1 << 30 | 4 << 16 | ord("T") << 8 | nr

    assert (iow(202), iow(208), iow(216)) == (d.TUNSETIFF, d.TUNSETOFFLOAD, d.TUNSETVNETHDRSZ)
    assert iow(217) == d.TUNSETQUEUE
    assert 2 << 30 | 4 << 16 | ord("T") << 8 | 210 == d.TUNGETIFF


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("x" * 16, "16 bytes, at most 15"),
        ("cvpn/0", "contains '/'"),
        ("cvpn 0", "contains ' '"),
        ("cvpn\t0", "contains '\\t'"),
        ("cvpn:0", "contains ':'"),
        ("..", "invalid TUN device name '..'"),
    ],
)
def test_bad_names_are_refused_before_any_syscall(name: str, why: str) -> None:
    with pytest.raises(TunError, match=re.escape(why)):
        open_tun(name)


def test_good_names() -> None:
    assert check_name("x" * 15) == b"x" * 15
    assert check_name("cvpn%d") == b"cvpn%d"


def test_handle_closes_once_and_can_hand_its_fd_over() -> None:
    r, w = os.pipe()
    try:
        with TunHandle(r, "cvpn0", vnet_hdr=False, multi_queue=False) as h:
            assert not h.closed
        assert h.closed
        h.close()  # nothing happens
        handle = TunHandle(w, "cvpn0", vnet_hdr=False, multi_queue=False)
        assert handle.detach() == w and handle.closed
        handle.close()
        os.fstat(w)  # still open: it belongs to whoever took it
        with pytest.raises(TunError, match="already closed or detached"):
            handle.detach()
    finally:
        os.close(w)


@pytest.mark.netns
def test_kernel_chooses_the_name(netns: Any) -> None:
    ns = netns("tun")
    with inside(ns.name):
        first = open_tun()
        second = open_tun("cvpn%d")
    with first, second:
        assert re.fullmatch(r"tun\d+", first.name), first
        assert second.name == "cvpn0"
        assert get_iff(first.fd) == (first.name, IFF_TUN | IFF_NO_PI)
        assert "tun type tun pi off vnet_hdr off" in ns.ip("-d", "link", "show", first.name).stdout
    # Not persistent: gone with its fd.
    assert ns.ip("link", "show", "cvpn0", check=False).returncode != 0


@pytest.mark.netns
def test_kernel_errors_are_one_clear_line(netns: Any) -> None:
    ns = netns("tun")
    with inside(ns.name):
        with pytest.raises(TunError) as lo:
            open_tun("lo")
        with open_tun("cvpn0") as h:
            assert h.name == "cvpn0"
            with pytest.raises(TunError) as busy:
                open_tun("cvpn0")
            with pytest.raises(TunError) as not_mq:
                open_queue("cvpn0", vnet_hdr=False)
        with pytest.raises(TunError) as missing:
            open_queue("cvpn9", vnet_hdr=False)
    assert str(lo.value).startswith("cannot create TUN device 'lo': Invalid argument (")
    assert str(busy.value) == (
        "cannot create TUN device 'cvpn0': Device or resource busy (is another process using it?)"
    )
    assert "multi_queue=True" in str(not_mq.value)
    assert "cvpn9': no such device" in str(missing.value)
    for e in (lo, busy, not_mq, missing):
        assert "\n" not in str(e.value)


@pytest.mark.netns
def test_multi_queue_gets_a_second_queue(netns: Any) -> None:
    ns = netns("tun")
    with inside(ns.name):
        first = open_tun("cvpn0", multi_queue=True)
        try:
            second = open_queue("cvpn0", vnet_hdr=False)
        except BaseException:
            first.close()
            raise
    with first, second:
        assert second.multi_queue and second.name == "cvpn0" and second.fd != first.fd
        assert get_iff(second.fd) == ("cvpn0", IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE)
        details = ns.ip("-d", "link", "show", "cvpn0").stdout
        assert "multi_queue numqueues 2 numdisabled 0" in details
        set_queue_enabled(second.fd, False)
        assert "numqueues 1 numdisabled 1" in ns.ip("-d", "link", "show", "cvpn0").stdout
        set_queue_enabled(second.fd, True)
        assert "numqueues 2 numdisabled 0" in ns.ip("-d", "link", "show", "cvpn0").stdout


@pytest.mark.netns
def test_vnet_hdr_and_offloads(netns: Any) -> None:
    ns = netns("tun")
    with inside(ns.name):
        h = open_tun("cvpn0", vnet_hdr=True)
    with h:
        assert h.vnet_hdr
        assert get_iff(h.fd)[1] & IFF_VNET_HDR
        set_offload(h.fd, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
        assert "vnet_hdr on" in ns.ip("-d", "link", "show", "cvpn0").stdout
        with pytest.raises(TunError, match="TSO needs TUN_F_CSUM"):
            set_offload(h.fd, TUN_F_TSO4)


@pytest.mark.netns
def test_open_with_offload_falls_back_to_plain_and_says_why(
    netns: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = netns("tun")
    with inside(ns.name):
        offloaded, why = open_tun_offloaded("cvpn0", offload=True)
    with offloaded:
        assert offloaded.vnet_hdr and why == ""
        assert "vnet_hdr on" in ns.ip("-d", "link", "show", "cvpn0").stdout
    with inside(ns.name):
        plain, why = open_tun_offloaded("cvpn1", offload=False)
    with plain:
        assert not plain.vnet_hdr and why == ""

    def refused(fd: int, flags: int) -> None:
        raise TunError("cannot set TUN offloads 0x7: Invalid argument")

    monkeypatch.setattr("cellvpn.tun.device.set_offload", refused)
    with inside(ns.name):
        fallback, why = open_tun_offloaded("cvpn2", offload=True)
    with fallback:
        assert not fallback.vnet_hdr
        assert why == "cannot set TUN offloads 0x7: Invalid argument"
        assert not get_iff(fallback.fd)[1] & IFF_VNET_HDR
    with inside(ns.name), pytest.raises(TunError, match="Invalid argument"):
        open_tun_offloaded("cvpn3", offload=True, required=True)
