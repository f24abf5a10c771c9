"""Soak: a steady 1,000 events/s for 30 minutes with 1,000 SSE subscribers and retention of
5 minutes, to see that the database size levels off, server RSS stays flat, delivery p99 stays
flat and pruning never moves ingest p99.

    python bench/soak.py [--minutes 30] [--rate 1000] [--subscribers 1000] [--retention-s 300]

Starts its own embedded PostgreSQL and Redis and one `python app.py` (RETENTION_MAX_AGE_S as
given, slices of one minute of traffic, RETENTION_PRUNE_S=10), runs bench/soak_client.py in its
own process, and prints one row a minute: events acknowledged, ingest p99, delivery p50/p99,
database size, events held, server RSS, slices dropped so far. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg2
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from auth.tokens import mint  # noqa: E402
from bench.ingest import SECRET, Proc  # noqa: E402
from embedded.servers import EmbeddedPostgres, EmbeddedRedis, free_port  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--retention-s", type=int, default=300)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sluice-soak-"))
    pg = EmbeddedPostgres(work / "pg").start()
    rd = EmbeddedRedis(work / "redis").start()
    port = free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "DATABASE_URL": pg.url,
        "REDIS_URL": rd.url,
        "SLUICE_SECRET": SECRET,
        "DB_POOL_SIZE": "4",
        "SLUICE_DATA_DIR": str(work / "data"),
        "REQUEST_LOG": "off",
        "RETENTION_MAX_AGE_S": str(args.retention_s),
        "RETENTION_PRUNE_S": "10",
        "STORAGE_SLICE_POSITIONS": str(int(args.rate * 60)),
    }
    url = f"http://127.0.0.1:{port}"
    server = Proc([sys.executable, str(ROOT / "app.py")], env, work / "server.log", url + "/healthz")
    token = mint(SECRET, "soak", publish=["**"], subscribe=["**"], ttl_s=int(args.minutes * 60) + 3600)
    for i in range(100):
        requests.put(
            f"{url}/api/v1/streams/soak/{i}", headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
    client = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench" / "soak_client.py"),
            "--url",
            url,
            "--token",
            token,
            "--rate",
            str(args.rate),
            "--subscribers",
            str(args.subscribers),
            "--seconds",
            str(args.minutes * 60),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    conn = psycopg2.connect(pg.url)
    conn.autocommit = True
    print(
        f"Soak: {args.rate:g} events/s, {args.subscribers} SSE subscribers over 100 streams, "
        f"retention {args.retention_s} s, {args.minutes:g} min, {os.cpu_count()} cores\n"
    )
    print(
        "| min | acked/s | ingest p99 ms | delivered/s | delivery p50 ms | delivery p99 ms | "
        "DB MB | events held | server RSS MB | slices dropped | errors |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    try:
        assert client.stdout is not None
        for line in client.stdout:
            row = json.loads(line)
            with conn.cursor() as cur:
                cur.execute("SELECT pg_database_size(current_database()), (SELECT count(*) FROM events)")
                size, held = cur.fetchone()
            metrics = requests.get(url + "/metrics", timeout=10).text
            dropped = next(
                (
                    float(m.split()[-1])
                    for m in metrics.splitlines()
                    if m.startswith('sluice_retention_removed_total{what="slices"}')
                ),
                0,
            )
            print(
                f"| {row['t_s'] / 60:.0f} | {row['acked'] / 60:,.0f} | {row['ingest_p99_ms']:.1f} | "
                f"{row['delivered'] / 60:,.0f} | {row['delivery_p50_ms']:.1f} | "
                f"{row['delivery_p99_ms']:.1f} | {size / 2**20:,.0f} | {held:,} | "
                f"{rss_mb(server.p.pid):.0f} | {dropped:.0f} | {row['errors']} |",
                flush=True,
            )
    finally:
        client.kill()
        server.stop()
        conn.close()
        rd.stop()
        pg.remove()  # a throwaway database: its data goes too


if __name__ == "__main__":
    main()
