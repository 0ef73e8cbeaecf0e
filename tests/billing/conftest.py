"""The ledger backends the billing tests run against: SQLite, and PostgreSQL on a real server.

The PostgreSQL server is a throwaway cluster made for the test session (``pgcluster.py``:
``initdb`` and ``postgres`` as the ``postgres`` user, its data and its Unix socket in a
temporary folder, no TCP at all), stopped and removed at the end, also when tests fail, or the
one ``CELLVPN_TEST_POSTGRES`` names (a URL). Each test gets a fresh schema, dropped after
it. Without root, the binaries or psycopg the PostgreSQL runs are skipped, unless
CELLVPN_REQUIRE_NETNS=1 (CI) makes that a failure.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .pgcluster import PG_BIN_GLOB, PgCluster, PgClusterError, pg_bin


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CELLVPN_REQUIRE_NETNS") == "1":
        pytest.fail(reason + " (CELLVPN_REQUIRE_NETNS=1)")
    pytest.skip(reason)


class PgServer:
    """A PostgreSQL server the tests make ledgers on: a schema each, on one database, so a
    fresh ledger costs a CREATE SCHEMA (milliseconds) and a given server needs one database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._names = itertools.count(1)

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql)

    def create(self) -> str:
        """A fresh, empty schema; the URL of a ledger in it."""
        name = f"cellvpn_test_{os.getpid()}_{next(self._names)}"
        self._admin(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        self._admin(f'CREATE SCHEMA "{name}"')
        joiner = "&" if "?" in self.url else "?"
        return f"{self.url}{joiner}options=-csearch_path%3D{name}"

    def drop(self, url: str) -> None:
        name = url.rpartition("search_path%3D")[2]
        self._admin(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL server: CELLVPN_TEST_POSTGRES, or a throwaway cluster."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _skip_or_fail("needs psycopg for the PostgreSQL ledger (pip install -e '.[postgres]')")
    given = os.environ.get("CELLVPN_TEST_POSTGRES")
    if given:
        yield PgServer(given)
        return
    if os.geteuid() != 0:
        _skip_or_fail("needs root to run a throwaway PostgreSQL server as the postgres user")
    binaries = pg_bin()
    if binaries is None or shutil.which("runuser") is None:
        _skip_or_fail(f"needs the PostgreSQL server ({PG_BIN_GLOB}; apt install postgresql)")
        return
    try:
        cluster = PgCluster(binaries)
    except PgClusterError as e:
        pytest.fail(f"the throwaway PostgreSQL server did not start: {e}")
    try:
        yield PgServer(cluster.url)
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def ledger_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of a fresh, empty ledger of the test's backend."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    server: PgServer = request.getfixturevalue("pg_server")
    url = server.create()
    try:
        yield url
    finally:
        server.drop(url)


@pytest.fixture
def fresh_ledgers(backend: str, request: pytest.FixtureRequest) -> Iterator[Callable[[], Any]]:
    """A factory of fresh ledgers of the test's backend (one per hypothesis example), each
    closed and removed at the end of the test."""
    from cellvpn.billing.sqlite import open_ledger

    made: list[tuple[Any, str, Path | None]] = []
    server: PgServer | None = None
    if backend == "postgres":
        server = request.getfixturevalue("pg_server")

    def make() -> Any:
        if server is None:
            folder = Path(tempfile.mkdtemp(prefix="cellvpn-ledger-"))
            url, cleanup = f"sqlite:///{folder / 'ledger.db'}", folder
        else:
            url, cleanup = server.create(), None
        led = open_ledger(url)
        made.append((led, url, cleanup))
        return led

    try:
        yield make
    finally:
        for led, url, folder in made:
            led.close()
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            elif server is not None:
                server.drop(url)
