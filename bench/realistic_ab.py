"""Realistic batched ingest, this checkout against another one, in alternating rounds.

    python bench/realistic_ab.py --other /path/to/checkout [--rounds 3] [--seconds 10] [--workers 1]

For comparing two commits on one machine (`git worktree add /tmp/before HEAD~1`). Each run
starts a fresh embedded PostgreSQL (fsync on) and Redis, the checkout's server (`python app.py`,
or the Procfile's gunicorn with `--workers 2`; `DB_POOL_SIZE` 4 in all), warms it for 3 s, then
drives it for `--seconds` with bench/loadgen.py: 8 concurrent 1,000-event keyed NDJSON requests
over 1,000 streams. Reports events/s, p99, and CPU per event of the server and of the Postgres
backends (from /proc). Nothing else should run meanwhile: Postgres's CPU is read from every
process of the `nobody` user named postgres. Loopback only; every run stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from auth.tokens import mint  # noqa: E402
from bench.ingest import SECRET, cpu_seconds, proc_cpu_seconds  # noqa: E402
from embedded.servers import EmbeddedPostgres, EmbeddedRedis, free_port  # noqa: E402


def postgres_cpu() -> float:
    out = subprocess.run(["pgrep", "-u", "nobody", "postgres"], capture_output=True, text=True)
    return proc_cpu_seconds(int(pid) for pid in out.stdout.split())


def load(url: str, token: str, seconds: float) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "loadgen.py"),
            "--url",
            url,
            "--token",
            token,
            "--events-per-request",
            "1000",
            "--connections",
            "8",
            "--realistic",
            "--seconds",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(checkout: Path, workers: int, seconds: float, token: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix="sluice-ab-"))
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
        "DB_POOL_SIZE": str(4 // workers),
        "SLUICE_DATA_DIR": str(work / "data"),
        "REQUEST_LOG": "off",
        "WEB_CONCURRENCY": str(workers),
    }
    cmd = (
        [sys.executable, "app.py"]
        if workers == 1
        else [sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.py", "app:wsgi()"]
    )
    with open(work / "server.log", "wb") as log:
        server = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(url + "/healthz", timeout=1)
                break
            except requests.RequestException:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"{checkout}: the server did not start") from None
                time.sleep(0.1)
        load(url, token, 3)  # warm-up: the first slices, the caches
        cpu0, pg0 = cpu_seconds(server.pid), postgres_cpu()
        res = load(url, token, seconds)
        cpu1, pg1 = cpu_seconds(server.pid), postgres_cpu()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        rd.stop()
        pg.remove()
    events = res["events_per_s"] * res["elapsed_s"]
    return {
        "events_per_s": res["events_per_s"],
        "p99_ms": res["p99_ms"],
        "errors": res["errors"],
        "server_us": (cpu1 - cpu0) / events * 1e6,
        "pg_us": (pg1 - pg0) / events * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--other", required=True, type=Path, help="the checkout to compare with")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--workers", type=int, default=1, choices=(1, 2))
    a = ap.parse_args()
    token = mint(SECRET, "bench", publish=["**"], subscribe=["**"])
    checkouts = {"other": a.other.resolve(), "this": ROOT}
    results: dict[str, list[dict]] = {name: [] for name in checkouts}
    for _ in range(a.rounds):
        for name, checkout in checkouts.items():
            res = run(checkout, a.workers, a.seconds, token)
            results[name].append(res)
            print(json.dumps({"checkout": name, **res}), file=sys.stderr, flush=True)
    print(
        f"\nRealistic batched ingest, {a.workers} process(es), {a.seconds:g} s x {a.rounds} "
        f"rounds, alternated (other = {a.other})\n"
    )
    print(
        "| checkout | events/s (each run) | median | p99 ms | server µs/event | Postgres µs/event | errors |"
    )
    print("|---|---|---:|---|---|---|---:|")

    def span(rows: list[dict], key: str, fmt: str = ".1f") -> str:
        values = [r[key] for r in rows]
        return f"{min(values):{fmt}}–{max(values):{fmt}}"

    for name, rows in results.items():
        each = " / ".join(f"{r['events_per_s']:,.0f}" for r in rows)
        print(
            f"| {name} | {each} | {statistics.median(r['events_per_s'] for r in rows):,.0f} | "
            f"{span(rows, 'p99_ms', '.0f')} | {span(rows, 'server_us')} | "
            f"{span(rows, 'pg_us')} | {sum(r['errors'] for r in rows)} |"
        )


if __name__ == "__main__":
    main()
