"""Streaming at the scale issue 3 asks for, against a real server: a never-reading client
beside 200 subscribers, 100,000 events of catch-up beside live subscribers, and 1,000
connect/disconnect cycles. Assertions are about what arrived and what the server still holds,
never about how long it took."""

import json
import socket
from pathlib import Path

import gevent
import pytest
from gevent.pool import Pool as GreenletPool

from tests.helpers import EVENTS, SSE, auth, open_stream, publish, wait_until
from tests.sse import Stream, parse_event_stream

pytestmark = pytest.mark.slow  # several server processes


def rss_kb(server) -> int:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def metric(server, name: str) -> float:
    for line in server.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def subscribers(server, stream: str) -> int:
    return server.get(f"/api/v1/streams/{stream}", headers=auth()).json()["subscribers"]


def never_reading_client(server, query: str) -> socket.socket:
    """Subscribes, then never reads: its receive window is tiny, so the server's writes stall."""
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    slow.connect(("127.0.0.1", server.port))
    slow.sendall(
        f"GET {SSE}?{query} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth()['Authorization']}\r\n\r\n".encode()
    )
    return slow


def test_never_reading_client_beside_200_subscribers(make_server, database_url):
    srv = make_server(database_url, SUBSCRIBER_QUEUE_MAX="4", SSE_WRITE_TIMEOUT_S="2", HEARTBEAT_S="1")
    srv.put("/api/v1/streams/wide", headers=auth())
    srv.put("/api/v1/streams/bulk", headers=auth())
    # It also takes a bulk stream nobody else reads, so that its socket buffers (megabytes on
    # loopback) fill without making the 200 readers read gigabytes.
    slow = never_reading_client(srv, "stream=wide&stream=bulk")
    group = GreenletPool(50)
    normal = list(group.imap_unordered(lambda _: open_stream(srv, "wide"), range(200)))
    wait_until(lambda: subscribers(srv, "wide") == 201, message="201 subscribers")
    rss_before = rss_kb(srv)
    n, pad, bulk = 60, "x" * 4000, [{"stream": "bulk", "data": "y" * 60000}] * 10
    readers = [gevent.spawn(s.events, n, 120) for s in normal]
    for i in range(n):
        publish(srv, "wide", {"i": i, "pad": pad})
        assert srv.post(EVENTS, json=bulk, headers=auth()).status_code == 201
    for reader in readers:
        got = reader.get(timeout=180)
        assert [json.loads(e[2])["i"] for e in got] == list(range(n))
    # The one that never reads is cut loose; the 200 others are all still subscribed.
    wait_until(
        lambda: subscribers(srv, "wide") == 200, timeout=30, message="the never-reading client to be dropped"
    )
    assert metric(srv, "sluice_slow_consumer_disconnects_total") == 1.0
    # 36 MB went to the one that never reads and 60 x 4 KB to 201 connections: bodies are
    # shared and queues bounded, so the server holds far less than what was published to it.
    assert rss_kb(srv) - rss_before < 24 * 1024
    slow.close()
    for s in normal:
        s.close()


def test_catch_up_of_100000_events_beside_live_subscribers(make_server, database_url):
    srv = make_server(database_url, DB_POOL_SIZE="2", CATCHUP_PAGE="1000")
    total = 100_000
    ids = []
    for start in range(0, total, 1000):
        body = [{"stream": "history", "data": start + i} for i in range(1000)]
        r = srv.post(EVENTS, json=body, headers=auth(), timeout=60)
        assert r.status_code == 201, r.text
        ids.append(r.json()["events"][-1]["id"])
    srv.put("/api/v1/streams/live", headers=auth())
    live = [open_stream(srv, "live") for _ in range(20)]
    for s in live:
        s.next(("retry",))
    # A reader that takes its time: the server pages through the history in its greenlet,
    # yielding between pages, while live delivery and ingest carry on.
    replay = Stream(
        srv.url + SSE,
        headers={**auth(), "Last-Event-ID": "0"},
        params={"stream": "history"},
        recv_delay=0.005,
        recv_size=16384,
    )
    replayed: list[int] = []

    def read_history() -> None:
        while len(replayed) < total:
            item = replay.next(timeout=120)
            assert item[0] == "event", item
            replayed.append(int(item[3]))

    history = gevent.spawn(read_history)
    progress_at_live = []
    for i in range(30):
        publish(srv, "live", i)  # ingest gets a pool slot while the replay holds none
        for s in live:
            assert s.next(timeout=30)[3] == str(i)
        progress_at_live.append(len(replayed))
        gevent.sleep(0.05)
    history.get(timeout=300)
    assert replayed == list(range(total))  # every event once, in order
    # Live events were delivered while the replay was still under way, not after it.
    assert progress_at_live[0] < total
    for s in live + [replay]:
        s.close()


