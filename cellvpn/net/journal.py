"""The crash journal: what the client changed on the host, so a later start can undo it.

A client killed with -9 cannot remove its routes, its TUN or its DNS change. Each change is
written here BEFORE it is made (a crash in between leaves at most an entry whose undo is a
no-op) and forgotten after it is undone; the next start calls ``cleanup_leftovers``. The journal
names only what cellvpn itself created, so the cleanup never touches anything else.

The file is JSON in the client's state_dir, mode 0600, replaced atomically (temp file, fsync,
``os.replace``) so a crash never leaves half of it. Its methods block: call them from a worker
thread (``deferToThread``).

A TUN's name alone does not say it is cellvpn's: once the process is gone, another VPN may
create its own device by that name. So the client marks the TUN it created (its alias is the
journal's ``marker``) and records its ifindex; the cleanup deletes an interface only when both
match, and leaves a foreign one, its routes and its DNS settings alone. Version 1 journals
(the name only) are still read: such an interface is deleted only when it carries the mark.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from cellvpn.net.netlink import LinkInfo, NetConfigError, Route

if TYPE_CHECKING:
    from cellvpn.net.dns import DnsConfigurator
    from cellvpn.net.netlink import Netlink

DnsMethod = Literal["resolved", "resolvconf", "file"]
_METHODS = ("resolved", "resolvconf", "file")
_VERSION = 2
#: Versions this code reads: 1 recorded the TUN by name only.
_READABLE = (1, 2)

log = Logger()


class JournalError(NetConfigError):
    """The journal file cannot be read or written."""


@dataclass(frozen=True)
class DnsRecord:
    """One DNS change: how it was made, and for the file method the content it replaced."""

    method: DnsMethod
    interface: str
    resolv_conf: str
    saved: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "method": self.method,
            "interface": self.interface,
            "resolv_conf": self.resolv_conf,
        }
        if self.saved is not None:
            # Readable for a person, and exact for any bytes (surrogateescape round-trips).
            data["saved"] = self.saved.decode("utf-8", "surrogateescape")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DnsRecord:
        method = data["method"]
        if method not in _METHODS:
            raise ValueError(f"unknown DNS method {method!r}")
        saved = data.get("saved")
        return cls(
            method=method,
            interface=str(data["interface"]),
            resolv_conf=str(data["resolv_conf"]),
            saved=None if saved is None else str(saved).encode("utf-8", "surrogateescape"),
        )


@dataclass(frozen=True)
class JournalState:
    """Everything a run has changed and not yet undone."""

    tun: str | None = None
    routes: tuple[Route, ...] = ()
    dns: DnsRecord | None = None
    #: the TUN's ifindex and the alias it was marked with (None: a version 1 journal)
    tun_index: int | None = None
    tun_marker: str | None = None

    @property
    def empty(self) -> bool:
        return self.tun is None and not self.routes and self.dns is None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": _VERSION,
            "tun": self.tun,
            "tun_ifindex": self.tun_index,
            "tun_marker": self.tun_marker,
            "routes": [route.to_json() for route in self.routes],
            "dns": None if self.dns is None else self.dns.to_json(),
        }

    @classmethod
    def from_json(cls, data: Any) -> JournalState:
        if not isinstance(data, dict) or data.get("version") not in _READABLE:
            raise ValueError("not a cellvpn journal of version 1 or 2")
        tun = data.get("tun")
        index = data.get("tun_ifindex")
        marker = data.get("tun_marker")
        dns = data.get("dns")
        return cls(
            tun=None if tun is None else str(tun),
            routes=tuple(Route.from_json(r) for r in data.get("routes", [])),
            dns=None if dns is None else DnsRecord.from_json(dns),
            tun_index=None if tun is None or index is None else int(index),
            tun_marker=None if tun is None or marker is None else str(marker),
        )


def foreign_tun(state: JournalState, link: LinkInfo, marker: str) -> str | None:
    """Why ``link`` (which has the recorded TUN's name now) is not the TUN cellvpn created,
    or None when it is: its alias is the recorded mark (``marker``, this journal's own, for a
    version 1 journal) and, when recorded, its ifindex the recorded one."""
    expected = state.tun_marker or marker
    if link.alias != expected:
        mark = "no alias" if link.alias is None else f"alias {link.alias!r}"
        return f"it has {mark}, not cellvpn's mark {expected!r}"
    if state.tun_index is not None and link.index != state.tun_index:
        return f"its ifindex is {link.index}, not {state.tun_index}"
    return None


@dataclass
class Journal:
    """The journal file at ``path``; every change to it is on disk when the call returns."""

    path: Path
    _state: JournalState | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def marker(self) -> str:
        """The alias this client's TUN gets: the same for every run with this state folder,
        so even a journal without it (version 1, or a crash before it was written) can be
        matched, and different for another client."""
        folder = os.path.abspath(self.path.parent).encode("utf-8", "surrogateescape")
        return f"cellvpn {hashlib.sha256(folder).hexdigest()[:16]}"

    # -- reading ----------------------------------------------------------------------------

    def state(self) -> JournalState:
        with self._lock:
            return self._load()

    def _load(self) -> JournalState:
        if self._state is None:
            try:
                raw = self.path.read_bytes()
            except FileNotFoundError:
                self._state = JournalState()
            except OSError as e:
                raise JournalError(f"cannot read journal {self.path}: {e.strerror}") from e
            else:
                try:
                    self._state = JournalState.from_json(json.loads(raw))
                except (ValueError, KeyError, TypeError) as e:
                    raise JournalError(f"cannot read journal {self.path}: {e}") from e
        return self._state

    # -- changes ----------------------------------------------------------------------------

    def record_tun(self, name: str, index: int | None = None, marker: str | None = None) -> None:
        """Call right after creating and marking the TUN: cleanup deletes a link by this name
        only while its ifindex and alias are still these."""
        self._change(lambda s: replace(s, tun=name, tun_index=index, tun_marker=marker))

    def forget_tun(self) -> None:
        self._change(lambda s: replace(s, tun=None, tun_index=None, tun_marker=None))

    def record_route(self, route: Route) -> None:
        self._change(lambda s: replace(s, routes=(*s.routes, route)))

    def forget_route(self, route: Route) -> None:
        """Drop the last entry equal to ``route`` (none: nothing happens)."""

        def drop(s: JournalState) -> JournalState:
            routes = list(s.routes)
            for i in range(len(routes) - 1, -1, -1):
                if routes[i] == route:
                    del routes[i]
                    break
            return replace(s, routes=tuple(routes))

        self._change(drop)

    def record_dns(self, record: DnsRecord) -> None:
        self._change(lambda s: replace(s, dns=record))

    def forget_dns(self) -> None:
        self._change(lambda s: replace(s, dns=None))

    def clear(self) -> None:
        self._change(lambda s: JournalState())

    def set_aside(self) -> Path:
        """Rename an unreadable journal to ``*.bad`` (kept for a person) and start afresh."""
        with self._lock:
            aside = self.path.with_name(self.path.name + ".bad")
            os.replace(self.path, aside)
            self._state = JournalState()
            return aside

    def _change(self, update: Callable[[JournalState], JournalState]) -> None:
        with self._lock:
            new = update(self._load())
            self._write(new)
            self._state = new

    def _write(self, state: JournalState) -> None:
        try:
            if state.empty:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                    self._sync_dir()
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            data = json.dumps(state.to_json(), indent=1).encode() + b"\n"
            tmp = self.path.with_name(self.path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(fd, 0o600)  # a stale temp file may have had another mode
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            self._sync_dir()
        except OSError as e:
            raise JournalError(f"cannot write journal {self.path}: {e.strerror or e}") from e

    def _sync_dir(self) -> None:
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def cleanup_leftovers(
    journal: Journal, netlink: Netlink, dns: DnsConfigurator
) -> Deferred[list[str]]:
    """Undo what a previous run recorded and did not undo; one line per thing done.

    DNS first (systemd-resolved forgets an interface once it is gone), then the routes newest
    first, then the TUN. What fails stays in the journal for the next try and is reported.
    When an interface that is not cellvpn's has the recorded TUN's name now, it is left alone
    with its routes and its DNS settings (see :func:`foreign_tun`).
    """
    return Deferred.fromCoroutine(_cleanup(journal, netlink, dns))


async def _cleanup(journal: Journal, netlink: Netlink, dns: DnsConfigurator) -> list[str]:
    lines: list[str] = []
    try:
        state = await deferToThread(journal.state)
    except JournalError as e:
        aside = await deferToThread(journal.set_aside)
        return [f"{e}; set aside as {aside}, nothing cleaned"]
    if state.empty:
        return lines
    failed = False
    tun = state.tun
    link: LinkInfo | None = None
    # why the interface named ``tun`` must not be touched (None: it is ours, or gone)
    hands_off: str | None = None
    unknown = False
    if tun is not None:
        try:
            link = await netlink.link_info(tun)
        except NetConfigError as e:
            failed = unknown = True
            lines.append(f"could not look up leftover interface {tun}: {e}")
        else:
            hands_off = None if link is None else foreign_tun(state, link, journal.marker)
    keep_off = unknown or hands_off is not None
    if state.dns is not None:
        if keep_off and state.dns.method == "resolved" and state.dns.interface == tun:
            if hands_off is not None:
                lines.append(f"left the DNS settings of {tun} alone: {tun} is not cellvpn's")
                await deferToThread(journal.forget_dns)
        else:
            try:
                lines.append(await dns.revert(state.dns))
                await deferToThread(journal.forget_dns)
            except NetConfigError as e:
                failed = True
                lines.append(f"could not undo the DNS change: {e}")
    for route in reversed(state.routes):
        if keep_off and route.oif is not None and route.oif == tun:
            if hands_off is not None:
                # cellvpn's route went with its TUN; this one is of the interface there now
                lines.append(f"left route {route.describe()} alone: {tun} is not cellvpn's")
                await deferToThread(journal.forget_route, route)
            continue
        try:
            if await netlink.delete_route(route):
                lines.append(f"removed leftover route {route.describe()}")
            await deferToThread(journal.forget_route, route)
        except NetConfigError as e:
            failed = True
            lines.append(f"could not remove leftover route {route.describe()}: {e}")
    if tun is not None and not unknown:
        try:
            if hands_off is not None:
                lines.append(f"left interface {tun} alone: {hands_off}")
            elif link is not None and await netlink.delete_link(tun, index=link.index):
                lines.append(f"removed leftover interface {tun}")
            await deferToThread(journal.forget_tun)
        except NetConfigError as e:
            failed = True
            lines.append(f"could not remove leftover interface {tun}: {e}")
    if not failed:
        await deferToThread(journal.clear)
    for line in lines:
        log.info("cleanup: {line}", line=line)
    return lines
