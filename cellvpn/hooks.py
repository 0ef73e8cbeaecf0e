"""Hooks: an operator's executable run when the VPN (client) or a session (server) comes and goes.

Two parts, kept apart so each can be tested alone:

- :func:`hook_environment` turns the facts of an event into the hook's environment, a pure
  function of its arguments;
- :class:`HookRunner` runs an executable off the reactor (``spawnProcess``) with a deadline
  (the process is killed after ``timeout`` seconds), at most ``max_running`` at once and the
  rest queued up to ``max_queued`` (more is dropped and counted), so a flood of events cannot
  fork-bomb the host; the output goes to the log, bounded.

:class:`Callbacks` is the same events for Python code inside the process: a list of callables,
each called on the reactor thread, an exception in one logged and never passed on.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

#: Prefix of every variable a hook gets from cellvpn.
ENV_PREFIX = "CELLVPN_"
#: PATH a hook gets when the process has none (a hook gets no other variable of the process).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Default seconds before a hook is killed.
DEFAULT_TIMEOUT = 10.0
#: Output lines of one hook run that reach the log; the rest are counted.
MAX_LINES = 20
#: Characters of one output line that reach the log.
MAX_LINE = 400
#: Seconds after a hook exits that its output pipes may stay open (a child it left behind).
EXIT_GRACE = 1.0

Facts = dict[str, Any]


def hook_environment(facts: Mapping[str, object], path: str = DEFAULT_PATH) -> dict[str, str]:
    """The environment of a hook: ``CELLVPN_<KEY>`` for each fact, and ``PATH``.

    None is the empty string, a list its items joined by spaces, a bool ``1`` or ``0``; the
    process's own environment is not passed on (it may hold what a hook has no need of).
    """
    env = {"PATH": path}
    for key, value in facts.items():
        env[ENV_PREFIX + key.upper()] = _env_text(value)
    return env


def _env_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def session_hex(session_id: int | None) -> str:
    """A session id as the logs write it (``0x0000abcd``)."""
    return f"{session_id or 0:#010x}"


def client_facts(
    event: str,
    tun: str | None,
    interface: ipaddress.IPv4Interface,
    gateway: ipaddress.IPv4Address | None,
    server: str,
    session_id: int | None,
    mtu: int,
    dns: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
    reason: str = "",
    interface6: ipaddress.IPv6Interface | None = None,
    gateway6: ipaddress.IPv6Address | None = None,
) -> Facts:
    """The facts of the client's tunnel: what ``up``/``down`` and ``on_up``/``on_down`` get;
    ``address6``, ``prefix6`` and ``gateway6`` only for a tunnel that has IPv6."""
    facts: Facts = {
        "event": event,
        "tun": tun,
        "address": str(interface.ip),
        "netmask": str(interface.netmask),
        "prefix": interface.network.prefixlen,
        "gateway": None if gateway is None else str(gateway),
        "server": server,
        "session_id": session_hex(session_id),
        "mtu": mtu,
        "dns": [str(d) for d in dns],
        "reason": reason,
    }
    if interface6 is not None:
        facts["address6"] = str(interface6.ip)
        facts["prefix6"] = interface6.network.prefixlen
        facts["gateway6"] = None if gateway6 is None else str(gateway6)
    return facts


def server_facts(
    event: str,
    session_id: int | None,
    client_address: ipaddress.IPv4Address | None,
    peer: str,
    client: str | None,
    bytes_in: int | None = None,
    bytes_out: int | None = None,
    client_address6: ipaddress.IPv6Address | None = None,
) -> Facts:
    """The facts of one server session; the byte counts only when it ended, the IPv6 address
    only for a dual-stack session."""
    facts: Facts = {
        "event": event,
        "session_id": session_hex(session_id),
        "client_address": None if client_address is None else str(client_address),
        "peer": peer,
        "client": client,
    }
    if client_address6 is not None:
        facts["client_address6"] = str(client_address6)
    if bytes_in is not None:
        facts["bytes_in"] = bytes_in
    if bytes_out is not None:
        facts["bytes_out"] = bytes_out
    return facts


@dataclass
class HookResult:
    """How one run ended: its exit status (or signal), its output lines (bounded)."""

    name: str
    executable: str
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    #: never ran: the queue was full, or the executable could not be started
    not_run: str | None = None
    lines: list[str] = field(default_factory=list)
    lines_dropped: int = 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.not_run is None

    def describe(self) -> str:
        """How it ended, for a log line and ``last_error``."""
        if self.not_run is not None:
            return f"not run: {self.not_run}"
        if self.timed_out:
            return "timed out (killed)"
        if self.signal is not None:
            return f"killed by signal {self.signal}"
        return f"exit status {self.exit_code}"


class ProcessSpawner(Protocol):
    """What the runner needs of a reactor to start a process (``IReactorProcess``)."""

    def spawnProcess(
        self,
        processProtocol: ProcessProtocol,
        executable: str,
        args: Sequence[str],
        env: Mapping[str, str],
    ) -> Any: ...


class _HookProcess(ProcessProtocol):
    """One run: output lines collected (bounded), killed at the deadline, result on the end."""

    def __init__(self, runner: HookRunner, result: HookResult, done: Deferred[HookResult]) -> None:
        self.runner = runner
        self.result = result
        self.done = done
        self._partial = b""
        self._deadline: IDelayedCall | None = None
        self._grace: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.transport.closeStdin()  # type: ignore[union-attr]
        self._deadline = self.runner.clock.callLater(self.runner.timeout, self._kill)

    def _kill(self) -> None:
        self._deadline = None
        self.result.timed_out = True
        with contextlib.suppress(Exception):  # it exited just now
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        self._take(data)

    def errReceived(self, data: bytes) -> None:
        self._take(data)

    def _take(self, data: bytes) -> None:
        buffered = self._partial + data
        *whole, rest = buffered.split(b"\n")
        for line in whole:
            self._line(line)
        if len(rest) > MAX_LINE:  # a line with no end in sight: cut where the log would
            self._line(rest)
            rest = b""
        self._partial = rest

    def _line(self, raw: bytes) -> None:
        result = self.result
        if len(result.lines) >= self.runner.max_lines:
            result.lines_dropped += 1
            return
        text = raw[:MAX_LINE].decode("utf-8", "replace").rstrip("\r")
        result.lines.append(text)

    def processExited(self, reason: Failure) -> None:
        """The hook is gone; a child it left behind may keep the pipes open: not for long."""
        self._record(reason)
        self._grace = self.runner.clock.callLater(EXIT_GRACE, self._close_pipes)

    def _close_pipes(self) -> None:
        self._grace = None
        with contextlib.suppress(Exception):
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _record(self, reason: Failure) -> None:
        value = reason.value
        if isinstance(value, ProcessDone):
            self.result.exit_code = 0
        elif isinstance(value, ProcessTerminated):
            self.result.exit_code = value.exitCode
            self.result.signal = value.signal

    def processEnded(self, reason: Failure) -> None:
        if self.result.exit_code is None and self.result.signal is None:
            self._record(reason)
        if self._partial:
            self._line(self._partial)
            self._partial = b""
        for call in (self._deadline, self._grace):
            if call is not None and call.active():
                call.cancel()
        self._deadline = self._grace = None
        self.runner._finished(self.result, self.done)


@dataclass
class _Job:
    name: str
    executable: str
    env: dict[str, str]
    done: Deferred[HookResult]


class HookRunner:
    """Runs hook executables: at most ``max_running`` at once, ``max_queued`` waiting."""

    log = Logger()

    def __init__(
        self,
        spawner: ProcessSpawner,
        clock: IReactorTime,
        timeout: float = DEFAULT_TIMEOUT,
        max_running: int = 8,
        max_queued: int = 256,
        max_lines: int = MAX_LINES,
    ) -> None:
        self.spawner = spawner
        self.clock = clock
        self.timeout = timeout
        self.max_running = max_running
        self.max_queued = max_queued
        self.max_lines = max_lines
        self.running = 0
        self.queue: deque[_Job] = deque()
        #: runs that never happened because the queue was full
        self.dropped = 0
        #: runs started, and those that failed (not zero, killed, or not started)
        self.started = 0
        self.failed = 0

    def run(
        self, name: str, executable: Path | str, env: Mapping[str, str]
    ) -> Deferred[HookResult]:
        """Run ``executable`` (no arguments) with ``env``; fires with its result, never fails."""
        job = _Job(name, str(executable), dict(env), Deferred())
        if self.running < self.max_running:
            failed = self._start(job)
            if failed is not None:
                self._report(failed, job.done)
        elif len(self.queue) < self.max_queued:
            self.queue.append(job)
        else:
            self.dropped += 1
            self.failed += 1
            self.log.warn(
                "hook {name} ({executable}) not run: {queued} runs are waiting already"
                " ({dropped} dropped in all)",
                name=name,
                executable=job.executable,
                queued=len(self.queue),
                dropped=self.dropped,
            )
            return succeed(HookResult(name, job.executable, not_run="too many waiting"))
        return job.done

    def _start(self, job: _Job) -> HookResult | None:
        """Spawn ``job``; the result at once if it could not be started, else None."""
        self.running += 1
        self.started += 1
        result = HookResult(job.name, job.executable)
        proto = _HookProcess(self, result, job.done)
        try:
            self.spawner.spawnProcess(proto, job.executable, [job.executable], job.env)
        except Exception as e:  # gone since the config was read, or no more processes
            self.running -= 1
            result.not_run = f"cannot start it: {e}"
            return result
        return None

    def _finished(self, result: HookResult, done: Deferred[HookResult]) -> None:
        self.running -= 1
        self._drain()
        self._report(result, done)

    def _drain(self) -> None:
        """Start what waits while there is room; a loop, not a recursion, when spawns fail."""
        while self.queue and self.running < self.max_running:
            job = self.queue.popleft()
            failed = self._start(job)
            if failed is not None:
                self._report(failed, job.done)

    def _report(self, result: HookResult, done: Deferred[HookResult]) -> None:
        if not result.ok:
            self.failed += 1
        self._log(result)
        done.callback(result)

    def _log(self, result: HookResult) -> None:
        for line in result.lines:
            self.log.info("hook {name}: {line}", name=result.name, line=line)
        if result.lines_dropped:
            self.log.info(
                "hook {name}: {n} more output lines not logged",
                name=result.name,
                n=result.lines_dropped,
            )
        how = result.describe()
        if result.timed_out:
            how += f" after {self.timeout:g} s"
        if result.ok:
            self.log.info(
                "hook {name} ({executable}): {how}",
                name=result.name,
                executable=result.executable,
                how=how,
            )
        else:
            self.log.warn(
                "hook {name} ({executable}) failed: {how}",
                name=result.name,
                executable=result.executable,
                how=how,
            )

    def describe(self) -> dict[str, int]:
        return {
            "running": self.running,
            "queued": len(self.queue),
            "started": self.started,
            "failed": self.failed,
            "dropped": self.dropped,
        }


class Callbacks:
    """Python callables for one event, called in order on the reactor thread with the facts.

    A list like any other (``append``, ``remove``); an exception in one is logged and the others
    are still called, so an embedding application cannot break the service through them.
    """

    log = Logger()

    def __init__(self, event: str) -> None:
        self.event = event
        self.callables: list[Callable[[Facts], object]] = []

    def append(self, callable_: Callable[[Facts], object]) -> None:
        self.callables.append(callable_)

    def remove(self, callable_: Callable[[Facts], object]) -> None:
        self.callables.remove(callable_)

    def __len__(self) -> int:
        return len(self.callables)

    def __call__(self, facts: Mapping[str, object]) -> None:
        for callable_ in list(self.callables):
            try:
                callable_(dict(facts))
            except Exception:
                self.log.failure("{event} callback {cb!r} failed", event=self.event, cb=callable_)


def process_path() -> str:
    """The PATH a hook gets: the process's own, else a usual one."""
    return os.environ.get("PATH") or DEFAULT_PATH
