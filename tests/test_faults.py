"""Fault injection against real server processes: Postgres stopped mid-ingest, the server killed
with SIGKILL under load, SIGTERM while busy, backpressure, and the connection bound.

Each load loop is bounded in count and time and targets only 127.0.0.1.
"""

import collections
import os
import signal
import subprocess
import sys
from pathlib import Path

import gevent
import psycopg2
import requests

from embedded.servers import child_pids, free_port
from tests.helpers import ROOT, PositionLock, auth, wait_until

EVENTS = "/api/v1/events"
BATCH = 10


class Load:
    """Concurrent producers posting keyed batches until stopped; records every outcome."""

    def __init__(self, server, producers: int = 10, max_requests: int = 5000) -> None:
        self.server = server
        self.acked: dict[str, list[str]] = {}  # request tag -> keys, for 2xx answers
        self.unacked: dict[str, list[str]] = {}  # request tag -> keys, for anything else
        self.statuses: collections.Counter = collections.Counter()
        self.retry_after_on_503 = True
        self.stopped = False
        self.max_requests = max_requests
        self.sent = 0
        self.greenlets = [gevent.spawn(self._producer, p) for p in range(producers)]

    def _producer(self, p: int) -> None:
        session = requests.Session()
        headers = auth("loader")
        n = 0
        while not self.stopped and self.sent < self.max_requests:
            self.sent += 1
            tag = f"p{p}-r{n}"
            n += 1
            keys = [f"{tag}-e{i}" for i in range(BATCH)]
            body = [{"stream": f"load/{p}", "data": {"k": k}, "key": k} for k in keys]
            try:
                r = session.post(self.server.url + EVENTS, json=body, headers=headers, timeout=20)
                status = r.status_code
                if status == 503 and "Retry-After" not in r.headers:
                    self.retry_after_on_503 = False
            except requests.RequestException:
                status = "error"
            self.statuses[status] += 1
            (self.acked if status in (200, 201) else self.unacked)[tag] = keys
            if status not in (200, 201):
                gevent.sleep(0.02)

    def stop(self) -> None:
        self.stopped = True
        gevent.joinall(self.greenlets, timeout=60)
        assert all(g.dead for g in self.greenlets), "a producer hung"


def stored_keys(database_url: str) -> collections.Counter:
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT key FROM events WHERE client_id = 'loader'")
            return collections.Counter(row[0] for row in cur.fetchall())
    finally:
        conn.close()


def assert_all_or_nothing(load: Load, keys: collections.Counter) -> None:
    for tag, batch in {**load.acked, **load.unacked}.items():
        present = sum(1 for k in batch if keys[k])
        assert present in (0, BATCH), f"request {tag} half-written: {present}/{BATCH}"


def test_postgres_stopped_mid_ingest(make_server, own_postgres):
    server = make_server(own_postgres.url, DB_CONNECT_TIMEOUT_S="2", INGEST_COMMIT_TIMEOUT_S="5")
    load = Load(server)
    wait_until(lambda: len(load.acked) >= 20, message="some acknowledged requests")
    own_postgres.stop()
    before = load.statuses[503]
    wait_until(lambda: load.statuses[503] >= before + 10, message="503s while Postgres is down")
    assert load.retry_after_on_503
    ready = server.get("/readyz")
    assert ready.status_code == 503 and ready.json()["database"].startswith("unavailable")
    own_postgres.start()
    acked_before = len(load.acked)
    wait_until(
        lambda: len(load.acked) >= acked_before + 20,
        timeout=30,
        message="ingest to recover without a restart",
    )
    load.stop()
    keys = stored_keys(own_postgres.url)
    assert all(keys[k] == 1 for batch in load.acked.values() for k in batch)
    assert max(keys.values()) == 1
    assert_all_or_nothing(load, keys)
    assert load.statuses["error"] == 0  # the server itself stayed up and answered


def test_sigkill_under_load_loses_no_acknowledged_event(make_server, database_url):
    server = make_server(database_url)
    load = Load(server, producers=16)
    wait_until(lambda: len(load.acked) >= 100, message="acknowledged requests under load")
    server.kill()
    load.stop()
    assert load.unacked, "the kill should interrupt some requests"
    keys = stored_keys(database_url)
    missing = [k for batch in load.acked.values() for k in batch if not keys[k]]
    assert missing == []
    assert_all_or_nothing(load, keys)

    # Restart and retry every unacknowledged request with the same keys: no duplicates.
    server.start()
    session = requests.Session()
    for tag, batch in load.unacked.items():
        p = tag.split("-")[0][1:]
        body = [{"stream": f"load/{p}", "data": {"k": k}, "key": k} for k in batch]
        r = session.post(server.url + EVENTS, json=body, headers=auth("loader"), timeout=20)
        assert r.status_code in (200, 201), r.text
    keys = stored_keys(database_url)
    sent = {k for batch in [*load.acked.values(), *load.unacked.values()] for k in batch}
    assert set(keys) == sent and max(keys.values()) == 1


