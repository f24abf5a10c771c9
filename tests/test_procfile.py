"""The Procfile's commands, run as written: `release` migrates, `web` serves with gunicorn's
gevent pywsgi workers and drains on SIGTERM."""
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import gevent
import requests

from embedded.servers import free_port
from tests.conftest import ROOT, SECRET, auth, fresh_database, wait_until


def procfile() -> dict[str, str]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = command.strip()
    return entries


def run_env(database_url: str, redis_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DYNO", "SLUICE_ENV")}
    env.update(DATABASE_URL=database_url, REDIS_URL=redis_url, SLUICE_SECRET=SECRET,
               SLUICE_DATA_DIR=str(tmp_path / "data"), PYTHONUNBUFFERED="1", **extra)
    return env


def argv(command: str) -> list[str]:
    words = shlex.split(command)
    if words[0] in ("python", "python3"):
        words[0] = sys.executable
    elif words[0] == "gunicorn":
        words[:1] = [sys.executable, "-m", "gunicorn"]
    return words


def test_release_applies_migrations(pg_admin_url, redis_url, tmp_path):
    import psycopg2

    from tests.conftest import admin_execute, with_database
    name = f"release_{os.getpid()}"
    admin_execute(pg_admin_url, f"CREATE DATABASE {name}")
    url = with_database(pg_admin_url, name)
    r = subprocess.run(argv(procfile()["release"]), cwd=ROOT, env=run_env(url, redis_url, tmp_path),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    conn = psycopg2.connect(url)
    with conn.cursor() as cur:
        cur.execute("SELECT version FROM sluice_migrations")
        assert [row[0] for row in cur.fetchall()] == ["0001_events"]
    conn.close()


def test_web_serves_with_several_workers_and_drains_on_sigterm(pg_admin_url, redis_url, tmp_path):
    database_url = fresh_database(pg_admin_url)
    port = free_port()
    env = run_env(database_url, redis_url, tmp_path, PORT=str(port), WEB_CONCURRENCY="2",
                  DB_POOL_SIZE="2", HOST="127.0.0.1")
    log = open(tmp_path / "web.log", "wb")
    proc = subprocess.Popen(argv(procfile()["web"]), cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            assert proc.poll() is None, (tmp_path / "web.log").read_text()
            try:
                return requests.get(url + "/readyz", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_until(up, timeout=60, message="gunicorn to serve")

        def publish(i):
            r = requests.post(url + "/api/v1/events", json={"stream": "web", "data": i, "key": str(i)},
                              headers=auth(), timeout=20)
            assert r.status_code == 201, r.text
            return r.json()["events"][0]["id"]

        ids = [g.get() for g in [gevent.spawn(publish, i) for i in range(200)]]
        assert len(set(ids)) == 200
        # Many requests on one keep-alive connection, as production clients send them.
        with requests.Session() as session:
            for i in range(200, 230):
                r = session.post(url + "/api/v1/events", json={"stream": "web", "data": i},
                                 headers=auth(), timeout=20)
                assert r.status_code == 201, r.text
        assert "Traceback" not in (tmp_path / "web.log").read_text()
        page = requests.get(url + "/api/v1/events", params={"stream": "web", "limit": 1000},
                            headers=auth(), timeout=20).json()
        assert sorted(e["data"] for e in page["events"]) == list(range(230))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        out = (tmp_path / "web.log").read_text()
        assert out.count("batcher flushed") == 2, out
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
