"""Several server processes on one database: ids still follow commit order, so a reader tailing
over HTTP with `after=next` receives every event exactly once while both processes write."""
import gevent
import requests

from tests.conftest import auth

EVENTS = "/api/v1/events"


def test_tail_across_two_writing_processes_misses_nothing(make_server, database_url):
    a = make_server(database_url, DB_POOL_SIZE="2")
    b = make_server(database_url, DB_POOL_SIZE="2")
    writers_done = []

    def writer(server, w):
        session = requests.Session()
        for i in range(40):
            body = [{"stream": f"mp/{w}", "data": [w, i, j]} for j in range(1 + i % 4)]
            r = session.post(server.url + EVENTS, json=body, headers=auth("writer"), timeout=20)
            assert r.status_code == 201, r.text
        writers_done.append(w)

    seen = []

    def tail():
        session = requests.Session()
        after = ""
        while True:
            finished = len(writers_done) == 6
            server = (a, b)[len(seen) % 2]  # alternate which process serves the read
            page = session.get(server.url + EVENTS, params={"clientId": "writer", "after": after,
                                                           "limit": 1000},
                               headers=auth("reader"), timeout=20).json()
            committed = [e for e in page["events"] if not e.get("pending")]
            seen.extend(int(e["id"]) for e in committed)
            after = page["next"]
            if finished and not committed:
                return
            gevent.sleep(0.005)

    jobs = [gevent.spawn(writer, (a, b)[w % 2], w) for w in range(6)] + [gevent.spawn(tail)]
    gevent.joinall(jobs, raise_error=True, timeout=180)
    everything = requests.get(a.url + EVENTS, params={"clientId": "writer", "limit": 1000},
                              headers=auth("reader"), timeout=20).json()["events"]
    assert len(everything) == sum(1 + i % 4 for i in range(40)) * 6
    assert seen == [int(e["id"]) for e in everything]  # every event, once, in id order
