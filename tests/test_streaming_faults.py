"""Streaming under faults, against real server processes: shutdown, Postgres down, Redis down."""

import signal

from tests.helpers import auth, wait_until
from tests.sse import Stream

SSE = "/api/v1/sse"
EVENTS = "/api/v1/events"


def publish(server, stream, data):
    r = server.post(EVENTS, json={"stream": stream, "data": data}, headers=auth())
    assert r.status_code == 201, r.text
    return r.json()["events"][0]["id"]


def test_sigterm_tells_every_stream_when_to_come_back(make_server, database_url):
    server = make_server(database_url, HEARTBEAT_S="60")
    server.put("/api/v1/streams/t", headers=auth())
    streams = [Stream(server.url + SSE, headers=auth(), params={"stream": "t"}) for _ in range(5)]
    for s in streams:
        s.next(("retry",))
    last = publish(server, "t", 1)
    for s in streams:
        s.events(1)
    server.signal(signal.SIGTERM)
    for s in streams:
        assert s.next(("retry",))[0] == "retry"  # a final retry: hint ...
        assert s.next(("event", "end"))[0] == "end"  # ... then the stream ends
        assert s.parser.last_id.endswith(f".{last}")  # and it resumes from what it had
    assert server.wait(timeout=25) == 0


def test_postgres_down_answers_200_with_only_a_retry(make_server, own_postgres):
    server = make_server(own_postgres.url)
    server.put("/api/v1/streams/p", headers=auth())
    own_postgres.stop()
    r = server.get(SSE, params={"stream": "p"}, headers=auth(), timeout=15)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    assert r.text.startswith("retry: ") and "data:" not in r.text
    own_postgres.start()


def test_redis_stopped_and_restarted_delivery_continues(make_server, database_url, own_redis):
    server = make_server(database_url, REDIS_URL=own_redis.url)
    server.put("/api/v1/streams/r", headers=auth())
    s = Stream(server.url + SSE, headers=auth(), params={"stream": "r"})
    s.next(("retry",))
    ids = [publish(server, "r", 0)]
    own_redis.stop()
    ids += [publish(server, "r", i) for i in (1, 2)]  # delivered within the process
    own_redis.start()
    wait_until(
        lambda: server.get("/readyz").status_code == 200, timeout=30, message="Redis to be reachable again"
    )
    ids += [publish(server, "r", 3)]
    got = s.events(4, timeout=30)
    assert [e[0].rpartition(".")[2] for e in got] == ids  # in order, none lost, none twice
    s.close()


def test_postgres_stopped_mid_stream_ends_it_with_retry_and_the_client_resumes(make_server, own_postgres):
    # Small pages: the catch-up takes thousands of reads, so it is surely still paging when
    # Postgres stops. (With 200 a page it could finish first: the kernel's loopback buffers
    # take the whole history at once, whatever the reader's pace, and the test then waited in
    # vain for the stream to end.)
    server = make_server(own_postgres.url, CATCHUP_PAGE="5")
    total = 20_000
    for start in range(0, total, 1000):
        body = [{"stream": "m", "data": start + i} for i in range(1000)]
        assert server.post(EVENTS, json=body, headers=auth(), timeout=60).status_code == 201
    # A slow reader replaying everything: the server is paging through the history when
    # Postgres goes away (a fast shutdown: its sessions end at once).
    s = Stream(
        server.url + SSE,
        headers={**auth(), "Last-Event-ID": "0"},
        params={"stream": "m"},
        recv_delay=0.01,
        recv_size=4096,
    )
    got = [int(e[2]) for e in s.events(500, timeout=30)]
    own_postgres.stop()
    items = []
    while True:
        item = s.next(("event", "retry"), timeout=60)
        if item == ("end",):
            break
        items.append(item)
    assert items[-1][0] == "retry"  # the stream ended with a hint of when to come back
    got += [int(i[3]) for i in items if i[0] == "event"]
    assert len(got) < total
    resume_from = s.parser.last_id
    own_postgres.start()
    wait_until(
        lambda: server.get("/readyz").status_code == 200, timeout=30, message="Postgres to be reachable again"
    )
    again = Stream(server.url + SSE, headers={**auth(), "Last-Event-ID": resume_from}, params={"stream": "m"})
    got += [int(e[2]) for e in again.events(total - len(got), timeout=60)]
    assert got == list(range(total))  # nothing missed, nothing twice, in order
    assert again.parser.last_id.rpartition(".")[0] == resume_from.rpartition(".")[0]  # same sid
    again.close()
