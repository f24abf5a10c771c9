"""The Procfile's commands, run as written: `release` migrates, `web` serves with gunicorn's
gevent pywsgi workers and drains on SIGTERM."""

import os
import signal
import subprocess
import sys

import gevent
import pytest
import requests

from embedded.servers import free_port
from tests.helpers import ROOT, argv, auth, fresh_database, procfile, run_env, wait_until

pytestmark = pytest.mark.slow  # several server processes


def test_release_applies_migrations(pg_admin_url, redis_url, tmp_path):
    import psycopg2

    from ingest.store import MIGRATIONS_DIR
    from tests.helpers import admin_execute, with_database

    name = f"release_{os.getpid()}"
    admin_execute(pg_admin_url, f"CREATE DATABASE {name}")
    url = with_database(pg_admin_url, name)
    r = subprocess.run(
        argv(procfile()["release"]),
        cwd=ROOT,
        env=run_env(url, redis_url, tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    conn = psycopg2.connect(url)
    with conn.cursor() as cur:
        cur.execute("SELECT version FROM sluice_migrations")
        assert [row[0] for row in cur.fetchall()] == sorted(
            p.stem for p in MIGRATIONS_DIR.glob("*.sql")
        )  # every one, 0003_key_batches too
    conn.close()


def test_web_serves_with_several_workers_and_drains_on_sigterm(pg_admin_url, redis_url, tmp_path):
    database_url = fresh_database(pg_admin_url)
    port = free_port()
    env = run_env(
        database_url,
        redis_url,
        tmp_path,
        PORT=str(port),
        WEB_CONCURRENCY="2",
        DB_POOL_SIZE="2",
        HOST="127.0.0.1",
    )
    log = open(tmp_path / "web.log", "wb")
    proc = subprocess.Popen(argv(procfile()["web"]), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
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
            r = requests.post(
                url + "/api/v1/events",
                json={"stream": "web", "data": i, "key": str(i)},
                headers=auth(),
                timeout=20,
            )
            assert r.status_code == 201, r.text
            return r.json()["events"][0]["id"]

        ids = [g.get() for g in [gevent.spawn(publish, i) for i in range(200)]]
        assert len(set(ids)) == 200
        # Many requests on one keep-alive connection, as production clients send them.
        with requests.Session() as session:
            for i in range(200, 230):
                r = session.post(
                    url + "/api/v1/events", json={"stream": "web", "data": i}, headers=auth(), timeout=20
                )
                assert r.status_code == 201, r.text
        assert "Traceback" not in (tmp_path / "web.log").read_text()
        # The master loads config/gunicorn.py before the workers patch: it must not import the
        # stack (gevent warns, and unpatched modules misbehave).
        assert "MonkeyPatchWarning" not in (tmp_path / "web.log").read_text()
        page = requests.get(
            url + "/api/v1/events", params={"stream": "web", "limit": 1000}, headers=auth(), timeout=20
        ).json()
        assert sorted(e["data"] for e in page["events"]) == list(range(230))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        out = (tmp_path / "web.log").read_text()
        assert out.count("batcher flushed") == 2, out
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_app_json_describes_a_deployable_app():
    import json

    from config.settings import SETTINGS_DOC, Settings

    app = json.loads((ROOT / "app.json").read_text())
    plans = [a["plan"].split(":")[0] for a in app["addons"]]
    assert plans == ["heroku-postgresql", "heroku-redis"]
    assert set(app["formation"]) <= set(procfile())
    assert set(app["env"]) <= set(SETTINGS_DOC)  # every config var is a real setting
    assert app["env"]["SLUICE_SECRET"]["generator"] == "secret"
    # The config it creates is accepted as production configuration.
    env = {k: v.get("value", "") for k, v in app["env"].items()}
    env.update(SLUICE_SECRET="generated", DYNO="web.1")
    settings = Settings.from_env(env)
    assert settings.production and settings.proxy_hops == 1 and not settings.redis_verify_tls


def test_python_version_file_matches_the_tested_interpreter():
    pinned = (ROOT / ".python-version").read_text().strip()
    assert pinned == f"{sys.version_info.major}.{sys.version_info.minor}"


def test_metrics_add_up_every_worker_and_each_request_logs_one_json_line(pg_admin_url, redis_url, tmp_path):
    import json

    database_url = fresh_database(pg_admin_url)
    port = free_port()
    env = run_env(
        database_url,
        redis_url,
        tmp_path,
        PORT=str(port),
        WEB_CONCURRENCY="2",
        DB_POOL_SIZE="2",
        HOST="127.0.0.1",
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    out = open(tmp_path / "web.out", "wb")
    proc = subprocess.Popen(argv(procfile()["web"]), cwd=ROOT, env=env, stdout=out, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    secret_token = auth("log-check")["Authorization"].split()[1]
    try:

        def up():
            assert proc.poll() is None
            try:
                return requests.get(url + "/readyz", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_until(up, timeout=60, message="gunicorn to serve")
        requests.put(url + "/api/v1/streams/m", headers=auth(), timeout=10)

        def publish(i):
            r = requests.post(
                url + "/api/v1/events?token=" + secret_token,
                json={"stream": "m", "data": i},
                headers={"Authorization": f"Bearer {secret_token}"},
                timeout=20,
            )
            assert r.status_code == 201, r.text

        # Concurrent requests on fresh connections: both workers take some.
        gevent.joinall([gevent.spawn(publish, i) for i in range(120)], raise_error=True)

        def pids():
            lines = [
                json.loads(line)
                for line in (tmp_path / "web.out").read_text().splitlines()
                if line.startswith("{")
            ]
            return {line["pid"] for line in lines if line["route"] == "/api/v1/events"}, lines

        wait_until(lambda: len(pids()[1]) >= 122, 10, message="the request log lines")
        served_by, lines = pids()
        assert len(served_by) == 2, "both workers served requests"
        posts = [line for line in lines if line["method"] == "POST"]
        assert len(posts) == 120
        assert all(
            line["status"] == 201 and line["path"] == "/api/v1/events" and line["ms"] >= 0 for line in posts
        )
        text = (tmp_path / "web.out").read_text()
        assert secret_token not in text and "token=" not in text
        # Whichever worker answers, /metrics adds up both.
        for _ in range(6):
            metrics = requests.get(url + "/metrics", timeout=10).text
            assert 'sluice_http_responses_total{route="/api/v1/events",status="201"} 120.0' in metrics
            assert "sluice_events_in_total 120.0" in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            out.close()
