"""Retention against a real server and Postgres: whole slices dropped past the age, streams that
keep longer survive in compacted slices, per-stream age and count limits, keys forgotten with
their events, bad retention bodies refused, and history gone signalled on every read path."""

from __future__ import annotations

import json

import psycopg2
import pytest

from ingest.pool import Pool
from ingest.retention import Pruner
from ingest.store import EventStore
from tests.helpers import EVENTS, POLL, auth, open_stream, wait_until

FAST = {"STORAGE_SLICE_POSITIONS": "10", "RETENTION_PRUNE_S": "0.2"}


def post(server, body, **kw):
    r = server.post(EVENTS, json=body, headers=auth(), **kw)
    assert r.status_code in (200, 201), r.text
    return r.json()["events"]


def datas(server, stream, **params):
    r = server.get(EVENTS, params={"stream": stream, "limit": 1000, **params}, headers=auth())
    assert r.status_code == 200, r.text
    return [e["data"] for e in r.json()["events"]], r.json()


def slice_names(database_url):
    conn = psycopg2.connect(database_url)
    try:
        return [s.name for s in EventStore().slices(conn)]
    finally:
        conn.close()


def age(database_url, seconds, where="TRUE"):
    """Make events look `seconds` older (the pruner reads created_at)."""
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(
            f"UPDATE events SET created_at = created_at - make_interval(secs => %s) WHERE {where}", (seconds,)
        )
    conn.close()


def test_expired_slices_are_dropped_and_long_retention_streams_kept(make_server, database_url):
    server = make_server(database_url, RETENTION_MAX_AGE_S="3600", **FAST)
    r = server.put("/api/v1/streams/keep", json={"retention": {"maxAgeS": 0}}, headers=auth())
    assert r.status_code == 201 and r.json()["retention"] == {"maxAgeS": 0, "maxEvents": 0}
    assert r.json()["retentionOverride"] == {"maxAgeS": 0, "maxEvents": None}
    old = post(server, [{"stream": f"s/{i % 3}", "data": i, "key": f"k{i}"} for i in range(25)])
    post(server, [{"stream": "keep", "data": i} for i in range(5)])
    age(database_url, 7200)  # everything so far is two hours old
    post(server, [{"stream": "s/0", "data": 100 + i} for i in range(25)])  # new slices fill
    first_slices = slice_names(database_url)

    def pruned():
        return datas(server, "s/1")[0] == [] and datas(server, "s/0")[0] == list(range(100, 125))

    wait_until(pruned, timeout=30, message="expired slices to be dropped")
    assert datas(server, "keep")[0] == list(range(5))  # forever: kept in a compacted slice
    now = slice_names(database_url)
    assert len(now) < len(first_slices) + 3 and any(n.startswith("events_c") for n in now)
    info = server.get("/api/v1/streams/s/0", headers=auth()).json()
    assert info["retention"] == {"maxAgeS": 3600, "maxEvents": 0}
    assert int(info["oldest"]) > int(old[-1]["id"])
    # A key lives as long as its event: once pruned, the same key makes a new event.
    again = post(server, {"stream": "s/0", "data": 0, "key": "k0"})
    assert again[0]["id"] != old[0]["id"] and not again[0].get("duplicate")


def test_per_stream_count_and_age_limits_trim_rows(make_server, database_url):
    server = make_server(database_url, RETENTION_MAX_AGE_S="0", **FAST)  # default: forever
    assert (
        server.put("/api/v1/streams/few", json={"retention": {"maxEvents": 3}}, headers=auth()).status_code
        == 201
    )
    assert (
        server.put("/api/v1/streams/brief", json={"retention": {"maxAgeS": 60}}, headers=auth()).status_code
        == 201
    )
    post(server, [{"stream": "few", "data": i} for i in range(10)])
    post(server, [{"stream": "brief", "data": i} for i in range(4)])
    post(server, [{"stream": "other", "data": i} for i in range(4)])
    age(database_url, 120, "stream = 'brief'")
    post(server, {"stream": "brief", "data": "fresh"})
    wait_until(lambda: datas(server, "few")[0] == [7, 8, 9], timeout=30, message="the count limit")
    wait_until(lambda: datas(server, "brief")[0] == ["fresh"], timeout=30, message="the stream's own age")
    assert datas(server, "other")[0] == [0, 1, 2, 3]  # the default keeps forever
    post(server, [{"stream": "few", "data": i} for i in range(10, 12)])
    wait_until(
        lambda: datas(server, "few")[0] == [9, 10, 11],
        timeout=30,
        message="the count limit after more events",
    )


