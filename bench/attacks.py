"""Each attack class of SECURITY.md against one live server, with /healthz asked every 20 ms.

    python bench/attacks.py [--seconds 3]

Starts its own embedded PostgreSQL and Redis and `python app.py` (the Mercure door on, with
anonymous subscribers), then runs every attack class for about `--seconds` while a thread asks
`/healthz` every 20 ms. Prints, per class, what the attack was answered and the worst and
median `/healthz` latency measured under it. Loopback only, bounded in count and time.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECRET = "bench-secret-0123456789abcdef0123456789"
PUB, SUB = "p" * 40, "s" * 40


def jws(header: dict, payload: dict, key: str) -> str:
    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    signing = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    return signing + "." + b64(hmac.new(key.encode(), signing.encode(), hashlib.sha256).digest())


class Probe:
    """/healthz every 20 ms in a thread; latencies of the current window."""

    def __init__(self, url: str) -> None:
        import requests

        self.session, self.url = requests.Session(), url + "/healthz"
        self.window: list[float] = []
        self.failures = 0
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            began = time.perf_counter()
            try:
                self.session.get(self.url, timeout=30).raise_for_status()
                self.window.append(time.perf_counter() - began)
            except Exception:  # noqa: BLE001 - counted: a probe that fails is a finding
                self.failures += 1
            time.sleep(0.02)

    def take(self) -> list[float]:
        taken, self.window = self.window, []
        return taken

    def stop(self) -> None:
        self._stop = True
        self.thread.join(35)


def raw(port: int, payload: bytes, read: bool = True, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        got = b""
        try:
            while read and (chunk := sock.recv(65536)):
                got += chunk
                if b"\r\n\r\n" in got:
                    break
        except OSError:
            pass
        return got


ATTACK_ENV = {
    "MERCURE_ANONYMOUS": "1",
    "MERCURE_PUBLISHER_JWT_KEY": PUB,
    "MERCURE_SUBSCRIBER_JWT_KEY": SUB,
    "MERCURE_PUBLISH_ORIGINS": "https://app.example",
    "HEADER_TIMEOUT_S": "2",
    "BODY_TIMEOUT_S": "3",
    "REQUEST_LOG": "off",
}
Row = tuple[str, str, list[float]]


def run_all(url: str, port: int, secret: str, seconds: float) -> tuple[list[Row], int]:
    """Every attack class against the server at `url` (started with ATTACK_ENV and `secret`)
    while /healthz is probed: (name, what it was answered, /healthz latencies) per class, and
    how many probes failed."""
    import jwt
    import requests

    from auth.grants import MAX_WILDCARDS
    from auth.tokens import mint
    from mercure.selectors import MAX_EXPRESSIONS

    a = argparse.Namespace(seconds=seconds)
    admin = {
        "Authorization": "Bearer " + mint(secret, "admin", publish=["**"], subscribe=["**"], revoke=True)
    }
    publisher = {
        "Authorization": "Bearer " + jwt.encode({"mercure": {"publish": ["*"]}}, PUB, algorithm="HS256")
    }
    s = requests.Session()
    s.put(url + "/api/v1/streams/user/42/x", headers=admin).raise_for_status()
    probe = Probe(url)
    rows: list[tuple[str, str, list[float]]] = []

    def run(name: str, attack: Callable[[], str]) -> None:
        probe.take()
        answered = attack()
        time.sleep(0.3)  # the fan-out of the last publish, if any, runs meanwhile
        rows.append((name, answered, probe.take()))

    def repeat(fn: Callable[[], int]) -> str:
        seen: Counter[int] = Counter()
        until = time.monotonic() + a.seconds
        while time.monotonic() < until:
            seen[fn()] += 1
        return ", ".join(f"{n}× {status}" for status, n in sorted(seen.items()))

    def stream(path: str, headers: dict | None = None) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            *[f"{k}: {v}" for k, v in (headers or {}).items()],
        ]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sock.recv(4096)
        return sock

    # 1. a URI template at the bound, subscribed, then publishes that it must be matched against
    def templates() -> str:
        held = stream("/.well-known/mercure?topic=" + "%7B%2Ba%7D" * MAX_EXPRESSIONS + "%3F")
        try:
            return repeat(
                lambda: (
                    s.post(
                        url + "/.well-known/mercure",
                        headers=publisher,
                        data={"topic": "a" * 2000, "data": "x"},
                    ).status_code
                )
            )
        finally:
            held.close()

    run(f"URI template, {MAX_EXPRESSIONS} `{{+a}}` (the bound), each publish matched", templates)
    run(
        f"URI template, {MAX_EXPRESSIONS + 1} expressions",
        lambda: repeat(
            lambda: (
                s.get(
                    url + "/.well-known/mercure", params={"topic": "{+a}" * (MAX_EXPRESSIONS + 1)}
                ).status_code
            )
        ),
    )

    def patterns() -> str:
        tok = mint(secret, "u", subscribe=["user/42/**"])
        pattern = "user/42/" + "*a" * (MAX_WILDCARDS - 1) + "*b"
        held = stream(f"/api/v1/sse?stream={pattern}", {"Authorization": f"Bearer {tok}"})
        try:
            return repeat(
                lambda: (
                    s.post(
                        url + "/api/v1/events",
                        headers=admin,
                        json={"stream": "user/42/" + "a" * 190, "data": 1},
                    ).status_code
                )
            )
        finally:
            held.close()

    run(f"stream pattern `*a…*b`, {MAX_WILDCARDS} wildcards, each publish matched", patterns)

    # 3. revocation racing admission
    def race() -> str:
        toks = [mint(secret, "racer", subscribe=["**"], jti="race", n=n) for n in range(300)]
        socks: list[socket.socket] = []

        def open_one(t: str) -> None:
            try:
                socks.append(stream("/api/v1/sse?stream=user/42/x", {"Authorization": f"Bearer {t}"}))
            except OSError:
                pass

        threads = [threading.Thread(target=open_one, args=(t,)) for t in toks]
        for n, t in enumerate(threads):
            t.start()
            if n == 150:
                s.post(url + "/api/v1/revocations", json={"jti": "race"}, headers=admin)
        for t in threads:
            t.join()
        s.post(url + "/api/v1/events", headers=admin, json={"stream": "user/42/x", "data": 1})
        time.sleep(1.0)
        alive = 0
        for sock in socks:
            sock.settimeout(0.2)
            try:
                alive += bool(sock.recv(65536)) and b"data: 1" in sock.recv(65536)
            except OSError:
                pass
            sock.close()
        return f"300 opens, {alive} delivered after the revocation"

    run("300 SSE opens racing a `jti` revocation", race)

    run(
        "cookie publish from `Origin: https://evil.example`",
        lambda: repeat(
            lambda: (
                s.post(
                    url + "/.well-known/mercure",
                    data={"topic": "t", "data": "x"},
                    cookies={"mercureAuthorization": publisher["Authorization"][7:]},
                    headers={"Origin": "https://evil.example"},
                ).status_code
            )
        ),
    )

    def stats_view() -> str:
        nobody = "Bearer " + mint(secret, "nobody", subscribe=[])
        with s.get(url + "/api/v1/stats", stream=True, timeout=10, headers={"Authorization": nobody}) as r:
            text = b""
            for chunk in r.iter_content(1024):
                text += chunk
                if b"event: stats" in text and text.endswith(b"\n\n"):
                    break
        shown = any(k in text for k in (b"process_list", b"deliveries", b"b/big"))
        return f"{r.status_code}; hosts, pids or fleet numbers shown: {shown}"

    run("stats with a token that may subscribe to nothing", stats_view)
    spelled = [
        admin["Authorization"] + "=",
        "Bearer " + jws({"alg": ["HS256"]}, {"sub": "x", "exp": time.time() + 60}, secret),
        "Bearer " + jws({"alg": "HS256"}, {"sub": "u-\ud800", "exp": time.time() + 60}, secret),
    ]
    run(
        "padded token, JOSE `alg` list, lone-surrogate `sub`",
        lambda: repeat(
            lambda: (
                s.post(
                    url + "/api/v1/events",
                    json={"stream": "t/1", "data": 1},
                    headers={"Authorization": spelled[int(time.monotonic() * 10) % 3]},
                ).status_code
            )
        ),
    )
    run(
        "`limit=²`, `data` 600 levels deep",
        lambda: repeat(
            lambda: (
                s.get(
                    url + "/api/v1/events", params={"clientId": "x", "limit": "²"}, headers=admin
                ).status_code
                if int(time.monotonic() * 10) % 2
                else s.post(
                    url + "/api/v1/events",
                    headers={**admin, "Content-Type": "application/json"},
                    data=b'{"stream":"t/1","data":' + b"[" * 600 + b"]" * 600 + b"}",
                ).status_code
            )
        ),
    )

    smuggles = [
        b"Content-Length: 0\r\nContent-Length: 40\r\n",
        b"Transfer-Encoding : chunked\r\n",
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"Content-Length: 1_0\r\n",
        b"X: a\r\n Transfer-Encoding: chunked\r\n",
    ]
    run(
        "request smuggling shapes (5 kinds)",
        lambda: repeat(
            lambda: int(
                raw(
                    port,
                    (
                        b"POST /healthz HTTP/1.1\r\nHost: x\r\n"
                        + smuggles[int(time.monotonic() * 10) % 5]
                        + b"\r\n"
                        + b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"
                    ),
                )[9:12]
                or 0
            )
        ),
    )

    s.post(url + "/.well-known/mercure", headers=publisher, data={"topic": "x", "data": "1", "id": "price-€"})
    run(
        "Mercure resume with a non-ASCII id",
        lambda: repeat(
            lambda: (lambda sock: (sock.close(), 200)[1])(
                stream("/.well-known/mercure?topic=x&lastEventID=price-%E2%82%AC")
            )
        ),
    )

    def slow_bodies() -> str:
        socks = []
        for n in range(16):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                if n % 2
                else b"POST /api/v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
            )
            socks.append(sock)
        time.sleep(a.seconds + 3)  # BODY_TIMEOUT_S=3
        still = 0
        for sock in socks:
            sock.settimeout(0.5)
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                still += 1  # no EOF: the server still holds it
            sock.close()
        return f"16 connections, {still} still open after {a.seconds + 3:.0f} s"

    run("missing and trickled bodies", slow_bodies)

    def big_client() -> str:
        for _ in range(50):
            s.post(
                url + "/api/v1/events",
                headers=admin,
                json=[{"stream": "b/big", "data": n} for n in range(1000)],
            )
        reader = {"Authorization": "Bearer " + mint(secret, "r", subscribe=["a/**"])}
        took = []
        for _ in range(20):
            began = time.perf_counter()
            s.get(url + "/api/v1/events", params={"clientId": "admin"}, headers=reader)
            took.append(time.perf_counter() - began)
        return f"50,000 events elsewhere; read p50 {statistics.median(took) * 1000:.1f} ms"

    run("read by another client's id within a grant", big_client)

    probe.stop()
    return rows, probe.failures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args()

    from bench.ingest import Proc
    from embedded.servers import EmbeddedPostgres, EmbeddedRedis, free_port

    work = Path(tempfile.mkdtemp(prefix="sluice-attacks-"))
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
        **ATTACK_ENV,
    }
    server = Proc([sys.executable, str(ROOT / "app.py")], env, work / "sluice.log", url + "/healthz")
    try:
        rows, failures = run_all(url, port, SECRET, a.seconds)
    finally:
        server.stop()
        rd.stop()
        pg.stop()
    print(f"\nSluice {url}, /healthz every 20 ms, ~{a.seconds:g} s per class; probe failures: {failures}\n")
    print("| attack | answered | /healthz worst | /healthz p50 | probes |")
    print("|---|---|---:|---:|---:|")
    for name, answered, lat in rows:
        worst = max(lat) * 1000 if lat else float("nan")
        p50 = statistics.median(lat) * 1000 if lat else float("nan")
        print(f"| {name} | {answered} | {worst:.1f} ms | {p50:.1f} ms | {len(lat)} |")


if __name__ == "__main__":
    main()
