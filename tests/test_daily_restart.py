"""The daily restart, rehearsed: two processes on one Postgres and one Redis, each restarted in
turn three times while publishers offer ~1,300 events/s (single and batched, every event keyed,
unacknowledged requests retried on the other process with the same keys) and 200 SSE and 50
long-poll clients read, reconnecting to whichever process answers. Every acknowledged event is
stored exactly once, and every client gets every event of its stream exactly once and in order.
The test prints the longest gap a client saw."""

from __future__ import annotations

import itertools
import time

import gevent
import gevent.event
import psycopg2
import pytest
import requests

from tests.helpers import EVENTS, POLL, SSE, auth, wait_until
from tests.sse import Stream

pytestmark = pytest.mark.slow
STREAMS = [f"day/{i}" for i in range(20)]
SSE_CLIENTS = 200
POLL_CLIENTS = 50


class Fleet:
    def __init__(self, servers):
        self.servers = servers
        self.turn = itertools.count()

    def pick(self):
        return self.servers[next(self.turn) % len(self.servers)]


class Reader:
    """One client of one stream: what it received, in order, with arrival times."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.positions: list[int] = []
        self.times: list[float] = []

    def got(self, position: int) -> None:
        self.positions.append(position)
        self.times.append(time.monotonic())

    def gap(self) -> float:
        return max((b - a for a, b in zip(self.times, self.times[1:], strict=False)), default=0.0)


def sse_reader(fleet: Fleet, reader: Reader, stop) -> None:
    last_id = "0"
    while not stop.is_set():
        server = fleet.pick()
        try:
            s = Stream(
                server.url + SSE,
                headers={**auth(), "Last-Event-ID": last_id},
                params={"stream": reader.stream},
            )
        except (OSError, EOFError, ValueError):  # refused, or closed mid-answer: restarting
            gevent.sleep(0.2)
            continue
        try:
            if s.response.status_code != 200:
                gevent.sleep(0.2)
                continue
            while not stop.is_set():
                item = s.next(("event",), timeout=5)
                if item == ("end",):
                    break
                last_id = item[1]
                reader.got(int(last_id.rpartition(".")[2]))
        except gevent.Timeout:
            pass  # quiet: go on waiting (or stop)
        finally:
            s.close()
        gevent.sleep(0.05)


def poll_reader(fleet: Fleet, reader: Reader, stop) -> None:
    cursor, sid = "0", None
    session = requests.Session()
    while not stop.is_set():
        server = fleet.pick()
        params = {"stream": reader.stream, "cursor": cursor, "timeout": "2"}
        if sid:
            params["sid"] = sid
        try:
            r = session.get(server.url + POLL, params=params, headers=auth(), timeout=10)
        except requests.RequestException:
            gevent.sleep(0.2)
            continue
        if r.status_code != 200:
            gevent.sleep(0.2)
            continue
        page = r.json()
        for e in page["events"]:
            reader.got(int(e["id"]))
        cursor, sid = page["cursor"], page["sid"]


def publisher(fleet: Fleet, batch: int, per_s: float, acked: dict, stop, tag: str) -> None:
    """Keyed requests at a steady pace; one that is not acknowledged is sent again, with the
    same keys, to the next process until it is."""
    n = 0
    t0 = time.monotonic()
    while not stop.is_set():
        gevent.sleep(max(0.0, t0 + n / per_s - time.monotonic()))
        body = [
            {"stream": STREAMS[(n * batch + i) % len(STREAMS)], "data": n, "key": f"{tag}-{n}-{i}"}
            for i in range(batch)
        ]
        n += 1
        while True:
            server = fleet.pick()
            try:
                r = requests.post(
                    server.url + EVENTS, json=body if batch > 1 else body[0], headers=auth(), timeout=10
                )
            except requests.RequestException:
                gevent.sleep(0.1)
                continue
            if r.status_code in (200, 201):
                for e in r.json()["events"]:
                    acked[e["key"]] = int(e["id"])
                break
            gevent.sleep(0.1)


def test_rolling_restarts_lose_nothing_and_repeat_nothing(make_server, database_url):
    env = {
        "HEARTBEAT_S": "2",
        "RETRY_BASE_MS": "200",
        "RETRY_MAX_MS": "1000",
        "MAX_RECONNECTS": "1000",
        "LONGPOLL_MAX_RATE": "50",
    }
    servers = [make_server(database_url, **env), make_server(database_url, **env)]
    for name in STREAMS:
        servers[0].put(f"/api/v1/streams/{name}", headers=auth())
    fleet = Fleet(servers)
    stop_readers, stop_publishing = gevent.event.Event(), gevent.event.Event()
    readers = [Reader(STREAMS[i % len(STREAMS)]) for i in range(SSE_CLIENTS + POLL_CLIENTS)]
    greenlets = [gevent.spawn(sse_reader, fleet, r, stop_readers) for r in readers[:SSE_CLIENTS]]
    greenlets += [gevent.spawn(poll_reader, fleet, r, stop_readers) for r in readers[SSE_CLIENTS:]]
    acked: dict[str, int] = {}
    # ~1,300 events/s offered: four single-event publishers and three of 50-event batches.
    publishers = [gevent.spawn(publisher, fleet, 1, 25, acked, stop_publishing, f"one{i}") for i in range(4)]
    publishers += [
        gevent.spawn(publisher, fleet, 50, 8, acked, stop_publishing, f"many{i}") for i in range(3)
    ]
    started = time.monotonic()
    gevent.sleep(3)
    for _ in range(3):  # each process restarted in turn, three times
        for server in servers:
            server.stop()  # SIGTERM: drains, streams get retry:, the batcher flushes
            server.start()
            gevent.sleep(2)
    stop_publishing.set()
    gevent.joinall(publishers, timeout=60, raise_error=True)
    elapsed = time.monotonic() - started

    conn = psycopg2.connect(database_url)
    with conn.cursor() as cur:
        cur.execute("SELECT key, count(*), min(id) FROM events WHERE key IS NOT NULL GROUP BY key")
        stored = {key: (count, first) for key, count, first in cur.fetchall()}
        cur.execute("SELECT stream, id FROM events ORDER BY id")
        by_stream: dict[str, list[int]] = {}
        for stream, position in cur.fetchall():
            by_stream.setdefault(stream, []).append(position)
    conn.close()
    assert acked and all(stored.get(k, (0, 0)) == (1, v) for k, v in acked.items())
    assert all(count == 1 for count, _ in stored.values())  # retried requests: no duplicates

    def caught_up():
        return all(r.positions[-1:] == by_stream[r.stream][-1:] for r in readers)

    wait_until(caught_up, timeout=60, interval=0.5, message="every client to catch up")
    stop_readers.set()
    gevent.joinall(greenlets, timeout=30)
    for r in readers:
        assert r.positions == by_stream[r.stream], f"a client of {r.stream} missed or repeated"
    longest = max(r.gap() for r in readers)
    print(
        f"\nrolling restarts: {len(acked):,} events acknowledged in {elapsed:.0f} s "
        f"({len(acked) / elapsed:,.0f}/s), {SSE_CLIENTS} SSE + {POLL_CLIENTS} long-poll "
        f"clients, longest gap a client saw: {longest:.2f} s"
    )
