"""A graceful restart under load, as Heroku does it: a new web process (the Procfile's gunicorn
command, two workers) comes up, then the old one gets SIGTERM while writers publish, SSE clients
stream and long-poll clients hold. Nothing acknowledged is lost, every SSE client is told
`retry:` and resumes on the new process from its Last-Event-ID with no gap and no duplicate,
every held poll gets an answer, and the old process exits well inside 30 s."""

import signal
import subprocess
import time

import gevent
import pytest
import requests

from embedded.servers import free_port
from tests.helpers import ROOT, argv, auth, fresh_database, procfile, run_env, wait_until
from tests.sse import Stream

pytestmark = pytest.mark.slow  # several server processes

EVENTS = "/api/v1/events"


def start_web(database_url, redis_url, tmp_path, name):
    port = free_port()
    env = run_env(
        database_url,
        redis_url,
        tmp_path,
        PORT=str(port),
        WEB_CONCURRENCY="2",
        DB_POOL_SIZE="2",
        HOST="127.0.0.1",
        RETRY_BASE_MS="200",
        RETRY_MAX_MS="400",
        MAX_RECONNECTS="1000",
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = open(tmp_path / f"{name}.log", "wb")
    proc = subprocess.Popen(argv(procfile()["web"]), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up():
        assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()
        try:
            return requests.get(url + "/readyz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    wait_until(up, timeout=60, message=f"{name} to serve")
    return proc, url, log


def test_sigterm_under_load_loses_nothing_and_everyone_resumes_on_the_new_process(
    pg_admin_url, redis_url, tmp_path
):
    database_url = fresh_database(pg_admin_url)
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old, old_url, old_log = start_web(database_url, redis_url, tmp_path / "old", "old")
    requests.put(old_url + "/api/v1/streams/g", headers=auth(), timeout=10)
    requests.put(old_url + "/api/v1/streams/quiet", headers=auth(), timeout=10)
    new, new_url, new_log = start_web(database_url, redis_url, tmp_path / "new", "new")
    target = {"url": old_url}  # where clients go now (the router, in Heroku's terms)
    acknowledged: set[str] = set()
    stop_writing = gevent.event.Event()

    def writer(w):
        session = requests.Session()
        n = 0
        while not stop_writing.is_set():
            body = [{"stream": "g", "data": [w, n, j], "key": f"{w}-{n}-{j}"} for j in range(2)]
            while True:  # until acknowledged: the same keys again, wherever the router sends it
                try:
                    r = session.post(target["url"] + EVENTS, json=body, headers=auth("writer"), timeout=20)
                    if r.status_code in (200, 201):
                        acknowledged.update(e["id"] for e in r.json()["events"])
                        break
                except requests.RequestException:
                    session = requests.Session()
                gevent.sleep(0.05)
            n += 1
            gevent.sleep(0.01)

    def sse_client(k, total):
        got, last, url, told_to_retry = [], "0", old_url, False

        def done():
            return total["n"] and len(got) >= total["n"]

        while not done():
            s = Stream(url + "/api/v1/sse", headers={**auth(), "Last-Event-ID": last}, params={"stream": "g"})
            if s.response.status_code != 200:
                s.close()
                gevent.sleep(0.1)
                url = target["url"]
                continue
            saw_event = False
            while not done():
                try:
                    item = s.next(("event", "retry"), timeout=1)
                except gevent.Timeout:
                    continue  # quiet: check whether everything has arrived
                if item[0] == "end":
                    break
                if item[0] == "retry" and saw_event and url == old_url:
                    told_to_retry = True  # a retry: after events: the old process's goodbye
                if item[0] == "event":
                    saw_event = True
                    got.append(item[1])
                    last = item[1]
            s.close()
            url = target["url"]
        return got, told_to_retry, url

    def poller(k):
        """Holds a long-poll on the old process across the SIGTERM; returns its status."""
        r = requests.get(
            old_url + "/api/v1/poll", params={"stream": "quiet", "timeout": "25"}, headers=auth(), timeout=40
        )
        return r.status_code

    total = {"n": 0}
    writers = [gevent.spawn(writer, w) for w in range(4)]
    clients = [gevent.spawn(sse_client, k, total) for k in range(8)]
    pollers = [gevent.spawn(poller, k) for k in range(4)]
    wait_until(lambda: len(acknowledged) >= 200, 30, message="load on the old process")
    gevent.sleep(0.5)  # the polls are held now

    target["url"] = new_url  # the router sends new connections to the new process...
    started = time.monotonic()
    old.send_signal(signal.SIGTERM)  # ...and the old one is told to stop
    assert old.wait(timeout=30) == 0  # Heroku kills at 30 s
    print(f"old web process stopped {time.monotonic() - started:.2f} s after SIGTERM")
    gevent.sleep(1.0)  # some load on the new process alone
    stop_writing.set()
    gevent.joinall(writers, timeout=60, raise_error=True)

    # Everything acknowledged is stored, once.
    history, after = [], "0"
    while True:
        page = requests.get(
            new_url + EVENTS,
            params={"stream": "g", "after": after, "limit": "1000"},
            headers=auth(),
            timeout=20,
        ).json()
        if not page["events"]:
            break
        history += [e["id"] for e in page["events"]]
        after = page["next"]
    assert acknowledged <= set(history)
    assert len(history) == len(set(history))
    total["n"] = len(history)
    # Every SSE client: told to retry, resumed on the new process, every event once, in order.
    for job in clients:
        got, told_to_retry, ended_on = job.get(timeout=120)
        ids = [event_id.rpartition(".")[2] for event_id in got]
        assert ids == history
        assert told_to_retry
        assert ended_on == new_url
    assert [job.get(timeout=40) for job in pollers] == [200] * 4  # answered, not dropped
    old_log.close()
    text = (tmp_path / "old" / "old.log").read_text()
    assert text.count("batcher flushed") == 2, text  # both workers flushed before exiting
    assert "NOT flushed" not in text
    new.send_signal(signal.SIGTERM)
    assert new.wait(timeout=30) == 0
    new_log.close()
