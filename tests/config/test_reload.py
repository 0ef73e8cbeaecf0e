"""What a reload applies and what waits for a restart, decided on configs alone."""

from __future__ import annotations

from pathlib import Path

from cellvpn.config import load_client_config, load_server_config
from cellvpn.config.reload import describe, plan_reload
from cellvpn.config.schema import LogLevelName
from cellvpn.server.service import SERVER_RELOADABLE


def test_changes_are_split_into_applied_and_restart() -> None:
    running = load_server_config(None, {"billing.price": "10", "srv_vpn.mtu": "1400"})
    new = load_server_config(
        None,
        {
            "billing.price": "20",
            "srv_vpn.mtu": "1280",
            "server.log_level": "warn",
            "edge.connect_rate": "5",
            "edge.ledger_queue": "100",
        },
    )
    plan = plan_reload(running, new, SERVER_RELOADABLE)
    assert plan.applied == ("[server] log_level", "[edge] connect_rate", "[billing] price")
    assert plan.needs_restart == ("[edge] ledger_queue", "[srv_vpn] mtu")
    c = plan.config
    assert c.billing.price == 20 and c.server.log_level is LogLevelName.WARN
    assert c.edge.connect_rate == 5
    assert c.srv_vpn.mtu == 1400 and c.edge.ledger_queue == running.edge.ledger_queue
    assert plan.changed("billing") and plan.changed("edge") and not plan.changed("srv_vpn")
    assert describe(plan) == [
        "reload: applied [server] log_level, [edge] connect_rate, [billing] price",
        "reload: not applied (needs a restart): [edge] ledger_queue, [srv_vpn] mtu",
    ]


def test_nothing_changed() -> None:
    config = load_client_config(None, {"client.kill_switch": "true"})
    plan = plan_reload(config, config, {"client": {"kill_switch"}})
    assert plan.config == config and describe(plan) == ["reload: nothing changed"]


def test_the_new_files_warnings_are_kept(tmp_path: Path) -> None:
    """The running config carries the warnings of the file it now stands for."""
    path = tmp_path / "c.cfg"
    path.write_text("[client]\nkill_switch = yes\nkillswitch = yes\n")
    new = load_client_config(path)
    plan = plan_reload(load_client_config(None), new, {"client": {"kill_switch"}})
    assert plan.config.client.kill_switch and plan.config.warnings == new.warnings != ()


def test_hook_paths_and_timeouts_are_applied_by_a_reload(tmp_path: Path) -> None:
    from cellvpn.client.service import CLIENT_RELOADABLE

    script = tmp_path / "hook.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    running = load_server_config(None, {})
    new = load_server_config(
        None,
        {
            "srv_vpn.session_up": str(script),
            "srv_vpn.session_down": str(script),
            "srv_vpn.hook_timeout": "3",
        },
    )
    plan = plan_reload(running, new, SERVER_RELOADABLE)
    assert plan.needs_restart == ()
    assert plan.config.srv_vpn.session_up == script and plan.config.srv_vpn.hook_timeout == 3
    client = plan_reload(
        load_client_config(None, {}),
        load_client_config(
            None, {"client.up": str(script), "client.down": str(script), "client.up_required": "1"}
        ),
        CLIENT_RELOADABLE,
    )
    assert client.applied == ("[client] up", "[client] down", "[client] up_required")
    assert client.config.client.up == script and client.config.client.up_required
