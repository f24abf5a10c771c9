"""The ingest and read API against a real server (real Postgres, real Redis, real HTTP)."""

import gevent
import orjson
import pytest

from tests.helpers import PositionLock, auth, wait_until

EVENTS = "/api/v1/events"


def post(server, body, sub="client-1", headers=None, **kw):
    h = {**auth(sub, **kw), **(headers or {})}
    if isinstance(body, (bytes, str)):
        h.setdefault("Content-Type", "application/json")
        return server.post(EVENTS, data=body, headers=h)
    return server.post(EVENTS, json=body, headers=h)


def history(server, sub="client-1", **params):
    r = server.get(EVENTS, params=params, headers=auth(sub))
    assert r.status_code == 200, r.text
    return r.json()


def test_single_event_is_committed_and_readable_by_client(server):
    r = post(server, {"stream": "client/1", "data": {"n": 1}})
    assert r.status_code == 201, r.text
    [written] = r.json()["events"]
    assert written["stream"] == "client/1" and written["id"].isdigit()
    page = history(server, clientId="client-1")
    assert [(e["id"], e["data"], e["type"], e["clientId"]) for e in page["events"]] == [
        (written["id"], {"n": 1}, "message", "client-1")
    ]
    assert page["next"] == written["id"]
    assert page["events"][0]["createdAt"].endswith("Z")


def test_array_and_ndjson_bodies_keep_order(server):
    r = post(server, [{"stream": "s/a", "data": i, "type": "t.x"} for i in range(5)])
    assert r.status_code == 201
    nd = b"\n".join(orjson.dumps({"stream": "s/b", "data": i}) for i in range(5, 8)) + b"\n"
    r2 = server.post(EVENTS, data=nd, headers={**auth(), "Content-Type": "application/x-ndjson"})
    assert r2.status_code == 201, r2.text
    ids = [int(e["id"]) for e in r.json()["events"] + r2.json()["events"]]
    assert ids == sorted(ids) and len(set(ids)) == 8
    assert [e["data"] for e in history(server, clientId="client-1")["events"]] == list(range(8))
    assert [e["data"] for e in history(server, stream="s/b")["events"]] == [5, 6, 7]


def test_repeated_key_returns_original_id_never_a_second_row(server):
    first = post(server, {"stream": "k", "data": {"a": 1, "b": 2}, "key": "abc"})
    again = post(server, {"stream": "k", "data": {"b": 2, "a": 1}, "key": "abc"})  # same JSON
    by_header = post(server, {"stream": "k", "data": {"a": 1, "b": 2}}, headers={"Idempotency-Key": "abc"})
    assert first.status_code == 201
    assert again.status_code == 200 and by_header.status_code == 200
    assert again.json()["events"][0]["id"] == first.json()["events"][0]["id"]
    assert by_header.json()["events"][0]["id"] == first.json()["events"][0]["id"]
    # Keys are per client: another client may use the same key.
    other = post(server, {"stream": "k", "data": 4, "key": "abc"}, sub="client-2")
    assert other.status_code == 201
    assert [e["data"] for e in history(server, stream="k")["events"]] == [{"a": 1, "b": 2}, 4]


@pytest.mark.parametrize("changed", [{"data": 2}, {"stream": "k2"}, {"type": "other"}])
def test_key_reused_for_a_different_event_is_422_and_stores_nothing(server, changed):
    post(server, {"stream": "k", "data": 1, "key": "abc"})
    batch = [{"stream": "fresh", "data": 0}, {"stream": "k", "data": 1, "key": "abc", **changed}]
    for body in (batch[1], batch):
        r = post(server, body)
        assert r.status_code == 422, r.text
        assert r.headers["Content-Type"] == "application/problem+json"
        assert r.json()["key"] == "abc" and "abc" in r.json()["detail"]
    assert [e["data"] for e in history(server, clientId="client-1")["events"]] == [1]


def test_same_key_twice_in_one_batch_is_one_row_or_422(server):
    same = {"stream": "k", "data": 1, "key": "x"}
    r = post(server, [same, dict(same)])
    assert r.status_code == 201
    a, b = r.json()["events"]
    assert a["id"] == b["id"] and b.get("duplicate") is True
    r = post(server, [{"stream": "k", "data": 1, "key": "y"}, {"stream": "k", "data": 2, "key": "y"}])
    assert r.status_code == 422
    assert len(history(server, stream="k")["events"]) == 1


def test_pagination_with_after_and_limit(server):
    post(server, [{"stream": "p", "data": i} for i in range(25)])
    seen, after = [], ""
    while True:
        page = history(server, stream="p", after=after, limit=10)
        if not page["events"]:
            break
        seen += [e["data"] for e in page["events"]]
        after = page["next"]
    assert seen == list(range(25))