def test_sigterm_while_busy_flushes_and_exits(make_server, database_url):
    server = make_server(database_url)
    load = Load(server, producers=8)
    wait_until(lambda: len(load.acked) >= 30, message="acknowledged requests")
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=25) == 0
    load.stop()
    keys = stored_keys(database_url)
    assert all(keys[k] == 1 for batch in load.acked.values() for k in batch)
    assert_all_or_nothing(load, keys)
    assert "batcher flushed" in server.log()


def test_backlog_full_is_503_with_retry_after(make_server, database_url):
    server = make_server(
        database_url,
        INGEST_MAX_BACKLOG="20",
        MAX_BATCH_EVENTS="10",
        BATCH_MAX_EVENTS="1000",
        INGEST_COMMIT_TIMEOUT_S="30",
    )
    lock = PositionLock(database_url)  # nothing commits: what is accepted stays in the backlog
    body = [{"stream": "bp", "data": i} for i in range(10)]
    results = [gevent.spawn(server.post, EVENTS, json=body, headers=auth()) for _ in range(5)]
    wait_until(lambda: sum(g.dead for g in results) == 3, message="three refusals")
    lock.release()
    gevent.joinall(results, raise_error=True)
    statuses = collections.Counter(g.value.status_code for g in results)
    assert statuses[201] == 2 and statuses[503] == 3
    refused = next(g.value for g in results if g.value.status_code == 503)
    assert refused.headers["Retry-After"] and refused.json()["type"].endswith("backlog-full")
    page = server.get(EVENTS, params={"stream": "bp", "limit": 100}, headers=auth()).json()
    assert len(page["events"]) == 20


def test_pool_bound_holds_under_http_load(make_server, database_url):
    server = make_server(database_url, DB_POOL_SIZE="2")
    load = Load(server, producers=12, max_requests=400)
    peak = 0
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    readers = [
        gevent.spawn(
            lambda: [server.get(EVENTS, params={"stream": "load/1"}, headers=auth()) for _ in range(20)]
        )
        for _ in range(6)
    ]
    while not all(g.dead for g in load.greenlets):
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'sluice'"
                " AND datname = current_database()"
            )
            peak = max(peak, cur.fetchone()[0])
        gevent.sleep(0.01)
    gevent.joinall(readers, raise_error=True)
    conn.close()
    load.stop()
    assert 1 <= peak <= 2
    assert load.statuses[201] + load.statuses[200] == 400


def test_production_refuses_to_start_without_a_secret(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("SLUICE_SECRET", "SLUICE_SECRETS")}
    env.update(
        SLUICE_ENV="production",
        DATABASE_URL="postgresql://x@127.0.0.1:1/x",
        REDIS_URL="redis://127.0.0.1:1",
        PORT=str(free_port()),
    )
    r = subprocess.run(
        [sys.executable, str(ROOT / "app.py")], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "SLUICE_SECRET" in r.stderr


def test_embedded_default_starts_serves_and_stops_cleanly(tmp_path):
    """`python app.py` with no URLs: real embedded Postgres and Redis, cleaned up on SIGTERM."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL", "SLUICE_SECRET", "SLUICE_SECRETS", "DYNO", "SLUICE_ENV")
    }
    port = free_port()
    env.update(PORT=str(port), SLUICE_DATA_DIR=str(tmp_path / "data"), PYTHONUNBUFFERED="1")
    log = open(tmp_path / "out.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py")], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
    )
    try:

        def token_line():
            lines = (tmp_path / "out.log").read_text().splitlines()
            for i, line in enumerate(lines):
                if "development token" in line and i + 1 < len(lines):
                    return lines[i + 1].strip()
            assert proc.poll() is None, (tmp_path / "out.log").read_text()
            return None

        dev_token = wait_until(token_line, timeout=60, message="the dev token banner")
        out = (tmp_path / "out.log").read_text()
        assert "embedded PostgreSQL" in out and "embedded Redis" in out and "WARNING" in out
        # The README's first example, as written, with the token it printed.
        bearer = {"Authorization": f"Bearer {dev_token}"}
        r = requests.post(
            f"http://127.0.0.1:{port}{EVENTS}",
            headers=bearer,
            timeout=10,
            json={"stream": "client/1", "data": {"hello": "world"}},
        )
        assert r.status_code == 201
        page = requests.get(
            f"http://127.0.0.1:{port}{EVENTS}", params={"clientId": "client-1"}, headers=bearer, timeout=10
        ).json()
        assert [(e["stream"], e["data"]) for e in page["events"]] == [("client/1", {"hello": "world"})]
        assert requests.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
        children = child_pids(proc.pid)
        assert len(children) >= 2  # postgres and redis
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=25) == 0
        wait_until(lambda: not any(_alive(c) for c in children), message="embedded servers to stop")
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and ") Z " not in stat.read_text()