@pytest.mark.parametrize(
    "body",
    [
        {"retention": {"maxAgeS": -1}},
        {"retention": {"maxAgeS": 1.5}},
        {"retention": {"maxEvents": "10"}},
        {"retention": {"maxAgeS": True}},
        {"retention": {"maxAge": 10}},
        {"retention": 5},
        {"other": 1},
        [1],
    ],
)
def test_bad_retention_is_a_400_and_changes_nothing(module_server, body):
    server = module_server
    assert server.put(
        "/api/v1/streams/rules", json={"retention": {"maxEvents": 7}}, headers=auth()
    ).status_code in (200, 201)
    r = server.put("/api/v1/streams/rules", json=body, headers=auth())
    assert r.status_code == 400, r.text
    assert r.headers["Content-Type"] == "application/problem+json"
    info = server.get("/api/v1/streams/rules", headers=auth()).json()
    assert info["retentionOverride"] == {"maxAgeS": None, "maxEvents": 7}


def test_null_restores_the_default(module_server):
    server = module_server
    server.put("/api/v1/streams/back", json={"retention": {"maxAgeS": 5, "maxEvents": 2}}, headers=auth())
    r = server.put("/api/v1/streams/back", json={"retention": {"maxAgeS": None}}, headers=auth())
    assert r.status_code == 200
    assert r.json()["retentionOverride"] == {"maxAgeS": None, "maxEvents": None}
    assert r.json()["retention"]["maxAgeS"] == 86400  # RETENTION_MAX_AGE_S's default


def test_history_gone_is_signalled_on_sse_poll_and_history(make_server, database_url):
    server = make_server(database_url, RETENTION_MAX_AGE_S="0", **FAST)
    server.put("/api/v1/streams/g", json={"retention": {"maxEvents": 2}}, headers=auth())
    server.put("/api/v1/streams/quiet", headers=auth())
    ids = [int(e["id"]) for e in post(server, [{"stream": "g", "data": i} for i in range(6)])]
    wait_until(lambda: datas(server, "g")[0] == [4, 5], timeout=30, message="the count limit")

    # SSE resuming from before the pruned events: `event: reset` first, then what is left.
    stream = open_stream(server, ["g", "quiet"], lastEventId=str(ids[0]))
    try:
        first = stream.next()
        assert first[2] == "reset"
        notice = json.loads(first[3])
        assert notice == {"reason": "history-gone", "streams": ["g"], "oldest": str(ids[4])}
        assert [json.loads(e[2]) for e in stream.events(2)] == [4, 5]
    finally:
        stream.close()
    # A resume point after the pruned part: no reset.
    stream = open_stream(server, ["g"], lastEventId=str(ids[4]))
    try:
        (event,) = stream.events(1)
        assert event[1] == "message" and json.loads(event[2]) == 5
    finally:
        stream.close()

    poll = server.get(
        POLL, params={"stream": "g", "cursor": str(ids[1]), "timeout": 0}, headers=auth()
    ).json()
    assert poll["reset"]["streams"] == ["g"] and [e["data"] for e in poll["events"]] == [4, 5]
    assert (
        "reset"
        not in server.get(
            POLL, params={"stream": "g", "cursor": str(ids[5]), "timeout": 0}, headers=auth()
        ).json()
    )
    page = datas(server, "g", after=str(ids[0]))[1]
    assert page["reset"] == notice and [e["data"] for e in page["events"]] == [4, 5]
    for resume in ("0", None):  # from the start, as SSE's lastEventId=0 and poll's cursor=0
        page = datas(server, "g", **({"after": resume} if resume else {}))[1]
        assert page["reset"] == notice, resume
    poll = server.get(POLL, params={"stream": "g", "cursor": "0", "timeout": 0}, headers=auth()).json()
    assert poll["reset"] == notice
    stream = open_stream(server, ["g"], lastEventId="0")
    try:
        first = stream.next()
        assert first[2] == "reset" and json.loads(first[3]) == notice
    finally:
        stream.close()
    assert "reset" not in datas(server, "g", after=str(ids[4]))[1]

    # Deleted and re-created: an old resume point is told its history is gone.
    assert server.delete("/api/v1/streams/quiet", headers=auth()).status_code == 204
    assert server.put("/api/v1/streams/quiet", headers=auth()).status_code == 201
    page = datas(server, "quiet", after=str(ids[0]))[1]
    assert page["reset"]["streams"] == ["quiet"] and page["reset"]["oldest"] is None


def test_one_process_prunes_at_a_time(database_url):
    pools = [Pool(database_url, 2, timeout_s=10) for _ in range(2)]
    store = EventStore(10)
    pruners = [Pruner(store, pool, max_age_s=60, max_events=0, every_s=60, slice_width=10) for pool in pools]
    holder = pools[0]
    with holder.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%s)", (0x511D0,))  # someone else is pruning
        reports = [p.run_once() for p in pruners]
        cur.execute("SELECT pg_advisory_unlock(%s)", (0x511D0,))
    assert [r.ran for r in reports] == [False, False]
    assert [p.run_once().ran for p in pruners] == [True, True]  # the lock is released after
    for pool in pools:
        pool.close()
