"""Presence across processes: subscriber counts, one connection per connection id, and the
signed subscribe/unsubscribe notices the origin receives (`SLUICE_WEBHOOK_URL`)."""

import json
import signal

import gevent
import pytest
from gevent.pywsgi import WSGIServer

from config.settings import derived_webhook_secret
from streaming.webhooks import verify_signature
from tests.helpers import SECRET, auth, wait_until
from tests.sse import Stream

SSE = "/api/v1/sse"


def subscribers(server, stream):
    return server.get(f"/api/v1/streams/{stream}", headers=auth()).json()["subscribers"]


def open_sse(server, stream, last_id=None, sub="client-1"):
    headers = auth(sub)
    if last_id:
        headers["Last-Event-ID"] = last_id
    s = Stream(server.url + SSE, headers=headers, params={"stream": stream})
    assert s.response.status_code == 200
    return s


def test_subscriber_counts_add_up_every_process_and_forget_a_dead_one(make_server, database_url):
    a = make_server(database_url)
    b = make_server(database_url)
    a.put("/api/v1/streams/room", headers=auth())
    on_a = [open_sse(a, "room") for _ in range(2)]
    on_b = [open_sse(b, "room") for _ in range(3)]
    try:
        wait_until(
            lambda: subscribers(a, "room") == 5 and subscribers(b, "room") == 5,
            10,
            message="5 subscribers seen from both processes",
        )
        for s in on_b[:2]:
            s.close()
        wait_until(lambda: subscribers(a, "room") == 3, 10, message="3 after two left")
        b.kill()  # no goodbye: its heartbeat expires
        wait_until(lambda: subscribers(a, "room") == 2, 20, message="the dead process forgotten")
    finally:
        for s in on_a + on_b:
            s.close()


@pytest.mark.parametrize("same_process", [True, False])
def test_a_newer_connection_with_the_same_id_closes_the_older(make_server, database_url, same_process):
    a = make_server(database_url)
    b = a if same_process else make_server(database_url)
    a.put("/api/v1/streams/room", headers=auth())
    older = open_sse(a, "room", "twinsid.0")
    older.next(("retry",))
    newer = open_sse(b, "room", "twinsid.0")
    try:
        assert older.next(("end",), timeout=10) == ("end",)  # closed by the newer one
        r = a.post("/api/v1/events", json={"stream": "room", "data": 1}, headers=auth())
        assert r.status_code == 201
        assert newer.events(1)[0][2] == "1"  # the newer one lives on
        wait_until(lambda: subscribers(a, "room") == 1, 10, message="one connection left")
    finally:
        older.close()
        newer.close()


class Origin:
    """Receives notices; fails the first `fail` requests with 500."""

    def __init__(self, fail=0, delay=0.0):
        self.notices, self.requests, self.bad_signatures = [], 0, 0
        self.fail, self.delay = fail, delay
        self.server = WSGIServer(("127.0.0.1", 0), self.app, log=None, error_log=None)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/sluice/notices"

    def app(self, environ, start_response):
        body = environ["wsgi.input"].read()
        self.requests += 1
        if self.delay:
            gevent.sleep(self.delay)
        signature = environ.get("HTTP_SLUICE_SIGNATURE", "")
        if not verify_signature(derived_webhook_secret(SECRET), body, signature):
            self.bad_signatures += 1
        if self.requests <= self.fail:
            start_response("500 Internal Server Error", [])
            return [b""]
        self.notices += json.loads(body)["notices"]
        start_response("204 No Content", [])
        return [b""]

    def events(self):
        return [(n["event"], n["stream"], n["subject"], n["sid"]) for n in self.notices]


@pytest.fixture
def origin():
    o = Origin()
    yield o
    o.server.stop(timeout=1)


def notifying_pair(make_server, database_url, origin, grace_s):
    """Two processes that send notices to `origin`, and the stream `room`."""
    env = dict(SLUICE_WEBHOOK_URL=origin.url, WEBHOOK_GRACE_S=str(grace_s))
    a, b = make_server(database_url, **env), make_server(database_url, **env)
    a.put("/api/v1/streams/room", headers=auth())
    return a, b


