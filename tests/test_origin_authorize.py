"""Origin authorization (`SLUICE_AUTHORIZE_URL`) against a real server and a real origin.

The origin is a small WSGI server in the test process that decides by the `session` cookie and
counts every request it gets, so caching is measured where it matters: at the origin.
"""

import json

import gevent
import pytest
from gevent.pywsgi import WSGIServer

from tests.helpers import auth, token
from tests.sse import Stream

SSE = "/api/v1/sse"
POLL = "/api/v1/poll"


class Origin:
    """session=good grants `room/*` for 60 s; bad → 403 with a problem body; nologin → 401;
    slow → answers after 5 s; broken → 500; nonsense → 200 with a body that is not a grant;
    short → grants with ttl 0 (never cached)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.server = WSGIServer(("127.0.0.1", 0), self.app, log=None, error_log=None)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/authorize"

    def app(self, environ, start_response):
        body = json.loads(environ["wsgi.input"].read() or b"{}")
        cookie = environ.get("HTTP_COOKIE", "")
        self.calls.append(
            {
                "path": environ["PATH_INFO"],
                "cookie": cookie,
                "body": body,
                "forwarded_for": environ.get("HTTP_X_FORWARDED_FOR"),
                "tenant": environ.get("HTTP_X_TENANT"),
                "authorization": environ.get("HTTP_AUTHORIZATION"),
            }
        )
        session = dict(p.strip().split("=", 1) for p in cookie.split(";") if "=" in p).get("session")

        def answer(status, obj, ctype="application/json"):
            start_response(status, [("Content-Type", ctype)])
            return [json.dumps(obj).encode()]

        if session == "good":
            return answer("200 OK", {"streams": ["room/*"], "ttl": 60, "sub": "user-7"})
        if session == "unhurried":
            gevent.sleep(0.3)
            return answer("200 OK", {"streams": ["room/*"], "ttl": 60, "sub": "user-6"})
        if session == "short":
            return answer("200 OK", {"streams": ["room/*"], "ttl": 0, "sub": "user-8"})
        if session == "bad":
            return answer(
                "403 Forbidden",
                {"type": "about:blank", "title": "Forbidden", "detail": "user-9 may not watch this room"},
                "application/problem+json",
            )
        if session == "slow":
            gevent.sleep(5)
            return answer("200 OK", {"streams": ["**"], "ttl": 60})
        if session == "broken":
            return answer("500 Internal Server Error", {"oops": True})
        if session == "nonsense":
            return answer("200 OK", {"streams": "room/*"})
        return answer("401 Unauthorized", {"detail": "log in first"})

    def stop(self) -> None:
        self.server.stop(timeout=1)


@pytest.fixture
def origin():
    o = Origin()
    yield o
    o.stop()


@pytest.fixture
def srv(make_server, database_url, origin):
    s = make_server(
        database_url,
        SLUICE_AUTHORIZE_URL=origin.url,
        AUTHORIZE_TIMEOUT_S="0.5",
        AUTHORIZE_FORWARD_HEADERS="Cookie,X-Tenant",
        HEARTBEAT_S="0.3",
    )
    for name in ("room/1", "room/2", "other/1"):
        assert s.put(f"/api/v1/streams/{name}", headers=auth()).status_code in (200, 201)
    return s


def publish(server, stream, data):
    r = server.post("/api/v1/events", json={"stream": stream, "data": data}, headers=auth())
    assert r.status_code == 201, r.text
    return r.json()["events"][0]["id"]


def test_origin_grant_lets_a_cookie_subscriber_in_and_sees_what_was_asked(srv, origin):
    s = Stream(
        srv.url + SSE,
        params={"stream": "room/1"},
        cookies={"session": "good"},
        headers={"X-Tenant": "acme", "X-Not-Forwarded": "secret"},
    )
    try:
        assert s.response.status_code == 200
        s.next(("retry",))
        publish(srv, "room/1", {"n": 1})
        assert s.events(1)[0][2] == '{"n":1}'
    finally:
        s.close()
    assert len(origin.calls) == 1
    call = origin.calls[0]
    assert call["path"] == "/authorize"
    assert call["body"] == {"streams": ["room/1"]}
    assert call["cookie"] == "session=good"
    assert call["tenant"] == "acme"
    assert call["forwarded_for"] == "127.0.0.1"
    assert call["authorization"] is None  # only the chosen headers travel


def test_grants_are_cached_for_their_ttl_across_reconnects_transports_and_processes(
    srv, origin, make_server, database_url
):
    for _ in range(4):
        s = Stream(srv.url + SSE, params={"stream": "room/1"}, cookies={"session": "good"})
        assert s.response.status_code == 200
        s.close()
        r = srv.get(POLL, params={"stream": "room/1", "timeout": "0"}, cookies={"session": "good"})
        assert r.status_code == 200, r.text
    assert len(origin.calls) == 1
    # Another process shares the answer through Redis.
    other = make_server(database_url, SLUICE_AUTHORIZE_URL=origin.url)
    r = other.get(POLL, params={"stream": "room/1", "timeout": "0"}, cookies={"session": "good"})
    assert r.status_code == 200, r.text
    assert len(origin.calls) == 1
    # Different streams or different cookies are a different question.
    srv.get(POLL, params={"stream": "room/2", "timeout": "0"}, cookies={"session": "good"})
    assert len(origin.calls) == 2
    metrics = srv.get("/metrics").text
    assert 'sluice_authorize_requests_total{outcome="cached"} 7.0' in metrics
    assert 'sluice_authorize_requests_total{outcome="granted"} 2.0' in metrics


def test_a_zero_ttl_grant_is_asked_every_time(srv, origin):
    for _ in range(3):
        r = srv.get(POLL, params={"stream": "room/1", "timeout": "0"}, cookies={"session": "short"})
        assert r.status_code == 200
    assert len(origin.calls) == 3


def test_concurrent_checks_share_one_origin_request(srv, origin):
    # The origin takes 0.3 s, so all 20 checks are in flight together.
    jobs = [
        gevent.spawn(
            srv.get, POLL, params={"stream": "room/1", "timeout": "0"}, cookies={"session": "unhurried"}
        )
        for _ in range(20)
    ]
    gevent.joinall(jobs, timeout=20)
    assert all(j.value is not None and j.value.status_code == 200 for j in jobs)
    assert len(origin.calls) == 1


def test_the_grant_covers_only_its_patterns(srv, origin):
    r = srv.get(POLL, params={"stream": "other/1", "timeout": "0"}, cookies={"session": "good"})
    assert r.status_code == 403
    assert r.json()["type"].endswith("/not-granted")
    s = Stream(srv.url + SSE, params={"stream": ["room/1", "other/1"]}, cookies={"session": "good"})
    assert s.response.status_code == 403
    s.close()


@pytest.mark.parametrize(
    "session, status, detail",
    [
        ("bad", 403, "user-9 may not watch this room"),
        ("", 401, "log in first"),
    ],
)
@pytest.mark.parametrize("path", [SSE, POLL])
def test_origin_refusals_reach_the_client_as_problems(srv, origin, path, session, status, detail):
    r = srv.get(
        path, params={"stream": "room/1"}, cookies={"session": session} if session else {}, timeout=10
    )
    assert r.status_code == status
    assert r.headers["Content-Type"] == "application/problem+json"
    assert r.json()["detail"] == detail
    assert r.json()["type"].endswith("/origin-refused")
    # Refusals are not cached: the origin decides again next time.
    srv.get(path, params={"stream": "room/1"}, cookies={"session": session} if session else {})
    assert len(origin.calls) == 2


@pytest.mark.parametrize("session", ["slow", "broken", "nonsense"])
def test_a_slow_or_failing_origin_gets_retry_or_503_never_a_hang(srv, origin, session):
    s = Stream(srv.url + SSE, params={"stream": "room/1"}, cookies={"session": session})
    try:
        assert s.response.status_code == 200  # not a 5xx: EventSource must come back later
        assert s.next(("retry",))[0] == "retry"
        assert s.next() == ("end",)  # nothing else: no id, no events
    finally:
        s.close()
    r = srv.get(POLL, params={"stream": "room/1"}, cookies={"session": session}, timeout=10)
    assert r.status_code == 503
    assert r.json()["type"].endswith("/origin-unavailable")
    assert int(r.headers["Retry-After"]) >= 1
    assert 'outcome="unavailable"' in srv.get("/metrics").text


def test_a_token_is_used_instead_of_the_origin(srv, origin):
    r = srv.get(POLL, params={"stream": "room/1", "timeout": "0"}, headers=auth(), cookies={"session": "bad"})
    assert r.status_code == 200
    r = srv.get(
        POLL,
        params={"stream": "room/1", "timeout": "0"},
        headers={"Authorization": f"Bearer {token(subscribe=['other/*'])}"},
    )
    assert r.status_code == 403
    assert origin.calls == []


def test_without_an_authorize_url_a_token_is_required(make_server, database_url):
    s = make_server(database_url)
    s.put("/api/v1/streams/room/1", headers=auth())
    r = s.get(POLL, params={"stream": "room/1"}, cookies={"session": "good"})
    assert r.status_code == 401


def test_revoking_a_subject_drops_its_cached_grants_so_the_origin_is_asked_again(
    srv, origin, make_server, database_url
):
    other = make_server(
        database_url, SLUICE_AUTHORIZE_URL=origin.url, AUTHORIZE_FORWARD_HEADERS="Cookie,X-Tenant"
    )
    s = Stream(srv.url + SSE, params={"stream": "room/1"}, cookies={"session": "good"})
    assert s.response.status_code == 200
    s.next(("retry",))
    assert (
        other.get(POLL, params={"stream": "room/1", "timeout": "0"}, cookies={"session": "good"}).status_code
        == 200
    )
    assert len(origin.calls) == 1  # the second process used the grant cached in Redis
    revoker = {"Authorization": f"Bearer {token('origin-app', revoke=True)}"}
    r = srv.post("/api/v1/revocations", json={"sub": "user-7"}, headers=revoker)
    assert r.status_code == 202
    assert s.next(("event",), timeout=15) == ("end",)  # the open stream ends
    s.close()
    # Neither process readmits it from a grant given before the revocation: the first asks
    # the origin again (which still says yes), the other uses that fresh grant from Redis.
    calls = len(origin.calls)
    for server in (srv, other):
        r = server.get(POLL, params={"stream": "room/1", "timeout": "0"}, cookies={"session": "good"})
        assert r.status_code == 200, r.text
        assert len(origin.calls) == calls + 1, server.url
    again = Stream(other.url + SSE, params={"stream": "room/1"}, cookies={"session": "good"})
    assert again.response.status_code == 200
    again.close()
