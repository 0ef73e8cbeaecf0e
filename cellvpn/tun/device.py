"""Opening a TUN device and setting its offloads, with no reactor involved.

The device is created in the network namespace of the thread that opens ``/dev/net/tun``,
whatever namespace the later ioctls run in. A non-persistent device disappears when its last
queue's fd is closed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass, field
from types import TracebackType

TUN_PATH = "/dev/net/tun"

# ioctl numbers from linux/if_tun.h: _IOW('T', nr, int) = 0x4004_54nn, _IOR(...) = 0x8004_54nn.
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int); the argument is passed by value
TUNGETIFF = 0x800454D2  # _IOR('T', 210, unsigned int)
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int)
TUNSETQUEUE = 0x400454D9  # _IOW('T', 217, int)

# TUNSETIFF / TUNSETQUEUE ifr_flags
IFF_TUN = 0x0001
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

# TUNSETOFFLOAD bits. The TSO bits are refused (EINVAL) unless TUN_F_CSUM is set too.
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

#: Bytes in ``struct virtio_net_hdr``, which prefixes every packet of a vnet_hdr device.
VNET_HDR_SIZE = 10

IFNAMSIZ = 16
# struct ifreq: the name, then a union whose first member here is ``short ifr_flags``; the
# union is 24 bytes on 64-bit Linux, so the whole is 40 (the kernel copies sizeof(ifreq)).
_IFREQ = struct.Struct("16sH22x")


class TunError(Exception):
    """A TUN device could not be opened or configured; the message says why in one line."""


def _hint(err: int | None, hints: dict[int, str]) -> str:
    text = hints.get(err) if err is not None else None
    return f" ({text})" if text else ""


_OPEN_HINTS = {
    errno.ENOENT: "is the tun module loaded?",
    errno.ENODEV: "is the tun module loaded?",
    errno.ENXIO: "is the tun module loaded?",
    errno.EACCES: "cellvpn needs root or CAP_NET_ADMIN for this",
    errno.EPERM: "cellvpn needs root or CAP_NET_ADMIN for this",
}

_SETIFF_HINTS = {
    errno.EBUSY: "is another process using it?",
    errno.EPERM: "cellvpn needs CAP_NET_ADMIN, or a persistent device owned by its user",
    errno.EINVAL: "is there a device of another kind by that name, or one with other "
    "multi-queue flags?",
}


def check_name(name: str) -> bytes:
    """The name as the kernel wants it, or TunError: the rules of the kernel's dev_valid_name.

    A ``%d`` in the name is a template the kernel fills in (``cvpn%d`` gives ``cvpn0``...).
    """
    raw = name.encode("utf-8", "surrogateescape")
    if not raw:
        raise TunError("invalid TUN device name '': it is empty")
    if len(raw) >= IFNAMSIZ:
        raise TunError(
            f"invalid TUN device name {name!r}: {len(raw)} bytes, at most {IFNAMSIZ - 1} allowed"
        )
    if name in (".", ".."):
        raise TunError(f"invalid TUN device name {name!r}")
    for ch in name:
        if ch in "/:\0" or ch.isspace():
            raise TunError(f"invalid TUN device name {name!r}: it contains {ch!r}")
    return raw


@dataclass(frozen=True, slots=True)
class TunHandle:
    """One open queue of a TUN device; close it, or hand its fd over with :meth:`detach`."""

    fd: int
    name: str
    vnet_hdr: bool
    multi_queue: bool
    # Whether this handle still owns ``fd``: closing twice could close an fd reused since.
    _owned: bool = field(default=True, init=False, repr=False, compare=False)

    @property
    def closed(self) -> bool:
        return not self._owned

    def detach(self) -> int:
        """Give up ownership: the caller (a TunPort, say) closes the fd from now on."""
        if not self._owned:
            raise TunError(f"the handle of TUN device {self.name!r} is already closed or detached")
        object.__setattr__(self, "_owned", False)
        return self.fd

    def close(self) -> None:
        """Close the fd once; later calls do nothing."""
        if self._owned:
            object.__setattr__(self, "_owned", False)
            os.close(self.fd)

    def __enter__(self) -> TunHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _open_dev() -> int:
    try:
        return os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise TunError(
            f"cannot open {TUN_PATH}: {e.strerror}{_hint(e.errno, _OPEN_HINTS)}"
        ) from None


def _set_iff(raw_name: bytes, flags: int, what: str, hints: dict[int, str]) -> TunHandle:
    fd = _open_dev()
    try:
        out = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(raw_name, flags))
    except OSError as e:
        os.close(fd)
        raise TunError(f"cannot {what}: {e.strerror}{_hint(e.errno, hints)}") from None
    name = bytes(out[:IFNAMSIZ]).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    return TunHandle(
        fd, name, vnet_hdr=bool(flags & IFF_VNET_HDR), multi_queue=bool(flags & IFF_MULTI_QUEUE)
    )


def _flags(multi_queue: bool, vnet_hdr: bool) -> int:
    flags = IFF_TUN | IFF_NO_PI
    if multi_queue:
        flags |= IFF_MULTI_QUEUE
    if vnet_hdr:
        flags |= IFF_VNET_HDR
    return flags


def open_tun(
    name: str | None = None, *, multi_queue: bool = False, vnet_hdr: bool = False
) -> TunHandle:
    """Create (or attach to an existing persistent) TUN device, non-blocking, without PI header.

    ``name=None`` lets the kernel pick ``tun%d``; the handle carries the name it chose. With
    ``vnet_hdr`` every packet read or written starts with a 10-byte ``virtio_net_hdr``.
    """
    raw = b"" if name is None else check_name(name)
    what = "create a TUN device" if name is None else f"create TUN device {name!r}"
    return _set_iff(raw, _flags(multi_queue, vnet_hdr), what, _SETIFF_HINTS)


_QUEUE_HINTS = {
    **_SETIFF_HINTS,
    errno.EINVAL: "was it opened with multi_queue=True, and as a TUN device?",
    errno.E2BIG: "it has the most queues the kernel allows",
}


def open_queue(name: str, vnet_hdr: bool) -> TunHandle:
    """Attach one more queue to the multi-queue device ``name``, for one more reader.

    ``vnet_hdr`` must match the device's first queue: the kernel keeps that flag per device, so
    a mismatch would change the framing under the other queues' feet.
    """
    raw = check_name(name)
    if "%" in name:
        raise TunError(f"cannot attach a queue to TUN device {name!r}: give the device's own name")
    # TUNSETIFF would quietly create a new device if the first queue is gone; refuse that. The
    # lookup runs in this thread's namespace, where /dev/net/tun is opened next.
    try:
        socket.if_nametoindex(name)
    except OSError:
        raise TunError(
            f"cannot attach a queue to TUN device {name!r}: no such device "
            "(open it first with open_tun(name, multi_queue=True))"
        ) from None
    what = f"attach a queue to TUN device {name!r}"
    return _set_iff(raw, _flags(True, vnet_hdr), what, _QUEUE_HINTS)


def set_offload(fd: int, flags: int) -> None:
    """Tell the kernel which offloads we handle (TUN_F_*), so it may send unsegmented packets.

    Only for a device opened with ``vnet_hdr=True``: without the header there is no way to tell
    a super-packet or a missing checksum from a normal packet.
    """
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
    except OSError as e:
        hint = (
            " (TSO needs TUN_F_CSUM too; unknown bits are refused)"
            if e.errno == errno.EINVAL
            else ""
        )
        raise TunError(f"cannot set TUN offloads {flags:#x}: {e.strerror}{hint}") from None


def get_iff(fd: int) -> tuple[str, int]:
    """The device's name and its TUNSETIFF flags (IFF_*), as the kernel reports them."""
    try:
        out = fcntl.ioctl(fd, TUNGETIFF, _IFREQ.pack(b"", 0))
    except OSError as e:
        raise TunError(f"cannot query the TUN device: {e.strerror}") from None
    raw, flags = _IFREQ.unpack(out)
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"), flags


