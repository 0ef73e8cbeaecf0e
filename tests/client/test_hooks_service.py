"""The client service's hooks and callbacks on memory transports: when up and down run, with
which facts, and how up_required stops a start."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from cellvpn.client.machine import ClientInput, ClientState
from cellvpn.client.service import VPNClientService
from cellvpn.client.stream import ClientStream
from cellvpn.hooks import HookRunner
from cellvpn.net.routepolicy import Accepted
from cellvpn.wire.vpn import AddrReply
from tests.client.test_service_server import established, service
from tests.test_hooks import FakeSpawner, end

PEER = address.IPv4Address("TCP", "192.0.2.1", 8089)


def reply(addr: str) -> AddrReply:
    return AddrReply(
        ipaddress.IPv4Address(addr),
        ipaddress.IPv4Address("198.18.5.1"),
        ipaddress.IPv4Address("255.255.255.0"),
    )


def hooked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, required: bool = False
) -> tuple[VPNClientService, FakeSpawner]:
    """A client whose tunnel setup only records the lease, and whose hooks spawn nothing."""
    client = service(tmp_path, "192.0.2.1")
    script = tmp_path / "hook.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    hooks = replace(client.config.client, up=script, down=script, up_required=required)
    client.config = replace(client.config, client=hooks)
    spawner = FakeSpawner()
    client.hooks = HookRunner(spawner, Clock(), timeout=10, max_running=1)

    async def setup(r: AddrReply, *a: Any, **k: Any) -> None:
        client.tunnel.name = "cvpn-cli"
        client.tunnel.gateway = r.gateway
        client.tunnel.lease = Accepted(ipaddress.IPv4Interface(f"{r.client}/24"), None, None)

    async def teardown() -> None:
        client.tunnel.lease = None

    monkeypatch.setattr(client.tunnel, "setup", setup)
    monkeypatch.setattr(client.tunnel, "teardown", teardown)
    client.machine.fire(ClientInput.START)
    return client, spawner


def bring_up(client: VPNClientService, stream: ClientStream, addr: str) -> list[Any]:
    out: list[Any] = []
    d = Deferred.fromCoroutine(client._bring_up(stream, reply(addr)))
    d.addCallbacks(out.append, out.append)
    return out


def test_up_waits_for_its_hook_and_the_callbacks_get_the_facts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, spawner = hooked(tmp_path, monkeypatch)
    seen: list[dict[str, Any]] = []
    client.on_up.append(lambda facts: 1 / 0)  # an application's bug breaks nothing
    client.on_up.append(seen.append)
    stream = established(client, PEER)
    stream.session_id = 0x1234
    done = bring_up(client, stream, "198.18.5.2")
    assert done == [] and client.state is ClientState.STARTING  # the hook runs
    env = spawner.spawned[0][3]
    assert env["CELLVPN_EVENT"] == "up" and env["CELLVPN_ADDRESS"] == "198.18.5.2"
    assert (env["CELLVPN_SERVER"], env["CELLVPN_SESSION_ID"]) == ("192.0.2.1:8089", "0x00001234")
    assert seen[0]["address"] == "198.18.5.2" and seen[0]["prefix"] == 24
    end(spawner.spawned[0][0], 1)  # a failing hook, not required: only logged
    assert done == [None] and client.state is ClientState.STARTED


def test_a_new_address_runs_down_for_the_old_one_then_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, spawner = hooked(tmp_path, monkeypatch)
    downs: list[dict[str, Any]] = []
    client.on_down.append(downs.append)
    stream = established(client, PEER)
    bring_up(client, stream, "198.18.5.2")
    end(spawner.spawned[0][0], 0)
    bring_up(client, stream, "198.18.5.2")  # the same address: nothing runs again
    assert len(spawner.spawned) == 1
    bring_up(client, stream, "198.18.5.3")
    events = [(s[3]["CELLVPN_EVENT"], s[3]["CELLVPN_ADDRESS"]) for s in spawner.spawned]
    assert events == [("up", "198.18.5.2"), ("down", "198.18.5.2")]
    end(spawner.spawned[1][0], 0)
    assert spawner.spawned[2][3]["CELLVPN_ADDRESS"] == "198.18.5.3"
    assert downs[0]["reason"] == "a new address"


def test_a_failing_required_up_fails_the_start_for_good_and_down_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, spawner = hooked(tmp_path, monkeypatch, required=True)
    client._keep_trying = True
    stream = established(client, PEER)
    done: list[Any] = []
    d = client._serial(lambda: client._bring_up(stream, reply("198.18.5.2")))
    d.addErrback(client._bring_up_failed, stream)
    d.addBoth(done.append)
    end(spawner.spawned[0][0], 3)
    assert client.state is ClientState.STOPPED
    assert client.last_error == f"the up hook {tmp_path / 'hook.sh'} failed: exit status 3"
    assert client._retry is None  # permanent: no retry
    assert [s[3]["CELLVPN_EVENT"] for s in spawner.spawned] == ["up", "down"]
    assert spawner.spawned[1][3]["CELLVPN_REASON"].startswith("cannot start: the up hook")
    end(spawner.spawned[1][0], 0)
    assert client.up_facts is None
    assert not isinstance(done[0], Failure)
