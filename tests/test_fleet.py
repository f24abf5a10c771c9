"""Every process sees the same truth: events accepted but not yet committed by one process show
as pending in history reads on another, never twice and never after they commit; a killed
process's pending entries disappear; without Redis a read says its pending part is local."""

from __future__ import annotations

import gevent
import pytest

from tests.helpers import EVENTS, PositionLock, auth, open_sse, token, wait_until

pytestmark = pytest.mark.slow


def page(server, **params):
    r = server.get(EVENTS, params={"clientId": "client-1", **params}, headers=auth())
    assert r.status_code == 200, r.text
    return r.json()


def test_pending_on_one_process_is_seen_on_another_then_committed_once(make_server, database_url):
    a = make_server(database_url, INGEST_COMMIT_TIMEOUT_S="30")
    b = make_server(database_url)
    a.put("/api/v1/streams/f/1", headers=auth())
    lock = PositionLock(database_url)
    try:
        posting = gevent.spawn(
            a.post,
            EVENTS,
            headers=auth(),
            timeout=40,
            json=[{"stream": "f/1", "data": 1, "key": "one"}, {"stream": "f/1", "data": 2}],
        )
        seen = wait_until(
            lambda: (p := page(b))["events"] and p, timeout=15, message="A's pending events in a read on B"
        )
        assert seen["pendingScope"] == "fleet"
        assert [(e["data"], e["id"], e.get("pending")) for e in seen["events"]] == [
            (1, None, True),
            (2, None, True),
        ]
        assert [e["data"] for e in page(b, stream="f/1")["events"]] == [1, 2]  # by stream too
        assert not posting.ready()  # really not committed: the request is still waiting
    finally:
        lock.release()
    r = posting.get(timeout=30)
    assert r.status_code == 201, r.text
    ids = [e["id"] for e in r.json()["events"]]

    def committed():
        p = page(b)
        return [(e["id"], e.get("pending", False)) for e in p["events"]] == [(ids[0], False), (ids[1], False)]

    wait_until(committed, timeout=15, message="the events committed, once, on B")


def test_a_killed_process_takes_its_pending_entries_with_it(make_server, database_url):
    a = make_server(database_url, INGEST_COMMIT_TIMEOUT_S="30")
    b = make_server(database_url)
    lock = PositionLock(database_url)
    try:
        gevent.spawn(a.post, EVENTS, headers=auth(), timeout=40, json={"stream": "f/2", "data": "lost"})
        wait_until(lambda: page(b)["events"], timeout=15, message="the pending event on B")
        # SIGKILL: the request was never acknowledged. Its batch statement (written without a
        # key lookup, so it waits for the lock with its COMMIT already sent) must not commit
        # when the lock frees: Postgres notices the dead client and rolls it back.
        a.kill()
        wait_until(
            lambda: page(b)["events"] == [],
            timeout=15,
            message="the dead process's pending entries to expire",
        )
    finally:
        lock.release()
    assert page(b)["events"] == []  # it never committed, and nothing else shows


def test_without_redis_reads_say_their_pending_part_is_this_process(make_server, database_url, own_redis):
    server = make_server(database_url, REDIS_URL=own_redis.url)
    assert page(server)["pendingScope"] == "fleet"
    own_redis.stop()
    p = page(server)
    assert p["pendingScope"] == "process" and p["events"] == []
    own_redis.start()
    wait_until(
        lambda: page(server)["pendingScope"] == "fleet", timeout=20, message="the fleet view back with Redis"
    )


def test_connection_limits_count_across_processes_and_a_killed_one_stops(make_server, database_url):
    env = {"MAX_CONNECTIONS_PER_TOKEN": "2", "MAX_CONNECTIONS_PER_IP": "3"}
    a = make_server(database_url, **env)
    b = make_server(database_url, **env)
    a.put("/api/v1/streams/lim/1", headers=auth())
    mine = token("limited")
    held = [open_sse(a, "lim/1", mine), open_sse(b, "lim/1", mine)]
    assert [s.response.status_code for s in held] == [200, 200]
    for server in (a, b):  # the token holds two in the fleet: a third anywhere is refused
        refused = open_sse(server, "lim/1", mine)
        assert refused.response.status_code == 429
        refused.close()
    other = open_sse(b, "lim/1", token("other-user"))  # the address now holds three in the fleet
    assert other.response.status_code == 200
    refused = open_sse(a, "lim/1", token("third-user"))
    assert refused.response.status_code == 429  # by address, across processes
    refused.close()
    a.kill()  # its connections stop counting once its lease runs out

    def admitted():
        s = open_sse(b, "lim/1", mine)
        ok = s.response.status_code == 200
        if ok:
            held.append(s)
        else:
            s.close()
        return ok

    wait_until(admitted, timeout=30, interval=0.5, message="the killed process's lease to end")
    for s in [*held, other]:
        s.close()


def test_without_redis_limits_count_in_each_process(make_server, database_url, own_redis):
    server = make_server(database_url, REDIS_URL=own_redis.url, MAX_CONNECTIONS_PER_TOKEN="1")
    server.put("/api/v1/streams/lim/1", headers=auth())
    own_redis.stop()
    mine = token("alone")
    first = open_sse(server, "lim/1", mine)
    assert first.response.status_code == 200
    second = open_sse(server, "lim/1", mine)
    assert second.response.status_code == 429
    for s in (first, second):
        s.close()
