"""Scale-out, measured: ingest and fan-out with 1, 2 and 4 processes, and what the single-row
position counter allows.

    python bench/scaleout.py [--seconds 10] [--part fleet|counter|all]

fleet: gunicorn with WEB_CONCURRENCY = 1, 2, 4 (DB_POOL_SIZE 4, 2, 1: the same 4 connections in
all), then (a) single-event ingest, 64 keep-alive connections, closed loop; (b) batched ingest,
1,000 keyed NDJSON events per request over 1,000 streams, 8 concurrent; (c) fan-out, 1,000 SSE
subscribers of one stream with the publisher flat out (bench/fanout_client.py).
counter: the most batches per second the position counter lets through: 1-event batches written
with `EventStore.write_batch` by 16 concurrent writers, with the database 0 ms and 2 ms away in
each direction (bench/delay_proxy.py). Every batch holds the counter's row lock from its first
statement to its COMMIT, so batches/s × batch size is the ingest ceiling of one database.
Prints tables. Loopback only; stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from auth.tokens import mint  # noqa: E402
from bench.ingest import GUNICORN, SECRET, Proc, cpu_seconds, run_load  # noqa: E402
from embedded.servers import EmbeddedPostgres, EmbeddedRedis, free_port  # noqa: E402

COUNTER = r"""
from gevent import monkey; monkey.patch_all()
import psycogreen.gevent; psycogreen.gevent.patch_psycopg()
import sys, time, gevent
sys.path.insert(0, sys.argv[3])
from ingest.pool import Pool
from ingest.store import EventStore
from ingest.events import IngestRequest, NewEvent
url, seconds = sys.argv[1], float(sys.argv[2])
pool, store = Pool(url, 16, timeout_s=30), EventStore()
with pool.connection() as conn:
    store.migrate(conn)
    store.ensure_slices(conn, 10_000_000)
done = [0]
end = time.monotonic() + seconds
def writer():
    while time.monotonic() < end:
        with pool.connection() as conn:
            store.write_batch(conn, [IngestRequest("c", [NewEvent("s", "message", "1")])])
        done[0] += 1
