"""Test session: real PostgreSQL and Redis servers the session starts itself, and real Sluice
servers (`python app.py` subprocesses) on free ports.

Each test that needs a database gets its own, cloned from a migrated template, so tests never see
each other's events. Fault tests start their own Postgres so they can stop, kill and restart it.
Set DATABASE_URL / REDIS_URL to run against servers you started instead (no fault tests then need
them: those always start their own).
"""

from gevent import monkey

monkey.patch_all()

import psycogreen.gevent  # noqa: E402

psycogreen.gevent.patch_psycopg()

import itertools  # noqa: E402
import os  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from embedded.servers import EmbeddedPostgres, EmbeddedRedis  # noqa: E402
from ingest.pool import Pool  # noqa: E402
from ingest.store import EventStore  # noqa: E402
from tests.helpers import SluiceServer, fresh_database, prepare_template, server_env  # noqa: E402


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("DATABASE_URL"):
        url = os.environ["DATABASE_URL"]
        prepare_template(url)
        yield url
        return
    pg = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data").start()
    prepare_template(pg.url)
    yield pg.url
    pg.remove()  # the session's databases: nothing of them is kept


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    rd = EmbeddedRedis(tmp_path_factory.mktemp("redis") / "data").start()
    yield rd.url
    rd.stop()


@pytest.fixture
def database_url(pg_admin_url: str) -> str:
    return fresh_database(pg_admin_url)


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A Postgres server for this test alone, migrated, which the test may stop or kill."""
    pg = EmbeddedPostgres(tmp_path / "pgdata").start()
    pool = Pool(pg.url, 1)
    with pool.connection() as conn:
        EventStore().migrate(conn)
    pool.close()
    yield pg
    pg.remove()


@pytest.fixture
def make_server(tmp_path: Path, redis_url: str) -> Iterator[Callable[..., SluiceServer]]:
    """Factory: make_server(database_url, **env) starts a server; all are stopped afterwards."""
    servers: list[SluiceServer] = []
    counter = itertools.count(1)

    def factory(database_url: str, start: bool = True, **env: str) -> SluiceServer:
        server = SluiceServer(
            server_env(database_url, redis_url, tmp_path / "data", **env),
            tmp_path / f"server-{next(counter)}.log",
        )
        servers.append(server)
        return server.start() if start else server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., SluiceServer], database_url: str) -> SluiceServer:
    return make_server(database_url)


@pytest.fixture(scope="module")
def module_server(
    tmp_path_factory: pytest.TempPathFactory, pg_admin_url: str, redis_url: str
) -> Iterator[SluiceServer]:
    """One server for a whole module of tests that leave no trace (e.g. rejected input)."""
    tmp = tmp_path_factory.mktemp("module-server")
    server = SluiceServer(
        server_env(fresh_database(pg_admin_url), redis_url, tmp / "data"), tmp / "server.log"
    ).start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis server for this test alone, which the test may stop and restart."""
    rd = EmbeddedRedis(tmp_path / "redis").start()
    yield rd
    rd.stop()
