"""The hooks' core: the environment from the facts, and the runner on a fake spawner and clock."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from cellvpn.config import ConfigError, load_client_config, load_server_config
from cellvpn.hooks import (
    MAX_LINE,
    Callbacks,
    HookResult,
    HookRunner,
    client_facts,
    hook_environment,
    server_facts,
)


class FakeTransport:
    def __init__(self) -> None:
        self.signals: list[str] = []
        self.stdin_closed = False
        self.lost = False

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, sig: str) -> None:
        self.signals.append(sig)

    def loseConnection(self) -> None:
        self.lost = True


class FakeSpawner:
    """Records each spawn; the test plays the process's part."""

    def __init__(self, fail: bool = False) -> None:
        self.spawned: list[tuple[ProcessProtocol, str, list[str], dict[str, str]]] = []
        self.fail = fail

    def spawnProcess(
        self,
        processProtocol: ProcessProtocol,
        executable: str,
        args: Sequence[str],
        env: Mapping[str, str],
    ) -> Any:
        if self.fail:
            raise OSError("no such file")
        transport = FakeTransport()
        self.spawned.append((processProtocol, executable, list(args), dict(env)))
        processProtocol.makeConnection(transport)  # type: ignore[arg-type]
        return transport


def end(proto: ProcessProtocol, code: int | None = 0, signal: int | None = None) -> None:
    reason = ProcessDone(0) if code == 0 else ProcessTerminated(code, signal)
    proto.processExited(Failure(reason))
    proto.processEnded(Failure(reason))


def results(d: Any) -> list[HookResult]:
    got: list[HookResult] = []
    d.addCallback(got.append)
    return got


# --- the environment ----------------------------------------------------------------------------


def test_client_facts_and_their_environment() -> None:
    facts = client_facts(
        "up",
        "cvpn-cli",
        ipaddress.IPv4Interface("198.18.5.2/24"),
        ipaddress.IPv4Address("198.18.5.1"),
        "192.0.2.1:8089",
        0xABCD,
        1400,
        [ipaddress.IPv4Address("198.18.5.1"), ipaddress.IPv4Address("192.0.2.53")],
    )
    assert hook_environment(facts, "/usr/bin:/bin") == {
        "PATH": "/usr/bin:/bin",
        "CELLVPN_EVENT": "up",
        "CELLVPN_TUN": "cvpn-cli",
        "CELLVPN_ADDRESS": "198.18.5.2",
        "CELLVPN_NETMASK": "255.255.255.0",
        "CELLVPN_PREFIX": "24",
        "CELLVPN_GATEWAY": "198.18.5.1",
        "CELLVPN_SERVER": "192.0.2.1:8089",
        "CELLVPN_SESSION_ID": "0x0000abcd",
        "CELLVPN_MTU": "1400",
        "CELLVPN_DNS": "198.18.5.1 192.0.2.53",
        "CELLVPN_REASON": "",
    }


def test_server_facts_at_the_start_and_the_end() -> None:
    up = server_facts("session_up", 7, ipaddress.IPv4Address("198.18.5.9"), "192.0.2.2:40000", None)
    assert hook_environment(up, "/bin") == {
        "PATH": "/bin",
        "CELLVPN_EVENT": "session_up",
        "CELLVPN_SESSION_ID": "0x00000007",
        "CELLVPN_CLIENT_ADDRESS": "198.18.5.9",
        "CELLVPN_PEER": "192.0.2.2:40000",
        "CELLVPN_CLIENT": "",
    }
    down = server_facts("session_down", 7, None, "[2001:db8::2]:1", "laptop", 100, 2000)
    assert hook_environment(down, "/bin") == {
        "PATH": "/bin",
        "CELLVPN_EVENT": "session_down",
        "CELLVPN_SESSION_ID": "0x00000007",
        "CELLVPN_CLIENT_ADDRESS": "",
        "CELLVPN_PEER": "[2001:db8::2]:1",
        "CELLVPN_CLIENT": "laptop",
        "CELLVPN_BYTES_IN": "100",
        "CELLVPN_BYTES_OUT": "2000",
    }


def test_the_environment_writes_booleans_and_empty_lists() -> None:
    assert hook_environment({"on": True, "off": False, "none": [], "x": None}, "/p") == {
        "PATH": "/p",
        "CELLVPN_ON": "1",
        "CELLVPN_OFF": "0",
        "CELLVPN_NONE": "",
        "CELLVPN_X": "",
    }


# --- the runner ---------------------------------------------------------------------------------


