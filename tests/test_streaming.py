"""SSE and long-poll against a real server, read by a spec-following SSE client."""

import json
import socket

import gevent
import pytest
import requests

from tests.helpers import POLL, SSE, auth, open_stream, publish, token, wait_until
from tests.sse import Stream


@pytest.fixture
def srv(make_server, database_url):
    return make_server(database_url, HEARTBEAT_S="0.3", RETRY_BASE_MS="1000", RETRY_MAX_MS="8000")


# -- everything is checked before the first byte -----------------------------------------------


@pytest.mark.parametrize(
    "params, headers, status",
    [
        ({"stream": "nope"}, None, 404),
        ({"stream": "room/1"}, {"Authorization": ""}, 401),
        ({"stream": "room/1"}, {"Authorization": "Bearer garbage"}, 401),
        ({"stream": "room/1"}, {"Authorization": f"Bearer {token(subscribe=['other/*'])}"}, 403),
        ({}, None, 400),
        ({"stream": "bad name"}, None, 400),
        ({"stream": "room/1", "lastEventId": "not-an-id"}, None, 400),
    ],
)
@pytest.mark.parametrize("path", [SSE, POLL])
def test_refusals_come_before_any_stream_byte(srv, path, params, headers, status):
    srv.put("/api/v1/streams/room/1", headers=auth())
    h = {**auth(), **(headers or {})}
    if h.get("Authorization") == "":
        del h["Authorization"]
    r = srv.get(path, params=params, headers=h)
    assert r.status_code == status
    assert r.headers["Content-Type"] == "application/problem+json"
    assert r.json()["status"] == status


# -- SSE ---------------------------------------------------------------------------------------


def test_sse_preamble_live_events_and_heartbeats(srv):
    srv.put("/api/v1/streams/room/1", headers=auth())
    s = open_stream(srv, "room/1")
    assert s.response.status_code == 200
    assert s.response.headers["Content-Type"].startswith("text/event-stream")
    assert s.response.headers["Cache-Control"] == "no-cache"
    assert s.response.headers["X-Accel-Buffering"] == "no"
    assert s.next(("retry",))[1] >= 1000
    wait_until(lambda: s.parser.last_id, message="the preamble id")
    sid, _, position = s.parser.last_id.partition(".")
    assert len(sid) == 10 and position.isdigit()
    assert s.next(("comment",))  # a heartbeat during silence
    first = publish(srv, "room/1", {"n": 1}, "chat")
    publish(srv, "other", {"n": "not mine"})
    second = publish(srv, "room/1", {"n": 2})
    assert s.events(2) == [
        (f"{sid}.{first}", "chat", json.dumps({"n": 1}, separators=(",", ":"))),
        (f"{sid}.{second}", "message", '{"n":2}'),
    ]
    s.close()


def test_resume_with_last_event_id_keeps_the_connection_id(srv):
    ids = [publish(srv, "r", i) for i in range(5)]
    s = open_stream(srv, "r", headers={"Last-Event-ID": f"abcdefghij.{ids[1]}"})
    got = s.events(3)
    assert [e[0] for e in got] == [f"abcdefghij.{i}" for i in ids[2:]]
    assert [json.loads(e[2]) for e in got] == [2, 3, 4]
    s.close()
    bare = open_stream(srv, "r", lastEventId=ids[3])  # a bare position: a new sid is minted
    (event,) = bare.events(1)
    assert event[0].endswith(f".{ids[4]}") and not event[0].startswith("abcdefghij.")
    bare.close()


def test_catch_up_and_live_meet_without_gap_or_duplicate(srv):
    srv.put("/api/v1/streams/seam", headers=auth())
    published = []

    def publisher():
        for i in range(150):
            published.append(publish(srv, "seam", i))

    job = gevent.spawn(publisher)
    wait_until(lambda: len(published) >= 50, message="history before the client connects")
    s = open_stream(srv, "seam", lastEventId="0")
    job.get(timeout=60)
    got = s.events(150, timeout=30)
    assert [int(e[0].rpartition(".")[2]) for e in got] == [int(i) for i in published]
    assert [json.loads(e[2]) for e in got] == list(range(150))
    s.close()


