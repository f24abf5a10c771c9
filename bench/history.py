"""A day, compressed: ingest and reads on an empty database beside the same on one preloaded
with N events (seed 003's shape: 1,000 streams, every event keyed, ~120-byte data).

    python bench/history.py [--preload 20000000] [--seconds 10]

Starts its own embedded PostgreSQL and Redis. For each database (empty, then preloaded through
server-side INSERT ... SELECT in 1M-row steps, then ANALYZE) it starts `python app.py`
(DB_POOL_SIZE=4) and measures, with bench/loadgen.py in its own process:
- single-event ingest (keyed, 64 connections, closed loop) and batched ingest (1,000-event keyed
  NDJSON over 1,000 streams, 8 concurrent);
- a history page (`GET /api/v1/events?stream=S&limit=100`, first page and one deep in history);
- an SSE catch-up page: from `lastEventId` to the 500th event, for one stream and for ten.
Prints a table with the preloaded/empty ratio, and the bytes per event of the preloaded table.
Loopback only; stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg2
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from auth.tokens import mint  # noqa: E402
from bench.ingest import SECRET, Proc, run_load  # noqa: E402
from embedded.servers import EmbeddedPostgres, EmbeddedRedis, free_port  # noqa: E402
from ingest.store import EventStore  # noqa: E402

STEP = 1_000_000


def preload(url: str, n: int) -> None:
    """n events over 1,000 streams, keyed, through the server (no client round trips)."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    store = EventStore()
    store.ensure_slices(conn, n + 1)
    with conn.cursor() as cur:
        cur.execute("SET synchronous_commit = off")
        for lo in range(1, n + 1, STEP):
            hi = min(n, lo + STEP - 1)
            started = time.monotonic()
            cur.execute(
                "INSERT INTO events (id, stream, type, data, client_id, key) SELECT g, "
                "'s/' || (g %% 1000), 'message', '{\"payload\":\"' || repeat('x', 100) "
                "|| '\"}', 'preload', md5(g::text) FROM generate_series(%s, %s) g",
                (lo, hi),
            )
            cur.execute(
                "INSERT INTO event_keys (client_id, key, id, stream) SELECT 'preload', "
                "md5(g::text), g, 's/' || (g %% 1000) FROM generate_series(%s, %s) g",
                (lo, hi),
            )
            print(
                f"preload: {hi:,} of {n:,} ({STEP / (time.monotonic() - started):,.0f} rows/s)",
                file=sys.stderr,
                flush=True,
            )
        cur.execute("UPDATE sluice_position SET last = %s", (n,))
        cur.execute(
            "INSERT INTO streams (name, last_id) SELECT 's/' || g, %s - 999 + g "
            "FROM generate_series(0, 999) g ON CONFLICT (name) DO NOTHING",
            (n,),
        )
        cur.execute("ANALYZE")
    conn.close()


def table_bytes(url: str) -> tuple[int, int]:
    conn = psycopg2.connect(url)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'events'::regclass"
        )
        events = int(cur.fetchone()[0])
        cur.execute("SELECT pg_total_relation_size('event_keys'), (SELECT last FROM sluice_position)")
        keys, last = cur.fetchone()
    conn.close()
    return events + int(keys), int(last)


def timed_gets(url: str, token: str, params: dict, n: int = 200) -> tuple[float, float]:
    """Median and p99 ms of n sequential GETs on one keep-alive connection."""
    times = []
    with requests.Session() as s:
        for _ in range(n):
            t = time.perf_counter()
            r = s.get(
                url + "/api/v1/events",
                params=params,
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            )
            times.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200, r.text
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def held(url: str, streams: list[str], after: int) -> int:
    """How many events of `streams` lie after `after` (at most 500 counted)."""
    conn = psycopg2.connect(url)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM (SELECT 1 FROM events WHERE stream = ANY(%s) AND id > %s LIMIT 500) x",
            (streams, after),
        )
        n = cur.fetchone()[0]
    conn.close()
    return n


def catch_up_ms(port: int, token: str, streams: list[str], after: int, want: int = 500) -> float:
    """Time from connecting to the `want`-th event of an SSE catch-up from `after`."""
    query = "&".join(f"stream={s}" for s in streams) + f"&lastEventId={after}&token={token}"
    t = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"GET /api/v1/sse?{query} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
    seen, buf = 0, b""
    while seen < want:
        chunk = sock.recv(262144)
        if not chunk:
            raise RuntimeError("stream ended early: " + buf[:300].decode(errors="replace"))
        buf += chunk
        seen = buf.count(b"\nid: ") - 1  # the preamble's id line has no event
    elapsed = (time.perf_counter() - t) * 1000
    sock.close()
    return elapsed


