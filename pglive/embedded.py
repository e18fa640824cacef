"""A local PostgreSQL cluster with pg_cron, for the demo, the tests and development.

The cluster lives in ``$PGLIVE_HOME`` (default ``.pglive/`` in the current directory): it is
made with ``initdb`` on first start and reused afterwards. It listens on a Unix socket only,
in a short directory of its own, so no password is needed and nothing is exposed on the
network; the port is chosen once and kept, so the DSN stays the same across restarts.

PostgreSQL refuses to run as root. When pglive runs as root, the server runs as the
``postgres`` user, and the data directory goes where that user can reach it: every directory
above ``$PGLIVE_HOME`` must be searchable by it, and a clone under ``/root`` or ``mktemp -d``
is not, so the data then lives in ``/var/tmp/pglive-<hash>/`` and ``$PGLIVE_HOME`` holds a
note saying where.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

from pglive.errors import EmbeddedClusterError

logger = logging.getLogger(__name__)

DATABASE_NAME = "pglive"
SUPERUSER = "postgres"
SERVER_USER_WHEN_ROOT = "postgres"


@dataclasses.dataclass(frozen=True)
class ClusterLayout:
    """Where one cluster's files live, and how to reach it."""

    home: Path
    data_dir: Path
    socket_dir: Path
    log_file: Path
    port: int

    @property
    def dsn(self) -> str:
        return (
            f"host={self.socket_dir} port={self.port} dbname={DATABASE_NAME} "
            f"user={SUPERUSER}"
        )


def default_home() -> Path:
    return Path(os.environ.get("PGLIVE_HOME") or ".pglive").resolve()


def find_bindir() -> Path:
    """The bin directory of the newest installed PostgreSQL (``PGLIVE_PG_BINDIR`` wins)."""
    configured = os.environ.get("PGLIVE_PG_BINDIR")
    if configured:
        return Path(configured)

    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: (
            int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0
        ),
    )
    if candidates:
        return candidates[-1].parent

    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent

    raise EmbeddedClusterError(
        "PostgreSQL server binaries not found (no initdb): install them "
        "(Debian: apt-get install postgresql) or set PGLIVE_PG_BINDIR"
    )


def pg_cron_installed(bindir: Path) -> bool:
    sharedir = _pg_config(bindir, "--sharedir")
    return (Path(sharedir) / "extension" / "pg_cron.control").exists()


def _pg_config(bindir: Path, flag: str) -> str:
    pg_config = bindir / "pg_config"
    if not pg_config.exists():
        version = bindir.parent.name
        return f"/usr/share/postgresql/{version}"
    return subprocess.run(
        [str(pg_config), flag], check=True, capture_output=True, text=True
    ).stdout.strip()


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _reachable_by(user: str, path: Path) -> bool:
    """Whether ``user`` can search every directory from / down to ``path``."""
    entry = pwd.getpwnam(user)
    for directory in [path, *path.parents]:
        if not directory.exists():
            continue
        stat = directory.stat()
        if stat.st_uid == entry.pw_uid:
            allowed = stat.st_mode & 0o100
        elif stat.st_gid == entry.pw_gid:
            allowed = stat.st_mode & 0o010
        else:
            allowed = stat.st_mode & 0o001
        if not allowed:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def layout(home: Path | None = None) -> ClusterLayout:
    """The layout of the cluster in ``home``, decided once and remembered in ``cluster.json``."""
    home = (home or default_home()).resolve()
    note = home / "cluster.json"
    if note.exists():
        saved = json.loads(note.read_text())
        return ClusterLayout(
            home=home,
            data_dir=Path(saved["data_dir"]),
            socket_dir=Path(saved["socket_dir"]),
            log_file=Path(saved["log_file"]),
            port=int(saved["port"]),
        )

    digest = hashlib.sha1(str(home).encode()).hexdigest()[:10]
    if _running_as_root() and not _reachable_by(SERVER_USER_WHEN_ROOT, home):
        base = Path("/var/tmp") / f"pglive-{digest}"
    else:
        base = home
    chosen = ClusterLayout(
        home=home,
        data_dir=base / "data",
        # Socket paths are limited to about 107 bytes: keep this one short.
        socket_dir=Path("/tmp") / f"pglive-{digest}",
        # The server writes this log as the postgres user when root: beside the data.
        log_file=base / "logs" / "postgresql.log",
        port=_free_port(),
    )
    home.mkdir(parents=True, exist_ok=True)
    note.write_text(
        json.dumps(
            {
                "data_dir": str(chosen.data_dir),
                "socket_dir": str(chosen.socket_dir),
                "log_file": str(chosen.log_file),
                "port": chosen.port,
            },
            indent=2,
        )
        + "\n"
    )
    return chosen


