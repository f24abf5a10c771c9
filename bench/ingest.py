"""Ingest benchmark: Sluice against a naive per-request-commit baseline, both on 4 connections.

    python bench/ingest.py [--seconds 10] [--delay-ms 2]

Starts its own embedded PostgreSQL (fsync on) and Redis, the Sluice server (`python app.py`,
DB_POOL_SIZE=4), the naive baseline (bench/naive_server.py, same pool size), optionally a
delay proxy so the database is N ms away in each direction, and drives each with
bench/loadgen.py in a separate process. Prints a table: events/s, acknowledgement latency
p50/p99, errors, server CPU per event, and the Sluice/naive ratio. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from auth.tokens import mint  # noqa: E402
from embedded.servers import EmbeddedPostgres, EmbeddedRedis, child_pids, free_port  # noqa: E402

SECRET = "bench-secret-0123456789abcdef0123456789"


GUNICORN = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "config" / "gunicorn.py")]


def proc_cpu_seconds(pids: Iterable[int]) -> float:
    """User and kernel CPU time of these processes (those still running), from /proc."""
    total = 0.0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children that are still running (gunicorn's workers)."""
    return proc_cpu_seconds([pid, *child_pids(pid)])


class Proc:
    def __init__(
        self, args: list[str], env: dict[str, str], log: Path, ready_url: str | None, port: int | None = None
    ) -> None:
        self.log = log
        with open(log, "wb") as f:
            self.p = subprocess.Popen(args, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"{args} exited:\n{log.read_text()}")
            try:
                if ready_url:
                    requests.get(ready_url, timeout=1)
                else:
                    import socket

                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except Exception:  # noqa: BLE001
                time.sleep(0.1)
        raise RuntimeError(f"{args} did not start")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()


def run_load(url: str, token: str, pid: int, **kw: object) -> dict:
    args = [sys.executable, str(ROOT / "bench" / "loadgen.py"), "--url", url, "--token", token]
    for k, v in kw.items():
        flag = f"--{k.replace('_', '-')}"
        args += [flag] if v is True else [flag, str(v)]
    cpu0 = cpu_seconds(pid)
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)
    cpu1 = cpu_seconds(pid)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["server_cpu_s"] = cpu1 - cpu0
    return result