def test_a_run_gets_its_environment_and_its_exit_status() -> None:
    spawner, clock = FakeSpawner(), Clock()
    runner = HookRunner(spawner, clock, timeout=10)
    got = results(runner.run("up", Path("/x/up.sh"), {"CELLVPN_EVENT": "up"}))
    proto, executable, args, env = spawner.spawned[0]
    assert (executable, args, env) == ("/x/up.sh", ["/x/up.sh"], {"CELLVPN_EVENT": "up"})
    assert proto.transport.stdin_closed  # type: ignore[union-attr]
    proto.outReceived(b"one\ntw")
    proto.errReceived(b"o\n")
    end(proto, 3)
    assert got[0].exit_code == 3 and not got[0].ok
    assert got[0].lines == ["one", "two"]
    assert got[0].describe() == "exit status 3"
    assert runner.describe() == {"running": 0, "queued": 0, "started": 1, "failed": 1, "dropped": 0}
    assert clock.getDelayedCalls() == []


def test_a_hook_past_its_timeout_is_killed_and_says_so() -> None:
    spawner, clock = FakeSpawner(), Clock()
    runner = HookRunner(spawner, clock, timeout=10)
    got = results(runner.run("up", "/x/slow", {}))
    proto = spawner.spawned[0][0]
    clock.advance(9.9)
    assert proto.transport.signals == []  # type: ignore[union-attr]
    clock.advance(0.2)
    assert proto.transport.signals == ["KILL"]  # type: ignore[union-attr]
    assert got == []  # not before the process is gone
    end(proto, None, 9)
    assert got[0].timed_out and not got[0].ok
    assert got[0].describe() == "timed out (killed)"


def test_output_is_bounded_in_lines_and_in_length() -> None:
    spawner, clock = FakeSpawner(), Clock()
    runner = HookRunner(spawner, clock, max_lines=3)
    got = results(runner.run("down", "/x/chatty", {}))
    proto = spawner.spawned[0][0]
    proto.outReceived(b"a" * (MAX_LINE * 3))  # one line with no end: cut, not buffered
    proto.outReceived(b"\n".join(b"line %d" % i for i in range(10)) + b"\n")
    end(proto, 0)
    result = got[0]
    assert result.ok
    assert len(result.lines) == 3
    assert all(len(line) <= MAX_LINE for line in result.lines)
    assert result.lines[1:] == ["line 0", "line 1"]
    assert result.lines_dropped == 8


def test_a_child_left_holding_the_pipes_does_not_hold_the_result_for_long() -> None:
    spawner, clock = FakeSpawner(), Clock()
    runner = HookRunner(spawner, clock)
    got = results(runner.run("up", "/x/forks", {}))
    proto = spawner.spawned[0][0]
    proto.processExited(Failure(ProcessDone(0)))
    assert got == [] and not proto.transport.lost  # type: ignore[union-attr]
    clock.advance(1.0)
    assert proto.transport.lost  # type: ignore[union-attr]
    proto.processEnded(Failure(ProcessDone(0)))
    assert got[0].ok


def test_at_most_max_running_at_once_the_rest_queued_then_dropped_and_counted() -> None:
    spawner, clock = FakeSpawner(), Clock()
    runner = HookRunner(spawner, clock, max_running=2, max_queued=3)
    got: list[HookResult] = []
    for i in range(8):
        runner.run("session_up", f"/x/{i}", {}).addCallback(got.append)
    assert len(spawner.spawned) == 2
    assert (runner.running, len(runner.queue), runner.dropped) == (2, 3, 3)
    assert [r.not_run for r in got] == ["too many waiting"] * 3
    end(spawner.spawned[0][0], 0)
    assert len(spawner.spawned) == 3  # one ends, the first waiting one starts
    for proto, *_ in list(spawner.spawned[1:]):
        end(proto, 0)
    for proto, *_ in list(spawner.spawned[3:]):
        end(proto, 0)
    assert [s[1] for s in spawner.spawned] == ["/x/0", "/x/1", "/x/2", "/x/3", "/x/4"]
    assert runner.running == 0 and not runner.queue
    assert sum(r.ok for r in got) == 5


def test_a_hook_that_cannot_be_started_is_a_failure_not_an_exception() -> None:
    runner = HookRunner(FakeSpawner(fail=True), Clock())
    got = results(runner.run("up", "/gone", {}))
    assert got[0].not_run == "cannot start it: no such file" and not got[0].ok
    assert runner.running == 0


