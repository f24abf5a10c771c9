"""Several server processes on one database: ids still follow commit order, so a reader tailing
over HTTP with `after=next` receives every event exactly once while both processes write."""

import json

import gevent
import requests

from tests.helpers import auth

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
            page = session.get(
                server.url + EVENTS,
                params={"clientId": "writer", "after": after, "limit": 1000},
                headers=auth("reader"),
                timeout=20,
            ).json()
            committed = [e for e in page["events"] if not e.get("pending")]
            seen.extend(int(e["id"]) for e in committed)
            after = page["next"]
            if finished and not committed:
                return
            gevent.sleep(0.005)

    jobs = [gevent.spawn(writer, (a, b)[w % 2], w) for w in range(6)] + [gevent.spawn(tail)]
    gevent.joinall(jobs, raise_error=True, timeout=180)
    everything = requests.get(
        a.url + EVENTS, params={"clientId": "writer", "limit": 1000}, headers=auth("reader"), timeout=20
    ).json()["events"]
    assert len(everything) == sum(1 + i % 4 for i in range(40)) * 6
    assert seen == [int(e["id"]) for e in everything]  # every event, once, in id order


def test_sse_subscribers_hopping_between_processes_under_writers_on_both(make_server, database_url):
    from tests.sse import Stream

    # These clients hop far faster than any `retry:` allows, on purpose: lift the cap.
    a = make_server(database_url, DB_POOL_SIZE="2", MAX_RECONNECTS="100000")
    b = make_server(database_url, DB_POOL_SIZE="2", MAX_RECONNECTS="100000")
    a.put("/api/v1/streams/hop", headers=auth())
    per_writer, done = 150, []

    def writer(server, w):
        session = requests.Session()
        for i in range(per_writer):
            body = [{"stream": "hop", "data": [w, i, j]} for j in range(1 + i % 3)]
            r = session.post(server.url + EVENTS, json=body, headers=auth("writer"), timeout=20)
            assert r.status_code == 201, r.text
            gevent.sleep(0.005)
        done.append(w)

    expected_total = 2 * sum(1 + i % 3 for i in range(per_writer)) * 2

    def subscriber(k):
        """Reads a few events on one process, drops the connection, resumes on the other."""
        got, last_id, hops, sids = [], "0", 0, set()
        while len(got) < expected_total:
            server = (a, b)[hops % 2]
            s = Stream(
                server.url + "/api/v1/sse",
                headers={**auth(), "Last-Event-ID": last_id},
                params={"stream": "hop"},
            )
            for _ in range(7 + k):
                if len(got) == expected_total:
                    break
                event_id, _, data = s.events(1, timeout=30)[0]
                got.append((int(event_id.rpartition(".")[2]), tuple(json.loads(data))))
                last_id = event_id
                sids.add(event_id.rpartition(".")[0])
            s.close()
            hops += 1
        return got, hops, sids

    writers = [gevent.spawn(writer, srv, w) for w, srv in enumerate((a, b, a, b))]
    readers = [gevent.spawn(subscriber, k) for k in range(3)]
    gevent.joinall(writers, raise_error=True)
    history = []
    after = "0"
    while True:
        page = a.get(EVENTS, params={"stream": "hop", "after": after, "limit": "1000"}, headers=auth()).json()
        if not page["events"]:
            break
        history += [(int(e["id"]), tuple(e["data"])) for e in page["events"]]
        after = page["next"]
    assert len(history) == expected_total
    for reader in readers:
        got, hops, sids = reader.get(timeout=120)
        assert got == history  # every event once, in commit order, across all the hops
        assert hops > 20
        assert len(sids) == 1  # one connection id, minted once, kept across both processes