def set_queue_enabled(fd: int, enabled: bool) -> None:
    """Attach or detach this fd's queue: a detached queue gets no packets (and reads fail)."""
    flag = IFF_ATTACH_QUEUE if enabled else IFF_DETACH_QUEUE
    try:
        fcntl.ioctl(fd, TUNSETQUEUE, _IFREQ.pack(b"", flag))
    except OSError as e:
        verb = "attach" if enabled else "detach"
        raise TunError(f"cannot {verb} the TUN queue: {e.strerror}") from None


#: the offloads cellvpn's data path handles: checksums left to the receiver, TCP super-packets
OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6


def open_tun_offloaded(
    name: str | None, *, offload: bool, required: bool = False
) -> tuple[TunHandle, str]:
    """Open ``name`` with large-packet offload when ``offload`` asks for it, else plain.

    Returns the handle (its ``vnet_hdr`` says which it got) and, when offload was asked for and
    the TUN cannot do it, why not (empty otherwise). With ``required`` that is an error instead.
    """
    if offload:
        handle = None
        try:
            handle = open_tun(name, vnet_hdr=True)
            set_offload(handle.fd, OFFLOADS)
            return handle, ""
        except TunError as e:
            if handle is not None:
                handle.close()
            if required:
                raise
            why = str(e)
        return open_tun(name), why
    return open_tun(name), ""
