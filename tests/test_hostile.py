"""Hostile clients against a real server: grants across every read path, connection limits,
CORS, request-size limits, and malformed or slow HTTP on raw sockets."""

import socket
import time

import gevent
import pytest
import requests

from tests.helpers import auth, token, wait_until
from tests.sse import Stream

SSE = "/api/v1/sse"
POLL = "/api/v1/poll"
EVENTS = "/api/v1/events"


def publish(server, stream, data, sub="publisher"):
    r = server.post(EVENTS, json={"stream": stream, "data": data}, headers=auth(sub))
    assert r.status_code == 201, r.text
    return r.json()["events"][0]["id"]


def greenlets(server) -> float:
    for line in server.get("/metrics").text.splitlines():
        if line.startswith("sluice_greenlets "):
            return float(line.split()[1])
    raise AssertionError("no sluice_greenlets gauge")


# -- a subscriber granted a/* never sees b/1 ---------------------------------------------------


def test_a_star_grant_never_yields_b_events_in_sse_poll_or_history(server):
    for name in ("a/1", "a/2", "b/1"):
        server.put(f"/api/v1/streams/{name}", headers=auth())
    reader = {"Authorization": f"Bearer {token('reader', publish=(), subscribe=['a/*'])}"}
    publish(server, "b/1", {"secret": 0})
    publish(server, "a/1", {"n": 0})
    # Asking for b/1, alone or beside a granted stream, is refused before anything is sent.
    for streams in (["b/1"], ["a/1", "b/1"]):
        for path in (SSE, POLL):
            r = server.get(path, params={"stream": streams, "timeout": "0"}, headers=reader)
            assert r.status_code == 403, (path, streams)
    # Granted streams from the start (lastEventId=0 replays history) and live.
    sse = Stream(server.url + SSE, headers=reader, params={"stream": ["a/1", "a/2"], "lastEventId": "0"})
    try:
        assert sse.response.status_code == 200
        got = [sse.events(1)[0]]
        for n in range(1, 4):
            publish(server, "b/1", {"secret": n})
            publish(server, "a/2", {"n": n})
        got += sse.events(3)
        polled = server.get(
            POLL, params={"stream": ["a/1", "a/2"], "cursor": "0", "timeout": "0"}, headers=reader
        ).json()["events"]
    finally:
        sse.close()
    assert [e[2] for e in got] == ['{"n":0}', '{"n":1}', '{"n":2}', '{"n":3}']
    assert [e["data"] for e in polled] == [{"n": 0}, {"n": 1}, {"n": 2}, {"n": 3}]
    # History by the publishing client holds both streams; the reader sees only a/*.
    history = server.get(EVENTS, params={"clientId": "publisher"}, headers=reader).json()
    assert {e["stream"] for e in history["events"]} == {"a/1", "a/2"}
    assert len(history["events"]) == 4
    r = server.get(EVENTS, params={"stream": "b/1"}, headers=reader)
    assert r.status_code == 403 or r.json()["events"] == []


# -- connection limits -------------------------------------------------------------------------


def test_connections_per_token_are_limited_and_freed_on_close(make_server, database_url):
    srv = make_server(database_url, MAX_CONNECTIONS_PER_TOKEN="2", LONGPOLL_MAX_S="2")
    srv.put("/api/v1/streams/room/1", headers=auth())
    mine = auth("one-user")
    held = [Stream(srv.url + SSE, headers=mine, params={"stream": "room/1"}) for _ in range(2)]
    assert [s.response.status_code for s in held] == [200, 200]
    third = Stream(srv.url + SSE, headers=mine, params={"stream": "room/1"})
    assert third.response.status_code == 429
    third.close()
    r = srv.get(POLL, params={"stream": "room/1", "timeout": "0"}, headers=mine)
    assert r.status_code == 429
    assert r.json()["type"].endswith("/too-many-connections") and r.headers["Retry-After"]
    # Another token is not affected.
    other = Stream(srv.url + SSE, headers=auth("someone-else"), params={"stream": "room/1"})
    assert other.response.status_code == 200
    other.close()
    held.pop().close()
    refused = [429, 429]  # the third SSE connection and the first poll

    def freed() -> bool:
        status = srv.get(POLL, params={"stream": "room/1", "timeout": "0"}, headers=mine).status_code
        if status == 429:  # the server has not noticed the close yet (a loaded machine)
            refused.append(status)
        return status == 200

    wait_until(freed, 10)
    for s in held:
        s.close()
    assert (
        f'sluice_connection_limit_refusals_total{{limit="token"}} {len(refused)}.0'
        in srv.get("/metrics").text
    )


