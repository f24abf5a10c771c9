"""Helpers shared by the test modules: real servers, tokens, waiting, and databases cloned from a
migrated template. Fixtures live in conftest.py; test modules import from here, never from each
other."""

from __future__ import annotations

import itertools
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import requests

from auth.tokens import mint
from embedded.servers import free_port
from ingest.pool import Pool
from ingest.store import EventStore

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-of-reasonable-length-0123456789"
TEMPLATE_DB = "sluice_template"
_db_counter = itertools.count(1)


class PositionLock:
    """Holds the position counter's row lock: every batch waits, nothing commits."""

    def __init__(self, database_url: str) -> None:
        self.conn = psycopg2.connect(database_url)
        with self.conn.cursor() as cur:
            cur.execute("SELECT last FROM sluice_position FOR UPDATE")

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()


def wait_until(
    predicate: Callable[[], object], timeout: float = 15.0, interval: float = 0.02, message: str = "condition"
) -> object:
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


def ingest_request(client: str = "c", n: int = 1, stream: str = "s", key: str | None = None):
    """An IngestRequest of `n` events, for tests that drive the store or batcher directly."""
    from ingest.events import IngestRequest, NewEvent

    return IngestRequest(client, [NewEvent(stream, "message", str(i), key) for i in range(n)])


def token(
    sub: str = "client-1",
    publish=("**",),
    subscribe=("**",),
    ttl_s: float = 3600,
    secret: str = SECRET,
    **claims,
) -> str:
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

    def start(self, timeout: float = 30.0) -> SluiceServer:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py")],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
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


def server_env(database_url: str, redis_url: str, data_dir: Path, **env: str) -> dict[str, str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("DYNO", "SLUICE_ENV")}
    full_env.update(
        {
            "PORT": str(free_port()),
            "HOST": "127.0.0.1",
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "SLUICE_SECRET": SECRET,
            "SLUICE_DATA_DIR": str(data_dir),
            "PYTHONUNBUFFERED": "1",
        }
    )
    full_env.update({k: str(v) for k, v in env.items()})
    return full_env


SSE = "/api/v1/sse"
POLL = "/api/v1/poll"
EVENTS = "/api/v1/events"


def publish(server: SluiceServer, stream: str, data: Any, type_: str = "message") -> str:
    """POST one event and return its id (the request must succeed)."""
    r = server.post(EVENTS, json={"stream": stream, "type": type_, "data": data}, headers=auth())
    assert r.status_code == 201, r.text
    return r.json()["events"][0]["id"]


def open_stream(
    server: SluiceServer, streams: Any, headers: dict[str, str] | None = None, **params: Any
) -> Any:
    """An SSE connection to `streams` with a token for everything (headers override)."""
    from tests.sse import Stream

    return Stream(
        server.url + SSE, headers={**auth(), **(headers or {})}, params={"stream": streams, **params}
    )


def open_sse(server: SluiceServer, streams: Any, tok: str | None = None, **params: Any) -> Any:
    """An SSE connection to `streams` with the given token (default: one for everything)."""
    from tests.sse import Stream

    return Stream(
        server.url + SSE,
        headers={"Authorization": f"Bearer {tok or token()}"},
        params={"stream": streams, **params},
    )


def procfile() -> dict[str, str]:
    """The Procfile's process types and their commands, as written."""
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = command.strip()
    return entries


def run_env(database_url: str, redis_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment for a Procfile command run with the test interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ("DYNO", "SLUICE_ENV")}
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        SLUICE_SECRET=SECRET,
        SLUICE_DATA_DIR=str(tmp_path / "data"),
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def argv(command: str) -> list[str]:
    """A Procfile command with `python` / `gunicorn` bound to the test interpreter."""
    words = shlex.split(command)
    if words[0] in ("python", "python3"):
        words[0] = sys.executable
    elif words[0] == "gunicorn":
        words[:1] = [sys.executable, "-m", "gunicorn"]
    return words


class HealthProbe:
    """Asks `/healthz` every `interval` s in a greenlet while the block runs; `worst` is the
    slowest answer seen (seconds), `answers` how many came (a frozen process answers none)."""

    def __init__(self, server: SluiceServer, interval: float = 0.02) -> None:
        self.server, self.interval = server, interval
        self.worst, self.answers, self._stop = 0.0, 0, False
        self._greenlet: Any = None

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop:
            began = time.monotonic()
            session.get(self.server.url + "/healthz", timeout=30).raise_for_status()
            self.worst = max(self.worst, time.monotonic() - began)
            self.answers += 1
            time.sleep(self.interval)

    def __enter__(self) -> HealthProbe:
        import gevent

        self._greenlet = gevent.spawn(self._run)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._greenlet.join(timeout=60)
        self._greenlet.get(block=False)  # re-raises what the probe hit (a refused connection)
