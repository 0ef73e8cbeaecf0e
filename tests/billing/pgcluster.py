"""A throwaway PostgreSQL server on a Unix socket of its own (the tests' and the bench's).

``initdb`` and ``pg_ctl`` from Debian's ``/usr/lib/postgresql/<version>/bin`` run as the
``postgres`` user (``runuser -u postgres --``); the data and the socket live in a temporary
folder, ``listen_addresses = ''`` keeps it off TCP altogether, and :meth:`PgCluster.stop`
stops it and removes the folder. Plain functions, so a benchmark can use it as well.
"""

from __future__ import annotations

import glob
import shutil
import subprocess
import tempfile
from pathlib import Path

#: where Debian's postgresql packages put the server binaries
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
#: the port only names the socket file (.s.PGSQL.<port>) in the cluster's own folder
PG_PORT = 55432


class PgClusterError(Exception):
    """The server could not be made or started; the message holds its log's tail."""


def pg_bin() -> Path | None:
    """The newest installed server's binaries, if any."""
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


class PgCluster:
    """A started throwaway server; ``url`` is its ``postgres`` database, as superuser."""

    def __init__(self, binaries: Path, durable: bool = False) -> None:
        self.bin = binaries
        self.top = Path(tempfile.mkdtemp(prefix="cellvpn-pg-"))
        self.data, self.sock = self.top / "data", self.top / "sock"
        self.log = self.top / "postgres.log"
        self.started = False
        try:
            self.sock.mkdir()
            shutil.chown(self.top, "postgres", "postgres")
            shutil.chown(self.sock, "postgres", "postgres")
            _as_postgres(
                self.bin / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust",
                "--no-sync", "-E", "UTF8", "--locale=C",
            )  # fmt: skip
            options = f"-c listen_addresses='' -k {self.sock} -p {PG_PORT} -c max_connections=100"
            if not durable:  # tests: a crash of the host loses nothing anyone needs
                options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            _as_postgres(
                self.bin / "pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "start"
            )
            self.started = True
        except (subprocess.CalledProcessError, OSError) as e:
            output = getattr(e, "stdout", b"") or b""
            text = output.decode(errors="replace") if isinstance(output, bytes) else str(output)
            if self.log.exists():
                text += self.log.read_text(errors="replace")
            self.stop()
            raise PgClusterError(f"{e}: {text[-2000:]}") from None
        self.url = f"postgresql:///postgres?host={self.sock}&port={PG_PORT}&user=postgres"

    def stop(self) -> None:
        """Stop the server (immediate: nothing in it is kept) and remove its folder."""
        if self.started:
            self.started = False
            _as_postgres(self.bin / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.top, ignore_errors=True)
