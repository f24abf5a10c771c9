"""Each attack class of SECURITY.md's table against a real server (or the matcher itself): the
request that froze, crashed or fooled the landed server, and what it gets now."""

from __future__ import annotations

import re
import time

import gevent
import gevent.event
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auth.grants import MAX_WILDCARDS, Grants, PatternIndex, pattern_covers, valid_pattern
from mercure.selectors import MAX_EXPRESSIONS, Selectors, TemplateTooComplex, compile_template
from tests.helpers import EVENTS, SSE, HealthProbe, auth, token, wait_until
from tests.sse import Stream

HUB = "/.well-known/mercure"
MATCH_BUDGET_S = 0.05  # one match, whatever the input; backtracking took seconds to hours
HEALTHZ_BUDGET_S = 0.25  # API.md: /healthz answers within 250 ms while any request runs


# -- 1. linear-time matching ------------------------------------------------------------------


def _timed(fn, *args) -> float:
    began = time.perf_counter()
    fn(*args)
    return time.perf_counter() - began


_OPS = st.sampled_from(["", "+", "#", ".", "/", ";", "?", "&"])
_TEMPLATE = st.lists(
    st.tuples(st.text("a/?&=.,;#", max_size=3), _OPS), min_size=1, max_size=MAX_EXPRESSIONS
).map(lambda parts: "".join(f"{lit}{{{op}a}}" for lit, op in parts) + "?")
_TOPIC = st.builds(
    lambda ch, n, tail: ch * n + tail,
    st.sampled_from("a/?&=.,;#"),
    st.integers(500, 4000),
    st.text("ab/?", max_size=3),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_TEMPLATE, _TOPIC)
def test_hostile_uri_templates_match_any_topic_within_a_fixed_budget(template, topic):
    matcher = Selectors()
    assert _timed(matcher.matches, template, topic) < MATCH_BUDGET_S


