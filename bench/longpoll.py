"""Long-poll benchmark: server CPU per answer, against a bare WSGI app under the same handler.

    python bench/longpoll.py [--seconds 6] [--rounds 3] [--connections 16]

Starts its own embedded PostgreSQL and Redis, then, in alternating rounds, three servers one at
a time: Sluice (`python app.py`, request log on, as deployed), Sluice with `REQUEST_LOG=off`,
and the floor (a WSGI app that answers the same small JSON under Sluice's pywsgi handler, with
nothing else). A client process of its own (gevent, raw keep-alive sockets) keeps N
connections polling in a closed loop with `timeout=0`, each passing back the cursor and `sid`
it was given, so every answer is an immediate one (nothing is held, no events: this measures
the per-request path). `LONGPOLL_MAX_RATE` is raised so that no answer is paced. The server's
CPU comes from `/proc` over the client's run. Prints a table of medians and ranges.
Loopback only; every run stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECRET = "bench-secret-0123456789abcdef0123456789"
STREAM = "bench"


def serve_floor(port: int) -> None:
    """The floor: Sluice's handler and WSGIServer, an app that returns a fixed poll answer."""
    from gevent import monkey

    monkey.patch_all()
    from gevent.pywsgi import WSGIServer

    from web.wsgi import SluiceHandler

    body = json.dumps({"events": [], "cursor": 0, "sid": "floor"}).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]

    def app(environ: dict, start_response: Callable[..., object]) -> list[bytes]:
        start_response("200 OK", headers)
        return [body]

    WSGIServer(("127.0.0.1", port), app, log=None, handler_class=SluiceHandler).serve_forever()


def client(port: int, token: str, connections: int, seconds: float, warmup: float) -> None:
    """N keep-alive connections polling in a closed loop; one JSON line of results."""
    from gevent import monkey

    monkey.patch_all()
    import socket
    import time

    import gevent

    counts = {"answers": 0, "errors": 0, "all": 0}
    state = {"counting": False}

    def one() -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        cursor, sid = "", ""
        while True:
            query = (
                f"stream={STREAM}&timeout=0"
                + (f"&cursor={cursor}" if cursor else "")
                + (f"&sid={sid}" if sid else "")
            )
            sock.sendall(
                f"GET /api/v1/poll?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Authorization: Bearer {token}\r\n\r\n".encode()
            )
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise OSError("closed")
                buf += chunk
            head, _, rest = buf.partition(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(rest) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    raise OSError("closed")
                rest += chunk
            answer, buf = rest[:length], rest[length:]
            counts["all"] += 1
            if state["counting"]:
                counts["answers" if status == 200 else "errors"] += 1
            if status == 200:
                doc = json.loads(answer)
                cursor, sid = str(doc.get("cursor", cursor)), str(doc.get("sid", sid))

    workers = [gevent.spawn(one) for _ in range(connections)]
    gevent.sleep(warmup)
    state["counting"] = True
    t0 = time.monotonic()
    gevent.sleep(seconds)
    state["counting"] = False
    elapsed = time.monotonic() - t0
    dead = sum(1 for w in workers if w.dead)
    gevent.killall(workers, timeout=2)
    print(
        json.dumps(
            {
                "answers": counts["answers"],
                "errors": counts["errors"] + dead,
                "all": counts["all"],
                "elapsed_s": elapsed,
            }
        ),
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--serve-floor", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--client", nargs=2, metavar=("PORT", "TOKEN"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve_floor:
        serve_floor(a.serve_floor)
        return
    if a.client:
        client(int(a.client[0]), a.client[1], a.connections, a.seconds, warmup=1.0)
        return

    import requests

    from auth.tokens import mint
    from bench.ingest import Proc
    from embedded.servers import EmbeddedPostgres, EmbeddedRedis, free_port

    def cpu_split(pid: int) -> tuple[float, float]:
        """(user, kernel) CPU seconds of the server process."""
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick

    work = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    pg = EmbeddedPostgres(work / "pg").start()
    rd = EmbeddedRedis(work / "redis").start()
    token = mint(SECRET, "bench", publish=["**"], subscribe=["**"])
    variants = {"sluice": {}, "sluice, REQUEST_LOG=off": {"REQUEST_LOG": "off"}, "floor": None}
    results: dict[str, list[dict]] = {name: [] for name in variants}
    try:
        for _ in range(a.rounds):
            for name, extra in variants.items():
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                if extra is None:
                    server = Proc(
                        [sys.executable, __file__, "--serve-floor", str(port)],
                        dict(os.environ),
                        work / "floor.log",
                        None,
                        port,
                    )
                else:
                    env = {
                        **os.environ,
                        "PORT": str(port),
                        "HOST": "127.0.0.1",
                        "DATABASE_URL": pg.url,
                        "REDIS_URL": rd.url,
                        "SLUICE_SECRET": SECRET,
                        "SLUICE_DATA_DIR": str(work / "data"),
                        "LONGPOLL_MAX_RATE": "1000000",
                        **extra,
                    }
                    server = Proc(
                        [sys.executable, str(ROOT / "app.py")], env, work / "sluice.log", url + "/healthz"
                    )
                    requests.put(
                        f"{url}/api/v1/streams/{STREAM}",
                        timeout=10,
                        headers={"Authorization": f"Bearer {token}"},
                    ).raise_for_status()
                try:
                    cpu0 = cpu_split(server.p.pid)
                    out = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--client",
                            str(port),
                            token,
                            "--connections",
                            str(a.connections),
                            "--seconds",
                            str(a.seconds),
                        ],
                        capture_output=True,
                        text=True,
                        timeout=a.seconds + 60,
                        check=True,
                    )
                    cpu1 = cpu_split(server.p.pid)
                finally:
                    server.stop()
                res = json.loads(out.stdout.strip().splitlines()[-1])
                # The server's CPU over the whole client run, warm-up included, per answer given.
                answers = max(1, res["all"])
                res["user_us"] = (cpu1[0] - cpu0[0]) / answers * 1e6
                res["kernel_us"] = (cpu1[1] - cpu0[1]) / answers * 1e6
                res["cpu_us"] = res["user_us"] + res["kernel_us"]
                res["per_s"] = res["answers"] / res["elapsed_s"]
                results[name].append(res)
                print(json.dumps({"server": name, **res}), file=sys.stderr, flush=True)
    finally:
        rd.stop()
        pg.remove()

    def med(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    print(
        f"\nLong-poll, {a.connections} connections, closed loop, timeout=0, "
        f"{a.seconds:g} s x {a.rounds} rounds, alternated\n"
    )
    print(
        "| server | answers/s (median, range) | server CPU µs/answer (median, range) | "
        "of which user / kernel (medians) | errors |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, rows in results.items():
        rates = [r["per_s"] for r in rows]
        cpus = [r["cpu_us"] for r in rows]
        print(
            f"| {name} | {med(rates):,.0f} ({min(rates):,.0f}–{max(rates):,.0f}) | "
            f"{med(cpus):.0f} ({min(cpus):.0f}–{max(cpus):.0f}) | "
            f"{med([r['user_us'] for r in rows]):.0f} / {med([r['kernel_us'] for r in rows]):.0f} | "
            f"{sum(r['errors'] for r in rows)} |"
        )


if __name__ == "__main__":
    main()