def test_notices_are_signed_and_a_quick_reconnect_elsewhere_is_not_reported(
    make_server, database_url, origin
):
    a, b = notifying_pair(make_server, database_url, origin, 1.5)
    first = open_sse(a, "room", sub="user-1")
    sid = first.next(("event", "retry"), timeout=10) and first.parser.last_id.split(".")[0]
    wait_until(lambda: origin.notices, 10, message="the subscribe notice")
    assert origin.events() == [("subscribe", "room", "user-1", sid)]
    assert origin.bad_signatures == 0
    # Drop and come back on the other process with the same connection id, within the grace.
    first.close()
    again = open_sse(b, "room", f"{sid}.0", sub="user-1")
    gevent.sleep(3.5)  # past the grace period and a flush: nothing may be reported
    assert origin.events() == [("subscribe", "room", "user-1", sid)]
    # Now leave for good.
    again.close()
    wait_until(lambda: len(origin.notices) == 2, 10, message="the unsubscribe notice")
    assert origin.events()[1] == ("unsubscribe", "room", "user-1", sid)
    assert origin.bad_signatures == 0
    text = a.get("/metrics").text + b.get("/metrics").text
    assert 'sluice_webhook_notices_total{outcome="sent"}' in text


def test_a_failing_or_slow_origin_gets_retries_and_never_slows_streaming(make_server, database_url):
    origin = Origin(fail=3, delay=1.0)
    try:
        srv = make_server(
            database_url, SLUICE_WEBHOOK_URL=origin.url, WEBHOOK_GRACE_S="0.5", WEBHOOK_TIMEOUT_S="3"
        )
        srv.put("/api/v1/streams/room", headers=auth())
        streams = [open_sse(srv, "room", sub=f"user-{i}") for i in range(5)]
        # While the origin fails and dawdles, events still flow at once.
        for n in range(20):
            r = srv.post("/api/v1/events", json={"stream": "room", "data": n}, headers=auth())
            assert r.status_code == 201
        for s in streams:
            assert [e[2] for e in s.events(20)] == [str(n) for n in range(20)]
        assert origin.requests <= 2  # still retrying the first batch
        wait_until(lambda: len(origin.notices) == 5, 40, message="the notices after retries")
        assert sorted(n["subject"] for n in origin.notices) == [f"user-{i}" for i in range(5)]
        assert all(n["event"] == "subscribe" for n in origin.notices)
        assert origin.requests >= 4  # three failures, then success
        for s in streams:
            s.close()
        wait_until(lambda: len(origin.notices) == 10, 40, message="the unsubscribes")
    finally:
        origin.server.stop(timeout=1)


def test_a_long_poll_client_polling_with_its_sid_is_one_subscriber(make_server, database_url, origin):
    srv = make_server(
        database_url, SLUICE_WEBHOOK_URL=origin.url, WEBHOOK_GRACE_S="1.5", LONGPOLL_MAX_RATE="50"
    )
    srv.put("/api/v1/streams/room", headers=auth())
    sid = None
    for _ in range(6):
        params = {"stream": "room", "timeout": "0.2"}
        if sid:
            params["sid"] = sid
        sid = srv.get("/api/v1/poll", params=params, headers=auth("poller")).json()["sid"]
    wait_until(lambda: len(origin.notices) == 2, 15, message="subscribe, then unsubscribe")
    assert origin.events() == [("subscribe", "room", "poller", sid), ("unsubscribe", "room", "poller", sid)]


def test_sigterm_still_exits_quickly_with_notices_pending(make_server, database_url):
    origin = Origin(fail=1000)  # never accepts
    try:
        srv = make_server(database_url, SLUICE_WEBHOOK_URL=origin.url)
        srv.put("/api/v1/streams/room", headers=auth())
        s = open_sse(srv, "room")
        wait_until(lambda: origin.requests >= 1, 10, message="a first attempt")
        srv.signal(signal.SIGTERM)
        assert srv.wait(timeout=25) == 0
        s.close()
    finally:
        origin.server.stop(timeout=1)


def test_a_departure_is_reported_even_if_its_process_stops_during_the_grace(
    make_server, database_url, origin
):
    a, b = notifying_pair(make_server, database_url, origin, 2)
    s = open_sse(a, "room", sub="leaver")
    wait_until(lambda: origin.notices, 10, message="the subscribe notice")
    sid = origin.notices[0]["sid"]
    s.close()
    wait_until(lambda: subscribers(a, "room") == 0, 10, message="the leave")
    a.signal(signal.SIGTERM)  # gone before the grace period ends
    assert a.wait(timeout=25) == 0
    wait_until(lambda: len(origin.notices) == 2, 15, message="the other process to report it")
    assert origin.events()[1] == ("unsubscribe", "room", "leaver", sid)
    assert b.get("/healthz").status_code == 200