def test_1000_connect_and_disconnect_cycles_leak_nothing(make_server, database_url):
    # A heartbeat far away: only the disconnect watcher can notice idle closes.
    srv = make_server(database_url, HEARTBEAT_S="60")
    srv.put("/api/v1/streams/churn", headers=auth())
    keep = open_stream(srv, "churn")
    keep.next(("retry",))
    baseline = metric(srv, "sluice_greenlets")
    request = (
        f"GET {SSE}?stream=churn HTTP/1.1\r\nHost: x\r\nAuthorization: {auth()['Authorization']}\r\n\r\n"
    ).encode()

    def cycle(i: int) -> None:
        conn = socket.create_connection(("127.0.0.1", srv.port))
        conn.sendall(request)
        assert conn.recv(12) == b"HTTP/1.1 200"
        if i % 2:
            publish(srv, "churn", i)  # half of them close with an event in flight
        conn.close()

    group = GreenletPool(20)
    list(group.imap_unordered(cycle, range(1000)))
    wait_until(
        lambda: subscribers(srv, "churn") == 1, timeout=30, message="every closed stream to be noticed"
    )
    # Every connection's greenlet, watcher and queue is gone: back to the baseline (a few
    # greenlets may still be finishing the last HTTP requests of this test).
    wait_until(
        lambda: metric(srv, "sluice_greenlets") <= baseline + 5,
        timeout=30,
        message="greenlets back to the baseline",
    )
    got = keep.events(500)
    positions = [int(e[0].rpartition(".")[2]) for e in got]
    assert positions == sorted(set(positions))  # in order, none twice
    assert sorted(json.loads(e[2]) for e in got) == list(range(1, 1000, 2))
    keep.close()


def chunked_body_to_eof(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes, checked as one well-formed chunked
    response ending with its `0` chunk; returns the body."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head
    body = b""
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert rest == b"\r\n"  # the last chunk, then the connection closes
            return body
        body += rest[:size]
        assert rest[size : size + 2] == b"\r\n"
        rest = rest[size + 2 :]


def test_held_streams_park_without_a_greenlet_and_still_get_everything(make_server, database_url):
    """An idle stream leaves pywsgi (it parks): no greenlet, handler or environ each. Parked,
    it still gets live events in order, heartbeats, and a well-formed end, and its request-log
    line is written at that end, not when it parked."""
    srv = make_server(database_url, HEARTBEAT_S="0.5")
    srv.put("/api/v1/streams/park", headers=auth())
    baseline = metric(srv, "sluice_greenlets")
    held = list(GreenletPool(20).imap_unordered(lambda _: open_stream(srv, "park"), range(100)))
    raw = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    raw.sendall(
        f"GET {SSE}?stream=park HTTP/1.1\r\nHost: x\r\nAuthorization: "
        f"{auth()['Authorization']}\r\n\r\n".encode()
    )
    wait_until(lambda: subscribers(srv, "park") == 101, message="101 subscribers")
    # 101 held streams, and no more greenlets than before they came (a few for the requests).
    wait_until(
        lambda: metric(srv, "sluice_greenlets") <= baseline + 5,
        timeout=30,
        message="the held streams to park",
    )
    for s in held:
        assert s.next(("comment",))  # a heartbeat, written straight to a parked socket
    positions = [int(publish(srv, "park", {"n": i})) for i in range(5)]
    for s in held:
        got = s.events(5)
        assert [int(e[0].rpartition(".")[2]) for e in got] == positions
        assert [json.loads(e[2])["n"] for e in got] == list(range(5))
    sids = {s.parser.last_id.partition(".")[0] for s in held}

    def stream_lines() -> list[dict]:
        lines = [json.loads(x) for x in srv.log().splitlines() if x.startswith("{")]
        return [x for x in lines if x.get("route") == SSE and x.get("sid") in sids]

    assert stream_lines() == []  # parked long ago, but not ended: no line yet
    assert srv.delete("/api/v1/streams/park", headers=auth()).status_code == 204
    for s in held:
        assert s.next() == ("event", s.parser.last_id, "end", '{"stream":"park"}')
        assert s.next(("event", "end")) == ("end",)
    events, _, _ = parse_event_stream(chunked_body_to_eof(raw))
    assert [int(e[0].rpartition(".")[2]) for e in events[:-1]] == positions
    assert events[-1][1:] == ("end", '{"stream":"park"}')
    wait_until(lambda: len(stream_lines()) == 100, message="a log line per ended stream")
    assert all(line["status"] == 200 for line in stream_lines())
    wait_until(lambda: subscribers_or_gone(srv) == 0, message="every stream to have left")
    raw.close()


def subscribers_or_gone(server) -> int:
    r = server.get("/api/v1/streams/park", headers=auth())
    return 0 if r.status_code == 404 else r.json()["subscribers"]
