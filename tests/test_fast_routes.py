"""The precompiled route for `POST /api/v1/events` (web/fast.py) answers exactly as the Flask
route does: the same statuses, bodies and headers for success and every refusal, the same
metrics and request-log line. A request with an `Origin` header takes the Flask route, so each
case is sent both ways against one real server and compared."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tests.helpers import EVENTS, auth, token, wait_until
from web.fast import FastRoutes

FLASK = {"Origin": "http://other.example"}  # no CORS configured: only the route differs


def cases(tag: str):
    ok = {"stream": f"fast/{tag}", "data": {"n": 1}, "key": f"k-{tag}"}
    return [
        ("created", dict(json=ok, headers=auth())),
        ("duplicate", dict(json=ok, headers=auth())),
        ("bad json", dict(data=b"{nope", headers={**auth(), "Content-Type": "application/json"})),
        ("bad stream", dict(json={"stream": "no spaces allowed", "data": 1}, headers=auth())),
        ("no token", dict(json=ok)),
        ("bad token", dict(json=ok, headers={"Authorization": "Bearer nope"})),
        ("not bearer", dict(json=ok, headers={"Authorization": "Basic abc"})),
        (
            "not granted",
            dict(
                json={"stream": "other/1", "data": 1},
                headers={"Authorization": f"Bearer {token(publish=['fast/*'])}"},
            ),
        ),
        (
            "too large",
            dict(data=b"[" + b"1," * 600_000 + b"1]", headers={**auth(), "Content-Type": "application/json"}),
        ),
        ("media type", dict(data=b"x", headers={**auth(), "Content-Type": "text/plain"})),
        ("key reused", dict(json={**ok, "data": {"n": 2}}, headers=auth())),
    ]


def answer(r):
    body = r.json()
    for e in body.get("events", []):
        e.pop("id")
        e["stream"] = e["stream"].rsplit("/", 1)[0]
        e["key"] = e["key"] and e["key"].rsplit("-", 1)[0]
    if "detail" in body:
        body["detail"] = (
            body["detail"]
            .replace("fast/a", "fast/X")
            .replace("fast/b", "fast/X")
            .replace("k-a", "k-X")
            .replace("k-b", "k-X")
        )
    for k in ("key", "stream"):
        if isinstance(body.get(k), str):
            body[k] = body[k].replace("k-a", "k-X").replace("k-b", "k-X")
    headers = {k: r.headers.get(k) for k in ("Content-Type", "WWW-Authenticate", "Retry-After")}
    return r.status_code, body, headers


def test_the_fast_route_answers_as_the_flask_route_does(module_server):
    fast = [(name, answer(module_server.post(EVENTS, **kw))) for name, kw in cases("a")]
    for (name, kw), (_, got) in zip(cases("b"), fast, strict=True):
        kw["headers"] = {**kw.get("headers", {}), **FLASK}
        assert answer(module_server.post(EVENTS, **kw)) == got, name
    statuses = [got[0] for _, got in fast]
    assert statuses == [201, 200, 400, 400, 401, 401, 401, 403, 413, 415, 422]


def test_the_fast_route_counts_and_logs_like_the_others(module_server):
    before = module_server.get("/metrics").text
    r = module_server.post(EVENTS, json={"stream": "fast/log", "data": 1}, headers=auth())
    assert r.status_code == 201
    after = module_server.get("/metrics").text

    def count(text):
        line = next(
            (
                x
                for x in text.splitlines()
                if x.startswith("sluice_http_responses_total{")
                and 'route="/api/v1/events"' in x
                and 'status="201"' in x
            ),
            None,
        )
        return float(line.split()[-1]) if line else 0.0

    assert count(after) == count(before) + 1

    def logged():  # request lines are written together, within LineBuffer.FLUSH_S
        lines = [json.loads(x) for x in module_server.log().splitlines() if x.startswith("{")]
        return [x for x in lines if x.get("route") == "/api/v1/events" and x["status"] == 201]

    mine = wait_until(logged, timeout=10, message="the request's log line")
    assert mine and {"time", "method", "path", "ip", "pid", "ms"} <= set(mine[-1])
    assert mine[-1]["path"] == "/api/v1/events" and mine[-1]["method"] == "POST"


@pytest.mark.parametrize(
    "environ",
    [
        {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/v1/events"},
        {"REQUEST_METHOD": "POST", "PATH_INFO": "/api/v1/events", "QUERY_STRING": "a=1"},
        {"REQUEST_METHOD": "POST", "PATH_INFO": "/api/v1/events", "HTTP_ORIGIN": "http://x"},
        {"REQUEST_METHOD": "POST", "PATH_INFO": "/api/v1/events/"},
        {"REQUEST_METHOD": "POST", "PATH_INFO": "/api/v1/sse"},
    ],
)
def test_everything_else_goes_to_flask(environ):
    seen = []
    routes = FastRoutes(
        lambda env, start: seen.append(env) or [b"flask"],
        SimpleNamespace(settings=SimpleNamespace(request_log=False)),
    )
    assert routes(environ, lambda *a: None) == [b"flask"] and seen == [environ]


def test_the_fast_poll_answers_as_the_flask_route_does(module_server):
    server = module_server
    first = server.post(EVENTS, json={"stream": "fastpoll/1", "data": {"n": 1}}, headers=auth()).json()[
        "events"
    ][0]["id"]
    polls = [
        ("events", dict(params={"stream": "fastpoll/1", "cursor": "0", "timeout": "0"}, headers=auth())),
        (
            "nothing new",
            dict(params={"stream": "fastpoll/1", "cursor": first, "timeout": "0"}, headers=auth()),
        ),
        ("bad timeout", dict(params={"stream": "fastpoll/1", "timeout": "soon"}, headers=auth())),
        ("no token", dict(params={"stream": "fastpoll/1", "timeout": "0"})),
        (
            "token in the query",
            dict(params={"stream": "fastpoll/1", "cursor": "0", "timeout": "0", "token": token()}),
        ),
        (
            "not granted",
            dict(
                params={"stream": "fastpoll/1", "timeout": "0"},
                headers={"Authorization": f"Bearer {token(subscribe=['x/*'])}"},
            ),
        ),
        ("unknown stream", dict(params={"stream": "fastpoll/none", "timeout": "0"}, headers=auth())),
        ("too many parameters", dict(params=[("stream", "fastpoll/1")] * 70, headers=auth())),
    ]

    def seen(r):
        body = r.json()
        body.pop("sid", None)  # every answer hands out a new one
        return r.status_code, body, r.headers.get("Content-Type")

    for name, kw in polls:
        fast = seen(server.get("/api/v1/poll", **kw))
        slow = seen(server.get("/api/v1/poll", **{**kw, "headers": {**kw.get("headers", {}), **FLASK}}))
        assert fast == slow, name
    statuses = [seen(server.get("/api/v1/poll", **kw))[0] for _, kw in polls]
    assert statuses == [200, 200, 400, 401, 200, 403, 404, 400]


def test_the_plain_header_view_answers_as_werkzeugs():
    from werkzeug.datastructures import EnvironHeaders

    from web.fast import PlainHeaders

    environ = {
        "HTTP_AUTHORIZATION": "Bearer t",
        "HTTP_LAST_EVENT_ID": "abc.7",
        "CONTENT_TYPE": "application/json",
        "HTTP_X_MULTI_PART_NAME": "v",
        "CONTENT_LENGTH": "",
        "QUERY_STRING": "a=1",
        "REQUEST_METHOD": "GET",
    }
    plain, werkzeug = PlainHeaders(environ), EnvironHeaders(environ)
    for name in (
        "Authorization",
        "authorization",
        "Last-Event-ID",
        "last-event-id",
        "Content-Type",
        "Content-Length",
        "X-Multi-Part-Name",
        "Cookie",
        "Origin",
    ):
        assert plain.get(name) == werkzeug.get(name), name
        assert plain.get(name, "d") == werkzeug.get(name, "d"), name
    assert list(plain.items()) == list(werkzeug.items())