gevent.joinall([gevent.spawn(writer) for _ in range(16)])
print(done[0] / seconds)
"""


def fleet(seconds: float, work: Path, pg: EmbeddedPostgres, rd: EmbeddedRedis) -> list[dict]:
    rows = []
    token = mint(SECRET, "bench", publish=["**"], subscribe=["**"], ttl_s=7200)
    for workers, pool in ((1, 4), (2, 2), (4, 1)):
        db = f"scale_{workers}"
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"import psycopg2; c = psycopg2.connect('{pg.url}');"
                f"c.autocommit = True; c.cursor().execute('DROP DATABASE IF EXISTS {db}');"
                f"c.cursor().execute('CREATE DATABASE {db}')",
            ],
            check=True,
        )
        url = pg.url.rsplit("/", 1)[0] + "/" + db
        port = free_port()
        env = {
            **os.environ,
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "DATABASE_URL": url,
            "REDIS_URL": rd.url,
            "SLUICE_SECRET": SECRET,
            "DB_POOL_SIZE": str(pool),
            "WEB_CONCURRENCY": str(workers),
            "SLUICE_DATA_DIR": str(work / "data"),
            "REQUEST_LOG": "off",
        }
        base = f"http://127.0.0.1:{port}"
        server = Proc(GUNICORN + ["app:wsgi()"], env, work / f"gunicorn-{workers}.log", base + "/readyz")
        time.sleep(2)  # every worker up
        try:
            single = run_load(
                base,
                token,
                server.p.pid,
                seconds=seconds,
                events_per_request=1,
                connections=64,
                realistic=True,
            )
            batched = run_load(
                base,
                token,
                server.p.pid,
                seconds=seconds,
                events_per_request=1000,
                connections=8,
                realistic=True,
            )
            import requests

            requests.put(
                f"{base}/api/v1/streams/fanout", headers={"Authorization": f"Bearer {token}"}, timeout=10
            )
            cpu0 = cpu_seconds(server.p.pid)
            out = subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "bench" / "fanout_client.py"),
                    "--url",
                    base,
                    "--token",
                    token,
                    "--subscribers",
                    "1000",
                    "--rate",
                    "0",
                    "--seconds",
                    str(seconds),
                ],
                capture_output=True,
                text=True,
                timeout=600,
                cwd=ROOT,
            )
            cpu1 = cpu_seconds(server.p.pid)
            fan = json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            server.stop()
        rows.append(
            {
                "workers": workers,
                "pool": pool,
                "single": single,
                "batched": batched,
                "fanout": fan,
                "fan_cpu_s": cpu1 - cpu0,
            }
        )
        print(json.dumps(rows[-1], default=str)[:400], file=sys.stderr, flush=True)
    return rows


def counter(seconds: float, work: Path, pg: EmbeddedPostgres) -> list[tuple[str, float]]:
    rows = []
    targets = [("0 ms", pg.port)]
    proxy_port = free_port()
    proxy = Proc(
        [sys.executable, str(ROOT / "bench" / "delay_proxy.py"), str(proxy_port), str(pg.port), "2"],
        dict(os.environ),
        work / "proxy.log",
        None,
        proxy_port,
    )
    targets.append(("2 ms each way", proxy_port))
    try:
        for label, port in targets:
            db = "counter_" + label.split()[0]
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    f"import psycopg2; c = psycopg2.connect("
                    f"'{pg.url}'); c.autocommit = True; c.cursor().execute('DROP DATABASE "
                    f"IF EXISTS {db}'); c.cursor().execute('CREATE DATABASE {db}')",
                ],
                check=True,
            )
            url = f"postgresql://postgres@127.0.0.1:{port}/{db}"
            out = subprocess.run(
                [sys.executable, "-c", COUNTER, url, str(seconds), str(ROOT)],
                capture_output=True,
                text=True,
                timeout=600,
                check=True,
            )
            rows.append((label, float(out.stdout.strip().splitlines()[-1])))
    finally:
        proxy.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--part", choices=["fleet", "counter", "all"], default="all")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sluice-scale-"))
    pg = EmbeddedPostgres(work / "pg").start()
    rd = EmbeddedRedis(work / "redis").start()
    try:
        fleet_rows = fleet(args.seconds, work, pg, rd) if args.part in ("fleet", "all") else []
        counter_rows = counter(args.seconds, work, pg) if args.part in ("counter", "all") else []
    finally:
        rd.stop()
        pg.remove()  # a throwaway database: its data goes too
    cores = os.cpu_count()
    if fleet_rows:
        print(
            f"\nScale-out on this machine ({cores} cores; {args.seconds:g} s per run; the same 4 "
            "database connections split over the workers)\n"
        )
        print(
            "| processes | single-event ingest, events/s (p99 ms) | batched ingest, events/s | "
            "fan-out, 1,000 SSE, deliveries/s | server CPU µs/delivery |"
        )
        print("|---:|---:|---:|---:|---:|")
        for r in fleet_rows:
            fan = r["fanout"]
            per = r["fan_cpu_s"] / fan["deliveries"] * 1e6 if fan.get("deliveries") else float("nan")
            print(
                f"| {r['workers']} | {r['single']['events_per_s']:,.0f} "
                f"({r['single']['p99_ms']:.0f}) | {r['batched']['events_per_s']:,.0f} | "
                f"{fan.get('deliveries_per_s', float('nan')):,.0f} | {per:.1f} |"
            )
    if counter_rows:
        print("\nThe position counter: 1-event batches through EventStore.write_batch, 16 writers\n")
        print("| database | batches/s | events/s ceiling at 1,000 events/batch |")
        print("|---|---:|---:|")
        for label, rate in counter_rows:
            print(f"| {label} | {rate:,.0f} | {rate * 1000:,.0f} |")


if __name__ == "__main__":
    main()