def pending_ab(seconds: float, rounds: int = 3) -> None:
    """The fleet pending mirror's cost on the hot path: server CPU per single-event request
    with PENDING_FLEET=on against off, in alternating rounds on one database."""
    work = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    pg = EmbeddedPostgres(work / "pg").start()
    rd = EmbeddedRedis(work / "redis").start()
    token = mint(SECRET, "bench", publish=["**"], subscribe=["**"])
    results: dict[str, list[dict]] = {"on": [], "off": []}
    try:
        for _ in range(rounds):
            for mode in ("on", "off"):
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
                    "PENDING_FLEET": mode,
                }
                url = f"http://127.0.0.1:{port}"
                server = Proc(
                    [sys.executable, str(ROOT / "app.py")], env, work / f"{mode}.log", url + "/healthz"
                )
                try:
                    res = run_load(
                        url, token, server.p.pid, seconds=seconds, events_per_request=1, connections=64
                    )
                finally:
                    server.stop()
                res["cpu_us"] = res["server_cpu_s"] / (res["events_per_s"] * res["elapsed_s"]) * 1e6
                results[mode].append(res)
                print(json.dumps({"mode": mode, **res}), file=sys.stderr, flush=True)
    finally:
        rd.stop()
        pg.remove()  # a throwaway database: its data goes too
    print(
        f"\nPENDING_FLEET cost, single-event ingest, 64 connections closed loop, {seconds:g} s "
        f"x {rounds} rounds each, alternated\n"
    )
    print("| PENDING_FLEET | events/s (median) | p99 ms (median) | server CPU µs/event (median) |")
    print("|---|---:|---:|---:|")
    med = {}
    for mode in ("off", "on"):
        rows = results[mode]
        pick = sorted(rows, key=lambda r: r["cpu_us"])[len(rows) // 2]
        med[mode] = pick["cpu_us"]
        print(
            f"| {mode} | {sorted(r['events_per_s'] for r in rows)[len(rows) // 2]:,.0f} | "
            f"{sorted(r['p99_ms'] for r in rows)[len(rows) // 2]:.1f} | {pick['cpu_us']:.0f} |"
        )
    print(f"\nmirror cost: {(med['on'] / med['off'] - 1) * 100:+.1f}% server CPU per event")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rate", type=float, default=2000, help="single-event requests/s offered")
    ap.add_argument("--delay-ms", type=float, default=2.0, help="database delay, each direction")
    ap.add_argument("--skip-delay", action="store_true")
    ap.add_argument(
        "--pending-ab",
        action="store_true",
        help="only: single-event ingest with PENDING_FLEET on and off, alternated",
    )
    args = ap.parse_args()
    if args.pending_ab:
        pending_ab(args.seconds, rounds=5)
        return

    work = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    pg = EmbeddedPostgres(work / "pg").start()
    rd = EmbeddedRedis(work / "redis").start()
    procs: list[Proc] = []
    rows = []
    token = mint(SECRET, "bench", publish=["**"], subscribe=["**"])
    try:
        targets = [("direct", pg.port)]
        if not args.skip_delay:
            proxy_port = free_port()
            procs.append(
                Proc(
                    [
                        sys.executable,
                        str(ROOT / "bench" / "delay_proxy.py"),
                        str(proxy_port),
                        str(pg.port),
                        str(args.delay_ms),
                    ],
                    dict(os.environ),
                    work / "proxy.log",
                    None,
                    proxy_port,
                )
            )
            targets.append((f"+{args.delay_ms:g} ms each way", proxy_port))
        servers = [
            ("sluice", "1 process × 4 conns", [sys.executable, str(ROOT / "app.py")], "4", "1"),
            ("sluice", "2 workers × 2 conns", GUNICORN + ["app:wsgi()"], "2", "2"),
            (
                "naive",
                "1 process × 4 conns",
                [sys.executable, str(ROOT / "bench" / "naive_server.py")],
                "4",
                "1",
            ),
            ("naive", "2 workers × 2 conns", GUNICORN + ["bench.naive_server:create_app()"], "2", "2"),
        ]
        for label, db_port in targets:
            db_url = f"postgresql://postgres@127.0.0.1:{db_port}/postgres"
            for name, shape, command, pool_size, workers in servers:
                port = free_port()
                env = {
                    **os.environ,
                    "PORT": str(port),
                    "HOST": "127.0.0.1",
                    "DATABASE_URL": db_url,
                    "REDIS_URL": rd.url,
                    "SLUICE_SECRET": SECRET,
                    "DB_POOL_SIZE": pool_size,
                    "WEB_CONCURRENCY": workers,
                    "SLUICE_DATA_DIR": str(work / "data"),
                }
                url = f"http://127.0.0.1:{port}"
                server = Proc(command, env, work / f"{name}.log", url + "/api/v1/nothing")
                procs.append(server)
                scenarios = [
                    (
                        f"1 event/request @ {args.rate:g} req/s",
                        dict(events_per_request=1, rate=args.rate, connections=64),
                    )
                ]
                if label == "direct":
                    scenarios += [
                        # wrk-style: 64 keep-alive connections, each sends its next request
                        # as soon as the last is answered
                        (
                            "1 event/request, closed loop, 64 connections",
                            dict(events_per_request=1, connections=64),
                        ),
                        ("1,000 events/request, 8 concurrent", dict(events_per_request=1000, connections=8)),
                        # NDJSON, every event keyed, 1,000 streams per request, ~120-byte data
                        (
                            "realistic 1,000-event NDJSON, 8 concurrent",
                            dict(events_per_request=1000, connections=8, realistic=True),
                        ),
                    ]
                for scenario, kw in scenarios:
                    res = run_load(url, token, server.p.pid, seconds=args.seconds, **kw)
                    events = res["events_per_s"] * res["elapsed_s"]
                    rows.append(
                        {
                            "db": label,
                            "scenario": scenario,
                            "server": f"{name}, {shape}",
                            "name": name,
                            "shape": shape,
                            **res,
                            "cpu_us_per_event": (res["server_cpu_s"] / events * 1e6)
                            if events
                            else float("nan"),
                        }
                    )
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                server.stop()
    finally:
        for p in procs:
            p.stop()
        rd.stop()
        pg.remove()  # a throwaway database: its data goes too

    print(
        f"\nIngest benchmark ({args.seconds:g} s per run, DB_POOL_SIZE=4, fsync on, "
        f"{os.cpu_count()} cores, load client in its own process)\n"
    )
    header = (
        "| database | scenario | server | events/s | p50 ms | p99 ms | errors | "
        "server CPU µs/event | vs naive |"
    )
    print(header)
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        naive = next(
            (
                r
                for r in rows
                if r["db"] == row["db"]
                and r["scenario"] == row["scenario"]
                and r["name"] == "naive"
                and r["shape"] == row["shape"]
            ),
            None,
        )
        ratio = (
            f"{row['events_per_s'] / naive['events_per_s']:.1f}×"
            if row["name"] == "sluice" and naive and naive["events_per_s"]
            else ""
        )
        print(
            f"| {row['db']} | {row['scenario']} | {row['server']} | {row['events_per_s']:,.0f} | "
            f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['errors']} | "
            f"{row['cpu_us_per_event']:.0f} | {ratio} |"
        )


if __name__ == "__main__":
    main()
