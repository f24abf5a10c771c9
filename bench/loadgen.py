"""HTTP load generator for the ingest benchmark (its own process, so its CPU is not the server's).

Open loop (`--rate`): request i is due at t0 + i/rate and its latency is measured from that due
time, so a server that falls behind is charged for the queueing it causes. Closed loop (no
rate): each connection sends its next request as soon as the last is answered. Keep-alive
connections on raw sockets keep the client cheap. Prints one JSON line of results.
Only loopback targets are accepted; the run stops by itself after --seconds.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402


def request_bytes(host: str, port: int, path: str, token: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Conn:
    """One keep-alive HTTP/1.1 connection that sends a prepared request and reads the answer."""

    def __init__(self, host: str, port: int) -> None:
        self.addr = (host, port)
        self.sock: socket.socket | None = None
        self.buf = b""
        self.last_body = b""

    def roundtrip(self, payload: bytes) -> int:
        try:
            if self.sock is None:
                self.sock = socket.create_connection(self.addr, timeout=30)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.buf = b""
            self.sock.sendall(payload)
            while b"\r\n\r\n" not in self.buf:
                self._fill()
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split()[1])
            length = 0
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            while len(rest) < length:
                self.buf = rest
                self._fill()
                rest = self.buf
            self.buf = rest[length:]
            if not 200 <= status < 300:
                self.last_body = rest[:length]
            if close:
                self.close()
            return status
        except (OSError, ValueError, IndexError):
            self.close()
            return -1

    def _fill(self) -> None:
        assert self.sock is not None
        chunk = self.sock.recv(262144)
        if not chunk:
            raise OSError("connection closed")
        self.buf += chunk

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p / 100.0 * len(sorted_values)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", required=True, help="http://127.0.0.1:PORT")
    ap.add_argument("--token", required=True)
    ap.add_argument("--events-per-request", type=int, default=1)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--rate", type=float, default=0, help="requests/s (open loop); 0 = closed loop")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument(
        "--realistic",
        action="store_true",
        help="seed 003's shape: every event keyed (random 32-hex), ~120-byte data, "
        "streams drawn from 1,000; NDJSON when several per request",
    )
    args = ap.parse_args()

    hostport = args.url.split("//", 1)[1].rstrip("/")
    host, port = hostport.rsplit(":", 1)
    if host not in ("127.0.0.1", "localhost", "[::1]", "::1"):
        raise SystemExit("loadgen only targets loopback")
    n = args.events_per_request
    data = {"payload": "x" * 100}
    if n == 1:
        body = json.dumps({"stream": "bench/0", "data": data}).encode()
    else:
        body = json.dumps([{"stream": f"bench/{i % 16}", "data": data} for i in range(n)]).encode()
    payload = request_bytes(host, int(port), "/api/v1/events", args.token, body)

    def realistic_payload() -> bytes:
        events = [
            json.dumps(
                {
                    "stream": f"s/{random.randrange(1000)}",
                    "key": os.urandom(16).hex(),
                    "data": {"payload": "x" * 100},
                }
            )
            for _ in range(n)
        ]
        if n == 1:
            return request_bytes(host, int(port), "/api/v1/events", args.token, events[0].encode())
        head = (
            f"POST /api/v1/events HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer "
            f"{args.token}\r\nContent-Type: application/x-ndjson\r\n"
        )
        body = "\n".join(events).encode()
        return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    latencies: list[float] = []
    last_done = [0.0]
    statuses: dict[int, int] = {}
    error_samples: list[str] = []
    t0 = time.monotonic() + 0.2
    measure_from = t0 + args.warmup
    end = measure_from + args.seconds
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)

    def worker(w: int) -> None:
        conn = Conn(host, int(port))
        i = w
        while True:
            if args.rate:
                due = t0 + i / args.rate
                i += args.connections
                now = time.monotonic()
                if due > now:
                    gevent.sleep(due - now)
            else:
                due = time.monotonic()
            if due >= end:
                break
            status = conn.roundtrip(realistic_payload() if args.realistic else payload)
            done = time.monotonic()
            if due >= measure_from:
                latencies.append(done - due)
                last_done[0] = max(last_done[0], done)
                statuses[status] = statuses.get(status, 0) + 1
            if status != -1 and not 200 <= status < 300 and len(error_samples) < 3:
                error_samples.append(conn.last_body.decode(errors="replace")[:300])
            if status == -1:
                gevent.sleep(0.01)
        conn.close()

    gevent.joinall(
        [gevent.spawn(worker, w) for w in range(args.connections)], timeout=args.seconds + args.warmup + 60
    )
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    ok = sum(v for k, v in statuses.items() if 200 <= k < 300)
    errors = sum(v for k, v in statuses.items() if not 200 <= k < 300)
    lat = sorted(latencies)
    # Answers to requests due in the window may come after it: charge that time too.
    elapsed = max(args.seconds, last_done[0] - measure_from)
    print(
        json.dumps(
            {
                "requests_ok": ok,
                "errors": errors,
                "statuses": {str(k): v for k, v in statuses.items()},
                "events_per_s": ok * n / elapsed,
                "requests_per_s": ok / elapsed,
                "elapsed_s": elapsed,
                "p50_ms": percentile(lat, 50) * 1000,
                "p99_ms": percentile(lat, 99) * 1000,
                "max_ms": (lat[-1] * 1000) if lat else float("nan"),
                "error_samples": error_samples,
                "client_cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
            }
        )
    )


if __name__ == "__main__":
    main()
