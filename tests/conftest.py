"""Test fixtures: one real PostgreSQL with pg_cron for the whole run.

Where it comes from, in order of preference:
1. ``PGLIVE_TEST_DSN``: an existing database (migrated here; pg_cron tests need it to be
   pg_cron's database).
2. A throwaway local cluster made with initdb/pg_ctl (as the postgres user when root).
3. testcontainers, where Docker runs, with an image that has pg_cron
   (``PGLIVE_TEST_IMAGE``).

Tests are isolated by machine id rather than by database: every test gets a fresh
``machine_id``, and pglive keys everything (slots, settings, NOTIFY channels) by machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row

from pglive.embedded import EmbeddedCluster
from pglive.errors import EmbeddedClusterError
from pglive.migrate import migrate
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parent.parent


@dataclass
class TestDatabase:
    dsn: str
    cluster: EmbeddedCluster | None = None

    def restart(self) -> None:
        """Restart the server under everything connected to it."""
        if self.cluster is None:
            pytest.skip("restarting PostgreSQL needs the throwaway local cluster")
        self.cluster.stop(mode="fast")
        self.cluster.start()

    def stop(self) -> None:
        if self.cluster is None:
            pytest.skip("stopping PostgreSQL needs the throwaway local cluster")
        self.cluster.stop(mode="fast")

    def start(self) -> None:
        assert self.cluster is not None
        self.cluster.start()


@contextlib.contextmanager
def _external() -> Iterator[TestDatabase]:
    yield TestDatabase(os.environ["PGLIVE_TEST_DSN"])


@contextlib.contextmanager
def _local_cluster() -> Iterator[TestDatabase]:
    home = Path(tempfile.mkdtemp(prefix="pglive-test-", dir="/tmp"))
    home.chmod(0o755)  # the postgres user must reach the data directory
    cluster = EmbeddedCluster(home, fast_unsafe=True)
    try:
        dsn = cluster.start()
        yield TestDatabase(dsn=dsn, cluster=cluster)
    finally:
        cluster.destroy()


@contextlib.contextmanager
def _container() -> Iterator[TestDatabase]:
    # TODO: untested here (no Docker engine on these machines); the stock postgres image has
    # no pg_cron, so PGLIVE_TEST_IMAGE must name one that does.
    from testcontainers.postgres import PostgresContainer

    image = os.environ.get("PGLIVE_TEST_IMAGE", "postgres:15")
    container = PostgresContainer(image, dbname="pglive").with_command(
        "-c shared_preload_libraries=pg_cron -c cron.database_name=pglive "
        "-c cron.use_background_workers=on -c max_worker_processes=32"
    )
    with container:
        url = container.get_connection_url(driver=None)
        yield TestDatabase(dsn=url)


@pytest.fixture(scope="session")
def database() -> Iterator[TestDatabase]:
    if os.environ.get("PGLIVE_TEST_DSN"):
        source = _external()
    elif shutil.which("initdb") or list(
        Path("/usr/lib/postgresql").glob("*/bin/initdb")
    ):
        source = _local_cluster()
    else:
        try:
            import docker

            docker.from_env().ping()
        except Exception as error:
            raise EmbeddedClusterError(
                "no PostgreSQL for the tests: set PGLIVE_TEST_DSN, install the server "
                f"(apt-get install postgresql postgresql-15-cron), or run Docker ({error})"
            ) from None
        source = _container()

    with source as test_database:
        migrate(test_database.dsn)
        yield test_database


@pytest.fixture(scope="session")
def dsn(database: TestDatabase) -> str:
    return database.dsn


@pytest.fixture
def machine_id() -> uuid.UUID:
    return uuid.uuid4()


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection; every statement is committed at once."""
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as connection:
        yield connection


@pytest.fixture
def subprocess_env(dsn: str, machine_id: uuid.UUID) -> dict[str, str]:
    """The environment for real pglive processes of this test's machine."""
    env = dict(os.environ)
    env.update(
        PGLIVE_DSN=dsn,
        MACHINE_ID=str(machine_id),
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
    )
    return env


__all__ = ["TestDatabase", "wait_for"]
