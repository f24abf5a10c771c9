"""Fan-out benchmark: many SSE (and long-poll) subscribers on ONE Sluice process.

    python bench/fanout.py [--seconds 10]

Starts embedded PostgreSQL and Redis and one `python app.py`, then for each scenario runs
bench/fanout_client.py (its own process: N subscribers on one stream plus a publisher of
~200-byte events). Reports connections held, server RSS per idle connection, deliveries/s,
publish-to-receipt latency p50/p99 (sampled connections), server CPU per delivery, and the
client's own CPU. Loopback only.
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

import jwt
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from auth.tokens import mint  # noqa: E402
from bench.ingest import SECRET, Proc, cpu_seconds  # noqa: E402
from embedded.servers import EmbeddedPostgres, EmbeddedRedis, free_port  # noqa: E402


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def sys_seconds(pid: int) -> float:
    """Kernel CPU time of the server (its share of `cpu_seconds`: sending on sockets)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[12]) / os.sysconf("SC_CLK_TCK")


def run_client(url: str, token: str, pid: int, **kw: object) -> dict:
    args = [sys.executable, str(ROOT / "bench" / "fanout_client.py"), "--url", url, "--token", token]
    for k, v in kw.items():
        if v is True:
            args.append(f"--{k.replace('_', '-')}")
        else:
            args += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    connected = json.loads(proc.stdout.readline())
    rss = rss_kb(pid)
    cpu0, sys0 = cpu_seconds(pid), sys_seconds(pid)
    line = proc.stdout.readline()
    cpu1, sys1 = cpu_seconds(pid), sys_seconds(pid)
    proc.wait(120)
    result = json.loads(line) if line else {}
    return {
        **result,
        "connected": connected["connected"],
        "rss_kb": rss,
        "server_cpu_s": cpu1 - cpu0,
        "server_sys_s": sys1 - sys0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument(
        "--mercure",
        action="store_true",
        help="also run each SSE scenario through the Mercure door (/.well-known/mercure)",
    )
    ap.add_argument(
        "--only",
        type=int,
        action="append",
        help="run only scenario N (1-based; 0 = the idle run; repeatable)",
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sluice-fanout-"))
    pg = EmbeddedPostgres(work / "pg").start()
    rd = EmbeddedRedis(work / "redis").start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "DATABASE_URL": pg.url,
        "REDIS_URL": rd.url,
        "SLUICE_SECRET": SECRET,
        "SLUICE_DATA_DIR": str(work / "data"),
        "MERCURE_PUBLISHER_JWT_KEY": SECRET,
        "REQUEST_LOG": "off",
    }
    server = Proc([sys.executable, str(ROOT / "app.py")], env, work / "server.log", url + "/healthz")
    token = mint(SECRET, "bench", publish=["**"], subscribe=["**"], ttl_s=7200)
    mercure_token = jwt.encode({"mercure": {"publish": ["*"], "subscribe": ["*"]}}, SECRET, algorithm="HS256")
    requests.put(f"{url}/api/v1/streams/fanout", headers={"Authorization": f"Bearer {token}"})
    rows = []
    try:
        base_rss = rss_kb(server.p.pid)
        idle = None
        if not args.only or 0 in args.only:
            idle = run_client(url, token, server.p.pid, subscribers=10000, seconds=3, connect_only=True)
            print(json.dumps({"idle": idle, "base_rss_kb": base_rss}), file=sys.stderr, flush=True)
            time.sleep(3)
        scenarios = [
            ("SSE", 1000, 50, 1),
            ("SSE", 1000, 0, 1),
            ("SSE", 1000, 0, 10),
            ("SSE", 10000, 5, 1),
            ("SSE", 10000, 0, 10),
            ("long-poll", 1000, 50, 1),
        ]
        if args.only:
            scenarios = [scenarios[i - 1] for i in args.only if i]
        runs = [(mode, n, rate, batch, "native") for mode, n, rate, batch in scenarios]
        if args.mercure:  # each SSE scenario with one event per publish, beside the native one
            runs = [
                r
                for mode, n, rate, batch, door in runs
                for r in (
                    [(mode, n, rate, batch, door), (mode, n, rate, batch, "mercure")]
                    if mode == "SSE" and batch == 1
                    else [(mode, n, rate, batch, door)]
                )
            ]
        for mode, n, rate, batch, door in runs:
            res = run_client(
                url,
                token,
                server.p.pid,
                mode="sse" if mode == "SSE" else "poll",
                subscribers=n,
                rate=rate,
                batch=batch,
                seconds=args.seconds,
                door=door,
                mercure_token=mercure_token,
            )
            res.update(mode=mode if door == "native" else "SSE (Mercure door)", n=n, rate=rate, batch=batch)
            metrics = requests.get(f"{url}/metrics", timeout=10).text
            res["server"] = {
                line.split()[0]: float(line.split()[1])
                for line in metrics.splitlines()
                if line.startswith(("sluice_slow_consumer", "sluice_subscribers"))
            }
            rows.append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)
            time.sleep(3)
    finally:
        server.stop()
        rd.stop()
        pg.remove()  # a throwaway database: its data goes too
    print(
        f"\nFan-out benchmark (one server process, {args.seconds:g} s per run, "
        f"{os.cpu_count()} cores shared with Postgres, Redis and the load client)\n"
    )
    if idle is not None:
        per_conn = (idle["rss_kb"] - base_rss) * 1024 / max(1, idle["connected"])
        print(
            f"Idle: {idle['connected']:,} SSE connections held; server RSS "
            f"{base_rss / 1024:.0f} MB → {idle['rss_kb'] / 1024:.0f} MB, "
            f"**{per_conn / 1024:.1f} KB per idle connection**.\n"
        )
    print(
        "| transport | subscribers | publisher | events per publish | events published | "
        "deliveries/s | delivered | p50 ms | p99 ms | server CPU µs/delivery | of it in the kernel | "
        "client CPU s |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if not r.get("step"):
            print(f"| {r['mode']} | {r['n']:,} | failed | | | | | | | | | |")
            continue
        pub = f"{r['rate']:g} events/s" if r["rate"] else "flat out"
        frac = r["deliveries"] / r["expected"] if r["expected"] else 0
        cpu = r["server_cpu_s"] / r["deliveries"] * 1e6 if r["deliveries"] else float("nan")
        print(
            f"| {r['mode']} | {r['subscribers']:,} | {pub} | {r['batch']} | {r['published']:,} | "
            f"{r['deliveries_per_s']:,.0f} | {frac:.1%} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{cpu:.1f} | {r['server_sys_s'] / max(1e-9, r['server_cpu_s']):.0%} | "
            f"{r['client_cpu_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
