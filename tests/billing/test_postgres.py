"""What only the PostgreSQL ledger has: its URL, its schema version, a server that goes away."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from cellvpn.billing.interfaces import LedgerUnavailableError
from cellvpn.billing.sqlite import LedgerOpenError, open_ledger

from .conftest import PgServer
from .helpers import key

CLIENT = key("client")


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    url = pg_server.create()
    yield url
    pg_server.drop(url)


def _execute(url: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)


def test_an_unknown_schema_version_is_refused_with_one_line(pg_url: str) -> None:
    open_ledger(pg_url).close()
    _execute(pg_url, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(LedgerOpenError, match="schema version 99; this cellvpn reads version 4"):
        open_ledger(pg_url)


def test_a_database_of_other_tables_is_not_taken_for_a_ledger(pg_url: str) -> None:
    _execute(pg_url, "CREATE TABLE someone_elses (x int)")
    with pytest.raises(LedgerOpenError, match="holds tables but no cellvpn ledger"):
        open_ledger(pg_url)


def test_without_create_an_empty_database_is_no_ledger(pg_url: str) -> None:
    with pytest.raises(LedgerOpenError, match="there is no ledger in"):
        open_ledger(pg_url, create=False)
    open_ledger(pg_url).close()
    open_ledger(pg_url, create=False).close()


def test_a_server_that_is_not_there_is_one_line_without_the_password(tmp_path: Path) -> None:
    url = f"postgresql://cellvpn:s3cret@/ledger?host={tmp_path}/nowhere&connect_timeout=2"
    with pytest.raises(LedgerOpenError) as info:
        open_ledger(url)
    message = str(info.value)
    assert message.startswith("cannot open ledger postgresql://cellvpn:***@")
    assert "s3cret" not in message and "\n" not in message
    with pytest.raises(LedgerOpenError) as info:
        open_ledger(f"postgresql:///ledger?host={tmp_path}/nowhere&password=s3cret")
    assert "password=***" in str(info.value) and "s3cret" not in str(info.value)


def test_a_malformed_url_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        LedgerOpenError, match=re.escape("ledger URL 'postgresql:///ledger?nosuchoption=1'")
    ):
        open_ledger("postgresql:///ledger?nosuchoption=1")


def test_a_lost_connection_is_unavailable_once_then_the_ledger_reconnects(pg_url: str) -> None:
    ledger = open_ledger(pg_url)
    ledger.mint(CLIENT.account, 7)
    _execute(
        pg_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'cellvpn' AND pid <> pg_backend_pid()",
    )
    with pytest.raises(LedgerUnavailableError):
        ledger.balance(CLIENT.account)
    assert ledger.balance(CLIENT.account) == 7
    ok, figures = ledger.check_invariant()
    assert ok and figures["minted"] == 7
    ledger.close()


def test_money_is_exact_at_78_digits(pg_url: str) -> None:
    ledger = open_ledger(pg_url)
    big = 2**256 - 1
    assert ledger.mint(CLIENT.account, big) == big
    assert ledger.balance(CLIENT.account) == big
    with pytest.raises(ValueError, match="at most"):
        ledger.mint(CLIENT.account, big + 1)
    ledger.close()


def test_the_config_takes_a_postgresql_url(tmp_path: Path) -> None:
    from cellvpn.config.fields import ParseError
    from cellvpn.config.schema import LEDGER_URL

    for url in ("postgresql://cellvpn@db.example/cellvpn", "postgres:///ledger?host=/run/pg"):
        assert LEDGER_URL.parse(url, tmp_path) == url
    with pytest.raises(ParseError):
        LEDGER_URL.parse("mysql://db.example/cellvpn", tmp_path)


@pytest_twisted.ensureDeferred
async def test_a_server_runs_its_billing_on_a_postgresql_ledger(
    pg_url: str, tmp_path: Path, reactor: Any
) -> None:
    """``[ledger] url = postgresql://...``: the server opens it, publishes its order and serves
    ledger calls from its worker thread, as it does on SQLite."""
    from cellvpn.billing.postgres import PostgresLedger
    from cellvpn.config import load_server_config
    from cellvpn.server.service import VPNServerService

    config = load_server_config(
        None,
        {
            "server.listen": "tcp:0:interface=127.0.0.1",
            "server.state_dir": str(tmp_path / "state"),
            "srv_vpn.enabled": "false",
            "billing.price": "10",
            "ledger.url": pg_url,
        },
    )
    service = VPNServerService(config, reactor)
    service.privilegedStartService()
    service.startService()
    try:
        assert service.ledger is not None and service.billing is not None
        orders = await service.ledger.orders()
        assert [o.order.provider for o in orders] == [service.billing.key.public]
        assert await service.ledger.mint(CLIENT.account, 10**25) == 10**25
        ok, figures = await service.ledger.check_invariant()
        assert ok and figures["minted"] == 10**25
    finally:
        await service.stopService()
    ledger = open_ledger(pg_url, create=False)
    assert isinstance(ledger, PostgresLedger) and ledger.balance(CLIENT.account) == 10**25
    ledger.close()