def test_callbacks_get_the_facts_and_one_that_raises_breaks_nothing() -> None:
    seen: list[dict[str, Any]] = []
    callbacks = Callbacks("up")

    def bad(facts: dict[str, Any]) -> None:
        raise RuntimeError("the application's bug")

    callbacks.append(bad)
    callbacks.append(seen.append)
    callbacks({"event": "up"})
    assert seen == [{"event": "up"}]
    assert len(callbacks) == 2


# --- the config keys ----------------------------------------------------------------------------


def test_hook_paths_must_be_executable_files(tmp_path: Path) -> None:
    script = tmp_path / "up.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    with pytest.raises(ConfigError, match=r"\[client\] up = .*is not executable"):
        load_client_config(None, {"client.up": str(script)})
    with pytest.raises(ConfigError, match=r"\[client\] down = .*does not exist"):
        load_client_config(None, {"client.down": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match=r"\[srv_vpn\] session_up = .*is not a file"):
        load_server_config(None, {"srv_vpn.session_up": str(tmp_path)})
    script.chmod(0o755)
    config = load_client_config(None, {"client.up": str(script), "client.up_required": "true"})
    assert config.client.up == script and config.client.up_required
    assert load_server_config(None, {"srv_vpn.session_down": str(script)}).srv_vpn.session_down


# --- the runner with real processes -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_real_hook_gets_its_environment_and_a_slow_one_is_killed(
    tmp_path: Path, reactor: Any
) -> None:
    """The same runner on the reactor: the script sees only PATH and its variables, prints
    them line by line; one that outlives its timeout is killed with its status said."""
    script = tmp_path / "hook.sh"
    script.write_text("#!/bin/sh\nenv | sort\nexit 2\n")
    script.chmod(0o755)
    runner = HookRunner(reactor, reactor, timeout=5)
    result = await runner.run("up", script, hook_environment({"event": "up"}, "/usr/bin:/bin"))
    assert (result.exit_code, result.ok) == (2, False)
    assert [line for line in result.lines if not line.startswith(("PWD=", "SHLVL=", "_="))] == [
        "CELLVPN_EVENT=up",
        "PATH=/usr/bin:/bin",
    ]
    slow = tmp_path / "slow.sh"
    slow.write_text("#!/bin/sh\necho waiting\nexec sleep 30\n")
    slow.chmod(0o755)
    runner.timeout = 0.3
    result = await runner.run("down", slow, {})
    assert result.timed_out and result.signal == 9 and result.lines == ["waiting"]


def test_many_waiting_hooks_that_cannot_be_started_do_not_recurse() -> None:
    """Each failed spawn starts the next waiting one in a loop, not a nested call."""
    spawner, clock = FakeSpawner(), Clock()
    runner = HookRunner(spawner, clock, max_running=1, max_queued=5000)
    got: list[HookResult] = []
    runner.run("session_up", "/x/first", {}).addCallback(got.append)
    for _ in range(3000):
        runner.run("session_up", "/x/gone", {}).addCallback(got.append)
    spawner.fail = True
    end(spawner.spawned[0][0], 0)
    assert len(got) == 3001 and sum(r.not_run is not None for r in got) == 3000
    assert runner.running == 0 and not runner.queue and runner.failed == 3000


def test_dual_stack_facts_add_the_ipv6_address() -> None:
    """A tunnel with IPv6 adds ADDRESS6, PREFIX6 and GATEWAY6 (client) and CLIENT_ADDRESS6
    (server); an IPv4-only one has none of them (above)."""
    facts = client_facts(
        "up",
        "cvpn-cli",
        ipaddress.IPv4Interface("198.18.5.2/24"),
        ipaddress.IPv4Address("198.18.5.1"),
        "192.0.2.1:8089",
        1,
        1400,
        [],
        interface6=ipaddress.IPv6Interface("2001:db8:1::2/64"),
        gateway6=ipaddress.IPv6Address("2001:db8:1::1"),
    )
    env = hook_environment(facts, "/bin")
    assert (env["CELLVPN_ADDRESS6"], env["CELLVPN_PREFIX6"], env["CELLVPN_GATEWAY6"]) == (
        "2001:db8:1::2",
        "64",
        "2001:db8:1::1",
    )
    up = server_facts(
        "session_up",
        7,
        ipaddress.IPv4Address("198.18.5.2"),
        "192.0.2.2:1",
        None,
        client_address6=ipaddress.IPv6Address("2001:db8:1::2"),
    )
    assert hook_environment(up, "/bin")["CELLVPN_CLIENT_ADDRESS6"] == "2001:db8:1::2"