_PATTERN = st.builds(
    lambda ps, tail: "user/42/" + "".join(ps) + tail,
    st.lists(st.sampled_from(["*a", "a*a", "*b", "*ab"]), min_size=1, max_size=MAX_WILDCARDS - 1),
    st.sampled_from(["", "*", "b"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_PATTERN, st.integers(100, 190))
def test_hostile_stream_patterns_match_any_name_within_a_fixed_budget(pattern, n):
    assert valid_pattern(pattern)
    stream = "user/42/" + "a" * n
    index = PatternIndex()
    index.add(pattern)
    assert _timed(index.matching, stream) < MATCH_BUDGET_S
    assert _timed(Grants([pattern]).allows, stream) < MATCH_BUDGET_S
    assert _timed(pattern_covers, "user/42/" + "a*" * 3, pattern) < MATCH_BUDGET_S


def test_what_was_slow_is_refused_or_instant():
    # 25: twelve `{+a}` took 45 s for one match; past MAX_EXPRESSIONS a selector is refused.
    with pytest.raises(TemplateTooComplex):
        compile_template("{+a}" * (MAX_EXPRESSIONS + 1) + "?")
    assert Selectors().matches("{+a}" * (MAX_EXPRESSIONS + 1), "x") is False  # a claim: itself
    regex = compile_template("{+a}" * MAX_EXPRESSIONS + "?")
    assert regex is not None and regex.fullmatch("a" * 2000) is None
    assert valid_pattern("user/42/" + "*a" * MAX_WILDCARDS) is True
    assert valid_pattern("user/42/" + "*a" * (MAX_WILDCARDS + 1) + "b") is False
    assert Grants(["user/42/" + "*a" * MAX_WILDCARDS + "b"]).allows("user/42/" + "a" * 190) is False


def test_a_new_stream_is_tested_only_against_patterns_that_can_match_it():
    index = PatternIndex()
    for n in range(50):
        index.add(f"room/{n}/*")
    index.add("*/lobby")
    assert index.candidates("room/7/x") == 2  # `room/7/*` and `*/lobby`, not all 51
    assert index.matching("room/7/x") == ("room/7/*",)
    assert index.matching("hall/lobby") == ("*/lobby",)


def test_selectors_past_the_bounds_are_refused_before_the_first_byte(make_server, database_url):
    server = make_server(
        database_url,
        MERCURE_ANONYMOUS="1",
        MERCURE_PUBLISHER_JWT_KEY="p" * 40,
        MERCURE_SUBSCRIBER_JWT_KEY="s" * 40,
    )
    too_many = "{+a}" * (MAX_EXPRESSIONS + 1) + "?"
    r = server.get(HUB, params={"topic": too_many}, stream=True)
    assert r.status_code == 400 and r.json()["field"] == "topic"
    r = server.get(SSE, params={"stream": "user/" + "*a" * (MAX_WILDCARDS + 1)}, headers=auth())
    assert r.status_code == 400 and r.json()["field"] == "stream"


def test_the_freezing_attacks_leave_healthz_answering(make_server, database_url):
    """The 45-character selector and the `*a*a…b` pattern, at their allowed maximum, subscribed
    and then matched by publishes with long names, while /healthz is asked every 20 ms."""
    import jwt

    pub_key = "p" * 40
    server = make_server(
        database_url,
        MERCURE_ANONYMOUS="1",
        MERCURE_PUBLISHER_JWT_KEY=pub_key,
        MERCURE_SUBSCRIBER_JWT_KEY="s" * 40,
    )
    publisher = jwt.encode({"mercure": {"publish": ["*"]}}, pub_key, algorithm="HS256")
    selector = Stream(server.url + HUB, params={"topic": "{+a}" * MAX_EXPRESSIONS + "?"})
    pattern = "user/42/" + "*a" * (MAX_WILDCARDS - 1) + "*b"
    native = Stream(
        server.url + SSE,
        params={"stream": pattern},
        headers={"Authorization": f"Bearer {token('u', subscribe=['user/42/**'])}"},
    )
    try:
        assert selector.response.status_code == 200 and native.response.status_code == 200
        with HealthProbe(server) as probe:
            for n in range(5):
                r = server.post(
                    HUB,
                    data={"topic": "a" * (1000 + n), "data": "x"},
                    headers={"Authorization": f"Bearer {publisher}"},
                )
                assert r.status_code == 200, r.text
                r = server.post(
                    EVENTS, json={"stream": "user/42/" + "a" * (180 + n), "data": n}, headers=auth()
                )
                assert r.status_code == 201, r.text
            time.sleep(0.5)  # the probe keeps asking while the fan-out runs
    finally:
        selector.close()
        native.close()
    assert probe.answers > 0
    assert probe.worst < HEALTHZ_BUDGET_S, probe.worst
    assert _gauge(server, "sluice_event_loop_lag_seconds") < HEALTHZ_BUDGET_S  # the server's view


# -- 25.2 nothing holds the event loop unseen --------------------------------------------------


def test_the_loop_lag_is_measured_and_a_block_is_logged_with_its_greenlet(caplog):
    import logging

    from runtime.looplag import LoopLag

    lag = LoopLag(interval_s=0.01).start()
    try:
        gevent.sleep(0.05)

        def hog_the_loop() -> None:
            until = time.perf_counter() + 0.3
            while time.perf_counter() < until:  # no yield: every other greenlet waits
                pass

        with caplog.at_level(logging.WARNING, logger="sluice.loop"):
            gevent.spawn(hog_the_loop).join()
            wait_until(lambda: "hog_the_loop" in caplog.text, timeout=10)
        assert lag.worst() >= 0.25  # the ticker woke that late
        assert "the event loop was held" in caplog.text
    finally:
        lag.stop()


# -- 7. a pattern delivers only what a direct subscribe admits --------------------------------


def test_a_pattern_delivers_only_streams_the_grant_admits_live_and_from_history(server):
    reader = {"Authorization": f"Bearer {token('u', subscribe=['user/42/**'])}"}
    assert server.get(SSE, params={"stream": "user/42/"}, headers=reader).status_code in (403, 404)

    def post(stream, n):
        r = server.post(EVENTS, json={"stream": stream, "data": n}, headers=auth())
        assert r.status_code == 201, r.text

    post("user/42/", 0)  # matched by `user/42/*` (an empty segment), not granted by the token
    post("user/42/x", 1)
    assert server.get(SSE, params={"stream": "user/42/", "timeout": "0"}, headers=reader).status_code == 403
    sse = Stream(server.url + SSE, headers=reader, params={"stream": "user/42/*", "lastEventId": "0"})
    try:
        assert sse.response.status_code == 200
        got = sse.events(1)
        post("user/42/", 2)
        post("user/42/y", 3)
        got += sse.events(1)
        polled = server.get(
            "/api/v1/poll", params={"stream": "user/42/*", "cursor": "0", "timeout": "0"}, headers=reader
        ).json()
    finally:
        sse.close()
    assert [e[2] for e in got] == ["1", "3"]
    assert [e["data"] for e in polled["events"]] == [1, 3]


# -- 31.1 no request can crash the process ----------------------------------------------------


def _gauge(server, name: str, label: str = "") -> float:
    for line in server.get("/metrics").text.splitlines():
        if line.startswith(name + (label or " ")) and not line.startswith("#"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{label} in /metrics")


MERCURE_KEYS = {"MERCURE_PUBLISHER_JWT_KEY": "p" * 40, "MERCURE_SUBSCRIBER_JWT_KEY": "s" * 40}


def _mercure_publisher() -> str:
    import jwt

    return jwt.encode({"mercure": {"publish": ["*"]}}, "p" * 40, algorithm="HS256")


def test_a_non_ascii_resume_id_neither_crashes_nor_leaks(make_server, database_url):
    server = make_server(database_url, MERCURE_ANONYMOUS="1", **MERCURE_KEYS)
    r = server.post(
        HUB,
        data={"topic": "x", "data": "1", "id": "price-€"},
        headers={"Authorization": f"Bearer {_mercure_publisher()}"},
    )
    assert r.status_code == 200 and r.text == "price-€"
    for _attempt in range(3):
        via_query = Stream(server.url + HUB, params={"topic": "x", "lastEventID": "price-€"})
        via_header = Stream(
            server.url + HUB, params={"topic": "x"}, headers={"Last-Event-ID": "price-€"}
        )  # sent as UTF-8
        try:
            for s in (via_query, via_header):
                assert s.response.status_code == 200
                # the id, percent-encoded as UTF-8 (a header is Latin-1 at most)
                assert s.response.headers["Last-Event-ID"] == "price-%E2%82%AC"
                s.next(("retry",))
        finally:
            via_query.close()
            via_header.close()
        assert server.get("/healthz").status_code == 200
    wait_until(lambda: _gauge(server, "sluice_subscribers") == 0)
    wait_until(lambda: _gauge(server, "sluice_connections", '{transport="sse"}') == 0)
    assert server.proc.poll() is None


def _fds(server) -> int:
    import os

    return len(os.listdir(f"/proc/{server.proc.pid}/fd"))


def _abort(server, request: bytes) -> None:
    """Send `request` on a raw socket and close it before (or while) the answer comes."""
    import socket

    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        sock.sendall(request)
        sock.recv(1)  # the answer has started (or the server closed): go away mid-response
    except OSError:
        pass
    finally:
        sock.close()


def test_streams_opened_failed_and_aborted_on_every_door_leak_nothing(make_server, database_url):
    server = make_server(database_url, MERCURE_ANONYMOUS="1", MAX_CONNECTIONS_PER_TOKEN="2", **MERCURE_KEYS)
    tok = token("leaky")
    server.post(
        HUB,
        data={"topic": "x", "data": "1", "id": "ünï"},
        headers={"Authorization": f"Bearer {_mercure_publisher()}"},
    )
    publish_ok = server.post(EVENTS, json={"stream": "s", "data": 1}, headers=auth())
    assert publish_ok.status_code == 201
    wait_until(lambda: _gauge(server, "sluice_subscribers") == 0)
    greenlets_before, fds_before = _gauge(server, "sluice_greenlets"), _fds(server)
    bearer = f"Authorization: Bearer {tok}"

    def req(target: str, *headers: str) -> bytes:
        lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", *headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()  # UTF-8, as a client may send

    shapes = [
        req("/api/v1/sse?stream=s", bearer),
        req("/api/v1/sse?stream=s&lastEventId=0", bearer),
        req("/api/v1/sse?stream=s", "Authorization: Bearer x.y.z"),
        req("/api/v1/sse?stream=nope", bearer),
        req("/api/v1/sse?stream=s", bearer, "Last-Event-ID: \u00ff\u00fe.12"),
        req("/api/v1/poll?stream=s&timeout=5", bearer),
        req("/api/v1/poll?stream=s&cursor=0&timeout=5", bearer),
        req("/.well-known/mercure?topic=x"),
        req("/.well-known/mercure?topic=x", "Last-Event-ID: ünï"),
        req("/.well-known/mercure?topic=x&lastEventID=%C3%BCn%C3%AF"),
        req("/.well-known/mercure?topic=x&lastEventID=earliest"),
        req("/.well-known/mercure?topic=x", "Authorization: Bearer bad"),
        req("/.well-known/mercure?topic=x", "Last-Event-ID: "),
    ]
    for _ in range(3):
        for shape in shapes:
            _abort(server, shape)
    assert server.get("/healthz").status_code == 200
    wait_until(lambda: _gauge(server, "sluice_subscribers") == 0)
    wait_until(lambda: _gauge(server, "sluice_connections", '{transport="sse"}') == 0)
    wait_until(lambda: _gauge(server, "sluice_connections", '{transport="poll"}') == 0)
    wait_until(lambda: _gauge(server, "sluice_greenlets") <= greenlets_before + 2)
    wait_until(lambda: _fds(server) <= fds_before + 2)
    # every limit slot came back: the token's two connections are admitted again
    both = [
        Stream(server.url + SSE, params={"stream": "s"}, headers={"Authorization": f"Bearer {tok}"})
        for _ in range(2)
    ]
    try:
        assert [s.response.status_code for s in both] == [200, 200]
    finally:
        for s in both:
            s.close()
    assert server.proc.poll() is None


# -- 31.2 one reading of every request --------------------------------------------------------

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"  # a 404, if it is ever read as a request
AS_CHUNKED = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
LAST = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def _conversation(
    server, head: bytes, body: bytes, first: bytes = b"POST /healthz HTTP/1.1\r\nHost: x\r\n"
) -> list[bytes]:
    """Send one request (`head` holds its header lines) with `body`, then a last request that
    closes; return the status lines of everything that came back."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(first + head + b"\r\n" + body + LAST)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    return re.findall(rb"HTTP/1\.[01] [0-9]{3} [^\r\n]*", got)


@pytest.mark.parametrize(
    "head, body",
    [
        (b"Content-Length: 0\r\nContent-Length: %d\r\n" % len(SMUGGLED), SMUGGLED),
        (b"Content-Length: %d\r\nContent-Length: 0\r\n" % len(SMUGGLED), SMUGGLED),
        (b"Transfer-Encoding : chunked\r\n", AS_CHUNKED),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", AS_CHUNKED),
        (b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", AS_CHUNKED),
        (b"Transfer-Encoding: gzip, chunked\r\n", AS_CHUNKED),
        (b"Transfer-Encoding: chunked, gzip\r\n", AS_CHUNKED),
        (b"X-Pad: a\r\n Transfer-Encoding: chunked\r\n", AS_CHUNKED),
        (b"Transfer-Encoding:\r\n chunked\r\n", AS_CHUNKED),
        (b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % len(AS_CHUNKED), AS_CHUNKED),
        (b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n", AS_CHUNKED),
        (b"Content-Length: 1_0\r\n", SMUGGLED),
        (b"Content-Length: +%d\r\n" % len(SMUGGLED), SMUGGLED),
        (b"Content-Length: 0x%x\r\n" % len(SMUGGLED), SMUGGLED),
        (b"Content-Length: \xb2\r\n", SMUGGLED),
        (b"Content-Length: -1\r\n", SMUGGLED),
        (b"Content-Length : %d\r\n" % len(SMUGGLED), SMUGGLED),
        (b"Host: y\r\n", b""),
    ],
)
def test_each_smuggling_shape_is_400_with_connection_close(module_server, head, body):
    statuses = _conversation(module_server, head, body)
    assert statuses == [b"HTTP/1.1 400 Bad Request"], statuses  # and the connection closed


def test_plain_framing_still_reads_one_body(module_server):
    ingest = (
        b"POST /api/v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: {auth()['Authorization']}\r\n".encode()
    )
    for head, body in [
        (b"Content-Length: %d\r\n" % len(SMUGGLED), SMUGGLED),
        (b"Content-Length: %d, %d\r\n" % (len(SMUGGLED), len(SMUGGLED)), SMUGGLED),
        (b"Transfer-Encoding: chunked\r\n", AS_CHUNKED),
        (b"Transfer-Encoding: Chunked\r\n", AS_CHUNKED),
    ]:
        statuses = _conversation(module_server, head, body, first=ingest)
        # the body is read as the ingest's (not JSON: 400), then the last request is answered
        assert statuses == [b"HTTP/1.1 400 Bad Request", b"HTTP/1.1 200 OK"], (head, statuses)


_FRAMING_LINES = st.sampled_from(
    [
        b"Content-Length: %d" % len(SMUGGLED),
        b"Content-Length: 0",
        b"Content-Length: 10",
        b"Content-Length: %d" % len(AS_CHUNKED),
        b"Content-Length: 1_0",
        b"Content-Length:  7 ",
        b"Transfer-Encoding: chunked",
        b"Transfer-Encoding : chunked",
        b"Transfer-Encoding: gzip",
        b"Transfer-Encoding: identity",
        b"Transfer-Encoding: gzip, chunked",
        b"Transfer-encoding: CHUNKED",
        b" chunked",
        b"\tTransfer-Encoding: chunked",
        b"X-Other: 1",
        b"Transfer-Encoding:\x0bchunked",
    ]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from(
        [(b"Content-Length: %d" % len(SMUGGLED), SMUGGLED), (b"Transfer-Encoding: chunked", AS_CHUNKED)]
    ),
    st.lists(_FRAMING_LINES, max_size=3),
    st.integers(0, 3),
)
def test_no_mix_of_framing_headers_lets_a_body_be_read_as_a_request(module_server, framing, noise, at):
    """The body holds a request under its true framing; whatever framing lines are mixed in,
    that request is never answered (400, or read as the body it is)."""
    true_line, body = framing
    lines = [*noise[:at], true_line, *noise[at:]]
    statuses = _conversation(module_server, b"".join(line + b"\r\n" for line in lines), body)
    assert statuses and not any(b" 404 " in s for s in statuses), (lines, statuses)


# -- 25.3 revocation is atomic with admission --------------------------------------------------

REVOKER = {"Authorization": f"Bearer {token('origin', revoke=True)}"}


def _drain(stream, timeout: float = 20) -> list:
    """Everything a stream sends until it ends (events and `retry:`s)."""
    items = []
    with gevent.Timeout(timeout):
        while (item := stream.next(("event", "retry"), timeout=timeout)) != ("end",):
            items.append(item)
    return items


def test_hundreds_of_opens_racing_a_jti_revocation_across_two_processes_leave_no_one_in(
    make_server, database_url
):
    a, b = make_server(database_url), make_server(database_url)
    a.put("/api/v1/streams/race/1", headers=auth())
    tokens = [token("racer", subscribe=["race/**"], jti="race-1", n=n) for n in range(300)]
    streams: list = []
    revoked = gevent.event.Event()

    def open_one(n: int) -> None:
        server = (a, b)[n % 2]
        if n == 150:
            r = a.post("/api/v1/revocations", json={"jti": "race-1"}, headers=REVOKER)
            assert r.status_code == 202, r.text
            revoked.set()
        streams.append(
            (
                revoked.is_set(),
                Stream(
                    server.url + SSE,
                    params={"stream": "race/1"},
                    headers={"Authorization": f"Bearer {tokens[n]}"},
                ),
            )
        )

    gevent.joinall([gevent.spawn(open_one, n) for n in range(300)], raise_error=True)
    assert revoked.is_set()
    r = a.post(EVENTS, json={"stream": "race/1", "data": "after"}, headers=auth())
    assert r.status_code == 201
    admitted = deliveries = 0
    for _, s in streams:
        if s.response.status_code == 200:
            admitted += 1
            items = _drain(s)  # every admitted stream ends by itself (a survivor times out)
            deliveries += sum(1 for item in items if item[0] == "event")
        else:
            assert s.response.status_code == 401
        s.close()
    for server in (a, b):  # nothing is left registered
        wait_until(lambda server=server: _gauge(server, "sluice_subscribers") == 0)
    late = Stream(b.url + SSE, params={"stream": "race/1"}, headers={"Authorization": f"Bearer {tokens[0]}"})
    assert late.response.status_code == 401
    late.close()
    assert deliveries == 0, (deliveries, admitted)


# -- 31.3 revocations and single-use tokens fail closed ----------------------------------------


def _poll_status(server, tok: str) -> int:
    return server.get(
        "/api/v1/poll", params={"stream": "fc/1", "timeout": "0"}, headers={"Authorization": f"Bearer {tok}"}
    ).status_code


def test_revocations_and_spent_tokens_survive_redis_and_process_restarts(
    make_server, database_url, own_redis
):
    import redis as redis_client

    server = make_server(database_url, REDIS_URL=own_redis.url)
    server.put("/api/v1/streams/fc/1", headers=auth())
    victim = token("victim", subscribe=["fc/**"])
    once = token("single", subscribe=["fc/**"], once=True, jti="only-once")
    assert _poll_status(server, victim) == 200
    r = server.get(
        "/api/v1/poll", params={"stream": "fc/1", "timeout": "0"}, headers={"Authorization": f"Bearer {once}"}
    )
    assert r.status_code == 200, r.text  # spends it
    assert _poll_status(server, once) == 401
    r = server.post("/api/v1/revocations", json={"sub": "victim"}, headers=REVOKER)
    assert r.status_code == 202
    assert _poll_status(server, victim) == 401

    # Redis stopped, Sluice restarted: the new process reads the revocation from Postgres.
    own_redis.stop()
    server.stop()
    server.start()
    assert _poll_status(server, victim) == 401

    # Redis back, empty (no persistence): the process erases nothing and writes back what
    # Redis lacks; the spent single-use token stays spent.
    own_redis.start()
    client = redis_client.Redis.from_url(own_redis.url)
    wait_until(
        lambda: any(client.hexists(k, "victim") for k in client.keys("*revoked-sub")),
        timeout=30,
        message="the revocation written back to the empty Redis",
    )
    assert _poll_status(server, victim) == 401
    assert _poll_status(server, once) == 401
    assert _poll_status(server, token("victim", subscribe=["fc/**"], iat=time.time() + 5)) == 200


# -- 25.4 cookies read; writes need the right origin -------------------------------------------


def test_a_cookie_authenticated_publish_needs_an_allowed_origin(make_server, database_url):
    server = make_server(database_url, MERCURE_PUBLISH_ORIGINS="https://app.example", **MERCURE_KEYS)
    import jwt

    watcher = Stream(
        server.url + HUB,
        params={"topic": "csrf"},
        headers={
            "Authorization": "Bearer "
            + jwt.encode({"mercure": {"subscribe": ["*"]}}, "s" * 40, algorithm="HS256")
        },
    )
    assert watcher.response.status_code == 200
    watcher.next(("retry",))
    cookie = {"mercureAuthorization": _mercure_publisher()}

    def form(n: str, **headers) -> int:
        return server.post(
            HUB, data={"topic": "csrf", "data": n}, cookies=cookie, headers=headers
        ).status_code

    refused = [
        form("evil-origin", Origin="https://evil.example"),
        form("null-origin", Origin="null"),
        form("cross-site", **{"Sec-Fetch-Site": "cross-site"}),
        form("same-site", **{"Sec-Fetch-Site": "same-site"}),
        form("evil-referer", Referer="https://evil.example/page"),
        form("nothing-said"),
    ]
    assert refused == [403] * 6
    accepted = [
        form("allowed-origin", Origin="https://app.example"),
        form("same-origin", **{"Sec-Fetch-Site": "same-origin"}),
        form("own-origin", Origin=server.url),
        form("allowed-referer", Referer="https://app.example/editor"),
    ]
    assert accepted == [200] * 4
    r = server.post(
        HUB,
        data={"topic": "csrf", "data": "header-token"},  # not a cookie: as before
        headers={"Authorization": f"Bearer {_mercure_publisher()}", "Origin": "https://evil.example"},
    )
    assert r.status_code == 200
    got = [e[2] for e in watcher.events(5)]
    watcher.close()
    assert got == [
        "allowed-origin",
        "same-origin",
        "own-origin",
        "allowed-referer",
        "header-token",
    ]  # nothing refused was stored or sent


# -- 25.9 the development server binds what it says --------------------------------------------


def _listening_addresses(port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_python_app_py_binds_loopback_unless_host_says_otherwise(make_server, database_url):
    server = make_server(database_url, HOST="")
    assert _listening_addresses(server.port) == {"0100007F"}  # 127.0.0.1, little-endian hex
    assert f"listening on http://127.0.0.1:{server.port}" in server.log()
    everywhere = make_server(database_url, HOST="0.0.0.0")
    assert _listening_addresses(everywhere.port) == {"00000000"}
    assert "listening on every interface (0.0.0.0)" in everywhere.log()


# -- 25.6 / 31.7 one spelling per token, no 5xx, a bad event fails alone -----------------------


def _jws(header: dict, payload: dict, key: str) -> str:
    import base64
    import hashlib
    import hmac
    import json

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    # json.dumps escapes a lone surrogate as `\ud800`, as PyJWT's encoder would
    signing = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    return signing + "." + b64(hmac.new(key.encode(), signing.encode(), hashlib.sha256).digest())


def _altered_last_bits(tok: str) -> str:
    """The same bytes, spelled with the signature's unused low bits set (not canonical)."""
    import base64

    alphabet = (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_").decode()
    head, _, sig = tok.rpartition(".")
    assert base64.urlsafe_b64decode(sig + "=") and len(sig) % 4 == 3  # 32 bytes: 2 spare bits
    value = alphabet.index(sig[-1])
    return head + "." + sig[:-1] + alphabet[value | 0b11 if value & 0b11 == 0 else value & ~0b11]


def test_one_spelling_per_token_and_malformed_tokens_are_401(make_server, database_url):
    from tests.helpers import SECRET

    server = make_server(database_url, MAX_CONNECTIONS_PER_TOKEN="1", **MERCURE_KEYS)
    server.put("/api/v1/streams/sp/1", headers=auth())
    tok = token("speller")
    held = Stream(server.url + SSE, params={"stream": "sp/1"}, headers={"Authorization": f"Bearer {tok}"})
    assert held.response.status_code == 200
    now = int(time.time())
    claims = {"sub": "x", "exp": now + 600, "publish": ["**"], "subscribe": ["**"]}
    spellings = [
        tok + "=",
        tok + "==",
        _altered_last_bits(tok),
        _jws({"alg": ["HS256"], "typ": "JWT"}, claims, SECRET),
        _jws({"alg": "HS256", "kid": ["default"]}, claims, SECRET),
        _jws({"alg": "HS256"}, {**claims, "sub": "user-\ud800"}, SECRET),
        _jws({"alg": "HS256"}, {**claims, "jti": "\udfff"}, SECRET),
        "a.b",
        "a.b.c.d",
        "." * 2,
        "é.é.é",
        tok.replace(".", "..", 1),
    ]
    for spelled in spellings:
        for method, path, kw in (
            ("get", SSE, {"params": {"stream": "sp/1"}}),
            ("post", EVENTS, {"json": {"stream": "sp/1", "data": 1}}),
        ):
            r = getattr(server, method)(
                path, headers={"Authorization": f"Bearer {spelled}"}, stream=True, **kw
            )
            assert r.status_code == 401, (spelled, path, r.status_code)
            r.close()
    mercure_bad = [
        _jws({"alg": ["HS256"]}, {"mercure": {"publish": ["*"]}}, "p" * 40),
        _jws({"alg": "HS256"}, {"mercure": {"publish": ["\ud800"]}}, "p" * 40),
        _mercure_publisher() + "=",
    ]
    for spelled in mercure_bad:
        r = server.post(HUB, data={"topic": "t", "data": "x"}, headers={"Authorization": f"Bearer {spelled}"})
        assert r.status_code == 401, (spelled, r.status_code)
    held.close()


def test_inputs_that_gave_500_get_a_4xx_problem(make_server, database_url):
    import socket

    server = make_server(database_url)
    server.put("/api/v1/streams/deep/1", headers=auth())
    r = server.get(EVENTS, params={"clientId": "client-1", "limit": "²"}, headers=auth())
    assert r.status_code == 400 and r.json()["field"] == "limit"
    for depth, status in ((254, 201), (255, 400), (600, 400), (1000, 400)):
        body = b'{"stream":"deep/1","data":' + b"[" * depth + b"]" * depth + b"}"
        r = server.post(EVENTS, data=body, headers={**auth(), "Content-Type": "application/json"})
        assert r.status_code == status, (depth, r.text)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /api/v1/sse?stream=deep/1 HTTP/1.1\r\nHost: x\r\nCookie: session=a\rb\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 400")
    assert server.get("/healthz").status_code == 200


_QUERY_VALUE = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        [
            "²",
            "-1",
            "1e9",
            "nan",
            "inf",
            "0x10",
            " 1",
            "1 ",
            "\u0660",
            "99999999999999999999999",
            "1.5",
            "",
            "%",
            "\x00",
            "earliest",
            "a.1",
            "abc.99",
            "\ud800",
        ]
    ),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from(
        [
            ("/api/v1/events", ("clientId", "after", "limit", "stream")),
            ("/api/v1/poll", ("stream", "cursor", "timeout", "sid", "lastEventId")),
            ("/api/v1/sse", ("stream", "lastEventId", "sid", "envelope", "token")),
            ("/api/v1/stats", ("token", "stream")),
            ("/.well-known/mercure", ("topic", "lastEventID", "authorization")),
        ]
    ),
    st.lists(st.tuples(st.integers(0, 4), _QUERY_VALUE), max_size=4),
    st.one_of(
        st.none(),
        st.text(max_size=40).map(  # what an HTTP client can send at all
            lambda t: "".join(c for c in t if c not in "\r\n\x00").strip()
        ),
    ),
)
def test_no_query_or_token_gives_a_5xx(module_server, route, params, raw_token):
    path, names = route
    query = [(names[i % len(names)], v.encode("utf-8", "surrogatepass")) for i, v in params]
    headers = (
        {**auth()}
        if raw_token is None
        else {"Authorization": "Bearer " + raw_token.encode("utf-8", "surrogatepass").decode("latin-1")}
    )
    if path == "/api/v1/poll":
        query.append(("timeout", b"0"))
    r = module_server.get(path, params=query, headers=headers, stream=True, timeout=30)
    status = r.status_code
    r.close()
    assert status < 500, (path, query, raw_token, status)


# -- 31.4 deadlines on bodies too ---------------------------------------------------------------


def _answer_then_closed(
    server, head: bytes, trickle: bytes = b"", every: float = 0.2, wait_s: float = 20.0
) -> bytes:
    """Send `head`, then trickle bytes; return the answer once the server has closed the
    connection (a connection still open after `wait_s` fails the test)."""
    import socket

    sock = socket.create_connection(("127.0.0.1", server.port), timeout=wait_s)
    sock.setblocking(False)
    got, closed, deadline, sent = b"", False, time.monotonic() + wait_s, 0
    try:
        sock.sendall(head)
        while time.monotonic() < deadline and not closed:
            gevent.sleep(every)
            if sent < len(trickle):
                try:
                    sock.send(trickle[sent : sent + 1])
                    sent += 1
                except OSError:
                    pass
            try:
                while chunk := sock.recv(65536):
                    got += chunk
                closed = True
            except BlockingIOError:
                pass
            except OSError:
                closed = True
    finally:
        sock.close()
    assert closed, f"still open after {wait_s} s; got {got[:80]!r}"
    return got


def test_unread_slow_and_missing_bodies_do_not_hold_connections(make_server, database_url):
    server = make_server(database_url, HEADER_TIMEOUT_S="2", BODY_TIMEOUT_S="1")
    ingest = (
        b"POST /api/v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: {auth()['Authorization']}\r\n".encode()
    )
    missing = _answer_then_closed(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    assert missing.startswith(b"HTTP/1.1 200")
    slow = _answer_then_closed(server, ingest + b"Content-Length: 100\r\n\r\n{", trickle=b"x" * 99)
    assert slow.startswith(b"HTTP/1.1 408")
    big = _answer_then_closed(server, ingest + b"Content-Length: 99999999999\r\n\r\n", trickle=b"x" * 200)
    assert big.startswith(b"HTTP/1.1 413")
    chunked = _answer_then_closed(
        server,
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        trickle=b"cdefghijklmnop",
    )
    assert chunked.startswith(b"HTTP/1.1 405")
    assert server.get("/healthz").status_code == 200


# -- 31.5 limits that heal --------------------------------------------------------------------


def test_slots_taken_while_redis_was_away_are_counted_and_given_back(make_server, database_url, own_redis):
    import redis as redis_client

    server = make_server(
        database_url, REDIS_URL=own_redis.url, MAX_CONNECTIONS_PER_TOKEN="3", MAX_CONNECTIONS_PER_IP="5"
    )
    server.put("/api/v1/streams/lim/1", headers=auth())
    tok = token("limited")

    def open_one(t: str = tok) -> Stream:
        return Stream(server.url + SSE, params={"stream": "lim/1"}, headers={"Authorization": f"Bearer {t}"})

    own_redis.stop()
    held = [open_one() for _ in range(3)]  # counted by this process alone
    assert [s.response.status_code for s in held] == [200, 200, 200]
    extra = open_one()
    assert extra.response.status_code == 429
    extra.close()
    others = [open_one(token(f"other-{n}")) for n in range(2)]  # the address: 5 of 5
    assert [s.response.status_code for s in others] == [200, 200]
    own_redis.start()  # back, and empty
    client = redis_client.Redis.from_url(own_redis.url)
    wait_until(
        lambda: (
            sorted(int(v) for k in client.keys("*:limit:t:*") for v in client.hgetall(k).values())
            == [1, 1, 3]
        ),
        timeout=30,
        message="the renewal to write the slots taken meanwhile",
    )
    refused = open_one(token("sixth"))
    assert refused.response.status_code == 429  # the address holds 5, counted in Redis now
    refused.close()
    for s in held + others:
        s.close()
    wait_until(lambda: _gauge(server, "sluice_connections", '{transport="sse"}') == 0)
    again = []
    try:
        wait_until(
            lambda: again.append(open_one()) or again[-1].response.status_code == 200,
            timeout=15,
            message="the token admitted again once its slots came back",
        )
        more = [open_one() for _ in range(2)]
        again += more
        assert [s.response.status_code for s in more] == [200, 200]  # all three slots healed
    finally:
        for s in again:
            s.close()


# -- 25.8 Mercure ids cannot be hijacked --------------------------------------------------------


def test_a_publisher_cannot_reuse_another_publishers_update_id(make_server, database_url):
    import jwt

    server = make_server(database_url, **MERCURE_KEYS)

    def publisher(sub: str, selectors: list[str]) -> dict:
        tok = jwt.encode({"sub": sub, "mercure": {"publish": selectors}}, "p" * 40, algorithm="HS256")
        return {"Authorization": f"Bearer {tok}"}

    owner, other = publisher("owner", ["*"]), publisher("intruder", ["public/{x}"])
    subscriber = {
        "Authorization": "Bearer "
        + jwt.encode({"mercure": {"subscribe": ["*"]}}, "s" * 40, algorithm="HS256")
    }
    first = server.post(HUB, data={"topic": "public/1", "data": "a", "id": "u-1"}, headers=owner)
    secret = server.post(HUB, data={"topic": "private/1", "data": "s", "private": "on"}, headers=owner)
    assert first.status_code == 200 and secret.status_code == 200
    hijack = server.post(HUB, data={"topic": "public/2", "data": "b", "id": "u-1"}, headers=other)
    assert hijack.status_code == 409 and hijack.json()["type"].endswith("/id-in-use")
    # its own ids a publisher may reuse (the newest update with the id is where a resume starts)
    assert (
        server.post(HUB, data={"topic": "public/3", "data": "c", "id": "mine"}, headers=other).status_code
        == 200
    )
    assert (
        server.post(HUB, data={"topic": "public/4", "data": "d", "id": "mine"}, headers=other).status_code
        == 200
    )
    resumed = Stream(server.url + HUB, params={"topic": "*", "lastEventID": "u-1"}, headers=subscriber)
    try:
        assert resumed.response.status_code == 200
        got = [(e[0], e[2]) for e in resumed.events(3)]
    finally:
        resumed.close()
    assert got[0] == (secret.text, "s")  # the resume point stayed where the owner put it
    assert [data for _, data in got] == ["s", "c", "d"] and "b" not in [d for _, d in got]


# -- 25.9 / 31.8 pacing without a sid; a sid is bound to its subject ----------------------------


def test_a_sid_is_bound_to_its_subject_and_polls_without_one_are_paced(make_server, database_url):
    server = make_server(database_url, MAX_RECONNECTS="5", LONGPOLL_MAX_RATE="1")
    server.put("/api/v1/streams/pace/1", headers=auth())
    victim = {"Authorization": f"Bearer {token('victim')}"}
    held = Stream(server.url + SSE, params={"stream": "pace/1", "sid": "victimsid"}, headers=victim)
    assert held.response.status_code == 200
    held.next(("retry",))
    attacker = {"Authorization": f"Bearer {token('attacker')}"}
    for _ in range(8):  # past MAX_RECONNECTS for that sid, as another subject
        s = Stream(server.url + SSE, params={"stream": "pace/1", "sid": "victimsid"}, headers=attacker)
        s.close()
    r = server.post(EVENTS, json={"stream": "pace/1", "data": "still here"}, headers=auth())
    assert r.status_code == 201
    assert held.events(1)[0][2] == '"still here"'  # no one else took its connection over
    held.close()
    again = Stream(server.url + SSE, params={"stream": "pace/1", "sid": "victimsid"}, headers=victim)
    try:
        assert again.response.status_code == 200  # the victim's own budget is untouched
    finally:
        again.close()
    # Without a sid, polls are paced by subject and address: fast ones are slowed, then 429.
    statuses, slowed = [], 0
    for _ in range(60):
        r = server.get("/api/v1/poll", params={"stream": "pace/1", "timeout": "0"}, headers=attacker)
        statuses.append(r.status_code)
        slowed += "Retry-After" in r.headers
    assert 429 in statuses and slowed > 0
    other = server.get("/api/v1/poll", params={"stream": "pace/1", "timeout": "0"}, headers=victim)
    assert other.status_code == 200  # another subject is paced apart


# -- 25.2 every attack class against one live server, /healthz probed throughout ---------------


def test_every_attack_class_leaves_healthz_answering_within_250_ms(make_server, database_url):
    """bench/attacks.py's classes, half a second each (the bench prints the figures)."""
    from bench.attacks import ATTACK_ENV, run_all
    from tests.helpers import SECRET

    server = make_server(database_url, **ATTACK_ENV)
    rows, failures = run_all(server.url, server.port, SECRET, 0.5)
    assert failures == 0
    assert len(rows) >= 12
    for name, answered, latencies in rows:
        assert latencies, name  # the probe was answered during the class
        assert max(latencies) < HEALTHZ_BUDGET_S, (name, max(latencies))
        statuses = [int(code) for code in re.findall(r"× ([0-9]{3})", answered)]
        assert all(code < 500 for code in statuses), (name, answered)
    assert server.proc.poll() is None


def test_with_postgres_stopped_revocations_and_single_use_tokens_are_refused_not_lost(
    make_server, own_postgres
):
    server = make_server(own_postgres.url)
    server.put("/api/v1/streams/fc/1", headers=auth())
    victim = token("pg-victim", subscribe=["fc/**"])
    own_postgres.stop()
    r = server.post("/api/v1/revocations", json={"sub": "pg-victim"}, headers=REVOKER)
    assert r.status_code == 503  # it could not be kept: never reported done
    once = token("pg-single", subscribe=["fc/**"], once=True, jti="pg-once")
    assert _poll_status(server, once) == 503  # cannot be checked durably: not accepted
    own_postgres.start()
    wait_until(
        lambda: (
            server.post("/api/v1/revocations", json={"sub": "pg-victim"}, headers=REVOKER).status_code == 202
        ),
        timeout=30,
        message="the revocation kept once Postgres is back",
    )
    assert _poll_status(server, victim) == 401
    assert _poll_status(server, once) == 200  # its first use, now that it can be recorded
    assert _poll_status(server, once) == 401
