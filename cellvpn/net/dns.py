"""DNS for the client: queries go to the tunnel's servers while it runs, and back afterwards.

Three ways, the first that fits: systemd-resolved (per-link servers with the ``~.`` routing
domain, so every query goes through the tunnel), resolvconf (a record of its own), or rewriting
resolv.conf in place. In place, because inside a network namespace /etc/resolv.conf is a bind
mount of /etc/netns/<ns>/resolv.conf: a rename would replace the mount point's view and leave
the namespace's own file untouched. The daemons serve the host's own /etc/resolv.conf only, so a
configurator pointed at a namespace or at another file always rewrites that file.

Every change is recorded in the journal before it is made; ``revert`` undoes a record, also one
left by a run that was killed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from cellvpn.net.journal import DnsMethod, DnsRecord, Journal
from cellvpn.net.netlink import NetConfigError

#: The first bytes of every resolv.conf cellvpn writes; cleanup restores only such a file.
HEADER = b"# Written by cellvpn"
SYSTEM_RESOLV_CONF = Path("/etc/resolv.conf")
RESOLVED_STUB = "127.0.0.53"
RESOLVED_SOCKET = Path("/run/systemd/resolve/io.systemd.Resolve")
RESOLVCONF_DIRS = (Path("/etc/resolvconf"), Path("/run/resolvconf"))
#: Seconds a resolvectl or resolvconf call may take.
COMMAND_TIMEOUT = 15.0
#: Lines of the old resolv.conf kept below the tunnel's servers: they say how to ask, not whom.
_KEPT = (b"search", b"domain", b"options")


def names_nameserver(resolv_conf: bytes, address: str) -> bool:
    """Whether a ``nameserver`` line of the file names ``address``."""
    for line in resolv_conf.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == b"nameserver" and words[1] == address.encode():
            return True
    return False


def choose_method(
    resolv_conf: bytes,
    resolved_running: bool,
    have_resolvectl: bool,
    have_resolvconf: bool,
    resolvconf_dir: bool,
) -> DnsMethod:
    """The first method that fits the host, from facts gathered elsewhere (pure, for tests)."""
    if resolved_running and have_resolvectl and names_nameserver(resolv_conf, RESOLVED_STUB):
        return "resolved"
    if have_resolvconf and resolvconf_dir:
        return "resolvconf"
    return "file"


def render(servers: Sequence[IPv4Address | IPv6Address], interface: str, old: bytes) -> bytes:
    """The resolv.conf cellvpn writes: its header, the tunnel's servers, old search/options."""
    lines = [
        HEADER + b" for the VPN tunnel on " + interface.encode() + b".",
        b"# The previous content comes back when cellvpn stops.",
    ]
    lines += [b"nameserver " + str(server).encode() for server in servers]
    lines += [line for line in old.splitlines() if line.split()[:1] and line.split()[0] in _KEPT]
    return b"\n".join(lines) + b"\n"