def test_token_in_query_or_cookie(srv):
    srv.put("/api/v1/streams/q", headers=auth())
    by_query = Stream(srv.url + SSE, params={"stream": "q", "token": token()})
    by_cookie = Stream(srv.url + SSE, params={"stream": "q"}, cookies={"sluice_token": token()})
    assert by_query.response.status_code == by_cookie.response.status_code == 200
    publish(srv, "q", 1)
    assert by_query.events(1)[0][2] == "1" and by_cookie.events(1)[0][2] == "1"
    by_query.close()
    by_cookie.close()


def test_reconnects_get_a_growing_retry(srv):
    srv.put("/api/v1/streams/b", headers=auth())
    retries = []
    for _ in range(5):
        s = open_stream(srv, "b", headers={"Last-Event-ID": "backoffsid.0"})
        retries.append(s.next(("retry",))[1])
        s.close()
    assert retries[0] == 1000 and all(1000 <= r <= 8000 for r in retries)
    ceilings = [min(8000, 1000 * 2**n) for n in range(5)]
    assert all(r <= c for r, c in zip(retries, ceilings, strict=False))
    assert max(retries[2:]) > 1000  # grows (a 1-in-10^9 chance of three draws at the base)


def test_deleting_a_stream_ends_its_subscriptions_in_every_process(make_server, database_url):
    a = make_server(database_url)
    b = make_server(database_url)
    publish(a, "gone", 1)
    here, there = open_stream(a, "gone"), open_stream(b, "gone")
    for s in (here, there):
        s.next(("retry",))
    waiting = gevent.spawn(b.get, POLL, params={"stream": "gone", "timeout": "20"}, headers=auth())
    gevent.sleep(0.3)
    assert a.delete("/api/v1/streams/gone", headers=auth()).status_code == 204
    for s in (here, there):
        assert s.next() == ("event", s.parser.last_id, "end", '{"stream":"gone"}')
        assert s.next(("event", "end")) == ("end",)
    assert waiting.get(timeout=20).json()["events"] == []
    assert a.get(SSE, params={"stream": "gone"}, headers=auth()).status_code == 404
    assert b.get(POLL, params={"stream": "gone"}, headers=auth()).status_code == 404


def test_slow_reader_is_cut_while_others_continue(make_server, database_url):
    srv = make_server(database_url, SUBSCRIBER_QUEUE_MAX="3", SSE_WRITE_TIMEOUT_S="1", HEARTBEAT_S="0.3")
    srv.put("/api/v1/streams/big", headers=auth())
    # A raw client that subscribes and never reads: its socket buffers fill, then its queue.
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    slow.connect(("127.0.0.1", srv.port))
    slow.sendall(
        f"GET {SSE}?stream=big HTTP/1.1\r\nHost: x\r\nAuthorization: "
        f"{auth()['Authorization']}\r\n\r\n".encode()
    )
    normal = [open_stream(srv, "big") for _ in range(5)]
    wait_until(
        lambda: srv.get("/api/v1/streams/big", headers=auth()).json()["subscribers"] == 6,
        message="all six subscribed",
    )
    payload = "x" * 60000
    for i in range(100):
        publish(srv, "big", {"i": i, "pad": payload})
    for s in normal:
        got = s.events(100, timeout=60)
        assert [json.loads(e[2])["i"] for e in got] == list(range(100))
    wait_until(
        lambda: srv.get("/api/v1/streams/big", headers=auth()).json()["subscribers"] == 5,
        timeout=30,
        message="the slow reader to be dropped",
    )
    assert "sluice_slow_consumer_disconnects_total 1.0" in srv.get("/metrics").text
    slow.close()
    for s in normal:
        s.close()


def test_closed_connections_leave_nothing_behind(make_server, database_url):
    # A heartbeat far away: only the disconnect watcher can notice these closes.
    srv = make_server(database_url, HEARTBEAT_S="60")
    srv.put("/api/v1/streams/churn", headers=auth())
    for _ in range(100):
        conn = socket.create_connection(("127.0.0.1", srv.port))
        conn.sendall(
            f"GET {SSE}?stream=churn HTTP/1.1\r\nHost: x\r\nAuthorization: "
            f"{auth()['Authorization']}\r\n\r\n".encode()
        )
        assert conn.recv(12) == b"HTTP/1.1 200"
        conn.close()
    wait_until(
        lambda: srv.get("/api/v1/streams/churn", headers=auth()).json()["subscribers"] == 0,
        message="every closed stream to be noticed while idle",
    )