def measure(
    label: str, pg: EmbeddedPostgres, rd: EmbeddedRedis, work: Path, seconds: float, preload_n: int
) -> dict:
    name = f"bench_{label}"
    admin = psycopg2.connect(pg.url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        cur.execute(f"CREATE DATABASE {name}")
    admin.close()
    url = pg.url.rsplit("/", 1)[0] + "/" + name
    conn = psycopg2.connect(url)
    conn.autocommit = True
    EventStore().migrate(conn)
    conn.close()
    if preload_n:
        started = time.monotonic()
        preload(url, preload_n)
        print(
            f"preloaded {preload_n:,} events in {time.monotonic() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    size, last = table_bytes(url)
    port = free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "DATABASE_URL": url,
        "REDIS_URL": rd.url,
        "SLUICE_SECRET": SECRET,
        "DB_POOL_SIZE": "4",
        "SLUICE_DATA_DIR": str(work / "data"),
        "REQUEST_LOG": "off",
    }
    base = f"http://127.0.0.1:{port}"
    server = Proc([sys.executable, str(ROOT / "app.py")], env, work / f"{label}.log", base + "/healthz")
    token = mint(SECRET, "bench", publish=["**"], subscribe=["**"], ttl_s=7200)
    out: dict = {
        "label": label,
        "events_before": last,
        "bytes_per_event": size / last if last else float("nan"),
    }
    try:
        single = run_load(
            base, token, server.p.pid, seconds=seconds, events_per_request=1, connections=64, realistic=True
        )
        batched = run_load(
            base, token, server.p.pid, seconds=seconds, events_per_request=1000, connections=8, realistic=True
        )
        out["single"] = (single["events_per_s"], single["p99_ms"])
        out["batched"] = (batched["events_per_s"], batched["p99_ms"])
        top = max(last, 1)
        out["history_first"] = timed_gets(base, token, {"stream": "s/7", "limit": 100})
        out["history_deep"] = timed_gets(
            base, token, {"stream": "s/7", "limit": 100, "after": max(0, top - 200_000)}
        )
        for key, streams in (("catchup_1", ["s/7"]), ("catchup_10", [f"s/{i}" for i in range(10)])):
            after = 0 if key == "catchup_1" else max(0, top - 500_000)
            want = min(500, held(url, streams, after))
            runs = sorted(catch_up_ms(port, token, streams, after, want) for _ in range(15))
            out[key] = (statistics.median(runs), runs[-1])
    finally:
        server.stop()
    print(json.dumps(out), file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preload", type=int, default=20_000_000)
    ap.add_argument("--seconds", type=float, default=10)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sluice-history-"))
    pg = EmbeddedPostgres(work / "pg").start()
    rd = EmbeddedRedis(work / "redis").start()
    try:
        empty = measure("empty", pg, rd, work, args.seconds, 0)
        full = measure("preloaded", pg, rd, work, args.seconds, args.preload)
    finally:
        rd.stop()
        pg.remove()  # a throwaway database: its data goes too
    print(
        f"\nA day, compressed: empty database vs {args.preload:,} events preloaded "
        f"({args.seconds:g} s ingest runs, DB_POOL_SIZE=4, {os.cpu_count()} cores)\n"
    )
    print("| measure | empty | preloaded | preloaded / empty |")
    print("|---|---:|---:|---:|")
    rows = [
        ("single-event ingest, events/s (p99 ms)", "single", True),
        ("batched ingest, 1,000 keyed NDJSON, events/s (p99 ms)", "batched", True),
        ("history page, first (median ms, p99)", "history_first", False),
        ("history page, deep (median ms, p99)", "history_deep", False),
        ("SSE catch-up page of 500, 1 stream (median ms, max)", "catchup_1", False),
        ("SSE catch-up page of 500, 10 streams (median ms, max)", "catchup_10", False),
    ]
    for title, key, rate in rows:
        a, b = empty[key], full[key]
        fmt = (lambda v: f"{v[0]:,.0f} ({v[1]:.0f})") if rate else (lambda v: f"{v[0]:.1f} ({v[1]:.1f})")
        print(f"| {title} | {fmt(a)} | {fmt(b)} | {b[0] / a[0]:.2f}× |")
    print(f"| bytes per event (events + keys, with indexes) | | {full['bytes_per_event']:,.0f} | |")


if __name__ == "__main__":
    main()