def test_connections_per_ip_use_the_trusted_forwarded_address(make_server, database_url):
    srv = make_server(database_url, MAX_CONNECTIONS_PER_IP="1", PROXY_HOPS="1")
    srv.put("/api/v1/streams/room/1", headers=auth())

    def open_from(address, sub):
        return Stream(
            srv.url + SSE, headers={**auth(sub), "X-Forwarded-For": address}, params={"stream": "room/1"}
        )

    first = open_from("203.0.113.7", "u1")
    second = open_from("203.0.113.7", "u2")  # same address, another token
    third = open_from("198.51.100.9", "u3")  # another address
    # A client cannot pick its address: only the last hop (the trusted proxy's) counts.
    spoof = open_from("10.0.0.1, 203.0.113.7", "u4")
    try:
        assert first.response.status_code == 200
        assert second.response.status_code == 429
        assert third.response.status_code == 200
        assert spoof.response.status_code == 429
    finally:
        for s in (first, second, third, spoof):
            s.close()


# -- CORS --------------------------------------------------------------------------------------


@pytest.fixture
def cors_srv(make_server, database_url):
    srv = make_server(database_url, CORS_ORIGINS="https://app.example.com, http://localhost:3000")
    srv.put("/api/v1/streams/room/1", headers=auth())
    return srv


def test_cors_echoes_listed_origins_with_credentials_and_nothing_for_others(cors_srv):
    r = cors_srv.get(
        POLL,
        params={"stream": "room/1", "timeout": "0"},
        headers={**auth(), "Origin": "https://app.example.com"},
    )
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert r.headers["Access-Control-Allow-Credentials"] == "true"
    assert "Origin" in r.headers["Vary"]
    assert "Retry-After" in r.headers["Access-Control-Expose-Headers"]
    r = cors_srv.get(
        POLL,
        params={"stream": "room/1", "timeout": "0"},
        headers={**auth(), "Origin": "https://evil.example.net"},
    )
    assert "Access-Control-Allow-Origin" not in r.headers
    assert "Access-Control-Allow-Credentials" not in r.headers
    # Refusals carry the headers too, so a page can read why it was refused.
    r = cors_srv.get(SSE, params={"stream": "nope"}, headers={**auth(), "Origin": "http://localhost:3000"})
    assert r.status_code == 404
    assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"