class DnsConfigurator:
    """Points the resolver at the tunnel's DNS servers and puts it back.

    ``method`` says which way was used (None before ``apply``), for the client's status.
    """

    log = Logger()

    def __init__(
        self,
        resolv_conf: Path = SYSTEM_RESOLV_CONF,
        netns: str | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.resolv_conf = Path(resolv_conf)
        self.netns = netns
        self.journal = journal
        self.method: DnsMethod | None = None
        self._record: DnsRecord | None = None

    # -- choosing ---------------------------------------------------------------------------

    @property
    def manages_host(self) -> bool:
        """True when the file is the host's own resolv.conf, where the daemons may be used."""
        return self.netns is None and self.resolv_conf == SYSTEM_RESOLV_CONF

    def _choose(self) -> DnsMethod:
        """Blocking: look at the host (worker thread)."""
        if not self.manages_host:
            return "file"
        try:
            content = self.resolv_conf.read_bytes()
        except OSError:
            content = b""
        return choose_method(
            content,
            resolved_running=RESOLVED_SOCKET.exists(),
            have_resolvectl=shutil.which("resolvectl") is not None,
            have_resolvconf=shutil.which("resolvconf") is not None,
            resolvconf_dir=any(d.is_dir() for d in RESOLVCONF_DIRS),
        )

    # -- applying ---------------------------------------------------------------------------

    def apply(
        self, servers: Sequence[IPv4Address | IPv6Address], interface: str
    ) -> Deferred[DnsMethod]:
        """Send DNS to ``servers`` through ``interface``; fires with the method used."""
        if not servers:
            raise ValueError("no DNS servers to set")
        return Deferred.fromCoroutine(self._apply(list(servers), interface))

    async def _apply(self, servers: list[IPv4Address | IPv6Address], interface: str) -> DnsMethod:
        method = await deferToThread(self._choose)
        previous = self._record
        if previous is not None and (previous.method != method or previous.interface != interface):
            # Applying again on the same interface replaces the servers; a move undoes first.
            await self.restore()
        if method == "file":
            record = await deferToThread(self._write_file, servers, interface)
        else:
            record = DnsRecord(method, interface, str(self.resolv_conf))
            await self._journal_record(record)
            try:
                await deferToThread(self._set_daemon, record, servers)
            except NetConfigError:
                try:
                    await deferToThread(self._undo_daemon, record)
                finally:
                    await self._journal_forget()
                raise
        self._record = record
        self.method = method
        servers_text = " ".join(str(s) for s in servers)
        self.log.info(
            "DNS through {interface} ({method}): {servers}",
            interface=interface,
            method=method,
            servers=servers_text,
        )
        return method

    def _write_file(self, servers: list[IPv4Address | IPv6Address], interface: str) -> DnsRecord:
        """Blocking: rewrite resolv.conf in place, the old content journaled first."""
        path = self.resolv_conf
        try:
            with open(path, "r+b") as f:
                current = f.read()
                previous = self._record
                if previous is not None and previous.method == "file" and previous.saved:
                    saved = previous.saved  # a second apply keeps the content from before the first
                else:
                    saved = current
                    if current.startswith(HEADER):
                        self.log.warn(
                            "{path} was already written by cellvpn; it is kept as the content "
                            "to restore",
                            path=path,
                        )
                record = DnsRecord("file", interface, str(path), saved)
                if self.journal is not None:
                    self.journal.record_dns(record)
                f.seek(0)
                f.write(render(servers, interface, saved))
                f.truncate()
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise NetConfigError(f"cannot set DNS in {path}: {e.strerror or e}", e.errno) from e
        return record

    def _set_daemon(self, record: DnsRecord, servers: list[IPv4Address | IPv6Address]) -> None:
        """Blocking: hand the servers to systemd-resolved or resolvconf."""
        names = [str(s) for s in servers]
        if record.method == "resolved":
            self._run(["resolvectl", "dns", record.interface, *names])
            self._run(["resolvectl", "domain", record.interface, "~."])
        else:
            text = "".join(f"nameserver {name}\n" for name in names)
            self._run(["resolvconf", "-a", f"{record.interface}.cellvpn"], stdin=text.encode())

    def _run(self, argv: list[str], stdin: bytes | None = None) -> None:
        """Blocking: one command; a failure becomes a NetConfigError naming it."""
        try:
            done = subprocess.run(
                argv, input=stdin, capture_output=True, timeout=COMMAND_TIMEOUT, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NetConfigError(f"cannot run {' '.join(argv)}: {e}") from e
        if done.returncode != 0:
            why = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
            raise NetConfigError(
                f"{' '.join(argv)} failed: {why[0] if why else f'exit {done.returncode}'}"
            )

    # -- undoing ----------------------------------------------------------------------------

    def restore(self) -> Deferred[str]:
        """Undo what ``apply`` did; fires with a line saying what happened."""
        record = self._record
        if record is None:
            return Deferred.fromCoroutine(self._nothing())
        return Deferred.fromCoroutine(self._restore(record))

    async def _nothing(self) -> str:
        return "DNS was not changed"

    async def _restore(self, record: DnsRecord) -> str:
        line = await self.revert(record)
        self._record = None
        self.method = None
        return line

    def revert(self, record: DnsRecord) -> Deferred[str]:
        """Undo one recorded change (this run's or a killed run's), then forget it."""
        return Deferred.fromCoroutine(self._revert(record))

    async def _revert(self, record: DnsRecord) -> str:
        if record.method == "file":
            line = await deferToThread(self._restore_file, record)
        else:
            line = await deferToThread(self._undo_daemon, record)
        await self._journal_forget()
        self.log.info("{line}", line=line)
        return line

    def _restore_file(self, record: DnsRecord) -> str:
        """Blocking: put the saved bytes back in place, only over cellvpn's own content."""
        path = Path(record.resolv_conf)
        try:
            with open(path, "r+b") as f:
                current = f.read()
                if record.saved is None or not current.startswith(HEADER):
                    if current == record.saved:
                        return f"{path} already has its previous content"
                    return f"left {path} as it is: it was changed since cellvpn wrote it"
                f.seek(0)
                f.write(record.saved)
                f.truncate()
                f.flush()
                os.fsync(f.fileno())
        except FileNotFoundError:
            return f"left {path} alone: it is gone"
        except OSError as e:
            raise NetConfigError(f"cannot restore {path}: {e.strerror or e}", e.errno) from e
        return f"restored {path}"

    def _undo_daemon(self, record: DnsRecord) -> str:
        """Blocking: take cellvpn's servers back out of systemd-resolved or resolvconf."""
        if record.method == "resolved":
            try:
                socket.if_nametoindex(record.interface)
            except OSError:
                return f"DNS settings of {record.interface} went with the interface"
            self._run(["resolvectl", "revert", record.interface])
            return f"reverted the DNS settings of {record.interface} in systemd-resolved"
        self._run(["resolvconf", "-d", f"{record.interface}.cellvpn"])
        return f"removed resolvconf record {record.interface}.cellvpn"

    # -- journal ----------------------------------------------------------------------------

    async def _journal_record(self, record: DnsRecord) -> None:
        if self.journal is not None:
            await deferToThread(self.journal.record_dns, record)

    async def _journal_forget(self) -> None:
        if self.journal is not None:
            await deferToThread(self.journal.forget_dns)