# -- long-poll ---------------------------------------------------------------------------------


def test_long_poll_cursor_in_and_out(srv):
    ids = [publish(srv, "lp", i) for i in range(3)]
    r = srv.get(POLL, params={"stream": "lp", "cursor": "0"}, headers=auth())
    assert r.status_code == 200
    body = r.json()
    assert [e["data"] for e in body["events"]] == [0, 1, 2] and body["cursor"] == ids[-1]
    sid = body["sid"]
    empty = srv.get(
        POLL, params={"stream": "lp", "cursor": body["cursor"], "timeout": "0.3", "sid": sid}, headers=auth()
    ).json()
    assert empty == {"events": [], "cursor": body["cursor"], "sid": sid}

    waiting = gevent.spawn(
        srv.get, POLL, params={"stream": "lp", "cursor": body["cursor"], "timeout": "20"}, headers=auth()
    )
    gevent.sleep(0.3)
    new = publish(srv, "lp", "late")
    answer = waiting.get(timeout=20).json()
    assert [e["data"] for e in answer["events"]] == ["late"] and answer["cursor"] == new


def test_long_poll_without_cursor_waits_for_new_events(srv):
    publish(srv, "lp2", "old")
    waiting = gevent.spawn(srv.get, POLL, params={"stream": "lp2", "timeout": "20"}, headers=auth())
    gevent.sleep(0.3)
    publish(srv, "lp2", "new")
    assert [e["data"] for e in waiting.get(timeout=20).json()["events"]] == ["new"]


def test_long_poll_hold_is_capped(make_server, database_url):
    srv = make_server(database_url, LONGPOLL_MAX_S="0.5")
    publish(srv, "cap", 1)
    # Asked for 3000 s; answered (empty) well within the client's own 10 s timeout.
    r = srv.get(POLL, params={"stream": "cap", "timeout": "3000"}, headers=auth(), timeout=10)
    assert r.status_code == 200 and r.json()["events"] == []


def test_streams_are_subscribed_across_processes(make_server, database_url):
    a = make_server(database_url)
    b = make_server(database_url)
    a.put("/api/v1/streams/x", headers=auth())
    s = open_stream(b, "x")
    s.next(("retry",))
    ids = [publish(a, "x", i) for i in range(5)]
    assert [e[0].rpartition(".")[2] for e in s.events(5)] == ids
    s.close()
    r = requests.get(b.url + POLL, params={"stream": "x", "cursor": ids[1]}, headers=auth(), timeout=10)
    assert [e["id"] for e in r.json()["events"]] == ids[2:]


# -- overload ----------------------------------------------------------------------------------


def test_at_the_connection_limit_sse_gets_retry_and_poll_gets_503(make_server, database_url):
    srv = make_server(database_url, MAX_STREAM_CONNECTIONS="3", RETRY_BASE_MS="1000", RETRY_MAX_MS="8000")
    srv.put("/api/v1/streams/full", headers=auth())
    held = [open_stream(srv, "full") for _ in range(3)]
    for s in held:
        s.next(("retry",))
    # One more: 200 (a 5xx would stop EventSource for good), only a retry:, then the end.
    shed = open_stream(srv, "full", headers={"Last-Event-ID": "shedsid.0"})
    assert shed.response.status_code == 200
    assert shed.response.headers["Content-Type"].startswith("text/event-stream")
    assert shed.next(("retry", "id", "event"))[0] == "retry"
    assert shed.next(("id", "event")) == ("end",)
    # The same client shed again and again is told to wait longer (its sid's counter grows).
    retries = []
    for _ in range(4):
        s = open_stream(srv, "full", headers={"Last-Event-ID": "shedsid.0"})
        retries.append(s.next(("retry",))[1])
        s.close()
    assert max(retries) > 1000
    r = srv.get(POLL, params={"stream": "full", "timeout": "0"}, headers=auth())
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
    assert r.headers["Content-Type"] == "application/problem+json"
    assert 'sluice_stream_connections_shed_total{transport="sse"} 5.0' in srv.get("/metrics").text
    # The held streams are untouched, and a freed slot is taken again.
    held.pop().close()
    wait_until(
        lambda: srv.get("/api/v1/streams/full", headers=auth()).json()["subscribers"] == 2,
        message="the closed stream to be noticed",
    )
    again = open_stream(srv, "full")
    assert again.response.status_code == 200 and again.next(("retry",))[0] == "retry"
    ids = [publish(srv, "full", i) for i in range(2)]
    for s in held + [again]:
        assert [e[0].rpartition(".")[2] for e in s.events(2)] == ids
        s.close()