def test_cors_preflight_allows_listed_origins_and_refuses_others(cors_srv):
    ask = {
        "Origin": "https://app.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    r = requests.options(cors_srv.url + EVENTS, headers=ask, timeout=10)
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "authorization" in r.headers["Access-Control-Allow-Headers"]
    r = requests.options(cors_srv.url + EVENTS, headers={**ask, "Origin": "https://evil.test"}, timeout=10)
    assert r.status_code == 403
    assert "Access-Control-Allow-Origin" not in r.headers
    r = requests.options(
        cors_srv.url + EVENTS,
        headers={**ask, "Access-Control-Request-Headers": "x-something-else"},
        timeout=10,
    )
    assert r.status_code == 403


def test_cors_wildcard_never_allows_credentials(make_server, database_url):
    srv = make_server(database_url, CORS_ORIGINS="*")
    r = srv.get("/healthz", headers={"Origin": "https://anyone.example"})
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in r.headers


def test_cors_origins_must_be_origins(make_server, database_url):
    srv = make_server(database_url, start=False, CORS_ORIGINS="https://app.example.com/path")
    with pytest.raises(AssertionError, match="CORS_ORIGINS"):
        srv.start(timeout=15)


# -- request limits ----------------------------------------------------------------------------


def test_too_many_query_parameters_is_400(server):
    params = [("stream", f"s{i}") for i in range(65)]
    r = server.get(POLL, params=params, headers=auth())
    assert r.status_code == 400
    assert r.json()["type"].endswith("/too-many-parameters")


def test_a_request_line_over_8_kib_is_414(server):
    r = server.get(EVENTS, params={"clientId": "x" * 9000}, headers=auth())
    assert r.status_code == 414


def test_max_request_line_bytes_is_honoured(make_server, database_url):
    srv = make_server(database_url, MAX_REQUEST_LINE_BYTES="1024")
    assert srv.get("/healthz", params={"pad": "x" * 900}).status_code == 200
    assert srv.get("/healthz", params={"pad": "x" * 1100}).status_code == 414
    assert srv.get("/healthz").status_code == 200


def test_a_body_that_never_finishes_is_408_and_holds_no_pool_slot(make_server, database_url):
    srv = make_server(database_url, BODY_TIMEOUT_S="1", DB_POOL_SIZE="1")
    srv.put("/api/v1/streams/s", headers=auth())
    body = b'{"stream": "s", "data": "never finished"}'
    head = (
        f"POST {EVENTS} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token()}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    slow = socket.create_connection(("127.0.0.1", srv.port), timeout=15)
    slow.sendall(head + body[:10])
    # Meanwhile the one pooled connection serves everyone else.
    publish(srv, "s", {"ok": 1})
    answer = slow.recv(65536).decode()
    slow.close()
    assert answer.startswith("HTTP/1.1 408"), answer
    events = srv.get(EVENTS, params={"stream": "s"}, headers=auth()).json()["events"]
    assert [e["data"] for e in events] == [{"ok": 1}]


# -- malformed and slow HTTP on raw sockets ----------------------------------------------------


@pytest.fixture
def raw_srv(make_server, database_url):
    return make_server(database_url, HEADER_TIMEOUT_S="1")


def recv_all(sock: socket.socket) -> bytes:
    out = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            out += chunk
    except ConnectionResetError:
        return out


@pytest.mark.parametrize(
    "request_bytes, expected",
    [
        (b"\x00\xff\xfe garbage \x01\r\n\r\n", b"HTTP/1.1 400"),
        (b"GET / HTTP/9.9\r\n\r\n", b"HTTP/1.1 400"),
        (b"GET /healthz HTTP/1.1\r\nNo colon here\r\n\r\n", b"HTTP/1.1 400"),
        (b"POST /api/v1/events HTTP/1.1\r\nContent-Length: -5\r\n\r\n", b"HTTP/1.1 400"),
        (b"POST /api/v1/events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", b"HTTP/1.1 4"),
    ],
)
def test_garbage_gets_4xx_and_the_connection_closed(raw_srv, request_bytes, expected):
    sock = socket.create_connection(("127.0.0.1", raw_srv.port), timeout=15)
    sock.sendall(request_bytes)
    answer = recv_all(sock)  # returns only when the server closes
    sock.close()
    assert answer.startswith(expected), answer[:200]
    assert raw_srv.get("/healthz").status_code == 200


def test_slow_headers_idle_and_truncated_connections_are_closed_and_leave_nothing(raw_srv):
    baseline = greenlets(raw_srv)
    idle = [socket.create_connection(("127.0.0.1", raw_srv.port), timeout=15) for _ in range(20)]
    slow = [socket.create_connection(("127.0.0.1", raw_srv.port), timeout=15) for _ in range(20)]
    for s in slow:
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
    truncated = []
    for _ in range(20):  # half a request, then the client vanishes
        s = socket.create_connection(("127.0.0.1", raw_srv.port), timeout=15)
        s.sendall(b"POST /api/v1/events HTTP/1.1\r\nContent-Le")
        s.close()
        truncated.append(s)
    # The slow clients keep dribbling header bytes (slowloris): each would take 60 s to finish.
    closed_by_server: set[int] = set()

    def dribble(i: int, s: socket.socket) -> None:
        for n in range(600):
            try:
                s.sendall(f"X-Slow-{n}: 1\r\n".encode())
            except OSError:
                closed_by_server.add(i)
                return
            gevent.sleep(0.1)

    jobs = [gevent.spawn(dribble, i, s) for i, s in enumerate(slow)]
    # While they dribble, normal requests are served.
    assert raw_srv.get("/healthz").status_code == 200
    for s in idle:
        assert recv_all(s) == b""  # closed by the server without an answer
        s.close()
    gevent.joinall(jobs, timeout=30)
    assert len(closed_by_server) == len(slow)
    for s in slow:
        s.close()
    wait_until(lambda: greenlets(raw_srv) <= baseline + 2, 15, message="greenlets back to baseline")


def test_keep_alive_is_not_cut_while_a_client_is_actively_requesting(raw_srv):
    # Many requests on one connection over longer than HEADER_TIMEOUT_S: each gets its own
    # deadline, so an active keep-alive client is never cut.
    with requests.Session() as session:
        started = time.monotonic()
        while time.monotonic() - started < 2.5:
            assert session.get(raw_srv.url + "/healthz", timeout=10).status_code == 200
            gevent.sleep(0.2)


# -- reconnects per connection id --------------------------------------------------------------


def test_a_client_ignoring_retry_is_refused_after_max_reconnects(make_server, database_url):
    srv = make_server(database_url, MAX_RECONNECTS="3")
    srv.put("/api/v1/streams/room/1", headers=auth())
    statuses = []
    for _ in range(5):
        s = Stream(
            srv.url + SSE, headers={**auth(), "Last-Event-ID": "hammersid.0"}, params={"stream": "room/1"}
        )
        statuses.append(s.response.status_code)
        s.close()
    assert statuses == [200, 200, 200, 429, 429]
    # Another connection id is unaffected.
    s = Stream(srv.url + SSE, headers={**auth(), "Last-Event-ID": "calmsid.0"}, params={"stream": "room/1"})
    assert s.response.status_code == 200
    s.close()


def test_a_connection_that_stayed_up_resets_its_reconnect_count(make_server, database_url):
    srv = make_server(database_url, MAX_RECONNECTS="2", RETRY_RESET_AFTER_S="0.3", HEARTBEAT_S="0.1")
    srv.put("/api/v1/streams/room/1", headers=auth())
    for _ in range(4):  # each stays up past RETRY_RESET_AFTER_S, so none counts against it
        s = Stream(
            srv.url + SSE, headers={**auth(), "Last-Event-ID": "steadysid.0"}, params={"stream": "room/1"}
        )
        assert s.response.status_code == 200
        for _ in range(5):
            s.next(("comment",))  # heartbeats: the stream is up
        s.close()
        wait_until(lambda: srv.get("/metrics").text.count("sluice_subscribers 0.0"), 10)


def test_header_block_is_capped_by_max_header_bytes(make_server, database_url):
    srv = make_server(database_url, MAX_HEADER_BYTES="2048")
    assert srv.get("/healthz", headers={"Cookie": "a=" + "x" * 1000}).status_code == 200
    many_small = {f"X-H{i}": "y" * 100 for i in range(30)}  # no line long, the block is 3 KiB
    for headers in ({"Cookie": "a=" + "x" * 3000}, many_small):
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=15)
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode())
        answer = recv_all(sock)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