class EmbeddedCluster:
    """Start, stop and inspect the local cluster of one ``$PGLIVE_HOME``."""

    def __init__(self, home: Path | None = None, *, fast_unsafe: bool = False) -> None:
        self.layout = layout(home)
        self.bindir = find_bindir()
        # fsync off is for throwaway test clusters only: it makes a power loss lose data.
        self.fast_unsafe = fast_unsafe

    @property
    def dsn(self) -> str:
        return self.layout.dsn

    def _server_command(self, *args: str) -> list[str]:
        if _running_as_root():
            return ["runuser", "-u", SERVER_USER_WHEN_ROOT, "--", *args]
        return list(args)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            self._server_command(*args),
            check=check,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )

    def initialized(self) -> bool:
        return (self.layout.data_dir / "PG_VERSION").exists()

    def running(self) -> bool:
        if not self.initialized():
            return False
        result = self._run(
            str(self.bindir / "pg_ctl"),
            "status",
            "-D",
            str(self.layout.data_dir),
            check=False,
        )
        return result.returncode == 0

    def _prepare_directories(self) -> None:
        for directory in (
            self.layout.data_dir.parent,
            self.layout.socket_dir,
            self.layout.log_file.parent,
        ):
            directory.mkdir(parents=True, exist_ok=True)
        if _running_as_root():
            entry = pwd.getpwnam(SERVER_USER_WHEN_ROOT)
            for directory in (
                self.layout.data_dir.parent,
                self.layout.socket_dir,
                self.layout.log_file.parent,
            ):
                os.chown(directory, entry.pw_uid, entry.pw_gid)
            if self.layout.log_file.exists():
                os.chown(self.layout.log_file, entry.pw_uid, entry.pw_gid)

    def _initdb(self) -> None:
        logger.info("creating a PostgreSQL cluster in %s", self.layout.data_dir)
        result = self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.layout.data_dir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            check=False,
        )
        if result.returncode != 0:
            raise EmbeddedClusterError(
                f"initdb failed for {self.layout.data_dir}: "
                f"{result.stderr.strip().splitlines()[-1] if result.stderr else 'no output'}"
            )

        settings = {
            "listen_addresses": "''",
            "port": str(self.layout.port),
            "unix_socket_directories": f"'{self.layout.socket_dir}'",
            "shared_preload_libraries": "'pg_cron'",
            "cron.database_name": f"'{DATABASE_NAME}'",
            # With a socket-only server pg_cron's default libpq connection to localhost fails;
            # background workers need no connection at all.
            "cron.use_background_workers": "on",
            "max_worker_processes": "32",
            "max_connections": "200",
            "log_line_prefix": "'%m [%p] %q%u@%d '",
        }
        if self.fast_unsafe:
            settings |= {
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
            }
        config = self.layout.data_dir / "postgresql.auto.conf"
        lines = [f"{key} = {value}" for key, value in settings.items()]
        self._run(
            "sh",
            "-c",
            f"cat >> '{config}' <<'EOF'\n" + "\n".join(lines) + "\nEOF",
        )

    def start(self, *, timeout: float = 60.0) -> str:
        """Start the cluster (creating it first if needed) and return its DSN. Idempotent."""
        if not pg_cron_installed(self.bindir):
            version = self.bindir.parent.name
            raise EmbeddedClusterError(
                f"pg_cron is not installed for PostgreSQL {version}: "
                f"apt-get install postgresql-{version}-cron"
            )

        self._prepare_directories()
        if not self.initialized():
            self._initdb()

        if not self.running():
            logger.info("starting PostgreSQL (data %s)", self.layout.data_dir)
            result = self._run(
                str(self.bindir / "pg_ctl"),
                "start",
                "-w",
                "-t",
                str(int(timeout)),
                "-D",
                str(self.layout.data_dir),
                "-l",
                str(self.layout.log_file),
                check=False,
            )
            if result.returncode != 0:
                raise EmbeddedClusterError(
                    f"PostgreSQL did not start: {self._last_server_error()} "
                    f"(log: {self.layout.log_file})"
                )

        self._wait_until_accepting(timeout)
        self._ensure_database()
        return self.dsn

    def _last_server_error(self) -> str:
        try:
            lines = self.layout.log_file.read_text(errors="replace").splitlines()
        except OSError as error:
            return f"no server log ({error.strerror})"
        problems = [line for line in lines if "FATAL" in line or "ERROR" in line]
        return (problems or lines or ["the server log is empty"])[-1].strip()

    def _wait_until_accepting(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            result = subprocess.run(
                [
                    str(self.bindir / "pg_isready"),
                    "-h",
                    str(self.layout.socket_dir),
                    "-p",
                    str(self.layout.port),
                    "-q",
                ],
                check=False,
            )
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise EmbeddedClusterError(
                    f"PostgreSQL does not accept connections after {timeout:.0f} s; "
                    f"see {self.layout.log_file}"
                )
            time.sleep(0.1)

    def _ensure_database(self) -> None:
        import psycopg

        admin_dsn = self.dsn.replace(f"dbname={DATABASE_NAME}", "dbname=postgres")
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')

    def stop(self, *, mode: str = "fast") -> bool:
        """Stop the cluster; False when it was not running."""
        if not self.running():
            return False
        self._run(
            str(self.bindir / "pg_ctl"),
            "stop",
            "-w",
            "-m",
            mode,
            "-D",
            str(self.layout.data_dir),
        )
        return True

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        """Stop the cluster and delete its files (for throwaway test clusters)."""
        with contextlib.suppress(Exception):
            self.stop(mode="immediate")
        shutil.rmtree(self.layout.data_dir.parent, ignore_errors=True)
        shutil.rmtree(self.layout.socket_dir, ignore_errors=True)
        shutil.rmtree(self.layout.home, ignore_errors=True)

    def status(self) -> dict[str, object]:
        return {
            "home": str(self.layout.home),
            "data_dir": str(self.layout.data_dir),
            "socket_dir": str(self.layout.socket_dir),
            "port": self.layout.port,
            "log_file": str(self.layout.log_file),
            "initialized": self.initialized(),
            "running": self.running(),
            "dsn": self.dsn,
        }

    def psql_command(self) -> list[str]:
        psql = self.bindir / "psql"
        return [str(psql if psql.exists() else "psql"), self.dsn]
