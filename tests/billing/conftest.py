"""The ledger backends the billing tests run against: SQLite, and PostgreSQL on a real server.

The PostgreSQL server is a throwaway cluster made for the test session (``initdb`` and
``postgres`` as the ``postgres`` user, its data and its Unix socket in a temporary folder, no
TCP at all), stopped and removed at the end, or the one ``CELLVPN_TEST_POSTGRES`` names (a
URL). Each test gets a fresh database, dropped after it. Without root or without the
binaries the PostgreSQL runs are skipped, unless CELLVPN_REQUIRE_NETNS=1 (CI) makes that a
failure.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

#: where Debian's postgresql packages put the server binaries
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
#: the port only names the socket file (.s.PGSQL.<port>) in the cluster's own folder
PG_PORT = 55432


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CELLVPN_REQUIRE_NETNS") == "1":
        pytest.fail(reason + " (CELLVPN_REQUIRE_NETNS=1)")
    pytest.skip(reason)


def _pg_bin() -> Path | None:
    found = sorted(glob.glob(PG_BIN_GLOB), key=lambda p: int(Path(p).parent.name or 0))
    for folder in reversed(found):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    return None


def _as_postgres(*argv: str | Path) -> None:
    subprocess.run(
        ["runuser", "-u", "postgres", "--", *map(str, argv)],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=120,
    )


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
    pg_bin = _pg_bin()
    if pg_bin is None or shutil.which("runuser") is None:
        _skip_or_fail(f"needs the PostgreSQL server ({PG_BIN_GLOB}; apt install postgresql)")
        return
    top = Path(tempfile.mkdtemp(prefix="cellvpn-pg-"))
    data, sock, log = top / "data", top / "sock", top / "postgres.log"
    started = False
    try:
        sock.mkdir()
        shutil.chown(top, "postgres", "postgres")
        shutil.chown(sock, "postgres", "postgres")
        _as_postgres(
            pg_bin / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync",
            "-E", "UTF8", "--locale=C",
        )  # fmt: skip
        options = (
            f"-c listen_addresses='' -k {sock} -p {PG_PORT} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
        )
        _as_postgres(pg_bin / "pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "start")
        started = True
        yield PgServer(f"postgresql:///postgres?host={sock}&port={PG_PORT}&user=postgres")
    except subprocess.CalledProcessError as e:
        output = e.stdout.decode(errors="replace") if e.stdout else ""
        if log.exists():
            output += log.read_text(errors="replace")
        pytest.fail(f"the throwaway PostgreSQL server did not start: {output[-2000:]}")
    finally:
        if started:
            _as_postgres(pg_bin / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(top, ignore_errors=True)


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