def test_long_poll_clients_that_poll_too_fast_are_told_to_slow_down(make_server, database_url):
    srv = make_server(database_url, LONGPOLL_MAX_RATE="0.5")  # 5 polls per 10 s window
    publish(srv, "pace", 1)
    first = srv.get(POLL, params={"stream": "pace", "timeout": "0"}, headers=auth())
    sid, cursor = first.json()["sid"], first.json()["cursor"]
    answers = [
        srv.get(POLL, params={"stream": "pace", "timeout": "0", "cursor": cursor, "sid": sid}, headers=auth())
        for _ in range(20)
    ]
    assert all(r.status_code == 200 for r in answers)
    waits = [int(r.headers.get("Retry-After", 0)) for r in answers]
    assert waits[:5] == [0] * 5  # within the budget: no pacing
    assert all(w >= 1 for w in waits[5:])  # past it: answered, but told to wait...
    assert waits[-1] > waits[5]  # ...longer the further over it is
    refused = [
        srv.get(POLL, params={"stream": "pace", "timeout": "0", "sid": sid}, headers=auth()) for _ in range(2)
    ]
    assert [r.status_code for r in refused] == [429, 429]  # past 4x the budget: refused
    assert int(refused[-1].headers["Retry-After"]) >= 1
    assert refused[-1].json()["type"].endswith("polling-too-fast")
    # Another client (another sid) is not affected.
    other = srv.get(POLL, params={"stream": "pace", "timeout": "0", "sid": "othersid"}, headers=auth())
    assert other.status_code == 200 and "Retry-After" not in other.headers


def test_a_deleted_stream_is_not_served_from_the_existence_cache(make_server, database_url):
    srv = make_server(database_url, STREAM_CACHE_S="3600")
    publish(srv, "cached", 1)
    s = open_stream(srv, "cached")  # now known to exist for an hour
    s.next(("retry",))
    s.close()
    assert srv.delete("/api/v1/streams/cached", headers=auth()).status_code == 204
    assert srv.get(SSE, params={"stream": "cached"}, headers=auth()).status_code == 404
    assert srv.get(POLL, params={"stream": "cached"}, headers=auth()).status_code == 404
    publish(srv, "cached", 2)  # publishing creates it again
    again = open_stream(srv, "cached")
    assert again.response.status_code == 200
    again.close()


def test_opt_in_hello_and_envelope_framing(srv):
    srv.put("/api/v1/streams/env/1", headers=auth())
    publish(srv, "env/1", {"n": 0}, "chat")
    s = open_stream(srv, "env/1", lastEventId="0", hello="1", envelope="1")
    try:
        hello = s.next()
        assert hello[2] == "hello" and json.loads(hello[3])["sid"] == hello[1].split(".")[0]
        publish(srv, "env/1", {"n": 1})
        caught_up, live = s.events(2)
    finally:
        s.close()
    # Every type arrives as a `message` whose data carries the type: one listener sees all.
    assert (caught_up[1], json.loads(caught_up[2])) == ("message", {"type": "chat", "data": {"n": 0}})
    assert (live[1], json.loads(live[2])) == ("message", {"type": "message", "data": {"n": 1}})
    # Without the options, the same events keep their own types.
    plain = open_stream(srv, "env/1", lastEventId="0")
    try:
        assert [(e[1], e[2]) for e in plain.events(2)] == [("chat", '{"n":0}'), ("message", '{"n":1}')]
    finally:
        plain.close()
