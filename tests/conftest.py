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
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Iterator  # noqa: E402
from urllib.parse import urlsplit, urlunsplit  # noqa: E402

import psycopg2  # noqa: E402
import pytest  # noqa: E402
import requests  # noqa: E402

from embedded.servers import EmbeddedPostgres, EmbeddedRedis, free_port  # noqa: E402
from ingest.pool import Pool  # noqa: E402
from ingest.store import EventStore  # noqa: E402
from streaming.tokens import mint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-of-reasonable-length-0123456789"
TEMPLATE_DB = "sluice_template"
_db_counter = itertools.count(1)


def wait_until(predicate: Callable[[], object], timeout: float = 15.0, interval: float = 0.02,
               message: str = "condition") -> object:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(interval)


def with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


def admin_execute(url: str, sql: str) -> None:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def prepare_template(url: str) -> None:
    admin_execute(url, f"DROP DATABASE IF EXISTS {TEMPLATE_DB}")
    admin_execute(url, f"CREATE DATABASE {TEMPLATE_DB}")
    pool = Pool(with_database(url, TEMPLATE_DB), 1)
    with pool.connection() as conn:
        EventStore().migrate(conn)
    pool.close()


def fresh_database(admin_url: str) -> str:
    """A new database cloned from the migrated template; returns its URL."""
    name = f"t_{os.getpid()}_{next(_db_counter)}"
    admin_execute(admin_url, f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB} STRATEGY FILE_COPY")
    return with_database(admin_url, name)


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
    pg.stop()


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
    pg.stop()


def ingest_request(client: str = "c", n: int = 1, stream: str = "s", key: str | None = None):
    """An IngestRequest of `n` events, for tests that drive the store or batcher directly."""
    from ingest.events import IngestRequest, NewEvent

    return IngestRequest(client, [NewEvent(stream, "message", str(i), key) for i in range(n)])


def token(sub: str = "client-1", publish=("**",), subscribe=("**",), ttl_s: float = 3600,
          secret: str = SECRET, **claims) -> str:
    return mint(secret, sub, publish=publish, subscribe=subscribe, ttl_s=ttl_s, **claims)


def auth(sub: str = "client-1", **kw) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub, **kw)}"}


class SluiceServer:
    """`python app.py` in a subprocess on a free port; killable and restartable."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.port = int(env["PORT"])
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "SluiceServer":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return requests.get(self.url + "/healthz", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_until(up, timeout, 0.05, "the server to answer /healthz")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def get(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 15)
        return requests.get(self.url + path, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 15)
        return requests.post(self.url + path, **kw)

    def put(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 15)
        return requests.put(self.url + path, **kw)

    def delete(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 15)
        return requests.delete(self.url + path, **kw)


def _server_env(database_url: str, redis_url: str, data_dir: Path, **env: str) -> dict[str, str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("DYNO", "SLUICE_ENV")}
    full_env.update({
        "PORT": str(free_port()), "HOST": "127.0.0.1", "DATABASE_URL": database_url,
        "REDIS_URL": redis_url, "SLUICE_SECRET": SECRET, "SLUICE_DATA_DIR": str(data_dir),
        "PYTHONUNBUFFERED": "1",
    })
    full_env.update({k: str(v) for k, v in env.items()})
    return full_env


@pytest.fixture
def make_server(tmp_path: Path, redis_url: str) -> Iterator[Callable[..., SluiceServer]]:
    """Factory: make_server(database_url, **env) starts a server; all are stopped afterwards."""
    servers: list[SluiceServer] = []
    counter = itertools.count(1)

    def factory(database_url: str, start: bool = True, **env: str) -> SluiceServer:
        server = SluiceServer(_server_env(database_url, redis_url, tmp_path / "data", **env),
                              tmp_path / f"server-{next(counter)}.log")
        servers.append(server)
        return server.start() if start else server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., SluiceServer], database_url: str) -> SluiceServer:
    return make_server(database_url)


@pytest.fixture(scope="module")
def module_server(tmp_path_factory: pytest.TempPathFactory, pg_admin_url: str,
                  redis_url: str) -> Iterator[SluiceServer]:
    """One server for a whole module of tests that leave no trace (e.g. rejected input)."""
    tmp = tmp_path_factory.mktemp("module-server")
    server = SluiceServer(_server_env(fresh_database(pg_admin_url), redis_url, tmp / "data"),
                          tmp / "server.log").start()
    yield server
    server.stop()
