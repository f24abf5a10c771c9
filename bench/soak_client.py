"""Soak load client: a publisher at a steady rate (keyed events, in small batches) and N SSE
subscribers over M streams. Every --interval seconds it prints one JSON line for that interval:
events acknowledged, ingest latency p50/p99, deliveries, delivery latency p50/p99 (publish to
receipt, from a timestamp in each event), reconnects. Its own process; loopback only; stops by
itself after --seconds.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

window = {"acked": 0, "ingest": [], "delivered": 0, "delivery": [], "reconnects": 0, "errors": 0}


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))] * 1000


def subscriber(host: str, port: int, stream: str, token: str, sample: bool) -> None:
    last = ""
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=60)
            head = f"GET /api/v1/sse?stream={stream}&token={token}"
            if last:
                head += f"&lastEventId={last}"
            sock.sendall(f"{head} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
            buf = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                *frames, buf = buf.split(b"\n\n")
                for frame in frames:
                    event_id = data = None
                    for line in frame.split(b"\n"):
                        if line.startswith(b"id: "):
                            event_id = line[4:].decode()
                        elif line.startswith(b"data: "):
                            data = line[6:]
                    if event_id:
                        last = event_id
                    if data is not None and event_id:
                        window["delivered"] += 1
                        if sample:
                            window["delivery"].append(time.time() - json.loads(data)["t"])
        except OSError:
            window["errors"] += 1
        window["reconnects"] += 1
        gevent.sleep(1)


def publisher(host: str, port: int, token: str, rate: float, batch: int, streams: int, end: float) -> None:
    sock = None
    n = 0
    t0 = time.monotonic()
    while time.monotonic() < end:
        due = t0 + n * batch / rate
        now = time.monotonic()
        if due > now:
            gevent.sleep(due - now)
        events = [
            json.dumps(
                {
                    "stream": f"soak/{(n * batch + i) % streams}",
                    "key": os.urandom(12).hex(),
                    "data": {"t": time.time(), "pad": "x" * 80},
                }
            )
            for i in range(batch)
        ]
        body = "\n".join(events).encode()
        req = (
            f"POST /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/x-ndjson\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        started = time.monotonic()
        try:
            if sock is None:
                sock = socket.create_connection((host, port), timeout=30)
            sock.sendall(req)
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    raise OSError("closed")
                answer += chunk
            head, _, rest = answer.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(rest) < length:
                rest += sock.recv(65536)
            if head.split()[1] in (b"200", b"201"):
                window["acked"] += batch
                window["ingest"].append(time.monotonic() - started)
            else:
                window["errors"] += 1
        except OSError:
            window["errors"] += 1
            sock = None
        n += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=1800)
    ap.add_argument("--interval", type=float, default=60)
    args = ap.parse_args()
    host, port = args.url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
    if host not in ("127.0.0.1", "localhost"):
        raise SystemExit("loopback only")
    for i in range(args.subscribers):
        gevent.spawn(subscriber, host, int(port), f"soak/{i % args.streams}", args.token, i % 20 == 0)
        if i % 100 == 99:
            gevent.sleep(0.05)
    end = time.monotonic() + args.seconds
    gevent.spawn(publisher, host, int(port), args.token, args.rate, args.batch, args.streams, end)
    started = time.monotonic()
    while time.monotonic() < end:
        gevent.sleep(args.interval)
        snap = dict(window)
        for k in window:
            window[k] = [] if isinstance(window[k], list) else 0
        print(
            json.dumps(
                {
                    "t_s": round(time.monotonic() - started),
                    "acked": snap["acked"],
                    "ingest_p50_ms": pct(snap["ingest"], 50),
                    "ingest_p99_ms": pct(snap["ingest"], 99),
                    "delivered": snap["delivered"],
                    "delivery_p50_ms": pct(snap["delivery"], 50),
                    "delivery_p99_ms": pct(snap["delivery"], 99),
                    "reconnects": snap["reconnects"],
                    "errors": snap["errors"],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