def test_both_filters_at_once(server):
    post(server, [{"stream": "x", "data": 1}, {"stream": "y", "data": 2}], sub="c1")
    post(server, [{"stream": "x", "data": 3}], sub="c2")
    assert [e["data"] for e in history(server, clientId="c1", stream="x")["events"]] == [1]


def test_reads_return_only_granted_streams(server):
    post(
        server,
        [{"stream": "a/1", "data": 1}, {"stream": "b/1", "data": 2}, {"stream": "a/1/deep", "data": 3}],
    )
    h = auth("reader", subscribe=["a/*"])
    page = server.get(EVENTS, params={"clientId": "client-1"}, headers=h).json()
    assert [e["stream"] for e in page["events"]] == ["a/1"]
    deep = server.get(EVENTS, params={"clientId": "client-1"}, headers=auth("r", subscribe=["a/**"]))
    assert [e["stream"] for e in deep.json()["events"]] == ["a/1", "a/1/deep"]
    denied = server.get(EVENTS, params={"stream": "b/1"}, headers=h)
    assert denied.status_code == 403
    assert denied.headers["Content-Type"] == "application/problem+json"


def test_pending_events_are_shown_marked_and_never_twice(make_server, database_url):
    # The position lock held keeps the event accepted-but-uncommitted long enough to read it.
    server = make_server(database_url, INGEST_COMMIT_TIMEOUT_S="30")
    post(server, {"stream": "c", "data": "committed"})
    lock = PositionLock(database_url)
    slow = gevent.spawn(post, server, {"stream": "c", "data": "pending", "key": "p1"})

    def pending_visible():
        events = history(server, clientId="client-1")["events"]
        return events if any(e.get("pending") for e in events) else None

    events = wait_until(pending_visible, message="a pending event")
    assert [e["data"] for e in events] == ["committed", "pending"]
    assert events[1]["id"] is None and events[1]["key"] == "p1" and events[1]["pending"] is True
    first_next = history(server, clientId="client-1")["next"]
    lock.release()
    assert slow.get(timeout=15).status_code == 201
    events = history(server, clientId="client-1")["events"]
    assert [(e["data"], e.get("pending", False)) for e in events] == [
        ("committed", False),
        ("pending", False),
    ]
    # Resuming from the page that showed it pending yields it once, now committed.
    later = history(server, clientId="client-1", after=first_next)["events"]
    assert [e["data"] for e in later] == ["pending"]


def test_streams_put_get_delete(server):
    path = "/api/v1/streams/rooms/42"
    assert server.get(path, headers=auth()).status_code == 404
    r = server.put(path, headers=auth())
    assert r.status_code == 201 and r.json()["name"] == "rooms/42" and r.json()["lastId"] is None
    assert server.put(path, headers=auth()).status_code == 200
    post(server, {"stream": "rooms/42", "data": 1})
    info = server.get(path, headers=auth()).json()
    assert info["lastId"] is not None and info["subscribers"] == 0
    assert server.delete(path, headers=auth()).status_code == 204
    assert server.get(path, headers=auth()).status_code == 404
    assert server.delete(path, headers=auth()).status_code == 404
    assert server.get(EVENTS, params={"stream": "rooms/42"}, headers=auth()).status_code == 404
    assert server.put(path, headers=auth("x", publish=["other"])).status_code == 403


def test_published_stream_exists(server):
    post(server, {"stream": "auto/created", "data": 1})
    assert server.get("/api/v1/streams/auto/created", headers=auth()).status_code == 200


def test_ops_endpoints(server):
    assert server.get("/healthz").json() == {"status": "ok"}
    ready = server.get("/readyz")
    assert ready.status_code == 200 and ready.json()["database"] == "ok"
    post(server, {"stream": "m", "data": 1})
    metrics = server.get("/metrics").text
    assert "sluice_events_in_total 1.0" in metrics
    assert "sluice_batch_flush_seconds_count" in metrics
    assert server.get("/openapi.json").json()["openapi"].startswith("3.")


def test_openapi_lists_every_route_the_app_serves(server):
    """Every (path, method) the blueprints route is documented, and nothing else."""
    import flask

    from auth.http import bp as auth_bp
    from ingest.http import bp as ingest_bp
    from mercure.http import bp as mercure_bp
    from streaming.http import bp as streaming_bp
    from web.dashboard import bp as dashboard_bp
    from web.ops import bp as ops_bp

    doc = server.get("/openapi.json").json()
    assert doc["openapi"] == "3.1.0"
    app = flask.Flask("route-table")
    for blueprint in (ingest_bp, auth_bp, streaming_bp, ops_bp, dashboard_bp, mercure_bp):
        app.register_blueprint(blueprint)
    served = {
        (rule.rule.replace("<path:stream>", "{stream}"), method.lower())
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    documented = {
        (path, method) for path, item in doc["paths"].items() for method in item if method != "parameters"
    }
    assert served == documented
