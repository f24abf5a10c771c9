"""The production install, tested as deployed: a virtualenv built from `requirements.txt` alone
(no dev requirements, nothing from the test interpreter), then the Procfile's `release` and
`web` commands run by a shell exactly as written, with `WEB_CONCURRENCY=2` against real
Postgres and Redis URLs, as a Heroku dyno would.

The virtualenv is cached per (requirements.txt, Python version) under `~/.cache/sluice/`, so
only the first run on a machine pays for the install; pip's own wheel cache covers the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest
import requests

from embedded.servers import free_port
from tests.helpers import ROOT, SECRET, admin_execute, auth, procfile, wait_until, with_database
from tests.sse import Stream

pytestmark = pytest.mark.slow


def runtime_venv() -> Path:
    """A virtualenv holding exactly what `pip install -r requirements.txt` installs."""
    requirements = (ROOT / "requirements.txt").read_bytes()
    digest = hashlib.sha256(requirements + sys.version.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sluice"
    venv = cache / f"runtime-venv-{digest}"
    if (venv / "installed").exists():
        return venv
    building = venv.with_name(venv.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(building)], check=True, timeout=120)
    # The venv records its own path in scripts: build it in place, then mark it complete.
    shutil.rmtree(venv, ignore_errors=True)
    building.rename(venv)
    subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-r",
            str(ROOT / "requirements.txt"),
        ],
        check=True,
        timeout=900,
    )
    (venv / "installed").write_text(digest)
    return venv


def dyno_env(venv: Path, database_url: str, redis_url: str, tmp_path: Path) -> dict[str, str]:
    """What a dyno's process sees: the venv first on PATH, config vars, nothing of the tests."""
    return {
        "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "DYNO": "web.1",
        "PORT": str(free_port()),
        "HOST": "127.0.0.1",
        "WEB_CONCURRENCY": "2",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "SLUICE_SECRET": SECRET,
        "SLUICE_DATA_DIR": str(tmp_path / "data"),
        "DB_POOL_SIZE": "2",
    }


def test_runtime_install_boots_the_procfile_as_deployed(pg_admin_url, redis_url, tmp_path):
    venv = runtime_venv()
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    )
    names = {p["name"].lower() for p in json.loads(installed.stdout)}
    assert "gunicorn" in names and "pytest" not in names  # runtime only: nothing hides a gap

    name = f"deploy_{os.getpid()}"
    admin_execute(pg_admin_url, f"DROP DATABASE IF EXISTS {name}")
    admin_execute(pg_admin_url, f"CREATE DATABASE {name}")
    database_url = with_database(pg_admin_url, name)
    env = dyno_env(venv, database_url, redis_url, tmp_path)
    commands = procfile()

    release = subprocess.run(
        ["/bin/sh", "-c", commands["release"]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert release.returncode == 0, release.stdout + release.stderr
    conn = psycopg2.connect(database_url)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM sluice_migrations")
        assert cur.fetchone()[0] >= 1
    conn.close()

    log_path = tmp_path / "web.log"
    with open(log_path, "wb") as log:
        web = subprocess.Popen(
            ["/bin/sh", "-c", "exec " + commands["web"]],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{env['PORT']}"
    try:

        def ready() -> bool:
            assert web.poll() is None, log_path.read_text()
            try:
                return requests.get(url + "/readyz", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_until(ready, timeout=90, message="the Procfile's web to be ready")
        assert requests.get(url + "/readyz", timeout=5).json()["status"] == "ready"

        r = requests.put(url + "/api/v1/streams/deploy/check", headers=auth(), timeout=10)
        assert r.status_code in (200, 201), r.text
        stream = Stream(url + "/api/v1/sse", headers=auth(), params={"stream": "deploy/check"})
        try:
            assert stream.response.status_code == 200
            assert stream.response.headers["Content-Type"].startswith("text/event-stream")
            assert stream.next(kinds=("retry",))[0] == "retry"  # the preamble: subscribed
            r = requests.post(
                url + "/api/v1/events",
                headers=auth(),
                timeout=20,
                json={"stream": "deploy/check", "data": {"n": 1}, "key": "k1"},
            )
            assert r.status_code == 201, r.text
            event_id = r.json()["events"][0]["id"]
            ((sse_id, sse_type, sse_data),) = stream.events(1, timeout=20)
        finally:
            stream.close()
        assert (sse_id.rsplit(".", 1)[1], sse_type, json.loads(sse_data)) == (event_id, "message", {"n": 1})

        metrics = requests.get(url + "/metrics", timeout=10)
        assert metrics.status_code == 200
        assert "sluice_events_in_total 1.0" in metrics.text
        assert "Traceback" not in log_path.read_text()
        assert "MonkeyPatchWarning" not in log_path.read_text()
    finally:
        web.send_signal(signal.SIGTERM)
        try:
            assert web.wait(timeout=30) == 0, log_path.read_text()
        finally:
            if web.poll() is None:
                web.kill()
