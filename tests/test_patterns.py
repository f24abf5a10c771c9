"""Pattern subscriptions on the native door: `room/*` and `user/42/**` deliver every matching
stream, streams created after connecting included, admitted only when the grant covers the
pattern, with catch-up and resume across the matching streams in position order."""

from __future__ import annotations

import json

import pytest

from tests.helpers import POLL, SSE, auth, open_sse, publish, token


def test_a_pattern_delivers_matching_streams_including_new_ones(server):
    for name in ("room/1", "other/1", "room/1/deep"):
        server.put(f"/api/v1/streams/{name}", headers=auth())
    s = open_sse(server, "room/*", token(subscribe=["room/*"]))
    assert s.response.status_code == 200
    s.next(("retry",))
    publish(server, "other/1", "not mine")
    publish(server, "room/1/deep", "too deep")
    first = publish(server, "room/1", "a")
    later = publish(server, "room/new", "b")  # created after the subscription
    got = s.events(2)
    assert [(e[0].rpartition(".")[2], json.loads(e[2])) for e in got] == [(first, "a"), (later, "b")]
    s.close()


def test_catch_up_and_resume_run_across_matching_streams_in_order(server):
    ids = []
    for i in range(6):
        ids.append(publish(server, f"feed/{'ab'[i % 2]}", i))
    publish(server, "feeds-other", "x")
    s = open_sse(server, "feed/*", lastEventId="0")
    got = s.events(6)
    assert [e[0].rpartition(".")[2] for e in got] == ids
    s.close()
    resumed = open_sse(server, "feed/*", lastEventId=got[2][0])  # Last-Event-ID as the browser sends
    assert [json.loads(e[2]) for e in resumed.events(3)] == [3, 4, 5]
    resumed.close()


def test_deep_patterns_and_long_poll(server):
    a = publish(server, "user/42/inbox", 1)
    b = publish(server, "user/42/feeds/x", 2)
    publish(server, "user/43/inbox", 3)
    r = server.get(POLL, params={"stream": "user/42/**", "cursor": "0", "timeout": "0"}, headers=auth())
    assert r.status_code == 200
    assert [(e["id"], e["data"]) for e in r.json()["events"]] == [(a, 1), (b, 2)]


@pytest.mark.parametrize(
    "grant, pattern, status",
    [
        (["room/1"], "room/*", 403),
        (["room/*"], "room/**", 403),
        (["other/**"], "room/*", 403),
        (["room/**"], "room/*", 200),
        (["**"], "**", 200),
        (["room/*"], "room/*", 200),
    ],
)
def test_a_pattern_is_admitted_only_when_the_grant_covers_it(server, grant, pattern, status):
    tok = token(subscribe=grant)
    r = server.get(
        POLL, params={"stream": pattern, "timeout": "0"}, headers={"Authorization": f"Bearer {tok}"}
    )
    assert r.status_code == status, r.text
    s = open_sse(server, pattern, tok)
    assert s.response.status_code == status
    s.close()


@pytest.mark.parametrize("pattern", ["a/**/b", "**x", "bad name/*"])
def test_malformed_patterns_are_400(server, pattern):
    r = server.get(SSE, params={"stream": pattern}, headers=auth())
    assert r.status_code == 400 and r.json()["field"] == "stream"
